//! Builds the VM from a [`VmConfig`] and runs it until the guest stops.

use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use log::{error, info, warn};
use thiserror::Error;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64::{cpuid, mptable, paging, params, regs};
use crate::config::{ConfigError, VmConfig};
use crate::console;
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{ConsoleOut, EventFdTrigger, SerialPort};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::muxer::{ListenerSlot, PortListener};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::Interrupt;
use crate::devices::{Bus, BusError};
use crate::events::{ExitReason, VmEvent};
use crate::introspect::shutdown::ShutdownProbe;
use crate::introspect::Vmlinux;
use crate::layout::{
    PatchRegion, CMDLINE_START, DEVICE_MMIO_START, SERIAL_IRQ, SERIAL_PORT, VSOCK_IRQ, VSOCK_MMIO_SIZE,
};
use crate::loader;
use crate::memory::{self, GuestMem};
use crate::pause::{PauseControl, PauseError, Paused};
use crate::symbols::SymbolTable;
use crate::vcpu::{self, Vcpu, VcpuShared};

/// Where the TSS and identity-map pages KVM needs on Intel go (just below the BIOS area).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Why the VM could not be built or started.
#[derive(Debug, Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    /// KVM lacks a capability lucos-vmm needs (irqchip, PIT, irqfd, immediate exit, ...).
    #[error("KVM lacks a required capability: {0:?}")]
    MissingCap(Cap),
    /// A KVM ioctl failed while building the VM.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl or step that failed.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created or registered.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    /// The boot parameters (zero page, e820 map) could not be built or written.
    #[error(transparent)]
    Params(#[from] params::ParamsError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Setting up a vCPU's registers failed.
    #[error("vCPU {cpu} setup: {source}")]
    Regs {
        /// The vCPU.
        cpu: u8,
        /// What failed.
        source: regs::RegsError,
    },
    /// The boot page tables could not be written to guest memory.
    #[error("writing boot page tables: {0}")]
    PageTables(vm_memory::GuestMemoryError),
    /// An eventfd for a device interrupt could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// A vCPU thread could not be spawned.
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    /// The signal handler that kicks vCPUs out of KVM_RUN could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// A device could not be put on its bus (overlapping or empty range).
    #[error("device setup: {0}")]
    Bus(#[from] BusError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Host-side options that do not change the guest.
#[derive(Default)]
pub struct RunOptions {
    /// Forward stdin to the serial console.
    pub stdin: bool,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// Sample vCPU locations this often and print a profile at exit.
    pub profile: Option<Duration>,
    /// Callers recorded per profile sample.
    pub profile_depth: usize,
}

/// A built, not yet running VM.
pub struct Vm {
    _kvm: Kvm,
    _vm: Arc<VmFd>,
    vcpus: Vec<Vcpu>,
    shared: Arc<VcpuShared>,
    serial: Arc<Mutex<SerialPort>>,
    events: Receiver<VmEvent>,
}

/// What [`load_guest`] put into guest memory.
struct LoadedGuest {
    /// The kernel's 64-bit entry point.
    entry: u64,
    /// The boot page tables' root.
    cr3: u64,
}

/// The devices [`attach_devices`] put on the buses.
struct Devices {
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialPort>>,
    vsock_listener: Option<ListenerSlot>,
}

/// Opens KVM, checks the capabilities lucos-vmm needs and creates the VM with its
/// in-kernel irqchip and PIT.
fn create_vm() -> Result<(Kvm, VmFd), VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    for cap in [
        Cap::Irqchip,
        Cap::UserMemory,
        Cap::SetTssAddr,
        Cap::Pit2,
        Cap::Irqfd,
        Cap::ImmediateExit,
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(cap));
        }
    }
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok((kvm, vm))
}

