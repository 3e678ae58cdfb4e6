//! The PostgreSQL engine against a real PostgreSQL: the store conformance suite, and what only this engine
//! has (several instances on one database, a database restarted under it).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use testkit::postgres::TempCluster;

use super::{PostgresOptions, PostgresStore};
use crate::store::conformance::{self, Opened};
use crate::store::{BackupError, Store, StoreKey, StoreOptions};

/// One throwaway PostgreSQL for this test process (Debian's `postgresql`, started as an unprivileged
/// user), shared by the tests, each store in a database of its own.
fn cluster() -> &'static TempCluster {
    static CLUSTER: OnceLock<TempCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        TempCluster::start()
            .unwrap_or_else(|e| panic!("a throwaway PostgreSQL for the tests: {e:#}"))
    })
}

/// A new database of its own for one store; its URL.
fn new_database() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!("knock_test_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let cluster = cluster();
    cluster
        .psql(&format!("CREATE DATABASE {name} OWNER {}", cluster.user()))
        .unwrap_or_else(|e| panic!("create a database: {e:#}"));
    let url = cluster.url();
    match url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => url,
    }
}

fn options(url: &str, key: Option<StoreKey>) -> StoreOptions {
    let tls = crate::push::http::tls_builder(None)
        .expect("TLS roots")
        .with_no_client_auth();
    StoreOptions {
        path: Default::default(),
        postgres: Some(PostgresOptions {
            url: url.to_owned(),
            password: None,
            require_tls: false,
            tls: tokio_postgres_rustls::MakeRustlsConnect::new(tls),
        }),
        key,
        plaintext_tokens: true,
    }
}

fn open(url: &str, key: Option<StoreKey>) -> PostgresStore {
    let options = options(url, key);
    PostgresStore::open(&options, options.postgres.as_ref().expect("postgres")).expect("open")
}

/// The engine as the conformance suite drives it: every store in a database of its own.
struct PostgresEngine;

/// A store's database, and the key it is opened with.
struct Place {
    url: String,
    key: Option<StoreKey>,
}

impl conformance::Engine for PostgresEngine {
    type Place = Place;

    fn fresh(&self, key: Option<StoreKey>) -> Opened<Place> {
        let url = new_database();
        let store = open(&url, key.clone());
        (Place { url, key }, Arc::new(store))
    }

    fn reopen(&self, place: &Place, store: Arc<dyn Store>) -> Arc<dyn Store> {
        drop(store);
        Arc::new(open(&place.url, place.key.clone()))
    }

    fn import(
        &self,
        file: &Path,
        key: Option<StoreKey>,
    ) -> Result<(usize, Opened<Place>), BackupError> {
        let url = new_database();
        let options = options(&url, key.clone());
        let count =
            PostgresStore::import(&options, options.postgres.as_ref().expect("postgres"), file)?;
        let store = open(&url, key.clone());
        Ok((count, (Place { url, key }, Arc::new(store))))
    }
}

#[test]
fn postgres_passes_the_store_conformance_suite() {
    conformance::run_all(&PostgresEngine);
}

/// A registration of `owner` byte `n` for node `node`, with a token of its own.
fn registration(node: &str, n: u8) -> crate::store::Registration {
    crate::store::Registration {
        node: node.to_owned(),
        device: [n; 32],
        owner: [n.wrapping_add(100); 32],
        domain: "example.org".into(),
        app: "chat".into(),
        provider: crate::push::ProviderKind::Apns,
        token: crate::push::Token::from_bytes(vec![n; 32]),
        secret_hash: Some([n.wrapping_add(7); 32]),
        call_token: None,
        account: None,
    }
}

/// Wait until `check` holds, polling; how long it took. Panics after 5 s.
fn within(what: &str, check: impl Fn() -> bool) -> std::time::Duration {
    let started = std::time::Instant::now();
    while !check() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{what} did not happen within 5 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    started.elapsed()
}

fn flush(store: &PostgresStore) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(store.flush())
        .expect("flush");
}

