//! A static function whose name other kernel files use too: a patch that names it without
//! its file is refused with every candidate listed (and the guest is untouched); named
//! with its file it replaces exactly that function, observed from inside the guest.

mod common;

use common::api::{call, wait_state, Keys};
use common::session::{build_patch, tempdir, Session};
use lucos_update_server::protocol::{Op, PatchState};

/// /sys/kernel/reboot/type (kernel/reboot.c's type_show) and /sys/class/tty/ttyS0/type
/// (serial_core.c's type_show).
fn types(s: &mut Session) -> (String, String) {
    let out = s.run("echo reboot=$(cat /sys/kernel/reboot/type) tty=$(cat /sys/class/tty/ttyS0/type)");
    let line = out.into_iter().find(|l| l.starts_with("reboot=")).expect("type output");
    let (r, t) = line.split_once(" tty=").expect("both values");
    (r.trim_start_matches("reboot=").into(), t.into())
}

#[test]
fn a_shared_static_name_is_refused_bare_and_patched_with_its_file() {
    let bare = build_patch("reboot-type/lucos_reboot_type_bare.ko");
    let named = build_patch("reboot-type/lucos_reboot_type.ko");
    let dir = tempdir("patch-symbols");
    let keys = Keys::new(&dir);
    let sock = dir.join("api.sock");
    let mut s = Session::boot(1, &keys.vmm_args(&sock));
    let before = types(&mut s);
    assert_ne!(before.0, "lucos-patched", "{before:?}");
    assert!(!before.1.is_empty(), "{before:?}");

    let r = call(&sock, Op::Apply, None, &keys.sign(&std::fs::read(&bare).unwrap()));
    assert!(!r.ok, "{r:?}");
    for want in ["ambiguous", "reboot.c:type_show,1", "serial_core.c:type_show,1"] {
        assert!(r.error.contains(want), "'{want}' missing from: {}", r.error);
    }
    assert_eq!(types(&mut s), before, "a refused patch changed the guest");

    let r = call(&sock, Op::Apply, None, &keys.sign(&std::fs::read(&named).unwrap()));
    assert!(r.ok, "{r:?}");
    let id = r.patches[0].id;
    wait_state(&sock, id, PatchState::Committed);
    assert_eq!(types(&mut s), ("lucos-patched".to_string(), before.1.clone()));

    assert!(call(&sock, Op::Rollback, Some(id), &[]).ok);
    wait_state(&sock, id, PatchState::RolledBack);
    assert_eq!(types(&mut s), before);
    assert_eq!(s.shutdown(), Some(0));
}
