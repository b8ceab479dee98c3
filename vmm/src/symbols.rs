//! The guest kernel's symbol table, read from the vmlinux ELF (`.symtab`). Used to name
//! addresses in fault reports and, by the update server, to resolve patch relocations.

use std::collections::HashMap;
use std::path::PathBuf;

use object::{Object, ObjectSymbol, SymbolKind};
use thiserror::Error;

use crate::introspect::Vmlinux;

/// Why the vmlinux's symbol table could not be read.
#[derive(Debug, Error)]
pub enum SymbolError {
    /// The file is not ELF, or its symbol table does not parse.
    #[error("'{path}' is not an ELF file with a symbol table: {source}")]
    Parse {
        /// The vmlinux.
        path: PathBuf,
        /// The ELF parser's error.
        source: object::Error,
    },
    /// The file has no usable symbol (no function or object at a non-zero address).
    #[error("'{path}' has no symbols (built without KALLSYMS/stripped?)")]
    Empty {
        /// The vmlinux.
        path: PathBuf,
    },
}

/// Why a symbol reference does not name exactly one symbol.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LookupError {
    /// No symbol matches.
    #[error("no symbol '{0}' in the guest kernel")]
    NotFound(String),
    /// Several symbols match and the reference does not say which.
    #[error(
        "'{spec}' is ambiguous: {} symbols match ({}); name one as FILE:NAME, NAME,POS or FILE:NAME,POS",
        candidates.len(),
        candidates.join(", ")
    )]
    Ambiguous {
        /// The reference.
        spec: String,
        /// Each match as `file:name,pos @ address` (kallsyms order).
        candidates: Vec<String>,
    },
    /// The reference is malformed, or its position is past the matches.
    #[error("'{spec}': {why}")]
    BadSpec {
        /// The reference.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
}

/// How [`SymbolTable::resolve`] treats a bare name that several symbols share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Refuse it: the reference must say which (functions and data a patch names).
    Exact,
    /// Take the one global symbol among them, as a linker would (relocations of patch
    /// code, which in C can only name global symbols).
    PreferGlobal,
}

/// One symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// Name, as in `.symtab`.
    pub name: String,
    /// Kernel-virtual address.
    pub addr: u64,
    /// Size in bytes (0 when the symbol table gives none).
    pub size: u64,
    /// A function (`STT_FUNC`).
    pub is_func: bool,
    /// `STB_GLOBAL`/`STB_WEAK`: visible outside its file.
    pub global: bool,
    /// For a local symbol, the source file it came from (the `STT_FILE` symbol before it
    /// in `.symtab`: a base name such as `core.c`, which can itself repeat).
    pub file: Option<String>,
}

impl Symbol {
    /// A global symbol (tests build tables from these).
    pub fn global(name: &str, addr: u64, size: u64, is_func: bool) -> Self {
        Self {
            name: name.into(),
            addr,
            size,
            is_func,
            global: true,
            file: None,
        }
    }
}

/// Address-sorted symbols plus a by-name index.
#[derive(Debug, Default)]
pub struct SymbolTable {
    by_addr: Vec<Symbol>,
    /// Indices into `by_addr` of every symbol with the name, in address (kallsyms) order.
    by_name: HashMap<String, Vec<usize>>,
}

impl SymbolTable {
    /// The symbols of an ELF file (a vmlinux).
    pub fn from_vmlinux(vmlinux: &Vmlinux) -> Result<Self, SymbolError> {
        let path = vmlinux.path();
        let file = object::File::parse(vmlinux.bytes()).map_err(|source| SymbolError::Parse {
            path: path.into(),
            source,
        })?;
        let mut syms = Vec::new();
        let mut cur_file: Option<String> = None;
        for s in file.symbols() {
            if s.kind() == SymbolKind::File {
                cur_file = s.name().ok().map(str::to_string);
                continue;
            }
            if s.address() == 0 || !matches!(s.kind(), SymbolKind::Text | SymbolKind::Data | SymbolKind::Unknown) {
                continue;
            }
            let Ok(name) = s.name() else { continue };
            let global = s.is_global();
            syms.push(Symbol {
                name: name.to_string(),
                addr: s.address(),
                size: s.size(),
                is_func: s.kind() == SymbolKind::Text,
                global,
                file: if global { None } else { cur_file.clone() },
            });
        }
        if syms.is_empty() {
            return Err(SymbolError::Empty { path: path.into() });
        }
        Ok(Self::from_symbols(syms))
    }

