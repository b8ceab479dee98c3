//! Initial vCPU state for the 64-bit boot protocol: long mode with paging, flat segments,
//! RSI pointing at boot_params, and a sane FPU/MSR/LAPIC state.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{boot_gdt, kvm_segment_from_gdt};
use super::msr::boot_msrs;
use super::{CR0_ET, CR0_NW_CD, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_FIXED};
use crate::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START, ZERO_PAGE_START};
use crate::memory::GuestMem;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Why a vCPU's boot registers could not be set.
#[derive(Debug, Error)]
pub enum RegsError {
    /// A KVM vCPU ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl that failed.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The boot GDT or IDT could not be written to guest memory.
    #[error("writing the boot GDT/IDT: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// KVM set fewer of the boot MSRs than asked.
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs")]
    Msrs {
        /// MSRs KVM set.
        set: usize,
        /// MSRs asked for.
        wanted: usize,
    },
    /// The MSR list for KVM could not be built.
    #[error("building the MSR list: {0}")]
    MsrList(vmm_sys_util::fam::Error),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// General purpose registers at the kernel's 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: RFLAGS_FIXED,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// Writes the boot GDT and an empty IDT and returns sregs for long mode with paging.
pub fn boot_sregs(mem: &GuestMem, mut sregs: kvm_sregs, cr3: u64) -> Result<kvm_sregs, RegsError> {
    let gdt = boot_gdt();
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    let code = kvm_segment_from_gdt(gdt[2], 2);
    let data = kvm_segment_from_gdt(gdt[3], 3);
    let tss = kvm_segment_from_gdt(gdt[4], 4);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET | CR0_PG) & !CR0_NW_CD;
    sregs.cr3 = cr3;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// Sets up every register of a vCPU. `boot` is false for application processors, which
/// stay in their reset state until the BSP sends INIT/SIPI (only their MSRs, FPU and
/// LAPIC are prepared).
pub fn setup_vcpu(vcpu: &VcpuFd, mem: &GuestMem, entry: u64, cr3: u64, boot: bool) -> Result<(), RegsError> {
    let msrs = boot_msrs();
    let list = Msrs::from_entries(&msrs).map_err(RegsError::MsrList)?;
    let set = vcpu.set_msrs(&list).map_err(kvm("KVM_SET_MSRS"))?;
    if set != msrs.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: msrs.len(),
        });
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    set_lint(vcpu)?;
    if boot {
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let sregs = boot_sregs(mem, sregs, cr3)?;
        vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&boot_regs(entry)).map_err(kvm("KVM_SET_REGS"))?;
    }
    Ok(())
}

/// LINT0 as ExtINT (the PIC), LINT1 as NMI, as a BIOS would leave the local APIC.
fn set_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let get = |regs: &[std::os::raw::c_char], off: usize| {
        u32::from_le_bytes([
            regs[off] as u8,
            regs[off + 1] as u8,
            regs[off + 2] as u8,
            regs[off + 3] as u8,
        ])
    };
    let put = |regs: &mut [std::os::raw::c_char], off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as std::os::raw::c_char;
        }
    };
    let set_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = get(&lapic.regs, APIC_LVT0);
    put(&mut lapic.regs, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get(&lapic.regs, APIC_LVT1);
    put(&mut lapic.regs, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

/// Makes exception `vector` (no error code) pending on `vcpu`: delivered through the
/// guest's IDT on the next KVM_RUN, as if the current instruction had raised it.
pub fn inject_exception(vcpu: &VcpuFd, vector: u8) -> Result<(), kvm_ioctls::Error> {
    let mut ev = vcpu.get_vcpu_events()?;
    ev.exception.injected = 1;
    ev.exception.nr = vector;
    ev.exception.has_error_code = 0;
    ev.exception.error_code = 0;
    vcpu.set_vcpu_events(&ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_follow_boot_protocol() {
        let r = boot_regs(0x100_0000);
        assert_eq!(r.rip, 0x100_0000);
        assert_eq!(r.rsi, ZERO_PAGE_START);
        assert_eq!(r.rflags, 2);
    }

    #[test]
    fn sregs_enable_long_mode() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let s = boot_sregs(&mem, kvm_sregs::default(), 0x9000).unwrap();
        assert_eq!(s.cr3, 0x9000);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr0 & CR0_PE, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.selector, super::super::gdt::BOOT_CS);
        assert_eq!(s.cs.l, 1);
        let gdt2: u64 = mem.read_obj(GuestAddress(GDT_START + 16)).unwrap();
        assert_eq!(gdt2, boot_gdt()[2]);
    }
}
