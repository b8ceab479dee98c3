//! The stacks a vCPU can run on besides task stacks, and the chain of live stack spans
//! from a paused vCPU's RSP back to the task stack it interrupted.
//!
//! On x86-64 Linux (6.1) a CPU in kernel mode is on one of:
//! - a task's kernel stack (`task_struct.stack`, `THREAD_SIZE`);
//! - its hard-IRQ stack (`hardirq_stack_ptr`, per CPU; softirqs run on it too). The entry
//!   code (`call_on_stack`) stores the interrupted RSP in the stack's top word
//!   (`hardirq_stack_ptr` points at it) before switching;
//! - an IST exception stack (#DF, NMI, #DB, #MC and, with SEV, #VC), each a fixed block in
//!   the CPU's `cpu_entry_area` (`cea_exception_stacks`, per CPU). The CPU pushes the
//!   interrupted context's iret frame (RIP, CS, RFLAGS, RSP, SS) at the stack's top;
//! - the entry trampoline stack, for a few instructions after a user→kernel switch (no
//!   kernel frames live there).
//!
//! [`stack_chain`] follows these links from the RSP of a paused vCPU, so that a vCPU
//! paused in an NMI that interrupted an IRQ handler that interrupted a task has all three
//! stacks' live parts scanned by the commit check.

use super::kernel::{GuestKernel, KernelError};
use crate::memory::GuestMem;

/// What kind of per-CPU stack a [`KnownStack`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackKind {
    /// The hard-IRQ (and softirq) stack: the interrupted RSP is in its top word.
    Irq,
    /// An IST exception stack (its name, e.g. `NMI`): the interrupted RSP is in the iret
    /// frame at its top.
    Exception(&'static str),
}

/// A per-CPU stack `[lo, hi)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownStack {
    /// Lowest address.
    pub lo: u64,
    /// One past the highest address (the stack's top).
    pub hi: u64,
    /// Which stack it is.
    pub kind: StackKind,
}

/// A part of a stack that can hold live frames of a paused vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackSpan {
    /// From the stack pointer (8-byte aligned down)...
    pub lo: u64,
    /// ...to the stack's top.
    pub hi: u64,
    /// `IRQ stack`, `NMI stack`, ... or `stack` for a task (or unknown) stack.
    pub what: String,
}

/// Exception stacks in `struct cea_exception_stacks`, in the kernel's order.
const IST_STACKS: [&str; 6] = ["DF", "NMI", "DB", "MCE", "VC", "VC2"];

/// How many stack switches [`stack_chain`] follows at most (NMI over #DB over IRQ over a
/// task is three; a longer chain means the links are garbage).
const MAX_LINKS: usize = 8;

impl GuestKernel {
    /// The hard-IRQ stack and the IST exception stacks of guest CPU `cpu`, read from the
    /// kernel's per-CPU variables. Stacks the CPU has not set up yet (a null pointer) are
    /// left out.
    pub fn cpu_stacks(&self, mem: &GuestMem, cpu: u32) -> Result<Vec<KnownStack>, KernelError> {
        let v = self.virt(mem);
        let off = v.read_u64(self.sym("__per_cpu_offset")? + 8 * u64::from(cpu))?;
        let mut out = Vec::new();
        let tos = v.read_u64(self.sym("hardirq_stack_ptr")?.wrapping_add(off))?;
        if tos != 0 {
            let size = self
                .symbols
                .get("irq_stack_backing_store")
                .map(|s| s.size)
                .filter(|&s| s > 0)
                .unwrap_or(super::tasks::THREAD_SIZE);
            // hardirq_stack_ptr is the top word's address: top - 8.
            let hi = tos.wrapping_add(8);
            out.push(KnownStack {
                lo: hi.wrapping_sub(size),
                hi,
                kind: StackKind::Irq,
            });
        }
        let cea = v.read_u64(self.sym("cea_exception_stacks")?.wrapping_add(off))?;
        if cea != 0 {
            for &(name, at, len) in self.ist_layout() {
                let lo = cea.wrapping_add(at);
                out.push(KnownStack {
                    lo,
                    hi: lo.wrapping_add(len),
                    kind: StackKind::Exception(name),
                });
            }
        }
        Ok(out)
    }

