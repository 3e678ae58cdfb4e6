//! What knock did and what state it is in, in counts: read by the periodic info log and by `/metrics` and
//! `/health` ([`crate::http`]). Never keyed by node, token, secret or JID.
//!
//! Everything here is recorded on a hot path (~100k publishes/s on one thread), so recording is a relaxed
//! atomic add into a fixed slot: no lock, no allocation, no map lookup. Labels exist only as indexes into the
//! fixed tables below; a value the tables do not know (an APNs reason Apple never documented) lands in
//! `other`, so nothing a peer sends can become a label or grow memory.

pub mod log_limit;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Counters and gauges, cheap to bump from any handler, the link and the push clients.
#[derive(Debug)]
pub struct Stats {
    /// Publishes answered after a push was accepted by the push service.
    pub pushed: AtomicU64,
    /// Of those, silent ones (`auto`'s unimportant publishes, or `push_type = "background"`).
    pub pushed_background: AtomicU64,
    /// Of those, visible ones.
    pub pushed_alert: AtomicU64,
    /// Of those, calls.
    pub pushed_call: AtomicU64,
    /// Publishes coalesced by the per-node rate limit.
    pub coalesced: AtomicU64,
    /// Unimportant publishes answered without a push: the device had its silent wake-ups for the hour
    /// (`auto` delivery), or a registration-free token its wake-ups.
    pub over_budget: AtomicU64,
    /// Publishes for nodes knock does not know (answered `item-not-found`).
    pub unknown_node: AtomicU64,
    /// Publishes with a wrong or missing secret, or from the wrong server.
    pub forbidden: AtomicU64,
    /// Malformed requests of any kind.
    pub bad_request: AtomicU64,
    /// Publishes whose token the push service called dead; each deleted its registration (answered
    /// `item-not-found`, and not counted as an unknown node).
    pub dead_token: AtomicU64,
    /// Publishes answered `wait` because the push service failed.
    pub transient_failure: AtomicU64,
    /// Registrations created or updated.
    pub registered: AtomicU64,
    /// Registrations removed by their owner.
    pub unregistered: AtomicU64,
    /// Registrations refused by the per-user or per-domain flood cap.
    pub registration_capped: AtomicU64,
    /// Re-registrations that changed nothing (answered without a write).
    pub registration_unchanged: AtomicU64,
    /// Registrations refused by policy (`allowed_domains`).
    pub registration_not_allowed: AtomicU64,
    /// Registrations answered `wait` because the store failed; nothing was acknowledged.
    pub registration_failed: AtomicU64,
    /// Knocks (knock tokens, §19) and the tokens' commands.
    pub knocks: KnockStats,
    /// The component link, as the link reports it.
    link: LinkStats,
    /// Publishes being handled right now (see [`Stats::publish_started`]).
    publishes_in_flight: AtomicU64,
    /// Every APNs HTTP exchange.
    pub apns: Exchanges,
    /// Every FCM HTTP exchange (sends; token grants are not counted here).
    pub fcm: Exchanges,
}

impl Default for Stats {
    fn default() -> Self {
        let zero = AtomicU64::default;
        Stats {
            pushed: zero(),
            pushed_background: zero(),
            pushed_alert: zero(),
            pushed_call: zero(),
            coalesced: zero(),
            over_budget: zero(),
            unknown_node: zero(),
            forbidden: zero(),
            bad_request: zero(),
            dead_token: zero(),
            transient_failure: zero(),
            registered: zero(),
            unregistered: zero(),
            registration_capped: zero(),
            registration_unchanged: zero(),
            registration_not_allowed: zero(),
            registration_failed: zero(),
            knocks: KnockStats::default(),
            link: LinkStats::default(),
            publishes_in_flight: zero(),
            apns: Exchanges::new(&APNS_STATUSES, &APNS_REASONS),
            fcm: Exchanges::new(&FCM_STATUSES, &FCM_REASONS),
        }
    }
}

