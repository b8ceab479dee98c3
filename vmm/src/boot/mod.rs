//! Everything the VMM writes into the guest before its first instruction.

pub mod cpuid;
pub mod gdt;
pub mod loader;
pub mod mptable;
pub mod paging;
pub mod params;
pub mod regs;
