//! Alternatives in patch code, patched the way the running kernel patched its own.
//!
//! Kernel code picks instructions by CPU feature at boot: `ALTERNATIVE(old, new, feature)`
//! assembles `old` (padded with NOPs) in place and records `{instr, replacement, feature,
//! instrlen, replacementlen}` in `.altinstructions`, with `new` in `.altinstr_replacement`.
//! The kernel's `apply_alternatives()` copies `new` over `old` when `boot_cpu_has(feature)`
//! (or when it is absent, for `ALT_NOT(feature)`), scanning the records in order so that a
//! later record (`ALTERNATIVE_2`'s second choice) wins. Unpatched, a patch module would keep
//! the build-time choice: SMAP's `stac`/`clac` around user-memory accesses stay NOPs, and
//! the first `copy_to_user` in patch code faults on a CPU with SMAP.
//!
//! lucos does the same on the linked image, on the host, before a byte is written to the
//! guest: the feature bits are the running kernel's own `boot_cpu_data.x86_capability`
//! (read from guest memory, so `clearcpuid=` and the kernel's forced bits count exactly as
//! they did for the kernel), and the replacement is re-encoded for its new address with
//! iced-x86's block encoder (relative calls and jumps keep their targets, as
//! `apply_alternatives()` fixes up `call`/`jmp`). Nothing of this runs in the guest, and the
//! code is patched before it can be reached, so no vCPU can see a half-written site.

use iced_x86::{BlockEncoder, BlockEncoderOptions, Decoder, DecoderOptions, InstructionBlock};
use thiserror::Error;

use crate::link::Linked;
use crate::module::PatchModule;

/// The section with the records.
pub const ALT_SECTION: &str = ".altinstructions";
/// Size of `struct alt_instr` (Linux 6.1: s32, s32, u16, u8, u8; packed).
const RECORD: usize = 12;
/// `ALTINSTR_FLAG_INV`: patch when the feature is *absent*.
const FLAG_INV: u16 = 1 << 15;

/// Why the alternatives of a patch module cannot be applied.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AltError {
    /// `.altinstructions` is not a whole number of records; the value is its size in bytes.
    #[error("{ALT_SECTION} is {0} bytes: not a multiple of the {RECORD}-byte record")]
    BadSize(usize),
    /// A record's site or replacement lies outside the linked patch image.
    #[error("alternative #{index}: {what} at {addr:#x} (+{len}) lies outside the patch image")]
    OutOfImage {
        /// Record number in `.altinstructions`, from 0 (0 for the table).
        index: usize,
        /// `site`, `replacement` or `table` (the records themselves).
        what: &'static str,
        /// Guest virtual address of that range.
        addr: u64,
        /// Its length in bytes.
        len: usize,
    },
    /// A record's feature bit is beyond the capability words of the running kernel.
    #[error("alternative #{index}: feature bit {feature} is beyond the kernel's {words} capability words")]
    BadFeature {
        /// Record number in `.altinstructions`, from 0.
        index: usize,
        /// Feature bit (`word * 32 + bit`), without the invert flag.
        feature: u16,
        /// Number of capability words the kernel has.
        words: usize,
    },
    /// The replacement cannot be decoded or re-encoded for the site's address.
    #[error("alternative #{index} at {addr:#x}: replacement cannot be re-encoded: {why}")]
    Encode {
        /// Record number in `.altinstructions`, from 0.
        index: usize,
        /// Guest virtual address of the site.
        addr: u64,
        /// What the decoder or encoder reported.
        why: String,
    },
    /// The re-encoded replacement is longer than the site.
    #[error("alternative #{index} at {addr:#x}: replacement needs {need} bytes, the site has {have}")]
    TooLong {
        /// Record number in `.altinstructions`, from 0.
        index: usize,
        /// Guest virtual address of the site.
        addr: u64,
        /// Bytes the re-encoded replacement takes.
        need: usize,
        /// Bytes the site has (`instrlen`).
        have: usize,
    },
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AltStats {
    /// Records in the module.
    pub records: usize,
    /// Sites where the replacement went in.
    pub patched: usize,
}

