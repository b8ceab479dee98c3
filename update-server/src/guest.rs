//! What the update server needs from the VMM, as a trait: the VMM implements it over its
//! guest memory, vCPUs and kernel introspection. Keeps this crate free of KVM details.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

/// The cause of a [`GuestError`], from the VMM's own error types.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why the VMM could not do what the update server asked, by kind, with the VMM's error as
/// the source.
#[derive(Debug, Error)]
pub enum GuestError {
    /// Guest memory could not be read or written at a kernel-virtual address.
    #[error("{0}")]
    Memory(#[source] Cause),
    /// Guest kernel introspection failed (symbols, BTF, the task list, CPU capabilities).
    #[error("{0}")]
    Introspection(#[source] Cause),
    /// The running guest is not the kernel the symbols came from: nothing is written.
    #[error("refusing to patch: {0}")]
    KernelMismatch(#[source] Cause),
    /// The vCPUs could not be stopped (or the VM is stopping).
    #[error("{0}")]
    Pause(#[source] Cause),
    /// Changing write protection (read-only memslots) failed.
    #[error("{0}")]
    Protect(#[source] Cause),
    /// A guest call (patch callback) failed: exception, time limit, no safe point.
    #[error("{0}")]
    Call(#[source] Cause),
    /// The VMM refuses the request itself (e.g. a call target outside patch code, an
    /// object spanning non-contiguous pages).
    #[error("{0}")]
    Refused(String),
    /// The guest holds a lock the change needs free (what it is, in words); nothing was
    /// changed, and a later pause may succeed.
    #[error("{0}")]
    Busy(String),
}

/// Part of a per-CPU stack (IRQ, exception) that can hold a paused vCPU's live frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackSpan {
    /// `[lo, hi)`: from the stack pointer to the stack's top.
    pub range: (u64, u64),
    /// Which stack (`IRQ stack`, `NMI stack`, ...).
    pub what: String,
}

/// Why a kernel symbol reference does not name exactly one symbol: not found, ambiguous
/// (the message lists the candidates and how to name one) or malformed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct SymbolError(pub String);

/// A loaded guest kernel module that a patch refers to (its symbols are named
/// `MODULE::NAME` or `MODULE::NAME,POS`), as [`Guest::module`] found it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModuleRef {
    /// Its name (`xfs`).
    pub name: String,
    /// Address of its `struct module`.
    #[serde(skip)]
    pub addr: u64,
    /// Its core layout (code and data it keeps while loaded): start and bytes.
    #[serde(skip)]
    pub core: (u64, u64),
}

/// Why a module a patch needs cannot be patched now.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ModuleLookupError {
    /// It is not loaded.
    #[error("it is not loaded in the guest (loaded: {loaded}); lucos patches only loaded modules: load it, then apply the patch")]
    NotLoaded {
        /// The modules that are loaded, comma-separated (or `none`).
        loaded: String,
    },
    /// It is loading or being unloaded.
    #[error("it is {0}, not live")]
    NotLive(String),
    /// The guest's module list could not be read.
    #[error("{0}")]
    Unreadable(String),
}

/// The module a symbol reference `MODULE::NAME[,POS]` names; None for a vmlinux
/// reference.
pub fn module_of(spec: &str) -> Option<&str> {
    spec.split_once("::").map(|(m, _)| m).filter(|m| !m.is_empty())
}

/// Sizes of the guest kernel's structures that patch code's tables are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSizes {
    /// The module record the VMM writes: `struct module` and what it appends (the dynamic
    /// debug table).
    pub module: u64,
    /// `struct bug_entry`.
    pub bug_entry: u64,
    /// `struct exception_table_entry`.
    pub extable_entry: u64,
    /// `struct orc_entry`.
    pub orc_entry: u64,
    /// `struct _ddebug` (`pr_debug()` descriptors); 0 when the kernel has no dynamic debug
    /// core lucos can list them with.
    pub ddebug_entry: u64,
}

/// Patch code to register with the guest kernel as a module (all guest-virtual addresses,
/// inside the patch image): what the kernel's `struct module` records about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeInfo {
    /// Module name shown in stack traces.
    pub name: String,
    /// Start of the image.
    pub base: u64,
    /// Bytes of the image, metadata included.
    pub size: u64,
    /// Bytes of code at the start of the image.
    pub text_size: u64,
    /// Sorted exception table and its number of entries.
    pub extable: (u64, u64),
    /// BUG/WARN table and its number of entries.
    pub bugs: (u64, u64),
    /// Sorted ORC tables: `orc_unwind_ip`, `orc_unwind`, number of entries.
    pub orc: (u64, u64, u64),
    /// `Elf64_Sym` array, its length (entry 0 empty), string table, type chars.
    pub kallsyms: (u64, u64, u64, u64),
    /// Sorted `__jump_table` (`jump_entries`) and its number of entries.
    pub jump_table: (u64, u64),
    /// `__dyndbg`: the `pr_debug()` descriptors and their number, listed with the dynamic
    /// debug core (`dynamic_debug/control`) while the code is registered.
    pub dyndbg: (u64, u64),
}

/// The guest kernel's static key structures, for linking patch code's static branches
/// into the kernel's key lists ([`crate::jumplabel`]): byte offsets from BTF and addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAbi {
    /// `struct static_key`: size, offset of `enabled` (atomic_t), of `type` (the
    /// `type`/`entries`/`next` union).
    pub key_size: u64,
    /// Offset of `static_key.enabled`.
    pub key_enabled: u64,
    /// Offset of `static_key.type`.
    pub key_type: u64,
    /// `sizeof(struct static_key_mod)`.
    pub node_size: u64,
    /// Offset of `static_key_mod.next`.
    pub node_next: u64,
    /// Offset of `static_key_mod.entries`.
    pub node_entries: u64,
    /// Offset of `static_key_mod.mod`.
    pub node_mod: u64,
    /// Address of `jump_label_mutex.owner`.
    pub mutex_owner: u64,
    /// `[_stext, _end)`: where the keys of vmlinux lie.
    pub kernel: (u64, u64),
}

