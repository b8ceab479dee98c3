//! Retpoline and return-thunk sites in patch code, rewritten the way the running kernel
//! rewrote its own (Linux 6.1.192 `arch/x86/kernel/alternative.c`: `apply_retpolines`,
//! `patch_retpoline`, `apply_returns`, `patch_return`, with ITS).
//!
//! A kernel built with `RETPOLINE` and `RETHUNK` compiles every indirect call/jump as
//! `call/jmp __x86_indirect_thunk_<reg>` and every return as `jmp __x86_return_thunk`;
//! objtool lists them in `.retpoline_sites` and `.return_sites`, and at boot (for vmlinux)
//! or load (for a module) the kernel rewrites each for the mitigations it chose:
//!
//! - indirect branches: kept on the retpoline thunk with `X86_FEATURE_RETPOLINE` (and no
//!   `RETPOLINE_LFENCE`); else turned into `call/jmp *%reg` (preceded by `lfence` with
//!   `RETPOLINE_LFENCE`, a `Jcc` inverted around it, `int3` after a `jmp`, NOP padding made
//!   into long NOPs by `optimize_nops`); with `X86_FEATURE_INDIRECT_THUNK_ITS`, a branch
//!   whose last byte would be in the lower half of a cache line goes to an ITS thunk
//!   (`jmp *%reg` in an upper half) instead;
//! - returns: `jmp x86_return_thunk` (the thunk the kernel picked at boot: retbleed's,
//!   SRSO's, ITS's, read from the guest's `x86_return_thunk` variable) with
//!   `X86_FEATURE_RETHUNK` (with the ITS thunk only for returns in a lower half line), else
//!   a plain `ret` padded with `int3`.
//!
//! Unrewritten, patch code would run the compile-time choice: returns through
//! `__x86_return_thunk` even where the kernel chose the SRSO or retbleed thunk, i.e. without
//! the mitigation the rest of the kernel has. lucos does the same rewriting on the linked
//! image, on the host, before a byte is written to the guest (so no vCPU can see a half
//! written site), with the features from the guest's `boot_cpu_data` (see
//! [`crate::alternatives`]) and in the kernel's order (retpolines, returns, then
//! alternatives, as `module_finalize` does).
//!
//! One deliberate difference: for ITS the kernel gives each module indirect branch its
//! own thunk in a page it allocates for the module (for branch prediction accuracy, not
//! for the mitigation); lucos uses the kernel's static thunk of the register
//! (`__x86_indirect_its_thunk_array[reg]`), which is what the kernel itself falls back to
//! when that allocation fails: the same instructions (`jmp *%reg; int3` in the upper half of
//! a line), so the same behaviour and mitigation.
//!
//! Static call sites (`.static_call_sites`) are left calling their trampoline. That is
//! identical in behaviour to the direct call the kernel would patch in: the kernel rewrites
//! the trampoline on every `static_call_update()` before it rewrites any call site
//! (`__static_call_update`: `arch_static_call_transform(NULL, tramp, func, ...)` first), so
//! the trampoline always holds the current target (`jmp func`, or a `ret`/`xor eax,eax;
//! ret` that the return thunk rules above apply to, for NULL and `RET0` targets), and a
//! call through it reaches the same function with the same arguments and return address
//! (the trampoline jumps, it does not call). It costs one direct jump.

use iced_x86::{Decoder, DecoderOptions};
use thiserror::Error;

use crate::link::Linked;
use crate::module::PatchModule;

/// objtool's list of indirect branches through a retpoline thunk.
pub const RETPOLINE_SECTION: &str = ".retpoline_sites";
/// objtool's list of returns through the return thunk.
pub const RETURN_SECTION: &str = ".return_sites";

/// `X86_FEATURE_RETPOLINE` (6.1.192 cpufeatures.h: word 11 bit 12).
pub const FEATURE_RETPOLINE: u32 = 11 * 32 + 12;
/// `X86_FEATURE_RETPOLINE_LFENCE`.
pub const FEATURE_RETPOLINE_LFENCE: u32 = 11 * 32 + 13;
/// `X86_FEATURE_RETHUNK`.
pub const FEATURE_RETHUNK: u32 = 11 * 32 + 14;
/// `X86_FEATURE_INDIRECT_THUNK_ITS`.
pub const FEATURE_INDIRECT_THUNK_ITS: u32 = 21 * 32 + 5;
/// `RETPOLINE_THUNK_SIZE`: stride of `__x86_indirect_thunk_array`.
const RETPOLINE_THUNK_SIZE: u64 = 32;
/// `ITS_THUNK_SIZE`: stride of `__x86_indirect_its_thunk_array`.
const ITS_THUNK_SIZE: u64 = 64;
const INT3: u8 = 0xcc;
const NOP1: u8 = 0x90;
const RET: u8 = 0xc3;
const CALL: u8 = 0xe8;
const JMP32: u8 = 0xe9;
/// `x86_nops[1..=8]` (64-bit).
const NOPS: [&[u8]; 9] = [
    &[],
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];

