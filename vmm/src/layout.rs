//! The guest-physical memory map (x86-64).
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top           0x0000_9000  PML4, PDPT (0xa000), PD (0xb000)
//! 0x0002_0000  kernel command line      0x0009_fc00  MP table (EBDA, e820 reserved)
//! 0x0010_0000  high memory (kernel at 16 MiB as linked)
//! 0xc000_0000 .. 0x1_0000_0000  MMIO hole (IOAPIC, LAPIC, device MMIO)
//! 0x1_0000_0000 ..  RAM above 4 GiB when --mem exceeds 3 GiB
//! ```

/// Where the GDT lives.
pub const GDT_START: u64 = 0x500;
/// Where the (empty) IDT lives.
pub const IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table (PML4); the PDPT and PD follow it.
pub const PML4_START: u64 = 0x9000;
/// Boot page directory pointer table (the first GiB).
pub const PDPTE_START: u64 = 0xa000;
/// Boot page directory: 2 MiB pages identity-mapping the first GiB.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length (including the NUL), as in boot protocol 2.06+.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table is written here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory.
pub const EBDA_END: u64 = 0xa0000;
/// Start of high memory: RAM from here up is usable by the kernel.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Device MMIO (virtio-mmio) window inside the hole.
pub const DEVICE_MMIO_START: u64 = 0xd000_0000;
/// Highest address an initrd may end at (`initrd_addr_max` default).
pub const INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Number of IOAPIC pins (in-kernel irqchip).
pub const IOAPIC_PINS: u8 = 24;
/// Legacy IRQ of the first serial port (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// I/O port of COM1.
pub const SERIAL_PORT: u64 = 0x3f8;
/// Size of the virtio-mmio vsock device's register window (at [`DEVICE_MMIO_START`]).
pub const VSOCK_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC pin of the virtio-mmio vsock device (free: the PIT has 0/2, COM1 4).
pub const VSOCK_IRQ: u32 = 5;

/// Size of the patch region: guest RAM the VMM keeps for live-patch code and data
/// (e820 reserved, never used by the guest kernel).
pub const PATCH_REGION_SIZE: u64 = 16 << 20;
/// The start of the patch region holds what the VMM itself puts in the guest: the PVM
/// syscall shim ([`crate::pvm`], first page), then the guest-call area
/// ([`crate::guestcall`]: IDT, code, private stack). Patches get the rest.
pub const PLATFORM_SIZE: u64 = CALL_AREA_OFFSET + crate::guestcall::AREA_SIZE;
/// Offset of the guest-call area in the patch region.
pub const CALL_AREA_OFFSET: u64 = 4096;
/// The kernel's high mapping (`__START_KERNEL_map`) covers the first GiB of physical
/// memory (KERNEL_IMAGE_SIZE); the patch region must lie inside it so it can be mapped at
/// `__START_KERNEL_map + phys`, within jmp rel32 reach of kernel text.
pub const KERNEL_IMAGE_SIZE: u64 = 1 << 30;

/// Where the patch region of one VM lies: computed once, from the guest's RAM size, when
/// the VM is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchRegion {
    /// Guest-physical start: the top [`PATCH_REGION_SIZE`] below min(RAM, 1 GiB), 2 MiB
    /// aligned.
    pub gpa: u64,
    /// Kernel-virtual start in the kernel's high map (`__START_KERNEL_map + gpa`).
    pub va: u64,
}

impl PatchRegion {
    /// The patch region of a guest with `mem_bytes` of RAM.
    pub fn for_memory(mem_bytes: u64) -> Self {
        let gpa = (mem_bytes.min(MMIO_GAP_START).min(KERNEL_IMAGE_SIZE) - PATCH_REGION_SIZE) & !((2 << 20) - 1);
        PatchRegion {
            gpa,
            va: crate::introspect::kernel::START_KERNEL_MAP + gpa,
        }
    }

    /// True when kernel-virtual `va` lies in the region.
    pub fn contains_va(&self, va: u64) -> bool {
        va >= self.va && va < self.va + PATCH_REGION_SIZE
    }

    /// Whether the guest kernel has a `struct page` for every page of the region, given the
    /// guest's RAM `[start, end)` ranges (the region among them). The region is e820
    /// reserved, so the kernel's memblock does not list it; but sparsemem allocates and
    /// initializes (as reserved pages) the memory map of a whole [`MEM_SECTION`] when any
    /// RAM lies in it. `text_poke()` on patch code (a static key flip) needs them:
    /// `vmalloc_to_page()` of the region's 2 MiB mapping is `pfn_to_page()`.
    pub fn has_struct_pages(&self, ram: &[(u64, u64)]) -> bool {
        let (lo, hi) = (self.gpa, self.gpa + PATCH_REGION_SIZE);
        let mut sec = lo & !(MEM_SECTION - 1);
        while sec < hi {
            let end = sec + MEM_SECTION;
            // RAM in [sec, end) outside [lo, hi).
            let other = ram.iter().any(|&(a, b)| {
                let (a, b) = (a.max(sec), b.min(end));
                a < b && (a < lo || b > hi)
            });
            if !other {
                return false;
            }
            sec = end;
        }
        true
    }
}

/// Size of a Linux sparsemem memory section on x86-64 (`SECTION_SIZE_BITS` 27).
pub const MEM_SECTION: u64 = 128 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_region_has_struct_pages_when_its_section_has_ram() {
        let ram = |mem: u64| -> Vec<(u64, u64)> {
            crate::memory::ram_ranges(mem)
                .into_iter()
                .map(|(a, l)| (a.0, a.0 + l as u64))
                .collect()
        };
        for mib in [512u64, 1024, 2048, 4096, 200] {
            let r = PatchRegion::for_memory(mib << 20);
            assert!(r.has_struct_pages(&ram(mib << 20)), "{mib} MiB");
        }
        // 144 MiB: the region fills 128..144 MiB, a section with no other RAM.
        let r = PatchRegion::for_memory(144 << 20);
        assert_eq!(r.gpa, 128 << 20);
        assert!(!r.has_struct_pages(&ram(144 << 20)));
        // 136 MiB: the region straddles 128 MiB; its upper part is alone in its section.
        let r = PatchRegion::for_memory(136 << 20);
        assert!(!r.has_struct_pages(&ram(136 << 20)));
    }
}
