//! Patch code made known to the guest kernel as a module, from outside the guest.
//!
//! The kernel finds the bookkeeping of code that is not in vmlinux through `struct module`:
//! `__module_address(addr)` looks `addr` up in the module address tree (`mod_tree`, a latched
//! red-black tree keyed by each module's `core_layout`), and through the module it finds
//! - the exception table (`search_module_extables`: faults on user memory in the code),
//! - the ORC unwind tables (`orc_find`: stack traces through the code),
//! - the symbols (`module_address_lookup`: `%pS`, stack traces, `/proc/PID/stack`),
//! - whether an address is text (`__kernel_text_address`: the unwinders);
//!
//! and `find_bug` scans the BUG/WARN tables of the modules on `module_bug_list`.
//!
//! lucos writes a `struct module` (field offsets from the kernel's BTF) into the patch image
//! describing it, inserts it into both trees of `mod_tree` and into `module_bug_list`, all
//! with every vCPU paused: a vCPU paused inside a lockless lookup resumes on a complete
//! tree (each copy of the latch is valid when the world restarts, and the latch sequence
//! has moved, so the lookup retries), and one paused inside the RCU walk of the bug list
//! sees either the old or the new links, both well formed. The module is not on the
//! `modules` list: `lsmod`, `rmmod` and the module loader never see it, so the guest cannot
//! unload or free it. It is taken out the same way once no thread runs the patch code.

use super::dyndbg::{self, DdebugLayout, Descriptors};
use super::kernel::{GuestKernel, KernelError};
use super::pagewalk::{GuestVirt, WalkError};
use super::rbtree::{RbTree, Words};
use crate::memory::GuestMem;

/// Patch code to register: where it is and where its tables are (all guest-virtual,
/// inside the patch image), as the kernel's `struct module` records them; the update
/// server fills it in.
pub use lucos_update_server::guest::CodeInfo as CodeModule;
use lucos_update_server::guest::KeyAbi;

/// Byte offsets the registration needs, from BTF.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    size: u64,
    name: u64,
    name_len: u64,
    core: u64,
    l_base: u64,
    l_size: u64,
    l_text: u64,
    l_ro: u64,
    l_mtn_mod: u64,
    l_mtn_node: u64,
    num_ex: u64,
    extable: u64,
    num_orcs: u64,
    orc_ip: u64,
    orc: u64,
    num_bugs: u64,
    bug_list: u64,
    bug_table: u64,
    kallsyms: u64,
    core_kallsyms: u64,
    ks_symtab: u64,
    ks_num: u64,
    ks_strtab: u64,
    ks_typetab: u64,
    root_seq: u64,
    root_tree: u64,
    addr_min: u64,
    addr_max: u64,
    /// `jump_entries`, `num_jump_entries` (CONFIG_JUMP_LABEL only).
    jumps: Option<(u64, u64)>,
    /// The dynamic debug core (CONFIG_DYNAMIC_DEBUG_CORE only); its table for the patch
    /// follows the `struct module` ([`Layout::table_at`]).
    ddebug: Option<DdebugLayout>,
}

impl Layout {
    /// Offset of the patch's `struct ddebug_table` in its module record.
    fn table_at(&self) -> u64 {
        self.size.next_multiple_of(8)
    }
}

/// Why a pause cannot touch the dynamic debug tables.
const DDEBUG_BUSY: &str = "the guest holds ddebug_lock (dynamic_debug/control is in use)";

/// Size of `struct rb_node`: node[1] of a `latch_tree_node` follows node[0].
const RB_NODE: u64 = 24;

impl Words for GuestVirt<'_> {
    type Error = WalkError;
    fn read(&self, addr: u64) -> Result<u64, WalkError> {
        self.read_u64(addr)
    }
    fn write(&self, addr: u64, v: u64) -> Result<(), WalkError> {
        GuestVirt::write(self, addr, &v.to_le_bytes())
    }
}

