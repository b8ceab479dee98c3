//! Workarounds for a software-assisted KVM (no VMX/SVM) whose instruction emulator lacks
//! instructions hardware KVM never needs to emulate. They arm only after the VMM has seen
//! such a KVM at work — an `int3` emulation-failure exit, which never happens on hardware
//! KVM — so they cannot change anything there.
//!
//! - `sysretq` is missing from KVM's emulator: when it fails to emulate, the VMM performs it
//!   (RIP=RCX, RFLAGS from R11, user CS/SS from MSR_STAR).
//!
//! Known and not yet handled: on the same KVM, `syscall` from guest user mode reaches
//! MSR_LSTAR without the switch to CPL 0, so the fetch of `entry_SYSCALL_64` faults in user
//! mode and guest userspace dies on its first system call (see README).

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{kvm_msr_entry, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use log::info;

const MSR_STAR: u32 = 0xc000_0081;

/// Shared state of the workarounds.
#[derive(Default)]
pub struct Quirks {
    armed: AtomicBool,
}

fn get_msr(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    let mut m = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    (vcpu.get_msrs(&mut m).ok()? == 1).then(|| m.as_slice()[0].data)
}

/// A flat 64-bit code or data segment.
fn seg(selector: u16, dpl: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl Quirks {
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Called on an int3 emulation failure: this is a software-assisted KVM.
    pub fn arm(&self) {
        if !self.armed.swap(true, Ordering::AcqRel) {
            info!("software-assisted KVM detected (int3 exits to the VMM): SYSRET emulation enabled");
        }
    }

    /// Performs `sysretq` when armed. Returns true if handled.
    pub fn sysret(&self, vcpu: &VcpuFd) -> bool {
        if !self.armed() {
            return false;
        }
        let (Ok(mut regs), Ok(mut sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
            return false;
        };
        let Some(star) = get_msr(vcpu, MSR_STAR) else {
            return false;
        };
        let base = ((star >> 48) & 0xffff) as u16;
        sregs.cs = seg((base + 16) | 3, 3, true);
        sregs.ss = seg((base + 8) | 3, 3, false);
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
        let cs = seg(0x33, 3, true);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.type_), (1, 0, 3, 0xb));
        let ss = seg(0x2b, 3, false);
        assert_eq!((ss.l, ss.db, ss.dpl, ss.type_), (0, 1, 3, 0x3));
        let q = Quirks::default();
        assert!(!q.armed());
        q.arm();
        assert!(q.armed());
    }
}
