//! Micro VMs with two vCPUs running the same loop (`lucos_vmm::microvm`), for tests of
//! trapped writes that race between vCPUs. Each vCPU starts with RBX = its id, R12 =
//! `1 << id`, R15 = the iteration count and R14 = 0 (the loop's error count), runs its
//! body R15 times, then reports on [`PORT_DONE`]; a spin loop that gives up reports on
//! [`PORT_STUCK`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use kvm_ioctls::{VcpuExit, VcpuFd};
use lucos_vmm::microvm::{self, MicroVm, KCODE, KSTACK};

/// The loop is done; R14 holds its error count.
pub const PORT_DONE: u16 = 0xe0;
/// A spin loop ran out of patience (a lock nobody releases).
pub const PORT_STUCK: u16 = 0xe1;
/// Spins before a spin loop reports [`PORT_STUCK`].
pub const SPIN_LIMIT: i32 = 20_000_000;

/// Iterations per vCPU: $LUCOS_SMP_ITERS or `default`.
pub fn iterations(default: u64) -> u64 {
    std::env::var("LUCOS_SMP_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Assembles `prologue` once, then `body` in a loop of R15 iterations, then `out PORT_DONE`.
/// `body` gets the label of the error path (it bumps R14 and goes on with the next
/// iteration) and of the stuck path.
pub fn program(body: impl FnOnce(&mut CodeAssembler, CodeLabel, CodeLabel)) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lp = a.create_label();
    let mut next = a.create_label();
    let mut bad = a.create_label();
    let mut stuck = a.create_label();
    let mut done = a.create_label();
    a.xor(r14d, r14d).unwrap();
    a.set_label(&mut lp).unwrap();
    a.xor(r13d, r13d).unwrap();
    body(&mut a, bad, stuck);
    a.nop().unwrap(); // the body may end with a label
    a.set_label(&mut next).unwrap();
    a.dec(r15).unwrap();
    a.jnz(lp).unwrap();
    a.set_label(&mut done).unwrap();
    a.out(PORT_DONE as i32, al).unwrap();
    a.hlt().unwrap();
    a.jmp(done).unwrap();
    a.set_label(&mut bad).unwrap();
    a.inc(r14).unwrap();
    a.jmp(next).unwrap();
    a.set_label(&mut stuck).unwrap();
    a.out(PORT_STUCK as i32, al).unwrap();
    a.hlt().unwrap();
    a.jmp(stuck).unwrap();
    a.assemble(KCODE).unwrap()
}

/// Emits a spin step: `r13 += 1; if r13 > SPIN_LIMIT goto stuck; pause`.
pub fn spin_step(a: &mut CodeAssembler, stuck: CodeLabel) {
    a.inc(r13).unwrap();
    a.cmp(r13, SPIN_LIMIT).unwrap();
    a.jg(stuck).unwrap();
    a.pause().unwrap();
}

/// A micro VM running `code` at [`KCODE`] on two vCPUs, `iters` iterations each: vCPU 0
/// is the VM's own, vCPU 1 is returned beside it.
pub fn start(code: &[u8], iters: u64) -> (MicroVm, VcpuFd) {
    let mut img = microvm::image(0..0, &[]);
    microvm::put(&mut img, KCODE, code);
    let m = microvm::start(&img, KCODE).expect("micro VM");
    let second = m.add_vcpu(1, KCODE, KSTACK - 0x8000).expect("second vCPU");
    for (id, v) in [(0u64, &m.vcpu), (1, &second)] {
        let mut r = v.get_regs().unwrap();
        (r.rbx, r.r12, r.r15, r.r14) = (id, 1 << id, iters, 0);
        v.set_regs(&r).unwrap();
    }
    (m, second)
}

/// How one vCPU's loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuEnd {
    /// The loop reported [`PORT_DONE`].
    pub done: bool,
    /// A spin loop gave up ([`PORT_STUCK`]).
    pub stuck: bool,
    /// R14: checks that failed inside the loop.
    pub errors: u64,
    /// MMIO write exits seen.
    pub writes: u64,
}

/// Completes an MMIO write exit: `(vcpu, id, gpa, data)`; false if not a protected page.
pub type OnWrite<'a> = dyn Fn(&VcpuFd, u8, u64, &[u8]) -> bool + Sync + 'a;

/// Runs each vCPU on its own thread until it reports done or stuck (or `limit` passes:
/// then `done` and `stuck` are both false). `on_write(vcpu, id, gpa, data)` completes an
/// MMIO write exit and returns false if it was not a protected page.
pub fn run(vcpus: &mut [&mut VcpuFd], limit: Duration, on_write: &OnWrite<'_>) -> Vec<VcpuEnd> {
    let give_up = AtomicBool::new(false);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(id, v)| {
                let give_up = &give_up;
                s.spawn(move || {
                    let mut end = VcpuEnd {
                        done: false,
                        stuck: false,
                        errors: 0,
                        writes: 0,
                    };
                    while !give_up.load(Ordering::Relaxed) {
                        if t0.elapsed() > limit {
                            give_up.store(true, Ordering::Relaxed);
                            break;
                        }
                        let w = match v.run() {
                            Ok(VcpuExit::MmioWrite(addr, data)) => Some((addr, data.to_vec())),
                            Ok(VcpuExit::IoOut(PORT_DONE, _)) => {
                                end.done = true;
                                break;
                            }
                            Ok(VcpuExit::IoOut(PORT_STUCK, _)) => {
                                end.stuck = true;
                                break;
                            }
                            Ok(other) => panic!("vcpu{id}: unexpected exit {other:?}"),
                            Err(e) if e.errno() == libc::EINTR => None,
                            Err(e) => panic!("vcpu{id}: KVM_RUN: {e}"),
                        };
                        if let Some((addr, data)) = w {
                            end.writes += 1;
                            assert!(on_write(v, id as u8, addr, &data), "vcpu{id}: MMIO write at {addr:#x}");
                        }
                    }
                    end.errors = v.get_regs().unwrap().r14;
                    end
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
