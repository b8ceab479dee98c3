//! Stack inspection: a transition finishes only when no vCPU and no task's kernel stack
//! holds an address inside the code it waits on.

use std::collections::HashMap;

use log::{info, warn};

use super::patch::{Blocker, Patch, PatchState};
use super::{owner, ApplyError, Manager};
use crate::guest::{Guest, GuestError, VcpuState};
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
        if ranges.is_empty() {
            return Ok(p.state);
        }
        let protected = p.data.iter().any(|d| d.protected);
        let mut result: Result<Vec<Blocker>, GuestError> = Ok(vec![]);
        g.stop_the_world(&mut |vcpus: &[VcpuState]| {
            result = find_blockers(g, vcpus, &ranges);
            // Transition over: no old code can write old units any more; drop protection
            // in the same pause.
            if protected && matches!(&result, Ok(b) if b.is_empty()) {
                if let Err(e) = g.unprotect(&owner(id)) {
                    result = Err(e);
                }
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
                    let addr = p.image_addr;
                    self.alloc.free(addr);
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
            if let Err(e) = self.check(g, id) {
                warn!("stack check of patch {id} failed: {e}");
            }
        }
    }
}

/// Scans vCPU RIPs and every task's kernel stack for addresses inside `ranges`.
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
    for t in g.tasks(vcpus)? {
        let Some((lo, hi)) = t.scan else { continue };
        buf.resize((hi - lo) as usize, 0);
        if g.read(lo, &mut buf).is_err() {
            continue;
        }
        for w in buf.chunks_exact(8) {
            let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            if let Some((_, _, what)) = hit(v) {
                out.push(Blocker {
                    who: format!("task {} ({}, {})", t.pid, t.comm, t.state),
                    at: format!("{what} ({})", g.describe(v)),
                    task: (t.task != 0).then_some((t.pid, t.task)),
                });
                break;
            }
        }
    }
    Ok(out)
}
