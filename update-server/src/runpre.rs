//! Run-pre checks: before redirecting an old function, make sure its first bytes are
//! what lucos expects to overwrite, as whole instructions (decoded with iced-x86).

use iced_x86::{Decoder, DecoderOptions, Formatter, NasmFormatter};

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

    /// Fewer bytes than expected panicked on the slice.
    #[test]
    fn short_actual_bytes_do_not_match() {
        assert!(matches!(
            check_site("f", 0x1000, &FTRACE_NOP[..3], &FTRACE_NOP),
            Err(SiteError::Mismatch { .. })
        ));
    }
}
