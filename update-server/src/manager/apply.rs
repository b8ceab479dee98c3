//! Applying a patch: linking it into the patch region, the run-pre checks, and the
//! stop-the-world swap that writes (or removes) the jumps.

use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};

use super::callbacks::call_each;
use super::inspect::find_blockers;
use super::patch::{Blocker, DataPatch, FuncPatch, Patch, PatchCallback, PatchState};
use super::transfer::transfer_data;
use super::{ApplyError, Manager, SITE_RETRIES};
use crate::alternatives;
use crate::guest::{module_of, Guest, GuestError, ModuleRef, VcpuState};
use crate::guest::{CodeInfo, KeyAbi, TableSizes};
use crate::jumplabel::{self, JumpError, JumpTable, KeyLink, NodeChoice};
use crate::ktables::{self, Plan, TableError};
use crate::link;
use crate::module::{CallbackKind, PatchModule, SymbolPlace};
use crate::runpre::{self, SiteError, FTRACE_NOP, JMP_LEN};
use crate::thunks;

impl Manager {
    /// Applies a parsed module. On any error the guest is left untouched.
    pub fn apply(&mut self, g: &dyn Guest, m: &PatchModule) -> Result<u32, ApplyError> {
        let t0 = Instant::now();
        // The guest modules the patch refers to must be loaded and live (they are pinned in
        // the pause that installs the jumps); their symbols resolve from then on.
        let modules = needed_modules(g, m)?;
        // Resolve old functions and check the module.
        let mut seen = std::collections::HashSet::new();
        let mut olds = Vec::new();
        for r in &m.replaces {
            if !seen.insert(r.old_name.clone()) {
                return Err(ApplyError::Duplicate(r.old_name.clone()));
            }
            let (addr, size) = g.symbol(&r.old_name).map_err(|source| ApplyError::OldFunction {
                name: r.old_name.clone(),
                source,
            })?;
            if size < (JMP_LEN + 4) as u64 {
                return Err(ApplyError::TooSmall {
                    name: r.old_name.clone(),
                    size,
                });
            }
            olds.push((addr, size));
        }
        let data = Self::resolve_data(g, m)?;
        self.check_data_unpatched(&data)?;
        let image = link::layout(m)?.size;
        // The guest kernel learns about the patch code as a module (exception, BUG and
        // ORC tables, symbols) if it can; code with exception or BUG tables needs that.
        let tables = match g.table_sizes() {
            Ok(sizes) => Some((ktables::plan(m, image, &sizes), sizes)),
            Err(e) => {
                let what = ktables::needs_registration(m);
                if !what.is_empty() {
                    return Err(TableError::NoModuleSupport {
                        what: what.join(" and "),
                        why: e.to_string(),
                    }
                    .into());
                }
                None
            }
        };
        let need = tables.as_ref().map_or(image, |(p, _)| p.total);
        let base = self.alloc.alloc(need).ok_or(ApplyError::NoSpace {
            need,
            free: self.alloc.free_bytes(),
        })?;
        let place = Place {
            base,
            size: need,
            tables: tables.as_ref(),
            modules: &modules,
        };
        Reservation {
            mgr: self,
            base,
            taken: false,
        }
        .apply_at(g, m, &olds, data, &place, t0)
    }

    /// Refuses a data rule for a global that a live patch (any but rolled back) already
    /// converts: a second conversion would scale the value twice.
    fn check_data_unpatched(&self, data: &[DataPatch]) -> Result<(), ApplyError> {
        for d in data {
            let live = self
                .patches
                .iter()
                .filter(|p| p.state != PatchState::RolledBack)
                .find(|p| {
                    p.data
                        .iter()
                        .any(|o| o.addr < d.addr + d.size && d.addr < o.addr + o.size)
                });
            if let Some(p) = live {
                return Err(ApplyError::DataAlreadyPatched {
                    name: d.name.clone(),
                    id: p.id,
                    state: p.state.as_str(),
                });
            }
        }
        Ok(())
    }

    fn jump_of(&self, id: u32, site: u64) -> Option<Vec<u8>> {
        let p = self.patches.iter().find(|p| p.id == id)?;
        p.funcs.iter().find(|f| f.site == site).map(|f| f.jump.clone())
    }
}

