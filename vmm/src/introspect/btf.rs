//! Kernel struct layouts from the BTF in the vmlinux `.BTF` section (btf-rs), so the VMM
//! finds `task_struct` fields without hard-coding offsets for one kernel build.

use std::path::PathBuf;

use btf_rs::{Btf, Struct, Type};
use object::{Object, ObjectSection};
use thiserror::Error;

use super::Vmlinux;

/// Why kernel struct layouts could not be read from the vmlinux's BTF.
#[derive(Debug, Error)]
pub enum BtfError {
    /// The vmlinux, or its `.BTF` section, cannot be read as ELF.
    #[error("'{path}' is not an ELF file: {source}")]
    Elf {
        /// The vmlinux.
        path: PathBuf,
        /// The ELF parser's error.
        source: object::Error,
    },
    /// The vmlinux has no `.BTF` section (kernel built without `CONFIG_DEBUG_INFO_BTF`).
    #[error("'{path}' has no .BTF section: build the guest kernel with CONFIG_DEBUG_INFO_BTF=y (needs pahole)")]
    Missing {
        /// The vmlinux.
        path: PathBuf,
    },
    /// The `.BTF` section does not parse.
    #[error("the .BTF section of '{path}' is invalid: {source}")]
    Parse {
        /// The vmlinux.
        path: PathBuf,
        /// The BTF parser's error.
        source: btf_rs::Error,
    },
    /// The BTF has no complete struct of this name.
    #[error("BTF has no struct '{0}'")]
    NoStruct(String),
    /// A struct has no member of this name (on a path like `thread.sp`).
    #[error("BTF struct '{strukt}' has no member '{member}'")]
    NoMember {
        /// The struct (or, for a nested path, the member) looked in.
        strukt: String,
        /// The member not found.
        member: String,
    },
    /// The member is a bitfield or not byte aligned, so it has no byte offset.
    #[error("BTF member '{0}' is a bitfield or not byte aligned")]
    Bitfield(String),
    /// The member (`struct.member`) is not an array.
    #[error("BTF member '{0}' is not an array")]
    NotArray(String),
}

/// The kernel's BTF.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    /// Parses BTF from a vmlinux ELF's `.BTF` section.
    pub fn from_vmlinux(vmlinux: &Vmlinux) -> Result<Self, BtfError> {
        let path = vmlinux.path();
        let elf = object::File::parse(vmlinux.bytes()).map_err(|source| BtfError::Elf {
            path: path.into(),
            source,
        })?;
        let sec = elf
            .section_by_name(".BTF")
            .ok_or_else(|| BtfError::Missing { path: path.into() })?;
        let bytes = sec.data().map_err(|source| BtfError::Elf {
            path: path.into(),
            source,
        })?;
        let btf = Btf::from_bytes(bytes).map_err(|source| BtfError::Parse {
            path: path.into(),
            source,
        })?;
        Ok(Self { btf })
    }

    fn strukt(&self, name: &str) -> Result<Struct, BtfError> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| BtfError::NoStruct(name.into()))?;
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if s.size() > 0 => Some(s),
                _ => None,
            })
            .ok_or_else(|| BtfError::NoStruct(name.into()))
    }

    /// Follows typedefs and qualifiers.
    fn strip(&self, mut t: Type) -> Type {
        loop {
            let next = match &t {
                Type::Typedef(x) => self.btf.resolve_chained_type(x),
                Type::Const(x) | Type::Volatile(x) | Type::Restrict(x) => self.btf.resolve_chained_type(x),
                Type::TypeTag(x) => self.btf.resolve_chained_type(x),
                _ => return t,
            };
            match next {
                Ok(n) => t = n,
                Err(_) => return t,
            }
        }
    }

    /// Finds `name` among `s`'s members, looking into anonymous struct/union members.
    /// Returns the bit offset and the member's type.
    fn find_member(&self, s: &Struct, name: &str) -> Option<(u32, Type)> {
        for m in &s.members {
            let mname = self.btf.resolve_name(m).unwrap_or_default();
            let ty = self.btf.resolve_chained_type(m).ok()?;
            if mname == name {
                return Some((m.bit_offset(), ty));
            }
            if mname.is_empty() {
                if let Type::Struct(inner) | Type::Union(inner) = self.strip(ty) {
                    if let Some((off, t)) = self.find_member(&inner, name) {
                        return Some((m.bit_offset() + off, t));
                    }
                }
            }
        }
        None
    }

    /// Bit offset and type of a member path like `thread.sp` inside `struct strukt`.
    fn member(&self, strukt: &str, path: &str) -> Result<(u64, Type), BtfError> {
        let mut cur = self.strukt(strukt)?;
        let mut cur_name = strukt.to_string();
        let mut bits = 0u64;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (off, ty) = self.find_member(&cur, part).ok_or_else(|| BtfError::NoMember {
                strukt: cur_name.clone(),
                member: part.to_string(),
            })?;
            bits += off as u64;
            if i + 1 == parts.len() {
                return Ok((bits, ty));
            }
            match self.strip(ty) {
                Type::Struct(s) | Type::Union(s) => {
                    cur_name = self.btf.resolve_name(&s).unwrap_or_default();
                    cur = s;
                }
                _ => {
                    return Err(BtfError::NoMember {
                        strukt: part.to_string(),
                        member: parts[i + 1].to_string(),
                    })
                }
            }
        }
        Err(BtfError::NoMember {
            strukt: strukt.into(),
            member: path.into(),
        })
    }

    /// Byte offset of a member path like `thread.sp` inside `struct strukt`.
    pub fn offset_of(&self, strukt: &str, path: &str) -> Result<u64, BtfError> {
        let (bits, _) = self.member(strukt, path)?;
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Bitfield(path.into()));
        }
        Ok(bits / 8)
    }

    /// Number of elements of the array member `path` of `struct strukt`.
    pub fn array_len(&self, strukt: &str, path: &str) -> Result<usize, BtfError> {
        match self.member(strukt, path)?.1 {
            Type::Array(a) => Ok(a.len()),
            _ => Err(BtfError::NotArray(format!("{strukt}.{path}"))),
        }
    }

    /// Size of `struct name`.
    pub fn size_of(&self, name: &str) -> Result<u64, BtfError> {
        Ok(self.strukt(name)?.size() as u64)
    }
}
