//! The admin listener of the real `knock` binary: `/metrics` counts exactly what a scenario did (publishes by
//! outcome, registrations, knocks and knock tokens, the link's ups and downs, APNs answers, publishes in flight), and `/health`
//! answers 503 with a JSON reason while the component link is down.

use std::time::Duration;

use testkit::apns::Behaviour;
use testkit::server::ComponentConn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::harness::{ask, register, Harness, Options, WAIT};
use common::*;

#[path = "common/admin.rs"]
mod admin;
use admin::{free_port, http_get, Scrape};

/// knock with its admin listener on a free loopback port, up and answering.
async fn start(options: Options) -> Harness {
    let h = Harness::start_with(Options {
        admin: Some(free_port()),
        ..options
    })
    .await;
    h.wait_for_admin().await;
    h
}

/// Three well-formed APNs tokens besides `common::TOKEN`, so each scenario has its own device.
const TOKEN_DEAD: &str = "dead0000000000000000000000000000000000000000000000000000000000ab";
const TOKEN_DOWN: &str = "d0d00000000000000000000000000000000000000000000000000000000000ab";
const TOKEN_CAPPED: &str = "ca110000000000000000000000000000000000000000000000000000000000ab";

async fn publish(conn: &mut ComponentConn, node: &str, secret: &str) -> Option<(String, String)> {
    error_of(&ask(conn, &prosody_publish("p", "localhost", node, secret)).await)
}

#[tokio::test]
async fn metrics_count_exactly_what_the_scenarios_did() {
    // A minute between pushes per node, so a second publish is coalesced; three registrations an hour
    // per user, so the fourth is capped.
    let knock = start(Options {
        push_interval_ms: 60_000,
        limits_extra: "registrations_per_user_per_hour = 3",
        ..Options::default()
    })
    .await;

    // 0. Before the handshake the link is down, whatever the wiring: 503 with a reason, and a 0 gauge.
    let (status, body) = knock.health().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unavailable");
    assert!(
        body["reason"].as_str().is_some_and(|r| r.contains("link")),
        "{body}"
    );
    let (m, _) = knock.metrics().await;
    assert_eq!(m.get("knock_component_link_up"), Some(0));

    let mut conn = knock.accept().await;

    // 1. Registrations: three saved, one unchanged (not counted, not capped), one capped.
    let (live_node, live_secret) = register(&mut conn, "live", TOKEN).await;
    let (dead_node, dead_secret) = register(&mut conn, "dead", TOKEN_DEAD).await;
    let (down_node, down_secret) = register(&mut conn, "down", TOKEN_DOWN).await;
    assert_eq!(
        register(&mut conn, "live", TOKEN).await,
        (live_node.clone(), live_secret.clone())
    );
    let capped = ask(
        &mut conn,
        &register_xml("r", "alice@localhost/phone", "capped", TOKEN_CAPPED, ""),
    )
    .await;
    assert_eq!(error_of(&capped), err("wait", "resource-constraint"));

    // 2. One publish of every outcome.
    assert_eq!(
        publish(&mut conn, &live_node, &live_secret).await,
        None,
        "pushed"
    );
    assert_eq!(
        publish(&mut conn, &live_node, &live_secret).await,
        None,
        "coalesced"
    );
    assert_eq!(
        publish(&mut conn, "no-such-node", &live_secret).await,
        err("cancel", "item-not-found")
    );
    assert_eq!(
        publish(&mut conn, &dead_node, "wrong-secret").await,
        err("auth", "forbidden")
    );
    knock
        .apns
        .set_behaviour(TOKEN_DEAD, Behaviour::Unregistered);
    assert_eq!(
        publish(&mut conn, &dead_node, &dead_secret).await,
        err("cancel", "item-not-found"),
        "dead token"
    );
    knock.apns.set_behaviour(TOKEN_DOWN, Behaviour::Unavailable);
    assert_eq!(
        publish(&mut conn, &down_node, &down_secret).await,
        err("wait", "internal-server-error"),
        "transient failure"
    );
    let no_item = format!(
        "<iq xmlns='{NS}' type='set' id='b' from='localhost' to='push.localhost'>\
         <pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{live_node}'/></pubsub></iq>"
    );
    assert_eq!(
        error_of(&ask(&mut conn, &no_item).await),
        err("modify", "bad-request")
    );

    // 3. One unregistration.
    let reply = ask(
        &mut conn,
        &unregister_xml("u", "alice@localhost/phone", "live"),
    )
    .await;
    assert_eq!(error_of(&reply), None);

    // 4. The scrape says exactly that.
    let (m, text) = knock.metrics().await;
    let expected = [
        ("knock_publishes_total{outcome=\"pushed\"}", 1),
        ("knock_publishes_total{outcome=\"coalesced\"}", 1),
        ("knock_publishes_total{outcome=\"unknown_node\"}", 1),
        ("knock_publishes_total{outcome=\"forbidden\"}", 1),
        ("knock_publishes_total{outcome=\"dead_token\"}", 1),
        ("knock_publishes_total{outcome=\"transient_failure\"}", 1),
        ("knock_bad_requests_total", 1),
        ("knock_registrations_total{outcome=\"saved\"}", 3),
        ("knock_registrations_total{outcome=\"capped\"}", 1),
        ("knock_registrations_total{outcome=\"unchanged\"}", 1),
        ("knock_registrations_total{outcome=\"not_allowed\"}", 0),
        ("knock_registrations_total{outcome=\"failed\"}", 0),
        ("knock_unregistrations_total{outcome=\"removed\"}", 1),
        // live unregistered, dead deleted by the dead token: down is left.
        ("knock_stored_registrations", 1),
        ("knock_stored_registrations_by_app{app=\"chat\"}", 1),
        ("knock_publishes_in_flight", 0),
    ];
    for (series, value) in expected {
        assert_eq!(m.get(series), Some(value), "{series} in\n{text}");
    }
    assert_eq!(
        knock.apns.requests().len(),
        1 + 1 + 3,
        "the mock saw one push, one dead token and three attempts at the outage"
    );

    // 5. Nothing that identifies a user, a device or a secret.
    for leak in [
        TOKEN,
        TOKEN_DEAD,
        TOKEN_DOWN,
        TOKEN_CAPPED,
        &live_node,
        &dead_node,
        &down_node,
        &live_secret,
        &dead_secret,
        "alice",
        "phone",
        "localhost",
    ] {
        assert!(!text.contains(leak), "{leak:?} in /metrics:\n{text}");
    }
    assert!(
        m.names().iter().all(|n| n.starts_with("knock_")),
        "{:?}",
        m.names()
    );

    // 6. Anything else is a 404, not a crash.
    assert_eq!(knock.get("/").await.0, 404);
    assert_eq!(knock.get("/metrics/../admin").await.0, 404);
}

