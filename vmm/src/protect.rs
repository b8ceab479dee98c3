//! Write protection of guest-physical pages through KVM memslots (the EPT/NPT, or PVM's
//! shadow page tables): the pages of a protected range live in a read-only memslot
//! (`KVM_MEM_READONLY`), so guest reads run at full speed while every guest write exits as
//! KVM_EXIT_MMIO. The VMM then runs the write's handler (a data patch's state transfer),
//! performs the write into guest RAM and resumes the vCPU, which has already retired the
//! instruction.
//!
//! Atomicity: KVM emulates a locked read-modify-write on such a page as a read, then an
//! exit with the result, while the other vCPUs run. Since guest writes to protected pages
//! all exit, their contents change only when the VMM stores; [`WriteProtect::on_write`]
//! stores under one lock and redoes locked read-modify-writes (`lock add`, `xchg`,
//! `cmpxchg`, ...) on the value read under it ([`crate::rmw`]), fixing the registers and
//! flags KVM computed from its stale read. Every trapped write is thus one atomic step
//! between the stores of all vCPUs, and the lock (a full barrier) orders it.
//!
//! - [`layout`] splits the RAM regions into read-write and read-only slots (pure).
//! - [`MemSlots`] applies a layout to KVM, all or nothing: on a failure it puts the previous
//!   layout back, and reports [`ProtectError::Hole`] (fatal for the VM) if even that fails.
//!   Changing slots under a running vCPU would let it see a hole, so callers pause every
//!   vCPU first (the update server does it in its stop-the-world).
//! - [`WriteProtect`] is what the vCPU threads consult on an MMIO write: the protected
//!   ranges, their owners and fault counts.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{VcpuFd, VmFd};
use log::{debug, error, warn};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::PAGE_SIZE;
use crate::introspect::pagewalk;
use crate::memory::GuestMem;
use crate::rmw::{self, Access};

/// Why a range cannot be write-protected or unprotected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtectError {
    /// The range has length 0, or its end overflows the address space.
    #[error("range {start:#x}+{len:#x} is empty")]
    Empty {
        /// Guest-physical start asked for.
        start: u64,
        /// Length asked for, in bytes.
        len: u64,
    },
    /// The page-rounded range is not inside a single guest RAM region.
    #[error(
        "range {start:#x}..{end:#x} is not inside one guest RAM region (it is outside RAM or spans a memslot boundary)"
    )]
    NotInOneRegion {
        /// Guest-physical start (page aligned).
        start: u64,
        /// Guest-physical end, exclusive (page aligned).
        end: u64,
    },
    /// The range overlaps one already protected (by any owner).
    #[error(
        "range {start:#x}..{end:#x} overlaps range {other_start:#x}..{other_end:#x}, already protected for {owner}"
    )]
    Overlap {
        /// Guest-physical start of the new range (page aligned).
        start: u64,
        /// Its end, exclusive.
        end: u64,
        /// Start of the range already protected.
        other_start: u64,
        /// Its end, exclusive.
        other_end: u64,
        /// Owner of that range.
        owner: String,
    },
    /// `unprotect` was asked for an owner that has no protected range.
    #[error("no protected range belongs to {0}")]
    UnknownOwner(String),
    /// KVM refused a memslot change.
    #[error("KVM_SET_USER_MEMORY_REGION slot {slot} ({gpa:#x}+{size:#x}, readonly={readonly}) failed: errno {errno}")]
    SetRegion {
        /// Memslot number.
        slot: u32,
        /// Guest-physical start of the slot.
        gpa: u64,
        /// Slot size in bytes (0: the slot was being deleted).
        size: u64,
        /// Whether the slot was read-only.
        readonly: bool,
        /// errno from `KVM_SET_USER_MEMORY_REGION`.
        errno: i32,
    },
    /// Read-only ranges were asked for but KVM lacks `KVM_CAP_READONLY_MEM`.
    #[error("this KVM has no read-only memslots (KVM_CAP_READONLY_MEM)")]
    NoReadonlyMem,
    /// A memslot change failed and putting the previous layout back failed too: part of
    /// guest RAM may be missing or unprotected. The VM cannot go on safely.
    #[error("memslot change failed ({cause}) and restoring the previous layout failed too ({restore}): guest RAM may have a hole")]
    Hole {
        /// The failure that started the rollback.
        cause: Box<ProtectError>,
        /// The first failure of the rollback.
        restore: Box<ProtectError>,
    },
}