#[test]
fn what_one_instance_writes_another_serves_within_milliseconds() {
    let url = new_database();
    let key = Some(StoreKey::generate());
    let a = open(&url, key.clone());
    let b = open(&url, key);
    assert_eq!(
        a.instance_key().ok(),
        b.instance_key().ok(),
        "one instance key per database"
    );

    // A registration made through one instance is pushable through the other.
    let r = registration("node-1", 1);
    a.put(&r).expect("put");
    flush(&a);
    let took = within("b sees a's registration", || {
        b.publish_target("node-1").ok().flatten().is_some()
    });
    assert_eq!(b.get("node-1").expect("get"), Some(r.clone()));
    assert_eq!(
        b.node_for_device(&r.device).expect("device"),
        Some("node-1".into())
    );
    eprintln!("a registration reached the other instance in {took:?}");

    // A new token, a move to another node, and a removal travel the same way.
    let mut moved = registration("node-2", 1);
    moved.token = crate::push::Token::from_bytes(vec![0xee; 32]);
    a.put(&moved).expect("put");
    flush(&a);
    within("b sees the move", || {
        b.get("node-1").ok().flatten().is_none()
            && b.get("node-2").ok().flatten() == Some(moved.clone())
    });
    b.remove("node-2").expect("remove");
    flush(&b);
    within("a sees the removal", || {
        a.get("node-2").ok().flatten().is_none()
    });

    // Another owner cannot take a node through either instance.
    let mine = registration("node-3", 3);
    a.put(&mine).expect("put");
    flush(&a);
    within("b sees node-3", || b.get("node-3").ok().flatten().is_some());
    let theirs = registration("node-3", 4);
    assert!(matches!(
        b.put(&theirs),
        Err(crate::store::StoreError::Conflict)
    ));
    assert_eq!(a.len().ok(), b.len().ok());
}

#[test]
fn a_dead_token_reported_through_one_instance_spares_a_token_renewed_through_another() {
    let url = new_database();
    let a = open(&url, None);
    let b = open(&url, None);
    let old = registration("node-1", 1);
    a.put(&old).expect("put");
    flush(&a);
    within("b sees it", || b.get("node-1").ok().flatten().is_some());
    // b renews the token; a, not yet told, learns the old token is dead.
    let mut renewed = old.clone();
    renewed.token = crate::push::Token::from_bytes(vec![0xab; 32]);
    b.put(&renewed).expect("put");
    flush(&b);
    let _ = a.remove_if_token("node-1", &old.token);
    flush(&a);
    // Whatever order the two met in, the renewed registration survives in the database, and both
    // instances serve it.
    let c = open(&url, None);
    assert_eq!(c.get("node-1").expect("get"), Some(renewed.clone()));
    within("a serves the renewed token", || {
        a.get("node-1").ok().flatten() == Some(renewed.clone())
    });
}

#[test]
fn a_restarted_database_costs_no_registration_and_publishes_go_on_meanwhile() {
    // A cluster of its own: the others' tests must not see it go down.
    let mut own = TempCluster::start().unwrap_or_else(|e| panic!("a throwaway PostgreSQL: {e:#}"));
    let store = open(&own.url(), None);
    let before = registration("node-1", 1);
    store.put(&before).expect("put");
    flush(&store);

    own.stop().expect("stop PostgreSQL");
    // Publishes are answered from memory; a registration is not acknowledged while nothing can commit it.
    assert!(store.publish_target("node-1").expect("read").is_some());
    let during = registration("node-2", 2);
    store.put(&during).expect("put is queued");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    assert!(
        runtime.block_on(store.flush()).is_err(),
        "no commit without the database"
    );

    own.start_again().expect("start PostgreSQL again");
    // Recovery without a restart of knock: the queued registration commits, later flushes succeed.
    within("a flush succeeds again", || {
        runtime.block_on(store.flush()).is_ok()
    });
    drop(store);
    let reopened = open(&own.url(), None);
    assert_eq!(reopened.get("node-1").expect("get"), Some(before));
    assert_eq!(reopened.get("node-2").expect("get"), Some(during));
}

#[test]
fn a_lost_notification_connection_is_made_good_by_reading_everything_again() {
    let url = new_database();
    let a = open(&url, None);
    let b = open(&url, None);
    let first = registration("node-1", 1);
    a.put(&first).expect("put");
    flush(&a);
    within("b sees node-1", || b.get("node-1").ok().flatten().is_some());

    // Cut every instance's listening connection, then write at once: the notification of this write
    // reaches no one.
    let cut = cluster()
        .psql(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = '{}' AND application_name LIKE 'knock-%-listen'",
            url.rsplit('/').next().expect("database")
        ))
        .expect("terminate the listeners");
    assert!(
        cut.trim().ends_with('2') || cut.contains(" 2"),
        "two listeners cut: {cut}"
    );
    let second = registration("node-2", 2);
    a.put(&second).expect("put");
    flush(&a);
    let took = within("b sees node-2 after re-reading", || {
        b.get("node-2").ok().flatten() == Some(second.clone())
    });
    eprintln!("after a lost notification connection, the other instance caught up in {took:?}");
}

