//! One guest under lucos-vmm with its serial console on pipes, driven like `expect`: the
//! bench's small counterpart of the integration tests' `vmm/tests/common/session.rs`.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A booted guest: lucos-vmm with the guest's serial console on pipes.
pub struct Guest {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    tail: VecDeque<String>,
    n: u32,
    /// A command timed out or the console closed: the guest is gone or hung.
    lost: bool,
    /// Where the whole console goes.
    pub log: PathBuf,
}

/// How a guest is started.
pub struct BootArgs<'a> {
    /// lucos-vmm.
    pub vmm: &'a Path,
    /// The guest kernel (vmlinux).
    pub kernel: &'a Path,
    /// The initramfs.
    pub initrd: &'a Path,
    /// vCPUs.
    pub vcpus: u8,
    /// Memory (`lucos-vmm run --mem`).
    pub mem: &'a str,
    /// Further `lucos-vmm run` arguments.
    pub extra: Vec<String>,
    /// How long the boot may take.
    pub timeout: Duration,
}

impl Guest {
    /// Boots the guest to its shell.
    pub fn boot(a: &BootArgs, log: PathBuf) -> Result<Guest, String> {
        let mut child = Command::new(a.vmm)
            .args(["run", "--kernel"])
            .arg(a.kernel)
            .arg("--initrd")
            .arg(a.initrd)
            .args(["--vcpus", &a.vcpus.to_string(), "--mem", a.mem])
            // A limit so that a wedged guest cannot hang the bench.
            .args(["--timeout", "3600"])
            .args(&a.extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", a.vmm.display()))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = channel();
        let mut file = std::fs::File::create(&log).ok();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{l}");
                }
                if tx.send(l.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        let mut g = Guest {
            child,
            stdin,
            lines,
            tail: VecDeque::new(),
            n: 0,
            lost: false,
            log,
        };
        g.expect(|l| l.contains("lucos-init: starting shell"), a.timeout)
            .map_err(|e| g.failure(&format!("the guest did not reach its shell: {e}")))?;
        Ok(g)
    }

    /// An error message with the console's last lines.
    pub fn failure(&self, what: &str) -> String {
        let tail: Vec<&str> = self.tail.iter().map(String::as_str).collect();
        format!(
            "{what}\n--- last guest console lines (all of it: {}) ---\n{}",
            self.log.display(),
            tail.join("\n")
        )
    }

    fn expect(&mut self, f: impl Fn(&str) -> bool, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    if self.tail.len() == 40 {
                        self.tail.pop_front();
                    }
                    self.tail.push_back(l.clone());
                    if f(&l) {
                        return Ok(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.lost = true;
                    return Err(format!("no answer within {timeout:?}"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.lost = true;
                    return Err("the guest's console closed (lucos-vmm exited)".into());
                }
            }
        }
    }

    /// Whether the guest is gone (lucos-vmm exited) or stopped answering.
    pub fn lost(&mut self) -> bool {
        self.lost || !matches!(self.child.try_wait(), Ok(None))
    }

    /// Runs a shell command in the guest; returns its output lines.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<Vec<String>, String> {
        self.n += 1;
        let id = 1000 + self.n;
        // The markers are computed by the guest's shell, so the echoed command line (which
        // holds the unexpanded text) never matches them.
        let line = format!("echo @@S$(({id})); {cmd}; echo @@E$(({id}))\n");
        self.stdin
            .write_all(line.as_bytes())
            .and_then(|_| self.stdin.flush())
            .map_err(|e| self.failure(&format!("writing to the guest's console: {e}")))?;
        let (s, e) = (format!("@@S{id}"), format!("@@E{id}"));
        let deadline = Instant::now() + timeout;
        self.expect(|l| l.trim() == s, timeout)
            .map_err(|err| self.failure(&format!("guest command `{cmd}` did not start: {err}")))?;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self
                .expect(|_| true, left)
                .map_err(|err| self.failure(&format!("guest command `{cmd}` did not finish: {err}")))?;
            if l.trim() == e {
                return Ok(out);
            }
            out.push(l);
        }
    }

    /// Asks the guest to power off and waits for lucos-vmm to exit.
    pub fn shutdown(mut self) -> Result<(), String> {
        let _ = self.stdin.write_all(b"reboot -f\n");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return match st.code() {
                    Some(0) => Ok(()),
                    c => Err(self.failure(&format!("lucos-vmm exited with {c:?} at shutdown"))),
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(self.failure("lucos-vmm did not exit after `reboot -f`"))
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// Kills `child` and reaps it, waiting at most 30 s: a lucos-vmm stuck in the host kernel
/// (e.g. in a nested KVM) must not hang the bench. Says so when it is left behind.
pub fn kill_and_reap(child: &mut std::process::Child) {
    let _ = child.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "lucos-vmm (pid {}) did not exit within 30 s of SIGKILL; left behind",
        child.id()
    );
}
