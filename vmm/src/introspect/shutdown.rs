//! Whether the guest kernel itself is powering off, halting, restarting or panicking,
//! read from its own variables in guest memory.
//!
//! x86 without ACPI has no power-off device, so the VMM learns of a power-off from the
//! kernel's `reboot: Power down` console line, and of a panic from its `Kernel panic - not
//! syncing` line. Any guest process that can write to the console can print those lines
//! too, so they are only hints: before acting on one, the VMM checks the kernel's own
//! state, which no process can change:
//!
//! - `system_state` (`init/main.c`, `enum system_states` in `include/linux/kernel.h`):
//!   `kernel_power_off()`, `kernel_halt()` and `kernel_restart()` set it to
//!   `SYSTEM_POWER_OFF`, `SYSTEM_HALT`, `SYSTEM_RESTART` before they print their line.
//! - `panic_cpu` (`kernel/panic.c`): `PANIC_CPU_INVALID` (-1) until `panic()` claims it for
//!   the panicking CPU, before it prints the panic line; it never goes back.
//!
//! The variables are found by their vmlinux symbols: lucos boots the vmlinux without
//! KASLR at its link address, so a kernel-image address `va` is at guest-physical
//! `va - __START_KERNEL_map`.

use std::fmt;

use vm_memory::{Bytes, GuestAddress};

use super::kernel::START_KERNEL_MAP;
use crate::memory::GuestMem;
use crate::symbols::SymbolTable;

/// How far past `__START_KERNEL_map` the kernel image may lie (the kernel high map's size).
const KERNEL_IMAGE_SPAN: u64 = 1 << 30;
/// `PANIC_CPU_INVALID` (`include/linux/panic.h`): no CPU has entered `panic()`.
pub const PANIC_CPU_INVALID: i32 = -1;

/// `enum system_states` of the guest kernel (Linux 6.1, `include/linux/kernel.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemState {
    /// `SYSTEM_BOOTING`.
    Booting,
    /// `SYSTEM_SCHEDULING`.
    Scheduling,
    /// `SYSTEM_FREEING_INITMEM`.
    FreeingInitmem,
    /// `SYSTEM_RUNNING`: normal operation.
    Running,
    /// `SYSTEM_HALT`: `kernel_halt()` ran.
    Halt,
    /// `SYSTEM_POWER_OFF`: `kernel_power_off()` ran.
    PowerOff,
    /// `SYSTEM_RESTART`: `kernel_restart()` or an emergency restart ran.
    Restart,
    /// `SYSTEM_SUSPEND`.
    Suspend,
    /// A value the enum does not have.
    Unknown(u32),
}

impl SystemState {
    /// The state for the enum's value.
    pub fn from_raw(v: u32) -> Self {
        match v {
            0 => Self::Booting,
            1 => Self::Scheduling,
            2 => Self::FreeingInitmem,
            3 => Self::Running,
            4 => Self::Halt,
            5 => Self::PowerOff,
            6 => Self::Restart,
            7 => Self::Suspend,
            v => Self::Unknown(v),
        }
    }
}

impl fmt::Display for SystemState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(v) => write!(f, "unknown system_state {v}"),
            s => write!(f, "{s:?}"),
        }
    }
}

/// What the VMM reads of the guest kernel's shutdown state (a trait so that the event
/// loop can be tested without a guest).
pub trait KernelShutdownState: Send + Sync {
    /// The kernel's `system_state`; `None` if it cannot be read (no symbol, outside RAM).
    fn system_state(&self) -> Option<SystemState>;
    /// The kernel's `panic_cpu`; `None` if it cannot be read.
    fn panic_cpu(&self) -> Option<i32>;

    /// Whether the kernel has entered `panic()` (`Some(false)`: it has not; `None`:
    /// unknown).
    fn panicking(&self) -> Option<bool> {
        self.panic_cpu().map(|c| c != PANIC_CPU_INVALID)
    }
}

