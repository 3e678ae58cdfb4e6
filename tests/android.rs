//! The Conversations family on Android, end to end: the real `knock` binary, registered with exactly the
//! stanzas Conversations sends (p2's `register-push-fcm`), publishing as Prosody does, pushing to a mock FCM
//! that checks the OAuth grant and every message as Google does.
//!
//! What each test pins is the row: one data-only message with the `account` Conversations compares
//! and the priority the publish deserves; a dead token removing the registration; an outage answered `wait`
//! with the registration kept; an access token expiring mid-run costing no push; Google throttling with
//! `Retry-After`; a wrong project never deleting registrations; unregistering, group chats and
//! registration-free mode.

use std::time::{Duration, Instant};

use testkit::fcm::{Behaviour, INVALID_SIGNATURE};
use testkit::server::ComponentConn;

mod common;
use common::harness::*;
use common::*;

/// An FCM token as Google hands them out (p2's README example).
const TOKEN: &str = "eeDXSJjASJY:APA91bEKxhXK54-vHhY9O55JmU2R0nDJL2rRENm-W9uPY6x3jHi0i0OyvPu6js9jVPZqDeX9ZQydZCBZE19o7a0kK4_n88fCgufXjaOlvalh9VibB2zOI7dQRTaDNB3H5s4dicpWD0m4";
/// Android's `Settings.Secure.ANDROID_ID` (p2's README example).
const ANDROID_ID: &str = "92afd7a91cdba9a0";
/// What Conversations' `CryptoHelper.getAccountFingerprint` makes of alice@localhost and [`ANDROID_ID`]:
/// `sha1("alice@localhost\0" + ANDROID_ID)`, computed independently of knock.
const ALICE_ACCOUNT: &str = "12f8203e15c0732329f525206c5d8c3b8d9410a3";

async fn android() -> Harness {
    android_with("", Options::default()).await
}

async fn android_with(fcm_extra: &'static str, options: Options) -> Harness {
    Harness::start_with(Options {
        fcm: Some(fcm_extra),
        ..options
    })
    .await
}

fn fcm(h: &Harness) -> &testkit::fcm::MockFcm {
    h.fcm.as_ref().expect("the harness runs a mock FCM")
}

/// Register alice's phone with `token` as Conversations does; the node and secret.
async fn register_phone(conn: &mut ComponentConn, token: &str) -> (String, String) {
    node_and_secret(
        &ask(
            conn,
            &conversations_register_xml(
                "reg",
                "alice@localhost/Conversations.sAdA",
                ANDROID_ID,
                token,
                "",
            ),
        )
        .await,
    )
}

/// A publish Prosody sends for something that is not a message (a receipt, a chat state): no body.
fn unimportant_publish(id: &str, node: &str, secret: &str) -> String {
    prosody_publish(id, "localhost", node, secret).replace("<value>New Message!</value>", "")
}

#[test]
fn the_account_constant_is_conversations_hash() {
    // The same computation as Conversations' CryptoHelper, by another implementation (Python's hashlib
    // gives the same digest): sha1 over UTF-8 of "alice@localhost", NUL, the ANDROID_ID.
    use sha1::{Digest, Sha1};
    let digest = Sha1::digest(format!("alice@localhost\0{ANDROID_ID}").as_bytes());
    assert_eq!(hex::encode(digest), ALICE_ACCOUNT);
}

