//! The PostgreSQL engine's own thread: its connections, the writer that commits changes in batches, and the
//! listener that keeps the in-memory copy coherent with what other instances write.
//!
//! The [`Store`](crate::store::Store) trait is synchronous but for `flush`, and knock's main runtime has one
//! thread, so nothing here may block it: every read is answered from memory ([`super::memory`]), and every
//! change is applied to memory at once and queued here, in order. The writer takes what is queued, writes it
//! in one transaction (the statements pipelined), and answers the flushes queued among the changes once the
//! transaction has committed: a registration is acknowledged only after its commit. A failed transaction is
//! retried, on a new connection if need be, until it commits; meanwhile flushes time out and the publish
//! path, which reads memory, goes on.
//!
//! Each instance names itself (`application_name = knock-<random>`), and a trigger notifies every change as
//! `<name> <node>` ([`super::schema::CHANNEL`]). The listener re-reads the nodes other instances changed,
//! usually within milliseconds; when its connection is lost it reconnects and re-reads everything, since
//! notifications sent meanwhile are gone. Nodes with changes of this instance's own still queued keep their
//! in-memory state, which the commit then makes true (or, on a conflict, re-reads).

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::Duration;

use futures::future::{join_all, BoxFuture};
use futures::StreamExt;
use rand::RngCore;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{AsyncMessage, Client, Statement};

use super::memory::{Knock, Memory};
use super::schema::{self, io, CHANNEL, KNOCK_CHANNEL};
use super::PostgresOptions;
use crate::store::keys::Meta;
use crate::store::record::Codec;
use crate::store::{Digest, Registration, StoreError};

/// Most changes written in one transaction.
const BATCH: usize = 1024;
/// First pause before reconnecting after a failure; doubled up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Longest pause between reconnection attempts: a restarted PostgreSQL is used again within this.
const MAX_RETRY: Duration = Duration::from_secs(1);
/// How long a store being dropped keeps retrying a write the database refuses.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One change, as queued.
pub(super) enum Change {
    /// Insert or replace a registration (the device's other node goes with it).
    Put {
        /// The registration.
        registration: Box<Registration>,
        /// Its record, as stored.
        record: Vec<u8>,
        /// The knock tokens of the node the device leaves: deleted only if the put is taken.
        knocks: Vec<Digest>,
    },
    /// Delete a node; with `record`, only if the row still holds exactly that record.
    Delete {
        /// The node.
        node: String,
        /// The record this instance saw, for a conditional delete.
        record: Option<Vec<u8>>,
        /// The node's knock tokens: deleted with it, and only if it is.
        knocks: Vec<Digest>,
    },
    /// Remember a dead token until a time (seconds since the epoch).
    Dead {
        /// The token's keyed hash.
        token: Digest,
        /// Until when.
        until: u64,
    },
    /// Forget a dead token whose memory ended at `until`, unless it was renewed since.
    Forget {
        /// The token's keyed hash.
        token: Digest,
        /// The end it had.
        until: u64,
    },
    /// Insert or replace a knock token.
    KnockPut {
        /// The token's keyed hash.
        hash: Digest,
        /// Its owner's keyed hash, the column listing reads.
        owner: Digest,
        /// The registration it wakes: it is written only while that is the owner's.
        node: String,
        /// Its record, as stored.
        record: Vec<u8>,
    },
    /// Delete a knock token.
    KnockDelete {
        /// The token's keyed hash.
        hash: Digest,
    },
    /// Count one use of a knock token, in the database's record (so instances' counts add up).
    KnockUse {
        /// The token's keyed hash.
        hash: Digest,
    },
}

impl Change {
    /// What a change is about, as [`Shared::queued`] counts it: a node, or a knock token's
    /// [`knock_key`]. Dead tokens are not tracked.
    pub fn key(&self) -> Option<String> {
        match self {
            Change::Put { registration, .. } => Some(registration.node.clone()),
            Change::Delete { node, .. } => Some(node.clone()),
            Change::Dead { .. } | Change::Forget { .. } => None,
            Change::KnockPut { hash, .. }
            | Change::KnockDelete { hash }
            | Change::KnockUse { hash } => Some(knock_key(hash)),
        }
    }

