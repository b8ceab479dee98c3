//! What happens in a VM that the main thread acts on ([`VmEvent`], sent by devices and
//! vCPU threads), and why a VM stopped ([`ExitReason`]). Its own module so that devices do
//! not depend on the VM that owns them.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long to wait for the guest to reset after it printed a kernel panic.
const PANIC_GRACE: Duration = Duration::from_secs(5);

/// Something that happened in the VM that the main thread must act on.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest reset the machine (reboot).
    Reset(String),
    /// The guest powered off.
    PowerOff,
    /// The guest kernel printed a panic line.
    Panic(String),
    /// A vCPU stopped on an exit the VMM cannot handle.
    Crash(String),
    /// The user pressed Ctrl-A x.
    UserQuit,
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// Guest rebooted (exit code 0).
    Reboot(String),
    /// Guest powered off (exit code 0).
    PowerOff,
    /// Guest kernel panicked (exit code 3).
    GuestPanic(String),
    /// A vCPU hit something the VMM cannot handle (exit code 3).
    GuestCrash(String),
    /// `--timeout` expired (exit code 4).
    Timeout(Duration),
    /// The user quit with Ctrl-A x (exit code 0).
    UserQuit,
}

impl ExitReason {
    /// The process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Reboot(_) | ExitReason::PowerOff | ExitReason::UserQuit => 0,
            ExitReason::GuestPanic(_) | ExitReason::GuestCrash(_) => 3,
            ExitReason::Timeout(_) => 4,
        }
    }

    /// What happened, for people (a crash report spans several lines).
    pub fn describe(&self) -> String {
        match self {
            ExitReason::Reboot(how) => format!("guest rebooted ({how})"),
            ExitReason::PowerOff => "guest powered off".into(),
            ExitReason::GuestPanic(line) => format!("guest kernel panicked: {line}"),
            ExitReason::GuestCrash(what) => format!("guest stopped on an unhandled exit:\n{what}"),
            ExitReason::Timeout(d) => format!("timeout: guest still running after {}s, stopped", d.as_secs()),
            ExitReason::UserQuit => "quit by user (Ctrl-A x)".into(),
        }
    }
}

pub(crate) fn wait_for_exit(events: &Receiver<VmEvent>, timeout: Option<Duration>) -> ExitReason {
    let start = Instant::now();
    let mut panic_line: Option<(String, Instant)> = None;
    loop {
        let mut wait = Duration::from_millis(200);
        if let Some(t) = timeout {
            match t.checked_sub(start.elapsed()) {
                Some(left) => wait = wait.min(left),
                None => return ExitReason::Timeout(t),
            }
        }
        if let Some((line, at)) = &panic_line {
            if at.elapsed() > PANIC_GRACE {
                return ExitReason::GuestPanic(line.clone());
            }
        }
        match events.recv_timeout(wait) {
            Ok(VmEvent::Reset(how)) => {
                return match panic_line {
                    Some((line, _)) => ExitReason::GuestPanic(line),
                    None => ExitReason::Reboot(how),
                }
            }
            Ok(VmEvent::PowerOff) => return ExitReason::PowerOff,
            Ok(VmEvent::Panic(line)) => {
                panic_line.get_or_insert((line, Instant::now()));
            }
            Ok(VmEvent::Crash(what)) => return ExitReason::GuestCrash(what),
            Ok(VmEvent::UserQuit) => return ExitReason::UserQuit,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return ExitReason::GuestCrash("all event sources closed".into()),
        }
    }
}