#[tokio::test]
async fn a_non_loopback_listener_is_served_but_warned_about_loudly() {
    let port = free_port().port();
    let knock = Harness::start_with(Options {
        admin: Some(format!("0.0.0.0:{port}").parse().expect("address")),
        ..Options::default()
    })
    .await;
    let local = format!("127.0.0.1:{port}").parse().expect("address");
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        match http_get(local, "/health").await {
            Ok((status, _)) => break status,
            Err(e) => assert!(std::time::Instant::now() < deadline, "never served: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "served, and the link is not up");
    let log = knock.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("NOT ON LOOPBACK"))
        .unwrap_or_else(|| panic!("no warning in\n{log}"));
    assert!(
        warning.contains("WARN") && warning.contains("no authentication"),
        "{warning}"
    );
}

#[tokio::test]
async fn loopback_gets_no_warning_and_a_taken_port_stops_knock_at_start() {
    let knock = start(Options::default()).await;
    assert!(
        !knock.log_text().contains("NOT ON LOOPBACK"),
        "{}",
        knock.log_text()
    );

    // A second knock on the same port: it must say so and exit, not run unmonitored.
    let mut second = Harness::start_with(Options {
        admin: knock.admin,
        ..Options::default()
    })
    .await;
    let status = second.exit().await;
    assert!(!status.success());
    let log = second.log_text();
    assert!(
        log.contains("admin.listen") && log.contains(&knock.admin_addr().to_string()),
        "{log}"
    );
}

#[tokio::test]
async fn sigterm_stops_knock_with_a_scraper_connection_still_open() {
    let mut knock = start(Options::default()).await;
    let _conn = knock.accept().await;
    // A scraper that keeps its connection alive between scrapes, as Prometheus does.
    let mut scraper = tokio::net::TcpStream::connect(knock.admin_addr())
        .await
        .expect("connect");
    scraper
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: knock\r\n\r\n")
        .await
        .expect("send");
    let mut first = [0u8; 12];
    scraper.read_exact(&mut first).await.expect("an answer");
    assert_eq!(&first, b"HTTP/1.1 200");

    let started = std::time::Instant::now();
    let status = knock.terminate();
    assert!(status.success(), "{status:?}\n{}", knock.log_text());
    assert!(
        !knock.log_text().contains("admin listener did not stop"),
        "the listener closed the idle connection itself\n{}",
        knock.log_text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_link_apns_and_in_flight_gauges_follow_what_happens() {
    let knock = start(Options::default()).await;
    assert_eq!(knock.health().await.0, 503, "down before the handshake");

    // 1. Link up: 200.
    let mut conn = knock.accept().await;
    knock.wait_for_metric("knock_component_link_up", 1).await;
    let (status, body) = knock.health().await;
    assert_eq!((status, body), (200, serde_json::json!({ "status": "ok" })));

    // 2. APNs answers by status and reason, and their latency.
    let (node, secret) = register(&mut conn, "dev", TOKEN).await;
    assert_eq!(publish(&mut conn, &node, &secret).await, None);
    knock
        .apns
        .set_behaviour(TOKEN, Behaviour::fail_times(1, Behaviour::Unavailable));
    assert_eq!(
        publish(&mut conn, &node, &secret).await,
        None,
        "retried once, then 200"
    );
    let (m, text) = knock.metrics().await;
    for (series, value) in [
        (
            "knock_apns_responses_total{status=\"200\",reason=\"none\"}",
            2,
        ),
        (
            "knock_apns_responses_total{status=\"503\",reason=\"ServiceUnavailable\"}",
            1,
        ),
        ("knock_apns_request_duration_seconds_count", 3),
        ("knock_apns_request_duration_seconds_bucket{le=\"+Inf\"}", 3),
        ("knock_apns_transport_errors_total", 0),
    ] {
        assert_eq!(m.get(series), Some(value), "{series} in\n{text}");
    }

    // 3. A publish waiting on a slow APNs is in flight until it is answered.
    knock.apns.set_behaviour(
        TOKEN,
        Behaviour::delay(Duration::from_millis(1500), Behaviour::Ok),
    );
    conn.send(xml(&prosody_publish("slow", "localhost", &node, &secret)))
        .await
        .expect("send");
    knock.wait_for_metric("knock_publishes_in_flight", 1).await;
    let reply = conn.recv(WAIT).await.expect("the slow publish is answered");
    assert_eq!(error_of(&reply), None);
    knock.wait_for_metric("knock_publishes_in_flight", 0).await;

    // 4. Link lost: 503 with a JSON reason; back: 200, one reconnect.
    conn.abort();
    knock.wait_for_metric("knock_component_link_up", 0).await;
    let (status, body) = knock.health().await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reason"].as_str().is_some_and(|r| r.contains("link")),
        "{body}"
    );
    let _conn = knock.accept().await;
    knock.wait_for_metric("knock_component_link_up", 1).await;
    assert_eq!(knock.health().await.0, 200);
    let (m, _) = knock.metrics().await;
    assert_eq!(m.get("knock_component_link_reconnects_total"), Some(1));
    assert_eq!(m.get("knock_component_link_downs_total"), Some(1));
}

/// `knock healthcheck --config` (a container's HEALTHCHECK), as a probe runs it: exit status and output.
fn healthcheck(knock: &Harness) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_knock"))
        .args(["healthcheck", "--config"])
        .arg(knock.config_path())
        .output()
        .expect("run knock healthcheck");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn the_healthcheck_command_follows_health() {
    let knock = start(Options::default()).await;
    let (healthy, text) = healthcheck(&knock);
    assert!(!healthy, "no link yet: {text}");
    assert!(text.contains("503"), "{text}");
    let _conn = knock.accept().await;
    knock.wait_for_metric("knock_component_link_up", 1).await;
    let (healthy, text) = healthcheck(&knock);
    assert!(healthy, "{text}");

    // Without an admin listener it says what is missing.
    let plain = Harness::start_with(Options::default()).await;
    let (healthy, text) = healthcheck(&plain);
    assert!(!healthy && text.contains("[admin] listen"), "{text}");
}

#[tokio::test]
async fn fcm_answers_have_their_own_families() {
    let h = Harness::start_with(Options {
        admin: Some(free_port()),
        fcm: Some(""),
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let token = "metrics-token:APA91b";
    let reply = ask(
        &mut conn,
        &conversations_register_xml("r", "alice@localhost/c", "0123456789abcdef", token, ""),
    )
    .await;
    let (node, secret) = node_and_secret(&reply);
    let fcm = h.fcm.as_ref().expect("mock FCM");
    fcm.set_behaviour(
        token,
        testkit::fcm::Behaviour::fail_times(1, testkit::fcm::Behaviour::Unavailable),
    );
    let reply = ask(
        &mut conn,
        &prosody_publish("p", "localhost", &node, &secret),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    h.wait_for_admin().await;
    let (m, text) = h.metrics().await;
    for (series, value) in [
        (
            "knock_fcm_responses_total{status=\"503\",reason=\"UNAVAILABLE\"}",
            1,
        ),
        (
            "knock_fcm_responses_total{status=\"200\",reason=\"none\"}",
            1,
        ),
        ("knock_fcm_request_duration_seconds_count", 2),
        ("knock_fcm_transport_errors_total", 0),
        ("knock_pushes_total{kind=\"alert\"}", 1),
    ] {
        assert_eq!(m.get(series), Some(value), "{series}:\n{text}");
    }
    assert!(
        !text.contains("knock_apns_responses_total{"),
        "the APNs app pushed nothing: {text}"
    );
}

/// A one-step knock-token command of alice's.
fn knock_command(node: &str, fields: &str) -> String {
    format!(
        "<iq xmlns='{NS}' type='set' id='c' from='alice@localhost/phone' to='push.localhost'>\
         <command xmlns='http://jabber.org/protocol/commands' node='{node}' action='execute'>\
         <x xmlns='jabber:x:data' type='submit'>{fields}</x></command></iq>"
    )
}

fn knock_xml(token: &str) -> String {
    format!(
        "<iq xmlns='{NS}' type='set' id='k' from='bob@example.net/x' to='push.localhost'>\
         <knock xmlns='knock:token:0' token='{token}'/></iq>"
    )
}

#[tokio::test]
async fn knocks_and_knock_tokens_have_their_own_families() {
    let h = start(Options {
        limits_extra: "knock_tokens_per_user = 2",
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    register(&mut conn, "phone", TOKEN).await;
    let one_an_hour = "<field var='per-hour'><value>1</value></field>";
    let reply = ask(&mut conn, &knock_command("knock-token-create", one_an_hour)).await;
    let (token, id) = (
        field(&reply, "token").expect("token"),
        field(&reply, "id").expect("id"),
    );
    let reply = ask(&mut conn, &knock_command("knock-token-create", "")).await;
    let other = field(&reply, "id").expect("id");
    // A third is over knock_tokens_per_user; after a revocation there is room, but not within the hour's
    // creations (as many as a user may hold).
    let reply = ask(&mut conn, &knock_command("knock-token-create", "")).await;
    assert_eq!(error_of(&reply), err("modify", "policy-violation"));
    let revoke = format!("<field var='id'><value>{other}</value></field>");
    let reply = ask(&mut conn, &knock_command("knock-token-revoke", &revoke)).await;
    assert_eq!(error_of(&reply), None);
    let reply = ask(&mut conn, &knock_command("knock-token-create", "")).await;
    assert_eq!(error_of(&reply), err("wait", "resource-constraint"));

    assert_eq!(error_of(&ask(&mut conn, &knock_xml(&token)).await), None);
    assert_eq!(
        error_of(&ask(&mut conn, &knock_xml(&token)).await),
        err("wait", "resource-constraint")
    );
    assert_eq!(
        error_of(&ask(&mut conn, &knock_xml(&"A".repeat(43))).await),
        err("cancel", "item-not-found")
    );

    let (m, text) = h.metrics().await;
    for (series, value) in [
        ("knock_knocks_total{outcome=\"pushed\"}", 1),
        ("knock_knocks_total{outcome=\"unknown\"}", 1),
        ("knock_knocks_total{outcome=\"limited\"}", 1),
        ("knock_knocks_total{outcome=\"failed\"}", 0),
        ("knock_knock_tokens_total{change=\"created\"}", 2),
        ("knock_knock_tokens_total{change=\"revoked\"}", 1),
        ("knock_knock_tokens_total{change=\"capped\"}", 1),
        // A knock is not a publish.
        ("knock_publishes_total{outcome=\"pushed\"}", 0),
    ] {
        assert_eq!(m.get(series), Some(value), "{series} in\n{text}");
    }
    for leak in [token.as_str(), id.as_str(), "bob", "alice"] {
        assert!(!text.contains(leak), "{leak:?} in /metrics");
    }
}
