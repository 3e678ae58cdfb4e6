//! The sled-backed [`Store`]: three trees in one embedded database, and an in-memory index for publishes.
//!
//! `registrations` maps node -> registration (a compact record, see [`record`]), `devices` maps device
//! hash -> node, and the default tree holds the store's keys ([`keys`]). Writes touching two trees run in
//! one sled transaction, so a crash never leaves half a record.
//!
//! Publishes read [`PublishIndex`], an in-memory copy of what they need, rebuilt from `registrations` by a
//! background thread at every open ([`rebuild`]); every write updates sled first and the index after, under
//! one lock, so the index never answers differently from the store.
//!
//! Durability is a group commit: a registration burst shares disk flushes instead of queueing one each, and
//! each flush runs on the blocking pool. (sled 0.34's `flush_async` can miss its wake-up when several run at
//! once and hang forever, which a benchmark at 64 registrations in flight hit.)
//!
//! After an I/O error (a full disk, say) sled 0.34 fails every later call until it is reopened, even once
//! the disk has room again. So the first I/O error marks the database broken, and the next call starts a
//! reopen on a thread of its own, at most once a second, while writes answer errors; a flush that covers
//! changes made before the reopen is never confirmed. Publishes are answered throughout from the index the
//! broken database left, so a full disk stops registrations, not pushes.

mod backup;
mod huge_pages;
mod index;
mod meta;
mod owners;
mod rebuild;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use self::index::{Lookup, PublishIndex};
use self::rebuild::{Rebuild, Rebuilder};
use crate::push::Token;
use crate::store::keys;
use crate::store::knock::{self, KnockToken};
use crate::store::record::{Codec, PublishFields};
use crate::store::seal::StoreKey;
use crate::store::{
    BackupError, Digest, PublishTarget, Registration, Store, StoreError, StoreOptions,
};

/// How long a flush may take before the changes waiting on it are reported as not confirmed.
const FLUSH_DEADLINE: Duration = Duration::from_secs(10);
/// sled's page cache. Its default (1 GiB) would let a large store grow RSS far past what a small VM has.
/// Publishes read the index, not sled, so sled's cache serves only registrations and the rebuild: a few
/// MiB do, and the OS page cache holds the rest. sled's live memory runs to about twice this figure:
/// 16 MiB held 13 MiB more than 4 MiB does after the rebuild read a million records.
const CACHE_BYTES: u64 = 4 * 1024 * 1024;
/// Least time between two attempts to reopen a broken database.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);
/// How long a reopen waits for calls still using the broken database to let go of it.
const REOPEN_WAIT: Duration = Duration::from_secs(10);

/// Registrations in a sled database on local disk. Clones share one database.
#[derive(Clone)]
pub struct SledStore {
    shared: Arc<Shared>,
}

/// What every clone shares, and what outlives a reopen.
struct Shared {
    /// Where the database lives, for reopening it.
    path: PathBuf,
    /// Writes records (sealing tokens when there is a store key) and reads every format.
    codec: Codec,
    /// Keys the JID hashes and node secrets; read (or created) once at open.
    instance_key: [u8; 32],
    /// Group commit state.
    commit: GroupCommit,
    /// Held across a write to sled and the matching index update, so two writes to one node cannot reach
    /// the index in another order than they reached sled. Shared with the rebuild thread.
    writes: Arc<Mutex<()>>,
    /// The open database, or the index it left while a reopen replaces it.
    current: RwLock<Current>,
    /// sled reported an I/O error: the database must be reopened before it works again.
    broken: AtomicBool,
    /// When the last reopen started.
    last_reopen: Mutex<Option<Instant>>,
}

/// The database, or what is left of it while it is reopened.
enum Current {
    /// Working.
    Open(Arc<Open>),
    /// Closed for a reopen, or a reopen failed (the disk is still full, say). Publishes are still answered
    /// from the index it left, which no write changes meanwhile; everything else fails.
    Closed(Arc<PublishIndex>),
}

