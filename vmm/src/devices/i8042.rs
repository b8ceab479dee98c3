//! The bit of the i8042 keyboard controller a guest uses to reset the machine: writing
//! 0xfe (pulse reset line) to the command port. With `reboot=k` Linux reboots this way.

use std::sync::mpsc::Sender;

use super::BusDevice;
use crate::events::VmEvent;

/// I/O base of the controller (data port 0x60, command/status port 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Ports covered: 0x60..=0x64.
pub const I8042_LEN: u64 = 5;
const CMD_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 keyboard controller, reduced to what Linux uses to reboot: the CPU reset command.
pub struct I8042 {
    events: Sender<VmEvent>,
}

impl I8042 {
    /// A controller that reports a reset request on `events`.
    pub fn new(events: Sender<VmEvent>) -> Self {
        Self { events }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data port: nothing.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == CMD_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            let _ = self.events.send(VmEvent::Reset("i8042 reset".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_raises_event() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut d = I8042::new(tx);
        let mut s = [0xffu8];
        d.read(CMD_OFFSET, &mut s);
        assert_eq!(s[0] & 0x2, 0, "input buffer empty");
        d.write(0, &[CMD_RESET_CPU]);
        assert!(rx.try_recv().is_err(), "data port write is not a reset");
        d.write(CMD_OFFSET, &[CMD_RESET_CPU]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Reset(_))));
    }
}
