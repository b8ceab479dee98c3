//! Static keys in patch code: the module's `__jump_table` linked, set to each key's state
//! when the patch goes live, and kept in step with the guest's later key flips by the guest
//! kernel itself, as it does for a module.
//!
//! A static branch (`static_branch_unlikely(&key)`, `trace_foo_enabled()`, ...) compiles to
//! a 2- or 5-byte site that is either a NOP or a `jmp` to the branch's other path, and a
//! `struct jump_entry { s32 code; s32 target; long key; }` in `__jump_table`, every field
//! relative to its own address; the key field's low bits are flags: bit 0 the branch
//! direction, bit 1 (`jump_entry_is_init`) set by the kernel for init code. With
//! `CONFIG_HAVE_JUMP_LABEL_HACK` (x86 with objtool) the compiler emits `jmp` for every site
//! (short or near, as the assembler chose) with bit 1 set, and objtool turns those into a
//! NOP of the same length; `arch_static_branch_jump` sites stay `jmp`. The kernel decides a
//! site's instruction as `jump_label_type = static_key_enabled(key) ^ branch` (`JUMP` or
//! `NOP`), and its `__jump_label_patch()` BUG()s unless the site holds exactly the other
//! choice: `x86_nops[len]` or the `jmp` of that length to the target.
//!
//! What lucos does, on the host, on the linked image ([`prepare`]): clears bit 1 (patch code
//! is never init code: the kernel's `jump_label_add_module` clears it for core code too,
//! else `jump_label_can_update` would skip the site), sorts the entries by key and code
//! address as `jump_label_sort_entries` does (the kernel walks a key's entries as one run
//! and bsearches them), rewriting the relative fields at their new places, and checks each
//! site. A key defined in the patch itself gets its `entries` pointer (as
//! `static_key_set_entries` does) and its sites are set from its initial state.
//!
//! For a key of the kernel ([`link_keys`], in the stop-the-world that registers the patch
//! as a module and before any jump leads into patch code): only when the guest does not hold
//! `jump_label_mutex` (every change of a key's enabled state, every walk and change of a
//! key's module list, happens under it: `static_key_enable`, the 0<->1 transitions of
//! `static_key_slow_inc/dec`, `jump_label_module_notify`), so no update is half done. Then
//! each site is written for the key's current `enabled`, and a `struct static_key_mod` node
//! `{next, entries, mod = the patch's struct module}` is put at the head of the key's list,
//! as `jump_label_add_module` does; a key not yet "linked" (its `entries` pointing straight
//! at vmlinux's entries) first gets a node for those entries (`mod = NULL`). From then on the
//! guest's `jump_label_update()` walks the node and rewrites the patch's sites with
//! `text_poke_bp()` like a module's: the patch code is module text to
//! `kernel_text_address()` (the registered `struct module`), and `text_poke()` finds its
//! pages with `vmalloc_to_page()`, which handles the 2 MiB mapping of the patch region and
//! whose `struct page`s exist (the region lies in a memory section with RAM, see the VMM).
//!
//! **Why the kernel never frees a node lucos made** (they are in patch-region memory, not
//! slab): `jump_label_del_module()` (a real module unloading) `kfree()`s only (a) the node
//! whose `mod` is the module unloading, never lucos's (their `mod` is a lucos `struct module`
//! or NULL), and (b) the last node of a key's list when only one is left. lucos's nodes are
//! never unlinked: on rollback (in the pause that finds the patch code idle, again only with
//! `jump_label_mutex` free) a patch's node is made inert (`entries = NULL, mod = NULL`, the
//! shape the kernel itself gives the node of a key's defining module that has no entries,
//! skipped by `__jump_label_mod_update`) and kept, in a pool of patch-region pages that are
//! never freed, for the next patch that uses the same key. A key's list therefore always
//! holds its vmlinux node (`mod = NULL`, never removed by the kernel) and lucos's node: at
//! least two, so (b) never applies; and keys of modules are refused (their owner could
//! unload and free the key, which a patch does not pin).