/// One open database and the index built from it.
struct Open {
    /// Kept for flushes and the default tree.
    db: sled::Db,
    /// node -> record ([`record`]).
    registrations: sled::Tree,
    /// device hash -> node.
    devices: sled::Tree,
    /// owner hash ++ node -> nothing: every owner's nodes, in one prefix scan.
    owners: sled::Tree,
    /// keyed token hash -> until when (seconds since the epoch, big-endian) it is remembered dead.
    dead_tokens: sled::Tree,
    /// keyed knock-token hash -> its record ([`crate::store::knock`]).
    knock_tokens: sled::Tree,
    /// owner hash ++ knock-token hash -> nothing: every owner's knock tokens, in one prefix scan. Kept in
    /// the same transactions as `knock_tokens`.
    knock_owners: sled::Tree,
    /// What publishes read: every registration's token, secret hash, domain and app.
    index: Arc<PublishIndex>,
    /// The background rebuild of the index, stopped and joined when this is dropped (after the handles
    /// above, so the database closes with it).
    _rebuild: Rebuild,
}

impl Open {
    /// The trees a registration change writes in one transaction: a registration's own, and its knock
    /// tokens', which go with it.
    fn registration_trees(
        &self,
    ) -> (
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
        &sled::Tree,
    ) {
        (
            &self.registrations,
            &self.devices,
            &self.owners,
            &self.knock_tokens,
            &self.knock_owners,
        )
    }

    /// Take over an opened database and start rebuilding its index.
    fn start(db: sled::Db, codec: &Codec, writes: &Arc<Mutex<()>>) -> Result<Open, StoreError> {
        let registrations = db.open_tree("registrations")?;
        let index = Arc::new(PublishIndex::new());
        let rebuild = Rebuild::start(Rebuilder {
            db: db.clone(),
            registrations: registrations.clone(),
            codec: codec.clone(),
            index: index.clone(),
            writes: writes.clone(),
        })
        .map_err(|e| StoreError::Io(format!("starting the index rebuild: {e}")))?;
        let owners = db.open_tree("owners")?;
        if owners.is_empty() && !registrations.is_empty() {
            owners::build(&registrations, &owners, codec)?;
        }
        Ok(Open {
            devices: db.open_tree("devices")?,
            owners,
            dead_tokens: db.open_tree("dead_tokens")?,
            knock_tokens: db.open_tree("knock_tokens")?,
            knock_owners: db.open_tree("knock_owners")?,
            db,
            registrations,
            index,
            _rebuild: rebuild,
        })
    }
}