    /// Whether the change is about a registration (and may conflict).
    fn is_registration(&self) -> bool {
        matches!(
            self,
            Change::Put { .. } | Change::Delete { .. } | Change::KnockPut { .. }
        )
    }

    /// The knock tokens a registration change takes along, if the database takes it.
    fn knocks(&self) -> &[Digest] {
        match self {
            Change::Put { knocks, .. } | Change::Delete { knocks, .. } => knocks,
            _ => &[],
        }
    }
}

/// What marks a knock token's key among nodes in the pending map and the notification queue: a NUL,
/// which a node (PostgreSQL `text`) can never hold.
const KNOCK_KEY: &str = "\0knock ";

/// The pending and notification key of a knock token.
pub(super) fn knock_key(hash: &Digest) -> String {
    format!("{KNOCK_KEY}{}", hex::encode(hash))
}

/// The hash a [`knock_key`] names, if it is one.
fn knock_hash(key: &str) -> Option<Digest> {
    let hex = key.strip_prefix(KNOCK_KEY)?;
    Digest::try_from(hex::decode(hex).ok()?.as_slice()).ok()
}

/// What the engine thread is asked to do.
pub(super) enum Job {
    /// Write a change.
    Change(Change),
    /// Answer once every change queued before is committed.
    Flush(oneshot::Sender<Result<(), StoreError>>),
}

/// What the store shares with its engine thread.
pub(super) struct Shared {
    /// Every registration, coherent with the database.
    pub memory: RwLock<Memory>,
    /// Nodes with changes queued and not yet committed, and how many each.
    pending: RwLock<HashMap<String, usize>>,
    /// How records are read and written.
    pub codec: Codec,
    /// This instance's `application_name`, which its own notifications carry.
    pub name: String,
    /// Held while a batch is written and settled, and while the database is read into memory: a read
    /// taken before a commit of ours must not land in memory after it, undoing it there.
    commits: tokio::sync::Mutex<()>,
    /// Whether the last write failed and the writer is retrying: a flush then fails at once instead of
    /// waiting out its timeout behind the batch being retried.
    pub failing: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// The memory, for writing (a poisoned lock only means a panic elsewhere mid-update of whole values).
    pub fn memory(&self) -> RwLockWriteGuard<'_, Memory> {
        self.memory.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a change to `node` as queued.
    pub fn queued(&self, node: &str) {
        *self
            .pending
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.to_owned())
            .or_default() += 1;
    }

    /// Whether `node` has changes of ours still queued.
    fn is_pending(&self, node: &str) -> bool {
        self.pending
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(node)
    }

    /// Count a change to `node` as committed (or given up).
    fn settled(&self, node: &str) {
        let mut pending = self.pending.write().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pending.get_mut(node) {
            *n -= 1;
            if *n == 0 {
                pending.remove(node);
            }
        }
    }
}

/// Make a `Shared` for a new store.
pub(super) fn shared(codec: Codec) -> Shared {
    let mut id = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut id);
    Shared {
        memory: RwLock::default(),
        pending: RwLock::default(),
        codec,
        name: format!("knock-{}", hex::encode(id)),
        commits: tokio::sync::Mutex::new(()),
        failing: std::sync::atomic::AtomicBool::new(false),
    }
}

/// Connect once.
pub(super) async fn connect(
    options: &PostgresOptions,
    name: &str,
) -> Result<
    (
        Client,
        tokio_postgres::Connection<tokio_postgres::Socket, TlsStream>,
    ),
    StoreError,
> {
    let mut config: tokio_postgres::Config = options
        .url
        .parse()
        .map_err(|e| StoreError::Io(format!("store.url: {e}")))?;
    if let Some(password) = &options.password {
        config.password(password.as_bytes());
    }
    config.application_name(name);
    config.connect_timeout(CONNECT_TIMEOUT);
    config.ssl_mode(if options.require_tls {
        tokio_postgres::config::SslMode::Require
    } else {
        tokio_postgres::config::SslMode::Disable
    });
    config.connect(options.tls.clone()).await.map_err(io)
}