use std::collections::HashMap;

use thiserror::Error;

use crate::guest::{Guest, GuestError, KeyAbi};
use crate::link::Linked;
use crate::module::PatchModule;

/// The section with the entries.
pub const JUMP_SECTION: &str = "__jump_table";
/// `sizeof(struct jump_entry)` with `CONFIG_HAVE_ARCH_JUMP_LABEL_RELATIVE` (x86-64).
pub const ENTRY: usize = 16;
/// `x86_nops[2]`.
pub const NOP2: [u8; 2] = [0x66, 0x90];
/// `x86_nops[5]`.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `JUMP_TYPE_TRUE`: the key's default is true.
const TYPE_TRUE: u64 = 1;
/// `JUMP_TYPE_LINKED`: `key->type` points at a `struct static_key_mod` list.
const TYPE_LINKED: u64 = 2;
/// The flag bits of `key->type` and of an entry's key field.
const TYPE_MASK: u64 = 3;

/// Why a module's static key sites cannot be used.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum JumpError {
    /// `__jump_table` is not a whole number of entries; the value is its size in bytes.
    #[error("{JUMP_SECTION} is {0} bytes: not a multiple of the {ENTRY}-byte entry")]
    BadSize(usize),
    /// An entry's site, target or key lies outside where it must be.
    #[error("jump entry #{index}: {what} at {addr:#x} lies outside {place}")]
    OutOfPlace {
        /// Entry number in the table as built, from 0.
        index: usize,
        /// `table`, `site`, `target` or `key`.
        what: &'static str,
        /// Guest virtual address.
        addr: u64,
        /// Where it must be (`the patch image`, `the patch code`, ...).
        place: &'static str,
    },
    /// A site holds neither a NOP nor a `jmp` to its target, of 2 or 5 bytes.
    #[error("jump entry #{index}: site at {addr:#x} holds {bytes}, not a 2- or 5-byte NOP or jmp to {target:#x}")]
    BadSite {
        /// Entry number, from 0.
        index: usize,
        /// The site.
        addr: u64,
        /// Its first bytes, hex.
        bytes: String,
        /// The entry's target.
        target: u64,
    },
    /// The key is neither in the patch nor in vmlinux (a module's key: it could go away).
    #[error("jump entry #{index}: static key at {key:#x} is neither the patch's nor vmlinux's (keys of modules are not supported)")]
    ForeignKey {
        /// Entry number, from 0.
        index: usize,
        /// The key's address.
        key: u64,
    },
    /// The guest kernel offers no static key support lucos can use.
    #[error("the patch uses static keys, but the guest kernel's static key structures are unknown: {0}")]
    NoSupport(String),
}

/// One static branch site of patch code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Address of the NOP or `jmp`.
    pub code: u64,
    /// Where the `jmp` goes.
    pub target: u64,
    /// 2 or 5.
    pub len: usize,
    /// The entry's branch bit.
    pub branch: bool,
}

impl Site {
    /// What the kernel's `__jump_label_patch()` puts at the site for a key that is
    /// `enabled`: a `jmp` of the site's length when `enabled ^ branch`, else `x86_nops[len]`.
    pub fn bytes(&self, enabled: bool) -> Vec<u8> {
        if enabled == self.branch {
            return if self.len == 2 { NOP2.to_vec() } else { NOP5.to_vec() };
        }
        let rel = self.target.wrapping_sub(self.code + self.len as u64) as i64;
        if self.len == 2 {
            vec![0xeb, rel as i8 as u8]
        } else {
            let mut v = vec![0xe9];
            v.extend_from_slice(&(rel as i32).to_le_bytes());
            v
        }
    }
}

/// A kernel key used by patch code: its run of entries and their sites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUse {
    /// The `struct static_key`.
    pub key: u64,
    /// Address of its first entry in the sorted table.
    pub entries: u64,
    /// Its sites.
    pub sites: Vec<Site>,
}

