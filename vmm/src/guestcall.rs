//! Running a guest kernel function from the VMM ("guest call"): how patch callbacks
//! execute.
//!
//! The update server asks for `func(a0, a1)` to run in the guest. The VMM picks a vCPU at a
//! *safe point* — running user code, or halted in the kernel's idle loop with interrupts
//! on — so that vCPU holds no kernel lock and is in no interrupts-off section. With that
//! vCPU out of KVM_RUN it saves the vCPU's state and enters the call in a private
//! environment kept in the patch region (the "call area"):
//!
//! - a private stack, so nothing of the interrupted context is touched;
//! - interrupts off (RFLAGS.IF = 0): the callback is not preempted and runs to completion
//!   on this vCPU; the other vCPUs keep running, so a lock the callback needs is released
//!   normally;
//! - a private IDT whose every vector leads to a stub that reports the vector to the VMM
//!   through an I/O port: a callback that faults (#PF, #GP, #UD, ...) is stopped there, it
//!   never reaches the guest kernel's own handlers. NMIs are held and re-delivered after
//!   the call;
//! - a return trap: the trampoline calls `func` and reports its return value with an
//!   `out` to [`PORT_RETURN`].
//!
//! The vCPU's saved state is then restored exactly (a vCPU taken from the idle loop
//! resumes as after a spurious wake-up). A callback that does not return within its time
//! limit is stopped the same way and reported as a timeout. Callbacks therefore run like
//! hard-interrupt handlers: they must not sleep; the patch module's wrapper (see
//! `guest-patches/include/lucos.h`) marks the context as such for RCU and preemption.
//!
//! User-mode safe points are used only when the guest kernel maps itself in user page
//! tables (no page-table isolation); the switch to kernel mode is the one `syscall`
//! makes: kernel CS/SS from MSR_STAR and `swapgs`.

use iced_x86::code_asm::{dx, edx, rax, rsp, CodeAssembler};
use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_sregs, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::gdt::{
    gdt_entry, idt_gate, kvm_segment_from_gdt, FLAGS_KERNEL_CODE64, FLAGS_KERNEL_DATA, FLAT_LIMIT,
};
use crate::arch::x86_64::msr::{read_msrs, write_msr, MsrError, MSR_KERNEL_GS_BASE, MSR_STAR};
use crate::arch::x86_64::RFLAGS_IF;
use crate::memory::GuestMem;

/// The trampoline reports the callback's return (RAX) with an `out` here.
pub const PORT_RETURN: u16 = 0x5e0;
/// The exception stubs report here, with the vector pushed on the private stack.
pub const PORT_EXCEPTION: u16 = 0x5e1;

/// Size of the call area: IDT page, code page, stack.
pub const AREA_SIZE: u64 = 64 << 10;
const IDT_OFF: u64 = 0;
const CODE_OFF: u64 = 0x1000;
const STACK_TOP_OFF: u64 = AREA_SIZE;
const VECTORS: u64 = 256;
const NMI_VECTOR: u64 = 2;

