//! A real Linux 6.1 stable fix applied live: the guest kernel is built with "prctl: fix
//! PR_SET_MM_AUXV losing the forced AT_NULL terminator" reverted
//! (images/kernel-patches/), guest-patches/stable-prctl-auxv ships the fix. `auxv_probe`
//! (images/initramfs/progs) sets a one-entry auxv and reads /proc/self/auxv back: buggy
//! kernels return the stale rest of the original vector after it, fixed ones exactly the
//! entry and AT_NULL (32 bytes).

mod common;

use common::patching::PatchedGuest;
use common::session::Session;

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
    let mut g = PatchedGuest::boot("patch-stable", 1, &[]);
    let signed = g.signed("stable-prctl-auxv/lucos_prctl_auxv.ko");

    let (bytes, first) = probe(&mut g.session);
    assert_eq!(first, "6:4096");
    assert!(
        bytes > 32,
        "the image must carry the bug (stale auxv after the new entry): {bytes} bytes"
    );

    let id = g.apply_committed(&signed);
    assert_eq!(
        probe(&mut g.session),
        (32, "6:4096".to_string()),
        "fixed: the entry and AT_NULL only"
    );

    g.rollback(id);
    let (bytes, _) = probe(&mut g.session);
    assert!(bytes > 32, "rolled back: the bug is back ({bytes} bytes)");
    g.shutdown();
}
