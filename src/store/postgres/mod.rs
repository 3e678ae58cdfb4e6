//! The PostgreSQL engine: registrations in a database that several knock instances share, so that one host
//! can be lost without losing a registration, and any instance can serve any node.
//!
//! The data and its sealing are sled's ([`crate::store::record`], [`crate::store::keys`]): the same record
//! per node, the same instance key sealed under the same store key, the same export format, so a store
//! moves between engines with `knock export` / `knock import`. Every instance keeps every registration in
//! memory, as sled's index does, and answers publishes from there; [`engine`] keeps that memory coherent
//! with the database and commits changes in batches. Registration is acknowledged only after its commit.

mod engine;
mod memory;
mod schema;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use self::engine::{Change, Job, Shared};
use crate::push::Token;
use crate::store::backup::{self, adopt_key, write_header, write_line};
use crate::store::keys;
use crate::store::knock;
use crate::store::record::Codec;
use crate::store::{
    BackupError, Digest, KnockToken, PublishTarget, Registration, Store, StoreError, StoreKey,
    StoreOptions,
};

/// How long a flush waits for its commit before saying it could not confirm it (the change stays queued).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The TLS a connection uses.
pub(crate) type Tls = tokio_postgres_rustls::MakeRustlsConnect;

/// How to reach the database: what `[store]` says for `engine = "postgres"`.
#[derive(Clone)]
pub struct PostgresOptions {
    /// `postgres://user@host:port/database` (or key=value form), without the password.
    pub url: String,
    /// The password, from `password_file` or the environment.
    pub password: Option<String>,
    /// Whether the connection must be TLS (verified against `tls`'s roots); otherwise plain TCP or a Unix
    /// socket.
    pub require_tls: bool,
    /// The TLS client: the public roots plus the configured CA file.
    pub tls: Tls,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("PostgresOptions")
            .field("url", &self.url)
            .field("require_tls", &self.require_tls)
            .finish_non_exhaustive()
    }
}

