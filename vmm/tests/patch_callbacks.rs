//! Patch callbacks: guest code the update server runs from outside the guest.
//!
//! - The LUCOS deadlock example (images/kernel-patches/0003-...): /proc/lucos_demo_lock
//!   leaks its lock on an error path; two writers block inside the old function. The
//!   deadlock-fix patch replaces the function and its apply callback releases the stuck
//!   lock: the blocked writers complete, their thread callbacks run as they leave the old
//!   code, the patch commits, and the error path no longer leaks.
//! - A callback that faults and one that never returns: the update is aborted, the patch
//!   rolled back, the guest keeps running the original code. A data patch whose callback
//!   faults after its global was converted and write-protected: the value is converted
//!   back and no guest page stays read-only. Data rules naming a missing global or kernel
//!   text are refused before anything is written.
//!
//! One boot (2 vCPUs) for all of it: boots are slow on a software-assisted KVM.

mod common;

use common::api::{call, wait_state, Keys};
use common::session::{build_patch, tempdir, Session};
use lucos_update_server::protocol::{Op, PatchState};

fn lock_state(s: &mut Session) -> String {
    s.run("cat /proc/lucos_demo_lock")
        .into_iter()
        .find(|l| l.starts_with("value "))
        .expect("lock state line")
}

fn waiters(state: &str) -> u32 {
    state.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn callbacks_fix_a_deadlock_and_failing_callbacks_roll_back() {
    let dir = tempdir("patch-callbacks");
    let keys = Keys::new(&dir);
    let sign = |rel: &str| keys.sign(&std::fs::read(build_patch(rel)).unwrap());
    let (missing, text) = (
        sign("bad-data/lucos_bad_data_missing.ko"),
        sign("bad-data/lucos_bad_data_text.ko"),
    );
    let (fault, hang, fault_data, fix) = (
        sign("callback-faults/lucos_cb_fault.ko"),
        sign("callback-faults/lucos_cb_hang.ko"),
        sign("callback-faults/lucos_cb_fault_data.ko"),
        sign("deadlock-fix/lucos_deadlock_fix.ko"),
    );
    let sock = dir.join("api.sock");
    let mut s = Session::boot(2, &keys.vmm_args(&sock));
    s.run("dmesg -n 1"); // kernel messages off the console: they would interleave
    let cmdline = s.run("cat /proc/cmdline");

    // Bad data objects: refused before the guest is touched (no patch is created).
    for (ko, want) in [
        (&missing, "data object 'lucos_no_such_global': no symbol"),
        (&text, "lies in kernel text"),
    ] {
        let r = call(&sock, Op::Apply, None, ko);
        assert!(!r.ok && r.error.contains(want), "{r:?}");
    }
    assert!(call(&sock, Op::List, None, &[]).patches.is_empty());
    assert_eq!(s.run("cat /proc/cmdline"), cmdline);

    // Failing callbacks: the update is aborted and rolled back, the guest is unharmed.
    for (ko, want) in [(&fault, "#PF"), (&hang, "did not return within")] {
        let r = call(&sock, Op::Apply, None, ko);
        assert!(!r.ok, "{r:?}");
        assert!(r.error.contains(want) && r.error.contains("rolled back"), "{}", r.error);
        eprintln!("refused as expected: {}", r.error);
        assert_eq!(s.run("cat /proc/cmdline"), cmdline, "original code still runs");
    }
    let tunable = s.run("cat /proc/lucos_demo_timeout");
    let r = call(&sock, Op::Apply, None, &fault_data);
    assert!(!r.ok && r.error.contains("#PF"), "{r:?}");
    assert_eq!(s.run("cat /proc/lucos_demo_timeout"), tunable, "value converted back");
    s.run("echo 300 > /proc/lucos_demo_timeout");
    assert_eq!(s.run("cat /proc/lucos_demo_timeout"), ["300 ms"]);
    let list = call(&sock, Op::List, None, &[]);
    assert_eq!(list.patches.len(), 3, "{list:?}");
    for p in &list.patches {
        wait_state(&sock, p.id, PatchState::RolledBack);
    }
    let list = call(&sock, Op::List, None, &[]);
    assert_eq!(list.readonly_pages, Some(0), "no guest page left read-only: {list:?}");

    // The bug: a negative value leaves the lock held; later writers block.
    s.run("echo 5 > /proc/lucos_demo_lock");
    assert_eq!(lock_state(&mut s), "value 5 holder 0 waiters 0");
    s.run("sh -c 'echo -1 > /proc/lucos_demo_lock'; echo rc=$?");
    s.run("(echo 7 > /proc/lucos_demo_lock && echo done > /tmp/w7) & true");
    s.run("(echo 8 > /proc/lucos_demo_lock && echo done > /tmp/w8) & true");
    s.run("sleep 3");
    let st = lock_state(&mut s);
    assert_eq!(waiters(&st), 2, "both writers blocked: {st}");
    assert!(s.run("cat /tmp/w7 /tmp/w8 2>&1").iter().all(|l| !l.contains("done")));

    // The fix: new code plus an apply callback that releases the stuck lock.
    let r = call(&sock, Op::Apply, None, &fix);
    assert!(r.ok, "{r:?}");
    let id = r.patches[0].id;
    let p = wait_state(&sock, id, PatchState::Committed);
    let log = &p.callback_log;
    eprintln!("{p:#?}");
    assert!(
        log.iter()
            .any(|l| l.contains("apply callback 'release_stuck_lock': returned 0")),
        "{log:?}"
    );
    // Both writers were found in the old function and left it.
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("thread callback 'old_writer_left' for task"))
            .count(),
        2,
        "{log:?}"
    );
    let out = s.run("sleep 1; cat /tmp/w7 /tmp/w8");
    assert_eq!(out.iter().filter(|l| l.trim() == "done").count(), 2, "{out:?}");
    let st = lock_state(&mut s);
    assert!(st.ends_with("holder 0 waiters 0"), "{st}");
    let log = s.run("dmesg | grep 'lucos deadlock-fix'");
    assert!(log.iter().any(|l| l.contains("releasing lucos_demo_sem")), "{log:?}");
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("left the old lucos_demo_lock_write"))
            .count(),
        2,
        "{log:?}"
    );

    // The error path no longer leaks the lock.
    s.run("sh -c 'echo -1 > /proc/lucos_demo_lock'");
    s.run("echo 9 > /proc/lucos_demo_lock");
    assert_eq!(lock_state(&mut s), "value 9 holder 0 waiters 0");

    assert!(call(&sock, Op::Rollback, Some(id), &[]).ok);
    wait_state(&sock, id, PatchState::RolledBack);
    assert_eq!(s.shutdown(), Some(0));
}
