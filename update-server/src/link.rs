//! Linking a patch module at its guest address: section layout inside the patch region
//! and x86-64 relocations against module and guest-kernel symbols.

use object::elf;
use thiserror::Error;

use crate::module::{PatchModule, SymbolPlace, MAX_ALIGN};

/// Why a patch module cannot be linked at its guest address.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinkError {
    /// A kernel symbol the module references is not in the guest kernel's symbol table.
    #[error("unresolved symbol '{0}': not in the module and not in the guest kernel's symbol table")]
    Unresolved(String),
    /// A relocation refers to a symbol in a section lucos does not load (e.g. `.init.text`).
    #[error("symbol '{name}' is defined in section '{section}', which is not loaded")]
    NotLoaded {
        /// The symbol.
        name: String,
        /// The section it is defined in.
        section: String,
    },
    /// The module uses a relocation type the linker does not implement.
    #[error("relocation type {r_type} ({name}) is not supported (symbol '{symbol}')")]
    UnsupportedType {
        /// ELF `r_type`.
        r_type: u32,
        /// Its name (`R_X86_64_*`, or `unknown`).
        name: &'static str,
        /// The symbol relocated against.
        symbol: String,
    },
    /// A relocated value does not fit the relocation's field.
    #[error("relocation against '{symbol}' ({name}) overflows: value {value:#x}")]
    Overflow {
        /// The symbol relocated against.
        symbol: String,
        /// The relocation type's name (`R_X86_64_*`).
        name: &'static str,
        /// The value that does not fit.
        value: i128,
    },
    /// A relocation's field lies (partly) outside its section.
    #[error("relocation at {section}+{offset:#x} lies outside the section")]
    OutOfBounds {
        /// The section.
        section: String,
        /// The relocation's offset in it.
        offset: u64,
    },
    /// A place in the module (a relocation's target, a replacement function, a callback
    /// entry) is not inside its loaded section, or names a section the module lacks.
    #[error("'{name}' at {section}+{offset:#x} lies outside the section ({size} bytes)")]
    OutsideSection {
        /// The symbol, function or callback.
        name: String,
        /// The section's name (`#N` if the module has no loaded section N).
        section: String,
        /// The offset in that section.
        offset: u64,
        /// The section's size in bytes (0 if it does not exist).
        size: u64,
    },
    /// A section's alignment is not a power of two or exceeds [`MAX_ALIGN`].
    #[error("section '{section}' has alignment {align}: must be a power of two of at most {MAX_ALIGN}")]
    BadAlign {
        /// The section.
        section: String,
        /// Its alignment.
        align: u64,
    },
    /// The image does not fit in the address space above `base`.
    #[error("an image of {size} bytes does not fit at {base:#x}")]
    TooLarge {
        /// Where it was to be linked.
        base: u64,
        /// Its size in bytes (`u64::MAX` if the layout itself overflows).
        size: u64,
    },
}

fn r_name(t: u32) -> &'static str {
    match t {
        elf::R_X86_64_64 => "R_X86_64_64",
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
        elf::R_X86_64_32 => "R_X86_64_32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        elf::R_X86_64_PC64 => "R_X86_64_PC64",
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
        elf::R_X86_64_NONE => "R_X86_64_NONE",
        _ => "unknown",
    }
}

/// Width in bytes of the field a relocation of type `r_type` writes; None for a type the
/// linker does not implement.
pub fn reloc_width(r_type: u32) -> Option<u64> {
    match r_type {
        elf::R_X86_64_NONE => Some(0),
        elf::R_X86_64_64 | elf::R_X86_64_PC64 => Some(8),
        elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 | elf::R_X86_64_32 | elf::R_X86_64_32S => Some(4),
        _ => None,
    }
}

