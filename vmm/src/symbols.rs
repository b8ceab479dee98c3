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
}

/// Address-sorted symbols plus a by-name index.
#[derive(Debug, Default)]
pub struct SymbolTable {
    by_addr: Vec<Symbol>,
    by_name: HashMap<String, usize>,
}

impl SymbolTable {
    /// The symbols of an ELF file (a vmlinux).
    pub fn from_vmlinux(vmlinux: &Vmlinux) -> Result<Self, SymbolError> {
        let path = vmlinux.path();
        let file = object::File::parse(vmlinux.bytes()).map_err(|source| SymbolError::Parse {
            path: path.into(),
            source,
        })?;
        let syms: Vec<Symbol> = file
            .symbols()
            .filter(|s| {
                s.address() != 0 && matches!(s.kind(), SymbolKind::Text | SymbolKind::Data | SymbolKind::Unknown)
            })
            .filter_map(|s| {
                Some(Symbol {
                    name: s.name().ok()?.to_string(),
                    addr: s.address(),
                    size: s.size(),
                    is_func: s.kind() == SymbolKind::Text,
                })
            })
            .collect();
        if syms.is_empty() {
            return Err(SymbolError::Empty { path: path.into() });
        }
        Ok(Self::from_symbols(syms))
    }

    /// Builds a table from a list of symbols.
    pub fn from_symbols(mut syms: Vec<Symbol>) -> Self {
        syms.sort_by(|a, b| a.addr.cmp(&b.addr).then(b.size.cmp(&a.size)));
        let mut by_name = HashMap::with_capacity(syms.len());
        for (i, s) in syms.iter().enumerate() {
            // Keep the first (global symbols usually come once; statics may repeat).
            by_name.entry(s.name.clone()).or_insert(i);
        }
        Self { by_addr: syms, by_name }
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// True when there is no symbol.
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// The symbol called `name` (the lowest-addressed one when several share the name).
    pub fn get(&self, name: &str) -> Option<&Symbol> {
        self.by_name.get(name).map(|&i| &self.by_addr[i])
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
        Symbol {
            name: name.into(),
            addr,
            size,
            is_func: true,
        }
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