/// Open sled's database in `path`. A handle just dropped in this process releases the directory's lock
/// a moment later (sled's flusher thread lets go asynchronously), so a lock held is retried for a second
/// before it is reported as another process's.
fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let opened = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            // sled's words for another handle holding the directory.
            Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                if Instant::now() > deadline {
                    return Err(StoreError::InUse);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(other) => return Err(other.into()),
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
    /// Tickets up to this one were taken before the last reopen and are not durable: they fail.
    lost: AtomicU64,
    /// One disk flush at a time; waiters queue here and mostly find their ticket already covered.
    running: tokio::sync::Mutex<()>,
    /// Disk flushes done (tests check that they are shared).
    flushes: AtomicU64,
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

/// A mutex guarding `()`: a panic while holding it leaves nothing half-done, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SledStore {
    /// Open (or create) the database in `path`, with tokens in the clear (tests and tools; knock itself
    /// opens its store through [`crate::store::open`], which creates none in the clear unless asked).
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        SledStore::open_with_key(path, None)
    }

    /// Open (or create) the database in `path`, sealed under `key` if there is one, in the clear otherwise.
    pub fn open_with_key(path: &Path, key: Option<StoreKey>) -> Result<SledStore, StoreError> {
        SledStore::open_as(&StoreOptions {
            postgres: None,
            path: path.to_path_buf(),
            key,
            plaintext_tokens: true,
        })
    }

    /// Open (or create) the database `options` describe. With a store key, tokens are sealed under it, and
    /// records written without it are sealed by the index rebuild; a store once opened with a key will not
    /// open without it ([`StoreError::KeyRequired`]) or with another ([`StoreError::WrongKey`]), and a new
    /// one is not created without one unless `plaintext_tokens` says so ([`StoreError::KeyNeeded`]).
    pub fn open_as(options: &StoreOptions) -> Result<SledStore, StoreError> {
        let (path, key) = (&options.path, options.key.clone());
        let existed = path.exists();
        let db = open_db(path)?;
        let instance_key = match keys::instance_key(&db, key.as_ref(), options.plaintext_tokens) {
            Err(StoreError::KeyNeeded) => {
                // Refused before anything was stored: leave no empty database behind either.
                drop(db);
                if !existed {
                    let _ = std::fs::remove_dir_all(path);
                }
                return Err(StoreError::KeyNeeded);
            }
            other => other?,
        };
        let codec = Codec::new(key);
        let writes = Arc::default();
        let open = Open::start(db, &codec, &writes)?;
        Ok(SledStore {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                codec,
                instance_key,
                commit: GroupCommit::default(),
                writes,
                current: RwLock::new(Current::Open(Arc::new(open))),
                broken: AtomicBool::new(false),
                last_reopen: Mutex::new(None),
            }),
        })
    }

    /// The open database, starting a reopen first if it is broken.
    fn database(&self) -> Result<Arc<Open>, StoreError> {
        match self.current() {
            Current::Open(open) => Ok(open),
            Current::Closed(_) => Err(StoreError::Io(
                "the store is being reopened after an I/O error".into(),
            )),
        }
    }

    /// The database or what is left of it, starting a reopen first if it is broken.
    fn current(&self) -> Current {
        if self.shared.broken.load(Ordering::Acquire) {
            self.start_reopen();
        }
        match &*self
            .shared
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
        {
            Current::Open(open) => Current::Open(open.clone()),
            Current::Closed(index) => Current::Closed(index.clone()),
        }
    }

    /// Pass `result` on, marking the database broken if sled failed with an I/O error.
    fn watch<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Io(e)) = &result {
            if !self.shared.broken.swap(true, Ordering::AcqRel) {
                tracing::error!(error = %e, "the store failed; reopening it");
            }
        }
        result
    }

    fn start_reopen(&self) {
        let mut last = lock(&self.shared.last_reopen);
        if last.is_some_and(|t| t.elapsed() < REOPEN_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        let shared = self.shared.clone();
        // Opening sled replays its log, which can take a second on a large store: not on the runtime.
        let _ = std::thread::Builder::new()
            .name("knock-reopen".into())
            .spawn(move || shared.reopen());
    }

    /// Make every change made before the call durable, sharing disk flushes with concurrent callers.
    async fn group_flush(&self) -> Result<(), StoreError> {
        let commit = &self.shared.commit;
        let ticket = commit.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let _running = commit.running.lock().await;
        if commit.durable.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        if commit.lost.load(Ordering::SeqCst) >= ticket {
            return Err(StoreError::Io(
                "the store was reopened after an I/O error; the change is not confirmed".into(),
            ));
        }
        let open = self.database()?;
        // Every ticket issued before this point belongs to changes made before the flush below starts.
        let covers = commit.issued.load(Ordering::SeqCst);
        let flush = tokio::task::spawn_blocking(move || open.db.flush());
        match tokio::time::timeout(FLUSH_DEADLINE, flush).await {
            Err(_) => Err(StoreError::Timeout(FLUSH_DEADLINE)),
            Ok(Err(join)) => Err(StoreError::Io(format!("flush task failed: {join}"))),
            Ok(Ok(result)) => {
                self.watch(result.map_err(StoreError::from))?;
                commit.flushes.fetch_add(1, Ordering::Relaxed);
                commit.durable.fetch_max(covers, Ordering::SeqCst);
                Ok(())
            }
        }
    }

    fn put_in(&self, open: &Open, registration: &Registration) -> Result<(), StoreError> {
        let codec = &self.shared.codec;
        let record = codec.encode(registration)?;
        let fields = PublishFields::of(registration);
        let _writes = lock(&self.shared.writes);
        // The knock tokens of the node this device leaves, if it leaves one: they go with it. Read under
        // the write lock, which every token write takes too, so none is added meanwhile.
        let leaving = match open.devices.get(registration.device)? {
            Some(previous) if previous.as_ref() != registration.node.as_bytes() => {
                self.knock_tokens_of_node(open, &registration.owner, &previous)?
            }
            _ => Vec::new(),
        };
        let dropped = open
            .registration_trees()
            .transaction(|(regs, devices, owners, knock_tokens, knock_owners)| {
                let node = registration.node.as_bytes();
                if let Some(existing) = regs.get(node)? {
                    let existing = codec
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
                        // A device is one owner's: its previous node was theirs too.
                        owners.remove(owners::key(&registration.owner, &previous))?;
                        for hash in &leaving {
                            knock_tokens.remove(&hash[..])?;
                            knock_owners.remove(owners::key(&registration.owner, hash))?;
                        }
                        dropped = Some(previous);
                    }
                }
                regs.insert(node, record.as_slice())?;
                owners.insert(owners::key(&registration.owner, node), &[])?;
                Ok(dropped)
            })
            .map_err(StoreError::from)?;
        open.index.upsert(&registration.node, &fields);
        if let Some(previous) = dropped {
            open.index.remove(&String::from_utf8_lossy(&previous));
        }
        Ok(())
    }

    /// Rewrite `node`'s registration without its call token, if that is still `token`.
    fn drop_call_token_in(
        &self,
        open: &Open,
        node: &str,
        token: &Token,
    ) -> Result<bool, StoreError> {
        let codec = &self.shared.codec;
        let _writes = lock(&self.shared.writes);
        let rewritten = open
            .registrations
            .transaction(|regs| {
                let Some(bytes) = regs.get(node.as_bytes())? else {
                    return Ok(None);
                };
                let mut registration = codec
                    .decode(node.as_bytes(), &bytes)
                    .map_err(ConflictableTransactionError::Abort)?;
                if registration.call_token.as_ref() != Some(token) {
                    return Ok(None);
                }
                registration.call_token = None;
                let record = codec
                    .encode(&registration)
                    .map_err(ConflictableTransactionError::Abort)?;
                regs.insert(node.as_bytes(), record)?;
                Ok(Some(registration))
            })
            .map_err(StoreError::from)?;
        let Some(registration) = rewritten else {
            return Ok(false);
        };
        open.index.upsert(node, &PublishFields::of(&registration));
        Ok(true)
    }

    /// Remove `node`'s registration if `keep` says so of it; returns what was removed.
    fn remove_in(
        &self,
        open: &Open,
        node: &str,
        keep: impl Fn(&Registration) -> bool,
    ) -> Result<Option<Registration>, StoreError> {
        let codec = &self.shared.codec;
        let _writes = lock(&self.shared.writes);
        // The node's knock tokens go with it. Found before the transaction (which cannot scan), under the
        // write lock, which every token write takes too.
        let tokens = match open.registrations.get(node.as_bytes())? {
            Some(bytes) => {
                let owner = codec.owner(node.as_bytes(), &bytes)?;
                self.knock_tokens_of_node(open, &owner, node.as_bytes())?
            }
            None => Vec::new(),
        };
        let removed = open
            .registration_trees()
            .transaction(|(regs, devices, owners, knock_tokens, knock_owners)| {
                let Some(bytes) = regs.get(node.as_bytes())? else {
                    return Ok(None);
                };
                let registration = codec
                    .decode(node.as_bytes(), &bytes)
                    .map_err(ConflictableTransactionError::Abort)?;
                if keep(&registration) {
                    return Ok(None);
                }
                regs.remove(node.as_bytes())?;
                owners.remove(owners::key(&registration.owner, node.as_bytes()))?;
                if devices.get(registration.device)?.as_deref() == Some(node.as_bytes()) {
                    devices.remove(&registration.device)?;
                }
                for hash in &tokens {
                    knock_tokens.remove(&hash[..])?;
                    knock_owners.remove(owners::key(&registration.owner, hash))?;
                }
                Ok(Some(registration))
            })
            .map_err(StoreError::from)?;
        if removed.is_some() {
            open.index.remove(node);
        }
        Ok(removed)
    }
}

