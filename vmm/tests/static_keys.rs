//! Static keys in patch code, observed from inside a real guest: the statickey patch's
//! /proc/version reports three static branches (a 2-byte and a 5-byte NOP site, and a jmp
//! site of the other polarity) on the `signal_generate` tracepoint's key. The branches
//! start in the key's state and follow it when guest userspace enables or disables the
//! event in tracefs: the guest kernel itself rewrites the patch's sites, through the node
//! lucos put on the key's list. After a rollback the original is back and flips go on
//! working; a second apply while the key is on reuses the node.

mod common;

use common::api::{call, wait_state, Keys};
use common::session::{build_patch, tempdir, Session};
use lucos_update_server::protocol::{Op, PatchState};

const ENABLE: &str = "/sys/kernel/tracing/events/signal/signal_generate/enable";

fn version(s: &mut Session) -> String {
    s.run("cat /proc/version").join("\n")
}

fn flip(s: &mut Session, on: bool) {
    let v = u8::from(on);
    let out = s.run(&format!("echo {v} > {ENABLE}; cat {ENABLE}"));
    assert_eq!(out.last().map(String::as_str), Some(&*v.to_string()), "{out:?}");
}

fn branches(on: bool) -> String {
    let v = u8::from(on);
    format!("lucos-statickey short={v} long={v} likely={v}")
}

#[test]
fn static_branches_in_patch_code_follow_the_guest_key() {
    let ko = build_patch("statickey/lucos_statickey.ko");
    let dir = tempdir("static-keys");
    let keys = Keys::new(&dir);
    let sock = dir.join("api.sock");
    let mut s = Session::boot(1, &keys.vmm_args(&sock));
    s.run("dmesg -n 1; mount -t tracefs nodev /sys/kernel/tracing");
    let original = version(&mut s);
    assert!(original.starts_with("Linux version"), "{original}");
    let signed = keys.sign(&std::fs::read(&ko).unwrap());

    // Applied with the key off: the sites as built.
    let r = call(&sock, Op::Apply, None, &signed);
    assert!(r.ok, "{r:?}");
    let id = r.patches[0].id;
    let info = wait_state(&sock, id, PatchState::Committed);
    eprintln!(
        "apply (key off): vCPUs paused {} us, apply {} us",
        info.pause_us, info.apply_us
    );
    assert_eq!(version(&mut s), branches(false));
    // The guest flips the key: its jump_label_update() patches the patch code too.
    flip(&mut s, true);
    assert_eq!(version(&mut s), branches(true));
    flip(&mut s, false);
    assert_eq!(version(&mut s), branches(false));
    flip(&mut s, true);
    assert_eq!(version(&mut s), branches(true));

    // Rolled back with the key on; the key goes on working without the patch.
    assert!(call(&sock, Op::Rollback, Some(id), &[]).ok);
    wait_state(&sock, id, PatchState::RolledBack);
    assert_eq!(version(&mut s), original);
    flip(&mut s, false);
    flip(&mut s, true);
    assert_eq!(version(&mut s), original);

    // Applied again while the key is on: the sites are set from the key's state at apply.
    let r = call(&sock, Op::Apply, None, &signed);
    assert!(r.ok, "{r:?}");
    let id = r.patches[0].id;
    let info = wait_state(&sock, id, PatchState::Committed);
    eprintln!(
        "apply (key on, node reused): vCPUs paused {} us, apply {} us",
        info.pause_us, info.apply_us
    );
    assert_eq!(version(&mut s), branches(true));
    flip(&mut s, false);
    assert_eq!(version(&mut s), branches(false));
    assert!(call(&sock, Op::Rollback, Some(id), &[]).ok);
    wait_state(&sock, id, PatchState::RolledBack);
    flip(&mut s, true);
    assert_eq!(version(&mut s), original);

    let log = s.run("dmesg").join("\n");
    for bad in ["jump_label", "BUG", "Oops", "WARNING"] {
        assert!(!log.contains(bad), "{bad} in the guest log:\n{log}");
    }
    assert_eq!(s.shutdown(), Some(0));
}
