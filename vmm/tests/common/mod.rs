//! Helpers for tests that boot the real guest built by images/build.sh.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};

/// Generous limit so a wedged guest fails the test instead of hanging CI.
pub const BOOT_TIMEOUT_SECS: u64 = 900;

/// The images folder: $LUCOS_IMAGES or <workspace>/images/out.
pub fn images_dir() -> PathBuf {
    std::env::var_os("LUCOS_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out"))
}

/// vmlinux and initramfs paths; panics with instructions when they are missing.
pub fn images() -> (PathBuf, PathBuf) {
    let d = images_dir();
    let (k, i) = (d.join("vmlinux"), d.join("initramfs.cpio"));
    assert!(
        k.exists() && i.exists(),
        "guest images not found in {}: run images/build.sh first",
        d.display()
    );
    (k, i)
}

static GUEST: Mutex<()> = Mutex::new(());

/// Held while a test runs a guest: one guest at a time per test binary (cargo runs the
/// binaries one after another). A guest on a software-assisted KVM is CPU-bound, so
/// parallel guests only slow each other down, and on PVM hosts contention between guests
/// has exposed host bugs that tests are not about.
pub fn guest_slot() -> MutexGuard<'static, ()> {
    GUEST.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `lucos-vmm` binary under test.
pub fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lucos-vmm"))
}

/// `lucos-vmm run` of the test images with `vcpus` vCPUs, 256 MiB and `--timeout secs`:
/// the one place tests spell out a guest's command line.
pub fn vmm_run(vcpus: u8, timeout_secs: u64) -> Command {
    let (k, i) = images();
    let mut c = vmm();
    c.args(["run", "--kernel"])
        .arg(&k)
        .arg("--initrd")
        .arg(&i)
        .args(["--vcpus", &vcpus.to_string(), "--mem", "256M"])
        .args(["--timeout", &timeout_secs.to_string()]);
    c
}

/// `lucos-vmm run --print-config --json` on this host: its KVM, the guest CPU model and
/// the default command line.
pub fn print_config() -> serde_json::Value {
    let out = vmm()
        .args(["run", "--print-config", "--json"])
        .output()
        .expect("spawn lucos-vmm");
    assert!(
        out.status.success(),
        "--print-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--print-config --json prints JSON")
}

/// Result of one boot.
pub struct Boot {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Boot {
    /// Console lines the guest's init printed (`lucos-init: ...`), and everything else.
    pub fn line_with(&self, needle: &str) -> Option<&str> {
        self.stdout.lines().find(|l| l.contains(needle))
    }

    pub fn dump(&self) -> String {
        format!(
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl From<Output> for Boot {
    fn from(o: Output) -> Self {
        Boot {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Boots the guest with `vcpus` vCPUs; `run` is a shell command for the guest's init
/// (spaces allowed; it is encoded for the kernel command line).
pub fn boot(vcpus: u8, run: &str, extra: &[&str]) -> Boot {
    boot_with_timeout(vcpus, run, BOOT_TIMEOUT_SECS, extra)
}

/// Like [`boot`] with an explicit `--timeout`.
pub fn boot_with_timeout(vcpus: u8, run: &str, timeout: u64, extra: &[&str]) -> Boot {
    let _slot = guest_slot();
    let encoded = run.replace(' ', "+");
    assert!(!encoded.contains('"'), "keep guest commands free of double quotes");
    let out = vmm_run(vcpus, timeout)
        .arg("--no-stdin")
        .arg("--append")
        .arg(format!("lucos.run={encoded}"))
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("spawn lucos-vmm");
    out.into()
}

pub mod api;
pub mod patching;
pub mod session;
pub mod smp;
