//! The patch manager: applies patches (link, run-pre, stop the world, write jumps),
//! decides commit by stack inspection, and rolls back.
//!
//! Life of a patch: `transition` (jumps installed, some thread may still be in old code)
//! -> `committed` (no task stack and no vCPU refers to any old function). Rollback:
//! `rolling-back` (original bytes restored, some thread may still be in the new code) ->
//! `rolled-back` (memory freed).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};
use serde::Serialize;
use thiserror::Error;

use crate::alloc::RegionAllocator;
use crate::guest::{Guest, GuestError, VcpuState};
use crate::link::{self, LinkError};
use crate::module::{ModuleError, PatchModule};
use crate::runpre::{self, FTRACE_NOP, JMP_LEN};

/// How often a pause is retried when a vCPU sits on a patch site.
const SITE_RETRIES: usize = 50;

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("invalid patch module: {0}")]
    Module(#[from] ModuleError),
    #[error("linking failed: {0}")]
    Link(#[from] LinkError),
    #[error("function '{0}' not found in the guest kernel's symbol table")]
    NoOldFunction(String),
    #[error("function '{name}' is {size} bytes, too small for a {JMP_LEN}-byte jump")]
    TooSmall { name: String, size: u64 },
    #[error("the module replaces '{0}' twice")]
    Duplicate(String),
    #[error("{0}")]
    RunPre(String),
    #[error("patch region full: need {need} bytes, {free} free")]
    NoSpace { need: u64, free: u64 },
    #[error("guest access failed: {0}")]
    Guest(#[from] GuestError),
    #[error("a vCPU kept executing a patch site after {SITE_RETRIES} tries: {0}")]
    Busy(String),
    #[error("no patch with id {0}")]
    NoSuchPatch(u32),
    #[error("patch {id} is already {state}")]
    WrongState { id: u32, state: &'static str },
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

/// Who still runs code that blocks a transition.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Blocker {
    pub who: String,
    pub at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Patch {
    pub id: u32,
    pub name: String,
    pub description: String,
    pub state: PatchState,
    pub funcs: Vec<FuncPatch>,
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
        let _ = writeln!(s, "  code+data at {:#x} ({} bytes)", self.image_addr, self.image_size);
        let _ = writeln!(
            s,
            "  vCPUs paused {} us; apply took {} us; {} stack checks",
            self.pause_us, self.apply_us, self.checks
        );
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
        let need = link::layout(m).size;
        let base = self.alloc.alloc(need).ok_or(ApplyError::NoSpace {
            need,
            free: self.alloc.free_bytes(),
        })?;
        match self.apply_at(g, m, &olds, base, t0) {
            Ok(id) => Ok(id),
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
        base: u64,
        t0: Instant,
    ) -> Result<u32, ApplyError> {
        let resolve = |name: &str| g.symbol(name).map(|(a, _)| a);
        let linked = link::link(m, base, &resolve)?;
        let mut funcs = Vec::new();
        for (r, &(old_addr, old_size)) in m.replaces.iter().zip(olds) {
            let mut head = [0u8; 16];
            g.read(old_addr, &mut head)?;
            let site = old_addr + runpre::patch_offset(&head) as u64;
            let new_addr = linked.addr_of(r.new_load_idx, r.new_offset);
            let jump = runpre::jmp_rel32(site, new_addr).ok_or_else(|| {
                ApplyError::RunPre(format!("{} is out of jmp rel32 range of {new_addr:#x}", r.old_name))
            })?;
            // What the site must hold now: the previous lucos jump if stacked, else ftrace's nop.
            let expected = match self.sites.get(&site).and_then(|v| v.last()) {
                Some(&prev) => self.jump_of(prev, site).unwrap_or(FTRACE_NOP.to_vec()),
                None => FTRACE_NOP.to_vec(),
            };
            let off = (site - old_addr) as usize;
            runpre::check_site(&r.old_name, site, &head[off..], &expected).map_err(ApplyError::RunPre)?;
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
        // Copy code and data in; nothing executes it until the jumps exist.
        g.write(base, &linked.image)?;
        let pause = self.swap_sites(g, &funcs, true)?;
        let id = self.next_id;
        self.next_id += 1;
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
            image_addr: base,
            image_size: linked.layout.size,
            warnings: m.warnings.clone(),
            pause_us: pause.as_micros() as u64,
            apply_us: t0.elapsed().as_micros() as u64,
            applied_at: now,
            checks: 0,
            blockers: vec![],
            transition_started: Some(Instant::now()),
        });
        info!("patch {id} '{}' applied: vCPUs paused {pause:?}", m.name);
        // First commit check right away.
        self.check(g, id)?;
        Ok(id)
    }

    fn jump_of(&self, id: u32, site: u64) -> Option<Vec<u8>> {
        let p = self.patches.iter().find(|p| p.id == id)?;
        p.funcs.iter().find(|f| f.site == site).map(|f| f.jump.clone())
    }

    /// Stops the world and writes each function's jump (`install`) or saved bytes. Retries
    /// while a vCPU's RIP is inside a site; re-checks the bytes with the world stopped.
    fn swap_sites(&self, g: &dyn Guest, funcs: &[FuncPatch], install: bool) -> Result<Duration, ApplyError> {
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
                            return Err(ApplyError::RunPre(format!(
                                "{} changed under us at {:#x}: `{}`",
                                f.old_name,
                                f.site,
                                runpre::disasm(&cur, f.site, 2)
                            )));
                        }
                    }
                    for f in funcs {
                        let to = if install { &f.jump } else { &f.saved };
                        g.write(f.site, to)?;
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
        let mut result: Result<Vec<Blocker>, GuestError> = Ok(vec![]);
        g.stop_the_world(&mut |vcpus: &[VcpuState]| {
            result = find_blockers(g, vcpus, &ranges);
        })?;
        let blockers = result?;
        let p = self.get_mut(id)?;
        p.checks += 1;
        p.blockers = blockers;
        if p.blockers.is_empty() {
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
        let funcs = p.funcs.clone();
        let pause = self.swap_sites(g, &funcs, false)?;
        for f in &funcs {
            if let Some(v) = self.sites.get_mut(&f.site) {
                v.pop();
            }
        }
        let p = self.get_mut(id)?;
        p.state = PatchState::RollingBack;
        p.blockers.clear();
        info!("patch {id}: original code restored (vCPUs paused {pause:?})");
        self.check(g, id)
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
                });
                break;
            }
        }
    }
    Ok(out)
}
