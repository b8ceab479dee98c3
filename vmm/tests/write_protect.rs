//! Write protection through read-only memslots on the real /dev/kvm (runs in milliseconds):
//! a guest writes a counter into three pages in a loop. Writes to the protected page exit
//! and are completed by the VMM (pass-through), writes to a second protected page go through
//! a transforming handler (a state transfer), writes to the unprotected page in between
//! never exit, and reads of protected pages never exit. Unprotecting restores plain RAM.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use iced_x86::code_asm::*;
use kvm_ioctls::VcpuExit;
use lucos_vmm::microvm::{self, KCODE};
use lucos_vmm::protect::{pass_through, MemSlots, ProtectError, WriteFault, WriteProtect};
use vm_memory::{Bytes, GuestAddress};

const PLAIN: u64 = 0x20000; // protected, stored as written
const FREE: u64 = 0x21000; // never protected
const SCALED: u64 = 0x22000; // protected, the handler stores value * 1000
const N: u64 = 50;
const PORT_PHASE: u16 = 0xe0;
const PORT_BAD: u16 = 0xe3;

fn guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut phase = a.create_label();
    let mut lp = a.create_label();
    let mut bad = a.create_label();
    a.set_label(&mut phase).unwrap();
    a.xor(ecx, ecx).unwrap();
    a.set_label(&mut lp).unwrap();
    a.mov(qword_ptr(PLAIN), rcx).unwrap();
    a.mov(qword_ptr(FREE), rcx).unwrap();
    a.mov(qword_ptr(SCALED), rcx).unwrap();
    a.mov(rax, qword_ptr(PLAIN)).unwrap(); // read back: the VMM completed the write
    a.cmp(rax, rcx).unwrap();
    a.jne(bad).unwrap();
    a.inc(rcx).unwrap();
    a.cmp(rcx, N as i32).unwrap();
    a.jne(lp).unwrap();
    a.out(PORT_PHASE as i32, al).unwrap();
    a.jmp(phase).unwrap();
    a.set_label(&mut bad).unwrap();
    a.out(PORT_BAD as i32, al).unwrap();
    a.hlt().unwrap();
    a.assemble(KCODE).unwrap()
}

#[test]
fn protected_writes_exit_and_are_completed_reads_do_not() {
    let mut img = microvm::image(0..0, &[]);
    microvm::put(&mut img, KCODE, &guest());
    let mut m = microvm::start(&img, KCODE).expect("micro VM");
    let wp = WriteProtect::new(MemSlots::new(m.vm.clone(), &m.mem));

    // Bad requests first.
    assert!(matches!(
        wp.protect(0x1f_f000, 0x2000, "x", pass_through()),
        Err(ProtectError::NotInOneRegion { .. })
    ));
    let plain = wp.protect(PLAIN + 8, 8, "plain", pass_through()).unwrap();
    let scale = Arc::new(|f: &WriteFault| {
        let v = u64::from_le_bytes(f.data[..8].try_into().unwrap());
        (v * 1000).to_le_bytes().to_vec()
    });
    let scaled = wp.protect(SCALED, 8, "scaled", scale).unwrap();
    assert!(matches!(
        wp.protect(PLAIN, 1, "other", pass_through()),
        Err(ProtectError::Overlap { .. })
    ));
    assert_eq!(wp.readonly_slots().len(), 2);

    let mut phases = 0;
    let mut other_exits = Vec::new();
    while phases < 2 {
        let exit = match m.vcpu.run() {
            Ok(VcpuExit::MmioWrite(addr, data)) => Some((addr, data.to_vec())),
            Ok(VcpuExit::IoOut(PORT_PHASE, _)) => {
                phases += 1;
                if phases == 1 {
                    // One exit per protected write, none for the free page or the reads.
                    assert_eq!(plain.load(Ordering::Relaxed), N);
                    assert_eq!(scaled.load(Ordering::Relaxed), N);
                    let at = |a: u64| m.mem.read_obj::<u64>(GuestAddress(a)).unwrap();
                    assert_eq!((at(PLAIN), at(FREE), at(SCALED)), (N - 1, N - 1, (N - 1) * 1000));
                    // The vCPU is outside KVM_RUN: drop protection (as after a commit).
                    wp.unprotect("plain").unwrap();
                    wp.unprotect("scaled").unwrap();
                    assert!(wp.readonly_slots().is_empty());
                    assert!(matches!(wp.unprotect("plain"), Err(ProtectError::UnknownOwner(_))));
                }
                None
            }
            Ok(other) => panic!("unexpected exit {other:?}"),
            Err(e) => panic!("KVM_RUN: {e}"),
        };
        if let Some((addr, data)) = exit {
            if !wp.on_write(&m.mem, &m.vcpu, false, 0, addr, &data) {
                other_exits.push(addr);
            }
        }
    }
    assert!(other_exits.is_empty(), "unexpected MMIO writes at {other_exits:x?}");
    // Second phase ran on plain RAM: no new faults, values stored as written.
    assert_eq!(plain.load(Ordering::Relaxed), N);
    assert_eq!(scaled.load(Ordering::Relaxed), N);
    assert_eq!(m.mem.read_obj::<u64>(GuestAddress(SCALED)).unwrap(), N - 1);
}
