//! Guest-virtual to guest-physical translation by walking the guest's 4-level page tables
//! from a CR3 value (4 KiB, 2 MiB and 1 GiB pages), and reads/writes by virtual address.
//! Unlike KVM_TRANSLATE this needs no vCPU and works with any address space's CR3.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

use crate::arch::x86_64::paging::{PTE_ADDR_MASK, PTE_PAGE_SIZE, PTE_PRESENT, PTE_WRITABLE};

/// Why a guest-virtual address could not be translated or accessed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WalkError {
    /// Bits 63..47 of the address are not all equal.
    #[error("virtual address {va:#x} is not canonical")]
    NonCanonical {
        /// The address.
        va: u64,
    },
    /// A page-table entry on the way is not present.
    #[error("virtual address {va:#x} is not mapped (level {level} entry {entry:#x} not present)")]
    NotMapped {
        /// The address being translated.
        va: u64,
        /// Level of that entry: 4 (PML4) down to 1 (PTE).
        level: u8,
        /// The entry's raw value.
        entry: u64,
    },
    /// A page-table entry lies outside guest memory.
    #[error("page table at gpa {gpa:#x} (walking {va:#x}) is outside guest memory")]
    BadTable {
        /// The address being translated.
        va: u64,
        /// Guest-physical address of the entry.
        gpa: u64,
    },
    /// Reading or writing guest memory at a translated address failed.
    #[error("guest memory access at gpa {gpa:#x} failed")]
    Memory {
        /// Guest-physical address of the access.
        gpa: u64,
    },
}

/// A translated address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address the virtual address maps to.
    pub gpa: u64,
    /// Size of the page that maps it (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
    /// Writable at every level.
    pub writable: bool,
}

fn canonical(va: u64) -> bool {
    let top = va >> 47;
    top == 0 || top == 0x1ffff
}

/// Translates `va` through the tables rooted at `cr3`.
pub fn translate(mem: &GuestMem, cr3: u64, va: u64) -> Result<Translation, WalkError> {
    if !canonical(va) {
        return Err(WalkError::NonCanonical { va });
    }
    let mut table = cr3 & PTE_ADDR_MASK;
    let mut writable = true;
    for level in (1..=4u8).rev() {
        let shift = 12 + 9 * (level as u64 - 1);
        let idx = (va >> shift) & 0x1ff;
        let gpa = table + idx * 8;
        let entry: u64 = mem
            .read_obj(GuestAddress(gpa))
            .map_err(|_| WalkError::BadTable { va, gpa })?;
        if entry & PTE_PRESENT == 0 {
            return Err(WalkError::NotMapped { va, level, entry });
        }
        writable &= entry & PTE_WRITABLE != 0;
        let leaf = level == 1 || ((level == 2 || level == 3) && entry & PTE_PAGE_SIZE != 0);
        if leaf {
            let page_size = 1u64 << shift;
            let base = entry & PTE_ADDR_MASK & !(page_size - 1);
            return Ok(Translation {
                gpa: base | (va & (page_size - 1)),
                page_size,
                writable,
            });
        }
        table = entry & PTE_ADDR_MASK;
    }
    unreachable!("level 1 is always a leaf")
}

/// Guest-virtual memory access in one address space.
pub struct GuestVirt<'a> {
    /// Guest physical memory.
    pub mem: &'a GuestMem,
    /// Guest-physical address of the PML4, as in CR3 (flag bits are masked off).
    pub cr3: u64,
}

impl<'a> GuestVirt<'a> {
    /// Access through the page tables rooted at `cr3`.
    pub fn new(mem: &'a GuestMem, cr3: u64) -> Self {
        Self { mem, cr3 }
    }

    /// Translates `va` in this address space (see [`translate`]).
    pub fn translate(&self, va: u64) -> Result<Translation, WalkError> {
        translate(self.mem, self.cr3, va)
    }

