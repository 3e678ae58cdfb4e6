//! The publish index: what a publish needs of every registration, held in memory.
//!
//! A publish must be answered in microseconds, and a million registrations do not fit sled's page cache: a
//! publish to a cold node read the disk, and at a million registrations p99 latency was three times that of a
//! small store. The index keeps per node only what a publish checks and pushes with (token, secret tag,
//! domain, app): 72 bytes for a registration of the usual shape, in one flat table. sled stays the durable
//! copy and the only one commands read. The index is rebuilt from sled at every start, in the background;
//! until it is complete, a node it does not hold is looked up in sled.
//!
//! It must never answer for a registration sled no longer has: a removal while the rebuild runs leaves a
//! tombstone, so the rebuild cannot bring the removed node back.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hashbrown::HashTable;

use super::huge_pages::{HugePages, HugeVec};
use crate::push::{ProviderKind, Token};
use crate::store::record::PublishFields;
use crate::store::{secret_tag, PublishTarget, SecretTag};

/// What the index knows of a node.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The node is registered.
    Found(PublishTarget),
    /// The node is not registered (the index is complete, so this is certain).
    Absent,
    /// The index is still being built (or could not be): ask the store.
    Unknown,
}

/// The in-memory publish index. Cheap to share: one lock, read-mostly.
#[derive(Default)]
pub struct PublishIndex {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Slots into `entries`, found by the hash of the entry's node.
    table: HashTable<u32, HugePages>,
    /// Registrations of the usual shape, packed; a removal moves the last entry into the hole.
    entries: HugeVec<Entry>,
    /// Keyed, so nodes cannot be picked to collide.
    hasher: RandomState,
    /// Registrations of any other shape: nodes a client chose (the `<enable/>` shorthand), tokens that are
    /// not 32 bytes, registrations of dialects that carry more (Tigase's). Rare, so kept as they are.
    others: HashMap<Box<str>, Other>,
    /// Domains, stored once each.
    names: Names,
    /// App names, stored once each; their reference counts are the registrations per app.
    apps: Names,
    /// Whether every stored registration is in the index, so a miss is an answer.
    complete: bool,
    /// While the rebuild runs: nodes removed since it started, which it must not bring back.
    tombstones: HashSet<Box<str>>,
}

/// A registration of the usual shape: a node knock made (16 random bytes, as 22 characters of URL-safe
/// base64) and a 32-byte token (an APNs token, today's commonest). 72 bytes.
struct Entry {
    node: [u8; 16],
    token: [u8; 32],
    meta: Meta,
}

/// A registration of any other shape.
struct Other {
    token: Box<[u8]>,
    meta: Meta,
    /// What an extended registration carries besides ([`PublishFields::is_extended`]).
    extra: Option<Box<Extra>>,
}

/// What an extended registration carries besides the usual.
struct Extra {
    /// Publishes need no secret (`Meta::secret_tag` is then unused).
    no_secret: bool,
    call_token: Option<Token>,
    account: Option<Arc<str>>,
}

/// What every registration carries besides its node and token.
struct Meta {
    secret_tag: SecretTag,
    /// Into `Inner::names`.
    domain: u32,
    /// The app and the provider in one word, which keeps an entry at 72 bytes: see [`AppRef`].
    app: AppRef,
}

/// An app name's id in `Inner::apps` (low 24 bits) and the registration's provider byte (high 8 bits).
#[derive(Clone, Copy)]
struct AppRef(u32);

impl AppRef {
    fn new(app: u32, provider: ProviderKind) -> AppRef {
        assert!(app < 1 << 24, "fewer than 2^24 distinct app names");
        AppRef(app | u32::from(provider.byte()) << 24)
    }

    fn app(self) -> u32 {
        self.0 & 0x00ff_ffff
    }

    fn provider(self) -> ProviderKind {
        // Only `new` makes one, from a ProviderKind.
        ProviderKind::from_byte((self.0 >> 24) as u8).expect("an AppRef holds a provider's byte")
    }
}

