//! Glue between the VM and the update server: implements the update server's [`Guest`]
//! trait over guest memory, the vCPU pause control and kernel introspection, and starts
//! the server.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lucos_update_server::apisock::{ApiSocket, ApiSocketError};
use lucos_update_server::guest::{
    CodeInfo, Guest, GuestError, KeyAbi, ModuleLookupError, ModuleRef, PatchRegion, StackSpan, SymbolError, TableSizes,
    TaskState, VcpuState, WriteRule,
};
use lucos_update_server::protocol::VSOCK_PORT;
use lucos_update_server::service::{Caller, GuestRights, Limits, Policy, UpdateServer};

use crate::arch::x86_64::gdt::KERNEL_CS;
use crate::arch::x86_64::{PAGE_SIZE, RFLAGS_IF};
use crate::devices::virtio::muxer::PortListener;
use crate::guestcall::{CallArea, CallError, SafePoint};
use crate::introspect::kernel::KernelError;
use crate::introspect::kmods::{split_module_spec, state_name, KmodError, ModuleSymbols};
use crate::introspect::stacks::stack_chain;
use crate::introspect::tasks::THREAD_SIZE;
use crate::introspect::Vmlinux;
use crate::introspect::{list_tasks, GuestKernel};
use crate::layout::{self, CALL_AREA_OFFSET, PATCH_REGION_SIZE, PLATFORM_SIZE};
use crate::pause::VcpuSnapshot;
use crate::symbols::Scope;
use crate::vcpu::CallJob;
use crate::vm::VmHandle;

/// A busy guest lock stays [`GuestError::Busy`] (the server tries again in a later pause).
fn registration_error(e: KernelError) -> GuestError {
    match e {
        KernelError::Busy(why) => GuestError::Busy(why),
        e => GuestError::Introspection(e.into()),
    }
}

/// How long to wait for all vCPUs to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a guest call waits for a vCPU to reach a safe point.
const SAFE_POINT_WAIT: Duration = Duration::from_secs(5);
/// How long a vCPU gets to come back after a timed-out call was stopped.
const CALL_STOP_WAIT: Duration = Duration::from_secs(5);
/// Where an idle vCPU halts (Linux 6.1 x86 idle path, with and without paravirt).
const IDLE_FUNCTIONS: &[&str] = &[
    "native_safe_halt",
    "pv_native_safe_halt",
    "arch_safe_halt",
    "default_idle",
    "arch_cpu_idle",
    "default_idle_call",
    // AMD CPUs with the E400 erratum (and the CPU models KVM reports for some): its
    // default_idle() is inlined here at -O2.
    "amd_e400_idle",
];

/// Runs `f` until it succeeds once: `done` records that it did (a failure is retried on
/// the next call).
fn once(done: &Mutex<bool>, f: impl FnOnce() -> Result<(), GuestError>) -> Result<(), GuestError> {
    let mut d = done.lock().unwrap_or_else(|e| e.into_inner());
    if !*d {
        f()?;
        *d = true;
    }
    Ok(())
}

/// The running VM as the update server sees it.
pub struct VmGuest {
    handle: VmHandle,
    kernel: GuestKernel,
    region: layout::PatchRegion,
    mapped: Mutex<bool>,
    /// Whether the running guest was found to be the kernel of the vmlinux the symbols
    /// came from (its `linux_banner` is read at the first write, not at start-up).
    verified: Mutex<bool>,
    /// Guest calls (patch callbacks): where their private environment is, whether it is
    /// installed, where the guest's idle loop halts, whether user-mode vCPUs may be used.
    call_area: CallArea,
    call_area_ready: Mutex<bool>,
    idle: Vec<(u64, u64)>,
    user_ok: bool,
    /// The symbols of the guest modules patches referred to, by module name, as read the
    /// last time the module was looked up (a pin checks them again, in its pause).
    modules: Mutex<HashMap<String, Arc<ModuleSymbols>>>,
}