/// Writes everything the guest reads at boot: kernel, initrd, command line, boot_params
/// with the e820 map (the patch region reserved), boot page tables, MP table.
fn load_guest(
    mem: &GuestMem,
    config: &VmConfig,
    vmlinux: &Vmlinux,
    region: PatchRegion,
) -> Result<LoadedGuest, VmError> {
    let kernel = loader::load_kernel(mem, vmlinux)?;
    let initrd = match &config.initrd {
        Some(p) => {
            let (addr, size) = loader::load_initrd(mem, p, kernel.end, region.gpa)?;
            Some(params::InitrdLocation { addr, size })
        }
        None => None,
    };
    let cmdline = config.kernel_cmdline();
    let cmdline_len = loader::load_cmdline(mem, &cmdline)?;
    let e820 = params::e820_map(config.mem_bytes, &[(region.gpa, crate::layout::PATCH_REGION_SIZE)]);
    let bp = params::build_boot_params(&e820, CMDLINE_START, cmdline_len, initrd)?;
    params::write_boot_params(mem, &bp)?;
    let cr3 = paging::write_boot_page_tables(mem).map_err(VmError::PageTables)?;
    mptable::write(mem, config.vcpus)?;
    info!(
        "kernel entry {:#x}, end {:#x}; initrd {:?}; cmdline '{}'",
        kernel.entry, kernel.end, initrd, cmdline
    );
    Ok(LoadedGuest {
        entry: kernel.entry,
        cr3,
    })
}

/// Creates the devices, wires their interrupts and puts them on the port and MMIO buses.
fn attach_devices(
    vm: &VmFd,
    mem: &GuestMem,
    config: &VmConfig,
    events: &Sender<VmEvent>,
    console_out: Box<dyn Write + Send>,
) -> Result<Devices, VmError> {
    let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&serial_evt, SERIAL_IRQ)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let serial = Arc::new(Mutex::new(SerialPort(Serial::new(
        EventFdTrigger(serial_evt),
        ConsoleOut::new(console_out, events.clone()),
    ))));
    let mut pio = Bus::pio();
    pio.insert(SERIAL_PORT, 8, serial.clone())?;
    pio.insert(I8042_BASE, I8042_LEN, Arc::new(Mutex::new(I8042::new(events.clone()))))?;

    let mut mmio = Bus::mmio();
    let vsock_listener = match config.vsock_cid {
        Some(cid) => {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
            vm.register_irqfd(&evt, VSOCK_IRQ)
                .map_err(kvm_err("KVM_IRQFD (vsock)"))?;
            let slot: ListenerSlot = Default::default();
            let dev = Vsock::new(cid, slot.clone());
            let transport = MmioTransport::new(Box::new(dev), mem.clone(), Arc::new(Interrupt::new(evt)));
            mmio.insert(DEVICE_MMIO_START, VSOCK_MMIO_SIZE, Arc::new(Mutex::new(transport)))?;
            info!("virtio-vsock: guest cid {cid} at {DEVICE_MMIO_START:#x}, irq {VSOCK_IRQ}");
            Some(slot)
        }
        None => None,
    };
    Ok(Devices {
        pio,
        mmio,
        serial,
        vsock_listener,
    })
}

/// The PVM workarounds when the CPU policy asks for them (with the syscall shim, built from
/// the kernel's symbols), none otherwise.
fn host_quirks(config: &VmConfig, symbols: Option<&SymbolTable>, region: PatchRegion) -> crate::quirks::Quirks {
    if !config.cpu.pvm_quirks {
        return Default::default();
    }
    let shim = match symbols.map(|t| crate::pvm::SyscallShim::new(t, region.gpa)) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            warn!("PVM host: {e}; guest userspace will not run");
            None
        }
        None => {
            warn!("PVM host: no kernel symbols for the syscall shim; guest userspace will not run");
            None
        }
    };
    info!("host KVM is PVM in native mode: software-KVM workarounds on");
    crate::quirks::Quirks::for_pvm(shim)
}

/// Creates the vCPUs with their CPUID (per the host's CPU policy) and boot registers.
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    config: &VmConfig,
    guest: &LoadedGuest,
    shared: &Arc<VcpuShared>,
) -> Result<Vec<Vcpu>, VmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let fd = vm.create_vcpu(id as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut entries = supported.as_slice().to_vec();
        cpuid::filter(&mut entries, id, config.vcpus, config.cpu.hide_emulator_gaps);
        if config.cpu.hide_pv_hypercalls {
            cpuid::hide_pv_hypercalls(&mut entries);
        }
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VmError::Kvm {
            what: "building CPUID",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        regs::setup_vcpu(&fd, &shared.mem, guest.entry, guest.cr3, id == 0)
            .map_err(|source| VmError::Regs { cpu: id, source })?;
        vcpus.push(Vcpu::new(id, fd, shared.clone()));
    }
    Ok(vcpus)
}

