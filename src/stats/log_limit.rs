//! One log line per interval for a failure that can repeat on every publish (APNs down, throttling, a bad
//! key): an outage at hundreds of publishes a second must not become hundreds of log lines a second. The
//! line that is let through says how many it stands for; the rest go to debug.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets one event through per interval and counts the ones it holds back. Lock-free: two threads racing
/// at the end of an interval may both get through, which is harmless.
pub struct LogLimit {
    interval: Duration,
    /// When the last event got through, as nanoseconds since `epoch` (0: never).
    last: AtomicU64,
    /// Events held back since then.
    held: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl LogLimit {
    /// At most one event per `interval`.
    pub const fn new(interval: Duration) -> LogLimit {
        LogLimit {
            interval,
            last: AtomicU64::new(0),
            held: AtomicU64::new(0),
            epoch: std::sync::OnceLock::new(),
        }
    }

    /// `Some(n)` when this event should be logged, standing for itself and `n` held back before it;
    /// `None` when it should not.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let epoch = *self.epoch.get_or_init(|| now);
        // +1 so that the first event (at the epoch) is not mistaken for "never".
        let at = u64::try_from(now.saturating_duration_since(epoch).as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || at.saturating_sub(last) >= self.interval.as_nanos() as u64;
        if due
            && self
                .last
                .compare_exchange(last, at, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Log at `$level` when `$limit` lets the event through (with `held` = how many it stands for beside
/// itself), else at debug.
#[macro_export]
macro_rules! log_limited {
    ($limit:expr, $level:ident, $($field:tt)*) => {
        match $limit.allow() {
            Some(held) => tracing::$level!(held, $($field)*),
            None => tracing::debug!($($field)*),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_interval_counting_the_rest() {
        let limit = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.allow_at(t0), Some(0));
        for i in 1..=500 {
            assert_eq!(limit.allow_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(limit.allow_at(t0 + Duration::from_secs(9)), None);
        assert_eq!(limit.allow_at(t0 + Duration::from_secs(11)), Some(501));
        assert_eq!(limit.allow_at(t0 + Duration::from_secs(12)), None);
        assert_eq!(limit.allow_at(t0 + Duration::from_secs(22)), Some(1));
    }
}