/// A registration store in PostgreSQL, served from memory.
pub struct PostgresStore {
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<Job>,
    instance_key: [u8; 32],
    meta: engine::MetaSnapshot,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PostgresStore {
    /// Connect, create or migrate the schema, read or create the instance key by the store key's rules
    /// ([`crate::store::open`]), and read every registration; then serve.
    pub fn open(
        options: &StoreOptions,
        postgres: &PostgresOptions,
    ) -> Result<PostgresStore, StoreError> {
        let codec = Codec::new(options.key.clone());
        let shared = Arc::new(engine::shared(codec));
        let (jobs, queue) = mpsc::unbounded_channel();
        let (ready, opened) = std::sync::mpsc::channel();
        let (key, plaintext, postgres, thread_shared) = (
            options.key.clone(),
            options.plaintext_tokens,
            postgres.clone(),
            shared.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("knock-postgres".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready.send(Err(engine::startup_error(e)));
                        return;
                    }
                };
                let opening = open_on(&runtime, &postgres, &thread_shared, key.as_ref(), plaintext);
                let writer = match opening {
                    Ok((writer, instance, meta)) => {
                        let _ = ready.send(Ok((instance, meta)));
                        writer
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(engine::run(postgres, thread_shared, queue, writer));
            })
            .map_err(engine::startup_error)?;
        let (instance_key, meta) = opened
            .recv()
            .map_err(|_| StoreError::Io("the PostgreSQL engine stopped while opening".into()))??;
        Ok(PostgresStore {
            shared,
            jobs,
            instance_key,
            meta,
            thread: Some(thread),
        })
    }

    /// Import an export into an empty database; returns how many registrations it holds after.
    pub fn import(
        options: &StoreOptions,
        postgres: &PostgresOptions,
        file: &Path,
    ) -> Result<usize, BackupError> {
        let codec = Codec::new(options.key.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BackupError::Store(engine::startup_error(e)))?;
        let mut client = runtime.block_on(async {
            let mut client = engine::connect_client(postgres, "knock-import").await?;
            engine::prepare_schema(&mut client).await?;
            Ok::<_, StoreError>(client)
        })?;
        let meta = engine::BlockingMeta {
            runtime: &runtime,
            client: &client,
        };
        if codec.key().is_none() && !options.plaintext_tokens && keys::is_new(&meta)? {
            return Err(StoreError::KeyNeeded.into());
        }
        let held: i64 = runtime
            .block_on(client.query_one("SELECT count(*) FROM knock_registrations", &[]))
            .map_err(|e| BackupError::Store(schema::io(e)))?
            .get(0);
        if held > 0 {
            return Err(BackupError::NotEmpty(
                usize::try_from(held).unwrap_or(usize::MAX),
            ));
        }
        // 1. Check everything.
        let exported = backup::read(file, &codec, |_, _| Ok(()), |_| Ok(()))?;
        // 2. The instance key, then the rows in one transaction.
        adopt_key(&meta, &codec, &exported)?;
        let (mut rows, mut knocks) = (Vec::new(), Vec::new());
        backup::read(
            file,
            &codec,
            |node, (record, device)| {
                let registration = codec.decode(node.as_bytes(), &record)?;
                rows.push((
                    node.to_owned(),
                    device,
                    registration.owner,
                    registration.domain,
                    registration.app,
                    record,
                ));
                Ok(())
            },
            |knock| {
                // The node column, from the record (checked already, so it opens).
                let node =
                    crate::store::knock::decode(codec.key(), &knock.hash, &knock.record)?.node;
                knocks.push((knock, node));
                Ok(())
            },
        )?;
        let count = rows.len();
        runtime
            .block_on(async {
                let tx = client.transaction().await?;
                let insert = tx
                    .prepare(
                        "INSERT INTO knock_registrations (node, device, owner, domain, app, record) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .await?;
                for chunk in rows.chunks(1000) {
                    futures::future::try_join_all(chunk.iter().map(
                        |(node, device, owner, domain, app, record)| async {
                            let (device, owner): (&[u8], &[u8]) = (device, owner);
                            tx.execute(&insert, &[node, &device, &owner, domain, app, record])
                                .await
                        },
                    ))
                    .await?;
                }
                let insert_knock = tx
                    .prepare(
                        "INSERT INTO knock_tokens (hash, owner, node, record) VALUES ($1, $2, $3, $4)",
                    )
                    .await?;
                for (knock, node) in &knocks {
                    let (hash, owner): (&[u8], &[u8]) = (&knock.hash, &knock.owner);
                    tx.execute(&insert_knock, &[&hash, &owner, node, &knock.record])
                        .await?;
                }
                tx.commit().await
            })
            .map_err(|e| BackupError::Store(schema::io(e)))?;
        Ok(count)
    }

    fn queue(&self, change: Change) -> Result<(), StoreError> {
        if let Some(key) = change.key() {
            self.shared.queued(&key);
        }
        self.jobs
            .send(Job::Change(change))
            .map_err(|_| StoreError::Io("the PostgreSQL engine has stopped".into()))
    }

    /// Every registration, decoded from the records in memory.
    fn registrations(&self) -> Result<Vec<Registration>, StoreError> {
        let records: Vec<(String, Box<[u8]>)> = self
            .memory()
            .records()
            .map(|(node, record)| (node.to_owned(), record.into()))
            .collect();
        records
            .iter()
            .map(|(node, record)| self.shared.codec.decode(node.as_bytes(), record))
            .collect()
    }

    fn memory(&self) -> std::sync::RwLockReadGuard<'_, memory::Memory> {
        self.shared.memory.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Open on the engine thread's runtime: connect, migrate, the instance key, every registration.
fn open_on(
    runtime: &tokio::runtime::Runtime,
    postgres: &PostgresOptions,
    shared: &Shared,
    key: Option<&StoreKey>,
    plaintext: bool,
) -> Result<(tokio_postgres::Client, [u8; 32], engine::MetaSnapshot), StoreError> {
    let mut client = runtime.block_on(async {
        let mut client = engine::connect_client(postgres, &shared_name(shared)).await?;
        engine::prepare_schema(&mut client).await?;
        Ok::<_, StoreError>(client)
    })?;
    let instance = keys::instance_key(
        &engine::BlockingMeta {
            runtime,
            client: &client,
        },
        key,
        plaintext,
    )?;
    let (memory, meta) = runtime.block_on(async {
        let memory = engine::load(&client, &shared.codec).await?;
        let meta = engine::MetaSnapshot::read(&client).await?;
        Ok::<_, StoreError>((memory, meta))
    })?;
    *shared.memory() = memory;
    let _ = &mut client;
    Ok((client, instance, meta))
}

fn shared_name(shared: &Shared) -> String {
    shared.name.clone()
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Closing the queue ends the engine's loop once what is queued is written.
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Store for PostgresStore {
    fn get(&self, node: &str) -> Result<Option<Registration>, StoreError> {
        self.memory().registration(&self.shared.codec, node)
    }

    fn publish_target(&self, node: &str) -> Result<Option<PublishTarget>, StoreError> {
        Ok(self.memory().get(node).map(|e| e.target.clone()))
    }

    fn node_for_device(&self, device: &Digest) -> Result<Option<String>, StoreError> {
        Ok(self.memory().node_for_device(device))
    }

    fn nodes_of(&self, owner: &Digest) -> Result<Vec<String>, StoreError> {
        Ok(self.memory().nodes_of(owner))
    }

    fn put(&self, registration: &Registration) -> Result<(), StoreError> {
        let record = self.shared.codec.encode(registration)?;
        let leaving = {
            let mut memory = self.shared.memory();
            if !memory.may_put(registration) {
                return Err(StoreError::Conflict);
            }
            // The node the device leaves, if it leaves one, takes its knock tokens along.
            let leaving = match memory.node_for_device(&registration.device) {
                Some(previous) if previous != registration.node => {
                    memory.remove_knock_of_node(&previous)
                }
                _ => Vec::new(),
            };
            memory.put(registration, record.clone());
            leaving
        };
        self.queue(Change::Put {
            registration: Box::new(registration.clone()),
            record,
            knocks: leaving,
        })
    }

    fn remove(&self, node: &str) -> Result<Option<Registration>, StoreError> {
        let (removed, tokens) = {
            let mut memory = self.shared.memory();
            let tokens = memory.remove_knock_of_node(node);
            (memory.remove(node), tokens)
        };
        let Some(removed) = removed else {
            return Ok(None);
        };
        self.queue(Change::Delete {
            node: node.to_owned(),
            record: None,
            knocks: tokens,
        })?;
        self.shared
            .codec
            .decode(node.as_bytes(), &removed.record)
            .map(Some)
    }

    fn remove_if_token(&self, node: &str, token: &Token) -> Result<bool, StoreError> {
        let removed = {
            let mut memory = self.shared.memory();
            match memory.get(node) {
                Some(entry) if entry.target.token == *token => {
                    let tokens = memory.remove_knock_of_node(node);
                    memory.remove(node).map(|entry| (entry, tokens))
                }
                _ => None,
            }
        };
        let Some((entry, tokens)) = removed else {
            return Ok(false);
        };
        // Only the row as this instance saw it: another instance's fresh token stays.
        self.queue(Change::Delete {
            node: node.to_owned(),
            record: Some(entry.record.into_vec()),
            knocks: tokens,
        })?;
        Ok(true)
    }

    fn drop_call_token(&self, node: &str, token: &Token) -> Result<bool, StoreError> {
        let updated = match self.get(node)? {
            Some(mut registration) if registration.call_token.as_ref() == Some(token) => {
                registration.call_token = None;
                Some(registration)
            }
            _ => None,
        };
        match updated {
            Some(registration) => self.put(&registration).map(|()| true),
            None => Ok(false),
        }
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        if self
            .shared
            .failing
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // What is queued stays queued and is written once the database is back; it is not confirmed now.
            return Box::pin(std::future::ready(Err(StoreError::Io(
                "PostgreSQL cannot be written to now; retrying".into(),
            ))));
        }
        let (reply, committed) = oneshot::channel();
        let sent = self.jobs.send(Job::Flush(reply));
        Box::pin(async move {
            sent.map_err(|_| StoreError::Io("the PostgreSQL engine has stopped".into()))?;
            match tokio::time::timeout(FLUSH_TIMEOUT, committed).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(StoreError::Io("the PostgreSQL engine has stopped".into())),
                Err(_) => Err(StoreError::Timeout(FLUSH_TIMEOUT)),
            }
        })
    }

    fn counts_by_app(&self) -> Result<Option<Vec<(String, usize)>>, StoreError> {
        Ok(Some(self.memory().counts_by_app()))
    }

    fn len(&self) -> Result<usize, StoreError> {
        Ok(self.memory().len())
    }

    fn instance_key(&self) -> Result<[u8; 32], StoreError> {
        Ok(self.instance_key)
    }

    fn scan(&self, each: &mut dyn FnMut(Registration)) -> Result<usize, StoreError> {
        let registrations = self.registrations()?;
        let count = registrations.len();
        registrations.into_iter().for_each(each);
        Ok(count)
    }

    fn is_sealed(&self) -> bool {
        self.shared.codec.key().is_some()
    }

    fn remember_dead(&self, token: &Digest, until: u64) -> Result<(), StoreError> {
        {
            let mut memory = self.shared.memory();
            let kept = memory.dead.entry(*token).or_insert(until);
            *kept = (*kept).max(until);
        }
        self.queue(Change::Dead {
            token: *token,
            until,
        })
    }

    fn is_dead(&self, token: &Digest, now: u64) -> Result<bool, StoreError> {
        let until = self.memory().dead.get(token).copied();
        match until {
            Some(until) if until > now => Ok(true),
            Some(until) => {
                self.shared.memory().dead.remove(token);
                self.queue(Change::Forget {
                    token: *token,
                    until,
                })?;
                Ok(false)
            }
            None => Ok(false),
        }
    }

    fn export(&self, out: &mut dyn Write) -> Result<usize, BackupError> {
        write_header(out, &self.meta)?;
        let records: Vec<(String, Box<[u8]>)> = self
            .memory()
            .records()
            .map(|(node, record)| (node.to_owned(), record.into()))
            .collect();
        for (node, record) in &records {
            let registration = self.shared.codec.decode(node.as_bytes(), record)?;
            write_line(out, registration, record)?;
        }
        let knocks = self.memory().knock_records();
        for (hash, record) in &knocks {
            backup::write_knock_line(out, hash, record)?;
        }
        out.flush()?;
        Ok(records.len())
    }

    fn put_knock_token(&self, hash: &Digest, token: &KnockToken) -> Result<(), StoreError> {
        let record = knock::encode(self.shared.codec.key(), hash, token)?;
        {
            // Only for a node its owner holds, as far as this instance knows (a removal through another
            // instance at the same moment can still leave the token behind: see issue 21's notes).
            let mut memory = self.shared.memory();
            match memory.owner_of(&token.node) {
                None => return Err(knock::unregistered()),
                Some(owner) if owner != token.owner => return Err(StoreError::Conflict),
                Some(_) => {}
            }
            memory.put_knock(
                *hash,
                memory::Knock {
                    token: token.clone(),
                    record: record.clone().into(),
                },
            );
        }
        self.queue(Change::KnockPut {
            hash: *hash,
            owner: token.owner,
            node: token.node.clone(),
            record,
        })
    }

    fn knock_token(&self, hash: &Digest) -> Result<Option<KnockToken>, StoreError> {
        Ok(self.memory().knock(hash).map(|k| k.token.clone()))
    }

    fn knock_tokens_of(&self, owner: &Digest) -> Result<Vec<(Digest, KnockToken)>, StoreError> {
        Ok(self.memory().knock_of_owner(owner))
    }

    fn remove_knock_token(&self, hash: &Digest) -> Result<bool, StoreError> {
        if self.shared.memory().remove_knock(hash).is_none() {
            return Ok(false);
        }
        self.queue(Change::KnockDelete { hash: *hash })?;
        Ok(true)
    }

    fn count_knock_use(&self, hash: &Digest) -> Result<(), StoreError> {
        if self.shared.memory().count_knock_use(hash)? {
            self.queue(Change::KnockUse { hash: *hash })?;
        }
        Ok(())
    }
}
