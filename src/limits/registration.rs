//! Registration flood protection: a token bucket per owner and one per domain, in memory.
//!
//! Any user of any federated server can register, and every registration that changes something costs a
//! durable write and a disk flush and grows the store. So each owner (the keyed hash of the bare JID, never
//! the JID) and each domain gets a bucket of `N` registrations that refills continuously at `N` per hour.
//! A registration needs a token from both; a refusal takes none. Unregistering is never limited, and
//! re-sending a registration that changes nothing is answered before the limiter is asked.
//!
//! Only buckets that are not full are remembered (a full bucket is the same as none), and each map is bounded:
//! see [`MAX_OWNERS`] and [`MAX_DOMAINS`]. The state resets on restart, which at worst hands every user one
//! fresh bucket.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::bucket::{Buckets, Quota};

use crate::store::Digest;

/// Most owners remembered at once. Beyond it the fullest buckets are forgotten first, which hands their
/// owners back at most the few tokens they had used; the drained buckets of a flood are the ones kept.
/// Worst case about 100 bytes per entry (32-byte key, an `Instant`, the hash table's overhead): ~10 MB.
pub const MAX_OWNERS: usize = 100_000;
/// Most domains remembered at once, evicted like owners. A domain is at most 1023 bytes, so the worst case is
/// ~11 MB; in practice a few hundred servers register in any one hour.
pub const MAX_DOMAINS: usize = 10_000;

/// Whose bucket ran dry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The registering user's own bucket.
    User,
    /// The bucket shared by every user of the registering user's domain.
    Domain,
}

/// A registration the limiter refuses, and when it would be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Which cap was hit (the domain's when both were).
    pub scope: Scope,
    /// How long until both buckets hold a token again, if nobody else takes it first.
    pub retry_after: Duration,
}

/// The per-owner and per-domain registration caps.
pub struct RegistrationLimiter {
    /// The cap per owner; `None` is unlimited.
    per_user: Option<Quota>,
    /// The cap per domain; `None` is unlimited.
    per_domain: Option<Quota>,
    /// Both maps under one lock, so a registration takes its two tokens or neither.
    buckets: Mutex<State>,
}

struct State {
    owners: Buckets<Digest>,
    domains: Buckets<String>,
}

impl RegistrationLimiter {
    /// At most `per_user` registrations per owner and `per_domain` per domain per hour, each as a bucket of that
    /// size refilled continuously; 0 is unlimited.
    pub fn new(per_user: u32, per_domain: u32) -> Self {
        Self::bounded(per_user, per_domain, MAX_OWNERS, MAX_DOMAINS)
    }

    /// No caps at all.
    pub fn unlimited() -> Self {
        Self::new(0, 0)
    }

