//! The patch model: a patch's state, the functions it redirects, the data it converts,
//! its callbacks, what blocks its transition, and its summary for people.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::module::{CallbackKind, DataRule};

pub use crate::protocol::PatchState;

/// One redirected function.
#[derive(Debug, Clone, Serialize)]
pub struct FuncPatch {
    /// Guest kernel function being replaced.
    pub old_name: String,
    /// Guest virtual address of the old function, from the kernel's symbol table.
    pub old_addr: u64,
    /// Size of the old function in bytes: `[old_addr, old_addr + old_size)` is what stack
    /// inspection waits on.
    pub old_size: u64,
    /// Replacement function in the patch module.
    pub new_name: String,
    /// Guest virtual address of the replacement, in the patch image.
    pub new_addr: u64,
    /// Where the jump is written (old_addr, or after an endbr64).
    pub site: u64,
    /// The [`JMP_LEN`](crate::runpre::JMP_LEN) bytes the site held before: ftrace's nop,
    /// or the jump of the patch this one stacks on; written back on rollback.
    pub saved: Vec<u8>,
    /// The `jmp rel32` from `site` to `new_addr`.
    pub jump: Vec<u8>,
}

/// A global whose meaning the patch changes (`LUCOS_DATA_SCALE`).
#[derive(Debug, Clone, Serialize)]
pub struct DataPatch {
    /// Guest global being converted.
    pub name: String,
    /// Its guest virtual address.
    pub addr: u64,
    /// Its size in bytes: 4 or 8.
    pub size: u64,
    /// Numerator of the old-to-new factor (`LUCOS_DATA_SCALE`); never 0.
    pub mul: u64,
    /// Denominator of the old-to-new factor; never 0.
    pub div: u64,
    /// Write-protected right now (during a transition).
    pub protected: bool,
    /// Guest writes trapped on the object's page(s), since apply.
    #[serde(skip)]
    pub faults: Arc<AtomicU64>,
    /// Of those, writes to the object that were converted (state transfer).
    #[serde(skip)]
    pub converted: Arc<AtomicU64>,
}

impl DataPatch {
    pub(super) fn rule(&self) -> DataRule {
        DataRule {
            name: self.name.clone(),
            mul: self.mul,
            div: self.div,
        }
    }
}

/// Who still runs code that blocks a transition.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Blocker {
    /// The vCPU (`vCPU N`) or task (`task PID (comm, state)`) found in the code.
    pub who: String,
    /// The code range it is in and where exactly (symbol and offset of the RIP or stack word).
    pub at: String,
    /// The task's pid and `task_struct` (None for a vCPU).
    #[serde(skip)]
    pub task: Option<(i32, u64)>,
}

/// A callback of a patch, linked.
#[derive(Debug, Clone, Serialize)]
pub struct PatchCallback {
    /// When the callback runs.
    pub kind: CallbackKind,
    /// The author's function, for messages.
    pub name: String,
    /// Guest virtual address of the wrapper the server calls, in the patch image.
    pub addr: u64,
    /// Longest the callback may run in the guest, in milliseconds.
    pub limit_ms: u64,
    /// Its object: a guest module's name, or empty for vmlinux.
    pub object: String,
    /// That module's `struct module` address when the patch was applied (0 for vmlinux):
    /// the first argument of every call but a thread callback's.
    pub module: u64,
}

impl PatchCallback {
    pub(super) fn describe(&self) -> String {
        match self.object.as_str() {
            "" => format!("{} callback '{}'", self.kind.as_str(), self.name),
            o => format!("{} callback '{}' of {o}", self.kind.as_str(), self.name),
        }
    }
}

/// A patch applied to the guest, in whatever state it is now; kept until the VM stops.
#[derive(Debug, Clone, Serialize)]
pub struct Patch {
    /// Patch number, unique per guest, starting at 1 and never reused.
    pub id: u32,
    /// Name from the module's `.lucos.info` (`unnamed` without one).
    pub name: String,
    /// Description from the module's `.lucos.info` (may be empty).
    pub description: String,
    /// Where the patch is in its life.
    pub state: PatchState,
    /// The functions it redirects, in `.lucos.replace` order.
    pub funcs: Vec<FuncPatch>,
    /// The globals it converts (`LUCOS_DATA_SCALE`).
    pub data: Vec<DataPatch>,
    /// Guest virtual address of the linked code and data, in the patch region.
    pub image_addr: u64,
    /// Size of that image in bytes (whole pages).
    pub image_size: u64,
    /// The guest kernel modules the patch replaces functions of or refers to: pinned
    /// (the guest cannot unload them) from the pause that installs the jumps until the
    /// rollback finds no thread in the patch code.
    pub modules: Vec<crate::guest::ModuleRef>,
    /// Where the patch's `struct module` is, while the guest kernel knows the patch code
    /// as a module (None: the guest kernel has no module support lucos can use).
    #[serde(skip)]
    pub module_at: Option<u64>,
    /// Non-fatal problems found while parsing the module.
    pub warnings: Vec<String>,
    /// µs the vCPUs were stopped to install the jumps.
    pub pause_us: u64,
    /// µs for the whole apply request.
    pub apply_us: u64,
    /// When it was applied, in seconds since the Unix epoch.
    pub applied_at: u64,
    /// Number of stack inspections run for it so far.
    pub checks: u32,
    /// What kept the last stack inspection from finishing the transition (empty when nothing did).
    pub blockers: Vec<Blocker>,
    /// Its callbacks, with their guest addresses.
    pub callbacks: Vec<PatchCallback>,
    /// What the callbacks did, in order (for status).
    pub callback_log: Vec<String>,
    /// Tasks seen in old code during the transition whose thread callbacks have not run
    /// yet: pid -> task_struct.
    #[serde(skip)]
    pub thread_watch: HashMap<i32, u64>,
    /// When the transition started (set on apply); not serialized.
    #[serde(skip)]
    pub transition_started: Option<Instant>,
}
