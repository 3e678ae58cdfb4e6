//! Where registrations live: the [`Store`] trait, the [`Registration`] it keeps, and [`open`], which picks
//! the engine.
//!
//! Everything above this module (handlers, the admin commands, the HTTP listener) speaks only the trait,
//! so another engine can be added without touching them; [`sled`](SledStore) is the one there is, embedded
//! in the process. A registration holds what a push needs and nothing more: no JID (only keyed hashes of it,
//! see [`secrets`]), no secret (only its hash), no timestamps, and the token as opaque bytes, sealed at rest
//! under the store key ([`StoreKey`]).

mod backup;
#[cfg(test)]
pub(crate) mod conformance;
mod keys;
mod knock;
pub mod postgres;
mod record;
mod seal;
pub mod secrets;
mod sled;

pub use self::knock::KnockToken;
pub use self::seal::{KeyFileError, StoreKey};
pub use self::sled::SledStore;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::push::{ProviderKind, Token};

/// A 32-byte keyed hash: identifies a device or an owner without revealing the JID behind it.
pub type Digest = [u8; 32];

/// The first 128 bits of a publish secret's SHA-256: what a publish is checked against. A guess at 128 bits
/// is no likelier to pass than a guess at the full hash, and the publish index holds 16 bytes less per node.
pub type SecretTag = [u8; 16];

/// The tag of a secret hash.
pub fn secret_tag(hash: &Digest) -> SecretTag {
    let mut tag = [0; 16];
    tag.copy_from_slice(&hash[..16]);
    tag
}

/// One registered device: the pubsub node a server publishes to, and where the wake-up goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The pubsub node (random, URL-safe); the store's primary key.
    pub node: String,
    /// Keyed hash of (bare JID, device id, app): finds the registration again when the same device re-registers.
    pub device: Digest,
    /// Keyed hash of the registering bare JID: only its owner may disable a node.
    pub owner: Digest,
    /// The registering user's server: publishes are accepted only from this bare domain.
    pub domain: String,
    /// Which configured app the token belongs to.
    pub app: String,
    /// The push service the token belongs to.
    pub provider: ProviderKind,
    /// The device token, as its provider made it: opaque to the store.
    pub token: Token,
    /// SHA-256 of the publish secret; the secret itself is never stored. `None` for dialects whose
    /// publishes carry no secret (Tigase's): then the registering user's server alone may publish.
    pub secret_hash: Option<Digest>,
    /// A second token for call pushes (Apple's PushKit VoIP token), if the device gave one. Sealed at rest
    /// like the token.
    pub call_token: Option<Token>,
    /// The account as the app must be told it in the push, kept only for dialects whose pushes name it:
    /// the user's bare JID for Tigase's, a hash of JID and device id for p2's FCM one (the Conversations
    /// family); sealed at rest. `None` for every other registration.
    pub account: Option<String>,
}

impl Registration {
    /// Whether the registration carries anything beyond the usual: no secret, a call token or an account.
    pub fn is_extended(&self) -> bool {
        self.secret_hash.is_none() || self.call_token.is_some() || self.account.is_some()
    }
}

/// What a publish needs to know of its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishTarget {
    /// The push service the token belongs to.
    pub provider: ProviderKind,
    /// The device token, opaque.
    pub token: Token,
    /// The first 128 bits of the SHA-256 of the node's publish secret; `None`: publishes need none.
    pub secret_tag: Option<SecretTag>,
    /// The only server allowed to publish to the node.
    pub domain: Arc<str>,
    /// The configured app the token belongs to.
    pub app: Arc<str>,
    /// The device's token for call pushes, if any.
    pub call_token: Option<Token>,
    /// The account to name in the push, for the dialects that need it.
    pub account: Option<Arc<str>>,
}

impl From<&Registration> for PublishTarget {
    fn from(r: &Registration) -> PublishTarget {
        PublishTarget {
            provider: r.provider,
            token: r.token.clone(),
            secret_tag: r.secret_hash.as_ref().map(secret_tag),
            domain: r.domain.as_str().into(),
            app: r.app.as_str().into(),
            call_token: r.call_token.clone(),
            account: r.account.as_deref().map(Arc::from),
        }
    }
}

