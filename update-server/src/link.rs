//! Linking a patch module at its guest address: section layout inside the patch region
//! and x86-64 relocations against module and guest-kernel symbols.

use object::elf;
use thiserror::Error;

use crate::module::{PatchModule, SymbolPlace};

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

/// Section placement: offset of each loaded section from the image start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Offset of each section from the image start, indexed like [`PatchModule::sections`].
    pub offsets: Vec<u64>,
    /// Image size in bytes, rounded up to a page.
    pub size: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Lays sections out back to back, honouring alignment; code first.
pub fn layout(m: &PatchModule) -> Layout {
    let mut offsets = vec![0; m.sections.len()];
    let mut cur = 0u64;
    let mut order: Vec<usize> = (0..m.sections.len()).collect();
    order.sort_by_key(|&i| !m.sections[i].exec);
    for i in order {
        let s = &m.sections[i];
        cur = align_up(cur, s.align.max(16));
        offsets[i] = cur;
        cur += s.data.len() as u64;
    }
    Layout {
        offsets,
        size: align_up(cur, 4096),
    }
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
    /// Guest address of `offset` within loaded section `load_idx`.
    pub fn addr_of(&self, load_idx: usize, offset: u64) -> u64 {
        self.base + self.layout.offsets[load_idx] + offset
    }
}

/// Links `m` to run at guest-virtual `base`; `kernel` resolves kernel symbol names.
pub fn link(m: &PatchModule, base: u64, kernel: &dyn Fn(&str) -> Option<u64>) -> Result<Linked, LinkError> {
    let layout = layout(m);
    let mut image = vec![0u8; layout.size as usize];
    for (i, s) in m.sections.iter().enumerate() {
        let o = layout.offsets[i] as usize;
        image[o..o + s.data.len()].copy_from_slice(&s.data);
    }
    let mut kernel_refs = Vec::new();
    for r in &m.relocs {
        let sym = match &r.target {
            SymbolPlace::Section { load_idx, offset } => base + layout.offsets[*load_idx] + offset,
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
        let sec = &m.sections[r.load_idx];
        let place_off = layout.offsets[r.load_idx] + r.offset;
        let p = base + place_off;
        let s_plus_a = (sym as i128) + r.addend as i128;
        let (bytes, width): ([u8; 8], usize) = match r.r_type {
            elf::R_X86_64_NONE => continue,
            elf::R_X86_64_64 => ((s_plus_a as u64).to_le_bytes(), 8),
            elf::R_X86_64_PC64 => (((s_plus_a - p as i128) as u64).to_le_bytes(), 8),
            elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => {
                // RIP-relative addressing wraps at 2^64 (as the kernel's module loader
                // computes it): a per-CPU symbol (zero-based, e.g. `%gs:__preempt_count(%rip)`)
                // is reachable from the top 2 GiB.
                let v = (s_plus_a as u64).wrapping_sub(p) as i64;
                if v < i64::from(i32::MIN) || v > i64::from(i32::MAX) {
                    return Err(LinkError::Overflow {
                        symbol: r.name.clone(),
                        name: r_name(r.r_type),
                        value: v.into(),
                    });
                }
                ((v as u64).to_le_bytes(), 4)
            }
            elf::R_X86_64_32S => {
                // The 64-bit value must equal the sign extension of its low 32 bits.
                let sx = s_plus_a as u64 as i64;
                if sx < i32::MIN as i64 || sx > i32::MAX as i64 {
                    return Err(LinkError::Overflow {
                        symbol: r.name.clone(),
                        name: r_name(r.r_type),
                        value: s_plus_a,
                    });
                }
                ((sx as u64).to_le_bytes(), 4)
            }
            elf::R_X86_64_32 => {
                if s_plus_a < 0 || s_plus_a > u32::MAX as i128 {
                    return Err(LinkError::Overflow {
                        symbol: r.name.clone(),
                        name: r_name(r.r_type),
                        value: s_plus_a,
                    });
                }
                ((s_plus_a as u64).to_le_bytes(), 4)
            }
            t => {
                return Err(LinkError::UnsupportedType {
                    r_type: t,
                    name: r_name(t),
                    symbol: r.name.clone(),
                });
            }
        };
        if r.offset + width as u64 > sec.data.len() as u64 {
            return Err(LinkError::OutOfBounds {
                section: sec.name.clone(),
                offset: r.offset,
            });
        }
        let o = place_off as usize;
        image[o..o + width].copy_from_slice(&bytes[..width]);
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
        let l = layout(&module(vec![]));
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
}