/// The TLS stream type of a connection: rustls, or none.
pub(super) type TlsStream =
    <super::Tls as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream;

/// Connect, with the connection driven on the current runtime; the client.
pub(super) async fn connect_client(
    options: &PostgresOptions,
    name: &str,
) -> Result<Client, StoreError> {
    let (client, connection) = connect(options, name).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Read every registration, dead token and knock token into a fresh memory.
pub(super) async fn load(client: &Client, codec: &Codec) -> Result<Memory, StoreError> {
    let mut memory = Memory::default();
    let rows = client
        .query_raw(
            "SELECT node, record FROM knock_registrations",
            std::iter::empty::<&str>(),
        )
        .await
        .map_err(io)?;
    futures::pin_mut!(rows);
    while let Some(row) = rows.next().await {
        let row = row.map_err(io)?;
        let node: &str = row.get(0);
        let record: Vec<u8> = row.get(1);
        let registration = codec.decode(node.as_bytes(), &record)?;
        memory.put(&registration, record);
    }
    for row in client
        .query("SELECT token, until FROM knock_dead_tokens", &[])
        .await
        .map_err(io)?
    {
        let token: Vec<u8> = row.get(0);
        let until: i64 = row.get(1);
        if let Ok(token) = Digest::try_from(token.as_slice()) {
            memory.dead.insert(token, u64::try_from(until).unwrap_or(0));
        }
    }
    for row in client
        .query("SELECT hash, record FROM knock_tokens", &[])
        .await
        .map_err(io)?
    {
        let (hash, knock) = knock_row(codec, &row)?;
        memory.put_knock(hash, knock);
    }
    Ok(memory)
}

/// A `knock_tokens` row's hash and token, decoded.
fn knock_row(codec: &Codec, row: &tokio_postgres::Row) -> Result<(Digest, Knock), StoreError> {
    let hash: Vec<u8> = row.get(0);
    let record: Vec<u8> = row.get(1);
    let hash = Digest::try_from(hash.as_slice())
        .map_err(|_| StoreError::Corrupt("a knock token's hash is not 32 bytes".into()))?;
    let token = crate::store::knock::decode(codec.key(), &hash, &record)?;
    Ok((
        hash,
        Knock {
            token,
            record: record.into(),
        },
    ))
}

/// The store's named values, read at open: what [`crate::store::keys`] reads and writes, through a client
/// on a runtime this thread blocks on (only while opening, before the engine's loop starts).
pub(super) struct BlockingMeta<'a> {
    pub runtime: &'a tokio::runtime::Runtime,
    pub client: &'a Client,
}

impl Meta for BlockingMeta<'_> {
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.runtime.block_on(async {
            let row = self
                .client
                .query_opt("SELECT value FROM knock_meta WHERE name = $1", &[&name])
                .await
                .map_err(io)?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })
    }

    fn get_or_insert(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.runtime.block_on(async {
            self.client
                .execute(
                    "INSERT INTO knock_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                    &[&name, &value],
                )
                .await
                .map_err(io)?;
            let row = self
                .client
                .query_one("SELECT value FROM knock_meta WHERE name = $1", &[&name])
                .await
                .map_err(io)?;
            Ok(row.get::<_, Vec<u8>>(0))
        })
    }

    fn apply(&self, set: &[(&str, &[u8])], remove: &[&str]) -> Result<(), StoreError> {
        self.runtime.block_on(async {
            // `client` is shared; a transaction needs it mutable, so the statements go in one batch string
            // would need quoting: use BEGIN/COMMIT explicitly instead.
            self.client.batch_execute("BEGIN").await.map_err(io)?;
            let result = async {
                for (name, value) in set {
                    self.client
                        .execute(
                            "INSERT INTO knock_meta (name, value) VALUES ($1, $2) \
                             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                            &[name, value],
                        )
                        .await
                        .map_err(io)?;
                }
                for name in remove {
                    self.client
                        .execute("DELETE FROM knock_meta WHERE name = $1", &[name])
                        .await
                        .map_err(io)?;
                }
                Ok::<_, StoreError>(())
            }
            .await;
            match result {
                Ok(()) => self.client.batch_execute("COMMIT").await.map_err(io),
                Err(e) => {
                    let _ = self.client.batch_execute("ROLLBACK").await;
                    Err(e)
                }
            }
        })
    }
}

