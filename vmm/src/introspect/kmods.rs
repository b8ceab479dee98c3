//! The guest's loaded kernel modules, read from outside: the `modules` list, each
//! `struct module`'s name, state, core layout and kallsyms (field offsets from BTF), so
//! that a patch can name a module's symbol as `MODULE::NAME` or `MODULE::NAME,POS`; and
//! pinning a module while a patch uses it (its `refcnt`, as `try_module_get` does).
//!
//! **Reading without the guest's locks.** The kernel changes the `modules` list under
//! `module_mutex` with `list_add_rcu`/`list_del_rcu`, and frees a module only after an RCU
//! grace period. lucos cannot hold `module_mutex` or an RCU read lock, so its reads are of
//! two kinds:
//! - *Lookups* (resolving symbols while a patch is linked) run with the guest running. A
//!   module may be unloaded under such a read: its memory is then unmapped (the read fails
//!   with a page-walk error) or reused (the read sees garbage). So every walk is bounded,
//!   every value is checked for sense (a NUL-terminated name, a known state, the symbol
//!   table inside the module's core layout, sizes within limits) and nothing read this way
//!   is ever written through. A lookup's result is only a claim, checked again:
//! - *Pinning* ([`GuestKernel::pin_module`]) runs with every vCPU paused, in the pause that
//!   installs the jumps. A paused vCPU is between two instructions, so the forward links
//!   of the list are well formed (both `list_add_rcu` and `list_del_rcu` keep a forward walk
//!   valid at every step) and every module reachable from the head at that instant has not
//!   been freed (a module leaves the list before its grace period starts). The pin finds
//!   the module at the same `struct module` address with the same core layout and symbol
//!   table the lookup used, checks it is `MODULE_STATE_LIVE` with a non-zero reference
//!   count (what `try_module_get` checks: zero means `delete_module` has taken the base
//!   reference and is unloading it), and adds one reference: `delete_module` then fails
//!   with `EWOULDBLOCK` until the pin is dropped. No guest atomic is torn: every vCPU is
//!   stopped at an instruction boundary, and a locked read-modify-write is one instruction.

use std::collections::HashMap;

use thiserror::Error;

use super::kernel::{GuestKernel, KernelError};
use super::pagewalk::{GuestVirt, WalkError};
use crate::memory::GuestMem;
use crate::symbols::Symbol;

/// More modules than this on the list means the walk is lost (Linux distributions load
/// a few hundred).
const MAX_MODULES: usize = 4096;
/// More symbols than this in one module's kallsyms is not a module lucos reads.
const MAX_SYMBOLS: u64 = 1 << 20;
/// `MODULE_REF_BASE`: the reference a live module holds on itself.
const MODULE_REF_BASE: u32 = 1;
/// Size of an `Elf64_Sym`.
const ELF64_SYM: u64 = 24;
/// `STT_FUNC`.
const STT_FUNC: u8 = 2;
/// `STB_GLOBAL` and `STB_WEAK`.
const STB_GLOBAL: u8 = 1;
const STB_WEAK: u8 = 2;