/// Patch-region memory reserved for an apply in progress. Until the patch takes it over
/// (once its jumps are in), dropping the reservation frees the memory: on every error
/// return and when a panic unwinds through the apply, so that nothing leaks. After an
/// inconsistent swap some jump may still lead into the image: it is then never reused.
struct Reservation<'a> {
    mgr: &'a mut Manager,
    /// Start of the reserved chunk.
    base: u64,
    /// The patch owns the memory now (it is freed when its rollback finishes), or the
    /// memory must never be reused.
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
        place: &Place,
        t0: Instant,
    ) -> Result<u32, ApplyError> {
        let Place {
            base,
            size: image_size,
            tables,
            modules,
        } = *place;
        let resolve = |name: &str| g.link_symbol(name).ok();
        let mut linked = link::link(m, base, &resolve).map_err(|e| match e {
            // Say why: not there, or ambiguous (with the candidates).
            link::LinkError::Unresolved(name) => match g.link_symbol(&name) {
                Err(source) => ApplyError::KernelSymbol { name, source },
                Ok(_) => ApplyError::Link(link::LinkError::Unresolved(name)),
            },
            e => ApplyError::Link(e),
        })?;
        let caps = g.cpu_caps()?;
        // The kernel's order (module_finalize): retpolines, returns, then alternatives.
        if thunks::has_sites(m, thunks::RETPOLINE_SECTION) || thunks::has_sites(m, thunks::RETURN_SECTION) {
            let env = thunk_env(g, m, caps.clone())?;
            let st = thunks::apply(m, &mut linked, &env)?;
            log::info!(
                "thunks: {} of {} retpoline sites rewritten, {} return sites ({})",
                st.retpolines_rewritten,
                st.retpolines,
                st.returns,
                if env.has_rethunk() {
                    format!("jmp {}", g.describe(env.x86_return_thunk))
                } else {
                    "ret".to_string()
                }
            );
        }
        let alts = alternatives::apply(m, &mut linked, &caps)?;
        if alts.records > 0 {
            log::info!(
                "alternatives: {} of {} sites patched for the guest's CPU",
                alts.patched,
                alts.records
            );
        }
        // Static branches: linked and sorted here, their kernel keys' nodes placed in the pool.
        let jumps = if m
            .sections
            .iter()
            .any(|s| s.name == jumplabel::JUMP_SECTION && !s.data.is_empty())
        {
            let abi = g.key_abi().map_err(|e| JumpError::NoSupport(e.to_string()))?;
            jumplabel::prepare(m, &mut linked, Some(&abi))?.map(|t| (t, abi))
        } else {
            None
        };
        let choices = match &jumps {
            Some((t, abi)) if !t.kernel_keys.is_empty() => {
                while self.mgr.keys.free_slots() < self.mgr.keys.needed(t) {
                    // Pool pages are never freed (see jumplabel): the kernel keeps the nodes.
                    let page = self.mgr.alloc.alloc(jumplabel::POOL_PAGE).ok_or(ApplyError::NoSpace {
                        need: jumplabel::POOL_PAGE,
                        free: self.mgr.alloc.free_bytes(),
                    })?;
                    self.mgr.keys.add_page(page, abi.node_size);
                }
                self.mgr.keys.abi = Some(*abi);
                self.mgr.keys.plan(t).unwrap_or_default()
            }
            _ => vec![],
        };
        if let Some((t, _)) = &jumps {
            log::info!(
                "static keys: {} sites, {} kernel keys, {} of the patch's own",
                t.count,
                t.kernel_keys.len(),
                t.own_keys
            );
        }
        let reg = match tables {
            Some((plan, sizes)) => {
                let (meta, mut info) = ktables::build(m, &mut linked, plan, sizes, &module_name(&m.name))?;
                if let Some((t, _)) = &jumps {
                    info.jump_table = (t.addr, t.count);
                }
                Some((base + plan.meta_off, meta, info))
            }
            None => None,
        };
        let key_swap = match (&jumps, &reg) {
            (Some((t, abi)), Some((at, _, _))) if !t.kernel_keys.is_empty() => Some(KeySwap {
                abi,
                table: t,
                module: *at,
                choices: &choices,
                done: Default::default(),
                undone: Default::default(),
            }),
            _ => None,
        };
        let mut funcs = Vec::new();
        for (r, &(old_addr, old_size)) in m.replaces.iter().zip(olds) {
            let mut head = [0u8; 32];
            g.read(old_addr, &mut head)?;
            let off = runpre::patch_offset(&head);
            let site = old_addr + off as u64;
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
            // What the site must hold now: the previous lucos jump if stacked, else ftrace's
            // nop, else (a function without one) the whole instructions the jump overwrites.
            let expected = match self.mgr.sites.get(&site).and_then(|v| v.last()) {
                Some(&prev) => self.mgr.jump_of(prev, site).unwrap_or(FTRACE_NOP.to_vec()),
                None if head[off..].starts_with(&FTRACE_NOP) => FTRACE_NOP.to_vec(),
                None => no_nop_head(g, &r.old_name, site, old_addr + old_size)?,
            };
            runpre::check_site(&r.old_name, site, &head[off..], &expected)?;
            let jump = runpre::padded_jump(jump, expected.len());
            funcs.push(FuncPatch {
                old_name: r.old_name.clone(),
                old_addr,
                old_size,
                new_name: r.new_name.clone(),
                new_addr,
                site,
                saved: expected,
                jump,
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
                    object: c.object.clone(),
                    // A callback of a module runs only while that module is loaded.
                    module: match c.object.as_str() {
                        "" => 0,
                        o => g.loaded_module(o)?,
                    },
                })
            })
            .collect::<Result<Vec<_>, ApplyError>>()?;
        // Copy code and data in; nothing executes it until the jumps exist.
        g.write(base, &linked.image)?;
        if let Some((at, meta, _)) = &reg {
            g.write(*at, meta)?;
        }
        // Pre-apply callbacks run on the copied-in code before any jump exists: a failure
        // refuses the patch and the reservation frees the memory.
        let mut callback_log = Vec::new();
        let pre: Vec<PatchCallback> = callbacks
            .iter()
            .filter(|c| c.kind == CallbackKind::PreApply)
            .cloned()
            .collect();
        call_each(g, &format!("patch '{}'", m.name), &pre, None, &mut callback_log).map_err(ApplyError::Refused)?;
        let id = self.mgr.next_id;
        let image = (base, base + image_size);
        // With thread callbacks, the tasks still in old code are found in the same pause.
        let watch: Vec<(u64, u64, String)> = if callbacks.iter().any(|c| c.kind == CallbackKind::Thread) {
            funcs
                .iter()
                .map(|f| (f.old_addr, f.old_addr + f.old_size, f.old_name.clone()))
                .collect()
        } else {
            vec![]
        };
        let swapped = swap_sites(
            g,
            &Swap {
                funcs: &funcs,
                install: true,
                data: &data,
                id,
                image,
                watch: &watch,
                register: reg.as_ref().map(|(at, _, info)| (*at, info)),
                pin: modules,
                keys: key_swap.as_ref(),
            },
        );
        if let Some(k) = &key_swap {
            // Whatever happened, the nodes linked are in the keys' lists for good.
            self.mgr.keys.commit(id, &k.done.borrow(), k.undone.get());
        }
        let (pause, in_old) = swapped.inspect_err(|e| {
            // Some jump may still lead into the image: never reuse it.
            if matches!(e, ApplyError::Inconsistent { .. }) {
                self.taken = true;
            }
        })?;
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
            image_size,
            modules: modules.to_vec(),
            module_at: reg.as_ref().map(|r| r.0),
            warnings: m.warnings.clone(),
            pause_us: pause.as_micros() as u64,
            apply_us: t0.elapsed().as_micros() as u64,
            applied_at: now,
            checks: 0,
            blockers: vec![],
            callbacks,
            callback_log,
            thread_watch: in_old.iter().filter_map(|b| b.task).collect(),
            transition_started: Some(Instant::now()),
        });
        info!("patch {id} '{}' applied: vCPUs paused {pause:?}", m.name);
        if let Err(what) = self.mgr.run_callbacks(g, id, CallbackKind::Apply, None) {
            return Err(self.mgr.abort(g, id, what));
        }
        // First commit check right away. The jumps are live, so a failed check (a pause
        // timeout, an unreadable task list) is not an apply failure: the patch stays in
        // transition and the re-check thread tries again.
        match self.mgr.check(g, id) {
            Ok(_) => {}
            Err(e @ ApplyError::CallbackAborted { .. }) => return Err(e),
            Err(e) => {
                warn!("patch {id}: first commit check failed: {e}; it stays in transition");
                if let Ok(p) = self.mgr.get_mut(id) {
                    p.warnings.push(format!("first commit check failed: {e}"));
                }
            }
        }
        Ok(id)
    }
}