/// What became of knocks and of knock tokens. Counts only: never which token or who knocked.
#[derive(Debug, Default)]
pub struct KnockStats {
    /// Knocks whose wake-up the push service accepted.
    pub pushed: AtomicU64,
    /// Knocks with a token knock does not honour: unknown, revoked, expired, or its registration gone.
    pub unknown: AtomicU64,
    /// Knocks over their token's hourly rate.
    pub limited: AtomicU64,
    /// Knocks answered `wait` because the push service or the store failed.
    pub failed: AtomicU64,
    /// Knock tokens created (rotations included).
    pub created: AtomicU64,
    /// Knock tokens revoked by their owner.
    pub revoked: AtomicU64,
    /// Knock-token creations refused by the hourly creation cap.
    pub capped: AtomicU64,
}

/// [`KnockStats`], read at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KnockSnapshot {
    /// Knocks pushed.
    pub pushed: u64,
    /// Knocks refused as unknown.
    pub unknown: u64,
    /// Knocks over their rate.
    pub limited: u64,
    /// Knocks answered `wait`.
    pub failed: u64,
    /// Tokens created.
    pub created: u64,
    /// Tokens revoked.
    pub revoked: u64,
    /// Creations refused by the hourly cap.
    pub capped: u64,
}

impl KnockStats {
    fn snapshot(&self) -> KnockSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        KnockSnapshot {
            pushed: g(&self.pushed),
            unknown: g(&self.unknown),
            limited: g(&self.limited),
            failed: g(&self.failed),
            created: g(&self.created),
            revoked: g(&self.revoked),
            capped: g(&self.capped),
        }
    }
}

/// The component link's state and history.
#[derive(Debug, Default)]
struct LinkStats {
    /// Whether the link is authenticated and serving now; `/health` answers 503 while it is not.
    up: AtomicBool,
    /// Whether the server refuses this knock because another one holds the component (it stands by to
    /// take over); `/health` answers 200 "standby" then, since restarting a standby helps nobody.
    standby: AtomicBool,
    /// Handshakes completed since start; every one after the first is a reconnect.
    ups: AtomicU64,
    /// Times a serving link ended (lost or closed for shutdown).
    downs: AtomicU64,
}

/// The HTTP status codes APNs documents, in the order `/metrics` lists them; any other code is `other`.
pub const APNS_STATUSES: [u16; 10] = [200, 400, 403, 404, 405, 410, 413, 429, 500, 503];

/// The `reason` values APNs documents, plus `none` (a success has no body) and `other` (anything else: a
/// reason Apple added later, or whatever a misbehaving peer put there).
pub const APNS_REASONS: [&str; 34] = [
    "none",
    "BadCollapseId",
    "BadDeviceToken",
    "BadExpirationDate",
    "BadMessageId",
    "BadPriority",
    "BadTopic",
    "DeviceTokenNotForTopic",
    "DuplicateHeaders",
    "IdleTimeout",
    "InvalidPushType",
    "MissingDeviceToken",
    "MissingTopic",
    "PayloadEmpty",
    "TopicDisallowed",
    "BadCertificate",
    "BadCertificateEnvironment",
    "ExpiredProviderToken",
    "Forbidden",
    "InvalidProviderToken",
    "MissingProviderToken",
    "UnrelatedKeyIdInToken",
    "BadEnvironmentKeyIdInToken",
    "BadPath",
    "MethodNotAllowed",
    "ExpiredToken",
    "Unregistered",
    "PayloadTooLarge",
    "TooManyProviderTokenUpdates",
    "TooManyRequests",
    "InternalServerError",
    "ServiceUnavailable",
    "Shutdown",
    "other",
];

/// The HTTP status codes FCM answers a send with, in the order `/metrics` lists them.
pub const FCM_STATUSES: [u16; 9] = [200, 400, 401, 403, 404, 429, 500, 502, 503];