/// The named values as read at open, for an export's header (read-only).
#[derive(Default)]
pub(super) struct MetaSnapshot(pub HashMap<String, Vec<u8>>);

impl MetaSnapshot {
    /// Read them all.
    pub async fn read(client: &Client) -> Result<MetaSnapshot, StoreError> {
        let rows = client
            .query("SELECT name, value FROM knock_meta", &[])
            .await
            .map_err(io)?;
        Ok(MetaSnapshot(
            rows.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
                .collect(),
        ))
    }
}

impl Meta for MetaSnapshot {
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.0.get(name).cloned())
    }

    fn get_or_insert(&self, _: &str, _: &[u8]) -> Result<Vec<u8>, StoreError> {
        Err(StoreError::Io(
            "the named values are read-only once the store is open".into(),
        ))
    }

    fn apply(&self, _: &[(&str, &[u8])], _: &[&str]) -> Result<(), StoreError> {
        Err(StoreError::Io(
            "the named values are read-only once the store is open".into(),
        ))
    }
}

/// The writer's prepared statements, per connection.
struct Statements {
    put: Statement,
    delete: Statement,
    delete_if: Statement,
    dead: Statement,
    forget: Statement,
    knock_put: Statement,
    knock_delete: Statement,
    knock_use: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, StoreError> {
        let prepare = |sql: &'static str| client.prepare(sql);
        Ok(Statements {
            // The node is taken only if free or the same owner's; then the device's other node goes.
            // Device uniqueness is the writers' rule, not a constraint: an instance racing another on one
            // device leaves at most a second node, which the next registration of the device removes.
            put: prepare(
                "WITH up AS (
                    INSERT INTO knock_registrations (node, device, owner, domain, app, record)
                    VALUES ($1, $2, $3, $4, $5, $6)
                    ON CONFLICT (node) DO UPDATE SET device = EXCLUDED.device, domain = EXCLUDED.domain,
                        app = EXCLUDED.app, record = EXCLUDED.record
                    WHERE knock_registrations.owner = EXCLUDED.owner
                    RETURNING node),
                gone AS (
                    DELETE FROM knock_registrations
                    WHERE device = $2 AND node <> $1 AND EXISTS (SELECT 1 FROM up)),
                knocks AS (
                    DELETE FROM knock_tokens WHERE hash = ANY($7) AND EXISTS (SELECT 1 FROM up))
                SELECT count(*) FROM up",
            )
            .await
            .map_err(io)?,
            // A node's knock tokens go in the same statement, so only if it does, and in queue order.
            delete: prepare(
                "WITH gone AS (DELETE FROM knock_registrations WHERE node = $1 RETURNING 1),
                knocks AS (
                    DELETE FROM knock_tokens WHERE hash = ANY($2) AND EXISTS (SELECT 1 FROM gone))
                SELECT count(*) FROM gone",
            )
            .await
            .map_err(io)?,
            delete_if: prepare(
                "WITH gone AS (
                    DELETE FROM knock_registrations WHERE node = $1 AND record = $3 RETURNING 1),
                knocks AS (
                    DELETE FROM knock_tokens WHERE hash = ANY($2) AND EXISTS (SELECT 1 FROM gone))
                SELECT count(*) FROM gone",
            )
            .await
            .map_err(io)?,
            dead: prepare(
                "INSERT INTO knock_dead_tokens (token, until) VALUES ($1, $2)
                 ON CONFLICT (token) DO UPDATE SET until = GREATEST(knock_dead_tokens.until, EXCLUDED.until)",
            )
            .await
            .map_err(io)?,
            forget: prepare("DELETE FROM knock_dead_tokens WHERE token = $1 AND until = $2")
                .await
                .map_err(io)?,
            // Only while the node is the owner's: a removal through another instance may have won.
            knock_put: prepare(
                "INSERT INTO knock_tokens (hash, owner, node, record)
                 SELECT $1, $2, $3, $4 WHERE EXISTS (
                    SELECT 1 FROM knock_registrations WHERE node = $3 AND owner = $2)
                 ON CONFLICT (hash) DO UPDATE SET owner = EXCLUDED.owner, node = EXCLUDED.node,
                    record = EXCLUDED.record",
            )
            .await
            .map_err(io)?,
            knock_delete: prepare("DELETE FROM knock_tokens WHERE hash = $1")
                .await
                .map_err(io)?,
            // The count is the big-endian u64 at byte 3 (1-based) of the record, in the clear: added to in
            // place, so uses counted by several instances add up.
            knock_use: prepare(
                "UPDATE knock_tokens SET record = overlay(record PLACING int8send(
                    ('x' || encode(substring(record FROM 3 FOR 8), 'hex'))::bit(64)::bigint + 1)
                    FROM 3 FOR 8)
                 WHERE hash = $1 AND length(record) >= 10",
            )
            .await
            .map_err(io)?,
        })
    }
}

