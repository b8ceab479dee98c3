//! The guest kernel's bookkeeping for patch code, built from the module's own tables: the
//! exception table (`__ex_table`: faults on user memory fixed up to `-EFAULT`), the
//! BUG/WARN table (`__bug_table`), the ORC unwind tables (`.orc_unwind_ip` +
//! `.orc_unwind`: stack traces through patch code) and a symbol table of its functions
//! (names in stack traces and `%pS`).
//!
//! The linker relocates the tables like any other section; this module then sorts what
//! the kernel binary-searches (the exception and ORC tables, rewriting their
//! self-relative entries at their new places, as the module loader does), builds the
//! symbol table, and lays out the metadata block appended to the image: room for the
//! kernel's `struct module` (which the VMM fills in and links into the kernel's module
//! address tree, see the VMM's `introspect::modules`), the `Elf64_Sym` array, the string
//! table and the symbol type chars.

use thiserror::Error;

use crate::guest::{CodeInfo, TableSizes};
use crate::link::Linked;
use crate::module::PatchModule;

/// Why a module's tables cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TableError {
    /// A table's size is not a whole number of entries.
    #[error("{section} is {size} bytes, not a multiple of its {entry}-byte entries")]
    Size {
        /// The section.
        section: &'static str,
        /// Its size.
        size: u64,
        /// The guest kernel's entry size.
        entry: u64,
    },
    /// `.orc_unwind_ip` and `.orc_unwind` disagree on the number of entries.
    #[error(".orc_unwind_ip has {ips} entries but .orc_unwind has {orcs}")]
    OrcMismatch {
        /// Entries of `.orc_unwind_ip`.
        ips: u64,
        /// Entries of `.orc_unwind`.
        orcs: u64,
    },
    /// The module has exception or BUG tables but the guest kernel cannot register them.
    #[error("the patch has {what}, but the guest kernel offers no module support to register it ({why})")]
    NoModuleSupport {
        /// The tables.
        what: String,
        /// Why the guest cannot take them.
        why: String,
    },
}

const EX_TABLE: &str = "__ex_table";
const BUG_TABLE: &str = "__bug_table";
/// `pr_debug()`/`dev_dbg()` descriptors (`struct _ddebug`).
const DYNDBG: &str = "__dyndbg";
const ORC_IP: &str = ".orc_unwind_ip";
const ORC: &str = ".orc_unwind";
/// `sizeof(Elf64_Sym)`.
const SYM: u64 = 24;

/// Where the metadata block goes, relative to the image start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Offset of the block (= of the `struct module`).
    pub meta_off: u64,
    /// Offset of the `Elf64_Sym` array.
    pub symtab_off: u64,
    /// Offset of the string table.
    pub strtab_off: u64,
    /// Offset of the type chars.
    pub typetab_off: u64,
    /// Bytes of image plus block.
    pub total: u64,
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn section(m: &PatchModule, name: &str) -> Option<usize> {
    m.sections.iter().position(|s| s.name == name && !s.data.is_empty())
}

/// Which registration-dependent tables the module has, for messages (empty: none).
pub fn needs_registration(m: &PatchModule) -> Vec<&'static str> {
    [
        (EX_TABLE, "exception tables (__ex_table)"),
        (BUG_TABLE, "BUG/WARN tables (__bug_table)"),
        (crate::jumplabel::JUMP_SECTION, "static keys (__jump_table)"),
    ]
    .into_iter()
    .filter(|(s, _)| section(m, s).is_some())
    .map(|(_, what)| what)
    .collect()
}

/// The metadata block's layout after an image of `image_size` bytes.
pub fn plan(m: &PatchModule, image_size: u64, sizes: &TableSizes) -> Plan {
    let meta_off = align(image_size, 64);
    let symtab_off = align(meta_off + sizes.module, 8);
    let nsyms = m.functions.len() as u64 + 1;
    let strtab_off = symtab_off + nsyms * SYM;
    let strings: u64 = 1 + m.functions.iter().map(|f| f.name.len() as u64 + 1).sum::<u64>();
    let typetab_off = strtab_off + strings;
    Plan {
        meta_off,
        symtab_off,
        strtab_off,
        typetab_off,
        total: align(typetab_off + nsyms, 8),
    }
}

