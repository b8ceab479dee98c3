//! Running unmodified guests on a PVM host ("Pagetable-based Virtual Machine", Ant Group's
//! KVM backend for machines without VMX/SVM) in its native mode (`kvm_pvm.pvm_native=Y`).
//!
//! PVM runs the guest kernel at hardware CPL 3 under shadow paging and emulates what a
//! CPU would do on privileged transitions. Its native mode gets one of them wrong: a
//! `syscall` from guest user mode sets RCX (return RIP), R11 (RFLAGS), masks RFLAGS with
//! MSR_SYSCALL_MASK and jumps to MSR_LSTAR, **but leaves CS/SS (the privilege level) at
//! user**. The fetch of the kernel's syscall entry then takes a user-mode #PF, and the
//! guest's first system call kills init. (`cargo run --example pvm_probe` shows this on a
//! ten-instruction guest.)
//!
//! The #PF frame the guest receives holds everything a correct `syscall` would have
//! produced: RIP = LSTAR, RSP = the user stack, RFLAGS already masked (IF clear), RCX/R11
//! set. So the VMM installs a 60-byte shim in front of the guest's page-fault handler (in
//! the first page of the patch region, mapped in the kernel's high map): for a fault with
//! a user CS, RIP == LSTAR and IF clear — a state no real user-mode fault can have, since
//! Linux user code always runs with IF set — it rewrites the frame's CS/SS to the kernel
//! selectors from MSR_STAR and `iretq`s to LSTAR in CPL 0, exactly where `syscall` should
//! have gone. Every other fault goes to the original handler unchanged. There is no VM
//! exit per system call.
//!
//! The shim is installed from a vCPU thread once the guest kernel has put
//! `asm_exc_page_fault` in `idt_table[14]` (after `cleanup_highmap`, so the high-map entry
//! stays) and programmed MSR_LSTAR, long before init runs. It is enabled only when
//! `/sys/module/kvm_pvm/parameters/pvm_native` says `Y`; on any other KVM nothing changes.

use std::sync::atomic::{AtomicU8, Ordering};

use iced_x86::code_asm::{byte_ptr, dword_ptr, qword_ptr, rax, rsp, CodeAssembler};
use kvm_ioctls::VcpuFd;
use log::{debug, info, warn};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::gdt::{gate_target, retarget_low};
use crate::arch::x86_64::msr::{read_msrs, MSR_LSTAR, MSR_STAR};
use crate::arch::x86_64::{vector, RFLAGS_IF, RFLAGS_RF};
use crate::introspect::kernel::{map_high, KernelError, START_KERNEL_MAP};
use crate::memory::GuestMem;
use crate::symbols::SymbolTable;

/// Where the host says whether PVM runs unmodified guests.
pub const PVM_NATIVE_PARAM: &str = "/sys/module/kvm_pvm/parameters/pvm_native";

/// The high map is built from 2 MiB pages.
const MAP_GRANULE: u64 = 2 << 20;