/// Why a guest module, or one of its symbols, could not be found or used.
#[derive(Debug, Error)]
pub enum KmodError {
    /// The kernel has no module list lucos can read (no `CONFIG_MODULES`, or BTF without
    /// the `struct module` fields below).
    #[error("the guest kernel has no module list lucos can read: {0}")]
    NoSupport(#[source] KernelError),
    /// Reading guest memory failed on the way.
    #[error("reading the guest's module list: {0}")]
    Walk(#[from] WalkError),
    /// The list or a module in it does not make sense (changing under the read, or
    /// corrupt).
    #[error("the guest's module list looks inconsistent: {0}")]
    Corrupt(String),
    /// No module of that name is loaded.
    #[error("module '{module}' is not loaded in the guest (loaded: {})", if loaded.is_empty() { "none".to_string() } else { loaded.join(", ") })]
    NotLoaded {
        /// The module.
        module: String,
        /// The modules that are.
        loaded: Vec<String>,
    },
    /// The module is on the list but not live (still loading, or being unloaded).
    #[error("module '{module}' is {state}, not live")]
    NotLive {
        /// The module.
        module: String,
        /// Its state (`coming`, `going`, `unformed`, `being unloaded`).
        state: String,
    },
    /// The module was unloaded (or unloaded and loaded again) since its symbols were read.
    #[error("module '{0}' changed since its symbols were read (unloaded or reloaded)")]
    Changed(String),
    /// No symbol of that name in the module.
    #[error("no symbol '{name}' in module '{module}'")]
    NoSymbol {
        /// The module.
        module: String,
        /// The name.
        name: String,
    },
    /// Several symbols match and the reference does not say which.
    #[error(
        "'{spec}' is ambiguous: {} symbols match ({}); name one as MODULE::NAME,POS",
        candidates.len(),
        candidates.join(", ")
    )]
    Ambiguous {
        /// The reference.
        spec: String,
        /// Each match as `MODULE::NAME,POS @ address` (kallsyms order).
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

impl From<KernelError> for KmodError {
    fn from(e: KernelError) -> Self {
        match e {
            KernelError::Walk(w) => Self::Walk(w),
            e => Self::NoSupport(e),
        }
    }
}

/// `enum module_state` in words.
pub fn state_name(s: u32) -> &'static str {
    match s {
        0 => "live",
        1 => "coming",
        2 => "going",
        3 => "unformed",
        _ => "in an unknown state",
    }
}

/// Byte offsets of `struct module` fields, from BTF.
#[derive(Debug, Clone, Copy)]
pub(super) struct ModLayout {
    list: u64,
    name: u64,
    name_len: u64,
    state: u64,
    /// `refcnt` (None without `CONFIG_MODULE_UNLOAD`: then no module can be unloaded).
    refcnt: Option<u64>,
    core_base: u64,
    core_size: u64,
    ks_symtab: u64,
    ks_num: u64,
    ks_strtab: u64,
    ks_typetab: u64,
}

/// A module on the guest's `modules` list, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedModule {
    /// Its name (`xfs`).
    pub name: String,
    /// Address of its `struct module`.
    pub addr: u64,
    /// `enum module_state`: 0 is live.
    pub state: u32,
    /// Its core layout (code and data that stay while it is loaded): base and size.
    pub base: u64,
    /// Bytes of the core layout.
    pub size: u64,
    /// `core_kallsyms`: its `Elf64_Sym` table, number of entries, string table.
    pub symtab: (u64, u64, u64),
    /// `core_kallsyms.typetab`, which the module loader puts right after the strings.
    pub typetab: u64,
}

impl LoadedModule {
    /// Whether `addr` is in the module's core layout.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.size
    }
}

/// One module's symbols in its kallsyms order (`core_kallsyms`, the order of the `.ko`'s
/// symbol table), which is the order `MODULE::NAME,POS` counts in.
#[derive(Debug)]
pub struct ModuleSymbols {
    /// The module the symbols were read from.
    pub module: LoadedModule,
    syms: Vec<Symbol>,
    by_name: HashMap<String, Vec<usize>>,
    /// Indices of `syms` sorted by address, for [`lookup`](Self::lookup).
    by_addr: Vec<usize>,
}

impl ModuleSymbols {
    /// A table of `syms`, given in kallsyms order.
    pub fn new(module: LoadedModule, syms: Vec<Symbol>) -> Self {
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, s) in syms.iter().enumerate() {
            by_name.entry(s.name.clone()).or_default().push(i);
        }
        let mut by_addr: Vec<usize> = (0..syms.len()).collect();
        by_addr.sort_by_key(|&i| syms[i].addr);
        Self {
            module,
            syms,
            by_name,
            by_addr,
        }
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.syms.len()
    }

    /// True without symbols.
    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// The symbol `NAME` or `NAME,POS` names (POS from 1, among the module's symbols of
    /// that name in kallsyms order). `spec` is the whole reference, for messages. A bare
    /// name several symbols share is refused with the candidates listed, unless
    /// `prefer_global` and exactly one of them is global (as a linker would pick).
    pub fn resolve(&self, spec: &str, name_pos: &str, prefer_global: bool) -> Result<&Symbol, KmodError> {
        let bad = |why: &str| KmodError::BadSpec {
            spec: spec.into(),
            why: why.into(),
        };
        let (name, pos) = match name_pos.rsplit_once(',') {
            Some((n, p)) => {
                let p: usize = p.parse().map_err(|_| bad("the position after ',' is not a number"))?;
                if p == 0 {
                    return Err(bad("positions count from 1"));
                }
                (n, Some(p))
            }
            None => (name_pos, None),
        };
        if name.is_empty() {
            return Err(bad("empty symbol name"));
        }
        let all: Vec<&Symbol> = self
            .by_name
            .get(name)
            .map(|v| v.iter().map(|&i| &self.syms[i]).collect())
            .unwrap_or_default();
        if all.is_empty() {
            return Err(KmodError::NoSymbol {
                module: self.module.name.clone(),
                name: name.into(),
            });
        }
        if let Some(p) = pos {
            return all
                .get(p - 1)
                .copied()
                .ok_or_else(|| bad(&format!("only {} symbols match", all.len())));
        }
        if let [one] = all.as_slice() {
            return Ok(one);
        }
        if prefer_global {
            if let [g] = all.iter().filter(|s| s.global).collect::<Vec<_>>().as_slice() {
                return Ok(g);
            }
        }
        Err(KmodError::Ambiguous {
            spec: spec.into(),
            candidates: all
                .iter()
                .enumerate()
                .map(|(i, s)| format!("{}::{name},{} @ {:#x}", self.module.name, i + 1, s.addr))
                .collect(),
        })
    }

    /// The symbol containing `addr`, and the offset into it.
    pub fn lookup(&self, addr: u64) -> Option<(&Symbol, u64)> {
        if !self.module.contains(addr) {
            return None;
        }
        let idx = self.by_addr.partition_point(|&i| self.syms[i].addr <= addr);
        self.by_addr[..idx]
            .iter()
            .rev()
            .map(|&i| &self.syms[i])
            .find(|s| s.size == 0 || addr < s.addr + s.size)
            .map(|s| (s, addr - s.addr))
    }
}