/// Why a guest call (a patch callback run in the guest) failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No vCPU reached a safe point within the wait given.
    #[error("no vCPU reached a safe point (user mode, or idle with interrupts on) within {0:?}; last seen: {1}")]
    NoSafePoint(std::time::Duration, String),
    /// The vCPU picked was not at a safe point after all when the call was entered
    /// (the caller picks again).
    #[error("vCPU {vcpu} is not at a safe point: {why}")]
    NotSafe {
        /// The vCPU.
        vcpu: u8,
        /// What made it unsafe.
        why: String,
    },
    /// The callback raised an exception (or enabled interrupts and took one); it was stopped there.
    #[error("the callback raised exception {} (vector {vector}) at {rip:#x}{}", vector_name(*vector), error_code.map(|c| format!(", error code {c:#x}")).unwrap_or_default())]
    Exception {
        /// Exception vector (see [`vector_name`]).
        vector: u8,
        /// Guest RIP where it was raised.
        rip: u64,
        /// Error code the CPU pushed, for the vectors that have one.
        error_code: Option<u64>,
    },
    /// The callback ran past its time limit and was stopped.
    #[error("the callback did not return within {limit:?} (stopped at {rip:#x})")]
    Timeout {
        /// The time limit.
        limit: std::time::Duration,
        /// Guest RIP where it was stopped.
        rip: u64,
    },
    /// KVM could not run the callback's code (internal error or a fatal exit); the string says
    /// what happened.
    #[error("the guest could not execute the callback: {0}")]
    Emulation(String),
    /// The VM is shutting down.
    #[error("the VM is stopping")]
    Stopping,
    /// The call area's code could not be assembled or does not fit its page.
    #[error("building the call area: {0}")]
    Assemble(String),
    /// A KVM ioctl on the vCPU failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The ioctl or step that failed.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Reading or writing an MSR of the vCPU failed.
    #[error(transparent)]
    Msr(#[from] MsrError),
    /// Completing the vCPU's last I/O exit ran into another VM exit (described).
    #[error("unexpected VM exit while completing I/O: {0}")]
    UnexpectedExit(String),
    /// The vCPUs could not be paused to look for a safe point.
    #[error("pausing the vCPUs: {0}")]
    Pause(#[from] crate::pause::PauseError),
    /// The vCPU picked already has a guest call pending.
    #[error("vCPU {0} already has a guest call pending")]
    Busy(u8),
    /// The vCPU did not report back after its call was stopped for the time limit.
    #[error("vCPU {0} did not come back from the call")]
    NoReturn(u8),
    /// Call-area memory at this address is not accessible (guest-physical when installing
    /// the area, kernel-virtual when reading the private stack).
    #[error("guest memory at {0:#x} is not accessible")]
    Memory(u64),
}

/// Short name of an exception vector.
pub fn vector_name(v: u8) -> &'static str {
    const N: [&str; 21] = [
        "#DE",
        "#DB",
        "NMI",
        "#BP",
        "#OF",
        "#BR",
        "#UD",
        "#NM",
        "#DF",
        "coprocessor overrun",
        "#TS",
        "#NP",
        "#SS",
        "#GP",
        "#PF",
        "reserved",
        "#MF",
        "#AC",
        "#MC",
        "#XM",
        "#VE",
    ];
    match v {
        0..=20 => N[v as usize],
        21 => "#CP",
        29 => "#VC",
        30 => "#SX",
        32.. => "an external interrupt (the callback enabled interrupts)",
        _ => "reserved",
    }
}

/// Whether the CPU pushes an error code for `vector`.
fn has_error_code(vector: u64) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Where the call area is, in both address spaces (contiguous).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallArea {
    /// Kernel-virtual start, in the patch region's high-map window.
    pub va: u64,
    /// Guest-physical start.
    pub gpa: u64,
    /// Kernel code selector for the IDT gates.
    pub kernel_cs: u16,
}

/// Offsets of the entry points in the code page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entries {
    trampoline: u64,
    nmi_resume: u64,
}

impl CallArea {
    fn stack_top(&self) -> u64 {
        self.va + STACK_TOP_OFF
    }

    fn idt_va(&self) -> u64 {
        self.va + IDT_OFF
    }

