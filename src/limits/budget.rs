//! Hourly allowances per key: how many background wake-ups one device may get (Apple delivers two or
//! three an hour and throttles the rest), and how many wake-ups one token may get without a registration.
//!
//! Each key is a bucket of `n` refilled continuously at `n` per hour ([`super::bucket`]); the key is a
//! node or a keyed hash of a token, never a JID. In memory only: a restart hands every key a fresh bucket.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

use super::bucket::{Buckets, Quota};

/// Most keys remembered at once; beyond it the fullest buckets are forgotten first (see [`Buckets`]).
pub const MAX_KEYS: usize = 200_000;

/// Allowances per key, each at a rate the caller names per call (apps differ).
pub struct Budget<K> {
    buckets: Mutex<Buckets<K>>,
}

impl<K: Hash + Eq> Default for Budget<K> {
    fn default() -> Self {
        Budget::bounded(MAX_KEYS)
    }
}

impl<K: Hash + Eq> Budget<K> {
    fn bounded(max: usize) -> Self {
        Budget {
            buckets: Mutex::new(Buckets::new(max)),
        }
    }

    /// Take one of `key`'s `per_hour` (0: unlimited, nothing remembered); `false` if it has none left.
    pub fn try_take<Q>(&self, key: &Q, per_hour: u32) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.try_take_at(key, per_hour, Instant::now())
    }

    /// [`Budget::try_take`] at a given time (tests bring their own clock).
    pub fn try_take_at<Q>(&self, key: &Q, per_hour: u32, now: Instant) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let Some(quota) = Quota::per_hour(per_hour) else {
            return true;
        };
        // Poisoning cannot leave a bucket half-updated in a way that matters: entries are independent.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.wait(quota, key, now).is_some() {
            return false;
        }
        buckets.take(quota, key, now);
        true
    }

    /// Keys remembered now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn three_an_hour_then_one_every_twenty_minutes() {
        let budget: Budget<String> = Budget::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(budget.try_take_at("node", 3, t0));
        }
        assert!(!budget.try_take_at("node", 3, t0), "the fourth is over");
        assert!(budget.try_take_at("other", 3, t0), "keys are separate");
        assert!(!budget.try_take_at("node", 3, t0 + Duration::from_secs(1199)));
        assert!(budget.try_take_at("node", 3, t0 + Duration::from_secs(1200)));
    }

    #[test]
    fn zero_is_unlimited_and_the_map_stays_bounded() {
        let budget: Budget<String> = Budget::default();
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(budget.try_take_at("node", 0, t0));
        }
        assert_eq!(budget.tracked(), 0);
        let small: Budget<u32> = Budget::bounded(100);
        for i in 0..10_000 {
            assert!(small.try_take_at(&i, 2, t0));
            assert!(small.tracked() <= 100);
        }
    }
}
