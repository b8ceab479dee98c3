//! The lucos update server: applies live patches to a running guest kernel from outside
//! it. It runs inside the lucos-vmm process, next to the vCPUs it pauses.
//!
//! Module plan (see ../shared/DESIGN.md, steps 2-7):
//! - `protocol`: the framed wire protocol (length-prefixed JSON header + payload) spoken on
//!   the vsock host end (CID 2, fixed port) and on the VMM's Unix API socket.
//! - `signing`: ed25519 verification of submitted modules against `--trusted-key` keys.
//! - `module`: parsing a patch module (ELF relocatable `.ko`) and its `.lucos.*` sections
//!   (replaced functions, changed data, callbacks) with the `object` crate.
//! - `link`: placing sections in the VMM-reserved patch region and applying relocations
//!   (R_X86_64_PC32/PLT32/32S/64) against guest kernel symbols.
//! - `runpre`: the Ksplice-style check that each old function starts with the bytes the
//!   patch expects, decoded with iced-x86 (whole instructions only).
//! - `apply`: pause all vCPUs, check no RIP is inside the bytes to overwrite, write
//!   `jmp rel32`, resume; pause time measured.
//! - `protect`: data patches via read-only memslots and state-transfer callbacks on write
//!   faults.
//! - `stack`: stack inspection over every guest task and vCPU to decide commit.
//! - `rollback`: the reverse transition.
//! - `service`: the request loop tying these together (`lucosctl apply|list|status|rollback`).

pub mod alloc;
pub mod guest;
pub mod link;
pub mod manager;
pub mod module;
pub mod protocol;
pub mod runpre;
pub mod service;
pub mod signing;
