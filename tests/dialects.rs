//! The client dialects beyond p2's and the delivery they get, below the socket: the stanzas each client
//! (or its server, on its behalf) sends, exactly, through the router, into a real sled store and a scripted
//! push backend. One test per row of issue 17: adaptive delivery, Monal's registration-free mode, and
//! Tigase's `register-device` with encrypted payloads and calls; and of issue 19: the Conversations
//! family's `register-push-fcm` (tests/android.rs has it end to end, against a mock FCM).

use std::sync::Arc;
use std::time::Duration;

use knock::app::PushApp;
use knock::push::{ProviderKind, PushOutcome, WakeKind};
use minidom::Element;

mod common;
use common::fixture::*;
use common::*;

// --- adaptive delivery (push_type = "auto") ---

/// Prosody's publish with the body placeholder removed: what it sends for a stanza it does not deem
/// important (a chat state, a receipt).
fn quiet_publish(id: &str, node: &str, secret: &str) -> String {
    prosody_publish(id, "localhost", node, secret).replace(">New Message!<", "><")
}

fn kinds(f: &Fixture) -> Vec<WakeKind> {
    f.backend.wakeups().iter().map(|w| w.kind).collect()
}

#[tokio::test]
async fn important_publishes_show_and_the_rest_wake_silently_within_the_hourly_budget() {
    let f = fixture();
    let (node, secret) = register(&f, "alice@localhost/p", "d", TOKEN).await;
    // Important (Prosody's placeholder body, ejabberd's summary, Tigase's priority tag): visible.
    for xml in [
        prosody_publish("p1", "localhost", &node, &secret),
        ejabberd_publish("p2", "localhost", &node, &secret),
        quiet_publish("p3", &node, &secret).replace(
            "</notification>",
            "<priority xmlns='tigase:push:priority:0'>high</priority></notification>",
        ),
    ] {
        assert_eq!(error_of(&ask(&f, &xml).await), None);
    }
    assert_eq!(kinds(&f), [WakeKind::Alert; 3]);

    // Unimportant: silent, three an hour (the default), then answered without a push.
    for i in 0..5 {
        let reply = ask(&f, &quiet_publish(&format!("q{i}"), &node, &secret)).await;
        assert_eq!(error_of(&reply), None, "over budget is still a result");
    }
    let silent = kinds(&f)
        .iter()
        .filter(|k| **k == WakeKind::Background)
        .count();
    assert_eq!(silent, 3);
    let counted = f.app.stats.snapshot();
    assert_eq!(counted.over_budget, 2);
    assert_eq!((counted.pushed_alert, counted.pushed_background), (3, 3));
    // An important one still shows.
    let reply = ask(&f, &prosody_publish("p4", "localhost", &node, &secret)).await;
    assert_eq!(error_of(&reply), None);
    assert_eq!(kinds(&f).last(), Some(&WakeKind::Alert));
    // The budget is the device's own.
    let (other, other_secret) = register(&f, "bob@localhost/p", "d", TOKEN2).await;
    let reply = ask(&f, &quiet_publish("o1", &other, &other_secret)).await;
    assert_eq!(error_of(&reply), None);
    assert_eq!(kinds(&f).last(), Some(&WakeKind::Background));
}

#[tokio::test]
async fn a_fixed_push_type_ignores_importance_and_budget() {
    let f = fixture_of(
        |backend| vec![PushApp::new("chat", backend).with_kind(WakeKind::Background)],
        |b| b,
    );
    let (node, secret) = register(&f, "alice@localhost/p", "d", TOKEN).await;
    for i in 0..5 {
        let xml = if i % 2 == 0 {
            prosody_publish(&format!("p{i}"), "localhost", &node, &secret)
        } else {
            quiet_publish(&format!("p{i}"), &node, &secret)
        };
        assert_eq!(error_of(&ask(&f, &xml).await), None);
    }
    assert_eq!(kinds(&f), [WakeKind::Background; 5]);
}

#[tokio::test]
async fn a_silent_push_does_not_hold_back_a_visible_one() {
    let f = fixture_with(Duration::from_secs(60));
    let (node, secret) = register(&f, "alice@localhost/p", "d", TOKEN).await;
    for xml in [
        quiet_publish("q1", &node, &secret),
        prosody_publish("p1", "localhost", &node, &secret),
        prosody_publish("p2", "localhost", &node, &secret),
        quiet_publish("q2", &node, &secret),
    ] {
        assert_eq!(error_of(&ask(&f, &xml).await), None);
    }
    assert_eq!(kinds(&f), [WakeKind::Background, WakeKind::Alert]);
    assert_eq!(f.app.stats.snapshot().coalesced, 2);
}

// --- Monal: registration-free mode ---

