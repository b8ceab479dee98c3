//! COM1: a vm-superio 16550A whose interrupt is an irqfd on IRQ 4 and whose output goes to
//! the host console (and through a line monitor that spots the kernel's panic, power-off and
//! halt lines: hints only, see [`ConsoleOut`]).

use std::io::Write;
use std::sync::mpsc::Sender;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::events::{ConsoleClaim, VmEvent};

/// Raises the serial interrupt by writing to an eventfd registered as an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Console output: forwards the guest's bytes to `out` and watches whole lines for hints
/// of events the VMM must act on. x86 without ACPI has no power-off device, so the
/// kernel's `reboot: Power down` line is the first sign of a power-off, and a `Kernel
/// panic` line marks the following reset as a crash. Any guest process that can write to
/// the console can print those lines: they are sent as [`VmEvent::ConsoleClaim`]s, which
/// the main thread checks against the kernel's own state before it acts.
pub struct ConsoleOut {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    events: Sender<VmEvent>,
}

pub use crate::events::{HALT_MARKER, PANIC_MARKER, POWER_DOWN_MARKER};

impl ConsoleOut {
    /// Output to `out`, with guest events sent on `events`.
    pub fn new(out: Box<dyn Write + Send>, events: Sender<VmEvent>) -> Self {
        Self {
            out,
            line: Vec::with_capacity(256),
            events,
        }
    }

    fn check_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line);
        let claim = if let Some(i) = line.find(PANIC_MARKER) {
            Some(ConsoleClaim::Panic(line[i..].trim_end().to_string()))
        } else if line.contains(POWER_DOWN_MARKER) {
            Some(ConsoleClaim::PowerDown)
        } else if line.contains(HALT_MARKER) {
            Some(ConsoleClaim::Halted)
        } else {
            None
        };
        if let Some(c) = claim {
            let _ = self.events.send(VmEvent::ConsoleClaim(c));
        }
        self.line.clear();
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.check_line();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        // The guest must not stall on a closed stdout: drop output we cannot write.
        let _ = self.out.write_all(buf);
        let _ = self.out.flush();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The 16550A UART of COM1 as lucos-vmm wires it.
pub type SerialDevice = Serial<EventFdTrigger, NoEvents, ConsoleOut>;

/// Port-I/O adapter for the vm-superio serial.
pub struct SerialPort(pub SerialDevice);

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            if let Err(e) = self.0.write(offset as u8, *b) {
                log::warn!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_spots_panic_and_poweroff() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut c = ConsoleOut::new(Box::new(std::io::sink()), tx);
        c.write_all(b"[    1.0] Kernel panic - not syncing: VFS: Unable to mount root\r\n")
            .unwrap();
        match rx.try_recv() {
            Ok(VmEvent::ConsoleClaim(ConsoleClaim::Panic(s))) => {
                assert!(s.starts_with(PANIC_MARKER) && s.ends_with("root"), "{s}")
            }
            other => panic!("{other:?}"),
        }
        c.write_all(b"hello\n[ 2.0] reboot: Power d").unwrap();
        assert!(rx.try_recv().is_err());
        c.write_all(b"own\n").unwrap();
        assert!(matches!(
            rx.try_recv(),
            Ok(VmEvent::ConsoleClaim(ConsoleClaim::PowerDown))
        ));
        c.write_all(b"[ 3.0] reboot: System halted\r\n").unwrap();
        assert!(matches!(rx.try_recv(), Ok(VmEvent::ConsoleClaim(ConsoleClaim::Halted))));
    }

    #[test]
    fn serial_output_reaches_console() {
        let (tx, _rx) = std::sync::mpsc::channel();
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort(Serial::new(
            EventFdTrigger(evt.try_clone().unwrap()),
            ConsoleOut::new(Box::new(Shared(buf.clone())), tx),
        ));
        for b in b"hi" {
            port.write(0, &[*b]);
        }
        assert_eq!(&*buf.lock().unwrap(), b"hi");
    }
}
