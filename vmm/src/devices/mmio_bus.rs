//! An MMIO bus: maps guest-physical address ranges in the MMIO hole to devices, for
//! `KVM_EXIT_MMIO` exits. Like the port-I/O bus, accesses nobody claims read as zero and
//! writes are dropped (logged at debug level).

use std::sync::{Arc, Mutex};

use log::debug;

/// A device on the MMIO bus. `offset` is relative to the device's base address.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Range {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn MmioDevice>>,
}

/// The bus. Built once before the vCPUs start, then shared read-only.
#[derive(Default)]
pub struct MmioBus {
    ranges: Vec<Range>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("MMIO range {base:#x}+{len:#x} is empty, wraps or overlaps an existing device")]
pub struct MmioOverlapError {
    pub base: u64,
    pub len: u64,
}

impl MmioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device at `[base, base+len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: Arc<Mutex<dyn MmioDevice>>) -> Result<(), MmioOverlapError> {
        let err = MmioOverlapError { base, len };
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(err.clone())?;
        if self.ranges.iter().any(|r| base < r.base + r.len && r.base < end) {
            return Err(err);
        }
        self.ranges.push(Range { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<&Range> {
        self.ranges
            .iter()
            .find(|r| addr >= r.base && addr.saturating_add(size as u64) <= r.base + r.len)
    }

    /// Dispatches a read; returns whether a device claimed it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some(r) => {
                r.dev
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(addr - r.base, data);
                true
            }
            None => {
                data.fill(0);
                debug!("unclaimed MMIO read at {addr:#x} ({} bytes)", data.len());
                false
            }
        }
    }

    /// Dispatches a write; returns whether a device claimed it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some(r) => {
                r.dev
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(addr - r.base, data);
                true
            }
            None => {
                debug!("unclaimed MMIO write at {addr:#x} = {data:02x?}");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u64, u8);
    impl MmioDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.0 = offset;
            data.fill(self.1);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0 = offset;
            self.1 = data[0];
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = MmioBus::new();
        let a = Arc::new(Mutex::new(Reg(0, 7)));
        bus.insert(0xd000_0000, 0x1000, a.clone()).unwrap();
        assert!(bus
            .insert(0xd000_0800, 0x1000, Arc::new(Mutex::new(Reg(0, 0))))
            .is_err());
        assert!(bus.insert(u64::MAX - 1, 4, Arc::new(Mutex::new(Reg(0, 0)))).is_err());
        assert!(bus.insert(0xe000_0000, 0, Arc::new(Mutex::new(Reg(0, 0)))).is_err());
        bus.insert(0xd000_1000, 0x1000, Arc::new(Mutex::new(Reg(0, 9))))
            .unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0xd000_0010, &mut b));
        assert_eq!((b, a.lock().unwrap().0), ([7; 4], 0x10));
        assert!(bus.write(0xd000_0ffc, &[3, 0, 0, 0]));
        assert_eq!(a.lock().unwrap().1, 3);
        // An access straddling the end of a device is not claimed.
        assert!(!bus.read(0xd000_0ffe, &mut b));
        assert_eq!(b, [0; 4]);
        assert!(bus.read(0xd000_1000, &mut b));
        assert_eq!(b, [9; 4]);
        assert!(!bus.write(0x1234, &[1]));
    }
}