impl ProtectError {
    /// Whether the VM must stop (its memory layout is no longer known to be whole).
    pub fn is_fatal(&self) -> bool {
        matches!(self, ProtectError::Hole { .. })
    }
}

/// A guest RAM region: guest-physical start, size, host address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address the region's first byte is mapped at.
    pub host: u64,
}

/// One KVM memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Guest-physical start (page aligned).
    pub gpa: u64,
    /// Size in bytes (a multiple of the page size; 0 deletes the slot).
    pub size: u64,
    /// Host virtual address backing `gpa`.
    pub host: u64,
    /// `KVM_MEM_READONLY`: guest writes exit as MMIO.
    pub readonly: bool,
}

/// The RAM regions of `mem`.
pub fn ram_regions(mem: &GuestMem) -> Vec<RamRegion> {
    mem.iter()
        .map(|r| RamRegion {
            gpa: r.start_addr().0,
            size: r.len(),
            host: r.as_ptr() as u64,
        })
        .collect()
}

/// Page-aligned `[start, end)` covering `[start, start+len)`.
pub fn page_span(start: u64, len: u64) -> Result<(u64, u64), ProtectError> {
    if len == 0 {
        return Err(ProtectError::Empty { start, len });
    }
    let end = start
        .checked_add(len)
        .and_then(|e| e.checked_add(PAGE_SIZE - 1))
        .ok_or(ProtectError::Empty { start, len })?;
    Ok((start & !(PAGE_SIZE - 1), end & !(PAGE_SIZE - 1)))
}

/// Splits `ram` into slots: each `[start, end)` of `readonly` (page aligned, disjoint, each
/// inside one region) becomes a read-only slot, the rest stays read-write.
pub fn layout(ram: &[RamRegion], readonly: &[(u64, u64)]) -> Vec<Slot> {
    let mut ro: Vec<(u64, u64)> = readonly.to_vec();
    ro.sort_unstable();
    let mut out = Vec::new();
    for r in ram {
        let end = r.gpa + r.size;
        let mut cur = r.gpa;
        let slot = |gpa: u64, e: u64, readonly: bool| Slot {
            gpa,
            size: e - gpa,
            host: r.host + (gpa - r.gpa),
            readonly,
        };
        for &(s, e) in ro.iter().filter(|&&(s, e)| s >= r.gpa && e <= end) {
            if s > cur {
                out.push(slot(cur, s, false));
            }
            out.push(slot(s, e, true));
            cur = e;
        }
        if cur < end {
            out.push(slot(cur, end, false));
        }
    }
    out
}

/// The memslot ioctl, behind a trait so tests can make it fail.
pub trait SlotIoctl: Send + Sync {
    /// Whether KVM has read-only memslots (`KVM_CAP_READONLY_MEM`).
    fn readonly_supported(&self) -> bool;
    /// `KVM_SET_USER_MEMORY_REGION` for slot `id` (size 0 deletes it); the errno on failure.
    fn set_slot(&self, id: u32, s: &Slot) -> Result<(), i32>;
}

impl SlotIoctl for VmFd {
    fn readonly_supported(&self) -> bool {
        self.check_extension(kvm_ioctls::Cap::ReadonlyMem)
    }

    /// Slots map sub-ranges of the RAM regions (host addresses from `ram_regions`) and
    /// never overlap (`layout` partitions the regions).
    fn set_slot(&self, id: u32, s: &Slot) -> Result<(), i32> {
        crate::memory::set_memslot(self, id, s.gpa, s.size, s.host, s.readonly).map_err(|e| e.errno())
    }
}

/// The VM's memslots.
pub struct MemSlots {
    vm: Arc<dyn SlotIoctl>,
    ram: Vec<RamRegion>,
    /// Slot id -> what KVM holds in it (None: empty).
    current: Mutex<Vec<Option<Slot>>>,
}

impl MemSlots {
    /// Takes over the slots [`crate::memory::register_memslots`] made (one per region).
    pub fn new(vm: Arc<VmFd>, mem: &GuestMem) -> Self {
        Self::with_ioctl(vm, ram_regions(mem))
    }

