//! End to end: a live code patch of `cmdline_proc_show`, applied from outside the guest
//! over the API socket, observed from inside the guest, rolled back; bad submissions are
//! refused and leave the guest untouched.

mod common;

use common::api::{call, wait_state, Keys};
use common::session::{build_patch, tempdir, Session};
use lucos_update_server::protocol::{Op, PatchState};
use lucos_update_server::signing;

fn cmdline(s: &mut Session) -> String {
    let out = s.run("cat /proc/cmdline");
    out.into_iter()
        .find(|l| l.contains("console=ttyS0"))
        .expect("cmdline output")
}

#[test]
fn cmdline_patch_apply_observe_rollback() {
    let ko = build_patch("cmdline/lucos_cmdline.ko");
    let dir = tempdir("patch-cmdline");
    let keys = Keys::new(&dir);
    let module = std::fs::read(&ko).unwrap();
    let signed = keys.sign(&module);
    let sock = dir.join("api.sock");

    let mut s = Session::boot(1, &keys.vmm_args(&sock));
    let before = cmdline(&mut s);
    assert!(!before.starts_with("lucos-patched"), "{before}");

    // Refusals first: the guest must be untouched by each.
    let r = call(&sock, Op::Apply, None, &module);
    assert!(!r.ok && r.error.contains("not signed"), "{r:?}");
    let other = signing::load_signing_key(&{
        let (o, _) = signing::generate_keypair().unwrap();
        std::fs::write(dir.join("o.key"), o).unwrap();
        dir.join("o.key")
    })
    .unwrap();
    let binding = signing::Binding {
        kernel_id: keys.kernel_id.clone(),
        version: 1,
    };
    let r = call(
        &sock,
        Op::Apply,
        None,
        &signing::sign(&module, &binding, &other).unwrap(),
    );
    assert!(!r.ok && r.error.contains("does not trust"), "{r:?}");
    let r = call(&sock, Op::Apply, None, &signed[100..]);
    assert!(!r.ok && r.error.contains("truncated"), "{r:?}");
    let r = call(&sock, Op::Apply, None, &keys.sign(b"\x7fELF garbage"));
    assert!(!r.ok && r.error.contains("invalid patch module"), "{r:?}");
    let r = call(&sock, Op::Rollback, Some(42), &[]);
    assert!(!r.ok && r.error.contains("no patch with id 42"), "{r:?}");
    assert_eq!(cmdline(&mut s), before, "refused submissions changed the guest");

    // Apply.
    let r = call(&sock, Op::Apply, None, &signed);
    assert!(r.ok, "{r:?}");
    let id = r.patches[0].id;
    eprintln!("apply: {}", r.message);
    let r = wait_state(&sock, id, PatchState::Committed);
    eprintln!("status: {r:#?}");
    let after = cmdline(&mut s);
    assert_eq!(after, format!("lucos-patched {before}"));

    // Roll back.
    let r = call(&sock, Op::Rollback, Some(id), &[]);
    assert!(r.ok, "{r:?}");
    wait_state(&sock, id, PatchState::RolledBack);
    assert_eq!(cmdline(&mut s), before);
    let r = call(&sock, Op::Rollback, Some(id), &[]);
    assert!(!r.ok && r.error.contains("already rolled-back"), "{r:?}");

    // Apply again after rollback works (memory was freed and is reusable).
    let r = call(&sock, Op::Apply, None, &signed);
    assert!(r.ok, "{r:?}");
    let id2 = r.patches[0].id;
    wait_state(&sock, id2, PatchState::Committed);
    assert!(cmdline(&mut s).starts_with("lucos-patched "));
    assert!(call(&sock, Op::Rollback, Some(id2), &[]).ok);
    wait_state(&sock, id2, PatchState::RolledBack);

    assert_eq!(s.shutdown(), Some(0));
}