/// The engine's loop: the writer, and the listener beside it. Returns when the store is dropped.
pub(super) async fn run(
    options: PostgresOptions,
    shared: Arc<Shared>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    writer: Client,
) {
    let listener = tokio::spawn(listen(options.clone(), shared.clone()));
    let mut writer = Some(writer);
    let mut statements: Option<Statements> = None;
    let mut batch: Vec<Job> = Vec::with_capacity(BATCH);
    loop {
        if jobs.recv_many(&mut batch, BATCH).await == 0 {
            break;
        }
        let commits = shared.commits.lock().await;
        let mut retry = FIRST_RETRY;
        let mut failures: u32 = 0;
        let mut closing_since: Option<std::time::Instant> = None;
        let conflicts = loop {
            let attempt = async {
                if writer.as_ref().is_none_or(Client::is_closed) {
                    statements = None;
                    writer = Some(connect_client(&options, &shared.name).await?);
                }
                let client = writer
                    .as_mut()
                    .ok_or_else(|| StoreError::Io("no connection".into()))?;
                if statements.is_none() {
                    statements = Some(Statements::prepare(client).await?);
                }
                let statements = statements
                    .as_ref()
                    .ok_or_else(|| StoreError::Io("no statements".into()))?;
                write(client, statements, &batch).await
            };
            match attempt.await {
                Ok(conflicts) => {
                    if failures > 0 {
                        shared
                            .failing
                            .store(false, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(failures, "PostgreSQL writes go through again");
                    }
                    break conflicts;
                }
                Err(e) => {
                    failures += 1;
                    shared
                        .failing
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    // The 1st, 2nd, 4th, 8th... failure of an outage: a line a second would flood the log.
                    if failures.is_power_of_two() {
                        tracing::warn!(error = %e, failures, "PostgreSQL write failed; retrying");
                    }
                    // Shutting down (the store was dropped) with the database away: stop trying after a
                    // while rather than hold the exit forever. Nothing in this batch was acknowledged.
                    if jobs.is_closed() {
                        let since = *closing_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= SHUTDOWN_GRACE {
                            tracing::error!(
                                changes = batch.len(),
                                "PostgreSQL unreachable at shutdown: unacknowledged changes not written"
                            );
                            break HashMap::new();
                        }
                    }
                    // Flushes waiting meanwhile learn it now; the changes stay queued and are retried.
                    for job in &mut batch {
                        if let Job::Flush(reply) = job {
                            let (dummy, _) = oneshot::channel();
                            let reply = std::mem::replace(reply, dummy);
                            let _ = reply.send(Err(StoreError::Io(e.to_string())));
                        }
                    }
                    writer = None;
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        };
        // Committed: settle the nodes, re-read those the database would not take, answer the flushes.
        let mut reread = Vec::new();
        let mut replies = Vec::new();
        let mut failed = false;
        for (i, job) in batch.drain(..).enumerate() {
            match job {
                Job::Change(change) => {
                    if let Some(key) = change.key() {
                        shared.settled(&key);
                        if let Some(why) = conflicts.get(&i).filter(|_| change.is_registration()) {
                            failed |= *why == Missed::Conflict;
                            reread.push(key);
                            // Memory dropped the tokens the change would have taken along; they stay.
                            reread.extend(change.knocks().iter().map(knock_key));
                        }
                    }
                }
                Job::Flush(reply) => replies.push((reply, failed)),
            }
        }
        if !reread.is_empty() {
            if let Some(client) = writer.as_ref() {
                if let Err(e) = refresh(client, &shared, &reread, true).await {
                    tracing::warn!(error = %e, "PostgreSQL: could not re-read nodes another instance changed");
                }
            }
        }
        // Answered once memory holds what the database took, so a flushed writer reads the outcome.
        for (reply, failed) in replies.drain(..) {
            let _ = reply.send(if failed {
                Err(StoreError::Conflict)
            } else {
                Ok(())
            });
        }
        drop(commits);
    }
    listener.abort();
}

/// What became of a change the database did not take as this instance did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missed {
    /// A put of a node another owner holds: refused.
    Conflict,
    /// A conditional delete of a row another instance changed meanwhile: the row stays, and this
    /// instance's memory, which dropped it, must read it again.
    Changed,
}

/// Write a batch in one transaction; the positions of the changes the database did not take as queued.
async fn write(
    client: &mut Client,
    statements: &Statements,
    batch: &[Job],
) -> Result<HashMap<usize, Missed>, StoreError> {
    let tx = client.transaction().await.map_err(io)?;
    let results = join_all(batch.iter().enumerate().filter_map(|(i, job)| {
        let Job::Change(change) = job else {
            return None;
        };
        let tx = &tx;
        let run: BoxFuture<'_, Result<Option<(usize, Missed)>, StoreError>> = match change {
            Change::Put {
                registration: r,
                record,
                knocks,
            } => Box::pin(async move {
                let knocks: Vec<&[u8]> = knocks.iter().map(|h| &h[..]).collect();
                let row = tx
                    .query_one(
                        &statements.put,
                        &[
                            &r.node,
                            &&r.device[..],
                            &&r.owner[..],
                            &r.domain,
                            &r.app,
                            record,
                            &knocks,
                        ],
                    )
                    .await
                    .map_err(io)?;
                Ok((row.get::<_, i64>(0) == 0).then_some((i, Missed::Conflict)))
            }),
            Change::Delete {
                node,
                record: None,
                knocks,
            } => Box::pin(async move {
                let knocks: Vec<&[u8]> = knocks.iter().map(|h| &h[..]).collect();
                tx.query_one(&statements.delete, &[node, &knocks])
                    .await
                    .map_err(io)?;
                Ok(None)
            }),
            Change::Delete {
                node,
                record: Some(record),
                knocks,
            } => Box::pin(async move {
                let knocks: Vec<&[u8]> = knocks.iter().map(|h| &h[..]).collect();
                let row = tx
                    .query_one(&statements.delete_if, &[node, &knocks, record])
                    .await
                    .map_err(io)?;
                Ok((row.get::<_, i64>(0) == 0).then_some((i, Missed::Changed)))
            }),
            Change::Dead { token, until } => Box::pin(async move {
                let until = i64::try_from(*until).unwrap_or(i64::MAX);
                tx.execute(&statements.dead, &[&&token[..], &until])
                    .await
                    .map_err(io)?;
                Ok(None)
            }),
            Change::Forget { token, until } => Box::pin(async move {
                let until = i64::try_from(*until).unwrap_or(i64::MAX);
                tx.execute(&statements.forget, &[&&token[..], &until])
                    .await
                    .map_err(io)?;
                Ok(None)
            }),
            Change::KnockPut {
                hash,
                owner,
                node,
                record,
            } => Box::pin(async move {
                let written = tx
                    .execute(
                        &statements.knock_put,
                        &[&&hash[..], &&owner[..], node, record],
                    )
                    .await
                    .map_err(io)?;
                Ok((written == 0).then_some((i, Missed::Conflict)))
            }),
            Change::KnockDelete { hash } => Box::pin(async move {
                tx.execute(&statements.knock_delete, &[&&hash[..]])
                    .await
                    .map_err(io)?;
                Ok(None)
            }),
            Change::KnockUse { hash } => Box::pin(async move {
                tx.execute(&statements.knock_use, &[&&hash[..]])
                    .await
                    .map_err(io)?;
                Ok(None)
            }),
        };
        Some(run)
    }))
    .await;
    let mut missed = HashMap::new();
    for result in results {
        if let Some((i, why)) = result? {
            missed.insert(i, why);
        }
    }
    tx.commit().await.map_err(io)?;
    Ok(missed)
}

/// Re-read `nodes` from the database into memory. Nodes with changes of ours still queued are left as they
/// are unless `even_pending`.
async fn refresh(
    client: &Client,
    shared: &Shared,
    keys: &[String],
    even_pending: bool,
) -> Result<(), StoreError> {
    let (knocks, nodes): (Vec<&String>, Vec<&String>) =
        keys.iter().partition(|k| knock_hash(k).is_some());
    if !knocks.is_empty() {
        refresh_knocks(client, shared, &knocks, even_pending).await?;
    }
    if nodes.is_empty() {
        return Ok(());
    }
    let nodes: Vec<String> = nodes.into_iter().cloned().collect();
    let nodes = &nodes[..];
    let rows = client
        .query(
            "SELECT node, record FROM knock_registrations WHERE node = ANY($1)",
            &[&nodes],
        )
        .await
        .map_err(io)?;
    let mut found: HashMap<String, Vec<u8>> = rows
        .into_iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
        .collect();
    let mut decoded = Vec::with_capacity(nodes.len());
    for node in nodes {
        let row = match found.remove(node) {
            Some(record) => Some((shared.codec.decode(node.as_bytes(), &record)?, record)),
            None => None,
        };
        decoded.push((node, row));
    }
    let mut memory = shared.memory();
    for (node, row) in decoded {
        if !even_pending && shared.is_pending(node) {
            continue;
        }
        match row {
            Some((registration, record)) => memory.put(&registration, record),
            None => {
                // Removed by another instance, which removes its knock tokens too (notified apart).
                memory.remove_knock_of_node(node);
                memory.remove(node);
            }
        }
    }
    Ok(())
}

/// Re-read knock tokens (by their [`knock_key`]s) from the database into memory, as [`refresh`] does nodes.
async fn refresh_knocks(
    client: &Client,
    shared: &Shared,
    keys: &[&String],
    even_pending: bool,
) -> Result<(), StoreError> {
    let hashes: Vec<Digest> = keys.iter().filter_map(|k| knock_hash(k)).collect();
    let params: Vec<&[u8]> = hashes.iter().map(|h| &h[..]).collect();
    let rows = client
        .query(
            "SELECT hash, record FROM knock_tokens WHERE hash = ANY($1)",
            &[&params],
        )
        .await
        .map_err(io)?;
    let mut found = HashMap::new();
    for row in &rows {
        let (hash, knock) = knock_row(&shared.codec, row)?;
        found.insert(hash, knock);
    }
    let mut memory = shared.memory();
    for hash in hashes {
        if !even_pending && shared.is_pending(&knock_key(&hash)) {
            continue;
        }
        match found.remove(&hash) {
            Some(knock) => memory.put_knock(hash, knock),
            None => {
                memory.remove_knock(&hash);
            }
        }
    }
    Ok(())
}

/// Keep the memory coherent with other instances' writes, for as long as the store lives.
async fn listen(options: PostgresOptions, shared: Arc<Shared>) {
    let mut retry = FIRST_RETRY;
    let mut failures: u32 = 0;
    loop {
        let started = std::time::Instant::now();
        {
            let e = listen_once(&options, &shared).await;
            // A connection that served a while starts a new outage: quick retries, and said once.
            if started.elapsed() > MAX_RETRY * 10 {
                retry = FIRST_RETRY;
                failures = 0;
            }
            failures += 1;
            if failures.is_power_of_two() {
                tracing::warn!(error = %e, failures, "PostgreSQL notifications lost; reconnecting, then re-reading every registration");
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(MAX_RETRY);
        }
    }
}

/// One listening connection: LISTEN, re-read everything (notifications may have been missed before), then
/// re-read each node others change. Returns why the connection was lost.
async fn listen_once(options: &PostgresOptions, shared: &Shared) -> StoreError {
    // Named apart from the writer, so an admin (or a test) can tell the two connections apart.
    let (client, mut connection) = match connect(options, &format!("{}-listen", shared.name)).await
    {
        Ok(connected) => connected,
        Err(e) => return e,
    };
    let (notes, mut changed) = mpsc::unbounded_channel::<String>();
    let own = format!("{} ", shared.name);
    let driver: tokio::task::JoinHandle<StoreError> = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) if n.channel() == CHANNEL => {
                    // Our own changes are in memory already.
                    if !n.payload().starts_with(&own) {
                        if let Some((_, node)) = n.payload().split_once(' ') {
                            let _ = notes.send(node.to_owned());
                        }
                    }
                }
                Ok(AsyncMessage::Notification(n)) if n.channel() == KNOCK_CHANNEL => {
                    if !n.payload().starts_with(&own) {
                        if let Some((_, hash)) = n.payload().split_once(' ') {
                            let _ = notes.send(format!("{KNOCK_KEY}{hash}"));
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => return io(e),
            }
        }
        StoreError::Io("PostgreSQL closed the notification connection".into())
    });
    let listened = async {
        client
            .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {KNOCK_CHANNEL}"))
            .await
            .map_err(io)?;
        reload(&client, shared).await?;
        tracing::debug!("PostgreSQL: listening for other instances' changes");
        let mut nodes = Vec::new();
        // Ends when the driver does, that is when the connection is lost.
        while changed.recv_many(&mut nodes, BATCH).await > 0 {
            nodes.sort();
            nodes.dedup();
            let commits = shared.commits.lock().await;
            refresh(&client, shared, &nodes, false).await?;
            drop(commits);
            nodes.clear();
        }
        Ok::<(), StoreError>(())
    }
    .await;
    match listened {
        Err(e) => {
            driver.abort();
            e
        }
        Ok(()) => driver
            .await
            .unwrap_or_else(|e| StoreError::Io(format!("the notification task failed: {e}"))),
    }
}

