//! Looking into the running guest from outside: guest-virtual memory access through the
//! guest's own page tables, the kernel's symbols and struct layouts (BTF), its tasks, the
//! per-CPU stacks its CPUs run on, patch code registered as a module (and its debug
//! descriptors), and whether it is shutting down or panicking; the vmlinux they are parsed
//! from, read once.

pub mod btf;
pub mod dyndbg;
pub mod kernel;
pub mod kmods;
pub mod modules;
pub mod pagewalk;
pub mod rbtree;
pub mod shutdown;
pub mod stacks;
pub mod tasks;
pub mod vmlinux;

pub use kernel::GuestKernel;
pub use pagewalk::{GuestVirt, WalkError};
pub use tasks::{list_tasks, TaskInfo};
pub use vmlinux::Vmlinux;
