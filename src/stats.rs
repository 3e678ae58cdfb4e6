//! Counters of what knock did, for the periodic info log (and, later, metrics). Never keyed by node or JID.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters, cheap to bump from any handler.
#[derive(Debug, Default)]
pub struct Stats {
    /// Publishes answered after a push was accepted by the push service.
    pub pushed: AtomicU64,
    /// Publishes coalesced by the per-node rate limit.
    pub coalesced: AtomicU64,
    /// Publishes for nodes knock does not know.
    pub unknown_node: AtomicU64,
    /// Publishes with a wrong or missing secret, or from the wrong server.
    pub forbidden: AtomicU64,
    /// Malformed requests of any kind.
    pub bad_request: AtomicU64,
    /// Registrations deleted because the push service called the token dead.
    pub dead_token: AtomicU64,
    /// Publishes answered `wait` because the push service failed.
    pub push_failed: AtomicU64,
    /// Registrations created or updated.
    pub registered: AtomicU64,
    /// Registrations removed by their owner.
    pub unregistered: AtomicU64,
    /// Registrations refused by the per-user or per-domain flood cap.
    pub registration_capped: AtomicU64,
}

impl Stats {
    /// Add one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One line for the log: counts only.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "pushed={} coalesced={} unknown_node={} forbidden={} bad_request={} dead_token={} push_failed={} registered={} unregistered={} registration_capped={}",
            g(&self.pushed),
            g(&self.coalesced),
            g(&self.unknown_node),
            g(&self.forbidden),
            g(&self.bad_request),
            g(&self.dead_token),
            g(&self.push_failed),
            g(&self.registered),
            g(&self.unregistered),
            g(&self.registration_capped),
        )
    }
}