impl GuestKernel {
    /// The offsets, read from BTF once (registration runs with the vCPUs paused).
    fn module_layout(&self) -> Result<Layout, KernelError> {
        if let Some(l) = self.module_layout.get() {
            return Ok(*l);
        }
        let l = self.read_module_layout()?;
        Ok(*self.module_layout.get_or_init(|| l))
    }

    fn read_module_layout(&self) -> Result<Layout, KernelError> {
        let b = &self.btf;
        let m = |p: &str| b.offset_of("module", p);
        let l = |p: &str| b.offset_of("module_layout", p);
        let k = |p: &str| b.offset_of("mod_kallsyms", p);
        let t = |p: &str| b.offset_of("mod_tree_root", p);
        Ok(Layout {
            size: b.size_of("module")?,
            name: m("name")?,
            name_len: b.array_len("module", "name")? as u64,
            core: m("core_layout")?,
            l_base: l("base")?,
            l_size: l("size")?,
            l_text: l("text_size")?,
            l_ro: l("ro_size")?,
            l_mtn_mod: l("mtn.mod")?,
            l_mtn_node: l("mtn.node")?,
            num_ex: m("num_exentries")?,
            extable: m("extable")?,
            num_orcs: m("arch.num_orcs")?,
            orc_ip: m("arch.orc_unwind_ip")?,
            orc: m("arch.orc_unwind")?,
            num_bugs: m("num_bugs")?,
            bug_list: m("bug_list")?,
            bug_table: m("bug_table")?,
            kallsyms: m("kallsyms")?,
            core_kallsyms: m("core_kallsyms")?,
            ks_symtab: k("symtab")?,
            ks_num: k("num_symtab")?,
            ks_strtab: k("strtab")?,
            ks_typetab: k("typetab")?,
            root_seq: t("root.seq")?,
            root_tree: t("root.tree")?,
            addr_min: t("addr_min")?,
            addr_max: t("addr_max")?,
            jumps: m("jump_entries").and_then(|a| Ok((a, m("num_jump_entries")?))).ok(),
            ddebug: self.read_ddebug_layout().ok(),
        })
    }

    fn read_ddebug_layout(&self) -> Result<DdebugLayout, KernelError> {
        let b = &self.btf;
        let t = |p: &str| b.offset_of("ddebug_table", p);
        Ok(DdebugLayout {
            entry: b.size_of("_ddebug")?,
            table: b.size_of("ddebug_table")?,
            link: t("link")?,
            maps: t("maps")?,
            mod_name: t("mod_name")?,
            num: t("num_ddebugs")?,
            ddebugs: t("ddebugs")?,
            head: self.sym("ddebug_tables")?,
            lock_owner: self.sym("ddebug_lock")? + b.offset_of("mutex", "owner")?,
        })
    }

    /// `sizeof(struct _ddebug)`, or 0 if the kernel has no dynamic debug core lucos can
    /// list patch descriptors with.
    pub fn ddebug_entry_size(&self) -> Result<u64, KernelError> {
        Ok(self.module_layout()?.ddebug.map_or(0, |d| d.entry))
    }

    /// Bytes of the patch's module record (the kernel's `struct module`, then its
    /// `struct ddebug_table` when the kernel has a dynamic debug core), or an error if the
    /// kernel has no module support lucos can use (no `CONFIG_MODULES`, no `mod_tree`, or
    /// BTF without the fields above).
    pub fn module_struct_size(&self) -> Result<u64, KernelError> {
        self.sym("mod_tree")?;
        self.sym("module_bug_list")?;
        let l = self.module_layout()?;
        Ok(match l.ddebug {
            Some(d) => l.table_at() + d.table,
            None => l.size,
        })
    }