    /// Builds a table from a list of symbols.
    pub fn from_symbols(mut syms: Vec<Symbol>) -> Self {
        syms.sort_by(|a, b| a.addr.cmp(&b.addr).then(b.size.cmp(&a.size)));
        // The same symbol can appear twice (same name, address and file): keep one.
        syms.dedup_by(|b, a| a.addr == b.addr && a.name == b.name && a.file == b.file);
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::with_capacity(syms.len());
        for (i, s) in syms.iter().enumerate() {
            by_name.entry(s.name.clone()).or_default().push(i);
        }
        Self { by_addr: syms, by_name }
    }

    /// The one symbol a reference names. A reference is `NAME`, `FILE:NAME`, `NAME,POS`
    /// or `FILE:NAME,POS`: FILE (a source file's base name, e.g. `reboot.c`) keeps the
    /// local symbols of files with that name; POS (from 1) picks among the remaining
    /// matches in address order, the order of `/proc/kallsyms` (livepatch's `sympos`
    /// counts the same way when no FILE is given). A reference that matches several
    /// symbols is refused with the candidates listed (with [`Scope::PreferGlobal`], a bare
    /// name with exactly one global match resolves to it).
    pub fn resolve(&self, spec: &str, scope: Scope) -> Result<&Symbol, LookupError> {
        let bad = |why: &str| LookupError::BadSpec {
            spec: spec.into(),
            why: why.into(),
        };
        let (rest, pos) = match spec.rsplit_once(',') {
            Some((r, p)) => {
                let p: usize = p.parse().map_err(|_| bad("the position after ',' is not a number"))?;
                if p == 0 {
                    return Err(bad("positions count from 1"));
                }
                (r, Some(p))
            }
            None => (spec, None),
        };
        let (file, name) = match rest.split_once(':') {
            Some((f, n)) if !f.is_empty() => (Some(f), n),
            Some((_, n)) => (None, n), // ":NAME,POS": count among all namesakes
            None => (None, rest),
        };
        if name.is_empty() {
            return Err(bad("empty symbol name"));
        }
        let all = self.by_name.get(name).map(Vec::as_slice).unwrap_or(&[]);
        let matches: Vec<&Symbol> = all
            .iter()
            .map(|&i| &self.by_addr[i])
            .filter(|s| file.is_none_or(|f| s.file.as_deref() == Some(f)))
            .collect();
        if matches.is_empty() {
            return Err(match file {
                Some(f) if !all.is_empty() => bad(&format!(
                    "no local symbol '{name}' from a file named '{f}' (it is in {})",
                    self.describe_candidates(all.iter().map(|&i| &self.by_addr[i]))
                        .join(", ")
                )),
                _ => LookupError::NotFound(spec.into()),
            });
        }
        if let Some(p) = pos {
            return matches
                .get(p - 1)
                .copied()
                .ok_or_else(|| bad(&format!("only {} symbols match", matches.len())));
        }
        if let [one] = matches.as_slice() {
            return Ok(one);
        }
        if scope == Scope::PreferGlobal && file.is_none() {
            if let [g] = matches.iter().filter(|s| s.global).collect::<Vec<_>>().as_slice() {
                return Ok(g);
            }
        }
        Err(LookupError::Ambiguous {
            spec: spec.into(),
            candidates: self.describe_candidates(matches.into_iter()),
        })
    }