/// FCM's `errorCode`s (from the `FcmError` detail), the canonical `status` Google answers when there is none
/// (an expired access token is `UNAUTHENTICATED`), plus `none` and `other`.
pub const FCM_REASONS: [&str; 13] = [
    "none",
    "INVALID_ARGUMENT",
    "UNREGISTERED",
    "SENDER_ID_MISMATCH",
    "QUOTA_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
    "THIRD_PARTY_AUTH_ERROR",
    "UNSPECIFIED_ERROR",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "other",
];

/// Upper bounds of the push services' latency histograms, in microseconds (1 ms to 10 s; they usually
/// answer in tens of milliseconds, and a push never waits longer than the publish deadline, at most 30 s).
pub const APNS_LATENCY_BOUNDS_MICROS: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

const BUCKET_SLOTS: usize = APNS_LATENCY_BOUNDS_MICROS.len() + 1;

/// One push service's HTTP answers by status and reason, and how long each exchange took. The labels are
/// the service's fixed tables; anything else is counted as `other`.
#[derive(Debug)]
pub struct Exchanges {
    /// The statuses the service documents.
    statuses: &'static [u16],
    /// `none`, the reasons it documents, `other`.
    reasons: &'static [&'static str],
    /// `[status slot * reasons.len() + reason slot]`; the last status slot is `other`.
    responses: Box<[AtomicU64]>,
    /// Exchanges that got no HTTP answer (connect, TLS or stream failure, or the deadline).
    transport_errors: AtomicU64,
    /// Latency of every exchange, answered or not: one slot per bound (not cumulative) plus one over the last.
    buckets: [AtomicU64; BUCKET_SLOTS],
    /// Sum of all latencies, in microseconds (u64 microseconds last 580 000 years).
    latency_sum_micros: AtomicU64,
}

impl Exchanges {
    /// Counters for a service with these tables (`reasons` starts with `none` and ends with `other`).
    fn new(statuses: &'static [u16], reasons: &'static [&'static str]) -> Exchanges {
        Exchanges {
            statuses,
            reasons,
            responses: (0..(statuses.len() + 1) * reasons.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            transport_errors: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_micros: AtomicU64::new(0),
        }
    }

    /// One HTTP exchange got an answer: its status, the service's reason (empty if none), and how long it
    /// took from sending the request to reading the answer.
    pub fn response(&self, status: u16, reason: &str, elapsed: Duration) {
        let slot = self.status_slot(status) * self.reasons.len() + self.reason_slot(reason);
        self.responses[slot].fetch_add(1, Ordering::Relaxed);
        self.latency(elapsed);
    }

    /// One HTTP exchange got no answer (connect, TLS or stream error, timeout) after `elapsed`.
    pub fn transport_error(&self, elapsed: Duration) {
        self.transport_errors.fetch_add(1, Ordering::Relaxed);
        self.latency(elapsed);
    }

    fn latency(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let slot = APNS_LATENCY_BOUNDS_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(APNS_LATENCY_BOUNDS_MICROS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn status_slot(&self, status: u16) -> usize {
        self.statuses
            .iter()
            .position(|&s| s == status)
            .unwrap_or(self.statuses.len())
    }

    fn reason_slot(&self, reason: &str) -> usize {
        if reason.is_empty() {
            return 0;
        }
        let known = &self.reasons[1..self.reasons.len() - 1];
        known
            .iter()
            .position(|&r| r == reason)
            .map_or(self.reasons.len() - 1, |i| i + 1)
    }

    /// Read them once.
    fn snapshot(&self) -> ExchangeSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let width = self.reasons.len();
        let responses = self
            .responses
            .iter()
            .enumerate()
            .filter_map(|(i, cell)| {
                let n = g(cell);
                (n > 0).then(|| {
                    (
                        self.statuses.get(i / width).copied(),
                        self.reasons[i % width],
                        n,
                    )
                })
            })
            .collect();
        let mut running = 0;
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                running += g(b);
                let bound = APNS_LATENCY_BOUNDS_MICROS
                    .get(i)
                    .copied()
                    .unwrap_or(u64::MAX);
                (bound, running)
            })
            .collect();
        ExchangeSnapshot {
            responses,
            transport_errors: g(&self.transport_errors),
            latency: Histogram {
                buckets,
                sum_micros: g(&self.latency_sum_micros),
                count: running,
            },
        }
    }
}

/// One push service's exchanges, read at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExchangeSnapshot {
    /// Answers: `(status, or None for one not in the service's table, reason, count)`, only those seen.
    pub responses: Vec<(Option<u16>, &'static str, u64)>,
    /// Exchanges without an HTTP answer.
    pub transport_errors: u64,
    /// Exchange latency.
    pub latency: Histogram,
}

/// Marks one publish as in flight until dropped; from [`Stats::publish_started`].
#[must_use = "the publish counts as in flight only while the guard lives"]
#[derive(Debug)]
pub struct InFlight<'a> {
    /// The gauge to decrement on drop.
    gauge: &'a AtomicU64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.gauge.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One latency histogram, read at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Histogram {
    /// `(upper bound in microseconds, observations at or under it)`, cumulative, as Prometheus wants;
    /// the last is `u64::MAX` for `+Inf`.
    pub buckets: Vec<(u64, u64)>,
    /// Every observation, in microseconds.
    pub sum_micros: u64,
    /// How many observations (the `+Inf` bucket).
    pub count: u64,
}