impl Vm {
    /// Creates the VM, loads the guest and prepares every vCPU; nothing runs yet.
    pub fn build(config: &VmConfig, vmlinux: &Vmlinux, console_out: Box<dyn Write + Send>) -> Result<Self, VmError> {
        config.validate()?;
        let t0 = Instant::now();
        let (kvm, vm) = create_vm()?;
        let mem = memory::create_guest_memory(config.mem_bytes)?;
        memory::register_memslots(&vm, &mem)?;
        let region = PatchRegion::for_memory(config.mem_bytes);
        let guest = load_guest(&mem, config, vmlinux, region)?;
        let symbols = match SymbolTable::from_vmlinux(vmlinux) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                warn!("no kernel symbols for fault reports: {e}");
                None
            }
        };
        let (events_tx, events) = channel();
        let devices = attach_devices(&vm, &mem, config, &events_tx, console_out)?;
        let quirks = host_quirks(config, symbols.as_deref(), region);
        let vm = Arc::new(vm);
        let protect = crate::protect::WriteProtect::new(crate::protect::MemSlots::new(vm.clone(), &mem));
        let shared = Arc::new(VcpuShared {
            mem,
            pio: devices.pio,
            mmio: devices.mmio,
            vsock_listener: devices.vsock_listener,
            events: events_tx,
            stop: std::sync::atomic::AtomicBool::new(false),
            symbols,
            pause: PauseControl::new(config.vcpus as usize),
            quirks,
            protect,
            sync_regs: crate::protect::sync_regs_supported(&vm),
            calls: vcpu::CallMailbox::new(config.vcpus as usize),
            patch_region: region,
        });
        let vcpus = create_vcpus(&kvm, &vm, config, &guest, &shared)?;
        info!("VM built in {:?}", t0.elapsed());
        Ok(Vm {
            _kvm: kvm,
            _vm: vm,
            vcpus,
            shared,
            serial: devices.serial,
            events,
        })
    }

    /// Runs the guest until it stops; returns why.
    pub fn run(self, opts: RunOptions) -> Result<ExitReason, VmError> {
        vcpu::register_kick_handler().map_err(VmError::Signal)?;
        let _raw = opts.stdin.then(console::RawModeGuard::new);
        if opts.stdin {
            console::spawn_stdin_forwarder(self.serial.clone(), self.shared.events.clone(), true);
            console::spawn_rx_watchdog(&self.serial);
        }
        let mut handles: Vec<JoinHandle<()>> = Vec::new();
        for v in self.vcpus {
            match v.spawn() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop_vcpus(&self.shared, &handles);
                    join_all(&self.shared, handles);
                    return Err(VmError::Thread(e));
                }
            }
        }
        self.shared
            .pause
            .set_threads(handles.iter().map(|h| h.as_pthread_t() as libc::pthread_t).collect());
        let profiler = opts.profile.map(|p| {
            crate::profile::Profiler::start(
                VmHandle {
                    shared: self.shared.clone(),
                },
                p,
                opts.profile_depth,
            )
        });
        let kernel = ShutdownProbe::new(self.shared.mem.clone(), self.shared.symbols.as_deref());
        let reason = crate::events::wait_for_exit(&self.events, opts.timeout, &kernel);
        if let Some(p) = profiler {
            eprintln!("\r\n{}", p.finish(30));
        }
        stop_vcpus(&self.shared, &handles);
        join_all(&self.shared, handles);
        Ok(reason)
    }
}

/// The kernel command line words that announce the vsock device to virtio_mmio
/// (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES): `<size>@<base>:<irq>`.
pub fn vsock_cmdline() -> String {
    format!(
        "virtio_mmio.device={}K@{DEVICE_MMIO_START:#x}:{VSOCK_IRQ}",
        VSOCK_MMIO_SIZE >> 10
    )
}

fn stop_vcpus(shared: &VcpuShared, handles: &[JoinHandle<()>]) {
    shared.stop.store(true, Ordering::Release);
    shared.pause.wake_all();
    for h in handles {
        if let Err(e) = h.kill(vcpu::kick_signal()) {
            warn!("kicking a vCPU thread failed: {e}");
        }
    }
}

/// How long the vCPU threads get to leave once the VM stops.
const VCPU_EXIT_WAIT: Duration = Duration::from_secs(10);

