//! Rate limiting for log lines the guest can trigger at will.
//!
//! The guest is untrusted, kernel and every process in it: anything it can make the VMM
//! log (a malformed virtio descriptor, a bad register access, a fake console line) it can
//! make the VMM log in a loop. [`warn_limited!`](crate::warn_limited) and
//! [`info_limited!`](crate::info_limited) let a burst of [`BURST`] lines per call site
//! through every [`WINDOW`], count the rest, and say how many were suppressed on the next
//! line they let through.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site may log per [`WINDOW`].
pub const BURST: u32 = 10;
/// The window over which [`BURST`] applies.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The state of one rate-limited call site.
pub struct RateLimit {
    state: Mutex<State>,
}

struct State {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    /// A limiter that has logged nothing yet (`const`: call sites keep it in a `static`).
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                window_start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the number of lines suppressed
    /// since the last one let through, `None` to drop this one.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = match s.window_start {
            Some(t) => now.saturating_duration_since(t) >= WINDOW,
            None => true,
        };
        if fresh {
            s.window_start = Some(now);
            s.logged = 0;
        }
        if s.logged < BURST {
            s.logged += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

/// `log::log!` at `level` for a line the guest can trigger: at most
/// [`BURST`](crate::ratelimit::BURST) lines per [`WINDOW`](crate::ratelimit::WINDOW) from
/// each call site.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if ::log::log_enabled!($level) {
            match LIMIT.check() {
                Some(0) => ::log::log!($level, $($arg)+),
                Some(n) => ::log::log!($level, "{} ({} similar lines suppressed)", format_args!($($arg)+), n),
                None => {}
            }
        }
    }};
}

/// `log::warn!` for a line the guest can trigger, rate-limited like
/// [`log_limited!`](crate::log_limited).
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!(::log::Level::Warn, $($arg)+)
    };
}

/// `log::info!` for a line the guest can trigger, rate-limited like
/// [`log_limited!`](crate::log_limited).
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!(::log::Level::Info, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_suppressed_then_counted() {
        let l = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.check_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.check_at(t0 + Duration::from_millis(1)), None);
        }
        // The next window lets a line through and reports what was dropped.
        assert_eq!(l.check_at(t0 + WINDOW), Some(1000));
        assert_eq!(l.check_at(t0 + WINDOW), Some(0));
    }

    #[test]
    fn macro_compiles_with_captured_arguments() {
        let what = "x";
        for _ in 0..100 {
            crate::warn_limited!("rate-limited test line {what} {}", 1);
            crate::info_limited!("rate-limited test line {what}");
        }
    }
}