/// Every counter and gauge, read at one moment (each is read once; they are not mutually consistent to the
/// publish, which a scrape every few seconds does not need).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Publishes pushed.
    pub pushed: u64,
    /// Of those, silent, visible and calls.
    pub pushed_background: u64,
    /// Visible.
    pub pushed_alert: u64,
    /// Calls.
    pub pushed_call: u64,
    /// Publishes coalesced.
    pub coalesced: u64,
    /// Publishes answered without a push for a used-up hourly budget.
    pub over_budget: u64,
    /// Publishes to nodes knock does not know (dead tokens are counted apart, though both are answered
    /// `item-not-found`).
    pub unknown_node: u64,
    /// Publishes refused for a wrong secret or publisher.
    pub forbidden: u64,
    /// Publishes whose token the push service called dead (the registration was deleted).
    pub dead_token: u64,
    /// Publishes answered `wait` (push service down, throttling, misconfigured, or the store failed).
    pub transient_failure: u64,
    /// Malformed requests of any kind (publishes, registrations, unparseable IQs).
    pub bad_request: u64,
    /// Registrations created or changed (an unchanged re-registration is not counted).
    pub registered: u64,
    /// Registrations refused by a flood cap.
    pub registration_capped: u64,
    /// Re-registrations that changed nothing.
    pub registration_unchanged: u64,
    /// Registrations refused by `allowed_domains`.
    pub registration_not_allowed: u64,
    /// Registrations the store failed to save.
    pub registration_failed: u64,
    /// Registrations removed by their owner.
    pub unregistered: u64,
    /// Knocks and knock tokens.
    pub knocks: KnockSnapshot,
    /// Whether the component link is up.
    pub link_up: bool,
    /// Whether another knock holds the component and this one stands by.
    pub link_standby: bool,
    /// Completed handshakes after the first.
    pub link_reconnects: u64,
    /// Times a serving link ended.
    pub link_downs: u64,
    /// Publishes being handled.
    pub publishes_in_flight: u64,
    /// APNs exchanges.
    pub apns: ExchangeSnapshot,
    /// FCM exchanges.
    pub fcm: ExchangeSnapshot,
}

impl Stats {
    /// Add one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The component link completed its handshake and is serving.
    pub fn link_up(&self) {
        self.link.ups.fetch_add(1, Ordering::Relaxed);
        // A knock that serves stands by for nobody, whoever forgot to say so.
        self.link.standby.store(false, Ordering::Relaxed);
        self.link.up.store(true, Ordering::Relaxed);
    }

    /// A serving link ended, for any reason (lost, or closed for shutdown).
    pub fn link_down(&self) {
        self.link.downs.fetch_add(1, Ordering::Relaxed);
        self.link.up.store(false, Ordering::Relaxed);
    }

