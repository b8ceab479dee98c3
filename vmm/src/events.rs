//! What happens in a VM that the main thread acts on ([`VmEvent`], sent by devices and
//! vCPU threads), and why a VM stopped ([`ExitReason`]). Its own module so that devices do
//! not depend on the VM that owns them.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::introspect::shutdown::{KernelShutdownState, SystemState};
use crate::warn_limited;

/// How long to wait for the guest to reset after a (confirmed) kernel panic line.
const PANIC_GRACE: Duration = Duration::from_secs(5);

/// Something that happened in the VM that the main thread must act on.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest reset the machine (reboot): a reset line only the kernel can pulse.
    Reset(String),
    /// The guest powered off through a real power-off path (a KVM system event).
    PowerOff,
    /// A console line claims a power-off, halt or panic. Any guest process can print it:
    /// it counts only once the kernel's own state confirms it.
    ConsoleClaim(ConsoleClaim),
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN): a reset if the kernel was restarting or
    /// panicking, else a crash. Carries the fault report.
    TripleFault(String),
    /// A vCPU stopped on an exit the VMM cannot handle.
    Crash(String),
    /// The user pressed Ctrl-A x.
    UserQuit,
}

/// The kernel's panic line (`panic()`); a hint of [`ConsoleClaim::Panic`].
pub const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// The kernel's power-off line (`kernel_power_off()`); a hint of [`ConsoleClaim::PowerDown`].
pub const POWER_DOWN_MARKER: &str = "reboot: Power down";
/// The kernel's halt line (`kernel_halt()`); a hint of [`ConsoleClaim::Halted`].
pub const HALT_MARKER: &str = "reboot: System halted";

/// What a console line claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleClaim {
    /// `reboot: Power down`.
    PowerDown,
    /// `reboot: System halted`.
    Halted,
    /// `Kernel panic - not syncing...`, with the line from the marker on.
    Panic(String),
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

/// A guest-controlled line, shortened and escaped for the log.
fn quoted(line: &str) -> String {
    let short: String = line.chars().take(120).collect();
    format!("{short:?}")
}

/// A reset (or a triple fault during a restart): why the VM stopped, given what the
/// kernel was doing.
fn reset_reason(how: String, panic_line: Option<String>, kernel: &dyn KernelShutdownState) -> ExitReason {
    if matches!(kernel.system_state(), Some(SystemState::PowerOff | SystemState::Halt)) {
        // x86 without ACPI cannot power off: after its power-down line the kernel goes
        // on (init exits, the kernel panics, panic=1 resets). It meant to power off.
        return ExitReason::PowerOff;
    }
    match panic_line {
        Some(line) => ExitReason::GuestPanic(line),
        None if kernel.panicking() == Some(true) => {
            ExitReason::GuestPanic("kernel panic (panic_cpu set; no panic line seen)".into())
        }
        None => ExitReason::Reboot(how),
    }
}

