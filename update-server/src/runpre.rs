//! Run-pre checks: before redirecting an old function, make sure its first bytes are
//! what lucos expects to overwrite, as whole instructions (decoded with iced-x86).

use iced_x86::{Decoder, DecoderOptions, Formatter, Mnemonic, NasmFormatter};

/// The 5-byte NOP ftrace leaves at every traceable function entry (`nopl 0x0(%rax,%rax,1)`).
pub const FTRACE_NOP: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `endbr64`, present at function entries with IBT.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// Length of the `jmp rel32` written at a patch site.
pub const JMP_LEN: usize = 5;

/// Where to put the jump in a function that starts with `bytes`: its offset from the
/// function start (0, or 4 after an endbr64).
pub fn patch_offset(bytes: &[u8]) -> usize {
    if bytes.starts_with(&ENDBR64) {
        ENDBR64.len()
    } else {
        0
    }
}

/// `jmp rel32` from `from` to `to`; None if out of range.
pub fn jmp_rel32(from: u64, to: u64) -> Option<[u8; 5]> {
    let rel = (to as i128) - (from as i128 + JMP_LEN as i128);
    let rel: i32 = rel.try_into().ok()?;
    let r = rel.to_le_bytes();
    Some([0xe9, r[0], r[1], r[2], r[3]])
}

/// Decodes `bytes` at `ip` as text, instruction by instruction, for error messages.
pub fn disasm(bytes: &[u8], ip: u64, max: usize) -> String {
    let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let mut f = NasmFormatter::new();
    let mut out = Vec::new();
    while d.can_decode() && out.len() < max {
        let i = d.decode();
        if i.is_invalid() {
            out.push("(bad)".to_string());
            break;
        }
        let mut s = String::new();
        f.format(&i, &mut s);
        out.push(s);
    }
    out.join("; ")
}

/// Why a patch site may not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SiteError {
    /// The site does not hold the bytes lucos expects to overwrite.
    #[error("run-pre check failed for {func}: expected `{expected}` at {site:#x}, the running kernel has `{actual}`")]
    Mismatch {
        /// The function.
        func: String,
        /// The site's address.
        site: u64,
        /// The expected bytes, decoded.
        expected: String,
        /// The bytes found, decoded.
        actual: String,
    },
    /// The site's bytes do not decode.
    #[error("run-pre check failed for {func}: undecodable bytes at {site:#x}")]
    Undecodable {
        /// The function.
        func: String,
        /// The site's address.
        site: u64,
    },
    /// A jump there would end inside an instruction.
    #[error("run-pre check failed for {func}: a {len}-byte jump at {site:#x} would split an instruction")]
    SplitsInstruction {
        /// The function.
        func: String,
        /// The site's address.
        site: u64,
        /// The jump's length.
        len: usize,
    },
    /// The new function is beyond `jmp rel32` reach of the site.
    #[error("{func} is out of jmp rel32 range of {target:#x}")]
    OutOfReach {
        /// The function.
        func: String,
        /// The new function's address.
        target: u64,
    },
    /// A function with no ftrace NOP is shorter than the jump that would replace it.
    #[error(
        "{func} has no ftrace NOP and only {size} bytes of code at {site:#x}: too short for a {JMP_LEN}-byte jump"
    )]
    TooShort {
        /// The function.
        func: String,
        /// The site's address.
        site: u64,
        /// Bytes from the site to the function's end.
        size: u64,
    },
    /// Code of the function branches into the bytes a jump would overwrite: a thread still
    /// in the old function could land inside the jump.
    #[error("{func} has no ftrace NOP and its instruction at {from:#x} branches to {to:#x}, inside the {len} bytes a jump at {site:#x} would overwrite")]
    BranchIntoSite {
        /// The function.
        func: String,
        /// The site's address.
        site: u64,
        /// Bytes the jump overwrites.
        len: usize,
        /// The branching instruction.
        from: u64,
        /// Its target.
        to: u64,
    },
    /// An instruction the jump would overwrite may be rewritten by the kernel at run time
    /// (a static-key NOP or jump, a static call, an ftrace call), which would clobber the jump.
    #[error("{func} has no ftrace NOP and `{insn}` at {at:#x}, among the bytes a jump would overwrite, may be rewritten by the kernel at run time (static key, static call or ftrace site)")]
    RuntimePatched {
        /// The function.
        func: String,
        /// The instruction's address.
        at: u64,
        /// The instruction, decoded.
        insn: String,
    },
    /// The site changed between the run-pre check and the write (in the pause).
    #[error("{func} changed under us at {site:#x}: `{actual}`")]
    Changed {
        /// The function.
        func: String,
        /// The site's address.
        site: u64,
        /// The bytes found, decoded.
        actual: String,
    },
}

