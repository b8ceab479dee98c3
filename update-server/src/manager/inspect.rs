//! Stack inspection: a transition finishes only when no vCPU and no task's kernel stack
//! holds an address inside the code it waits on.

use std::collections::HashMap;

use log::{info, warn};

use super::patch::{Blocker, Patch, PatchState};
use super::{owner, ApplyError, Manager};
#[cfg(doc)]
use crate::guest::StackSpan;
use crate::guest::{Guest, GuestError, TaskState, VcpuState};
use crate::module::CallbackKind;

impl Manager {
    /// Ranges a thread must not be in for `p`'s current transition to finish.
    pub(super) fn busy_ranges(p: &Patch) -> Vec<(u64, u64, String)> {
        match p.state {
            PatchState::Transition => p
                .funcs
                .iter()
                .map(|f| (f.old_addr, f.old_addr + f.old_size, f.old_name.clone()))
                .collect(),
            PatchState::RollingBack => {
                vec![(
                    p.image_addr,
                    p.image_addr + p.image_size,
                    format!("patch {} code", p.id),
                )]
            }
            _ => vec![],
        }
    }

    /// Stack inspection for patch `id`: finishes its transition if no thread is in the
    /// code it waits on. Returns the (possibly new) state.
    pub fn check(&mut self, g: &dyn Guest, id: u32) -> Result<PatchState, ApplyError> {
        let p = self.get(id)?;
        let ranges = Self::busy_ranges(p);
        // A patch in transition that replaced nothing (callbacks only) has no old code to
        // wait for: the check below commits it.
        if ranges.is_empty() && p.state != PatchState::Transition {
            return Ok(p.state);
        }
        let protected = p.data.iter().any(|d| d.protected);
        // Rolled back for good once no thread runs the code: the kernel forgets it then, and
        // the modules it used may be unloaded again.
        let rolling_back = p.state == PatchState::RollingBack;
        let forget = rolling_back.then_some(p.module_at).flatten();
        let unpin = if rolling_back { p.modules.clone() } else { vec![] };
        // Its static key nodes are made inert in that same pause, with jump_label_mutex free.
        let key_nodes = match (forget, self.keys.abi) {
            (Some(_), Some(abi)) => Some((abi, self.keys.nodes_of(id))).filter(|(_, n)| !n.is_empty()),
            _ => None,
        };
        let mut result: Result<Vec<Blocker>, GuestError> = Ok(vec![]);
        g.stop_the_world(&mut |vcpus: &[VcpuState]| {
            result = find_blockers(g, vcpus, &ranges);
            if let (Some(at), Ok(b)) = (forget, &mut result) {
                if b.is_empty() {
                    if let Some((abi, nodes)) = &key_nodes {
                        match crate::jumplabel::mutex_held(g, abi) {
                            Ok(false) => {
                                if let Err(e) = crate::jumplabel::unlink_keys(g, abi, nodes) {
                                    result = Err(e);
                                    return;
                                }
                            }
                            Ok(true) => {
                                b.push(Blocker {
                                    who: "the guest kernel".into(),
                                    at: "holds jump_label_mutex: the patch's static key nodes are taken out at a later check"
                                        .into(),
                                    task: None,
                                });
                                return;
                            }
                            Err(e) => {
                                result = Err(e);
                                return;
                            }
                        }
                    }
                    match g.unregister_code(at) {
                        Ok(()) => {}
                        Err(GuestError::Busy(why)) => b.push(Blocker {
                            who: "the guest kernel".into(),
                            at: format!("{why}: the patch's module record is taken out at a later check"),
                            task: None,
                        }),
                        Err(e) => result = Err(e),
                    }
                }
            }
            // Transition over: no old code can write old units any more; drop protection
            // in the same pause.
            if protected && matches!(&result, Ok(b) if b.is_empty()) {
                if let Err(e) = g.unprotect(&owner(id)) {
                    result = Err(e);
                }
            }
            // Last, once nothing else in this pause can fail: a failed check is repeated,
            // and must not drop the pins twice.
            if matches!(&result, Ok(b) if b.is_empty()) {
                super::apply::unpin_modules(g, id, &unpin);
            }
        })?;
        let blockers = result?;
        let p = self.get_mut(id)?;
        p.checks += 1;
        p.blockers = blockers;
        if p.state == PatchState::Transition && p.callbacks.iter().any(|c| c.kind == CallbackKind::Thread) {
            // Tasks in old code are watched; the ones that left it get their callback.
            let now: HashMap<i32, u64> = p.blockers.iter().filter_map(|b| b.task).collect();
            p.thread_watch.extend(now.iter().map(|(a, b)| (*a, *b)));
            let left: Vec<(i32, u64)> = p
                .thread_watch
                .iter()
                .filter(|(pid, _)| !now.contains_key(pid))
                .map(|(a, b)| (*a, *b))
                .collect();
            for (pid, task) in left {
                if let Ok(p) = self.get_mut(id) {
                    p.thread_watch.remove(&pid);
                }
                if let Err(what) = self.run_callbacks(g, id, CallbackKind::Thread, Some((pid, task))) {
                    return Err(self.abort(g, id, what));
                }
            }
        }
        let p = self.get_mut(id)?;
        if p.blockers.is_empty() {
            for d in &mut p.data {
                d.protected = false;
            }
            match p.state {
                PatchState::Transition => {
                    p.state = PatchState::Committed;
                    info!("patch {id} committed after {} checks", p.checks);
                }
                PatchState::RollingBack => {
                    p.state = PatchState::RolledBack;
                    p.module_at = None;
                    p.modules.clear();
                    let addr = p.image_addr;
                    self.alloc.free(addr);
                    self.keys.release(id);
                    info!("patch {id} rolled back; memory freed");
                }
                _ => {}
            }
        }
        Ok(self.get(id)?.state)
    }

