//! Reports guest exits the VMM cannot handle: reads the instruction at the vCPU's RIP
//! (translating through the guest's page tables with KVM_TRANSLATE) and decodes it with
//! iced-x86, so an emulation failure reads like
//! `emulation failure at RIP 0xffffffff81001234 (native_write_cr4+0x4/0x40): lock cmpxchg16b [rdi]`.

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, NasmFormatter};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::PAGE_SIZE;
use crate::memory::GuestMem;
use crate::symbols::SymbolTable;

/// The longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// An instruction read from guest memory at a vCPU's RIP.
#[derive(Debug, Clone)]
pub struct DecodedInsn {
    /// Guest-virtual address of the instruction (CS base added outside 64-bit mode).
    pub rip: u64,
    /// Its bytes: the instruction's length when decoded, else as many as could be read (up to 15).
    pub bytes: Vec<u8>,
    /// The decoded instruction, or `None` if the bytes were unreadable or invalid.
    pub insn: Option<Instruction>,
    /// NASM-syntax text, or a `<...>` note saying why there is none.
    pub text: String,
}

/// Reads up to `buf.len()` bytes at guest-virtual `gva` as the vCPU sees them; returns how
/// many bytes could be read (stops at the first unmapped page).
pub fn read_guest_virt(vcpu: &VcpuFd, mem: &GuestMem, gva: u64, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let va = gva.wrapping_add(done as u64);
        let Ok(t) = vcpu.translate_gva(va) else { break };
        if t.valid == 0 {
            break;
        }
        let in_page = (PAGE_SIZE - (va & (PAGE_SIZE - 1))) as usize;
        let n = in_page.min(buf.len() - done);
        if mem
            .read_slice(&mut buf[done..done + n], GuestAddress(t.physical_address))
            .is_err()
        {
            break;
        }
        done += n;
    }
    done
}

/// Decodes `bytes` as one instruction at `rip` in a `bitness`-bit code segment.
pub fn decode(bytes: &[u8], rip: u64, bitness: u32) -> (Option<Instruction>, String) {
    if bytes.is_empty() {
        return (None, "<instruction bytes not readable>".into());
    }
    let mut d = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() {
        return (None, format!("<invalid instruction: {}>", hex(bytes)));
    }
    let mut text = String::new();
    NasmFormatter::new().format(&insn, &mut text);
    (Some(insn), text)
}

/// Reads and decodes the instruction at the vCPU's current RIP.
pub fn decode_at_rip(vcpu: &VcpuFd, mem: &GuestMem) -> Option<DecodedInsn> {
    let regs = vcpu.get_regs().ok()?;
    let sregs = vcpu.get_sregs().ok()?;
    let bitness = if sregs.cs.l == 1 {
        64
    } else if sregs.cs.db == 1 {
        32
    } else {
        16
    };
    let rip = if bitness == 64 {
        regs.rip
    } else {
        sregs.cs.base.wrapping_add(regs.rip)
    };
    let mut buf = [0u8; MAX_INSN_LEN];
    let n = read_guest_virt(vcpu, mem, rip, &mut buf);
    let (insn, text) = decode(&buf[..n], rip, bitness);
    let len = insn.map(|i| i.len()).unwrap_or(n);
    Some(DecodedInsn {
        rip,
        bytes: buf[..len].to_vec(),
        insn,
        text,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
}

/// Names of KVM_EXIT_INTERNAL_ERROR suberrors.
pub fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "exception during event delivery",
        4 => "unexpected exit reason",
        _ => "unknown internal error",
    }
}

/// A multi-line report of the vCPU's state at a fatal exit.
pub fn report(vcpu: &VcpuFd, mem: &GuestMem, symbols: Option<&SymbolTable>, what: &str) -> String {
    let mut s = what.to_string();
    let name = |a: u64| symbols.map(|t| t.describe(a)).unwrap_or_else(|| format!("{a:#x}"));
    match decode_at_rip(vcpu, mem) {
        Some(d) => {
            s += &format!(
                "\n  RIP {:#018x} ({}): `{}` [bytes {}]",
                d.rip,
                name(d.rip),
                d.text,
                hex(&d.bytes)
            )
        }
        None => s += "\n  (registers unavailable)",
    }
    if let (Ok(r), Ok(sr)) = (vcpu.get_regs(), vcpu.get_sregs()) {
        s += &format!(
            "\n  RSP {:#018x} RFLAGS {:#x} CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x} CS {:#x}",
            r.rsp, r.rflags, sr.cr0, sr.cr3, sr.cr4, sr.efer, sr.cs.selector
        );
        s += &format!(
            "\n  RAX {:#x} RBX {:#x} RCX {:#x} RDX {:#x} RSI {:#x} RDI {:#x} RBP {:#x}",
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::Code;

    #[test]
    fn decodes_the_instructions_that_trouble_software_kvm() {
        let (i, t) = decode(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], 0x1000, 64);
        assert_eq!(i.unwrap().code(), Code::Cmpxchg16b_m128);
        assert!(t.starts_with("lock cmpxchg16b"), "{t}");
        let (i, t) = decode(&[0x0f, 0xae, 0x2f], 0x1000, 64);
        assert_eq!(i.unwrap().code(), Code::Xrstor_mem);
        assert!(t.starts_with("xrstor"), "{t}");
        let (i, t) = decode(&[0xcc, 0x90], 0x1000, 64);
        assert_eq!(i.unwrap().code(), Code::Int3);
        assert_eq!(i.unwrap().len(), 1);
        assert_eq!(t, "int3");
        assert!(decode(&[], 0, 64).0.is_none());
        assert!(decode(&[0x0f, 0xff], 0, 64).0.is_none());
    }
}