/// Why the PVM syscall shim could not be built or installed.
#[derive(Debug, Error)]
pub enum PvmError {
    /// A kernel symbol the shim needs (`idt_table`, `asm_exc_page_fault`, `init_top_pgt`, `_end`)
    /// is not in the vmlinux.
    #[error("kernel symbol '{0}' not found in the vmlinux (needed for the PVM syscall shim)")]
    NoSymbol(&'static str),
    /// The shim's code could not be assembled.
    #[error("assembling the PVM syscall shim: {0}")]
    Assemble(String),
    /// Guest memory at this guest-physical address (shim page or #PF gate) is not accessible.
    #[error("guest memory at {0:#x} is not accessible")]
    Memory(u64),
    /// The shim page could not be mapped in the kernel's high map.
    #[error("mapping the shim page: {0}")]
    Map(#[from] KernelError),
    /// The kernel's #PF handler (the value) is not within 4 GiB of the shim, so the gate's upper
    /// half cannot stay as it is.
    #[error("idt_table[14] points at {0:#x}: its upper half differs from the shim's")]
    FarHandler(u64),
}

/// The guest-side values the shim is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShimParams {
    /// Guest-virtual address the shim runs at.
    pub va: u64,
    /// MSR_LSTAR: the kernel's syscall entry.
    pub lstar: u64,
    /// Kernel CS and SS as `syscall` loads them from `MSR_STAR[47:32]`.
    pub kernel_cs: u16,
    /// Kernel SS: kernel CS + 8, as `syscall` loads it.
    pub kernel_ss: u16,
    /// The guest's own page-fault handler.
    pub pf_handler: u64,
}

impl ShimParams {
    /// Parameters for a shim at `va`, with the kernel selectors taken from MSR_STAR (`star`).
    pub fn from_star(va: u64, lstar: u64, star: u64, pf_handler: u64) -> Self {
        let cs = ((star >> 32) as u16) & !3;
        Self {
            va,
            lstar,
            kernel_cs: cs,
            kernel_ss: cs + 8,
            pf_handler,
        }
    }
}

/// Assembles the #PF shim. On entry the stack holds the exception frame:
/// `[rsp]` error code, `+8` RIP, `+16` CS, `+24` RFLAGS, `+32` RSP, `+40` SS.
pub fn assemble(p: &ShimParams) -> Result<Vec<u8>, PvmError> {
    let e = |e: iced_x86::IcedError| PvmError::Assemble(e.to_string());
    let mut a = CodeAssembler::new(64).map_err(e)?;
    let mut orig = a.create_label();
    let mut orig_ptr = a.create_label();
    a.test(byte_ptr(rsp + 16), 3).map_err(e)?; // from user mode?
    a.jz(orig).map_err(e)?;
    a.test(dword_ptr(rsp + 24), RFLAGS_IF as i32).map_err(e)?; // IF set: a real user fault
    a.jnz(orig).map_err(e)?;
    a.push(rax).map_err(e)?;
    a.mov(rax, p.lstar).map_err(e)?;
    a.cmp(qword_ptr(rsp + 16), rax).map_err(e)?; // RIP == LSTAR (frame is 8 lower now)
    a.pop(rax).map_err(e)?;
    a.jne(orig).map_err(e)?;
    // The lost privilege switch: kernel CS/SS, RSP stays the user's, RFLAGS is already
    // masked; drop RF and the error code, and enter LSTAR as `syscall` would have.
    a.mov(qword_ptr(rsp + 16), p.kernel_cs as i32).map_err(e)?;
    a.mov(qword_ptr(rsp + 40), p.kernel_ss as i32).map_err(e)?;
    a.and(dword_ptr(rsp + 24), !(RFLAGS_RF as i32)).map_err(e)?;
    a.add(rsp, 8).map_err(e)?;
    a.iretq().map_err(e)?;
    a.set_label(&mut orig).map_err(e)?;
    a.jmp(qword_ptr(orig_ptr)).map_err(e)?;
    a.set_label(&mut orig_ptr).map_err(e)?;
    a.dq(&[p.pf_handler]).map_err(e)?;
    a.assemble(p.va).map_err(e)
}

const PENDING: u8 = 0;
const INSTALLING: u8 = 1;
const DONE: u8 = 2;

/// Installs the shim once the guest kernel is ready for it.
pub struct SyscallShim {
    state: AtomicU8,
    gate_gpa: u64,
    pf_handler: u64,
    kernel_cr3: u64,
    kernel_end: u64,
    shim_gpa: u64,
}

fn kernel_gpa(va: u64) -> u64 {
    va.wrapping_sub(START_KERNEL_MAP)
}

impl SyscallShim {
    /// `shim_gpa` is the 2 MiB-aligned patch region; the shim takes its first page.
    pub fn new(symbols: &SymbolTable, shim_gpa: u64) -> Result<Self, PvmError> {
        let sym = |n: &'static str| symbols.get(n).map(|s| s.addr).ok_or(PvmError::NoSymbol(n));
        Ok(Self {
            state: AtomicU8::new(PENDING),
            gate_gpa: kernel_gpa(sym("idt_table")?) + u64::from(vector::PF) * 16,
            pf_handler: sym("asm_exc_page_fault")?,
            kernel_cr3: kernel_gpa(sym("init_top_pgt")?),
            kernel_end: sym("_end")?,
            shim_gpa,
        })
    }