    /// Re-checks every patch that is in a transition.
    pub fn check_all(&mut self, g: &dyn Guest) {
        let ids: Vec<u32> = self
            .patches
            .iter()
            .filter(|p| matches!(p.state, PatchState::Transition | PatchState::RollingBack))
            .map(|p| p.id)
            .collect();
        for id in ids {
            match self.check(g, id) {
                // The guest can make checks fail every period: say so when the reason changes.
                Err(e) => {
                    let msg = e.to_string();
                    if self.check_errors.get(&id) != Some(&msg) {
                        warn!("stack check of patch {id} failed: {msg} (re-checked every period; logged again when the reason changes)");
                        self.check_errors.insert(id, msg);
                    }
                }
                Ok(_) => {
                    if self.check_errors.remove(&id).is_some() {
                        info!("stack check of patch {id} works again");
                    }
                }
            }
        }
    }
}

/// The largest stack range scanned: x86-64 task, IRQ and exception stacks are 4-32 KiB.
pub const MAX_STACK: u64 = 64 << 10;

/// The most stack bytes one check reads while the vCPUs are paused (a guest can have
/// 65,536 tasks of 16 KiB each: 1 GiB). Stacks past it are not read and block the
/// commit (the check stays conservative); a guest that large commits once it has fewer
/// live frames (sleeping tasks are scanned only above their saved stack pointer).
pub const MAX_SCAN_BYTES: u64 = 64 << 20;

/// A stack region to scan, and whom it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// `task PID (comm, state)` or `vCPU N stack`.
    pub who: String,
    /// The task's pid and `task_struct` (None for a vCPU's own stack).
    pub task: Option<(i32, u64)>,
    /// `[lo, hi)`: the part that can hold live frames.
    pub range: (u64, u64),
}

