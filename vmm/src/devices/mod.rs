//! Devices: port-I/O devices (serial, i8042) and the virtio-mmio vsock device, and the
//! buses that dispatch guest port and MMIO accesses to them.

pub mod bus;
pub mod i8042;
pub mod mmio_bus;
pub mod serial;
pub mod virtio;

pub use bus::{PioBus, PioDevice};
pub use mmio_bus::{MmioBus, MmioDevice};
