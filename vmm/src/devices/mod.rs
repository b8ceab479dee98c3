//! Port-I/O devices and the bus that dispatches guest port accesses to them.

pub mod bus;
pub mod i8042;
pub mod serial;

pub use bus::{PioBus, PioDevice};
