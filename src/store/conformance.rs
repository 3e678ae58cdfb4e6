//! The [`Store`] contract as tests: what every engine must do, checked through the trait alone.
//!
//! Everything above the store speaks only the trait, so an engine is correct when it behaves as the trait's
//! doc comments say, whatever it keeps underneath. These checks hold an engine to that, using nothing but
//! `&dyn Store` and a small [`Engine`] description of how to make, reopen and import a store of it. Each
//! engine runs [`run_all`] from its own tests (sled: `sled_passes_the_store_conformance_suite`); a second
//! engine gets every check by doing the same. What only one engine has (sled's group commit, its index
//! rebuild, its on-disk format) stays in that engine's own tests.
//!
//! Test data gives every field of every registration a value of its own (a device hash is never its owner
//! hash, no two tokens share a first byte), so an engine that mixes two fields up or answers for the wrong
//! node fails instead of passing by coincidence. Tokens are 32 bytes (APNs) and 150 bytes (as long as FCM's),
//! of arbitrary bytes, not text.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine as _;

use crate::push::{ProviderKind, Token};
use crate::store::{
    BackupError, Digest, KnockToken, PublishTarget, Registration, Store, StoreError, StoreKey,
};

/// How long a store may take to warm up, or to confirm a flush, before the check fails instead of hanging.
const DEADLINE: Duration = Duration::from_secs(30);

/// A store just made, and the place that keeps it (see [`Engine::Place`]).
pub(crate) type Opened<P> = (P, Arc<dyn Store>);

