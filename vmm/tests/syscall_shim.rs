//! The SYSCALL privilege switch on the real /dev/kvm, with a ten-instruction guest (runs in
//! milliseconds): long mode, Linux's GDT selectors and STAR/LSTAR/SYSCALL_MASK values, a
//! user page that makes two system calls and then hits `ud2`.
//!
//! On a PVM host (native mode) a bare `syscall` reaches LSTAR still in user mode and faults;
//! with the shim from `lucos_vmm::pvm` (the same code installed into Linux guests) every
//! system call enters LSTAR at CPL 0 with the state `syscall` defines, and `sysretq` returns.
//! On any other KVM the bare guest must already behave that way.

use iced_x86::code_asm::CodeAssembler;

use kvm_ioctls::VcpuExit;
use lucos_vmm::arch::x86_64::msr::{MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK};
use lucos_vmm::host::HostKvm;
use lucos_vmm::microvm::{self, MicroVm, KCODE};
use lucos_vmm::pvm::{assemble, ShimParams};
use vm_memory::{Bytes, GuestAddress};

const STUBS: u64 = 0x9000;
const SHIM: u64 = 0xa000;
const UCODE: u64 = 0x10000;
const USTACK: u64 = 0x12000;
const LINUX_STAR: u64 = (0x23 << 48) | (0x10 << 32);
const LINUX_FMASK: u64 = 0x47700;
const PORT_READY: u16 = 0xe0;
const PORT_EXC: u16 = 0xe1;
const PORT_LSTAR: u16 = 0xe2;

/// What the guest reported at one port write.
#[derive(Debug)]
struct Report {
    port: u16,
    #[allow(dead_code)] // shown in failure messages
    rip: u64,
    cpl: u16,
    rsp: u64,
    rflags: u64,
    rax: u64,
    rcx: u64,
    r11: u64,
    /// Top of the stack (exception reports: vector, [error], RIP, CS, RFLAGS, RSP, SS).
    stack: [u64; 7],
}

struct Guest {
    code: Vec<(u64, Vec<u8>)>,
    lstar: u64,
    pf_stub: u64,
    /// RIP right after the user's first `syscall`.
    after_first: u64,
}

fn asm(f: impl FnOnce(&mut CodeAssembler)) -> CodeAssembler {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a);
    a
}

