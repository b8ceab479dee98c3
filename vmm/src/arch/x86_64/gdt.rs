//! Descriptors: the boot GDT (the 64-bit boot protocol requires flat `__BOOT_CS` (0x10) and
//! `__BOOT_DS` (0x18) descriptors; the kernel loads its own GDT right away), the flat
//! segments lucos builds for guest calls and the PVM fallbacks, and 64-bit IDT gates.

use kvm_bindings::kvm_segment;

/// Selector of the boot code segment.
pub const BOOT_CS: u16 = 0x10;
/// Selector of the boot data segment.
pub const BOOT_DS: u16 = 0x18;
/// Selector of the boot TSS.
pub const BOOT_TSS: u16 = 0x20;

/// Linux's `__KERNEL_CS` on x86-64 (the same selector as the boot code segment).
pub const KERNEL_CS: u16 = BOOT_CS;

/// Descriptor flags (access byte in bits 0..7, G/D/L/AVL in bits 12..15) for [`gdt_entry`]:
/// flat 64-bit kernel code (present, DPL 0, exec/read, accessed, L, G).
pub const FLAGS_KERNEL_CODE64: u16 = 0xa09b;
/// Flat kernel data (present, DPL 0, read/write, accessed, D/B, G).
pub const FLAGS_KERNEL_DATA: u16 = 0xc093;
/// Flat 64-bit user code (present, DPL 3, exec/read, accessed, L, G).
pub const FLAGS_USER_CODE64: u16 = 0xa0fb;
/// Flat user data (present, DPL 3, read/write, accessed, D/B, G).
pub const FLAGS_USER_DATA: u16 = 0xc0f3;
/// Flat 32-bit user code (present, DPL 3, exec/read, accessed, D/B, G).
pub const FLAGS_USER_CODE32: u16 = 0xc0fb;
/// A busy 64-bit TSS.
pub const FLAGS_TSS64_BUSY: u16 = 0x808b;
/// The largest 20-bit limit (4 GiB with G set): the flat segments' limit.
pub const FLAT_LIMIT: u32 = 0xfffff;

/// Builds a GDT descriptor from flags (bits 8..15 access, 20..23 G/D/L/AVL), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, null, code64, data, TSS.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(FLAGS_KERNEL_CODE64, 0, FLAT_LIMIT),
        gdt_entry(FLAGS_KERNEL_DATA, 0, FLAT_LIMIT),
        gdt_entry(FLAGS_TSS64_BUSY, 0, FLAT_LIMIT),
    ]
}

/// Converts a descriptor at `index` into the KVM segment register form.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
            if (entry >> 55) & 1 == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: (index as u16) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// A 64-bit interrupt gate (DPL 0, no IST) to `target` through code segment `cs`.
pub fn idt_gate(target: u64, cs: u16) -> [u8; 16] {
    let lo = (target & 0xffff) | (u64::from(cs) << 16) | (0x8e00u64 << 32) | ((target >> 16) & 0xffff) << 48;
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&lo.to_le_bytes());
    g[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
    g
}

/// Target of a 64-bit IDT gate.
pub fn gate_target(gate: &[u8; 16]) -> u64 {
    let w = |i: usize| u64::from(u16::from_le_bytes([gate[i], gate[i + 1]]));
    let hi = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
    w(0) | (w(6) << 16) | (hi << 32)
}

/// The first 8 bytes of `gate` with its target changed to `target` (same upper 32 bits).
pub fn retarget_low(gate: &[u8; 16], target: u64) -> u64 {
    let mut lo = u64::from_le_bytes(gate[..8].try_into().unwrap_or([0; 8]));
    lo &= 0x0000_ffff_ffff_0000;
    lo |= (target & 0xffff) | ((target >> 16) & 0xffff) << 48;
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_flat_long_mode() {
        let gdt = boot_gdt();
        let cs = kvm_segment_from_gdt(gdt[2], 2);
        assert_eq!(cs.selector, BOOT_CS);
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        assert_eq!((cs.l, cs.db, cs.g, cs.present, cs.s, cs.dpl), (1, 0, 1, 1, 1, 0));
        assert_eq!(cs.type_, 0xb);
        let ds = kvm_segment_from_gdt(gdt[3], 3);
        assert_eq!(ds.selector, BOOT_DS);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tss = kvm_segment_from_gdt(gdt[4], 4);
        assert_eq!(tss.selector, BOOT_TSS);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
    }

    #[test]
    fn known_encodings() {
        // Same values as the Linux boot GDT / Firecracker.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn gates_round_trip() {
        let g = idt_gate(0xffff_ffff_8160_0a70, KERNEL_CS);
        assert_eq!(gate_target(&g), 0xffff_ffff_8160_0a70);
        assert_eq!(u16::from_le_bytes([g[2], g[3]]), KERNEL_CS);
        assert_eq!(g[5], 0x8e, "present, DPL 0, 64-bit interrupt gate");
        let lo = retarget_low(&g, 0xffff_ffff_9fe0_0000);
        let mut g2 = g;
        g2[..8].copy_from_slice(&lo.to_le_bytes());
        assert_eq!(gate_target(&g2), 0xffff_ffff_9fe0_0000);
    }
}