/// The patch's jump table, linked and sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JumpTable {
    /// Address of the first entry.
    pub addr: u64,
    /// Number of entries.
    pub count: u64,
    /// Kernel keys, each with its sites: set and linked when the patch goes live.
    pub kernel_keys: Vec<KeyUse>,
    /// Keys defined in the patch itself (set up in the image already).
    pub own_keys: usize,
}

fn rd32(b: &[u8], at: usize) -> i32 {
    i32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn rd64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Links the module's `__jump_table` in `linked` (see the module docs): sorted, init bits
/// cleared, sites checked, the patch's own keys set up; `abi` says where kernel keys live
/// and how `struct static_key` is laid out. None when the module has no static branches.
pub fn prepare(m: &PatchModule, linked: &mut Linked, abi: Option<&KeyAbi>) -> Result<Option<JumpTable>, JumpError> {
    let Some(idx) = m
        .sections
        .iter()
        .position(|s| s.name == JUMP_SECTION && !s.data.is_empty())
    else {
        return Ok(None);
    };
    let abi = abi.ok_or_else(|| JumpError::NoSupport("no static key layout from the guest".into()))?;
    let len = m.sections[idx].data.len();
    if !len.is_multiple_of(ENTRY) {
        return Err(JumpError::BadSize(len));
    }
    let base = linked.base;
    let img_len = linked.image.len() as u64;
    let off = linked.layout.offsets.get(idx).copied().unwrap_or(u64::MAX);
    if off.checked_add(len as u64).is_none_or(|e| e > img_len) {
        return Err(JumpError::OutOfPlace {
            index: 0,
            what: "table",
            addr: base.wrapping_add(off),
            place: "the patch image",
        });
    }
    let (off, addr) = (off as usize, base + off);
    let n = len / ENTRY;
    // (key, code, target, branch) of each entry.
    let mut rows: Vec<(u64, u64, u64, bool)> = (0..n)
        .map(|i| {
            let (o, a) = (off + i * ENTRY, addr + (i * ENTRY) as u64);
            let code = a.wrapping_add(rd32(&linked.image, o) as i64 as u64);
            let target = (a + 4).wrapping_add(rd32(&linked.image, o + 4) as i64 as u64);
            let raw = rd64(&linked.image, o + 8);
            let key = (a + 8).wrapping_add(raw & !TYPE_MASK);
            (key, code, target, raw & 1 != 0)
        })
        .collect();
    rows.sort_by_key(|r| (r.0, r.1));
    let in_image = |a: u64, len: u64| a >= base && a.checked_add(len).is_some_and(|e| e <= base + img_len);
    let text_end = base
        + m.sections
            .iter()
            .zip(&linked.layout.offsets)
            .filter(|(s, _)| !s.exec)
            .map(|(_, &o)| o)
            .min()
            .unwrap_or(img_len);
    let mut table = JumpTable {
        addr,
        count: n as u64,
        ..JumpTable::default()
    };
    let mut own: Vec<(u64, u64)> = Vec::new();
    for (i, &(key, code, target, branch)) in rows.iter().enumerate() {
        let (o, a) = (off + i * ENTRY, addr + (i * ENTRY) as u64);
        linked.image[o..o + 4].copy_from_slice(&(code.wrapping_sub(a) as i32).to_le_bytes());
        linked.image[o + 4..o + 8].copy_from_slice(&(target.wrapping_sub(a + 4) as i32).to_le_bytes());
        let kf = key.wrapping_sub(a + 8) | u64::from(branch);
        linked.image[o + 8..o + 16].copy_from_slice(&kf.to_le_bytes());
        let out = |what, addr, place| JumpError::OutOfPlace {
            index: i,
            what,
            addr,
            place,
        };
        if !(base..text_end).contains(&code) {
            return Err(out("site", code, "the patch code"));
        }
        if !(base..text_end).contains(&target) {
            return Err(out("target", target, "the patch code"));
        }
        let c = (code - base) as usize;
        let b = &linked.image[c..(c + 5).min((text_end - base) as usize)];
        let site_len = site_length(b, code, target).ok_or_else(|| JumpError::BadSite {
            index: i,
            addr: code,
            bytes: b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "),
            target,
        })?;
        let site = Site {
            code,
            target,
            len: site_len,
            branch,
        };
        if in_image(key, abi.key_size) {
            let k = (key - base) as usize;
            let enabled = rd32(&linked.image, k + abi.key_enabled as usize) > 0;
            let bytes = site.bytes(enabled);
            linked.image[c..c + site_len].copy_from_slice(&bytes);
            if own.last().is_none_or(|&(kk, _)| kk != key) {
                own.push((key, a));
            }
        } else if key >= abi.kernel.0 && key < abi.kernel.1 {
            match table.kernel_keys.last_mut() {
                Some(u) if u.key == key => u.sites.push(site),
                _ => table.kernel_keys.push(KeyUse {
                    key,
                    entries: a,
                    sites: vec![site],
                }),
            }
        } else {
            return Err(JumpError::ForeignKey { index: i, key });
        }
    }
    // static_key_set_entries() for the patch's own keys.
    for &(key, first) in &own {
        let t = (key - base) as usize + abi.key_type as usize;
        let ty = rd64(&linked.image, t) & TYPE_MASK;
        linked.image[t..t + 8].copy_from_slice(&(first | ty).to_le_bytes());
    }
    table.own_keys = own.len();
    Ok(Some(table))
}

/// Length of the static branch site at `code` holding `b` (at least its first bytes): 2
/// or 5 for a NOP of that length or a `jmp` to `target`; None for anything else.
fn site_length(b: &[u8], code: u64, target: u64) -> Option<usize> {
    let rel = target.wrapping_sub(code) as i64;
    match b {
        [0x66, 0x90, ..] if (-128..=127).contains(&(rel - 2)) => Some(2),
        [0xeb, d, ..] if *d as i8 as i64 == rel - 2 => Some(2),
        [0x0f, 0x1f, 0x44, 0x00, 0x00] => Some(5),
        [0xe9, d0, d1, d2, d3] if i32::from_le_bytes([*d0, *d1, *d2, *d3]) as i64 == rel - 5 => Some(5),
        _ => None,
    }
}

/// Whether the guest holds `jump_label_mutex` right now (call with the world stopped): a
/// mutex's `owner` word is the owning task with flag bits, or flag bits alone when free.
pub fn mutex_held(g: &dyn Guest, abi: &KeyAbi) -> Result<bool, GuestError> {
    let mut w = [0u8; 8];
    g.read(abi.mutex_owner, &mut w)?;
    Ok(u64::from_le_bytes(w) & !7 != 0)
}

/// Where a patch's node for one kernel key goes: an inert node of that key to reuse, or
/// fresh pool slots (`[vmlinux node, patch node]`; the first is used only when the key is
/// not linked yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeChoice {
    /// The key.
    pub key: u64,
    /// An inert node already in the key's list.
    pub reuse: Option<u64>,
    /// Two fresh slots.
    pub fresh: [u64; 2],
}

