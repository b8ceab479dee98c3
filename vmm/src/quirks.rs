//! Workarounds for a software-assisted KVM (no VMX/SVM) whose instruction emulator lacks
//! instructions hardware KVM never needs to emulate. They arm when the host is PVM in
//! native mode (see [`crate::pvm`]) or after the VMM has seen such a KVM at work — an
//! `int3` emulation-failure exit, which never happens on hardware KVM — so they cannot
//! change anything there.
//!
//! - `sysretq` is missing from KVM's emulator: when it fails to emulate, the VMM performs it
//!   (RIP=RCX, RFLAGS from R11, user CS/SS from MSR_STAR).
//! - On PVM, `syscall` from guest user mode loses its privilege switch: the
//!   [`SyscallShim`] is installed in the guest once its IDT is ready.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::kvm_segment;
use kvm_ioctls::VcpuFd;
use log::info;

use crate::arch::x86_64::gdt::{gdt_entry, kvm_segment_from_gdt, FLAGS_USER_CODE64, FLAGS_USER_DATA, FLAT_LIMIT};
use crate::arch::x86_64::msr::{read_msrs, MSR_STAR};
use crate::arch::x86_64::regs::inject_exception;
use crate::arch::x86_64::vector;
use crate::memory::GuestMem;
use crate::pvm::SyscallShim;

/// Shared state of the workarounds.
#[derive(Default)]
pub struct Quirks {
    armed: AtomicBool,
    shim: Option<SyscallShim>,
}

/// A flat 64-bit user code or data segment with selector `selector`.
fn user_seg(selector: u16, code: bool) -> kvm_segment {
    let flags = if code { FLAGS_USER_CODE64 } else { FLAGS_USER_DATA };
    kvm_segment {
        selector,
        ..kvm_segment_from_gdt(gdt_entry(flags, 0, FLAT_LIMIT), 0)
    }
}

impl Quirks {
    /// Workarounds for a host known up front to be PVM in native mode.
    pub fn for_pvm(shim: Option<SyscallShim>) -> Self {
        Self {
            armed: AtomicBool::new(true),
            shim,
        }
    }

    /// Called by a vCPU thread after each VM exit; cheap unless a shim is waiting to be
    /// installed.
    pub fn after_exit(&self, mem: &GuestMem, vcpu: &VcpuFd) {
        if let Some(s) = self.shim.as_ref().filter(|s| s.pending()) {
            s.poll(mem, vcpu);
        }
    }

    /// Whether the software-KVM workarounds are on (PVM host, or an `int3` emulation failure seen).
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Called on an int3 emulation failure: this is a software-assisted KVM.
    pub fn arm(&self) {
        if !self.armed.swap(true, Ordering::AcqRel) {
            info!("software-assisted KVM detected (int3 exits to the VMM): SYSRET emulation enabled");
        }
    }

    /// Performs `fwait` (`wait`, `len` bytes at RIP), which some software KVM emulators lack:
    /// with an unmasked x87 exception pending (FSW.ES) it raises #MF, otherwise it does
    /// nothing. Exact on any KVM, so it needs no arming. Returns true if handled.
    pub fn fwait(&self, vcpu: &VcpuFd, len: usize) -> bool {
        const FSW_ES: u16 = 1 << 7;
        let (Ok(fpu), Ok(mut regs)) = (vcpu.get_fpu(), vcpu.get_regs()) else {
            return false;
        };
        if fpu.fsw & FSW_ES != 0 {
            return inject_exception(vcpu, vector::MF).is_ok();
        }
        regs.rip = regs.rip.wrapping_add(len as u64);
        vcpu.set_regs(&regs).is_ok()
    }

    /// Performs `sysretq` when armed. Returns true if handled.
    pub fn sysret(&self, vcpu: &VcpuFd) -> bool {
        if !self.armed() {
            return false;
        }
        let (Ok(mut regs), Ok(mut sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
            return false;
        };
        let Some([star]) = read_msrs(vcpu, [MSR_STAR]) else {
            return false;
        };
        let base = ((star >> 48) & 0xffff) as u16;
        sregs.cs = user_seg(base.wrapping_add(16) | 3, true); // STAR is guest-written: wrap
        sregs.ss = user_seg(base.wrapping_add(8) | 3, false);
        regs.rip = regs.rcx;
        regs.rflags = (regs.r11 & 0x3c_7fd7) | 2;
        vcpu.set_sregs(&sregs).is_ok() && vcpu.set_regs(&regs).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_segments_for_sysret() {
        let cs = user_seg(0x33, true);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.type_), (1, 0, 3, 0xb));
        let ss = user_seg(0x2b, false);
        assert_eq!((ss.l, ss.db, ss.dpl, ss.type_), (0, 1, 3, 0x3));
        let q = Quirks::default();
        assert!(!q.armed());
        q.arm();
        assert!(q.armed());
    }
}