/// Splits `MODULE::REST` into the module and the rest; None for a vmlinux reference.
pub fn split_module_spec(spec: &str) -> Option<(&str, &str)> {
    spec.split_once("::").filter(|(m, _)| !m.is_empty())
}

impl GuestKernel {
    /// The offsets, read from BTF once.
    fn mod_layout(&self) -> Result<ModLayout, KmodError> {
        if let Some(l) = self.kmod_layout.get() {
            return Ok(*l);
        }
        self.sym("modules")?;
        let b = &self.btf;
        let e = |r: Result<u64, super::btf::BtfError>| r.map_err(|e| KmodError::NoSupport(e.into()));
        let m = |p: &str| e(b.offset_of("module", p));
        let core = m("core_layout")?;
        let ks = m("core_kallsyms")?;
        let k = |p: &str| e(b.offset_of("mod_kallsyms", p));
        let l = ModLayout {
            list: m("list")?,
            name: m("name")?,
            name_len: b
                .array_len("module", "name")
                .map_err(|e| KmodError::NoSupport(e.into()))? as u64,
            state: m("state")?,
            refcnt: b.offset_of("module", "refcnt").ok(),
            core_base: core + e(b.offset_of("module_layout", "base"))?,
            core_size: core + e(b.offset_of("module_layout", "size"))?,
            ks_symtab: ks + k("symtab")?,
            ks_num: ks + k("num_symtab")?,
            ks_strtab: ks + k("strtab")?,
            ks_typetab: ks + k("typetab")?,
        };
        Ok(*self.kmod_layout.get_or_init(|| l))
    }

    /// Every module on the guest's `modules` list, in list order (newest first). With the
    /// guest running, the result is a claim to be checked again (module docs above).
    pub fn loaded_modules(&self, mem: &GuestMem) -> Result<Vec<LoadedModule>, KmodError> {
        let l = self.mod_layout()?;
        let v = self.virt(mem);
        let head = self.sym("modules")?;
        let mut out = Vec::new();
        let mut cur = v.read_u64(head)?;
        while cur != head {
            if out.len() >= MAX_MODULES {
                return Err(KmodError::Corrupt(format!("more than {MAX_MODULES} modules")));
            }
            out.push(read_module(&v, &l, cur - l.list)?);
            cur = v.read_u64(cur)?;
        }
        Ok(out)
    }

    /// The loaded module called `name`.
    pub fn find_module(&self, mem: &GuestMem, name: &str) -> Result<LoadedModule, KmodError> {
        let all = self.loaded_modules(mem)?;
        match all.iter().find(|m| m.name == name) {
            Some(m) => Ok(m.clone()),
            None => Err(KmodError::NotLoaded {
                module: name.into(),
                loaded: all.into_iter().map(|m| m.name).collect(),
            }),
        }
    }

