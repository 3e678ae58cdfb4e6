//! Per-node push coalescing: at most one wake-up per node per interval.
//!
//! A device being woken will fetch everything when it reconnects, so further publishes inside the window are
//! answered `result` without a push. A failed push releases its slot, so the next publish tries again.
//!
//! A silent wake-up may never arrive (Apple rations them), so it does not hold back a visible one: an
//! important publish right after an unimportant one still shows. A visible one holds back both.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Remembers when each node was last pushed.
pub struct Coalescer {
    /// Minimum time between two pushes to one node.
    interval: Duration,
    /// node -> when its last push started, and whether it was visible. Pruned of expired entries as it grows, so memory tracks the number
    /// of nodes pushed within one interval, not all nodes ever seen.
    last: Mutex<Slots>,
}

struct Slots {
    map: HashMap<String, (Instant, bool)>,
    /// Prune when the map reaches this size; doubles with the live set so pruning stays amortised O(1).
    prune_at: usize,
}

const MIN_PRUNE_AT: usize = 1024;

impl Coalescer {
    /// A limiter with the given interval (zero disables coalescing).
    pub fn new(interval: Duration) -> Coalescer {
        Coalescer {
            interval,
            last: Mutex::new(Slots {
                map: HashMap::new(),
                prune_at: MIN_PRUNE_AT,
            }),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        // Poisoning cannot leave the map half-updated in a way that matters: entries are independent.
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claim the right to push `node` now, visibly. `false` means a visible push went out less than one
    /// interval ago.
    pub fn try_acquire(&self, node: &str) -> bool {
        self.try_acquire_as(node, true)
    }

    /// Claim the right to push `node` now, visibly or silently. `false` means a push went out less than one
    /// interval ago that this one would add nothing to: any push, for a silent one; a visible one, for a
    /// visible one.
    pub fn try_acquire_as(&self, node: &str, visible: bool) -> bool {
        if self.interval.is_zero() {
            return true;
        }
        let now = Instant::now();
        let mut slots = self.slots();
        if let Some(&(last, was_visible)) = slots.map.get(node) {
            if now.duration_since(last) < self.interval && (was_visible || !visible) {
                return false;
            }
        }
        slots.map.insert(node.to_owned(), (now, visible));
        if slots.map.len() >= slots.prune_at {
            let interval = self.interval;
            slots
                .map
                .retain(|_, (t, _)| now.duration_since(*t) < interval);
            slots.prune_at = (slots.map.len() * 2).max(MIN_PRUNE_AT);
        }
        true
    }

    /// Give the slot back after a failed push, so the next publish is not coalesced into nothing.
    pub fn release(&self, node: &str) {
        self.slots().map.remove(node);
    }

    /// Nodes currently remembered (for tests and stats).
    pub fn tracked(&self) -> usize {
        self.slots().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_inside_the_window_and_releases_on_failure() {
        let rl = Coalescer::new(Duration::from_secs(60));
        assert!(rl.try_acquire("a"));
        assert!(!rl.try_acquire("a"));
        assert!(rl.try_acquire("b"));
        rl.release("a");
        assert!(rl.try_acquire("a"));
    }

    #[test]
    fn a_silent_push_does_not_hold_back_a_visible_one() {
        let rl = Coalescer::new(Duration::from_secs(60));
        assert!(rl.try_acquire_as("a", false));
        assert!(!rl.try_acquire_as("a", false), "silent after silent");
        assert!(rl.try_acquire_as("a", true), "visible after silent");
        assert!(!rl.try_acquire_as("a", true), "visible after visible");
        assert!(!rl.try_acquire_as("a", false), "silent after visible");
    }

    #[test]
    fn window_expires() {
        let rl = Coalescer::new(Duration::from_millis(20));
        assert!(rl.try_acquire("a"));
        std::thread::sleep(Duration::from_millis(30));
        assert!(rl.try_acquire("a"));
    }

    #[test]
    fn memory_tracks_live_nodes_only() {
        let rl = Coalescer::new(Duration::from_millis(1));
        for i in 0..10_000 {
            assert!(rl.try_acquire(&format!("n{i}")));
            if i % 1000 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        assert!(rl.tracked() < 3 * MIN_PRUNE_AT, "tracked {}", rl.tracked());
    }

    #[test]
    fn zero_interval_never_coalesces() {
        let rl = Coalescer::new(Duration::ZERO);
        assert!(rl.try_acquire("a"));
        assert!(rl.try_acquire("a"));
        assert_eq!(rl.tracked(), 0);
    }
}