/// Reads `system_state` and `panic_cpu` from guest memory.
pub struct ShutdownProbe {
    mem: GuestMem,
    system_state: Option<GuestAddress>,
    panic_cpu: Option<GuestAddress>,
}

impl ShutdownProbe {
    /// A probe for the kernel whose symbols are `symbols` running in `mem`. Variables
    /// without a usable symbol read as unknown (logged once here).
    pub fn new(mem: GuestMem, symbols: Option<&SymbolTable>) -> Self {
        let find = |name: &str| {
            let gpa = symbols
                .and_then(|t| t.get(name))
                .filter(|s| s.size == 0 || s.size == 4)
                .and_then(|s| s.addr.checked_sub(START_KERNEL_MAP))
                .filter(|&off| off < KERNEL_IMAGE_SPAN)
                .map(GuestAddress);
            if gpa.is_none() {
                log::warn!(
                    "kernel symbol {name} not found (or not a 4-byte kernel variable): console lines \
                     claiming a power-off or panic cannot be confirmed and are ignored"
                );
            }
            gpa
        };
        Self {
            system_state: find("system_state"),
            panic_cpu: find("panic_cpu"),
            mem,
        }
    }

    fn read_u32(&self, at: Option<GuestAddress>) -> Option<u32> {
        self.mem.read_obj::<u32>(at?).ok()
    }
}

impl KernelShutdownState for ShutdownProbe {
    fn system_state(&self) -> Option<SystemState> {
        self.read_u32(self.system_state).map(SystemState::from_raw)
    }

    fn panic_cpu(&self) -> Option<i32> {
        self.read_u32(self.panic_cpu).map(|v| v as i32)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::symbols::Symbol;

    fn sym(name: &str, addr: u64, size: u64) -> Symbol {
        Symbol::global(name, addr, size, false)
    }

    #[test]
    fn reads_the_kernel_variables_at_their_physical_addresses() {
        let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let syms = SymbolTable::from_symbols(vec![
            sym("system_state", START_KERNEL_MAP + 0x20_0000, 4),
            sym("panic_cpu", START_KERNEL_MAP + 0x20_0040, 4),
        ]);
        let p = ShutdownProbe::new(mem.clone(), Some(&syms));
        mem.write_obj(3u32, GuestAddress(0x20_0000)).unwrap();
        mem.write_obj(u32::MAX, GuestAddress(0x20_0040)).unwrap();
        assert_eq!(p.system_state(), Some(SystemState::Running));
        assert_eq!(p.panicking(), Some(false));
        mem.write_obj(5u32, GuestAddress(0x20_0000)).unwrap();
        mem.write_obj(1u32, GuestAddress(0x20_0040)).unwrap();
        assert_eq!(p.system_state(), Some(SystemState::PowerOff));
        assert_eq!(p.panic_cpu(), Some(1));
        assert_eq!(p.panicking(), Some(true));
        assert_eq!(SystemState::from_raw(4), SystemState::Halt);
        assert_eq!(SystemState::from_raw(6), SystemState::Restart);
        assert_eq!(SystemState::from_raw(9), SystemState::Unknown(9));
    }

    #[test]
    fn missing_or_odd_symbols_read_as_unknown() {
        let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert_eq!(ShutdownProbe::new(mem.clone(), None).system_state(), None);
        let syms = SymbolTable::from_symbols(vec![
            // Outside guest RAM, not in the kernel image, wrong size.
            sym("system_state", START_KERNEL_MAP + 0x20_0000, 4),
            sym("panic_cpu", 0x1000, 4),
        ]);
        let p = ShutdownProbe::new(mem.clone(), Some(&syms));
        assert_eq!((p.system_state(), p.panicking()), (None, None));
        let syms = SymbolTable::from_symbols(vec![sym("panic_cpu", START_KERNEL_MAP, 8)]);
        assert_eq!(ShutdownProbe::new(mem, Some(&syms)).panic_cpu(), None);
    }
}