/// What can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The node is already held by another owner (the same owner may move it to another device).
    #[error("the node belongs to another user")]
    Conflict,
    /// The backing database failed (I/O error, corruption, full disk).
    #[error("store I/O: {0}")]
    Io(String),
    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// A registration the store cannot hold (a field beyond the record's limits).
    #[error("invalid registration: {0}")]
    Invalid(String),
    /// Another process (a running knock) has the store open.
    #[error("the store is in use by another process: stop knock first")]
    InUse,
    /// The store's tokens are sealed and no store key was given.
    #[error("this store's tokens are encrypted: configure store.key_file with the key that encrypted them")]
    KeyRequired,
    /// A new store would keep tokens in the clear, and that was not asked for.
    #[error("a new store needs a store key: run `knock keygen --out /etc/knock/store.key` and set [store] key_file to it (or, for tests and throwaway setups only, set [store] plaintext_tokens = true)")]
    KeyNeeded,
    /// The store key given is not the one the store was sealed with.
    #[error("the configured store key is not the key this store was encrypted with")]
    WrongKey,
    /// Changes were not confirmed durable in time; they may or may not survive a crash.
    #[error("the store did not confirm durability within {0:?}")]
    Timeout(std::time::Duration),
}

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing the export file failed.
    #[error("{0}")]
    File(#[from] std::io::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A line of the export file is not what an export writes.
    #[error("line {line}: {why}")]
    Format {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        why: String,
    },
    /// The target store already holds registrations.
    #[error(
        "the store already holds {0} registrations; import into an empty store (a new store.path)"
    )]
    NotEmpty(usize),
}

/// Where a store is and how to open it: what `[store]` says.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// sled: the database's directory; created if missing.
    pub path: PathBuf,
    /// PostgreSQL: the database to use instead of sled's directory.
    pub postgres: Option<postgres::PostgresOptions>,
    /// The key tokens are sealed under. A store once sealed opens only with its key.
    pub key: Option<StoreKey>,
    /// Whether a new store may be created without a key, keeping tokens in the clear. An existing store
    /// in the clear opens either way.
    pub plaintext_tokens: bool,
}

/// Open (or create) the store `options` describe. Creating one without a store key is refused unless
/// `plaintext_tokens` allows it ([`StoreError::KeyNeeded`]): sealed is the default.
pub fn open(options: &StoreOptions) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match &options.postgres {
        Some(postgres) => Arc::new(postgres::PostgresStore::open(options, postgres)?),
        None => Arc::new(SledStore::open_as(options)?),
    })
}

/// Import an export file into the empty store `options` describe (created if missing, by the same rule
/// as [`open`]); returns how many registrations it holds after. Every line is checked before any is
/// written, and the store keeps the export's instance key, so device hashes and node secrets stay valid.
pub fn import(options: &StoreOptions, file: &Path) -> Result<usize, BackupError> {
    match &options.postgres {
        Some(postgres) => postgres::PostgresStore::import(options, postgres, file),
        None => SledStore::import(options, file),
    }
}

