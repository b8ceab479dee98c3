//! Guest calls on the real /dev/kvm (milliseconds, a micro guest instead of Linux): a vCPU
//! running a loop — in kernel mode with interrupts on, or in user mode — is diverted to
//! run a function in the call area's private environment and then resumes exactly where
//! it was. A function that returns reports its value; one that faults is stopped with the
//! vector and faulting RIP and never reaches the guest's own IDT.

use iced_x86::code_asm::*;
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuExit;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kvm_ioctls::VcpuFd;
use lucos_vmm::guestcall::{self, CallArea, CallError, CallExit, CallVcpu, SafePoint, PORT_EXCEPTION, PORT_RETURN};
use lucos_vmm::memory::GuestMem;
use lucos_vmm::microvm::{self, KCODE};
use vm_memory::{Bytes, GuestAddress};

const TICK: u16 = 0xe0;
const GUEST_IDT_HIT: u16 = 0xe7;
const COUNTER: u64 = 0x20000;
const MAGIC: u64 = 0x1234_5678_9abc_def0;
const AREA: u64 = 0x10_0000;
const FUNCS: u64 = 0x9000;
const USER_CODE: u64 = 0x40000;
use lucos_vmm::arch::x86_64::msr::{MSR_KERNEL_GS_BASE, MSR_STAR};

/// The interrupted loop: keeps MAGIC in RBX/R12, counts, and exits on TICK each round.
fn looper(at: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lp = a.create_label();
    a.mov(rbx, MAGIC).unwrap();
    a.mov(r12, MAGIC).unwrap();
    a.set_label(&mut lp).unwrap();
    a.inc(qword_ptr(COUNTER)).unwrap();
    a.out(TICK as i32, al).unwrap();
    a.jmp(lp).unwrap();
    a.assemble(at).unwrap()
}

/// Three functions: add(a, b) clobbering caller-saved registers, a #PF, a #UD.
fn funcs() -> (Vec<u8>, [u64; 3]) {
    let mut a = CodeAssembler::new(64).unwrap();
    let (mut add, mut pf, mut ud) = (a.create_label(), a.create_label(), a.create_label());
    a.set_label(&mut add).unwrap();
    a.lea(rax, qword_ptr(rdi + rsi)).unwrap();
    a.xor(ecx, ecx).unwrap();
    a.xor(edx, edx).unwrap();
    a.xor(r8d, r8d).unwrap();
    a.ret().unwrap();
    a.set_label(&mut pf).unwrap();
    a.mov(rax, qword_ptr(0x7000_0000u64)).unwrap(); // not mapped
    a.ret().unwrap();
    a.set_label(&mut ud).unwrap();
    a.ud2().unwrap();
    let r = a
        .assemble_options(FUNCS, iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    let ips = [
        r.label_ip(&add).unwrap(),
        r.label_ip(&pf).unwrap(),
        r.label_ip(&ud).unwrap(),
    ];
    (r.inner.code_buffer, ips)
}

/// The guest's own exception handler: must never run during a call.
fn guest_handler() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    a.out(GUEST_IDT_HIT as i32, al).unwrap();
    a.hlt().unwrap();
    a.assemble(0xa000).unwrap()
}

/// Runs until the next exit, which must be an `out`; returns its port.
fn run_to_port(vcpu: &mut kvm_ioctls::VcpuFd) -> u16 {
    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::IoOut(port, _) => port,
        VcpuExit::Hlt => panic!("guest halted"),
        other => panic!("unexpected exit {other:?}"),
    }
}

/// The micro VM as the production call loop ([`guestcall::drive`]) sees a vCPU: each step
/// runs to the next `out`, which during a call must be one of the call ports.
struct Micro<'a>(&'a mut microvm::MicroVm);

impl CallVcpu for Micro<'_> {
    fn parts(&mut self) -> (&mut VcpuFd, &GuestMem) {
        (&mut self.0.vcpu, &self.0.mem)
    }

    fn step(&mut self) -> CallExit {
        let port = run_to_port(&mut self.0.vcpu);
        assert!(
            port == PORT_RETURN || port == PORT_EXCEPTION,
            "port {port:#x} during the call"
        );
        CallExit::Port(port)
    }
}

fn call(
    m: &mut microvm::MicroVm,
    area: &CallArea,
    safe: SafePoint,
    func: u64,
    args: [u64; 2],
) -> Result<u64, CallError> {
    let never = AtomicBool::new(false);
    let out = guestcall::drive(
        &mut Micro(m),
        0,
        area,
        safe,
        (func, args),
        &never,
        Duration::from_secs(1),
    )?;
    out.restored?;
    out.result
}

