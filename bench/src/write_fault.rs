//! Data-patch write-protection cost on the real KVM: a micro guest (`lucos_vmm::microvm`)
//! runs a loop of N 8-byte stores (or loads, or `lock add`s) to one page, with the page plain RAM or
//! write-protected through a read-only memslot (every store exits and the VMM completes it,
//! as during a data patch's transition). Prints ns per access for each case and the cost
//! of one write-fault round trip (protected store minus plain store).
//!
//! Usage: cargo run --release -p lucos-bench --bin write-fault -- [--runs N] [--writes N]

use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use kvm_ioctls::VcpuExit;
use lucos_vmm::microvm::{self, KCODE};
use lucos_vmm::protect::{pass_through, request_sync_regs, sync_regs_supported, MemSlots, WriteProtect};

const TARGET: u64 = 0x20000;
const PORT_DONE: u16 = 0xe0;

fn usage() -> ! {
    eprintln!(
        "usage: write-fault [--runs N] [--writes N]\n\
         Times N stores/loads to a plain and to a write-protected guest page (default 5 runs,\n\
         20000 accesses) and reports ns per access and the write-fault round trip."
    );
    std::process::exit(2)
}

/// What the guest's loop does to TARGET.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Store,
    Load,
    /// `lock add` (the VMM redoes it on the current value).
    LockAdd,
}

/// Guest: `rdx` accesses to TARGET, then `out PORT_DONE`, repeat.
fn guest(op: Op) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    let mut lp = a.create_label();
    a.set_label(&mut top).unwrap();
    a.xor(ecx, ecx).unwrap();
    a.set_label(&mut lp).unwrap();
    match op {
        Op::Store => a.mov(qword_ptr(TARGET), rcx).unwrap(),
        Op::Load => a.mov(rax, qword_ptr(TARGET)).unwrap(),
        Op::LockAdd => a.lock().add(qword_ptr(TARGET), rcx).unwrap(),
    }
    a.inc(rcx).unwrap();
    a.cmp(rcx, rdx).unwrap();
    a.jne(lp).unwrap();
    a.out(PORT_DONE as i32, al).unwrap();
    a.jmp(top).unwrap();
    a.assemble(KCODE).unwrap()
}

/// Median time of `runs` loops of `n` accesses; the first loop warms up.
fn measure(op: Op, protect: bool, n: u64, runs: usize) -> Result<Duration, String> {
    let mut img = microvm::image(0..0, &[]);
    microvm::put(&mut img, KCODE, &guest(op));
    let mut m = microvm::start(&img, KCODE).map_err(|e| e.to_string())?;
    let wp = WriteProtect::new(MemSlots::new(m.vm.clone(), &m.mem));
    if protect {
        wp.protect(TARGET, 8, "bench", pass_through())
            .map_err(|e| e.to_string())?;
    }
    // As the VMM's vCPU threads do: registers come with the exit where KVM can.
    let synced = protect && sync_regs_supported(&m.vm);
    request_sync_regs(&mut m.vcpu, synced);
    let mut regs = m.vcpu.get_regs().map_err(|e| e.to_string())?;
    regs.rdx = n;
    m.vcpu.set_regs(&regs).map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    for _ in 0..=runs {
        let t0 = Instant::now();
        loop {
            match m.vcpu.run() {
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    let data = data.to_vec();
                    if !wp.on_write(&m.mem, &m.vcpu, synced, 0, addr, &data) {
                        return Err(format!("unexpected MMIO write at {addr:#x}"));
                    }
                }
                Ok(VcpuExit::IoOut(PORT_DONE, _)) => break,
                Ok(other) => return Err(format!("unexpected exit {other:?}")),
                Err(e) => return Err(format!("KVM_RUN: {e}")),
            }
        }
        times.push(t0.elapsed());
    }
    times.remove(0);
    times.sort();
    Ok(times[times.len() / 2])
}

fn main() {
    let (mut runs, mut writes) = (5usize, 20_000u64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage());
        match a.as_str() {
            "--runs" => runs = val() as usize,
            "--writes" => writes = val(),
            _ => usage(),
        }
    }
    if runs == 0 || writes == 0 {
        usage();
    }
    println!("write-fault: {runs} runs of {writes} accesses each (median)");
    println!("{:<28} {:>12} {:>14}", "", "ns/access", "accesses/s");
    let mut results = Vec::new();
    for (name, op, protect) in [
        ("store, plain page", Op::Store, false),
        ("store, write-protected", Op::Store, true),
        ("load, write-protected", Op::Load, true),
        ("lock add, plain page", Op::LockAdd, false),
        ("lock add, write-protected", Op::LockAdd, true),
    ] {
        match measure(op, protect, writes, runs) {
            Ok(d) => {
                let ns = d.as_nanos() as f64 / writes as f64;
                println!("{name:<28} {ns:>12.1} {:>14.0}", 1e9 / ns);
                results.push(ns);
            }
            Err(e) => {
                eprintln!("write-fault: {name}: {e}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "write-fault round trip (protected store - plain store): {:.1} us",
        (results[1] - results[0]) / 1000.0
    );
    println!(
        "locked RMW round trip (protected lock add - plain lock add): {:.1} us",
        (results[4] - results[3]) / 1000.0
    );
}
