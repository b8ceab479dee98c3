//! A port-I/O bus: maps port ranges to devices. Accesses to ports nobody claims read as
//! all-zero and writes are dropped (logged at debug level), like an empty ISA bus with
//! pull-downs; this keeps probes of absent legacy hardware (CMOS, PS/2 aux, extra UARTs)
//! from spinning on 0xff.

use std::sync::{Arc, Mutex};

use log::debug;

/// A device on the port-I/O bus. `offset` is relative to the device's base port.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct Range {
    base: u16,
    len: u16,
    dev: Arc<Mutex<dyn PioDevice>>,
}

/// The bus. Built once before the vCPUs start, then shared read-only.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("port range {base:#x}+{len} overlaps an existing device")]
pub struct OverlapError {
    pub base: u16,
    pub len: u16,
}

impl PioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device at ports `[base, base+len)`.
    pub fn insert(&mut self, base: u16, len: u16, dev: Arc<Mutex<dyn PioDevice>>) -> Result<(), OverlapError> {
        let end = base as u32 + len as u32;
        if self
            .ranges
            .iter()
            .any(|r| (base as u32) < r.base as u32 + r.len as u32 && (r.base as u32) < end)
        {
            return Err(OverlapError { base, len });
        }
        self.ranges.push(Range { base, len, dev });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<&Range> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && (port as u32) < r.base as u32 + r.len as u32)
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some(r) => r
                .dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(port - r.base, data),
            None => {
                data.fill(0);
                debug!("unclaimed port read {port:#x} ({} bytes)", data.len());
            }
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) {
        match self.find(port) {
            Some(r) => r
                .dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(port - r.base, data),
            None => debug!("unclaimed port write {port:#x} = {data:02x?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl PioDevice for Reg {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data[0] = self.0.wrapping_add(offset as u8);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = PioBus::new();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Reg(5)))).unwrap();
        assert_eq!(
            bus.insert(0x12, 4, Arc::new(Mutex::new(Reg(0)))),
            Err(OverlapError { base: 0x12, len: 4 })
        );
        bus.insert(0x14, 1, Arc::new(Mutex::new(Reg(9)))).unwrap();
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
    }
}