fn rd32(b: &[u8], at: usize) -> i32 {
    i32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn wr32(b: &mut [u8], at: usize, v: i32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Sorts `n` entries of `entry` bytes at `off` of `img` (guest address `addr`) by the
/// absolute target of their first self-relative field, keeping every self-relative field
/// (`rel_fields`: byte offsets in the entry) pointing at the same target from its new place.
fn sort_relative(img: &mut [u8], off: usize, addr: u64, entry: usize, n: usize, rel_fields: &[usize]) {
    let abs = |img: &[u8], i: usize, f: usize| {
        let at = off + i * entry + f;
        (addr + (i * entry + f) as u64).wrapping_add(rd32(img, at) as i64 as u64)
    };
    let mut rows: Vec<(Vec<u64>, Vec<u8>)> = (0..n)
        .map(|i| {
            let targets = rel_fields.iter().map(|&f| abs(img, i, f)).collect();
            (targets, img[off + i * entry..off + (i + 1) * entry].to_vec())
        })
        .collect();
    rows.sort_by_key(|(t, _)| t[0]);
    for (i, (targets, bytes)) in rows.into_iter().enumerate() {
        let at = off + i * entry;
        img[at..at + entry].copy_from_slice(&bytes);
        for (&f, t) in rel_fields.iter().zip(targets) {
            let here = addr + (i * entry + f) as u64;
            wr32(img, at + f, t.wrapping_sub(here) as i64 as i32);
        }
    }
}

/// Sorts the linked image's exception and ORC tables in place and builds the metadata
/// block (`plan.total - plan.meta_off` bytes, the `struct module` part zero) and the
/// registration record for the VMM.
pub fn build(
    m: &PatchModule,
    linked: &mut Linked,
    plan: &Plan,
    sizes: &TableSizes,
    name: &str,
) -> Result<(Vec<u8>, CodeInfo), TableError> {
    let base = linked.base;
    let table = |name: &'static str, entry: u64| -> Result<Option<(usize, u64, u64)>, TableError> {
        let Some(i) = section(m, name) else { return Ok(None) };
        let size = m.sections[i].data.len() as u64;
        if entry == 0 || !size.is_multiple_of(entry) {
            return Err(TableError::Size {
                section: name,
                size,
                entry,
            });
        }
        Ok(Some((
            linked.layout.offsets[i] as usize,
            linked.base + linked.layout.offsets[i],
            size / entry,
        )))
    };
    let (ex, bug) = (
        table(EX_TABLE, sizes.extable_entry)?,
        table(BUG_TABLE, sizes.bug_entry)?,
    );
    let (orc_ip, orc) = (table(ORC_IP, 4)?, table(ORC, sizes.orc_entry)?);
    let mut info = CodeInfo {
        name: name.into(),
        base,
        size: plan.total,
        ..CodeInfo::default()
    };
    if let Some((off, addr, n)) = ex {
        // struct exception_table_entry { int insn, fixup, data; }: insn and fixup relative.
        sort_relative(
            &mut linked.image,
            off,
            addr,
            sizes.extable_entry as usize,
            n as usize,
            &[0, 4],
        );
        info.extable = (addr, n);
    }
    if let Some((_, addr, n)) = bug {
        info.bugs = (addr, n); // scanned linearly by find_bug: no order needed
    }
    // Listed with the dynamic debug core by the VMM (a linear list: no order needed).
    if sizes.ddebug_entry > 0 {
        if let Some((_, addr, n)) = table(DYNDBG, sizes.ddebug_entry)? {
            info.dyndbg = (addr, n);
        }
    } else if section(m, DYNDBG).is_some() {
        log::warn!(
            "{name}: the guest kernel has no dynamic debug core lucos can use: the patch's pr_debug() sites stay off"
        );
    }
    match (orc_ip, orc) {
        (Some((ip_off, ip_addr, ips)), Some((orc_off, orc_addr, orcs))) => {
            if ips != orcs {
                return Err(TableError::OrcMismatch { ips, orcs });
            }
            // Sort (ip, orc) pairs by address: stage each pair as one row, then split.
            let oe = sizes.orc_entry as usize;
            let mut rows: Vec<(u64, Vec<u8>)> = (0..ips as usize)
                .map(|i| {
                    let at = ip_off + 4 * i;
                    let ip = (ip_addr + 4 * i as u64).wrapping_add(rd32(&linked.image, at) as i64 as u64);
                    (ip, linked.image[orc_off + oe * i..orc_off + oe * (i + 1)].to_vec())
                })
                .collect();
            rows.sort_by_key(|r| r.0);
            for (i, (ip, orc)) in rows.into_iter().enumerate() {
                let here = ip_addr + 4 * i as u64;
                wr32(&mut linked.image, ip_off + 4 * i, ip.wrapping_sub(here) as i64 as i32);
                linked.image[orc_off + oe * i..orc_off + oe * (i + 1)].copy_from_slice(&orc);
            }
            info.orc = (ip_addr, orc_addr, ips);
        }
        (None, None) => {}
        (a, b) => {
            return Err(TableError::OrcMismatch {
                ips: a.map_or(0, |t| t.2),
                orcs: b.map_or(0, |t| t.2),
            })
        }
    }
    // Code comes first in the layout: text ends where the first non-code section starts.
    info.text_size = m
        .sections
        .iter()
        .zip(&linked.layout.offsets)
        .filter(|(s, _)| !s.exec)
        .map(|(_, &o)| o)
        .min()
        .unwrap_or(linked.layout.size);

    let mut meta = vec![0u8; (plan.total - plan.meta_off) as usize];
    let rel = |off: u64| (off - plan.meta_off) as usize;
    let mut strtab = vec![0u8];
    let mut types = vec![0u8];
    // (parse checked every function against its section: all have an address)
    let placed = m
        .functions
        .iter()
        .filter_map(|f| Some((f, linked.addr_of(f.load_idx, f.offset)?)));
    for (i, (f, addr)) in placed.enumerate() {
        let at = rel(plan.symtab_off) + (i + 1) * SYM as usize;
        let st_name = strtab.len() as u32;
        strtab.extend_from_slice(f.name.as_bytes());
        strtab.push(0);
        let bind: u8 = if f.global { 1 } else { 0 };
        meta[at..at + 4].copy_from_slice(&st_name.to_le_bytes());
        meta[at + 4] = (bind << 4) | 2; // STT_FUNC
        meta[at + 6..at + 8].copy_from_slice(&1u16.to_le_bytes()); // any defined section
        meta[at + 8..at + 16].copy_from_slice(&addr.to_le_bytes());
        meta[at + 16..at + 24].copy_from_slice(&f.size.to_le_bytes());
        types.push(if f.global { b'T' } else { b't' });
    }
    let s = rel(plan.strtab_off);
    meta[s..s + strtab.len()].copy_from_slice(&strtab);
    let t = rel(plan.typetab_off);
    meta[t..t + types.len()].copy_from_slice(&types);
    info.kallsyms = (
        base + plan.symtab_off,
        m.functions.len() as u64 + 1,
        base + plan.strtab_off,
        base + plan.typetab_off,
    );
    Ok((meta, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_tables_are_sorted_and_rebased() {
        // Three 12-byte entries at 0x1000 whose insn targets are 0x500, 0x100, 0x300 and
        // fixups target insn + 0x10.
        let addr = 0x1000u64;
        let mut img = vec![0u8; 36];
        for (i, insn) in [0x500u64, 0x100, 0x300].into_iter().enumerate() {
            let e = addr + 12 * i as u64;
            wr32(&mut img, 12 * i, insn.wrapping_sub(e) as i32);
            wr32(&mut img, 12 * i + 4, (insn + 0x10).wrapping_sub(e + 4) as i32);
            wr32(&mut img, 12 * i + 8, i as i32);
        }
        sort_relative(&mut img, 0, addr, 12, 3, &[0, 4]);
        for (i, (insn, data)) in [(0x100u64, 1), (0x300, 2), (0x500, 0)].into_iter().enumerate() {
            let e = addr + 12 * i as u64;
            assert_eq!(e.wrapping_add(rd32(&img, 12 * i) as i64 as u64), insn);
            assert_eq!((e + 4).wrapping_add(rd32(&img, 12 * i + 4) as i64 as u64), insn + 0x10);
            assert_eq!(rd32(&img, 12 * i + 8), data, "the data field moves with its entry");
        }
    }
}