/// Waits for the VM to stop and says why. Console claims are checked against the guest
/// kernel's own state (`kernel`); a claim it does not confirm is logged and ignored.
pub(crate) fn wait_for_exit(
    events: &Receiver<VmEvent>,
    timeout: Option<Duration>,
    kernel: &dyn KernelShutdownState,
) -> ExitReason {
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
            Ok(VmEvent::Reset(how)) => return reset_reason(how, panic_line.map(|(l, _)| l), kernel),
            Ok(VmEvent::PowerOff) => return ExitReason::PowerOff,
            Ok(VmEvent::ConsoleClaim(claim)) => {
                let (state, panicking) = (kernel.system_state(), kernel.panicking());
                match claim {
                    ConsoleClaim::PowerDown if state == Some(SystemState::PowerOff) => return ExitReason::PowerOff,
                    ConsoleClaim::Halted if state == Some(SystemState::Halt) => return ExitReason::PowerOff,
                    ConsoleClaim::Panic(line) if panicking == Some(true) => {
                        panic_line.get_or_insert((line, Instant::now()));
                    }
                    claim => {
                        let what = match &claim {
                            ConsoleClaim::PowerDown => quoted(POWER_DOWN_MARKER),
                            ConsoleClaim::Halted => quoted(HALT_MARKER),
                            ConsoleClaim::Panic(line) => quoted(line),
                        };
                        warn_limited!(
                            "guest console printed {what}, but the kernel is not doing it (system_state {}, \
                             panic_cpu {}); ignored",
                            state.map_or("unreadable".into(), |s| s.to_string()),
                            kernel.panic_cpu().map_or("unreadable".into(), |c| c.to_string())
                        );
                    }
                }
            }
            Ok(VmEvent::TripleFault(report)) => {
                let (state, panicking) = (kernel.system_state(), kernel.panicking());
                if state == Some(SystemState::Restart) || panicking == Some(true) {
                    return reset_reason("triple fault".into(), panic_line.map(|(l, _)| l), kernel);
                }
                return ExitReason::GuestCrash(report);
            }
            Ok(VmEvent::Crash(what)) => return ExitReason::GuestCrash(what),
            Ok(VmEvent::UserQuit) => return ExitReason::UserQuit,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return ExitReason::GuestCrash("all event sources closed".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
    use std::sync::mpsc::channel;

    use super::*;

    /// The kernel's variables, as a test sets them.
    struct Kernel {
        state: AtomicU32,
        panic_cpu: AtomicI32,
    }

    impl Kernel {
        fn running() -> Self {
            Self {
                state: AtomicU32::new(3),
                panic_cpu: AtomicI32::new(-1),
            }
        }
    }

    impl KernelShutdownState for Kernel {
        fn system_state(&self) -> Option<SystemState> {
            Some(SystemState::from_raw(self.state.load(Ordering::Relaxed)))
        }
        fn panic_cpu(&self) -> Option<i32> {
            Some(self.panic_cpu.load(Ordering::Relaxed))
        }
    }

    /// Unreadable variables (no symbols).
    struct Unknown;

    impl KernelShutdownState for Unknown {
        fn system_state(&self) -> Option<SystemState> {
            None
        }
        fn panic_cpu(&self) -> Option<i32> {
            None
        }
    }

    fn run(events: Vec<VmEvent>, kernel: &dyn KernelShutdownState) -> ExitReason {
        let (tx, rx) = channel();
        for e in events {
            tx.send(e).unwrap();
        }
        wait_for_exit(&rx, Some(Duration::from_millis(300)), kernel)
    }

    fn panic_claim() -> VmEvent {
        VmEvent::ConsoleClaim(ConsoleClaim::Panic("Kernel panic - not syncing: fake".into()))
    }

    /// Security issue item 15: a guest process printing the kernel's lines must not stop
    /// the VM.
    #[test]
    fn console_claims_the_kernel_does_not_confirm_are_ignored() {
        let k = Kernel::running();
        for claim in [ConsoleClaim::PowerDown, ConsoleClaim::Halted] {
            let r = run(vec![VmEvent::ConsoleClaim(claim)], &k);
            assert_eq!(r, ExitReason::Timeout(Duration::from_millis(300)));
        }
        assert_eq!(
            run(vec![panic_claim()], &k),
            ExitReason::Timeout(Duration::from_millis(300))
        );
        // A fake panic line followed by a normal reboot is a reboot.
        let r = run(vec![panic_claim(), VmEvent::Reset("i8042 reset".into())], &k);
        assert_eq!(r, ExitReason::Reboot("i8042 reset".into()));
        // Without the kernel's symbols nothing can be confirmed: fail closed.
        let r = run(
            vec![VmEvent::ConsoleClaim(ConsoleClaim::PowerDown), panic_claim()],
            &Unknown,
        );
        assert_eq!(r, ExitReason::Timeout(Duration::from_millis(300)));
    }

    #[test]
    fn console_claims_the_kernel_confirms_stop_the_vm() {
        let k = Kernel::running();
        k.state.store(5, Ordering::Relaxed);
        assert_eq!(
            run(vec![VmEvent::ConsoleClaim(ConsoleClaim::PowerDown)], &k),
            ExitReason::PowerOff
        );
        k.state.store(4, Ordering::Relaxed);
        assert_eq!(
            run(vec![VmEvent::ConsoleClaim(ConsoleClaim::Halted)], &k),
            ExitReason::PowerOff
        );
        // A power-down line while halting (or the reverse) is not the kernel's.
        let r = run(vec![VmEvent::ConsoleClaim(ConsoleClaim::PowerDown)], &k);
        assert_eq!(r, ExitReason::Timeout(Duration::from_millis(300)));

        let k = Kernel::running();
        k.panic_cpu.store(0, Ordering::Relaxed);
        let r = run(vec![panic_claim(), VmEvent::Reset("i8042 reset".into())], &k);
        assert_eq!(r, ExitReason::GuestPanic("Kernel panic - not syncing: fake".into()));
        // No reset within the grace period: still a panic.
        let (tx, rx) = channel();
        tx.send(panic_claim()).unwrap();
        let r = wait_for_exit(&rx, Some(PANIC_GRACE * 2), &k);
        assert_eq!(r, ExitReason::GuestPanic("Kernel panic - not syncing: fake".into()));
    }

    #[test]
    fn resets_and_triple_faults_by_kernel_state() {
        let k = Kernel::running();
        let r = run(vec![VmEvent::TripleFault("report".into())], &k);
        assert_eq!(r, ExitReason::GuestCrash("report".into()));
        k.state.store(6, Ordering::Relaxed);
        let r = run(vec![VmEvent::TripleFault("report".into())], &k);
        assert_eq!(r, ExitReason::Reboot("triple fault".into()));
        // A panic whose line was never seen still counts at the reset.
        let k = Kernel::running();
        k.panic_cpu.store(1, Ordering::Relaxed);
        assert!(matches!(
            run(vec![VmEvent::Reset("i8042 reset".into())], &k),
            ExitReason::GuestPanic(_)
        ));
        assert!(matches!(
            run(vec![VmEvent::TripleFault("report".into())], &k),
            ExitReason::GuestPanic(_)
        ));
        // The reset that follows a power-off the platform could not do.
        let k = Kernel::running();
        k.state.store(5, Ordering::Relaxed);
        k.panic_cpu.store(0, Ordering::Relaxed);
        assert_eq!(
            run(vec![VmEvent::Reset("i8042 reset".into())], &k),
            ExitReason::PowerOff
        );
        assert_eq!(run(vec![VmEvent::PowerOff], &Unknown), ExitReason::PowerOff);
    }
}