/// The 16 bytes behind a node knock made. The decoder refuses non-canonical trailing bits, so a node
/// decoded here re-encodes to the same text.
fn made_node(node: &str) -> Option<[u8; 16]> {
    let mut raw = [0u8; 16];
    (node.len() == 22 && matches!(URL_SAFE_NO_PAD.decode_slice(node, &mut raw), Ok(16)))
        .then_some(raw)
}

/// Interned strings with reference counts, so names no registration uses any more are let go.
#[derive(Default)]
struct Names {
    by_id: Vec<Option<(Arc<str>, usize)>>,
    ids: HashMap<Arc<str>, u32>,
    free: Vec<u32>,
}

impl Names {
    fn acquire(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            if let Some((_, count)) = &mut self.by_id[id as usize] {
                *count += 1;
            }
            return id;
        }
        let name: Arc<str> = name.into();
        let id = match self.free.pop() {
            Some(id) => {
                self.by_id[id as usize] = Some((name.clone(), 1));
                id
            }
            None => {
                self.by_id.push(Some((name.clone(), 1)));
                u32::try_from(self.by_id.len() - 1).expect("fewer than 2^32 distinct names")
            }
        };
        self.ids.insert(name, id);
        id
    }

    fn release(&mut self, id: u32) {
        let slot = &mut self.by_id[id as usize];
        if let Some((name, count)) = slot {
            *count -= 1;
            if *count == 0 {
                self.ids.remove(&**name);
                *slot = None;
                self.free.push(id);
            }
        }
    }

    fn get(&self, id: u32) -> Arc<str> {
        match &self.by_id[id as usize] {
            Some((name, _)) => name.clone(),
            None => Arc::from(""),
        }
    }
}

impl Inner {
    fn slot(&self, node: &[u8; 16]) -> Option<usize> {
        let hash = self.hasher.hash_one(node);
        self.table
            .find(hash, |&slot| self.entries[slot as usize].node == *node)
            .map(|&slot| slot as usize)
    }

    fn contains(&self, node: &str) -> bool {
        made_node(node).is_some_and(|raw| self.slot(&raw).is_some())
            || self.others.contains_key(node)
    }

    fn target(&self, token: &[u8], meta: &Meta, extra: Option<&Extra>) -> PublishTarget {
        PublishTarget {
            provider: meta.app.provider(),
            token: Token::from_bytes(token),
            secret_tag: match extra {
                Some(extra) if extra.no_secret => None,
                _ => Some(meta.secret_tag),
            },
            domain: self.names.get(meta.domain),
            app: self.apps.get(meta.app.app()),
            call_token: extra.and_then(|e| e.call_token.clone()),
            account: extra.and_then(|e| e.account.clone()),
        }
    }

    fn get(&self, node: &str) -> Option<PublishTarget> {
        if let Some(slot) = made_node(node).and_then(|raw| self.slot(&raw)) {
            let e = &self.entries[slot];
            return Some(self.target(&e.token, &e.meta, None));
        }
        let other = self.others.get(node)?;
        Some(self.target(&other.token, &other.meta, other.extra.as_deref()))
    }

    fn upsert(&mut self, node: &str, fields: &PublishFields<'_>) {
        // Names first: taking the old entry may drop the last use of a name the new one needs.
        let meta = self.meta(fields);
        // A node can change shape (a re-registration with a token of another length): drop what it was.
        self.take(node);
        self.insert(node, fields, meta);
    }

    fn meta(&mut self, fields: &PublishFields<'_>) -> Meta {
        Meta {
            secret_tag: fields
                .secret_hash
                .as_ref()
                .map(secret_tag)
                .unwrap_or_default(),
            domain: self.names.acquire(fields.domain),
            app: AppRef::new(self.apps.acquire(fields.app), fields.provider),
        }
    }

