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
use crate::guest::{Guest, GuestError};
use crate::link::LinkError;
use crate::module::ModuleError;
use crate::runpre::{SiteError, JMP_LEN};

pub use inspect::find_blockers;
pub use patch::{Blocker, DataPatch, FuncPatch, Patch, PatchCallback, PatchState};

/// How often a pause is retried when a vCPU sits on a patch site.
const SITE_RETRIES: usize = 50;

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("invalid patch module: {0}")]
    Module(#[from] ModuleError),
    #[error("linking failed: {0}")]
    Link(#[from] LinkError),
    #[error("alternatives: {0}")]
    Alternatives(#[from] AltError),
    #[error("function '{0}' not found in the guest kernel's symbol table")]
    NoOldFunction(String),
    #[error("function '{name}' is {size} bytes, too small for a {JMP_LEN}-byte jump")]
    TooSmall { name: String, size: u64 },
    #[error("the module replaces '{0}' twice")]
    Duplicate(String),
    #[error(transparent)]
    RunPre(#[from] SiteError),
    #[error("patch region full: need {need} bytes, {free} free")]
    NoSpace { need: u64, free: u64 },
    #[error("guest access failed: {0}")]
    Guest(#[from] GuestError),
    #[error("a vCPU kept executing a patch site after {SITE_RETRIES} tries: {0}")]
    Busy(String),
    #[error("data object '{0}' not found in the guest kernel's symbol table")]
    NoDataObject(String),
    #[error("data object '{name}' at {addr:#x} ({size} bytes) cannot be patched: {why}")]
    BadDataObject {
        name: String,
        addr: u64,
        size: u64,
        why: String,
    },
    #[error("no patch with id {0}")]
    NoSuchPatch(u32),
    #[error("patch {id} is already {state}")]
    WrongState { id: u32, state: &'static str },
    #[error("patch {id}: {what}; the patch was rolled back")]
    CallbackAborted { id: u32, what: String },
    #[error("patch {id}: original code restored, but {what}")]
    RevertCallback { id: u32, what: String },
    #[error("patch {id} cannot be rolled back before patch {newer}, which replaces '{func}' on top of it")]
    NotTopmost { id: u32, newer: u32, func: String },
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
}

impl Manager {
    pub fn new(g: &dyn Guest) -> Self {
        let r = g.patch_region();
        Self {
            alloc: RegionAllocator::new(r.va, r.size),
            patches: Vec::new(),
            next_id: 1,
            sites: HashMap::new(),
        }
    }

    pub fn patches(&self) -> &[Patch] {
        &self.patches
    }

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
