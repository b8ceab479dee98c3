//! Real Linux 6.1 stable fixes applied live from their upstream diffs. The guest kernel is
//! built with each fix reverted (images/kernel-patches/); images/build.sh turns each
//! upstream diff (images/stable-fixes/*.patch) into a live patch with lucos-build. Each test
//! observes the bug from guest userspace, applies the fix, observes the fixed behaviour,
//! rolls back and sees the bug again.

mod common;

use std::path::PathBuf;

use common::patching::PatchedGuest;
use common::session::Session;

/// The live patch lucos-build made from `images/stable-fixes/NAME.patch`, signed for `g`.
fn fix(g: &PatchedGuest, name: &str) -> Vec<u8> {
    let ko: PathBuf = common::images_dir().join("stable-fixes").join(format!("{name}.ko"));
    let patch = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../images/stable-fixes")
        .join(format!("{name}.patch"));
    let stale = match (std::fs::metadata(&ko), std::fs::metadata(&patch)) {
        (Ok(k), Ok(p)) => k.modified().unwrap() < p.modified().unwrap(),
        _ => true,
    };
    assert!(
        !stale,
        "{} is missing or older than {}: run images/build.sh",
        ko.display(),
        patch.display()
    );
    g.keys.sign(&std::fs::read(&ko).unwrap())
}

/// `stable_probe MODE`'s line, and whether it reports the fixed behaviour.
fn stable_probe(s: &mut Session, mode: &str) -> (String, bool) {
    let out = s.run(&format!("/lucos/stable_probe {mode}"));
    let line = out
        .iter()
        .find(|l| l.starts_with(&format!("stable_probe {mode}:")))
        .unwrap_or_else(|| panic!("no probe output: {out:?}"))
        .clone();
    let fixed = line.ends_with("fixed=1");
    assert!(fixed || line.ends_with("fixed=0"), "{line}");
    (line, fixed)
}

/// Boot, see the bug, apply the fix, see it fixed, roll back, see the bug again.
fn fixed_live(name: &str, mode: &str) {
    let mut g = PatchedGuest::boot(&format!("stable-{mode}"), 1, &[]);
    let signed = fix(&g, name);
    let (before, fixed) = stable_probe(&mut g.session, mode);
    assert!(!fixed, "the image must carry the bug: {before}");
    let id = g.apply_committed(&signed);
    let (after, fixed) = stable_probe(&mut g.session, mode);
    assert!(fixed, "with the fix applied: {after} (before: {before})");
    g.rollback(id);
    let (back, fixed) = stable_probe(&mut g.session, mode);
    assert!(!fixed, "rolled back, the bug is back: {back}");
    g.shutdown();
}

#[test]
fn fcntl_refuses_rw_hint_on_immutable_inode() {
    fixed_live("fcntl-rw-hint-immutable", "rwhint");
}

#[test]
fn o_tmpfile_refuses_an_unmapped_owner() {
    fixed_live("tmpfile-unmapped-fsuid", "tmpfile");
}

#[test]
fn clone_into_cgroup_no_spurious_sigkill() {
    fixed_live("cgroup-clone-into-kill-seq", "cgkill");
}

/// (bytes /proc/self/auxv returned, first entry) after a one-entry PR_SET_MM_AUXV.
fn auxv_probe(s: &mut Session) -> (u64, String) {
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

/// `auxv_probe` sets a one-entry auxv and reads /proc/self/auxv back: the buggy kernel
/// returns the stale rest of the original vector after it, the fixed one exactly the entry
/// and AT_NULL (32 bytes).
#[test]
fn prctl_auxv_keeps_the_at_null_terminator() {
    let mut g = PatchedGuest::boot("stable-prctl", 1, &[]);
    let signed = fix(&g, "prctl-auxv-at-null");
    let (bytes, first) = auxv_probe(&mut g.session);
    assert_eq!(first, "6:4096");
    assert!(
        bytes > 32,
        "the image must carry the bug (stale auxv after the new entry): {bytes} bytes"
    );
    let id = g.apply_committed(&signed);
    assert_eq!(
        auxv_probe(&mut g.session),
        (32, "6:4096".to_string()),
        "fixed: the entry and AT_NULL only"
    );
    g.rollback(id);
    let (bytes, _) = auxv_probe(&mut g.session);
    assert!(bytes > 32, "rolled back: the bug is back ({bytes} bytes)");
    g.shutdown();
}