    /// Add a node the index does not hold.
    fn insert(&mut self, node: &str, fields: &PublishFields<'_>, meta: Meta) {
        let usual = (!fields.is_extended()).then_some(());
        let (Some(raw), Ok(token), Some(())) =
            (made_node(node), <[u8; 32]>::try_from(&*fields.token), usual)
        else {
            let token = fields.token.as_ref().into();
            let extra = fields.is_extended().then(|| {
                Box::new(Extra {
                    no_secret: fields.secret_hash.is_none(),
                    call_token: fields.call_token.as_deref().map(Token::from_bytes),
                    account: fields.account.as_deref().map(Arc::from),
                })
            });
            self.others
                .insert(node.into(), Other { token, meta, extra });
            return;
        };
        let slot = u32::try_from(self.entries.len()).expect("fewer than 2^32 registrations");
        let hash = self.hasher.hash_one(raw);
        self.entries.push(Entry {
            node: raw,
            token,
            meta,
        });
        let Inner {
            table,
            entries,
            hasher,
            ..
        } = self;
        table.insert_unique(hash, slot, |&s| hasher.hash_one(entries[s as usize].node));
    }

    fn remove(&mut self, node: &str) {
        if !self.complete {
            self.tombstones.insert(node.into());
        }
        self.take(node);
    }

    /// Remove what the index holds for `node`, letting go of its names.
    fn take(&mut self, node: &str) {
        let meta = match made_node(node).and_then(|raw| self.take_entry(&raw)) {
            Some(meta) => meta,
            None => match self.others.remove(node) {
                Some(other) => other.meta,
                None => return,
            },
        };
        self.names.release(meta.domain);
        self.apps.release(meta.app.app());
    }

    fn take_entry(&mut self, node: &[u8; 16]) -> Option<Meta> {
        let hash = self.hasher.hash_one(node);
        let Inner { table, entries, .. } = &mut *self;
        let found = table
            .find_entry(hash, |&slot| entries[slot as usize].node == *node)
            .ok()?;
        let slot = *found.get() as usize;
        found.remove();
        let removed = self.entries.swap_remove(slot);
        // The entry that was last now sits in the hole: point its table slot there.
        if let Some(moved) = self.entries.get(slot) {
            let old_slot = self.entries.len() as u32;
            let hash = self.hasher.hash_one(moved.node);
            if let Some(s) = self.table.find_mut(hash, |&s| s == old_slot) {
                *s = slot as u32;
            }
        }
        Some(removed.meta)
    }
}

impl PublishIndex {
    /// An empty index, not yet complete: misses are [`Lookup::Unknown`] until [`PublishIndex::finish_rebuild`].
    pub fn new() -> PublishIndex {
        PublishIndex::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // Every write leaves the index consistent before it can panic, so a poisoned lock is still sound.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// What the index knows of `node`.
    pub fn get(&self, node: &str) -> Lookup {
        let inner = self.read();
        match inner.get(node) {
            Some(target) => Lookup::Found(target),
            None if inner.complete => Lookup::Absent,
            None => Lookup::Unknown,
        }
    }

    /// Record a registration that is now in the store.
    pub fn upsert(&self, node: &str, fields: &PublishFields<'_>) {
        self.write().upsert(node, fields);
    }

    /// Record that a node is no longer in the store.
    pub fn remove(&self, node: &str) {
        self.write().remove(node);
    }

    /// Add registrations read from the store by the rebuild. A node the index already holds was written
    /// since the rebuild read it, and a tombstoned one was removed: both keep what the index says.
    pub fn rebuild_batch<'a>(&self, batch: impl IntoIterator<Item = (&'a str, PublishFields<'a>)>) {
        let mut inner = self.write();
        for (node, fields) in batch {
            if inner.complete || inner.tombstones.contains(node) || inner.contains(node) {
                continue;
            }
            let meta = inner.meta(&fields);
            inner.insert(node, &fields, meta);
        }
    }