/// Knock tokens.
impl SledStore {
    /// The hashes of `owner`'s knock tokens that wake `node`. Opens each of the owner's records (a handful).
    fn knock_tokens_of_node(
        &self,
        open: &Open,
        owner: &Digest,
        node: &[u8],
    ) -> Result<Vec<Digest>, StoreError> {
        Ok(self
            .knock_tokens_in(open, owner)?
            .into_iter()
            .filter(|(_, token)| token.node.as_bytes() == node)
            .map(|(hash, _)| hash)
            .collect())
    }

    /// Every knock token of `owner`, in hash order.
    fn knock_tokens_in(
        &self,
        open: &Open,
        owner: &Digest,
    ) -> Result<Vec<(Digest, KnockToken)>, StoreError> {
        let key = self.shared.codec.key();
        let mut tokens = Vec::new();
        for entry in open.knock_owners.scan_prefix(owner).keys() {
            let entry = entry?;
            let hash = Digest::try_from(&entry[owner.len()..])
                .map_err(|_| StoreError::Corrupt("a knock owner entry is not 64 bytes".into()))?;
            // An index entry without its record would be a bug; a reader skips it rather than fail.
            if let Some(record) = open.knock_tokens.get(hash)? {
                tokens.push((hash, knock::decode(key, &hash, &record)?));
            }
        }
        Ok(tokens)
    }

