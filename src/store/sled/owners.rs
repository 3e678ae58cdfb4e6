//! Which nodes each owner holds: the `owners` tree, keyed by the owner's hash followed by the node, so one
//! owner's nodes are one prefix scan. Kept in the same transaction as the registration it mirrors, and
//! built from the registrations once for a store written before it existed.

use crate::store::record::Codec;
use crate::store::{Digest, StoreError};

/// The tree key of one owner's node.
pub(super) fn key(owner: &Digest, node: &[u8]) -> Vec<u8> {
    [&owner[..], node].concat()
}

/// Every node of `owner`.
pub(super) fn nodes(owners: &sled::Tree, owner: &Digest) -> Result<Vec<String>, StoreError> {
    owners
        .scan_prefix(owner)
        .keys()
        .map(|key| {
            let key = key?;
            String::from_utf8(key[owner.len()..].to_vec())
                .map_err(|_| StoreError::Corrupt("an owner entry's node is not UTF-8".into()))
        })
        .collect()
}

/// Fill the tree from every registration (a store from before the tree). Reads each record's owner
/// without opening what it holds sealed.
pub(super) fn build(
    registrations: &sled::Tree,
    owners: &sled::Tree,
    codec: &Codec,
) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    let mut count = 0usize;
    for entry in registrations.iter() {
        let (node, record) = entry?;
        let owner = codec.owner(&node, &record)?;
        batch.insert(key(&owner, &node), &[]);
        count += 1;
    }
    owners.apply_batch(batch)?;
    tracing::info!(
        registrations = count,
        "built the owner index of a store written before it existed"
    );
    Ok(())
}