/// What [`link_keys`] did for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLink {
    /// The key.
    pub key: u64,
    /// The patch's node (now in the key's list).
    pub node: u64,
    /// Fresh slots put into the key's list (the vmlinux node, the patch node).
    pub consumed: Vec<u64>,
    /// The key was enabled.
    pub enabled: bool,
}

fn put(g: &dyn Guest, at: u64, v: u64) -> Result<(), GuestError> {
    g.write(at, &v.to_le_bytes())
}

fn get(g: &dyn Guest, at: u64) -> Result<u64, GuestError> {
    let mut w = [0u8; 8];
    g.read(at, &mut w)?;
    Ok(u64::from_le_bytes(w))
}

/// Sets every kernel key's sites to its state and gives the patch's `struct module` at
/// `module` a node in each key's list (see the module docs). Call with the world stopped and
/// `jump_label_mutex` free ([`mutex_held`]), after the module is registered, before the code
/// is reachable. Each key done is pushed to `done` as it is linked, so that a caller can
/// undo ([`unlink_keys`]) what a failure left behind.
pub fn link_keys(
    g: &dyn Guest,
    abi: &KeyAbi,
    table: &JumpTable,
    module: u64,
    choices: &[NodeChoice],
    done: &mut Vec<KeyLink>,
) -> Result<(), GuestError> {
    for (u, c) in table.kernel_keys.iter().zip(choices) {
        debug_assert_eq!(u.key, c.key);
        let mut e = [0u8; 4];
        g.read(u.key + abi.key_enabled, &mut e)?;
        let enabled = i32::from_le_bytes(e);
        if enabled < 0 {
            // Only while an enable is under way, under the mutex.
            return Err(GuestError::Refused(format!(
                "static key {:#x} is being enabled (enabled = -1) with jump_label_mutex free",
                u.key
            )));
        }
        for s in &u.sites {
            g.write(s.code, &s.bytes(enabled > 0))?;
        }
        let mut link = KeyLink {
            key: u.key,
            node: 0,
            consumed: vec![],
            enabled: enabled > 0,
        };
        if let Some(n) = c.reuse {
            put(g, n + abi.node_entries, u.entries)?;
            put(g, n + abi.node_mod, module)?;
            link.node = n;
        } else {
            let ty = get(g, u.key + abi.key_type)?;
            let head = if ty & TYPE_LINKED == 0 {
                // jump_label_add_module's jlm2: the vmlinux entries get a node first.
                let v = c.fresh[0];
                put(g, v + abi.node_next, 0)?;
                put(g, v + abi.node_entries, ty & !TYPE_MASK)?;
                put(g, v + abi.node_mod, 0)?;
                link.consumed.push(v);
                v
            } else {
                ty & !TYPE_MASK
            };
            let p = c.fresh[1];
            put(g, p + abi.node_next, head)?;
            put(g, p + abi.node_entries, u.entries)?;
            put(g, p + abi.node_mod, module)?;
            put(g, u.key + abi.key_type, p | TYPE_LINKED | (ty & TYPE_TRUE))?;
            link.consumed.push(p);
            link.node = p;
        }
        done.push(link);
    }
    Ok(())
}

