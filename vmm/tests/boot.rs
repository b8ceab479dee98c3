//! Boots the real guest kernel and checks what its userspace prints.

mod common;

use common::boot;
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
        "echo LUCOS-SUM $((6*7)) $(cat /proc/sys/kernel/ostype); grep -m1 ^flags /proc/cpuinfo; \
         echo LUCOS-TAINTED $(cat /proc/sys/kernel/tainted)",
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

    // The guest's CPU is the one `--print-config` promises for this host: on hardware KVM
    // every reported feature KVM offers (SMAP, XSAVE, AVX, ... where the CPU has them),
    // on PVM none of those its emulator lacks. The FPU basics are always there.
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
    let config = common::print_config();
    for f in config["features"].as_array().expect("features") {
        let name = f["name"].as_str().unwrap();
        let guest = f["guest"].as_bool().unwrap();
        assert_eq!(
            words.contains(&name),
            guest,
            "{name}: --print-config says guest={guest}; {flags}"
        );
    }
    // clearcpuid= taints the kernel (TAINT_CPU_OUT_OF_SPEC, bit 2): only PVM needs it.
    let tainted: u64 = b
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("LUCOS-TAINTED ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no taint line\n{}", b.dump()));
    let pvm = config["host"] == "pvm_native";
    assert_eq!(tainted & 4 != 0, pvm, "tainted={tainted} on host {}", config["host"]);
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
    let _slot = common::guest_slot();
    let out = common::vmm_run(1, 900)
        .arg("--no-stdin")
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

/// Security issue item 15: the kernel's power-off and panic lines are hints; a guest
/// process that prints them (to /dev/console and /dev/ttyS0) must not stop the VM, which
/// then powers off for real (`poweroff -f`).
#[test]
fn console_lines_from_a_guest_process_do_not_stop_the_vm() {
    let b = boot(
        1,
        "echo 'reboot: Power down' > /dev/console; \
         echo 'Kernel panic - not syncing: printed by a process' > /dev/ttyS0; \
         echo 'reboot: System halted' > /dev/console; \
         echo 'reboot: Power down' > /dev/ttyS0; \
         sleep 7; echo LUCOS-STILL-$((6*7)); poweroff -f",
        &[],
    );
    assert!(b.line_with("LUCOS-STILL-42").is_some(), "{}", b.dump());
    assert_eq!(b.code, Some(0), "{}", b.dump());
    assert!(b.stderr.contains("guest powered off"), "{}", b.dump());
    assert!(!b.stderr.contains("panicked"), "{}", b.dump());
    // The kernel's own line came after the fake ones. Without a power-off driver (no
    // ACPI) the kernel turns `poweroff` into a halt: "reboot: System halted".
    let still = b.stdout.find("LUCOS-STILL-42").unwrap();
    let own = b.stdout[still..]
        .lines()
        .find(|l| l.contains("reboot: System halted") || l.contains("reboot: Power down"));
    assert!(own.is_some_and(|l| l.starts_with('[')), "{}", b.dump());
}

#[test]
fn timeout_stops_a_running_guest() {
    let b = common::boot_with_timeout(1, "sleep 600", 20, &[]);
    assert_eq!(b.code, Some(4), "{}", b.dump());
    assert!(b.stderr.contains("timeout"), "{}", b.dump());
}