/// Monal's enable at its own server (Monal `XMPPIQ.m` `setPushEnableWithNode:onAppserver:`): node = the
/// APNs token in lower-case hex, publish-options with only `pushModule`. Prosody copies that form into
/// every publish, verbatim.
fn monal_publish(id: &str, from: &str, token: &str, module: &str) -> String {
    prosody_publish(id, from, token, "x").replace(
        "<field var='secret'><value>x</value></field>",
        &format!("<field var='pushModule'><value>{module}</value></field>"),
    )
}

/// Apps `monal` (registration-free for `monalProdiOS`, with a sandbox backend) and `chat`.
fn monal_fixture(per_token_per_hour: u32) -> (Fixture, Arc<Scripted>) {
    let sandbox = Arc::new(Scripted::default());
    let sandbox_provider = sandbox.clone();
    let f = fixture_of(
        move |backend| {
            vec![
                PushApp {
                    push_modules: vec!["monalProdiOS".into()],
                    sandbox: Some(sandbox_provider),
                    ..PushApp::new("monal", backend.clone())
                },
                PushApp {
                    push_modules: vec!["monalProdCatalyst".into()],
                    ..PushApp::new("catalyst", backend)
                },
            ]
        },
        |b| b.registration_free_per_hour(per_token_per_hour),
    );
    (f, sandbox)
}

