//! x86-64 knowledge in one place: register bits, MSRs, descriptors (GDT and IDT gates),
//! page tables, CPUID, and the structures the boot protocol reads (boot_params, MP table).
//! Boot code and run-time code (guest calls, the PVM shim, fault decoding, introspection)
//! import CPU facts from here and nowhere else.

pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod params;
pub mod regs;

/// RFLAGS.IF: maskable interrupts enabled.
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS.CF: carry.
pub const RFLAGS_CF: u64 = 1 << 0;
/// RFLAGS.PF: parity.
pub const RFLAGS_PF: u64 = 1 << 2;
/// RFLAGS.AF: auxiliary carry.
pub const RFLAGS_AF: u64 = 1 << 4;
/// RFLAGS.ZF: zero.
pub const RFLAGS_ZF: u64 = 1 << 6;
/// RFLAGS.SF: sign.
pub const RFLAGS_SF: u64 = 1 << 7;
/// RFLAGS.OF: overflow.
pub const RFLAGS_OF: u64 = 1 << 11;
/// RFLAGS.RF: resume flag (suppresses instruction breakpoints for one instruction).
pub const RFLAGS_RF: u64 = 1 << 16;
/// RFLAGS bit 1, always set.
pub const RFLAGS_FIXED: u64 = 1 << 1;

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NW and CR0.CD: caches write-through / disabled.
pub const CR0_NW_CD: u64 = (1 << 29) | (1 << 30);
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (needed for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// A base page.
pub const PAGE_SIZE: u64 = 4096;

/// Exception vectors lucos injects or recognises.
pub mod vector {
    /// #BP, breakpoint (`int3`).
    pub const BP: u8 = 3;
    /// #MF, x87 floating-point error.
    pub const MF: u8 = 16;
    /// #PF, page fault.
    pub const PF: u8 = 14;
}
