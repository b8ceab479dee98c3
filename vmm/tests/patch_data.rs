//! A data patch, observed from inside the guest: /proc/lucos_demo_timeout keeps a tunable in
//! milliseconds (images/kernel-patches/0002-...); guest-patches/demo-units keeps it in
//! microseconds. A guest task is asleep inside the old write handler when the patch is
//! applied: the patch stays in `transition` with that task named in its status; the
//! current value is converted at apply; when the task wakes, its old-unit write is trapped
//! (write-protected page) and converted; then the patch commits and protection is dropped.
//! Rollback converts back.

mod common;

use common::api::{call, wait_state, Keys};
use common::session::{build_patch, tempdir, Session};
use lucos_update_server::protocol::{Op, PatchState};

fn timeout(s: &mut Session) -> String {
    let out = s.run("cat /proc/lucos_demo_timeout");
    out.into_iter()
        .find(|l| l.ends_with(" ms") || l.ends_with(" us"))
        .expect("tunable value")
}

#[test]
fn data_patch_changes_units_with_state_transfer() {
    let ko = build_patch("demo-units/lucos_demo_units.ko");
    let dir = tempdir("patch-data");
    let keys = Keys::new(&dir);
    let signed = keys.sign(&std::fs::read(&ko).unwrap());
    let sock = dir.join("api.sock");
    let mut s = Session::boot(1, &keys.vmm_args(&sock));
    assert_eq!(timeout(&mut s), "250 ms");

    // A task sleeps 20 s inside the old write handler, about to store 500 (ms).
    s.run("(echo '500 20000' > /proc/lucos_demo_timeout; echo writer-done) & sleep 2");
    let r = call(&sock, Op::Apply, None, &signed);
    assert!(r.ok, "{r:?}");
    let id = r.patches[0].id;
    let st = call(&sock, Op::Status, Some(id), &[]);
    let p = &st.patches[0];
    eprintln!("{p:#?}");
    assert_eq!(p.state, PatchState::Transition, "{p:?}");
    assert!(
        p.blockers
            .iter()
            .any(|b| b.pid.is_some() && b.at.contains("lucos_demo_write")),
        "the sleeping task is named: {p:?}"
    );
    assert!(p.data[0].protected, "write-protected: {p:?}");
    // New code reads the converted value.
    assert_eq!(timeout(&mut s), "250000 us");

    // The old writer wakes up, stores 500 in old units: converted on the way in.
    let p = wait_state(&sock, id, PatchState::Committed);
    eprintln!("{p:#?}");
    assert!(
        p.data[0].converted_writes == 1 && !p.data[0].protected,
        "one write converted, protection dropped at commit: {p:?}"
    );
    assert_eq!(timeout(&mut s), "500000 us");

    // After commit new code writes new units directly.
    s.run("echo 7 > /proc/lucos_demo_timeout");
    assert_eq!(timeout(&mut s), "7000 us");

    // Rollback: back to milliseconds.
    assert!(call(&sock, Op::Rollback, Some(id), &[]).ok);
    wait_state(&sock, id, PatchState::RolledBack);
    assert_eq!(timeout(&mut s), "7 ms");
    s.run("echo 9 > /proc/lucos_demo_timeout");
    assert_eq!(timeout(&mut s), "9 ms");
    assert_eq!(s.shutdown(), Some(0));
}
