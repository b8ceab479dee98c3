//! A compiled object file as lucos-build works on it: sections with their bytes and
//! relocations, and symbols, all indexed as in the ELF file. Read once with `object`; the
//! comparison and the output writer never touch ELF structures again.

use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{ElfFile64, FileHeader, SectionHeader};
use object::{
    Endianness, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionIndex, SymbolSection,
};
use thiserror::Error;

/// Why an object file could not be read.
#[derive(Debug, Error)]
pub enum ElfError {
    /// The file could not be read.
    #[error("cannot read '{path}': {source}")]
    Io {
        /// The object.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not an x86-64 ELF relocatable object, or a part of it does not parse.
    #[error("'{path}' is not a usable x86-64 ELF relocatable: {what}")]
    Malformed {
        /// The object.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// A symbol's type, as far as lucos-build cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymKind {
    /// `STT_FUNC`.
    Func,
    /// `STT_OBJECT` (or `STT_TLS`, `STT_COMMON`).
    Object,
    /// `STT_SECTION`.
    Section,
    /// `STT_FILE`.
    File,
    /// `STT_NOTYPE` (labels, undefined references).
    NoType,
}

/// One symbol of the object.
#[derive(Debug, Clone)]
pub struct Sym {
    /// Its name (for a section symbol: the section's name).
    pub name: String,
    /// Its type.
    pub kind: SymKind,
    /// `STB_GLOBAL` or `STB_WEAK`.
    pub global: bool,
    /// `STB_WEAK`.
    pub weak: bool,
    /// Index of the section it is defined in; `None` when undefined or absolute.
    pub section: Option<usize>,
    /// Value: the offset in its section.
    pub value: u64,
    /// `st_size`.
    pub size: u64,
}

impl Sym {
    /// Defined in a section of this object.
    pub fn defined(&self) -> bool {
        self.section.is_some()
    }
}

/// One relocation of a section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rel {
    /// Offset of the field in the section.
    pub offset: u64,
    /// `R_X86_64_*`.
    pub r_type: u32,
    /// Index of the symbol it refers to.
    pub sym: usize,
    /// `r_addend`.
    pub addend: i64,
}

/// One section of the object.
#[derive(Debug, Clone)]
pub struct Sec {
    /// Its name.
    pub name: String,
    /// `sh_type`.
    pub sh_type: u32,
    /// `sh_flags`.
    pub flags: u64,
    /// `sh_addralign` (at least 1).
    pub align: u64,
    /// `sh_entsize`.
    pub entsize: u64,
    /// Contents (zeros for `SHT_NOBITS`).
    pub data: Vec<u8>,
    /// Relocations that apply to it, sorted by offset.
    pub rels: Vec<Rel>,
}

impl Sec {
    /// `SHF_ALLOC`: part of the loaded image.
    pub fn alloc(&self) -> bool {
        self.flags & u64::from(elf::SHF_ALLOC) != 0
    }
    /// `SHF_EXECINSTR`.
    pub fn exec(&self) -> bool {
        self.flags & u64::from(elf::SHF_EXECINSTR) != 0
    }
    /// `SHF_WRITE`.
    pub fn write(&self) -> bool {
        self.flags & u64::from(elf::SHF_WRITE) != 0
    }
    /// `SHF_MERGE | SHF_STRINGS`: a pool of NUL-terminated strings.
    pub fn strings(&self) -> bool {
        self.flags & u64::from(elf::SHF_STRINGS) != 0
    }
    /// `SHT_NOBITS`.
    pub fn nobits(&self) -> bool {
        self.sh_type == elf::SHT_NOBITS
    }
    /// The relocations whose field lies in `[start, end)`.
    pub fn rels_in(&self, start: u64, end: u64) -> &[Rel] {
        let lo = self.rels.partition_point(|r| r.offset < start);
        let hi = self.rels.partition_point(|r| r.offset < end);
        &self.rels[lo..hi]
    }
}

/// A relocatable object file.
#[derive(Debug, Clone)]
pub struct Obj {
    /// Where it was read from.
    pub path: PathBuf,
    /// Sections by ELF index (index 0 is the null section).
    pub sections: Vec<Sec>,
    /// Symbols by ELF index (index 0 is the null symbol).
    pub symbols: Vec<Sym>,
}

impl Obj {
    /// Reads an object file.
    pub fn read(path: &Path) -> Result<Self, ElfError> {
        let data = std::fs::read(path).map_err(|source| ElfError::Io {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &data)
    }

    /// Parses an object file's bytes.
    pub fn parse(path: &Path, data: &[u8]) -> Result<Self, ElfError> {
        let bad = |what: String| ElfError::Malformed {
            path: path.into(),
            what,
        };
        let file = ElfFile64::<Endianness>::parse(data).map_err(|e| bad(e.to_string()))?;
        let e = file.endian();
        let hdr = file.elf_header();
        if hdr.e_type(e) != elf::ET_REL || hdr.e_machine(e) != elf::EM_X86_64 {
            return Err(bad("not ET_REL for EM_X86_64".into()));
        }
        let count = file.elf_section_table().len();
        let mut sections: Vec<Sec> = (0..count)
            .map(|_| Sec {
                name: String::new(),
                sh_type: 0,
                flags: 0,
                align: 1,
                entsize: 0,
                data: Vec::new(),
                rels: Vec::new(),
            })
            .collect();
        for sec in file.sections() {
            let sh = sec.elf_section_header();
            let i = sec.index().0;
            let s = &mut sections[i];
            s.name = sec.name().map_err(|e| bad(e.to_string()))?.to_string();
            s.sh_type = sh.sh_type(e);
            s.flags = sh.sh_flags(e);
            s.align = sh.sh_addralign(e).max(1);
            s.entsize = sh.sh_entsize(e);
            s.data = if s.sh_type == elf::SHT_NOBITS {
                vec![0; sec.size() as usize]
            } else {
                sec.data()
                    .map_err(|e| bad(format!("section {}: {e}", s.name)))?
                    .to_vec()
            };
        }
        let mut symbols = vec![Sym {
            name: String::new(),
            kind: SymKind::NoType,
            global: false,
            weak: false,
            section: None,
            value: 0,
            size: 0,
        }];
        for sym in file.symbols() {
            let st = sym.elf_symbol();
            let kind = match st.st_type() {
                elf::STT_FUNC => SymKind::Func,
                elf::STT_OBJECT | elf::STT_TLS | elf::STT_COMMON => SymKind::Object,
                elf::STT_SECTION => SymKind::Section,
                elf::STT_FILE => SymKind::File,
                _ => SymKind::NoType,
            };
            let section = match sym.section() {
                SymbolSection::Section(SectionIndex(i)) => Some(i),
                _ => None,
            };
            let mut name = sym.name().unwrap_or("").to_string();
            if kind == SymKind::Section {
                if let Some(i) = section {
                    name = sections[i].name.clone();
                }
            }
            let idx = sym.index().0;
            if symbols.len() <= idx {
                symbols.resize(idx + 1, symbols[0].clone());
            }
            symbols[idx] = Sym {
                name,
                kind,
                global: sym.is_global() || sym.is_weak(),
                weak: sym.is_weak(),
                section,
                value: sym.address(),
                size: sym.size(),
            };
        }
        for sec in file.sections() {
            let i = sec.index().0;
            let mut rels = Vec::new();
            for (offset, r) in sec.relocations() {
                let RelocationFlags::Elf { r_type } = r.flags() else {
                    return Err(bad("non-ELF relocation".into()));
                };
                let sym = match r.target() {
                    RelocationTarget::Symbol(si) => si.0,
                    t => {
                        return Err(bad(format!(
                            "relocation in {} at {offset:#x}: target {t:?}",
                            sections[i].name
                        )))
                    }
                };
                if sym >= symbols.len() {
                    return Err(bad(format!("relocation in {} names symbol #{sym}", sections[i].name)));
                }
                rels.push(Rel {
                    offset,
                    r_type,
                    sym,
                    addend: r.addend(),
                });
            }
            rels.sort_by_key(|r| r.offset);
            sections[i].rels = rels;
        }
        Ok(Obj {
            path: path.into(),
            sections,
            symbols,
        })
    }

    /// The defined function and object symbols of section `sec`, by offset.
    pub fn symbols_in(&self, sec: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.symbols.len())
            .filter(|&i| {
                let s = &self.symbols[i];
                s.section == Some(sec) && matches!(s.kind, SymKind::Func | SymKind::Object)
            })
            .collect();
        v.sort_by_key(|&i| self.symbols[i].value);
        v
    }

