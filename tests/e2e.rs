//! The real `knock` binary, end to end: an XEP-0114 server stand-in on one side, a mock APNs that behaves like
//! Apple's (HTTP/2 + TLS, ES256 JWT checked, Apple's status codes) on the other, everything on 127.0.0.1.

use std::time::{Duration, Instant};

use testkit::apns::Behaviour;
use testkit::server::AcceptError;

mod common;
use common::harness::*;
use common::*;

#[tokio::test]
async fn handshake_with_a_wrong_secret_is_refused_and_retried() {
    let h = Harness::start_with(Options {
        secret: "wrong",
        ..Options::default()
    })
    .await;
    for _ in 0..2 {
        match h.server.accept_timeout(WAIT).await {
            Err(AcceptError::BadSecret) => {}
            Err(e) => panic!("expected a bad secret, got {e}"),
            Ok(_) => panic!("a wrong secret must not complete the handshake"),
        }
    }
    assert!(
        h.log_text().contains("refused the component handshake"),
        "{}",
        h.log_text()
    );
}

#[tokio::test]
async fn register_then_publish_wakes_the_device_with_a_contentless_push() {
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;

    let reply = publish(&mut conn, "p1", &node, &secret).await;
    assert_eq!(error_of(&reply), None);
    let pushes = h.apns.wait_for_requests(1, WAIT).await;
    assert_eq!(pushes.len(), 1);
    let push = &pushes[0];
    assert_eq!(push.token, TOKEN);
    assert_eq!(push.status, 200, "{:?}", push.reason);
    assert_eq!(push.topic.as_deref(), Some(TOPIC));
    // Prosody marks a message with a body important ("New Message!"): in `auto`, a visible push with the
    // app's fixed title, for the app's notification extension to replace.
    assert_eq!(push.push_type.as_deref(), Some("alert"));
    assert_eq!(push.priority.as_deref(), Some("10"));
    assert_eq!(push.collapse_id, None);
    assert_eq!(push.kid.as_deref(), Some(KEY_ID));
    let body = push.json().expect("JSON payload");
    assert_eq!(
        body["aps"],
        serde_json::json!({ "alert": { "title": "New message" }, "mutable-content": 1 })
    );
    assert_eq!(body["node"], serde_json::json!(node));
    let everything = format!("{:?}{}", push.headers, push.body);
    for leak in ["New Message!", "alice", "localhost/phone"] {
        assert!(!everything.contains(leak), "push carries {leak:?}");
    }

    // ejabberd's flavour of the summary form works the same.
    let reply = ask(
        &mut conn,
        &ejabberd_publish("p2", "localhost", &node, &secret),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    assert_eq!(h.apns.wait_for_requests(2, WAIT).await.len(), 2);
    assert_eq!(
        h.apns.connections_accepted(),
        1,
        "one multiplexed HTTP/2 connection"
    );
}

#[tokio::test]
async fn disco_and_two_step_registration_over_the_link() {
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    let info = ask(&mut conn, &format!("<iq xmlns='{NS}' type='get' id='d1' from='alice@localhost/x' to='push.localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")).await;
    let identity = info
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .and_then(|q| q.get_child("identity", "http://jabber.org/protocol/disco#info"))
        .expect("identity");
    assert_eq!(identity.attr("type"), Some("push"));

    let first = ask(&mut conn, &format!("<iq xmlns='{NS}' type='set' id='c1' from='alice@localhost/x' to='push.localhost'><command xmlns='http://jabber.org/protocol/commands' node='register-push-apns' action='execute'/></iq>")).await;
    let session = first
        .get_child("command", "http://jabber.org/protocol/commands")
        .and_then(|c| c.attr("sessionid"))
        .expect("sessionid")
        .to_owned();
    let second = ask(&mut conn, &format!("<iq xmlns='{NS}' type='set' id='c2' from='alice@localhost/x' to='push.localhost'><command xmlns='http://jabber.org/protocol/commands' node='register-push-apns' sessionid='{session}'><x xmlns='jabber:x:data' type='submit'><field var='token'><value>{TOKEN}</value></field><field var='device-id'><value>d</value></field></x></command></iq>")).await;
    let (node, secret) = node_and_secret(&second);
    assert_eq!(
        error_of(&publish(&mut conn, "p", &node, &secret).await),
        None
    );
}

#[tokio::test]
async fn re_register_moves_pushes_to_the_new_token_and_unregister_ends_them() {
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    let first = register(&mut conn, "dev1", TOKEN).await;
    let again = register(&mut conn, "dev1", TOKEN2).await;
    assert_eq!(first, again, "same device keeps node and secret");
    let (node, secret) = again;
    assert_eq!(
        error_of(&publish(&mut conn, "p1", &node, &secret).await),
        None
    );
    let pushes = h.apns.wait_for_requests(1, WAIT).await;
    assert_eq!(pushes[0].token, TOKEN2);

    let reply = ask(
        &mut conn,
        &unregister_xml("u1", "alice@localhost/phone", "dev1"),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    let reply = publish(&mut conn, "p2", &node, &secret).await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
    assert_eq!(h.apns.requests().len(), 1, "no push after unregister");
}

#[tokio::test]
async fn rejected_publishes_get_the_right_errors_and_no_push() {
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    let cases = [
        (prosody_publish("a", "localhost", "unknown-node", &secret), err("cancel", "item-not-found")),
        (prosody_publish("b", "localhost", &node, "wrong"), err("auth", "forbidden")),
        (prosody_publish("c", "other.example", &node, &secret), err("auth", "forbidden")),
        (prosody_publish("d", "mallory@localhost", &node, &secret), err("auth", "forbidden")),
        (
            format!("<iq xmlns='{NS}' type='set' id='e' from='localhost' to='push.localhost'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'/></pubsub></iq>"),
            err("modify", "bad-request"),
        ),
        (
            format!("<iq xmlns='{NS}' type='get' id='f' from='localhost' to='push.localhost'><query xmlns='jabber:iq:version'/></iq>"),
            err("cancel", "service-unavailable"),
        ),
    ];
    for (stanza, expected) in cases {
        let reply = ask(&mut conn, &stanza).await;
        assert_eq!(error_of(&reply), expected, "{stanza}");
    }
    assert!(h.apns.requests().is_empty());
}

#[tokio::test]
async fn a_dead_token_deletes_the_registration() {
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    h.apns.set_behaviour(TOKEN, Behaviour::Unregistered);
    let reply = publish(&mut conn, "p1", &node, &secret).await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
    assert_eq!(h.apns.requests_for(TOKEN)[0].status, 410);
    let reply = publish(&mut conn, "p2", &node, &secret).await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
    assert_eq!(
        h.apns.requests().len(),
        1,
        "a deleted registration is never pushed again"
    );
}

#[tokio::test]
async fn a_token_not_for_the_topic_is_dead_only_once_the_topic_has_worked() {
    // Before any push to the topic was accepted, "not for this topic" may as well be a wrong `topic` in
    // knock's configuration, which would wipe every registration: wait, and keep it.
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    h.apns
        .set_behaviour(TOKEN, Behaviour::DeviceTokenNotForTopic);
    let reply = publish(&mut conn, "p1", &node, &secret).await;
    assert_eq!(error_of(&reply), err("wait", "internal-server-error"));
    // Another device's push proves the topic right: now the token is another app's, and goes.
    let (other, other_secret) = register(&mut conn, "dev2", TOKEN2).await;
    let reply = publish(&mut conn, "p2", &other, &other_secret).await;
    assert_eq!(error_of(&reply), None);
    let reply = publish(&mut conn, "p3", &node, &secret).await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
    let reply = publish(&mut conn, "p4", &node, &secret).await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"), "deleted");
}

#[tokio::test]
async fn an_apns_outage_is_wait_and_keeps_the_registration() {
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    h.apns.set_behaviour(TOKEN, Behaviour::Unavailable);
    let reply = publish(&mut conn, "p1", &node, &secret).await;
    assert_eq!(error_of(&reply), err("wait", "internal-server-error"));
    let attempts = h.apns.requests_for(TOKEN).len();
    assert!(
        (2..=3).contains(&attempts),
        "bounded retries, got {attempts}"
    );

    h.apns.set_behaviour(TOKEN, Behaviour::Ok);
    let reply = publish(&mut conn, "p2", &node, &secret).await;
    assert_eq!(
        error_of(&reply),
        None,
        "registration kept, push delivered once healthy"
    );

    h.apns.set_behaviour(TOKEN, Behaviour::Throttled);
    let reply = publish(&mut conn, "p3", &node, &secret).await;
    assert_eq!(error_of(&reply), err("wait", "resource-constraint"));

    // A transient 503 inside the retry budget is invisible to the server.
    h.apns
        .set_behaviour(TOKEN, Behaviour::fail_times(1, Behaviour::Unavailable));
    let reply = publish(&mut conn, "p4", &node, &secret).await;
    assert_eq!(error_of(&reply), None);
}

#[tokio::test]
async fn publishes_inside_the_interval_are_coalesced() {
    let h = Harness::start_with(Options {
        push_interval_ms: 60_000,
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    for i in 0..3 {
        let reply = publish(&mut conn, &format!("p{i}"), &node, &secret).await;
        assert_eq!(error_of(&reply), None);
    }
    assert_eq!(h.apns.requests().len(), 1);
}

#[tokio::test]
async fn a_slow_push_does_not_block_the_stream() {
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    let (slow_node, slow_secret) = register(&mut conn, "slow", TOKEN).await;
    let (fast_node, fast_secret) = register(&mut conn, "fast", TOKEN2).await;
    h.apns.set_behaviour(
        TOKEN,
        Behaviour::delay(Duration::from_secs(2), Behaviour::Ok),
    );
    conn.send(xml(&prosody_publish(
        "slow",
        "localhost",
        &slow_node,
        &slow_secret,
    )))
    .await
    .expect("send");
    conn.send(xml(&prosody_publish(
        "fast",
        "localhost",
        &fast_node,
        &fast_secret,
    )))
    .await
    .expect("send");
    let first = conn.recv(WAIT).await.expect("a reply");
    assert_eq!(
        first.attr("id"),
        Some("fast"),
        "the fast publish is answered first"
    );
    let second = conn.recv(WAIT).await.expect("a reply");
    assert_eq!(second.attr("id"), Some("slow"));
    assert_eq!(error_of(&second), None);
}

#[tokio::test]
async fn knock_reconnects_when_the_server_drops_the_link() {
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    conn.abort();
    let started = Instant::now();
    let mut conn = h.accept().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "back within a second or so"
    );
    let reply = publish(&mut conn, "p1", &node, &secret).await;
    assert_eq!(error_of(&reply), None);
}

#[tokio::test]
async fn keepalive_pings_and_a_silent_server_means_reconnect() {
    let h = Harness::start_with(Options {
        ping_interval_secs: 1,
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        conn.pings_received() >= 2,
        "pings: {}",
        conn.pings_received()
    );
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;

    // Stop answering pings: knock must notice and come back on a fresh link.
    conn.set_answer_pings(false);
    let mut conn = h.accept().await;
    let reply = publish(&mut conn, "p1", &node, &secret).await;
    assert_eq!(error_of(&reply), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_answers_in_flight_publishes_and_registrations_survive_a_restart() {
    let mut h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    h.apns.set_behaviour(
        TOKEN,
        Behaviour::delay(Duration::from_millis(700), Behaviour::Ok),
    );
    conn.send(xml(&prosody_publish(
        "inflight",
        "localhost",
        &node,
        &secret,
    )))
    .await
    .expect("send");
    // Let knock read it, then ask it to stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = tokio::task::block_in_place(|| h.terminate());
    let reply = conn
        .recv(WAIT)
        .await
        .expect("the in-flight publish is answered before exit");
    assert_eq!(reply.attr("id"), Some("inflight"));
    assert_eq!(error_of(&reply), None);
    assert!(status.success(), "exit status {status:?}");

    h.apns.set_behaviour(TOKEN, Behaviour::Ok);
    h.spawn();
    let mut conn = h.accept().await;
    let reply = publish(&mut conn, "p2", &node, &secret).await;
    assert_eq!(error_of(&reply), None, "registration survived the restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_acknowledged_registration_survives_kill_9() {
    let mut h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    h.kill9();
    h.spawn();
    let mut conn = h.accept().await;
    let reply = publish(&mut conn, "p1", &node, &secret).await;
    assert_eq!(error_of(&reply), None);
    assert_eq!(h.apns.requests_for(TOKEN).len(), 1);
}

/// Issue 5: registrations pipelined in a burst, knock killed (-9) once half are acknowledged. Every one that was
/// acknowledged must be there after the restart; the rest may or may not be. A kill leaves the OS page cache
/// intact, so this catches an acknowledgement sent before the write, not a missing fsync (that needs a power cut).
#[tokio::test(flavor = "multi_thread")]
async fn every_registration_acknowledged_before_a_kill_9_mid_burst_survives() {
    const BURST: usize = 300;
    let mut h = Harness::start().await;
    let mut conn = h.accept().await;
    for i in 0..BURST {
        let xml = register_xml(
            &format!("r{i}"),
            &format!("user{i}@localhost/phone"),
            "dev",
            &format!("{:064x}", i + 1),
            "",
        );
        conn.feed_raw(&xml).await.expect("send");
    }
    conn.flush().await.expect("flush");
    let mut acknowledged = Vec::new();
    while acknowledged.len() < BURST / 2 {
        let reply = conn.recv(WAIT).await.expect("registrations are answered");
        assert_eq!(error_of(&reply), None, "{}", String::from(&reply));
        let id = reply.attr("id").expect("id").to_owned();
        acknowledged.push((id, node_and_secret(&reply)));
    }
    h.kill9();

    h.spawn();
    let mut conn = h.accept().await;
    for (id, (node, secret)) in &acknowledged {
        let reply = publish(&mut conn, &format!("p-{id}"), node, secret).await;
        assert_eq!(
            error_of(&reply),
            None,
            "registration {id} was acknowledged, then lost"
        );
    }
    assert_eq!(
        h.apns.requests().len(),
        acknowledged.len(),
        "one push per node"
    );
}

#[tokio::test]
async fn apns_goaway_is_survived() {
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    assert_eq!(
        error_of(&publish(&mut conn, "p1", &node, &secret).await),
        None
    );
    h.apns.send_goaway();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        error_of(&publish(&mut conn, "p2", &node, &secret).await),
        None
    );
    assert_eq!(
        h.apns.requests().iter().filter(|p| p.status == 200).count(),
        2
    );
}

#[tokio::test]
async fn the_store_on_disk_holds_no_token_jid_or_secret() {
    let mut h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    assert_eq!(
        publish(&mut conn, "p1", &node, &secret).await.attr("type"),
        Some("result")
    );
    // As a thief would find it: the files of a killed knock, without the key file.
    h.kill9();
    let mut disk = Vec::new();
    let mut pending = vec![h.dir.path().join("store")];
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            pending.extend(
                std::fs::read_dir(&path)
                    .expect("read_dir")
                    .map(|e| e.expect("entry").path()),
            );
        } else {
            disk.extend(std::fs::read(&path).expect("read"));
        }
    }
    let raw = hex::decode(TOKEN).expect("hex");
    for (what, needle) in [
        ("the token", raw.as_slice()),
        ("the token in hex", TOKEN.as_bytes()),
        ("the secret", secret.as_bytes()),
        ("the JID", b"alice@localhost".as_slice()),
        ("the user", b"alice".as_slice()),
    ] {
        assert!(
            !disk.windows(needle.len()).any(|w| w == needle),
            "{what} is on disk"
        );
    }
    assert!(
        disk.windows(node.len()).any(|w| w == node.as_bytes()),
        "the store was written"
    );
}

#[tokio::test]
async fn logs_never_carry_tokens_secrets_or_jids() {
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    publish(&mut conn, "p1", &node, &secret).await;
    h.apns.set_behaviour(TOKEN, Behaviour::Unregistered);
    publish(&mut conn, "p2", &node, &secret).await;
    ask(
        &mut conn,
        &prosody_publish("p3", "localhost", &node, "wrong-secret"),
    )
    .await;
    let log = h.log_text();
    assert!(log.contains("component link up"), "{log}");
    for secret_thing in [
        TOKEN,
        secret.as_str(),
        "alice",
        "wrong-secret",
        node.as_str(),
    ] {
        assert!(
            !log.contains(secret_thing),
            "log (debug level) contains {secret_thing:?}:\n{log}"
        );
    }
    let _ = &h.dir;
}

#[tokio::test]
async fn stanzas_that_do_not_parse_are_refused_and_the_link_stays_up() {
    let h = Harness::start().await;
    let mut conn = h.accept().await;
    // Any user on the network can send these; none may cost a reconnect.
    conn.send_raw(&format!(
        "<iq xmlns='{NS}' type='get' id='no-payload' from='a@localhost/x' to='push.localhost'/>"
    ))
    .await
    .expect("send");
    let reply = conn.recv(WAIT).await.expect("an answer");
    assert_eq!(reply.attr("id"), Some("no-payload"));
    assert_eq!(error_of(&reply), err("modify", "bad-request"));
    for raw in [
        format!("<iq xmlns='{NS}' type='get' from='a@localhost/x' to='push.localhost'><ping xmlns='urn:xmpp:ping'/></iq>"),
        format!("<iq xmlns='{NS}' type='bogus' id='b' from='a@localhost/x' to='push.localhost'><ping xmlns='urn:xmpp:ping'/></iq>"),
        format!("<message xmlns='{NS}' from='a@localhost/x' to='push.localhost'><body>hi</body></message>"),
    ] {
        conn.send_raw(&raw).await.expect("send");
    }
    let pong = ask(&mut conn, &format!("<iq xmlns='{NS}' type='get' id='alive' from='localhost' to='push.localhost'><ping xmlns='urn:xmpp:ping'/></iq>")).await;
    assert_eq!(error_of(&pong), None, "the same link still answers");
    assert!(conn.end_reason().is_none());
    assert!(
        h.server
            .accept_timeout(Duration::from_millis(500))
            .await
            .is_err(),
        "knock did not reconnect"
    );
}

#[tokio::test]
async fn certificate_auth_works_too() {
    let h = Harness::start_with(Options {
        certificate_auth: true,
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    assert_eq!(
        error_of(&publish(&mut conn, "p1", &node, &secret).await),
        None
    );
    let push = &h.apns.requests()[0];
    assert_eq!(push.status, 200);
    assert_eq!(push.kid, None, "no provider token with certificate auth");
}

#[tokio::test]
async fn alert_pushes_carry_a_fixed_title_and_no_node_when_asked() {
    let h = Harness::start_with(Options {
        apns_extra: "push_type = \"alert\"\nalert_title = \"Knock knock\"\ninclude_node = false",
        ..Options::default()
    })
    .await;
    let mut conn = h.accept().await;
    let (node, secret) = register(&mut conn, "dev1", TOKEN).await;
    assert_eq!(
        error_of(&publish(&mut conn, "p1", &node, &secret).await),
        None
    );
    let push = &h.apns.requests()[0];
    assert_eq!(push.status, 200, "{:?}", push.reason);
    assert_eq!(push.push_type.as_deref(), Some("alert"));
    assert_eq!(push.priority.as_deref(), Some("10"));
    assert_eq!(
        push.json().expect("JSON"),
        serde_json::json!({ "aps": { "alert": { "title": "Knock knock" }, "mutable-content": 1 } })
    );
}
