//! Boot-time benchmark: boots the same vmlinux + initramfs under lucos-vmm and under
//! QEMU (`-enable-kvm -M microvm`, PVH entry of the same ELF), several runs each, and
//! prints the time from process start to the guest's first userspace line
//! (`lucos-init: userspace up`), with the ratio of the medians.
//!
//! Usage: cargo run --release -p lucos-bench --bin boot-time -- [--runs N] [--vcpus N] [--mem SIZE]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MARKER: &str = "lucos-init: userspace up";
/// Both VMMs boot with lucos-vmm's default command line for this host (on a
/// software-assisted KVM it keeps the guest off instructions the emulator lacks) plus this.
const EXTRA_CMDLINE: &str = "lucos.run=true";

fn cmdline() -> String {
    format!(
        "{} {EXTRA_CMDLINE}",
        lucos_vmm::host::CpuPolicy::detect().default_cmdline()
    )
}
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

struct Opts {
    runs: usize,
    vcpus: u8,
    mem: String,
    kernel: PathBuf,
    initrd: PathBuf,
    vmm: PathBuf,
    qemu: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: boot-time [--runs N] [--vcpus N] [--mem SIZE] [--kernel PATH] [--initrd PATH] [--vmm PATH] [--qemu BIN]\n\
         Boots the guest N times (default 5) under lucos-vmm and under QEMU microvm and reports\n\
         the time from process start to the guest's first userspace line."
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let images = root.join("images/out");
    let mut o = Opts {
        runs: 5,
        vcpus: 2,
        mem: "512M".into(),
        kernel: images.join("vmlinux"),
        initrd: images.join("initramfs.cpio"),
        vmm: root.join("target/release/lucos-vmm"),
        qemu: "qemu-system-x86_64".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--runs" => o.runs = val().parse().unwrap_or_else(|_| usage()),
            "--vcpus" => o.vcpus = val().parse().unwrap_or_else(|_| usage()),
            "--mem" => o.mem = val(),
            "--kernel" => o.kernel = val().into(),
            "--initrd" => o.initrd = val().into(),
            "--vmm" => o.vmm = val().into(),
            "--qemu" => o.qemu = val(),
            _ => usage(),
        }
    }
    o
}

/// Spawns `cmd`, returns the time until MARKER shows up on stdout, then kills it.
fn time_to_marker(mut cmd: Command) -> Result<Duration, String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tail = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(MARKER) {
                let _ = tx.send(Ok(start.elapsed()));
                return;
            }
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
        let _ = tx.send(Err(format!(
            "guest output ended without '{MARKER}':\n{}",
            tail.join("\n")
        )));
    });
    let r = rx
        .recv_timeout(RUN_TIMEOUT)
        .unwrap_or_else(|_| Err(format!("no '{MARKER}' within {RUN_TIMEOUT:?}")));
    lucos_bench::guest::kill_and_reap(&mut child);
    r
}

fn lucos_cmd(o: &Opts) -> Command {
    let mut c = Command::new(&o.vmm);
    // No vsock device: the QEMU side has no virtio devices either.
    c.args([
        "run",
        "--no-stdin",
        "--no-vsock",
        "--timeout",
        "300",
        "--vcpus",
        &o.vcpus.to_string(),
        "--mem",
        &o.mem,
    ])
    .arg("--kernel")
    .arg(&o.kernel)
    .arg("--initrd")
    .arg(&o.initrd)
    .args(["--cmdline", &cmdline()]);
    c
}

fn qemu_cmd(o: &Opts) -> Command {
    let mut c = Command::new(&o.qemu);
    // Same CPUID policy as lucos-vmm (no CX16/XSAVE/AVX), same memory and vCPUs.
    c.args([
        "-enable-kvm",
        "-M",
        "microvm,rtc=off,acpi=off",
        "-cpu",
        "host,-cx16,-xsave,-avx,-avx2",
    ])
    .args(["-m", &o.mem.replace('M', ""), "-smp", &o.vcpus.to_string()])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&o.kernel)
    .arg("-initrd")
    .arg(&o.initrd)
    .args(["-append", &cmdline()]);
    c
}

fn stats(v: &[Duration]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (s[0], median, s.iter().sum::<f64>() / s.len() as f64)
}

fn bench(name: &str, runs: usize, mk: impl Fn() -> Command) -> Option<Vec<Duration>> {
    let mut v = Vec::new();
    for i in 1..=runs {
        match time_to_marker(mk()) {
            Ok(d) => {
                eprintln!("  {name} run {i}/{runs}: {:.1} ms", d.as_secs_f64() * 1000.0);
                v.push(d);
            }
            Err(e) => {
                eprintln!("  {name} run {i}/{runs} failed: {e}");
                return None;
            }
        }
    }
    Some(v)
}

fn main() {
    let o = parse_args();
    for p in [&o.kernel, &o.initrd, &o.vmm] {
        if !p.exists() {
            eprintln!(
                "boot-time: {} not found (run images/build.sh and cargo build --release)",
                p.display()
            );
            std::process::exit(1);
        }
    }
    eprintln!(
        "boot-time: {} runs each, {} vCPUs, {} memory, kernel {}",
        o.runs,
        o.vcpus,
        o.mem,
        o.kernel.display()
    );
    let lucos = bench("lucos-vmm", o.runs, || lucos_cmd(&o));
    let qemu = bench("qemu", o.runs, || qemu_cmd(&o));
    println!("time from process start to first guest userspace line (ms):");
    println!("{:<12} {:>10} {:>10} {:>10}", "", "min", "median", "mean");
    let mut medians = Vec::new();
    for (name, r) in [("lucos-vmm", &lucos), ("qemu", &qemu)] {
        match r {
            Some(v) => {
                let (min, med, mean) = stats(v);
                println!("{name:<12} {min:>10.1} {med:>10.1} {mean:>10.1}");
                medians.push(med);
            }
            None => println!("{name:<12} failed"),
        }
    }
    if let [l, q] = medians[..] {
        println!("ratio lucos-vmm/qemu (median): {:.2}", l / q);
    }
    if lucos.is_none() {
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_runs() {
        let v = [30, 10, 20].map(Duration::from_millis);
        let (min, med, mean) = stats(&v);
        assert_eq!((min, med, mean), (10.0, 20.0, 20.0));
    }
}
