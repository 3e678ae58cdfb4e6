//! The router and handlers end to end, below the socket: real stanzas in, reply stanzas out, a real sled
//! store, and a scripted push backend. One test per row of the publish table, plus registration and disco.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use knock::app::{App, Delivery, PushApp};
use knock::limits::RegistrationLimiter;
use knock::push::{PushOutcome, Token};
use knock::router;
use knock::store::{BackupError, Digest, Registration, SledStore, Store, StoreError};
use minidom::Element;

mod common;
use common::fixture::*;
use common::*;

// --- registration ---

#[tokio::test]
async fn allowed_domains_refuse_other_servers_users_and_store_nothing() {
    let f = fixture_built(|b| b.allowed_domains(vec!["localhost".into()]));
    let refused = ask(
        &f,
        &register_xml("r1", "mallory@elsewhere.example/phone", "d", TOKEN, ""),
    )
    .await;
    assert_eq!(error_of(&refused), err("cancel", "not-allowed"));
    assert_eq!(
        f.app.store.len().unwrap(),
        0,
        "nothing stored for a refused domain"
    );
    assert_eq!(f.app.stats.snapshot().registration_not_allowed, 1);
    let (node, _) = register(&f, "alice@localhost/phone", "d", TOKEN).await;
    assert!(f.app.store.get(&node).unwrap().is_some());
}

#[tokio::test]
async fn register_returns_node_and_secret_and_stores_no_jid() {
    let f = fixture();
    let (node, secret) = register(&f, "alice@localhost/phone", "dev1", TOKEN).await;
    assert_eq!(node.len(), 22);
    assert!(secret.len() >= 22);
    let reg = f.app.store.get(&node).unwrap().expect("stored");
    assert_eq!(hex::encode(reg.token.as_bytes()), TOKEN);
    assert_eq!(reg.domain, "localhost");
    let record = format!("{reg:?}");
    assert!(!record.contains("alice"), "no JID in the store: {record}");
    assert!(!record.contains(&secret), "no secret in the store");
}

#[tokio::test]
async fn re_register_keeps_node_and_secret_and_updates_token() {
    let f = fixture();
    let first = register(&f, "alice@localhost/phone", "dev1", TOKEN).await;
    let again = register(&f, "alice@localhost/tablet", "dev1", TOKEN2).await;
    assert_eq!(first, again);
    assert_eq!(
        hex::encode(f.app.store.get(&first.0).unwrap().unwrap().token.as_bytes()),
        TOKEN2
    );
    let other_device = register(&f, "alice@localhost/phone", "dev2", TOKEN).await;
    assert_ne!(first.0, other_device.0);
    let other_user = register(&f, "bob@localhost/phone", "dev1", TOKEN).await;
    assert_ne!(first.0, other_user.0);
}

#[tokio::test]
async fn two_step_register_offers_the_form_first() {
    let f = fixture();
    let reply = ask(&f, "<iq xmlns='jabber:component:accept' type='set' id='a' from='alice@localhost/x' to='push.localhost'><command xmlns='http://jabber.org/protocol/commands' node='register-push-apns' action='execute'/></iq>").await;
    let command = reply
        .get_child("command", "http://jabber.org/protocol/commands")
        .unwrap();
    assert_eq!(command.attr("status"), Some("executing"));
    let session = command.attr("sessionid").expect("sessionid").to_owned();
    let form = command.get_child("x", "jabber:x:data").unwrap();
    assert_eq!(form.attr("type"), Some("form"));
    let vars: Vec<_> = form.children().filter_map(|c| c.attr("var")).collect();
    assert_eq!(vars, ["token", "device-id", "app"]);
    let submit = format!("<iq xmlns='jabber:component:accept' type='set' id='b' from='alice@localhost/x' to='push.localhost'><command xmlns='http://jabber.org/protocol/commands' node='register-push-apns' sessionid='{session}' action='complete'><x xmlns='jabber:x:data' type='submit'><field var='token'><value>{TOKEN}</value></field><field var='device-id'><value>d</value></field><field var='app'><value>beta</value></field></x></command></iq>");
    let reply = ask(&f, &submit).await;
    let node = field(&reply, "node").expect("node");
    assert_eq!(f.app.store.get(&node).unwrap().unwrap().app, "beta");
}