    /// Calls `f(gpa, offset_in_buf, len)` for each physically contiguous piece of `[va, va+len)`.
    fn for_each_piece(
        &self,
        va: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), WalkError>,
    ) -> Result<(), WalkError> {
        let mut done = 0usize;
        while done < len {
            let cur = va.wrapping_add(done as u64);
            let t = self.translate(cur)?;
            let in_page = (t.page_size - (t.gpa & (t.page_size - 1))) as usize;
            let n = in_page.min(len - done);
            f(t.gpa, done, n)?;
            done += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `va`.
    pub fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        let mem = self.mem;
        self.for_each_piece(va, buf.len(), |gpa, off, n| {
            mem.read_slice(&mut buf[off..off + n], GuestAddress(gpa))
                .map_err(|_| WalkError::Memory { gpa })
        })
    }

    /// Writes `data` at `va` (ignores the guest's write-protection bits: the VMM is the
    /// hardware here, like a debugger writing kernel text).
    pub fn write(&self, va: u64, data: &[u8]) -> Result<(), WalkError> {
        let mem = self.mem;
        self.for_each_piece(va, data.len(), |gpa, off, n| {
            mem.write_slice(&data[off..off + n], GuestAddress(gpa))
                .map_err(|_| WalkError::Memory { gpa })
        })
    }

    /// Reads a little-endian u64 at `va`.
    pub fn read_u64(&self, va: u64) -> Result<u64, WalkError> {
        let mut b = [0u8; 8];
        self.read(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian u32 at `va`.
    pub fn read_u32(&self, va: u64) -> Result<u32, WalkError> {
        let mut b = [0u8; 4];
        self.read(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    /// Builds: va 0xffff_8880_0000_0000 -> 1 GiB page at 0; va 0xffff_ffff_8000_0000 ->
    /// 2 MiB pages at 0x100_0000; va 0xffff_c900_0000_0000 -> 4 KiB page at 0x30_5000.
    fn setup() -> (GuestMem, u64) {
        let mem = create_guest_memory(64 << 20).unwrap();
        let w = |gpa: u64, v: u64| mem.write_obj(v, GuestAddress(gpa)).unwrap();
        let cr3 = 0x10_0000;
        let idx = |va: u64, level: u32| (va >> (12 + 9 * (level - 1))) & 0x1ff;
        // direct map, 1 GiB page, read-only
        let dm = 0xffff_8880_0000_0000u64;
        w(cr3 + idx(dm, 4) * 8, 0x10_1000 | 3);
        w(0x10_1000 + idx(dm, 3) * 8, PTE_PAGE_SIZE | PTE_PRESENT);
        // kernel text, 2 MiB pages
        let kt = 0xffff_ffff_8000_0000u64;
        w(cr3 + idx(kt, 4) * 8, 0x10_2000 | 3);
        w(0x10_2000 + idx(kt, 3) * 8, 0x10_3000 | 3);
        w(0x10_3000, 0x100_0000 | PTE_PAGE_SIZE | 3);
        w(0x10_3008, 0x120_0000 | PTE_PAGE_SIZE | 3);
        // vmalloc-ish, 4 KiB page
        let vm = 0xffff_c900_0000_0000u64;
        w(cr3 + idx(vm, 4) * 8, 0x10_4000 | 3);
        w(0x10_4000, 0x10_5000 | 3);
        w(0x10_5000, 0x10_6000 | 3);
        w(0x10_6000, 0x30_5000 | 3);
        (mem, cr3)
    }

    #[test]
    fn translates_all_page_sizes() {
        let (mem, cr3) = setup();
        let t = translate(&mem, cr3, 0xffff_8880_0123_4567).unwrap();
        assert_eq!(
            t,
            Translation {
                gpa: 0x123_4567,
                page_size: 1 << 30,
                writable: false
            }
        );
        let t = translate(&mem, cr3, 0xffff_ffff_8020_0010).unwrap();
        assert_eq!((t.gpa, t.page_size, t.writable), (0x120_0010, 2 << 20, true));
        let t = translate(&mem, cr3, 0xffff_c900_0000_0abc).unwrap();
        assert_eq!((t.gpa, t.page_size), (0x30_5abc, 4096));
    }

    #[test]
    fn reports_unmapped_and_noncanonical() {
        let (mem, cr3) = setup();
        assert!(matches!(
            translate(&mem, cr3, 0xffff_c900_0000_1000),
            Err(WalkError::NotMapped { level: 1, .. })
        ));
        assert!(matches!(
            translate(&mem, cr3, 0x1000),
            Err(WalkError::NotMapped { level: 4, .. })
        ));
        assert_eq!(
            translate(&mem, cr3, 0x0000_8000_0000_0000),
            Err(WalkError::NonCanonical {
                va: 0x0000_8000_0000_0000
            })
        );
    }

    #[test]
    fn reads_and_writes_across_page_boundaries() {
        let (mem, cr3) = setup();
        let g = GuestVirt::new(&mem, cr3);
        // Crosses from the first 2 MiB kernel page into the second.
        let va = 0xffff_ffff_801f_fffc;
        g.write(va, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let mut b = [0u8; 8];
        g.read(va, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        let hi: u32 = mem.read_obj(GuestAddress(0x120_0000)).unwrap();
        assert_eq!(hi, u32::from_le_bytes([5, 6, 7, 8]));
        assert_eq!(g.read_u64(va).unwrap(), u64::from_le_bytes(b));
        // A read running into an unmapped page fails.
        assert!(g.read(0xffff_c900_0000_0ffc, &mut b).is_err());
    }
}