#[tokio::test]
async fn monal_publishes_push_to_the_node_token_without_registration() {
    let (f, sandbox) = monal_fixture(0);
    // From any server, no secret.
    for (id, from) in [("m1", "localhost"), ("m2", "other.example")] {
        let reply = ask(&f, &monal_publish(id, from, TOKEN, "monalProdiOS")).await;
        assert_eq!(error_of(&reply), None);
    }
    let woken = f.backend.wakeups();
    assert_eq!(woken.len(), 2);
    assert_eq!(woken[0].token, TOKEN);
    assert_eq!(woken[0].kind, WakeKind::Alert, "a chat message shows");
    assert_eq!(f.app.store.len().unwrap(), 0, "nothing is registered");
    // The -sandbox variant goes to the sandbox endpoint.
    let reply = ask(
        &f,
        &monal_publish("m3", "localhost", TOKEN2, "monalProdiOS-sandbox"),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    assert_eq!(sandbox.woken(), [(TOKEN2.to_owned(), TOKEN2.to_owned())]);
    // Extra publish-option fields (what fpush refused) change nothing.
    let extra = monal_publish("m4", "localhost", TOKEN2, "monalProdiOS").replace(
        "<field var='pushModule'>",
        "<field var='secret'><value>whatever</value></field><field var='x-extra'><value>1</value></field><field var='pushModule'>",
    );
    assert_eq!(error_of(&ask(&f, &extra).await), None);
    assert_eq!(f.backend.woken().len(), 3);
}

#[tokio::test]
async fn monal_publishes_that_cannot_be_served_are_item_not_found() {
    let (f, _) = monal_fixture(0);
    for (xml, why) in [
        (
            monal_publish("a", "localhost", TOKEN, "someoneElsesModule"),
            "unknown module",
        ),
        (
            monal_publish("b", "localhost", &TOKEN[..20], "monalProdiOS"),
            "node too short for a token",
        ),
        (
            monal_publish(
                "c",
                "localhost",
                "not-hex-not-hex-not-hex-not-hex-not-hex",
                "monalProdiOS",
            ),
            "node not hex",
        ),
        (
            monal_publish("d", "localhost", TOKEN, "monalProdCatalyst-sandbox"),
            "no sandbox endpoint",
        ),
        (
            prosody_publish("e", "localhost", TOKEN, "s"),
            "a token node without a module is just unknown",
        ),
    ] {
        assert_eq!(
            error_of(&ask(&f, &xml).await),
            err("cancel", "item-not-found"),
            "{why}"
        );
    }
    assert!(f.backend.woken().is_empty());
}

#[tokio::test]
async fn a_dead_monal_token_is_remembered_and_apple_not_asked_again() {
    let (f, _) = monal_fixture(0);
    f.backend.set(
        TOKEN,
        PushOutcome::DeadToken {
            reason: "Unregistered".into(),
        },
    );
    let first = ask(&f, &monal_publish("m1", "localhost", TOKEN, "monalProdiOS")).await;
    assert_eq!(error_of(&first), err("cancel", "item-not-found"));
    assert_eq!(f.backend.woken().len(), 1);
    for id in ["m2", "m3"] {
        let again = ask(&f, &monal_publish(id, "localhost", TOKEN, "monalProdiOS")).await;
        assert_eq!(error_of(&again), err("cancel", "item-not-found"));
    }
    assert_eq!(f.backend.woken().len(), 1, "no further request to Apple");
    assert_eq!(f.app.stats.snapshot().dead_token, 3);
    // Other tokens are not affected.
    let other = ask(
        &f,
        &monal_publish("m4", "localhost", TOKEN2, "monalProdiOS"),
    )
    .await;
    assert_eq!(error_of(&other), None);
}

#[tokio::test]
async fn each_monal_token_gets_at_most_its_hourly_wake_ups() {
    let (f, _) = monal_fixture(2);
    for i in 0..4 {
        let reply = ask(
            &f,
            &monal_publish(&format!("m{i}"), "localhost", TOKEN, "monalProdiOS"),
        )
        .await;
        assert_eq!(error_of(&reply), None, "answered result, as fpush does");
    }
    assert_eq!(f.backend.woken().len(), 2);
    assert_eq!(f.app.stats.snapshot().over_budget, 2);
    let other = ask(&f, &monal_publish("o", "localhost", TOKEN2, "monalProdiOS")).await;
    assert_eq!(error_of(&other), None);
    assert_eq!(f.backend.woken().len(), 3);
}

// --- Tigase: register-device, encrypted payloads, calls ---

/// The upper-case hex Siskin sends its APNs token in (`String(format: "%02X", $1)`).
fn upper(token: &str) -> String {
    token.to_ascii_uppercase()
}

/// A VoIP token (PushKit's, lower-case hex).
const VOIP: &str = "0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de";

/// Siskin's `register-device` (tigase/Martin `TigasePushNotificationsModule.registerDevice`): one execute
/// with a submitted form, no FORM_TYPE, `device-second-token` only when the user's server can push calls.
fn register_device_xml(from: &str, provider: &str, token: &str, second: Option<&str>) -> String {
    let second = second
        .map(|t| {
            format!(
                "<field var='device-second-token' type='text-single'><value>{t}</value></field>"
            )
        })
        .unwrap_or_default();
    format!(
        "<iq xmlns='{NS}' type='set' id='reg' from='{from}' to='push.localhost'>\
         <command xmlns='http://jabber.org/protocol/commands' node='register-device' action='execute'>\
         <x xmlns='jabber:x:data' type='submit'>\
         <field var='provider' type='text-single'><value>{provider}</value></field>\
         <field var='device-token' type='text-single'><value>{token}</value></field>{second}\
         </x></command></iq>"
    )
}

fn unregister_device_xml(from: &str, provider: &str, token: &str) -> String {
    format!(
        "<iq xmlns='{NS}' type='set' id='unreg' from='{from}' to='push.localhost'>\
         <command xmlns='http://jabber.org/protocol/commands' node='unregister-device' action='execute'>\
         <x xmlns='jabber:x:data' type='submit'>\
         <field var='provider' type='text-single'><value>{provider}</value></field>\
         <field var='device-token' type='text-single'><value>{token}</value></field>\
         </x></command></iq>"
    )
}

const SISKIN: &str = "tigase:messenger:apns:1";

/// An app `siskin` serving Siskin's provider id, beside the default `chat`.
fn tigase_fixture() -> Fixture {
    fixture_of(
        |backend| {
            vec![
                PushApp::new("chat", backend.clone()),
                PushApp {
                    tigase_providers: vec![SISKIN.into()],
                    ..PushApp::new("siskin", backend)
                },
            ]
        },
        |b| b,
    )
}

/// The values of a reply form's field.
fn values(reply: &Element, var: &str) -> Vec<String> {
    let command = reply
        .get_child("command", "http://jabber.org/protocol/commands")
        .expect("command");
    let form = command.get_child("x", "jabber:x:data").expect("form");
    form.children()
        .find(|f| f.attr("var") == Some(var))
        .map(|f| {
            f.children()
                .filter(|v| v.name() == "value")
                .map(|v| v.text())
                .collect()
        })
        .unwrap_or_default()
}

/// Register as Siskin does; the node from the reply.
async fn register_device(f: &Fixture, from: &str, second: Option<&str>) -> String {
    let reply = ask(f, &register_device_xml(from, SISKIN, &upper(TOKEN), second)).await;
    assert_eq!(error_of(&reply), None, "{}", String::from(&reply));
    field(&reply, "node").expect("node")
}

/// Prosody 0.12 + mod_cloud_notify_encrypted's publish for a chat message (verbatim capture,
/// ../shared/reference/publish-prosody-encrypted.xml; node substituted): no summary, no secret.
fn encrypted_publish(id: &str, from: &str, node: &str) -> String {
    format!("<iq xmlns='{NS}' type='set' from='{from}' to='push.localhost' id='{id}'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item><notification xmlns='urn:xmpp:push:0'><encrypted iv='tyNBXvy5//xf9ckN' xmlns='tigase:push:encrypt:0'>{ENCRYPTED}</encrypted><priority xmlns='tigase:push:priority:0'>high</priority></notification></item></publish><publish-options><x type='submit' xmlns='jabber:x:data'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field></x></publish-options></pubsub></iq>")
}

const ENCRYPTED: &str = "aqJJaTjr4P7IpKEiZWi0lE5G5Fqg7uX9SInPaBNu+IOdwH5q8a5UujHuoWwNoy3h58AoU+3hLfMx4k0sDr653ap0nx/aNSF6fx67eNLYVDETAAAAAAAAAAAAAAAAAAAAAA==";

/// The same for a Jingle call propose (publish-prosody-encrypted-voip.xml).
fn call_publish(id: &str, node: &str) -> String {
    format!("<iq xmlns='{NS}' type='set' from='localhost' to='push.localhost' id='{id}'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item><notification xmlns='urn:xmpp:push:0'><encrypted iv='Ug8KJMBE/qdUdshT' type='voip' xmlns='tigase:push:encrypt:0'>{CALL}</encrypted><priority xmlns='tigase:push:priority:0'>high</priority></notification></item></publish><publish-options><x type='submit' xmlns='jabber:x:data'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field></x></publish-options></pubsub></iq>")
}

const CALL: &str = "tOJiO8lWg110v4H/hjjC6mgc5jZtD8NzseLkCl1Z5uT0+HPx0sJ9FO/f22w4UB9sjemvrZkJdK1tuoiq7Mc3WMEjQqCARogS2wPe/37dPJFk5cuRrJnKsKOwfX6FKpa4AAAAAAAAAAAAAAAAAAAAAA==";

#[tokio::test]
async fn register_device_answers_node_features_and_max_payload_size() {
    let f = tigase_fixture();
    let reply = ask(
        &f,
        &register_device_xml("alice@localhost/phone", SISKIN, &upper(TOKEN), Some(VOIP)),
    )
    .await;
    assert_eq!(error_of(&reply), None, "{}", String::from(&reply));
    let command = reply
        .get_child("command", "http://jabber.org/protocol/commands")
        .unwrap();
    assert_eq!(command.attr("status"), Some("completed"));
    let node = field(&reply, "node").expect("node");
    assert_eq!(
        values(&reply, "features"),
        [
            "tigase:push:encrypt:0",
            "tigase:push:encrypt:aes-128-gcm",
            "tigase:push:jingle:0"
        ]
    );
    assert_eq!(field(&reply, "max-payload-size").as_deref(), Some("3072"));
    assert_eq!(field(&reply, "secret"), None, "the dialect has no secret");

    let stored = f.app.store.get(&node).unwrap().expect("stored");
    assert_eq!(stored.app, "siskin");
    assert_eq!(
        hex::encode(stored.token.as_bytes()),
        TOKEN,
        "upper case read as the same token"
    );
    assert_eq!(
        stored
            .call_token
            .map(|t| hex::encode(t.as_bytes()))
            .as_deref(),
        Some(VOIP)
    );
    assert_eq!(stored.account.as_deref(), Some("alice@localhost"));
    assert_eq!(stored.secret_hash, None);

    // The same device again (an app start): the same node, nothing written.
    let again = register_device(&f, "alice@localhost/tablet", Some(VOIP)).await;
    assert_eq!(again, node);
    assert_eq!(f.app.stats.snapshot().registration_unchanged, 1);
}

#[tokio::test]
async fn register_device_refuses_what_it_cannot_serve() {
    let f = tigase_fixture();
    for (xml, expected) in [
        (
            register_device_xml("a@localhost/p", "snikket:apns:1", TOKEN, None),
            err("modify", "bad-request"),
        ),
        (
            register_device_xml("a@localhost/p", SISKIN, "zz", None),
            err("modify", "bad-request"),
        ),
        (
            register_device_xml("a@localhost/p", SISKIN, TOKEN, Some("nothex")),
            err("modify", "bad-request"),
        ),
        (
            unregister_device_xml("a@localhost/p", SISKIN, TOKEN),
            err("cancel", "item-not-found"),
        ),
    ] {
        assert_eq!(error_of(&ask(&f, &xml).await), expected, "{xml}");
    }
    assert_eq!(f.app.store.len().unwrap(), 0);
}

#[tokio::test]
async fn tigase_nodes_take_publishes_from_the_users_server_without_a_secret() {
    let f = tigase_fixture();
    let node = register_device(&f, "alice@localhost/phone", None).await;
    // A plain summary (mod_cloud_notify without the encrypted module): visible, naming the account.
    let reply = ask(
        &f,
        &prosody_publish("p1", "localhost", &node, "")
            .replace("<field var='secret'><value></value></field>", ""),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    let woken = f.backend.wakeups();
    assert_eq!(woken[0].kind, WakeKind::Alert);
    assert_eq!(woken[0].account.as_deref(), Some("alice@localhost"));
    assert_eq!(woken[0].encrypted, None);
    // Another server may not.
    let reply = ask(&f, &encrypted_publish("p2", "evil.example", &node)).await;
    assert_eq!(error_of(&reply), err("auth", "forbidden"));
    assert_eq!(f.backend.woken().len(), 1);
}

#[tokio::test]
async fn encrypted_payloads_pass_through_untouched() {
    let f = tigase_fixture();
    let node = register_device(&f, "alice@localhost/phone", Some(VOIP)).await;
    let reply = ask(&f, &encrypted_publish("p1", "localhost", &node)).await;
    assert_eq!(error_of(&reply), None);
    let woken = f.backend.wakeups();
    assert_eq!(woken.len(), 1);
    assert_eq!(
        woken[0].kind,
        WakeKind::Alert,
        "Siskin's notification extension runs on alerts"
    );
    assert_eq!(woken[0].token, TOKEN, "a message goes to the device token");
    assert_eq!(
        woken[0].encrypted,
        Some((ENCRYPTED.into(), "tyNBXvy5//xf9ckN".into()))
    );
    assert_eq!(woken[0].account.as_deref(), Some("alice@localhost"));
}

#[tokio::test]
async fn a_call_goes_to_the_call_token_or_is_refused_with_wait() {
    let f = tigase_fixture();
    let with_voip = register_device(&f, "alice@localhost/phone", Some(VOIP)).await;
    let reply = ask(&f, &call_publish("c1", &with_voip)).await;
    assert_eq!(error_of(&reply), None);
    let call = f.backend.wakeups().pop().expect("pushed");
    assert_eq!(call.kind, WakeKind::Call);
    assert_eq!(call.token, VOIP);
    assert_eq!(
        call.encrypted,
        Some((CALL.into(), "Ug8KJMBE/qdUdshT".into()))
    );
    // Calls are never coalesced: a second ring right after the first still goes.
    let reply = ask(&f, &call_publish("c2", &with_voip)).await;
    assert_eq!(error_of(&reply), None);
    assert_eq!(f.backend.woken().len(), 2);

    // A device that gave no call token: `wait` (the registration serves messages, and a server drops it
    // on `cancel`), and it is kept.
    let reply = ask(
        &f,
        &register_device_xml("bob@localhost/phone", SISKIN, TOKEN2, None),
    )
    .await;
    let without = field(&reply, "node").expect("node");
    let reply = ask(&f, &call_publish("c3", &without)).await;
    assert_eq!(error_of(&reply), err("wait", "feature-not-implemented"));
    assert!(f.app.store.get(&without).unwrap().is_some());
    assert_eq!(f.backend.woken().len(), 2);
}

#[tokio::test]
async fn a_dead_call_token_goes_alone_and_messages_still_push() {
    let f = tigase_fixture();
    let node = register_device(&f, "alice@localhost/phone", Some(VOIP)).await;
    f.backend.set(
        VOIP,
        PushOutcome::DeadToken {
            reason: "Unregistered".into(),
        },
    );
    let reply = ask(&f, &call_publish("c1", &node)).await;
    assert_eq!(error_of(&reply), err("wait", "feature-not-implemented"));
    let kept = f
        .app
        .store
        .get(&node)
        .unwrap()
        .expect("the registration stays");
    assert_eq!(kept.call_token, None, "only the call token went");
    // Messages still reach the device; a further call is refused without asking Apple.
    let reply = ask(&f, &encrypted_publish("p1", "localhost", &node)).await;
    assert_eq!(error_of(&reply), None);
    assert_eq!(
        f.backend
            .wakeups()
            .last()
            .map(|w| w.token.clone())
            .as_deref(),
        Some(TOKEN)
    );
    let reply = ask(&f, &call_publish("c2", &node)).await;
    assert_eq!(error_of(&reply), err("wait", "feature-not-implemented"));
    assert_eq!(f.backend.woken().len(), 2);
}

#[tokio::test]
async fn a_payload_over_the_apps_size_is_dropped_from_a_message_and_refuses_a_call() {
    let f = fixture_of(
        |backend| {
            vec![PushApp {
                tigase_providers: vec![SISKIN.into()],
                max_payload_size: 64,
                ..PushApp::new("siskin", backend)
            }]
        },
        |b| b,
    );
    let node = register_device(&f, "alice@localhost/phone", Some(VOIP)).await;
    let reply = ask(&f, &encrypted_publish("p1", "localhost", &node)).await;
    assert_eq!(error_of(&reply), None, "the device is still woken");
    let woken = f.backend.wakeups();
    assert_eq!(woken[0].kind, WakeKind::Alert);
    assert_eq!(
        woken[0].encrypted, None,
        "without the payload it could not carry"
    );
    let reply = ask(&f, &call_publish("c1", &node)).await;
    assert_eq!(error_of(&reply), err("wait", "not-acceptable"));
    assert_eq!(f.backend.woken().len(), 1);
}

#[tokio::test]
async fn unregister_device_removes_the_registration() {
    let f = tigase_fixture();
    let node = register_device(&f, "alice@localhost/phone", None).await;
    // Siskin sends the token as it registered it; any case finds it.
    let reply = ask(
        &f,
        &unregister_device_xml("alice@localhost/other", SISKIN, TOKEN),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    assert!(f.app.store.get(&node).unwrap().is_none());
    let reply = ask(&f, &encrypted_publish("p1", "localhost", &node)).await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
    // Another user cannot unregister alice's device: it is not theirs to find.
    let node = register_device(&f, "alice@localhost/phone", None).await;
    let reply = ask(
        &f,
        &unregister_device_xml("mallory@localhost/x", SISKIN, TOKEN),
    )
    .await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
    assert!(f.app.store.get(&node).unwrap().is_some());
}

#[tokio::test]
async fn disco_shows_the_tigase_provider_ids_and_features_only_when_configured() {
    let info = "<iq xmlns='jabber:component:accept' type='get' id='d' from='a@localhost/x' to='push.localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>";
    let items = "<iq xmlns='jabber:component:accept' type='get' id='d' from='a@localhost/x' to='push.localhost'><query xmlns='http://jabber.org/protocol/disco#items' node='http://jabber.org/protocol/commands'/></iq>";
    let features = |reply: &Element| -> Vec<String> {
        let query = reply
            .get_child("query", "http://jabber.org/protocol/disco#info")
            .unwrap();
        query
            .children()
            .filter_map(|c| c.attr("var").map(String::from))
            .collect()
    };
    let nodes = |reply: &Element| -> Vec<String> {
        let query = reply
            .get_child("query", "http://jabber.org/protocol/disco#items")
            .unwrap();
        query
            .children()
            .filter_map(|c| c.attr("node").map(String::from))
            .collect()
    };
    let f = tigase_fixture();
    let with = features(&ask(&f, info).await);
    for feature in [
        "urn:xmpp:push:0",
        SISKIN,
        "tigase:push:encrypt:0",
        "tigase:push:encrypt:aes-128-gcm",
        "tigase:push:jingle:0",
    ] {
        assert!(with.iter().any(|f| f == feature), "{feature} in {with:?}");
    }
    assert!(nodes(&ask(&f, items).await)
        .iter()
        .any(|n| n == "register-device"));

    let plain = fixture();
    let without = features(&ask(&plain, info).await);
    assert!(
        !without.iter().any(|f| f.starts_with("tigase:")),
        "{without:?}"
    );
    assert_eq!(
        nodes(&ask(&plain, items).await),
        [
            "register-push-apns",
            "unregister-push-apns",
            "knock-token-create",
            "knock-token-list",
            "knock-token-revoke",
            "knock-token-rotate",
            "push-self-test"
        ]
    );
}

#[tokio::test]
async fn a_generic_client_gets_the_register_device_form() {
    let f = tigase_fixture();
    let reply = ask(&f, &format!("<iq xmlns='{NS}' type='set' id='x' from='a@localhost/p' to='push.localhost'><command xmlns='http://jabber.org/protocol/commands' node='register-device' action='execute'/></iq>")).await;
    assert_eq!(error_of(&reply), None);
    let command = reply
        .get_child("command", "http://jabber.org/protocol/commands")
        .unwrap();
    assert_eq!(command.attr("status"), Some("executing"));
    let form = command.get_child("x", "jabber:x:data").unwrap();
    let fields: Vec<(String, String)> = form
        .children()
        .filter(|c| c.name() == "field")
        .map(|c| {
            (
                c.attr("var").unwrap().into(),
                c.attr("type").unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        fields,
        [
            ("provider".into(), "list-single".into()),
            ("device-token".into(), "text-single".into()),
            ("device-second-token".into(), "text-single".into()),
        ]
    );
    assert_eq!(values(&reply, "provider"), [SISKIN]);
}

// --- push-self-test ---

fn self_test_xml(from: &str) -> String {
    format!("<iq xmlns='{NS}' type='set' id='st' from='{from}' to='push.localhost'><command xmlns='http://jabber.org/protocol/commands' node='push-self-test' action='execute'/></iq>")
}

/// The (type, text) of each note of a command reply.
fn notes(reply: &Element) -> Vec<(String, String)> {
    let command = reply
        .get_child("command", "http://jabber.org/protocol/commands")
        .expect("command");
    assert_eq!(command.attr("status"), Some("completed"));
    command
        .children()
        .filter(|c| c.name() == "note")
        .map(|n| (n.attr("type").unwrap_or("info").to_owned(), n.text()))
        .collect()
}

#[tokio::test]
async fn self_test_pushes_once_to_each_of_the_callers_devices_and_says_how_it_went() {
    let f = tigase_fixture();
    register(&f, "alice@localhost/phone", "phone", TOKEN).await;
    register_device(&f, "alice@localhost/tablet", None).await;
    let (bobs, _) = register(&f, "bob@localhost/phone", "phone", TOKEN2).await;
    const DEAD: &str = "dead0000dead0000dead0000dead0000dead0000dead0000dead0000dead0000";
    let (dead_node, _) = register(&f, "alice@localhost/old", "old", DEAD).await;
    f.backend.set(
        DEAD,
        PushOutcome::DeadToken {
            reason: "Unregistered".into(),
        },
    );

    let reply = ask(&f, &self_test_xml("alice@localhost/anywhere")).await;
    assert_eq!(error_of(&reply), None, "{}", String::from(&reply));
    let said = notes(&reply);
    assert_eq!(said.len(), 3, "{said:?}");
    assert_eq!(
        said.iter().filter(|(t, _)| t == "info").count(),
        2,
        "{said:?}"
    );
    let dead: Vec<_> = said.iter().filter(|(t, _)| t == "error").collect();
    assert_eq!(dead.len(), 1, "{said:?}");
    assert!(dead[0].1.contains("no longer valid"), "{said:?}");
    // Each of alice's devices got one visible push; bob's none; the dead one is gone.
    let woken = f.backend.wakeups();
    assert_eq!(woken.len(), 3);
    assert!(woken
        .iter()
        .all(|w| w.kind == WakeKind::Alert && w.node != bobs));
    assert!(
        woken
            .iter()
            .any(|w| w.account.as_deref() == Some("alice@localhost")),
        "the Tigase device is named"
    );
    assert!(f.app.store.get(&dead_node).unwrap().is_none());
    for text in said.iter().map(|(_, t)| t) {
        assert!(!text.contains(TOKEN) && !text.contains("alice"), "{text}");
    }

    // Someone with nothing registered is told so.
    let reply = ask(&f, &self_test_xml("carol@localhost/x")).await;
    assert_eq!(notes(&reply)[0].0, "warn");
}

#[tokio::test]
async fn self_tests_are_limited_per_user() {
    let f = fixture();
    register(&f, "alice@localhost/phone", "phone", TOKEN).await;
    for _ in 0..6 {
        assert_eq!(
            error_of(&ask(&f, &self_test_xml("alice@localhost/p")).await),
            None
        );
    }
    let reply = ask(&f, &self_test_xml("alice@localhost/p")).await;
    assert_eq!(error_of(&reply), err("wait", "resource-constraint"));
    assert_eq!(f.backend.woken().len(), 6);
    assert_eq!(
        error_of(&ask(&f, &self_test_xml("bob@localhost/p")).await),
        None
    );
}

// --- the Conversations family: p2's register-push-fcm ---

/// An FCM token as Google hands them out.
const FCM_TOKEN: &str = "eeDXSJjASJY:APA91bEKxhXK54-vHhY9O55JmU2R0nDJL2rRENm-W9uPY6x3jHi0i0OyvPu6js9jVPZqDeX9ZQydZCBZE19o7a0kK4_n88fCgufXjaOlvalh9VibB2zOI7dQRTaDNB3H5s4dicpWD0m4";
/// `sha1("alice@localhost\0" + "92afd7a91cdba9a0")`: what Conversations compares the push's account to.
const ALICE_PHONE: &str = "12f8203e15c0732329f525206c5d8c3b8d9410a3";

/// Apps `chat` (APNs) and `android` (FCM, over a backend of its own).
fn android_fixture() -> (Fixture, Arc<Scripted>) {
    let fcm = Arc::new(Scripted::of(ProviderKind::Fcm));
    let provider = fcm.clone();
    let f = fixture_of(
        move |backend| {
            vec![
                PushApp::new("chat", backend),
                PushApp::new("android", provider),
            ]
        },
        |b| b,
    );
    (f, fcm)
}

fn conversations_register(from: &str, token: &str, extra: &str) -> String {
    conversations_register_xml("r", from, "92afd7a91cdba9a0", token, extra)
}

#[tokio::test]
async fn register_push_fcm_answers_node_and_secret_and_pushes_name_the_account() {
    let (f, fcm) = android_fixture();
    let from = "alice@localhost/Conversations.sAdA";
    let reply = ask(&f, &conversations_register(from, FCM_TOKEN, "")).await;
    let (node, secret) = node_and_secret(&reply);
    // A new token (Google rotates them): same node and secret, the new token pushed.
    let newer = "fresh:APA91b-rotated";
    let again = node_and_secret(&ask(&f, &conversations_register(from, newer, "")).await);
    assert_eq!(again, (node.clone(), secret.clone()));
    // p2's preferred name for the device id is taken too, and names the same device.
    let by_device_id =
        conversations_register(from, newer, "").replace("var='android-id'", "var='device-id'");
    assert_eq!(node_and_secret(&ask(&f, &by_device_id).await).0, node);

    let reply = ask(&f, &prosody_publish("p", "localhost", &node, &secret)).await;
    assert_eq!(error_of(&reply), None);
    let woken = fcm.wakeups();
    assert_eq!(woken.len(), 1);
    assert_eq!(woken[0].token, hex::encode(newer));
    assert_eq!(woken[0].kind, WakeKind::Alert);
    assert_eq!(woken[0].account.as_deref(), Some(ALICE_PHONE));
    assert!(
        f.backend.wakeups().is_empty(),
        "the APNs app is not involved"
    );

    // The account is the device's, not the user's: another phone of alice's is named apart.
    let other =
        conversations_register(from, FCM_TOKEN, "").replace("92afd7a91cdba9a0", "0123456789abcdef");
    let (other_node, other_secret) = node_and_secret(&ask(&f, &other).await);
    assert_ne!(other_node, node);
    let reply = ask(
        &f,
        &prosody_publish("p2", "localhost", &other_node, &other_secret),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    assert_ne!(fcm.wakeups()[1].account.as_deref(), Some(ALICE_PHONE));
}

#[tokio::test]
async fn register_push_fcm_refuses_what_it_cannot_serve() {
    let (f, _) = android_fixture();
    let from = "alice@localhost/c";
    let too_long = "a".repeat(4097);
    let cases: Vec<(String, (&str, &str))> = vec![
        // No token, no device id.
        (
            conversations_register(from, "", ""),
            ("modify", "bad-request"),
        ),
        (
            conversations_register(from, FCM_TOKEN, "").replace("92afd7a91cdba9a0", ""),
            ("modify", "bad-request"),
        ),
        // Not a token FCM could take.
        (
            conversations_register(from, "has space", ""),
            ("modify", "bad-request"),
        ),
        (
            conversations_register(from, &too_long, ""),
            ("modify", "bad-request"),
        ),
        // A group chat is a bare JID; a channel id is p2's hash.
        (
            conversations_register(
                from,
                FCM_TOKEN,
                "<field var='muc'><value>room@conference.localhost/me</value></field>",
            ),
            ("modify", "bad-request"),
        ),
        (
            conversations_register_xml("u", from, "92afd7a91cdba9a0", FCM_TOKEN, "")
                .replace("register-push-fcm", "unregister-push-fcm")
                .replace("<field var='token'>", "<field var='channel'>"),
            ("modify", "bad-request"),
        ),
        // The APNs app does not take FCM tokens.
        (
            conversations_register(
                from,
                FCM_TOKEN,
                "<field var='app'><value>chat</value></field>",
            ),
            ("modify", "bad-request"),
        ),
    ];
    for (xml, expected) in cases {
        let reply = ask(&f, &xml).await;
        assert_eq!(
            error_of(&reply),
            err(expected.0, expected.1),
            "{xml}\n{}",
            String::from(&reply)
        );
    }
    // A token of 4096 characters, the most knock takes, is fine.
    let longest = "b".repeat(4096);
    assert_eq!(
        error_of(&ask(&f, &conversations_register(from, &longest, "")).await),
        None
    );
}

#[tokio::test]
async fn fcm_commands_are_offered_only_with_an_fcm_app() {
    let items = "<iq xmlns='jabber:component:accept' type='get' id='d' from='a@localhost/x' to='push.localhost'><query xmlns='http://jabber.org/protocol/disco#items' node='http://jabber.org/protocol/commands'/></iq>";
    let nodes = |reply: &Element| -> Vec<String> {
        reply
            .get_child("query", "http://jabber.org/protocol/disco#items")
            .unwrap()
            .children()
            .filter_map(|c| c.attr("node").map(String::from))
            .collect()
    };
    let (f, _) = android_fixture();
    assert_eq!(
        nodes(&ask(&f, items).await),
        [
            "register-push-apns",
            "unregister-push-apns",
            "register-push-fcm",
            "unregister-push-fcm",
            "knock-token-create",
            "knock-token-list",
            "knock-token-revoke",
            "knock-token-rotate",
            "push-self-test"
        ]
    );
    // Without one, as if it did not exist.
    let plain = fixture();
    let reply = ask(
        &plain,
        &conversations_register("a@localhost/c", FCM_TOKEN, ""),
    )
    .await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
}

#[tokio::test]
async fn fcm_dead_tokens_and_outages_map_like_apns() {
    let (f, fcm) = android_fixture();
    let (node, secret) = node_and_secret(
        &ask(
            &f,
            &conversations_register("alice@localhost/c", FCM_TOKEN, ""),
        )
        .await,
    );
    let token = hex::encode(FCM_TOKEN);
    for (outcome, expected) in [
        (PushOutcome::Throttled, ("wait", "resource-constraint")),
        (
            PushOutcome::Unavailable {
                reason: "503 UNAVAILABLE".into(),
            },
            ("wait", "internal-server-error"),
        ),
        (
            PushOutcome::Misconfigured {
                reason: "401 UNAUTHENTICATED".into(),
            },
            ("wait", "internal-server-error"),
        ),
        (
            PushOutcome::DeadToken {
                reason: "UNREGISTERED".into(),
            },
            ("cancel", "item-not-found"),
        ),
    ] {
        fcm.set(&token, outcome.clone());
        let reply = ask(&f, &prosody_publish("p", "localhost", &node, &secret)).await;
        assert_eq!(error_of(&reply), err(expected.0, expected.1), "{outcome:?}");
    }
    assert_eq!(
        f.app.store.get(&node).unwrap(),
        None,
        "the dead token's registration is gone"
    );
}
