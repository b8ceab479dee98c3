//! A live patch to a guest kernel module: xfs (built as a module, loaded with `modprobe` in
//! the guest). images/build.sh turns images/module-patches/xfs-stats-line.patch (one more
//! line in `xfs_stats_format`, which /sys/fs/xfs/stats/stats prints) into a live patch with
//! lucos-build; it replaces `xfs::xfs_stats_format` and links against xfs's own symbols
//! (`xfs::xstats.0`, a static table). Observed from guest userspace: the patch is refused
//! while xfs is not loaded; applied, the new line shows and `rmmod xfs` is refused (lucos
//! holds a reference); rolled back, the line is gone, the reference dropped, xfs unloads,
//! and the patch is refused again.

mod common;

use common::patching::PatchedGuest;
use common::session::Session;
use lucos_update_server::protocol::Op;

const LINE: &str = "lucos live-patched";

/// The live patch images/build.sh built from images/module-patches/NAME.patch, signed.
fn module_patch(g: &PatchedGuest, name: &str) -> Vec<u8> {
    let ko = common::images_dir().join("module-patches").join(format!("{name}.ko"));
    let patch = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../images/module-patches")
        .join(format!("{name}.patch"));
    let fresh = match (std::fs::metadata(&ko), std::fs::metadata(&patch)) {
        (Ok(k), Ok(p)) => k.modified().unwrap() >= p.modified().unwrap(),
        _ => false,
    };
    assert!(
        fresh,
        "{} is missing or older than {}: run images/build.sh",
        ko.display(),
        patch.display()
    );
    g.keys.sign(&std::fs::read(&ko).unwrap())
}

/// xfs's line of /proc/modules (`xfs SIZE REFS DEPS STATE ADDR`), if it is loaded.
fn xfs_line(s: &mut Session) -> Option<String> {
    s.run("grep '^xfs ' /proc/modules")
        .into_iter()
        .find(|l| l.starts_with("xfs "))
}

/// The users count /proc/modules shows for xfs (`refcnt` minus the module's own).
fn xfs_refs(s: &mut Session) -> u32 {
    let l = xfs_line(s).expect("xfs is loaded");
    l.split_whitespace()
        .nth(2)
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("{l}"))
}

/// Whether /sys/fs/xfs/stats/stats (xfs_stats_format's output) has the patch's line.
fn patched(s: &mut Session) -> bool {
    let out = s.run("cat /sys/fs/xfs/stats/stats");
    assert!(out.iter().any(|l| l.starts_with("xpc ")), "no xfs stats: {out:?}");
    out.iter().any(|l| l.trim() == LINE)
}

/// The exit status of `cmd` in the guest, and its output.
fn status(s: &mut Session, cmd: &str) -> (i32, Vec<String>) {
    let mut out = s.run(&format!("{cmd} 2>&1; echo @@RC=$?"));
    let rc = out
        .pop()
        .and_then(|l| l.trim().strip_prefix("@@RC=").and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("`{cmd}`: no exit status"));
    (rc, out)
}

fn assert_refused_unloaded(g: &PatchedGuest, signed: &[u8]) {
    let r = g.call(Op::Apply, None, signed);
    assert!(!r.ok, "a patch for an unloaded module was applied: {r:?}");
    for want in ["module 'xfs'", "xfs::xfs_stats_format", "not loaded"] {
        assert!(r.error.contains(want), "'{want}' missing from: {}", r.error);
    }
}

#[test]
fn a_module_function_is_patched_pinned_and_rolled_back() {
    let mut g = PatchedGuest::boot("patch-kmod", 1, &[]);
    let signed = module_patch(&g, "xfs-stats-line");

    assert!(xfs_line(&mut g.session).is_none(), "xfs is not loaded at boot");
    assert_refused_unloaded(&g, &signed);

    let (rc, out) = status(&mut g.session, "modprobe xfs");
    assert_eq!(rc, 0, "modprobe xfs: {out:?}");
    assert!(!patched(&mut g.session), "the image has no patch line");
    assert_eq!(xfs_refs(&mut g.session), 0);

    let id = g.apply_committed(&signed);
    assert!(patched(&mut g.session), "applied: xfs_stats_format prints the new line");
    let info = g.wait(id, lucos_update_server::protocol::PatchState::Committed);
    assert_eq!(info.modules, vec!["xfs".to_string()]);
    assert_eq!(xfs_refs(&mut g.session), 1, "lucos holds a reference on xfs");
    let (rc, out) = status(&mut g.session, "rmmod xfs");
    assert_ne!(rc, 0, "rmmod of a patched module must fail: {out:?}");
    assert!(
        out.iter().any(|l| l.contains("Resource temporarily unavailable")),
        "rmmod fails with EWOULDBLOCK: {out:?}"
    );
    assert!(patched(&mut g.session), "still loaded and patched");

    g.rollback(id);
    assert!(!patched(&mut g.session), "rolled back: the original function");
    assert_eq!(xfs_refs(&mut g.session), 0, "the reference is dropped");
    let (rc, out) = status(&mut g.session, "rmmod xfs");
    assert_eq!(rc, 0, "rmmod after the rollback: {out:?}");
    assert!(xfs_line(&mut g.session).is_none());
    assert_refused_unloaded(&g, &signed);
    g.shutdown();
}
