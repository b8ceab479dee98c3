//! Patch code with the kernel's own bookkeeping, observed from inside a real guest: the
//! getcpu patch uses inline user-memory accessors (exception table), WARN_ONCE and BUG()
//! (BUG table); the guest kernel finds them, and the patch's ORC data and symbols,
//! through the `struct module` lucos registers for the patch.

mod common;

use common::api::{call, wait_state, Keys};
use common::session::{build_patch, tempdir, Session};
use lucos_update_server::protocol::{Op, PatchState};

const EFAULT: &str = "-14";

/// `getcpu_probe`'s results: (valid ret, cpu, null ret, unmapped ret, warn ret).
fn probe(s: &mut Session) -> [String; 5] {
    let out = s.run("/lucos/getcpu_probe");
    let field = |what: &str, key: &str| -> String {
        let l = out
            .iter()
            .find(|l| l.starts_with(&format!("getcpu_probe {what} ")))
            .unwrap_or_else(|| panic!("no '{what}' line in {out:?}"));
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {l}"))
            .to_string()
    };
    assert!(out.iter().any(|l| l == "getcpu_probe done"), "{out:?}");
    [
        field("valid", "ret="),
        field("valid", "cpu="),
        field("null", "ret="),
        field("unmapped", "ret="),
        field("warn", "ret="),
    ]
}

fn dmesg(s: &mut Session) -> String {
    s.run("dmesg").join("\n")
}

#[test]
fn exception_bug_and_unwind_tables_work_in_patch_code() {
    let ko = build_patch("getcpu/lucos_getcpu.ko");
    let dir = tempdir("kernel-tables");
    let keys = Keys::new(&dir);
    let sock = dir.join("api.sock");
    let mut s = Session::boot(1, &keys.vmm_args(&sock));
    s.run("dmesg -n 1"); // kernel messages off the console, read with dmesg instead

    // The kernel's getcpu: 0, and a NULL pointer is skipped.
    let before = probe(&mut s);
    assert_eq!(
        before,
        ["0", "0", "0", EFAULT, EFAULT].map(String::from),
        "original getcpu"
    );

    let r = call(&sock, Op::Apply, None, &keys.sign(&std::fs::read(&ko).unwrap()));
    assert!(r.ok, "{r:?}");
    let id = r.patches[0].id;
    wait_state(&sock, id, PatchState::Committed);

    // Faults on NULL and unmapped pointers inside patch code are fixed up to -EFAULT.
    let after = probe(&mut s);
    assert_eq!(
        after,
        ["1000", "0", EFAULT, EFAULT, EFAULT].map(String::from),
        "patched getcpu"
    );
    let log = dmesg(&mut s);
    assert!(!log.contains("Oops") && !log.contains("unable to handle"), "{log}");
    // The WARN: the kernel's report, with the patch function, its file:line and module,
    // and a stack trace that goes on past the patch code to the syscall entry.
    let warn = log
        .lines()
        .position(|l| l.contains("WARNING: CPU:") && l.contains("lucos_getcpu.c:"))
        .unwrap_or_else(|| panic!("no WARNING from the patch in:\n{log}"));
    let rest: Vec<&str> = log.lines().skip(warn).take(60).collect();
    let trace = rest.join("\n");
    // WARN_ONCE prints its message just before the report.
    assert!(
        log.lines()
            .nth(warn.saturating_sub(1))
            .is_some_and(|l| l.contains("lucos getcpu: warning asked for")),
        "{log}"
    );
    assert!(trace.contains("RIP: 0010:lucos_do_getcpu+"), "{trace}");
    assert!(trace.contains("[lucos_getcpu]"), "module name in the trace:\n{trace}");
    // ORC: from the patch function the unwinder finds its caller for sure (a frame it
    // only guessed at would be printed with '?'): lucos_sys_getcpu tail-calls
    // lucos_do_getcpu, so the caller is do_syscall_64.
    let entry = rest
        .iter()
        .find(|l| l.contains("do_syscall_64+"))
        .unwrap_or_else(|| panic!("the unwinder did not get past the patch code:\n{trace}"));
    assert!(!entry.contains(" ? "), "an unreliable frame: {entry}\n{trace}");
    // WARN_ONCE: once.
    probe(&mut s);
    assert_eq!(dmesg(&mut s).matches("lucos getcpu: warning asked for").count(), 1);

    // A task asleep in patch code: /proc/PID/stack names the patch function and goes on
    // to the syscall entry.
    let out = s.run("/lucos/getcpu_probe sleep & sleep 1; cat /proc/$!/stack; wait");
    let stack = out.join("\n");
    let at = out
        .iter()
        .position(|l| l.contains("lucos_do_getcpu+") && l.contains("[lucos_getcpu]"))
        .unwrap_or_else(|| panic!("patch function not in /proc/PID/stack:\n{stack}"));
    assert!(out[at..].iter().any(|l| l.contains("do_syscall_64+")), "{stack}");
    assert!(out.iter().any(|l| l.contains("getcpu_probe sleep ret=1001")), "{stack}");
    // ...and so does the kernel's own dump of every task (sysrq-t), from the task's frame
    // in patch code on to the syscall entry.
    // The dump holds every task, thousands of lines: only getcpu_probe's part (up to the
    // next task) crosses the serial console, and the log is cleared for what follows.
    s.run("dmesg -c >/dev/null; /lucos/getcpu_probe sleep & sleep 1; echo t > /proc/sysrq-trigger; wait");
    let out = s.run(
        "dmesg -c >/tmp/sysrq-t; echo tasks=$(grep -c task: /tmp/sysrq-t); \
         sed -n '/task:getcpu_probe/,/task:/p' /tmp/sysrq-t; rm /tmp/sysrq-t",
    );
    let log = out.join("\n");
    let lines: Vec<&str> = log.lines().collect();
    let task = lines
        .iter()
        .position(|l| l.contains("task:getcpu_probe"))
        .unwrap_or_else(|| panic!("no getcpu_probe in the sysrq-t dump:\n{log}"));
    let at = lines[task..]
        .iter()
        .position(|l| l.contains("lucos_do_getcpu+") && l.contains("[lucos_getcpu]"))
        .map(|i| task + i)
        .unwrap_or_else(|| panic!("patch function not in getcpu_probe's sysrq-t trace:\n{log}"));
    assert!(
        lines[at..].iter().take(12).any(|l| l.contains("do_syscall_64+")),
        "the sysrq-t trace stops at the patch code:\n{log}"
    );

    // BUG() kills the calling task as in the kernel; the guest goes on.
    let out = s.run("sh -c '/lucos/getcpu_probe bug' 2>/dev/null; echo bug-status=$?");
    assert!(
        out.iter().any(|l| l.starts_with("bug-status=") && l != "bug-status=0"),
        "{out:?}"
    );
    let log = dmesg(&mut s);
    assert!(
        log.contains("kernel BUG at") && log.contains("lucos_getcpu.c:"),
        "{log}"
    );
    assert!(log.contains("lucos_do_getcpu+"), "{log}");

    // Rolled back: the kernel forgets the code, the original is back.
    assert!(call(&sock, Op::Rollback, Some(id), &[]).ok);
    wait_state(&sock, id, PatchState::RolledBack);
    assert_eq!(probe(&mut s), before);
    assert_eq!(s.shutdown(), Some(0));
}