/// Checks that the bytes at the patch site are exactly `expected` and that `expected`
/// covers whole instructions. `func` names the function for the error. `actual` shorter
/// than `expected` does not match.
pub fn check_site(func: &str, site: u64, actual: &[u8], expected: &[u8]) -> Result<(), SiteError> {
    if actual.get(..expected.len()) != Some(expected) {
        return Err(SiteError::Mismatch {
            func: func.into(),
            site,
            expected: disasm(expected, site, 2),
            actual: disasm(actual, site, 3),
        });
    }
    // Instruction boundary: decoding from the site must land exactly on site+len.
    let mut d = Decoder::with_ip(64, actual, site, DecoderOptions::NONE);
    let mut pos = 0usize;
    while pos < expected.len() {
        let i = d.decode();
        if i.is_invalid() {
            return Err(SiteError::Undecodable {
                func: func.into(),
                site,
            });
        }
        pos += i.len();
    }
    if pos != expected.len() {
        return Err(SiteError::SplitsInstruction {
            func: func.into(),
            site,
            len: expected.len(),
        });
    }
    Ok(())
}

/// For a function with no ftrace NOP at its entry (`notrace` code, or code the compiler
/// emitted without `__fentry__`): how many bytes from `site` the jump overwrites, as whole
/// instructions (at least [`JMP_LEN`]). `code` holds the function's bytes from `site` to
/// its end, at `site`. Refused when the function is shorter than that, when the bytes do not
/// decode, and when any instruction of the function branches into the overwritten bytes
/// past their first (a thread still running the old function could then land inside the
/// jump; a branch to `site` itself takes the jump, which is what it should do). The
/// remaining hazard, a thread whose saved RIP or return address lies inside those bytes, is
/// checked on every stack in the pause that writes the jump.
pub fn overwrite_len(func: &str, site: u64, code: &[u8]) -> Result<usize, SiteError> {
    let mut d = Decoder::with_ip(64, code, site, DecoderOptions::NONE);
    let mut len = 0usize;
    while len < JMP_LEN {
        if !d.can_decode() {
            return Err(SiteError::TooShort {
                func: func.into(),
                site,
                size: code.len() as u64,
            });
        }
        let i = d.decode();
        if i.is_invalid() {
            return Err(SiteError::Undecodable {
                func: func.into(),
                site,
            });
        }
        if i.mnemonic() == Mnemonic::Nop || i.is_call_near() || i.is_jmp_short_or_near() {
            return Err(SiteError::RuntimePatched {
                func: func.into(),
                at: i.ip(),
                insn: disasm(&code[len..], i.ip(), 1),
            });
        }
        len += i.len();
    }
    let (lo, hi) = (site + 1, site + len as u64);
    let mut d = Decoder::with_ip(64, code, site, DecoderOptions::NONE);
    while d.can_decode() {
        let i = d.decode();
        if i.is_invalid() {
            // Past the code (padding or data the symbol size covers): nothing more to check
            // only if no decoded instruction could reach here; be conservative.
            return Err(SiteError::Undecodable {
                func: func.into(),
                site: i.ip(),
            });
        }
        let t = i.near_branch_target();
        if t != 0 && (lo..hi).contains(&t) {
            return Err(SiteError::BranchIntoSite {
                func: func.into(),
                site,
                len,
                from: i.ip(),
                to: t,
            });
        }
    }
    Ok(len)
}