/// Section placement: offset of each loaded section from the image start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Offset of each section from the image start, indexed like [`PatchModule::sections`].
    pub offsets: Vec<u64>,
    /// Size of each section in bytes, indexed like [`PatchModule::sections`].
    pub sizes: Vec<u64>,
    /// Image size in bytes, rounded up to a page.
    pub size: u64,
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.div_ceil(a.max(1)).checked_mul(a.max(1))
}

/// Lays out sections given as `(size, align, exec)` back to back, code first, each at its
/// alignment (at least 16); the image size is rounded up to a page. Fails, before anything
/// is allocated, with the index of the section at which the image would exceed `limit`
/// bytes and the size needed up to there (`u64::MAX` where that overflows).
pub fn place_sections(sections: &[(u64, u64, bool)], limit: u64) -> Result<Layout, (usize, u64)> {
    let mut offsets = vec![0; sections.len()];
    let mut cur = 0u64;
    let mut order: Vec<usize> = (0..sections.len()).collect();
    order.sort_by_key(|&i| !sections[i].2);
    for i in order {
        let (size, align, _) = sections[i];
        let start = align_up(cur, align.max(16)).ok_or((i, u64::MAX))?;
        cur = start.checked_add(size).ok_or((i, u64::MAX))?;
        if cur > limit {
            return Err((i, cur));
        }
        offsets[i] = start;
    }
    let size = align_up(cur, 4096).ok_or((sections.len().saturating_sub(1), u64::MAX))?;
    if size > limit {
        return Err((sections.len().saturating_sub(1), size));
    }
    Ok(Layout {
        offsets,
        sizes: sections.iter().map(|s| s.0).collect(),
        size,
    })
}

/// Bytes the image of sections `(size, align, exec)` takes, if at most `limit`; else the
/// index of the section at which it gets too large and the size needed up to there.
pub fn image_size(sections: &[(u64, u64, bool)], limit: u64) -> Result<u64, (usize, u64)> {
    place_sections(sections, limit).map(|l| l.size)
}

/// Lays sections out back to back, honouring alignment; code first.
pub fn layout(m: &PatchModule) -> Result<Layout, LinkError> {
    let mut placed = Vec::with_capacity(m.sections.len());
    for s in &m.sections {
        if !s.align.is_power_of_two() || s.align > MAX_ALIGN {
            return Err(LinkError::BadAlign {
                section: s.name.clone(),
                align: s.align,
            });
        }
        placed.push((s.data.len() as u64, s.align, s.exec));
    }
    place_sections(&placed, u64::MAX).map_err(|(_, size)| LinkError::TooLarge { base: 0, size })
}

/// A linked module image ready to be copied to `base`.
#[derive(Debug, Clone)]
pub struct Linked {
    /// Guest virtual address the image is linked to run at.
    pub base: u64,
    /// The linked image: sections at their offsets, relocations applied, zero padding.
    pub image: Vec<u8>,
    /// Where each section lies in `image`.
    pub layout: Layout,
    /// Kernel symbols the module referenced, resolved.
    pub kernel_refs: Vec<(String, u64)>,
}

impl Linked {
    /// Guest address of `offset` within loaded section `load_idx`; None unless that is a
    /// section of the image and `offset` lies inside it (or at its end).
    pub fn addr_of(&self, load_idx: usize, offset: u64) -> Option<u64> {
        let start = *self.layout.offsets.get(load_idx)?;
        if offset > *self.layout.sizes.get(load_idx)? {
            return None;
        }
        self.base.checked_add(start)?.checked_add(offset)
    }
}

/// Checks that `offset` lies inside loaded section `load_idx` of `m` (at most at its end,
/// or strictly inside for an `entry`, which must have code there).
fn check_place(m: &PatchModule, name: &str, load_idx: usize, offset: u64, entry: bool) -> Result<(), LinkError> {
    let (section, size) = match m.sections.get(load_idx) {
        Some(s) => (s.name.clone(), s.data.len() as u64),
        None => (format!("#{load_idx}"), 0),
    };
    let inside = load_idx < m.sections.len() && if entry { offset < size } else { offset <= size };
    if !inside {
        return Err(LinkError::OutsideSection {
            name: name.into(),
            section,
            offset,
            size,
        });
    }
    Ok(())
}

