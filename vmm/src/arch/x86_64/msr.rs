//! Model-specific registers: the indices lucos uses, the values a vCPU boots with, and
//! reading and writing them through KVM.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;

/// `IA32_SYSENTER_CS`: code selector for `sysenter` (0 at boot).
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`: stack pointer for `sysenter` (0 at boot).
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`: entry point for `sysenter` (0 at boot).
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `STAR`: `syscall`/`sysret` segment selectors (kernel CS in bits 47:32).
pub const MSR_STAR: u32 = 0xc000_0081;
/// `LSTAR`: 64-bit `syscall` entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `CSTAR`: compatibility-mode `syscall` entry point.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `SFMASK`: RFLAGS bits cleared on `syscall`.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `KERNEL_GS_BASE`: the GS base `swapgs` exchanges with the current one.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// `IA32_TSC`: the time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_MISC_ENABLE`: miscellaneous feature enables.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MISC_ENABLE` bit 0: fast string operations (`rep movs`/`stos`) enabled.
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_MTRR_DEF_TYPE`: MTRRs enabled and the default memory type (write-back at boot).
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// Why an MSR access failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MsrError {
    /// The ioctl failed.
    #[error("KVM_SET_MSRS: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    /// KVM took the call but not the MSR.
    #[error("KVM_SET_MSRS did not write MSR {0:#x}")]
    NotWritten(u32),
    /// KVM did not return the MSR.
    #[error("KVM_GET_MSRS did not read MSR {0:#x}")]
    NotRead(u32),
}

/// Reads MSRs `idx` of a vCPU (None if KVM does not return all of them).
pub fn read_msrs<const N: usize>(vcpu: &VcpuFd, idx: [u32; N]) -> Option<[u64; N]> {
    let mut m = Msrs::from_entries(&idx.map(|index| kvm_msr_entry {
        index,
        ..Default::default()
    }))
    .ok()?;
    if vcpu.get_msrs(&mut m).ok()? != N {
        return None;
    }
    let mut out = [0u64; N];
    for (o, e) in out.iter_mut().zip(m.as_slice()) {
        *o = e.data;
    }
    Some(out)
}

/// Writes one MSR of a vCPU.
pub fn write_msr(vcpu: &VcpuFd, index: u32, data: u64) -> Result<(), MsrError> {
    let entry = kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let m = Msrs::from_entries(&[entry]).map_err(|_| MsrError::NotWritten(index))?;
    match vcpu.set_msrs(&m)? {
        1 => Ok(()),
        _ => Err(MsrError::NotWritten(index)),
    }
}

/// MSR values at boot.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}
