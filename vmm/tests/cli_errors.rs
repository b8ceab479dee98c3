//! Bad input gives a clear error and a non-zero exit code, never a panic.

mod common;

use common::vmm;
use std::process::Stdio;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let o = vmm().args(args).stdin(Stdio::null()).output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn tmp(name: &str, contents: &[u8]) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lucos-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn missing_kernel_file() {
    let (code, err) = run(&["run", "--no-stdin", "--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot open kernel '/nonexistent/vmlinux'"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn garbage_kernel_file() {
    let p = tmp("garbage-vmlinux", &[0x42; 4096]);
    let (code, err) = run(&["run", "--no-stdin", "--kernel", p.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not a loadable x86-64 vmlinux ELF"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn truncated_elf_kernel() {
    // A real ELF header with nothing behind it.
    let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
    elf.resize(64, 0);
    let p = tmp("truncated-vmlinux", &elf);
    let (code, err) = run(&["run", "--no-stdin", "--kernel", p.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not a loadable"), "{err}");
}

#[test]
fn missing_initrd_and_bad_sizes() {
    let (k, _) = common::images();
    let k = k.to_str().unwrap();
    let (code, err) = run(&["run", "--no-stdin", "--kernel", k, "--initrd", "/nonexistent.cpio"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot read initrd '/nonexistent.cpio'"), "{err}");
    let (code, err) = run(&["run", "--no-stdin", "--kernel", k, "--mem", "lots"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("invalid memory size 'lots'"), "{err}");
    let (code, err) = run(&["run", "--no-stdin", "--kernel", k, "--vcpus", "0"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("vCPU count 0 is out of range"), "{err}");
    let (code, err) = run(&["run", "--no-stdin", "--kernel", k, "--mem", "1M"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("too small"), "{err}");
    let (code, err) = run(&["run", "--no-stdin", "--kernel", k, "--vsock-cid", "2"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("vsock CID 2 is reserved"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    let (code, err) = run(&["run"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--kernel"), "{err}");
}
