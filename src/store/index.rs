//! The publish index: what a publish needs of every registration, held in memory.
//!
//! A publish must be answered in microseconds, and a million registrations do not fit sled's page cache: a
//! publish to a cold node read the disk, and at a million registrations p99 latency was three times that of a
//! small store. The index keeps per node only what a publish checks and pushes with (token, secret hash,
//! domain, app), about 100 bytes a registration, in one flat table. sled stays the durable copy and the only
//! one commands read. The index is rebuilt from sled at every start, in the background; until it is complete,
//! a node it does not hold is looked up in sled.
//!
//! It must never answer for a registration sled no longer has: a removal while the rebuild runs leaves a
//! tombstone, so the rebuild cannot bring the removed node back.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hashbrown::HashTable;

use super::record::{lower_hex, PublishFields};
use super::Digest;

/// What a publish needs to know of its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishTarget {
    /// The APNs device token, lowercase hex.
    pub token: String,
    /// SHA-256 of the node's publish secret.
    pub secret_hash: Digest,
    /// The only server allowed to publish to the node.
    pub domain: Arc<str>,
    /// The configured app the token belongs to.
    pub app: Arc<str>,
}

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
    table: HashTable<u32>,
    /// The entries, packed; a removal moves the last entry into the hole.
    entries: Vec<Entry>,
    /// Keyed, so nodes a client chose cannot be picked to collide.
    hasher: RandomState,
    /// Domains, stored once each.
    names: Names,
    /// App names, stored once each; their reference counts are the registrations per app.
    apps: Names,
    /// Whether every stored registration is in the index, so a miss is an answer.
    complete: bool,
    /// While the rebuild runs: nodes removed since it started, which it must not bring back.
    tombstones: HashSet<NodeKey>,
}

struct Entry {
    node: NodeKey,
    token: Token,
    secret_hash: Digest,
    domain: u32,
    app: u32,
}

/// A node, compactly: knock's own nodes are 16 random bytes in URL-safe base64; a node a client chose (the
/// `<enable/>` shorthand) is kept as it is.
#[derive(Clone, PartialEq, Eq, Hash)]
enum NodeKey {
    Random([u8; 16]),
    Chosen(Box<str>),
}

impl NodeKey {
    fn new(node: &str) -> NodeKey {
        // The decoder refuses non-canonical trailing bits, so a decoded node re-encodes to the same text.
        let mut raw = [0u8; 16];
        if node.len() == 22 && matches!(URL_SAFE_NO_PAD.decode_slice(node, &mut raw), Ok(16)) {
            NodeKey::Random(raw)
        } else {
            NodeKey::Chosen(node.into())
        }
    }
}

/// An APNs token: 32 bytes today; Apple documents them as variable length, so longer ones are boxed.
enum Token {
    Apns([u8; 32]),
    Other(Box<[u8]>),
}

impl Token {
    fn new(bytes: &[u8]) -> Token {
        match <[u8; 32]>::try_from(bytes) {
            Ok(apns) => Token::Apns(apns),
            Err(_) => Token::Other(bytes.into()),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Token::Apns(b) => b,
            Token::Other(b) => b,
        }
    }
}

/// Interned strings with reference counts, so names no registration uses any more are let go.
#[derive(Default)]
struct Names {
    by_id: Vec<Option<(Arc<str>, usize)>>,
    ids: std::collections::HashMap<Arc<str>, u32>,
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
    fn slot(&self, key: &NodeKey) -> Option<usize> {
        let hash = self.hasher.hash_one(key);
        self.table
            .find(hash, |&slot| self.entries[slot as usize].node == *key)
            .map(|&slot| slot as usize)
    }

    fn upsert(&mut self, key: NodeKey, fields: &PublishFields<'_>) {
        let domain = self.names.acquire(fields.domain);
        let app = self.apps.acquire(fields.app);
        let entry = Entry {
            node: key,
            token: Token::new(&fields.token),
            secret_hash: fields.secret_hash,
            domain,
            app,
        };
        if let Some(slot) = self.slot(&entry.node) {
            let old = std::mem::replace(&mut self.entries[slot], entry);
            self.names.release(old.domain);
            self.apps.release(old.app);
            return;
        }
        let slot = u32::try_from(self.entries.len()).expect("fewer than 2^32 registrations");
        let hash = self.hasher.hash_one(&entry.node);
        self.entries.push(entry);
        let Inner {
            table,
            entries,
            hasher,
            ..
        } = self;
        table.insert_unique(hash, slot, |&s| hasher.hash_one(&entries[s as usize].node));
    }

