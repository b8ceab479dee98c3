//! Glue between the VM and the update server: implements the update server's [`Guest`]
//! trait over guest memory, the vCPU pause control and kernel introspection, and starts
//! the server.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lucos_update_server::guest::{Guest, GuestError, PatchRegion, TaskState, VcpuState};

use crate::introspect::tasks::THREAD_SIZE;
use crate::introspect::{list_tasks, GuestKernel};
use crate::layout::{patch_region_start, PATCH_REGION_SIZE};
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

    fn patch_region(&self) -> PatchRegion {
        PatchRegion {
            va: self.region_va,
            size: PATCH_REGION_SIZE,
        }
    }
}

/// Starts the update server on `api_sock` for the VM behind `handle`.
pub fn start_server(
    handle: VmHandle,
    vmlinux: &Path,
    mem_bytes: u64,
    trusted: Vec<ed25519_dalek::VerifyingKey>,
    api_sock: &Path,
) -> Result<Arc<lucos_update_server::service::UpdateServer>, GuestError> {
    let guest = Arc::new(VmGuest::new(handle, vmlinux, mem_bytes)?);
    let server = lucos_update_server::service::UpdateServer::new(guest, trusted);
    server
        .serve_unix(api_sock)
        .map_err(|e| gerr(format!("api socket {}: {e}", api_sock.display())))?;
    server.start_rechecks(lucos_update_server::service::RECHECK_PERIOD);
    Ok(server)
}