/// Makes patch nodes inert (`entries = NULL, mod = NULL`), left in their keys' lists for
/// good. Call with the world stopped and `jump_label_mutex` free.
pub fn unlink_keys(g: &dyn Guest, abi: &KeyAbi, nodes: &[u64]) -> Result<(), GuestError> {
    for &n in nodes {
        put(g, n + abi.node_entries, 0)?;
        put(g, n + abi.node_mod, 0)?;
    }
    Ok(())
}

/// The patch-region memory of lucos's `struct static_key_mod` nodes: pages taken from the
/// patch region once and never freed, and which node belongs to which key and patch.
#[derive(Debug, Default)]
pub struct NodePool {
    /// The kernel's layout (known once a patch with kernel keys was applied).
    pub abi: Option<KeyAbi>,
    /// Pool pages.
    pub pages: Vec<u64>,
    /// Slots never used.
    free: Vec<u64>,
    /// The nodes lucos put in each key's list, and what each is.
    by_key: HashMap<u64, Vec<(u64, NodeUse)>>,
}

/// What a node of the pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeUse {
    /// The node for vmlinux's entries of a key that was not linked: never reused.
    Vmlinux,
    /// The node of a live patch.
    Patch(u32),
    /// A patch node made inert: free for the next patch using the key.
    Inert,
}

/// Bytes of pool taken from the patch region at a time.
pub const POOL_PAGE: u64 = 4096;

impl NodePool {
    /// Fresh slots still free.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Adds a page at `addr` cut into slots for nodes of `node_size` bytes.
    pub fn add_page(&mut self, addr: u64, node_size: u64) {
        let stride = node_size.div_ceil(8).max(1) * 8;
        self.pages.push(addr);
        self.free.extend((0..POOL_PAGE / stride).map(|i| addr + i * stride));
    }

