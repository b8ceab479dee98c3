//! Devices: port-I/O devices (serial, i8042) and the virtio-mmio vsock device, and the
//! bus type that dispatches guest port and MMIO accesses to them.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