    fn remove(&mut self, key: &NodeKey) {
        if !self.complete {
            self.tombstones.insert(key.clone());
        }
        let hash = self.hasher.hash_one(key);
        let Inner { table, entries, .. } = &mut *self;
        let Ok(found) = table.find_entry(hash, |&slot| entries[slot as usize].node == *key) else {
            return;
        };
        let slot = *found.get() as usize;
        found.remove();
        let removed = self.entries.swap_remove(slot);
        self.names.release(removed.domain);
        self.apps.release(removed.app);
        // The entry that was last now sits in the hole: point its table slot there.
        if let Some(moved) = self.entries.get(slot) {
            let old_slot = self.entries.len() as u32;
            let hash = self.hasher.hash_one(&moved.node);
            if let Some(s) = self.table.find_mut(hash, |&s| s == old_slot) {
                *s = slot as u32;
            }
        }
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
        let key = NodeKey::new(node);
        let inner = self.read();
        match inner.slot(&key) {
            Some(slot) => {
                let e = &inner.entries[slot];
                Lookup::Found(PublishTarget {
                    token: lower_hex(e.token.bytes()),
                    secret_hash: e.secret_hash,
                    domain: inner.names.get(e.domain),
                    app: inner.apps.get(e.app),
                })
            }
            None if inner.complete => Lookup::Absent,
            None => Lookup::Unknown,
        }
    }

    /// Record a registration that is now in the store.
    pub fn upsert(&self, node: &str, fields: &PublishFields<'_>) {
        self.write().upsert(NodeKey::new(node), fields);
    }

    /// Record that a node is no longer in the store.
    pub fn remove(&self, node: &str) {
        self.write().remove(&NodeKey::new(node));
    }

    /// Add registrations read from the store by the rebuild. A node the index already holds was written
    /// since the rebuild read it, and a tombstoned one was removed: both keep what the index says.
    pub fn rebuild_batch<'a>(&self, batch: impl IntoIterator<Item = (&'a str, PublishFields<'a>)>) {
        let mut inner = self.write();
        for (node, fields) in batch {
            let key = NodeKey::new(node);
            if inner.complete || inner.tombstones.contains(&key) || inner.slot(&key).is_some() {
                continue;
            }
            inner.upsert(key, &fields);
        }
    }

    /// The rebuild has read every stored registration: from now on a miss is an answer.
    pub fn finish_rebuild(&self) {
        let mut inner = self.write();
        inner.complete = true;
        inner.tombstones = HashSet::new();
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
        self.read().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(token: &'a [u8], domain: &'a str, app: &'a str) -> PublishFields<'a> {
        PublishFields {
            secret_hash: [token[0]; 32],
            domain,
            app,
            token: token.into(),
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
        let node = crate::secrets::random_id();
        index.upsert(&node, &fields(&[0xab; 32], "example.org", "chat"));
        let t = found(&index, &node);
        assert_eq!(t.token, "ab".repeat(32));
        assert_eq!(&*t.domain, "example.org");
        assert_eq!(&*t.app, "chat");
        assert_eq!(t.secret_hash, [0xab; 32]);
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
            assert_eq!(found(&index, node).token, "07".repeat(100));
        }
        assert_eq!(index.len(), 3);
    }

    #[test]
    fn removals_keep_every_other_entry_findable() {
        let index = PublishIndex::new();
        index.finish_rebuild();
        let nodes: Vec<String> = (0..500).map(|_| crate::secrets::random_id()).collect();
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
                Lookup::Found(t) if i % 3 != 0 => assert_eq!(t.token, hex::encode([i as u8; 32])),
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
            found(&index, "fresh-node-of-a-client").token,
            "02".repeat(32)
        );
        assert_eq!(index.get("gone-node-of-a-client"), Lookup::Absent);
        assert_eq!(
            found(&index, "cold-node-of-a-client").token,
            "04".repeat(32)
        );
        assert!(index.read().tombstones.is_empty());
    }
}