/// What the kernel chose for its retpoline and return sites: `caps` and the thunks (the
/// symbols a module's sites need; `x86_return_thunk` read from guest memory).
fn thunk_env(g: &dyn Guest, m: &PatchModule, caps: Vec<u32>) -> Result<thunks::ThunkEnv, ApplyError> {
    let need = |section: &'static str, symbol: &'static str| -> Result<u64, ApplyError> {
        if !thunks::has_sites(m, section) {
            return Ok(0);
        }
        g.link_symbol(symbol)
            .map_err(|_| thunks::ThunkError::NoSymbol { section, symbol }.into())
    };
    let var = need(thunks::RETURN_SECTION, "x86_return_thunk")?;
    let mut chosen = [0u8; 8];
    if var != 0 {
        g.read(var, &mut chosen)?;
    }
    Ok(thunks::ThunkEnv {
        caps,
        return_thunk: need(thunks::RETURN_SECTION, "__x86_return_thunk")?,
        x86_return_thunk: u64::from_le_bytes(chosen),
        its_return_thunk: g.link_symbol("its_return_thunk").ok(),
        indirect_thunks: need(thunks::RETPOLINE_SECTION, "__x86_indirect_thunk_array")?,
        its_thunks: g.link_symbol("__x86_indirect_its_thunk_array").ok(),
    })
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

/// Where a patch goes in the patch region.
#[derive(Clone, Copy)]
struct Place<'a> {
    /// Start of its memory.
    base: u64,
    /// Bytes of image and metadata.
    size: u64,
    /// Its metadata layout and the kernel's table sizes, when the guest kernel can take
    /// the patch code as a module.
    tables: Option<&'a (Plan, TableSizes)>,
    /// The guest modules it refers to, pinned in the pause that installs the jumps.
    modules: &'a [ModuleRef],
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
    /// Apply only: the patch code's `struct module` place and contents, registered with
    /// the guest kernel in the same pause, before the code becomes reachable.
    pub register: Option<(u64, &'a CodeInfo)>,
    /// Apply only: the guest modules to pin in the same pause, before the code becomes
    /// reachable (rollback unpins them later, once the patch code is idle).
    pub pin: &'a [ModuleRef],
    /// Apply only: the kernel static keys to link in the same pause, after the registration.
    pub keys: Option<&'a KeySwap<'a>>,
}

/// The static keys a swap links ([`jumplabel::link_keys`]) and what it did.
pub(super) struct KeySwap<'a> {
    /// The kernel's layout.
    pub abi: &'a KeyAbi,
    /// The patch's jump table.
    pub table: &'a JumpTable,
    /// The patch's `struct module`.
    pub module: u64,
    /// Where the nodes go.
    pub choices: &'a [NodeChoice],
    /// Keys linked (kept when the swap fails: the nodes stay in the lists).
    pub done: std::cell::RefCell<Vec<KeyLink>>,
    /// The linked nodes were made inert again (the swap failed).
    pub undone: std::cell::Cell<bool>,
}

