//! VM configuration.

use std::path::PathBuf;

use thiserror::Error;

use crate::host::CpuPolicy;

/// Why a VM configuration is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A memory size does not parse as a number with an optional K/M/G suffix, or overflows.
    #[error("invalid memory size '{0}': expected a number with an optional K/M/G suffix, e.g. 512M")]
    BadMemSize(String),
    /// Less than [`MIN_MEM_MIB`] of RAM; the value is the size asked for, in MiB.
    #[error("memory size {0} MiB is too small: the guest needs at least {MIN_MEM_MIB} MiB")]
    MemTooSmall(u64),
    /// More than [`MAX_MEM_MIB`] of RAM; the value is the size asked for, in MiB.
    #[error("memory size {0} MiB is too large: at most {MAX_MEM_MIB} MiB is supported")]
    MemTooLarge(u64),
    /// A vCPU count of 0 or more than [`MAX_VCPUS`].
    #[error("vCPU count {0} is out of range: 1..={MAX_VCPUS}")]
    BadVcpus(u8),
    /// A guest CID outside `3..u32::MAX` (0 to 2 are reserved, `u32::MAX` means any).
    #[error("vsock CID {0} is reserved: guest CIDs are 3..=4294967294")]
    BadVsockCid(u64),
}

/// Smallest useful guest.
pub const MIN_MEM_MIB: u64 = 64;
/// Largest guest this VMM sets up (keeps page tables and e820 simple).
pub const MAX_MEM_MIB: u64 = 64 * 1024;
/// Most vCPUs (MP table, kernel NR_CPUS in images/guest.config).
pub const MAX_VCPUS: u8 = 8;

/// Everything needed to boot a guest.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Path of the guest kernel: an uncompressed vmlinux ELF.
    pub kernel: PathBuf,
    /// Initrd to load, if any.
    pub initrd: Option<PathBuf>,
    /// Kernel command line as given; [`kernel_cmdline`](Self::kernel_cmdline) adds the
    /// device words.
    pub cmdline: String,
    /// Guest RAM in bytes ([`MIN_MEM_MIB`] to [`MAX_MEM_MIB`] MiB).
    pub mem_bytes: u64,
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpus: u8,
    /// The guest's vsock CID; `None` leaves out the virtio-vsock device.
    pub vsock_cid: Option<u64>,
    /// The CPU model for this host's KVM ([`CpuPolicy::detect`]).
    pub cpu: CpuPolicy,
}

impl VmConfig {
    /// The kernel command line the guest boots with: [`VmConfig::cmdline`] plus the words
    /// that announce the devices lucos-vmm attaches.
    pub fn kernel_cmdline(&self) -> String {
        match self.vsock_cid {
            Some(_) => format!("{} {}", self.cmdline, crate::vm::vsock_cmdline()),
            None => self.cmdline.clone(),
        }
    }
}

/// Default guest CID (the first one that is not reserved: 0 hypervisor, 1 local, 2 host).
pub const DEFAULT_VSOCK_CID: u64 = 3;

impl VmConfig {
    /// Checks sizes and counts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mib = self.mem_bytes >> 20;
        if mib < MIN_MEM_MIB {
            return Err(ConfigError::MemTooSmall(mib));
        }
        if mib > MAX_MEM_MIB {
            return Err(ConfigError::MemTooLarge(mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::BadVcpus(self.vcpus));
        }
        if let Some(cid) = self.vsock_cid {
            // Linux keeps CIDs in 32 bits; u32::MAX is VMADDR_CID_ANY.
            if !(3..u32::MAX as u64).contains(&cid) {
                return Err(ConfigError::BadVsockCid(cid));
            }
        }
        Ok(())
    }
}

/// Parses `512M`, `2G`, `65536K` or a plain byte count.
pub fn parse_mem_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadMemSize(s.to_string());
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_mem_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_mem_size("4096").unwrap(), 4096);
        assert_eq!(parse_mem_size("64K").unwrap(), 64 << 10);
        assert!(parse_mem_size("12X").is_err());
        assert!(parse_mem_size("M").is_err());
        assert!(parse_mem_size("").is_err());
        assert!(parse_mem_size("99999999999999999G").is_err());
    }

    #[test]
    fn validate_limits() {
        let mut c = VmConfig {
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
            mem_bytes: 512 << 20,
            vcpus: 2,
            vsock_cid: Some(3),
            cpu: CpuPolicy::for_host(crate::host::HostKvm::KvmAmd),
        };
        assert!(c.validate().is_ok());
        c.vsock_cid = Some(2);
        assert_eq!(c.validate(), Err(ConfigError::BadVsockCid(2)));
        c.vsock_cid = Some(u32::MAX as u64);
        assert_eq!(c.validate(), Err(ConfigError::BadVsockCid(u32::MAX as u64)));
        c.vsock_cid = None;
        assert!(c.validate().is_ok());
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::BadVcpus(0)));
        c.vcpus = 1;
        c.mem_bytes = 1 << 20;
        assert_eq!(c.validate(), Err(ConfigError::MemTooSmall(1)));
    }
}
