//! Looking into the running guest from outside: guest-virtual memory access through the
//! guest's own page tables, and (later) kernel data structures via BTF.

pub mod btf;
pub mod pagewalk;

pub use pagewalk::{GuestVirt, WalkError};