fn setup(user: bool) -> (microvm::MicroVm, CallArea, [u64; 3]) {
    let handlers = vec![0xa000u64; 32];
    let user_range = if user { COUNTER..USER_CODE + 0x1000 } else { 0..0 };
    let mut img = microvm::image(user_range.clone(), &handlers);
    // In the user variant the loop and its counter are user pages.
    let at = if user { USER_CODE } else { KCODE };
    microvm::put(&mut img, at, &looper(at));
    let (f, ips) = funcs();
    microvm::put(&mut img, FUNCS, &f);
    microvm::put(&mut img, 0xa000, &guest_handler());
    let m = microvm::start(&img, at).expect("micro VM");
    let mut r = m.vcpu.get_regs().unwrap();
    r.rflags = 0x202 | if user { 0x3000 } else { 0 }; // IF; IOPL 3 for the user loop's `out`
    m.vcpu.set_regs(&r).unwrap();
    let area = CallArea {
        va: AREA,
        gpa: AREA,
        kernel_cs: 0x10,
    };
    area.install(&m.mem).unwrap();
    (m, area, ips)
}

fn counter(m: &microvm::MicroVm) -> u64 {
    m.mem.read_obj(GuestAddress(COUNTER)).unwrap()
}

fn assert_loop_resumes(m: &mut microvm::MicroVm, before: u64) {
    for _ in 0..3 {
        assert_eq!(run_to_port(&mut m.vcpu), TICK);
    }
    assert_eq!(counter(m), before + 3, "the loop goes on where it was");
    let r = m.vcpu.get_regs().unwrap();
    assert_eq!((r.rbx, r.r12), (MAGIC, MAGIC), "its registers are intact");
}

#[test]
fn kernel_mode_vcpu_runs_a_call_and_resumes() {
    let (mut m, area, [add, pf, ud]) = setup(false);
    for _ in 0..5 {
        assert_eq!(run_to_port(&mut m.vcpu), TICK);
    }
    let safe = SafePoint { user_ok: false };
    let before = counter(&m);
    assert_eq!(call(&mut m, &area, safe, add, [40, 2]), Ok(42));
    assert_loop_resumes(&mut m, before);

    let e = call(&mut m, &area, safe, pf, [0, 0]).unwrap_err();
    assert!(
        matches!(e, CallError::Exception { vector: 14, rip, error_code: Some(_) } if rip == pf),
        "{e}"
    );
    assert!(e.to_string().contains("#PF"), "{e}");
    assert_loop_resumes(&mut m, before + 3);
    let e = call(&mut m, &area, safe, ud, [0, 0]).unwrap_err();
    assert!(
        matches!(e, CallError::Exception { vector: 6, rip, error_code: None } if rip == ud),
        "{e}"
    );
    assert_loop_resumes(&mut m, before + 6);

    // Interrupts off in the kernel is not a safe point.
    let mut r = m.vcpu.get_regs().unwrap();
    r.rflags = 2;
    m.vcpu.set_regs(&r).unwrap();
    let e = guestcall::enter(&mut m.vcpu, 0, &area, safe, add, [1, 1])
        .err()
        .unwrap();
    assert!(matches!(e, CallError::NotSafe { .. }), "{e}");
}

#[test]
fn user_mode_vcpu_is_switched_to_the_kernel_and_back() {
    let (mut m, area, [add, pf, _]) = setup(true);
    // Enter the loop in user mode (CPL 3) with a user GS base; STAR as Linux sets it.
    let mut s = m.vcpu.get_sregs().unwrap();
    s.cs.selector = 0x33;
    s.cs.dpl = 3;
    s.ss.selector = 0x2b;
    s.ss.dpl = 3;
    s.gs.base = 0x5555_0000;
    m.vcpu.set_sregs(&s).unwrap();
    let msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_STAR,
            data: (0x23u64 << 48) | (0x10u64 << 32),
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_KERNEL_GS_BASE,
            data: 0x6666_0000,
            ..Default::default()
        },
    ])
    .unwrap();
    assert_eq!(m.vcpu.set_msrs(&msrs).unwrap(), 2);
    for _ in 0..5 {
        assert_eq!(run_to_port(&mut m.vcpu), TICK);
    }
    let before = counter(&m);
    let e = guestcall::enter(&mut m.vcpu, 0, &area, SafePoint { user_ok: false }, add, [1, 1])
        .err()
        .unwrap();
    assert!(matches!(e, CallError::NotSafe { .. }), "{e}");
    let safe = SafePoint { user_ok: true };
    assert_eq!(call(&mut m, &area, safe, add, [7, 8]), Ok(15));
    assert_loop_resumes(&mut m, before);
    let s = m.vcpu.get_sregs().unwrap();
    assert_eq!(
        (s.cs.selector & 3, s.gs.base),
        (3, 0x5555_0000),
        "back in user mode, user GS"
    );
    let e = call(&mut m, &area, safe, pf, [0, 0]).unwrap_err();
    assert!(matches!(e, CallError::Exception { vector: 14, .. }), "{e}");
    assert_loop_resumes(&mut m, before + 3);
}
