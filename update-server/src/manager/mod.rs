//! The patch manager: applies patches (link, run-pre, stop the world, write jumps),
//! decides commit by stack inspection, and rolls back.
//!
//! Life of a patch: `transition` (jumps installed, some thread may still be in old code)
//! -> `committed` (no task stack and no vCPU refers to any old function). Rollback:
//! `rolling-back` (original bytes restored, some thread may still be in the new code) ->
//! `rolled-back` (memory freed).
//!
//! One concept per module:
//! - [`patch`]: the patch model (state, redirected functions, data objects, callbacks,
//!   blockers) and its human-readable summary;
//! - `apply`: linking, run-pre checks and the stop-the-world swap of patch sites;
//! - `transfer`: data patches: resolving the globals, converting their values and the
//!   write rules that run during a transition;
//! - [`inspect`]: stack inspection, the commit check;
//! - `callbacks`: running a patch's callbacks in the guest;
//! - `rollback`: rollback, and aborting a failed apply.

mod apply;
mod callbacks;
pub mod inspect;
pub mod patch;
mod rollback;
mod transfer;

use std::collections::HashMap;

use thiserror::Error;

use crate::alloc::RegionAllocator;
use crate::alternatives::AltError;
use crate::guest::{Guest, GuestError, ModuleLookupError, SymbolError};
use crate::jumplabel::{JumpError, NodePool};
use crate::ktables::TableError;
use crate::link::LinkError;
use crate::module::ModuleError;
use crate::runpre::{SiteError, JMP_LEN};
use crate::thunks::ThunkError;

pub use inspect::find_blockers;
pub use patch::{Blocker, DataPatch, FuncPatch, Patch, PatchCallback, PatchState};

/// How often a pause is retried when a vCPU sits on a patch site.
const SITE_RETRIES: usize = 50;