/// Joins the vCPU threads, kicking the ones still running again every 50 ms (a kick that
/// lands while a thread is busy outside KVM_RUN leaves `immediate_exit` set, but a thread
/// may be in a wait of its own). A thread that has not left after [`VCPU_EXIT_WAIT`] is
/// reported and left behind, so the VMM still exits.
fn join_all(shared: &VcpuShared, handles: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + VCPU_EXIT_WAIT;
    while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        shared.pause.wake_all();
        for h in handles.iter().filter(|h| !h.is_finished()) {
            let _ = h.kill(vcpu::kick_signal());
        }
    }
    for h in handles {
        if h.is_finished() {
            let _ = h.join();
        } else {
            error!(
                "vCPU thread {} did not stop within {VCPU_EXIT_WAIT:?}; exiting without it",
                h.thread().name().unwrap_or("?")
            );
        }
    }
}

/// A handle on a running VM for code outside the vCPU threads (the update server):
/// guest memory, kernel symbols, and stopping the world.
#[derive(Clone)]
pub struct VmHandle {
    shared: Arc<VcpuShared>,
}

impl VmHandle {
    /// Guest physical memory.
    pub fn memory(&self) -> &GuestMem {
        &self.shared.mem
    }

    /// The guest kernel's symbols, if the vmlinux had a symbol table.
    pub fn symbols(&self) -> Option<&SymbolTable> {
        self.shared.symbols.as_deref()
    }

    /// The guest kernel's symbols, shared, if the vmlinux had a symbol table.
    pub fn symbols_arc(&self) -> Option<Arc<SymbolTable>> {
        self.shared.symbols.clone()
    }

    /// Where the VM's patch region lies.
    pub fn patch_region(&self) -> crate::layout::PatchRegion {
        self.shared.patch_region
    }

    /// Write-protects guest-physical `[gpa, gpa+len)` (whole pages) for `owner`: every
    /// guest write to it then goes through `handler`. The memslots change, so every vCPU
    /// must be paused (the update server calls this inside its stop-the-world).
    pub fn write_protect(
        &self,
        gpa: u64,
        len: u64,
        owner: &str,
        handler: crate::protect::WriteHandler,
    ) -> Result<(), crate::protect::ProtectError> {
        let r = self.shared.protect.protect(gpa, len, owner, handler).map(|_| ());
        self.stop_on_hole(r)
    }

    /// Stops the VM (as a crash) if a memslot change left guest RAM with a hole.
    fn stop_on_hole(&self, r: Result<(), crate::protect::ProtectError>) -> Result<(), crate::protect::ProtectError> {
        if let Some(e) = r.as_ref().err().filter(|e| e.is_fatal()) {
            let _ = self
                .shared
                .events
                .send(crate::events::VmEvent::Crash(format!("write protection: {e}")));
        }
        r
    }

    /// Drops the write protection of `owner`; every vCPU must be paused.
    pub fn write_unprotect(&self, owner: &str) -> Result<(), crate::protect::ProtectError> {
        let r = self.shared.protect.unprotect(owner);
        self.stop_on_hole(r)
    }

    /// Bytes of guest RAM in read-only memslots right now.
    pub fn readonly_bytes(&self) -> u64 {
        self.shared.protect.readonly_slots().iter().map(|s| s.size).sum()
    }

    /// Serves guest vsock connections to host ports with `listener` (replacing any earlier
    /// one). Returns false when the VM has no vsock device.
    pub fn set_vsock_listener(&self, listener: Arc<dyn PortListener>) -> bool {
        match &self.shared.vsock_listener {
            Some(slot) => {
                *slot.write().unwrap_or_else(|e| e.into_inner()) = Some(listener);
                true
            }
            None => false,
        }
    }

    /// Posts a guest call for vCPU `id`; it runs when that vCPU next leaves its park (post
    /// while the vCPUs are paused, then resume them). False if one is pending already.
    pub fn post_call(&self, id: u8, job: vcpu::CallJob) -> bool {
        self.shared.calls.post(id, job)
    }

    /// Kicks vCPU `id` out of KVM_RUN (e.g. to stop a guest call that ran too long).
    pub fn kick(&self, id: u8) {
        self.shared.pause.kick(id, vcpu::kick_thread);
    }

    /// Parks every vCPU outside KVM_RUN; they resume when the guard drops.
    pub fn pause(&self, timeout: Duration) -> Result<Paused<'_>, PauseError> {
        self.shared.pause.pause(timeout, &self.shared.stop, vcpu::kick_thread)
    }
}

impl Vm {
    /// A handle usable while (and after) the VM runs.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            shared: self.shared.clone(),
        }
    }
}
