//! Running a patch's callbacks (apply, revert, per-thread) in the guest.

use std::time::{Duration, Instant};

use log::info;

use super::patch::PatchCallback;
use super::Manager;
use crate::guest::Guest;
use crate::module::CallbackKind;

impl Manager {
    /// Runs patch `id`'s callbacks of `kind` in the guest (for a thread callback, with the
    /// task's `task_struct` and pid). Logs each outcome in the patch; the first failure is
    /// returned as a message.
    pub(super) fn run_callbacks(
        &mut self,
        g: &dyn Guest,
        id: u32,
        kind: CallbackKind,
        task: Option<(i32, u64)>,
    ) -> Result<(), String> {
        let cbs: Vec<PatchCallback> = self
            .get(id)
            .map(|p| p.callbacks.iter().filter(|c| c.kind == kind).cloned().collect())
            .unwrap_or_default();
        let mut log = Vec::new();
        let r = call_each(g, &format!("patch {id}"), &cbs, task, &mut log);
        if let Ok(p) = self.get_mut(id) {
            p.callback_log.extend(log);
        }
        r
    }
}

/// Runs each of `cbs` in the guest in order, until one fails; appends a line per callback to
/// `log`. A thread callback gets the task's `task_struct` and pid; any other its object's
/// `struct module` address (0 for vmlinux). The first failure is returned as a message.
pub(super) fn call_each(
    g: &dyn Guest,
    who: &str,
    cbs: &[PatchCallback],
    task: Option<(i32, u64)>,
    log: &mut Vec<String>,
) -> Result<(), String> {
    for c in cbs {
        let args = task.map(|(pid, t)| [t, pid as u64]).unwrap_or([c.module, 0]);
        let t0 = Instant::now();
        let r = g.call(c.addr, args, Duration::from_millis(c.limit_ms));
        let took = t0.elapsed().as_micros();
        let on = task.map(|(pid, _)| format!(" for task {pid}")).unwrap_or_default();
        let (line, failed) = match r {
            Ok(0) => (format!("{}{on}: returned 0 ({took} us)", c.describe()), None),
            Ok(v) => {
                let why = format!("{}{on} failed: it returned {}", c.describe(), v as i64);
                (why.clone(), Some(why))
            }
            Err(e) => {
                let why = format!("{}{on} failed: {e}", c.describe());
                (why.clone(), Some(why))
            }
        };
        info!("{who}: {line}");
        log.push(line);
        if let Some(why) = failed {
            return Err(why);
        }
    }
    Ok(())
}
