//! The [`Store`] trait's contract as tests, written against the trait alone, so every engine is held to the
//! same behaviour: an engine describes how to make, reopen and import into a store of its own ([`Engine`]),
//! and its tests call [`run_all`]. sled's do (`sled_passes_the_store_conformance_suite`); a second engine
//! adds one such test and gets the whole suite.
//!
//! Each check starts from a fresh store and says which rule of the trait's documentation it holds the
//! engine to.

use std::any::Any;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Registration, Store, StoreError, StoreKey};
use crate::push::{ProviderKind, Token};

/// What the suite needs of an engine.
pub(crate) trait Engine {
    /// A fresh, empty store, sealed under `key` if there is one, in the clear otherwise; and whatever keeps
    /// it alive (a temporary directory) and lets it be reopened.
    fn fresh(&self, key: Option<StoreKey>) -> (Box<dyn Any>, Arc<dyn Store>);

    /// The same store closed and opened again, as a restart does. `place` is what [`Engine::fresh`] gave.
    fn reopen(
        &self,
        place: &dyn Any,
        key: Option<StoreKey>,
        store: Arc<dyn Store>,
    ) -> Arc<dyn Store>;

    /// A fresh store of this engine made from an export file, as `knock import` makes one.
    fn import(&self, key: Option<StoreKey>, file: &Path) -> (Box<dyn Any>, Arc<dyn Store>);
}

/// One check of the contract.
type Check = fn(&dyn Engine);

/// Every check, against `engine`.
pub(crate) fn run_all(engine: &dyn Engine) {
    let checks: &[(&str, Check)] = &[
        (
            "put then get returns every field",
            put_get_round_trips_every_field,
        ),
        (
            "publish_target agrees with get",
            publish_target_agrees_with_get,
        ),
        (
            "a node of another owner is a conflict",
            another_owners_node_is_a_conflict,
        ),
        (
            "re-binding a node frees its old device",
            rebinding_frees_the_old_device,
        ),
        (
            "a device moving drops its old node",
            a_moving_device_drops_its_old_node,
        ),
        (
            "remove returns what it removed",
            remove_returns_what_it_removed,
        ),
        (
            "remove_if_token spares a fresh token",
            remove_if_token_spares_a_fresh_token,
        ),
        (
            "flushed changes survive a reopen",
            flushed_changes_survive_a_reopen,
        ),
        ("counts agree with what was put", counts_agree),
        ("scan visits each registration once", scan_visits_each_once),
        ("the instance key is stable", the_instance_key_is_stable),
        ("is_sealed follows the key", is_sealed_follows_the_key),
        (
            "export then import round-trips",
            export_then_import_round_trips,
        ),
        (
            "a sealed export holds no token",
            a_sealed_export_holds_no_token,
        ),
    ];
    for (name, check) in checks {
        eprintln!("store conformance: {name}");
        check(engine);
    }
}

/// Registration `i`: its own node, device, owner and token (32 bytes, or 150 for every third: the length
/// of an FCM token), two domains and two apps between them.
fn registration(i: u8) -> Registration {
    let len = if i % 3 == 0 { 150 } else { 32 };
    // Bytes that differ along the token, so a token found in a file is not a run of one byte by chance.
    let token: Vec<u8> = (0..len)
        .map(|j: u8| i.wrapping_mul(37).wrapping_add(j.wrapping_mul(11)) ^ 0x5a)
        .collect();
    Registration {
        node: format!("conformance-node-{i:03}"),
        device: [i; 32],
        owner: [i; 32],
        domain: if i % 2 == 0 { "a.example" } else { "b.example" }.into(),
        app: if i % 2 == 0 { "chat" } else { "beta" }.into(),
        provider: ProviderKind::Apns,
        token: Token::from_bytes(token),
        secret_hash: [i.wrapping_add(100); 32],
    }
}

fn put_all(store: &dyn Store, registrations: &[Registration]) {
    for r in registrations {
        store.put(r).expect("put");
    }
}

/// Flush on a runtime of its own: an engine may hand its disk work to tokio's blocking pool.
fn flush(store: &dyn Store) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(store.flush())
        .expect("flush");
}

