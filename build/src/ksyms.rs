//! Naming the running kernel's copy of an unchanged symbol, unambiguously, the way the
//! update server resolves names (`vmm/src/symbols.rs` for vmlinux, the guest's module
//! list for modules): a global by its name; a local of vmlinux as `FILE:NAME` or
//! `FILE:NAME,POS`; a symbol of a module as `MODULE::NAME` or `MODULE::NAME,POS`.
//!
//! A local symbol is found in the vmlinux's symbol table through its translation unit:
//! the linker keeps each object's local symbols together after an `STT_FILE` symbol, so
//! the unit's group is the one of its file name whose local names match the unit's own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lucos_vmm::introspect::Vmlinux;
use lucos_vmm::symbols::{Scope, SymbolTable};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind, SymbolSection};
use thiserror::Error;

use crate::diff::normalize;
use crate::elf::{Obj, SymKind};

/// Why a kernel symbol cannot be named.
#[derive(Debug, Error)]
pub enum KsymError {
    /// A file could not be read or parsed.
    #[error("cannot read symbols of '{path}': {why}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The unit's local symbols are not in the kernel's symbol table.
    #[error("cannot find the symbols of {unit} in {kernel}: {why}")]
    NoUnit {
        /// The unit (its object).
        unit: String,
        /// vmlinux or the module.
        kernel: String,
        /// Why.
        why: String,
    },
    /// A symbol the patch refers to is not in the running kernel.
    #[error("{unit}: the kernel has no symbol '{name}' ({why})")]
    NoSymbol {
        /// The unit.
        unit: String,
        /// The symbol.
        name: String,
        /// Why.
        why: String,
    },
}

/// One `STT_FILE` group of a symbol table: a source file's local symbols.
#[derive(Debug, Default, Clone)]
struct Group {
    file: String,
    /// Local names → addresses (vmlinux) or symtab positions (module), in table order.
    names: HashMap<String, Vec<u64>>,
}

/// Every symbol of a table: name, address or index, global.
type AllSymbols = Vec<(String, u64, bool)>;

fn groups_of(path: &Path, data: &[u8], by_index: bool) -> Result<(Vec<Group>, AllSymbols), KsymError> {
    let file = object::File::parse(data).map_err(|e| KsymError::Read {
        path: path.into(),
        why: e.to_string(),
    })?;
    let mut groups: Vec<Group> = Vec::new();
    let mut all = Vec::new();
    for s in file.symbols() {
        if s.kind() == SymbolKind::File {
            groups.push(Group {
                file: s.name().unwrap_or("").to_string(),
                names: HashMap::new(),
            });
            continue;
        }
        if !matches!(s.kind(), SymbolKind::Text | SymbolKind::Data | SymbolKind::Unknown) {
            continue;
        }
        let Ok(name) = s.name() else { continue };
        if name.is_empty() || s.is_undefined() {
            continue;
        }
        let key = if by_index { s.index().0 as u64 } else { s.address() };
        all.push((name.to_string(), key, s.is_global()));
        if !s.is_global() {
            if let Some(g) = groups.last_mut() {
                g.names.entry(name.to_string()).or_default().push(key);
            }
        }
    }
    Ok((groups, all))
}

/// The local names of a unit's object that the linker keeps (defined functions and
/// objects).
fn unit_locals(obj: &Obj) -> Vec<&str> {
    obj.symbols
        .iter()
        .filter(|s| !s.global && s.defined() && matches!(s.kind, SymKind::Func | SymKind::Object))
        .filter(|s| s.section.is_some_and(|i| obj.sections[i].alloc()))
        .map(|s| s.name.as_str())
        .collect()
}

fn unit_file(obj: &Obj) -> Option<&str> {
    obj.symbols
        .iter()
        .find(|s| s.kind == SymKind::File)
        .map(|s| s.name.as_str())
}

/// Picks the group of `obj`'s file whose locals match best.
fn find_group(groups: &[Group], obj: &Obj, unit: &str, kernel: &str) -> Result<usize, KsymError> {
    let file = unit_file(obj).ok_or_else(|| KsymError::NoUnit {
        unit: unit.into(),
        kernel: kernel.into(),
        why: "the object has no STT_FILE symbol".into(),
    })?;
    let locals = unit_locals(obj);
    let mut best: Vec<(usize, usize)> = groups
        .iter()
        .enumerate()
        .filter(|(_, g)| g.file == file)
        .map(|(i, g)| {
            (
                i,
                locals
                    .iter()
                    .filter(|n| g.names.contains_key(**n) || g.names.keys().any(|k| normalize(k) == normalize(n)))
                    .count(),
            )
        })
        .collect();
    best.sort_by_key(|b| std::cmp::Reverse(b.1));
    match best.as_slice() {
        [] => Err(KsymError::NoUnit {
            unit: unit.into(),
            kernel: kernel.into(),
            why: format!("no symbols from a file named '{file}'"),
        }),
        [(i, _)] => Ok(*i),
        [(i, a), (_, b), ..] if a > b => Ok(*i),
        [(_, a), ..] if locals.is_empty() || *a == 0 => Err(KsymError::NoUnit {
            unit: unit.into(),
            kernel: kernel.into(),
            why: format!("several files named '{file}' and no local symbol to tell them apart"),
        }),
        _ => Err(KsymError::NoUnit {
            unit: unit.into(),
            kernel: kernel.into(),
            why: format!("several files named '{file}' match its local symbols equally"),
        }),
    }
}