    /// Slots over `ram` through `vm`, assumed to hold one slot per region (ids in order).
    pub fn with_ioctl(vm: Arc<dyn SlotIoctl>, ram: Vec<RamRegion>) -> Self {
        let current = layout(&ram, &[]).into_iter().map(Some).collect();
        Self {
            vm,
            ram,
            current: Mutex::new(current),
        }
    }

    /// The guest RAM regions the slots are cut from.
    pub fn ram(&self) -> &[RamRegion] {
        &self.ram
    }

    /// The region that holds all of `[start, end)`.
    pub fn region_of(&self, start: u64, end: u64) -> Result<RamRegion, ProtectError> {
        self.ram
            .iter()
            .copied()
            .find(|r| start >= r.gpa && end <= r.gpa + r.size)
            .ok_or(ProtectError::NotInOneRegion { start, end })
    }

    /// Re-lays the slots out so exactly `readonly` is read-only. Every vCPU must be paused
    /// (outside KVM_RUN) while this runs.
    ///
    /// All or nothing: if KVM refuses a step, the previous layout is put back exactly and
    /// the refusal returned; if that fails too, [`ProtectError::Hole`] is returned (the
    /// caller must stop the VM).
    pub fn set_readonly(&self, readonly: &[(u64, u64)]) -> Result<(), ProtectError> {
        if !readonly.is_empty() && !self.vm.readonly_supported() {
            return Err(ProtectError::NoReadonlyMem);
        }
        let want: Vec<Option<Slot>> = layout(&self.ram, readonly).into_iter().map(Some).collect();
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if *cur == want {
            return Ok(());
        }
        let before = cur.clone();
        match self.switch(&mut cur, &want) {
            Ok(()) => {
                debug!("memslots: {want:x?}");
                Ok(())
            }
            Err(cause) => match self.switch(&mut cur, &before) {
                Ok(()) => {
                    warn!("memslot change failed, previous layout restored: {cause}");
                    Err(cause)
                }
                Err(restore) => {
                    let e = ProtectError::Hole {
                        cause: Box::new(cause),
                        restore: Box::new(restore),
                    };
                    error!("{e}; memslots now {cur:x?}");
                    Err(e)
                }
            },
        }
    }

    /// Moves KVM from `cur` to `want`, keeping `cur` equal to what KVM holds. A slot's size
    /// and flags cannot change in place: every slot that differs is deleted, then the new
    /// ones are added (slots that stay the same are left alone).
    fn switch(&self, cur: &mut Vec<Option<Slot>>, want: &[Option<Slot>]) -> Result<(), ProtectError> {
        for (id, slot) in cur.iter_mut().enumerate() {
            if let Some(s) = *slot {
                if want.get(id) != Some(&Some(s)) {
                    self.set(id as u32, &Slot { size: 0, ..s })?;
                    *slot = None;
                }
            }
        }
        if cur.len() < want.len() {
            cur.resize(want.len(), None);
        }
        for (id, w) in want.iter().enumerate() {
            if let (Some(s), None) = (w, cur[id]) {
                self.set(id as u32, s)?;
                cur[id] = Some(*s);
            }
        }
        while cur.last() == Some(&None) {
            cur.pop();
        }
        Ok(())
    }

    /// The current slots.
    pub fn slots(&self) -> Vec<Slot> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .copied()
            .collect()
    }

    fn set(&self, id: u32, s: &Slot) -> Result<(), ProtectError> {
        self.vm.set_slot(id, s).map_err(|errno| ProtectError::SetRegion {
            slot: id,
            gpa: s.gpa,
            size: s.size,
            readonly: s.readonly,
            errno,
        })
    }
}

/// A guest write to a protected page, as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFault {
    /// Guest-physical address written.
    pub gpa: u64,
    /// The bytes the guest wrote (1 to 8, as KVM reports the access).
    pub data: Vec<u8>,
    /// The vCPU that wrote.
    pub vcpu: u8,
    /// The writer's RIP (the instruction after the write, as KVM reports it on exit).
    pub rip: u64,
}

/// Decides what a trapped write stores: returns the bytes to write at `gpa` (the guest's
/// own data for a plain pass-through, transformed data for a state transfer).
pub type WriteHandler = Arc<dyn Fn(&WriteFault) -> Vec<u8> + Send + Sync>;

struct Range {
    start: u64,
    end: u64,
    owner: String,
    faults: Arc<AtomicU64>,
    handler: WriteHandler,
}

