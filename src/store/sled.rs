//! The sled-backed [`Store`]: three trees in one embedded database.
//!
//! `registrations` maps node -> registration (a compact record, see [`super::record`]), `devices` maps device
//! hash -> node, `meta` holds the instance key. Writes touching two trees run in one sled transaction, so a
//! crash never leaves half a record.
//!
//! Durability is a group commit: a registration burst shares disk flushes instead of queueing one each, and
//! each flush runs on the blocking pool. (sled 0.34's `flush_async` can miss its wake-up when several run at
//! once and hang forever, which a benchmark at 64 registrations in flight hit.)

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rand::RngCore;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::record::{decode, encode};
use super::{Digest, Registration, Store, StoreError};

/// How long a flush may take before the changes waiting on it are reported as not confirmed.
const FLUSH_DEADLINE: Duration = Duration::from_secs(10);
/// sled's page cache. Its default (1 GiB) would let a large store grow RSS far past what a small VM has; a
/// few tens of MiB keep the hot part of a million registrations and the OS page cache holds the rest.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Registrations in a sled database on local disk.
#[derive(Clone)]
pub struct SledStore {
    /// Kept for flushes and the meta tree.
    db: sled::Db,
    /// node -> JSON-encoded [`Registration`].
    registrations: sled::Tree,
    /// device hash -> node.
    devices: sled::Tree,
    /// Group commit state, shared by clones.
    commit: Arc<GroupCommit>,
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

const INSTANCE_KEY: &[u8] = b"instance-key";

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
    /// Open (or create) the database in `path`.
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .open()?;
        Ok(SledStore {
            registrations: db.open_tree("registrations")?,
            devices: db.open_tree("devices")?,
            db,
            commit: Arc::default(),
        })
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
            .map(|v| decode(node.as_bytes(), &v))
            .transpose()
    }

    fn node_for_device(&self, device: &Digest) -> Result<Option<String>, StoreError> {
        Ok(self
            .devices
            .get(device)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn put(&self, registration: &Registration) -> Result<(), StoreError> {
        let record = encode(registration)?;
        (&self.registrations, &self.devices)
            .transaction(|(regs, devices)| {
                let node = registration.node.as_bytes();
                if let Some(existing) = regs.get(node)? {
                    let existing =
                        decode(node, &existing).map_err(ConflictableTransactionError::Abort)?;
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
                if let Some(previous) = devices.insert(&registration.device, node)? {
                    if previous.as_ref() != node {
                        regs.remove(previous)?;
                    }
                }
                regs.insert(node, record.as_slice())?;
                Ok(())
            })
            .map_err(StoreError::from)
    }

    fn remove(&self, node: &str) -> Result<Option<Registration>, StoreError> {
        (&self.registrations, &self.devices)
            .transaction(|(regs, devices)| {
                let Some(bytes) = regs.remove(node.as_bytes())? else {
                    return Ok(None);
                };
                let registration =
                    decode(node.as_bytes(), &bytes).map_err(ConflictableTransactionError::Abort)?;
                if devices.get(registration.device)?.as_deref() == Some(node.as_bytes()) {
                    devices.remove(&registration.device)?;
                }
                Ok(Some(registration))
            })
            .map_err(StoreError::from)
    }

    fn remove_if_token(&self, node: &str, token: &str) -> Result<bool, StoreError> {
        (&self.registrations, &self.devices)
            .transaction(|(regs, devices)| {
                let Some(bytes) = regs.get(node.as_bytes())? else {
                    return Ok(false);
                };
                let registration =
                    decode(node.as_bytes(), &bytes).map_err(ConflictableTransactionError::Abort)?;
                if registration.token != token {
                    return Ok(false);
                }
                regs.remove(node.as_bytes())?;
                if devices.get(registration.device)?.as_deref() == Some(node.as_bytes()) {
                    devices.remove(&registration.device)?;
                }
                Ok(true)
            })
            .map_err(StoreError::from)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.group_flush())
    }

    fn len(&self) -> Result<usize, StoreError> {
        Ok(self.registrations.len())
    }

    fn instance_key(&self) -> Result<[u8; 32], StoreError> {
        let mut fresh = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut fresh);
        // compare_and_swap makes two racing first starts agree on one key.
        let _ = self
            .db
            .compare_and_swap(INSTANCE_KEY, None as Option<&[u8]>, Some(&fresh[..]))?;
        let stored = self
            .db
            .get(INSTANCE_KEY)?
            .ok_or_else(|| StoreError::Corrupt("instance key vanished".into()))?;
        stored
            .as_ref()
            .try_into()
            .map_err(|_| StoreError::Corrupt("instance key has the wrong length".into()))
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

    fn open() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        (dir, store)
    }

    #[test]
    fn put_get_remove_keep_the_device_index_in_step() {
        let (_dir, store) = open();
        store.put(&reg("n1", 1, "aa")).expect("put");
        assert_eq!(store.get("n1").expect("get"), Some(reg("n1", 1, "aa")));
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
        // Same device moving to a new node drops the old node.
        store.put(&reg("n2", 1, "dd")).expect("move");
        assert_eq!(store.get("n1").expect("get"), None);
        assert_eq!(store.len().expect("len"), 1);
        assert_eq!(
            store.remove("n2").expect("rm").map(|r| r.node).as_deref(),
            Some("n2")
        );
        assert_eq!(store.node_for_device(&[1; 32]).expect("idx"), None);
    }

    #[test]
    fn remove_if_token_spares_a_fresh_token() {
        let (_dir, store) = open();
        store.put(&reg("n1", 1, "0e")).expect("put");
        assert!(!store.remove_if_token("n1", "01").expect("rm"));
        assert!(store.get("n1").expect("get").is_some());
        assert!(store.remove_if_token("n1", "0e").expect("rm"));
        assert!(store.get("n1").expect("get").is_none());
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