    /// The section symbol of section `sec`, if the object has one.
    pub fn section_symbol(&self, sec: usize) -> Option<usize> {
        self.symbols
            .iter()
            .position(|s| s.kind == SymKind::Section && s.section == Some(sec))
    }

    /// The function or object symbol that covers `offset` in section `sec` (the one
    /// starting last at or before it whose size reaches past it).
    pub fn covering(&self, sec: usize, offset: u64) -> Option<usize> {
        self.symbols
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.section == Some(sec)
                    && matches!(s.kind, SymKind::Func | SymKind::Object)
                    && s.value <= offset
                    && (offset < s.value + s.size.max(1))
            })
            .max_by_key(|(_, s)| s.value)
            .map(|(i, _)| i)
    }

    /// The data object of section `sec` that ends exactly at `offset` (one past its last
    /// byte), if any.
    pub fn ending_at(&self, sec: usize, offset: u64) -> Option<usize> {
        self.symbols.iter().position(|s| {
            s.section == Some(sec) && s.kind == SymKind::Object && s.size > 0 && s.value + s.size == offset
        })
    }

    /// The section index named `name`, if any.
    pub fn section_named(&self, name: &str) -> Option<usize> {
        self.sections.iter().position(|s| s.name == name)
    }
}

/// Reads a little-endian integer of `width` bytes (1..=8) at `off`, if in bounds.
pub fn read_uint(data: &[u8], off: u64, width: usize) -> Option<u64> {
    let off = usize::try_from(off).ok()?;
    let b = data.get(off..off.checked_add(width)?)?;
    let mut v = [0u8; 8];
    v[..width].copy_from_slice(b);
    Some(u64::from_le_bytes(v))
}

