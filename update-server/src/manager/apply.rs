//! Applying a patch: linking it into the patch region, the run-pre checks, and the
//! stop-the-world swap that writes (or removes) the jumps.

use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};

use super::inspect::find_blockers;
use super::patch::{Blocker, DataPatch, FuncPatch, Patch, PatchCallback, PatchState};
use super::transfer::transfer_data;
use super::{ApplyError, Manager, SITE_RETRIES};
use crate::alternatives;
use crate::guest::{Guest, VcpuState};
use crate::link;
use crate::module::{CallbackKind, PatchModule};
use crate::runpre::{self, SiteError, FTRACE_NOP, JMP_LEN};

impl Manager {
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
        let need = link::layout(m)?.size;
        let base = self.alloc.alloc(need).ok_or(ApplyError::NoSpace {
            need,
            free: self.alloc.free_bytes(),
        })?;
        Reservation {
            mgr: self,
            base,
            taken: false,
        }
        .apply_at(g, m, &olds, data, t0)
    }

    fn jump_of(&self, id: u32, site: u64) -> Option<Vec<u8>> {
        let p = self.patches.iter().find(|p| p.id == id)?;
        p.funcs.iter().find(|f| f.site == site).map(|f| f.jump.clone())
    }
}

/// Patch-region memory reserved for an apply in progress. Until the patch takes it over
/// (once its jumps are in), dropping the reservation frees the memory: on every error
/// return and when a panic unwinds through the apply, so that nothing leaks.
struct Reservation<'a> {
    mgr: &'a mut Manager,
    /// Start of the reserved chunk.
    base: u64,
    /// The patch owns the memory now: it is freed when its rollback finishes.
    taken: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.taken {
            self.mgr.alloc.free(self.base);
        }
    }
}

impl Reservation<'_> {
    fn apply_at(
        &mut self,
        g: &dyn Guest,
        m: &PatchModule,
        olds: &[(u64, u64)],
        mut data: Vec<DataPatch>,
        t0: Instant,
    ) -> Result<u32, ApplyError> {
        let base = self.base;
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
            // link() checked every replacement against its section.
            let new_addr = linked
                .addr_of(r.new_load_idx, r.new_offset)
                .ok_or_else(|| outside(&r.new_name, r.new_load_idx, r.new_offset))?;
            let jump = runpre::jmp_rel32(site, new_addr).ok_or_else(|| {
                ApplyError::RunPre(SiteError::OutOfReach {
                    func: r.old_name.clone(),
                    target: new_addr,
                })
            })?;
            // What the site must hold now: the previous lucos jump if stacked, else ftrace's nop.
            let expected = match self.mgr.sites.get(&site).and_then(|v| v.last()) {
                Some(&prev) => self.mgr.jump_of(prev, site).unwrap_or(FTRACE_NOP.to_vec()),
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
        let callbacks = m
            .callbacks
            .iter()
            .map(|c| {
                Ok(PatchCallback {
                    kind: c.kind,
                    name: c.name.clone(),
                    addr: linked
                        .addr_of(c.load_idx, c.offset)
                        .ok_or_else(|| outside(&c.entry, c.load_idx, c.offset))?,
                    limit_ms: c.limit.as_millis() as u64,
                })
            })
            .collect::<Result<Vec<_>, ApplyError>>()?;
        // Copy code and data in; nothing executes it until the jumps exist.
        g.write(base, &linked.image)?;
        let id = self.mgr.next_id;
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
        let (pause, in_old) = swap_sites(
            g,
            &Swap {
                funcs: &funcs,
                install: true,
                data: &data,
                id,
                image,
                watch: &watch,
            },
        )?;
        // The jumps are in: the memory is the patch's from here on, whatever happens.
        self.taken = true;
        self.mgr.next_id += 1;
        for d in &mut data {
            d.protected = true;
        }
        for f in &funcs {
            self.mgr.sites.entry(f.site).or_default().push(id);
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.mgr.patches.push(Patch {
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
        if let Err(what) = self.mgr.run_callbacks(g, id, CallbackKind::Apply, None) {
            return Err(self.mgr.abort(g, id, what));
        }
        // First commit check right away. If it cannot be done, the patch stays in its
        // transition (it is applied) and the periodic re-check tries again.
        match self.mgr.check(g, id) {
            Err(e @ ApplyError::CallbackAborted { .. }) => Err(e),
            Err(e) => {
                warn!("patch {id}: first stack check failed, retried later: {e}");
                Ok(id)
            }
            Ok(_) => Ok(id),
        }
    }
}

/// The error for a module place that is not inside the linked image (which [`link::link`]
/// rules out).
fn outside(name: &str, load_idx: usize, offset: u64) -> ApplyError {
    ApplyError::Link(link::LinkError::OutsideSection {
        name: name.into(),
        section: format!("#{load_idx}"),
        offset,
        size: 0,
    })
}

/// One stop-the-world swap of a patch's sites.
#[derive(Clone, Copy)]
pub(super) struct Swap<'a> {
    /// The redirected functions.
    pub funcs: &'a [FuncPatch],
    /// Write the jumps (apply) or the saved bytes (rollback).
    pub install: bool,
    /// Data objects converted in the same pause.
    pub data: &'a [DataPatch],
    /// The patch.
    pub id: u32,
    /// The patch's image `[start, end)` (for the data transfer rules).
    pub image: (u64, u64),
    /// Ranges whose occupants are listed in the same pause (for thread callbacks).
    pub watch: &'a [(u64, u64, String)],
}

/// Stops the world and writes each function's jump (`install`) or saved bytes. Retries
/// while a vCPU's RIP is inside a site; re-checks the bytes with the world stopped. Returns
/// the pause, and who was inside the `watch` ranges in that same pause.
pub(super) fn swap_sites(g: &dyn Guest, s: &Swap) -> Result<(Duration, Vec<Blocker>), ApplyError> {
    let Swap {
        funcs,
        install,
        data,
        id,
        image,
        watch: ranges,
    } = *s;
    let mut found = Vec::new();
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
                if let Err(e) = transfer_data(g, data, id, image, install) {
                    for f in funcs {
                        let back = if install { &f.saved } else { &f.jump };
                        let _ = g.write(f.site, back);
                    }
                    return Err(e);
                }
                if !ranges.is_empty() {
                    match find_blockers(g, vcpus, ranges) {
                        Ok(b) => found = b,
                        Err(e) => warn!("listing tasks in old code: {e}"),
                    }
                }
                Ok(true)
            })();
        })?;
        match outcome {
            Ok(true) => return Ok((pause, found)),
            Ok(false) => {
                warn!("attempt {attempt}: {last}; retrying");
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(e),
        }
    }
    Err(ApplyError::Busy(last))
}