/// What the kernel chose, as the rewriting needs it: CPU features and thunk addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThunkEnv {
    /// `boot_cpu_data.x86_capability`.
    pub caps: Vec<u32>,
    /// `&__x86_return_thunk`: what the compiler's return sites jump to.
    pub return_thunk: u64,
    /// The value of the kernel's `x86_return_thunk` variable: the thunk it chose.
    pub x86_return_thunk: u64,
    /// `&its_return_thunk` (None without `MITIGATION_ITS`).
    pub its_return_thunk: Option<u64>,
    /// `__x86_indirect_thunk_array`.
    pub indirect_thunks: u64,
    /// `__x86_indirect_its_thunk_array` (None without `MITIGATION_ITS`).
    pub its_thunks: Option<u64>,
}

impl ThunkEnv {
    /// `X86_FEATURE_RETHUNK`: returns go through `x86_return_thunk`.
    pub fn has_rethunk(&self) -> bool {
        self.has(FEATURE_RETHUNK)
    }

    fn has(&self, feature: u32) -> bool {
        self.caps
            .get(feature as usize / 32)
            .is_some_and(|w| w & (1 << (feature % 32)) != 0)
    }
}

/// Why the thunk sites of a patch module cannot be rewritten.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ThunkError {
    /// A site list is not a whole number of 4-byte entries, or lies outside the image.
    #[error("{section}: malformed site list ({size} bytes)")]
    BadTable {
        /// The section.
        section: &'static str,
        /// Its size.
        size: usize,
    },
    /// A site lies outside the patch code, or holds an instruction the kernel would not
    /// rewrite there (the kernel WARNs and leaves it: lucos refuses the patch instead).
    #[error("{section} site #{index} at {addr:#x}: {what}")]
    BadSite {
        /// The section.
        section: &'static str,
        /// Entry number, from 0.
        index: usize,
        /// The site's address.
        addr: u64,
        /// What is wrong.
        what: String,
    },
    /// The module has such sites but the guest kernel lacks a symbol lucos needs.
    #[error("the patch has {section} but the guest kernel has no '{symbol}'")]
    NoSymbol {
        /// The section.
        section: &'static str,
        /// The symbol.
        symbol: &'static str,
    },
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThunkStats {
    /// Retpoline sites.
    pub retpolines: usize,
    /// Of them, rewritten (the others stay on the retpoline thunk, as in the kernel).
    pub retpolines_rewritten: usize,
    /// Return sites (all rewritten: `ret` or `jmp x86_return_thunk`).
    pub returns: usize,
}

/// Whether `m` has sites of `section`.
pub fn has_sites(m: &PatchModule, section: &str) -> bool {
    m.sections.iter().any(|s| s.name == section && !s.data.is_empty())
}

/// The site addresses listed in `section` of the linked image.
fn sites(m: &PatchModule, linked: &Linked, section: &'static str) -> Result<Vec<u64>, ThunkError> {
    let Some(idx) = m.sections.iter().position(|s| s.name == section) else {
        return Ok(vec![]);
    };
    let size = m.sections[idx].data.len();
    let bad = ThunkError::BadTable { section, size };
    let off = *linked.layout.offsets.get(idx).ok_or(bad.clone())? as usize;
    if !size.is_multiple_of(4) || off.checked_add(size).is_none_or(|e| e > linked.image.len()) {
        return Err(bad);
    }
    Ok((0..size / 4)
        .map(|i| {
            let at = off + 4 * i;
            let rel = i32::from_le_bytes(linked.image[at..at + 4].try_into().expect("4 bytes"));
            (linked.base + at as u64).wrapping_add(rel as i64 as u64)
        })
        .collect())
}