/// The protected ranges and what to do on a write to them.
pub struct WriteProtect {
    slots: MemSlots,
    active: AtomicBool,
    ranges: Mutex<Vec<Range>>,
    /// Held while a trapped write reads the current value and stores: every store to a
    /// protected page happens under it, so each trapped write is atomic.
    stores: Mutex<()>,
    /// Trapped writes whose instruction was not identified, or could not be redone.
    unidentified: AtomicU64,
    /// Finds the instruction behind a trapped write, remembering what it found.
    identifier: Mutex<rmw::Identifier>,
}

/// Counts a write that could not be redone and logs `what`, rate-limited (the guest can
/// cause these at will).
fn warn_sometimes(count: &AtomicU64, what: impl FnOnce() -> String) {
    let n = count.fetch_add(1, Ordering::Relaxed) + 1;
    crate::warn_limited!("{} ({n} so far)", what());
}

impl WriteProtect {
    /// Protection over `slots`, with nothing protected yet.
    pub fn new(slots: MemSlots) -> Self {
        Self {
            slots,
            active: AtomicBool::new(false),
            ranges: Mutex::new(Vec::new()),
            stores: Mutex::new(()),
            unidentified: AtomicU64::new(0),
            identifier: Mutex::new(rmw::Identifier::new()),
        }
    }

    /// Protects `[gpa, gpa+len)` (whole pages) for `owner`; returns the fault counter.
    /// All vCPUs must be paused.
    pub fn protect(
        &self,
        gpa: u64,
        len: u64,
        owner: &str,
        handler: WriteHandler,
    ) -> Result<Arc<AtomicU64>, ProtectError> {
        let (start, end) = page_span(gpa, len)?;
        self.slots.region_of(start, end)?;
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = ranges.iter().find(|r| start < r.end && r.start < end) {
            return Err(ProtectError::Overlap {
                start,
                end,
                other_start: o.start,
                other_end: o.end,
                owner: o.owner.clone(),
            });
        }
        let mut ro: Vec<(u64, u64)> = ranges.iter().map(|r| (r.start, r.end)).collect();
        ro.push((start, end));
        self.slots.set_readonly(&ro)?;
        let faults = Arc::new(AtomicU64::new(0));
        ranges.push(Range {
            start,
            end,
            owner: owner.into(),
            faults: faults.clone(),
            handler,
        });
        self.active.store(true, Ordering::Release);
        Ok(faults)
    }