impl VmGuest {
    /// The VM behind `handle` as the update server sees it, with struct layouts and
    /// `linux_banner` from the `vmlinux` it booted; fails without kernel symbols or BTF.
    pub fn new(handle: VmHandle, vmlinux: &Vmlinux) -> Result<Self, GuestError> {
        let symbols = handle
            .symbols_arc()
            .ok_or_else(|| GuestError::Introspection("kernel symbols are not available".into()))?;
        let kernel = GuestKernel::new(vmlinux, symbols).map_err(|e| GuestError::Introspection(e.into()))?;
        let region = handle.patch_region();
        let idle = IDLE_FUNCTIONS
            .iter()
            .filter_map(|n| kernel.symbols.get(n).map(|s| (s.addr, s.addr + s.size)))
            .collect();
        // With page-table isolation a user-mode CR3 does not map the kernel.
        let user_ok = kernel.symbols.get("pti_init").is_none();
        Ok(Self {
            handle,
            kernel,
            region,
            mapped: Mutex::new(false),
            verified: Mutex::new(false),
            call_area: CallArea {
                va: region.va + CALL_AREA_OFFSET,
                gpa: region.gpa + CALL_AREA_OFFSET,
                kernel_cs: KERNEL_CS,
            },
            call_area_ready: Mutex::new(false),
            idle,
            user_ok,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// The symbols of guest module `name`: from the cache, unless `refresh` or not cached;
    /// a refresh reads the module list again and the symbols only if the module changed.
    /// Read with the guest running: what is read is checked again when the module is
    /// pinned (`introspect::kmods`).
    fn module_syms(&self, name: &str, refresh: bool) -> Result<Arc<ModuleSymbols>, KmodError> {
        let mem = self.handle.memory();
        let mut cache = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let (false, Some(c)) = (refresh, cache.get(name)) {
            return Ok(c.clone());
        }
        let m = self.kernel.find_module(mem, name)?;
        if let Some(c) = cache.get(name).filter(|c| c.module == m) {
            return Ok(c.clone());
        }
        if m.state != 0 {
            cache.remove(name);
            return Err(KmodError::NotLive {
                module: name.into(),
                state: state_name(m.state).into(),
            });
        }
        let syms = Arc::new(self.kernel.module_symbols(mem, &m)?);
        log::info!(
            "module {name}: {} symbols, core {:#x}+{:#x}",
            syms.len(),
            m.base,
            m.size
        );
        cache.insert(name.into(), syms.clone());
        Ok(syms)
    }

    /// Resolves a `MODULE::NAME[,POS]` reference (`rest` is `NAME[,POS]`).
    fn module_symbol(
        &self,
        spec: &str,
        module: &str,
        rest: &str,
        prefer_global: bool,
    ) -> Result<(u64, u64), SymbolError> {
        let syms = self
            .module_syms(module, false)
            .map_err(|e| SymbolError(e.to_string()))?;
        syms.resolve(spec, rest, prefer_global)
            .map(|s| (s.addr, s.size))
            .map_err(|e| SymbolError(e.to_string()))
    }

    /// The cached symbols of the module `m` names, if they are of that module instance.
    fn pinnable(&self, m: &ModuleRef) -> Result<Arc<ModuleSymbols>, GuestError> {
        let cache = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(&m.name)
            .filter(|c| c.module.addr == m.addr && (c.module.base, c.module.size) == m.core)
            .cloned()
            .ok_or_else(|| GuestError::Introspection(KmodError::Changed(m.name.clone()).into()))
    }

    /// A vCPU that holds no kernel lock and is not in an interrupts-off section: running
    /// user code, or halted in the idle loop with interrupts on.
    fn at_safe_point(&self, s: &VcpuSnapshot) -> bool {
        if !s.kernel_mode {
            return self.user_ok;
        }
        s.halted && s.rflags & RFLAGS_IF != 0 && self.idle.iter().any(|(lo, hi)| s.rip >= *lo && s.rip < *hi)
    }

    fn ensure_call_area(&self) -> Result<(), GuestError> {
        self.ensure_mapped()?;
        once(&self.call_area_ready, || {
            self.call_area
                .install(self.handle.memory())
                .map_err(|e| GuestError::Call(e.into()))
        })
    }

    /// Runs one guest call: waits for a vCPU at a safe point, hands it the call, waits
    /// for the result (stopping the call after `limit`).
    fn guest_call(&self, func: u64, args: [u64; 2], limit: Duration) -> Result<u64, CallError> {
        let t0 = Instant::now();
        loop {
            let paused = self.handle.pause(PAUSE_TIMEOUT)?;
            let Some(id) = paused.snapshots.iter().find(|s| self.at_safe_point(s)).map(|s| s.id) else {
                if t0.elapsed() > SAFE_POINT_WAIT {
                    // Say where the vCPUs were, so that a guest whose idle loop halts
                    // elsewhere (or never halts) is easy to tell.
                    let seen = paused
                        .snapshots
                        .iter()
                        .map(|s| {
                            format!(
                                "vCPU {} {} at {}{}{}",
                                s.id,
                                if s.kernel_mode { "kernel" } else { "user" },
                                self.describe(s.rip),
                                if s.halted { ", halted" } else { "" },
                                if s.rflags & RFLAGS_IF != 0 {
                                    ""
                                } else {
                                    ", interrupts off"
                                }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                    drop(paused);
                    return Err(CallError::NoSafePoint(SAFE_POINT_WAIT, seen));
                }
                drop(paused);
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            let (tx, rx) = channel();
            let expired = Arc::new(AtomicBool::new(false));
            let job = CallJob {
                func,
                args,
                area: self.call_area,
                safe: SafePoint { user_ok: self.user_ok },
                limit,
                expired: expired.clone(),
                reply: tx,
            };
            if !self.handle.post_call(id, job) {
                return Err(CallError::Busy(id));
            }
            drop(paused);
            let result = match rx.recv_timeout(limit) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    expired.store(true, std::sync::atomic::Ordering::Release);
                    self.handle.kick(id);
                    rx.recv_timeout(CALL_STOP_WAIT).unwrap_or(Err(CallError::NoReturn(id)))
                }
                Err(RecvTimeoutError::Disconnected) => Err(CallError::Stopping),
            };
            match result {
                // Something was being delivered to that vCPU right then: try again.
                Err(CallError::NotSafe { vcpu, why }) if t0.elapsed() < SAFE_POINT_WAIT => {
                    log::debug!("guest call: vCPU {vcpu} not safe ({why}); retrying");
                }
                r => {
                    log::info!(
                        "guest call {func:#x} on vCPU {id}: {} in {:?}",
                        match &r {
                            Ok(v) => format!("returned {v:#x}"),
                            Err(e) => e.to_string(),
                        },
                        t0.elapsed()
                    );
                    return r;
                }
            }
        }
    }

    /// Maps the patch region into the guest kernel's address space (once).
    fn ensure_mapped(&self) -> Result<(), GuestError> {
        once(&self.mapped, || {
            self.kernel
                .map_high(self.handle.memory(), self.region.gpa, PATCH_REGION_SIZE)
                .map(|_| ())
                .map_err(|e| GuestError::Memory(e.into()))
        })
    }

    /// Before the first write into the guest: the running kernel must be the vmlinux the
    /// symbols came from (same `linux_banner`), or nothing is written.
    fn ensure_verified(&self) -> Result<(), GuestError> {
        once(&self.verified, || {
            self.kernel
                .verify(self.handle.memory())
                .map_err(|e| GuestError::KernelMismatch(e.into()))
        })
    }

    fn state(&self, s: &VcpuSnapshot) -> VcpuState {
        VcpuState {
            id: s.id,
            rip: s.rip,
            rsp: s.rsp,
            kernel_mode: s.kernel_mode,
            stacks: if s.kernel_mode { self.stack_chain(s) } else { None },
        }
    }

    /// The live per-CPU stack spans of a paused kernel-mode vCPU (guest CPU number = vCPU
    /// index), or None if the kernel's per-CPU stacks cannot be found (the commit check
    /// then falls back to scanning the vCPU's `THREAD_SIZE` block).
    fn stack_chain(&self, s: &VcpuSnapshot) -> Option<Vec<StackSpan>> {
        let mem = self.handle.memory();
        let known = self
            .kernel
            .cpu_stacks(mem, u32::from(s.id))
            .map_err(|e| log::debug!("vCPU {}: per-CPU stacks unknown: {e}", s.id))
            .ok()?;
        let v = self.kernel.virt(mem);
        let chain = stack_chain(s.rsp, &known, THREAD_SIZE, |a| v.read_u64(a).ok());
        if chain.len() > 1 {
            log::debug!("vCPU {} at rsp {:#x}: stack chain {chain:x?}", s.id, s.rsp);
        }
        Some(
            chain
                .into_iter()
                .map(|c| StackSpan {
                    range: (c.lo, c.hi),
                    what: c.what,
                })
                .collect(),
        )
    }
}

impl Guest for VmGuest {
    fn symbol(&self, name: &str) -> Result<(u64, u64), SymbolError> {
        if let Some((module, rest)) = split_module_spec(name) {
            return self.module_symbol(name, module, rest, false);
        }
        self.kernel
            .symbols
            .resolve(name, Scope::Exact)
            .map(|s| (s.addr, s.size))
            .map_err(|e| SymbolError(e.to_string()))
    }

    fn table_sizes(&self) -> Result<TableSizes, GuestError> {
        let k = &self.kernel;
        let intro = |e: KernelError| GuestError::Introspection(e.into());
        let size = |s: &str| k.btf.size_of(s).map_err(|e| intro(e.into()));
        Ok(TableSizes {
            module: k.module_struct_size().map_err(intro)?,
            bug_entry: size("bug_entry")?,
            extable_entry: size("exception_table_entry")?,
            orc_entry: size("orc_entry")?,
            ddebug_entry: k.ddebug_entry_size().map_err(intro)?,
        })
    }

    fn register_code(&self, at: u64, info: &CodeInfo) -> Result<(), GuestError> {
        self.ensure_verified()?;
        self.kernel
            .register_code(self.handle.memory(), at, info)
            .map_err(registration_error)
    }

    fn key_abi(&self) -> Result<KeyAbi, GuestError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let ram: Vec<(u64, u64)> = self
            .handle
            .memory()
            .iter()
            .map(|r| (r.start_addr().0, r.start_addr().0 + r.len()))
            .collect();
        if !self.region.has_struct_pages(&ram) {
            return Err(GuestError::Refused(format!(
                "the patch region at {:#x} lies in a memory section without other RAM: the guest kernel has no struct page for it, and text_poke() of static branches in patch code would fault (give the guest more memory)",
                self.region.gpa
            )));
        }
        self.kernel.key_abi().map_err(|e| GuestError::Introspection(e.into()))
    }

    fn unregister_code(&self, at: u64) -> Result<(), GuestError> {
        self.kernel
            .unregister_code(self.handle.memory(), at)
            .map_err(registration_error)
    }

    fn link_symbol(&self, name: &str) -> Result<u64, SymbolError> {
        if let Some((module, rest)) = split_module_spec(name) {
            return self.module_symbol(name, module, rest, true).map(|(a, _)| a);
        }
        self.kernel
            .symbols
            .resolve(name, Scope::PreferGlobal)
            .map(|s| s.addr)
            .map_err(|e| SymbolError(e.to_string()))
    }

    fn module(&self, name: &str) -> Result<ModuleRef, ModuleLookupError> {
        match self.module_syms(name, true) {
            Ok(s) => Ok(ModuleRef {
                name: name.into(),
                addr: s.module.addr,
                core: (s.module.base, s.module.size),
            }),
            Err(KmodError::NotLoaded { loaded, .. }) => Err(ModuleLookupError::NotLoaded {
                loaded: if loaded.is_empty() {
                    "none".into()
                } else {
                    loaded.join(", ")
                },
            }),
            Err(KmodError::NotLive { state, .. }) => Err(ModuleLookupError::NotLive(state)),
            Err(e) => Err(ModuleLookupError::Unreadable(e.to_string())),
        }
    }

    fn loaded_module(&self, name: &str) -> Result<u64, GuestError> {
        self.module(name)
            .map(|m| m.addr)
            .map_err(|e| GuestError::Refused(format!("the patch needs the guest module '{name}': {e}")))
    }

    fn pin_module(&self, m: &ModuleRef) -> Result<(), GuestError> {
        let s = self.pinnable(m)?;
        self.kernel
            .pin_module(self.handle.memory(), &s.module)
            .map_err(|e| GuestError::Introspection(e.into()))
    }

    fn unpin_module(&self, m: &ModuleRef) -> Result<(), GuestError> {
        let s = self.pinnable(m)?;
        self.kernel
            .unpin_module(self.handle.memory(), &s.module)
            .map_err(|e| GuestError::Introspection(e.into()))
    }

    fn describe(&self, addr: u64) -> String {
        if self.kernel.symbols.lookup(addr).is_none() {
            let cache = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            for m in cache.values() {
                if let Some((s, off)) = m.lookup(addr) {
                    return format!("{}+{off:#x}/{:#x} [{}]", s.name, s.size, m.module.name);
                }
            }
        }
        self.kernel.symbols.describe(addr)
    }

    fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.kernel
            .virt(self.handle.memory())
            .read(va, buf)
            .map_err(|e| GuestError::Memory(e.into()))
    }

    fn cpu_caps(&self) -> Result<Vec<u32>, GuestError> {
        self.kernel
            .cpu_caps(self.handle.memory())
            .map_err(|e| GuestError::Introspection(e.into()))
    }

    fn write(&self, va: u64, data: &[u8]) -> Result<(), GuestError> {
        self.ensure_verified()?;
        if self.region.contains_va(va) {
            self.ensure_mapped()?;
        }
        self.kernel
            .virt(self.handle.memory())
            .write(va, data)
            .map_err(|e| GuestError::Memory(e.into()))
    }

    fn stop_the_world(&self, f: &mut dyn FnMut(&[VcpuState])) -> Result<Duration, GuestError> {
        let t0 = Instant::now();
        let paused = self
            .handle
            .pause(PAUSE_TIMEOUT)
            .map_err(|e| GuestError::Pause(e.into()))?;
        let states: Vec<VcpuState> = paused.snapshots.iter().map(|s| self.state(s)).collect();
        f(&states);
        drop(paused);
        Ok(t0.elapsed())
    }

    fn tasks(&self) -> Result<Vec<TaskState>, GuestError> {
        let tasks = list_tasks(&self.kernel, self.handle.memory()).map_err(|e| GuestError::Introspection(e.into()))?;
        Ok(tasks
            .iter()
            .map(|t| TaskState {
                task: t.addr,
                pid: t.pid,
                comm: t.comm.clone(),
                state: t.state_name().into(),
                stack: (t.stack_base != 0).then_some((t.stack_base, t.stack_base.wrapping_add(THREAD_SIZE))),
                saved_sp: t.saved_sp,
                on_cpu: t.on_cpu.then_some(t.cpu),
            })
            .collect())
    }

    fn protect(&self, va: u64, len: u64, owner: &str, rule: WriteRule) -> Result<(), GuestError> {
        let virt = self.kernel.virt(self.handle.memory());
        let first = virt.translate(va).map_err(|e| GuestError::Memory(e.into()))?.gpa;
        let last = virt
            .translate(va + len.max(1) - 1)
            .map_err(|e| GuestError::Memory(e.into()))?
            .gpa;
        if last != first + len.max(1) - 1 {
            return Err(GuestError::Refused(format!(
                "object at {va:#x} ({len} bytes) is not physically contiguous"
            )));
        }
        let handler: crate::protect::WriteHandler =
            Arc::new(move |f: &crate::protect::WriteFault| rule(f.gpa as i64 - first as i64, &f.data, f.rip));
        self.handle
            .write_protect(first, len, owner, handler)
            .map_err(|e| GuestError::Protect(e.into()))
    }

    fn unprotect(&self, owner: &str) -> Result<(), GuestError> {
        self.handle
            .write_unprotect(owner)
            .map_err(|e| GuestError::Protect(e.into()))
    }

    fn patch_region(&self) -> PatchRegion {
        PatchRegion {
            va: self.region.va + PLATFORM_SIZE,
            size: PATCH_REGION_SIZE - PLATFORM_SIZE,
        }
    }

    fn readonly_pages(&self) -> u64 {
        self.handle.readonly_bytes() / PAGE_SIZE
    }

    fn call(&self, func: u64, args: [u64; 2], limit: Duration) -> Result<u64, GuestError> {
        self.ensure_verified()?;
        self.ensure_call_area()?;
        let lo = self.region.va + PLATFORM_SIZE;
        if func < lo || !self.region.contains_va(func) {
            return Err(GuestError::Refused(format!("{func:#x} is not patch code")));
        }
        self.guest_call(func, args, limit).map_err(|e| match e {
            CallError::Exception { rip, .. } | CallError::Timeout { rip, .. }
                if self.kernel.symbols.lookup(rip).is_some() =>
            {
                GuestError::Call(format!("{e} (in {})", self.kernel.symbols.describe(rip)).into())
            }
            e => GuestError::Call(e.into()),
        })
    }
}

/// Serves guest vsock connections to [`VSOCK_PORT`] with the update server, as
/// [`Caller::Guest`] (what the guest may ask is the server's [`GuestRights`]): each
/// connection gets a socket pair, one end served by [`UpdateServer::spawn_connection`] on
/// its own thread (or answered "busy" when the channel's connections are all taken), the
/// other shuttled to the guest by the vsock device. Other ports, and every port when the
/// guest's rights are `off`, are refused (the guest sees a reset).
pub struct UpdatePort(pub Arc<UpdateServer>);

impl PortListener for UpdatePort {
    fn connect(&self, port: u32) -> Option<UnixStream> {
        if port != VSOCK_PORT || self.0.guest_rights() == GuestRights::Off {
            return None;
        }
        let (ours, theirs) = match UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                log::warn!("vsock: socket pair: {e}");
                return None;
            }
        };
        self.0.spawn_connection(ours, Caller::Guest);
        Some(theirs)
    }
}

/// Why the update server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The guest kernel could not be introspected.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The API socket could not be served.
    #[error(transparent)]
    ApiSocket(#[from] ApiSocketError),
    /// The kernel build id, which signatures must name, could not be read from the vmlinux.
    #[error("kernel build id: {0}")]
    KernelId(#[from] lucos_update_server::signing::SignError),
}

/// A running update server and its API socket file (removed when this is dropped, if the
/// path still names it).
pub struct Started {
    /// The server.
    pub server: Arc<UpdateServer>,
    /// The API socket file.
    pub api_socket: ApiSocket,
}

/// Starts the update server on `api_sock` (and on vsock, when the VM has the device and
/// `guest` is not [`GuestRights::Off`]) for the VM behind `handle`, accepting modules
/// signed by one of `trusted` for this `vmlinux`'s build.
pub fn start_server(
    handle: VmHandle,
    vmlinux: &Vmlinux,
    trusted: Vec<ed25519_dalek::VerifyingKey>,
    guest_rights: GuestRights,
    api_sock: &Path,
) -> Result<Started, StartError> {
    let kernel_id = lucos_update_server::signing::kernel_id(vmlinux.bytes())?;
    log::info!(
        "kernel build id {}; guest vsock rights: {guest_rights:?}",
        lucos_update_server::signing::hex(&kernel_id)
    );
    let guest = Arc::new(VmGuest::new(handle.clone(), vmlinux)?);
    let server = UpdateServer::new(
        guest,
        Policy {
            trusted,
            kernel_id,
            guest: guest_rights,
            limits: Limits::default(),
        },
    );
    let api_socket = server.serve_unix(api_sock)?;
    server.start_rechecks(lucos_update_server::service::RECHECK_PERIOD);
    if guest_rights != GuestRights::Off && handle.set_vsock_listener(Arc::new(UpdatePort(server.clone()))) {
        log::info!("update server on vsock port {VSOCK_PORT}");
    }
    Ok(Started { server, api_socket })
}
