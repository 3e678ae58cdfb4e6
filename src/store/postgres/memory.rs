//! What a PostgreSQL-backed knock keeps in memory: every registration, as the database holds it, so that a
//! publish and every other read of the [`Store`](crate::store::Store) trait is answered without a round
//! trip. The database is the authority; this is kept coherent with it by the instance's own writes and by
//! the other instances' notifications ([`super::engine`]).
//!
//! Kept small, since every instance holds every registration: per node, the record as stored (whatever
//! else is asked of a registration is decoded from it), what a publish needs built once, and the device and
//! owner hashes for the indexes. Nodes are shared between the maps, domains and app names between entries.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::store::record::Codec;
use crate::store::{Digest, KnockToken, PublishTarget, Registration, StoreError};

/// One registration.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// What a publish needs, built once.
    pub target: PublishTarget,
    /// The device's keyed hash.
    device: Digest,
    /// The owner's keyed hash.
    owner: Digest,
    /// The stored record, as in the database's `record` column: the authority for everything else, and
    /// what a conditional delete names.
    pub record: Box<[u8]>,
}

/// Every registration by node, with the device and owner indexes the trait's lookups need.
#[derive(Debug, Default)]
pub(super) struct Memory {
    nodes: HashMap<Arc<str>, Entry>,
    devices: HashMap<Digest, Arc<str>>,
    owners: HashMap<Digest, Vec<Arc<str>>>,
    /// Domains and app names, one copy each.
    names: HashSet<Arc<str>>,
    /// Dead tokens (keyed hashes) and until when they are remembered.
    pub dead: HashMap<Digest, u64>,
    /// Knock tokens by keyed hash: decoded (so a node's tokens are found without unsealing) and as stored.
    knock: HashMap<Digest, Knock>,
    /// Every owner's knock tokens.
    knock_owners: HashMap<Digest, BTreeSet<Digest>>,
}

/// One knock token.
#[derive(Debug, Clone)]
pub(super) struct Knock {
    /// The token, decoded.
    pub token: KnockToken,
    /// Its record, as in the database's `record` column.
    pub record: Box<[u8]>,
}

impl Memory {
    /// The entry for a node.
    pub fn get(&self, node: &str) -> Option<&Entry> {
        self.nodes.get(node)
    }

    /// The registration for a node, decoded from its record.
    pub fn registration(
        &self,
        codec: &Codec,
        node: &str,
    ) -> Result<Option<Registration>, StoreError> {
        self.nodes
            .get(node)
            .map(|e| codec.decode(node.as_bytes(), &e.record))
            .transpose()
    }

    /// The owner of a node.
    pub fn owner_of(&self, node: &str) -> Option<Digest> {
        self.nodes.get(node).map(|e| e.owner)
    }

    /// The node a device is registered under.
    pub fn node_for_device(&self, device: &Digest) -> Option<String> {
        self.devices.get(device).map(|n| n.to_string())
    }

    /// An owner's nodes.
    pub fn nodes_of(&self, owner: &Digest) -> Vec<String> {
        let mut nodes: Vec<String> = self
            .owners
            .get(owner)
            .map(|nodes| nodes.iter().map(|n| n.to_string()).collect())
            .unwrap_or_default();
        nodes.sort();
        nodes
    }

    /// How many registrations.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Every node and its stored record.
    pub fn records(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.nodes.iter().map(|(n, e)| (&**n, &*e.record))
    }

    /// Whether `registration` may take its node: the node is free or its owner's already.
    pub fn may_put(&self, registration: &Registration) -> bool {
        self.nodes
            .get(registration.node.as_str())
            .is_none_or(|e| e.owner == registration.owner)
    }