    /// The symbols of a module (its `core_kallsyms`), in kallsyms order.
    pub fn module_symbols(&self, mem: &GuestMem, m: &LoadedModule) -> Result<ModuleSymbols, KmodError> {
        let v = self.virt(mem);
        let (symtab, num, strtab) = m.symtab;
        let mut raw = vec![0u8; (num * ELF64_SYM) as usize];
        v.read(symtab, &mut raw)?;
        // The module loader puts the type chars right after the strings (`layout_symtab`);
        // else the strings end inside the core layout.
        let str_end = if m.typetab > strtab && m.contains(m.typetab) {
            m.typetab
        } else {
            (m.base + m.size).min(strtab + (num * 512).max(4096))
        };
        let mut strs = vec![0u8; str_end.saturating_sub(strtab) as usize];
        read_mapped(&v, strtab, &mut strs)?;
        let mut syms = Vec::new();
        for e in raw.chunks_exact(ELF64_SYM as usize).skip(1) {
            let st_name = u32::from_le_bytes(e[0..4].try_into().unwrap_or_default()) as usize;
            let info = e[4];
            let value = u64::from_le_bytes(e[8..16].try_into().unwrap_or_default());
            let size = u64::from_le_bytes(e[16..24].try_into().unwrap_or_default());
            let Some(rest) = strs.get(st_name..) else {
                return Err(KmodError::Corrupt(format!(
                    "{}: a symbol name is past its string table",
                    m.name
                )));
            };
            let Some(end) = rest.iter().position(|&b| b == 0) else {
                return Err(KmodError::Corrupt(format!("{}: unterminated symbol name", m.name)));
            };
            let name = String::from_utf8_lossy(&rest[..end]).into_owned();
            if name.is_empty() {
                continue;
            }
            let bind = info >> 4;
            syms.push(Symbol {
                name,
                addr: value,
                size,
                is_func: info & 0xf == STT_FUNC,
                global: bind == STB_GLOBAL || bind == STB_WEAK,
                file: None,
            });
        }
        Ok(ModuleSymbols::new(m.clone(), syms))
    }

    /// Pins module `m`: with every vCPU paused, finds it again as it was read, checks it
    /// is live and not being unloaded, and takes a reference on it (`refcnt += 1`). Every
    /// vCPU must be paused.
    pub fn pin_module(&self, mem: &GuestMem, m: &LoadedModule) -> Result<(), KmodError> {
        let l = self.mod_layout()?;
        let v = self.virt(mem);
        self.find_again(mem, m)?;
        let Some(rc) = l.refcnt else {
            return Ok(()); // No CONFIG_MODULE_UNLOAD: modules are never unloaded.
        };
        let refs = v.read_u32(m.addr + rc)?;
        if refs == 0 {
            return Err(KmodError::NotLive {
                module: m.name.clone(),
                state: "being unloaded".into(),
            });
        }
        v.write(m.addr + rc, &refs.wrapping_add(1).to_le_bytes())?;
        log::info!("module {} pinned (refcnt {refs} -> {})", m.name, refs + 1);
        Ok(())
    }

    /// Drops a pin [`pin_module`](Self::pin_module) took. Every vCPU must be paused.
    pub fn unpin_module(&self, mem: &GuestMem, m: &LoadedModule) -> Result<(), KmodError> {
        let l = self.mod_layout()?;
        let v = self.virt(mem);
        // Pinned, it cannot have left (the list walk also tells a wrong address).
        self.find_again(mem, m)?;
        let Some(rc) = l.refcnt else { return Ok(()) };
        let refs = v.read_u32(m.addr + rc)?;
        if refs <= MODULE_REF_BASE {
            return Err(KmodError::Corrupt(format!(
                "module {} has {refs} references: lucos's pin is not among them",
                m.name
            )));
        }
        v.write(m.addr + rc, &(refs - 1).to_le_bytes())?;
        log::info!("module {} unpinned (refcnt {refs} -> {})", m.name, refs - 1);
        Ok(())
    }

    /// `m` as it is on the list now, with the same struct, core layout and symbols, live.
    fn find_again(&self, mem: &GuestMem, m: &LoadedModule) -> Result<LoadedModule, KmodError> {
        let now = self
            .loaded_modules(mem)?
            .into_iter()
            .find(|n| n.addr == m.addr)
            .ok_or_else(|| KmodError::Changed(m.name.clone()))?;
        if now.name != m.name || now.base != m.base || now.size != m.size || now.symtab != m.symtab {
            return Err(KmodError::Changed(m.name.clone()));
        }
        if now.state != 0 {
            return Err(KmodError::NotLive {
                module: m.name.clone(),
                state: state_name(now.state).into(),
            });
        }
        Ok(now)
    }
}

