//! Pausing every vCPU out of KVM_RUN and resuming them: the stop-the-world step of a live
//! update. `PauseControl::pause` raises the request, kicks each vCPU thread with the kick
//! signal and waits until each one has parked (with its registers snapshotted); dropping
//! the returned [`Paused`] guard resumes them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

/// The registers of a parked vCPU that live-update code needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuSnapshot {
    /// vCPU index, from 0.
    pub id: u8,
    /// Guest RIP where it parked.
    pub rip: u64,
    /// Guest RSP.
    pub rsp: u64,
    /// Guest RFLAGS.
    pub rflags: u64,
    /// Guest CR3: the root of the current address space's page tables.
    pub cr3: u64,
    /// CPL 0 (kernel mode).
    pub kernel_mode: bool,
    /// Stopped in HLT (KVM_MP_STATE_HALTED).
    pub halted: bool,
}

/// Why the vCPUs could not be paused.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PauseError {
    /// Not every vCPU parked in time; the pause request was withdrawn.
    #[error("only {parked} of {total} vCPUs parked within {timeout:?}")]
    Timeout {
        /// vCPUs that had parked.
        parked: usize,
        /// vCPUs of the VM.
        total: usize,
        /// The time waited.
        timeout: Duration,
    },
    /// The VM is stopping.
    #[error("the VM is stopping")]
    Stopping,
    /// The vCPU threads have not been started yet.
    #[error("the vCPUs are not running yet")]
    NotStarted,
}

#[derive(Default)]
struct State {
    /// Number of active pause requests (nested pauses are allowed).
    requests: usize,
    snapshots: Vec<Option<VcpuSnapshot>>,
    /// vCPU threads' pthread ids, filled in when they start.
    threads: Vec<libc::pthread_t>,
}

/// Shared between the vCPU threads and whoever pauses them.
#[derive(Default)]
pub struct PauseControl {
    requested: AtomicBool,
    state: Mutex<State>,
    cond: Condvar,
}

impl PauseControl {
    /// Control for `vcpus` vCPUs, none paused and no thread known yet.
    pub fn new(vcpus: usize) -> Self {
        let s = Self::default();
        s.state.lock().unwrap().snapshots = vec![None; vcpus];
        s
    }

    /// Records the vCPU threads (called once they are spawned).
    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).threads = threads;
    }

    /// Fast check on the vCPU run loop.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Called by a vCPU thread when it sees a pause request: parks until resumed or until
    /// `stop` becomes true.
    pub fn park(&self, snap: VcpuSnapshot, stop: &AtomicBool) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let id = snap.id as usize;
        st.snapshots[id] = Some(snap);
        self.cond.notify_all();
        while st.requests > 0 && !stop.load(Ordering::Acquire) {
            st = self
                .cond
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.snapshots[id] = None;
    }

    /// Sends `kick` to vCPU `id`'s thread.
    pub fn kick(&self, id: u8, kick: impl Fn(libc::pthread_t)) {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = st.threads.get(id as usize) {
            kick(*t);
        }
    }

    /// Wakes parked vCPUs so they notice the VM is stopping.
    pub fn wake_all(&self) {
        self.cond.notify_all();
    }

    /// Pauses all vCPUs. `kick` is called for each vCPU thread that has not parked yet
    /// (it sends the kick signal); it is retried until `timeout`.
    pub fn pause(
        &self,
        timeout: Duration,
        stop: &AtomicBool,
        kick: impl Fn(libc::pthread_t),
    ) -> Result<Paused<'_>, PauseError> {
        let start = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.threads.is_empty() {
            return Err(PauseError::NotStarted);
        }
        st.requests += 1;
        self.requested.store(true, Ordering::Release);
        loop {
            if stop.load(Ordering::Acquire) {
                drop(st);
                self.release();
                return Err(PauseError::Stopping);
            }
            let parked = st.snapshots.iter().filter(|s| s.is_some()).count();
            if parked == st.snapshots.len() {
                let snapshots = st.snapshots.iter().map(|s| s.expect("parked")).collect();
                return Ok(Paused {
                    ctl: self,
                    snapshots,
                    took: start.elapsed(),
                });
            }
            if start.elapsed() > timeout {
                let total = st.snapshots.len();
                drop(st);
                self.release();
                return Err(PauseError::Timeout { parked, total, timeout });
            }
            for (i, t) in st.threads.iter().enumerate() {
                if st.snapshots[i].is_none() {
                    kick(*t);
                }
            }
            st = self
                .cond
                .wait_timeout(st, Duration::from_micros(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn release(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.requests -= 1;
        if st.requests == 0 {
            self.requested.store(false, Ordering::Release);
        }
        self.cond.notify_all();
    }
}

/// All vCPUs are parked while this lives.
pub struct Paused<'a> {
    ctl: &'a PauseControl,
    /// One per vCPU, by id.
    pub snapshots: Vec<VcpuSnapshot>,
    /// How long it took to park them all.
    pub took: Duration,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.ctl.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_releases_them() {
        let ctl = Arc::new(PauseControl::new(2));
        let stop = Arc::new(AtomicBool::new(false));
        let spins: Vec<_> = (0..2u8)
            .map(|id| {
                let (ctl, stop) = (ctl.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rounds = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        if ctl.is_requested() {
                            ctl.park(
                                VcpuSnapshot {
                                    id,
                                    rip: 0x1000 + id as u64,
                                    ..Default::default()
                                },
                                &stop,
                            );
                        }
                        rounds += 1;
                        std::thread::yield_now();
                    }
                    rounds
                })
            })
            .collect();
        ctl.set_threads(vec![0, 0]);
        {
            let p = ctl.pause(Duration::from_secs(5), &stop, |_| {}).unwrap();
            assert_eq!(
                p.snapshots.iter().map(|s| s.rip).collect::<Vec<_>>(),
                vec![0x1000, 0x1001]
            );
        }
        assert!(!ctl.is_requested());
        stop.store(true, Ordering::Release);
        ctl.wake_all();
        for s in spins {
            assert!(s.join().unwrap() > 0);
        }
    }

    #[test]
    fn pause_times_out_when_a_vcpu_never_parks() {
        let ctl = PauseControl::new(1);
        let stop = AtomicBool::new(false);
        assert_eq!(
            ctl.pause(Duration::from_millis(10), &stop, |_| {}).err(),
            Some(PauseError::NotStarted)
        );
        ctl.set_threads(vec![0]);
        let e = ctl.pause(Duration::from_millis(20), &stop, |_| {}).err().unwrap();
        assert!(matches!(
            e,
            PauseError::Timeout {
                parked: 0,
                total: 1,
                ..
            }
        ));
        assert!(!ctl.is_requested(), "a failed pause leaves no request behind");
    }
}
