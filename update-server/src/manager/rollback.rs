//! Rolling a patch back, on request or when an apply fails part-way.

use log::{info, warn};

use super::apply::{swap_sites, Swap};
use super::patch::PatchState;
use super::{ApplyError, Manager};
use crate::guest::Guest;
use crate::module::CallbackKind;

impl Manager {
    /// A callback failed during apply or transition: roll the patch back (without its
    /// revert callbacks: the update it would undo did not complete).
    pub(super) fn abort(&mut self, g: &dyn Guest, id: u32, what: String) -> ApplyError {
        warn!("patch {id}: {what}; rolling back");
        match self.restore(g, id) {
            Ok(_) => {
                if let Err(e) = self.check(g, id) {
                    warn!("patch {id}: stack check after the abort: {e}");
                }
                ApplyError::CallbackAborted { id, what }
            }
            Err(e) => ApplyError::CallbackAborted {
                id,
                what: format!("{what}; rolling back failed too: {e}"),
            },
        }
    }

    /// Starts rolling back `id`: restores the original bytes, then waits (by stack
    /// inspection) until no thread runs the patch's code before freeing it.
    pub fn rollback(&mut self, g: &dyn Guest, id: u32) -> Result<PatchState, ApplyError> {
        let p = self.get(id)?;
        if matches!(p.state, PatchState::RollingBack | PatchState::RolledBack) {
            return Err(ApplyError::WrongState {
                id,
                state: p.state.as_str(),
            });
        }
        for f in &p.funcs {
            if let Some(&top) = self.sites.get(&f.site).and_then(|v| v.last()) {
                if top != id {
                    return Err(ApplyError::NotTopmost {
                        id,
                        newer: top,
                        func: f.old_name.clone(),
                    });
                }
            }
        }
        // Pre-revert callbacks run with the patch still live; their failure is reported in
        // the patch's callback log, and the rollback goes on (as kpatch's pre-unpatch
        // callbacks, which return nothing).
        if let Err(what) = self.run_callbacks(g, id, CallbackKind::PreRevert, None) {
            warn!("patch {id}: {what}; rolling back anyway");
        }
        self.restore(g, id)?;
        if let Err(what) = self.run_callbacks(g, id, CallbackKind::Revert, None) {
            let _ = self.check(g, id);
            return Err(ApplyError::RevertCallback { id, what });
        }
        // The original code is back: a failed stack check (a pause timeout, say) does not
        // undo that; the re-check thread finishes the rollback.
        match self.check(g, id) {
            Ok(state) => Ok(state),
            Err(e) => {
                warn!("patch {id}: stack check after the rollback failed: {e}; re-checked later");
                Ok(self.get(id)?.state)
            }
        }
    }

    /// Puts the original code (and data units) back and enters `rolling-back`.
    pub(super) fn restore(&mut self, g: &dyn Guest, id: u32) -> Result<(), ApplyError> {
        let p = self.get(id)?;
        let funcs = p.funcs.clone();
        let data = p.data.clone();
        let image = (p.image_addr, p.image_addr + p.image_size);
        let (pause, _) = swap_sites(
            g,
            &Swap {
                funcs: &funcs,
                install: false,
                data: &data,
                id,
                image,
                watch: &[],
                register: None,
                pin: &[],
                keys: None,
            },
        )?;
        for f in &funcs {
            if let Some(v) = self.sites.get_mut(&f.site) {
                v.pop();
            }
        }
        let p = self.get_mut(id)?;
        p.state = PatchState::RollingBack;
        p.blockers.clear();
        p.thread_watch.clear();
        for d in &mut p.data {
            d.protected = true;
        }
        info!("patch {id}: original code restored (vCPUs paused {pause:?})");
        Ok(())
    }
}