/// Rewrites `m`'s retpoline and return sites in `linked` for the kernel's choices `env`.
/// Call before [`crate::alternatives::apply`] (the kernel's order).
pub fn apply(m: &PatchModule, linked: &mut Linked, env: &ThunkEnv) -> Result<ThunkStats, ThunkError> {
    let text_end = linked.base
        + m.sections
            .iter()
            .zip(&linked.layout.offsets)
            .filter(|(s, _)| !s.exec)
            .map(|(_, &o)| o)
            .min()
            .unwrap_or(linked.image.len() as u64);
    let mut stats = ThunkStats::default();
    for (section, list) in [
        (RETPOLINE_SECTION, sites(m, linked, RETPOLINE_SECTION)?),
        (RETURN_SECTION, sites(m, linked, RETURN_SECTION)?),
    ] {
        for (index, addr) in list.into_iter().enumerate() {
            let bad = |what: String| ThunkError::BadSite {
                section,
                index,
                addr,
                what,
            };
            if addr < linked.base || addr >= text_end {
                return Err(bad("not in the patch code".into()));
            }
            let off = (addr - linked.base) as usize;
            let end = (off + 16).min((text_end - linked.base) as usize);
            let code = &linked.image[off..end];
            let insn = Insn::decode(code, addr).ok_or_else(|| bad(format!("undecodable {code:02x?}")))?;
            let new = if section == RETPOLINE_SECTION {
                stats.retpolines += 1;
                patch_retpoline(addr, &insn, env).map_err(bad)?
            } else {
                stats.returns += 1;
                patch_return(addr, &insn, code, env).map_err(bad)?
            };
            if let Some(bytes) = new {
                if section == RETPOLINE_SECTION {
                    stats.retpolines_rewritten += 1;
                }
                linked.image[off..off + bytes.len()].copy_from_slice(&bytes);
            }
        }
    }
    Ok(stats)
}

/// The parts of a decoded instruction the kernel's rewriting looks at.
#[derive(Debug)]
struct Insn {
    len: usize,
    /// First opcode byte (after prefixes) and the next byte.
    op: [u8; 2],
    /// Branch destination of a rel32 call/jmp/jcc.
    dest: Option<u64>,
}

impl Insn {
    fn decode(code: &[u8], addr: u64) -> Option<Insn> {
        let i = Decoder::with_ip(64, code, addr, DecoderOptions::NONE).decode();
        if i.is_invalid() {
            return None;
        }
        let len = i.len();
        // Legacy prefixes the compiler may put on a branch (the CS prefix of
        // -mindirect-branch-cs-prefix).
        let p = code[..len]
            .iter()
            .take_while(|b| matches!(b, 0x2e | 0x3e | 0x26 | 0x36 | 0x64 | 0x65 | 0xf2 | 0xf3 | 0x66))
            .count();
        let op = [code[p], code.get(p + 1).copied().unwrap_or(0)];
        let rel32 = op[0] == CALL || op[0] == JMP32 || is_jcc32(op);
        let dest = (rel32 && len == p + 5 + usize::from(is_jcc32(op))).then(|| i.near_branch_target());
        Some(Insn { len, op, dest })
    }
}

fn is_jcc32(op: [u8; 2]) -> bool {
    op[0] == 0x0f && op[1] & 0xf0 == 0x80
}

/// `rel32` instruction `op` at `addr` to `dest` (`__text_gen_insn`).
fn gen_rel32(op: u8, addr: u64, dest: u64) -> [u8; 5] {
    let mut b = [op, 0, 0, 0, 0];
    b[1..].copy_from_slice(&(dest.wrapping_sub(addr + 5) as i32).to_le_bytes());
    b
}