    /// Code page: trampoline, NMI resume, the common stub tail, 256 vector stubs. Returns
    /// the code and the stub addresses.
    fn assemble(&self) -> Result<(Vec<u8>, Entries, Vec<u64>), CallError> {
        let e = |e: iced_x86::IcedError| CallError::Assemble(e.to_string());
        let base = self.va + CODE_OFF;
        let mut a = CodeAssembler::new(64).map_err(e)?;
        let mut tramp = a.create_label();
        let mut nmi = a.create_label();
        let mut common = a.create_label();
        let mut stubs: Vec<_> = (0..VECTORS).map(|_| a.create_label()).collect();
        // Trampoline: RAX = function, RDI/RSI = arguments, RSP = top of the private stack.
        a.set_label(&mut tramp).map_err(e)?;
        a.call(rax).map_err(e)?;
        a.mov(edx, PORT_RETURN as u32).map_err(e)?;
        a.out(dx, iced_x86::code_asm::al).map_err(e)?;
        a.ud2().map_err(e)?;
        // After a held NMI: drop the pushed vector, return into the callback.
        a.set_label(&mut nmi).map_err(e)?;
        a.add(rsp, 8).map_err(e)?;
        a.iretq().map_err(e)?;
        a.set_label(&mut common).map_err(e)?;
        a.mov(edx, PORT_EXCEPTION as u32).map_err(e)?;
        a.out(dx, iced_x86::code_asm::al).map_err(e)?;
        a.ud2().map_err(e)?;
        for (v, l) in stubs.iter_mut().enumerate() {
            a.set_label(l).map_err(e)?;
            a.push(v as i32).map_err(e)?;
            a.jmp(common).map_err(e)?;
        }
        let res = a
            .assemble_options(base, iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .map_err(e)?;
        let entries = Entries {
            trampoline: res.label_ip(&tramp).map_err(e)?,
            nmi_resume: res.label_ip(&nmi).map_err(e)?,
        };
        let stub_ips = stubs
            .iter()
            .map(|l| res.label_ip(l))
            .collect::<Result<Vec<_>, _>>()
            .map_err(e)?;
        let code = res.inner.code_buffer;
        if code.len() as u64 > 0x1000 {
            return Err(CallError::Assemble(format!("code is {} bytes", code.len())));
        }
        Ok((code, entries, stub_ips))
    }

    /// Writes the IDT and the code into guest memory (idempotent).
    pub fn install(&self, mem: &GuestMem) -> Result<(), CallError> {
        let (code, _, stubs) = self.assemble()?;
        let mut idt = vec![0u8; (VECTORS * 16) as usize];
        for (v, h) in stubs.iter().enumerate() {
            idt[v * 16..v * 16 + 16].copy_from_slice(&idt_gate(*h, self.kernel_cs));
        }
        mem.write_slice(&idt, GuestAddress(self.gpa + IDT_OFF))
            .map_err(|_| CallError::Memory(self.gpa))?;
        mem.write_slice(&code, GuestAddress(self.gpa + CODE_OFF))
            .map_err(|_| CallError::Memory(self.gpa + CODE_OFF))
    }

    fn entries(&self) -> Result<Entries, CallError> {
        Ok(self.assemble()?.1)
    }
}

/// The state of the vCPU before the call, restored afterwards.
pub struct Saved {
    regs: kvm_regs,
    sregs: kvm_sregs,
    /// MSR_KERNEL_GS_BASE, when the call swapped GS (entered from user mode).
    kernel_gs: Option<u64>,
    entries: Entries,
    area: CallArea,
    /// An NMI arrived during the call; it is delivered after the restore.
    pub nmi_held: bool,
}

/// What the vCPU's state must satisfy for a call to start here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SafePoint {
    /// Allow a vCPU running user code (the guest kernel is mapped in user page tables).
    pub user_ok: bool,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CallError {
    move |source| CallError::Kvm { what, source }
}

/// Finishes the I/O or MMIO of the vCPU's last exit without running guest code (KVM_RUN
/// with `immediate_exit`), so its registers are final. KVM completes such an exit (e.g.
/// moves RIP past a fast-path `out`, stores an MMIO read) only on the next KVM_RUN; state
/// saved or replaced before that would be inconsistent.
pub fn settle(vcpu: &mut VcpuFd) -> Result<(), CallError> {
    vcpu.set_kvm_immediate_exit(1);
    let r = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        Err(e) => Err(kvm_err("KVM_RUN (immediate exit)")(e)),
        Ok(exit) => Err(CallError::UnexpectedExit(format!("{exit:?}"))),
    };
    vcpu.set_kvm_immediate_exit(0);
    r
}