/// The bytes written at a site that overwrote `len` bytes: the jump, then `int3`s that no
/// thread can reach (nothing branches or returns into them).
pub fn padded_jump(jump: [u8; JMP_LEN], len: usize) -> Vec<u8> {
    let mut v = jump.to_vec();
    v.resize(len.max(JMP_LEN), 0xcc);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_encoding() {
        assert_eq!(jmp_rel32(0x1000, 0x1005), Some([0xe9, 0, 0, 0, 0]));
        assert_eq!(jmp_rel32(0x1000, 0x1000), Some([0xe9, 0xfb, 0xff, 0xff, 0xff]));
        assert_eq!(jmp_rel32(0, 0x1_0000_0000), None);
        let j = jmp_rel32(0xffff_ffff_8100_0000, 0xffff_ffff_8f00_0010).unwrap();
        assert_eq!(disasm(&j, 0xffff_ffff_8100_0000, 1), "jmp 0FFFFFFFF8F000010h");
    }

    #[test]
    fn site_checks() {
        let good = [0x0f, 0x1f, 0x44, 0x00, 0x00, 0x55, 0x48, 0x89, 0xe5];
        assert!(check_site("f", 0x1000, &good, &FTRACE_NOP).is_ok());
        // A call to an ftrace trampoline instead of the nop: refused, with both decoded.
        let traced = [0xe8, 0x10, 0x20, 0x30, 0x40, 0x55];
        let e = check_site("f", 0x1000, &traced, &FTRACE_NOP).unwrap_err().to_string();
        assert!(
            e.contains("expected `nop dword [rax+rax]`") && e.contains("call"),
            "{e}"
        );
        // Bytes match but split an instruction (expected prefix of a longer insn).
        let long = [0x48, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8];
        let e = check_site("f", 0x1000, &long, &long[..5]).unwrap_err().to_string();
        assert!(e.contains("split an instruction"), "{e}");
        assert_eq!(patch_offset(&[0xf3, 0x0f, 0x1e, 0xfa, 0x0f]), 4);
        assert_eq!(patch_offset(&good), 0);
    }

    /// A function without the NOP: whole instructions are overwritten; one too short, or
    /// one whose code branches back into the head, is refused.
    #[test]
    fn overwriting_whole_instructions() {
        // push rbp; mov rbp,rsp; push rbx; mov eax,1; pop rbx; pop rbp; ret
        let f = [0x55, 0x48, 0x89, 0xe5, 0x53, 0xb8, 1, 0, 0, 0, 0x5b, 0x5d, 0xc3];
        assert_eq!(overwrite_len("f", 0x1000, &f), Ok(5));
        assert_eq!(padded_jump([0xe9, 1, 2, 3, 4], 6), vec![0xe9, 1, 2, 3, 4, 0xcc]);
        // xor eax,eax; xor ecx,ecx; mov eax,1; ret: the jump ends inside the third: 9 bytes.
        let f = [0x31, 0xc0, 0x31, 0xc9, 0xb8, 1, 0, 0, 0, 0xc3];
        assert_eq!(overwrite_len("f", 0x1000, &f), Ok(9));
        let e = overwrite_len("f", 0x1000, &[0x31, 0xc0, 0xc3]).unwrap_err();
        assert!(matches!(e, SiteError::TooShort { size: 3, .. }), "{e}");
        // xor eax,eax; inc eax; cmp eax,9; jne 0x1002 (back into the head): refused.
        let looped = [0x31, 0xc0, 0xff, 0xc0, 0x83, 0xf8, 0x09, 0x75, 0xf9, 0xc3];
        let e = overwrite_len("f", 0x1000, &looped).unwrap_err();
        assert!(
            matches!(
                e,
                SiteError::BranchIntoSite {
                    from: 0x1007,
                    to: 0x1002,
                    len: 7,
                    ..
                }
            ),
            "{e}"
        );
        // A branch to the entry itself takes the jump: fine.
        let to_entry = [0x31, 0xc0, 0xff, 0xc0, 0x83, 0xf8, 0x09, 0x75, 0xf7, 0xc3];
        assert_eq!(overwrite_len("f", 0x1000, &to_entry), Ok(7));
        // A NOP or jump in the head may be a static-key site the kernel rewrites later.
        let keyed = [0x55, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x5d, 0xc3];
        let e = overwrite_len("f", 0x1000, &keyed).unwrap_err();
        assert!(matches!(e, SiteError::RuntimePatched { at: 0x1001, .. }), "{e}");
        let tail = [0xe9, 0, 0, 0, 0];
        assert!(matches!(
            overwrite_len("f", 0x1000, &tail),
            Err(SiteError::RuntimePatched { .. })
        ));
    }

    /// Fewer bytes than expected panicked on the slice.
    #[test]
    fn short_actual_bytes_do_not_match() {
        assert!(matches!(
            check_site("f", 0x1000, &FTRACE_NOP[..3], &FTRACE_NOP),
            Err(SiteError::Mismatch { .. })
        ));
    }
}
