//! Intel MultiProcessor Specification 1.4 tables, so an ACPI-less guest finds its CPUs,
//! the IOAPIC and the ISA interrupt routing. Written at the start of the EBDA.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, EBDA_END, EBDA_START, IOAPIC_PINS, IOAPIC_START};
use crate::memory::GuestMem;

const APIC_VERSION: u8 = 0x14;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MPC_SPEC: u8 = 4;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const BUS_ID_ISA: u8 = 0;

/// Why the MP table could not be written.
#[derive(Debug, Error)]
pub enum MptableError {
    /// The table for this many vCPUs does not fit between `EBDA_START` and `EBDA_END`.
    #[error("MP table for {0} vCPUs does not fit in the EBDA")]
    TooLarge(u8),
    /// Writing it to guest memory failed.
    #[error("writing the MP table to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// The MP floating pointer followed by the MP configuration table, as bytes, for a table
/// placed at `base`.
pub fn build(base: u64, vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus; // first APIC id after the CPUs
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // Identity routing of ISA IRQs to IOAPIC pins, as KVM's default irq routing does.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, BUS_ID_ISA, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, BUS_ID_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, BUS_ID_ISA, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"LUCOS   ");
    table.extend_from_slice(b"lucos-vmm   ");
    table.extend_from_slice(&0u32.to_le_bytes()); // oemptr
    table.extend_from_slice(&0u16.to_le_bytes()); // oemsize
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.extend_from_slice(&[1, MPC_SPEC, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    mpf
}

/// Writes the MP tables into the EBDA.
pub fn write(mem: &GuestMem, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(EBDA_START, vcpus);
    if EBDA_START + bytes.len() as u64 > EBDA_END {
        return Err(MptableError::TooLarge(vcpus));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for vcpus in [1u8, 2, 8] {
            let b = build(EBDA_START, vcpus);
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(b[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let t = &b[16..];
            assert_eq!(&t[0..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count as usize, vcpus as usize + 2 + IOAPIC_PINS as usize + 2);
            // The physical pointer in the floating structure points at the table.
            assert_eq!(u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as u64, EBDA_START + 16);
            // First processor entry is the BSP.
            assert_eq!(t[44], MP_PROCESSOR);
            assert_eq!(t[47], CPU_ENABLED | CPU_BOOTPROCESSOR);
        }
    }

    #[test]
    fn fits_for_max_vcpus() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        write(&mem, crate::config::MAX_VCPUS).unwrap();
    }
}
