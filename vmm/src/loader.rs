//! Loads the kernel (uncompressed vmlinux ELF, via linux-loader), the initrd and the
//! command line into guest memory.

use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::arch::x86_64::PAGE_SIZE;
use crate::introspect::Vmlinux;
use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, INITRD_ADDR_MAX};
use crate::memory::GuestMem;

/// Why the kernel, initrd or command line could not be loaded.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// The kernel file is not a loadable x86-64 ELF (e.g. it is a bzImage).
    #[error(
        "kernel '{path}' is not a loadable x86-64 vmlinux ELF ({source}); pass the uncompressed vmlinux, not a bzImage"
    )]
    BadKernel {
        /// The kernel file.
        path: PathBuf,
        /// linux-loader's error.
        source: linux_loader::loader::Error,
    },
    /// The initrd file cannot be read.
    #[error("cannot read initrd '{path}': {source}")]
    ReadInitrd {
        /// The initrd file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The initrd file is empty.
    #[error("initrd '{path}' is empty")]
    EmptyInitrd {
        /// The initrd file.
        path: PathBuf,
    },
    /// The initrd does not fit between the kernel's end and the highest address it may end at.
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x} after the kernel (ends at {kernel_end:#x}); give the guest more memory")]
    InitrdTooLarge {
        /// Initrd size in bytes.
        size: u64,
        /// Address it must end below: the end of low RAM (or the patch region), at most
        /// `INITRD_ADDR_MAX + 1`.
        limit: u64,
        /// First byte after the kernel image.
        kernel_end: u64,
    },
    /// Writing the initrd to guest memory failed.
    #[error("writing initrd to guest memory: {0}")]
    WriteInitrd(vm_memory::GuestMemoryError),
    /// The command line is not acceptable to the kernel (too long, or invalid characters).
    #[error("kernel command line is invalid: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing the command line to guest memory failed.
    #[error("writing the command line to guest memory: {0}")]
    WriteCmdline(linux_loader::loader::Error),
}

/// Where the kernel went.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Physical address of the 64-bit entry point.
    pub entry: u64,
    /// First byte after the loaded image.
    pub end: u64,
}

/// Loads a vmlinux ELF at its physical load addresses.
pub fn load_kernel(mem: &GuestMem, vmlinux: &Vmlinux) -> Result<LoadedKernel, LoaderError> {
    let mut f = std::io::Cursor::new(vmlinux.bytes());
    let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|source| LoaderError::BadKernel {
        path: vmlinux.path().into(),
        source,
    })?;
    Ok(LoadedKernel {
        entry: r.kernel_load.0,
        end: r.kernel_end,
    })
}

/// Chooses where an initrd of `size` bytes goes: page aligned, as high as possible below
/// both the end of low RAM and `initrd_addr_max`, and above the kernel.
pub fn initrd_placement(size: u64, low_ram_end: u64, kernel_end: u64) -> Option<u64> {
    let top = low_ram_end.min(INITRD_ADDR_MAX + 1);
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

/// Loads the initrd below `top` (exclusive); returns its address and size.
pub fn load_initrd(mem: &GuestMem, path: &Path, kernel_end: u64, top: u64) -> Result<(u64, u64), LoaderError> {
    let data = std::fs::read(path).map_err(|source| LoaderError::ReadInitrd {
        path: path.into(),
        source,
    })?;
    if data.is_empty() {
        return Err(LoaderError::EmptyInitrd { path: path.into() });
    }
    let size = data.len() as u64;
    let low_ram_end = mem
        .iter()
        .next()
        .map(vm_memory::GuestMemoryRegion::len)
        .unwrap_or(0)
        .min(top);
    let addr = initrd_placement(size, low_ram_end, kernel_end).ok_or(LoaderError::InitrdTooLarge {
        size,
        limit: low_ram_end.min(INITRD_ADDR_MAX + 1),
        kernel_end,
    })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(LoaderError::WriteInitrd)?;
    Ok((addr, size))
}

/// Writes the command line; returns its length including the NUL.
pub fn load_cmdline(mem: &GuestMem, cmdline: &str) -> Result<usize, LoaderError> {
    let c = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &c).map_err(LoaderError::WriteCmdline)?;
    Ok(cmdline.len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_goes_high_and_aligned() {
        let a = initrd_placement(10_000, 512 << 20, 0x200_0000).unwrap();
        assert_eq!(a % PAGE_SIZE, 0);
        assert!(a + 10_000 <= 512 << 20);
        assert!(a >= (512 << 20) - 2 * PAGE_SIZE - 10_000);
        // Capped by initrd_addr_max on big guests.
        let b = initrd_placement(4096, 2 << 30, 0x200_0000).unwrap();
        assert!(b + 4096 <= INITRD_ADDR_MAX + 1);
        // Does not overlap the kernel.
        assert_eq!(initrd_placement(500 << 20, 512 << 20, 0x200_0000), None);
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let dir = std::env::temp_dir().join(format!("lucos-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("garbage");
        std::fs::write(&p, b"this is not an ELF file at all, just text").unwrap();
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let e = load_kernel(&mem, &Vmlinux::read(&p).unwrap()).unwrap_err();
        assert!(matches!(e, LoaderError::BadKernel { .. }), "{e}");
        assert!(Vmlinux::read(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cmdline_written_with_nul() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let n = load_cmdline(&mem, "console=ttyS0").unwrap();
        assert_eq!(n, 14);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert!(load_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE + 1)).is_err());
    }
}
