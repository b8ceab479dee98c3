//! Write protection of guest-physical pages through KVM memslots (the EPT/NPT, or PVM's
//! shadow page tables): the pages of a protected range live in a read-only memslot
//! (`KVM_MEM_READONLY`), so guest reads run at full speed while every guest write exits as
//! KVM_EXIT_MMIO. The VMM then runs the write's handler (a data patch's state transfer),
//! performs the write into guest RAM and resumes the vCPU, which has already retired the
//! instruction.
//!
//! - [`layout`] splits the RAM regions into read-write and read-only slots (pure).
//! - [`MemSlots`] applies a layout to KVM. Changing slots under a running vCPU would let it
//!   see a hole, so callers pause every vCPU first (the update server does it in its stop-the-world).
//! - [`WriteProtect`] is what the vCPU threads consult on an MMIO write: the protected
//!   ranges, their owners and fault counts.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use log::debug;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::PAGE_SIZE;
use crate::memory::GuestMem;

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

/// The VM's memslots.
pub struct MemSlots {
    vm: Arc<VmFd>,
    ram: Vec<RamRegion>,
    current: Mutex<Vec<Slot>>,
}

impl MemSlots {
    /// Takes over the slots [`crate::memory::register_memslots`] made (one per region).
    pub fn new(vm: Arc<VmFd>, mem: &GuestMem) -> Self {
        let ram = ram_regions(mem);
        let current = layout(&ram, &[]);
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
    pub fn set_readonly(&self, readonly: &[(u64, u64)]) -> Result<(), ProtectError> {
        if !readonly.is_empty() && !self.vm.check_extension(kvm_ioctls::Cap::ReadonlyMem) {
            return Err(ProtectError::NoReadonlyMem);
        }
        let want = layout(&self.ram, readonly);
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if *cur == want {
            return Ok(());
        }
        // A slot's size and flags cannot change in place: delete all, then add the new set.
        for (i, s) in cur.iter().enumerate() {
            self.set(i as u32, &Slot { size: 0, ..*s })?;
        }
        cur.clear();
        for (i, s) in want.iter().enumerate() {
            if let Err(e) = self.set(i as u32, s) {
                // Put back plain RAM so the guest is never left with a hole.
                for (j, added) in want.iter().enumerate().take(i) {
                    let _ = self.set(j as u32, &Slot { size: 0, ..*added });
                }
                let plain = layout(&self.ram, &[]);
                for (j, p) in plain.iter().enumerate() {
                    let _ = self.set(j as u32, p);
                }
                *cur = plain;
                return Err(e);
            }
        }
        debug!("memslots: {want:x?}");
        *cur = want;
        Ok(())
    }

    /// The current slots.
    pub fn slots(&self) -> Vec<Slot> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Slots map sub-ranges of the RAM regions (host addresses from `ram_regions`) and
    /// never overlap (`layout` partitions the regions).
    fn set(&self, id: u32, s: &Slot) -> Result<(), ProtectError> {
        crate::memory::set_memslot(&self.vm, id, s.gpa, s.size, s.host, s.readonly).map_err(|e| {
            ProtectError::SetRegion {
                slot: id,
                gpa: s.gpa,
                size: s.size,
                readonly: s.readonly,
                errno: e.errno(),
            }
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
}

impl WriteProtect {
    /// Protection over `slots`, with nothing protected yet.
    pub fn new(slots: MemSlots) -> Self {
        Self {
            slots,
            active: AtomicBool::new(false),
            ranges: Mutex::new(Vec::new()),
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

    /// Called by a vCPU thread on KVM_EXIT_MMIO (write). Returns false if `gpa` is not
    /// protected (a real MMIO write). Otherwise runs the handler, stores what it returns
    /// and counts the fault.
    pub fn on_write(&self, mem: &GuestMem, vcpu: u8, rip: u64, gpa: u64, data: &[u8]) -> bool {
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
        let fault = WriteFault {
            gpa,
            data: data.to_vec(),
            vcpu,
            rip,
        };
        let out = handler(&fault);
        faults.fetch_add(1, Ordering::Relaxed);
        if mem.write_slice(&out, GuestAddress(gpa)).is_err() {
            log::warn!("vcpu{vcpu}: completing a protected write at {gpa:#x} failed");
        }
        true
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

    #[test]
    fn spans_round_to_pages() {
        assert_eq!(page_span(0x1234, 8), Ok((0x1000, 0x2000)));
        assert_eq!(page_span(0x1ffc, 8), Ok((0x1000, 0x3000)));
        assert!(page_span(0x1000, 0).is_err());
        assert!(page_span(u64::MAX - 2, 8).is_err());
    }
}