/// One check of the suite, by name.
type Check<E> = (&'static str, fn(&E));

/// The checks named by their functions, so a failure names the function to read.
macro_rules! checks {
    ($($check:ident),* $(,)?) => {
        &[$((stringify!($check), $check as fn(&E))),*]
    };
}

/// What the suite needs to know of an engine: how to make, restart and import one of its stores.
pub(crate) trait Engine {
    /// Whatever keeps a store's data in place between reopens (a temporary directory, a scratch schema),
    /// and what reopening needs to find it again (the key it was opened with).
    type Place;

    /// A new, empty store: sealed under `key` if there is one, in the clear otherwise.
    fn fresh(&self, key: Option<StoreKey>) -> Opened<Self::Place>;

    /// Close `store` and open it again from `place` with the same key: what a restart does. The suite
    /// hands over its only handle.
    fn reopen(&self, place: &Self::Place, store: Arc<dyn Store>) -> Arc<dyn Store>;

    /// Import the export in `file` into a new store of this engine opened with `key`, as
    /// [`crate::store::import`] does; returns the count the import reported and the store, opened.
    fn import(
        &self,
        file: &Path,
        key: Option<StoreKey>,
    ) -> Result<(usize, Opened<Self::Place>), BackupError>;
}

/// Run every check against `engine`; panics naming each check that failed, after running them all.
pub(crate) fn run_all<E: Engine>(engine: &E) {
    let checks: &[Check<E>] = checks![
        put_then_get_returns_every_field,
        put_again_replaces_the_registration,
        publish_target_agrees_with_get,
        node_for_device_finds_the_device_node,
        another_owners_node_is_a_conflict_and_changes_nothing,
        the_owner_rebinding_its_node_frees_the_old_device,
        a_device_moving_to_a_new_node_drops_its_old_node,
        remove_returns_what_it_removed,
        remove_if_token_spares_a_fresh_token,
        flushed_changes_survive_a_reopen,
        len_and_counts_agree_with_what_was_put,
        scan_visits_each_registration_once,
        instance_key_is_one_per_store_and_stable,
        is_sealed_reflects_the_key,
        export_then_import_round_trips,
        a_sealed_export_reveals_no_token,
        puts_from_many_threads_stay_consistent,
        dead_tokens_are_remembered_until_they_expire,
        nodes_of_lists_exactly_an_owners_nodes,
        drop_call_token_keeps_the_rest_and_spares_a_fresh_one,
        knock_tokens_round_trip_every_field,
        knock_tokens_of_lists_exactly_an_owners_tokens,
        removing_a_knock_token_removes_only_it,
        a_knock_token_needs_its_node_registered_by_its_owner,
        a_removed_registration_takes_its_knock_tokens_along,
        knock_tokens_survive_a_reopen,
    ];
    run(engine, checks);
}

/// Run `checks`; panics naming each that failed, after running them all.
fn run<E: Engine>(engine: &E, checks: &[Check<E>]) {
    let mut failed = Vec::new();
    for (name, check) in checks {
        // One failing check should not hide the others: an engine in progress sees everything it misses.
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| check(engine))) {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            failed.push(format!("{name}: {why}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} store conformance checks failed:\n{}",
        failed.len(),
        checks.len(),
        failed.join("\n")
    );
}

// ---- Test data ------------------------------------------------------------------------------------------

/// The apps registrations cycle through.
const APPS: [&str; 3] = ["chat", "mail", "beta"];

/// A digest of one kind (`kind` fills it, so device, owner and secret hashes never coincide) for one `n`.
fn digest(kind: u8, n: u32) -> Digest {
    let mut d = [kind; 32];
    d[..4].copy_from_slice(&n.to_be_bytes());
    d
}

/// A token of `len` arbitrary bytes (not UTF-8, zeros included), whose first byte differs for every `n`
/// below 256.
fn token(n: u32, len: usize) -> Token {
    let bytes: Vec<u8> = (0..len)
        .map(|i| (n as usize * 101 + i * 37 + 7) as u8)
        .collect();
    Token::from_bytes(bytes)
}

/// Registration `n`: every field its own; even ones carry a 32-byte token, odd ones a 150-byte token.
/// Every third is a Tigase-dialect one: no secret, a call token (from even ones only) and the account.
fn registration(n: u32) -> Registration {
    let providers = ProviderKind::ALL;
    let extended = n % 3 == 2;
    Registration {
        node: format!("conformance-node-{n:04}"),
        device: digest(0xde, n),
        owner: digest(0x0e, n),
        domain: format!("server{}.example", n % 2),
        app: APPS[n as usize % APPS.len()].to_string(),
        provider: providers[n as usize % providers.len()],
        token: token(n, if n % 2 == 0 { 32 } else { 150 }),
        secret_hash: (!extended).then(|| digest(0x5e, n)),
        call_token: (extended && n % 2 == 0).then(|| token(n + 1000, 32)),
        account: extended.then(|| format!("user{n}@server{}.example", n % 2)),
    }
}

/// Registrations `0..n`.
fn registrations(n: u32) -> Vec<Registration> {
    (0..n).map(registration).collect()
}

/// A node no check ever registers.
const NEVER: &str = "conformance-never-registered";

/// No key, then a fresh one: a check that holds for both runs once each.
fn keys() -> [Option<StoreKey>; 2] {
    [None, Some(StoreKey::generate())]
}

// ---- Helpers --------------------------------------------------------------------------------------------

fn put_all(store: &dyn Store, all: &[Registration]) {
    for r in all {
        store
            .put(r)
            .unwrap_or_else(|e| panic!("put {}: {e}", r.node));
    }
}

fn get(store: &dyn Store, node: &str) -> Option<Registration> {
    store
        .get(node)
        .unwrap_or_else(|e| panic!("get {node}: {e}"))
}

fn node_of(store: &dyn Store, device: &Digest) -> Option<String> {
    store.node_for_device(device).expect("node_for_device")
}

fn len(store: &dyn Store) -> usize {
    store.len().expect("len")
}

/// Close and reopen, making sure the suite holds no other handle that would keep the old one open.
fn reopen<E: Engine>(engine: &E, place: &E::Place, store: Arc<dyn Store>) -> Arc<dyn Store> {
    assert_eq!(
        Arc::strong_count(&store),
        1,
        "the suite still holds another handle"
    );
    engine.reopen(place, store)
}

/// Wait until the store says it is warm; fails after [`DEADLINE`].
fn wait_warm(store: &dyn Store) {
    let deadline = Instant::now() + DEADLINE;
    while !store.is_warm() {
        assert!(
            Instant::now() < deadline,
            "the store did not warm up within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run `flushes` concurrent flushes to completion; each must succeed within [`DEADLINE`].
fn flush(store: &dyn Store, flushes: usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let all = futures::future::join_all((0..flushes).map(|_| store.flush()));
    let results = runtime
        .block_on(async { tokio::time::timeout(DEADLINE, all).await })
        .unwrap_or_else(|_| panic!("flush did not resolve within {DEADLINE:?}"));
    for result in results {
        result.expect("flush");
    }
}

/// `publish_target` answers every node in `nodes` as `get` does.
fn assert_publish_agrees(store: &dyn Store, nodes: &[&str]) {
    for node in nodes {
        let target = store
            .publish_target(node)
            .unwrap_or_else(|e| panic!("publish_target {node}: {e}"));
        assert_eq!(
            target,
            get(store, node).as_ref().map(PublishTarget::from),
            "publish_target({node}) disagrees with get (warm: {})",
            store.is_warm()
        );
    }
}

/// The store holds exactly `expected` among what the check touched: each is found by node (whole and for
/// publishing) and by device, each of `gone` nodes is absent, each of `freed` devices has no node, and the
/// store holds nothing else.
fn assert_holds(store: &dyn Store, expected: &[Registration], gone: &[&str], freed: &[Digest]) {
    for r in expected {
        assert_eq!(get(store, &r.node).as_ref(), Some(r), "get({})", r.node);
        assert_eq!(
            store.publish_target(&r.node).expect("publish_target"),
            Some(PublishTarget::from(r)),
            "publish_target({})",
            r.node
        );
        assert_eq!(
            node_of(store, &r.device).as_deref(),
            Some(r.node.as_str()),
            "node_for_device of {}'s device",
            r.node
        );
    }
    for node in gone {
        assert_eq!(get(store, node), None, "get({node}) after it went");
        assert_eq!(
            store.publish_target(node).expect("publish_target"),
            None,
            "publish_target({node}) after it went"
        );
    }
    for device in freed {
        assert_eq!(
            node_of(store, device),
            None,
            "node_for_device of a freed device"
        );
    }
    assert_eq!(len(store), expected.len(), "len");
    assert_eq!(
        store.is_empty().expect("is_empty"),
        expected.is_empty(),
        "is_empty"
    );
}

/// Every registration `scan` hands over, by node; fails if one comes twice or the count is off.
fn scanned(store: &dyn Store) -> BTreeMap<String, Registration> {
    let mut seen = BTreeMap::new();
    let mut twice = Vec::new();
    let count = store
        .scan(&mut |r| {
            if let Some(r) = seen.insert(r.node.clone(), r) {
                twice.push(r.node);
            }
        })
        .expect("scan");
    assert!(twice.is_empty(), "scan visited {twice:?} more than once");
    assert_eq!(count, seen.len(), "scan's count is not what it handed over");
    seen
}

/// Whether `haystack` holds `secret` raw, as hex (either case), or inside base64 (standard or URL-safe, at
/// any alignment): every way an export could carry bytes.
fn reveals(haystack: &[u8], secret: &[u8]) -> bool {
    let contains = |needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    if contains(secret)
        || contains(hex::encode(secret).as_bytes())
        || contains(hex::encode_upper(secret).as_bytes())
    {
        return true;
    }
    // Behind `shift` other bytes, the base64 characters wholly made of the secret's bits are those from
    // bit 8*shift to bit 8*(shift + len): the same whatever bytes surround the secret in the file.
    (0..3).any(|shift| {
        let mut padded = vec![0u8; shift];
        padded.extend_from_slice(secret);
        let (start, end) = ((8 * shift).div_ceil(6), 8 * padded.len() / 6);
        [STANDARD.encode(&padded), URL_SAFE.encode(&padded)]
            .iter()
            .any(|text| contains(&text.as_bytes()[start..end]))
    })
}

// ---- Checks ---------------------------------------------------------------------------------------------

/// Every field comes back as it was put, sealed or not, before and after a restart.
fn put_then_get_returns_every_field<E: Engine>(engine: &E) {
    for key in keys() {
        let (place, store) = engine.fresh(key);
        let all = registrations(6);
        assert!(all.iter().any(|r| r.token.as_bytes().len() == 32));
        assert!(all.iter().any(|r| r.token.as_bytes().len() == 150));
        assert_eq!(
            get(&*store, &all[0].node),
            None,
            "a new store holds nothing"
        );
        put_all(&*store, &all);
        for r in &all {
            assert_eq!(get(&*store, &r.node).as_ref(), Some(r), "get({})", r.node);
        }
        assert_eq!(get(&*store, NEVER), None);
        flush(&*store, 1);
        let store = reopen(engine, &place, store);
        for r in &all {
            assert_eq!(
                get(&*store, &r.node).as_ref(),
                Some(r),
                "get({}) after a reopen",
                r.node
            );
        }
    }
}

/// A second put of a node by its owner and device replaces every field but those.
fn put_again_replaces_the_registration<E: Engine>(engine: &E) {
    let (_place, store) = engine.fresh(None);
    let first = registration(0);
    let other = registration(1);
    put_all(&*store, &[first.clone(), other.clone()]);
    let updated = Registration {
        domain: "moved.example".into(),
        app: "another-app".into(),
        token: token(200, 150),
        secret_hash: Some(digest(0x5e, 200)),
        ..first.clone()
    };
    store.put(&updated).expect("update");
    assert_holds(&*store, &[updated, other], &[], &[]);
}

/// The publish hot path answers as `get` does for present and absent nodes: while the store may still be
/// warming up, once warm, across a restart, and after writes to a warm store.
fn publish_target_agrees_with_get<E: Engine>(engine: &E) {
    for key in keys() {
        let (place, store) = engine.fresh(key);
        let all = registrations(40);
        put_all(&*store, &all);
        store.remove(&all[3].node).expect("remove");
        store
            .put(&Registration {
                token: token(201, 32),
                ..all[4].clone()
            })
            .expect("update");
        let moved = Registration {
            node: "conformance-moved".into(),
            ..all[5].clone()
        };
        store.put(&moved).expect("move");
        assert!(store
            .remove_if_token(&all[6].node, &all[6].token)
            .expect("remove_if_token"));

        let late = registration(40);
        let mut nodes: Vec<&str> = all.iter().map(|r| r.node.as_str()).collect();
        nodes.extend([moved.node.as_str(), late.node.as_str(), NEVER]);
        for gone in [&all[3], &all[5], &all[6]] {
            assert_eq!(get(&*store, &gone.node), None, "{} is gone", gone.node);
        }
        assert_publish_agrees(&*store, &nodes);
        wait_warm(&*store);
        assert_publish_agrees(&*store, &nodes);

        let store = reopen(engine, &place, store);
        assert_publish_agrees(&*store, &nodes);
        wait_warm(&*store);
        assert_publish_agrees(&*store, &nodes);

        store.remove(&all[7].node).expect("remove when warm");
        store.put(&late).expect("put when warm");
        store
            .put(&Registration {
                token: token(202, 150),
                ..all[8].clone()
            })
            .expect("update when warm");
        assert_publish_agrees(&*store, &nodes);
    }
}

/// A device's node is found by its device hash, and by nothing else.
fn node_for_device_finds_the_device_node<E: Engine>(engine: &E) {
    let (_place, store) = engine.fresh(None);
    let all = registrations(3);
    put_all(&*store, &all);
    for r in &all {
        assert_eq!(
            node_of(&*store, &r.device).as_deref(),
            Some(r.node.as_str())
        );
        assert_eq!(
            node_of(&*store, &r.owner),
            None,
            "an owner hash is not a device hash"
        );
    }
    assert_eq!(node_of(&*store, &digest(0xde, 999)), None);
    store.remove(&all[1].node).expect("remove");
    assert_eq!(node_of(&*store, &all[1].device), None);
}

/// A put onto a node another owner holds fails with `Conflict` and leaves everything as it was, including
/// the intruding device's own node.
fn another_owners_node_is_a_conflict_and_changes_nothing<E: Engine>(engine: &E) {
    let (_place, store) = engine.fresh(None);
    let held = registration(0);
    let elsewhere = registration(1);
    put_all(&*store, &[held.clone(), elsewhere.clone()]);
    let intruder = Registration {
        node: held.node.clone(),
        ..registration(1)
    };
    match store.put(&intruder) {
        Err(StoreError::Conflict) => {}
        other => panic!("another owner's put on a held node gave {other:?}, not Conflict"),
    }
    assert_holds(&*store, &[held, elsewhere], &[], &[]);
}

/// The owner may re-bind its node to another device identity: the node keeps its place, the old device lets
/// go of it (so that device registering anew cannot take the node down with it), and the new device's
/// previous node, if any, goes.
fn the_owner_rebinding_its_node_frees_the_old_device<E: Engine>(engine: &E) {
    let (_place, store) = engine.fresh(None);
    let first = registration(0);
    // A second device of the same owner (another phone), with a node of its own.
    let other = Registration {
        owner: first.owner,
        ..registration(7)
    };
    put_all(&*store, &[first.clone(), other.clone()]);
    // Same owner and node, the other phone's device identity.
    let rebound = Registration {
        device: other.device,
        token: token(203, 32),
        ..first.clone()
    };
    store.put(&rebound).expect("rebind");
    assert_holds(
        &*store,
        std::slice::from_ref(&rebound),
        &[&other.node],
        &[first.device],
    );
    // The freed device registers again under a node of its own; the rebound node stays.
    let again = Registration {
        node: "conformance-again".into(),
        ..first.clone()
    };
    store.put(&again).expect("the old device registers again");
    assert_holds(&*store, &[rebound, again], &[&other.node], &[]);
}

/// A device registering under a new node loses its old node, and nothing else.
fn a_device_moving_to_a_new_node_drops_its_old_node<E: Engine>(engine: &E) {
    let (_place, store) = engine.fresh(None);
    let old = registration(0);
    let bystander = registration(1);
    put_all(&*store, &[old.clone(), bystander.clone()]);
    let moved = Registration {
        node: "conformance-new-home".into(),
        ..old.clone()
    };
    store.put(&moved).expect("move");
    assert_holds(&*store, &[moved, bystander], &[&old.node], &[]);
}

/// `remove` hands back exactly what it took out, takes out the device's entry too, and a second remove
/// finds nothing.
fn remove_returns_what_it_removed<E: Engine>(engine: &E) {
    let (_place, store) = engine.fresh(None);
    let all = registrations(2);
    put_all(&*store, &all);
    assert_eq!(
        store.remove(&all[1].node).expect("remove"),
        Some(all[1].clone())
    );
    assert_eq!(store.remove(&all[1].node).expect("remove again"), None);
    assert_eq!(store.remove(NEVER).expect("remove absent"), None);
    assert_holds(&*store, &all[..1], &[&all[1].node], &[all[1].device]);
    // Nothing of it lingers: the same registration goes back in as new.
    store.put(&all[1]).expect("put back");
    assert_holds(&*store, &all, &[], &[]);
}

/// A dead-token report for a token the node no longer carries removes nothing, even when one token is the
/// other's prefix; the current token removes the node.
fn remove_if_token_spares_a_fresh_token<E: Engine>(engine: &E) {
    let (_place, store) = engine.fresh(None);
    // The stale token is 150 bytes, the fresh one its first 32.
    let stale = registration(1);
    let bystander = registration(3);
    put_all(&*store, &[stale.clone(), bystander.clone()]);
    let fresh = Registration {
        token: Token::from_bytes(stale.token.as_bytes()[..32].to_vec()),
        ..stale.clone()
    };
    store.put(&fresh).expect("re-register");
    assert!(!store
        .remove_if_token(&fresh.node, &stale.token)
        .expect("remove_if_token"));
    assert_holds(&*store, &[fresh.clone(), bystander.clone()], &[], &[]);
    // And the other way round: the node carries the long token, the report names its prefix.
    let short = Token::from_bytes(bystander.token.as_bytes()[..32].to_vec());
    assert!(!store
        .remove_if_token(&bystander.node, &short)
        .expect("remove_if_token"));
    assert_holds(&*store, &[fresh.clone(), bystander.clone()], &[], &[]);

    assert!(store
        .remove_if_token(&fresh.node, &fresh.token)
        .expect("remove_if_token"));
    assert_holds(
        &*store,
        std::slice::from_ref(&bystander),
        &[&fresh.node],
        &[fresh.device],
    );
    assert!(!store
        .remove_if_token(&fresh.node, &fresh.token)
        .expect("remove_if_token on a removed node"));
    assert!(!store
        .remove_if_token(NEVER, &fresh.token)
        .expect("remove_if_token on an absent node"));
}

/// `flush` resolves, concurrent flushes too, and every kind of change made before it survives a restart.
fn drop_call_token_keeps_the_rest_and_spares_a_fresh_one<E: Engine>(engine: &E) {
    let (place, store) = engine.fresh(None);
    // Registration 2 is a Tigase-dialect one with a call token.
    let with_call = registration(2);
    let call = with_call.call_token.clone().expect("a call token");
    put_all(&*store, &[with_call.clone(), registration(0)]);
    assert!(
        !store
            .drop_call_token(&with_call.node, &token(77, 32))
            .expect("drop"),
        "another token: kept"
    );
    assert!(
        !store
            .drop_call_token(&registration(0).node, &call)
            .expect("drop"),
        "no call token there"
    );
    assert!(!store.drop_call_token(NEVER, &call).expect("drop"));
    assert!(store.drop_call_token(&with_call.node, &call).expect("drop"));
    let without = Registration {
        call_token: None,
        ..with_call
    };
    assert_holds(&*store, &[without.clone(), registration(0)], &[], &[]);
    flush(&*store, 1);
    let store = engine.reopen(&place, store);
    assert_holds(&*store, &[without, registration(0)], &[], &[]);
}

fn nodes_of_lists_exactly_an_owners_nodes<E: Engine>(engine: &E) {
    let (place, store) = engine.fresh(None);
    let owner = digest(0x0e, 900);
    let mine = |n: u32| Registration {
        owner,
        ..registration(n)
    };
    put_all(&*store, &[mine(0), mine(1), mine(2), registration(3)]);
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let nodes = |store: &dyn Store| sorted(store.nodes_of(&owner).expect("nodes_of"));
    assert_eq!(nodes(&*store), [mine(0).node, mine(1).node, mine(2).node]);
    // A device moving to a new node takes the owner's entry along; a removal drops it.
    let moved = Registration {
        node: "conformance-moved".into(),
        ..mine(1)
    };
    store.put(&moved).expect("move");
    store.remove(&mine(0).node).expect("remove");
    assert_eq!(
        nodes(&*store),
        sorted(vec![mine(2).node, moved.node.clone()])
    );
    assert_eq!(
        store.nodes_of(&digest(0x0e, 901)).expect("nodes_of"),
        Vec::<String>::new()
    );
    flush(&*store, 1);
    let store = engine.reopen(&place, store);
    assert_eq!(nodes(&*store), sorted(vec![mine(2).node, moved.node]));
}

fn dead_tokens_are_remembered_until_they_expire<E: Engine>(engine: &E) {
    let (place, store) = engine.fresh(None);
    let (a, b) = (digest(0xdd, 1), digest(0xdd, 2));
    assert!(!store.is_dead(&a, 1000).expect("is_dead"));
    store.remember_dead(&a, 2000).expect("remember");
    store.remember_dead(&b, 5000).expect("remember");
    assert!(store.is_dead(&a, 1999).expect("is_dead"));
    assert!(
        !store.is_dead(&a, 2000).expect("is_dead"),
        "expired at its time"
    );
    assert!(
        !store.is_dead(&a, 1000).expect("is_dead"),
        "an expired memory is forgotten"
    );
    assert!(store.is_dead(&b, 2000).expect("is_dead"), "others are kept");
    // Remembered again, it lasts to the new time; and it survives a restart once flushed.
    store.remember_dead(&a, 9000).expect("remember");
    flush(&*store, 1);
    let store = engine.reopen(&place, store);
    assert!(store.is_dead(&a, 8999).expect("is_dead"));
    assert!(store.is_dead(&b, 4999).expect("is_dead"));
    assert!(
        store.is_empty().expect("len"),
        "dead tokens are not registrations"
    );
}

fn flushed_changes_survive_a_reopen<E: Engine>(engine: &E) {
    for key in keys() {
        let (place, store) = engine.fresh(key);
        let all = registrations(12);
        put_all(&*store, &all);
        let updated = Registration {
            token: token(204, 150),
            app: "renamed".into(),
            ..all[2].clone()
        };
        store.put(&updated).expect("update");
        store.remove(&all[3].node).expect("remove");
        let moved = Registration {
            node: "conformance-moved".into(),
            ..all[4].clone()
        };
        store.put(&moved).expect("move");
        assert!(store
            .remove_if_token(&all[5].node, &all[5].token)
            .expect("remove_if_token"));
        let rebound = Registration {
            device: digest(0xde, 206),
            ..all[6].clone()
        };
        store.put(&rebound).expect("rebind");
        flush(&*store, 4);

        let mut expected = all.clone();
        expected[2] = updated;
        expected[4] = moved;
        expected[6] = rebound;
        expected.retain(|r| r.node != all[3].node && r.node != all[5].node);
        let gone = [
            all[3].node.as_str(),
            all[4].node.as_str(),
            all[5].node.as_str(),
        ];
        let freed = [all[3].device, all[5].device, all[6].device];
        assert_holds(&*store, &expected, &gone, &freed);
        let store = reopen(engine, &place, store);
        assert_holds(&*store, &expected, &gone, &freed);
        wait_warm(&*store);
        assert_holds(&*store, &expected, &gone, &freed);
    }
}

/// `counts_by_app` (when the store can tell) agrees with what is registered, ignoring order and apps with
/// no registration left.
fn assert_counts(store: &dyn Store, expected: &[Registration]) {
    assert_eq!(len(store), expected.len(), "len");
    assert_eq!(
        store.is_empty().expect("is_empty"),
        expected.is_empty(),
        "is_empty"
    );
    let Some(counts) = store.counts_by_app().expect("counts_by_app") else {
        return;
    };
    let mut want = BTreeMap::new();
    for r in expected {
        *want.entry(r.app.clone()).or_insert(0) += 1;
    }
    let mut got = BTreeMap::new();
    for (app, count) in counts {
        assert!(
            got.insert(app.clone(), count).is_none(),
            "counts_by_app names {app} twice"
        );
    }
    got.retain(|_, count| *count > 0);
    assert_eq!(got, want, "counts_by_app");
}

/// `len`, `is_empty` and `counts_by_app` follow puts, updates that change an app, moves, conflicts and
/// removals, before and after warm-up and across a restart.
fn len_and_counts_agree_with_what_was_put<E: Engine>(engine: &E) {
    let (place, store) = engine.fresh(None);
    assert_counts(&*store, &[]);
    wait_warm(&*store);
    assert_counts(&*store, &[]);

    let mut expected = registrations(9);
    put_all(&*store, &expected);
    store.remove(&expected[0].node).expect("remove");
    expected.remove(0);
    // Registration 1 (mail) becomes a chat registration; 2 moves to another node; 3's node is refused to
    // another owner.
    expected[0].app = "chat".into();
    store.put(&expected[0]).expect("change app");
    expected[1].node = "conformance-moved".into();
    store.put(&expected[1]).expect("move");
    let refused = Registration {
        node: expected[2].node.clone(),
        app: "intruder".into(),
        ..registration(50)
    };
    assert!(matches!(store.put(&refused), Err(StoreError::Conflict)));
    assert_counts(&*store, &expected);
    wait_warm(&*store);
    assert_counts(&*store, &expected);

    let store = reopen(engine, &place, store);
    assert_counts(&*store, &expected);
    wait_warm(&*store);
    assert_counts(&*store, &expected);

    for r in &expected {
        store.remove(&r.node).expect("remove");
    }
    assert_counts(&*store, &[]);
}

/// `scan` hands over every registration exactly once, as `get` reads it, and counts them.
fn scan_visits_each_registration_once<E: Engine>(engine: &E) {
    for key in keys() {
        let (_place, store) = engine.fresh(key);
        assert!(scanned(&*store).is_empty(), "a new store scans empty");
        let mut expected: BTreeMap<String, Registration> = registrations(30)
            .into_iter()
            .map(|r| (r.node.clone(), r))
            .collect();
        put_all(&*store, &expected.values().cloned().collect::<Vec<_>>());
        let removed = registration(7);
        store.remove(&removed.node).expect("remove");
        expected.remove(&removed.node);
        let moved = Registration {
            node: "conformance-moved".into(),
            ..registration(8)
        };
        store.put(&moved).expect("move");
        expected.remove(&registration(8).node);
        expected.insert(moved.node.clone(), moved);

        let seen = scanned(&*store);
        assert_eq!(seen, expected, "scan");
        assert_eq!(len(&*store), seen.len(), "len against scan");
        for (node, r) in &seen {
            assert_eq!(
                get(&*store, node).as_ref(),
                Some(r),
                "scan against get({node})"
            );
        }
    }
}

/// Each store has its own instance key, which a restart does not change.
fn instance_key_is_one_per_store_and_stable<E: Engine>(engine: &E) {
    for key in keys() {
        let (place, store) = engine.fresh(key.clone());
        let first = store.instance_key().expect("instance_key");
        assert_ne!(first, [0; 32], "an instance key is random");
        assert_eq!(store.instance_key().expect("instance_key"), first);
        put_all(&*store, &registrations(2));
        let store = reopen(engine, &place, store);
        assert_eq!(
            store.instance_key().expect("instance_key"),
            first,
            "changed across a reopen"
        );
        let (_other_place, other) = engine.fresh(key);
        assert_ne!(
            other.instance_key().expect("instance_key"),
            first,
            "two stores share an instance key"
        );
    }
}

/// A store opened with a key says it is sealed, one without says it is not, and a restart changes neither.
fn is_sealed_reflects_the_key<E: Engine>(engine: &E) {
    for key in keys() {
        let sealed = key.is_some();
        let (place, store) = engine.fresh(key);
        assert_eq!(store.is_sealed(), sealed, "is_sealed of a new store");
        put_all(&*store, &registrations(1));
        let store = reopen(engine, &place, store);
        assert_eq!(store.is_sealed(), sealed, "is_sealed after a reopen");
    }
}

/// An export imported into a new store of the same engine holds every registration, findable every way,
/// and the same instance key (so device hashes and publish secrets stay valid); an empty store too.
fn export_then_import_round_trips<E: Engine>(engine: &E) {
    for key in keys() {
        for n in [0, 25] {
            let (_place, source) = engine.fresh(key.clone());
            put_all(&*source, &registrations(n));
            // Knock tokens of registrations 1 and 2, counted once: they travel in the export too.
            let knocks: Vec<(Digest, KnockToken)> = if n > 0 {
                [(1, 1), (1, 2), (2, 3)]
                    .iter()
                    .map(|&(r, t)| knock_token(&registration(r), t))
                    .collect()
            } else {
                Vec::new()
            };
            for t in &knocks {
                put_knock(&*source, t);
            }
            if let Some((hash, _)) = knocks.first() {
                source.count_knock_use(hash).expect("count");
            }
            if n > 0 {
                source.remove(&registration(3).node).expect("remove");
                source
                    .put(&Registration {
                        node: "conformance-moved".into(),
                        ..registration(4)
                    })
                    .expect("move");
            }
            let mut out = Vec::new();
            let exported = source.export(&mut out).expect("export");
            assert_eq!(exported, len(&*source), "export's count");
            let file = tempfile::NamedTempFile::new().expect("file");
            std::fs::write(file.path(), &out).expect("write the export");

            let (imported, (_copy_place, copy)) =
                engine.import(file.path(), key.clone()).expect("import");
            assert_eq!(imported, exported, "import's count");
            let all = scanned(&*source);
            assert_eq!(scanned(&*copy), all, "the copy's registrations");
            assert_eq!(
                copy.instance_key().expect("instance_key"),
                source.instance_key().expect("instance_key"),
                "the copy's instance key"
            );
            assert_eq!(copy.is_sealed(), key.is_some(), "the copy's is_sealed");
            for (hash, _) in &knocks {
                assert_eq!(
                    knock_of(&*copy, hash),
                    knock_of(&*source, hash),
                    "the copy's knock tokens"
                );
            }
            if n > 0 {
                let owner = registration(1).owner;
                assert_eq!(
                    copy.knock_tokens_of(&owner).expect("knock_tokens_of").len(),
                    2,
                    "the copy's owner index of knock tokens"
                );
            }
            let all: Vec<Registration> = all.into_values().collect();
            assert_holds(&*copy, &all, &[&registration(3).node, NEVER], &[]);
            wait_warm(&*copy);
            assert_holds(&*copy, &all, &[&registration(3).node, NEVER], &[]);
        }
    }
}

// ---- Knock tokens (issue 21) -----------------------------------------------------------------------------

/// Knock token `n` of registration `r`: every field its own (the id never repeats the hash, the expiry
/// never the rate), with a grace period on odd ones.
fn knock_token(r: &Registration, n: u32) -> (Digest, KnockToken) {
    let mut id = [0x1d; 8];
    id[..4].copy_from_slice(&n.to_be_bytes());
    let token = KnockToken {
        id,
        node: r.node.clone(),
        owner: r.owner,
        expires: 1_900_000_000 + u64::from(n),
        per_hour: 10 + n,
        grace_until: (n % 2 == 1).then(|| 1_800_000_000 + u64::from(n)),
        uses: u64::from(n) * 3,
    };
    (digest(0xcc, n), token)
}

fn put_knock(store: &dyn Store, (hash, token): &(Digest, KnockToken)) {
    store
        .put_knock_token(hash, token)
        .unwrap_or_else(|e| panic!("put_knock_token {}: {e}", token.node));
}

fn knock_of(store: &dyn Store, hash: &Digest) -> Option<KnockToken> {
    store.knock_token(hash).expect("knock_token")
}

fn knock_tokens_round_trip_every_field<E: Engine>(engine: &E) {
    for key in keys() {
        let (_place, store) = engine.fresh(key);
        let r = registration(1);
        put_all(&*store, std::slice::from_ref(&r));
        let tokens = [knock_token(&r, 1), knock_token(&r, 2)];
        for t in &tokens {
            put_knock(&*store, t);
        }
        for (hash, token) in &tokens {
            assert_eq!(knock_of(&*store, hash).as_ref(), Some(token));
        }
        assert_eq!(knock_of(&*store, &digest(0xcc, 99)), None);
        // Replacing keeps one token under the hash; counting adds one use and changes nothing else.
        let (hash, token) = &tokens[0];
        let rotated = KnockToken {
            grace_until: Some(1_700_000_000),
            ..token.clone()
        };
        store.put_knock_token(hash, &rotated).expect("replace");
        store.count_knock_use(hash).expect("count");
        store.count_knock_use(hash).expect("count");
        store
            .count_knock_use(&digest(0xcc, 99))
            .expect("count a gone token");
        assert_eq!(
            knock_of(&*store, hash),
            Some(KnockToken {
                uses: rotated.uses + 2,
                ..rotated
            })
        );
        assert_eq!(len(&*store), 1, "knock tokens are not registrations");
    }
}

fn knock_tokens_of_lists_exactly_an_owners_tokens<E: Engine>(engine: &E) {
    let (_place, store) = engine.fresh(None);
    let (a, b) = (registration(1), registration(2));
    put_all(&*store, &[a.clone(), b.clone()]);
    let mine = [knock_token(&a, 1), knock_token(&a, 2), knock_token(&a, 3)];
    let theirs = knock_token(&b, 4);
    for t in mine.iter().chain([&theirs]) {
        put_knock(&*store, t);
    }
    let sorted = |mut v: Vec<(Digest, KnockToken)>| {
        v.sort_by_key(|(h, _)| *h);
        v
    };
    assert_eq!(
        sorted(store.knock_tokens_of(&a.owner).expect("knock_tokens_of")),
        mine.to_vec()
    );
    assert_eq!(
        store.knock_tokens_of(&b.owner).expect("knock_tokens_of"),
        vec![theirs.clone()]
    );
    assert!(store
        .knock_tokens_of(&digest(0x0e, 999))
        .expect("knock_tokens_of")
        .is_empty());
    // A token replaced under another owner moves between the lists.
    let moved = (
        mine[2].0,
        KnockToken {
            owner: b.owner,
            node: b.node.clone(),
            ..mine[2].1.clone()
        },
    );
    put_knock(&*store, &moved);
    assert_eq!(
        sorted(store.knock_tokens_of(&a.owner).expect("knock_tokens_of")),
        mine[..2].to_vec()
    );
    assert_eq!(
        sorted(store.knock_tokens_of(&b.owner).expect("knock_tokens_of")),
        sorted(vec![theirs, moved])
    );
}

fn removing_a_knock_token_removes_only_it<E: Engine>(engine: &E) {
    let (_place, store) = engine.fresh(None);
    let r = registration(1);
    put_all(&*store, std::slice::from_ref(&r));
    let (gone, kept) = (knock_token(&r, 1), knock_token(&r, 2));
    put_knock(&*store, &gone);
    put_knock(&*store, &kept);
    assert!(store.remove_knock_token(&gone.0).expect("remove"));
    assert!(!store.remove_knock_token(&gone.0).expect("remove again"));
    assert_eq!(knock_of(&*store, &gone.0), None);
    assert_eq!(knock_of(&*store, &kept.0), Some(kept.1.clone()));
    assert_eq!(
        store.knock_tokens_of(&r.owner).expect("knock_tokens_of"),
        vec![kept]
    );
    assert!(get(&*store, &r.node).is_some(), "the registration stays");
}

fn a_knock_token_needs_its_node_registered_by_its_owner<E: Engine>(engine: &E) {
    let (_place, store) = engine.fresh(None);
    let (mine, theirs) = (registration(1), registration(2));
    put_all(&*store, &[mine.clone(), theirs.clone()]);
    let (hash, token) = knock_token(&mine, 1);
    let nowhere = KnockToken {
        node: NEVER.into(),
        ..token.clone()
    };
    assert!(matches!(
        store.put_knock_token(&hash, &nowhere),
        Err(StoreError::Invalid(_))
    ));
    let elsewhere = KnockToken {
        node: theirs.node.clone(),
        ..token.clone()
    };
    assert!(matches!(
        store.put_knock_token(&hash, &elsewhere),
        Err(StoreError::Conflict)
    ));
    assert_eq!(knock_of(&*store, &hash), None, "nothing changed");
    store
        .put_knock_token(&hash, &token)
        .expect("put_knock_token");
    assert_eq!(knock_of(&*store, &hash), Some(token));
}

fn a_removed_registration_takes_its_knock_tokens_along<E: Engine>(engine: &E) {
    for key in keys() {
        let (place, store) = engine.fresh(key);
        let owner = digest(0x0e, 700);
        let mine = |n: u32| Registration {
            owner,
            ..registration(n)
        };
        let (a, b, c) = (mine(1), mine(2), mine(3));
        put_all(&*store, &[a.clone(), b.clone(), c.clone()]);
        let (of_a, of_b, of_c) = (knock_token(&a, 1), knock_token(&b, 2), knock_token(&c, 3));
        for t in [&of_a, &of_b, &of_c] {
            put_knock(&*store, t);
        }
        // Removed outright; removed because its token is dead; left by its device for a new node.
        store.remove(&a.node).expect("remove");
        assert!(store
            .remove_if_token(&b.node, &b.token)
            .expect("remove_if_token"));
        let moved = Registration {
            node: "conformance-moved".into(),
            ..c.clone()
        };
        store.put(&moved).expect("move");
        let check = |store: &dyn Store| {
            for (hash, _) in [&of_a, &of_b, &of_c] {
                assert_eq!(knock_of(store, hash), None, "a token outlived its node");
            }
            assert!(store
                .knock_tokens_of(&owner)
                .expect("knock_tokens_of")
                .is_empty());
        };
        check(&*store);
        flush(&*store, 1);
        let store = reopen(engine, &place, store);
        check(&*store);
    }
}

fn knock_tokens_survive_a_reopen<E: Engine>(engine: &E) {
    for key in keys() {
        let (place, store) = engine.fresh(key);
        let r = registration(1);
        put_all(&*store, std::slice::from_ref(&r));
        let tokens = [knock_token(&r, 1), knock_token(&r, 2), knock_token(&r, 3)];
        for t in &tokens {
            put_knock(&*store, t);
        }
        store.remove_knock_token(&tokens[1].0).expect("remove");
        store.count_knock_use(&tokens[2].0).expect("count");
        flush(&*store, 1);
        let store = reopen(engine, &place, store);
        let counted = (
            tokens[2].0,
            KnockToken {
                uses: tokens[2].1.uses + 1,
                ..tokens[2].1.clone()
            },
        );
        assert_eq!(knock_of(&*store, &tokens[0].0), Some(tokens[0].1.clone()));
        assert_eq!(knock_of(&*store, &tokens[1].0), None);
        assert_eq!(knock_of(&*store, &counted.0), Some(counted.1.clone()));
        let mut listed = store.knock_tokens_of(&r.owner).expect("knock_tokens_of");
        listed.sort_by_key(|(h, _)| *h);
        assert_eq!(listed, vec![tokens[0].clone(), counted]);
    }
}

/// A sealed store's export carries neither a token nor the instance key in any readable spelling.
fn a_sealed_export_reveals_no_token<E: Engine>(engine: &E) {
    let (_place, store) = engine.fresh(Some(StoreKey::generate()));
    let all = registrations(10);
    put_all(&*store, &all);
    let mut out = Vec::new();
    assert_eq!(store.export(&mut out).expect("export"), all.len());
    for r in &all {
        assert!(
            !reveals(&out, r.token.as_bytes()),
            "{}'s {}-byte token is readable in a sealed export",
            r.node,
            r.token.as_bytes().len()
        );
    }
    let instance = store.instance_key().expect("instance_key");
    assert!(
        !reveals(&out, &instance),
        "the instance key is readable in a sealed export"
    );
}

/// Puts racing from several threads leave a store that agrees with itself: one device moved between nodes
/// by every thread at once ends up with exactly one node, and distinct devices all land.
fn puts_from_many_threads_stay_consistent<E: Engine>(engine: &E) {
    const THREADS: u32 = 4;
    const EACH: u32 = 25;
    let (_place, store) = engine.fresh(None);
    let roaming = registration(0);
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let store = &*store;
            let roaming = &roaming;
            scope.spawn(move || {
                for i in 0..EACH {
                    let n = 1 + t * EACH + i;
                    store.put(&registration(n)).expect("put");
                    let hop = Registration {
                        node: format!("conformance-hop-{t}-{i}"),
                        ..roaming.clone()
                    };
                    store.put(&hop).expect("move the roaming device");
                }
            });
        }
    });
    let seen = scanned(&*store);
    let held: Vec<&Registration> = seen
        .values()
        .filter(|r| r.device == roaming.device)
        .collect();
    assert_eq!(
        held.len(),
        1,
        "the roaming device holds {} nodes",
        held.len()
    );
    assert_eq!(
        node_of(&*store, &roaming.device).as_deref(),
        Some(held[0].node.as_str()),
        "node_for_device of the roaming device"
    );
    let settled: Vec<Registration> = (1..=THREADS * EACH)
        .map(registration)
        .chain([held[0].clone()])
        .collect();
    assert_holds(&*store, &settled, &[], &[]);
    let nodes: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(nodes.len(), settled.len(), "nothing else registered");
}

/// The leak detector behind `a_sealed_export_reveals_no_token` finds a secret in every spelling it
/// claims to, wherever it sits, and nothing that is not there.
#[test]
fn reveals_finds_raw_hex_and_base64_at_any_alignment() {
    let secret = token(9, 32);
    let secret = secret.as_bytes();
    let other = token(10, 32);
    for before in 0..4 {
        let mut record = vec![0xa5; before];
        record.extend_from_slice(secret);
        record.extend_from_slice(b"tail");
        let spellings = [
            record.clone(),
            hex::encode(&record).into_bytes(),
            hex::encode_upper(&record).into_bytes(),
            STANDARD.encode(&record).into_bytes(),
            URL_SAFE.encode(&record).into_bytes(),
        ];
        for spelling in spellings {
            let mut file = br#"{"record":""#.to_vec();
            file.extend_from_slice(&spelling);
            file.extend_from_slice(b"\"}\n");
            assert!(reveals(&file, secret), "offset {before}: {file:?}");
            assert!(!reveals(&file, other.as_bytes()), "offset {before}");
        }
    }
}