/// Saves the vCPU's state and points it at the trampoline to run `func(args)`. The
/// caller has decided the vCPU is at a safe point (this re-checks what KVM can tell).
pub fn enter(
    vcpu: &mut VcpuFd,
    id: u8,
    area: &CallArea,
    safe: SafePoint,
    func: u64,
    args: [u64; 2],
) -> Result<Saved, CallError> {
    let not_safe = |why: &str| CallError::NotSafe {
        vcpu: id,
        why: why.into(),
    };
    settle(vcpu)?;
    let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let ev = vcpu.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    if ev.exception.injected != 0 || ev.exception.pending != 0 || ev.interrupt.injected != 0 || ev.nmi.injected != 0 {
        return Err(not_safe("an exception or interrupt is being delivered"));
    }
    let user = sregs.cs.selector & 3 == 3;
    if user && !safe.user_ok {
        return Err(not_safe("it runs user code and the kernel is not mapped there"));
    }
    if !user && regs.rflags & RFLAGS_IF == 0 {
        return Err(not_safe("it runs kernel code with interrupts off"));
    }
    let entries = area.entries()?;
    let mut s = sregs;
    let mut kernel_gs = None;
    if user {
        let [star, kgs] = read_msrs(vcpu, [MSR_STAR, MSR_KERNEL_GS_BASE]).ok_or(MsrError::NotRead(MSR_STAR))?;
        let cs = ((star >> 32) as u16) & !3;
        s.cs = kvm_segment_from_gdt(gdt_entry(FLAGS_KERNEL_CODE64, 0, FLAT_LIMIT), (cs >> 3) as u8);
        s.ss = kvm_segment_from_gdt(gdt_entry(FLAGS_KERNEL_DATA, 0, FLAT_LIMIT), ((cs + 8) >> 3) as u8);
        // swapgs, as the kernel's entry code would do.
        s.gs.base = kgs;
        write_msr(vcpu, MSR_KERNEL_GS_BASE, sregs.gs.base)?;
        kernel_gs = Some(kgs);
    }
    (s.idt.base, s.idt.limit) = (area.idt_va(), (VECTORS * 16 - 1) as u16);
    let mut r = regs;
    r.rip = entries.trampoline;
    r.rsp = area.stack_top();
    r.rflags = 2;
    r.rax = func;
    (r.rdi, r.rsi) = (args[0], args[1]);
    let saved = Saved {
        regs,
        sregs,
        kernel_gs,
        entries,
        area: *area,
        nmi_held: false,
    };
    let set = vcpu.set_sregs(&s).and_then(|_| vcpu.set_regs(&r)).and_then(|_| {
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
    });
    if let Err(e) = set {
        let _ = leave(vcpu, &saved);
        return Err(kvm_err("setting the call's registers")(e));
    }
    Ok(saved)
}

/// What an `out` to a call port means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The callback returned this value.
    Returned(u64),
    /// An NMI arrived; it is held and the callback goes on.
    Continue,
    /// The callback faulted.
    Failed(CallError),
}

/// Interprets an exit on [`PORT_RETURN`] or [`PORT_EXCEPTION`] during a call.
pub fn on_port(vcpu: &VcpuFd, mem: &GuestMem, saved: &mut Saved, port: u16) -> Result<Step, CallError> {
    let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    if port == PORT_RETURN {
        return Ok(Step::Returned(regs.rax));
    }
    let gpa = |va: u64| saved.area.gpa + va.wrapping_sub(saved.area.va);
    let read = |va: u64| -> Result<u64, CallError> {
        if va < saved.area.va || va + 8 > saved.area.va + AREA_SIZE {
            return Err(CallError::Memory(va));
        }
        mem.read_obj::<u64>(GuestAddress(gpa(va)))
            .map_err(|_| CallError::Memory(va))
    };
    let vector = read(regs.rsp)?;
    if vector == NMI_VECTOR {
        saved.nmi_held = true;
        regs.rip = saved.entries.nmi_resume;
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        return Ok(Step::Continue);
    }
    let (error_code, frame) = if has_error_code(vector) {
        (Some(read(regs.rsp.wrapping_add(8))?), regs.rsp.wrapping_add(16))
    } else {
        (None, regs.rsp.wrapping_add(8))
    };
    Ok(Step::Failed(CallError::Exception {
        vector: vector as u8,
        rip: read(frame)?,
        error_code,
    }))
}

/// What one run of a vCPU during a call came to, as [`drive`] needs it.
pub enum CallExit {
    /// An `out` to [`PORT_RETURN`] or [`PORT_EXCEPTION`].
    Port(u16),
    /// The VM is stopping.
    Stopping,
    /// The vCPU cannot go on (emulation failure, fatal exit).
    Failed(CallError),
    /// Something else the vCPU loop handled (device I/O, a pause): run again.
    Other,
}

/// The vCPU a call runs on, as the call loop sees it.
pub trait CallVcpu {
    /// Its KVM handle, and guest memory.
    fn parts(&mut self) -> (&mut VcpuFd, &GuestMem);
    /// Runs the vCPU until its next exit and handles what is not the call's business.
    fn step(&mut self) -> CallExit;
}