/// Links `m` to run at guest-virtual `base`; `kernel` resolves kernel symbol names. Every
/// place in the module (relocation fields and targets, replacement functions, callback
/// entries) is checked against its section first: a [`Linked`] image's
/// [`addr_of`](Linked::addr_of) is inside the image for each of them.
pub fn link(m: &PatchModule, base: u64, kernel: &dyn Fn(&str) -> Option<u64>) -> Result<Linked, LinkError> {
    let layout = layout(m)?;
    if base.checked_add(layout.size).is_none() {
        return Err(LinkError::TooLarge {
            base,
            size: layout.size,
        });
    }
    for r in &m.replaces {
        check_place(m, &r.new_name, r.new_load_idx, r.new_offset, true)?;
    }
    for c in &m.callbacks {
        check_place(m, &c.entry, c.load_idx, c.offset, true)?;
    }
    let mut image = vec![0u8; layout.size as usize];
    for (i, s) in m.sections.iter().enumerate() {
        let o = layout.offsets[i] as usize;
        image[o..o + s.data.len()].copy_from_slice(&s.data);
    }
    let mut kernel_refs = Vec::new();
    for r in &m.relocs {
        let Some(sec) = m.sections.get(r.load_idx) else {
            return Err(LinkError::OutsideSection {
                name: r.name.clone(),
                section: format!("#{}", r.load_idx),
                offset: r.offset,
                size: 0,
            });
        };
        let width = reloc_width(r.r_type).ok_or_else(|| LinkError::UnsupportedType {
            r_type: r.r_type,
            name: r_name(r.r_type),
            symbol: r.name.clone(),
        })?;
        if width == 0 {
            continue;
        }
        if r.offset
            .checked_add(width)
            .is_none_or(|end| end > sec.data.len() as u64)
        {
            return Err(LinkError::OutOfBounds {
                section: sec.name.clone(),
                offset: r.offset,
            });
        }
        let sym = match &r.target {
            SymbolPlace::Section { load_idx, offset } => {
                check_place(m, &r.name, *load_idx, *offset, false)?;
                // Inside the image, whose end was checked not to overflow.
                base + layout.offsets[*load_idx] + offset
            }
            SymbolPlace::Absolute(v) => *v,
            SymbolPlace::Kernel(name) => {
                let v = kernel(name).ok_or_else(|| LinkError::Unresolved(name.clone()))?;
                if !kernel_refs.iter().any(|(n, _)| n == name) {
                    kernel_refs.push((name.clone(), v));
                }
                v
            }
            SymbolPlace::NotLoaded(section) => {
                return Err(LinkError::NotLoaded {
                    name: r.name.clone(),
                    section: section.clone(),
                })
            }
        };
        let place_off = layout.offsets[r.load_idx] + r.offset;
        let p = base + place_off;
        let s_plus_a = (sym as i128) + r.addend as i128;
        let overflow = |value: i128| LinkError::Overflow {
            symbol: r.name.clone(),
            name: r_name(r.r_type),
            value,
        };
        let bytes: [u8; 8] = match r.r_type {
            elf::R_X86_64_64 => (s_plus_a as u64).to_le_bytes(),
            elf::R_X86_64_PC64 => ((s_plus_a - p as i128) as u64).to_le_bytes(),
            elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => {
                // RIP-relative addressing wraps at 2^64 (as the kernel's module loader
                // computes it): a per-CPU symbol (zero-based, e.g. `%gs:__preempt_count(%rip)`)
                // is reachable from the top 2 GiB.
                let v = (s_plus_a as u64).wrapping_sub(p) as i64;
                if v < i64::from(i32::MIN) || v > i64::from(i32::MAX) {
                    return Err(overflow(v.into()));
                }
                (v as u64).to_le_bytes()
            }
            elf::R_X86_64_32S => {
                // The 64-bit value must equal the sign extension of its low 32 bits.
                let sx = s_plus_a as u64 as i64;
                if sx < i32::MIN as i64 || sx > i32::MAX as i64 {
                    return Err(overflow(s_plus_a));
                }
                (sx as u64).to_le_bytes()
            }
            elf::R_X86_64_32 => {
                if s_plus_a < 0 || s_plus_a > u32::MAX as i128 {
                    return Err(overflow(s_plus_a));
                }
                (s_plus_a as u64).to_le_bytes()
            }
            t => {
                return Err(LinkError::UnsupportedType {
                    r_type: t,
                    name: r_name(t),
                    symbol: r.name.clone(),
                });
            }
        };
        let (o, w) = (place_off as usize, width as usize);
        image[o..o + w].copy_from_slice(&bytes[..w]);
    }
    Ok(Linked {
        base,
        image,
        layout,
        kernel_refs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::{LoadSection, Reloc};
    use object::SectionIndex;

    fn module(relocs: Vec<Reloc>) -> PatchModule {
        PatchModule {
            name: "t".into(),
            description: String::new(),
            sections: vec![
                LoadSection {
                    index: SectionIndex(1),
                    name: ".text".into(),
                    data: vec![0x90; 32],
                    align: 16,
                    exec: true,
                    write: false,
                },
                LoadSection {
                    index: SectionIndex(2),
                    name: ".data".into(),
                    data: vec![0; 16],
                    align: 8,
                    exec: false,
                    write: true,
                },
            ],
            relocs,
            data: vec![],
            replaces: vec![],
            callbacks: vec![],
            warnings: vec![],
            functions: vec![],
        }
    }

    fn reloc(r_type: u32, offset: u64, target: SymbolPlace, addend: i64) -> Reloc {
        Reloc {
            load_idx: 0,
            offset,
            r_type,
            target,
            addend,
            name: "sym".into(),
        }
    }

    const BASE: u64 = 0xffff_ffff_8f00_0000;
    const KSYM: u64 = 0xffff_ffff_8123_4560;

    fn kernel(name: &str) -> Option<u64> {
        (name == "printk").then_some(KSYM)
    }

    #[test]
    fn layout_puts_code_first_and_aligns() {
        let l = layout(&module(vec![])).unwrap();
        assert_eq!(l.offsets, vec![0, 32]);
        assert_eq!(l.size, 4096);
    }

    #[test]
    fn pc32_plt32_64_32s() {
        let m = module(vec![
            reloc(elf::R_X86_64_PLT32, 1, SymbolPlace::Kernel("printk".into()), -4),
            reloc(
                elf::R_X86_64_PC32,
                8,
                SymbolPlace::Section { load_idx: 1, offset: 4 },
                -4,
            ),
            reloc(elf::R_X86_64_64, 16, SymbolPlace::Kernel("printk".into()), 8),
            reloc(elf::R_X86_64_32S, 24, SymbolPlace::Kernel("printk".into()), 0),
        ]);
        let l = link(&m, BASE, &kernel).unwrap();
        let rd32 = |o: usize| i32::from_le_bytes(l.image[o..o + 4].try_into().unwrap());
        assert_eq!(rd32(1) as i64, KSYM as i64 - 4 - (BASE + 1) as i64);
        assert_eq!(rd32(8) as i64, (BASE + 32 + 4) as i64 - 4 - (BASE + 8) as i64);
        assert_eq!(u64::from_le_bytes(l.image[16..24].try_into().unwrap()), KSYM + 8);
        assert_eq!(rd32(24) as i64 as u64, KSYM);
        assert_eq!(l.kernel_refs, vec![("printk".to_string(), KSYM)]);
        assert_eq!(l.image[0], 0x90, "section bytes copied");
    }

    #[test]
    fn errors_name_the_symbol() {
        let m = module(vec![reloc(
            elf::R_X86_64_PC32,
            0,
            SymbolPlace::Kernel("nope".into()),
            -4,
        )]);
        assert_eq!(
            link(&m, BASE, &kernel).unwrap_err(),
            LinkError::Unresolved("nope".into())
        );

        let m = module(vec![reloc(
            elf::R_X86_64_GOTPCREL,
            0,
            SymbolPlace::Kernel("printk".into()),
            -4,
        )]);
        assert!(matches!(
            link(&m, BASE, &kernel).unwrap_err(),
            LinkError::UnsupportedType {
                name: "R_X86_64_GOTPCREL",
                ..
            }
        ));

        // PC32 to something more than 2 GiB away overflows.
        let m = module(vec![reloc(
            elf::R_X86_64_PC32,
            0,
            SymbolPlace::Absolute(0x1_0000_0000),
            0,
        )]);
        assert!(matches!(
            link(&m, BASE, &kernel).unwrap_err(),
            LinkError::Overflow { .. }
        ));
        // A zero-based per-CPU offset is reachable from the top 2 GiB (RIP wraps at 2^64).
        let m = module(vec![reloc(elf::R_X86_64_PC32, 0, SymbolPlace::Absolute(0x1c0a4), -4)]);
        let l = link(&m, BASE, &kernel).unwrap();
        let disp = i32::from_le_bytes(l.image[..4].try_into().unwrap());
        assert_eq!(BASE.wrapping_add(4).wrapping_add(disp as i64 as u64), 0x1c0a4);

        // 32 (zero-extended) cannot hold a kernel address.
        let m = module(vec![reloc(
            elf::R_X86_64_32,
            0,
            SymbolPlace::Kernel("printk".into()),
            0,
        )]);
        assert!(matches!(
            link(&m, BASE, &kernel).unwrap_err(),
            LinkError::Overflow { .. }
        ));

        let m = module(vec![reloc(
            elf::R_X86_64_64,
            30,
            SymbolPlace::Kernel("printk".into()),
            0,
        )]);
        assert!(matches!(
            link(&m, BASE, &kernel).unwrap_err(),
            LinkError::OutOfBounds { .. }
        ));

        let m = module(vec![reloc(
            elf::R_X86_64_PC32,
            0,
            SymbolPlace::NotLoaded(".init.text".into()),
            0,
        )]);
        assert!(matches!(
            link(&m, BASE, &kernel).unwrap_err(),
            LinkError::NotLoaded { .. }
        ));
    }

    /// `r.offset + width` wrapped past 2^64, passed the bounds check and panicked on the
    /// slice index.
    #[test]
    fn wrapped_relocation_offsets_are_refused() {
        for offset in [u64::MAX - 1, u64::MAX - 7, 29, 1 << 40] {
            let m = module(vec![reloc(elf::R_X86_64_64, offset, SymbolPlace::Absolute(0), 0)]);
            assert_eq!(
                link(&m, BASE, &kernel).unwrap_err(),
                LinkError::OutOfBounds {
                    section: ".text".into(),
                    offset
                },
                "{offset:#x}"
            );
        }
        let mut r = reloc(elf::R_X86_64_PC32, 0, SymbolPlace::Absolute(0), 0);
        r.load_idx = 7;
        assert!(matches!(
            link(&module(vec![r]), BASE, &kernel).unwrap_err(),
            LinkError::OutsideSection { size: 0, .. }
        ));
    }

    /// Targets, replacement functions and callback entries must lie inside their section;
    /// a replacement 0x7ff000 past its section made the jump land past the image end.
    #[test]
    fn places_outside_their_section_are_refused() {
        let far = SymbolPlace::Section {
            load_idx: 1,
            offset: 0x7ff000,
        };
        let m = module(vec![reloc(elf::R_X86_64_PC32, 0, far, -4)]);
        assert_eq!(
            link(&m, BASE, &kernel).unwrap_err(),
            LinkError::OutsideSection {
                name: "sym".into(),
                section: ".data".into(),
                offset: 0x7ff000,
                size: 16
            }
        );
        let nowhere = SymbolPlace::Section { load_idx: 9, offset: 0 };
        let m = module(vec![reloc(elf::R_X86_64_PC32, 0, nowhere, -4)]);
        assert!(matches!(
            link(&m, BASE, &kernel).unwrap_err(),
            LinkError::OutsideSection { .. }
        ));
        // The end of a section is a valid target (e.g. a `__stop_` symbol).
        let end = SymbolPlace::Section {
            load_idx: 1,
            offset: 16,
        };
        assert!(link(&module(vec![reloc(elf::R_X86_64_PC32, 0, end, -4)]), BASE, &kernel).is_ok());

        let mut m = module(vec![]);
        m.replaces.push(crate::module::Replace {
            old_name: "f".into(),
            new_name: "new_f".into(),
            new_load_idx: 0,
            new_offset: 0x7ff000,
        });
        assert!(matches!(
            link(&m, BASE, &kernel).unwrap_err(),
            LinkError::OutsideSection { offset: 0x7ff000, .. }
        ));
        // An entry needs code: at the section's end is refused too.
        m.replaces[0].new_offset = 32;
        assert!(link(&m, BASE, &kernel).is_err());
        m.replaces[0].new_offset = 31;
        let l = link(&m, BASE, &kernel).unwrap();
        assert_eq!(l.addr_of(0, 31), Some(BASE + 31));
        assert_eq!(l.addr_of(0, 33), None);
        assert_eq!(l.addr_of(5, 0), None);

        let mut m = module(vec![]);
        m.callbacks.push(crate::module::Callback {
            kind: crate::module::CallbackKind::Apply,
            name: "cb".into(),
            entry: "__lucos_cb_cb".into(),
            object: String::new(),
            load_idx: 1,
            offset: 0,
            limit: std::time::Duration::from_secs(1),
        });
        assert!(link(&m, BASE, &kernel).is_ok());
        m.callbacks[0].load_idx = 2;
        assert!(matches!(
            link(&m, BASE, &kernel).unwrap_err(),
            LinkError::OutsideSection { .. }
        ));
    }

    /// Alignment 0 divided by zero; a huge one asked for a terabyte image; an image near
    /// the top of the address space wrapped its addresses.
    #[test]
    fn bad_alignment_and_wrapping_bases_are_refused() {
        for align in [0, 3, 1 << 40] {
            let mut m = module(vec![]);
            m.sections[1].align = align;
            assert_eq!(
                link(&m, BASE, &kernel).unwrap_err(),
                LinkError::BadAlign {
                    section: ".data".into(),
                    align
                }
            );
        }
        let m = module(vec![]);
        assert_eq!(
            link(&m, u64::MAX - 0x800, &kernel).unwrap_err(),
            LinkError::TooLarge {
                base: u64::MAX - 0x800,
                size: 4096
            }
        );
        assert_eq!(
            place_sections(&[(16, 8, true), (u64::MAX - 8, 8, false)], u64::MAX),
            Err((1, u64::MAX))
        );
        assert_eq!(place_sections(&[(100, 8, false)], 4096).unwrap().size, 4096);
        assert_eq!(place_sections(&[(4097, 8, false)], 8192).unwrap().size, 8192);
        assert_eq!(place_sections(&[(4097, 8, false)], 4097), Err((0, 8192)));
    }

    /// The real modules parse and link (against a kernel where everything resolves).
    #[test]
    fn real_modules_link() {
        for (name, ko) in crate::module::tests::REAL_MODULES {
            let m = PatchModule::parse(ko).unwrap();
            let l = link(&m, BASE, &|_| Some(KSYM)).unwrap_or_else(|e| panic!("{name}: {e}"));
            for r in &m.replaces {
                let a = l.addr_of(r.new_load_idx, r.new_offset).unwrap();
                assert!(a >= BASE && a < BASE + l.layout.size, "{name}");
            }
        }
    }
}