    /// The rebuild has read every stored registration: from now on a miss is an answer.
    pub fn finish_rebuild(&self) {
        let mut inner = self.write();
        inner.complete = true;
        inner.tombstones = HashSet::new();
        // Growing by doubling left up to half the entries' room unused; new registrations grow it again.
        inner.entries.shrink_to_fit();
    }

    /// Whether a miss is an answer (the rebuild is done).
    pub fn is_complete(&self) -> bool {
        self.read().complete
    }

    /// Registrations per app, once the index is complete.
    pub fn counts_by_app(&self) -> Option<Vec<(String, usize)>> {
        let inner = self.read();
        inner.complete.then(|| {
            inner
                .apps
                .by_id
                .iter()
                .flatten()
                .map(|(name, count)| (name.to_string(), *count))
                .collect()
        })
    }

    /// Number of registrations held.
    pub fn len(&self) -> usize {
        let inner = self.read();
        inner.entries.len() + inner.others.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(token: &'a [u8], domain: &'a str, app: &'a str) -> PublishFields<'a> {
        PublishFields {
            provider: ProviderKind::Apns,
            secret_hash: Some([token[0]; 32]),
            domain,
            app,
            token: token.into(),
            call_token: None,
            account: None,
        }
    }

    fn found(index: &PublishIndex, node: &str) -> PublishTarget {
        match index.get(node) {
            Lookup::Found(t) => t,
            other => panic!("{node}: {other:?}"),
        }
    }

    #[test]
    fn holds_what_was_written_and_misses_are_unknown_until_complete() {
        let index = PublishIndex::new();
        let node = crate::store::secrets::random_id();
        index.upsert(&node, &fields(&[0xab; 32], "example.org", "chat"));
        let t = found(&index, &node);
        assert_eq!(hex::encode(t.token.as_bytes()), "ab".repeat(32));
        assert_eq!(&*t.domain, "example.org");
        assert_eq!(&*t.app, "chat");
        assert_eq!(t.secret_tag, Some([0xab; 16]));
        assert_eq!(index.get("some-other-node-of-a-client"), Lookup::Unknown);
        index.finish_rebuild();
        assert_eq!(index.get("some-other-node-of-a-client"), Lookup::Absent);
    }

    #[test]
    fn chosen_nodes_and_long_tokens_round_trip() {
        let index = PublishIndex::new();
        index.finish_rebuild();
        // 22 characters that are not canonical base64 (trailing bits set), then other shapes.
        for node in [
            "AAAAAAAAAAAAAAAAAAAAAB",
            "a client's own node, spaces and all",
            "x",
        ] {
            index.upsert(node, &fields(&[7; 100], "a.example", "other"));
            assert_eq!(
                hex::encode(found(&index, node).token.as_bytes()),
                "07".repeat(100)
            );
        }
        assert_eq!(index.len(), 3);
    }

    #[test]
    fn the_provider_and_app_share_a_word_and_come_back_whole() {
        let index = PublishIndex::new();
        let node = crate::store::secrets::random_id();
        index.upsert(&node, &fields(&[0xcd; 32], "example.org", "chat"));
        let t = found(&index, &node);
        assert_eq!(t.provider, ProviderKind::Apns);
        assert_eq!(&*t.app, "chat");
        let r = AppRef::new((1 << 24) - 1, ProviderKind::Apns);
        assert_eq!((r.app(), r.provider()), ((1 << 24) - 1, ProviderKind::Apns));
    }

    #[test]
    fn an_entry_is_72_bytes() {
        // The figure the module header and README's 1M-registration memory rest on.
        assert_eq!(std::mem::size_of::<Entry>(), 72);
    }

    #[test]
    fn a_node_that_changes_shape_is_held_once() {
        let index = PublishIndex::new();
        index.finish_rebuild();
        let node = crate::store::secrets::random_id();
        index.upsert(&node, &fields(&[1; 32], "a.example", "chat"));
        index.upsert(&node, &fields(&[2; 40], "a.example", "chat"));
        assert_eq!(
            hex::encode(found(&index, &node).token.as_bytes()),
            "02".repeat(40)
        );
        assert_eq!(index.len(), 1);
        index.upsert(&node, &fields(&[3; 32], "a.example", "chat"));
        assert_eq!(
            hex::encode(found(&index, &node).token.as_bytes()),
            "03".repeat(32)
        );
        assert_eq!(index.len(), 1);
        assert_eq!(index.counts_by_app(), Some(vec![("chat".to_string(), 1)]));
        index.remove(&node);
        assert_eq!(index.get(&node), Lookup::Absent);
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn removals_keep_every_other_entry_findable() {
        let index = PublishIndex::new();
        index.finish_rebuild();
        let nodes: Vec<String> = (0..500)
            .map(|_| crate::store::secrets::random_id())
            .collect();
        for (i, node) in nodes.iter().enumerate() {
            let token = [i as u8; 32];
            index.upsert(node, &fields(&token, "example.org", "chat"));
        }
        // Remove every third, in an order that moves entries from the end into holes.
        for node in nodes.iter().step_by(3) {
            index.remove(node);
        }
        for (i, node) in nodes.iter().enumerate() {
            match index.get(node) {
                Lookup::Found(t) if i % 3 != 0 => {
                    assert_eq!(hex::encode(t.token.as_bytes()), hex::encode([i as u8; 32]))
                }
                Lookup::Absent if i % 3 == 0 => {}
                other => panic!("node {i}: {other:?}"),
            }
        }
        assert_eq!(index.len(), 500 - 167);
    }

    #[test]
    fn names_are_shared_and_let_go() {
        let index = PublishIndex::new();
        index.upsert(
            "node-one-of-some-client",
            &fields(&[1; 32], "a.example", "chat"),
        );
        index.upsert(
            "node-two-of-some-client",
            &fields(&[2; 32], "a.example", "chat"),
        );
        index.upsert(
            "node-one-of-some-client",
            &fields(&[1; 32], "b.example", "chat"),
        );
        index.remove("node-two-of-some-client");
        {
            let inner = index.read();
            assert_eq!(
                inner.names.ids.len(),
                1,
                "a.example is gone, b.example remains"
            );
            assert!(inner.names.ids.contains_key("b.example"));
        }
        assert_eq!(index.counts_by_app(), None, "not complete yet");
        index.upsert(
            "node-three-of-some-client",
            &fields(&[3; 32], "b.example", "beta"),
        );
        index.finish_rebuild();
        let mut counts = index.counts_by_app().expect("complete");
        counts.sort();
        assert_eq!(counts, [("beta".to_string(), 1), ("chat".to_string(), 1)]);
    }

    #[test]
    fn the_rebuild_never_overrides_a_write_or_revives_a_removal() {
        let index = PublishIndex::new();
        // Written while the rebuild runs: the rebuild's older copy must not win.
        index.upsert(
            "fresh-node-of-a-client",
            &fields(&[2; 32], "example.org", "chat"),
        );
        // Removed while the rebuild runs: its copy, read before the removal, must not come back.
        index.upsert(
            "gone-node-of-a-client",
            &fields(&[3; 32], "example.org", "chat"),
        );
        index.remove("gone-node-of-a-client");
        index.rebuild_batch([
            (
                "fresh-node-of-a-client",
                fields(&[1; 32], "example.org", "chat"),
            ),
            (
                "gone-node-of-a-client",
                fields(&[3; 32], "example.org", "chat"),
            ),
            (
                "cold-node-of-a-client",
                fields(&[4; 32], "example.org", "chat"),
            ),
        ]);
        index.finish_rebuild();
        assert_eq!(
            hex::encode(found(&index, "fresh-node-of-a-client").token.as_bytes()),
            "02".repeat(32)
        );
        assert_eq!(index.get("gone-node-of-a-client"), Lookup::Absent);
        assert_eq!(
            hex::encode(found(&index, "cold-node-of-a-client").token.as_bytes()),
            "04".repeat(32)
        );
        assert!(index.read().tombstones.is_empty());
    }
}