    fn put_knock_token_in(
        &self,
        open: &Open,
        hash: &Digest,
        token: &KnockToken,
    ) -> Result<(), StoreError> {
        let record = knock::encode(self.shared.codec.key(), hash, token)?;
        let codec = &self.shared.codec;
        let _writes = lock(&self.shared.writes);
        (&open.registrations, &open.knock_tokens, &open.knock_owners)
            .transaction(|(regs, tokens, owners_index)| {
                // Only for a node its owner holds: a token for a node gone (or never there) would outlive
                // every removal meant to take it along.
                let node = token.node.as_bytes();
                let Some(registration) = regs.get(node)? else {
                    return Err(ConflictableTransactionError::Abort(knock::unregistered()));
                };
                let owner = codec
                    .owner(node, &registration)
                    .map_err(ConflictableTransactionError::Abort)?;
                if owner != token.owner {
                    return Err(ConflictableTransactionError::Abort(StoreError::Conflict));
                }
                if let Some(old) = tokens.insert(&hash[..], record.as_slice())? {
                    let old_owner =
                        knock::owner_of(&old).map_err(ConflictableTransactionError::Abort)?;
                    owners_index.remove(owners::key(&old_owner, hash))?;
                }
                owners_index.insert(owners::key(&token.owner, hash), &[])?;
                Ok(())
            })
            .map_err(StoreError::from)
    }

    fn remove_knock_token_in(&self, open: &Open, hash: &Digest) -> Result<bool, StoreError> {
        let _writes = lock(&self.shared.writes);
        (&open.knock_tokens, &open.knock_owners)
            .transaction(|(tokens, owners_index)| {
                let Some(old) = tokens.remove(&hash[..])? else {
                    return Ok(false);
                };
                let owner = knock::owner_of(&old).map_err(ConflictableTransactionError::Abort)?;
                owners_index.remove(owners::key(&owner, hash))?;
                Ok(true)
            })
            .map_err(StoreError::from)
    }

