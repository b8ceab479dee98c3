//! Retpoline and return-thunk sites of patch code, observed from inside a real guest: the
//! thunks patch's /proc/cmdline shows a return site and an indirect-branch site of two
//! vmlinux functions as the kernel rewrote them at boot, and the same sites of two patch
//! functions compiled to the same instructions as lucos rewrote them. They must agree: with
//! the guest's default mitigations and with `mitigations=off` (plain `ret` and `jmp *%rax`).

mod common;

use common::api::{call, wait_state, Keys};
use common::session::{build_patch, tempdir, Session};
use lucos_update_server::protocol::{Op, PatchState};

fn sites(tag: &str, append: Option<&str>) -> Vec<(String, String)> {
    let ko = build_patch("thunks/lucos_thunks.ko");
    let dir = tempdir(tag);
    let keys = Keys::new(&dir);
    let sock = dir.join("api.sock");
    let mut args: Vec<&str> = keys.vmm_args(&sock).to_vec();
    if let Some(a) = append {
        args.extend(["--append", a]);
    }
    let mut s = Session::boot(1, &args);
    let original = s.run("cat /proc/cmdline").join("\n");
    let r = call(&sock, Op::Apply, None, &keys.sign(&std::fs::read(&ko).unwrap()));
    assert!(r.ok, "{r:?}");
    let id = r.patches[0].id;
    wait_state(&sock, id, PatchState::Committed);
    let out = s.run("cat /proc/cmdline").join("\n");
    eprintln!("{append:?}: {out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("lucos-thunks"))
        .unwrap_or_else(|| panic!("{out}"));
    let fields: Vec<(String, String)> = line
        .split_whitespace()
        .skip(1)
        .map(|f| {
            let (k, v) = f.split_once('=').unwrap_or_else(|| panic!("{line}"));
            (k.to_string(), v.to_string())
        })
        .collect();
    assert!(call(&sock, Op::Rollback, Some(id), &[]).ok);
    wait_state(&sock, id, PatchState::RolledBack);
    assert_eq!(s.run("cat /proc/cmdline").join("\n"), original);
    assert_eq!(s.shutdown(), Some(0));
    fields
}

fn check(fields: &[(String, String)]) {
    let get = |k: &str| {
        &fields
            .iter()
            .find(|f| f.0 == k)
            .unwrap_or_else(|| panic!("{k}: {fields:?}"))
            .1
    };
    assert_eq!(get("patch-ret"), get("kernel-ret"), "return site: {fields:?}");
    assert_eq!(
        get("patch-icall"),
        get("kernel-icall"),
        "indirect branch site: {fields:?}"
    );
}

#[test]
fn thunk_sites_match_the_kernels_with_default_mitigations() {
    check(&sites("thunks-default", None));
}

#[test]
fn thunk_sites_match_the_kernels_with_mitigations_off() {
    let f = sites("thunks-off", Some("mitigations=off"));
    check(&f);
    // No return thunk and no retpoline: `ret; int3...` and `jmp *%rax; int3; nop2`.
    let get = |k: &str| f.iter().find(|x| x.0 == k).map(|x| x.1.as_str());
    assert_eq!(get("patch-ret"), Some("c3cccccccc"), "{f:?}");
    assert_eq!(get("patch-icall"), Some("ffe0cc6690"), "{f:?}");
}
