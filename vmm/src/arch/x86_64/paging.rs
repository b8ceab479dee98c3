//! Page-table entry bits, and the boot page tables: an identity map of the first 1 GiB with
//! 2 MiB pages (the 64-bit entry point of the kernel runs with paging on; it builds its own
//! tables immediately).

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{PDE_START, PDPTE_START, PML4_START};
use crate::memory::GuestMem;

/// Entry is present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Accessible from user mode.
pub const PTE_USER: u64 = 1 << 2;
/// Accessed.
pub const PTE_ACCESSED: u64 = 1 << 5;
/// Dirty.
pub const PTE_DIRTY: u64 = 1 << 6;
/// In a PDPT or PD entry: maps a 1 GiB or 2 MiB page rather than pointing to a table.
pub const PTE_PAGE_SIZE: u64 = 1 << 7;
/// Physical-address bits of an entry (bits 12..51).
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// A large page mapped by one PD entry.
pub const SIZE_2M: u64 = 2 << 20;

/// The three tables, as written to guest memory.
pub struct BootPageTables {
    /// Top level (at `PML4_START`): entry 0 points at the PDPT.
    pub pml4: [u64; 512],
    /// At `PDPTE_START`: entry 0 points at the PD (the first GiB).
    pub pdpt: [u64; 512],
    /// At `PDE_START`: 512 2 MiB pages identity-mapping the first GiB.
    pub pd: [u64; 512],
}

/// Builds the identity map: `PML4[0] -> PDPT[0] -> PD` of 512 x 2 MiB pages.
pub fn boot_page_tables() -> BootPageTables {
    let mut t = BootPageTables {
        pml4: [0; 512],
        pdpt: [0; 512],
        pd: [0; 512],
    };
    t.pml4[0] = PDPTE_START | PTE_PRESENT | PTE_WRITABLE;
    t.pdpt[0] = PDE_START | PTE_PRESENT | PTE_WRITABLE;
    for (i, e) in t.pd.iter_mut().enumerate() {
        *e = ((i as u64) << 21) | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE;
    }
    t
}

/// Writes the boot page tables; returns the CR3 value.
pub fn write_boot_page_tables(mem: &GuestMem) -> Result<u64, vm_memory::GuestMemoryError> {
    let t = boot_page_tables();
    for (addr, table) in [(PML4_START, &t.pml4), (PDPTE_START, &t.pdpt), (PDE_START, &t.pd)] {
        for (i, e) in table.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(addr + i as u64 * 8))?;
        }
    }
    Ok(PML4_START)
}

/// Translates `va` through the boot tables (for tests and sanity checks).
pub fn translate(t: &BootPageTables, va: u64) -> Option<u64> {
    let pml4e = t.pml4[((va >> 39) & 0x1ff) as usize];
    if pml4e & PTE_PRESENT == 0 || pml4e & !0xfff != PDPTE_START {
        return None;
    }
    let pdpte = t.pdpt[((va >> 30) & 0x1ff) as usize];
    if pdpte & PTE_PRESENT == 0 || pdpte & !0xfff != PDE_START {
        return None;
    }
    let pde = t.pd[((va >> 21) & 0x1ff) as usize];
    if pde & PTE_PRESENT == 0 || pde & PTE_PAGE_SIZE == 0 {
        return None;
    }
    Some((pde & !0x1f_ffff & 0x000f_ffff_ffff_ffff) | (va & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn identity_maps_first_gib() {
        let t = boot_page_tables();
        for va in [0u64, 0x1000, 0x100_0000, 0x3fff_ffff, 0x1234_5678] {
            assert_eq!(translate(&t, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&t, 0x4000_0000), None);
        assert_eq!(translate(&t, 0xffff_ffff_8100_0000), None);
    }

    #[test]
    fn written_to_guest_memory() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let cr3 = write_boot_page_tables(&mem).unwrap();
        assert_eq!(cr3, PML4_START);
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4e, PDPTE_START | 3);
        let pde5: u64 = mem.read_obj(GuestAddress(PDE_START + 5 * 8)).unwrap();
        assert_eq!(pde5, (5 << 21) | 0x83);
    }
}
