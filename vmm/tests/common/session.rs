//! An interactive guest: lucos-vmm with the serial console on pipes, driven like `expect`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long the guest gets to reach its shell (this machine's KVM is slow).
pub const SHELL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one command gets.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(180);

pub struct Session {
    _slot: std::sync::MutexGuard<'static, ()>,
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    pub transcript: Vec<String>,
    n: u32,
}

impl Session {
    /// Boots the guest to its shell. `extra` are additional `lucos-vmm run` arguments.
    pub fn boot(vcpus: u8, extra: &[&str]) -> Session {
        let slot = super::guest_slot();
        let mut child = super::vmm_run(vcpus, 1800)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn lucos-vmm");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        // The console also goes to a file, to follow a slow guest while the test runs.
        // $LUCOS_CONSOLE_DIR keeps it somewhere else (e.g. out of the SVM lane's fresh /tmp).
        let log_dir = std::env::var_os("LUCOS_CONSOLE_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let log_path = log_dir.join(format!("lucos-console-{}-{}.log", std::process::id(), child.id()));
        eprintln!("guest console log: {}", log_path.display());
        let mut log = std::fs::File::create(&log_path).ok();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                if let (Some(f), Ok(l)) = (log.as_mut(), l.as_ref()) {
                    let _ = writeln!(f, "{l}");
                }
                let Ok(l) = l else { break };
                if tx.send(l.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        let mut s = Session {
            _slot: slot,
            child,
            stdin,
            lines,
            transcript: Vec::new(),
            n: 0,
        };
        s.expect_line(|l| l.contains("lucos-init: starting shell"), SHELL_TIMEOUT)
            .unwrap_or_else(|e| panic!("guest did not reach its shell: {e}\n{}", s.tail()));
        s
    }

    pub fn tail(&self) -> String {
        let n = self.transcript.len();
        self.transcript[n.saturating_sub(60)..].join("\n")
    }

    fn expect_line(&mut self, f: impl Fn(&str) -> bool, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.transcript.push(l.clone());
                    if f(&l) {
                        return Ok(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Err(format!("timeout after {timeout:?}")),
                Err(RecvTimeoutError::Disconnected) => return Err("guest console closed".into()),
            }
        }
    }

    /// Runs a shell command in the guest; returns its output lines.
    ///
    /// On a PVM host (see README, "Running on a software-assisted KVM") a freshly exec'd
    /// busybox now and then dies in its C start-up (`__ctype_init`, first TLS access) before
    /// it does anything, with 2 vCPUs: a host bug. When the shell reports such a death the
    /// command is run again (at most twice), with a note; the crashed process had done
    /// nothing, so the commands the tests use are safe to repeat. Not on other hosts.
    pub fn run(&mut self, cmd: &str) -> Vec<String> {
        let mut out = self.run_once(cmd);
        for retry in 1..=2 {
            let crashed = out.iter().any(|l| l.trim() == "Segmentation fault");
            if !crashed || !lucos_vmm::host::HostKvm::detect().is_pvm() {
                break;
            }
            eprintln!("NOTE: a guest process crashed at start-up (PVM host bug), retry {retry} of `{cmd}`: {out:?}");
            out = self.run_once(cmd);
        }
        out
    }

    fn run_once(&mut self, cmd: &str) -> Vec<String> {
        self.n += 1;
        let id = 1000 + self.n;
        // The markers are computed by the guest shell, so the echoed command line (which
        // holds the unexpanded text) never matches them.
        let line = format!("echo @@S$(({id})); {cmd}; echo @@E$(({id}))\n");
        self.stdin.write_all(line.as_bytes()).expect("write to guest console");
        self.stdin.flush().unwrap();
        let (s, e) = (format!("@@S{id}"), format!("@@E{id}"));
        self.expect_line(|l| l.trim() == s, CMD_TIMEOUT)
            .unwrap_or_else(|err| panic!("command `{cmd}` did not start: {err}\n{}", self.tail()));
        let mut out = Vec::new();
        loop {
            let l = self
                .expect_line(|_| true, CMD_TIMEOUT)
                .unwrap_or_else(|err| panic!("command `{cmd}` did not finish: {err}\n{}", self.tail()));
            if l.trim() == e {
                return out;
            }
            out.push(l);
        }
    }

    /// Writes `data` to `path` in the guest, base64 over the console (small files only:
    /// the serial line is slow).
    pub fn upload(&mut self, path: &str, data: &[u8]) {
        let b64 = base64_encode(data);
        self.run(&format!("rm -f {path}.b64"));
        for chunk in b64.as_bytes().chunks(768) {
            let chunk = std::str::from_utf8(chunk).unwrap();
            self.run(&format!("echo {chunk} >> {path}.b64"));
        }
        let out = self.run(&format!("base64 -d {path}.b64 > {path} && wc -c < {path}"));
        assert!(
            out.iter().any(|l| l.trim() == data.len().to_string()),
            "upload of {path} failed: {out:?}"
        );
    }

    /// Asks the guest to reboot and waits for lucos-vmm to exit; returns its exit code.
    pub fn shutdown(mut self) -> Option<i32> {
        let _ = self.stdin.write_all(b"reboot -f\n");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for Session {
    /// Kills lucos-vmm and reaps it, but never waits long: a VMM stuck in the host kernel
    /// (uninterruptible, e.g. in a nested KVM) must not turn a failed test into a hung one.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let pid = self.child.id();
        eprintln!(
            "lucos-vmm (pid {pid}) did not exit within 30 s of SIGKILL: stuck in the host kernel; left behind\n{}",
            kernel_stacks(pid)
        );
    }
}

/// Each thread of process `pid` with its state and host kernel stack (as root), to tell
/// where a process that ignores SIGKILL is stuck.
fn kernel_stacks(pid: u32) -> String {
    let mut out = String::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = t.path();
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        let stack = std::fs::read_to_string(p.join("stack")).unwrap_or_else(|e| format!("(stack: {e})\n"));
        out += &format!("thread {}\n{stack}", stat.trim());
    }
    out
}

/// A fresh temporary directory.
pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lucos-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Newest modification time of the sources a patch module is built from: its folder's
/// `.c`/`.h`/`Kbuild` files, `guest-patches/include/`, the Makefile, and the guest kernel.
fn newest_source(patches: &Path, module_dir: &Path, kernel: &Path) -> std::time::SystemTime {
    let mut files = vec![patches.join("Makefile"), kernel.to_path_buf()];
    for dir in [module_dir, &patches.join("include")] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if (name.ends_with(".c") && !name.ends_with(".mod.c")) || name.ends_with(".h") || name == "Kbuild" {
                files.push(p);
            }
        }
    }
    files
        .iter()
        .filter_map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .max()
        .unwrap_or(std::time::SystemTime::UNIX_EPOCH)
}