/// The vmlinux's symbols, for naming.
pub struct VmlinuxSyms {
    table: SymbolTable,
    groups: Vec<Group>,
    /// Symbols exported by modules (`Module.symvers`): name → module.
    module_exports: HashMap<String, String>,
}

impl VmlinuxSyms {
    /// Reads the vmlinux and the build tree's `Module.symvers`.
    pub fn read(vmlinux: &Path, build: &Path) -> Result<Self, KsymError> {
        let v = Vmlinux::read(vmlinux).map_err(|e| KsymError::Read {
            path: vmlinux.into(),
            why: e.to_string(),
        })?;
        let table = SymbolTable::from_vmlinux(&v).map_err(|e| KsymError::Read {
            path: vmlinux.into(),
            why: e.to_string(),
        })?;
        let (groups, _) = groups_of(vmlinux, v.bytes(), false)?;
        let mut module_exports = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(build.join("Module.symvers")) {
            for l in text.lines() {
                let f: Vec<&str> = l.split('\t').collect();
                if f.len() >= 3 && f[2] != "vmlinux" {
                    let m = Path::new(f[2])
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or("")
                        .replace('-', "_");
                    module_exports.insert(f[1].to_string(), m);
                }
            }
        }
        Ok(Self {
            table,
            groups,
            module_exports,
        })
    }

    /// The name of an external (undefined) symbol a unit refers to: vmlinux's global, or
    /// `MODULE::NAME` for a symbol another module exports.
    pub fn external(&self, name: &str) -> String {
        if self.table.get(name).is_none() {
            if let Some(m) = self.module_exports.get(name) {
                return format!("{m}::{name}");
            }
        }
        name.to_string()
    }

    /// A namer for the symbols of one vmlinux unit.
    pub fn unit<'a>(&'a self, obj: &Obj, unit: &str) -> Result<UnitNamer<'a>, KsymError> {
        let g = find_group(&self.groups, obj, unit, "vmlinux")?;
        Ok(UnitNamer {
            kind: NamerKind::Vmlinux { syms: self, group: g },
            unit: unit.into(),
        })
    }
}

/// A module's symbols as the guest kernel's kallsyms for it has them.
pub struct ModuleSyms {
    name: String,
    groups: Vec<Group>,
    /// Core symbols (kept by the module loader) in symtab order: name, symtab index.
    core: Vec<(String, u64)>,
}

impl ModuleSyms {
    /// Reads a built module (`.ko`).
    pub fn read(ko: &Path, name: &str) -> Result<Self, KsymError> {
        let data = std::fs::read(ko).map_err(|e| KsymError::Read {
            path: ko.into(),
            why: e.to_string(),
        })?;
        let file = object::File::parse(&*data).map_err(|e| KsymError::Read {
            path: ko.into(),
            why: e.to_string(),
        })?;
        // The module loader keeps symbols of allocated, non-init sections (kallsyms of a
        // module: `is_core_symbol`).
        let mut core = Vec::new();
        for s in file.symbols() {
            let Ok(n) = s.name() else { continue };
            if n.is_empty() {
                continue;
            }
            let SymbolSection::Section(si) = s.section() else {
                continue;
            };
            let Ok(sec) = file.section_by_index(si) else { continue };
            let sname = sec.name().unwrap_or("");
            let alloc = matches!(
                sec.flags(),
                object::SectionFlags::Elf { sh_flags } if sh_flags & u64::from(object::elf::SHF_ALLOC) != 0
            );
            if alloc && !sname.starts_with(".init") && !sname.starts_with(".exit") {
                core.push((n.to_string(), s.index().0 as u64));
            }
        }
        let (groups, _) = groups_of(ko, &data, true)?;
        Ok(Self {
            name: name.into(),
            groups,
            core,
        })
    }

    /// The module's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A namer for the symbols of one unit of the module.
    pub fn unit<'a>(&'a self, obj: &Obj, unit: &str) -> Result<UnitNamer<'a>, KsymError> {
        let g = find_group(&self.groups, obj, unit, &self.name)?;
        Ok(UnitNamer {
            kind: NamerKind::Module { syms: self, group: g },
            unit: unit.into(),
        })
    }

    fn spec(&self, name: &str, index: u64) -> Option<String> {
        let same: Vec<u64> = self.core.iter().filter(|c| c.0 == name).map(|c| c.1).collect();
        let pos = same.iter().position(|&i| i == index)? + 1;
        Some(if same.len() == 1 {
            format!("{}::{name}", self.name)
        } else {
            format!("{}::{name},{pos}", self.name)
        })
    }
}