/// Replace the memory with the database's registrations, keeping nodes with changes of ours still queued as
/// they are in memory. Holds off commits meanwhile.
async fn reload(client: &Client, shared: &Shared) -> Result<(), StoreError> {
    let _commits = shared.commits.lock().await;
    let mut fresh = load(client, &shared.codec).await?;
    let mut memory = shared.memory();
    let pending: Vec<String> = shared
        .pending
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .cloned()
        .collect();
    for key in pending {
        if let Some(hash) = knock_hash(&key) {
            fresh.remove_knock(&hash);
            if let Some(knock) = memory.knock(&hash) {
                fresh.put_knock(hash, knock.clone());
            }
            continue;
        }
        let node = key;
        fresh.remove(&node);
        if let Some(entry) = memory.get(&node) {
            fresh.put_entry(&node, entry.clone());
        }
    }
    // Dead tokens this instance remembered but has not written yet are kept too.
    for (token, until) in memory.dead.drain() {
        let kept = fresh.dead.entry(token).or_insert(until);
        *kept = (*kept).max(until);
    }
    *memory = fresh;
    Ok(())
}

/// Report a failure of the engine thread at start to the opener.
pub(super) fn startup_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("PostgreSQL: {e}"))
}

/// Migrate: the schema at the current version.
pub(super) async fn prepare_schema(client: &mut Client) -> Result<(), StoreError> {
    let was = schema::migrate(client).await?;
    tracing::debug!(from = was, "PostgreSQL schema ready");
    Ok(())
}