    /// `file:name,pos @ 0xaddr` for each symbol (pos among namesakes of the same file).
    fn describe_candidates<'a>(&self, syms: impl Iterator<Item = &'a Symbol>) -> Vec<String> {
        let syms: Vec<&Symbol> = syms.collect();
        syms.iter()
            .map(|s| {
                let pos = syms.iter().filter(|o| o.file == s.file && o.addr <= s.addr).count();
                match &s.file {
                    Some(f) => format!("{f}:{},{pos} @ {:#x}", s.name, s.addr),
                    None => format!("{} (global) @ {:#x}", s.name, s.addr),
                }
            })
            .collect()
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// True when there is no symbol.
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// The symbol called `name` when exactly one is, or exactly one of those is global
    /// (the VMM's own lookups of kernel globals such as `init_task`); None otherwise.
    pub fn get(&self, name: &str) -> Option<&Symbol> {
        self.resolve(name, Scope::PreferGlobal).ok()
    }

    /// The symbol containing `addr` (or the closest one below it, for size-less symbols).
    pub fn lookup(&self, addr: u64) -> Option<(&Symbol, u64)> {
        let idx = self.by_addr.partition_point(|s| s.addr <= addr);
        let s = self.by_addr[..idx]
            .iter()
            .rev()
            .find(|s| s.size == 0 || addr < s.addr + s.size)?;
        if s.size == 0 && addr - s.addr > 0x10000 {
            return None;
        }
        Some((s, addr - s.addr))
    }

    /// `name+0xoff/0xsize` for an address, or the bare address.
    pub fn describe(&self, addr: u64) -> String {
        match self.lookup(addr) {
            Some((s, off)) => format!("{}+{:#x}/{:#x}", s.name, off, s.size),
            None => format!("{addr:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(name: &str, addr: u64, size: u64) -> Symbol {
        Symbol::global(name, addr, size, true)
    }

    fn local(name: &str, file: &str, addr: u64) -> Symbol {
        Symbol {
            global: false,
            file: Some(file.into()),
            ..sym(name, addr, 0x20)
        }
    }

    #[test]
    fn repeated_local_names_need_a_file_or_a_position() {
        let t = SymbolTable::from_symbols(vec![
            local("type_show", "serial_core.c", 0x3000),
            local("type_show", "reboot.c", 0x1000),
            local("type_show", "core.c", 0x2000),
            local("type_show", "core.c", 0x4000),
            sym("printk", 0x5000, 0x10),
            local("printk", "other.c", 0x6000),
        ]);
        let e = t.resolve("type_show", Scope::Exact).unwrap_err();
        let LookupError::Ambiguous { candidates, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(
            candidates,
            &[
                "reboot.c:type_show,1 @ 0x1000",
                "core.c:type_show,1 @ 0x2000",
                "serial_core.c:type_show,1 @ 0x3000",
                "core.c:type_show,2 @ 0x4000"
            ]
        );
        assert_eq!(t.resolve("reboot.c:type_show", Scope::Exact).unwrap().addr, 0x1000);
        assert_eq!(t.resolve("type_show,3", Scope::Exact).unwrap().addr, 0x3000);
        assert_eq!(t.resolve("core.c:type_show,2", Scope::Exact).unwrap().addr, 0x4000);
        assert_eq!(t.resolve(":type_show,2", Scope::Exact).unwrap().addr, 0x2000);
        assert!(matches!(
            t.resolve("core.c:type_show", Scope::Exact),
            Err(LookupError::Ambiguous { .. })
        ));
        assert!(t
            .resolve("type_show,5", Scope::Exact)
            .unwrap_err()
            .to_string()
            .contains("only 4"));
        assert!(t
            .resolve("nope.c:type_show", Scope::Exact)
            .unwrap_err()
            .to_string()
            .contains("reboot.c"));
        assert_eq!(
            t.resolve("missing", Scope::Exact),
            Err(LookupError::NotFound("missing".into()))
        );
        // A linker's view: the one global wins for relocations, not for names a patch gives.
        assert_eq!(t.resolve("printk", Scope::PreferGlobal).unwrap().addr, 0x5000);
        assert!(t.resolve("printk", Scope::Exact).is_err());
        assert_eq!(t.get("printk").unwrap().addr, 0x5000);
        assert!(t.get("type_show").is_none());
    }

    #[test]
    fn lookup_by_addr_and_name() {
        let t = SymbolTable::from_symbols(vec![
            sym("b", 0x2000, 0x10),
            sym("a", 0x1000, 0x100),
            sym("c", 0x3000, 0),
        ]);
        assert_eq!(t.get("a").unwrap().addr, 0x1000);
        assert_eq!(t.lookup(0x1050).unwrap().0.name, "a");
        assert_eq!(t.lookup(0x1050).unwrap().1, 0x50);
        assert!(t.lookup(0x1100).is_none());
        assert_eq!(t.describe(0x2004), "b+0x4/0x10");
        assert_eq!(t.describe(0x3008), "c+0x8/0x0");
        assert_eq!(t.describe(0x10), "0x10");
    }

    #[test]
    fn reads_own_test_binary() {
        let exe = std::env::current_exe().unwrap();
        let t = SymbolTable::from_vmlinux(&Vmlinux::read(&exe).unwrap()).unwrap();
        assert!(!t.is_empty());
        assert!(Vmlinux::read(std::path::Path::new("/nonexistent")).is_err());
    }
}