/// The registration database.
pub trait Store: Send + Sync + 'static {
    /// The registration for a node, if any.
    fn get(&self, node: &str) -> Result<Option<Registration>, StoreError>;

    /// What a publish to `node` needs, if the node is registered. This is the publish hot path: a store may
    /// answer it from memory. The default reads the whole registration.
    fn publish_target(&self, node: &str) -> Result<Option<PublishTarget>, StoreError> {
        Ok(self.get(node)?.as_ref().map(PublishTarget::from))
    }

    /// The node a device is registered under, if any.
    fn node_for_device(&self, device: &Digest) -> Result<Option<String>, StoreError>;

    /// Every node registered by one owner (the keyed hash of a bare JID), for commands a user runs on
    /// all of their devices at once. Reads only that owner's entries.
    fn nodes_of(&self, owner: &Digest) -> Result<Vec<String>, StoreError>;

    /// Insert or update a registration atomically. The node must be free or already held by the same owner
    /// ([`StoreError::Conflict`] otherwise, and nothing changes). The device's previous node, if different,
    /// is removed; a device that held this node before and is not the registration's any more lets go of
    /// it (so [`Store::node_for_device`] no longer finds it). Not durable until [`Store::flush`] completes.
    fn put(&self, registration: &Registration) -> Result<(), StoreError>;

    /// Remove a node's registration; returns what was removed.
    fn remove(&self, node: &str) -> Result<Option<Registration>, StoreError>;

    /// Remove a node's registration only if it still carries `token` — so a dead-token report racing with a
    /// re-registration never deletes the fresh token. Returns whether something was removed.
    fn remove_if_token(&self, node: &str, token: &Token) -> Result<bool, StoreError>;

    /// Drop a node's call token only if it still is `token` (the push service called it dead), keeping the
    /// registration for everything else. Returns whether it was dropped. Not durable until [`Store::flush`].
    fn drop_call_token(&self, node: &str, token: &Token) -> Result<bool, StoreError>;

    /// Make every change made before this call durable (survives kill -9). Concurrent calls may share one
    /// disk flush; each returns only once its own changes are on disk.
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Registrations per app, if the store can tell without reading every record (for metrics).
    fn counts_by_app(&self) -> Result<Option<Vec<(String, usize)>>, StoreError> {
        Ok(None)
    }

    /// Number of registrations (may scan: for stats, not hot paths).
    fn len(&self) -> Result<usize, StoreError>;

    /// Whether the store holds no registration.
    fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// A 32-byte secret key created once per store, used to key the JID hashes and derive publish secrets.
    fn instance_key(&self) -> Result<[u8; 32], StoreError>;

    /// Hand every registration to `each`; returns how many there were. Reads the whole store: for the
    /// admin commands, never a hot path.
    fn scan(&self, each: &mut dyn FnMut(Registration)) -> Result<usize, StoreError>;

    /// Whether tokens are sealed under a store key.
    fn is_sealed(&self) -> bool;

    /// Whether every publish is answered from memory yet (a store that warms up after opening says
    /// `false` until it has; publishes are answered correctly either way, only slower).
    fn is_warm(&self) -> bool {
        true
    }

    /// Remember that a device token (by its keyed hash, [`crate::store::secrets::Keyring::token`]) was
    /// declared dead by its push service, until `until` (seconds since the Unix epoch). Registration-free
    /// publishes to it are then refused without asking the service again. Durable after [`Store::flush`].
    fn remember_dead(&self, token: &Digest, until: u64) -> Result<(), StoreError>;

    /// Whether a token (by keyed hash) is remembered dead at `now` (seconds since the Unix epoch). An
    /// expired memory is forgotten.
    fn is_dead(&self, token: &Digest, now: u64) -> Result<bool, StoreError>;

    /// Write every registration to `out` as an export (see [`import`]); returns how many. Sealed tokens
    /// stay sealed, so the file reveals no more than the database would.
    fn export(&self, out: &mut dyn Write) -> Result<usize, BackupError>;

    // Knock tokens (issue 21). The defaults refuse, so a store that wraps another (a test double) keeps
    // compiling; both engines keep them.

    /// Insert or replace the knock token whose keyed hash is `hash`. Its node must be registered
    /// ([`StoreError::Invalid`] otherwise) by its owner ([`StoreError::Conflict`] otherwise), and nothing
    /// changes then. Durable after [`Store::flush`].
    fn put_knock_token(&self, hash: &Digest, token: &KnockToken) -> Result<(), StoreError> {
        let _ = (hash, token);
        Err(no_knock_tokens())
    }

    /// The knock token whose keyed hash is `hash`, if any (expired ones too: expiry is the caller's rule).
    fn knock_token(&self, hash: &Digest) -> Result<Option<KnockToken>, StoreError> {
        let _ = hash;
        Err(no_knock_tokens())
    }

    /// Every knock token of one owner, with its hash, in hash order.
    fn knock_tokens_of(&self, owner: &Digest) -> Result<Vec<(Digest, KnockToken)>, StoreError> {
        let _ = owner;
        Err(no_knock_tokens())
    }

    /// Remove a knock token; returns whether there was one. Removing a registration removes its tokens
    /// too, in both engines.
    fn remove_knock_token(&self, hash: &Digest) -> Result<bool, StoreError> {
        let _ = hash;
        Err(no_knock_tokens())
    }

    /// Count one accepted knock on a token (`uses += 1`); nothing if the token is gone. May be batched:
    /// durable only after [`Store::flush`].
    fn count_knock_use(&self, hash: &Digest) -> Result<(), StoreError> {
        let _ = hash;
        Err(no_knock_tokens())
    }
}

/// What a store without knock tokens answers to their calls.
fn no_knock_tokens() -> StoreError {
    StoreError::Invalid("this store keeps no knock tokens".into())
}