    fn count_knock_use_in(&self, open: &Open, hash: &Digest) -> Result<(), StoreError> {
        // In place and lock-free: sled retries the update if the record changed meanwhile. A record too
        // short to count in is left as it is (reading it reports the corruption).
        open.knock_tokens.update_and_fetch(hash, |old| {
            old.map(|old| {
                let mut record = old.to_vec();
                let _ = knock::count_use(&mut record);
                record
            })
        })?;
        Ok(())
    }
}

impl Shared {
    /// Replace a broken database with a freshly opened one. Runs on its own thread.
    fn reopen(&self) {
        let taken = {
            let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
            match &*current {
                Current::Open(open) => {
                    let index = open.index.clone();
                    match std::mem::replace(&mut *current, Current::Closed(index)) {
                        Current::Open(open) => Some(open),
                        Current::Closed(_) => None,
                    }
                }
                Current::Closed(_) => None,
            }
        };
        if let Some(mut old) = taken {
            // A call may still hold it (a flush on the blocking pool); sled's lock on the directory is
            // released only once every handle is gone.
            let deadline = Instant::now() + REOPEN_WAIT;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(open) => {
                        drop(open);
                        break;
                    }
                    Err(back) if Instant::now() < deadline => {
                        old = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(back) => {
                        tracing::error!("the broken store is still in use; reopening later");
                        *self.current.write().unwrap_or_else(|p| p.into_inner()) =
                            Current::Open(back);
                        return;
                    }
                }
            }
        }
        // Changes made on the broken database and not flushed may be gone: no flush may confirm them.
        // A caller takes its flush ticket right after its write, with no await between, while this reopen
        // takes at least a sled open; only a thread descheduled for that long between the two could take a
        // ticket after this line for a change made on the old database.
        self.commit
            .lost
            .fetch_max(self.commit.issued.load(Ordering::SeqCst), Ordering::SeqCst);
        match open_db(&self.path).and_then(|db| Open::start(db, &self.codec, &self.writes)) {
            Ok(open) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) =
                    Current::Open(Arc::new(open));
                self.broken.store(false, Ordering::Release);
                tracing::warn!("the store was reopened after an I/O error");
            }
            Err(e) => tracing::error!(error = %e, "reopening the store failed; trying again"),
        }
    }
}

impl Store for SledStore {
    fn get(&self, node: &str) -> Result<Option<Registration>, StoreError> {
        let open = self.database()?;
        self.watch(
            open.registrations
                .get(node.as_bytes())
                .map_err(StoreError::from)
                .and_then(|v| {
                    v.map(|v| self.shared.codec.decode(node.as_bytes(), &v))
                        .transpose()
                }),
        )
    }