    /// Fresh slots needed to place `t`'s nodes (two per key without an inert node).
    pub fn needed(&self, t: &JumpTable) -> usize {
        2 * t.kernel_keys.iter().filter(|u| self.inert(u.key).is_none()).count()
    }

    fn inert(&self, key: u64) -> Option<u64> {
        self.by_key
            .get(&key)?
            .iter()
            .find(|n| n.1 == NodeUse::Inert)
            .map(|n| n.0)
    }

    /// Where each of `t`'s kernel keys gets its node; None if the pool has too few free
    /// slots ([`needed`](Self::needed)).
    pub fn plan(&self, t: &JumpTable) -> Option<Vec<NodeChoice>> {
        let mut fresh = self.free.iter().copied();
        t.kernel_keys
            .iter()
            .map(|u| {
                Some(match self.inert(u.key) {
                    Some(n) => NodeChoice {
                        key: u.key,
                        reuse: Some(n),
                        fresh: [0; 2],
                    },
                    None => NodeChoice {
                        key: u.key,
                        reuse: None,
                        fresh: [fresh.next()?, fresh.next()?],
                    },
                })
            })
            .collect()
    }

    /// Records what [`link_keys`] did: the consumed slots are in the lists for good; the
    /// patch nodes belong to patch `id` (or, if `inert`, to no one: the apply was undone).
    pub fn commit(&mut self, id: u32, links: &[KeyLink], inert: bool) {
        for l in links {
            self.free.retain(|s| !l.consumed.contains(s));
            let nodes = self.by_key.entry(l.key).or_default();
            for &c in &l.consumed {
                if c != l.node {
                    nodes.push((c, NodeUse::Vmlinux));
                }
            }
            let owner = if inert { NodeUse::Inert } else { NodeUse::Patch(id) };
            match nodes.iter_mut().find(|n| n.0 == l.node) {
                Some(n) => n.1 = owner,
                None => nodes.push((l.node, owner)),
            }
        }
    }

    /// The nodes patch `id` uses.
    pub fn nodes_of(&self, id: u32) -> Vec<u64> {
        self.by_key
            .values()
            .flatten()
            .filter(|n| n.1 == NodeUse::Patch(id))
            .map(|n| n.0)
            .collect()
    }

