//! Lists every guest task by walking `init_task.tasks` (processes) and each process's
//! `thread_group` ring (threads), reading fields at BTF offsets.

use super::kernel::{GuestKernel, KernelError};
use super::pagewalk::GuestVirt;
use crate::memory::GuestMem;

/// Kernel stacks are THREAD_SIZE (16 KiB on x86-64 without KASAN).
pub const THREAD_SIZE: u64 = 16 * 1024;
/// Give up on lists longer than this (a corrupt or racing list must not hang the VMM).
pub const MAX_TASKS: usize = 65_536;

/// One guest task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// Address of the task_struct.
    pub addr: u64,
    /// Thread id (`task_struct.pid`).
    pub pid: i32,
    /// Process id (`task_struct.tgid`): the pid of the thread-group leader.
    pub tgid: i32,
    /// Command name (`comm`, at most 15 bytes, lossily decoded as UTF-8).
    pub comm: String,
    /// `__state` (0 running, 1 interruptible, 2 uninterruptible, ...).
    pub state: u32,
    /// Kernel stack [stack_base, stack_base + THREAD_SIZE).
    pub stack_base: u64,
    /// Saved kernel stack pointer (`thread.sp`), valid when the task is not running.
    pub saved_sp: u64,
    /// Currently running on a CPU.
    pub on_cpu: bool,
    /// CPU it runs on (or last ran on).
    pub cpu: u32,
}

impl TaskInfo {
    /// One letter for `state`, as `ps` shows it: `R`, `S`, `D`, `T`, `X`, `I`, or `?`.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            0 => "R",
            1 => "S",
            2 => "D",
            4 | 8 => "T",
            0x80 => "X",
            0x402 => "I",
            _ => "?",
        }
    }
}

fn read_task(k: &GuestKernel, v: &GuestVirt, addr: u64) -> Result<TaskInfo, KernelError> {
    let l = &k.tasks;
    let mut comm = [0u8; 16];
    v.read(addr.wrapping_add(l.comm), &mut comm)?;
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    Ok(TaskInfo {
        addr,
        pid: v.read_u32(addr.wrapping_add(l.pid))? as i32,
        tgid: v.read_u32(addr.wrapping_add(l.tgid))? as i32,
        comm: String::from_utf8_lossy(&comm[..end]).into_owned(),
        state: v.read_u32(addr.wrapping_add(l.state))?,
        stack_base: v.read_u64(addr.wrapping_add(l.stack))?,
        saved_sp: v.read_u64(addr.wrapping_add(l.thread_sp))?,
        on_cpu: v.read_u32(addr.wrapping_add(l.on_cpu))? != 0,
        cpu: v.read_u32(addr.wrapping_add(l.cpu))?,
    })
}

/// All tasks (every thread of every process, including init_task/swapper).
/// Call with the vCPUs paused for a consistent snapshot.
pub fn list_tasks(k: &GuestKernel, mem: &GuestMem) -> Result<Vec<TaskInfo>, KernelError> {
    let v = k.virt(mem);
    let init = k.sym("init_task")?;
    let mut out = Vec::new();
    let mut leader = init;
    loop {
        // The threads of this process: walk its thread_group ring.
        let mut t = leader;
        loop {
            out.push(read_task(k, &v, t)?);
            if out.len() > MAX_TASKS {
                return Err(KernelError::TooManyTasks(MAX_TASKS));
            }
            // Guest-controlled pointers: wrap, never panic; garbage fails a later read.
            t = v
                .read_u64(t.wrapping_add(k.tasks.thread_group))?
                .wrapping_sub(k.tasks.thread_group);
            if t == leader {
                break;
            }
        }
        leader = v
            .read_u64(leader.wrapping_add(k.tasks.tasks))?
            .wrapping_sub(k.tasks.tasks);
        if leader == init {
            break;
        }
    }
    Ok(out)
}