#[tokio::test]
async fn every_form_field_names_its_type_and_the_form_says_what_to_enter() {
    // Some ad-hoc clients (libstrophe's) edit only the fields whose type they are told, though XEP-0004
    // makes text-single the default.
    let f = fixture();
    for command in ["register-push-apns", "unregister-push-apns"] {
        let reply = ask(&f, &format!("<iq xmlns='jabber:component:accept' type='set' id='a' from='alice@localhost/x' to='push.localhost'><command xmlns='http://jabber.org/protocol/commands' node='{command}' action='execute'/></iq>")).await;
        let form = reply
            .get_child("command", "http://jabber.org/protocol/commands")
            .and_then(|c| c.get_child("x", "jabber:x:data"))
            .expect("a form");
        let fields: Vec<_> = form.children().filter(|c| c.name() == "field").collect();
        assert!(!fields.is_empty());
        for field in fields {
            assert!(field.attr("type").is_some(), "{command}: {field:?}");
        }
        let instructions = form
            .get_child("instructions", "jabber:x:data")
            .map(|i| i.text())
            .unwrap_or_default();
        assert!(
            instructions.contains("Device id"),
            "{command}: {instructions:?}"
        );
    }
    // The result form too.
    let reply = ask(&f, &register_xml("r1", "alice@localhost/x", "d", TOKEN, "")).await;
    let form = reply
        .get_child("command", "http://jabber.org/protocol/commands")
        .and_then(|c| c.get_child("x", "jabber:x:data"))
        .expect("a result form");
    let types: Vec<_> = form
        .children()
        .filter(|c| c.name() == "field")
        .map(|c| (c.attr("var"), c.attr("type")))
        .collect();
    assert_eq!(
        types,
        [
            (Some("jid"), Some("jid-single")),
            (Some("node"), Some("text-single")),
            (Some("secret"), Some("text-private"))
        ]
    );
}

#[tokio::test]
async fn android_id_is_accepted_as_device_id() {
    let f = fixture();
    let xml = register_xml("r1", "a@localhost", "ignored", TOKEN, "")
        .replace("'device-id'", "'android-id'");
    assert_eq!(error_of(&ask(&f, &xml).await), None);
}

#[tokio::test]
async fn bad_registrations_get_bad_request() {
    let f = fixture();
    for (xml, why) in [
        (
            register_xml("r1", "a@localhost", "d", "not-hex", ""),
            "non-hex token",
        ),
        (
            register_xml("r1", "a@localhost", "d", &"ab".repeat(150), ""),
            "absurdly long token",
        ),
        (
            register_xml("r1", "a@localhost", "", TOKEN, ""),
            "empty device id",
        ),
        (
            register_xml(
                "r1",
                "a@localhost",
                "d",
                TOKEN,
                "<field var='app'><value>nope</value></field>",
            ),
            "unknown app",
        ),
        (
            register_xml(
                "r1",
                "a@localhost",
                "d",
                TOKEN,
                &"<field var='f'><value>x</value></field>".repeat(40),
            ),
            "oversized form",
        ),
        (
            register_xml("r1", "a@localhost", "d", TOKEN, "").replace(
                &format!("<field var='token'><value>{TOKEN}</value></field>"),
                "",
            ),
            "missing token",
        ),
    ] {
        let reply = ask(&f, &xml).await;
        assert_eq!(error_of(&reply), err("modify", "bad-request"), "{why}");
        let text = reply
            .get_child("error", "jabber:component:accept")
            .unwrap()
            .get_child("text", "urn:ietf:params:xml:ns:xmpp-stanzas");
        assert!(
            text.is_some_and(|t| !t.text().is_empty()),
            "{why}: human-readable text"
        );
    }
    assert_eq!(f.app.store.len().unwrap(), 0);
}

#[tokio::test]
async fn unregister_removes_and_unknown_device_is_item_not_found() {
    let f = fixture();
    let (node, _) = register(&f, "alice@localhost/phone", "dev1", TOKEN).await;
    let unregister = "<iq xmlns='jabber:component:accept' type='set' id='u' from='alice@localhost/other' to='push.localhost'><command xmlns='http://jabber.org/protocol/commands' node='unregister-push-apns' action='execute'><x xmlns='jabber:x:data' type='submit'><field var='device-id'><value>dev1</value></field></x></command></iq>";
    // Another user cannot unregister alice's device.
    let mallory = ask(&f, &unregister.replace("alice@", "mallory@")).await;
    assert_eq!(error_of(&mallory), err("cancel", "item-not-found"));
    let reply = ask(&f, unregister).await;
    assert_eq!(error_of(&reply), None);
    assert_eq!(f.app.store.get(&node).unwrap(), None);
    assert_eq!(
        error_of(&ask(&f, unregister).await),
        err("cancel", "item-not-found")
    );
}

#[tokio::test]
async fn unknown_command_is_item_not_found() {
    let f = fixture();
    let reply = ask(&f, "<iq xmlns='jabber:component:accept' type='set' id='a' from='a@localhost' to='push.localhost'><command xmlns='http://jabber.org/protocol/commands' node='register-push-fcm'/></iq>").await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
}

// --- the <enable/> shorthand ---

const NODE: &str = "clientchosennode0123456789";
const SECRET: &str = "clientchosensecret0123456789";

fn enable_xml(from: &str, node: &str, secret: &str, token: &str) -> String {
    format!("<iq xmlns='jabber:component:accept' type='set' id='e' from='{from}' to='push.localhost'><enable xmlns='urn:xmpp:push:0' jid='push.localhost' node='{node}'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>{secret}</value></field><field var='token'><value>{token}</value></field></x></enable></iq>")
}