/// Wait until the store answers publishes from memory, as a warming engine eventually does.
fn wait_warm(store: &dyn Store) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !store.is_warm() {
        assert!(Instant::now() < deadline, "the store never warmed up");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn put_get_round_trips_every_field(engine: &dyn Engine) {
    let (_place, store) = engine.fresh(None);
    let all: Vec<_> = (1..=6).map(registration).collect();
    put_all(&*store, &all);
    for r in &all {
        assert_eq!(store.get(&r.node).expect("get").as_ref(), Some(r));
    }
    assert_eq!(store.get("conformance-node-999").expect("get"), None);
}

fn publish_target_agrees_with_get(engine: &dyn Engine) {
    let (_place, store) = engine.fresh(None);
    let all: Vec<_> = (1..=6).map(registration).collect();
    put_all(&*store, &all);
    let agree = |store: &dyn Store| {
        for node in all
            .iter()
            .map(|r| r.node.as_str())
            .chain(["conformance-node-999"])
        {
            let expected = store.get(node).expect("get").as_ref().map(Into::into);
            assert_eq!(
                store.publish_target(node).expect("target"),
                expected,
                "{node}"
            );
        }
    };
    agree(&*store);
    wait_warm(&*store);
    agree(&*store);
    store.remove(&all[0].node).expect("remove");
    agree(&*store);
}

fn another_owners_node_is_a_conflict(engine: &dyn Engine) {
    let (_place, store) = engine.fresh(None);
    let mine = registration(1);
    store.put(&mine).expect("put");
    let theirs = Registration {
        owner: [200; 32],
        device: [200; 32],
        ..registration(2)
    };
    let taking = Registration {
        node: mine.node.clone(),
        ..theirs
    };
    assert!(matches!(store.put(&taking), Err(StoreError::Conflict)));
    assert_eq!(store.get(&mine.node).expect("get"), Some(mine));
    assert_eq!(store.node_for_device(&[200; 32]).expect("device"), None);
}

fn rebinding_frees_the_old_device(engine: &dyn Engine) {
    let (_place, store) = engine.fresh(None);
    let first = registration(1);
    store.put(&first).expect("put");
    let rebound = Registration {
        device: [77; 32],
        ..first.clone()
    };
    store.put(&rebound).expect("rebind");
    assert_eq!(store.node_for_device(&first.device).expect("device"), None);
    assert_eq!(
        store.node_for_device(&[77; 32]).expect("device"),
        Some(first.node.clone())
    );
    assert_eq!(store.get(&first.node).expect("get"), Some(rebound));
}

fn a_moving_device_drops_its_old_node(engine: &dyn Engine) {
    let (_place, store) = engine.fresh(None);
    let old = registration(1);
    store.put(&old).expect("put");
    let moved = Registration {
        node: "conformance-node-moved".into(),
        ..old.clone()
    };
    store.put(&moved).expect("move");
    assert_eq!(store.get(&old.node).expect("get"), None);
    assert_eq!(store.publish_target(&old.node).expect("target"), None);
    assert_eq!(
        store.node_for_device(&old.device).expect("device"),
        Some(moved.node.clone())
    );
    assert_eq!(store.len().expect("len"), 1);
}

fn remove_returns_what_it_removed(engine: &dyn Engine) {
    let (_place, store) = engine.fresh(None);
    let r = registration(1);
    store.put(&r).expect("put");
    assert_eq!(store.remove(&r.node).expect("remove"), Some(r.clone()));
    assert_eq!(store.remove(&r.node).expect("remove"), None);
    assert_eq!(store.get(&r.node).expect("get"), None);
    assert_eq!(store.node_for_device(&r.device).expect("device"), None);
    assert!(store.is_empty().expect("is_empty"));
}

fn remove_if_token_spares_a_fresh_token(engine: &dyn Engine) {
    let (_place, store) = engine.fresh(None);
    let old = registration(1);
    store.put(&old).expect("put");
    let fresh = Registration {
        token: Token::from_bytes(vec![0xfe; 32]),
        ..old.clone()
    };
    store.put(&fresh).expect("a new token");
    assert!(!store
        .remove_if_token(&old.node, &old.token)
        .expect("remove"));
    assert_eq!(store.get(&old.node).expect("get"), Some(fresh.clone()));
    assert!(store
        .remove_if_token(&old.node, &fresh.token)
        .expect("remove"));
    assert_eq!(store.get(&old.node).expect("get"), None);
    assert_eq!(store.publish_target(&old.node).expect("target"), None);
}

fn flushed_changes_survive_a_reopen(engine: &dyn Engine) {
    for key in [None, Some(StoreKey::generate())] {
        let (place, store) = engine.fresh(key.clone());
        let all: Vec<_> = (1..=9).map(registration).collect();
        put_all(&*store, &all);
        store.remove(&all[4].node).expect("remove");
        flush(&*store);
        let store = engine.reopen(&*place, key, store);
        for (i, r) in all.iter().enumerate() {
            let expected = (i != 4).then(|| r.clone());
            assert_eq!(store.get(&r.node).expect("get"), expected, "{}", r.node);
        }
        wait_warm(&*store);
        assert_eq!(store.len().expect("len"), 8);
    }
}

fn counts_agree(engine: &dyn Engine) {
    let (_place, store) = engine.fresh(None);
    assert!(store.is_empty().expect("is_empty"));
    put_all(&*store, &(1..=7).map(registration).collect::<Vec<_>>());
    assert_eq!(store.len().expect("len"), 7);
    assert!(!store.is_empty().expect("is_empty"));
    wait_warm(&*store);
    if let Some(mut counts) = store.counts_by_app().expect("counts") {
        counts.sort();
        assert_eq!(counts, [("beta".to_string(), 4), ("chat".to_string(), 3)]);
    }
}

fn scan_visits_each_once(engine: &dyn Engine) {
    let (_place, store) = engine.fresh(None);
    let all: Vec<_> = (1..=12).map(registration).collect();
    put_all(&*store, &all);
    let mut seen = Vec::new();
    let count = store.scan(&mut |r| seen.push(r)).expect("scan");
    assert_eq!(count, 12);
    seen.sort_by(|a, b| a.node.cmp(&b.node));
    assert_eq!(seen, all);
}

fn the_instance_key_is_stable(engine: &dyn Engine) {
    for key in [None, Some(StoreKey::generate())] {
        let (place, store) = engine.fresh(key.clone());
        let instance = store.instance_key().expect("instance key");
        assert_eq!(store.instance_key().expect("instance key"), instance);
        let store = engine.reopen(&*place, key, store);
        assert_eq!(store.instance_key().expect("instance key"), instance);
        let (_other, other) = engine.fresh(None);
        assert_ne!(other.instance_key().expect("instance key"), instance);
    }
}

fn is_sealed_follows_the_key(engine: &dyn Engine) {
    assert!(!engine.fresh(None).1.is_sealed());
    assert!(engine.fresh(Some(StoreKey::generate())).1.is_sealed());
}

fn export_of(store: &dyn Store) -> Vec<u8> {
    let mut out = Vec::new();
    let count = store.export(&mut out).expect("export");
    assert_eq!(count, store.len().expect("len"));
    out
}

fn export_then_import_round_trips(engine: &dyn Engine) {
    for key in [None, Some(StoreKey::generate())] {
        let (_place, source) = engine.fresh(key.clone());
        let all: Vec<_> = (1..=20).map(registration).collect();
        put_all(&*source, &all);
        flush(&*source);
        let file = tempfile::NamedTempFile::new().expect("file");
        std::fs::write(file.path(), export_of(&*source)).expect("write");
        let (_copy, copy) = engine.import(key.clone(), file.path());
        for r in &all {
            assert_eq!(copy.get(&r.node).expect("get").as_ref(), Some(r));
            assert_eq!(
                copy.node_for_device(&r.device).expect("device"),
                Some(r.node.clone())
            );
        }
        assert_eq!(
            copy.instance_key().expect("instance key"),
            source.instance_key().expect("instance key"),
            "hashes and derived secrets stay valid"
        );
        assert_eq!(copy.is_sealed(), key.is_some());
    }
}

fn a_sealed_export_holds_no_token(engine: &dyn Engine) {
    let (_place, store) = engine.fresh(Some(StoreKey::generate()));
    let all: Vec<_> = (1..=10).map(registration).collect();
    put_all(&*store, &all);
    let exported = export_of(&*store);
    let text = String::from_utf8_lossy(&exported);
    let nodes: BTreeSet<_> = all.iter().map(|r| r.node.as_str()).collect();
    assert!(
        nodes.iter().all(|n| text.contains(n)),
        "the export lists its nodes"
    );
    for r in &all {
        let raw = r.token.as_bytes();
        assert!(
            !exported.windows(raw.len()).any(|w| w == raw),
            "raw token in the export"
        );
        assert!(!text.contains(&hex::encode(raw)), "hex token in the export");
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, raw);
        assert!(!text.contains(&b64), "base64 token in the export");
    }
}