#[tokio::test]
async fn a_message_is_one_high_priority_data_message_naming_the_account_and_nothing_else() {
    let h = android().await;
    let mut conn = h.accept().await;
    let (node, secret) = register_phone(&mut conn, TOKEN).await;
    // Conversations re-registers on every start: same node and secret, nothing new.
    assert_eq!(
        register_phone(&mut conn, TOKEN).await,
        (node.clone(), secret.clone())
    );

    assert_eq!(
        error_of(&publish(&mut conn, "p1", &node, &secret).await),
        None
    );
    let sent = fcm(&h).wait_for_requests(1, WAIT).await;
    assert_eq!(sent.len(), 1, "one message per publish");
    let message = &sent[0];
    assert_eq!(message.status, 200);
    assert_eq!(message.version, "HTTP/2.0");
    assert_eq!(message.token.as_deref(), Some(TOKEN));
    assert_eq!(message.priority.as_deref(), Some("HIGH"));
    assert_eq!(
        message
            .data
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
        [("account", ALICE_ACCOUNT)],
        "data-only, the account id Conversations compares, nothing else"
    );
    assert_eq!(message.ttl.as_deref(), Some("2419200s"));
    let collapse = message.collapse_key.as_deref().expect("a collapse key");
    assert!(
        collapse.len() == 32 && !collapse.contains(&node),
        "{collapse}"
    );
    for secretive in ["New Message", "alice", &node, &secret] {
        assert!(
            !message.body.contains(secretive),
            "{secretive:?} in {}",
            message.body
        );
    }
    let json = message.json().expect("JSON");
    assert!(json["message"].get("notification").is_none(), "{json}");

    // The access token is the mock's, got by a grant the mock verified.
    let grants = fcm(&h).token_grants();
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].status, 200);
    assert_eq!(message.access_token, grants[0].access_token);

    // Something that is not a message wakes the app without priority.
    let reply = ask(&mut conn, &unimportant_publish("p2", &node, &secret)).await;
    assert_eq!(error_of(&reply), None);
    let sent = fcm(&h).wait_for_requests(2, WAIT).await;
    assert_eq!(sent[1].priority.as_deref(), Some("NORMAL"));
    assert_eq!(
        sent[1].collapse_key.as_deref(),
        Some(collapse),
        "one per node"
    );
    assert_eq!(
        fcm(&h).token_grants().len(),
        1,
        "the access token is reused"
    );

    // Neither the token, nor the account id, nor the JID reaches the log, even at debug.
    let log = h.log_text();
    for secretive in [TOKEN, ALICE_ACCOUNT, "alice@localhost", &node, &secret] {
        assert!(!log.contains(secretive), "{secretive:?} in the log");
    }
}

#[tokio::test]
async fn a_dead_token_removes_the_registration_and_is_item_not_found() {
    let h = android().await;
    let mut conn = h.accept().await;
    for (behaviour, token) in [
        (Behaviour::Unregistered, "dead-1:APA91b-unregistered"),
        (Behaviour::InvalidToken, "dead-2:APA91b-invalid"),
    ] {
        let (node, secret) = register_phone(&mut conn, token).await;
        fcm(&h).set_behaviour(token, behaviour.clone());
        let reply = publish(&mut conn, "dead", &node, &secret).await;
        assert_eq!(
            error_of(&reply),
            err("cancel", "item-not-found"),
            "{behaviour:?}"
        );
        let asked = fcm(&h).requests_for(token).len();
        let again = publish(&mut conn, "again", &node, &secret).await;
        assert_eq!(error_of(&again), err("cancel", "item-not-found"));
        assert_eq!(
            fcm(&h).requests_for(token).len(),
            asked,
            "{behaviour:?}: the registration is gone, Google is not asked again"
        );
    }
}

#[tokio::test]
async fn an_fcm_outage_is_wait_and_keeps_the_registration() {
    let h = android_with(
        "",
        Options {
            publish_deadline_ms: 1500,
            ..Options::default()
        },
    )
    .await;
    let mut conn = h.accept().await;
    let (node, secret) = register_phone(&mut conn, TOKEN).await;
    for behaviour in [
        Behaviour::Unavailable,
        Behaviour::Internal,
        Behaviour::BadGateway,
    ] {
        fcm(&h).set_behaviour(TOKEN, behaviour.clone());
        let started = Instant::now();
        let reply = publish(&mut conn, "down", &node, &secret).await;
        assert_eq!(
            error_of(&reply),
            err("wait", "internal-server-error"),
            "{behaviour:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "{behaviour:?}: by the deadline"
        );
    }
    assert!(
        fcm(&h).requests_for(TOKEN).len() >= 6,
        "each failure is retried inside the deadline"
    );
    fcm(&h).clear_behaviour(TOKEN);
    assert_eq!(
        error_of(&publish(&mut conn, "back", &node, &secret).await),
        None,
        "kept"
    );
}