#[tokio::test]
async fn enable_shorthand_registers_and_publish_works() {
    let f = fixture();
    assert_eq!(
        error_of(&ask(&f, &enable_xml("alice@localhost/p", NODE, SECRET, TOKEN)).await),
        None
    );
    let reply = ask(&f, &prosody_publish("p1", "localhost", NODE, SECRET)).await;
    assert_eq!(error_of(&reply), None);
    assert_eq!(f.backend.woken(), vec![(TOKEN.to_owned(), NODE.to_owned())]);
    // Re-enabling updates the token.
    assert_eq!(
        error_of(&ask(&f, &enable_xml("alice@localhost/p", NODE, SECRET, TOKEN2)).await),
        None
    );
    assert_eq!(
        hex::encode(f.app.store.get(NODE).unwrap().unwrap().token.as_bytes()),
        TOKEN2
    );
}

#[tokio::test]
async fn enable_shorthand_rules() {
    let f = fixture();
    let short = ask(&f, &enable_xml("a@localhost", "short", SECRET, TOKEN)).await;
    assert_eq!(error_of(&short), err("modify", "bad-request"));
    let weak = ask(&f, &enable_xml("a@localhost", NODE, "weak", TOKEN)).await;
    assert_eq!(error_of(&weak), err("modify", "bad-request"));
    let bad_token = ask(&f, &enable_xml("a@localhost", NODE, SECRET, "xyz")).await;
    assert_eq!(error_of(&bad_token), err("modify", "bad-request"));
    assert_eq!(
        error_of(&ask(&f, &enable_xml("a@localhost", NODE, SECRET, TOKEN)).await),
        None
    );
    let taken = ask(&f, &enable_xml("b@localhost", NODE, SECRET, TOKEN2)).await;
    assert_eq!(error_of(&taken), err("cancel", "conflict"));
    assert_eq!(
        hex::encode(f.app.store.get(NODE).unwrap().unwrap().token.as_bytes()),
        TOKEN
    );
}

#[tokio::test]
async fn disable_shorthand_only_for_the_owner() {
    let f = fixture();
    ask(&f, &enable_xml("a@localhost/x", NODE, SECRET, TOKEN)).await;
    let disable = |from: &str| {
        format!("<iq xmlns='jabber:component:accept' type='set' id='d' from='{from}' to='push.localhost'><disable xmlns='urn:xmpp:push:0' jid='push.localhost' node='{NODE}'/></iq>")
    };
    assert_eq!(
        error_of(&ask(&f, &disable("b@localhost")).await),
        err("cancel", "item-not-found")
    );
    assert!(f.app.store.get(NODE).unwrap().is_some());
    assert_eq!(error_of(&ask(&f, &disable("a@localhost/y")).await), None);
    assert!(f.app.store.get(NODE).unwrap().is_none());
}

// --- publish: one test per row of the table ---

#[tokio::test]
async fn publish_pushed_is_result_for_both_server_flavours() {
    let f = fixture();
    let (node, secret) = register(&f, "alice@localhost/p", "d", TOKEN).await;
    assert_eq!(
        error_of(&ask(&f, &prosody_publish("p1", "localhost", &node, &secret)).await),
        None
    );
    assert_eq!(
        error_of(&ask(&f, &ejabberd_publish("p1", "localhost", &node, &secret)).await),
        None
    );
    assert_eq!(f.backend.woken().len(), 2);
}

