//! Fault injection against the real `knock` binary (issue 5): APNs down, slow, or cutting connections, the XMPP
//! server dropping the link mid-burst, and publish floods. Every peer is on 127.0.0.1; every claim is measured
//! (replies per id, latencies, the mock's request counts, knock's RSS from `/proc`), not assumed.
//!
//! Deadlines are short (1 to 3 s) so "minutes of outage" fit in seconds of CI time: what matters is that
//! thousands of publishes go through the faulty path, enough for a leak per publish to show in the RSS.
//!
//! - APNs down (`503`, port refusing, peer silent), FCM down (`503`): every publish `wait` by the deadline,
//!   attempts per publish bounded, RSS flat, pushes again once the service is back.
//! - APNs slower than the deadline: `wait` by the deadline, the request abandoned, other publishes and pings
//!   answered meanwhile, nothing answered twice.
//! - APNs GOAWAY or reset under requests in flight: one `result` each, later pushes on a new connection.
//! - APNs path dying silently: noticed by knock's own pings, replaced within seconds.
//! - The server dropping the link mid-burst: nothing answered twice or on the new link, no wake-up lost;
//!   SIGTERM while the link is down still sends the lost link's pushes.
//! - Floods and `max_in_flight`: RSS flat; at the cap knock stops reading, recovers, and keeps the link.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use minidom::Element;
use testkit::apns::{Behaviour, CANCELLED_REASON};
use testkit::server::{ComponentConn, ConnSender};
use testkit::silent::SilentPeer;

mod common;
use common::harness::*;
use common::*;

/// The publish deadline of the outage tests: each publish is answered within this.
const OUTAGE_DEADLINE: Duration = Duration::from_millis(1000);
/// knock's replies leave at its deadline; this much more covers the trip to the test on a loaded CI machine.
const SLACK: Duration = Duration::from_millis(400);
/// Publishes kept in flight by [`stream`].
const WINDOW: usize = 200;
/// knock may grow by this much after warm-up (allocator noise; measured 0.4 to 0.8 MiB). Over the three
/// quarters of [`OUTAGE_PUBLISHES`] after warm-up, a leak of about 1 KiB per publish shows.
const RSS_SLACK_KIB: u64 = 2 * 1024;
/// Publishes per outage test.
const OUTAGE_PUBLISHES: usize = 3000;
/// Attempts knock makes per push (`src/push/apns.rs`).
const APNS_ATTEMPTS: u64 = 3;
/// Most attempts knock makes per FCM push (`src/push/fcm.rs`); the deadline usually ends them sooner.
const FCM_ATTEMPTS: u64 = 8;

/// One [`stream`] at a time: the test harness runs tests in parallel on CI's two cores, and two floods at
/// once would measure each other's scheduling delays instead of knock's deadlines.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A device token for registration `i`.
fn token(i: usize) -> String {
    format!("{:064x}", i + 1)
}

/// One registered device: its token, node and secret.
struct Device {
    token: String,
    node: String,
    secret: String,
}

/// The push service an outage test's devices are registered with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Service {
    /// The `chat` app, by `register-push-apns`.
    Apns,
    /// The `android` app, by `register-push-fcm` as Conversations sends it.
    Fcm,
}

/// Register `n` APNs devices, one per user (a user may register only a few an hour), one token each.
async fn register_devices(conn: &mut ComponentConn, n: usize) -> Vec<Device> {
    register_devices_with(conn, n, Service::Apns).await
}

/// Register `n` devices of `service`, one per user, one token each.
async fn register_devices_with(
    conn: &mut ComponentConn,
    n: usize,
    service: Service,
) -> Vec<Device> {
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        let user = format!("user{i}@localhost/phone");
        let id = format!("reg{i}");
        let (token, xml) = match service {
            Service::Apns => {
                let token = token(i);
                let xml = register_xml(&id, &user, "dev", &token, "");
                (token, xml)
            }
            Service::Fcm => {
                let token = format!("outage-{i}:APA91b");
                let xml = conversations_register_xml(&id, &user, "0123456789abcdef", &token, "");
                (token, xml)
            }
        };
        let reply = ask(conn, &xml).await;
        let (node, secret) = node_and_secret(&reply);
        devices.push(Device {
            token,
            node,
            secret,
        });
    }
    devices
}

