//! Workarounds for a software-assisted KVM that runs the guest through KVM's instruction
//! emulator (no VMX/SVM). They arm only after the VMM has seen such a KVM at work — an
//! `int3` emulation-failure exit, which never happens on hardware KVM — so they cannot
//! change anything on hardware KVM.
//!
//! - `sysretq` is missing from KVM's emulator: the VMM performs it (RIP=RCX, RFLAGS from
//!   R11, user CS/SS from MSR_STAR).
//! - `syscall` is emulated, but the switch to CPL 0 is lost (the guest then faults fetching
//!   `entry_SYSCALL_64` in user mode). The VMM puts an `int3` on the first instruction at
//!   MSR_LSTAR (`swapgs`); on that trap it loads kernel CS/SS from MSR_STAR, performs the
//!   `swapgs`, and continues after it.

use kvm_bindings::{kvm_msr_entry, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use log::{debug, info};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const SWAPGS: [u8; 3] = [0x0f, 0x01, 0xf8];

/// Shared state of the workarounds.
#[derive(Default)]
pub struct Quirks {
    /// Guest-virtual address of the trapped `swapgs` at LSTAR (0: not armed).
    lstar: AtomicU64,
    arm: Mutex<()>,
}

fn get_msr(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    let mut m = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    (vcpu.get_msrs(&mut m).ok()? == 1).then(|| m.as_slice()[0].data)
}

fn set_msr(vcpu: &VcpuFd, index: u32, data: u64) -> bool {
    Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .ok()
    .and_then(|m| vcpu.set_msrs(&m).ok())
        == Some(1)
}

fn seg(selector: u16, dpl: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: if code { 0 } else { 1 },
        s: 1,
        l: if code { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl Quirks {
    pub fn armed(&self) -> bool {
        self.lstar.load(Ordering::Acquire) != 0
    }

    /// Arms the SYSCALL fix-up once (called on an int3 emulation failure).
    pub fn arm(&self, vcpu: &VcpuFd, mem: &GuestMem) {
        let _g = self.arm.lock().unwrap_or_else(|e| e.into_inner());
        if self.armed() {
            return;
        }
        let Some(lstar) = get_msr(vcpu, MSR_LSTAR).filter(|&a| a != 0) else {
            return;
        };
        let Ok(t) = vcpu.translate_gva(lstar) else { return };
        if t.valid == 0 {
            return;
        }
        let mut b = [0u8; 3];
        if mem.read_slice(&mut b, GuestAddress(t.physical_address)).is_err() || b != SWAPGS {
            debug!("LSTAR {lstar:#x} does not start with swapgs ({b:02x?}); SYSCALL fix-up not armed");
            return;
        }
        if mem.write_obj(0xccu8, GuestAddress(t.physical_address)).is_ok() {
            self.lstar.store(lstar, Ordering::Release);
            info!("software KVM detected: SYSCALL fix-up armed at {lstar:#x}, SYSRET emulated");
        }
    }

    /// Handles an int3 emulation failure at `rip` if it is the LSTAR trap: fixes CS/SS
    /// when the CPL switch was lost, performs `swapgs`, continues after it. Returns true if
    /// handled.
    pub fn on_int3(&self, vcpu: &VcpuFd, rip: u64) -> bool {
        let lstar = self.lstar.load(Ordering::Acquire);
        if lstar == 0 || rip != lstar {
            return false;
        }
        let (Ok(mut regs), Ok(mut sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
            return false;
        };
        let Some(star) = get_msr(vcpu, MSR_STAR) else {
            return false;
        };
        let Some(kgs) = get_msr(vcpu, MSR_KERNEL_GS_BASE) else {
            return false;
        };
        let kcs = ((star >> 32) & 0xfffc) as u16;
        sregs.cs = seg(kcs, 0, true);
        sregs.ss = seg(kcs + 8, 0, false);
        let user_gs = sregs.gs.base;
        sregs.gs.base = kgs;
        if vcpu.set_sregs(&sregs).is_err() || !set_msr(vcpu, MSR_KERNEL_GS_BASE, user_gs) {
            return false;
        }
        regs.rip = rip + SWAPGS.len() as u64;
        vcpu.set_regs(&regs).is_ok()
    }

    /// Performs `sysretq` (64-bit) when armed. Returns true if handled.
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
