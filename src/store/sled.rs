//! The sled-backed [`Store`]: three trees in one embedded database.
//!
//! `registrations` maps node -> registration (a compact record, see [`super::record`]), `devices` maps device
//! hash -> node, and the default tree holds the instance key: in the clear, or sealed under the store key
//! beside that key's check value when one is configured (see [`super::seal`]). Writes touching two trees
//! run in one sled transaction, so a crash never leaves half a record.
//!
//! Publishes read [`PublishIndex`], an in-memory copy of what they need, rebuilt from `registrations` by a
//! background thread at every open; every write updates sled first and the index after, under one lock, so
//! the index never runs ahead of or behind the store for long enough to answer wrongly.
//!
//! Durability is a group commit: a registration burst shares disk flushes instead of queueing one each, and
//! each flush runs on the blocking pool. (sled 0.34's `flush_async` can miss its wake-up when several run at
//! once and hang forever, which a benchmark at 64 registrations in flight hit.)

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use rand::RngCore;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::index::{Lookup, PublishIndex, PublishTarget};
use super::record::{Codec, PublishFields};
use super::seal::StoreKey;
use super::{Digest, Registration, Store, StoreError};

/// How long a flush may take before the changes waiting on it are reported as not confirmed.
const FLUSH_DEADLINE: Duration = Duration::from_secs(10);
/// sled's page cache. Its default (1 GiB) would let a large store grow RSS far past what a small VM has.
/// Publishes read the index, not sled, so sled's cache serves only registrations and the rebuild: a few
/// MiB do, and the OS page cache holds the rest.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// Registrations the rebuild reads before taking the index's lock once to add them.
const REBUILD_BATCH: usize = 1024;

/// Registrations in a sled database on local disk.
#[derive(Clone)]
pub struct SledStore {
    /// Kept for flushes and the meta tree.
    db: sled::Db,
    /// node -> record ([`super::record`]).
    registrations: sled::Tree,
    /// device hash -> node.
    devices: sled::Tree,
    /// Group commit state, shared by clones.
    commit: Arc<GroupCommit>,
    /// Writes records (sealing tokens when there is a store key) and reads every format.
    codec: Codec,
    /// Keys the JID hashes and node secrets; read (or created) once at open.
    instance_key: [u8; 32],
    /// What publishes read: every registration's token, secret hash, domain and app.
    index: Arc<PublishIndex>,
    /// Held across a write to sled and the matching index update, so two writes to one node cannot reach
    /// the index in the other order than they reached sled.
    writes: Arc<Mutex<()>>,
    /// The background rebuild of the index; stopped and joined when the last clone is dropped.
    _rebuild: Arc<Rebuild>,
}

/// The thread that fills the index from sled after an open.
struct Rebuild {
    /// Asks the thread to stop early (the store is being closed).
    stop: Arc<AtomicBool>,
    /// Joined on drop, so the database is closed once the store is.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Rebuild {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self
            .thread
            .get_mut()
            .map(Option::take)
            .unwrap_or_else(|p| p.into_inner().take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// Tickets for group commit: every flush request takes a ticket; a disk flush that starts after a ticket was
/// taken makes that ticket's changes durable.
#[derive(Default)]
struct GroupCommit {
    /// Tickets handed out so far.
    issued: AtomicU64,
    /// Every ticket up to this one is durable.
    durable: AtomicU64,
    /// One disk flush at a time; waiters queue here and mostly find their ticket already covered.
    running: tokio::sync::Mutex<()>,
    /// Disk flushes done (tests check that they are shared).
    flushes: AtomicU64,
}

/// The instance key in the clear (a store without a store key).
const INSTANCE_KEY: &[u8] = b"instance-key";
/// The instance key sealed under the store key.
const INSTANCE_KEY_SEALED: &[u8] = b"instance-key-sealed";
/// The store key's check value: which key sealed this store.
const STORE_KEY_CHECK: &[u8] = b"store-key-check";
/// What the sealed instance key is bound to.
const INSTANCE_KEY_CONTEXT: &[u8] = b"knock instance key v1";

/// Read the instance key, creating it on a new store; seals it (and records the key's check value) the
/// first time the store is opened with a store key.
fn instance_key(db: &sled::Db, key: Option<&StoreKey>) -> Result<[u8; 32], StoreError> {
    let as_key = |bytes: &[u8]| {
        <[u8; 32]>::try_from(bytes)
            .map_err(|_| StoreError::Corrupt("instance key has the wrong length".into()))
    };
    let check = db.get(STORE_KEY_CHECK)?;
    let Some(key) = key else {
        if check.is_some() {
            return Err(StoreError::KeyRequired);
        }
        let mut fresh = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut fresh);
        let _ = db.compare_and_swap(INSTANCE_KEY, None as Option<&[u8]>, Some(&fresh[..]))?;
        let stored = db
            .get(INSTANCE_KEY)?
            .ok_or_else(|| StoreError::Corrupt("instance key vanished".into()))?;
        return as_key(&stored);
    };
    if check.is_some_and(|c| c.as_ref() != key.check_value()) {
        return Err(StoreError::WrongKey);
    }
    if let Some(sealed) = db.get(INSTANCE_KEY_SEALED)? {
        let opened = key
            .open(INSTANCE_KEY_CONTEXT, &sealed)
            .ok_or_else(|| StoreError::Corrupt("the sealed instance key does not open".into()))?;
        return as_key(&opened);
    }
    // First open with a store key: seal the key this store already had, or a fresh one.
    let instance = match db.get(INSTANCE_KEY)? {
        Some(clear) => as_key(&clear)?,
        None => {
            let mut fresh = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut fresh);
            fresh
        }
    };
    let mut batch = sled::Batch::default();
    batch.insert(
        INSTANCE_KEY_SEALED,
        key.seal(INSTANCE_KEY_CONTEXT, &instance),
    );
    batch.insert(STORE_KEY_CHECK, &key.check_value()[..]);
    batch.remove(INSTANCE_KEY);
    db.apply_batch(batch)?;
    db.flush()?;
    Ok(instance)
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(inner) => inner,
            TransactionError::Storage(e) => e.into(),
        }
    }
}