    /// True until a vCPU thread has tried to install the shim.
    pub fn pending(&self) -> bool {
        self.state.load(Ordering::Acquire) == PENDING
    }

    /// Called by vCPU threads after VM exits while the shim is pending: installs it as
    /// soon as `idt_table[14]` holds the kernel's #PF handler and MSR_LSTAR is set.
    pub fn poll(&self, mem: &GuestMem, vcpu: &VcpuFd) {
        let mut gate = [0u8; 16];
        if mem.read_slice(&mut gate, GuestAddress(self.gate_gpa)).is_err() || gate_target(&gate) != self.pf_handler {
            return;
        }
        let Some([lstar, star]) = read_msrs(vcpu, [MSR_LSTAR, MSR_STAR]) else {
            return;
        };
        if lstar == 0 || star == 0 {
            return;
        }
        if self
            .state
            .compare_exchange(PENDING, INSTALLING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        match self.install(mem, &gate, lstar, star) {
            Ok(va) => info!("PVM host: syscall privilege-switch shim installed at {va:#x} (LSTAR {lstar:#x})"),
            Err(e) => warn!("PVM host: cannot install the syscall shim, guest userspace will not run: {e}"),
        }
        self.state.store(DONE, Ordering::Release);
    }

    fn install(&self, mem: &GuestMem, gate: &[u8; 16], lstar: u64, star: u64) -> Result<u64, PvmError> {
        let va = map_high(mem, self.kernel_cr3, self.kernel_end, self.shim_gpa, MAP_GRANULE)?;
        if va >> 32 != self.pf_handler >> 32 {
            return Err(PvmError::FarHandler(self.pf_handler));
        }
        let params = ShimParams::from_star(va, lstar, star, self.pf_handler);
        let code = assemble(&params)?;
        debug!("PVM shim {params:x?}: {} bytes", code.len());
        mem.write_slice(&code, GuestAddress(self.shim_gpa))
            .map_err(|_| PvmError::Memory(self.shim_gpa))?;
        // One aligned 8-byte store switches the handler: the upper half is unchanged.
        mem.write_obj(retarget_low(gate, va), GuestAddress(self.gate_gpa))
            .map_err(|_| PvmError::Memory(self.gate_gpa))?;
        Ok(va)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, NasmFormatter};

    #[test]
    fn selectors_from_star() {
        // Linux: STAR = __USER32_CS << 48 | __KERNEL_CS << 32.
        let p = ShimParams::from_star(0, 1, (0x23u64 << 48) | (0x10u64 << 32), 2);
        assert_eq!((p.kernel_cs, p.kernel_ss), (0x10, 0x18));
    }

    #[test]
    fn shim_checks_before_rewriting_the_frame() {
        let p = ShimParams::from_star(
            0xffff_ffff_9fe0_0000,
            0xffff_ffff_8140_0040,
            (0x23u64 << 48) | (0x10u64 << 32),
            0xffff_ffff_8160_0a70,
        );
        let code = assemble(&p).unwrap();
        assert!(code.len() < 128, "{} bytes", code.len());
        let mut d = Decoder::with_ip(64, &code, p.va, DecoderOptions::NONE);
        let mut f = NasmFormatter::new();
        let mut text = Vec::new();
        while d.can_decode() && text.len() < 16 {
            let i = d.decode();
            let mut s = String::new();
            f.format(&i, &mut s);
            text.push(s);
        }
        let joined = text.join("; ");
        assert!(joined.starts_with("test byte [rsp+10h],3"), "{joined}");
        assert!(joined.contains("mov rax,0FFFFFFFF81400040h"), "{joined}");
        assert!(joined.contains("mov qword [rsp+10h],10h"), "{joined}");
        assert!(joined.contains("mov qword [rsp+28h],18h"), "{joined}");
        assert!(joined.contains("iretq"), "{joined}");
        // The fall-through jumps through the stored address of the original handler.
        assert_eq!(&code[code.len() - 8..], &p.pf_handler.to_le_bytes());
        let iret = text.iter().position(|t| t == "iretq").unwrap();
        let tests = text.iter().position(|t| t.starts_with("mov qword")).unwrap();
        assert!(tests < iret && text[..tests].iter().any(|t| t.starts_with("jne")));
    }
}
