//! Looking into the running guest from outside: guest-virtual memory access through the
//! guest's own page tables, the kernel's symbols and struct layouts (BTF), and its tasks;
//! the vmlinux they are parsed from, read once.

pub mod btf;
pub mod kernel;
pub mod modules;
pub mod pagewalk;
pub mod rbtree;
pub mod stacks;
pub mod tasks;
pub mod vmlinux;

pub use kernel::GuestKernel;
pub use pagewalk::{GuestVirt, WalkError};
pub use tasks::{list_tasks, TaskInfo};
pub use vmlinux::Vmlinux;
