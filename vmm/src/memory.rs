//! Guest RAM: allocation around the 32-bit MMIO hole and registration as KVM memslots.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest RAM: one region below the 32-bit MMIO hole and, past 3 GiB, one above 4 GiB.
pub type GuestMem = GuestMemoryMmap<()>;

/// Why guest RAM could not be set up.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The host could not map the guest's RAM.
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
    Allocate {
        /// Bytes of RAM asked for.
        size: u64,
        /// The mmap error.
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused to register a RAM region as a memslot.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} (gpa {gpa:#x}, {size:#x} bytes) failed: {source}")]
    SetRegion {
        /// Memslot number.
        slot: u32,
        /// Guest-physical start.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
}

/// The guest RAM ranges (start, size) for `mem_bytes` of memory, split around the MMIO hole.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (mem_bytes - MMIO_GAP_START) as usize),
        ]
    }
}

/// Allocates anonymous host memory for the guest.
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMem, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(mem_bytes)).map_err(|source| MemoryError::Allocate {
        size: mem_bytes,
        source,
    })
}

/// Sets memslot `slot` to map guest-physical `[gpa, gpa+size)` at host address `host`
/// (`size` 0 deletes the slot). The host range must be part of the VM's [`GuestMem`] and
/// must not overlap another slot: callers derive both from the guest memory regions
/// ([`register_memslots`], [`crate::protect::MemSlots`]).
pub fn set_memslot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    size: u64,
    host: u64,
    readonly: bool,
) -> Result<(), kvm_ioctls::Error> {
    let r = kvm_userspace_memory_region {
        slot,
        flags: if readonly { KVM_MEM_READONLY } else { 0 },
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: the host range [host, +size) lies in a live mmap of the VM's GuestMem, which
    // lives as long as the VM; callers keep slots disjoint (see above).
    unsafe { vm.set_user_memory_region(r) }
}

/// Registers every RAM region with KVM, one memslot each.
pub fn register_memslots(vm: &VmFd, mem: &GuestMem) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let (gpa, size) = (region.start_addr().0, region.len());
        set_memslot(vm, slot as u32, gpa, size, region.as_ptr() as u64, false).map_err(|source| {
            MemoryError::SetRegion {
                slot: slot as u32,
                gpa,
                size,
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[1].1 as u64, (4 << 30) - MMIO_GAP_START);
    }
}
