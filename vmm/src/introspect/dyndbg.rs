//! The dynamic debug core's view of patch code: a patch's `pr_debug()`/`dev_dbg()`
//! descriptors (`__dyndbg`, an array of `struct _ddebug`) listed in `ddebug_tables`, so that
//! `dynamic_debug/control` shows them and turns them on and off as it does a module's.
//!
//! The kernel's `ddebug_add_module()` `kzalloc`s a `struct ddebug_table { link, maps,
//! mod_name, num_ddebugs, ddebugs }` and `list_add_tail`s it under `ddebug_lock`. lucos
//! cannot allocate in the guest, so the table lies in the patch's metadata block, right
//! after its `struct module`, and is linked and unlinked from the VMM with every vCPU
//! paused and only while no task holds `ddebug_lock` (the mutex's `owner` is 0). Every
//! walker of the list (the control file's read and write, `ddebug_remove_module`) holds
//! that mutex, and the control file's reader walks the list again from its head at each
//! `read()`, so with the mutex free nobody is on the list.
//!
//! Why the kernel never frees lucos's table: `ddebug_remove_module(name)` (a module
//! unloading) frees the table whose `mod_name` *pointer* equals that module's name; ours
//! points at the name in the patch's own `struct module`, which no real module has.
//! `ddebug_remove_all_tables()` runs only when the core's init fails, at boot.
//!
//! Turning a descriptor on flips its static key (`static_branch_enable(&dp->key...)`): a key
//! defined in the patch, whose sites the kernel finds through the patch's registered
//! `struct module` (`jump_entries`; see the update server's `jumplabel`).

use super::rbtree::Words;

/// Where the dynamic debug core's structures are, from BTF and the symbol table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DdebugLayout {
    /// `sizeof(struct _ddebug)`.
    pub entry: u64,
    /// `sizeof(struct ddebug_table)`.
    pub table: u64,
    /// Offsets in `struct ddebug_table`.
    pub link: u64,
    /// Offset of `maps` (class maps; an empty list for patch code).
    pub maps: u64,
    /// Offset of `mod_name`.
    pub mod_name: u64,
    /// Offset of `num_ddebugs` (unsigned int).
    pub num: u64,
    /// Offset of `ddebugs`.
    pub ddebugs: u64,
    /// Address of `ddebug_tables` (the list head).
    pub head: u64,
    /// Address of `ddebug_lock.owner`.
    pub lock_owner: u64,
}

/// What to list: the descriptors and the name the control file shows for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptors {
    /// Address of the first `struct _ddebug`.
    pub addr: u64,
    /// Their number.
    pub count: u64,
    /// Address of the NUL-terminated module name (in the patch's `struct module`).
    pub name: u64,
}

/// Whether a task holds `ddebug_lock`: then the list must not be touched in this pause.
pub fn lock_held<W: Words>(w: &W, l: &DdebugLayout) -> Result<bool, W::Error> {
    Ok(w.read(l.lock_owner)? != 0)
}

/// Whether the table at `table` is on the kernel's list (a zeroed or self-linked table is
/// not).
pub fn is_linked<W: Words>(w: &W, l: &DdebugLayout, table: u64) -> Result<bool, W::Error> {
    let link = table + l.link;
    let (next, prev) = (w.read(link)?, w.read(link + 8)?);
    if next == 0 || prev == 0 || next == link {
        return Ok(false);
    }
    Ok(w.read(prev)? == link && w.read(next + 8)? == link)
}

/// Fills the table at `table` and puts it at the tail of `ddebug_tables`, as
/// `ddebug_add_module` does. With every vCPU paused and `ddebug_lock` free.
pub fn link<W: Words>(w: &W, l: &DdebugLayout, table: u64, d: &Descriptors) -> Result<(), W::Error> {
    let maps = table + l.maps;
    w.write(maps, maps)?;
    w.write(maps + 8, maps)?;
    w.write(table + l.mod_name, d.name)?;
    // num_ddebugs is an unsigned int followed by padding: the word keeps the padding zero.
    let num = w.read(table + l.num)? & !0xffff_ffff;
    w.write(table + l.num, num | (d.count & 0xffff_ffff))?;
    w.write(table + l.ddebugs, d.addr)?;
    let (head, link) = (l.head, table + l.link);
    let tail = w.read(head + 8)?;
    w.write(link, head)?;
    w.write(link + 8, tail)?;
    w.write(tail, link)?;
    w.write(head + 8, link)
}

