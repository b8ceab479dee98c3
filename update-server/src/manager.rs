//! The patch manager: applies patches (link, run-pre, stop the world, write jumps),
//! decides commit by stack inspection, and rolls back.
//!
//! Life of a patch: `transition` (jumps installed, some thread may still be in old code)
//! -> `committed` (no task stack and no vCPU refers to any old function). Rollback:
//! `rolling-back` (original bytes restored, some thread may still be in the new code) ->
//! `rolled-back` (memory freed).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};
use serde::Serialize;
use thiserror::Error;

use crate::alloc::RegionAllocator;
use crate::alternatives::{self, AltError};
use crate::guest::{Guest, GuestError, VcpuState, WriteRule};
use crate::link::{self, LinkError};
use crate::module::{CallbackKind, DataRule, ModuleError, PatchModule};
use crate::runpre::{self, SiteError, FTRACE_NOP, JMP_LEN};

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
    fn rule(&self) -> DataRule {
        DataRule {
            name: self.name.clone(),
            mul: self.mul,
            div: self.div,
        }
    }
}

fn read_uint(g: &dyn Guest, addr: u64, size: u64) -> Result<u64, GuestError> {
    let mut b = [0u8; 8];
    g.read(addr, &mut b[..size as usize])?;
    Ok(u64::from_le_bytes(b))
}

fn write_uint(g: &dyn Guest, addr: u64, size: u64, v: u64) -> Result<(), GuestError> {
    g.write(addr, &v.to_le_bytes()[..size as usize])
}

/// The write rule while a data patch is in a transition. Every trapped write on the
/// page is counted in `faults`. A whole-object write is converted with `conv` when the
/// writer's RIP is outside the patch image `image` (apply: old code writes old units) or,
/// with `from_image`, inside it (rollback: the patch's code writes new units); everything
/// else is stored as written.
fn transfer_rule(
    size: u64,
    image: (u64, u64),
    from_image: bool,
    conv: impl Fn(u64) -> u64 + Send + Sync + 'static,
    faults: Arc<AtomicU64>,
    converted: Arc<AtomicU64>,
) -> WriteRule {
    Arc::new(move |off: i64, bytes: &[u8], rip: u64| {
        faults.fetch_add(1, Ordering::Relaxed);
        let in_image = rip >= image.0 && rip < image.1;
        if off == 0 && bytes.len() as u64 == size && in_image == from_image {
            let mut b = [0u8; 8];
            b[..bytes.len()].copy_from_slice(bytes);
            converted.fetch_add(1, Ordering::Relaxed);
            return conv(u64::from_le_bytes(b)).to_le_bytes()[..bytes.len()].to_vec();
        }
        bytes.to_vec()
    })
}