    /// Writes a `struct module` for `c` at `at` (inside the patch image, `module_struct_size`
    /// bytes) and links it into the kernel's module address tree and BUG list, and its
    /// `pr_debug()` descriptors into the dynamic debug core's tables. Every vCPU must be
    /// paused. [`KernelError::Busy`], with nothing written, while the guest holds
    /// `ddebug_lock` and the patch has descriptors.
    pub fn register_code(&self, mem: &GuestMem, at: u64, c: &CodeModule) -> Result<(), KernelError> {
        let l = self.module_layout()?;
        let v = self.virt(mem);
        let ddebug = match (c.dyndbg.1, l.ddebug) {
            (0, _) => None,
            (_, None) => return Err(KernelError::NoDynamicDebug),
            (_, Some(d)) if dyndbg::lock_held(&v, &d)? => return Err(KernelError::Busy(DDEBUG_BUSY.into())),
            (n, Some(d)) => Some((
                d,
                Descriptors {
                    addr: c.dyndbg.0,
                    count: n,
                    name: at + l.name,
                },
            )),
        };
        // The struct is built here and written at once (one page walk, not one per field).
        let mut m = vec![0u8; l.size as usize];
        let mut put = |off: u64, bytes: &[u8]| {
            let o = off as usize;
            m[o..o + bytes.len()].copy_from_slice(bytes);
        };
        let mut name = c.name.as_bytes().to_vec();
        name.truncate(l.name_len as usize - 1);
        put(l.name, &name); // state stays 0: MODULE_STATE_LIVE
        put(l.core + l.l_base, &c.base.to_le_bytes());
        for (off, x) in [(l.l_size, c.size), (l.l_text, c.text_size), (l.l_ro, c.text_size)] {
            put(l.core + off, &(x as u32).to_le_bytes());
        }
        put(l.core + l.l_mtn_mod, &at.to_le_bytes());
        for (off, x) in [(l.num_ex, c.extable.1), (l.num_orcs, c.orc.2), (l.num_bugs, c.bugs.1)] {
            put(off, &(x as u32).to_le_bytes());
        }
        for (off, x) in [
            (l.extable, c.extable.0),
            (l.orc_ip, c.orc.0),
            (l.orc, c.orc.1),
            (l.bug_table, c.bugs.0),
        ] {
            put(off, &x.to_le_bytes());
        }
        let ks = l.core_kallsyms;
        put(ks + l.ks_symtab, &c.kallsyms.0.to_le_bytes());
        put(ks + l.ks_num, &(c.kallsyms.1 as u32).to_le_bytes());
        put(ks + l.ks_strtab, &c.kallsyms.2.to_le_bytes());
        put(ks + l.ks_typetab, &c.kallsyms.3.to_le_bytes());
        put(l.kallsyms, &(at + ks).to_le_bytes());
        // The static branches, which the kernel's jump_label_update() finds through the
        // key lists lucos links in the same pause (update server's jumplabel).
        match l.jumps {
            Some((entries, num)) => {
                put(entries, &c.jump_table.0.to_le_bytes());
                put(num, &(c.jump_table.1 as u32).to_le_bytes());
            }
            None if c.jump_table.1 > 0 => return Err(KernelError::NoJumpLabel),
            None => {}
        }
        v.write(at, &m)?;
        let core = at + l.core;

        // mod_tree: both copies of the latch, the sequence moved around each (as
        // latch_tree_insert does), then the address bounds __module_address checks first.
        let tree = self.sym("mod_tree")?;
        let node = core + l.l_mtn_node;
        let base_of = |n: u64, idx: u64| v.read_u64(n - idx * RB_NODE - l.l_mtn_node + l.l_base);
        for idx in 0..2 {
            self.bump_latch(&v, tree + l.root_seq)?;
            let t = RbTree::new(&v, tree + l.root_tree + 8 * idx);
            t.insert(node + idx * RB_NODE, |a, b| Ok(base_of(a, idx)? < base_of(b, idx)?))?;
        }
        let (min, max) = (v.read_u64(tree + l.addr_min)?, v.read_u64(tree + l.addr_max)?);
        v.write(tree + l.addr_min, &min.min(c.base).to_le_bytes())?;
        v.write(tree + l.addr_max, &max.max(c.base + c.size - 1).to_le_bytes())?;

        // module_bug_list: list_add_rcu at the head.
        let head = self.sym("module_bug_list")?;
        let entry = at + l.bug_list;
        let first = v.read_u64(head)?;
        v.write(entry, &first.to_le_bytes())?;
        v.write(entry + 8, &head.to_le_bytes())?;
        v.write(first + 8, &entry.to_le_bytes())?;
        v.write(head, &entry.to_le_bytes())?;

        // dynamic_debug/control lists the descriptors from here on.
        if let Some((d, descs)) = ddebug {
            dyndbg::link(&v, &d, at + l.table_at(), &descs)?;
        }
        Ok(())
    }

