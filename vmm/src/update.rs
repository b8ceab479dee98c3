//! Glue between the VM and the update server: implements the update server's [`Guest`]
//! trait over guest memory, the vCPU pause control and kernel introspection, and starts
//! the server.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lucos_update_server::guest::{Guest, GuestError, PatchRegion, TaskState, VcpuState, WriteRule};
use lucos_update_server::protocol::VSOCK_PORT;
use lucos_update_server::service::UpdateServer;

use crate::devices::virtio::muxer::PortListener;
use crate::introspect::tasks::THREAD_SIZE;
use crate::introspect::{list_tasks, GuestKernel};
use crate::layout::{patch_region_start, PATCH_REGION_SIZE, PLATFORM_PAGE_SIZE};
use crate::pause::VcpuSnapshot;
use crate::vm::VmHandle;

/// How long to wait for all vCPUs to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The running VM as the update server sees it.
pub struct VmGuest {
    handle: VmHandle,
    kernel: GuestKernel,
    region_gpa: u64,
    region_va: u64,
    mapped: Mutex<bool>,
    /// The vmlinux the symbols came from, and whether the running guest was found to match
    /// it (its `linux_banner` is read at the first write, not at start-up).
    vmlinux: PathBuf,
    verified: Mutex<bool>,
}

fn gerr(e: impl ToString) -> GuestError {
    GuestError(e.to_string())
}

impl VmGuest {
    pub fn new(handle: VmHandle, vmlinux: &Path, mem_bytes: u64) -> Result<Self, GuestError> {
        let symbols = handle
            .symbols_arc()
            .ok_or_else(|| gerr("kernel symbols are not available"))?;
        let kernel = GuestKernel::with_symbols(vmlinux, symbols).map_err(gerr)?;
        let region_gpa = patch_region_start(mem_bytes);
        let region_va = crate::introspect::kernel::START_KERNEL_MAP + region_gpa;
        Ok(Self {
            handle,
            kernel,
            region_gpa,
            region_va,
            mapped: Mutex::new(false),
            vmlinux: vmlinux.to_path_buf(),
            verified: Mutex::new(false),
        })
    }

    /// Maps the patch region into the guest kernel's address space (once).
    fn ensure_mapped(&self) -> Result<(), GuestError> {
        let mut m = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        if !*m {
            self.kernel
                .map_high(self.handle.memory(), self.region_gpa, PATCH_REGION_SIZE)
                .map_err(gerr)?;
            *m = true;
        }
        Ok(())
    }

    /// Before the first write into the guest: the running kernel must be the vmlinux the
    /// symbols came from (same `linux_banner`), or nothing is written.
    fn ensure_verified(&self) -> Result<(), GuestError> {
        let mut v = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if !*v {
            let refuse = |e: crate::introspect::kernel::KernelError| gerr(format!("refusing to patch: {e}"));
            let banner =
                crate::introspect::kernel::banner_from_vmlinux(&self.vmlinux, &self.kernel.symbols).map_err(refuse)?;
            self.kernel.verify(self.handle.memory(), &banner).map_err(refuse)?;
            *v = true;
        }
        Ok(())
    }

    fn state(s: &VcpuSnapshot) -> VcpuState {
        VcpuState {
            id: s.id,
            rip: s.rip,
            rsp: s.rsp,
            kernel_mode: s.kernel_mode,
        }
    }
}

impl Guest for VmGuest {
    fn symbol(&self, name: &str) -> Option<(u64, u64)> {
        self.kernel.symbols.get(name).map(|s| (s.addr, s.size))
    }

    fn describe(&self, addr: u64) -> String {
        self.kernel.symbols.describe(addr)
    }

    fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.kernel.virt(self.handle.memory()).read(va, buf).map_err(gerr)
    }

    fn write(&self, va: u64, data: &[u8]) -> Result<(), GuestError> {
        self.ensure_verified()?;
        if va >= self.region_va && va < self.region_va + PATCH_REGION_SIZE {
            self.ensure_mapped()?;
        }
        self.kernel.virt(self.handle.memory()).write(va, data).map_err(gerr)
    }

    fn stop_the_world(&self, f: &mut dyn FnMut(&[VcpuState])) -> Result<Duration, GuestError> {
        let t0 = Instant::now();
        let paused = self.handle.pause(PAUSE_TIMEOUT).map_err(gerr)?;
        let states: Vec<VcpuState> = paused.snapshots.iter().map(Self::state).collect();
        f(&states);
        drop(paused);
        Ok(t0.elapsed())
    }

    fn tasks(&self, vcpus: &[VcpuState]) -> Result<Vec<TaskState>, GuestError> {
        let tasks = list_tasks(&self.kernel, self.handle.memory()).map_err(gerr)?;
        let in_stack = |sp: u64, base: u64| sp >= base && sp < base + THREAD_SIZE;
        let mut out = Vec::with_capacity(tasks.len() + vcpus.len());
        for t in &tasks {
            let top = t.stack_base + THREAD_SIZE;
            let scan = if t.on_cpu {
                match vcpus.iter().find(|v| v.id as u32 == t.cpu) {
                    Some(v) if !v.kernel_mode => None,
                    Some(v) if in_stack(v.rsp, t.stack_base) => Some((v.rsp & !7, top)),
                    _ => Some((t.stack_base, top)),
                }
            } else if in_stack(t.saved_sp, t.stack_base) {
                Some((t.saved_sp & !7, top))
            } else {
                Some((t.stack_base, top))
            };
            out.push(TaskState {
                pid: t.pid,
                comm: t.comm.clone(),
                state: t.state_name().into(),
                scan,
            });
        }
        // vCPUs running on a stack that is no task's (IRQ/exception stacks).
        for v in vcpus.iter().filter(|v| v.kernel_mode) {
            if !tasks.iter().any(|t| in_stack(v.rsp, t.stack_base)) {
                let lo = v.rsp & !7;
                let hi = (v.rsp | (THREAD_SIZE - 1)) + 1;
                out.push(TaskState {
                    pid: -1,
                    comm: format!("vCPU {} stack", v.id),
                    state: "R".into(),
                    scan: Some((lo, hi)),
                });
            }
        }
        Ok(out)
    }

    fn protect(&self, va: u64, len: u64, owner: &str, rule: WriteRule) -> Result<(), GuestError> {
        let virt = self.kernel.virt(self.handle.memory());
        let first = virt.translate(va).map_err(gerr)?.gpa;
        let last = virt.translate(va + len.max(1) - 1).map_err(gerr)?.gpa;
        if last != first + len.max(1) - 1 {
            return Err(gerr(format!(
                "object at {va:#x} ({len} bytes) is not physically contiguous"
            )));
        }
        let handler: crate::protect::WriteHandler =
            Arc::new(move |f: &crate::protect::WriteFault| rule(f.gpa as i64 - first as i64, &f.data, f.rip));
        self.handle.write_protect(first, len, owner, handler).map_err(gerr)
    }

    fn unprotect(&self, owner: &str) -> Result<(), GuestError> {
        self.handle.write_unprotect(owner).map_err(gerr)
    }

    fn patch_region(&self) -> PatchRegion {
        PatchRegion {
            va: self.region_va + PLATFORM_PAGE_SIZE,
            size: PATCH_REGION_SIZE - PLATFORM_PAGE_SIZE,
        }
    }
}

/// Serves guest vsock connections to [`VSOCK_PORT`] with the update server: each
/// connection gets a socket pair, one end served by [`UpdateServer::serve_stream`] on its
/// own thread, the other shuttled to the guest by the vsock device. Other ports are
/// refused (the guest sees a reset).
pub struct UpdatePort(pub Arc<UpdateServer>);

impl PortListener for UpdatePort {
    fn connect(&self, port: u32) -> Option<UnixStream> {
        if port != VSOCK_PORT {
            return None;
        }
        let (ours, theirs) = match UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                log::warn!("vsock: socket pair: {e}");
                return None;
            }
        };
        let server = self.0.clone();
        std::thread::Builder::new()
            .name("vsock-conn".into())
            .spawn(move || server.serve_stream(ours))
            .map_err(|e| log::warn!("vsock: cannot start a connection thread: {e}"))
            .ok()?;
        Some(theirs)
    }
}

/// Starts the update server on `api_sock` (and on vsock, when the VM has the device) for
/// the VM behind `handle`.
pub fn start_server(
    handle: VmHandle,
    vmlinux: &Path,
    mem_bytes: u64,
    trusted: Vec<ed25519_dalek::VerifyingKey>,
    api_sock: &Path,
) -> Result<Arc<lucos_update_server::service::UpdateServer>, GuestError> {
    let guest = Arc::new(VmGuest::new(handle.clone(), vmlinux, mem_bytes)?);
    let server = lucos_update_server::service::UpdateServer::new(guest, trusted);
    server
        .serve_unix(api_sock)
        .map_err(|e| gerr(format!("api socket {}: {e}", api_sock.display())))?;
    server.start_rechecks(lucos_update_server::service::RECHECK_PERIOD);
    if handle.set_vsock_listener(Arc::new(UpdatePort(server.clone()))) {
        log::info!("update server on vsock port {VSOCK_PORT}");
    }
    Ok(server)
}
