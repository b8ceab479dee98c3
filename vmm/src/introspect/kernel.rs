//! A view of the running guest kernel: its symbols, its struct layouts (BTF) and memory
//! by kernel-virtual address through the kernel's own top-level page table
//! (`init_top_pgt`), which maps every kernel address and needs no vCPU.

use std::sync::Arc;

use thiserror::Error;

use super::btf::{BtfError, KernelBtf};
use super::pagewalk::{GuestVirt, WalkError};
use super::Vmlinux;
use crate::memory::GuestMem;
use crate::symbols::{SymbolError, SymbolTable};

/// `__START_KERNEL_map`: kernel text/data are mapped at this virtual base.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// Why the guest kernel could not be inspected or prepared for patching.
#[derive(Debug, Error)]
pub enum KernelError {
    /// Reading the vmlinux's symbol table failed.
    #[error(transparent)]
    Symbols(#[from] SymbolError),
    /// The vmlinux's BTF is missing, invalid, or lacks a member lucos needs.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// A symbol lucos needs is not in the vmlinux's symbol table.
    #[error("kernel symbol '{0}' not found in the vmlinux")]
    NoSymbol(String),
    /// Translating or accessing a kernel-virtual address failed.
    #[error(transparent)]
    Walk(#[from] WalkError),
    /// The running guest is not the kernel of the vmlinux (`linux_banner` differs).
    #[error("the running guest does not match the vmlinux: {0}")]
    Mismatch(String),
    /// The patch region cannot go into the kernel's high map: it starts before `_end`, is not
    /// 2 MiB aligned, or ends past 1 GiB.
    #[error("patch region {gpa:#x}+{size:#x} cannot be mapped past the kernel image (ends at {kernel_end:#x})")]
    RegionPlacement {
        /// Guest-physical start of the region.
        gpa: u64,
        /// Its size in bytes.
        size: u64,
        /// Kernel-virtual address of the kernel's `_end`.
        kernel_end: u64,
    },
    /// The top-level page table has no present, non-huge PUD entry for the high map.
    #[error("no level2_kernel_pgt under init_top_pgt: the kernel's high map is not where lucos expects it")]
    NoHighMap,
    /// A high-map entry the region needs already maps something else.
    #[error("kernel high map entry for {va:#x} is already in use ({entry:#x})")]
    HighMapInUse {
        /// Kernel-virtual address of the 2 MiB page.
        va: u64,
        /// The PMD entry found there.
        entry: u64,
    },
    /// The kernel has no static keys lucos can link patch code's static branches into
    /// (no `CONFIG_JUMP_LABEL`, or not x86-64's relative `struct jump_entry`).
    #[error("the guest kernel has no static key support lucos can use (CONFIG_JUMP_LABEL, 16-byte jump_entry)")]
    NoJumpLabel,
    /// Patch code has `pr_debug()` descriptors and the kernel no dynamic debug core lucos
    /// can list them with (no `CONFIG_DYNAMIC_DEBUG_CORE`, or BTF without its tables).
    #[error("the patch has pr_debug() descriptors (__dyndbg) and the guest kernel no dynamic debug core lucos can list them with")]
    NoDynamicDebug,
    /// The guest holds a lock the change needs free; nothing was changed: try in a later
    /// pause.
    #[error("busy: {0}")]
    Busy(String),
    /// The task list has more entries than the limit given (corrupt, or changing under us).
    #[error("more than {0} tasks: the task list looks corrupt")]
    TooManyTasks(usize),
}

/// Field offsets the task walker needs, from BTF.
#[derive(Debug, Clone, Copy)]
pub struct TaskLayout {
    /// Byte offset of `task_struct.tasks` (the list of processes).
    pub tasks: u64,
    /// Byte offset of `task_struct.thread_group` (the ring of a process's threads).
    pub thread_group: u64,
    /// Byte offset of `task_struct.pid`.
    pub pid: u64,
    /// Byte offset of `task_struct.tgid`.
    pub tgid: u64,
    /// Byte offset of `task_struct.comm`.
    pub comm: u64,
    /// Byte offset of `task_struct.stack` (pointer to the kernel stack's base).
    pub stack: u64,
    /// Byte offset of `task_struct.__state`.
    pub state: u64,
    /// Byte offset of `task_struct.thread.sp` (saved kernel stack pointer).
    pub thread_sp: u64,
    /// Byte offset of `task_struct.on_cpu`.
    pub on_cpu: u64,
    /// Byte offset of `task_struct.thread_info.cpu`.
    pub cpu: u64,
}

impl TaskLayout {
    /// Reads the offsets from the kernel's BTF; fails if any field is missing.
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, BtfError> {
        let o = |f: &str| btf.offset_of("task_struct", f);
        Ok(Self {
            tasks: o("tasks")?,
            thread_group: o("thread_group")?,
            pid: o("pid")?,
            tgid: o("tgid")?,
            comm: o("comm")?,
            stack: o("stack")?,
            state: o("__state")?,
            thread_sp: o("thread.sp")?,
            on_cpu: o("on_cpu")?,
            cpu: o("thread_info.cpu")?,
        })
    }
}

/// Symbols + layouts of the guest kernel.
pub struct GuestKernel {
    /// The vmlinux's symbol table.
    pub symbols: Arc<SymbolTable>,
    /// The vmlinux's BTF (struct layouts).
    pub btf: KernelBtf,
    /// `task_struct` field offsets, from `btf`.
    pub tasks: TaskLayout,
    /// Guest-physical address of `init_top_pgt`.
    pub kernel_cr3: u64,
    /// `linux_banner` as the vmlinux has it: the running kernel must have the same.
    banner: Vec<u8>,
    /// `struct module` offsets, from `btf` on first use (registrations run in a pause).
    pub(super) module_layout: std::sync::OnceLock<super::modules::Layout>,
    /// `struct module` offsets for reading the guest's own modules, from `btf` on first use.
    pub(super) kmod_layout: std::sync::OnceLock<super::kmods::ModLayout>,
    /// Offset and size of each IST stack in `struct cea_exception_stacks`, from `btf` on
    /// first use (read in every pause).
    pub(super) ist_layout: std::sync::OnceLock<Vec<(&'static str, u64, u64)>>,
}

impl GuestKernel {
    /// Struct layouts (BTF) and `linux_banner` from the vmlinux the guest was booted with,
    /// whose symbol table is `symbols`.
    pub fn new(vmlinux: &Vmlinux, symbols: Arc<SymbolTable>) -> Result<Self, KernelError> {
        let btf = KernelBtf::from_vmlinux(vmlinux)?;
        let banner = banner_from_vmlinux(vmlinux, &symbols)?;
        let tasks = TaskLayout::from_btf(&btf)?;
        let pgt = symbols
            .get("init_top_pgt")
            .ok_or_else(|| KernelError::NoSymbol("init_top_pgt".into()))?
            .addr;
        Ok(Self {
            symbols,
            btf,
            tasks,
            kernel_cr3: pgt - START_KERNEL_MAP,
            banner,
            module_layout: std::sync::OnceLock::new(),
            kmod_layout: std::sync::OnceLock::new(),
            ist_layout: std::sync::OnceLock::new(),
        })
    }

    /// Address of kernel symbol `name`, or [`KernelError::NoSymbol`].
    pub fn sym(&self, name: &str) -> Result<u64, KernelError> {
        self.symbols
            .get(name)
            .map(|s| s.addr)
            .ok_or_else(|| KernelError::NoSymbol(name.into()))
    }

    /// Kernel-virtual memory of the guest.
    pub fn virt<'a>(&self, mem: &'a GuestMem) -> GuestVirt<'a> {
        GuestVirt::new(mem, self.kernel_cr3)
    }

    /// Checks that the running guest is the kernel these symbols describe: `linux_banner`
    /// in guest memory must equal the one in the vmlinux.
    pub fn verify(&self, mem: &GuestMem) -> Result<(), KernelError> {
        let addr = self.sym("linux_banner")?;
        let mut buf = vec![0u8; self.banner.len()];
        self.virt(mem).read(addr, &mut buf)?;
        if buf != self.banner {
            return Err(KernelError::Mismatch(format!(
                "linux_banner differs: guest has {:?}",
                String::from_utf8_lossy(&buf).trim_end_matches('\0')
            )));
        }
        Ok(())
    }

    /// The CPU capability words the running kernel decided on at boot
    /// (`boot_cpu_data.x86_capability[]`, Linux's `X86_FEATURE_*` and `X86_BUG_*` bits, after
    /// `clearcpuid=` and the kernel's own forced and cleared bits): what its alternatives
    /// were patched by.
    pub fn cpu_caps(&self, mem: &GuestMem) -> Result<Vec<u32>, KernelError> {
        let addr = self.sym("boot_cpu_data")? + self.btf.offset_of("cpuinfo_x86", "x86_capability")?;
        let words = self.btf.array_len("cpuinfo_x86", "x86_capability")?;
        let mut buf = vec![0u8; words * 4];
        self.virt(mem).read(addr, &mut buf)?;
        Ok(buf
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect())
    }
}

use crate::arch::x86_64::paging::{
    PTE_ACCESSED, PTE_ADDR_MASK, PTE_DIRTY, PTE_PAGE_SIZE, PTE_PRESENT, PTE_WRITABLE, SIZE_2M,
};

impl GuestKernel {
    /// Maps guest-physical `[gpa, gpa+size)` at `__START_KERNEL_map + gpa` with 2 MiB pages by
    /// writing entries of the kernel's own `level2_kernel_pgt` (found by walking
    /// `init_top_pgt`). The range must lie past the kernel image, where the kernel keeps no
    /// mappings (cleanup_highmap cleared them) and never creates new ones. Entries already
    /// mapping the same pages are left as they are; any other present entry is an error.
    pub fn map_high(&self, mem: &GuestMem, gpa: u64, size: u64) -> Result<u64, KernelError> {
        map_high(mem, self.kernel_cr3, self.sym("_end")?, gpa, size)
    }
}

/// [`GuestKernel::map_high`] without the BTF: `kernel_cr3` is the guest-physical address of
/// `init_top_pgt`, `kernel_end` the address of `_end`.
pub fn map_high(mem: &GuestMem, kernel_cr3: u64, kernel_end: u64, gpa: u64, size: u64) -> Result<u64, KernelError> {
    use vm_memory::{Bytes, GuestAddress};
    let va = START_KERNEL_MAP + gpa;
    if va < kernel_end || !gpa.is_multiple_of(SIZE_2M) || !size.is_multiple_of(SIZE_2M) || gpa + size > (1 << 30) {
        return Err(KernelError::RegionPlacement { gpa, size, kernel_end });
    }
    let rd = |a: u64| -> Result<u64, KernelError> {
        mem.read_obj(GuestAddress(a))
            .map_err(|_| KernelError::Walk(super::WalkError::Memory { gpa: a }))
    };
    let pml4e = rd(kernel_cr3 + ((va >> 39) & 0x1ff) * 8)?;
    let pud = pml4e & PTE_ADDR_MASK;
    let pude = rd(pud + ((va >> 30) & 0x1ff) * 8)?;
    if pml4e & PTE_PRESENT == 0 || pude & PTE_PRESENT == 0 || pude & PTE_PAGE_SIZE != 0 {
        return Err(KernelError::NoHighMap);
    }
    let pmd = pude & PTE_ADDR_MASK;
    for i in 0..size / SIZE_2M {
        let page = gpa + i * SIZE_2M;
        let slot = pmd + (((va + i * SIZE_2M) >> 21) & 0x1ff) * 8;
        let want = page | PTE_PRESENT | PTE_WRITABLE | PTE_ACCESSED | PTE_DIRTY | PTE_PAGE_SIZE;
        let cur = rd(slot)?;
        if cur == want {
            continue;
        }
        if cur & PTE_PRESENT != 0 {
            return Err(KernelError::HighMapInUse {
                va: va + i * SIZE_2M,
                entry: cur,
            });
        }
        mem.write_obj(want, GuestAddress(slot))
            .map_err(|_| KernelError::Walk(super::WalkError::Memory { gpa: slot }))?;
    }
    Ok(va)
}

/// `linux_banner`'s bytes in the vmlinux file itself.
fn banner_from_vmlinux(vmlinux: &Vmlinux, symbols: &SymbolTable) -> Result<Vec<u8>, KernelError> {
    use object::{Object, ObjectSection};
    let path = vmlinux.path();
    let elf = object::File::parse(vmlinux.bytes()).map_err(|source| SymbolError::Parse {
        path: path.into(),
        source,
    })?;
    let s = symbols
        .get("linux_banner")
        .ok_or_else(|| KernelError::NoSymbol("linux_banner".into()))?;
    for sec in elf.sections() {
        let (start, size) = (sec.address(), sec.size());
        if s.addr >= start && s.addr + s.size <= start + size {
            let bytes = sec.data().map_err(|source| SymbolError::Parse {
                path: path.into(),
                source,
            })?;
            let off = (s.addr - start) as usize;
            return Ok(bytes[off..off + s.size as usize].to_vec());
        }
    }
    Err(KernelError::NoSymbol("linux_banner (no section holds it)".into()))
}