/// Patches every alternative site of `m` in `linked` for a CPU with capability words `caps`.
pub fn apply(m: &PatchModule, linked: &mut Linked, caps: &[u32]) -> Result<AltStats, AltError> {
    let Some(idx) = m.sections.iter().position(|s| s.name == ALT_SECTION) else {
        return Ok(AltStats::default());
    };
    let len = m.sections[idx].data.len();
    if !len.is_multiple_of(RECORD) {
        return Err(AltError::BadSize(len));
    }
    let table_addr = linked
        .layout
        .offsets
        .get(idx)
        .and_then(|&o| linked.base.checked_add(o))
        .unwrap_or(u64::MAX);
    // The table as linked (its relocations applied), which must lie inside the image.
    let table = image_offset(linked, 0, "table", table_addr, len)?;
    let mut stats = AltStats {
        records: len / RECORD,
        patched: 0,
    };
    for index in 0..stats.records {
        let rec_off = table + index * RECORD;
        let mut r = [0u8; RECORD];
        r.copy_from_slice(&linked.image[rec_off..rec_off + RECORD]);
        let rec = linked.base.wrapping_add(rec_off as u64);
        let s32 = |o: usize| i32::from_le_bytes([r[o], r[o + 1], r[o + 2], r[o + 3]]) as i64;
        let instr = rec.wrapping_add_signed(s32(0));
        let repl = rec.wrapping_add(4).wrapping_add_signed(s32(4));
        let cpuid = u16::from_le_bytes([r[8], r[9]]);
        let (instrlen, repllen) = (r[10] as usize, r[11] as usize);
        let feature = cpuid & !FLAG_INV;
        let word = caps.get(feature as usize / 32).ok_or(AltError::BadFeature {
            index,
            feature,
            words: caps.len(),
        })?;
        let have = word & (1 << (feature % 32)) != 0;
        let instr_off = image_offset(linked, index, "site", instr, instrlen)?;
        let repl_off = image_offset(linked, index, "replacement", repl, repllen)?;
        if have == (cpuid & FLAG_INV != 0) {
            continue;
        }
        let code =
            relocate(&linked.image[repl_off..repl_off + repllen], repl, instr).map_err(|why| AltError::Encode {
                index,
                addr: instr,
                why,
            })?;
        if code.len() > instrlen {
            return Err(AltError::TooLong {
                index,
                addr: instr,
                need: code.len(),
                have: instrlen,
            });
        }
        let site = &mut linked.image[instr_off..instr_off + instrlen];
        site[..code.len()].copy_from_slice(&code);
        site[code.len()..].fill(0x90);
        stats.patched += 1;
    }
    Ok(stats)
}

/// Offset in the image of guest range `[addr, addr+len)`, which must lie inside it.
fn image_offset(linked: &Linked, index: usize, what: &'static str, addr: u64, len: usize) -> Result<usize, AltError> {
    let out = AltError::OutOfImage { index, what, addr, len };
    let off = addr.checked_sub(linked.base).ok_or(out.clone())? as usize;
    if off.checked_add(len).is_none_or(|end| end > linked.image.len()) {
        return Err(out);
    }
    Ok(off)
}