    /// One copy of a domain or app name.
    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.names.get(name) {
            return known.clone();
        }
        let name: Arc<str> = name.into();
        self.names.insert(name.clone());
        name
    }

    /// Put a registration as [`crate::store::Store::put`] says: replaces the node's entry, and the device's
    /// previous node, if another, goes.
    pub fn put(&mut self, registration: &Registration, record: impl Into<Box<[u8]>>) {
        let mut target = PublishTarget::from(registration);
        target.domain = self.name(&registration.domain);
        target.app = self.name(&registration.app);
        let entry = Entry {
            target,
            device: registration.device,
            owner: registration.owner,
            record: record.into(),
        };
        self.put_entry(&registration.node, entry);
    }

    /// Put an entry already made (one kept across a reload).
    pub fn put_entry(&mut self, node: &str, entry: Entry) {
        self.unlink(node);
        let previous = self
            .devices
            .get(&entry.device)
            .filter(|previous| ***previous != *node)
            .cloned();
        if let Some(previous) = previous {
            self.remove(&previous);
        }
        let node: Arc<str> = node.into();
        self.devices.insert(entry.device, node.clone());
        let owned = self.owners.entry(entry.owner).or_default();
        if !owned.contains(&node) {
            owned.push(node.clone());
        }
        self.nodes.insert(node, entry);
    }

    /// Remove a node's entry; returns it.
    pub fn remove(&mut self, node: &str) -> Option<Entry> {
        self.unlink(node);
        self.nodes.remove(node)
    }

    /// Drop a node's device and owner index entries (not the entry itself).
    fn unlink(&mut self, node: &str) {
        let Some(old) = self.nodes.get(node) else {
            return;
        };
        let (device, owner) = (old.device, old.owner);
        if self.devices.get(&device).is_some_and(|n| &**n == node) {
            self.devices.remove(&device);
        }
        if let Some(nodes) = self.owners.get_mut(&owner) {
            nodes.retain(|n| &**n != node);
            if nodes.is_empty() {
                self.owners.remove(&owner);
            }
        }
    }

    /// Registrations per app.
    pub fn counts_by_app(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for entry in self.nodes.values() {
            *counts.entry(&entry.target.app).or_default() += 1;
        }
        let mut counts: Vec<_> = counts
            .into_iter()
            .map(|(app, n)| (app.to_owned(), n))
            .collect();
        counts.sort();
        counts
    }
}

/// Knock tokens.
impl Memory {
    /// A knock token by hash.
    pub fn knock(&self, hash: &Digest) -> Option<&Knock> {
        self.knock.get(hash)
    }

    /// Put a knock token (replacing any under the same hash).
    pub fn put_knock(&mut self, hash: Digest, knock: Knock) {
        self.remove_knock(&hash);
        self.knock_owners
            .entry(knock.token.owner)
            .or_default()
            .insert(hash);
        self.knock.insert(hash, knock);
    }

    /// Remove a knock token; returns it.
    pub fn remove_knock(&mut self, hash: &Digest) -> Option<Knock> {
        let old = self.knock.remove(hash)?;
        if let Some(hashes) = self.knock_owners.get_mut(&old.token.owner) {
            hashes.remove(hash);
            if hashes.is_empty() {
                self.knock_owners.remove(&old.token.owner);
            }
        }
        Some(old)
    }

    /// An owner's knock tokens, in hash order.
    pub fn knock_of_owner(&self, owner: &Digest) -> Vec<(Digest, KnockToken)> {
        self.knock_owners
            .get(owner)
            .into_iter()
            .flatten()
            .filter_map(|h| self.knock.get(h).map(|k| (*h, k.token.clone())))
            .collect()
    }

    /// The hashes of the knock tokens that wake `node` (all its owner's, so one owner's few are looked at).
    pub fn knock_of_node(&self, node: &str) -> Vec<Digest> {
        let Some(entry) = self.nodes.get(node) else {
            return Vec::new();
        };
        self.knock_owners
            .get(&entry.owner)
            .into_iter()
            .flatten()
            .filter(|h| self.knock.get(*h).is_some_and(|k| k.token.node == node))
            .copied()
            .collect()
    }

    /// Every knock token's hash and record, in hash order (for an export).
    pub fn knock_records(&self) -> Vec<(Digest, Box<[u8]>)> {
        let mut records: Vec<_> = self
            .knock
            .iter()
            .map(|(h, k)| (*h, k.record.clone()))
            .collect();
        records.sort_by_key(|(h, _)| *h);
        records
    }

    /// Remove the knock tokens that wake `node` (before the node itself goes); their hashes.
    pub fn remove_knock_of_node(&mut self, node: &str) -> Vec<Digest> {
        let hashes = self.knock_of_node(node);
        for hash in &hashes {
            self.remove_knock(hash);
        }
        hashes
    }

    /// Count one use of a knock token, in the record and the decoded token; whether there was one.
    pub fn count_knock_use(&mut self, hash: &Digest) -> Result<bool, StoreError> {
        let Some(knock) = self.knock.get_mut(hash) else {
            return Ok(false);
        };
        crate::store::knock::count_use(&mut knock.record)?;
        knock.token.uses = knock.token.uses.saturating_add(1);
        Ok(true)
    }
}
