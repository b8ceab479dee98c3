//! Boots the real guest kernel and checks what its userspace prints.

mod common;

use common::{boot, images, vmm};
use std::process::Stdio;

fn uname_release_from_build() -> String {
    let p = common::images_dir().join("build/include/config/kernel.release");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

/// One boot checks several things (boots are slow on a software-assisted KVM).
#[test]
fn boots_to_userspace_with_one_vcpu() {
    // The guest computes something, so the line can only come from a running shell.
    let b = boot(
        1,
        "echo LUCOS-SUM $((6*7)) $(cat /proc/sys/kernel/ostype); grep -m1 ^flags /proc/cpuinfo",
        &[],
    );
    // Our kernel (by version), our MP table, the exec of /init, then userspace.
    let banner = b.line_with("Linux version ").expect("kernel banner");
    assert!(banner.contains(&uname_release_from_build()), "{banner}");
    assert!(b.line_with("MPTABLE: Product ID: lucos-vmm").is_some(), "{}", b.dump());
    assert!(b.line_with("Run /init as init process").is_some(), "{}", b.dump());
    assert_eq!(b.code, Some(0), "{}", b.dump());
    assert!(b.line_with("LUCOS-SUM 42 Linux").is_some(), "{}", b.dump());
    let info = b.line_with("lucos-init: uname-r=").expect("init info line");
    assert!(
        info.contains(&format!("uname-r={} ", uname_release_from_build())),
        "{info}"
    );
    assert!(info.contains("nproc=1 "), "{info}");
    assert!(b.line_with("lucos-init: done").is_some(), "{}", b.dump());
    assert!(b.stderr.contains("guest rebooted"), "{}", b.dump());

    // Features the guest must not use are hidden (CPUID and/or command line), the FPU
    // basics are there.
    // (The kernel's command line echo also contains "flags": take the cpuinfo line.)
    let flags = b
        .stdout
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_else(|| panic!("no flags line\n{}", b.dump()));
    let words: Vec<&str> = flags.split_whitespace().collect();
    assert!(
        words.contains(&"fpu") && words.contains(&"sse2") && words.contains(&"fxsr"),
        "{flags}"
    );
    for hidden in ["cx16", "xsave", "avx", "avx2", "popcnt", "smap", "fsgsbase"] {
        assert!(!words.contains(&hidden), "{hidden} visible: {flags}");
    }
}

#[test]
fn boots_smp_with_two_vcpus() {
    let b = boot(
        2,
        "echo CPUS-ONLINE $(cat /sys/devices/system/cpu/online) PROCS $(grep -c ^processor /proc/cpuinfo)",
        &[],
    );
    assert_eq!(b.code, Some(0), "{}", b.dump());
    let info = b.line_with("lucos-init: uname-r=").expect("init info line");
    assert!(info.contains("nproc=2 "), "{info}");
    assert!(b.line_with("CPUS-ONLINE 0-1 PROCS 2").is_some(), "{}", b.dump());
}

#[test]
fn guest_panic_is_reported_with_exit_code_3() {
    // No such init and no /bin/sh in the cpio itself: the kernel panics.
    let (k, i) = images();
    let _slot = common::guest_slot();
    let out = vmm()
        .args(["run", "--no-stdin", "--timeout", "900", "--mem", "256M", "--kernel"])
        .arg(&k)
        .arg("--initrd")
        .arg(&i)
        .args(["--append", "rdinit=/does-not-exist init=/does-not-exist"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let b: common::Boot = out.into();
    assert_eq!(b.code, Some(3), "{}", b.dump());
    assert!(
        b.stderr.contains("guest kernel panicked: Kernel panic - not syncing"),
        "{}",
        b.dump()
    );
}

#[test]
fn timeout_stops_a_running_guest() {
    let b = common::boot_with_timeout(1, "sleep 600", 20, &[]);
    assert_eq!(b.code, Some(4), "{}", b.dump());
    assert!(b.stderr.contains("timeout"), "{}", b.dump());
}