/// The owner name of a patch's write protections.
fn owner(id: u32) -> String {
    format!("patch-{id}")
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
    fn describe(&self) -> String {
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

    /// Finds and checks the globals a module's data rules name.
    fn resolve_data(g: &dyn Guest, m: &PatchModule) -> Result<Vec<DataPatch>, ApplyError> {
        let range = |a: &str, b: &str| Some((g.symbol(a)?.0, g.symbol(b)?.0));
        let text = range("_stext", "_etext");
        let rodata = range("__start_rodata", "__end_rodata");
        let mut out: Vec<DataPatch> = Vec::new();
        for r in &m.data {
            let (addr, size) = g
                .symbol(&r.name)
                .ok_or_else(|| ApplyError::NoDataObject(r.name.clone()))?;
            let bad = |why: String| ApplyError::BadDataObject {
                name: r.name.clone(),
                addr,
                size,
                why,
            };
            for (what, rng) in [("kernel text", text), ("read-only data", rodata)] {
                if let Some((lo, hi)) = rng {
                    if addr < hi && addr + size.max(1) > lo {
                        return Err(bad(format!("it lies in {what}")));
                    }
                }
            }
            if size != 4 && size != 8 {
                return Err(bad("only 4- and 8-byte integers can be scaled".into()));
            }
            if let Some(o) = out.iter().find(|o| o.addr >> 12 == addr >> 12) {
                return Err(bad(format!("it shares a page with '{}' of the same patch", o.name)));
            }
            out.push(DataPatch {
                name: r.name.clone(),
                addr,
                size,
                mul: r.mul,
                div: r.div,
                protected: false,
                faults: Arc::default(),
                converted: Arc::default(),
            });
        }
        Ok(out)
    }

    /// Applies a parsed module. On any error the guest is left untouched.
    pub fn apply(&mut self, g: &dyn Guest, m: &PatchModule) -> Result<u32, ApplyError> {
        let t0 = Instant::now();
        // Resolve old functions and check the module.
        let mut seen = std::collections::HashSet::new();
        let mut olds = Vec::new();
        for r in &m.replaces {
            if !seen.insert(r.old_name.clone()) {
                return Err(ApplyError::Duplicate(r.old_name.clone()));
            }
            let (addr, size) = g
                .symbol(&r.old_name)
                .ok_or_else(|| ApplyError::NoOldFunction(r.old_name.clone()))?;
            if size < (JMP_LEN + 4) as u64 {
                return Err(ApplyError::TooSmall {
                    name: r.old_name.clone(),
                    size,
                });
            }
            olds.push((addr, size));
        }
        let data = Self::resolve_data(g, m)?;
        let need = link::layout(m).size;
        let base = self.alloc.alloc(need).ok_or(ApplyError::NoSpace {
            need,
            free: self.alloc.free_bytes(),
        })?;
        match self.apply_at(g, m, &olds, data, base, t0) {
            Ok(id) => Ok(id),
            // The patch exists and is rolling back: its memory is freed when that finishes.
            Err(e @ ApplyError::CallbackAborted { .. }) => Err(e),
            Err(e) => {
                self.alloc.free(base);
                Err(e)
            }
        }
    }

    fn apply_at(
        &mut self,
        g: &dyn Guest,
        m: &PatchModule,
        olds: &[(u64, u64)],
        mut data: Vec<DataPatch>,
        base: u64,
        t0: Instant,
    ) -> Result<u32, ApplyError> {
        let resolve = |name: &str| g.symbol(name).map(|(a, _)| a);
        let mut linked = link::link(m, base, &resolve)?;
        let caps = g.cpu_caps()?;
        let alts = alternatives::apply(m, &mut linked, &caps)?;
        if alts.records > 0 {
            log::info!(
                "alternatives: {} of {} sites patched for the guest's CPU",
                alts.patched,
                alts.records
            );
        }
        let mut funcs = Vec::new();
        for (r, &(old_addr, old_size)) in m.replaces.iter().zip(olds) {
            let mut head = [0u8; 16];
            g.read(old_addr, &mut head)?;
            let site = old_addr + runpre::patch_offset(&head) as u64;
            let new_addr = linked.addr_of(r.new_load_idx, r.new_offset);
            let jump = runpre::jmp_rel32(site, new_addr).ok_or_else(|| {
                ApplyError::RunPre(SiteError::OutOfReach {
                    func: r.old_name.clone(),
                    target: new_addr,
                })
            })?;
            // What the site must hold now: the previous lucos jump if stacked, else ftrace's nop.
            let expected = match self.sites.get(&site).and_then(|v| v.last()) {
                Some(&prev) => self.jump_of(prev, site).unwrap_or(FTRACE_NOP.to_vec()),
                None => FTRACE_NOP.to_vec(),
            };
            let off = (site - old_addr) as usize;
            runpre::check_site(&r.old_name, site, &head[off..], &expected)?;
            funcs.push(FuncPatch {
                old_name: r.old_name.clone(),
                old_addr,
                old_size,
                new_name: r.new_name.clone(),
                new_addr,
                site,
                saved: expected,
                jump: jump.to_vec(),
            });
        }
        let callbacks: Vec<PatchCallback> = m
            .callbacks
            .iter()
            .map(|c| PatchCallback {
                kind: c.kind,
                name: c.name.clone(),
                addr: linked.addr_of(c.load_idx, c.offset),
                limit_ms: c.limit.as_millis() as u64,
            })
            .collect();
        // Copy code and data in; nothing executes it until the jumps exist.
        g.write(base, &linked.image)?;
        let id = self.next_id;
        let image = (base, base + linked.layout.size);
        // With thread callbacks, the tasks still in old code are found in the same pause.
        let watch: Vec<(u64, u64, String)> = if callbacks.iter().any(|c| c.kind == CallbackKind::Thread) {
            funcs
                .iter()
                .map(|f| (f.old_addr, f.old_addr + f.old_size, f.old_name.clone()))
                .collect()
        } else {
            vec![]
        };
        let mut in_old = Vec::new();
        let pause = self.swap_sites(g, &funcs, true, &data, id, image, (&watch, &mut in_old))?;
        self.next_id += 1;
        for d in &mut data {
            d.protected = true;
        }
        for f in &funcs {
            self.sites.entry(f.site).or_default().push(id);
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.patches.push(Patch {
            id,
            name: m.name.clone(),
            description: m.description.clone(),
            state: PatchState::Transition,
            funcs,
            data,
            image_addr: base,
            image_size: linked.layout.size,
            warnings: m.warnings.clone(),
            pause_us: pause.as_micros() as u64,
            apply_us: t0.elapsed().as_micros() as u64,
            applied_at: now,
            checks: 0,
            blockers: vec![],
            callbacks,
            callback_log: vec![],
            thread_watch: in_old.iter().filter_map(|b| b.task).collect(),
            transition_started: Some(Instant::now()),
        });
        info!("patch {id} '{}' applied: vCPUs paused {pause:?}", m.name);
        if let Err(what) = self.run_callbacks(g, id, CallbackKind::Apply, None) {
            return Err(self.abort(g, id, what));
        }
        // First commit check right away.
        self.check(g, id)?;
        Ok(id)
    }

    /// Runs patch `id`'s callbacks of `kind` in the guest (for a thread callback, with the
    /// task's `task_struct` and pid). Logs each outcome in the patch; the first failure is
    /// returned as a message.
    fn run_callbacks(
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
        for c in cbs {
            let args = task.map(|(pid, t)| [t, pid as u64]).unwrap_or([0, 0]);
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
            info!("patch {id}: {line}");
            if let Ok(p) = self.get_mut(id) {
                p.callback_log.push(line);
            }
            if let Some(why) = failed {
                return Err(why);
            }
        }
        Ok(())
    }

    /// A callback failed during apply or transition: roll the patch back (without its
    /// revert callbacks: the update it would undo did not complete).
    fn abort(&mut self, g: &dyn Guest, id: u32, what: String) -> ApplyError {
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

    fn jump_of(&self, id: u32, site: u64) -> Option<Vec<u8>> {
        let p = self.patches.iter().find(|p| p.id == id)?;
        p.funcs.iter().find(|f| f.site == site).map(|f| f.jump.clone())
    }

    /// Stops the world and writes each function's jump (`install`) or saved bytes. Retries
    /// while a vCPU's RIP is inside a site; re-checks the bytes with the world stopped.
    /// `scan.0` non-empty: also lists, in the same pause, who is inside those ranges (into
    /// `scan.1`).
    #[allow(clippy::too_many_arguments)]
    fn swap_sites(
        &self,
        g: &dyn Guest,
        funcs: &[FuncPatch],
        install: bool,
        data: &[DataPatch],
        id: u32,
        image: (u64, u64),
        scan: (&[(u64, u64, String)], &mut Vec<Blocker>),
    ) -> Result<Duration, ApplyError> {
        let (ranges, found) = scan;
        let mut last = String::new();
        for attempt in 0..SITE_RETRIES {
            let mut outcome: Result<bool, ApplyError> = Ok(false);
            let pause = g.stop_the_world(&mut |vcpus: &[VcpuState]| {
                outcome = (|| {
                    for v in vcpus {
                        if let Some(f) = funcs.iter().find(|f| v.rip > f.site && v.rip < f.site + JMP_LEN as u64) {
                            last = format!("vCPU {} at {:#x} inside the site of {}", v.id, v.rip, f.old_name);
                            return Ok(false);
                        }
                    }
                    for f in funcs {
                        let from = if install { &f.saved } else { &f.jump };
                        let mut cur = vec![0u8; JMP_LEN];
                        g.read(f.site, &mut cur)?;
                        if &cur != from {
                            return Err(ApplyError::RunPre(SiteError::Changed {
                                func: f.old_name.clone(),
                                site: f.site,
                                actual: runpre::disasm(&cur, f.site, 2),
                            }));
                        }
                    }
                    for f in funcs {
                        let to = if install { &f.jump } else { &f.saved };
                        g.write(f.site, to)?;
                    }
                    // Carry the data over in the same pause; undo the jumps if that fails.
                    if let Err(e) = Self::transfer_data(g, data, id, image, install) {
                        for f in funcs {
                            let back = if install { &f.saved } else { &f.jump };
                            let _ = g.write(f.site, back);
                        }
                        return Err(e);
                    }
                    if !ranges.is_empty() {
                        match find_blockers(g, vcpus, ranges) {
                            Ok(b) => *found = b,
                            Err(e) => warn!("listing tasks in old code: {e}"),
                        }
                    }
                    Ok(true)
                })();
            })?;
            match outcome {
                Ok(true) => return Ok(pause),
                Ok(false) => {
                    warn!("attempt {attempt}: {last}; retrying");
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(e),
            }
        }
        Err(ApplyError::Busy(last))
    }

    /// With the world stopped: converts each data object's value (forward on apply,
    /// backward on rollback) and write-protects it with the matching transfer rule. On
    /// failure every value and protection is restored.
    fn transfer_data(
        g: &dyn Guest,
        data: &[DataPatch],
        id: u32,
        image: (u64, u64),
        install: bool,
    ) -> Result<(), ApplyError> {
        if data.is_empty() {
            return Ok(());
        }
        let who = owner(id);
        if !install {
            // The forward protection is still there if the patch never committed.
            let _ = g.unprotect(&who);
        }
        let mut done: Vec<(u64, u64, u64)> = Vec::new();
        let result = (|| -> Result<(), ApplyError> {
            for d in data {
                let v = read_uint(g, d.addr, d.size)?;
                let rule = d.rule();
                let nv = if install { rule.forward(v) } else { rule.backward(v) };
                write_uint(g, d.addr, d.size, nv)?;
                done.push((d.addr, d.size, v));
                let conv = move |x: u64| if install { rule.forward(x) } else { rule.backward(x) };
                let r = transfer_rule(d.size, image, !install, conv, d.faults.clone(), d.converted.clone());
                g.protect(d.addr, d.size, &who, r)?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = g.unprotect(&who);
            for (addr, size, v) in done {
                let _ = write_uint(g, addr, size, v);
            }
        }
        result
    }

    /// Ranges a thread must not be in for `p`'s current transition to finish.
    fn busy_ranges(p: &Patch) -> Vec<(u64, u64, String)> {
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
        self.restore(g, id)?;
        if let Err(what) = self.run_callbacks(g, id, CallbackKind::Revert, None) {
            let _ = self.check(g, id);
            return Err(ApplyError::RevertCallback { id, what });
        }
        self.check(g, id)
    }

    /// Puts the original code (and data units) back and enters `rolling-back`.
    fn restore(&mut self, g: &dyn Guest, id: u32) -> Result<(), ApplyError> {
        let p = self.get(id)?;
        let funcs = p.funcs.clone();
        let data = p.data.clone();
        let image = (p.image_addr, p.image_addr + p.image_size);
        let pause = self.swap_sites(g, &funcs, false, &data, id, image, (&[], &mut Vec::new()))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{PatchRegion, TaskState};
    use std::sync::Mutex;

    /// Guest memory as a byte map; protection recorded, writes routed through the rule.
    #[derive(Default)]
    struct FakeGuest {
        mem: Mutex<HashMap<u64, u8>>,
        rules: Mutex<Vec<(u64, u64, String, WriteRule)>>,
        fail_protect: bool,
        calls: Mutex<Vec<(u64, [u64; 2])>>,
    }

    const FAILING_CB: u64 = 0xffff_ffff_9000_0f00;

    impl FakeGuest {
        /// A guest write of `v` at `addr` from code at `rip`, as the VMM would complete it.
        fn guest_write(&self, addr: u64, v: u64, rip: u64) {
            let rules = self.rules.lock().unwrap();
            let bytes = v.to_le_bytes().to_vec();
            let out = match rules.iter().find(|r| addr >> 12 == r.0 >> 12) {
                Some(r) => (r.3)(addr as i64 - r.0 as i64, &bytes, rip),
                None => bytes,
            };
            drop(rules);
            self.write(addr, &out).unwrap();
        }
        fn value(&self, addr: u64) -> u64 {
            read_uint(self, addr, 8).unwrap()
        }
    }

    impl Guest for FakeGuest {
        fn symbol(&self, _: &str) -> Option<(u64, u64)> {
            None
        }
        fn describe(&self, a: u64) -> String {
            format!("{a:#x}")
        }
        fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), GuestError> {
            let m = self.mem.lock().unwrap();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = *m.get(&(va + i as u64)).unwrap_or(&0);
            }
            Ok(())
        }
        fn write(&self, va: u64, data: &[u8]) -> Result<(), GuestError> {
            let mut m = self.mem.lock().unwrap();
            for (i, b) in data.iter().enumerate() {
                m.insert(va + i as u64, *b);
            }
            Ok(())
        }
        fn stop_the_world(&self, f: &mut dyn FnMut(&[VcpuState])) -> Result<Duration, GuestError> {
            f(&[]);
            Ok(Duration::ZERO)
        }
        fn tasks(&self, _: &[VcpuState]) -> Result<Vec<TaskState>, GuestError> {
            Ok(vec![])
        }
        fn patch_region(&self) -> PatchRegion {
            PatchRegion { va: 0, size: 0 }
        }
        fn protect(&self, va: u64, len: u64, owner: &str, rule: WriteRule) -> Result<(), GuestError> {
            if self.fail_protect {
                return Err(GuestError::Protect("no read-only memslots".into()));
            }
            self.rules.lock().unwrap().push((va, len, owner.into(), rule));
            Ok(())
        }
        fn call(&self, func: u64, args: [u64; 2], _: Duration) -> Result<u64, GuestError> {
            self.calls.lock().unwrap().push((func, args));
            match func {
                FAILING_CB => Ok(u64::MAX), // returns -1
                _ => Ok(0),
            }
        }
        fn readonly_pages(&self) -> u64 {
            self.rules.lock().unwrap().len() as u64
        }
        fn cpu_caps(&self) -> Result<Vec<u32>, GuestError> {
            Ok(vec![0; 24])
        }
        fn unprotect(&self, owner: &str) -> Result<(), GuestError> {
            let mut r = self.rules.lock().unwrap();
            let before = r.len();
            r.retain(|x| x.2 != owner);
            if r.len() == before {
                return Err(GuestError::Protect(format!("no protection for {owner}").into()));
            }
            Ok(())
        }
    }

    const OBJ: u64 = 0xffff_ffff_8200_1000;
    const IMAGE: (u64, u64) = (0xffff_ffff_9000_0000, 0xffff_ffff_9000_2000);
    const OLD_CODE: u64 = 0xffff_ffff_8100_0100;
    const NEW_CODE: u64 = IMAGE.0 + 0x40;

    fn ms_to_us() -> DataPatch {
        DataPatch {
            name: "timeout".into(),
            addr: OBJ,
            size: 8,
            mul: 1000,
            div: 1,
            protected: false,
            faults: Arc::default(),
            converted: Arc::default(),
        }
    }

    #[test]
    fn apply_converts_value_and_old_code_writes_until_commit() {
        let g = FakeGuest::default();
        write_uint(&g, OBJ, 8, 250).unwrap();
        let d = ms_to_us();
        Manager::transfer_data(&g, std::slice::from_ref(&d), 7, IMAGE, true).unwrap();
        assert_eq!(g.value(OBJ), 250_000, "current value converted at apply");
        g.guest_write(OBJ, 500, OLD_CODE);
        assert_eq!(g.value(OBJ), 500_000, "old code's write converted");
        g.guest_write(OBJ, 42_000, NEW_CODE);
        assert_eq!(g.value(OBJ), 42_000, "new code's write stored as is");
        g.guest_write(OBJ + 8, 3, OLD_CODE);
        assert_eq!(g.value(OBJ + 8), 3, "a neighbour on the same page is untouched");
        assert_eq!(d.faults.load(Ordering::Relaxed), 3);
        assert_eq!(d.converted.load(Ordering::Relaxed), 1);
        // Commit drops the protection; rollback converts back and protects against the
        // patch's own code still running.
        g.unprotect(&owner(7)).unwrap();
        Manager::transfer_data(&g, std::slice::from_ref(&d), 7, IMAGE, false).unwrap();
        assert_eq!(g.value(OBJ), 42);
        g.guest_write(OBJ, 9_000, NEW_CODE);
        assert_eq!(g.value(OBJ), 9);
        g.guest_write(OBJ, 77, OLD_CODE);
        assert_eq!(g.value(OBJ), 77);
    }

    #[test]
    fn failed_protection_restores_the_value() {
        let g = FakeGuest {
            fail_protect: true,
            ..Default::default()
        };
        write_uint(&g, OBJ, 8, 250).unwrap();
        let e = Manager::transfer_data(&g, &[ms_to_us()], 1, IMAGE, true).unwrap_err();
        assert!(e.to_string().contains("no read-only memslots"), "{e}");
        assert_eq!(g.value(OBJ), 250, "value restored");
        assert!(g.rules.lock().unwrap().is_empty(), "nothing left protected");
    }

    fn patch_with(callbacks: Vec<PatchCallback>) -> Patch {
        Patch {
            id: 1,
            name: "t".into(),
            description: String::new(),
            state: PatchState::Transition,
            funcs: vec![FuncPatch {
                old_name: "old".into(),
                old_addr: OLD_CODE,
                old_size: 0x40,
                new_name: "new".into(),
                new_addr: NEW_CODE,
                site: OLD_CODE,
                saved: FTRACE_NOP.to_vec(),
                jump: runpre::jmp_rel32(OLD_CODE, NEW_CODE).unwrap().to_vec(),
            }],
            data: vec![],
            image_addr: IMAGE.0,
            image_size: IMAGE.1 - IMAGE.0,
            warnings: vec![],
            pause_us: 0,
            apply_us: 0,
            applied_at: 0,
            checks: 0,
            blockers: vec![],
            callbacks,
            callback_log: vec![],
            thread_watch: HashMap::new(),
            transition_started: None,
        }
    }

    fn cb(kind: CallbackKind, name: &str, addr: u64) -> PatchCallback {
        PatchCallback {
            kind,
            name: name.into(),
            addr,
            limit_ms: 100,
        }
    }

    #[test]
    fn thread_callbacks_run_for_tasks_that_left_old_code_then_commit() {
        let g = FakeGuest::default();
        let mut m = Manager::new(&g);
        let mut p = patch_with(vec![cb(CallbackKind::Thread, "left", 0x1000)]);
        p.thread_watch.insert(42, 0xffff_8880_0000_4200);
        m.patches.push(p);
        // The fake guest has no tasks: task 42 has left the old code.
        assert_eq!(m.check(&g, 1).unwrap(), PatchState::Committed);
        assert_eq!(*g.calls.lock().unwrap(), vec![(0x1000, [0xffff_8880_0000_4200, 42])]);
        let p = m.get(1).unwrap();
        assert!(p.thread_watch.is_empty());
        assert!(
            p.callback_log[0].contains("thread callback 'left' for task 42: returned 0"),
            "{:?}",
            p.callback_log
        );
    }

    #[test]
    fn a_failing_thread_callback_rolls_the_patch_back() {
        let g = FakeGuest::default();
        let mut m = Manager::new(&g);
        let mut p = patch_with(vec![cb(CallbackKind::Thread, "bad", FAILING_CB)]);
        g.write(OLD_CODE, &p.funcs[0].jump).unwrap();
        p.thread_watch.insert(7, 0x7000);
        m.patches.push(p);
        let e = m.check(&g, 1).unwrap_err();
        assert!(matches!(e, ApplyError::CallbackAborted { id: 1, .. }), "{e}");
        assert!(
            e.to_string()
                .contains("thread callback 'bad' for task 7 failed: it returned -1"),
            "{e}"
        );
        assert_eq!(m.get(1).unwrap().state, PatchState::RolledBack);
        let mut site = [0u8; 5];
        g.read(OLD_CODE, &mut site).unwrap();
        assert_eq!(site, FTRACE_NOP, "original bytes back");
    }

    #[test]
    fn a_failing_revert_callback_is_reported_and_the_rollback_goes_on() {
        let g = FakeGuest::default();
        let mut m = Manager::new(&g);
        let mut p = patch_with(vec![
            cb(CallbackKind::Apply, "never-here", 0x2000),
            cb(CallbackKind::Revert, "undo", FAILING_CB),
        ]);
        p.state = PatchState::Committed;
        g.write(OLD_CODE, &p.funcs[0].jump).unwrap();
        m.patches.push(p);
        let e = m.rollback(&g, 1).unwrap_err();
        assert!(matches!(e, ApplyError::RevertCallback { id: 1, .. }), "{e}");
        assert_eq!(m.get(1).unwrap().state, PatchState::RolledBack);
        assert_eq!(g.calls.lock().unwrap().len(), 1, "only the revert callback ran");
        let mut site = [0u8; 5];
        g.read(OLD_CODE, &mut site).unwrap();
        assert_eq!(site, FTRACE_NOP, "original bytes back");
    }
}
