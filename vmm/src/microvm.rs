//! A tiny long-mode guest on the real /dev/kvm, for tests and benchmarks of VMM mechanisms
//! that run in milliseconds instead of a Linux boot: 2 MiB of RAM identity-mapped with 4K pages, Linux's
//! GDT selectors (0x10/0x18 kernel, 0x2b/0x33 user), a TSS with a kernel stack, and an IDT
//! whose 32 exception vectors go where the test says.

use std::ops::Range;
use std::sync::Arc;

use crate::arch::x86_64::gdt::{
    gdt_entry, idt_gate, kvm_segment_from_gdt, FLAGS_KERNEL_CODE64, FLAGS_KERNEL_DATA, FLAGS_USER_CODE32,
    FLAGS_USER_CODE64, FLAGS_USER_DATA, FLAT_LIMIT, KERNEL_CS,
};
use crate::arch::x86_64::paging::{PTE_PRESENT, PTE_USER, PTE_WRITABLE};
use crate::memory::{create_guest_memory, register_memslots, GuestMem};
use kvm_bindings::{kvm_segment, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

/// Size of the micro VM's RAM: 2 MiB, identity-mapped.
pub const MEM: usize = 2 << 20;
/// PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000.
pub const PT: u64 = 0x1000;
/// Where the GDT lives (Linux's selectors, the TSS descriptor at 0x40).
pub const GDT: u64 = 0x5000;
/// Where the IDT lives (16-byte gates, one per handler given to [`image`]).
pub const IDT: u64 = 0x6000;
/// Where the 64-bit TSS lives; its RSP0 is [`KSTACK`].
pub const TSS: u64 = 0x7000;
/// Where guest code conventionally starts.
pub const KCODE: u64 = 0x8000;
/// Initial stack pointer, and the TSS's RSP0 for exceptions taken from user mode.
pub const KSTACK: u64 = 0x30000;

/// Copies `bytes` into the image `m` at offset `at` (panics if they do not fit).
pub fn put(m: &mut [u8], at: u64, bytes: &[u8]) {
    m[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
}

/// Guest memory contents with page tables (`user` pages accessible from CPL 3), GDT, TSS
/// and an IDT pointing vector `v` at `handlers[v]`.
pub fn image(user: Range<u64>, handlers: &[u64]) -> Vec<u8> {
    let mut m = vec![0u8; MEM];
    for (i, next) in [(0u64, 0x2000u64), (1, 0x3000), (2, 0x4000)] {
        put(
            &mut m,
            PT + i * 0x1000,
            &(next | PTE_PRESENT | PTE_WRITABLE | PTE_USER).to_le_bytes(),
        );
    }
    for i in 0..512u64 {
        let a = i << 12;
        let u = if user.contains(&a) { PTE_USER } else { 0 };
        put(
            &mut m,
            0x4000 + 8 * i,
            &(a | PTE_PRESENT | PTE_WRITABLE | u).to_le_bytes(),
        );
    }
    let gdt = linux_gdt();
    for (i, d) in gdt.iter().enumerate() {
        put(&mut m, GDT + 8 * i as u64, &d.to_le_bytes());
    }
    let tss_lo = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89u64 << 40) | ((TSS >> 24) << 56);
    put(&mut m, GDT + 0x40, &tss_lo.to_le_bytes());
    put(&mut m, TSS + 4, &KSTACK.to_le_bytes());
    for (v, h) in handlers.iter().enumerate() {
        put(&mut m, IDT + 16 * v as u64, &idt_gate(*h, KERNEL_CS));
    }
    m
}

/// Linux's layout: null, null, 0x10 kernel code64, 0x18 kernel data, 0x23 user code32,
/// 0x2b user data, 0x33 user code64; all flat.
fn linux_gdt() -> [u64; 7] {
    [
        0,
        0,
        gdt_entry(FLAGS_KERNEL_CODE64, 0, FLAT_LIMIT),
        gdt_entry(FLAGS_KERNEL_DATA, 0, FLAT_LIMIT),
        gdt_entry(FLAGS_USER_CODE32, 0, FLAT_LIMIT),
        gdt_entry(FLAGS_USER_DATA, 0, FLAT_LIMIT),
        gdt_entry(FLAGS_USER_CODE64, 0, FLAT_LIMIT),
    ]
}

/// A micro VM: one vCPU (more with [`MicroVm::add_vcpu`]) in long mode over [`MEM`] bytes of RAM.
pub struct MicroVm {
    /// The open `/dev/kvm`, kept for the VM's life.
    pub kvm: Kvm,
    /// The VM.
    pub vm: Arc<VmFd>,
    /// Its RAM, holding the image.
    pub mem: GuestMem,
    /// Its first vCPU (id 0), set up to run the entry point at CPL 0.
    pub vcpu: VcpuFd,
}

/// Why a micro VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum MicroVmError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The ioctl or step that failed.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created or registered.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The image does not fit guest memory.
    #[error("writing the guest image: {0}")]
    Image(#[from] vm_memory::GuestMemoryError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MicroVmError {
    move |source| MicroVmError::Kvm { what, source }
}

/// A VM with `image` as its RAM and one vCPU about to run `entry` at CPL 0.
pub fn start(image: &[u8], entry: u64) -> Result<MicroVm, MicroVmError> {
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let mem = create_guest_memory(MEM as u64)?;
    mem.write_slice(image, GuestAddress(0))?;
    register_memslots(&vm, &mem)?;
    let vcpu = new_vcpu(&kvm, &vm, 0, entry, KSTACK)?;
    Ok(MicroVm {
        kvm,
        vm: Arc::new(vm),
        mem,
        vcpu,
    })
}

impl MicroVm {
    /// Adds vCPU `id` (1 or more; no in-kernel irqchip, so it is runnable at once) in the
    /// same long-mode state as vCPU 0, about to run `entry` at CPL 0 with RSP = `stack`.
    pub fn add_vcpu(&self, id: u8, entry: u64, stack: u64) -> Result<VcpuFd, MicroVmError> {
        new_vcpu(&self.kvm, &self.vm, id, entry, stack)
    }
}

fn new_vcpu(kvm: &Kvm, vm: &VmFd, id: u8, entry: u64, stack: u64) -> Result<VcpuFd, MicroVmError> {
    let vcpu = vm.create_vcpu(id.into()).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    let mut s = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    s.cr3 = PT;
    s.cr4 = 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
    s.cr0 = 0x8005_0033; // PG, WP, NE, ET, MP, PE
    s.efer = 0xd00; // NXE, LMA, LME
    let gdt = linux_gdt();
    s.cs = kvm_segment_from_gdt(gdt[2], 2);
    s.ds = kvm_segment_from_gdt(gdt[3], 3);
    (s.es, s.ss, s.fs, s.gs) = (s.ds, s.ds, s.ds, s.ds);
    (s.gdt.base, s.gdt.limit) = (GDT, 0x4f);
    (s.idt.base, s.idt.limit) = (IDT, 0x1ff);
    s.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: 0x40,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    vcpu.set_sregs(&s).map_err(kvm_err("KVM_SET_SREGS"))?;
    let mut r = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    (r.rip, r.rsp, r.rflags) = (entry, stack, 2);
    vcpu.set_regs(&r).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(vcpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_has_linux_descriptors() {
        assert_eq!(
            linux_gdt(),
            [
                0,
                0,
                0x00af_9b00_0000_ffff,
                0x00cf_9300_0000_ffff,
                0x00cf_fb00_0000_ffff,
                0x00cf_f300_0000_ffff,
                0x00af_fb00_0000_ffff
            ]
        );
    }
}