enum NamerKind<'a> {
    Vmlinux { syms: &'a VmlinuxSyms, group: usize },
    Module { syms: &'a ModuleSyms, group: usize },
}

/// Names the running kernel's copies of one unit's symbols.
pub struct UnitNamer<'a> {
    kind: NamerKind<'a>,
    unit: String,
}

impl UnitNamer<'_> {
    /// The module the unit belongs to, if any.
    pub fn module(&self) -> Option<&str> {
        match &self.kind {
            NamerKind::Module { syms, .. } => Some(&syms.name),
            NamerKind::Vmlinux { .. } => None,
        }
    }

    /// The reference for an external (undefined) symbol of the unit: a global of the
    /// unit's own module when the module defines it (another file of the module), else
    /// vmlinux's or another module's export ([`VmlinuxSyms::external`]).
    pub fn external(&self, vmlinux: &VmlinuxSyms, name: &str) -> String {
        if let NamerKind::Module { syms, .. } = &self.kind {
            if let Some(c) = syms.core.iter().find(|c| c.0 == name) {
                if let Some(spec) = syms.spec(name, c.1) {
                    return spec;
                }
            }
        }
        vmlinux.external(name)
    }

    /// The reference to the running kernel's copy of symbol `sym` of the unit's original
    /// object `obj`.
    pub fn spec(&self, obj: &Obj, sym: usize) -> Result<String, KsymError> {
        let s = &obj.symbols[sym];
        let missing = |why: String| KsymError::NoSymbol {
            unit: self.unit.clone(),
            name: s.name.clone(),
            why,
        };
        // Which of the unit's symbols of that name it is (names repeat rarely).
        let nth = obj.symbols[..sym]
            .iter()
            .filter(|o| o.name == s.name && o.defined())
            .count();
        match &self.kind {
            NamerKind::Vmlinux { syms, group } => {
                if s.global {
                    return match syms.table.resolve(&s.name, Scope::PreferGlobal) {
                        Ok(k) if k.global => Ok(s.name.clone()),
                        Ok(_) | Err(_) => Err(missing("not a global symbol of vmlinux".into())),
                    };
                }
                let g = &syms.groups[*group];
                let addr = match g.names.get(&s.name).and_then(|v| v.get(nth)) {
                    Some(&a) => a,
                    None => {
                        let n = normalize(&s.name);
                        let cands: Vec<u64> = g
                            .names
                            .iter()
                            .filter(|(k, _)| normalize(k) == n)
                            .flat_map(|(_, v)| v.iter().copied())
                            .collect();
                        match cands.as_slice() {
                            [a] => *a,
                            [] => {
                                return Err(missing(format!(
                                    "not among {}'s symbols in vmlinux (inlined or discarded there)",
                                    g.file
                                )))
                            }
                            _ => {
                                return Err(missing(format!(
                                    "{} symbols of {} match it by name",
                                    cands.len(),
                                    g.file
                                )))
                            }
                        }
                    }
                };
                let name = syms
                    .table
                    .lookup(addr)
                    .filter(|(k, off)| *off == 0 && normalize(&k.name) == normalize(&s.name))
                    .map(|(k, _)| k.name.clone())
                    .unwrap_or_else(|| s.name.clone());
                let plain = format!("{}:{name}", g.file);
                if syms.table.resolve(&plain, Scope::Exact).is_ok_and(|k| k.addr == addr) {
                    return Ok(plain);
                }
                for pos in 1..=64 {
                    let spec = format!("{}:{name},{pos}", g.file);
                    match syms.table.resolve(&spec, Scope::Exact) {
                        Ok(k) if k.addr == addr => return Ok(spec),
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
                Err(missing(format!(
                    "no FILE:NAME,POS of vmlinux names the one at {addr:#x}"
                )))
            }
            NamerKind::Module { syms, group } => {
                let g = &syms.groups[*group];
                let index = if s.global {
                    syms.core.iter().find(|c| c.0 == s.name).map(|c| c.1)
                } else {
                    g.names.get(&s.name).and_then(|v| v.get(nth)).copied().or_else(|| {
                        let n = normalize(&s.name);
                        let c: Vec<u64> = g
                            .names
                            .iter()
                            .filter(|(k, _)| normalize(k) == n)
                            .flat_map(|(_, v)| v.iter().copied())
                            .collect();
                        (c.len() == 1).then(|| c[0])
                    })
                };
                let index =
                    index.ok_or_else(|| missing(format!("not among {}'s symbols in {}.ko", g.file, syms.name)))?;
                let name = syms
                    .core
                    .iter()
                    .find(|c| c.1 == index)
                    .map(|c| c.0.clone())
                    .ok_or_else(|| missing(format!("{}.ko does not keep it loaded (init or exit code)", syms.name)))?;
                syms.spec(&name, index)
                    .ok_or_else(|| missing(format!("not a loaded symbol of {}", syms.name)))
            }
        }
    }
}
