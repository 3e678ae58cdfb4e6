//! What a PostgreSQL-backed knock keeps in memory: every registration, as the database holds it, so that a
//! publish and every other read of the [`Store`](crate::store::Store) trait is answered without a round
//! trip. The database is the authority; this is kept coherent with it by the instance's own writes and by
//! the other instances' notifications ([`super::engine`]).

use std::collections::{BTreeSet, HashMap};

use crate::store::{Digest, PublishTarget, Registration};

/// One registration: as the trait hands it out, as a publish reads it, and the record bytes the database
/// holds for it (so a conditional delete names exactly the row this instance saw).
#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// The whole registration, token opened.
    pub registration: Registration,
    /// What a publish needs, built once.
    pub target: PublishTarget,
    /// The stored record, as in the database's `record` column.
    pub record: Vec<u8>,
}

impl Entry {
    pub fn new(registration: Registration, record: Vec<u8>) -> Entry {
        Entry {
            target: PublishTarget::from(&registration),
            registration,
            record,
        }
    }
}

/// Every registration by node, with the device and owner indexes the trait's lookups need.
#[derive(Debug, Default)]
pub(super) struct Memory {
    nodes: HashMap<String, Entry>,
    devices: HashMap<Digest, String>,
    owners: HashMap<Digest, BTreeSet<String>>,
    /// Dead tokens (keyed hashes) and until when they are remembered.
    pub dead: HashMap<Digest, u64>,
}

impl Memory {
    /// The entry for a node.
    pub fn get(&self, node: &str) -> Option<&Entry> {
        self.nodes.get(node)
    }

    /// The node a device is registered under.
    pub fn node_for_device(&self, device: &Digest) -> Option<&String> {
        self.devices.get(device)
    }

    /// An owner's nodes.
    pub fn nodes_of(&self, owner: &Digest) -> Vec<String> {
        self.owners
            .get(owner)
            .map(|nodes| nodes.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// How many registrations.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Every entry.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.nodes.values()
    }

    /// Whether `registration` may take its node: the node is free or its owner's already.
    pub fn may_put(&self, registration: &Registration) -> bool {
        self.nodes
            .get(&registration.node)
            .is_none_or(|e| e.registration.owner == registration.owner)
    }

    /// Put an entry as [`crate::store::Store::put`] says: replaces the node's entry, and the device's
    /// previous node, if another, goes. Returns the node that went, if any.
    pub fn put(&mut self, entry: Entry) -> Option<String> {
        let node = entry.registration.node.clone();
        let device = entry.registration.device;
        self.unlink(&node);
        let previous = self
            .devices
            .get(&device)
            .filter(|previous| **previous != node)
            .cloned();
        if let Some(previous) = &previous {
            self.remove(previous);
        }
        self.devices.insert(device, node.clone());
        self.owners
            .entry(entry.registration.owner)
            .or_default()
            .insert(node.clone());
        self.nodes.insert(node, entry);
        previous
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
        let (device, owner) = (old.registration.device, old.registration.owner);
        if self.devices.get(&device).is_some_and(|n| n == node) {
            self.devices.remove(&device);
        }
        if let Some(nodes) = self.owners.get_mut(&owner) {
            nodes.remove(node);
            if nodes.is_empty() {
                self.owners.remove(&owner);
            }
        }
    }

    /// Registrations per app.
    pub fn counts_by_app(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for entry in self.nodes.values() {
            *counts.entry(entry.registration.app.as_str()).or_default() += 1;
        }
        let mut counts: Vec<_> = counts
            .into_iter()
            .map(|(app, n)| (app.to_owned(), n))
            .collect();
        counts.sort();
        counts
    }
}
