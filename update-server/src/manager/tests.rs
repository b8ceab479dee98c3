//! Unit tests of the patch manager against a fake guest.

use super::transfer::{read_uint, transfer_data, write_uint};
use super::*;
use crate::guest::{ModuleLookupError, ModuleRef, PatchRegion, TaskState};
use crate::guest::{SymbolError, VcpuState, WriteRule};
use crate::module::CallbackKind;
use crate::runpre::{self, FTRACE_NOP};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

/// Guest memory as a byte map; protection recorded, writes routed through the rule.
#[derive(Default)]
struct FakeGuest {
    mem: Mutex<HashMap<u64, u8>>,
    rules: Mutex<Vec<(u64, u64, String, WriteRule)>>,
    fail_protect: bool,
    calls: Mutex<Vec<(u64, [u64; 2])>>,
    /// The task list `tasks()` reports.
    task_list: Mutex<Vec<TaskState>>,
    /// Reads at or above this address fail (0: none do).
    unreadable_from: u64,
    /// Kernel symbols: name -> (address, size).
    syms: HashMap<String, (u64, u64)>,
    /// The patch region (empty by default).
    region: Option<PatchRegion>,
    /// `tasks()` fails (as when the task list cannot be walked).
    fail_tasks: std::sync::atomic::AtomicBool,
    /// Writes touching this address fail (0: none do).
    fail_write_at: AtomicU64,
    /// `cpu_caps()` panics (a bug anywhere in an apply).
    panic_in_caps: bool,
    /// Loaded modules, and the references lucos holds on each (name -> count).
    modules: HashMap<String, ModuleRef>,
    pins: Mutex<HashMap<String, i64>>,
    /// `pin_module()` fails (the module went away before the pause).
    fail_pin: bool,
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
    fn symbol(&self, name: &str) -> Result<(u64, u64), SymbolError> {
        self.syms
            .get(name)
            .copied()
            .ok_or_else(|| SymbolError(format!("no symbol '{name}'")))
    }
    fn link_symbol(&self, name: &str) -> Result<u64, SymbolError> {
        self.symbol(name).map(|(a, _)| a)
    }
    fn module(&self, name: &str) -> Result<ModuleRef, ModuleLookupError> {
        self.modules.get(name).cloned().ok_or(ModuleLookupError::NotLoaded {
            loaded: self.modules.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }
    fn pin_module(&self, m: &ModuleRef) -> Result<(), GuestError> {
        if self.fail_pin {
            return Err(GuestError::Introspection(format!("module '{}' changed", m.name).into()));
        }
        *self.pins.lock().unwrap().entry(m.name.clone()).or_default() += 1;
        Ok(())
    }
    fn unpin_module(&self, m: &ModuleRef) -> Result<(), GuestError> {
        *self.pins.lock().unwrap().entry(m.name.clone()).or_default() -= 1;
        Ok(())
    }
    fn describe(&self, a: u64) -> String {
        format!("{a:#x}")
    }
    fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        if self.unreadable_from != 0 && va + buf.len() as u64 > self.unreadable_from {
            return Err(GuestError::Memory(format!("{va:#x} not mapped").into()));
        }
        let m = self.mem.lock().unwrap();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = *m.get(&(va + i as u64)).unwrap_or(&0);
        }
        Ok(())
    }
    fn write(&self, va: u64, data: &[u8]) -> Result<(), GuestError> {
        let bad = self.fail_write_at.load(Ordering::Relaxed);
        if bad != 0 && va <= bad && bad < va + data.len() as u64 {
            return Err(GuestError::Memory(format!("write at {va:#x} failed").into()));
        }
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
    fn tasks(&self) -> Result<Vec<TaskState>, GuestError> {
        if self.fail_tasks.load(Ordering::Relaxed) {
            return Err(GuestError::Introspection("task list: more than 65536 tasks".into()));
        }
        Ok(self.task_list.lock().unwrap().clone())
    }
    fn patch_region(&self) -> PatchRegion {
        self.region.unwrap_or(PatchRegion { va: 0, size: 0 })
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
    fn table_sizes(&self) -> Result<crate::guest::TableSizes, GuestError> {
        Err(GuestError::Refused("no module support in the fake guest".into()))
    }
    fn register_code(&self, _: u64, _: &crate::guest::CodeInfo) -> Result<(), GuestError> {
        Err(GuestError::Refused("no module support in the fake guest".into()))
    }
    fn unregister_code(&self, _: u64) -> Result<(), GuestError> {
        Ok(())
    }
    fn cpu_caps(&self) -> Result<Vec<u32>, GuestError> {
        assert!(!self.panic_in_caps, "injected panic");
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
    transfer_data(&g, std::slice::from_ref(&d), 7, IMAGE, true).unwrap();
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
    transfer_data(&g, std::slice::from_ref(&d), 7, IMAGE, false).unwrap();
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
    let e = transfer_data(&g, &[ms_to_us()], 1, IMAGE, true).unwrap_err();
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
        modules: vec![],
        module_at: None,
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
        object: String::new(),
        module: 0,
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

const STACK: u64 = 0xffff_c900_0001_0000;
const STACK_SIZE: u64 = 16 << 10;

fn task(pid: i32, base: u64, saved_sp: u64, on_cpu: Option<u32>) -> TaskState {
    TaskState {
        task: 0xffff_8880_0100_0000 + pid as u64 * 0x1000,
        pid,
        comm: format!("t{pid}"),
        state: "S".into(),
        stack: (base != 0).then_some((base, base + STACK_SIZE)),
        saved_sp,
        on_cpu,
    }
}

fn vcpu(id: u8, rsp: u64, kernel_mode: bool) -> VcpuState {
    VcpuState {
        id,
        rip: 0xffff_ffff_8100_0000,
        rsp,
        kernel_mode,
        stacks: None,
    }
}

#[test]
fn scan_ranges_cover_every_stack_a_frame_can_be_on() {
    let (a, b, c, d) = (
        STACK,
        STACK + STACK_SIZE,
        STACK + 2 * STACK_SIZE,
        STACK + 3 * STACK_SIZE,
    );
    let irq_stack = 0xffff_fe00_0000_8000u64;
    let tasks = [
        task(1, a, a + 0x100, None), // asleep: from its saved sp
        task(2, b, 0, None),         // asleep, saved sp outside: whole stack
        task(3, c, 0, Some(0)),      // running in user mode: nothing
        task(4, d, 0, Some(1)),      // running in the kernel on an IRQ stack: whole stack
    ];
    let vcpus = [vcpu(0, 0x7fff_0000, false), vcpu(1, irq_stack + 0x3f00, true)];
    let scans = inspect::scan_ranges(&tasks, &vcpus);
    let range = |who: &str| scans.iter().find(|s| s.who.starts_with(who)).map(|s| s.range);
    assert_eq!(range("task 1 "), Some((a + 0x100, a + STACK_SIZE)));
    assert_eq!(range("task 2 "), Some((b, b + STACK_SIZE)));
    assert_eq!(range("task 3 "), None, "user mode: no kernel frames");
    assert_eq!(range("task 4 "), Some((d, d + STACK_SIZE)));
    assert_eq!(
        range("vCPU 1 stack"),
        Some((irq_stack + 0x3f00, irq_stack + STACK_SIZE)),
        "the IRQ stack the vCPU is on, from its RSP"
    );
    // A task running in the kernel on its own stack: from the vCPU's RSP.
    let t = [task(5, a, 0, Some(0))];
    let scans = inspect::scan_ranges(&t, &[vcpu(0, a + 0x2000, true)]);
    assert_eq!(scans.len(), 1, "{scans:?}");
    assert_eq!(scans[0].range, (a + 0x2000, a + STACK_SIZE));
    // An exited task whose stack is freed has nothing to scan.
    assert!(inspect::scan_ranges(&[task(6, 0, 0, None)], &[]).is_empty());
}

#[test]
fn an_unreadable_stack_blocks_the_commit() {
    let g = FakeGuest {
        unreadable_from: STACK + STACK_SIZE,
        ..Default::default()
    };
    *g.task_list.lock().unwrap() = vec![task(1, STACK, 0, None), task(2, STACK + STACK_SIZE, 0, None)];
    let old = (0xffff_ffff_8100_0000u64, 0xffff_ffff_8100_0100u64, "old_fn".to_string());
    g.write(STACK + 0x800, &(old.0 + 0x10).to_le_bytes()).unwrap();
    let b = find_blockers(&g, &[], std::slice::from_ref(&old)).unwrap();
    assert_eq!(b.len(), 2, "{b:?}");
    assert!(b[0].who.starts_with("task 1 ") && b[0].at.contains("old_fn"), "{b:?}");
    assert!(
        b[1].who.starts_with("task 2 ") && b[1].at.contains("unreadable"),
        "{b:?}"
    );
    assert_eq!(b[1].task.map(|t| t.0), Some(2), "named, so status shows it");
}

/// Kernel functions the apply tests replace (64 bytes each, starting with ftrace's nop).
const F1: u64 = 0xffff_ffff_8100_1000;
const F2: u64 = 0xffff_ffff_8100_2000;
const REGION: u64 = 0xffff_ffff_9000_0000;

/// A guest with `f1`, `f2` and the global `timeout` (= 250), and a patch region.
fn apply_guest() -> FakeGuest {
    let mut g = FakeGuest::default();
    for (name, addr) in [("f1", F1), ("f2", F2)] {
        g.syms.insert(name.into(), (addr, 64));
        g.write(addr, &FTRACE_NOP).unwrap();
    }
    g.syms.insert("timeout".into(), (OBJ, 8));
    write_uint(&g, OBJ, 8, 250).unwrap();
    g.region = Some(PatchRegion {
        va: REGION,
        size: 0x10_0000,
    });
    g
}

/// A module replacing each of `olds` with 32 bytes of code, converting `timeout` (ms -> us)
/// if `data`.
fn module_for(olds: &[&str], data: bool) -> crate::module::PatchModule {
    use crate::module::{DataRule, LoadSection, PatchModule, Replace};
    PatchModule {
        name: "test".into(),
        description: String::new(),
        sections: vec![LoadSection {
            index: object::SectionIndex(1),
            name: ".text".into(),
            data: vec![0xc3; 32 * olds.len()],
            align: 16,
            exec: true,
            write: false,
        }],
        relocs: vec![],
        replaces: olds
            .iter()
            .enumerate()
            .map(|(i, o)| Replace {
                old_name: (*o).into(),
                new_name: format!("new_{o}"),
                new_load_idx: 0,
                new_offset: 32 * i as u64,
            })
            .collect(),
        data: if data {
            vec![DataRule {
                name: "timeout".into(),
                mul: 1000,
                div: 1,
            }]
        } else {
            vec![]
        },
        callbacks: vec![],
        warnings: vec![],
        functions: vec![],
    }
}

fn site_bytes(g: &FakeGuest, addr: u64) -> Vec<u8> {
    let mut b = vec![0u8; runpre::JMP_LEN];
    g.read(addr, &mut b).unwrap();
    b
}

#[test]
fn a_failed_first_check_keeps_the_live_patch_and_its_memory() {
    let g = apply_guest();
    let mut m = Manager::new(&g);
    g.fail_tasks.store(true, Ordering::Relaxed);
    let id = m
        .apply(&g, &module_for(&["f1"], false))
        .expect("the jumps are live: apply succeeded");
    let p = m.get(id).unwrap();
    assert_eq!(p.state, PatchState::Transition);
    assert!(
        p.warnings.iter().any(|w| w.contains("first commit check failed")),
        "{:?}",
        p.warnings
    );
    assert_eq!(site_bytes(&g, F1)[0], 0xe9, "the jump stays");
    let first = p.image_addr;
    // Its memory is still in use: the next patch goes elsewhere.
    let id2 = m.apply(&g, &module_for(&["f2"], false)).unwrap();
    assert_ne!(m.get(id2).unwrap().image_addr, first);
    // The re-check commits it once the task list can be read.
    g.fail_tasks.store(false, Ordering::Relaxed);
    m.check_all(&g);
    assert_eq!(m.get(id).unwrap().state, PatchState::Committed);
}

#[test]
fn a_failed_site_write_undoes_the_sites_already_written() {
    let g = apply_guest();
    let mut m = Manager::new(&g);
    g.fail_write_at.store(F2 + 1, Ordering::Relaxed);
    let e = m.apply(&g, &module_for(&["f1", "f2"], false)).unwrap_err();
    assert!(matches!(e, ApplyError::Guest(_)), "{e}");
    assert_eq!(site_bytes(&g, F1), FTRACE_NOP, "f1's jump was taken back");
    assert_eq!(site_bytes(&g, F2), FTRACE_NOP);
    assert!(m.patches().is_empty());
    // Nothing was leaked: the next apply gets the region's start again.
    g.fail_write_at.store(0, Ordering::Relaxed);
    let id = m.apply(&g, &module_for(&["f1", "f2"], false)).unwrap();
    assert_eq!(m.get(id).unwrap().image_addr, REGION);
}

#[test]
fn a_failed_site_write_leaves_a_rollback_undone_and_retryable() {
    let g = apply_guest();
    let mut m = Manager::new(&g);
    let id = m.apply(&g, &module_for(&["f1", "f2"], false)).unwrap();
    let (j1, j2) = (site_bytes(&g, F1), site_bytes(&g, F2));
    g.fail_write_at.store(F2 + 1, Ordering::Relaxed);
    assert!(m.rollback(&g, id).is_err());
    assert_eq!(
        (site_bytes(&g, F1), site_bytes(&g, F2)),
        (j1, j2),
        "both jumps still in"
    );
    assert_eq!(m.get(id).unwrap().state, PatchState::Committed);
    g.fail_write_at.store(0, Ordering::Relaxed);
    assert_eq!(m.rollback(&g, id).unwrap(), PatchState::RolledBack);
    assert_eq!(
        (site_bytes(&g, F1), site_bytes(&g, F2)),
        (FTRACE_NOP.to_vec(), FTRACE_NOP.to_vec())
    );
}

#[test]
fn the_same_data_patch_is_not_applied_twice() {
    let g = apply_guest();
    let mut m = Manager::new(&g);
    let id = m.apply(&g, &module_for(&["f1"], true)).unwrap();
    assert_eq!(g.value(OBJ), 250_000);
    let e = m.apply(&g, &module_for(&["f2"], true)).unwrap_err();
    assert!(
        matches!(&e, ApplyError::DataAlreadyPatched { id: i, .. } if *i == id),
        "{e}"
    );
    assert_eq!(g.value(OBJ), 250_000, "converted once");
    // Once that patch is rolled back, the rule can go in again.
    m.rollback(&g, id).unwrap();
    assert_eq!(g.value(OBJ), 250);
    m.apply(&g, &module_for(&["f2"], true)).unwrap();
    assert_eq!(g.value(OBJ), 250_000);
}

#[test]
fn an_nmi_over_an_irq_handler_scans_both_per_cpu_stacks() {
    use crate::guest::StackSpan;
    let irq = (0xffff_8880_0780_2000u64, 0xffff_8880_0780_6000u64);
    let nmi = (0xffff_fe00_0000_3000u64, 0xffff_fe00_0000_4000u64);
    let t = STACK;
    let g = FakeGuest::default();
    // The task was interrupted in the kernel; its IRQ handler called old code (a return
    // address into it on the IRQ stack); an NMI came in on top.
    *g.task_list.lock().unwrap() = vec![task(7, t, 0, Some(0))];
    g.write(irq.1 - 0x200, &(OLD_CODE + 0x10).to_le_bytes()).unwrap();
    let mut v = vcpu(0, nmi.1 - 0x100, true);
    v.stacks = Some(vec![
        StackSpan {
            range: (nmi.1 - 0x100, nmi.1),
            what: "NMI stack".into(),
        },
        StackSpan {
            range: (irq.1 - 0x300, irq.1),
            what: "IRQ stack".into(),
        },
        StackSpan {
            range: (t + 0x3e00, t + STACK_SIZE),
            what: "stack".into(),
        },
    ]);
    let old = [(OLD_CODE, OLD_CODE + 0x100, "old_fn".to_string())];
    let b = find_blockers(&g, &[v], &old).unwrap();
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(b[0].who, "vCPU 0 IRQ stack");
}

#[test]
fn garbage_stack_values_block_without_panicking() {
    let g = FakeGuest::default();
    *g.task_list.lock().unwrap() = vec![
        // A stack pointer at the top of the address space, a wrapped stack range.
        task(1, STACK, 0, None),
        task(2, STACK, u64::MAX, Some(0)),
    ];
    g.task_list.lock().unwrap()[0].stack = Some((u64::MAX - 0xfff, 0x3000));
    let vcpus = [vcpu(0, u64::MAX, true), vcpu(1, 0, true)];
    let old = [(OLD_CODE, OLD_CODE + 0x100, "old_fn".to_string())];
    let b = find_blockers(&g, &vcpus, &old).unwrap();
    assert!(
        b.iter()
            .any(|b| b.who.starts_with("task 1 ") && b.at.contains("implausible")),
        "{b:?}"
    );
    assert!(
        b.iter()
            .any(|b| b.who == "vCPU 0 stack" && b.at.contains("implausible")),
        "{b:?}"
    );
}

#[test]
fn one_check_reads_a_bounded_amount_of_stack() {
    let g = FakeGuest::default();
    // 5000 sleeping tasks whose saved stack pointers lie outside their stacks: each is
    // scanned whole, 5000 * 16 KiB = 78 MiB, past the budget.
    *g.task_list.lock().unwrap() = (0..5000)
        .map(|i| task(i + 10, STACK + i as u64 * STACK_SIZE, 0, None))
        .collect();
    let old = [(OLD_CODE, OLD_CODE + 0x100, "old_fn".to_string())];
    let b = find_blockers(&g, &[], &old).unwrap();
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(b[0].at.contains("not scanned"), "{b:?}");
    assert_eq!(
        b[0].who,
        format!("{} more stacks", 5000 - (inspect::MAX_SCAN_BYTES / STACK_SIZE) as usize)
    );
}

#[test]
fn old_rolled_back_records_are_pruned() {
    let g = FakeGuest::default();
    let mut m = Manager::new(&g);
    for id in 1..=40 {
        let mut p = patch_with(vec![]);
        p.id = id;
        p.state = if id == 5 {
            PatchState::Committed
        } else {
            PatchState::RolledBack
        };
        m.patches.push(p);
    }
    m.prune(16);
    let ids: Vec<u32> = m.patches().iter().map(|p| p.id).collect();
    assert_eq!(ids.len(), 17, "{ids:?}");
    assert!(ids.contains(&5), "a live patch is never pruned: {ids:?}");
    assert_eq!(ids[1..], (25..=40).collect::<Vec<_>>()[..], "the newest are kept");
}

/// Every failed apply gives its patch-region memory back: on an error, and when a panic
/// unwinds through it (the manager's lock is taken over after a panic, so a leak there
/// used to shrink the region for good).
#[test]
fn a_failed_or_panicking_apply_frees_its_memory() {
    let region = 4 * crate::alloc::PAGE;
    let mut g = apply_guest();
    g.region = Some(PatchRegion {
        va: REGION,
        size: region,
    });
    g.panic_in_caps = true;
    let m = module_for(&["f1"], false);
    let mut mgr = Manager::new(&g);
    for _ in 0..3 {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mgr.apply(&g, &m)));
        assert!(r.is_err(), "the injected panic unwinds");
        assert_eq!(mgr.alloc.free_bytes(), region, "nothing leaked");
    }
    // An error after the allocation (the old function does not start with ftrace's NOP).
    g.panic_in_caps = false;
    g.write(F1, &[0x90; 5]).unwrap();
    for _ in 0..3 {
        assert!(matches!(mgr.apply(&g, &m), Err(ApplyError::RunPre(_))));
        assert_eq!(mgr.alloc.free_bytes(), region);
    }
    // With the NOP there, the patch goes in and keeps its memory.
    g.write(F1, &FTRACE_NOP).unwrap();
    let id = mgr.apply(&g, &m).unwrap();
    assert_eq!(mgr.alloc.free_bytes(), region - crate::alloc::PAGE);
    assert_eq!(mgr.get(id).unwrap().state, PatchState::Committed);
}

/// A function without ftrace's NOP: the jump overwrites whole instructions, padded with
/// `int3`, only while no stack holds an address inside them; rollback puts them back.
#[test]
fn a_function_without_the_nop_gets_whole_instructions_overwritten() {
    let g = apply_guest();
    // push rbp; mov rbp,rsp; sub rsp,16 (8 bytes), then `add [rax],al`s.
    let head = [0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10];
    g.write(F1, &head).unwrap();
    *g.task_list.lock().unwrap() = vec![task(1, STACK, 0, None)];
    // A task interrupted right after `push rbp`: its saved RIP lies inside the head.
    g.write(STACK + 0x800, &(F1 + 1).to_le_bytes()).unwrap();
    let mut m = Manager::new(&g);
    let e = m.apply(&g, &module_for(&["f1"], false)).unwrap_err();
    assert!(matches!(e, ApplyError::Busy(_)), "{e}");
    assert!(e.to_string().contains("overwritten head of f1"), "{e}");
    let mut now = [0u8; 8];
    g.read(F1, &mut now).unwrap();
    assert_eq!(now, head, "nothing written");
    // Once it has moved on, the head is replaced: a jump and three int3s.
    g.write(STACK + 0x800, &0u64.to_le_bytes()).unwrap();
    let id = m.apply(&g, &module_for(&["f1"], false)).unwrap();
    g.read(F1, &mut now).unwrap();
    assert_eq!(now[0], 0xe9);
    assert_eq!(now[5..], [0xcc; 3]);
    m.rollback(&g, id).unwrap();
    m.check_all(&g);
    g.read(F1, &mut now).unwrap();
    assert_eq!(now, head, "the original instructions are back");
}

/// A module replacing `f1`, with one callback of `kind` (of `object`) at the patch region's
/// FAILING_CB address (it returns -1) or at its start (it returns 0).
fn module_with_callback(kind: CallbackKind, object: &str, failing: bool) -> crate::module::PatchModule {
    let mut m = module_for(&["f1"], false);
    m.sections[0].data = vec![0xc3; 0x1000];
    m.callbacks.push(crate::module::Callback {
        kind,
        name: "cb".into(),
        entry: "__lucos_cb_cb".into(),
        object: object.into(),
        load_idx: 0,
        offset: if failing { FAILING_CB - REGION } else { 0x800 },
        limit: Duration::from_secs(1),
    });
    m
}

#[test]
fn a_failing_pre_apply_callback_refuses_the_patch_before_any_jump() {
    let g = apply_guest();
    let mut m = Manager::new(&g);
    let e = m
        .apply(&g, &module_with_callback(CallbackKind::PreApply, "", true))
        .unwrap_err();
    assert!(matches!(e, ApplyError::Refused(_)), "{e}");
    assert!(e.to_string().contains("pre-apply callback 'cb' failed"), "{e}");
    assert_eq!(site_bytes(&g, F1), FTRACE_NOP, "no jump");
    assert!(m.patches().is_empty());
    assert_eq!(g.calls.lock().unwrap().as_slice(), &[(FAILING_CB, [0, 0])]);
    // One that returns 0 lets the apply go on, and its log line stays with the patch.
    let id = m
        .apply(&g, &module_with_callback(CallbackKind::PreApply, "", false))
        .unwrap();
    assert_eq!(site_bytes(&g, F1)[0], 0xe9);
    assert!(m.get(id).unwrap().callback_log[0].contains("pre-apply callback 'cb': returned 0"));
}

#[test]
fn pre_revert_callbacks_run_while_the_patch_is_live_and_do_not_stop_the_rollback() {
    let g = apply_guest();
    let mut m = Manager::new(&g);
    let id = m
        .apply(&g, &module_with_callback(CallbackKind::PreRevert, "", true))
        .unwrap();
    assert!(g.calls.lock().unwrap().is_empty(), "not at apply");
    m.rollback(&g, id).unwrap();
    assert_eq!(g.calls.lock().unwrap().len(), 1);
    assert_eq!(site_bytes(&g, F1), FTRACE_NOP, "rolled back all the same");
    assert!(m.get(id).unwrap().callback_log[0].contains("pre-revert callback 'cb' failed"));
}

#[test]
fn a_callback_of_a_module_needs_that_module_loaded() {
    let g = apply_guest();
    let mut m = Manager::new(&g);
    let e = m
        .apply(&g, &module_with_callback(CallbackKind::Apply, "joydev", false))
        .unwrap_err();
    assert!(e.to_string().contains("'joydev'"), "{e}");
    assert_eq!(site_bytes(&g, F1), FTRACE_NOP);
}

/// A guest where `xfs` is loaded and has the function `xfs::f` (at F2).
fn module_guest() -> FakeGuest {
    let mut g = apply_guest();
    g.syms.insert("xfs::f".into(), (F2, 64));
    g.modules.insert(
        "xfs".into(),
        ModuleRef {
            name: "xfs".into(),
            addr: 0xffff_ffff_c000_0000,
            core: (F2 & !0xfff, 0x10_0000),
        },
    );
    g
}

fn pins(g: &FakeGuest, module: &str) -> i64 {
    *g.pins.lock().unwrap().get(module).unwrap_or(&0)
}

#[test]
fn a_module_is_pinned_while_patched_and_unpinned_once_rolled_back() {
    let g = module_guest();
    let mut m = Manager::new(&g);
    let id = m.apply(&g, &module_for(&["f1", "xfs::f"], false)).unwrap();
    assert_eq!(m.get(id).unwrap().state, PatchState::Committed);
    assert_eq!(pins(&g, "xfs"), 1, "pinned while applied");
    assert_eq!(m.get(id).unwrap().modules[0].name, "xfs");
    assert_eq!(m.rollback(&g, id).unwrap(), PatchState::RolledBack);
    assert_eq!(pins(&g, "xfs"), 0, "unpinned once rolled back");
    // Checking again pins and unpins nothing.
    m.check(&g, id).unwrap();
    assert_eq!(pins(&g, "xfs"), 0);
}

#[test]
fn a_patch_for_a_module_that_is_not_loaded_is_refused_naming_it() {
    let mut g = module_guest();
    g.modules.clear();
    let mut m = Manager::new(&g);
    let e = m.apply(&g, &module_for(&["f1", "xfs::f"], false)).unwrap_err();
    assert!(
        matches!(&e, ApplyError::NeedsModule { module, .. } if module == "xfs"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("module 'xfs' (it replaces xfs::f): it is not loaded"),
        "{e}"
    );
    assert_eq!(site_bytes(&g, F1), FTRACE_NOP, "nothing written");
    assert!(m.patches().is_empty());
}

#[test]
fn a_failed_pin_leaves_the_guest_untouched() {
    let mut g = module_guest();
    g.fail_pin = true;
    let mut m = Manager::new(&g);
    let e = m.apply(&g, &module_for(&["f1", "xfs::f"], false)).unwrap_err();
    assert!(e.to_string().contains("changed"), "{e}");
    assert_eq!(site_bytes(&g, F1), FTRACE_NOP);
    assert_eq!(site_bytes(&g, F2), FTRACE_NOP);
    assert_eq!(pins(&g, "xfs"), 0);
    // A failed site write after the pin drops it again.
    g.fail_pin = false;
    g.fail_write_at.store(F2 + 1, Ordering::Relaxed);
    assert!(m.apply(&g, &module_for(&["f1", "xfs::f"], false)).is_err());
    assert_eq!(pins(&g, "xfs"), 0);
}

/// lucos's nodes on a kernel key's list, as `jump_label_add_module` would put them: a key
/// not yet linked gets a vmlinux node first; a linked one gets the patch node at the head;
/// rollback makes the node inert and leaves it (the kernel never frees it).
#[test]
fn static_key_nodes_go_on_the_keys_list() {
    use crate::guest::KeyAbi;
    use crate::jumplabel::{self, JumpTable, KeyUse, NodePool, Site, NOP5};
    let g = FakeGuest::default();
    let abi = KeyAbi {
        key_size: 16,
        key_enabled: 0,
        key_type: 8,
        node_size: 24,
        node_next: 0,
        node_entries: 8,
        node_mod: 16,
        mutex_owner: 0xffff_ffff_8290_0000,
        kernel: (0xffff_ffff_8100_0000, 0xffff_ffff_8300_0000),
    };
    const KEY: u64 = 0xffff_ffff_8280_0000;
    const VMLINUX_ENTRIES: u64 = 0xffff_ffff_8250_0000;
    const SITE: u64 = IMAGE.0 + 0x10;
    const MODULE: u64 = IMAGE.0 + 0x1000;
    // A default-true key, enabled, not linked: type = vmlinux entries | JUMP_TYPE_TRUE.
    write_uint(&g, KEY, 4, 1).unwrap();
    write_uint(&g, KEY + 8, 8, VMLINUX_ENTRIES | 1).unwrap();
    g.write(SITE, &NOP5).unwrap();
    let table = JumpTable {
        addr: IMAGE.0 + 0x800,
        count: 1,
        kernel_keys: vec![KeyUse {
            key: KEY,
            entries: IMAGE.0 + 0x800,
            sites: vec![Site {
                code: SITE,
                target: SITE + 0x20,
                len: 5,
                branch: false,
            }],
        }],
        own_keys: 0,
    };
    let mut pool = NodePool::default();
    pool.add_page(0xffff_ffff_9100_0000, abi.node_size);
    let choices = pool.plan(&table).unwrap();
    // The guest holds jump_label_mutex: nothing may be linked.
    write_uint(&g, abi.mutex_owner, 8, 0xffff_8880_0123_4000).unwrap();
    assert!(jumplabel::mutex_held(&g, &abi).unwrap());
    write_uint(&g, abi.mutex_owner, 8, 1).unwrap(); // MUTEX_FLAG_WAITERS alone: free
    assert!(!jumplabel::mutex_held(&g, &abi).unwrap());
    let mut done = vec![];
    jumplabel::link_keys(&g, &abi, &table, MODULE, &choices, &mut done).unwrap();
    let [v, p] = choices[0].fresh;
    assert_eq!(done[0].node, p);
    assert_eq!(done[0].consumed, vec![v, p]);
    assert_eq!(g.value(KEY + 8), p | 2 | 1, "linked, still default-true");
    assert_eq!(
        (g.value(p), g.value(p + 8), g.value(p + 16)),
        (v, IMAGE.0 + 0x800, MODULE)
    );
    assert_eq!((g.value(v), g.value(v + 8), g.value(v + 16)), (0, VMLINUX_ENTRIES, 0));
    let mut site = [0u8; 5];
    g.read(SITE, &mut site).unwrap();
    assert_eq!(site, [0xe9, 0x1b, 0, 0, 0], "enabled ^ branch 0: jmp");
    pool.commit(7, &done, false);
    assert_eq!(pool.nodes_of(7), vec![p]);

    // A second patch on the now linked key: its node goes at the head.
    let choices2 = pool.plan(&table).unwrap();
    let mut done2 = vec![];
    jumplabel::link_keys(&g, &abi, &table, MODULE + 0x4000, &choices2, &mut done2).unwrap();
    let p2 = done2[0].node;
    assert_eq!(done2[0].consumed, vec![p2]);
    assert_eq!(g.value(KEY + 8), p2 | 3);
    assert_eq!(g.value(p2), p);

    // Rollback of the first: inert, still on the list.
    jumplabel::unlink_keys(&g, &abi, &pool.nodes_of(7)).unwrap();
    pool.release(7);
    assert_eq!((g.value(p), g.value(p + 8), g.value(p + 16)), (v, 0, 0));
    assert_eq!(pool.plan(&table).unwrap()[0].reuse, Some(p), "reused by the next patch");
}

/// Static branches need the patch registered as a module (kernel_text_address, the key
/// lists): without module support the patch is refused before anything is written; a
/// return-thunk site needs the kernel's thunk symbols.
#[test]
fn static_branches_and_thunk_sites_need_the_kernels_support() {
    use crate::module::LoadSection;
    let g = apply_guest();
    let mut mgr = Manager::new(&g);
    let mut m = module_for(&["f1"], false);
    m.sections.push(LoadSection {
        index: object::SectionIndex(2),
        name: crate::jumplabel::JUMP_SECTION.into(),
        data: vec![0; 16],
        align: 8,
        exec: false,
        write: true,
    });
    let e = mgr.apply(&g, &m).unwrap_err();
    assert!(
        matches!(&e, ApplyError::Tables(_)) && e.to_string().contains("static keys (__jump_table)"),
        "{e}"
    );
    let mut m = module_for(&["f1"], false);
    m.sections.push(LoadSection {
        index: object::SectionIndex(2),
        name: crate::thunks::RETURN_SECTION.into(),
        data: vec![0; 4],
        align: 4,
        exec: false,
        write: false,
    });
    let e = mgr.apply(&g, &m).unwrap_err();
    assert!(
        matches!(&e, ApplyError::Thunks(crate::thunks::ThunkError::NoSymbol { .. })),
        "{e}"
    );
    assert_eq!(site_bytes(&g, F1), runpre::FTRACE_NOP.to_vec(), "nothing written");
}

/// A patch of callbacks only (kpatch's macro-callbacks) replaces nothing and commits at once.
#[test]
fn a_callback_only_patch_commits() {
    let g = apply_guest();
    let mut m = Manager::new(&g);
    let mut module = module_with_callback(CallbackKind::Apply, "", false);
    module.replaces.clear();
    let id = m.apply(&g, &module).unwrap();
    assert_eq!(m.get(id).unwrap().state, PatchState::Committed);
    assert_eq!(site_bytes(&g, F1), FTRACE_NOP, "nothing redirected");
    m.rollback(&g, id).unwrap();
    m.check_all(&g);
    assert_eq!(m.get(id).unwrap().state, PatchState::RolledBack);
}
