//! Knock tokens (issue 21, `xep/knock-registration.md` §19): the owner's four commands and the knock IQ,
//! through the router as the link hands them over, into a real sled store and a scripted push backend;
//! then the real binary against the mock APNs and FCM, for what reaches the push services, the log and
//! the disk.

use std::time::{SystemTime, UNIX_EPOCH};

use knock::app::{Delivery, PushApp};
use knock::push::{ProviderKind, PushOutcome, WakeKind};
use knock::store::KnockToken;
use minidom::Element;

mod common;
use common::fixture::*;
use common::*;

const COMMANDS: &str = "http://jabber.org/protocol/commands";
const DATA: &str = "jabber:x:data";
const ALICE: &str = "alice@localhost/phone";
const BOB: &str = "bob@example.net/laptop";

/// A one-step knock-token command from `from` with these (var, value) fields; no form at all for `None`.
fn command_xml(from: &str, node: &str, fields: Option<&[(&str, &str)]>) -> String {
    let form = fields
        .map(|fields| {
            let fields: String = fields
                .iter()
                .map(|(var, value)| format!("<field var='{var}'><value>{value}</value></field>"))
                .collect();
            format!("<x xmlns='{DATA}' type='submit'>{fields}</x>")
        })
        .unwrap_or_default();
    format!(
        "<iq xmlns='{NS}' type='set' id='c1' from='{from}' to='push.localhost'>\
         <command xmlns='{COMMANDS}' node='{node}' action='execute'>{form}</command></iq>"
    )
}

/// A knock as any client sends it.
fn knock_xml(from: &str, token: &str) -> String {
    format!(
        "<iq xmlns='{NS}' type='set' id='k1' from='{from}' to='push.localhost'>\
         <knock xmlns='knock:token:0' token='{token}'/></iq>"
    )
}

/// A created (or rotated) token: the token and its id, as the reply hands them out.
struct Made {
    token: String,
    id: String,
}

async fn create(f: &Fixture, fields: &[(&str, &str)]) -> Made {
    let reply = ask(f, &command_xml(ALICE, "knock-token-create", Some(fields))).await;
    made(&reply)
}