#[test]
fn knock_tokens_written_through_one_instance_are_seen_and_counted_through_another() {
    let url = new_database();
    let key = Some(StoreKey::generate());
    let a = open(&url, key.clone());
    let b = open(&url, key);
    let r = registration("node-k", 3);
    a.put(&r).expect("put");
    let hash = [0xcc; 32];
    let token = crate::store::KnockToken {
        id: [1, 2, 3, 4, 5, 6, 7, 8],
        node: r.node.clone(),
        owner: r.owner,
        expires: 1_900_000_000,
        per_hour: 20,
        grace_until: None,
        uses: 0,
    };
    a.put_knock_token(&hash, &token).expect("put_knock_token");
    flush(&a);
    within("b sees a's knock token", || {
        b.knock_token(&hash).ok().flatten().as_ref() == Some(&token)
    });
    assert_eq!(
        b.knock_tokens_of(&r.owner).expect("knock_tokens_of"),
        vec![(hash, token.clone())]
    );

    // Uses counted through both instances add up in the database rather than overwrite each other.
    a.count_knock_use(&hash).expect("count");
    b.count_knock_use(&hash).expect("count");
    b.count_knock_use(&hash).expect("count");
    flush(&a);
    flush(&b);
    let c = open(&url, Some(a.shared.codec.key().expect("sealed").clone()));
    assert_eq!(
        c.knock_token(&hash).expect("knock_token").map(|t| t.uses),
        Some(3)
    );

    // The registration removed through b takes the token along, in a's memory too.
    b.remove(&r.node).expect("remove");
    flush(&b);
    within("a forgets the token of the removed node", || {
        a.knock_token(&hash).ok().flatten().is_none()
    });
    assert!(a
        .knock_tokens_of(&r.owner)
        .expect("knock_tokens_of")
        .is_empty());
}

#[test]
fn a_knock_token_never_outlives_its_registration_whichever_instance_wrote_what() {
    let url = new_database();
    let key = Some(StoreKey::generate());
    let a = open(&url, key.clone());
    let b = open(&url, key.clone());
    let token = |node: &str, owner| crate::store::KnockToken {
        id: [9; 8],
        node: node.to_owned(),
        owner,
        expires: 1_900_000_000,
        per_hour: 5,
        grace_until: None,
        uses: 0,
    };
    let fresh_view = || open(&url, key.clone());

    // b writes a token for a node a has just removed, before b hears of the removal: the database
    // refuses it, and b's flush says so rather than acknowledge a token nobody can use.
    let r = registration("node-race-1", 4);
    a.put(&r).expect("put");
    flush(&a);
    within("b sees the node", || {
        b.get(&r.node).ok().flatten().is_some()
    });
    a.remove(&r.node).expect("remove");
    flush(&a);
    let late = [0xd1; 32];
    let written = b
        .put_knock_token(&late, &token(&r.node, r.owner))
        .and_then(|()| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(b.flush())
        });
    // Refused at once, or by the database: then the flush fails or, if the refusal came in an earlier
    // batch than the flush, memory has dropped the token by the time the flush returns.
    assert!(
        written.is_err() || b.knock_token(&late).expect("read").is_none(),
        "a token for a removed node is not taken"
    );
    assert_eq!(fresh_view().knock_token(&late).expect("read"), None);
    within("b forgets it", || {
        b.knock_token(&late).ok().flatten().is_none()
    });

    // a removes a node right after b gave it a token a has not heard of yet: the token goes too.
    let r = registration("node-race-2", 5);
    a.put(&r).expect("put");
    flush(&a);
    within("b sees the node", || {
        b.get(&r.node).ok().flatten().is_some()
    });
    let early = [0xd2; 32];
    b.put_knock_token(&early, &token(&r.node, r.owner))
        .expect("put_knock_token");
    flush(&b);
    a.remove(&r.node).expect("remove");
    flush(&a);
    assert_eq!(fresh_view().knock_token(&early).expect("read"), None);
    within("b forgets it", || {
        b.knock_token(&early).ok().flatten().is_none()
    });
}