/// Builds the patch modules with the guest kernel's kbuild; returns the path of `rel`
/// (e.g. "cmdline/lucos_cmdline.ko"). A module newer than all its sources is used as it is
/// (images/build.sh builds them all): kbuild under the SVM lane's emulated CPU takes
/// seconds even when there is nothing to do.
pub fn build_patch(rel: &str) -> PathBuf {
    // Tests of one binary run in parallel: one kbuild at a time in the folder.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let kdir = super::images_dir().join("build");
    let ko = root.join("guest-patches").join(rel);
    let fresh = std::fs::metadata(&ko).and_then(|m| m.modified()).is_ok_and(|built| {
        built
            >= newest_source(
                &root.join("guest-patches"),
                ko.parent().unwrap(),
                &super::images_dir().join("vmlinux"),
            )
    });
    if fresh {
        return ko;
    }
    let out = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(root.join("guest-patches"))
        .arg(format!(
            "KDIR={}",
            kdir.canonicalize().expect("kernel build tree").display()
        ))
        .output()
        .expect("run make");
    assert!(
        out.status.success(),
        "building guest patches failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ko.exists(), "{} not built", ko.display());
    ko
}

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A copy of the patch module at `ko` without debug info (small enough for [`Session::upload`]).
pub fn stripped(ko: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(ko.file_name().unwrap());
    let st = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(ko)
        .status()
        .expect("run strip");
    assert!(st.success(), "strip {}", ko.display());
    std::fs::read(out).unwrap()
}