/// How long to wait before another pause when the guest holds `jump_label_mutex` (a key
/// flip patches text with `text_poke_bp`, which waits for every CPU a few times).
const KEY_MUTEX_WAIT: Duration = Duration::from_millis(20);

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
        register,
        pin,
        keys,
    } = *s;
    let keys = if install { keys } else { None };
    let mut found = Vec::new();
    let mut last = String::new();
    for attempt in 0..SITE_RETRIES {
        let mut outcome: Result<bool, ApplyError> = Ok(false);
        let mut wait = Duration::from_micros(200);
        let pause = g.stop_the_world(&mut |vcpus: &[VcpuState]| {
            outcome = (|| {
                for v in vcpus {
                    if let Some(f) = funcs
                        .iter()
                        .find(|f| v.rip > f.site && v.rip < f.site + f.saved.len() as u64)
                    {
                        last = format!("vCPU {} at {:#x} inside the site of {}", v.id, v.rip, f.old_name);
                        return Ok(false);
                    }
                }
                // Sites that overwrite the function's own instructions (no ftrace NOP): no
                // interrupted context or return address on any stack may point past the
                // first of them, or it would resume inside the jump.
                let heads: Vec<(u64, u64, String)> = funcs
                    .iter()
                    .filter(|f| f.saved.len() > JMP_LEN || (f.saved != FTRACE_NOP && !is_jump(&f.saved)))
                    .map(|f| {
                        (
                            f.site + 1,
                            f.site + f.saved.len() as u64 - 1,
                            format!("the overwritten head of {}", f.old_name),
                        )
                    })
                    .collect();
                if install && !heads.is_empty() {
                    if let Some(b) = find_blockers(g, vcpus, &heads)?.into_iter().next() {
                        last = format!("{} at {}", b.who, b.at);
                        return Ok(false);
                    }
                }
                for f in funcs {
                    let from = if install { &f.saved } else { &f.jump };
                    let mut cur = vec![0u8; from.len()];
                    g.read(f.site, &mut cur)?;
                    if &cur != from {
                        return Err(ApplyError::RunPre(SiteError::Changed {
                            func: f.old_name.clone(),
                            site: f.site,
                            actual: runpre::disasm(&cur, f.site, 2),
                        }));
                    }
                }
                // Static key lists are walked and changed only under jump_label_mutex:
                // with it free, no key update is half done and no walker is on a list.
                if let Some(k) = keys {
                    if jumplabel::mutex_held(g, k.abi)? {
                        last = "the guest holds jump_label_mutex (a static key is changing)".into();
                        wait = KEY_MUTEX_WAIT;
                        return Ok(false);
                    }
                }
                // The modules the patch uses stay loaded as long as it is (checked live and
                // referenced in the same pause that makes the patch reachable).
                let pin = if install { pin } else { &[] };
                pin_modules(g, id, pin)?;
                let unpin = || unpin_modules(g, id, pin);
                // The kernel knows the code (its exception and BUG tables, unwind data and
                // symbols) before any jump can reach it.
                let register = if install { register } else { None };
                if let Some((at, info)) = register {
                    match g.register_code(at, info) {
                        Ok(()) => {}
                        // A lock the registration needs is held (nothing was written).
                        Err(GuestError::Busy(why)) => {
                            unpin();
                            last = why;
                            wait = KEY_MUTEX_WAIT;
                            return Ok(false);
                        }
                        Err(e) => {
                            unpin();
                            return Err(e.into());
                        }
                    }
                }
                let unregister = || {
                    if let Some(k) = keys {
                        let nodes: Vec<u64> = k.done.borrow().iter().map(|l| l.node).collect();
                        match jumplabel::unlink_keys(g, k.abi, &nodes) {
                            Ok(()) => k.undone.set(true),
                            Err(e) => warn!("patch {id}: making its static key nodes inert failed: {e}"),
                        }
                    }
                    if let Some((at, _)) = register {
                        if let Err(e) = g.unregister_code(at) {
                            warn!("patch {id}: taking the patch code's module record out failed: {e}");
                        }
                    }
                    unpin();
                };
                // Each static branch set to its key's state, the keys' lists given the
                // patch's nodes: from here on the guest's key flips update the patch code.
                if let Some(k) = keys {
                    let r = jumplabel::link_keys(g, k.abi, k.table, k.module, k.choices, &mut k.done.borrow_mut());
                    if let Err(e) = r {
                        unregister();
                        return Err(e.into());
                    }
                }
                if let Err(e) = write_sites(g, funcs, install) {
                    unregister();
                    return Err(e);
                }
                // Carry the data over in the same pause; undo the jumps if that fails.
                if let Err(e) = transfer_data(g, data, id, image, install) {
                    return Err(match write_sites(g, funcs, !install) {
                        Ok(()) => {
                            unregister();
                            e
                        }
                        Err(undo) => ApplyError::Inconsistent {
                            what: format!("converting data failed: {e}"),
                            stuck: undo.to_string(),
                        },
                    });
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
                std::thread::sleep(wait);
            }
            Err(e) => return Err(e),
        }
    }
    Err(ApplyError::Busy(last))
}

/// Pins every module of `mods`, all or none. With the world stopped.
fn pin_modules(g: &dyn Guest, id: u32, mods: &[ModuleRef]) -> Result<(), ApplyError> {
    for (i, m) in mods.iter().enumerate() {
        if let Err(e) = g.pin_module(m) {
            unpin_modules(g, id, &mods[..i]);
            return Err(e.into());
        }
    }
    Ok(())
}

/// Drops the pins of `mods`. With the world stopped.
pub(super) fn unpin_modules(g: &dyn Guest, id: u32, mods: &[ModuleRef]) {
    for m in mods {
        if let Err(e) = g.unpin_module(m) {
            warn!("patch {id}: dropping the reference on module '{}' failed: {e}", m.name);
        }
    }
}

/// The guest modules `m` refers to (functions it replaces, symbols its code uses, data it
/// converts, callbacks' objects), each as the guest has it loaded; an error names the first module that is not
/// loaded and live.
fn needed_modules(g: &dyn Guest, m: &PatchModule) -> Result<Vec<ModuleRef>, ApplyError> {
    let mut wanted: Vec<(String, String)> = Vec::new();
    let mut want = |spec: &str, what: String| {
        if let Some(name) = module_of(spec) {
            if !wanted.iter().any(|(n, _)| n == name) {
                wanted.push((name.to_string(), what));
            }
        }
    };
    for r in &m.replaces {
        want(&r.old_name, format!("it replaces {}", r.old_name));
    }
    for r in &m.relocs {
        if let SymbolPlace::Kernel(name) = &r.target {
            want(name, format!("its code refers to {name}"));
        }
    }
    for d in &m.data {
        want(&d.name, format!("it converts {}", d.name));
    }
    for c in m.callbacks.iter().filter(|c| !c.object.is_empty()) {
        want(
            &format!("{}::", c.object),
            format!("it has a callback '{}' for it", c.name),
        );
    }
    wanted.sort();
    wanted
        .into_iter()
        .map(|(name, needed_by)| {
            g.module(&name).map_err(|source| ApplyError::NeedsModule {
                module: name,
                needed_by,
                source,
            })
        })
        .collect()
}

/// Writes every function's jump (`install`) or saved bytes, all or nothing: when a write
/// fails, the sites already written get their previous bytes back. If even that fails, the
/// error says which sites are left in which state ([`ApplyError::Inconsistent`]).
fn write_sites(g: &dyn Guest, funcs: &[FuncPatch], install: bool) -> Result<(), ApplyError> {
    for (i, f) in funcs.iter().enumerate() {
        let (to, from) = if install {
            (&f.jump, &f.saved)
        } else {
            (&f.saved, &f.jump)
        };
        let Err(e) = g.write(f.site, to) else { continue };
        let mut stuck = Vec::new();
        for done in funcs[..i].iter().rev() {
            let back = if install { &done.saved } else { &done.jump };
            if let Err(e2) = g.write(done.site, back) {
                stuck.push(format!("{} at {:#x} ({e2})", done.old_name, done.site));
            }
        }
        // The failed write may have stored part of its bytes: put the old ones back too.
        let mut cur = vec![0u8; from.len()];
        let intact = g.read(f.site, &mut cur).is_ok() && &cur == from;
        if !intact && g.write(f.site, from).is_err() {
            stuck.push(format!("{} at {:#x} (partially written)", f.old_name, f.site));
        }
        let cause = ApplyError::Guest(e);
        return Err(if stuck.is_empty() {
            cause
        } else {
            ApplyError::Inconsistent {
                what: format!("writing the site of {} failed: {cause}", f.old_name),
                stuck: stuck.join(", "),
            }
        });
    }
    Ok(())
}

/// The bytes a jump overwrites in `name`, a function with no ftrace NOP whose code runs
/// from `site` to `end` ([`runpre::overwrite_len`] says which are safe to overwrite).
fn no_nop_head(g: &dyn Guest, name: &str, site: u64, end: u64) -> Result<Vec<u8>, ApplyError> {
    let len = end.saturating_sub(site).min(MAX_FUNC_SCAN);
    let mut code = vec![0u8; len as usize];
    g.read(site, &mut code)?;
    let n = runpre::overwrite_len(name, site, &code)?;
    log::info!(
        "{name} has no ftrace NOP: the jump overwrites {n} bytes of whole instructions ({})",
        runpre::disasm(&code[..n], site, 4)
    );
    code.truncate(n);
    Ok(code)
}

/// A `jmp rel32` (a stacked lucos jump over an ftrace NOP).
fn is_jump(b: &[u8]) -> bool {
    b.len() == JMP_LEN && b[0] == 0xe9
}

/// How much of a function without an ftrace NOP is decoded to find branches into its head.
const MAX_FUNC_SCAN: u64 = 256 << 10;

/// The module name the guest kernel shows for a patch (`[lucos_NAME]` in stack traces):
/// the patch name with anything but `[A-Za-z0-9_]` made `_`.
fn module_name(patch: &str) -> String {
    let clean: String = patch
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
        .collect();
    format!("lucos_{clean}")
}
