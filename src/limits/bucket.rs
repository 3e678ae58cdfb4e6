//! Token buckets read in time, keyed, bounded: what every per-user, per-node and per-token cap in
//! [`crate::limits`] is made of.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Prune a map when it reaches this size at the least, so small maps are not scanned on every insert.
pub(crate) const MIN_PRUNE_AT: usize = 1024;

/// The period every cap is counted over.
pub(crate) const HOUR: Duration = Duration::from_secs(3600);

/// A cap of `n` per hour, as time: each token takes `cost` to refill, a whole bucket `window` (= `n` x `cost`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Quota {
    /// Time to refill one token.
    pub(crate) cost: Duration,
    /// Time to refill the whole bucket.
    pub(crate) window: Duration,
}

impl Quota {
    /// `None` for 0, which means unlimited.
    pub(crate) fn per_hour(n: u32) -> Option<Quota> {
        let cost = HOUR.checked_div(n)?;
        Some(Quota {
            cost,
            // Not HOUR: `cost` was rounded down to whole nanoseconds, and the bucket must hold exactly `n`.
            window: cost * n,
        })
    }
}

/// Buckets keyed by `K`. Each is stored as the instant it will be full again, which is a token bucket read in
/// time: at `now` it lacks `(full_at - now) / cost` tokens. Exact (whole nanoseconds), one `Instant` per key,
/// and a bucket is full, so forgettable, once `full_at <= now`.
pub(crate) struct Buckets<K> {
    full_at: HashMap<K, Instant>,
    /// Prune when the map reaches this size; tracks twice the live set so pruning stays amortised O(1).
    prune_at: usize,
    /// The map never holds more than this.
    max: usize,
}

impl<K: Hash + Eq> Buckets<K> {
    pub(crate) fn new(max: usize) -> Self {
        Buckets {
            full_at: HashMap::new(),
            prune_at: MIN_PRUNE_AT.min(max),
            max,
        }
    }

    /// How long until `key`'s bucket holds a token; `None` if it holds one now.
    pub(crate) fn wait<Q>(&self, quota: Quota, key: &Q, now: Instant) -> Option<Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let lacking = self.full_at.get(key)?.saturating_duration_since(now);
        (lacking + quota.cost)
            .checked_sub(quota.window)
            .filter(|wait| !wait.is_zero())
    }

    /// Take a token from `key`'s bucket; the caller has checked [`Buckets::wait`].
    pub(crate) fn take<Q>(&mut self, quota: Quota, key: &Q, now: Instant)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(full_at) = self.full_at.get_mut(key) {
            *full_at = (*full_at).max(now) + quota.cost;
            return;
        }
        self.full_at.insert(key.to_owned(), now + quota.cost);
        if self.full_at.len() >= self.prune_at {
            self.prune(now);
        }
    }

    /// Forget full buckets; if more than half of `max` remain, keep only the emptiest half of `max`.
    fn prune(&mut self, now: Instant) {
        self.full_at.retain(|_, full_at| *full_at > now);
        let keep = self.max / 2;
        if self.full_at.len() > keep {
            let mut entries: Vec<(K, Instant)> = self.full_at.drain().collect();
            // Latest `full_at` first: the most drained buckets are the ones a flood would like forgotten.
            entries.select_nth_unstable_by(keep, |a, b| b.1.cmp(&a.1));
            entries.truncate(keep);
            self.full_at.extend(entries);
        }
        self.prune_at = (self.full_at.len() * 2).max(MIN_PRUNE_AT).min(self.max);
    }

    /// Keys remembered (buckets not yet full again).
    pub(crate) fn len(&self) -> usize {
        self.full_at.len()
    }

    /// Set when `key`'s bucket is full again (tests).
    #[cfg(test)]
    pub(crate) fn set_full_at(&mut self, key: K, at: Instant) {
        self.full_at.insert(key, at);
    }
}