/// A vCPU's state while the world is stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuState {
    /// vCPU index, from 0.
    pub id: u8,
    /// Guest virtual instruction pointer.
    pub rip: u64,
    /// Guest stack pointer.
    pub rsp: u64,
    /// CS's privilege level is 0: the vCPU runs kernel code.
    pub kernel_mode: bool,
    /// In kernel mode: the live parts of the per-CPU stacks the vCPU is on or came from
    /// (an NMI over an IRQ over a task gives the NMI and IRQ stacks; task stacks are
    /// covered by the task list), found by following the links the entry code leaves at
    /// each stack's top. `None` when the guest's stacks are not known: then the vCPU's
    /// stack is scanned from RSP to the end of its `THREAD_SIZE` block.
    pub stacks: Option<Vec<StackSpan>>,
}

/// A guest task, as the VMM reads it from the kernel's task list. Which part of its stack
/// can hold live return addresses is decided by the stack inspection
/// ([`crate::manager::inspect`]), not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    /// Address of the task's `task_struct`.
    pub task: u64,
    /// Task's pid.
    pub pid: i32,
    /// Task's `comm` (command name).
    pub comm: String,
    /// Scheduler state letter as in `ps` (`R`, `S`, `D`, `T`, `X`, `I`, or `?`).
    pub state: String,
    /// Its kernel stack, `[base, top)`; None once the kernel freed it (an exited task
    /// waiting to be reaped: it can run no code).
    pub stack: Option<(u64, u64)>,
    /// The stack pointer saved when it was last switched out (`thread.sp`).
    pub saved_sp: u64,
    /// The CPU it is running on right now, if it is running.
    pub on_cpu: Option<u32>,
}

/// The guest-virtual window the VMM reserved for patch code and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchRegion {
    /// Kernel-virtual start of the window, in the kernel's high map (page aligned).
    pub va: u64,
    /// Size of the window in bytes: what patches can use.
    pub size: u64,
}

/// What a guest write to a write-protected object stores. Called with the write's offset
/// from the object's start (negative or past its end for other data on the same page), the
/// bytes written and the writer's RIP; returns the bytes to store at the written address.
pub type WriteRule = Arc<dyn Fn(i64, &[u8], u64) -> Vec<u8> + Send + Sync>;