/// `patch_retpoline()`: the bytes for the site, or None where the kernel leaves it.
fn patch_retpoline(addr: u64, insn: &Insn, env: &ThunkEnv) -> Result<Option<Vec<u8>>, String> {
    let dest = insn.dest.ok_or("not a rel32 call, jmp or jcc")?;
    let off = dest.wrapping_sub(env.indirect_thunks);
    let reg = off / RETPOLINE_THUNK_SIZE;
    if !off.is_multiple_of(RETPOLINE_THUNK_SIZE) || reg > 15 {
        return Err(format!("branch to {dest:#x}, not to a retpoline thunk"));
    }
    if reg == 4 {
        return Err("indirect branch through %rsp".into());
    }
    if env.has(FEATURE_RETPOLINE) && !env.has(FEATURE_RETPOLINE_LFENCE) {
        return Ok(None);
    }
    let mut op = insn.op[0];
    let mut b = Vec::with_capacity(16);
    if is_jcc32(insn.op) {
        // Jncc.d8 over the indirect jmp.
        b.push(0x70 + ((insn.op[1] & 0xf) ^ 1));
        b.push((insn.len - 2) as u8);
        op = JMP32;
    }
    if env.has(FEATURE_RETPOLINE_LFENCE) {
        b.extend_from_slice(&[0x0f, 0xae, 0xe8]);
    }
    if let Some(its) = env.its_thunks {
        let last = addr + b.len() as u64 + 1 + reg / 8;
        if env.has(FEATURE_INDIRECT_THUNK_ITS) && last & 0x20 == 0 {
            return emit_its_trampoline(addr, insn, its + reg * ITS_THUNK_SIZE).map(Some);
        }
    }
    if reg >= 8 {
        b.push(0x41);
    }
    b.push(0xff);
    b.push(if op == CALL { 0xd0 } else { 0xe0 } + (reg % 8) as u8);
    if op == JMP32 && b.len() < insn.len {
        b.push(INT3);
    }
    if b.len() > insn.len {
        return Ok(None); // the kernel only writes a replacement of the site's length
    }
    b.resize(insn.len, NOP1);
    optimize_nops(&mut b);
    Ok(Some(b))
}

/// `__emit_trampoline(addr, insn, bytes, thunk, thunk)`.
fn emit_its_trampoline(addr: u64, insn: &Insn, thunk: u64) -> Result<Vec<u8>, String> {
    let mut b = Vec::new();
    let op = insn.op[0];
    if is_jcc32(insn.op) {
        // Clang's `Jcc.d32 __x86_indirect_thunk_reg`: the same Jcc to the ITS thunk.
        b.push(op);
        b.extend_from_slice(&gen_rel32(insn.op[1], addr + 1, thunk));
    } else {
        if insn.len == 6 {
            b.push(0x2e);
        }
        if op != CALL && op != JMP32 {
            return Err(format!("unexpected opcode {op:#x}"));
        }
        let at = addr + b.len() as u64;
        b.extend_from_slice(&gen_rel32(op, at, thunk));
    }
    if b.len() != insn.len {
        return Err(format!(
            "ITS trampoline of {} bytes for a {}-byte site",
            b.len(),
            insn.len
        ));
    }
    Ok(b)
}

/// `optimize_nops()`: runs of single-byte NOPs become the kernel's long NOPs.
fn optimize_nops(b: &mut [u8]) {
    let mut i = 0;
    while i < b.len() {
        if b[i] == NOP1 {
            let n = b[i..].iter().take_while(|&&x| x == NOP1).count();
            if n > 1 {
                let mut at = i;
                let mut left = n;
                while left > 0 {
                    let k = left.min(8);
                    b[at..at + k].copy_from_slice(NOPS[k]);
                    at += k;
                    left -= k;
                }
            }
            i += n;
        } else {
            let d = Decoder::with_ip(64, &b[i..], 0, DecoderOptions::NONE).decode();
            if d.is_invalid() {
                return;
            }
            i += d.len();
        }
    }
}