    fn node_for_device(&self, device: &Digest) -> Result<Option<String>, StoreError> {
        let open = self.database()?;
        self.watch(open.devices.get(device).map_err(StoreError::from))
            .map(|v| v.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn nodes_of(&self, owner: &Digest) -> Result<Vec<String>, StoreError> {
        let open = self.database()?;
        self.watch(owners::nodes(&open.owners, owner))
    }

    fn publish_target(&self, node: &str) -> Result<Option<PublishTarget>, StoreError> {
        let index = match self.current() {
            Current::Open(open) => open.index.clone(),
            Current::Closed(index) => index,
        };
        match index.get(node) {
            Lookup::Found(target) => Ok(Some(target)),
            Lookup::Absent => Ok(None),
            Lookup::Unknown => Ok(self.get(node)?.as_ref().map(PublishTarget::from)),
        }
    }

    fn put(&self, registration: &Registration) -> Result<(), StoreError> {
        let open = self.database()?;
        self.watch(self.put_in(&open, registration))
    }

    fn remove(&self, node: &str) -> Result<Option<Registration>, StoreError> {
        let open = self.database()?;
        self.watch(self.remove_in(&open, node, |_| false))
    }

    fn remove_if_token(&self, node: &str, token: &Token) -> Result<bool, StoreError> {
        let open = self.database()?;
        self.watch(self.remove_in(&open, node, |r| r.token != *token))
            .map(|removed| removed.is_some())
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.group_flush())
    }

    fn drop_call_token(&self, node: &str, token: &Token) -> Result<bool, StoreError> {
        let open = self.database()?;
        self.watch(self.drop_call_token_in(&open, node, token))
    }

    fn remember_dead(&self, token: &Digest, until: u64) -> Result<(), StoreError> {
        let open = self.database()?;
        self.watch(
            open.dead_tokens
                .insert(token, &until.to_be_bytes())
                .map(drop)
                .map_err(StoreError::from),
        )
    }

    fn is_dead(&self, token: &Digest, now: u64) -> Result<bool, StoreError> {
        let open = self.database()?;
        let Some(until) = self.watch(open.dead_tokens.get(token).map_err(StoreError::from))? else {
            return Ok(false);
        };
        let until = <[u8; 8]>::try_from(&*until)
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("a dead-token entry is not 8 bytes".into()))?;
        if until > now {
            return Ok(true);
        }
        // Expired: forget it, unless it was renewed meanwhile.
        let expired = until.to_be_bytes();
        let _ = open
            .dead_tokens
            .compare_and_swap(token, Some(&expired[..]), None::<&[u8]>);
        Ok(false)
    }

    fn counts_by_app(&self) -> Result<Option<Vec<(String, usize)>>, StoreError> {
        Ok(self.database()?.index.counts_by_app())
    }

    fn len(&self) -> Result<usize, StoreError> {
        let open = self.database()?;
        if open.index.is_complete() {
            return Ok(open.index.len());
        }
        Ok(open.registrations.len())
    }

    fn instance_key(&self) -> Result<[u8; 32], StoreError> {
        Ok(self.shared.instance_key)
    }

    /// In node order.
    fn scan(&self, each: &mut dyn FnMut(Registration)) -> Result<usize, StoreError> {
        let open = self.database()?;
        let mut count = 0;
        for item in open.registrations.iter() {
            let (node, record) = self.watch(item.map_err(StoreError::from))?;
            each(self.shared.codec.decode(&node, &record)?);
            count += 1;
        }
        Ok(count)
    }

    fn is_sealed(&self) -> bool {
        self.shared.codec.key().is_some()
    }

    /// Once the index rebuild has read every registration.
    fn is_warm(&self) -> bool {
        self.database().is_ok_and(|open| open.index.is_complete())
    }

    fn export(&self, out: &mut dyn std::io::Write) -> Result<usize, BackupError> {
        self.write_export(out)
    }

    fn put_knock_token(&self, hash: &Digest, token: &KnockToken) -> Result<(), StoreError> {
        let open = self.database()?;
        self.watch(self.put_knock_token_in(&open, hash, token))
    }

    fn knock_token(&self, hash: &Digest) -> Result<Option<KnockToken>, StoreError> {
        let open = self.database()?;
        let record = self.watch(open.knock_tokens.get(hash).map_err(StoreError::from))?;
        record
            .map(|r| knock::decode(self.shared.codec.key(), hash, &r))
            .transpose()
    }

    fn knock_tokens_of(&self, owner: &Digest) -> Result<Vec<(Digest, KnockToken)>, StoreError> {
        let open = self.database()?;
        self.watch(self.knock_tokens_in(&open, owner))
    }

    fn remove_knock_token(&self, hash: &Digest) -> Result<bool, StoreError> {
        let open = self.database()?;
        self.watch(self.remove_knock_token_in(&open, hash))
    }

    fn count_knock_use(&self, hash: &Digest) -> Result<(), StoreError> {
        let open = self.database()?;
        self.watch(self.count_knock_use_in(&open, hash))
    }
}
