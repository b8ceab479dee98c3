//! The guest kernel's vmlinux, read from disk once. The loader copies its segments into
//! guest memory; the symbol table, the BTF and the `linux_banner` bytes are parsed from the
//! same bytes. (A vmlinux with DWARF is ~100 MB: reading it once per use cost seconds on a
//! shared file system.) Dropped once the VM and the update server have what they need.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why the vmlinux could not be read.
#[derive(Debug, Error)]
#[error("cannot open kernel '{path}': {source}")]
pub struct VmlinuxError {
    /// The file.
    pub path: PathBuf,
    /// What failed.
    pub source: std::io::Error,
}

/// The bytes of a vmlinux ELF file, with its path for messages.
pub struct Vmlinux {
    path: PathBuf,
    data: Vec<u8>,
}

impl Vmlinux {
    /// Reads the whole file.
    pub fn read(path: &Path) -> Result<Self, VmlinuxError> {
        let data = std::fs::read(path).map_err(|source| VmlinuxError {
            path: path.into(),
            source,
        })?;
        Ok(Vmlinux {
            path: path.into(),
            data,
        })
    }

    /// Where it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its contents.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}