/// Width in bytes of the field an x86-64 relocation type patches.
pub fn reloc_width(r_type: u32) -> Option<usize> {
    Some(match r_type {
        elf::R_X86_64_64 | elf::R_X86_64_PC64 => 8,
        elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 | elf::R_X86_64_32 | elf::R_X86_64_32S | elf::R_X86_64_GOTPCREL => 4,
        elf::R_X86_64_16 | elf::R_X86_64_PC16 => 2,
        elf::R_X86_64_8 | elf::R_X86_64_PC8 => 1,
        elf::R_X86_64_NONE => 0,
        _ => return None,
    })
}

/// Whether an x86-64 relocation type is PC-relative.
pub fn reloc_pcrel(r_type: u32) -> bool {
    matches!(
        r_type,
        elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 | elf::R_X86_64_PC64 | elf::R_X86_64_PC16 | elf::R_X86_64_PC8
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_test_object() {
        use object::write::{Object as WObject, Relocation, Symbol, SymbolSection as WSec};
        use object::{Architecture, BinaryFormat, SectionKind, SymbolFlags, SymbolKind, SymbolScope};
        let mut o = WObject::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let text = o.add_section(vec![], b".text.f".to_vec(), SectionKind::Text);
        o.append_section_data(text, &[0xe8, 0, 0, 0, 0, 0xc3], 16);
        let f = o.add_symbol(Symbol {
            name: b"f".to_vec(),
            value: 0,
            size: 6,
            kind: SymbolKind::Text,
            scope: SymbolScope::Compilation,
            weak: false,
            section: WSec::Section(text),
            flags: SymbolFlags::None,
        });
        let g = o.add_symbol(Symbol {
            name: b"g".to_vec(),
            value: 0,
            size: 0,
            kind: SymbolKind::Text,
            scope: SymbolScope::Linkage,
            weak: false,
            section: WSec::Undefined,
            flags: SymbolFlags::None,
        });
        o.add_relocation(
            text,
            Relocation {
                offset: 1,
                symbol: g,
                addend: -4,
                flags: RelocationFlags::Elf {
                    r_type: elf::R_X86_64_PLT32,
                },
            },
        )
        .unwrap();
        let bytes = o.write().unwrap();
        let obj = Obj::parse(Path::new("t.o"), &bytes).unwrap();
        let sec = obj.section_named(".text.f").unwrap();
        assert!(obj.sections[sec].exec());
        assert_eq!(obj.sections[sec].rels.len(), 1);
        let r = &obj.sections[sec].rels[0];
        assert_eq!((r.offset, r.addend, obj.symbols[r.sym].name.as_str()), (1, -4, "g"));
        assert!(!obj.symbols[r.sym].defined());
        let fi = obj.symbols_in(sec);
        assert_eq!(fi.len(), 1);
        assert_eq!(obj.symbols[fi[0]].name, "f");
        assert_eq!(obj.covering(sec, 5), Some(fi[0]));
        let _ = f;
    }
}
