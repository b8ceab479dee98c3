//! lucos-vmm: a small KVM virtual machine monitor that boots an unmodified
//! x86-64 Linux guest (direct 64-bit boot of an uncompressed vmlinux) and hosts
//! the lucos update server.
//!
//! Module map:
//! - [`config`]: the VM's configuration (memory size, vCPUs, kernel, initrd, cmdline).
//! - [`layout`]: the guest-physical memory map.
//! - [`memory`]: guest RAM allocation and KVM memslots.
//! - [`arch`]: x86-64 knowledge in one place: register bits, MSRs, GDT and IDT gates, page
//!   tables, CPUID, boot_params/e820, MP table, boot registers, exception injection.
//! - [`loader`]: loading the kernel ELF, the initramfs and the command line.
//! - [`devices`]: port-I/O devices (8250 serial, i8042 reset) and the virtio-mmio vsock
//!   device, with the port-I/O and MMIO buses.
//! - [`vcpu`]: vCPU threads, their run loop and kicking them out of KVM_RUN.
//! - [`pause`]: stopping every vCPU (for a patch) and letting them go again.
//! - [`introspect`]: looking into the running guest kernel: the vmlinux (read once), its
//!   BTF layouts, guest-virtual memory through its page tables, its task list.
//! - [`symbols`]: the vmlinux symbol table, by name and by address.
//! - [`profile`]: `--profile`, sampling where the vCPUs are.
//! - [`fault`]: decoding and reporting guest exits the VMM cannot handle.
//! - [`console`]: the host terminal side of the serial console.
//! - [`host`]: what the host's KVM is, and the guest CPU model (CPUID, command line,
//!   workarounds) lucos-vmm picks for it.
//! - [`pvm`], [`quirks`]: running on PVM and other software-assisted KVMs.
//! - [`protect`]: write protection of guest pages through read-only memslots.
//! - [`rmw`]: identifying the instruction behind a trapped write and redoing a locked
//!   read-modify-write atomically.
//! - [`guestcall`]: running a guest kernel function (a patch callback) on a vCPU at a safe
//!   point, in a private environment, and restoring the vCPU.
//! - [`update`]: the update server's view of the VM (its `Guest` trait) and its start-up.
//! - [`microvm`]: a ten-instruction guest for fast tests and benchmarks on the real KVM.
//! - [`ratelimit`]: rate-limited logging of what the guest can trigger at will.
//! - [`events`]: what devices and vCPUs report to the main thread, and why a VM stopped.
//! - [`vm`]: puts it all together and runs the guest until it stops.

pub mod arch;
pub mod config;
pub mod console;
pub mod devices;
pub mod events;
pub mod fault;
pub mod guestcall;
pub mod host;
pub mod introspect;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod microvm;
pub mod pause;
pub mod profile;
pub mod protect;
pub mod pvm;
pub mod quirks;
pub mod ratelimit;
pub mod rmw;
pub mod symbols;
pub mod update;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use events::ExitReason;
pub use vm::{Vm, VmError, VmHandle};
