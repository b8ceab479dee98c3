//! The lucos update server: applies live patches to a running guest kernel from outside
//! it. It runs inside the lucos-vmm process, next to the vCPUs it pauses.
//!
//! Modules (see docs/design.md):
//! - `protocol`: the framed wire protocol (length-prefixed JSON header + payload) spoken on
//!   the vsock host end (CID 2, fixed port) and on the VMM's Unix API socket.
//! - `client`: a client of the protocol (Unix socket or AF_VSOCK), used by `lucosctl` and
//!   the tests.
//! - `apisock`: the host's Unix API socket: safe creation and removal, peer credentials,
//!   accept back-off.
//! - `signing`: ed25519 verification of submitted modules against `--trusted-key` keys.
//! - `module`: parsing a patch module (ELF relocatable `.ko`) and its `.lucos.*` records
//!   (replaced functions, data rules, callbacks) with the `object` crate.
//! - `link`: placing sections in the VMM-reserved patch region (`alloc`) and applying
//!   relocations against guest kernel symbols.
//! - `alternatives`: the module's `ALTERNATIVE()` sites patched for the running kernel's
//!   CPU capabilities, as the kernel patched its own.
//! - `ktables`: the module's exception, BUG/WARN and ORC tables and a symbol table,
//!   readied for the guest kernel, which finds them through a `struct module` the VMM
//!   registers for the patch.
//! - `thunks`: the module's retpoline and return-thunk sites rewritten for the kernel's
//!   mitigations (spectre_v2, retbleed/SRSO return thunks, ITS), as it rewrote its own.
//! - `jumplabel`: the module's static branches (`__jump_table`) linked, set to their keys'
//!   states and put on the keys' lists so that the guest kernel updates them on a flip.
//! - `runpre`: the Ksplice-style check that each old function starts with the bytes the
//!   patch expects, decoded with iced-x86 (whole instructions only).
//! - `manager`: apply (stop the world, write `jmp rel32`, carry data over and write-protect
//!   it), callbacks, stack inspection for commit, rollback and cancel.
//! - `guest`: what the server needs from the VMM (memory, pausing, tasks, write
//!   protection, guest calls), as a trait.
//! - `service`: the request loop (`lucosctl apply|list|status|rollback|cancel`) and the
//!   periodic re-checks of transitions.

pub mod alloc;
pub mod alternatives;
pub mod apisock;
pub mod client;
pub mod guest;
pub mod jumplabel;
pub mod ktables;
pub mod link;
pub mod manager;
pub mod module;
pub mod protocol;
pub mod runpre;
pub mod service;
pub mod signing;
pub mod thunks;
