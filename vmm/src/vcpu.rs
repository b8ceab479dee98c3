//! vCPU threads: the KVM_RUN loop, exit dispatch, and kicking a vCPU out of KVM_RUN.
//!
//! Kicking uses a real-time signal whose handler sets `immediate_exit` in the thread's
//! `kvm_run` page: a signal that lands while the thread is outside KVM_RUN still makes the
//! next KVM_RUN return at once (no lost wake-ups), as Firecracker does.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use iced_x86::Code;
use kvm_bindings::{kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, warn};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::virtio::muxer::ListenerSlot;
use crate::devices::Bus;
use crate::events::VmEvent;
use crate::fault;
use crate::guestcall::{self, CallArea, CallError, SafePoint, PORT_EXCEPTION, PORT_RETURN};
use crate::memory::GuestMem;
use crate::pause::{PauseControl, VcpuSnapshot};
use crate::symbols::SymbolTable;

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` points at this thread's kvm_run mapping, published by `Vcpu::run` and
        // cleared before the VcpuFd (and its mapping) is dropped. Writing one byte is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
    }
}

/// Installs the kick signal handler (once per process).
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

/// State shared by all vCPU threads.
pub struct VcpuShared {
    /// Guest physical memory.
    pub mem: GuestMem,
    /// Devices on I/O ports (serial, i8042).
    pub pio: Bus,
    /// Devices on MMIO (the virtio-mmio vsock device).
    pub mmio: Bus,
    /// Where the vsock device looks for the host-side listener (None: no vsock device).
    pub vsock_listener: Option<ListenerSlot>,
    /// Where vCPU threads and devices report reset, power-off, panic and crash to the main thread.
    pub events: Sender<VmEvent>,
    /// Set when the VM is stopping: every vCPU thread leaves its run loop.
    pub stop: AtomicBool,
    /// The guest kernel's symbols, for fault reports (None when the vmlinux has no symbol table).
    pub symbols: Option<Arc<SymbolTable>>,
    /// Parks the vCPUs outside KVM_RUN on request (stop the world).
    pub pause: PauseControl,
    /// Workarounds for the host's KVM (PVM), applied after each exit.
    pub quirks: crate::quirks::Quirks,
    /// Write-protected guest pages (data patches).
    pub protect: crate::protect::WriteProtect,
    /// KVM can copy registers into kvm_run at exits ([`crate::protect::sync_regs_supported`]):
    /// vCPUs ask for it while pages are protected, so a trapped write needs no ioctl to read them.
    pub sync_regs: bool,
    /// Guest calls waiting for their vCPU.
    pub calls: CallMailbox,
    /// Where the VM's patch region lies.
    pub patch_region: crate::layout::PatchRegion,
}

/// A guest call for one vCPU (see [`crate::guestcall`]).
pub struct CallJob {
    /// Kernel-virtual address of the function to call.
    pub func: u64,
    /// Its two arguments (passed in RDI and RSI).
    pub args: [u64; 2],
    /// The call area to run it in.
    pub area: CallArea,
    /// What counts as a safe point for this call.
    pub safe: SafePoint,
    /// How long the call may run before it is stopped.
    pub limit: Duration,
    /// Set by the waiter when `limit` has passed (then the vCPU is kicked).
    pub expired: Arc<AtomicBool>,
    /// Where the vCPU sends the function's return value (RAX) or why the call failed.
    pub reply: Sender<Result<u64, CallError>>,
}

/// One slot per vCPU; a vCPU takes its job before it re-enters the guest.
#[derive(Default)]
pub struct CallMailbox {
    pending: AtomicBool,
    slots: Mutex<Vec<Option<CallJob>>>,
}

impl CallMailbox {
    /// A mailbox for `vcpus` vCPUs, with no job posted.
    pub fn new(vcpus: usize) -> Self {
        Self {
            pending: AtomicBool::new(false),
            slots: Mutex::new((0..vcpus).map(|_| None).collect()),
        }
    }

    /// Posts `job` for vCPU `id` (replacing nothing: false if one is waiting already).
    pub fn post(&self, id: u8, job: CallJob) -> bool {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match s.get_mut(id as usize) {
            Some(slot @ None) => {
                *slot = Some(job);
                self.pending.store(true, Ordering::Release);
                true
            }
            _ => false,
        }
    }

    fn take(&self, id: u8) -> Option<CallJob> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let job = s.get_mut(id as usize).and_then(Option::take);
        if s.iter().all(Option::is_none) {
            self.pending.store(false, Ordering::Release);
        }
        job
    }
}

/// Sends the kick signal to a vCPU thread.
pub fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: `thread` is the pthread id of a vCPU thread that is joined only after the VM's
    // stop flag is set and all pausers are gone; pthread_kill has no memory-safety
    // preconditions beyond a valid thread id.
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if rc != 0 {
        debug!("pthread_kill failed: {rc}");
    }
}

impl guestcall::CallVcpu for Vcpu {
    fn parts(&mut self) -> (&mut VcpuFd, &GuestMem) {
        (&mut self.fd, &self.shared.mem)
    }

    fn step(&mut self) -> guestcall::CallExit {
        use guestcall::CallExit;
        if self.shared.stop.load(Ordering::Acquire) {
            return CallExit::Stopping;
        }
        let next = self.run_once();
        let next = self.complete_write(next);
        self.park_if_requested();
        match next {
            Next::CallPort(port) => CallExit::Port(port),
            Next::InternalError { suberror } => {
                let insn = fault::decode_at_rip(&self.fd, &self.shared.mem)
                    .map(|d| format!("at {:#x}: {}", d.rip, d.text))
                    .unwrap_or_default();
                CallExit::Failed(CallError::Emulation(format!(
                    "KVM_EXIT_INTERNAL_ERROR ({}, suberror {suberror}) {insn}",
                    fault::internal_error_name(suberror)
                )))
            }
            Next::Fatal(what) | Next::TripleFault(what) => CallExit::Failed(CallError::Emulation(what)),
            Next::Stop => CallExit::Stopping,
            other => {
                self.dispatch(other);
                CallExit::Other
            }
        }
    }
}

/// One vCPU.
pub struct Vcpu {
    /// vCPU index, from 0 (the KVM vCPU id).
    pub id: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    shared: Arc<VcpuShared>,
    /// KVM copies the registers into kvm_run at each exit (asked while pages are protected).
    synced: bool,
}

/// What a VM exit asks the loop to do after the kvm_run borrow ends.
enum Next {
    Continue,
    /// An `out` to a guest-call port (meaningful only during a call).
    CallPort(u16),
    /// A guest write to a write-protected page, completed once the exit's borrow ends
    /// ([`Vcpu::complete_write`]).
    ProtectedWrite {
        addr: u64,
        data: Vec<u8>,
    },
    InternalError {
        suberror: u32,
    },
    Fatal(String),
    /// KVM_EXIT_SHUTDOWN: a reset if the kernel meant it (restart, panic), else a crash;
    /// the main thread decides from the kernel's state.
    TripleFault(String),
    Stop,
}

impl Vcpu {
    /// vCPU `id` over `fd`; nothing runs until [`spawn`](Self::spawn).
    pub fn new(id: u8, fd: VcpuFd, shared: Arc<VcpuShared>) -> Self {
        Self {
            id,
            fd,
            shared,
            synced: false,
        }
    }

    /// Starts the vCPU thread.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let p: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|c| c.set(p));
        while !self.shared.stop.load(Ordering::Acquire) {
            let next = self.run_once();
            let next = self.complete_write(next);
            self.shared.quirks.after_exit(&self.shared.mem, &self.fd);
            self.park_if_requested();
            if !self.dispatch(next) {
                break;
            }
            if let Some(job) = self.shared.calls.take(self.id) {
                let result = self.guest_call(&job);
                let _ = job.reply.send(result);
            }
        }
        KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
        debug!("vcpu{} stopped", self.id);
    }

    fn park_if_requested(&self) {
        if self.shared.pause.is_requested() {
            let snap = self.snapshot();
            self.shared.pause.park(snap, &self.shared.stop);
        }
    }

    /// Completes a write to a write-protected page at once, before the vCPU can park: a
    /// pause must never find a trapped write half done (its registers not yet fixed, its
    /// value not yet stored or converted). Other exits are returned as they are.
    fn complete_write(&self, next: Next) -> Next {
        let Next::ProtectedWrite { addr, data } = next else {
            return next;
        };
        let shared = &self.shared;
        if !shared
            .protect
            .on_write(&shared.mem, &self.fd, self.synced, self.id, addr, &data)
        {
            // Unprotected meanwhile: the page is plain RAM again.
            let _ = vm_memory::Bytes::write_slice(&shared.mem, &data, vm_memory::GuestAddress(addr));
        }
        Next::Continue
    }

    /// Acts on an exit. Returns false when the vCPU must stop.
    fn dispatch(&mut self, next: Next) -> bool {
        match next {
            Next::Continue => {}
            Next::CallPort(port) => debug!("vcpu{}: out to guest-call port {port:#x} outside a call", self.id),
            Next::ProtectedWrite { .. } => {
                let next = self.complete_write(next);
                debug_assert!(matches!(next, Next::Continue));
            }
            Next::Stop => return false,
            Next::InternalError { suberror } => return self.handle_internal_error(suberror),
            Next::Fatal(what) => {
                let msg = fault::report(&self.fd, &self.shared.mem, self.shared.symbols.as_deref(), &what);
                let _ = self.shared.events.send(VmEvent::Crash(msg));
                return false;
            }
            Next::TripleFault(what) => {
                let msg = fault::report(&self.fd, &self.shared.mem, self.shared.symbols.as_deref(), &what);
                let _ = self.shared.events.send(VmEvent::TripleFault(msg));
                return false;
            }
        }
        true
    }

    /// Runs a guest call on this vCPU and restores its state (see [`crate::guestcall`]).
    fn guest_call(&mut self, job: &CallJob) -> Result<u64, CallError> {
        debug!(
            "vcpu{}: guest call {:#x}({:#x}, {:#x})",
            self.id, job.func, job.args[0], job.args[1]
        );
        let id = self.id;
        let out = guestcall::drive(
            self,
            id,
            &job.area,
            job.safe,
            (job.func, job.args),
            &job.expired,
            job.limit,
        )?;
        if let Err(e) = out.restored {
            let msg = format!("vCPU {id}: cannot restore its state after a guest call: {e}");
            let _ = self.shared.events.send(VmEvent::Crash(msg));
            return Err(e);
        }
        out.result
    }

    fn snapshot(&self) -> VcpuSnapshot {
        let mut s = VcpuSnapshot {
            id: self.id,
            ..Default::default()
        };
        if let Ok(r) = self.fd.get_regs() {
            (s.rip, s.rsp, s.rflags) = (r.rip, r.rsp, r.rflags);
        }
        if let Ok(sr) = self.fd.get_sregs() {
            s.cr3 = sr.cr3;
            s.kernel_mode = sr.cs.selector & 3 == 0;
        }
        s.halted = self
            .fd
            .get_mp_state()
            .map(|m| m.mp_state == kvm_bindings::KVM_MP_STATE_HALTED)
            .unwrap_or(false);
        s
    }

    fn run_once(&mut self) -> Next {
        let want = self.shared.sync_regs && self.shared.protect.is_active();
        if want != self.synced {
            crate::protect::request_sync_regs(&mut self.fd, want);
            self.synced = want;
        }
        let id = self.id;
        let shared = &self.shared;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    shared.pio.read(port.into(), data);
                    Next::Continue
                }
                VcpuExit::IoOut(port, _) if port == PORT_RETURN || port == PORT_EXCEPTION => Next::CallPort(port),
                VcpuExit::IoOut(port, data) => {
                    shared.pio.write(port.into(), data);
                    Next::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    shared.mmio.read(addr, data);
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    // A write to a write-protected RAM page (data patch), else device MMIO.
                    if shared.protect.covers(addr) {
                        Next::ProtectedWrite {
                            addr,
                            data: data.to_vec(),
                        }
                    } else {
                        shared.mmio.write(addr, data);
                        Next::Continue
                    }
                }
                VcpuExit::Hlt => Next::Continue,
                VcpuExit::Intr => Next::Continue,
                VcpuExit::Shutdown => Next::TripleFault(format!("vCPU {id}: triple fault (KVM_EXIT_SHUTDOWN)")),
                VcpuExit::FailEntry(reason, cpu) => Next::Fatal(format!(
                    "vCPU {id}: KVM_EXIT_FAIL_ENTRY, hardware entry failure reason {reason:#x} on host cpu {cpu}"
                )),
                VcpuExit::SystemEvent(kind, _) => {
                    let ev = match kind {
                        KVM_SYSTEM_EVENT_RESET => VmEvent::Reset("KVM system event: reset".into()),
                        KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
                        KVM_SYSTEM_EVENT_CRASH => VmEvent::Crash(format!("vCPU {id}: KVM system event: crash")),
                        k => VmEvent::Crash(format!("vCPU {id}: unknown KVM system event {k}")),
                    };
                    let _ = shared.events.send(ev);
                    Next::Stop
                }
                VcpuExit::InternalError => {
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is
                    // the active member of the kvm_run exit union.
                    let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    Next::InternalError { suberror }
                }
                other => Next::Fatal(format!("vCPU {id}: unhandled VM exit {other:?}")),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Fatal(format!("vCPU {id}: KVM_RUN failed: {e}")),
        }
    }

    /// Handles KVM_EXIT_INTERNAL_ERROR. Returns true if the vCPU can go on.
    ///
    /// `sysretq` and `fwait` missing from a software KVM's emulator are performed here
    /// (see [`crate::quirks`]).
    ///
    /// An emulation failure on `int3` is recoverable: the guest meant to raise #BP (Linux
    /// uses int3 for text patching: static keys, ftrace, its own self-test), and on
    /// hardware KVM it never exits at all. We deliver the #BP the CPU would have raised: as
    /// a trap, RIP moves past the one-byte instruction and vector 3 is injected. Every other
    /// emulation failure is fatal and reported with the decoded instruction.
    fn handle_internal_error(&mut self, suberror: u32) -> bool {
        let decoded = fault::decode_at_rip(&self.fd, &self.shared.mem);
        let code = decoded.as_ref().and_then(|d| d.insn.map(|i| i.code()));
        if suberror == 1 && code == Some(Code::Sysretq) && self.shared.quirks.sysret(&self.fd) {
            return true;
        }
        if suberror == 1 && code == Some(Code::Wait) {
            let len = decoded.as_ref().and_then(|d| d.insn.map(|i| i.len())).unwrap_or(1);
            if self.shared.quirks.fwait(&self.fd, len) {
                return true;
            }
        }
        if suberror == 1 {
            if let Some(d) = decoded.as_ref().filter(|_| code == Some(Code::Int3)) {
                self.shared.quirks.arm();
                match self.inject_breakpoint(d.rip) {
                    Ok(()) => return true,
                    Err(e) => warn!("vcpu{}: re-injecting #BP failed: {e}", self.id),
                }
            }
        }
        let what = format!(
            "vCPU {}: KVM_EXIT_INTERNAL_ERROR ({}, suberror {suberror})",
            self.id,
            fault::internal_error_name(suberror)
        );
        let msg = fault::report(&self.fd, &self.shared.mem, self.shared.symbols.as_deref(), &what);
        let _ = self.shared.events.send(VmEvent::Crash(msg));
        false
    }

    fn inject_breakpoint(&mut self, rip: u64) -> Result<(), kvm_ioctls::Error> {
        let mut regs = self.fd.get_regs()?;
        regs.rip = rip.wrapping_add(1);
        self.fd.set_regs(&regs)?;
        crate::arch::x86_64::regs::inject_exception(&self.fd, crate::arch::x86_64::vector::BP)?;
        debug!("vcpu{}: int3 at {rip:#x} re-injected as #BP", self.id);
        Ok(())
    }
}