fn made(reply: &Element) -> Made {
    assert_eq!(error_of(reply), None, "{}", String::from(reply));
    let command = reply.get_child("command", COMMANDS).expect("command");
    assert_eq!(command.attr("status"), Some("completed"));
    let token = field(reply, "token").expect("token");
    let id = field(reply, "id").expect("id");
    assert_eq!(token.len(), 43, "256 bits, URL-safe base64");
    assert!(token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert_eq!(id.len(), 16);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    Made { token, id }
}

async fn knock_as(f: &Fixture, from: &str, token: &str) -> Option<(String, String)> {
    error_of(&ask(f, &knock_xml(from, token)).await)
}

/// The rows of `knock-token-list` as (var -> value) maps.
async fn list(f: &Fixture, from: &str) -> Vec<std::collections::HashMap<String, String>> {
    let reply = ask(f, &command_xml(from, "knock-token-list", None)).await;
    assert_eq!(error_of(&reply), None, "{}", String::from(&reply));
    let command = reply.get_child("command", COMMANDS).expect("command");
    assert_eq!(command.attr("status"), Some("completed"));
    let report = command.get_child("x", DATA).expect("a result table");
    assert_eq!(report.attr("type"), Some("result"));
    let reported = report.get_child("reported", DATA).expect("reported");
    assert!(
        reported.children().all(|c| c.attr("type").is_some()),
        "every column names its type"
    );
    let columns: Vec<_> = reported
        .children()
        .filter_map(|c| c.attr("var"))
        .map(String::from)
        .collect();
    assert_eq!(
        columns,
        [
            "id",
            "node",
            "expires",
            "per-hour",
            "uses",
            "replaced-until"
        ]
    );
    report
        .children()
        .filter(|c| c.is("item", DATA))
        .map(|item| {
            item.children()
                .map(|f| {
                    let value = f.get_child("value", DATA).map(|v| v.text());
                    (
                        f.attr("var").unwrap_or_default().to_owned(),
                        value.unwrap_or_default(),
                    )
                })
                .collect()
        })
        .collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[tokio::test]
async fn a_knock_wakes_the_owner_with_the_token_id_and_nothing_of_the_knocker() {
    let f = fixture();
    let (node, _) = register(&f, ALICE, "d", TOKEN).await;
    let reply = ask(
        &f,
        &command_xml(ALICE, "knock-token-create", Some(&[("per-hour", "5")])),
    )
    .await;
    let token = made(&reply);
    assert_eq!(field(&reply, "node").as_deref(), Some(node.as_str()));
    assert_eq!(field(&reply, "per-hour").as_deref(), Some("5"));
    let expires = field(&reply, "expires").expect("expires");
    assert!(expires.ends_with('Z') && expires.len() == 20, "{expires}");

    assert_eq!(knock_as(&f, BOB, &token.token).await, None);
    let woken = f.backend.wakeups();
    assert_eq!(woken.len(), 1);
    assert_eq!(woken[0].token, TOKEN);
    assert_eq!(woken[0].node, node);
    assert_eq!(woken[0].knock.as_deref(), Some(token.id.as_str()));
    // A knock is a contact trying to reach the owner: it shows under `auto` delivery.
    assert_eq!(woken[0].kind, WakeKind::Alert);
    assert_eq!(woken[0].account, None);

    // The owner sees the use counted; nobody else sees the token.
    let rows = list(&f, "alice@localhost/tablet").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["id"], token.id);
    assert_eq!(rows[0]["uses"], "1");
    assert_eq!(rows[0]["per-hour"], "5");
    assert_eq!(rows[0]["replaced-until"], "");
    assert!(list(&f, BOB).await.is_empty());
    let counted = f.app.stats.snapshot().knocks;
    assert_eq!((counted.pushed, counted.created), (1, 1));
    // Knocks are not publishes.
    assert_eq!(f.app.stats.snapshot().pushed, 0);
}

#[tokio::test]
async fn unknown_revoked_and_expired_tokens_get_the_same_answer() {
    let f = fixture();
    register(&f, ALICE, "d", TOKEN).await;
    let not_found = err("cancel", "item-not-found");
    let text_of = |reply: &Element| {
        reply
            .get_child("error", NS)
            .and_then(|e| e.get_child("text", "urn:ietf:params:xml:ns:xmpp-stanzas"))
            .map(|t| t.text())
    };

    // Never issued, and malformed in every way a token can be.
    let unknown = ask(&f, &knock_xml(BOB, &"A".repeat(43))).await;
    assert_eq!(error_of(&unknown), not_found);
    for bad in ["", "short", &"A".repeat(44), &"+".repeat(43)] {
        assert_eq!(knock_as(&f, BOB, bad).await, not_found, "{bad:?}");
    }

    // Revoked.
    let revoked = create(&f, &[]).await;
    let reply = ask(
        &f,
        &command_xml(ALICE, "knock-token-revoke", Some(&[("id", &revoked.id)])),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    let after_revoke = ask(&f, &knock_xml(BOB, &revoked.token)).await;
    assert_eq!(error_of(&after_revoke), not_found);

    // Expired: written as the store would hold it a day later.
    let expired = create(&f, &[]).await;
    let secret = base64_decode(&expired.token);
    let hash = f.app.keys.knock_token(&secret);
    let record = f.app.store.knock_token(&hash).unwrap().expect("stored");
    f.app
        .store
        .put_knock_token(
            &hash,
            &KnockToken {
                expires: now() - 1,
                ..record
            },
        )
        .unwrap();
    let after_expiry = ask(&f, &knock_xml(BOB, &expired.token)).await;
    assert_eq!(error_of(&after_expiry), not_found);
    // Forgotten on the spot.
    assert_eq!(f.app.store.knock_token(&hash).unwrap(), None);

    // One text for all of them: a knocker learns nothing of which.
    for reply in [&after_revoke, &after_expiry] {
        assert_eq!(text_of(reply), text_of(&unknown));
    }
    assert!(f.backend.wakeups().is_empty());
    assert_eq!(f.app.stats.snapshot().knocks.unknown, 7);
}

#[tokio::test]
async fn a_knock_without_a_token_is_a_bad_request() {
    let f = fixture();
    let xml = format!(
        "<iq xmlns='{NS}' type='set' id='k1' from='{BOB}' to='push.localhost'>\
         <knock xmlns='knock:token:0'/></iq>"
    );
    assert_eq!(error_of(&ask(&f, &xml).await), err("modify", "bad-request"));
    // A get is not a knock.
    let get = knock_xml(BOB, &"A".repeat(43)).replace("type='set'", "type='get'");
    assert_eq!(
        error_of(&ask(&f, &get).await),
        err("cancel", "service-unavailable")
    );
}

#[tokio::test]
async fn each_token_gets_its_hourly_knocks_then_wait() {
    let f = fixture();
    register(&f, ALICE, "d", TOKEN).await;
    let two = create(&f, &[("per-hour", "2")]).await;
    let other = create(&f, &[("per-hour", "1")]).await;
    assert_eq!(knock_as(&f, BOB, &two.token).await, None);
    assert_eq!(knock_as(&f, BOB, &two.token).await, None);
    assert_eq!(
        knock_as(&f, BOB, &two.token).await,
        err("wait", "resource-constraint")
    );
    // The rate is the token's own.
    assert_eq!(knock_as(&f, BOB, &other.token).await, None);
    assert_eq!(f.backend.wakeups().len(), 3);
    assert_eq!(f.app.stats.snapshot().knocks.limited, 1);
}

#[tokio::test]
async fn create_checks_its_fields() {
    let f = fixture();
    // No registration to bind to.
    let reply = ask(&f, &command_xml(ALICE, "knock-token-create", Some(&[]))).await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));

    let (first, _) = register(&f, ALICE, "d1", TOKEN).await;
    let (second, _) = register(&f, ALICE, "d2", TOKEN2).await;
    let (bobs, _) = register(&f, "bob@localhost/x", "d", TOKEN).await;
    // Several registrations: the node must be named, and be the caller's.
    let reply = ask(&f, &command_xml(ALICE, "knock-token-create", Some(&[]))).await;
    assert_eq!(error_of(&reply), err("modify", "bad-request"));
    let reply = ask(
        &f,
        &command_xml(ALICE, "knock-token-create", Some(&[("node", &bobs)])),
    )
    .await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
    for fields in [
        &[("node", first.as_str()), ("per-hour", "0")][..],
        &[("node", &first), ("per-hour", "61")],
        &[("node", &first), ("per-hour", "x")],
        &[("node", &first), ("expiry-days", "0")],
        &[("node", &first), ("expiry-days", "366")],
        &[("node", &first), ("expiry-seconds", "9")],
        &[
            ("node", &first),
            ("expiry-days", "1"),
            ("expiry-seconds", "60"),
        ],
    ] {
        let reply = ask(&f, &command_xml(ALICE, "knock-token-create", Some(fields))).await;
        assert_eq!(error_of(&reply), err("modify", "bad-request"), "{fields:?}");
    }
    // A short-lived token for a contact of an afternoon.
    let reply = ask(
        &f,
        &command_xml(
            ALICE,
            "knock-token-create",
            Some(&[("node", &second), ("expiry-seconds", "3600")]),
        ),
    )
    .await;
    let token = made(&reply);
    let record = f
        .app
        .store
        .knock_token(&f.app.keys.knock_token(&base64_decode(&token.token)))
        .unwrap()
        .expect("stored");
    assert!((3595..=3600).contains(&(record.expires - now())));
    assert_eq!(record.node, second);
    assert_eq!(record.per_hour, 6, "the default rate");
    assert_eq!(knock_as(&f, BOB, &token.token).await, None);
    assert_eq!(f.backend.wakeups()[0].token, TOKEN2);
    // Nothing but the one token was stored.
    assert_eq!(
        f.app
            .store
            .knock_tokens_of(&f.app.keys.owner("alice@localhost"))
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn executed_without_a_form_each_command_asks_for_one() {
    let f = fixture();
    let (node, _) = register(&f, ALICE, "d", TOKEN).await;
    let token = create(&f, &[]).await;
    for (command, vars) in [
        (
            "knock-token-create",
            &["node", "expiry-days", "per-hour"][..],
        ),
        ("knock-token-revoke", &["id", "all"]),
        ("knock-token-rotate", &["id", "grace-hours", "expiry-days"]),
    ] {
        let reply = ask(&f, &command_xml(ALICE, command, None)).await;
        assert_eq!(error_of(&reply), None);
        let cmd = reply.get_child("command", COMMANDS).expect("command");
        assert_eq!(cmd.attr("status"), Some("executing"), "{command}");
        let form = cmd.get_child("x", DATA).expect("form");
        assert_eq!(form.attr("type"), Some("form"));
        let offered: Vec<_> = form
            .children()
            .filter_map(|c| c.attr("var"))
            .collect::<Vec<_>>();
        assert_eq!(offered, vars, "{command}");
        // The choices are the caller's own registrations and tokens.
        let choice = form
            .children()
            .find(|c| c.attr("type") == Some("list-single"))
            .expect("a choice");
        let options: Vec<String> = choice
            .children()
            .filter(|c| c.name() == "option")
            .filter_map(|o| o.get_child("value", DATA).map(|v| v.text()))
            .collect();
        let expected = if command == "knock-token-create" {
            &node
        } else {
            &token.id
        };
        assert_eq!(options, [expected.as_str()], "{command}");
    }
}

#[tokio::test]
async fn revoke_takes_one_token_or_all_and_only_the_callers() {
    let f = fixture();
    register(&f, ALICE, "d", TOKEN).await;
    register(&f, "bob@localhost/x", "d", TOKEN2).await;
    let a = create(&f, &[]).await;
    let b = create(&f, &[]).await;
    let c = create(&f, &[]).await;
    let bobs = made(
        &ask(
            &f,
            &command_xml("bob@localhost/x", "knock-token-create", Some(&[])),
        )
        .await,
    );
    // Bob cannot revoke Alice's token, even knowing its id.
    let reply = ask(
        &f,
        &command_xml(
            "bob@localhost/x",
            "knock-token-revoke",
            Some(&[("id", &a.id)]),
        ),
    )
    .await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
    for bad in ["", "xyz", "0011223344556677889900"] {
        let reply = ask(
            &f,
            &command_xml(ALICE, "knock-token-revoke", Some(&[("id", bad)])),
        )
        .await;
        assert_eq!(error_of(&reply), err("modify", "bad-request"), "{bad:?}");
    }
    // One.
    let reply = ask(
        &f,
        &command_xml(ALICE, "knock-token-revoke", Some(&[("id", &a.id)])),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    assert_eq!(
        knock_as(&f, BOB, &a.token).await,
        err("cancel", "item-not-found")
    );
    assert_eq!(knock_as(&f, BOB, &b.token).await, None);
    assert_eq!(list(&f, ALICE).await.len(), 2);
    // All of Alice's; Bob's stays.
    let reply = ask(
        &f,
        &command_xml(ALICE, "knock-token-revoke", Some(&[("all", "true")])),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    let note = reply
        .get_child("command", COMMANDS)
        .and_then(|c| c.get_child("note", COMMANDS))
        .map(|n| n.text());
    assert_eq!(note.as_deref(), Some("Revoked 2 knock token(s)."));
    for gone in [&b, &c] {
        assert_eq!(
            knock_as(&f, BOB, &gone.token).await,
            err("cancel", "item-not-found")
        );
    }
    assert!(list(&f, ALICE).await.is_empty());
    assert_eq!(knock_as(&f, ALICE, &bobs.token).await, None);
    assert_eq!(f.app.stats.snapshot().knocks.revoked, 3);
}

#[tokio::test]
async fn rotation_hands_out_a_new_token_and_id_and_keeps_the_old_one_for_the_grace_period() {
    let f = fixture();
    register(&f, ALICE, "d", TOKEN).await;
    let old = create(&f, &[("per-hour", "7")]).await;

    // With a grace period (the default): both work, each with its own id.
    let reply = ask(
        &f,
        &command_xml(ALICE, "knock-token-rotate", Some(&[("id", &old.id)])),
    )
    .await;
    let new = made(&reply);
    assert_ne!(new.id, old.id);
    assert_eq!(field(&reply, "replaces").as_deref(), Some(old.id.as_str()));
    assert_eq!(field(&reply, "per-hour").as_deref(), Some("7"), "kept");
    let until = field(&reply, "replaced-until").expect("replaced-until");
    assert_eq!(knock_as(&f, BOB, &old.token).await, None);
    assert_eq!(knock_as(&f, BOB, &new.token).await, None);
    let ids: Vec<_> = f.backend.wakeups().into_iter().map(|w| w.knock).collect();
    assert_eq!(ids, [Some(old.id.clone()), Some(new.id.clone())]);
    let rows = list(&f, ALICE).await;
    let old_row = rows.iter().find(|r| r["id"] == old.id).expect("old listed");
    assert_eq!(old_row["replaced-until"], until);
    // A rotated token is not rotated again: its successor is.
    let reply = ask(
        &f,
        &command_xml(ALICE, "knock-token-rotate", Some(&[("id", &old.id)])),
    )
    .await;
    assert_eq!(error_of(&reply), err("modify", "bad-request"));

    // Without one: the old token dies at once.
    let reply = ask(
        &f,
        &command_xml(
            ALICE,
            "knock-token-rotate",
            Some(&[("id", &new.id), ("grace-hours", "0")]),
        ),
    )
    .await;
    let newest = made(&reply);
    assert_eq!(
        knock_as(&f, BOB, &new.token).await,
        err("cancel", "item-not-found")
    );
    assert_eq!(knock_as(&f, BOB, &newest.token).await, None);
    // The grace period ends: the old one is gone.
    let hash = f.app.keys.knock_token(&base64_decode(&old.token));
    let record = f.app.store.knock_token(&hash).unwrap().expect("in grace");
    f.app
        .store
        .put_knock_token(
            &hash,
            &KnockToken {
                grace_until: Some(now() - 1),
                ..record
            },
        )
        .unwrap();
    assert_eq!(
        knock_as(&f, BOB, &old.token).await,
        err("cancel", "item-not-found")
    );
    let reply = ask(
        &f,
        &command_xml(
            ALICE,
            "knock-token-rotate",
            Some(&[("id", "0011223344556677")]),
        ),
    )
    .await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
}

#[tokio::test]
async fn tokens_go_with_their_registration() {
    let f = fixture();
    register(&f, ALICE, "d", TOKEN).await;
    let unregistered = create(&f, &[]).await;
    let reply = ask(&f, &unregister_xml("u1", ALICE, "d")).await;
    assert_eq!(error_of(&reply), None);
    assert_eq!(
        knock_as(&f, BOB, &unregistered.token).await,
        err("cancel", "item-not-found")
    );
    assert!(list(&f, ALICE).await.is_empty());

    // The push service says the device is gone: the registration and its tokens go, and the knocker is
    // told what a stranger would be.
    register(&f, ALICE, "d", TOKEN2).await;
    let dead = create(&f, &[]).await;
    f.backend.set(
        TOKEN2,
        PushOutcome::DeadToken {
            reason: "Unregistered".into(),
        },
    );
    assert_eq!(
        knock_as(&f, BOB, &dead.token).await,
        err("cancel", "item-not-found")
    );
    assert!(list(&f, ALICE).await.is_empty());
    let hash = f.app.keys.knock_token(&base64_decode(&dead.token));
    assert_eq!(f.app.store.knock_token(&hash).unwrap(), None);
}

#[tokio::test]
async fn a_push_service_outage_is_wait_and_costs_no_use() {
    let f = fixture();
    register(&f, ALICE, "d", TOKEN).await;
    let token = create(&f, &[]).await;
    f.backend.set(
        TOKEN,
        PushOutcome::Unavailable {
            reason: "503".into(),
        },
    );
    assert_eq!(
        knock_as(&f, BOB, &token.token).await,
        err("wait", "internal-server-error")
    );
    assert_eq!(list(&f, ALICE).await[0]["uses"], "0");
    assert_eq!(f.app.stats.snapshot().knocks.failed, 1);
    // The token and its registration stay.
    f.backend.set(TOKEN, PushOutcome::Delivered);
    assert_eq!(knock_as(&f, BOB, &token.token).await, None);
}

#[tokio::test]
async fn a_user_holds_at_most_the_configured_number_of_tokens() {
    let f = fixture_built(|b| b.knock_tokens_per_user(2));
    register(&f, ALICE, "d", TOKEN).await;
    let first = create(&f, &[]).await;
    create(&f, &[]).await;
    let reply = ask(&f, &command_xml(ALICE, "knock-token-create", Some(&[]))).await;
    assert_eq!(error_of(&reply), err("modify", "policy-violation"));
    // Rotating with a grace period needs room for the successor too.
    let reply = ask(
        &f,
        &command_xml(ALICE, "knock-token-rotate", Some(&[("id", &first.id)])),
    )
    .await;
    assert_eq!(error_of(&reply), err("modify", "policy-violation"));
    assert_eq!(knock_as(&f, BOB, &first.token).await, None, "unchanged");
    // Without a grace period the old token makes room for its successor.
    let reply = ask(
        &f,
        &command_xml(
            ALICE,
            "knock-token-rotate",
            Some(&[("id", &first.id), ("grace-hours", "0")]),
        ),
    )
    .await;
    let successor = made(&reply);
    assert_eq!(knock_as(&f, BOB, &successor.token).await, None);
    assert_eq!(list(&f, ALICE).await.len(), 2);
}

#[tokio::test]
async fn token_creation_has_an_hourly_cap_of_its_own() {
    use knock::limits::RegistrationLimiter;
    // Registrations' cap does not hold tokens back: a client hands one to each contact at once.
    let f = fixture_built(|b| {
        b.registration_limit(RegistrationLimiter::new(1, 0))
            .knock_token_limit(RegistrationLimiter::new(3, 0))
    });
    register(&f, ALICE, "d", TOKEN).await;
    let first = create(&f, &[]).await;
    create(&f, &[]).await;
    // Revoking does not buy more creations.
    let reply = ask(
        &f,
        &command_xml(ALICE, "knock-token-revoke", Some(&[("all", "1")])),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    create(&f, &[]).await;
    let reply = ask(&f, &command_xml(ALICE, "knock-token-create", Some(&[]))).await;
    assert_eq!(error_of(&reply), err("wait", "resource-constraint"));
    assert!(String::from(&reply).contains("too many new knock tokens from this account"));
    assert_eq!(f.app.stats.snapshot().knocks.capped, 1);
    assert_eq!(
        knock_as(&f, BOB, &first.token).await,
        err("cancel", "item-not-found")
    );
}

/// knock's disco#info, as Bob's client asks for it.
async fn disco_info(f: &Fixture) -> String {
    let xml = format!(
        "<iq xmlns='{NS}' type='get' id='d1' from='{BOB}' to='push.localhost'>\
         <query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
    );
    String::from(&ask(f, &xml).await)
}

#[tokio::test]
async fn switched_off_nothing_is_offered_or_answered() {
    let f = fixture_built(|b| b.knock_tokens_per_user(0));
    register(&f, ALICE, "d", TOKEN).await;
    let reply = ask(&f, &command_xml(ALICE, "knock-token-create", Some(&[]))).await;
    assert_eq!(error_of(&reply), err("cancel", "item-not-found"));
    assert_eq!(
        knock_as(&f, BOB, &"A".repeat(43)).await,
        err("cancel", "service-unavailable")
    );
    assert!(!disco_info(&f).await.contains("knock:token:0"));

    let on = fixture();
    assert!(disco_info(&on).await.contains("knock:token:0"));
    let items = String::from(
        &ask(
            &on,
            &format!(
                "<iq xmlns='{NS}' type='get' id='d2' from='{BOB}' to='push.localhost'>\
                 <query xmlns='http://jabber.org/protocol/disco#items' node='{COMMANDS}'/></iq>"
            ),
        )
        .await,
    );
    for node in [
        "knock-token-create",
        "knock-token-list",
        "knock-token-revoke",
        "knock-token-rotate",
    ] {
        assert!(items.contains(node), "{node} listed");
    }
}

#[tokio::test]
async fn delivery_follows_the_app_like_an_important_publish() {
    // A fixed push type is the app's choice for knocks too; FCM apps name their account as for publishes.
    let f = fixture_of(
        |backend| {
            let mut silent = PushApp::new("chat", backend);
            silent.delivery = Delivery::Fixed(WakeKind::Background);
            vec![silent]
        },
        |b| b,
    );
    register(&f, ALICE, "d", TOKEN).await;
    let token = create(&f, &[]).await;
    assert_eq!(knock_as(&f, BOB, &token.token).await, None);
    assert_eq!(f.backend.wakeups()[0].kind, WakeKind::Background);

    let f = fixture_of(
        |_| {
            vec![PushApp::new(
                "android",
                std::sync::Arc::new(Scripted::of(ProviderKind::Fcm)),
            )]
        },
        |b| b,
    );
    let reply = ask(
        &f,
        &conversations_register_xml("r", ALICE, "92afd7a91cdba9a0", "fcm-token-1", ""),
    )
    .await;
    assert_eq!(error_of(&reply), None);
    let token = create(&f, &[]).await;
    assert_eq!(knock_as(&f, BOB, &token.token).await, None);
}

fn base64_decode(token: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .expect("a token is URL-safe base64")
}

// --- the real binary: what reaches the push services, the log and the disk ---

mod binary {
    use super::*;
    use common::harness::{ask as send, register as register_alice, Harness, Options};

    /// Every byte knock wrote: its log and its store's files.
    fn everything_on_disk(dir: &std::path::Path) -> Vec<u8> {
        let mut all = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(path) = stack.pop() {
            for entry in std::fs::read_dir(&path).expect("read dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    all.extend(std::fs::read(&path).unwrap_or_default());
                }
            }
        }
        all
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn what_apple_google_the_log_and_the_disk_see_of_a_knock() {
        let mut h = Harness::start_with(Options {
            fcm: Some(""),
            ..Options::default()
        })
        .await;
        let mut conn = h.accept().await;
        // Alice: an iPhone (p2's APNs command) and an Android phone (Conversations' command).
        let (ios_node, _) = register_alice(&mut conn, "phone", TOKEN).await;
        let reply = send(
            &mut conn,
            &conversations_register_xml(
                "r2",
                "alice@localhost/android",
                "92afd7a91cdba9a0",
                "fcm-token-of-alice",
                "",
            ),
        )
        .await;
        let (android_node, _) = node_and_secret(&reply);
        let mut made_tokens = Vec::new();
        for node in [&ios_node, &android_node] {
            let reply = send(
                &mut conn,
                &command_xml(ALICE, "knock-token-create", Some(&[("node", node)])),
            )
            .await;
            made_tokens.push(made(&reply));
        }
        // Bob knocks both.
        for token in &made_tokens {
            let reply = send(&mut conn, &knock_xml(BOB, &token.token)).await;
            assert_eq!(error_of(&reply), None, "{}", String::from(&reply));
        }

        // Apple: an alert naming the token's id, beside the node; nothing of Bob, nothing of the token.
        let sent = h.apns.requests();
        assert_eq!(sent.len(), 1);
        let body: serde_json::Value = serde_json::from_str(&sent[0].body).expect("JSON");
        assert_eq!(body["knock"], made_tokens[0].id.as_str());
        assert_eq!(body["node"], ios_node.as_str());
        assert_eq!(body["aps"]["mutable-content"], 1, "an alert");
        assert_eq!(sent[0].priority.as_deref(), Some("10"));
        // Google: a HIGH data message naming the id beside the account.
        let fcm = h.fcm.as_ref().expect("mock FCM");
        let messages = fcm.requests();
        assert_eq!(messages.len(), 1);
        assert_eq!(
            messages[0].data.get("knock"),
            Some(&made_tokens[1].id),
            "{}",
            messages[0].body
        );
        assert_eq!(messages[0].priority.as_deref(), Some("HIGH"));
        assert_eq!(
            messages[0].collapse_key, None,
            "no later message replaces a knock"
        );

        let mut to_push_services: Vec<u8> = Vec::new();
        for request in &sent {
            to_push_services.extend_from_slice(request.body.as_bytes());
            for (name, value) in &request.headers {
                to_push_services.extend_from_slice(name.as_bytes());
                to_push_services.extend_from_slice(value.as_bytes());
            }
        }
        for message in &messages {
            to_push_services.extend_from_slice(message.body.as_bytes());
        }
        h.terminate();
        let on_disk = everything_on_disk(h.dir.path());
        for token in &made_tokens {
            let secret = base64_decode(&token.token);
            for (what, seen) in [("push services", &to_push_services), ("disk", &on_disk)] {
                assert!(!contains(seen, token.token.as_bytes()), "token in {what}");
                assert!(!contains(seen, &secret), "token bytes in {what}");
            }
        }
        for leak in ["bob@example.net", "laptop"] {
            assert!(!contains(&to_push_services, leak.as_bytes()), "{leak} sent");
            assert!(!contains(&on_disk, leak.as_bytes()), "{leak} on disk");
        }
        // The debug log says a knock happened, and that is all.
        assert!(h.log_text().contains("knock token created"));
    }
}
