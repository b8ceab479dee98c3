//! The host side of the serial console: stdin is forwarded to the guest's COM1. When stdin
//! is a terminal it is put in raw mode (restored on exit) and `Ctrl-A x` quits the VMM, as
//! in QEMU.

use std::io::{IsTerminal, Read};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::debug;
use vmm_sys_util::terminal::Terminal;

use crate::devices::serial::SerialPort;
use crate::events::VmEvent;

const CTRL_A: u8 = 0x01;
/// How long received bytes may sit unread before the serial RX interrupt is raised again
/// (a guest that reads its console takes them far sooner).
const RX_KICK_AFTER: Duration = Duration::from_millis(50);

/// Restores the terminal mode when dropped.
pub struct RawModeGuard(bool);

impl RawModeGuard {
    /// Puts stdin in raw mode if it is a terminal.
    pub fn new() -> Self {
        let stdin = std::io::stdin();
        if stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok() {
            RawModeGuard(true)
        } else {
            RawModeGuard(false)
        }
    }
}

impl Default for RawModeGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

/// Splits escape sequences out of console input: returns the bytes for the guest and
/// whether the user asked to quit. `pending` carries a trailing Ctrl-A across reads.
pub fn filter_input(input: &[u8], pending: &mut bool) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(input.len());
    for &b in input {
        if *pending {
            *pending = false;
            match b {
                b'x' | b'X' => return (out, true),
                CTRL_A => out.push(CTRL_A),
                other => {
                    out.push(CTRL_A);
                    out.push(other);
                }
            }
        } else if b == CTRL_A {
            *pending = true;
        } else {
            out.push(b);
        }
    }
    (out, false)
}

/// Starts the stdin forwarding thread.
pub fn spawn_stdin_forwarder(serial: Arc<Mutex<SerialPort>>, events: Sender<VmEvent>, escapes: bool) {
    let spawned = std::thread::Builder::new().name("console-in".into()).spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        let mut pending = false;
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    debug!("console stdin closed");
                    return;
                }
                Ok(n) => n,
            };
            let (bytes, quit) = if escapes {
                filter_input(&buf[..n], &mut pending)
            } else {
                (buf[..n].to_vec(), false)
            };
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let written = serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .0
                    .enqueue_raw_bytes(rest);
                match written {
                    Ok(k) if k > 0 => rest = &rest[k..],
                    // FIFO full: wait for the guest to drain it.
                    _ => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            if quit {
                let _ = events.send(VmEvent::UserQuit);
                return;
            }
        }
    });
    if let Err(e) = spawned {
        log::warn!("cannot start console input thread: {e}");
    }
}

/// Starts the thread that raises the serial RX interrupt again when received bytes sit
/// unread with the interrupt enabled for a whole period (see [`SerialPort`]: an interrupt
/// the guest never saw would otherwise leave its console input stalled). It ends with the
/// serial port.
pub fn spawn_rx_watchdog(serial: &Arc<Mutex<SerialPort>>) {
    let serial = Arc::downgrade(serial);
    let spawned = std::thread::Builder::new().name("console-rx".into()).spawn(move || {
        let mut last = None;
        loop {
            std::thread::sleep(RX_KICK_AFTER);
            let Some(serial) = serial.upgrade() else { return };
            let port = serial.lock().unwrap_or_else(|e| e.into_inner());
            let waiting = port.0.fifo_capacity();
            // The same bytes still waiting as a period ago: the guest read none of them.
            if last == Some(waiting) && port.kick_rx() {
                crate::info_limited!("console input unread for {RX_KICK_AFTER:?}: serial RX interrupt raised again");
            }
            last = port.rx_waiting().then_some(waiting);
        }
    });
    if let Err(e) = spawned {
        log::warn!("cannot start console RX watchdog thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_handling() {
        let mut p = false;
        assert_eq!(filter_input(b"ls\r", &mut p), (b"ls\r".to_vec(), false));
        assert_eq!(filter_input(b"a\x01x", &mut p), (b"a".to_vec(), true));
        assert_eq!(filter_input(b"\x01", &mut p), (vec![], false));
        assert!(p);
        assert_eq!(filter_input(b"\x01", &mut p), (vec![CTRL_A], false));
        assert_eq!(filter_input(b"\x01b", &mut p), (vec![CTRL_A, b'b'], false));
    }
}