/// Why applying, checking or rolling back a patch failed.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// The patch module is malformed.
    #[error("invalid patch module: {0}")]
    Module(#[from] ModuleError),
    /// Linking the module at its place in the patch region failed.
    #[error("linking failed: {0}")]
    Link(#[from] LinkError),
    /// The module's exception, BUG or ORC tables cannot be used.
    #[error("kernel tables: {0}")]
    Tables(#[from] TableError),
    /// Patching the module's alternatives for the guest's CPU failed.
    #[error("alternatives: {0}")]
    Alternatives(#[from] AltError),
    /// Rewriting the module's retpoline or return-thunk sites failed.
    #[error("retpoline/return thunk sites: {0}")]
    Thunks(#[from] ThunkError),
    /// The module's static branches (`__jump_table`) cannot be used.
    #[error("static keys: {0}")]
    Jumps(#[from] JumpError),
    /// A function the module replaces is not in the guest kernel's symbol table.
    #[error("function to replace '{name}': {source}")]
    OldFunction {
        /// The reference, as the module gives it.
        name: String,
        /// Why it does not name exactly one kernel function.
        source: SymbolError,
    },
    /// A kernel symbol the patch code references does not resolve to exactly one symbol.
    #[error("symbol '{name}' referenced by the patch code: {source}")]
    KernelSymbol {
        /// The symbol.
        name: String,
        /// Why it does not resolve.
        source: SymbolError,
    },
    /// The patch refers to a guest kernel module that cannot be patched now (not loaded,
    /// not live, or the module list is unreadable).
    #[error("the patch needs module '{module}' ({needed_by}): {source}")]
    NeedsModule {
        /// The module.
        module: String,
        /// The first reference to it (a function to replace, a symbol of the patch code).
        needed_by: String,
        /// Why it cannot be patched.
        source: ModuleLookupError,
    },
    /// A function to replace is shorter than the jump plus 4 bytes.
    #[error("function '{name}' is {size} bytes, too small for a {JMP_LEN}-byte jump")]
    TooSmall {
        /// The function.
        name: String,
        /// Its size in bytes, from the kernel's symbol table.
        size: u64,
    },
    /// The module replaces the same function twice.
    #[error("the module replaces '{0}' twice")]
    Duplicate(String),
    /// A patch site does not hold the expected bytes, or the new code is out of `jmp rel32` reach.
    #[error(transparent)]
    RunPre(#[from] SiteError),
    /// The patch region has too little free space for the linked image.
    #[error("patch region full: need {need} bytes, {free} free")]
    NoSpace {
        /// Bytes the image needs (whole pages).
        need: u64,
        /// Bytes still free in the region (possibly fragmented).
        free: u64,
    },
    /// Reading, writing, pausing or protecting the guest failed.
    #[error("guest access failed: {0}")]
    Guest(#[from] GuestError),
    /// A vCPU was still inside a patch site after `SITE_RETRIES` pauses; the string says which.
    #[error("a vCPU kept executing a patch site after {SITE_RETRIES} tries: {0}")]
    Busy(String),
    /// A global named by a data rule is not in the guest kernel's symbol table.
    #[error("data object '{name}': {source}")]
    DataObject {
        /// The reference, as the module gives it.
        name: String,
        /// Why it does not name exactly one kernel global.
        source: SymbolError,
    },
    /// A global named by a data rule cannot be converted: it lies in kernel text or read-only
    /// data, is not a 4- or 8-byte integer, or shares a page with another global of the patch.
    #[error("data object '{name}' at {addr:#x} ({size} bytes) cannot be patched: {why}")]
    BadDataObject {
        /// The global.
        name: String,
        /// Its guest virtual address.
        addr: u64,
        /// Its size in bytes, from the kernel's symbol table.
        size: u64,
        /// Which of the conditions above failed.
        why: String,
    },
    /// No patch has this id.
    #[error("no patch with id {0}")]
    NoSuchPatch(u32),
    /// Rollback was asked for a patch that is already rolling back or rolled back.
    #[error("patch {id} is already {state}")]
    WrongState {
        /// The patch.
        id: u32,
        /// Its current state ([`PatchState::as_str`]).
        state: &'static str,
    },
    /// An apply or thread callback failed; the patch was rolled back.
    #[error("patch {id}: {what}; the patch was rolled back")]
    CallbackAborted {
        /// The patch.
        id: u32,
        /// Which callback failed and how (and whether rolling back failed too).
        what: String,
    },
    /// A pre-apply callback refused the patch (or failed); nothing was changed in the guest.
    #[error("{0}: the patch was not applied")]
    Refused(String),
    /// A revert callback failed after the original code was restored; the rollback stands.
    #[error("patch {id}: original code restored, but {what}")]
    RevertCallback {
        /// The patch.
        id: u32,
        /// Which callback failed and how.
        what: String,
    },
    /// A global the module converts is already converted by a live patch: applying the
    /// rule again would scale its value twice.
    #[error("data object '{name}' is already converted by patch {id} ({state}); roll that patch back first")]
    DataAlreadyPatched {
        /// The global.
        name: String,
        /// The live patch that converts it.
        id: u32,
        /// That patch's state.
        state: &'static str,
    },
    /// A site write failed and undoing the writes already made failed too: the guest is
    /// left with some sites changed. Never returned while the guest is consistent.
    #[error("{what}; undoing it failed, these sites are left changed: {stuck}")]
    Inconsistent {
        /// What failed first.
        what: String,
        /// The sites that could not be restored.
        stuck: String,
    },
    /// Rollback was asked for a patch that a newer patch stacks on; the newer one must be
    /// rolled back first.
    #[error("patch {id} cannot be rolled back before patch {newer}, which replaces '{func}' on top of it")]
    NotTopmost {
        /// The patch asked to roll back.
        id: u32,
        /// The newer patch whose jump sits on top of it.
        newer: u32,
        /// A function both patches replace.
        func: String,
    },
}

/// The owner name of a patch's write protections.
fn owner(id: u32) -> String {
    format!("patch-{id}")
}

/// All patches of one guest.
pub struct Manager {
    alloc: RegionAllocator,
    patches: Vec<Patch>,
    next_id: u32,
    /// Stack of patch ids per patched site address (last = active).
    sites: HashMap<u64, Vec<u32>>,
    /// The last failure of each patch's periodic check, so it is logged once per reason.
    check_errors: HashMap<u32, String>,
    /// lucos's nodes in the guest's static key lists.
    keys: NodePool,
}

impl Manager {
    /// A manager with no patches, allocating patch memory from `g`'s patch region.
    pub fn new(g: &dyn Guest) -> Self {
        let r = g.patch_region();
        Self {
            alloc: RegionAllocator::new(r.va, r.size),
            patches: Vec::new(),
            next_id: 1,
            sites: HashMap::new(),
            check_errors: HashMap::new(),
            keys: NodePool::default(),
        }
    }

    /// Every patch applied so far, in id order, rolled-back ones included.
    pub fn patches(&self) -> &[Patch] {
        &self.patches
    }

    /// Forgets the oldest rolled-back patches beyond the newest `keep` of them, so that the
    /// record (and `list`) does not grow with every apply/rollback cycle.
    pub fn prune(&mut self, keep: usize) {
        let rolled = self
            .patches
            .iter()
            .filter(|p| p.state == PatchState::RolledBack)
            .count();
        let mut drop = rolled.saturating_sub(keep);
        if drop > 0 {
            log::debug!("forgetting {drop} old rolled-back patch records");
        }
        self.patches.retain(|p| {
            if drop > 0 && p.state == PatchState::RolledBack {
                drop -= 1;
                false
            } else {
                true
            }
        });
    }

    /// The patch with id `id`, or [`ApplyError::NoSuchPatch`].
    pub fn get(&self, id: u32) -> Result<&Patch, ApplyError> {
        self.patches
            .iter()
            .find(|p| p.id == id)
            .ok_or(ApplyError::NoSuchPatch(id))
    }

    fn get_mut(&mut self, id: u32) -> Result<&mut Patch, ApplyError> {
        self.patches
            .iter_mut()
            .find(|p| p.id == id)
            .ok_or(ApplyError::NoSuchPatch(id))
    }
}

#[cfg(test)]
mod tests;