/// Reads one `struct module` at `addr`, checking what it says for sense.
fn read_module(v: &GuestVirt, l: &ModLayout, addr: u64) -> Result<LoadedModule, KmodError> {
    let mut name = vec![0u8; l.name_len as usize];
    v.read(addr + l.name, &mut name)?;
    let end = name
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| KmodError::Corrupt(format!("the module at {addr:#x} has an unterminated name")))?;
    let name = std::str::from_utf8(&name[..end])
        .map_err(|_| KmodError::Corrupt(format!("the module at {addr:#x} has a name that is not UTF-8")))?
        .to_string();
    let state = v.read_u32(addr + l.state)?;
    if state > 3 {
        return Err(KmodError::Corrupt(format!("module {name}: state {state}")));
    }
    let base = v.read_u64(addr + l.core_base)?;
    let size = u64::from(v.read_u32(addr + l.core_size)?);
    let symtab = v.read_u64(addr + l.ks_symtab)?;
    let num = u64::from(v.read_u32(addr + l.ks_num)?);
    let strtab = v.read_u64(addr + l.ks_strtab)?;
    let typetab = v.read_u64(addr + l.ks_typetab)?;
    let inside = |a: u64, len: u64| a >= base && a.checked_add(len).is_some_and(|e| e <= base + size);
    // A module being loaded (unformed, coming) may have no kallsyms yet: only a live one's
    // are checked and used.
    if state == 0 && (num > MAX_SYMBOLS || !inside(symtab, num * ELF64_SYM) || (num > 0 && !inside(strtab, 1))) {
        return Err(KmodError::Corrupt(format!(
            "module {name}: kallsyms ({num} symbols at {symtab:#x}, strings at {strtab:#x}) outside its core layout {base:#x}+{size:#x}"
        )));
    }
    Ok(LoadedModule {
        name,
        addr,
        state,
        base,
        size,
        symtab: (symtab, num, strtab),
        typetab,
    })
}

/// Reads `buf.len()` bytes at `va`, or as many leading bytes as are mapped (the rest stays
/// zero): a string table's tail may end before the core layout's last page.
fn read_mapped(v: &GuestVirt, va: u64, buf: &mut [u8]) -> Result<(), KmodError> {
    let mut off = 0usize;
    while off < buf.len() {
        let a = va + off as u64;
        let n = ((4096 - (a & 4095)) as usize).min(buf.len() - off);
        match v.read(a, &mut buf[off..off + n]) {
            Ok(()) => off += n,
            Err(e) if off == 0 => return Err(e.into()),
            Err(_) => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> LoadedModule {
        LoadedModule {
            name: "xfs".into(),
            addr: 0xffff_ffff_c000_0000,
            state: 0,
            base: 0xffff_ffff_c010_0000,
            size: 0x1000,
            symtab: (0, 0, 0),
            typetab: 0,
        }
    }

    fn sym(name: &str, addr: u64, global: bool) -> Symbol {
        Symbol {
            global,
            file: None,
            ..Symbol::global(name, addr, 0x10, true)
        }
    }

    #[test]
    fn positions_count_in_kallsyms_order() {
        let b = 0xffff_ffff_c010_0000;
        let t = ModuleSymbols::new(
            module(),
            vec![
                sym("show", b + 0x200, false),
                sym("show", b + 0x100, false),
                sym("fmt", b + 0x300, true),
                sym("init", b + 0x400, false),
                sym("init", b + 0x500, true),
            ],
        );
        let e = t.resolve("xfs::show", "show", false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "'xfs::show' is ambiguous: 2 symbols match (xfs::show,1 @ 0xffffffffc0100200, \
             xfs::show,2 @ 0xffffffffc0100100); name one as MODULE::NAME,POS"
        );
        assert_eq!(t.resolve("s", "show,1", false).unwrap().addr, b + 0x200);
        assert_eq!(t.resolve("s", "show,2", false).unwrap().addr, b + 0x100);
        assert!(t
            .resolve("s", "show,3", false)
            .unwrap_err()
            .to_string()
            .contains("only 2"));
        assert!(t.resolve("s", "show,0", false).is_err());
        assert_eq!(t.resolve("s", "fmt", false).unwrap().addr, b + 0x300);
        assert!(t.resolve("s", "init", false).is_err());
        assert_eq!(t.resolve("s", "init", true).unwrap().addr, b + 0x500);
        assert!(matches!(t.resolve("s", "nope", false), Err(KmodError::NoSymbol { .. })));
        assert_eq!(
            t.lookup(b + 0x108).map(|(s, o)| (s.name.as_str(), o)),
            Some(("show", 8))
        );
        assert!(t.lookup(b + 0x2000).is_none());
        assert_eq!(split_module_spec("xfs::show,2"), Some(("xfs", "show,2")));
        assert_eq!(split_module_spec("core.c:show"), None);
        assert_eq!(split_module_spec("::x"), None);
    }
}