/// How a call ended.
pub struct CallOutcome {
    /// The callback's return value, or why it has none.
    pub result: Result<u64, CallError>,
    /// Whether the vCPU's own state was put back; an error here leaves the guest broken.
    pub restored: Result<(), CallError>,
}

/// Runs `func(args)` on `v` (see the module docs): enters the call, steps the vCPU until
/// the trampoline reports a return or an exception (or `expired` is set, after `limit`),
/// and restores the vCPU. The one call loop: the vCPU threads and the tests both use it.
pub fn drive(
    v: &mut impl CallVcpu,
    id: u8,
    area: &CallArea,
    safe: SafePoint,
    call: (u64, [u64; 2]),
    expired: &std::sync::atomic::AtomicBool,
    limit: std::time::Duration,
) -> Result<CallOutcome, CallError> {
    let (func, args) = call;
    let mut saved = enter(v.parts().0, id, area, safe, func, args)?;
    let result = loop {
        if expired.load(std::sync::atomic::Ordering::Acquire) {
            let rip = v.parts().0.get_regs().map(|r| r.rip).unwrap_or(0);
            break Err(CallError::Timeout { limit, rip });
        }
        match v.step() {
            CallExit::Port(port) => {
                let (fd, mem) = v.parts();
                let step = on_port(fd, mem, &mut saved, port);
                match step {
                    Ok(Step::Returned(r)) => break Ok(r),
                    Ok(Step::Continue) => {}
                    Ok(Step::Failed(e)) | Err(e) => break Err(e),
                }
            }
            CallExit::Stopping => break Err(CallError::Stopping),
            CallExit::Failed(e) => break Err(e),
            CallExit::Other => {}
        }
    };
    let restored = leave(v.parts().0, &saved);
    Ok(CallOutcome { result, restored })
}

/// Restores the vCPU's state from before the call (and delivers a held NMI).
pub fn leave(vcpu: &mut VcpuFd, saved: &Saved) -> Result<(), CallError> {
    // The trampoline's last `out` is completed first, then the state replaced.
    settle(vcpu)?;
    vcpu.set_sregs(&saved.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&saved.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    if let Some(kgs) = saved.kernel_gs {
        write_msr(vcpu, MSR_KERNEL_GS_BASE, kgs)?;
    }
    // A vCPU taken from HLT resumes after it: the idle loop sees a spurious wake-up.
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    if saved.nmi_held {
        vcpu.nmi().map_err(kvm_err("KVM_NMI"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    fn area() -> CallArea {
        CallArea {
            va: 0xffff_ffff_9fe0_1000,
            gpa: 0x1fe0_1000,
            kernel_cs: 0x10,
        }
    }

    #[test]
    fn code_fits_its_page_and_stubs_push_their_vector() {
        let a = area();
        let (code, entries, stubs) = a.assemble().unwrap();
        assert!(code.len() <= 0x1000, "{}", code.len());
        assert_eq!(entries.trampoline, a.va + CODE_OFF);
        assert_eq!(stubs.len(), 256);
        for v in [0u64, 2, 13, 14, 255] {
            let off = (stubs[v as usize] - a.va - CODE_OFF) as usize;
            let mut d = Decoder::with_ip(64, &code[off..], stubs[v as usize], DecoderOptions::NONE);
            let push = d.decode();
            assert_eq!(push.mnemonic(), Mnemonic::Push);
            assert_eq!(push.immediate64() as u8, v as u8);
            assert_eq!(d.decode().mnemonic(), Mnemonic::Jmp);
        }
        let mut d = Decoder::with_ip(64, &code, a.va + CODE_OFF, DecoderOptions::NONE);
        assert_eq!(d.decode().mnemonic(), Mnemonic::Call);
    }

    #[test]
    fn error_codes_and_names() {
        assert!(has_error_code(14) && has_error_code(13) && !has_error_code(6) && !has_error_code(3));
        assert_eq!(vector_name(14), "#PF");
        assert_eq!(vector_name(6), "#UD");
        assert!(vector_name(40).contains("interrupt"));
    }
}
