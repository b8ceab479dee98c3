//! The zero page (`struct boot_params`): setup header fields for a direct vmlinux boot,
//! the e820 memory map, command line and initrd location.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use thiserror::Error;
use vm_memory::GuestAddress;

use crate::layout::{EBDA_END, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, ZERO_PAGE_START};
use crate::memory::GuestMem;

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved (EBDA, patch region): the kernel does not use it.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// Max e820 entries in boot_params.
const E820_MAX: usize = 128;

/// Why the boot parameters could not be built or written.
#[derive(Debug, Error)]
pub enum ParamsError {
    /// The e820 map has more entries than `boot_params` holds (128); the value is the count.
    #[error("too many e820 entries: {0}")]
    TooManyE820(usize),
    /// Writing the zero page to guest memory failed.
    #[error("writing boot_params to guest memory: {0}")]
    Write(#[from] linux_loader::configurator::Error),
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest-physical start.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The e820 map for `mem_bytes` of RAM, with `reserved` ranges (e.g. a region the VMM keeps
/// for itself) carved out of RAM and reported as reserved.
pub fn e820_map(mem_bytes: u64, reserved: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut ram = vec![(0, EBDA_START)];
    if mem_bytes <= MMIO_GAP_START {
        ram.push((HIMEM_START, mem_bytes));
    } else {
        ram.push((HIMEM_START, MMIO_GAP_START));
        ram.push((MMIO_GAP_END, MMIO_GAP_END + mem_bytes - MMIO_GAP_START));
    }
    // Carve reserved ranges out of RAM.
    for &(rs, rsz) in reserved {
        let re = rs + rsz;
        ram = ram
            .into_iter()
            .flat_map(|(s, e)| {
                let mut parts = Vec::new();
                if re <= s || rs >= e {
                    parts.push((s, e));
                } else {
                    if s < rs {
                        parts.push((s, rs));
                    }
                    if re < e {
                        parts.push((re, e));
                    }
                }
                parts
            })
            .collect();
    }
    let mut map: Vec<E820Entry> = ram
        .into_iter()
        .map(|(s, e)| E820Entry {
            addr: s,
            size: e - s,
            kind: E820_RAM,
        })
        .collect();
    map.push(E820Entry {
        addr: EBDA_START,
        size: EBDA_END - EBDA_START,
        kind: E820_RESERVED,
    });
    for &(addr, size) in reserved {
        map.push(E820Entry {
            addr,
            size,
            kind: E820_RESERVED,
        });
    }
    map.sort_by_key(|e| e.addr);
    map
}

/// Where the initrd was loaded.
#[derive(Debug, Clone, Copy)]
pub struct InitrdLocation {
    /// Guest-physical address the initrd was loaded at.
    pub addr: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// Builds the boot_params for a direct vmlinux boot.
pub fn build_boot_params(
    e820: &[E820Entry],
    cmdline_addr: u64,
    cmdline_size: usize,
    initrd: Option<InitrdLocation>,
) -> Result<boot_params, ParamsError> {
    if e820.len() > E820_MAX {
        return Err(ParamsError::TooManyE820(e820.len()));
    }
    let mut p = boot_params::default();
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    p.hdr.cmd_line_ptr = cmdline_addr as u32;
    p.hdr.cmdline_size = cmdline_size as u32;
    if let Some(i) = initrd {
        p.hdr.ramdisk_image = i.addr as u32;
        p.hdr.ramdisk_size = i.size as u32;
    }
    for (i, e) in e820.iter().enumerate() {
        p.e820_table[i].addr = e.addr;
        p.e820_table[i].size = e.size;
        p.e820_table[i].r#type = e.kind;
    }
    p.e820_entries = e820.len() as u8;
    Ok(p)
}

/// Writes boot_params to the zero page.
pub fn write_boot_params(mem: &GuestMem, params: &boot_params) -> Result<(), ParamsError> {
    LinuxBootConfigurator::write_bootparams::<GuestMem>(
        &BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn total(map: &[E820Entry], kind: u32) -> u64 {
        map.iter().filter(|e| e.kind == kind).map(|e| e.size).sum()
    }

    #[test]
    fn small_guest_map() {
        let m = e820_map(512 << 20, &[]);
        assert_eq!(
            m[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(
            m[2],
            E820Entry {
                addr: HIMEM_START,
                size: (512 << 20) - HIMEM_START,
                kind: E820_RAM
            }
        );
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn large_guest_skips_hole() {
        let m = e820_map(6 << 30, &[]);
        let high = m.iter().find(|e| e.addr == MMIO_GAP_END).unwrap();
        assert_eq!(high.size, (6 << 30) - MMIO_GAP_START);
        assert!(m
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }

    #[test]
    fn reserved_region_is_carved_out() {
        let mem = 512u64 << 20;
        let res = (mem - (16 << 20), 16 << 20);
        let m = e820_map(mem, &[res]);
        assert!(m.contains(&E820Entry {
            addr: res.0,
            size: res.1,
            kind: E820_RESERVED
        }));
        assert_eq!(total(&m, E820_RAM), EBDA_START + mem - HIMEM_START - res.1);
        // No RAM entry overlaps the reserved one.
        assert!(m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .all(|e| e.addr + e.size <= res.0 || e.addr >= res.0 + res.1));
    }

    #[test]
    fn boot_params_fields() {
        let e820 = e820_map(256 << 20, &[]);
        let p = build_boot_params(
            &e820,
            0x20000,
            100,
            Some(InitrdLocation {
                addr: 0x800_0000,
                size: 4096,
            }),
        )
        .unwrap();
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 4096);
        assert_eq!(p.e820_entries as usize, e820.len());
        assert_eq!({ p.e820_table[2].addr }, HIMEM_START);

        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        write_boot_params(&mem, &p).unwrap();
        let back: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ back.hdr.header }, KERNEL_HDR_MAGIC);
    }
}