    fn bounded(per_user: u32, per_domain: u32, max_owners: usize, max_domains: usize) -> Self {
        RegistrationLimiter {
            per_user: Quota::per_hour(per_user),
            per_domain: Quota::per_hour(per_domain),
            buckets: Mutex::new(State {
                owners: Buckets::new(max_owners),
                domains: Buckets::new(max_domains),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Poisoning cannot leave a bucket half-updated in a way that matters: entries are independent.
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take one registration from `owner`'s and `domain`'s buckets, or neither if either is empty.
    pub fn try_acquire(&self, owner: &Digest, domain: &str) -> Result<(), Refused> {
        self.try_acquire_at(owner, domain, Instant::now())
    }

    /// [`RegistrationLimiter::try_acquire`] at a given time (tests bring their own clock).
    pub fn try_acquire_at(
        &self,
        owner: &Digest,
        domain: &str,
        now: Instant,
    ) -> Result<(), Refused> {
        if self.per_user.is_none() && self.per_domain.is_none() {
            return Ok(());
        }
        let mut state = self.state();
        let user_wait = self.per_user.and_then(|q| state.owners.wait(q, owner, now));
        let domain_wait = self
            .per_domain
            .and_then(|q| state.domains.wait(q, domain, now));
        if user_wait.is_some() || domain_wait.is_some() {
            return Err(Refused {
                scope: if domain_wait.is_some() {
                    Scope::Domain
                } else {
                    Scope::User
                },
                retry_after: user_wait.max(domain_wait).unwrap_or_default(),
            });
        }
        if let Some(q) = self.per_user {
            state.owners.take(q, owner, now);
        }
        if let Some(q) = self.per_domain {
            state.domains.take(q, domain, now);
        }
        Ok(())
    }

    /// (owners, domains) currently remembered, for tests and stats.
    pub fn tracked(&self) -> (usize, usize) {
        let state = self.state();
        (state.owners.len(), state.domains.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(i: u32) -> Digest {
        let mut d = [0u8; 32];
        d[..4].copy_from_slice(&i.to_be_bytes());
        d
    }

    #[test]
    fn a_user_gets_the_hourly_count_at_once_then_one_per_refill() {
        let limiter = RegistrationLimiter::new(3, 0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.try_acquire_at(&owner(1), "a.example", t0), Ok(()));
        }
        let refused = limiter
            .try_acquire_at(&owner(1), "a.example", t0)
            .expect_err("the fourth in one instant is over the cap");
        assert_eq!(refused.scope, Scope::User);
        assert_eq!(refused.retry_after, Duration::from_secs(1200));
        // Another user is not affected.
        assert_eq!(limiter.try_acquire_at(&owner(2), "a.example", t0), Ok(()));
        // One token refills in 20 minutes, not before.
        let almost = t0 + Duration::from_secs(1199);
        let refused = limiter.try_acquire_at(&owner(1), "a.example", almost);
        assert_eq!(
            refused.map_err(|r| r.retry_after),
            Err(Duration::from_secs(1))
        );
        let t1 = t0 + Duration::from_secs(1200);
        assert_eq!(limiter.try_acquire_at(&owner(1), "a.example", t1), Ok(()));
        assert!(limiter.try_acquire_at(&owner(1), "a.example", t1).is_err());
        // A whole hour idle refills the whole bucket, and no more than that.
        let t2 = t1 + Duration::from_secs(10 * 3600);
        for _ in 0..3 {
            assert_eq!(limiter.try_acquire_at(&owner(1), "a.example", t2), Ok(()));
        }
        assert!(limiter.try_acquire_at(&owner(1), "a.example", t2).is_err());
    }

    #[test]
    fn the_domain_cap_is_shared_and_a_refusal_takes_no_token() {
        let limiter = RegistrationLimiter::new(2, 3);
        let t0 = Instant::now();
        assert_eq!(limiter.try_acquire_at(&owner(1), "a.example", t0), Ok(()));
        assert_eq!(limiter.try_acquire_at(&owner(1), "a.example", t0), Ok(()));
        // owner 1 is out; its refusals must not drain the domain.
        for _ in 0..5 {
            let refused = limiter.try_acquire_at(&owner(1), "a.example", t0);
            assert_eq!(refused.map_err(|r| r.scope), Err(Scope::User));
        }
        assert_eq!(limiter.try_acquire_at(&owner(2), "a.example", t0), Ok(()));
        let refused = limiter
            .try_acquire_at(&owner(3), "a.example", t0)
            .expect_err("the domain's three are used");
        assert_eq!(refused.scope, Scope::Domain);
        assert_eq!(refused.retry_after, Duration::from_secs(1200));
        // The domain refusal took nothing from owner 3, and other domains are untouched.
        assert_eq!(limiter.try_acquire_at(&owner(3), "b.example", t0), Ok(()));
        assert_eq!(limiter.try_acquire_at(&owner(3), "b.example", t0), Ok(()));
        assert!(limiter.try_acquire_at(&owner(3), "b.example", t0).is_err());
    }

    #[test]
    fn zero_is_unlimited_and_remembers_nothing() {
        let t0 = Instant::now();
        let limiter = RegistrationLimiter::unlimited();
        for _ in 0..10_000 {
            assert_eq!(limiter.try_acquire_at(&owner(1), "a.example", t0), Ok(()));
        }
        assert_eq!(limiter.tracked(), (0, 0));
        let domains_only = RegistrationLimiter::new(0, 2);
        assert_eq!(
            domains_only.try_acquire_at(&owner(1), "a.example", t0),
            Ok(())
        );
        assert_eq!(
            domains_only.try_acquire_at(&owner(1), "a.example", t0),
            Ok(())
        );
        assert!(domains_only
            .try_acquire_at(&owner(9), "a.example", t0)
            .is_err());
        assert_eq!(domains_only.tracked(), (0, 1));
        let users_only = RegistrationLimiter::new(2, 0);
        for i in 0..100 {
            assert_eq!(
                users_only.try_acquire_at(&owner(i), "a.example", t0),
                Ok(())
            );
            assert_eq!(
                users_only.try_acquire_at(&owner(i), "a.example", t0),
                Ok(())
            );
        }
        assert!(users_only
            .try_acquire_at(&owner(1), "a.example", t0)
            .is_err());
        assert_eq!(users_only.tracked(), (100, 0));
    }

    #[test]
    fn a_count_that_does_not_divide_the_hour_holds_exactly_that_many() {
        // An hour is not a whole number of nanoseconds per token for these; rounding must not add tokens.
        let t0 = Instant::now();
        for n in [7, 1_000_003, u32::MAX] {
            let quota = Quota::per_hour(n).expect("non-zero");
            let mut buckets = Buckets::<Digest>::new(10);
            buckets.set_full_at(owner(1), t0 + quota.cost * (n - 1));
            assert_eq!(
                buckets.wait(quota, &owner(1), t0),
                None,
                "{n}: one of {n} left"
            );
            buckets.set_full_at(owner(1), t0 + quota.cost * n);
            assert!(
                buckets.wait(quota, &owner(1), t0).is_some(),
                "{n}: all {n} taken"
            );
        }
        let limiter = RegistrationLimiter::new(7, 0);
        for _ in 0..7 {
            assert_eq!(limiter.try_acquire_at(&owner(1), "a.example", t0), Ok(()));
        }
        assert!(limiter.try_acquire_at(&owner(1), "a.example", t0).is_err());
    }

    #[test]
    fn full_buckets_are_forgotten_as_the_map_grows() {
        let limiter = RegistrationLimiter::new(10, 0);
        let t0 = Instant::now();
        // One registration each from many users, spread over time: each bucket is full again 6 minutes later.
        for i in 0..20_000u32 {
            let now = t0 + Duration::from_secs(u64::from(i));
            assert_eq!(limiter.try_acquire_at(&owner(i), "a.example", now), Ok(()));
        }
        let (owners, _) = limiter.tracked();
        // Live: the 360 of the last six minutes; the map is pruned before it reaches twice MIN_PRUNE_AT.
        assert!(
            owners < 2 * super::super::bucket::MIN_PRUNE_AT,
            "tracked {owners}"
        );
    }

    #[test]
    fn a_flood_of_distinct_users_and_domains_stays_bounded_and_keeps_the_drained() {
        let (max_owners, max_domains) = (3000, 2000);
        let limiter = RegistrationLimiter::bounded(2, 2, max_owners, max_domains);
        let t0 = Instant::now();
        // A drained user, before the flood.
        for _ in 0..2 {
            assert_eq!(
                limiter.try_acquire_at(&owner(u32::MAX), "x.example", t0),
                Ok(())
            );
        }
        // Millions would take long in a unit test; many times the bound, in one instant, proves the same:
        // nothing is full, so only eviction can keep the maps small.
        for i in 0..50_000u32 {
            let domain = format!("d{i}.example");
            assert_eq!(limiter.try_acquire_at(&owner(i), &domain, t0), Ok(()));
            let (owners, domains) = limiter.tracked();
            assert!(
                owners <= max_owners && domains <= max_domains,
                "{owners} {domains}"
            );
        }
        // The drained user's and domain's buckets outlived the flood of half-full ones.
        let refused = limiter.try_acquire_at(&owner(u32::MAX), "fresh.example", t0);
        assert_eq!(refused.map_err(|r| r.scope), Err(Scope::User));
        let refused = limiter.try_acquire_at(&owner(u32::MAX - 1), "x.example", t0);
        assert_eq!(refused.map_err(|r| r.scope), Err(Scope::Domain));
    }
}
