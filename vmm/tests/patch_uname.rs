//! A syscall-path patch under load: `uname_loop` (images/initramfs/progs) calls uname(2) in
//! a tight loop on every vCPU and classifies each result as old, new or mixed while the
//! `__x64_sys_newuname` patch is applied and rolled back 100 times from outside the guest.
//! No call may crash or see half of each version, and both versions must be seen.

mod common;

use common::api::{call, wait_state};
use common::patching::PatchedGuest;
use lucos_update_server::protocol::{Op, PatchState};

const CYCLES: usize = 100;
const VCPUS: u8 = 2;

#[test]
fn uname_patch_100_apply_rollback_cycles_under_load() {
    let g = PatchedGuest::boot("patch-uname", VCPUS, &[]);
    let signed = g.signed("uname/lucos_uname.ko");
    let mut s = g.session;

    let online = s.run("cat /sys/devices/system/cpu/online");
    assert!(online.iter().any(|l| l.trim() == "0-1"), "{online:?}");
    // One loop pinned to each vCPU.
    s.run("rm -f /tmp/stop; for c in 0 1; do taskset -c $c /lucos/uname_loop > /tmp/loop$c 2>&1 & done; sleep 2");
    let started = s.run("cat /tmp/loop0 /tmp/loop1");
    assert_eq!(
        started.iter().filter(|l| l.contains("uname_loop: running")).count(),
        2,
        "{started:?}"
    );

    let mut pauses = Vec::new();
    for i in 0..CYCLES {
        let r = call(&g.sock, Op::Apply, None, &signed);
        assert!(r.ok, "cycle {i}: apply: {r:?}");
        let id = r.patches[0].id;
        pauses.push((r.patches[0].pause_us, r.patches[0].apply_us));
        wait_state(&g.sock, id, PatchState::Committed);
        let r = call(&g.sock, Op::Rollback, Some(id), &[]);
        assert!(r.ok, "cycle {i}: rollback: {r:?}");
        wait_state(&g.sock, id, PatchState::RolledBack);
    }
    let (pause, apply) = pauses.last().unwrap();
    eprintln!("last apply: vCPUs paused {pause} us, apply {apply} us");

    s.run("touch /tmp/stop; wait");
    let results = s.run("cat /tmp/loop0 /tmp/loop1; uname -s");
    let summaries: Vec<&String> = results.iter().filter(|l| l.contains("calls=")).collect();
    assert_eq!(
        summaries.len(),
        2,
        "both loops must finish without crashing: {results:?}"
    );
    for l in &summaries {
        let field = |k: &str| -> u64 {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in {l}"))
        };
        assert_eq!(field("mixed="), 0, "{l}");
        assert!(
            field("old=") > 0 && field("new=") > 0,
            "both versions must be seen: {l}"
        );
    }
    assert_eq!(
        results.last().map(|l| l.trim()),
        Some("Linux"),
        "rolled back at the end"
    );
    eprintln!(
        "{}",
        summaries.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(s.shutdown(), Some(0));
}