/// Takes the table at `table` off the list (`list_del_init`); a table not on it is left
/// alone. With every vCPU paused and `ddebug_lock` free.
pub fn unlink<W: Words>(w: &W, l: &DdebugLayout, table: u64) -> Result<(), W::Error> {
    if !is_linked(w, l, table)? {
        return Ok(());
    }
    let link = table + l.link;
    let (next, prev) = (w.read(link)?, w.read(link + 8)?);
    w.write(prev, next)?;
    w.write(next + 8, prev)?;
    w.write(link, link)?;
    w.write(link + 8, link)
}

#[cfg(test)]
mod tests {
    use super::super::rbtree::testing::Mem;
    use super::*;

    const HEAD: u64 = 0x1000;
    const OWNER: u64 = 0x2000;

    fn layout() -> DdebugLayout {
        DdebugLayout {
            entry: 56,
            table: 56,
            link: 0,
            maps: 16,
            mod_name: 32,
            num: 40,
            ddebugs: 48,
            head: HEAD,
            lock_owner: OWNER,
        }
    }

    /// Memory with an empty kernel list and the lock free (tables read as zeroed).
    fn guest() -> Mem {
        let m = Mem::default();
        m.write(HEAD, HEAD).unwrap();
        m.write(HEAD + 8, HEAD).unwrap();
        m
    }

    /// The list from the head, checking every back pointer.
    fn walk(m: &Mem) -> Vec<u64> {
        let mut out = vec![];
        let mut at = m.read(HEAD).unwrap();
        let mut prev = HEAD;
        while at != HEAD {
            assert_eq!(m.read(at + 8).unwrap(), prev, "prev of {at:#x}");
            out.push(at);
            prev = at;
            at = m.read(at).unwrap();
            assert!(out.len() < 10, "a loop");
        }
        assert_eq!(m.read(HEAD + 8).unwrap(), prev, "the head's prev is the tail");
        out
    }

    #[test]
    fn tables_go_on_at_the_tail_and_come_off_wherever_they_are() {
        let l = layout();
        let (kernel, a, b) = (0x3000, 0x4000, 0x5000);
        let m = guest();
        let d = |addr| Descriptors {
            addr,
            count: 3,
            name: 0x9000,
        };
        link(&m, &l, kernel, &d(0x7000)).unwrap();
        assert!(!is_linked(&m, &l, a).unwrap(), "a zeroed table is not on the list");
        link(&m, &l, a, &d(0x8000)).unwrap();
        link(&m, &l, b, &d(0x8800)).unwrap();
        assert_eq!(walk(&m), [kernel, a, b]);
        assert_eq!(m.read(a + 32).unwrap(), 0x9000);
        assert_eq!(m.read(a + 40).unwrap(), 3);
        assert_eq!(m.read(a + 48).unwrap(), 0x8000);
        assert_eq!((m.read(a + 16).unwrap(), m.read(a + 24).unwrap()), (a + 16, a + 16));

        unlink(&m, &l, a).unwrap();
        assert_eq!(walk(&m), [kernel, b]);
        assert!(!is_linked(&m, &l, a).unwrap());
        unlink(&m, &l, a).unwrap(); // again: nothing to do
        assert_eq!(walk(&m), [kernel, b]);
        unlink(&m, &l, b).unwrap();
        assert_eq!(walk(&m), [kernel]);
    }

    #[test]
    fn the_lock_owner_decides() {
        let (l, m) = (layout(), guest());
        assert!(!lock_held(&m, &l).unwrap());
        m.write(OWNER, 0xffff_8880_0123_4000).unwrap();
        assert!(lock_held(&m, &l).unwrap());
    }
}