    /// The IST stacks of `struct cea_exception_stacks` this kernel has (offset, size), read
    /// from BTF once: this runs in every pause.
    fn ist_layout(&self) -> &[(&'static str, u64, u64)] {
        self.ist_layout.get_or_init(|| {
            IST_STACKS
                .iter()
                .filter_map(|&name| {
                    let member = format!("{name}_stack");
                    let at = self.btf.offset_of("cea_exception_stacks", &member).ok()?;
                    let len = self.btf.array_len("cea_exception_stacks", &member).ok()? as u64;
                    (len > 0).then_some((name, at, len))
                })
                .collect()
        })
    }
}

/// The live stack spans of a vCPU in kernel mode at `rsp`: the part of its current stack
/// above RSP and, while that is a per-CPU stack in `known`, the live part of the stack it
/// switched from (found through the link the entry code or the CPU left at the top),
/// ending on a task (or unknown) stack, scanned from the link to the `thread_size`-aligned
/// end of its block. `read` reads a guest word; a link that cannot be read, leaves kernel
/// mode or loops ends the chain.
pub fn stack_chain(
    rsp: u64,
    known: &[KnownStack],
    thread_size: u64,
    read: impl Fn(u64) -> Option<u64>,
) -> Vec<StackSpan> {
    let mut out = Vec::new();
    let mut sp = rsp;
    let mut visited: Vec<(u64, u64)> = Vec::new();
    for _ in 0..MAX_LINKS {
        let Some(s) = known.iter().find(|s| sp >= s.lo && sp < s.hi) else {
            // A task stack (or one we do not know): from SP to the end of its block.
            let hi = (sp | (thread_size - 1)).wrapping_add(1);
            out.push(StackSpan {
                lo: sp & !7,
                hi,
                what: "stack".into(),
            });
            break;
        };
        if visited.contains(&(s.lo, s.hi)) {
            break;
        }
        visited.push((s.lo, s.hi));
        let what = match s.kind {
            StackKind::Irq => "IRQ stack".to_string(),
            StackKind::Exception(n) => format!("{n} stack"),
        };
        out.push(StackSpan {
            lo: sp & !7,
            hi: s.hi,
            what,
        });
        let link = match s.kind {
            StackKind::Irq => s.hi - 8,
            // iret frame: RIP, CS, RFLAGS, RSP, SS at hi-40 .. hi.
            StackKind::Exception(_) => match read(s.hi - 32) {
                Some(cs) if cs & 3 != 0 => break, // from user mode: no kernel frames below
                Some(_) => s.hi - 16,
                None => s.hi - 32, // unreadable: reported below
            },
        };
        match read(link) {
            Some(n) if n != 0 => sp = n,
            Some(_) => break,
            None => {
                // The link cannot be read: so that the check stays conservative, the scan
                // reads it too and fails, which counts as a blocker.
                out.push(StackSpan {
                    lo: link,
                    hi: link + 8,
                    what: "link to the interrupted stack".into(),
                });
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const TS: u64 = 16 << 10;
    /// An IRQ stack that is page aligned but not 16K aligned, as the per-CPU backing store is.
    const IRQ: KnownStack = KnownStack {
        lo: 0xffff_8880_0780_2000,
        hi: 0xffff_8880_0780_6000,
        kind: StackKind::Irq,
    };
    const NMI: KnownStack = KnownStack {
        lo: 0xffff_fe00_0000_3000,
        hi: 0xffff_fe00_0000_4000,
        kind: StackKind::Exception("NMI"),
    };
    const TASK_SP: u64 = 0xffff_c900_0001_3e40;

    fn reader(words: &[(u64, u64)]) -> impl Fn(u64) -> Option<u64> {
        let m: HashMap<u64, u64> = words.iter().copied().collect();
        move |a| m.get(&a).copied()
    }

    #[test]
    fn a_task_stack_is_scanned_to_its_top() {
        let c = stack_chain(TASK_SP + 4, &[IRQ, NMI], TS, reader(&[]));
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].lo, c[0].hi), (TASK_SP, 0xffff_c900_0001_4000));
    }

    #[test]
    fn irq_stack_then_the_interrupted_task() {
        let rsp = IRQ.hi - 0x200;
        let c = stack_chain(rsp, &[IRQ, NMI], TS, reader(&[(IRQ.hi - 8, TASK_SP)]));
        let spans: Vec<(u64, u64)> = c.iter().map(|s| (s.lo, s.hi)).collect();
        assert_eq!(spans, [(rsp, IRQ.hi), (TASK_SP, 0xffff_c900_0001_4000)]);
        assert_eq!(c[0].what, "IRQ stack");
    }

    #[test]
    fn nmi_over_irq_over_task() {
        let rsp = NMI.hi - 0x180;
        let irq_sp = IRQ.hi - 0x300;
        let words = [(NMI.hi - 32, 0x10), (NMI.hi - 16, irq_sp), (IRQ.hi - 8, TASK_SP)];
        let c = stack_chain(rsp, &[IRQ, NMI], TS, reader(&words));
        let spans: Vec<(u64, u64, &str)> = c.iter().map(|s| (s.lo, s.hi, s.what.as_str())).collect();
        assert_eq!(
            spans,
            [
                (rsp, NMI.hi, "NMI stack"),
                (irq_sp, IRQ.hi, "IRQ stack"),
                (TASK_SP, 0xffff_c900_0001_4000, "stack")
            ]
        );
    }

    #[test]
    fn an_exception_from_user_mode_ends_the_chain() {
        let words = [(NMI.hi - 32, 0x33), (NMI.hi - 16, 0x7ffd_0000)];
        let c = stack_chain(NMI.hi - 0x100, &[IRQ, NMI], TS, reader(&words));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_looping_or_unreadable_link_ends_the_chain() {
        let looped = stack_chain(IRQ.hi - 0x100, &[IRQ], TS, reader(&[(IRQ.hi - 8, IRQ.hi - 0x80)]));
        assert_eq!(looped.len(), 1);
        let unreadable = stack_chain(IRQ.hi - 0x100, &[IRQ], TS, reader(&[]));
        assert_eq!(unreadable.len(), 2, "the unreadable link is scanned (and fails)");
        assert_eq!((unreadable[1].lo, unreadable[1].hi), (IRQ.hi - 8, IRQ.hi));
    }
}