/// `apply_returns()` for one site: the bytes for it.
fn patch_return(addr: u64, insn: &Insn, code: &[u8], env: &ThunkEnv) -> Result<Option<Vec<u8>>, String> {
    let dest = (insn.op[0] == JMP32).then_some(insn.dest).flatten();
    // __static_call_fixup(): a static call trampoline's return (`jmp; ud1 %esp,%ecx`);
    // patch modules define no static calls, but do as the kernel would.
    if code.get(5..8) == Some(&[0x0f, 0xb9, 0xcc][..]) {
        return Ok(None);
    }
    if dest != Some(env.return_thunk) {
        return Err(format!("not a jmp to __x86_return_thunk ({code:02x?})"));
    }
    // cpu_wants_rethunk_at()
    let rethunk = env.has(FEATURE_RETHUNK) && (Some(env.x86_return_thunk) != env.its_return_thunk || addr & 0x20 == 0);
    let mut b = if rethunk {
        gen_rel32(JMP32, addr, env.x86_return_thunk).to_vec()
    } else {
        vec![RET]
    };
    b.resize(insn.len, INT3);
    Ok(Some(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Layout;
    use crate::module::LoadSection;
    use object::SectionIndex;

    const BASE: u64 = 0xffff_ffff_c000_0000;
    const THUNKS: u64 = 0xffff_ffff_8200_0000;
    const ITS: u64 = 0xffff_ffff_8200_1000;
    const RET_THUNK: u64 = 0xffff_ffff_8200_2000;
    const SRSO: u64 = 0xffff_ffff_8200_3000;
    const ITS_RET: u64 = 0xffff_ffff_8200_4000;

    fn env(features: &[u32], chosen: u64) -> ThunkEnv {
        let mut caps = vec![0u32; 24];
        for &f in features {
            caps[f as usize / 32] |= 1 << (f % 32);
        }
        ThunkEnv {
            caps,
            return_thunk: RET_THUNK,
            x86_return_thunk: chosen,
            its_return_thunk: Some(ITS_RET),
            indirect_thunks: THUNKS,
            its_thunks: Some(ITS),
        }
    }

    /// Text of `text` at 0, a site list at 0x800 naming `sites` in `section`.
    fn image(text: &[u8], section: &str, sites: &[u64]) -> (PatchModule, Linked) {
        let mut img = vec![0u8; 0x1000];
        img[..text.len()].copy_from_slice(text);
        for (i, &s) in sites.iter().enumerate() {
            let at = 0x800 + 4 * i;
            img[at..at + 4].copy_from_slice(&((s as i64 - at as i64) as i32).to_le_bytes());
        }
        let sec = |name: &str, len: usize, exec| LoadSection {
            index: SectionIndex(0),
            name: name.into(),
            data: vec![0; len],
            align: 1,
            exec,
            write: false,
        };
        let m = PatchModule {
            name: "t".into(),
            description: String::new(),
            sections: vec![sec(".text", 0x800, true), sec(section, sites.len() * 4, false)],
            relocs: vec![],
            replaces: vec![],
            data: vec![],
            callbacks: vec![],
            warnings: vec![],
            functions: vec![],
        };
        let l = Linked {
            base: BASE,
            image: img,
            layout: Layout {
                offsets: vec![0, 0x800],
                sizes: vec![0x800, sites.len() as u64 * 4],
                size: 0x1000,
            },
            kernel_refs: vec![],
        };
        (m, l)
    }

    fn call_thunk(at: u64, reg: u64) -> Vec<u8> {
        gen_rel32(CALL, BASE + at, THUNKS + 32 * reg).to_vec()
    }

    #[test]
    fn returns_follow_the_kernels_thunk() {
        let site = gen_rel32(JMP32, BASE + 0x40, RET_THUNK);
        let mut text = vec![0xccu8; 0x100];
        text[0x40..0x45].copy_from_slice(&site);
        // No RETHUNK: ret; int3 x4.
        let (m, mut l) = image(&text, RETURN_SECTION, &[0x40]);
        assert_eq!(apply(&m, &mut l, &env(&[], RET_THUNK)).unwrap().returns, 1);
        assert_eq!(&l.image[0x40..0x45], &[0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
        // RETHUNK with SRSO's thunk: jmp srso_return_thunk.
        let (m, mut l) = image(&text, RETURN_SECTION, &[0x40]);
        apply(&m, &mut l, &env(&[FEATURE_RETHUNK], SRSO)).unwrap();
        assert_eq!(&l.image[0x40..0x45], &gen_rel32(JMP32, BASE + 0x40, SRSO));
        // ITS's return thunk: only in the lower half of a line (0x40: lower; 0x60: upper).
        let mut text2 = text.clone();
        text2[0x60..0x65].copy_from_slice(&gen_rel32(JMP32, BASE + 0x60, RET_THUNK));
        let (m, mut l) = image(&text2, RETURN_SECTION, &[0x40, 0x60]);
        apply(&m, &mut l, &env(&[FEATURE_RETHUNK], ITS_RET)).unwrap();
        assert_eq!(&l.image[0x40..0x45], &gen_rel32(JMP32, BASE + 0x40, ITS_RET));
        assert_eq!(&l.image[0x60..0x65], &[0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
        // A site that is not a return-thunk jump.
        let (m, mut l) = image(&text, RETURN_SECTION, &[0x41]);
        assert!(matches!(
            apply(&m, &mut l, &env(&[], RET_THUNK)),
            Err(ThunkError::BadSite { .. })
        ));
    }

    #[test]
    fn retpolines_as_the_kernel_rewrites_them() {
        let mut text = vec![0xccu8; 0x100];
        text[0x08..0x0d].copy_from_slice(&call_thunk(0x08, 0)); // call rax thunk
        text[0x10..0x15].copy_from_slice(&gen_rel32(JMP32, BASE + 0x10, THUNKS + 32 * 11)); // jmp r11
        let sites = [0x08, 0x10];
        // RETPOLINE: kept.
        let (m, mut l) = image(&text, RETPOLINE_SECTION, &sites);
        let before = l.image.clone();
        let st = apply(&m, &mut l, &env(&[FEATURE_RETPOLINE], RET_THUNK)).unwrap();
        assert_eq!((st.retpolines, st.retpolines_rewritten), (2, 0));
        assert_eq!(l.image, before);
        // spectre_v2=off: call *%rax + nopl (0f 1f 00); jmp *%r11; int3; nop2.
        let (m, mut l) = image(&text, RETPOLINE_SECTION, &sites);
        apply(&m, &mut l, &env(&[], RET_THUNK)).unwrap();
        assert_eq!(&l.image[0x08..0x0d], &[0xff, 0xd0, 0x0f, 0x1f, 0x00]);
        assert_eq!(&l.image[0x10..0x15], &[0x41, 0xff, 0xe3, 0xcc, 0x90]);
        // RETPOLINE_LFENCE: lfence; call *%rax.
        let (m, mut l) = image(&text, RETPOLINE_SECTION, &sites);
        apply(
            &m,
            &mut l,
            &env(&[FEATURE_RETPOLINE, FEATURE_RETPOLINE_LFENCE], RET_THUNK),
        )
        .unwrap();
        assert_eq!(&l.image[0x08..0x0d], &[0x0f, 0xae, 0xe8, 0xff, 0xd0]);
        // ITS: both branches end in the lower half of their line (bit 5 clear): to the
        // register's ITS thunk.
        let (m, mut l) = image(&text, RETPOLINE_SECTION, &sites);
        apply(&m, &mut l, &env(&[FEATURE_INDIRECT_THUNK_ITS], RET_THUNK)).unwrap();
        assert_eq!(&l.image[0x08..0x0d], &gen_rel32(CALL, BASE + 0x08, ITS));
        assert_eq!(&l.image[0x10..0x15], &gen_rel32(JMP32, BASE + 0x10, ITS + 64 * 11));
        // In an upper half (0x1e0 + 1 has bit 5 set) ITS keeps call *%reg.
        let mut t3 = vec![0xccu8; 0x200];
        t3[0x1e0..0x1e5].copy_from_slice(&call_thunk(0x1e0, 2));
        let (m, mut l) = image(&t3, RETPOLINE_SECTION, &[0x1e0]);
        apply(&m, &mut l, &env(&[FEATURE_INDIRECT_THUNK_ITS], RET_THUNK)).unwrap();
        assert_eq!(&l.image[0x1e0..0x1e5], &[0xff, 0xd2, 0x0f, 0x1f, 0x00]);
    }

    #[test]
    fn conditional_retpoline_jumps() {
        // jne.d32 __x86_indirect_thunk_rcx (0f 85 rel32) -> je.d8 +4; jmp *%rcx; int3; nop.
        let mut text = vec![0xccu8; 0x100];
        let mut jcc = vec![0x0f, 0x85];
        jcc.extend_from_slice(&((THUNKS + 32).wrapping_sub(BASE + 0x56) as i32).to_le_bytes());
        text[0x50..0x56].copy_from_slice(&jcc);
        let (m, mut l) = image(&text, RETPOLINE_SECTION, &[0x50]);
        apply(&m, &mut l, &env(&[], RET_THUNK)).unwrap();
        assert_eq!(&l.image[0x50..0x56], &[0x74, 0x04, 0xff, 0xe1, 0xcc, 0x90]);
    }

    #[test]
    fn refusals() {
        let mut text = vec![0xccu8; 0x100];
        text[0x20..0x25].copy_from_slice(&gen_rel32(CALL, BASE + 0x20, THUNKS + 7));
        let (m, mut l) = image(&text, RETPOLINE_SECTION, &[0x20]);
        assert!(apply(&m, &mut l, &env(&[], RET_THUNK)).is_err(), "not a thunk");
        text[0x20..0x25].copy_from_slice(&call_thunk(0x20, 4));
        let (m, mut l) = image(&text, RETPOLINE_SECTION, &[0x20]);
        assert!(apply(&m, &mut l, &env(&[], RET_THUNK)).is_err(), "%rsp");
        let (m, mut l) = image(&text, RETPOLINE_SECTION, &[0x900]);
        assert!(apply(&m, &mut l, &env(&[], RET_THUNK)).is_err(), "outside the code");
    }
}