    /// Takes the module registered at `at` out of the address tree, the BUG list and the
    /// dynamic debug tables. Every vCPU must be paused. A module that is not in the tree is
    /// left alone. [`KernelError::Busy`], with nothing changed, while its descriptors are
    /// listed and the guest holds `ddebug_lock`.
    pub fn unregister_code(&self, mem: &GuestMem, at: u64) -> Result<(), KernelError> {
        let l = self.module_layout()?;
        let v = self.virt(mem);
        if let Some(d) = l.ddebug {
            let table = at + l.table_at();
            if dyndbg::is_linked(&v, &d, table)? {
                if dyndbg::lock_held(&v, &d)? {
                    return Err(KernelError::Busy(DDEBUG_BUSY.into()));
                }
                dyndbg::unlink(&v, &d, table)?;
            }
        }
        let tree = self.sym("mod_tree")?;
        let node = at + l.core + l.l_mtn_node;
        for idx in 0..2 {
            let t = RbTree::new(&v, tree + l.root_tree + 8 * idx);
            if t.contains(node + idx * RB_NODE)? {
                self.bump_latch(&v, tree + l.root_seq)?;
                t.erase(node + idx * RB_NODE)?;
            }
        }
        // list_del_rcu: the entry keeps its next pointer for a walker paused on it.
        let entry = at + l.bug_list;
        let (next, prev) = (v.read_u64(entry)?, v.read_u64(entry + 8)?);
        if next != 0 && prev != 0 && v.read_u64(prev)? == entry {
            v.write(next + 8, &prev.to_le_bytes())?;
            v.write(prev, &next.to_le_bytes())?;
        }
        Ok(())
    }

    /// The kernel's static key structures, for linking patch code's static branches
    /// into the keys' lists (the update server's `jumplabel`); an error without
    /// `CONFIG_JUMP_LABEL` or with a `struct jump_entry` other than x86-64's relative one.
    pub fn key_abi(&self) -> Result<KeyAbi, KernelError> {
        let b = &self.btf;
        let entry = b.size_of("jump_entry")?;
        if entry != 16 {
            return Err(KernelError::NoJumpLabel);
        }
        let n = |p: &str| b.offset_of("static_key_mod", p);
        Ok(KeyAbi {
            key_size: b.size_of("static_key")?,
            key_enabled: b.offset_of("static_key", "enabled")?,
            key_type: b.offset_of("static_key", "type")?,
            node_size: b.size_of("static_key_mod")?,
            node_next: n("next")?,
            node_entries: n("entries")?,
            node_mod: n("mod")?,
            mutex_owner: self.sym("jump_label_mutex")? + b.offset_of("mutex", "owner")?,
            kernel: (self.sym("_stext")?, self.sym("_end")?),
        })
    }

    fn bump_latch(&self, v: &GuestVirt, seq: u64) -> Result<(), KernelError> {
        let s = v.read_u32(seq)?;
        v.write(seq, &s.wrapping_add(1).to_le_bytes())?;
        Ok(())
    }
}