    /// Drops every range of `owner`. All vCPUs must be paused.
    pub fn unprotect(&self, owner: &str) -> Result<(), ProtectError> {
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        if !ranges.iter().any(|r| r.owner == owner) {
            return Err(ProtectError::UnknownOwner(owner.into()));
        }
        let ro: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|r| r.owner != owner)
            .map(|r| (r.start, r.end))
            .collect();
        self.slots.set_readonly(&ro)?;
        ranges.retain(|r| r.owner != owner);
        self.active.store(!ranges.is_empty(), Ordering::Release);
        Ok(())
    }

    /// Read-only slots now in KVM.
    pub fn readonly_slots(&self) -> Vec<Slot> {
        self.slots.slots().into_iter().filter(|s| s.readonly).collect()
    }

    /// Whether any page is protected now.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Whether `gpa` is in a protected range (cheap when nothing is protected).
    pub fn covers(&self, gpa: u64) -> bool {
        self.active.load(Ordering::Acquire)
            && self
                .ranges
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|r| gpa >= r.start && gpa < r.end)
    }

    /// Called by a vCPU thread on KVM_EXIT_MMIO (write), before the vCPU runs or parks
    /// again. Returns false if `gpa` is not protected (a real MMIO write). Otherwise
    /// identifies the writing instruction, redoes it on the current value under the store
    /// lock if it is a read-modify-write (fixing `cpu`'s registers and flags), runs the
    /// handler on what is to be stored, stores its result and counts the fault.
    ///
    /// With `synced`, the registers are read from `cpu`'s kvm_run (KVM copied them there at
    /// the exit: [`request_sync_regs`]) instead of with KVM_GET_REGS and KVM_GET_SREGS;
    /// registers to fix are written back with KVM_SET_REGS.
    pub fn on_write(&self, mem: &GuestMem, cpu: &VcpuFd, synced: bool, vcpu: u8, gpa: u64, data: &[u8]) -> bool {
        if !self.active.load(Ordering::Acquire) {
            return false;
        }
        let (handler, faults) = {
            let ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
            match ranges.iter().find(|r| gpa >= r.start && gpa < r.end) {
                Some(r) => (r.handler.clone(), r.faults.clone()),
                None => return false,
            }
        };
        let size = data.len();
        let state = if synced {
            let s = cpu.sync_regs();
            Some((s.regs, rmw::Cpu::from_kvm(&s.regs, &s.sregs), s.sregs.cr3))
        } else {
            match (cpu.get_regs(), cpu.get_sregs()) {
                (Ok(r), Ok(s)) => Some((r, rmw::Cpu::from_kvm(&r, &s), s.cr3)),
                _ => None,
            }
        };
        let (mut regs, mut st, access) = match state {
            Some((r, st, cr3)) if matches!(size, 1 | 2 | 4 | 8) => {
                let access = match self.identify(mem, &st, cr3, gpa, size) {
                    Some(insn) => rmw::classify(&insn, &st),
                    None => {
                        warn_sometimes(&self.unidentified, || {
                            format!(
                                "vcpu{vcpu}: no instruction before RIP {:#x} writes {gpa:#x}: stored as written",
                                st.rip
                            )
                        });
                        Access::Store
                    }
                };
                (r, st, access)
            }
            other => {
                warn_sometimes(&self.unidentified, || {
                    format!("vcpu{vcpu}: {size}-byte write at {gpa:#x} (or its registers) cannot be redone: stored as written")
                });
                // The handler still gets the writer's RIP where it is known.
                let (r, st) = other.map(|(r, st, _)| (r, st)).unwrap_or_default();
                (r, st, Access::Store)
            }
        };
        if let Access::Unsupported(m) = access {
            warn_sometimes(&self.unidentified, || {
                format!(
                    "vcpu{vcpu}: {m:?} at RIP {:#x} on protected {gpa:#x} cannot be redone atomically",
                    st.rip
                )
            });
        }
        let as_kvm_left_it = st;
        let mut kvm = [0u8; 8];
        kvm[..size.min(8)].copy_from_slice(&data[..size.min(8)]);
        let redo = {
            let _stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
            let mut cur = [0u8; 8];
            let read = matches!(access, Access::Store | Access::Unsupported(_))
                || mem.read_slice(&mut cur[..size], GuestAddress(gpa)).is_ok();
            let access = if read { access } else { Access::Store };
            let redo = rmw::redo(
                access,
                size as u32,
                u64::from_le_bytes(cur),
                u64::from_le_bytes(kvm),
                &mut st,
            );
            let bytes = match (access, redo.store) {
                (Access::Store, _) | (Access::Unsupported(_), _) => Some(data.to_vec()),
                (_, Some(v)) => Some(v.to_le_bytes()[..size].to_vec()),
                (_, None) => None,
            };
            if let Some(bytes) = bytes {
                let fault = WriteFault {
                    gpa,
                    data: bytes,
                    vcpu,
                    rip: st.rip,
                };
                let out = handler(&fault);
                if mem.write_slice(&out, GuestAddress(gpa)).is_err() {
                    crate::warn_limited!("vcpu{vcpu}: completing a protected write at {gpa:#x} failed");
                }
            }
            // The instruction was locked: nothing of this vCPU's later may pass the store.
            fence(Ordering::SeqCst);
            redo
        };
        // Unchanged unless another vCPU stored between KVM's read and ours.
        if redo.regs_changed && st != as_kvm_left_it {
            st.store_into(&mut regs);
            if let Err(e) = cpu.set_regs(&regs) {
                error!("vcpu{vcpu}: KVM_SET_REGS after redoing a write at {gpa:#x} failed: {e}");
            }
        }
        faults.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The instruction before RIP that wrote `size` bytes at `gpa` (see [`rmw::identify`]),
    /// reading its bytes and translating its address through the page tables at `cr3`.
    fn identify(
        &self,
        mem: &GuestMem,
        st: &rmw::Cpu,
        cr3: u64,
        gpa: u64,
        size: usize,
    ) -> Option<iced_x86::Instruction> {
        let translate = |va: u64| pagewalk::translate(mem, cr3, va).ok().map(|t| t.gpa);
        let mut code = [0u8; rmw::MAX_INSN_LEN];
        let start = st.rip.wrapping_sub(code.len() as u64);
        // Read page by page, backwards from RIP: stop at the first unmapped page.
        let mut first = code.len();
        while first > 0 {
            let va = start.wrapping_add(first as u64 - 1);
            let page_lo = (va & !(PAGE_SIZE - 1)).max(start);
            let from = (page_lo - start) as usize;
            let Some(pa) = translate(page_lo) else { break };
            if mem.read_slice(&mut code[from..first], GuestAddress(pa)).is_err() {
                break;
            }
            first = from;
        }
        if first == code.len() {
            return None;
        }
        self.identifier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .identify(&code[first..], st, gpa, size, translate)
    }
}

