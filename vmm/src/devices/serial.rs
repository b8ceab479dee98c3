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
///
/// On a 16550 the received-data interrupt is a *condition*: it stays pending, and IIR
/// reports it, as long as received data waits with the interrupt enabled. vm-superio models
/// it as an edge that any IIR read forgets, so an IIR read that does not lead to draining
/// the FIFO, or an edge lost on its way to the vCPU, leaves bytes in a full FIFO that
/// nobody will read: the guest's console input stalls for good (seen in the SVM lane while
/// tests typed long lines). The adapter reports the condition in IIR as the hardware does,
/// and [`SerialPort::kick_rx`] raises the interrupt again for input the guest has left
/// unread (the console's RX watchdog).
pub struct SerialPort(pub SerialDevice);

const IIR: u8 = 2;
const IIR_NONE: u8 = 0x01;
const IIR_RDA: u8 = 0x04;
const IIR_FIFO: u8 = 0xc0;
const IER_RDA: u8 = 0x01;
const LCR_DLAB: u8 = 0x80;
const LSR_DATA_READY: u8 = 0x01;

impl SerialPort {
    /// Received data waits with the received-data interrupt enabled.
    pub fn rx_waiting(&self) -> bool {
        let s = self.0.state();
        s.line_control & LCR_DLAB == 0 && s.line_status & LSR_DATA_READY != 0 && s.interrupt_enable & IER_RDA != 0
    }

    /// Raises the received-data interrupt again if its condition holds (input the guest has
    /// not read although the interrupt is enabled). Returns whether it did.
    pub fn kick_rx(&self) -> bool {
        if !self.rx_waiting() {
            return false;
        }
        if let Err(e) = self.0.interrupt_evt().trigger() {
            log::warn!("serial interrupt: {e}");
        }
        true
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            let mut v = self.0.read(offset as u8);
            if offset as u8 == IIR && v & IIR_NONE != 0 && self.rx_waiting() {
                v = (v & IIR_FIFO) | IIR_RDA;
            }
            *b = v;
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

    fn port() -> (SerialPort, EventFd) {
        let (tx, _rx) = std::sync::mpsc::channel();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let port = SerialPort(Serial::new(
            EventFdTrigger(evt.try_clone().unwrap()),
            ConsoleOut::new(Box::new(std::io::sink()), tx),
        ));
        (port, evt)
    }

    fn inb(p: &mut SerialPort, offset: u64) -> u8 {
        let mut b = [0u8];
        p.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn received_data_stays_pending_until_read() {
        let (mut p, evt) = port();
        p.write(1, &[IER_RDA]); // IER: received-data interrupt on
        let _ = evt.read();
        assert!(!p.kick_rx(), "nothing received");
        p.0.enqueue_raw_bytes(b"ab").unwrap();
        assert!(evt.read().is_ok(), "the first byte raises the interrupt");
        // Every IIR read reports the data until it is read (vm-superio alone: once).
        assert_eq!(inb(&mut p, 2) & 0x0f, IIR_RDA);
        assert_eq!(inb(&mut p, 2) & 0x0f, IIR_RDA);
        // Left unread, the interrupt can be raised again.
        assert!(p.kick_rx());
        assert!(evt.read().is_ok());
        assert_eq!(inb(&mut p, 0), b'a');
        assert_eq!(inb(&mut p, 0), b'b');
        assert_eq!(inb(&mut p, 2) & 0x0f, IIR_NONE, "drained");
        assert!(!p.kick_rx());
        // With the interrupt off, nothing is raised.
        p.write(1, &[0]);
        p.0.enqueue_raw_bytes(b"c").unwrap();
        let _ = evt.read();
        assert!(!p.kick_rx());
        assert_eq!(inb(&mut p, 2) & 0x0f, IIR_NONE);
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