/// The instructions `bytes` (at guest address `from`) encoded to run at `to`, with their
/// relative branch targets unchanged.
fn relocate(bytes: &[u8], from: u64, to: u64) -> Result<Vec<u8>, String> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let mut d = Decoder::with_ip(64, bytes, from, DecoderOptions::NONE);
    let mut instrs = Vec::new();
    while d.can_decode() {
        let i = d.decode();
        if i.is_invalid() {
            return Err(format!("undecodable bytes at {:#x}", i.ip()));
        }
        instrs.push(i);
    }
    let block = InstructionBlock::new(&instrs, to);
    BlockEncoder::encode(64, block, BlockEncoderOptions::NONE)
        .map(|r| r.code_buffer)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Layout;
    use crate::module::LoadSection;
    use object::SectionIndex;

    const BASE: u64 = 0xffff_ffff_c000_0000;

    fn section(name: &str, data: Vec<u8>, exec: bool) -> LoadSection {
        LoadSection {
            index: SectionIndex(0),
            name: name.into(),
            data,
            align: 1,
            exec,
            write: false,
        }
    }

    /// A module with text at 0 (`site` then filler), replacements at 0x100, records at 0x200.
    fn image(text: &[u8], repl: &[u8], records: &[(u64, u64, u16, u8, u8)]) -> (PatchModule, Linked) {
        let mut table = Vec::new();
        for (i, &(instr, r, cpuid, ilen, rlen)) in records.iter().enumerate() {
            let rec = 0x200 + (i * RECORD) as i64;
            table.extend_from_slice(&((instr as i64 - rec) as i32).to_le_bytes());
            table.extend_from_slice(&((0x100 + r as i64 - rec - 4) as i32).to_le_bytes());
            table.extend_from_slice(&cpuid.to_le_bytes());
            table.extend_from_slice(&[ilen, rlen]);
        }
        let sections = vec![
            section(".text", text.to_vec(), true),
            section(".altinstr_replacement", repl.to_vec(), true),
            section(ALT_SECTION, table.clone(), false),
        ];
        let mut img = vec![0u8; 0x1000];
        img[..text.len()].copy_from_slice(text);
        img[0x100..0x100 + repl.len()].copy_from_slice(repl);
        img[0x200..0x200 + table.len()].copy_from_slice(&table);
        let m = PatchModule {
            name: "t".into(),
            description: String::new(),
            sections,
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
                offsets: vec![0, 0x100, 0x200],
                sizes: vec![text.len() as u64, repl.len() as u64, table.len() as u64],
                size: 0x1000,
            },
            kernel_refs: vec![],
        };
        (m, linked)
    }

    const STAC: [u8; 3] = [0x0f, 0x01, 0xcb];
    const SMAP: u16 = 9 * 32 + 20;

    #[test]
    fn stac_goes_in_only_with_smap() {
        let mut caps = vec![0u32; 24];
        let (m, mut l) = image(&[0x90, 0x90, 0x90, 0xc3], &STAC, &[(0, 0, SMAP, 3, 3)]);
        let before = l.image.clone();
        assert_eq!(apply(&m, &mut l, &caps).unwrap(), AltStats { records: 1, patched: 0 });
        assert_eq!(l.image, before, "no SMAP: the NOPs stay");
        caps[9] |= 1 << 20;
        assert_eq!(apply(&m, &mut l, &caps).unwrap().patched, 1);
        assert_eq!(&l.image[..4], &[0x0f, 0x01, 0xcb, 0xc3]);
    }

    #[test]
    fn inverted_feature_and_later_record_wins() {
        // ALTERNATIVE_2("call old", "call new1", ALT_NOT(SMAP), "call new2", SMAP).
        let call = |from: u64, to: u64| {
            let mut c = vec![0xe8];
            c.extend_from_slice(&((to as i64 - from as i64 - 5) as i32).to_le_bytes());
            c
        };
        let text = call(BASE, BASE + 0x800);
        let mut repl = call(BASE + 0x100, BASE + 0x900);
        repl.extend(call(BASE + 0x105, BASE + 0xa00));
        let recs = [(0, 0, SMAP | FLAG_INV, 5, 5), (0, 5, SMAP, 5, 5)];
        let (m, mut l) = image(&text, &repl, &recs);
        apply(&m, &mut l, &[0; 24]).unwrap();
        assert_eq!(
            &l.image[..5],
            &call(BASE, BASE + 0x900)[..],
            "no SMAP: first choice, retargeted"
        );
        let (m, mut l) = image(&text, &repl, &recs);
        let mut caps = vec![0u32; 24];
        caps[9] = 1 << 20;
        apply(&m, &mut l, &caps).unwrap();
        assert_eq!(&l.image[..5], &call(BASE, BASE + 0xa00)[..], "SMAP: second choice");
    }

    #[test]
    fn refusals() {
        let (m, mut l) = image(&[0x90; 3], &STAC, &[(0x5000, 0, SMAP, 3, 3)]);
        assert!(matches!(
            apply(&m, &mut l, &[0; 24]),
            Err(AltError::OutOfImage { what: "site", .. })
        ));
        let (m, mut l) = image(&[0x90; 3], &STAC, &[(0, 0, 30 * 32, 3, 3)]);
        assert!(matches!(apply(&m, &mut l, &[0; 24]), Err(AltError::BadFeature { .. })));
        let (m, mut l) = image(&[0x90; 2], &STAC, &[(0, 0, SMAP, 2, 3)]);
        let mut caps = vec![0u32; 24];
        caps[9] = 1 << 20;
        assert!(matches!(apply(&m, &mut l, &caps), Err(AltError::TooLong { .. })));
    }

    /// A `Linked` whose layout puts the table (partly) past the image end panicked on the
    /// record slice; a base near 2^64 wrapped `rec + 4`.
    #[test]
    fn a_table_outside_the_image_is_refused() {
        let (m, mut l) = image(&[0x90; 3], &STAC, &[(0, 0, SMAP, 3, 3)]);
        l.layout.offsets[2] = 0xff8;
        assert!(matches!(
            apply(&m, &mut l, &[0; 24]),
            Err(AltError::OutOfImage { what: "table", .. })
        ));
        l.layout.offsets.truncate(2);
        assert!(matches!(
            apply(&m, &mut l, &[0; 24]),
            Err(AltError::OutOfImage { what: "table", .. })
        ));
        let (m, mut l) = image(&[0x90; 3], &STAC, &[(0, 0, SMAP, 3, 3)]);
        l.base = u64::MAX - 0x100;
        assert!(apply(&m, &mut l, &[0; 24]).is_err());
    }
}