    /// Patch `id`'s nodes are inert now: free for the next patch using their keys.
    pub fn release(&mut self, id: u32) {
        for n in self.by_key.values_mut().flatten() {
            if n.1 == NodeUse::Patch(id) {
                n.1 = NodeUse::Inert;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Layout;
    use crate::module::LoadSection;
    use object::SectionIndex;

    const BASE: u64 = 0xffff_ffff_c000_0000;
    const KEY: u64 = 0xffff_ffff_8280_0000;
    const KEY2: u64 = 0xffff_ffff_8280_0100;
    const TABLE: u64 = 0x200;
    const OWN_KEY: u64 = 0x300;

    fn abi() -> KeyAbi {
        KeyAbi {
            key_size: 16,
            key_enabled: 0,
            key_type: 8,
            node_size: 24,
            node_next: 0,
            node_entries: 8,
            node_mod: 16,
            mutex_owner: 0xffff_ffff_8290_0000,
            kernel: (0xffff_ffff_8100_0000, 0xffff_ffff_8300_0000),
        }
    }

    fn section(name: &str, len: usize, exec: bool) -> LoadSection {
        LoadSection {
            index: SectionIndex(0),
            name: name.into(),
            data: vec![0; len],
            align: 1,
            exec,
            write: !exec,
        }
    }

    /// Text at 0 (0x100 bytes), a table at 0x200 of entries (code, target, key, flags), a
    /// key of the patch at 0x300.
    fn image(text: &[u8], entries: &[(u64, u64, u64, u64)]) -> (PatchModule, Linked) {
        let mut img = vec![0u8; 0x1000];
        img[..text.len()].copy_from_slice(text);
        for (i, &(code, target, key, flags)) in entries.iter().enumerate() {
            let e = TABLE as usize + i * ENTRY;
            let a = BASE + e as u64;
            img[e..e + 4].copy_from_slice(&((BASE + code).wrapping_sub(a) as i32).to_le_bytes());
            img[e + 4..e + 8].copy_from_slice(&((BASE + target).wrapping_sub(a + 4) as i32).to_le_bytes());
            img[e + 8..e + 16].copy_from_slice(&(key.wrapping_sub(a + 8).wrapping_add(flags)).to_le_bytes());
        }
        let m = PatchModule {
            name: "t".into(),
            description: String::new(),
            sections: vec![
                section(".text", 0x100, true),
                section(JUMP_SECTION, entries.len() * ENTRY, false),
                section(".data", 0x10, false),
            ],
            relocs: vec![],
            replaces: vec![],
            data: vec![],
            callbacks: vec![],
            warnings: vec![],
            functions: vec![],
        };
        let linked = Linked {
            base: BASE,
            image: img,
            layout: Layout {
                offsets: vec![0, TABLE, OWN_KEY],
                sizes: vec![0x100, (entries.len() * ENTRY) as u64, 0x10],
                size: 0x1000,
            },
            kernel_refs: vec![],
        };
        (m, linked)
    }

    fn entry(l: &Linked, i: usize) -> (u64, u64, u64, u64) {
        let e = TABLE as usize + i * ENTRY;
        let a = BASE + e as u64;
        let code = a.wrapping_add(rd32(&l.image, e) as i64 as u64) - BASE;
        let target = (a + 4).wrapping_add(rd32(&l.image, e + 4) as i64 as u64) - BASE;
        let raw = rd64(&l.image, e + 8);
        ((a + 8).wrapping_add(raw & !3), code, target, raw & 3)
    }

    #[test]
    fn entries_are_sorted_by_key_then_code_with_init_bits_cleared() {
        // Sites: nop5 at 0x10 (-> 0x40), jmp8 at 0x20 (-> 0x30), nop2 at 0x00 (-> 0x08).
        let mut text = vec![0xc3u8; 0x100];
        text[0x10..0x15].copy_from_slice(&NOP5);
        text[0x20..0x22].copy_from_slice(&[0xeb, 0x0e]);
        text[0x00..0x02].copy_from_slice(&NOP2);
        let (m, mut l) = image(
            &text,
            &[(0x10, 0x40, KEY2, 2), (0x20, 0x30, KEY, 1), (0x00, 0x08, KEY, 2)],
        );
        let t = prepare(&m, &mut l, Some(&abi())).unwrap().unwrap();
        assert_eq!(entry(&l, 0), (KEY, 0x00, 0x08, 0), "init bit cleared");
        assert_eq!(entry(&l, 1), (KEY, 0x20, 0x30, 1), "branch bit kept");
        assert_eq!(entry(&l, 2), (KEY2, 0x10, 0x40, 0));
        assert_eq!(t.count, 3);
        assert_eq!(t.own_keys, 0);
        assert_eq!(t.kernel_keys.len(), 2);
        assert_eq!(t.kernel_keys[0].entries, BASE + TABLE);
        assert_eq!(t.kernel_keys[1].entries, BASE + TABLE + 2 * ENTRY as u64);
        let s = &t.kernel_keys[0].sites;
        assert_eq!((s[0].len, s[1].len, t.kernel_keys[1].sites[0].len), (2, 2, 5));
        // The site bytes the kernel's __jump_label_patch() would write.
        assert_eq!(s[0].bytes(false), NOP2);
        assert_eq!(s[0].bytes(true), [0xeb, 0x06]);
        assert_eq!(s[1].bytes(true), NOP2, "branch=1: NOP when enabled");
        assert_eq!(s[1].bytes(false), [0xeb, 0x0e]);
        let s5 = &t.kernel_keys[1].sites[0];
        assert_eq!(s5.bytes(true), [0xe9, 0x2b, 0, 0, 0]);
        assert_eq!(s5.bytes(false), NOP5);
    }

    #[test]
    fn own_keys_get_their_entries_and_sites_their_state() {
        let mut text = vec![0xc3u8; 0x100];
        text[0x10..0x15].copy_from_slice(&NOP5);
        let (m, mut l) = image(&text, &[(0x10, 0x80, BASE + OWN_KEY, 2)]);
        // DEFINE_STATIC_KEY_TRUE: enabled 1, type JUMP_TYPE_TRUE.
        l.image[OWN_KEY as usize] = 1;
        l.image[OWN_KEY as usize + 8] = 1;
        let t = prepare(&m, &mut l, Some(&abi())).unwrap().unwrap();
        assert_eq!(t.own_keys, 1);
        assert!(t.kernel_keys.is_empty());
        assert_eq!(&l.image[0x10..0x15], &[0xe9, 0x6b, 0, 0, 0], "enabled: jmp");
        assert_eq!(rd64(&l.image, OWN_KEY as usize + 8), (BASE + TABLE) | 1);
    }

    #[test]
    fn refusals() {
        let mut text = vec![0xc3u8; 0x100];
        text[0x10..0x15].copy_from_slice(&NOP5);
        let (m, mut l) = image(&text, &[(0x10, 0x40, 0xffff_ffff_a000_0000, 0)]);
        assert!(matches!(
            prepare(&m, &mut l, Some(&abi())),
            Err(JumpError::ForeignKey { .. })
        ));
        let (m, mut l) = image(&text, &[(0x11, 0x40, KEY, 0)]);
        assert!(matches!(
            prepare(&m, &mut l, Some(&abi())),
            Err(JumpError::BadSite { .. })
        ));
        let (m, mut l) = image(&text, &[(0x10, 0x400, KEY, 0)]);
        assert!(matches!(
            prepare(&m, &mut l, Some(&abi())),
            Err(JumpError::OutOfPlace { what: "target", .. })
        ));
        // A jmp whose destination is not the entry's target.
        text[0x20..0x22].copy_from_slice(&[0xeb, 0x10]);
        let (m, mut l) = image(&text, &[(0x20, 0x30, KEY, 0)]);
        assert!(matches!(
            prepare(&m, &mut l, Some(&abi())),
            Err(JumpError::BadSite { .. })
        ));
        let (m, mut l) = image(&text, &[(0x10, 0x40, KEY, 0)]);
        assert!(matches!(prepare(&m, &mut l, None), Err(JumpError::NoSupport(_))));
        let (mut m, mut l) = image(&text, &[(0x10, 0x40, KEY, 0)]);
        m.sections[1].data.push(0);
        assert!(matches!(prepare(&m, &mut l, Some(&abi())), Err(JumpError::BadSize(17))));
    }

    #[test]
    fn the_pool_reuses_inert_nodes_per_key() {
        let mut p = NodePool::default();
        let t = JumpTable {
            kernel_keys: vec![KeyUse {
                key: KEY,
                entries: 0,
                sites: vec![],
            }],
            ..JumpTable::default()
        };
        assert_eq!(p.needed(&t), 2);
        assert_eq!(p.plan(&t), None);
        p.add_page(0x1000, 24);
        assert_eq!(p.free_slots(), 170);
        let c = p.plan(&t).unwrap();
        assert_eq!(c[0].fresh, [0x1000, 0x1018]);
        // Not linked: both slots used.
        let link = KeyLink {
            key: KEY,
            node: 0x1018,
            consumed: vec![0x1000, 0x1018],
            enabled: false,
        };
        p.commit(1, &[link], false);
        assert_eq!(p.free_slots(), 168);
        assert_eq!(p.nodes_of(1), vec![0x1018]);
        // Live: a second patch on the key needs fresh slots; inert after rollback: reused.
        assert_eq!(p.needed(&t), 2);
        p.release(1);
        assert!(p.nodes_of(1).is_empty());
        assert_eq!(p.needed(&t), 0);
        assert_eq!(p.plan(&t).unwrap()[0].reuse, Some(0x1018));
    }
}
