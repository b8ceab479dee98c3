//! A sampling profiler for the guest: periodically parks every vCPU, records where each
//! one was (kernel symbol, or "user"/"idle"), and prints the hottest places at exit.
//! `lucos-vmm run --profile MS` — useful to see where a slow guest spends its time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::vm::VmHandle;

/// The sampling thread; [`finish`](Self::finish) stops it and renders the profile.
pub struct Profiler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<HashMap<String, u64>>>,
}

impl Profiler {
    /// Starts sampling every `period`. With `depth` > 0 each sample also records up to
    /// `depth` callers: kernel-text addresses found on the stack above RSP (a heuristic
    /// stack, good enough to see who calls a hot function).
    pub fn start(handle: VmHandle, period: Duration, depth: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("profiler".into())
            .spawn(move || {
                let mut counts: HashMap<String, u64> = HashMap::new();
                while !s.load(Ordering::Acquire) {
                    std::thread::sleep(period);
                    let Ok(p) = handle.pause(Duration::from_secs(1)) else {
                        continue;
                    };
                    for v in &p.snapshots {
                        let key = if !v.kernel_mode {
                            "<user>".to_string()
                        } else {
                            let lookup = |a: u64| handle.symbols().and_then(|t| t.lookup(a)).map(|(s, _)| s);
                            let mut chain = vec![lookup(v.rip)
                                .map(|s| s.name.clone())
                                .unwrap_or_else(|| format!("{:#x}", v.rip))];
                            if depth > 0 {
                                let g = crate::introspect::GuestVirt::new(handle.memory(), v.cr3);
                                let mut stack = [0u8; 512];
                                if g.read(v.rsp, &mut stack).is_ok() {
                                    for w in stack.chunks_exact(8) {
                                        let a = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                                        if a >> 32 != 0xffff_ffff {
                                            continue;
                                        }
                                        if let Some(s) = lookup(a).filter(|s| s.is_func) {
                                            if chain.last() != Some(&s.name) {
                                                chain.push(s.name.clone());
                                            }
                                        }
                                        if chain.len() > depth {
                                            break;
                                        }
                                    }
                                }
                            }
                            chain.join(" <- ")
                        };
                        *counts.entry(key).or_default() += 1;
                    }
                }
                counts
            })
            .ok();
        Self { stop, thread }
    }

    /// Stops sampling and returns a report of the top `n` places.
    pub fn finish(mut self, n: usize) -> String {
        self.stop.store(true, Ordering::Release);
        let counts = self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default();
        let total: u64 = counts.values().sum();
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut s = format!("profile: {total} samples\n");
        for (name, c) in v.into_iter().take(n) {
            s += &format!("  {:5.1}% {:6}  {}\n", 100.0 * c as f64 / total.max(1) as f64, c, name);
        }
        s
    }
}