fn build_guest() -> Guest {
    use iced_x86::code_asm::*;
    // Kernel: MSRs as Linux programs them, then iretq to user mode.
    let lstar = KCODE + 0x100;
    let mut k = asm(|a| {
        let msr = |a: &mut CodeAssembler, idx: u32, val: u64| {
            a.mov(ecx, idx).unwrap();
            a.mov(eax, val as u32).unwrap();
            a.mov(edx, (val >> 32) as u32).unwrap();
            a.wrmsr().unwrap();
        };
        msr(a, 0xc000_0080, 0xd01); // EFER: SCE|LME|LMA|NXE
        msr(a, MSR_STAR, LINUX_STAR);
        msr(a, MSR_LSTAR, lstar);
        msr(a, MSR_SYSCALL_MASK, LINUX_FMASK);
        a.out(PORT_READY as i32, al).unwrap();
        a.push(0x2b).unwrap();
        a.push(USTACK as i32).unwrap();
        a.push(0x202).unwrap();
        a.push(0x33).unwrap();
        a.push(UCODE as i32).unwrap();
        a.iretq().unwrap();
    });
    let kernel = k.assemble(KCODE).unwrap();
    assert!(kernel.len() <= 0x100);
    let entry = asm(|a| {
        a.out(PORT_LSTAR as i32, al).unwrap();
        a.sysretq().unwrap();
    })
    .assemble(lstar)
    .unwrap();
    // Exception stubs, 16 bytes apart: push the vector, report, halt.
    let mut stubs = Vec::new();
    for v in 0..32u64 {
        let mut a = asm(|a| {
            a.push(v as i32).unwrap();
            let mut l: CodeLabel = a.create_label();
            a.set_label(&mut l).unwrap();
            a.out(PORT_EXC as i32, al).unwrap();
            a.hlt().unwrap();
            a.jmp(l).unwrap();
        });
        let mut b = a.assemble(STUBS + 16 * v).unwrap();
        assert!(b.len() <= 16);
        b.resize(16, 0xcc);
        stubs.extend(b);
    }
    // User: two system calls, then #UD.
    let mut u = CodeAssembler::new(64).unwrap();
    u.mov(rax, 0x1111u64).unwrap();
    u.syscall().unwrap();
    let mut after = u.create_label();
    u.set_label(&mut after).unwrap();
    u.mov(rax, 0x2222u64).unwrap();
    u.syscall().unwrap();
    u.ud2().unwrap();
    let res = u
        .assemble_options(UCODE, iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    let after_first = res.label_ip(&after).unwrap();
    let user = res.inner.code_buffer;
    Guest {
        code: vec![(KCODE, kernel), (lstar, entry), (STUBS, stubs), (UCODE, user)],
        lstar,
        pf_stub: STUBS + 16 * 14,
        after_first,
    }
}

fn run(with_shim: bool) -> Vec<Report> {
    let g = build_guest();
    let mut handlers: Vec<u64> = (0..32).map(|v| STUBS + 16 * v).collect();
    if with_shim {
        handlers[14] = SHIM;
    }
    let mut m = microvm::image(UCODE..USTACK + 0x1000, &handlers);
    if with_shim {
        let shim = assemble(&ShimParams::from_star(SHIM, g.lstar, LINUX_STAR, g.pf_stub)).unwrap();
        microvm::put(&mut m, SHIM, &shim);
    }
    for (at, bytes) in &g.code {
        microvm::put(&mut m, *at, bytes);
    }
    let MicroVm { mut vcpu, mem, .. } = microvm::start(&m, KCODE).expect("micro VM");

    let mut out = Vec::new();
    for _ in 0..16 {
        let port = match vcpu.run() {
            Ok(VcpuExit::IoOut(p, _)) => p,
            Ok(VcpuExit::Hlt) => break,
            Ok(other) => panic!("unexpected exit {other:?} after {out:#x?}"),
            Err(e) => panic!("KVM_RUN: {e} after {out:#x?}"),
        };
        let r = vcpu.get_regs().unwrap();
        let s = vcpu.get_sregs().unwrap();
        let mut stack = [0u64; 7];
        for (i, w) in stack.iter_mut().enumerate() {
            let a = r.rsp as usize + 8 * i;
            *w = mem.read_obj(GuestAddress(a as u64)).unwrap_or(0);
        }
        out.push(Report {
            port,
            rip: r.rip,
            cpl: s.cs.selector & 3,
            rsp: r.rsp,
            rflags: r.rflags,
            rax: r.rax,
            rcx: r.rcx,
            r11: r.r11,
            stack,
        });
        if port == PORT_EXC {
            break;
        }
    }
    out
}

/// Two system calls that enter LSTAR at CPL 0 with the `syscall` state, then #UD from user.
fn assert_correct_syscalls(reports: &[Report]) {
    let g = build_guest();
    let ports: Vec<u16> = reports.iter().map(|r| r.port).collect();
    assert_eq!(ports, [PORT_READY, PORT_LSTAR, PORT_LSTAR, PORT_EXC], "{reports:#x?}");
    for (r, rax) in reports[1..3].iter().zip([0x1111, 0x2222]) {
        assert_eq!((r.cpl, r.rax, r.rsp), (0, rax, USTACK), "{r:#x?}");
        assert_eq!(r.rflags & LINUX_FMASK, 0, "SYSCALL_MASK not applied: {r:#x?}");
        assert_eq!(r.r11 & 0x200, 0x200, "R11 must hold the user RFLAGS: {r:#x?}");
    }
    assert_eq!(reports[1].rcx, g.after_first);
    // sysretq went back to user mode: the ud2 after the second syscall raised #UD there.
    let ud = &reports[3];
    assert_eq!(ud.stack[0], 6, "{ud:#x?}");
    assert_eq!(ud.stack[2] & 3, 3, "#UD frame CS: {ud:#x?}");
    assert_eq!(
        ud.stack[1], reports[2].rcx,
        "#UD at the instruction after the 2nd syscall"
    );
}

#[test]
fn syscall_enters_the_kernel_with_the_shim() {
    assert_correct_syscalls(&run(true));
}

#[test]
fn bare_syscall_on_this_kvm() {
    let reports = run(false);
    if HostKvm::detect().is_pvm() {
        // The bug the shim exists for: RIP = LSTAR, still CPL 3, so the fetch faults.
        let g = build_guest();
        let pf = reports.last().unwrap();
        assert_eq!(pf.port, PORT_EXC, "{reports:#x?}");
        let [vector, err, rip, cs, rflags, rsp, _] = pf.stack;
        assert_eq!((vector, rip, cs & 3, rsp), (14, g.lstar, 3, USTACK), "{pf:#x?}");
        assert_eq!(err & 4, 4, "a user-mode fault: {pf:#x?}");
        assert_eq!(rflags & 0x200, 0, "RFLAGS already masked: {pf:#x?}");
    } else {
        assert_correct_syscalls(&reports);
    }
}
