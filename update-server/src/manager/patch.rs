//! The patch model: a patch's state, the functions it redirects, the data it converts,
//! its callbacks, what blocks its transition, and its summary for people.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::module::{CallbackKind, DataRule};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatchState {
    Transition,
    Committed,
    RollingBack,
    RolledBack,
}

impl PatchState {
    pub fn as_str(self) -> &'static str {
        match self {
            PatchState::Transition => "transition",
            PatchState::Committed => "committed",
            PatchState::RollingBack => "rolling-back",
            PatchState::RolledBack => "rolled-back",
        }
    }
}

/// One redirected function.
#[derive(Debug, Clone, Serialize)]
pub struct FuncPatch {
    pub old_name: String,
    pub old_addr: u64,
    pub old_size: u64,
    pub new_name: String,
    pub new_addr: u64,
    /// Where the jump is written (old_addr, or after an endbr64).
    pub site: u64,
    pub saved: Vec<u8>,
    pub jump: Vec<u8>,
}

/// A global whose meaning the patch changes (`LUCOS_DATA_SCALE`).
#[derive(Debug, Clone, Serialize)]
pub struct DataPatch {
    pub name: String,
    pub addr: u64,
    pub size: u64,
    pub mul: u64,
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
    pub who: String,
    pub at: String,
    /// The task's pid and `task_struct` (None for a vCPU).
    #[serde(skip)]
    pub task: Option<(i32, u64)>,
}

/// A callback of a patch, linked.
#[derive(Debug, Clone, Serialize)]
pub struct PatchCallback {
    pub kind: CallbackKind,
    pub name: String,
    pub addr: u64,
    pub limit_ms: u64,
}

impl PatchCallback {
    pub(super) fn describe(&self) -> String {
        format!("{} callback '{}'", self.kind.as_str(), self.name)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Patch {
    pub id: u32,
    pub name: String,
    pub description: String,
    pub state: PatchState,
    pub funcs: Vec<FuncPatch>,
    pub data: Vec<DataPatch>,
    pub image_addr: u64,
    pub image_size: u64,
    pub warnings: Vec<String>,
    /// µs the vCPUs were stopped to install the jumps.
    pub pause_us: u64,
    /// µs for the whole apply request.
    pub apply_us: u64,
    pub applied_at: u64,
    pub checks: u32,
    pub blockers: Vec<Blocker>,
    pub callbacks: Vec<PatchCallback>,
    /// What the callbacks did, in order (for status).
    pub callback_log: Vec<String>,
    /// Tasks seen in old code during the transition whose thread callbacks have not run
    /// yet: pid -> task_struct.
    #[serde(skip)]
    pub thread_watch: HashMap<i32, u64>,
    #[serde(skip)]
    pub transition_started: Option<Instant>,
}

impl Patch {
    pub fn summary(&self) -> String {
        let funcs: Vec<&str> = self.funcs.iter().map(|f| f.old_name.as_str()).collect();
        format!(
            "{:>3}  {:<13} {:<20} {}",
            self.id,
            self.state.as_str(),
            self.name,
            funcs.join(",")
        )
    }

    pub fn details(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "patch {} '{}': {}", self.id, self.name, self.state.as_str());
        if !self.description.is_empty() {
            let _ = writeln!(s, "  {}", self.description);
        }
        for f in &self.funcs {
            let _ = writeln!(
                s,
                "  {} ({:#x}, {} bytes) -> {} ({:#x})",
                f.old_name, f.old_addr, f.old_size, f.new_name, f.new_addr
            );
        }
        for d in &self.data {
            let _ = writeln!(
                s,
                "  data {} ({:#x}, {} bytes): new = old * {} / {}; {} trapped writes, {} converted; {}",
                d.name,
                d.addr,
                d.size,
                d.mul,
                d.div,
                d.faults.load(Ordering::Relaxed),
                d.converted.load(Ordering::Relaxed),
                if d.protected {
                    "write-protected"
                } else {
                    "not protected"
                }
            );
        }
        let _ = writeln!(s, "  code+data at {:#x} ({} bytes)", self.image_addr, self.image_size);
        let _ = writeln!(
            s,
            "  vCPUs paused {} us; apply took {} us; {} stack checks",
            self.pause_us, self.apply_us, self.checks
        );
        for c in &self.callbacks {
            let _ = writeln!(s, "  {} at {:#x} (limit {} ms)", c.describe(), c.addr, c.limit_ms);
        }
        for l in &self.callback_log {
            let _ = writeln!(s, "  {l}");
        }
        for b in &self.blockers {
            let _ = writeln!(s, "  waiting: {} is in {}", b.who, b.at);
        }
        for w in &self.warnings {
            let _ = writeln!(s, "  warning: {w}");
        }
        s
    }
}