/// Whether this KVM can copy the general and system registers into kvm_run at every exit
/// (`KVM_CAP_SYNC_REGS`), which saves a trapped write two ioctls.
pub fn sync_regs_supported(vm: &VmFd) -> bool {
    let want = (kvm_bindings::KVM_SYNC_X86_REGS | kvm_bindings::KVM_SYNC_X86_SREGS) as i32;
    vm.check_extension_int(kvm_ioctls::Cap::SyncRegs) & want == want
}

/// Asks KVM to copy (`on`) or not the general and system registers into `cpu`'s kvm_run at
/// each exit, for [`WriteProtect::on_write`] with `synced`. Only reading: the registers
/// are never marked dirty, so a later KVM_SET_REGS (a guest call) is not overridden.
pub fn request_sync_regs(cpu: &mut VcpuFd, on: bool) {
    use kvm_ioctls::SyncReg;
    for r in [SyncReg::Register, SyncReg::SystemRegister] {
        if on {
            cpu.set_sync_valid_reg(r);
        } else {
            cpu.clear_sync_valid_reg(r);
        }
    }
}

/// A handler that stores the guest's write unchanged.
pub fn pass_through() -> WriteHandler {
    Arc::new(|f: &WriteFault| f.data.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const R0: RamRegion = RamRegion {
        gpa: 0,
        size: 0x10_0000,
        host: 0x7f00_0000_0000,
    };
    const R1: RamRegion = RamRegion {
        gpa: 0x1_0000_0000,
        size: 0x10_0000,
        host: 0x7f10_0000_0000,
    };

    #[test]
    fn no_protection_is_one_slot_per_region() {
        let s = layout(&[R0, R1], &[]);
        assert_eq!(s.len(), 2);
        assert!(s.iter().all(|s| !s.readonly));
        assert_eq!((s[1].gpa, s[1].host), (R1.gpa, R1.host));
    }

    #[test]
    fn protected_pages_split_their_region() {
        let s = layout(
            &[R0, R1],
            &[(0x5000, 0x7000), (0x1000, 0x2000), (0x1_0000_0000, 0x1_0000_1000)],
        );
        let v: Vec<(u64, u64, bool)> = s.iter().map(|s| (s.gpa, s.size, s.readonly)).collect();
        assert_eq!(
            v,
            [
                (0, 0x1000, false),
                (0x1000, 0x1000, true),
                (0x2000, 0x3000, false),
                (0x5000, 0x2000, true),
                (0x7000, 0xf9000, false),
                (0x1_0000_0000, 0x1000, true),
                (0x1_0000_1000, 0xff000, false),
            ]
        );
        // Host addresses follow the guest-physical offsets.
        assert_eq!(s[3].host, R0.host + 0x5000);
        // The slots partition the regions exactly.
        assert_eq!(s.iter().map(|s| s.size).sum::<u64>(), R0.size + R1.size);
    }

    #[test]
    fn protection_at_region_edges() {
        let s = layout(&[R0], &[(0, 0x1000), (0xff000, 0x10_0000)]);
        let v: Vec<(u64, bool)> = s.iter().map(|s| (s.gpa, s.readonly)).collect();
        assert_eq!(v, [(0, true), (0x1000, false), (0xff000, true)]);
    }

    /// A memslot ioctl over a model of KVM's slots that fails the calls it is told to.
    #[derive(Default)]
    struct FakeKvm {
        slots: Mutex<Vec<Option<Slot>>>,
        calls: AtomicU64,
        /// Calls (counted from 1) that fail with EINVAL.
        fail: Mutex<Vec<u64>>,
    }

    impl FakeKvm {
        fn holding(ram: &[RamRegion]) -> Arc<Self> {
            let k = Self::default();
            *k.slots.lock().unwrap() = layout(ram, &[]).into_iter().map(Some).collect();
            Arc::new(k)
        }

        /// The slots KVM holds, sorted by address; panics if any overlap.
        fn layout(&self) -> Vec<Slot> {
            let mut v: Vec<Slot> = self.slots.lock().unwrap().iter().flatten().copied().collect();
            v.sort_by_key(|s| s.gpa);
            for w in v.windows(2) {
                assert!(w[0].gpa + w[0].size <= w[1].gpa, "overlapping slots {w:x?}");
            }
            v
        }
    }

    impl SlotIoctl for FakeKvm {
        fn readonly_supported(&self) -> bool {
            true
        }

        fn set_slot(&self, id: u32, s: &Slot) -> Result<(), i32> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if self.fail.lock().unwrap().contains(&n) {
                return Err(libc::EINVAL);
            }
            let mut slots = self.slots.lock().unwrap();
            let id = id as usize;
            if slots.len() <= id {
                slots.resize(id + 1, None);
            }
            slots[id] = (s.size != 0).then_some(*s);
            Ok(())
        }
    }

    fn slots_with(kvm: &Arc<FakeKvm>) -> MemSlots {
        MemSlots::with_ioctl(kvm.clone(), vec![R0, R1])
    }

    #[test]
    fn every_failing_step_restores_the_previous_layout() {
        let first = [(0x5000, 0x6000)];
        let second = [(0x5000, 0x6000), (0x1_0000_0000, 0x1_0000_1000), (0x1000, 0x2000)];
        // Count the calls of a clean change from `first` to `second`.
        let kvm = FakeKvm::holding(&[R0, R1]);
        let s = slots_with(&kvm);
        s.set_readonly(&first).unwrap();
        let before = kvm.layout();
        let base = kvm.calls.load(Ordering::SeqCst);
        s.set_readonly(&second).unwrap();
        let steps = kvm.calls.load(Ordering::SeqCst) - base;
        assert!(steps > 2);
        assert_eq!(kvm.layout(), layout(&[R0, R1], &second));
        for bad in 1..=steps {
            let kvm = FakeKvm::holding(&[R0, R1]);
            let s = slots_with(&kvm);
            s.set_readonly(&first).unwrap();
            let base = kvm.calls.load(Ordering::SeqCst);
            kvm.fail.lock().unwrap().push(base + bad);
            let e = s.set_readonly(&second).unwrap_err();
            assert!(
                matches!(
                    e,
                    ProtectError::SetRegion {
                        errno: libc::EINVAL,
                        ..
                    }
                ),
                "{e}"
            );
            // Exactly the previous layout (the first protection kept), not plain RAM.
            assert_eq!(kvm.layout(), before, "failing step {bad}");
            assert_eq!(s.slots().len(), before.len());
            // And the change works once KVM does.
            s.set_readonly(&second).unwrap();
            assert_eq!(kvm.layout(), layout(&[R0, R1], &second));
        }
    }

    #[test]
    fn a_failing_rollback_is_reported_as_a_hole() {
        let kvm = FakeKvm::holding(&[R0, R1]);
        let s = slots_with(&kvm);
        s.set_readonly(&[(0x5000, 0x6000)]).unwrap();
        let base = kvm.calls.load(Ordering::SeqCst);
        // The change's 3rd step fails, and so does the rollback's 1st.
        let steps: Vec<u64> = (base + 3..base + 40).collect();
        *kvm.fail.lock().unwrap() = steps;
        let e = s.set_readonly(&[(0x5000, 0x6000), (0x1000, 0x2000)]).unwrap_err();
        assert!(e.is_fatal(), "{e}");
        assert!(matches!(e, ProtectError::Hole { .. }));
        // What MemSlots believes is what KVM holds.
        let mut believed = s.slots();
        believed.sort_by_key(|s| s.gpa);
        assert_eq!(believed, kvm.layout());
    }

    #[test]
    fn spans_round_to_pages() {
        assert_eq!(page_span(0x1234, 8), Ok((0x1000, 0x2000)));
        assert_eq!(page_span(0x1ffc, 8), Ok((0x1000, 0x3000)));
        assert!(page_span(0x1000, 0).is_err());
        assert!(page_span(u64::MAX - 2, 8).is_err());
    }
}