#[tokio::test]
async fn throttling_is_retried_after_retry_after_within_the_deadline() {
    let h = android().await;
    let mut conn = h.accept().await;
    let (node, secret) = register_phone(&mut conn, TOKEN).await;
    fcm(&h).set_behaviour(TOKEN, Behaviour::fail_times(1, Behaviour::QuotaExceeded(1)));
    let started = Instant::now();
    assert_eq!(
        error_of(&publish(&mut conn, "q", &node, &secret).await),
        None
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
    assert_eq!(fcm(&h).requests_for(TOKEN).len(), 2);

    // A pause longer than the deadline is not waited out: `wait` at once, the registration kept.
    fcm(&h).set_behaviour(TOKEN, Behaviour::QuotaExceeded(60));
    let started = Instant::now();
    let reply = publish(&mut conn, "q2", &node, &secret).await;
    assert_eq!(error_of(&reply), err("wait", "resource-constraint"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_access_token_expiring_mid_run_costs_no_push() {
    let h = android().await;
    let mut conn = h.accept().await;
    let (node, secret) = register_phone(&mut conn, TOKEN).await;
    assert_eq!(
        error_of(&publish(&mut conn, "p1", &node, &secret).await),
        None
    );
    fcm(&h).expire_access_tokens();
    assert_eq!(
        error_of(&publish(&mut conn, "p2", &node, &secret).await),
        None
    );
    let sent = fcm(&h).requests_for(TOKEN);
    let statuses: Vec<u16> = sent.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [200, 401, 200],
        "refused once, then sent with a new token"
    );
    assert_eq!(fcm(&h).token_grants().len(), 2);
    assert_ne!(sent[0].access_token, sent[2].access_token);
}

#[tokio::test]
async fn a_refused_service_account_is_wait_and_never_deletes_a_registration() {
    let h = android().await;
    let mut conn = h.accept().await;
    let (node, secret) = register_phone(&mut conn, TOKEN).await;
    fcm(&h).set_token_failure(Some(INVALID_SIGNATURE));
    let reply = publish(&mut conn, "p1", &node, &secret).await;
    assert_eq!(error_of(&reply), err("wait", "internal-server-error"));
    assert!(
        h.log_text().contains(INVALID_SIGNATURE),
        "the admin is told why"
    );
    assert!(
        fcm(&h).requests().is_empty(),
        "nothing sent without a token"
    );
    // Until the pause is over, Google's token endpoint is not asked again for every publish.
    let grants = fcm(&h).token_requests();
    let _ = publish(&mut conn, "p2", &node, &secret).await;
    assert_eq!(fcm(&h).token_requests(), grants);
    fcm(&h).set_token_failure(None);
    assert_eq!(
        error_of(&register_phone_reply(&mut conn).await),
        None,
        "the registration is still there"
    );
}

async fn register_phone_reply(conn: &mut ComponentConn) -> minidom::Element {
    ask(
        conn,
        &conversations_register_xml(
            "re",
            "alice@localhost/Conversations.sAdA",
            ANDROID_ID,
            TOKEN,
            "",
        ),
    )
    .await
}

#[tokio::test]
async fn sender_id_mismatch_is_a_dead_token_only_once_the_project_is_proven() {
    let h = android().await;
    let mut conn = h.accept().await;
    let (node, secret) = register_phone(&mut conn, TOKEN).await;
    // Before any message was accepted, every token answering SENDER_ID_MISMATCH is what a service account
    // of the wrong project looks like: a configuration error, and no registration goes.
    fcm(&h).set_behaviour(TOKEN, Behaviour::SenderIdMismatch);
    let reply = publish(&mut conn, "p1", &node, &secret).await;
    assert_eq!(error_of(&reply), err("wait", "internal-server-error"));

    let other = "other-project:APA91b";
    let (other_node, other_secret) = node_and_secret(
        &ask(
            &mut conn,
            &conversations_register_xml("r2", "bob@localhost/c", "0123456789abcdef", other, ""),
        )
        .await,
    );
    assert_eq!(
        error_of(&publish(&mut conn, "ok", &other_node, &other_secret).await),
        None
    );
    // Now the project is known to be right: the mismatching token is another app's, dead.
    let reply = publish(&mut conn, "p2", &node, &secret).await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
}

#[tokio::test]
async fn unregistering_and_group_chats_as_conversations_does_them() {
    let h = android().await;
    let mut conn = h.accept().await;
    let from = "alice@localhost/Conversations.sAdA";
    let (node, secret) = register_phone(&mut conn, TOKEN).await;
    // An older fork registers a group chat: a registration of its own, with its own node.
    let muc = "<field var='muc'><value>room@conference.localhost</value></field>";
    let reply = ask(
        &mut conn,
        &conversations_register_xml("m", from, ANDROID_ID, TOKEN, muc),
    )
    .await;
    let (room_node, room_secret) = node_and_secret(&reply);
    assert_ne!(room_node, node);
    assert_eq!(
        error_of(&publish(&mut conn, "room", &room_node, &room_secret).await),
        None
    );
    let sent = fcm(&h).wait_for_requests(1, WAIT).await;
    assert_eq!(
        sent[0].data.get("account").map(String::as_str),
        Some(ALICE_ACCOUNT)
    );

    // A full JID is no group chat.
    let full = "<field var='muc'><value>room@conference.localhost/nick</value></field>";
    let reply = ask(
        &mut conn,
        &conversations_register_xml("f", from, ANDROID_ID, TOKEN, full),
    )
    .await;
    assert_eq!(error_of(&reply), err("modify", "bad-request"));

    // Conversations leaves the room by its channel id: p2's hash of room and device.
    let channel = {
        use sha1::{Digest, Sha1};
        hex::encode(Sha1::digest(
            format!("room@conference.localhost\0{ANDROID_ID}").as_bytes(),
        ))
    };
    let reply = ask(
        &mut conn,
        &conversations_unregister_xml("u1", from, ANDROID_ID, Some(&channel)),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    let gone = publish(&mut conn, "room2", &room_node, &room_secret).await;
    assert_eq!(error_of(&gone), err("cancel", "item-not-found"));
    assert_eq!(
        error_of(&publish(&mut conn, "mine", &node, &secret).await),
        None,
        "the device's own stays"
    );

    // And the device's own registration, by its android-id alone.
    let reply = ask(
        &mut conn,
        &conversations_unregister_xml("u2", from, ANDROID_ID, None),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    let gone = publish(&mut conn, "mine2", &node, &secret).await;
    assert_eq!(error_of(&gone), err("cancel", "item-not-found"));
    let reply = ask(
        &mut conn,
        &conversations_unregister_xml("u3", from, ANDROID_ID, None),
    )
    .await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
}

#[tokio::test]
async fn registration_free_mode_pushes_an_fcm_token_named_by_the_node() {
    let h = android_with("push_module = \"fcm-module\"", Options::default()).await;
    let mut conn = h.accept().await;
    let publish_free = |id: &str, node: &str| {
        format!(
            "<iq xmlns='{NS}' type='set' id='{id}' from='localhost' to='push.localhost'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item><notification xmlns='urn:xmpp:push:0'/></item></publish><publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='pushModule'><value>fcm-module</value></field></x></publish-options></pubsub></iq>"
        )
    };
    assert_eq!(
        error_of(&ask(&mut conn, &publish_free("f1", TOKEN)).await),
        None
    );
    let sent = fcm(&h).wait_for_requests(1, WAIT).await;
    assert_eq!(sent[0].token.as_deref(), Some(TOKEN));
    assert!(
        sent[0].data.is_empty(),
        "no registration, no account: {:?}",
        sent[0].data
    );
    // There is no FCM sandbox.
    let reply = ask(
        &mut conn,
        &publish_free("f2", TOKEN).replace("fcm-module", "fcm-module-sandbox"),
    )
    .await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
}