/// The commit check's whole policy of *where* live return addresses can be, with the
/// argument for why it misses none:
///
/// - a task that runs on a vCPU in user mode has no kernel frames (its kernel stack is
///   empty between system calls): nothing to scan;
/// - a task that runs on a vCPU in kernel mode, on its own stack: from that vCPU's RSP to
///   the top (everything below RSP is dead);
/// - a task that runs in kernel mode but whose vCPU is on another stack (an IRQ, softirq or
///   exception stack): the task's whole stack (its interrupted frames are on it), and the
///   vCPU's stack separately (below);
/// - a task that is not running: from its saved stack pointer (`thread.sp`) to the top, or
///   the whole stack when the saved pointer is outside it;
/// - a vCPU in kernel mode on a stack that is no task's (IRQ, softirq, exception stacks):
///   from its RSP to the top of that stack, then the live part of each stack it
///   interrupted, link by link (the guest side finds the links: [`VcpuState::stacks`]),
///   so that an NMI taken in an IRQ handler leaves neither stack unscanned; the
///   interrupted task's stack is scanned whole (above). Without the guest's stack layout,
///   from RSP to the end of its `THREAD_SIZE`-aligned block;
/// - a task whose stack the kernel already freed (it exited and waits to be reaped) runs no
///   code and has no frames: nothing to scan.
///
/// Scanning more than needed can only delay a commit, never allow a wrong one.
pub fn scan_ranges(tasks: &[TaskState], vcpus: &[VcpuState]) -> Vec<Scan> {
    let mut out = Vec::with_capacity(tasks.len() + vcpus.len());
    let in_stack = |sp: u64, t: &TaskState| t.stack.is_some_and(|(lo, hi)| sp >= lo && sp < hi);
    for t in tasks {
        let Some(stack) = t.stack else { continue };
        let top = stack.1;
        let range = match t.on_cpu.and_then(|cpu| vcpus.iter().find(|v| u32::from(v.id) == cpu)) {
            Some(v) if !v.kernel_mode => None,
            Some(v) if in_stack(v.rsp, t) => Some((v.rsp & !7, top)),
            Some(_) => Some(stack),
            None if in_stack(t.saved_sp, t) => Some((t.saved_sp & !7, top)),
            None => Some(stack),
        };
        if let Some(range) = range {
            out.push(Scan {
                who: format!("task {} ({}, {})", t.pid, t.comm, t.state),
                task: Some((t.pid, t.task)),
                range,
            });
        }
    }
    let stack_size = tasks
        .iter()
        .find_map(|t| t.stack.map(|(lo, hi)| hi.wrapping_sub(lo)))
        .filter(|s| s.is_power_of_two() && *s <= MAX_STACK)
        .unwrap_or(16 << 10);
    for v in vcpus.iter().filter(|v| v.kernel_mode) {
        if let Some(spans) = &v.stacks {
            for s in spans {
                if !tasks.iter().any(|t| in_stack(s.range.0, t)) {
                    out.push(Scan {
                        who: format!("vCPU {} {}", v.id, s.what),
                        task: None,
                        range: s.range,
                    });
                }
            }
            continue;
        }
        if !tasks.iter().any(|t| in_stack(v.rsp, t)) {
            out.push(Scan {
                who: format!("vCPU {} stack", v.id),
                task: None,
                range: (v.rsp & !7, (v.rsp | (stack_size - 1)).wrapping_add(1)),
            });
        }
    }
    out
}

/// Scans vCPU RIPs and the stacks [`scan_ranges`] picks for addresses inside `ranges`. A
/// stack that cannot be read counts as a blocker: the check must never say "no thread in
/// old code" when one may be.
pub fn find_blockers(
    g: &dyn Guest,
    vcpus: &[VcpuState],
    ranges: &[(u64, u64, String)],
) -> Result<Vec<Blocker>, GuestError> {
    let hit = |v: u64| ranges.iter().find(|(lo, hi, _)| v >= *lo && v <= *hi);
    let mut out = Vec::new();
    for v in vcpus {
        if let Some((_, _, what)) = hit(v.rip) {
            out.push(Blocker {
                who: format!("vCPU {}", v.id),
                at: format!("{what} ({})", g.describe(v.rip)),
                task: None,
            });
        }
    }
    let mut buf = Vec::new();
    let mut budget = MAX_SCAN_BYTES;
    let mut skipped = (0usize, 0u64);
    for scan in scan_ranges(&g.tasks()?, vcpus) {
        let (lo, hi) = scan.range;
        // The ranges come from guest memory: an implausible one is not read, it blocks.
        let len = hi.wrapping_sub(lo);
        if hi <= lo || len > MAX_STACK {
            out.push(Blocker {
                who: scan.who,
                at: format!("an implausible stack range {lo:#x}..{hi:#x}"),
                task: scan.task,
            });
            continue;
        }
        if len > budget {
            skipped = (skipped.0 + 1, skipped.1 + len);
            continue;
        }
        budget -= len;
        buf.resize(len as usize, 0);
        if let Err(e) = g.read(lo, &mut buf) {
            out.push(Blocker {
                who: scan.who,
                at: format!("an unreadable stack at {lo:#x} ({e})"),
                task: scan.task,
            });
            continue;
        }
        for w in buf.chunks_exact(8) {
            let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            if let Some((_, _, what)) = hit(v) {
                out.push(Blocker {
                    who: scan.who,
                    at: format!("{what} ({})", g.describe(v)),
                    task: scan.task,
                });
                break;
            }
        }
    }
    if skipped.0 > 0 {
        out.push(Blocker {
            who: format!("{} more stacks", skipped.0),
            at: format!(
                "not scanned: they hold {} KiB, past the {} MiB one check reads while the vCPUs are paused",
                skipped.1 >> 10,
                MAX_SCAN_BYTES >> 20
            ),
            task: None,
        });
    }
    Ok(out)
}
