//! A real Linux 6.1 stable fix applied live: the guest kernel is built with "prctl: fix
//! PR_SET_MM_AUXV losing the forced AT_NULL terminator" reverted
//! (images/kernel-patches/), guest-patches/stable-prctl-auxv ships the fix. `auxv_probe`
//! (images/initramfs/progs) sets a one-entry auxv and reads /proc/self/auxv back: buggy
//! kernels return the stale rest of the original vector after it, fixed ones exactly the
//! entry and AT_NULL (32 bytes).

mod common;

use common::api::{call, wait_state, Keys};
use common::session::{build_patch, tempdir, Session};
use lucos_update_server::protocol::Op;

/// (bytes /proc/self/auxv returned, first entry) after a one-entry PR_SET_MM_AUXV.
fn probe(s: &mut Session) -> (u64, String) {
    let out = s.run("/lucos/auxv_probe");
    let line = out
        .iter()
        .find(|l| l.starts_with("auxv_probe:"))
        .unwrap_or_else(|| panic!("no probe output: {out:?}"));
    assert!(line.contains("prctl=0 "), "PR_SET_MM_AUXV failed: {line}");
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap()
            .to_string()
    };
    (field("bytes=").parse().unwrap(), field("first="))
}

#[test]
fn stable_fix_prctl_auxv_applied_live() {
    let ko = build_patch("stable-prctl-auxv/lucos_prctl_auxv.ko");
    let dir = tempdir("patch-stable");
    let keys = Keys::new(&dir);
    let signed = keys.sign(&std::fs::read(&ko).unwrap());
    let sock = dir.join("api.sock");
    let mut s = Session::boot(1, &keys.vmm_args(&sock));

    let (bytes, first) = probe(&mut s);
    assert_eq!(first, "6:4096");
    assert!(
        bytes > 32,
        "the image must carry the bug (stale auxv after the new entry): {bytes} bytes"
    );

    let r = call(&sock, Op::Apply, None, &signed);
    assert!(r.ok, "{r:?}");
    let id = r.patches[0].id;
    eprintln!("apply: {}", r.message);
    wait_state(&sock, id, "committed");
    assert_eq!(
        probe(&mut s),
        (32, "6:4096".to_string()),
        "fixed: the entry and AT_NULL only"
    );

    assert!(call(&sock, Op::Rollback, Some(id), &[]).ok);
    wait_state(&sock, id, "rolled-back");
    let (bytes, _) = probe(&mut s);
    assert!(bytes > 32, "rolled back: the bug is back ({bytes} bytes)");
    assert_eq!(s.shutdown(), Some(0));
}