/// What the update server needs from the VMM: symbols, memory access, stopping the
/// vCPUs, task lists, write protection and guest calls.
pub trait Guest: Send + Sync {
    /// Address and size of the guest kernel symbol a reference names: `NAME`,
    /// `FILE:NAME`, `NAME,POS` or `FILE:NAME,POS` (FILE: the base name of the source file
    /// of a local symbol; POS: from 1, among the matches in address order, as
    /// `/proc/kallsyms` lists them). A reference that matches several symbols is refused
    /// with the candidates listed.
    fn symbol(&self, spec: &str) -> Result<(u64, u64), SymbolError>;
    /// The address a relocation of patch code against `name` links to: as
    /// [`symbol`](Self::symbol), except that a bare name shared by several symbols
    /// resolves to the one global among them, as a linker would.
    fn link_symbol(&self, name: &str) -> Result<u64, SymbolError>;
    /// Sizes of the kernel structures patch code's tables use; an error if the guest
    /// kernel has no module support lucos can register patch code with.
    fn table_sizes(&self) -> Result<TableSizes, GuestError>;
    /// Makes patch code known to the guest kernel as a module: a `struct module` written at
    /// `at` (`TableSizes::module` bytes in the patch image) and linked into the kernel's
    /// module address tree and BUG table list. Call with the world stopped.
    fn register_code(&self, at: u64, info: &CodeInfo) -> Result<(), GuestError>;
    /// Undoes [`register_code`](Self::register_code). Call with the world stopped.
    fn unregister_code(&self, at: u64) -> Result<(), GuestError>;
    /// The loaded module `name`, which a patch refers to; its symbols resolve (as
    /// `MODULE::NAME[,POS]`, POS counting in the module's kallsyms order) from then on.
    fn module(&self, name: &str) -> Result<ModuleRef, ModuleLookupError>;
    /// Pins a module for a patch that uses it: finds it again as [`module`](Self::module)
    /// found it, checks it is live, and takes a reference on it so that the guest cannot
    /// unload it. Call with the world stopped.
    fn pin_module(&self, m: &ModuleRef) -> Result<(), GuestError>;
    /// Drops a reference [`pin_module`](Self::pin_module) took. Call with the world stopped.
    fn unpin_module(&self, m: &ModuleRef) -> Result<(), GuestError>;
    /// The guest kernel's static key structures; an error if it has none lucos can use
    /// (no `CONFIG_JUMP_LABEL`, BTF without them).
    fn key_abi(&self) -> Result<KeyAbi, GuestError> {
        Err(GuestError::Refused(
            "static keys are not supported by this guest".into(),
        ))
    }
    /// Name of the function containing `addr`, for messages.
    fn describe(&self, addr: u64) -> String;
    /// Reads guest kernel-virtual memory.
    fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), GuestError>;
    /// Writes guest kernel-virtual memory (ignoring guest page protections).
    fn write(&self, va: u64, data: &[u8]) -> Result<(), GuestError>;
    /// Stops every vCPU, calls `f` with their states, resumes them. Returns how long the
    /// vCPUs were stopped.
    fn stop_the_world(&self, f: &mut dyn FnMut(&[VcpuState])) -> Result<Duration, GuestError>;
    /// Lists the guest's tasks; call inside `stop_the_world` for a consistent view.
    fn tasks(&self) -> Result<Vec<TaskState>, GuestError>;
    /// The reserved patch window.
    fn patch_region(&self) -> PatchRegion;
    /// Write-protects the page(s) of kernel object `[va, va+len)` for `owner`: reads stay
    /// at full speed, every guest write goes through `rule`. Only inside `stop_the_world`.
    fn protect(&self, va: u64, len: u64, owner: &str, rule: WriteRule) -> Result<(), GuestError>;
    /// Drops every protection of `owner`. Only inside `stop_the_world`.
    fn unprotect(&self, owner: &str) -> Result<(), GuestError>;
    /// Runs the guest kernel function at `func` as `func(args[0], args[1])` and returns
    /// its return value (RAX). The VMM runs it on a vCPU at a safe point (user mode or
    /// idle: no kernel lock held) with interrupts off, on a private stack and IDT; the
    /// vCPU's state is restored afterwards. An exception in the function or running
    /// longer than `limit` stops it and is returned as an error. Never inside
    /// `stop_the_world` (the other vCPUs keep running during the call).
    fn call(&self, func: u64, args: [u64; 2], limit: Duration) -> Result<u64, GuestError>;
    /// The `struct module` address of the guest module `name`, which must be loaded and
    /// live; an error naming the module otherwise (lucos refuses patches that need a
    /// module the guest has not loaded).
    fn loaded_module(&self, name: &str) -> Result<u64, GuestError> {
        Err(GuestError::Refused(format!(
            "the patch needs the guest module '{name}', and this VMM cannot look modules up"
        )))
    }
    /// Guest pages that are write-protected right now (read-only memslots in KVM).
    fn readonly_pages(&self) -> u64;
    /// The running kernel's CPU capability words (`boot_cpu_data.x86_capability`): what it
    /// patched its own alternatives by.
    fn cpu_caps(&self) -> Result<Vec<u32>, GuestError>;
}