    /// Whether the link is up now.
    pub fn is_link_up(&self) -> bool {
        self.link.up.load(Ordering::Relaxed)
    }

    /// Another knock holds the component and this one stands by (`true`), or no longer does (`false`).
    pub fn link_standby(&self, standby: bool) {
        self.link.standby.store(standby, Ordering::Relaxed);
    }

    /// Whether this knock stands by for another one now.
    pub fn is_link_standby(&self) -> bool {
        self.link.standby.load(Ordering::Relaxed)
    }

    /// A publish is being handled until the returned guard drops (drop it once the publish is answered).
    pub fn publish_started(&self) -> InFlight<'_> {
        self.publishes_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            gauge: &self.publishes_in_flight,
        }
    }

    /// Read everything once.
    pub fn snapshot(&self) -> Snapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let dead_token = g(&self.dead_token);
        Snapshot {
            pushed: g(&self.pushed),
            pushed_background: g(&self.pushed_background),
            pushed_alert: g(&self.pushed_alert),
            pushed_call: g(&self.pushed_call),
            coalesced: g(&self.coalesced),
            over_budget: g(&self.over_budget),
            unknown_node: g(&self.unknown_node),
            forbidden: g(&self.forbidden),
            dead_token,
            transient_failure: g(&self.transient_failure),
            bad_request: g(&self.bad_request),
            registered: g(&self.registered),
            registration_capped: g(&self.registration_capped),
            registration_unchanged: g(&self.registration_unchanged),
            registration_not_allowed: g(&self.registration_not_allowed),
            registration_failed: g(&self.registration_failed),
            unregistered: g(&self.unregistered),
            knocks: self.knocks.snapshot(),
            link_up: self.is_link_up(),
            link_standby: self.is_link_standby(),
            link_reconnects: g(&self.link.ups).saturating_sub(1),
            link_downs: g(&self.link.downs),
            publishes_in_flight: g(&self.publishes_in_flight),
            apns: self.apns.snapshot(),
            fcm: self.fcm.snapshot(),
        }
    }

    /// One line for the log: counts only.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "pushed={} coalesced={} over_budget={} unknown_node={} forbidden={} bad_request={} dead_token={} transient_failure={} registered={} unregistered={} registration_capped={}",
            g(&self.pushed),
            g(&self.coalesced),
            g(&self.over_budget),
            g(&self.unknown_node),
            g(&self.forbidden),
            g(&self.bad_request),
            g(&self.dead_token),
            g(&self.transient_failure),
            g(&self.registered),
            g(&self.unregistered),
            g(&self.registration_capped),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_reports_up_down_and_reconnects() {
        let stats = Stats::default();
        let s = stats.snapshot();
        assert!(!s.link_up, "down until the first handshake");
        assert_eq!((s.link_reconnects, s.link_downs), (0, 0));
        stats.link_up();
        assert!(stats.snapshot().link_up);
        assert_eq!(
            stats.snapshot().link_reconnects,
            0,
            "the first is no reconnect"
        );
        stats.link_down();
        stats.link_up();
        stats.link_down();
        let s = stats.snapshot();
        assert!(!s.link_up);
        assert_eq!((s.link_reconnects, s.link_downs), (1, 2));
    }

    #[test]
    fn a_standby_is_neither_up_nor_standing_by_once_it_takes_over() {
        let stats = Stats::default();
        assert!(!stats.snapshot().link_standby);
        stats.link_standby(true);
        let s = stats.snapshot();
        assert!(s.link_standby && !s.link_up);
        stats.link_up();
        let s = stats.snapshot();
        assert!(s.link_up && !s.link_standby, "serving ends standing by");
    }

    #[test]
    fn in_flight_publishes_count_while_their_guard_lives() {
        let stats = Stats::default();
        let first = stats.publish_started();
        let second = stats.publish_started();
        assert_eq!(stats.snapshot().publishes_in_flight, 2);
        drop(first);
        assert_eq!(stats.snapshot().publishes_in_flight, 1);
        drop(second);
        assert_eq!(stats.snapshot().publishes_in_flight, 0);
    }

    #[test]
    fn apns_answers_land_in_fixed_slots() {
        let stats = Stats::default();
        stats.apns.response(200, "", Duration::from_millis(3));
        stats.apns.response(200, "", Duration::from_millis(3));
        stats
            .apns
            .response(410, "Unregistered", Duration::from_millis(20));
        stats
            .apns
            .response(503, "Shutdown", Duration::from_secs(60));
        // What a peer invents never becomes a label: a token as a reason, an undocumented status.
        stats.apns.response(400, &"ab".repeat(32), Duration::ZERO);
        stats.apns.response(418, "other", Duration::ZERO);
        stats.apns.transport_error(Duration::from_micros(1_000));
        let s = stats.snapshot();
        assert_eq!(
            s.apns.responses,
            vec![
                (Some(200), "none", 2),
                (Some(400), "other", 1),
                (Some(410), "Unregistered", 1),
                (Some(503), "Shutdown", 1),
                (None, "other", 1),
            ]
        );
        assert_eq!(s.apns.transport_errors, 1);
        let h = &s.apns.latency;
        assert_eq!(h.count, 7);
        assert_eq!(h.sum_micros, 6_000 + 20_000 + 60_000_000 + 1_000);
        let at = |bound: u64| h.buckets.iter().find(|b| b.0 == bound).map(|b| b.1);
        assert_eq!(
            at(1_000),
            Some(3),
            "zero twice and exactly 1 ms, bounds inclusive"
        );
        assert_eq!(at(2_500), Some(3));
        assert_eq!(at(5_000), Some(5));
        assert_eq!(at(25_000), Some(6));
        assert_eq!(at(10_000_000), Some(6), "a minute is over every bound");
        assert_eq!(h.buckets.last(), Some(&(u64::MAX, 7)));
        assert_eq!(h.buckets.len(), APNS_LATENCY_BOUNDS_MICROS.len() + 1);
    }

    #[test]
    fn reasons_map_to_their_own_slot() {
        let stats = Stats::default();
        for (exchanges, statuses, reasons) in [
            (&stats.apns, &APNS_STATUSES[..], &APNS_REASONS[..]),
            (&stats.fcm, &FCM_STATUSES[..], &FCM_REASONS[..]),
        ] {
            for (i, reason) in reasons.iter().enumerate().skip(1) {
                assert_eq!(exchanges.reason_slot(reason), i, "{reason}");
            }
            assert_eq!(exchanges.reason_slot(""), 0);
            assert_eq!(
                exchanges.reason_slot("some reason nobody documents"),
                reasons.len() - 1
            );
            for (i, status) in statuses.iter().enumerate() {
                assert_eq!(exchanges.status_slot(*status), i);
            }
            assert_eq!(exchanges.status_slot(0), statuses.len());
        }
        assert_eq!(
            stats.apns.reason_slot("unregistered"),
            APNS_REASONS.len() - 1,
            "case matters"
        );
    }

    #[test]
    fn fcm_answers_are_counted_apart_from_apns() {
        let stats = Stats::default();
        stats.fcm.response(200, "", Duration::from_millis(2));
        stats
            .fcm
            .response(404, "UNREGISTERED", Duration::from_millis(2));
        stats.fcm.response(502, "", Duration::from_millis(2));
        stats.fcm.transport_error(Duration::from_millis(2));
        let s = stats.snapshot();
        assert_eq!(
            s.fcm.responses,
            vec![
                (Some(200), "none", 1),
                (Some(404), "UNREGISTERED", 1),
                (Some(502), "none", 1),
            ]
        );
        assert_eq!((s.fcm.transport_errors, s.fcm.latency.count), (1, 4));
        assert!(s.apns.responses.is_empty() && s.apns.latency.count == 0);
    }
}