impl SledStore {
    /// Open (or create) the database in `path`, with tokens in the clear.
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        SledStore::open_with_key(path, None)
    }

    /// Open (or create) the database in `path`. With a store key, tokens are sealed under it, and records
    /// written without it are sealed by the index rebuild; a store once opened with a key will not open
    /// without it ([`StoreError::KeyRequired`]) or with another ([`StoreError::WrongKey`]).
    pub fn open_with_key(path: &Path, key: Option<StoreKey>) -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .open()?;
        let instance_key = instance_key(&db, key.as_ref())?;
        let codec = Codec::new(key);
        let registrations = db.open_tree("registrations")?;
        let index = Arc::new(PublishIndex::new());
        let writes: Arc<Mutex<()>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let rebuild = Rebuilder {
                db: db.clone(),
                registrations: registrations.clone(),
                codec: codec.clone(),
                index: index.clone(),
                writes: writes.clone(),
                stop: stop.clone(),
            };
            std::thread::Builder::new()
                .name("knock-index".into())
                .spawn(move || rebuild.run())
                .map_err(|e| StoreError::Io(format!("starting the index rebuild: {e}")))?
        };
        Ok(SledStore {
            registrations,
            devices: db.open_tree("devices")?,
            db,
            commit: Arc::default(),
            codec,
            instance_key,
            index,
            writes,
            _rebuild: Arc::new(Rebuild {
                stop,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Whether the index holds every registration yet (tests and the benchmark wait for it).
    pub fn index_complete(&self) -> bool {
        self.index.is_complete()
    }

    fn write_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.writes)
    }

    /// Make every change made before the call durable, sharing disk flushes with concurrent callers.
    async fn group_flush(&self) -> Result<(), StoreError> {
        let ticket = self.commit.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let _running = self.commit.running.lock().await;
        if self.commit.durable.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        // Every ticket issued before this point belongs to changes made before the flush below starts.
        let covers = self.commit.issued.load(Ordering::SeqCst);
        let db = self.db.clone();
        let flush = tokio::task::spawn_blocking(move || db.flush());
        match tokio::time::timeout(FLUSH_DEADLINE, flush).await {
            Err(_) => Err(StoreError::Timeout(FLUSH_DEADLINE)),
            Ok(Err(join)) => Err(StoreError::Io(format!("flush task failed: {join}"))),
            Ok(Ok(result)) => {
                result?;
                self.commit.flushes.fetch_add(1, Ordering::Relaxed);
                self.commit.durable.fetch_max(covers, Ordering::SeqCst);
                Ok(())
            }
        }
    }
}

impl Store for SledStore {
    fn get(&self, node: &str) -> Result<Option<Registration>, StoreError> {
        self.registrations
            .get(node.as_bytes())?
            .map(|v| self.codec.decode(node.as_bytes(), &v))
            .transpose()
    }

    fn node_for_device(&self, device: &Digest) -> Result<Option<String>, StoreError> {
        Ok(self
            .devices
            .get(device)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn publish_target(&self, node: &str) -> Result<Option<PublishTarget>, StoreError> {
        match self.index.get(node) {
            Lookup::Found(target) => Ok(Some(target)),
            Lookup::Absent => Ok(None),
            Lookup::Unknown => Ok(self.get(node)?.map(|r| PublishTarget {
                token: r.token,
                secret_hash: r.secret_hash,
                domain: r.domain.into(),
                app: r.app.into(),
            })),
        }
    }

    fn put(&self, registration: &Registration) -> Result<(), StoreError> {
        let record = self.codec.encode(registration)?;
        let fields = PublishFields::of(registration)?;
        let _writes = self.write_lock();
        let dropped = (&self.registrations, &self.devices)
            .transaction(|(regs, devices)| {
                let node = registration.node.as_bytes();
                if let Some(existing) = regs.get(node)? {
                    let existing = self
                        .codec
                        .decode(node, &existing)
                        .map_err(ConflictableTransactionError::Abort)?;
                    if existing.owner != registration.owner {
                        return Err(ConflictableTransactionError::Abort(StoreError::Conflict));
                    }
                    // The owner re-binds its node to another device identity: the old one lets go of it.
                    if existing.device != registration.device
                        && devices.get(existing.device)?.as_deref() == Some(node)
                    {
                        devices.remove(&existing.device)?;
                    }
                }
                let mut dropped = None;
                if let Some(previous) = devices.insert(&registration.device, node)? {
                    if previous.as_ref() != node {
                        regs.remove(&previous)?;
                        dropped = Some(previous);
                    }
                }
                regs.insert(node, record.as_slice())?;
                Ok(dropped)
            })
            .map_err(StoreError::from)?;
        self.index.upsert(&registration.node, &fields);
        if let Some(previous) = dropped {
            self.index.remove(&String::from_utf8_lossy(&previous));
        }
        Ok(())
    }

    fn remove(&self, node: &str) -> Result<Option<Registration>, StoreError> {
        let _writes = self.write_lock();
        let removed = (&self.registrations, &self.devices)
            .transaction(|(regs, devices)| {
                let Some(bytes) = regs.remove(node.as_bytes())? else {
                    return Ok(None);
                };
                let registration = self
                    .codec
                    .decode(node.as_bytes(), &bytes)
                    .map_err(ConflictableTransactionError::Abort)?;
                if devices.get(registration.device)?.as_deref() == Some(node.as_bytes()) {
                    devices.remove(&registration.device)?;
                }
                Ok(Some(registration))
            })
            .map_err(StoreError::from)?;
        self.index.remove(node);
        Ok(removed)
    }

    fn remove_if_token(&self, node: &str, token: &str) -> Result<bool, StoreError> {
        let _writes = self.write_lock();
        let removed = (&self.registrations, &self.devices)
            .transaction(|(regs, devices)| {
                let Some(bytes) = regs.get(node.as_bytes())? else {
                    return Ok(false);
                };
                let registration = self
                    .codec
                    .decode(node.as_bytes(), &bytes)
                    .map_err(ConflictableTransactionError::Abort)?;
                if registration.token != token {
                    return Ok(false);
                }
                regs.remove(node.as_bytes())?;
                if devices.get(registration.device)?.as_deref() == Some(node.as_bytes()) {
                    devices.remove(&registration.device)?;
                }
                Ok(true)
            })
            .map_err(StoreError::from)?;
        if removed {
            self.index.remove(node);
        }
        Ok(removed)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.group_flush())
    }

    fn len(&self) -> Result<usize, StoreError> {
        if self.index.is_complete() {
            return Ok(self.index.len());
        }
        Ok(self.registrations.len())
    }

    fn instance_key(&self) -> Result<[u8; 32], StoreError> {
        Ok(self.instance_key)
    }
}

/// A mutex guarding `()`: a panic while holding it leaves nothing half-done, so poisoning is ignored.
fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the index rebuild thread needs of the store.
struct Rebuilder {
    db: sled::Db,
    registrations: sled::Tree,
    codec: Codec,
    index: Arc<PublishIndex>,
    writes: Arc<Mutex<()>>,
    stop: Arc<AtomicBool>,
}

impl Rebuilder {
    /// Fill the index from every stored registration, a batch per lock, and rewrite records of an older
    /// format in the current one (sealing clear tokens once a store key is configured). Stops early when
    /// asked. A record it cannot read leaves the index incomplete, so misses keep falling through to sled,
    /// which reports the damage to whoever asks for that node.
    fn run(self) {
        let started = std::time::Instant::now();
        let mut batch: Vec<(sled::IVec, sled::IVec)> = Vec::with_capacity(REBUILD_BATCH);
        let (mut damaged, mut rewritten) = (0usize, 0usize);
        let mut iter = self.registrations.iter();
        loop {
            batch.clear();
            for item in iter.by_ref().take(REBUILD_BATCH) {
                match item {
                    Ok(kv) => batch.push(kv),
                    Err(e) => {
                        tracing::error!(error = %e, "reading the store to build the publish index failed; publishes will read the store");
                        return;
                    }
                }
            }
            if batch.is_empty() || self.stop.load(Ordering::Relaxed) {
                break;
            }
            let mut current: Vec<(&str, PublishFields<'_>)> = Vec::with_capacity(batch.len());
            let mut stale = Vec::new();
            for (key, value) in &batch {
                let Ok(node) = std::str::from_utf8(key) else {
                    damaged += 1;
                    continue;
                };
                if !self.codec.is_current(value) {
                    stale.push((key, value));
                }
                match self.codec.publish_fields(key, value) {
                    Ok(Some(fields)) => current.push((node, fields)),
                    // A JSON record of an early version: decode it whole.
                    Ok(None) => match self.codec.decode(key, value) {
                        Ok(r) => match PublishFields::of(&r) {
                            Ok(fields) => self.index.rebuild_batch([(node, fields)]),
                            Err(_) => damaged += 1,
                        },
                        Err(_) => damaged += 1,
                    },
                    Err(_) => damaged += 1,
                }
            }
            self.index.rebuild_batch(current);
            rewritten += self.rewrite(&stale);
        }
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        if rewritten > 0 {
            match self.db.flush() {
                Ok(_) => tracing::info!(rewritten, "records of an older format rewritten"),
                Err(e) => {
                    tracing::error!(error = %e, "flushing rewritten records failed; they are rewritten again at the next start")
                }
            }
        }
        if damaged > 0 {
            tracing::error!(damaged, "records in the store cannot be read; publishes to unknown nodes will read the store");
            return;
        }
        self.index.finish_rebuild();
        tracing::info!(
            registrations = self.index.len(),
            ms = started.elapsed().as_millis() as u64,
            "publish index ready"
        );
    }

    /// Rewrite records in the current format, each only if it is still what the rebuild read (a write since
    /// then wrote the current format already). Returns how many were rewritten.
    fn rewrite(&self, stale: &[(&sled::IVec, &sled::IVec)]) -> usize {
        let _writes = lock(&self.writes);
        let mut rewritten = 0;
        for (key, old) in stale {
            let Ok(registration) = self.codec.decode(key, old) else {
                continue;
            };
            let Ok(new) = self.codec.encode(&registration) else {
                continue;
            };
            match self
                .registrations
                .compare_and_swap(key, Some(old.as_ref()), Some(new))
            {
                Ok(Ok(())) => rewritten += 1,
                Ok(Err(_)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "rewriting a record in the current format failed; it stays readable as it is");
                    return rewritten;
                }
            }
        }
        rewritten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(node: &str, device: u8, token: &str) -> Registration {
        Registration {
            node: node.into(),
            device: [device; 32],
            owner: [device; 32],
            domain: "example.org".into(),
            app: "chat".into(),
            token: token.into(),
            secret_hash: [1; 32],
        }
    }

    /// What sled itself says a publish to `node` would find.
    fn from_sled(store: &SledStore, node: &str) -> Option<PublishTarget> {
        store.get(node).expect("get").map(|r| PublishTarget {
            token: r.token,
            secret_hash: r.secret_hash,
            domain: r.domain.into(),
            app: r.app.into(),
        })
    }

    /// The index answers every node as sled does.
    fn assert_index_agrees(store: &SledStore, nodes: &[&str]) {
        for node in nodes {
            assert_eq!(
                store.publish_target(node).expect("target"),
                from_sled(store, node),
                "{node}"
            );
        }
    }

    fn wait_for_index(store: &SledStore) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !store.index_complete() {
            assert!(
                std::time::Instant::now() < deadline,
                "index rebuild never finished"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn open() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        (dir, store)
    }

    #[test]
    fn put_get_remove_keep_the_device_index_in_step() {
        let (_dir, store) = open();
        wait_for_index(&store);
        let nodes = ["n1", "n2"];
        store.put(&reg("n1", 1, "aa")).expect("put");
        assert_eq!(store.get("n1").expect("get"), Some(reg("n1", 1, "aa")));
        assert_index_agrees(&store, &nodes);
        assert_eq!(
            store.node_for_device(&[1; 32]).expect("idx").as_deref(),
            Some("n1")
        );
        // Same device, same node: token update.
        store.put(&reg("n1", 1, "bb")).expect("update");
        assert_eq!(
            store.get("n1").expect("get").map(|r| r.token).as_deref(),
            Some("bb")
        );
        // Another owner may not take the node.
        assert!(matches!(
            store.put(&reg("n1", 2, "cc")),
            Err(StoreError::Conflict)
        ));
        // The owner may re-bind it to another device identity; the old identity lets go.
        let rebound = Registration {
            device: [3; 32],
            ..reg("n1", 1, "bb")
        };
        store.put(&rebound).expect("rebind");
        assert_eq!(store.node_for_device(&[1; 32]).expect("idx"), None);
        assert_eq!(
            store.node_for_device(&[3; 32]).expect("idx").as_deref(),
            Some("n1")
        );
        store.put(&reg("n1", 1, "bb")).expect("and back");
        assert_index_agrees(&store, &nodes);
        // Same device moving to a new node drops the old node.
        store.put(&reg("n2", 1, "dd")).expect("move");
        assert_eq!(store.get("n1").expect("get"), None);
        assert_eq!(store.len().expect("len"), 1);
        assert_index_agrees(&store, &nodes);
        assert_eq!(
            store.remove("n2").expect("rm").map(|r| r.node).as_deref(),
            Some("n2")
        );
        assert_eq!(store.node_for_device(&[1; 32]).expect("idx"), None);
        assert_index_agrees(&store, &nodes);
        assert_eq!(store.len().expect("len"), 0);
    }

    #[test]
    fn remove_if_token_spares_a_fresh_token() {
        let (_dir, store) = open();
        store.put(&reg("n1", 1, "0e")).expect("put");
        assert!(!store.remove_if_token("n1", "01").expect("rm"));
        assert!(store.get("n1").expect("get").is_some());
        assert!(store.publish_target("n1").expect("target").is_some());
        assert!(store.remove_if_token("n1", "0e").expect("rm"));
        assert!(store.get("n1").expect("get").is_none());
        assert!(store.publish_target("n1").expect("target").is_none());
        assert_eq!(store.node_for_device(&[1; 32]).expect("idx"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_all_finish_and_all_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let tasks: Vec<_> = (0..200u8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store.put(&reg(&format!("n{i}"), i, "aa")).expect("put");
                    store.flush().await
                })
            })
            .collect();
        let all = futures::future::join_all(tasks);
        let results = tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .expect("no flush hangs");
        assert!(results.into_iter().all(|r| matches!(r, Ok(Ok(())))));
        // Far fewer disk flushes than requests: they were shared.
        let flushes = store.commit.flushes.load(Ordering::SeqCst);
        assert!(
            (1..100).contains(&flushes),
            "{flushes} disk flushes for 200 requests"
        );
        drop(store);
        let again = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(again.len().expect("len"), 200);
    }

    #[test]
    fn the_index_is_rebuilt_from_disk_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        // More than one rebuild batch, in two apps and two domains.
        let nodes: Vec<String> = (0..3000).map(|i| format!("node-{i:05}")).collect();
        {
            let store = SledStore::open(dir.path()).expect("open");
            for (i, node) in nodes.iter().enumerate() {
                let mut r = reg(node, 0, &format!("{:064x}", i + 1));
                r.device = [0; 32];
                r.device[..8].copy_from_slice(&(i as u64).to_be_bytes());
                if i % 2 == 0 {
                    r.domain = "other.example".into();
                    r.app = "beta".into();
                }
                store.put(&r).expect("put");
            }
            store.remove(&nodes[7]).expect("remove");
            store.db.flush().expect("flush");
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        wait_for_index(&store);
        assert_eq!(store.len().expect("len"), 2999);
        assert_eq!(store.index.len(), 2999);
        let all: Vec<&str> = nodes.iter().map(String::as_str).collect();
        assert_index_agrees(&store, &all);
        assert_eq!(store.publish_target(&nodes[7]).expect("target"), None);
        assert_eq!(
            store.publish_target("never-registered").expect("target"),
            None
        );
    }

    #[test]
    fn a_store_closed_while_its_index_rebuilds_can_be_reopened_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            for i in 0..2000u32 {
                let mut r = reg(&format!("n{i}"), 0, "aa");
                r.device[..4].copy_from_slice(&i.to_be_bytes());
                store.put(&r).expect("put");
            }
        }
        for _ in 0..5 {
            // Dropping joins the rebuild thread, so the database's lock is free for the next open.
            let store = SledStore::open(dir.path()).expect("reopen while a rebuild may run");
            drop(store);
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        wait_for_index(&store);
        assert_eq!(store.len().expect("len"), 2000);
    }

    /// Every byte of every file under `dir`.
    fn files_bytes(dir: &Path) -> Vec<u8> {
        let mut all = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(path) = pending.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).expect("read_dir") {
                    pending.push(entry.expect("entry").path());
                }
            } else {
                all.extend(std::fs::read(&path).expect("read"));
            }
        }
        all
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn sealed_reg(i: u32) -> Registration {
        let mut r = reg(
            &format!("sealed-node-{i}"),
            0,
            &format!("{:064x}", 0x5eed_0000_u64 + u64::from(i)),
        );
        r.device[..4].copy_from_slice(&i.to_be_bytes());
        r
    }

    #[test]
    fn a_copied_database_reveals_no_token_and_opens_only_with_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = StoreKey::generate();
        let instance = {
            let store = SledStore::open_with_key(dir.path(), Some(key.clone())).expect("open");
            for i in 0..50 {
                store.put(&sealed_reg(i)).expect("put");
            }
            store.db.flush().expect("flush");
            store.instance_key().expect("instance key")
        };
        let files = files_bytes(dir.path());
        assert!(files.len() > 1000, "the database was written");
        for i in 0..50 {
            let r = sealed_reg(i);
            let raw = hex::decode(&r.token).expect("hex");
            assert!(!contains(&files, &raw), "token {i} in the clear on disk");
            assert!(
                !contains(&files, r.token.as_bytes()),
                "token {i} as hex on disk"
            );
        }
        assert!(
            !contains(&files, &instance),
            "instance key in the clear on disk"
        );

        assert!(matches!(
            SledStore::open(dir.path()),
            Err(StoreError::KeyRequired)
        ));
        assert!(matches!(
            SledStore::open_with_key(dir.path(), Some(StoreKey::generate())),
            Err(StoreError::WrongKey)
        ));
        let store = SledStore::open_with_key(dir.path(), Some(key)).expect("reopen");
        assert_eq!(store.instance_key().expect("instance key"), instance);
        wait_for_index(&store);
        let nodes: Vec<String> = (0..50).map(|i| sealed_reg(i).node).collect();
        let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
        assert_index_agrees(&store, &nodes);
        assert_eq!(store.get(nodes[3]).expect("get"), Some(sealed_reg(3)));
    }

    #[test]
    fn a_key_given_to_a_clear_store_seals_it_and_keeps_its_hashes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let instance = {
            let store = SledStore::open(dir.path()).expect("open");
            for i in 0..2500 {
                store.put(&sealed_reg(i)).expect("put");
            }
            store.instance_key().expect("instance key")
        };
        let key = StoreKey::generate();
        {
            let store = SledStore::open_with_key(dir.path(), Some(key.clone())).expect("open");
            // The same instance key, so every device hash and node secret stays valid.
            assert_eq!(store.instance_key().expect("instance key"), instance);
            wait_for_index(&store);
            let sealed = store
                .registrations
                .iter()
                .filter(|kv| kv.as_ref().is_ok_and(|(_, v)| store.codec.is_current(v)))
                .count();
            assert_eq!(sealed, 2500, "every record rewritten sealed");
            assert_eq!(
                store.get("sealed-node-7").expect("get"),
                Some(sealed_reg(7))
            );
        }
        assert!(matches!(
            SledStore::open(dir.path()),
            Err(StoreError::KeyRequired)
        ));
        let store = SledStore::open_with_key(dir.path(), Some(key)).expect("reopen");
        wait_for_index(&store);
        assert_eq!(store.len().expect("len"), 2500);
        assert_index_agrees(&store, &["sealed-node-0", "sealed-node-2499"]);
    }

    #[test]
    fn instance_key_is_stable_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = SledStore::open(dir.path())
            .expect("open")
            .instance_key()
            .expect("key");
        let again = SledStore::open(dir.path())
            .expect("open")
            .instance_key()
            .expect("key");
        assert_eq!(first, again);
    }
}