#[tokio::test]
async fn publish_coalesced_by_the_rate_limit_is_result_without_push() {
    let f = fixture_with(Duration::from_secs(60));
    let (node, secret) = register(&f, "alice@localhost/p", "d", TOKEN).await;
    for _ in 0..3 {
        assert_eq!(
            error_of(&ask(&f, &prosody_publish("p1", "localhost", &node, &secret)).await),
            None
        );
    }
    assert_eq!(f.backend.woken().len(), 1);
    assert_eq!(
        f.app
            .stats
            .coalesced
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn publish_unknown_node_is_item_not_found() {
    let f = fixture();
    let reply = ask(&f, &prosody_publish("p1", "localhost", "nosuchnode", "s")).await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
    assert!(f.backend.woken().is_empty());
}

#[tokio::test]
async fn publish_wrong_or_missing_secret_or_wrong_publisher_is_forbidden() {
    let f = fixture();
    let (node, secret) = register(&f, "alice@localhost/p", "d", TOKEN).await;
    let wrong = ask(&f, &prosody_publish("p1", "localhost", &node, "guess")).await;
    assert_eq!(error_of(&wrong), err("auth", "forbidden"));
    let missing = prosody_publish("p1", "localhost", &node, &secret).replace(
        &format!("<field var='secret'><value>{secret}</value></field>"),
        "",
    );
    assert_eq!(error_of(&ask(&f, &missing).await), err("auth", "forbidden"));
    let no_options = {
        let xml = prosody_publish("p1", "localhost", &node, &secret);
        let start = xml.find("<publish-options>").unwrap();
        let end = xml.find("</publish-options>").unwrap() + "</publish-options>".len();
        format!("{}{}", &xml[..start], &xml[end..])
    };
    assert_eq!(
        error_of(&ask(&f, &no_options).await),
        err("auth", "forbidden")
    );
    let other_domain = ask(&f, &prosody_publish("p1", "evil.example", &node, &secret)).await;
    assert_eq!(error_of(&other_domain), err("auth", "forbidden"));
    let a_user = ask(
        &f,
        &prosody_publish("p1", "mallory@localhost", &node, &secret),
    )
    .await;
    assert_eq!(
        error_of(&a_user),
        err("auth", "forbidden"),
        "a user at the domain is not its server"
    );
    assert!(f.backend.woken().is_empty());
    assert!(f.app.store.get(&node).unwrap().is_some());
}

#[tokio::test]
async fn publish_malformed_is_bad_request() {
    let f = fixture();
    let (node, secret) = register(&f, "alice@localhost/p", "d", TOKEN).await;
    let no_item = format!("<iq xmlns='jabber:component:accept' type='set' id='m' from='localhost' to='push.localhost'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'/><publish-options><x xmlns='jabber:x:data' type='submit'><field var='secret'><value>{secret}</value></field></x></publish-options></pubsub></iq>");
    assert_eq!(
        error_of(&ask(&f, &no_item).await),
        err("modify", "bad-request")
    );
    let no_node = "<iq xmlns='jabber:component:accept' type='set' id='m' from='localhost' to='push.localhost'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish><item/></publish></pubsub></iq>";
    assert_eq!(
        error_of(&ask(&f, no_node).await),
        err("modify", "bad-request")
    );
    let two_secrets = prosody_publish("p1", "localhost", &node, &secret).replace(
        "<field var='secret'>",
        "<field var='secret'><value>x</value></field><field var='secret'>",
    );
    assert_eq!(
        error_of(&ask(&f, &two_secrets).await),
        err("modify", "bad-request")
    );
    assert!(f.backend.woken().is_empty());
}

#[tokio::test]
async fn publish_dead_token_deletes_the_registration() {
    for reason in ["Unregistered", "BadDeviceToken", "DeviceTokenNotForTopic"] {
        let f = fixture();
        let (node, secret) = register(&f, "alice@localhost/p", "d", TOKEN).await;
        f.backend.set(
            TOKEN,
            PushOutcome::DeadToken {
                reason: reason.into(),
            },
        );
        let reply = ask(&f, &prosody_publish("p1", "localhost", &node, &secret)).await;
        assert_eq!(
            error_of(&reply),
            err("cancel", "item-not-found"),
            "{reason}"
        );
        assert_eq!(f.app.store.get(&node).unwrap(), None, "{reason}");
        // The next publish learns the same.
        let again = ask(&f, &prosody_publish("p1", "localhost", &node, &secret)).await;
        assert_eq!(error_of(&again), err("cancel", "item-not-found"));
        // Counted once each: the dead token, then the unknown node it left.
        let counts = f.app.stats.snapshot();
        assert_eq!((counts.dead_token, counts.unknown_node), (1, 1), "{reason}");
    }
}

#[tokio::test]
async fn publish_transient_failures_are_wait_and_keep_the_registration() {
    let cases = [
        (PushOutcome::Throttled, "resource-constraint"),
        (
            PushOutcome::Unavailable {
                reason: "503".into(),
            },
            "internal-server-error",
        ),
        (
            PushOutcome::Misconfigured {
                reason: "403 InvalidProviderToken".into(),
            },
            "internal-server-error",
        ),
    ];
    for (outcome, condition) in cases {
        let f = fixture_with(Duration::from_secs(60));
        let (node, secret) = register(&f, "alice@localhost/p", "d", TOKEN).await;
        f.backend.set(TOKEN, outcome.clone());
        let reply = ask(&f, &prosody_publish("p1", "localhost", &node, &secret)).await;
        assert_eq!(error_of(&reply), err("wait", condition), "{outcome:?}");
        assert!(f.app.store.get(&node).unwrap().is_some());
        // The failure released the rate-limit slot: once healthy, the next publish pushes at once.
        f.backend.set(TOKEN, PushOutcome::Delivered);
        assert_eq!(
            error_of(&ask(&f, &prosody_publish("p1", "localhost", &node, &secret)).await),
            None
        );
        assert_eq!(f.backend.woken().len(), 2, "{outcome:?}");
    }
}

// --- disco, ping, the rest ---

#[tokio::test]
async fn disco_info_shows_the_push_identity_and_features() {
    let f = fixture();
    let reply = ask(&f, "<iq xmlns='jabber:component:accept' type='get' id='d' from='a@localhost/x' to='push.localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
    let query = reply
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .unwrap();
    let identity = query
        .get_child("identity", "http://jabber.org/protocol/disco#info")
        .unwrap();
    assert_eq!(
        (identity.attr("category"), identity.attr("type")),
        (Some("pubsub"), Some("push"))
    );
    let features: Vec<_> = query.children().filter_map(|c| c.attr("var")).collect();
    for f in [
        "urn:xmpp:push:0",
        "http://jabber.org/protocol/commands",
        "http://jabber.org/protocol/disco#info",
        "urn:xmpp:ping",
    ] {
        assert!(features.contains(&f), "{f}");
    }
}

#[tokio::test]
async fn disco_items_lists_the_commands() {
    let f = fixture();
    let reply = ask(&f, "<iq xmlns='jabber:component:accept' type='get' id='d' from='a@localhost/x' to='push.localhost'><query xmlns='http://jabber.org/protocol/disco#items' node='http://jabber.org/protocol/commands'/></iq>").await;
    let query = reply
        .get_child("query", "http://jabber.org/protocol/disco#items")
        .unwrap();
    let nodes: Vec<_> = query.children().filter_map(|c| c.attr("node")).collect();
    assert_eq!(
        nodes,
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
    assert!(query
        .children()
        .all(|c| c.attr("jid") == Some("push.localhost")));
}

#[tokio::test]
async fn ping_is_answered_and_unknown_iqs_are_service_unavailable() {
    let f = fixture();
    let pong = ask(&f, "<iq xmlns='jabber:component:accept' type='get' id='p' from='localhost' to='push.localhost'><ping xmlns='urn:xmpp:ping'/></iq>").await;
    assert_eq!(error_of(&pong), None);
    assert_eq!(pong.attr("to"), Some("localhost"));
    assert_eq!(pong.attr("from"), Some("push.localhost"));
    assert_eq!(pong.attr("id"), Some("p"));
    let version = ask(&f, "<iq xmlns='jabber:component:accept' type='get' id='v' from='a@localhost/x' to='push.localhost'><query xmlns='jabber:iq:version'/></iq>").await;
    assert_eq!(error_of(&version), err("cancel", "service-unavailable"));
    let subscribe = ask(&f, "<iq xmlns='jabber:component:accept' type='set' id='s' from='a@localhost/x' to='push.localhost'><pubsub xmlns='http://jabber.org/protocol/pubsub'><subscribe node='n' jid='a@localhost'/></pubsub></iq>").await;
    assert_eq!(error_of(&subscribe), err("cancel", "service-unavailable"));
}

#[tokio::test]
async fn results_and_errors_are_not_answered() {
    let f = fixture();
    assert!(router::handle(&f.app, iq("<iq xmlns='jabber:component:accept' type='result' id='x' from='localhost' to='push.localhost'/>")).await.is_none());
}

#[tokio::test]
async fn a_shorthand_secret_is_kept_byte_for_byte() {
    let f = fixture();
    let spaced = format!(" {SECRET} ");
    ask(&f, &enable_xml("a@localhost/x", NODE, &spaced, TOKEN)).await;
    let reply = ask(&f, &prosody_publish("p1", "localhost", NODE, &spaced)).await;
    assert_eq!(error_of(&reply), None);
    let trimmed = ask(&f, &prosody_publish("p2", "localhost", NODE, SECRET)).await;
    assert_eq!(error_of(&trimmed), err("auth", "forbidden"));
}

#[tokio::test]
async fn commands_and_shorthand_for_one_device_id_do_not_disturb_each_other() {
    let f = fixture();
    let (node, secret) = register(&f, "alice@localhost/p", "dev1", TOKEN).await;
    let with_device = enable_xml("alice@localhost/p", NODE, SECRET, TOKEN2).replace(
        "</x></enable>",
        "<field var='device-id'><value>dev1</value></field></x></enable>",
    );
    assert_eq!(error_of(&ask(&f, &with_device).await), None);
    // Registering by command again still answers the command's own node and secret...
    assert_eq!(
        register(&f, "alice@localhost/p", "dev1", TOKEN).await,
        (node.clone(), secret.clone())
    );
    // ...and both nodes keep publishing.
    assert_eq!(
        error_of(&ask(&f, &prosody_publish("p1", "localhost", &node, &secret)).await),
        None
    );
    assert_eq!(
        error_of(&ask(&f, &prosody_publish("p2", "localhost", NODE, SECRET)).await),
        None
    );
}

#[tokio::test]
async fn the_owner_may_re_enable_a_node_under_another_device_id() {
    let f = fixture();
    assert_eq!(
        error_of(&ask(&f, &enable_xml("a@localhost/x", NODE, SECRET, TOKEN)).await),
        None
    );
    let with_device = enable_xml("a@localhost/y", NODE, SECRET, TOKEN2).replace(
        "</x></enable>",
        "<field var='device-id'><value>phone</value></field></x></enable>",
    );
    assert_eq!(error_of(&ask(&f, &with_device).await), None);
    assert_eq!(
        hex::encode(f.app.store.get(NODE).unwrap().unwrap().token.as_bytes()),
        TOKEN2
    );
}

#[tokio::test]
async fn every_command_reply_carries_a_session_id() {
    let f = fixture();
    let reply = ask(&f, &register_xml("r1", "a@localhost/p", "d", TOKEN, "")).await;
    let command = reply
        .get_child("command", "http://jabber.org/protocol/commands")
        .unwrap();
    assert!(command.attr("sessionid").is_some_and(|s| !s.is_empty()));
}

// --- the fast publish path answers exactly as the full parser would ---

/// Both paths on one stanza: the same reply (or the same silence) and the same number of pushes. Where the
/// full parser cannot even read the stanza as an IQ, the fast path must not have pushed and must answer with an
/// error or not at all.
async fn same_on_both_paths(f: &Fixture, xml: &str) {
    let pushes = f.backend.woken().len();
    let fast = router::handle_frame(&f.app, frame(xml))
        .await
        .map(Element::from);
    let fast_pushes = f.backend.woken().len() - pushes;
    // As the link would parse it: the stream's default namespace applies.
    let parsed = knock::stanza::parse_iq(&frame(xml)).ok();
    match parsed {
        Some(iq) => {
            let full = router::handle(&f.app, iq).await.map(Element::from);
            let full_pushes = f.backend.woken().len() - pushes - fast_pushes;
            assert_eq!(fast, full, "replies differ for {xml}");
            assert_eq!(fast_pushes, full_pushes, "pushes differ for {xml}");
            // And the same kind of push: both read importance alike.
            let woken = f.backend.wakeups();
            let kinds = |range: std::ops::Range<usize>| -> Vec<_> {
                woken[range].iter().map(|w| w.kind).collect()
            };
            assert_eq!(
                kinds(pushes..pushes + fast_pushes),
                kinds(pushes + fast_pushes..woken.len()),
                "wake-up kinds differ for {xml}"
            );
        }
        None => {
            assert_eq!(fast_pushes, 0, "pushed an unreadable stanza: {xml}");
            if let Some(reply) = fast {
                assert!(
                    error_of(&reply).is_some(),
                    "accepted an unreadable stanza: {xml}"
                );
            }
        }
    }
}

#[tokio::test]
async fn fast_and_full_publish_paths_agree() {
    // No hourly budget: every silent push is sent, so the two paths are compared push for push.
    let f = fixture_of(
        |backend| {
            vec![PushApp {
                delivery: Delivery::Auto {
                    background_per_hour: 0,
                },
                ..PushApp::new("chat", backend)
            }]
        },
        |b| b,
    );
    let (node, secret) = register(&f, "alice@localhost/p", "d", TOKEN).await;
    let mut cases = Vec::new();
    for publish in [prosody_publish, ejabberd_publish] {
        cases.push(publish("p1", "localhost", &node, &secret));
        cases.push(publish("p1", "localhost", &node, "guess"));
        cases.push(publish("p1", "localhost", "nosuchnode", &secret));
        cases.push(publish("p1", "other.example", &node, &secret));
        cases.push(publish("p1", "bob@localhost/r", &node, &secret));
        cases.push(publish("a&amp;b", "localhost", &node, &secret));
        let base = publish("p1", "localhost", &node, &secret);
        let edits: [(&str, &str); 12] = [
            ("type='set'", "type='get'"),
            ("<item>", "<item><a/>"),
            ("</notification>", "</notification><extra xmlns='urn:x'/>"),
            (
                "<publish-options>",
                "<publish-options><x xmlns='jabber:x:data' type='submit'/>",
            ),
            ("</pubsub>", "</pubsub><x xmlns='urn:x'/>"),
            ("<field var='secret'>", "<field var='secret' label='x'>"),
            ("<field var='secret'>", "<field var='secret' type='hidden'>"),
            (
                "<field var='secret'>",
                "<field var='secret' type='list-multi'>",
            ),
            ("type='submit' xmlns", "type='form' xmlns"),
            ("New", "N&#x65;w"),
            ("<iq ", "<iq xml:lang='en' "),
            (
                &format!("node='{node}'"),
                &format!("node='{node}' xmlns:p='urn:x'"),
            ),
        ];
        for (from, to) in edits {
            cases.push(base.replacen(from, to, 1));
        }
        // Every single-byte deletion: most break the XML, many change a name or a value.
        for at in 0..base.len() {
            if base.is_char_boundary(at) && base.is_char_boundary(at + 1) {
                let mut cut = base.clone();
                cut.remove(at);
                cases.push(cut);
            }
        }
    }
    for xml in &cases {
        same_on_both_paths(&f, xml).await;
    }
    assert!(f.app.store.get(&node).unwrap().is_some());
}

// --- store failures (issue 5) ---

/// A sled store whose writes or flushes fail on demand, as a full disk or an I/O error would.
struct Failing {
    inner: SledStore,
    fail_put: bool,
    fail_flush: bool,
}

impl Store for Failing {
    fn get(&self, node: &str) -> Result<Option<Registration>, StoreError> {
        self.inner.get(node)
    }
    fn node_for_device(&self, device: &Digest) -> Result<Option<String>, StoreError> {
        self.inner.node_for_device(device)
    }
    fn nodes_of(&self, owner: &Digest) -> Result<Vec<String>, StoreError> {
        self.inner.nodes_of(owner)
    }
    fn put(&self, registration: &Registration) -> Result<(), StoreError> {
        if self.fail_put {
            return Err(StoreError::Io(
                "No space left on device (os error 28)".into(),
            ));
        }
        self.inner.put(registration)
    }
    fn remove(&self, node: &str) -> Result<Option<Registration>, StoreError> {
        self.inner.remove(node)
    }
    fn remove_if_token(&self, node: &str, token: &Token) -> Result<bool, StoreError> {
        self.inner.remove_if_token(node, token)
    }
    fn drop_call_token(&self, node: &str, token: &Token) -> Result<bool, StoreError> {
        self.inner.drop_call_token(node, token)
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        if self.fail_flush {
            return Box::pin(async {
                Err(StoreError::Io("Input/output error (os error 5)".into()))
            });
        }
        self.inner.flush()
    }
    fn len(&self) -> Result<usize, StoreError> {
        self.inner.len()
    }
    fn instance_key(&self) -> Result<[u8; 32], StoreError> {
        self.inner.instance_key()
    }
    fn scan(&self, each: &mut dyn FnMut(Registration)) -> Result<usize, StoreError> {
        self.inner.scan(each)
    }
    fn is_sealed(&self) -> bool {
        self.inner.is_sealed()
    }
    fn export(&self, out: &mut dyn std::io::Write) -> Result<usize, BackupError> {
        self.inner.export(out)
    }
    fn remember_dead(&self, token: &Digest, until: u64) -> Result<(), StoreError> {
        if self.fail_put {
            return Err(StoreError::Io(
                "No space left on device (os error 28)".into(),
            ));
        }
        self.inner.remember_dead(token, until)
    }
    fn is_dead(&self, token: &Digest, now: u64) -> Result<bool, StoreError> {
        self.inner.is_dead(token, now)
    }
}

/// An app over a store whose writes or flushes fail, as a full or failing disk makes them.
fn failing_app(fail_put: bool, fail_flush: bool) -> (tempfile::TempDir, App) {
    let dir = tempfile::tempdir().unwrap();
    let store = Failing {
        inner: SledStore::open(dir.path()).unwrap(),
        fail_put,
        fail_flush,
    };
    let app = App::builder("push.localhost".parse().unwrap(), Arc::new(store))
        .apps(vec![PushApp::new("chat", Arc::new(Scripted::default()))])
        .publish_deadline(Duration::from_secs(2))
        .build()
        .unwrap();
    (dir, app)
}

#[tokio::test]
async fn a_store_that_cannot_write_or_flush_never_acknowledges_a_registration() {
    for (fail_put, fail_flush) in [(true, false), (false, true)] {
        let (_dir, app) = failing_app(fail_put, fail_flush);
        let xml = register_xml("r1", "alice@localhost/phone", "d", TOKEN, "");
        let reply = Element::from(
            router::handle_frame(&app, frame(&xml))
                .await
                .expect("answered"),
        );
        assert_eq!(
            error_of(&reply),
            err("wait", "internal-server-error"),
            "put fails: {fail_put}, flush fails: {fail_flush}"
        );
        assert!(field(&reply, "node").is_none(), "no node handed out");
        let counts = app.stats.snapshot();
        assert_eq!((counts.registration_failed, counts.registered), (1, 0));
    }
}

// --- registration flood caps (issue 5) ---

fn registered(f: &Fixture) -> u64 {
    f.app
        .stats
        .registered
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn capped(f: &Fixture) -> u64 {
    f.app
        .stats
        .registration_capped
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// The `<text/>` of an error reply.
fn error_text(reply: &Element) -> String {
    reply
        .get_child("error", NS)
        .and_then(|e| e.get_child("text", "urn:ietf:params:xml:ns:xmpp-stanzas"))
        .map(|t| t.text())
        .unwrap_or_default()
}

/// A reply that must be the flood cap's: wait/resource-constraint, no node handed out, no JID in the text.
fn assert_capped(reply: &Element, why: &str) {
    assert_eq!(
        error_of(reply),
        err("wait", "resource-constraint"),
        "{why}: {}",
        String::from(reply)
    );
    assert!(field(reply, "node").is_none(), "{why}: no node handed out");
    let text = error_text(reply);
    assert!(text.contains("try again"), "{why}: says to wait: {text}");
    for part in ["alice", "bob", "carol", "localhost", "@"] {
        assert!(!text.contains(part), "{why}: no JID in {text:?}");
    }
}

#[tokio::test]
async fn registrations_over_the_user_cap_get_wait_and_are_not_stored_until_the_domain_cap() {
    let f = fixture_built(|b| b.registration_limit(RegistrationLimiter::new(2, 3)));
    register(&f, "alice@localhost/phone", "dev1", TOKEN).await;
    register(&f, "alice@localhost/tablet", "dev2", TOKEN).await;
    let third = ask(
        &f,
        &register_xml("r3", "alice@localhost/phone", "dev3", TOKEN, ""),
    )
    .await;
    assert_capped(&third, "alice's third");
    assert_eq!(
        f.app.store.len().unwrap(),
        2,
        "the refused one is not stored"
    );
    assert!(
        error_text(&third).contains("account;"),
        "{}",
        error_text(&third)
    );
    // Another user of the same domain still registers: the domain has one left...
    register(&f, "bob@localhost/phone", "dev1", TOKEN2).await;
    // ...and then none, whoever asks.
    let carol = ask(
        &f,
        &register_xml("r4", "carol@localhost/phone", "dev1", TOKEN, ""),
    )
    .await;
    assert_capped(&carol, "carol over the domain's cap");
    assert!(
        error_text(&carol).contains("server"),
        "{}",
        error_text(&carol)
    );
    assert_eq!(f.app.store.len().unwrap(), 3);
    // Other domains have their own bucket.
    register(&f, "dave@elsewhere.example/phone", "dev1", TOKEN).await;
    assert_eq!((registered(&f), capped(&f)), (4, 2));
    assert!(f.app.stats.summary().contains("registration_capped=2"));
}

#[tokio::test]
async fn an_unchanged_re_registration_is_answered_without_a_write_or_a_token() {
    let f = fixture_built(|b| b.registration_limit(RegistrationLimiter::new(1, 0)));
    let first = register(&f, "alice@localhost/phone", "dev1", TOKEN).await;
    // Apps re-register on every start: the same device, token and app, from any resource.
    for resource in ["phone", "phone", "tablet"] {
        let again = register(&f, &format!("alice@localhost/{resource}"), "dev1", TOKEN).await;
        assert_eq!(again, first, "the same node and secret");
    }
    assert_eq!(
        (registered(&f), capped(&f)),
        (1, 0),
        "one write, nothing counted"
    );
    // A real change (a new token) needs a token from the bucket, and alice has used hers.
    let changed = ask(
        &f,
        &register_xml("r2", "alice@localhost/phone", "dev1", TOKEN2, ""),
    )
    .await;
    assert_capped(&changed, "a new token over the cap");
    assert_eq!(
        hex::encode(f.app.store.get(&first.0).unwrap().unwrap().token.as_bytes()),
        TOKEN
    );
    // The shorthand's unchanged re-send is free in the same way.
    let f = fixture_built(|b| b.registration_limit(RegistrationLimiter::new(1, 0)));
    for _ in 0..3 {
        let reply = ask(&f, &enable_xml("alice@localhost/p", NODE, SECRET, TOKEN)).await;
        assert_eq!(error_of(&reply), None);
    }
    assert_eq!((registered(&f), capped(&f)), (1, 0));
}

#[tokio::test]
async fn the_shorthand_is_capped_and_shares_the_users_bucket_with_the_commands() {
    let f = fixture_built(|b| b.registration_limit(RegistrationLimiter::new(2, 0)));
    let enabled = ask(&f, &enable_xml("alice@localhost/p", NODE, SECRET, TOKEN)).await;
    assert_eq!(error_of(&enabled), None);
    register(&f, "alice@localhost/p", "dev1", TOKEN).await;
    let other_node = format!("{NODE}-2");
    let over = ask(
        &f,
        &enable_xml("alice@localhost/p", &other_node, SECRET, TOKEN),
    )
    .await;
    assert_capped(&over, "a third registration by shorthand");
    assert!(f.app.store.get(&other_node).unwrap().is_none());
    let over = ask(
        &f,
        &register_xml("r3", "alice@localhost/phone", "dev2", TOKEN, ""),
    )
    .await;
    assert_capped(&over, "a third registration by command");
    assert_eq!(f.app.store.len().unwrap(), 2);
    assert_eq!(capped(&f), 2);
}

#[tokio::test]
async fn unregistering_is_never_capped() {
    let f = fixture_built(|b| b.registration_limit(RegistrationLimiter::new(1, 1)));
    register(&f, "alice@localhost/phone", "dev1", TOKEN).await;
    let over = ask(&f, &enable_xml("alice@localhost/p", NODE, SECRET, TOKEN)).await;
    assert_capped(&over, "over the cap");
    let reply = ask(&f, &unregister_xml("u1", "alice@localhost/phone", "dev1")).await;
    assert_eq!(error_of(&reply), None, "unregistering over the cap");
    assert_eq!(f.app.store.len().unwrap(), 0);
}

#[tokio::test]
async fn an_unchanged_re_registration_is_not_acknowledged_before_it_is_durable() {
    // Writes land, flushes fail: the first answer is an error, and its record sits in the store unflushed.
    let (_dir, app) = failing_app(false, true);
    let xml = register_xml("r1", "alice@localhost/phone", "d", TOKEN, "");
    for attempt in ["first", "the same again"] {
        let reply = Element::from(
            router::handle_frame(&app, frame(&xml))
                .await
                .expect("answered"),
        );
        assert_eq!(
            error_of(&reply),
            err("wait", "internal-server-error"),
            "{attempt}"
        );
        assert!(
            field(&reply, "node").is_none(),
            "{attempt}: no node handed out"
        );
    }
}