/// An XEP-0199 ping from the server.
fn ping_xml(id: &str) -> String {
    format!("<iq xmlns='{NS}' type='get' id='{id}' from='localhost' to='push.localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
}

/// Queue one publish per device, ids `{prefix}{first + i}`, without flushing.
async fn feed_publishes(conn: &mut ComponentConn, prefix: &str, first: usize, devices: &[Device]) {
    for (i, d) in devices.iter().enumerate() {
        let id = format!("{prefix}{}", first + i);
        conn.feed_raw(&prosody_publish(&id, "localhost", &d.node, &d.secret))
            .await
            .expect("send");
    }
}

/// What [`stream`] measured.
#[derive(Debug)]
struct Streamed {
    /// Slowest reply, from the write of its IQ to its arrival.
    max_latency: Duration,
    /// knock's RSS once a quarter of the publishes were answered.
    rss_warm_kib: u64,
    /// knock's largest RSS after that.
    rss_max_kib: u64,
    /// knock's RSS at the end.
    rss_end_kib: u64,
}

impl Streamed {
    /// Assert that knock's memory stayed flat after warm-up.
    fn assert_flat(&self, what: &str) {
        assert!(
            self.rss_max_kib <= self.rss_warm_kib + RSS_SLACK_KIB,
            "{what}: knock's RSS grew from {} KiB to {} KiB: {self:?}",
            self.rss_warm_kib,
            self.rss_max_kib
        );
    }
}

/// Keep [`WINDOW`] IQs in flight, `stanza(i)` being the i-th with id `s{i}`, until `total` are answered.
/// Every reply goes through `check`; each id must be answered exactly once (a reply to an unknown or
/// already answered id fails the test). Samples knock's RSS every 250 replies. Runs alone (see [`HEAVY`]).
async fn stream(
    h: &Harness,
    conn: &mut ComponentConn,
    total: usize,
    stanza: impl Fn(usize, &str) -> String,
    check: impl Fn(usize, &Element),
) -> Streamed {
    let _alone = HEAVY.lock().await;
    let mut sent: HashMap<String, (usize, Instant)> = HashMap::new();
    let mut next = 0;
    let mut answered = 0;
    let mut measured = Streamed {
        max_latency: Duration::ZERO,
        rss_warm_kib: 0,
        rss_max_kib: 0,
        rss_end_kib: 0,
    };
    while answered < total {
        if next < total && sent.len() < WINDOW {
            while next < total && sent.len() < WINDOW {
                let id = format!("s{next}");
                conn.feed_raw(&stanza(next, &id)).await.expect("send");
                sent.insert(id, (next, Instant::now()));
                next += 1;
            }
            conn.flush().await.expect("flush");
        }
        let Some(reply) = conn.recv(WAIT).await else {
            panic!(
                "{} IQs unanswered after {WAIT:?} ({answered} answered)\n--- knock log ---\n{}",
                sent.len(),
                h.log_text()
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        };
        let id = reply.attr("id").unwrap_or_default().to_owned();
        let Some((i, at)) = sent.remove(&id) else {
            panic!(
                "a reply to {id:?}, which is not in flight (answered twice?): {}",
                String::from(&reply)
            );
        };
        measured.max_latency = measured.max_latency.max(at.elapsed());
        check(i, &reply);
        answered += 1;
        if answered == total / 4 {
            measured.rss_warm_kib = h.rss_kib();
        } else if answered > total / 4 && answered % 250 == 0 {
            measured.rss_max_kib = measured.rss_max_kib.max(h.rss_kib());
        }
    }
    measured.rss_end_kib = h.rss_kib();
    measured.rss_max_kib = measured.rss_max_kib.max(measured.rss_end_kib);
    // Nothing more may come: every IQ was answered once.
    if let Some(extra) = conn.recv(Duration::from_millis(300)).await {
        panic!(
            "a reply after every IQ was answered: {}",
            String::from(&extra)
        );
    }
    measured
}

/// knock for the outage tests: a short publish deadline, no rate limit, quiet logs, `n` APNs devices.
async fn outage_harness(n: usize) -> (Harness, ComponentConn, Vec<Device>) {
    outage_harness_for(n, Service::Apns).await
}

/// The same, with `n` devices of `service`.
async fn outage_harness_for(n: usize, service: Service) -> (Harness, ComponentConn, Vec<Device>) {
    let h = Harness::start_with(Options {
        publish_deadline_ms: OUTAGE_DEADLINE.as_millis() as u64,
        log_filter: "warn",
        fcm: (service == Service::Fcm).then_some(""),
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let devices = register_devices_with(&mut conn, n, service).await;
    h.apns.set_recording(false);
    (h, conn, devices)
}

/// A steady stream of publishes round-robin over `devices`, all answered `wait` within the deadline.
async fn publish_through_outage(
    h: &Harness,
    conn: &mut ComponentConn,
    devices: &[Device],
) -> Streamed {
    let measured = stream(
        h,
        conn,
        OUTAGE_PUBLISHES,
        |i, id| {
            let d = &devices[i % devices.len()];
            prosody_publish(id, "localhost", &d.node, &d.secret)
        },
        |_, reply| {
            assert_eq!(
                error_of(reply),
                err("wait", "internal-server-error"),
                "{}",
                String::from(reply)
            )
        },
    )
    .await;
    assert!(
        measured.max_latency <= OUTAGE_DEADLINE + SLACK,
        "a publish was answered after the deadline: {measured:?}"
    );
    measured.assert_flat("push service outage");
    measured
}

/// Once APNs is healthy again, publishes are pushed again within a bounded time; how long it took.
async fn recovers(h: &Harness, conn: &mut ComponentConn, device: &Device) -> Duration {
    recovers_by(conn, device, || h.apns.requests_ok()).await
}

/// Once the push service is healthy again, publishes are pushed again within a bounded time; how long it
/// took. `delivered` counts the service's accepted pushes.
async fn recovers_by(
    conn: &mut ComponentConn,
    device: &Device,
    delivered: impl Fn() -> u64,
) -> Duration {
    let started = Instant::now();
    let ok_before = delivered();
    for attempt in 0.. {
        let reply = publish(
            conn,
            &format!("back{attempt}"),
            &device.node,
            &device.secret,
        )
        .await;
        if error_of(&reply).is_none() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "pushes still fail 5 s after the push service came back: {}",
            String::from(&reply)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(delivered() > ok_before, "the result was a real push");
    started.elapsed()
}

// The mock APNs and the server stand-in get a thread of their own, so the latencies are knock's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_answering_503_for_thousands_of_publishes_is_wait_bounded_and_flat() {
    let (h, mut conn, devices) = outage_harness(20).await;
    h.apns.set_default_behaviour(Behaviour::Unavailable);
    let before = h.apns.requests_received();
    let measured = publish_through_outage(&h, &mut conn, &devices).await;
    let requests = h.apns.requests_received() - before;
    let publishes = OUTAGE_PUBLISHES as u64;
    assert!(
        requests <= APNS_ATTEMPTS * publishes,
        "{requests} APNs requests for {publishes} publishes: retries are not bounded"
    );
    assert!(
        requests > publishes,
        "{requests} requests for {publishes} publishes: a 503 is worth a retry"
    );

    // An outage is a line per ten seconds in the log, not a line per publish.
    let log = h.log_text();
    let lines = log.matches("push failed; server told to wait").count();
    assert!(
        (1..=3).contains(&lines),
        "{lines} warn lines for {publishes} failed publishes"
    );
    assert!(
        log.contains("held="),
        "the line says how many it stands for: {log}"
    );

    h.apns.set_default_behaviour(Behaviour::Ok);
    let back = recovers(&h, &mut conn, &devices[0]).await;
    eprintln!("503: {requests} requests for {publishes} publishes, {measured:?}, back in {back:?}");
}

// The mocks and the server stand-in get a thread of their own, so the latencies are knock's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_answering_503_for_thousands_of_publishes_is_wait_bounded_and_flat() {
    let (h, mut conn, devices) = outage_harness_for(20, Service::Fcm).await;
    let fcm = h.fcm.as_ref().expect("mock FCM");
    fcm.set_default_behaviour(testkit::fcm::Behaviour::Unavailable);
    let before = fcm.requests().len() as u64;
    let measured = publish_through_outage(&h, &mut conn, &devices).await;
    let requests = fcm.requests().len() as u64 - before;
    let publishes = OUTAGE_PUBLISHES as u64;
    assert!(
        requests <= FCM_ATTEMPTS * publishes,
        "{requests} FCM requests for {publishes} publishes: retries are not bounded"
    );
    assert!(
        requests > publishes,
        "{requests} requests for {publishes} publishes: a 503 is worth a retry"
    );
    assert_eq!(
        fcm.token_requests(),
        1,
        "one access token served the whole outage"
    );

    fcm.set_default_behaviour(testkit::fcm::Behaviour::Ok);
    let ok = || fcm.requests().iter().filter(|r| r.status == 200).count() as u64;
    let back = recovers_by(&mut conn, &devices[0], ok).await;
    eprintln!(
        "FCM 503: {requests} requests for {publishes} publishes, {measured:?}, back in {back:?}"
    );
}

// The mock APNs and the server stand-in get a thread of their own, so the latencies are knock's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_refusing_connections_for_thousands_of_publishes_is_wait_and_flat() {
    let (mut h, mut conn, devices) = outage_harness(20).await;
    h.apns.go_down().await;
    let measured = publish_through_outage(&h, &mut conn, &devices).await;

    h.apns
        .come_back()
        .await
        .expect("mock APNs back on its port");
    let back = recovers(&h, &mut conn, &devices[0]).await;
    eprintln!("refused: {measured:?}, back in {back:?}");
}

// The mock APNs and the server stand-in get a thread of their own, so the latencies are knock's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_accepting_and_never_answering_is_wait_bounded_and_flat() {
    let (mut h, mut conn, devices) = outage_harness(20).await;
    h.apns.go_down().await;
    let silent = SilentPeer::bind(h.apns.addr())
        .await
        .expect("a silent peer on the APNs port");
    let measured = publish_through_outage(&h, &mut conn, &devices).await;
    let connections = silent.accepted() as u64;
    let publishes = OUTAGE_PUBLISHES as u64;
    assert!(
        (1..=APNS_ATTEMPTS * publishes).contains(&connections),
        "{connections} connections for {publishes} publishes"
    );

    silent.close().await;
    h.apns
        .come_back()
        .await
        .expect("mock APNs back on its port");
    let back = recovers(&h, &mut conn, &devices[0]).await;
    eprintln!("silent: {connections} connections for {publishes} publishes, {measured:?}, back in {back:?}");
}

/// Collects every stanza knock sends, with when it arrived, so a test can check "exactly once" and "by when".
struct Arrivals {
    since: Instant,
    by_id: HashMap<String, Vec<(Duration, Element)>>,
}

impl Arrivals {
    fn new() -> Arrivals {
        Arrivals {
            since: Instant::now(),
            by_id: HashMap::new(),
        }
    }

    /// Receive until `until` has arrived (or `timeout` passed); true if it did.
    async fn until(&mut self, conn: &mut ComponentConn, until: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.by_id.contains_key(until) {
            let left = deadline.saturating_duration_since(Instant::now());
            match conn.recv(left).await {
                Some(stanza) => self.note(stanza),
                None => return false,
            }
        }
        true
    }

    /// Receive everything that arrives within `quiet`.
    async fn drain(&mut self, conn: &mut ComponentConn, quiet: Duration) {
        while let Some(stanza) = conn.recv(quiet).await {
            self.note(stanza);
        }
    }

    fn note(&mut self, stanza: Element) {
        let id = stanza.attr("id").unwrap_or_default().to_owned();
        self.by_id
            .entry(id)
            .or_default()
            .push((self.since.elapsed(), stanza));
    }

    /// The one reply to `id`, and when it came; fails on none or several.
    fn once(&self, id: &str) -> &(Duration, Element) {
        match self.by_id.get(id).map(Vec::as_slice) {
            Some([one]) => one,
            Some(many) => panic!("{id} answered {} times", many.len()),
            None => panic!("{id} never answered"),
        }
    }

    /// Wait for `{prefix}0` to `{prefix}{n - 1}`, then a moment for any second reply: each must be answered
    /// exactly once, with a result, on this link.
    async fn all_results(
        &mut self,
        conn: &mut ComponentConn,
        prefix: &str,
        n: usize,
        timeout: Duration,
    ) {
        for i in 0..n {
            let id = format!("{prefix}{i}");
            assert!(
                self.until(conn, &id, timeout).await,
                "{id} unanswered on the link it came on (link ended: {:?})",
                conn.end_reason()
            );
        }
        self.drain(conn, Duration::from_millis(300)).await;
        for i in 0..n {
            let (_, reply) = self.once(&format!("{prefix}{i}"));
            assert_eq!(
                error_of(reply),
                None,
                "{prefix}{i}: {}",
                String::from(reply)
            );
        }
        self.assert_no_duplicates();
    }

    /// Every id was answered at most once.
    fn assert_no_duplicates(&self) {
        for (id, replies) in &self.by_id {
            assert_eq!(replies.len(), 1, "{id} answered {} times", replies.len());
        }
    }
}

#[tokio::test]
async fn a_push_slower_than_the_deadline_is_wait_by_the_deadline_and_blocks_nothing() {
    const DEADLINE: Duration = Duration::from_secs(2);
    let h = Harness::start_with(Options {
        publish_deadline_ms: DEADLINE.as_millis() as u64,
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let devices = register_devices(&mut conn, 2).await;
    let (slow, fast) = (&devices[0], &devices[1]);
    h.apns.set_behaviour(
        &slow.token,
        Behaviour::delay(Duration::from_secs(10), Behaviour::Ok),
    );

    let mut seen = Arrivals::new();
    conn.send_raw(&prosody_publish(
        "slow",
        "localhost",
        &slow.node,
        &slow.secret,
    ))
    .await
    .expect("send");
    // Past the deadline, a fast publish and a ping every 100 ms, each answered at once.
    let mut round = 0;
    let mut slowest = Duration::ZERO;
    while seen.since.elapsed() < DEADLINE + Duration::from_millis(500) {
        let (publish_id, ping_id) = (format!("fast{round}"), format!("ping{round}"));
        let sent = seen.since.elapsed();
        conn.feed_raw(&prosody_publish(
            &publish_id,
            "localhost",
            &fast.node,
            &fast.secret,
        ))
        .await
        .expect("send");
        conn.feed_raw(&ping_xml(&ping_id)).await.expect("send");
        conn.flush().await.expect("flush");
        for id in [&publish_id, &ping_id] {
            assert!(
                seen.until(&mut conn, id, WAIT).await,
                "{id} not answered while a push is slow"
            );
            let (at, reply) = seen.once(id);
            assert_eq!(error_of(reply), None, "{}", String::from(reply));
            slowest = slowest.max(*at - sent);
            assert!(
                *at - sent < Duration::from_millis(500),
                "{id} took {:?} while a push was slow",
                *at - sent
            );
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (at, reply) = seen.once("slow");
    let answered_at = *at;
    assert_eq!(error_of(reply), err("wait", "internal-server-error"));
    assert!(
        *at >= DEADLINE.mul_f64(0.8) && *at <= DEADLINE + SLACK,
        "the slow publish was answered at {at:?}, deadline {DEADLINE:?}"
    );
    // knock gave the request up (reset its stream) rather than leaving it open; had it waited for the answer,
    // it would show at 10 s, with any second reply.
    let slow_pushes = {
        let deadline = Instant::now() + Duration::from_secs(12);
        loop {
            let pushes = h.apns.requests_for(&slow.token);
            if !pushes.is_empty() || Instant::now() > deadline {
                break pushes;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(
        slow_pushes.len(),
        1,
        "one attempt, abandoned at the deadline"
    );
    assert_eq!(slow_pushes[0].reason.as_deref(), Some(CANCELLED_REASON));
    seen.drain(&mut conn, Duration::from_millis(500)).await;
    seen.assert_no_duplicates();
    assert!(round >= 10, "only {round} rounds");
    eprintln!("slow push: answered wait at {answered_at:?}; {round} rounds of a fast publish and a ping, slowest {slowest:?}");
}

/// How APNs breaks its connections in [`apns_breaks_its_connection_under_requests_in_flight`].
#[derive(Debug, Clone, Copy)]
enum Break {
    /// HTTP/2 GOAWAY: streams already open finish, new ones need a new connection.
    GoAway,
    /// The TCP connection dropped without a word, streams in flight with it.
    Reset,
}

/// `IN_FLIGHT` publishes whose pushes are at APNs when it breaks its connection: each gets exactly one reply,
/// and it is `result` (the break is invisible to the server); the next pushes go out on a new connection.
async fn apns_breaks_its_connection_under_requests_in_flight(how: Break) {
    const IN_FLIGHT: usize = 10;
    let h = Harness::start_with(Options {
        publish_deadline_ms: 3000,
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let devices = register_devices(&mut conn, IN_FLIGHT).await;
    h.apns
        .set_default_behaviour(Behaviour::delay(Duration::from_millis(600), Behaviour::Ok));
    let received = h.apns.requests_received();
    feed_publishes(&mut conn, "p", 0, &devices).await;
    conn.flush().await.expect("flush");
    let deadline = Instant::now() + WAIT;
    while h.apns.requests_received() < received + IN_FLIGHT as u64 {
        assert!(Instant::now() < deadline, "the pushes never reached APNs");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let old_connection = h.apns.connections_accepted();
    match how {
        Break::GoAway => h.apns.send_goaway(),
        Break::Reset => h.apns.kill_connections(),
    }

    // Exactly one reply each, and a transparent one: a GOAWAY lets open streams finish, and a reset
    // stream is retried on a new connection well inside the deadline (one backoff plus one slow answer).
    Arrivals::new()
        .all_results(&mut conn, "p", IN_FLIGHT, WAIT)
        .await;

    h.apns.set_default_behaviour(Behaviour::Ok);
    h.apns.clear_requests();
    for (i, d) in devices.iter().enumerate() {
        let reply = publish(&mut conn, &format!("after{i}"), &d.node, &d.secret).await;
        assert_eq!(error_of(&reply), None, "{how:?}: a push after the break");
    }
    let after = h.apns.requests();
    assert_eq!(after.len(), IN_FLIGHT);
    assert!(
        after
            .iter()
            .all(|p| p.status == 200 && p.connection > old_connection),
        "{how:?}: pushes after the break go on a new connection: {:?}",
        after
            .iter()
            .map(|p| (p.status, p.connection))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn apns_goaway_with_pushes_in_flight_answers_each_once() {
    apns_breaks_its_connection_under_requests_in_flight(Break::GoAway).await;
}

#[tokio::test]
async fn apns_connection_reset_with_pushes_in_flight_answers_each_once() {
    apns_breaks_its_connection_under_requests_in_flight(Break::Reset).await;
}

/// How the server ends the link in [`the_server_drops_the_link_mid_burst`].
#[derive(Debug, Clone, Copy)]
enum LinkEnd {
    /// The TCP connection closes without a stream footer (a crashed server).
    Abort,
    /// TCP RST.
    Reset,
    /// `<stream:error><system-shutdown/>` and the footer (a server stopping).
    StreamError,
}

/// The server ends the link with `BURST` publishes read and `FAST` answered: nothing of the old link is
/// answered on the new one, nothing twice, the new link is served, and no abandoned publish loses its
/// wake-up (a push that never went out must not hold the node's rate-limit slot).
async fn the_server_drops_the_link_mid_burst(how: LinkEnd) {
    const BURST: usize = 20;
    const FAST: usize = 5;
    const SLOW: Duration = Duration::from_millis(800);
    let h = Harness::start_with(Options {
        publish_deadline_ms: 3000,
        push_interval_ms: 60_000,
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let devices = register_devices(&mut conn, BURST).await;
    for d in &devices[FAST..] {
        h.apns
            .set_behaviour(&d.token, Behaviour::delay(SLOW, Behaviour::Ok));
    }
    feed_publishes(&mut conn, "old", 0, &devices).await;
    conn.flush().await.expect("flush");
    let mut old = Arrivals::new();
    for i in 0..FAST {
        assert!(old.until(&mut conn, &format!("old{i}"), WAIT).await);
    }
    let received = h.apns.requests_received();
    assert_eq!(
        received, BURST as u64,
        "every push of the burst is at APNs when the link drops"
    );
    old.assert_no_duplicates();
    let answered_before_drop: Vec<String> = old.by_id.keys().cloned().collect();
    match how {
        LinkEnd::Abort => conn.abort(),
        LinkEnd::Reset => conn.reset().await,
        LinkEnd::StreamError => conn.stream_error("system-shutdown", None).await,
    }

    let mut conn = h.accept().await;
    let mut new = Arrivals::new();
    // Longer than the slow pushes and the deadline: anything of the old link would be here by now.
    new.drain(&mut conn, SLOW + Duration::from_millis(700))
        .await;
    assert!(
        new.by_id.is_empty(),
        "{how:?}: replies on the new link to IQs of the old one: {:?}",
        new.by_id.keys().collect::<Vec<_>>()
    );
    let pong = ask(&mut conn, &ping_xml("alive")).await;
    assert_eq!(error_of(&pong), None, "{how:?}: the new link is served");
    for (i, d) in devices.iter().enumerate() {
        let reply = publish(&mut conn, &format!("new{i}"), &d.node, &d.secret).await;
        assert_eq!(error_of(&reply), None, "new{i}");
    }
    for (i, d) in devices.iter().enumerate() {
        let delivered = h
            .apns
            .requests_for(&d.token)
            .iter()
            .filter(|p| p.status == 200)
            .count();
        assert!(
            delivered >= 1,
            "{how:?}: old{i} was abandoned and new{i} coalesced into it: the device was never woken \
             (answered before the drop: {answered_before_drop:?})"
        );
    }
}

#[tokio::test]
async fn the_server_crashing_mid_burst_answers_nothing_twice_or_late() {
    the_server_drops_the_link_mid_burst(LinkEnd::Abort).await;
}

#[tokio::test]
async fn the_server_resetting_the_link_mid_burst_answers_nothing_twice_or_late() {
    the_server_drops_the_link_mid_burst(LinkEnd::Reset).await;
}

#[tokio::test]
async fn the_server_shutting_down_mid_burst_answers_nothing_twice_or_late() {
    the_server_drops_the_link_mid_burst(LinkEnd::StreamError).await;
}

/// A flood of the publishes knock answers without APNs: known nodes coalesced by the rate limit, unknown
/// nodes, wrong secrets, and pings, with more in flight than `max_in_flight` allows: every one answered once
/// and rightly, and knock's memory flat.
// The mock APNs and the server stand-in get a thread of their own, so the latencies are knock's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_flood_at_the_in_flight_cap_keeps_memory_flat() {
    const FLOOD: usize = 20_000;
    let h = Harness::start_with(Options {
        push_interval_ms: 60_000,
        max_in_flight: 64,
        log_filter: "warn",
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let devices = register_devices(&mut conn, 10).await;
    h.apns.set_recording(false);
    let measured = stream(
        &h,
        &mut conn,
        FLOOD,
        |i, id| {
            let d = &devices[(i / 4) % devices.len()];
            match i % 4 {
                0 => prosody_publish(id, "localhost", &d.node, &d.secret),
                1 => prosody_publish(id, "localhost", &format!("unknown-{i}"), &d.secret),
                2 => prosody_publish(id, "localhost", &d.node, &format!("wrong-{i}")),
                _ => ping_xml(id),
            }
        },
        |i, reply| {
            let expected = match i % 4 {
                1 => err("cancel", "item-not-found"),
                2 => err("auth", "forbidden"),
                _ => None,
            };
            assert_eq!(error_of(reply), expected, "s{i}: {}", String::from(reply));
        },
    )
    .await;
    measured.assert_flat("publish flood");
    assert_eq!(
        h.apns.requests_ok(),
        devices.len() as u64,
        "one push per node, the rest coalesced"
    );
    eprintln!("flood: {measured:?}");
}

/// At `max_in_flight` knock stops reading: stanzas behind the cap wait in the socket, unread, until work
/// finishes; then it reads on, and every stanza is answered once.
#[tokio::test]
async fn at_max_in_flight_knock_stops_reading_and_recovers() {
    const CAP: usize = 8;
    const SLOW_PUBLISHES: usize = 20;
    const SLOW: Duration = Duration::from_millis(1000);
    let h = Harness::start_with(Options {
        max_in_flight: CAP,
        publish_deadline_ms: 3000,
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let devices = register_devices(&mut conn, SLOW_PUBLISHES).await;
    h.apns
        .set_default_behaviour(Behaviour::delay(SLOW, Behaviour::Ok));
    let received = h.apns.requests_received();
    // CAP slow publishes fill knock up; the ping behind them must wait for one to finish.
    feed_publishes(&mut conn, "p", 0, &devices[..CAP]).await;
    conn.feed_raw(&ping_xml("behind")).await.expect("send");
    feed_publishes(&mut conn, "p", CAP, &devices[CAP..]).await;
    conn.flush().await.expect("flush");
    let mut seen = Arrivals::new();
    seen.drain(&mut conn, SLOW / 2).await;
    assert!(
        seen.by_id.is_empty(),
        "answered while every slot is busy: {:?}",
        seen.by_id.keys()
    );
    assert_eq!(
        h.apns.requests_received() - received,
        CAP as u64,
        "knock took exactly max_in_flight stanzas"
    );

    assert!(
        seen.until(&mut conn, "behind", WAIT).await,
        "the ping behind the cap is answered"
    );
    let (pong_at, pong) = seen.once("behind");
    assert_eq!(error_of(pong), None);
    assert!(
        *pong_at >= SLOW.mul_f64(0.8),
        "the ping was answered at {pong_at:?}, before any slot was free"
    );
    seen.all_results(&mut conn, "p", SLOW_PUBLISHES, WAIT).await;

    let started = Instant::now();
    let pong = ask(&mut conn, &ping_xml("after")).await;
    assert_eq!(error_of(&pong), None);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "knock reads again at once"
    );
}

/// The path to APNs dies silently under an open connection (no FIN, no RST: a NAT entry or route gone). knock
/// answers `wait` by the deadline meanwhile, notices by itself that the connection is dead, and pushes again
/// on a new one within a bounded time.
#[tokio::test]
async fn a_silently_dead_apns_connection_is_noticed_and_replaced() {
    const RECOVERY: Duration = Duration::from_secs(6);
    let h = Harness::start_with(Options {
        publish_deadline_ms: OUTAGE_DEADLINE.as_millis() as u64,
        apns_via_blackhole: true,
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let devices = register_devices(&mut conn, 1).await;
    let d = &devices[0];
    let reply = publish(&mut conn, "before", &d.node, &d.secret).await;
    assert_eq!(error_of(&reply), None);
    let relay = h.blackhole.as_ref().expect("a relay");
    assert_eq!(relay.accepted(), 1);
    relay.freeze();

    let frozen = Instant::now();
    let mut waits = 0;
    for attempt in 0.. {
        let sent = Instant::now();
        let reply = publish(&mut conn, &format!("during{attempt}"), &d.node, &d.secret).await;
        assert!(
            sent.elapsed() <= OUTAGE_DEADLINE + SLACK,
            "answered after {:?}, deadline {OUTAGE_DEADLINE:?}",
            sent.elapsed()
        );
        match error_of(&reply) {
            None => break,
            e if e == err("wait", "internal-server-error") => waits += 1,
            other => panic!("during{attempt}: {other:?}"),
        }
        assert!(
            frozen.elapsed() < RECOVERY,
            "still no push {:?} after the connection died ({waits} waits, {} connections)",
            frozen.elapsed(),
            relay.accepted()
        );
    }
    assert!(
        relay.accepted() >= 2,
        "the push went out on a new connection"
    );
    eprintln!(
        "dead connection replaced after {:?}, {waits} publishes answered wait meanwhile",
        frozen.elapsed()
    );
}

/// Backpressure is not silence: while every slot is busy (pushes slower than three ping intervals) knock reads
/// nothing, pongs included, yet the server is alive: the link must stay up, every publish answered on it.
#[tokio::test]
async fn a_full_in_flight_cap_longer_than_the_ping_timeout_keeps_the_link() {
    const CAP: usize = 4;
    // Longer than three ping intervals, knock's silence limit.
    const SLOW: Duration = Duration::from_millis(3500);
    let h = Harness::start_with(Options {
        max_in_flight: CAP,
        ping_interval_secs: 1,
        publish_deadline_ms: 6000,
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let devices = register_devices(&mut conn, CAP).await;
    h.apns
        .set_default_behaviour(Behaviour::delay(SLOW, Behaviour::Ok));
    feed_publishes(&mut conn, "p", 0, &devices).await;
    conn.flush().await.expect("flush");
    Arrivals::new()
        .all_results(&mut conn, "p", CAP, SLOW + WAIT)
        .await;
    let pong = ask(&mut conn, &ping_xml("still-there")).await;
    assert_eq!(
        error_of(&pong),
        None,
        "the same link is served after the pause"
    );
    assert!(
        h.server
            .accept_timeout(Duration::from_millis(200))
            .await
            .is_err(),
        "knock gave up on a live link while it was not reading"
    );
}

/// SIGTERM while the link is down, with the lost link's pushes still at APNs: knock finishes them (the devices
/// are woken) before it exits, as it would answer them had the link stayed up.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_the_link_is_down_still_sends_the_lost_links_pushes() {
    const IN_FLIGHT: usize = 5;
    let mut h = Harness::start_with(Options {
        publish_deadline_ms: 3000,
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let devices = register_devices(&mut conn, IN_FLIGHT).await;
    h.apns
        .set_default_behaviour(Behaviour::delay(Duration::from_millis(1000), Behaviour::Ok));
    feed_publishes(&mut conn, "p", 0, &devices).await;
    conn.flush().await.expect("flush");
    let deadline = Instant::now() + WAIT;
    while h.apns.requests_received() < IN_FLIGHT as u64 {
        assert!(Instant::now() < deadline, "the pushes never reached APNs");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The server goes away and does not take knock back: knock's next handshake is never answered.
    conn.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| h.terminate());
    assert!(status.success(), "exit status {status:?}");
    let pushes = h.apns.requests();
    let delivered = pushes.iter().filter(|p| p.status == 200).count();
    assert_eq!(
        delivered,
        IN_FLIGHT,
        "the lost link's pushes, all delivered: {:?}",
        pushes.iter().map(|p| p.status).collect::<Vec<_>>()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "exit within the publish deadline"
    );
}

/// Send disco#info queries until the connection is gone. Their replies are several times their size, so
/// against a server that does not read, knock's replies fill the socket buffers first.
async fn flood_with_disco_queries(mut sender: ConnSender) {
    for i in 0.. {
        let query = format!("<iq xmlns='{NS}' type='get' id='d{i}' from='localhost' to='push.localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>");
        if sender.send_raw(&query).await.is_err() {
            return;
        }
    }
}

/// A server that stops reading (hung, or the path to it gone without a reset) while knock has replies to
/// write: knock's writes block once the socket buffers are full. It must give the link up as it gives up a
/// silent one, after three ping intervals, and serve the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_reading_is_given_up_and_the_next_link_served() {
    let h = Harness::start_with(Options {
        ping_interval_secs: 1,
        log_filter: "warn",
        ..Options::default()
    })
    .await;
    let conn = h.accept().await;
    conn.stop_reading();
    let (sender, _receiver) = conn.split();
    let feeder = tokio::spawn(flood_with_disco_queries(sender));
    let started = Instant::now();
    let mut conn = match h.server.accept_timeout(Duration::from_secs(20)).await {
        Ok(conn) => conn,
        Err(e) => panic!("knock is still stuck on a server that does not read ({e})"),
    };
    let given_up = started.elapsed();
    let pong = ask(&mut conn, &ping_xml("next")).await;
    assert_eq!(error_of(&pong), None, "the next link is served");
    feeder.abort();
    eprintln!("a server that stopped reading was given up after {given_up:?}");
}

/// SIGTERM while knock's writes to a hung server are blocked: knock still stops, within the time its drain
/// is allowed (the publish deadline and a second), not after the server's three ping intervals or never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_writes_to_a_hung_server_block_still_exits() {
    let mut h = Harness::start_with(Options {
        publish_deadline_ms: 1000,
        log_filter: "warn",
        ..Options::default()
    })
    .await;
    let conn = h.accept().await;
    conn.stop_reading();
    let (sender, _receiver) = conn.split();
    let feeder = tokio::spawn(flood_with_disco_queries(sender));
    // Until knock's replies have filled the socket buffers and its writes block.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| h.terminate());
    let took = started.elapsed();
    feeder.abort();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_secs(4),
        "knock took {took:?} to stop beside a hung server"
    );
    eprintln!("SIGTERM beside a hung server: exited after {took:?}");
}
