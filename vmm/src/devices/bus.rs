//! One bus type for both address spaces a guest reaches devices through: the port-I/O bus
//! (`KVM_EXIT_IO`, 16-bit ports) and the MMIO bus (`KVM_EXIT_MMIO`, guest-physical
//! addresses in the MMIO hole). Each maps address ranges to devices; an access is dispatched
//! to the device whose range holds *all* of it. Accesses nobody claims read as all-zero and
//! writes are dropped (logged at debug level), like an empty ISA bus with pull-downs; this
//! keeps probes of absent legacy hardware (CMOS, PS/2 aux, extra UARTs) from spinning on
//! 0xff.

use std::sync::{Arc, Mutex};

use log::debug;
use thiserror::Error;

/// A device on a bus. `offset` is relative to the device's base address or port.
pub trait BusDevice: Send {
    /// Fills `data` with the device's answer to a read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device cannot be added.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BusError {
    /// The range has no bytes.
    #[error("{bus} range {base:#x}+{len:#x} is empty")]
    Empty {
        /// `port` or `MMIO`.
        bus: &'static str,
        /// Start of the range.
        base: u64,
        /// Its length, 0 here.
        len: u64,
    },
    /// The range runs past the end of the address space.
    #[error("{bus} range {base:#x}+{len:#x} runs past the end of the address space")]
    Wraps {
        /// `port` or `MMIO`.
        bus: &'static str,
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("{bus} range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// `port` or `MMIO`.
        bus: &'static str,
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct Range {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// A bus. Built once before the vCPUs start, then shared read-only.
pub struct Bus {
    name: &'static str,
    /// One past the highest address (`1 << 16` for ports).
    limit: u128,
    ranges: Vec<Range>,
}

impl Bus {
    /// The port-I/O bus (ports 0..=0xffff).
    pub fn pio() -> Self {
        Bus {
            name: "port",
            limit: 1 << 16,
            ranges: Vec::new(),
        }
    }

    /// The MMIO bus (64-bit guest-physical addresses).
    pub fn mmio() -> Self {
        Bus {
            name: "MMIO",
            limit: 1 << 64,
            ranges: Vec::new(),
        }
    }

    /// Adds a device at `[base, base+len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: Arc<Mutex<dyn BusDevice>>) -> Result<(), BusError> {
        let bus = self.name;
        if len == 0 {
            return Err(BusError::Empty { bus, base, len });
        }
        let end = base as u128 + len as u128;
        if end > self.limit {
            return Err(BusError::Wraps { bus, base, len });
        }
        if self
            .ranges
            .iter()
            .any(|r| (base as u128) < r.base as u128 + r.len as u128 && (r.base as u128) < end)
        {
            return Err(BusError::Overlap { bus, base, len });
        }
        self.ranges.push(Range { base, len, dev });
        Ok(())
    }

    /// The device holding all of `[addr, addr+size)`.
    fn find(&self, addr: u64, size: usize) -> Option<&Range> {
        let end = addr as u128 + size as u128;
        self.ranges
            .iter()
            .find(|r| addr >= r.base && end <= r.base as u128 + r.len as u128)
    }

    /// Dispatches a read; an unclaimed one reads as zeros.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some(r) => r
                .dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(addr - r.base, data),
            None => {
                data.fill(0);
                debug!("unclaimed {} read at {addr:#x} ({} bytes)", self.name, data.len());
            }
        }
    }

    /// Dispatches a write; an unclaimed one is dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr, data.len()) {
            Some(r) => r
                .dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(addr - r.base, data),
            None => debug!("unclaimed {} write at {addr:#x} = {data:02x?}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last offset; reads return its value plus the offset.
    struct Reg(u64, u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.0 = offset;
            data.fill(self.1.wrapping_add(offset as u8));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0 = offset;
            self.1 = data[0];
        }
    }

    fn reg(v: u8) -> Arc<Mutex<Reg>> {
        Arc::new(Mutex::new(Reg(0, v)))
    }

    #[test]
    fn ports_dispatch_and_refuse_bad_ranges() {
        let mut bus = Bus::pio();
        bus.insert(0x10, 4, reg(5)).unwrap();
        assert!(matches!(bus.insert(0x12, 4, reg(0)), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0x20, 0, reg(0)), Err(BusError::Empty { .. })));
        assert!(matches!(bus.insert(0xfffe, 4, reg(0)), Err(BusError::Wraps { .. })));
        bus.insert(0xfffc, 4, reg(0)).unwrap();
        bus.insert(0x14, 1, reg(9)).unwrap();
        let mut b = [0xffu8];
        bus.read(0x12, &mut b);
        assert_eq!(b[0], 7);
        bus.write(0x10, &[100]);
        bus.read(0x10, &mut b);
        assert_eq!(b[0], 100);
        bus.read(0x14, &mut b);
        assert_eq!(b[0], 9);
        bus.read(0x99, &mut b);
        assert_eq!(b[0], 0);
        // A 2-byte access at the device's last port runs past it: not claimed.
        let mut w = [0xffu8; 2];
        bus.read(0x13, &mut w);
        assert_eq!(w, [0, 0]);
    }

    #[test]
    fn mmio_dispatch_and_refuse_bad_ranges() {
        let mut bus = Bus::mmio();
        let a = reg(7);
        bus.insert(0xd000_0000, 0x1000, a.clone()).unwrap();
        assert!(bus.insert(0xd000_0800, 0x1000, reg(0)).is_err());
        assert!(matches!(
            bus.insert(u64::MAX - 1, 4, reg(0)),
            Err(BusError::Wraps { .. })
        ));
        assert!(matches!(
            bus.insert(0xe000_0000, 0, reg(0)),
            Err(BusError::Empty { .. })
        ));
        bus.insert(0xd000_1000, 0x1000, reg(9)).unwrap();
        let mut b = [0u8; 4];
        bus.read(0xd000_0010, &mut b);
        assert_eq!((b, a.lock().unwrap().0), ([0x17; 4], 0x10));
        bus.write(0xd000_0ffc, &[3, 0, 0, 0]);
        assert_eq!(a.lock().unwrap().1, 3);
        // An access straddling the end of a device is not claimed.
        b = [0xff; 4];
        bus.read(0xd000_0ffe, &mut b);
        assert_eq!(b, [0; 4]);
        bus.read(0xd000_1000, &mut b);
        assert_eq!(b, [9; 4]);
        bus.write(0x1234, &[1]);
    }
}
