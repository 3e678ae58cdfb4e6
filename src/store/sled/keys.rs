//! The store's own keys, in sled's default tree: the instance key (in the clear, or sealed under the store
//! key beside that key's check value) — read or created once, when the store is opened.

use rand::RngCore;

use crate::store::seal::StoreKey;
use crate::store::StoreError;

/// The instance key in the clear (a store without a store key).
const INSTANCE_KEY: &[u8] = b"instance-key";
/// The instance key sealed under the store key.
const INSTANCE_KEY_SEALED: &[u8] = b"instance-key-sealed";
/// The store key's check value: which key sealed this store.
const STORE_KEY_CHECK: &[u8] = b"store-key-check";
/// What the sealed instance key is bound to.
const INSTANCE_KEY_CONTEXT: &[u8] = b"knock instance key v1";

/// Whether the store has an instance key yet: a store without one is new (no knock has opened it).
pub(super) fn is_new(db: &sled::Db) -> Result<bool, StoreError> {
    Ok(!db.contains_key(INSTANCE_KEY)? && !db.contains_key(INSTANCE_KEY_SEALED)?)
}

/// Read the instance key, creating it on a new store; seals it (and records the key's check value) the
/// first time the store is opened with a store key. A new store without a store key is created only if
/// `plaintext` allows it.
pub(super) fn instance_key(
    db: &sled::Db,
    key: Option<&StoreKey>,
    plaintext: bool,
) -> Result<[u8; 32], StoreError> {
    let as_key = |bytes: &[u8]| {
        <[u8; 32]>::try_from(bytes)
            .map_err(|_| StoreError::Corrupt("instance key has the wrong length".into()))
    };
    let check = db.get(STORE_KEY_CHECK)?;
    let Some(key) = key else {
        if check.is_some() {
            return Err(StoreError::KeyRequired);
        }
        if !plaintext && is_new(db)? {
            return Err(StoreError::KeyNeeded);
        }
        let mut fresh = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut fresh);
        let _ = db.compare_and_swap(INSTANCE_KEY, None as Option<&[u8]>, Some(&fresh[..]))?;
        let stored = db
            .get(INSTANCE_KEY)?
            .ok_or_else(|| StoreError::Corrupt("instance key vanished".into()))?;
        return as_key(&stored);
    };
    if check.is_some_and(|c| c.as_ref() != key.check_value()) {
        return Err(StoreError::WrongKey);
    }
    if let Some(sealed) = db.get(INSTANCE_KEY_SEALED)? {
        let opened = key
            .open(INSTANCE_KEY_CONTEXT, &sealed)
            .ok_or_else(|| StoreError::Corrupt("the sealed instance key does not open".into()))?;
        return as_key(&opened);
    }
    // First open with a store key: seal the key this store already had, or a fresh one.
    let instance = match db.get(INSTANCE_KEY)? {
        Some(clear) => as_key(&clear)?,
        None => {
            let mut fresh = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut fresh);
            fresh
        }
    };
    write_instance_key(db, Some(key), &instance)?;
    Ok(instance)
}

/// Make `instance` the store's instance key, durably: sealed under `key` beside its check value, or in the
/// clear without one. Replaces whatever key the store had (an import into a new store does this).
pub(super) fn write_instance_key(
    db: &sled::Db,
    key: Option<&StoreKey>,
    instance: &[u8; 32],
) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    match key {
        Some(key) => {
            batch.insert(
                INSTANCE_KEY_SEALED,
                key.seal(INSTANCE_KEY_CONTEXT, instance),
            );
            batch.insert(STORE_KEY_CHECK, &key.check_value()[..]);
            batch.remove(INSTANCE_KEY);
        }
        None => {
            batch.insert(INSTANCE_KEY, &instance[..]);
            batch.remove(INSTANCE_KEY_SEALED);
            batch.remove(STORE_KEY_CHECK);
        }
    }
    db.apply_batch(batch)?;
    db.flush()?;
    Ok(())
}

/// The instance key as the store holds it, for an export: sealed (with the key's check value) or clear.
pub(super) fn stored_instance_key(db: &sled::Db) -> Result<StoredInstanceKey, StoreError> {
    Ok(match db.get(INSTANCE_KEY_SEALED)? {
        Some(sealed) => StoredInstanceKey::Sealed {
            sealed: sealed.to_vec(),
            check: db
                .get(STORE_KEY_CHECK)?
                .map(|c| c.to_vec())
                .unwrap_or_default(),
        },
        None => StoredInstanceKey::Clear(
            db.get(INSTANCE_KEY)?
                .map(|c| c.to_vec())
                .unwrap_or_default(),
        ),
    })
}

/// The instance key in the form the store keeps it.
pub(super) enum StoredInstanceKey {
    /// Without a store key.
    Clear(Vec<u8>),
    /// Sealed under the store key whose check value is `check`.
    Sealed {
        /// The sealed instance key.
        sealed: Vec<u8>,
        /// The sealing key's check value.
        check: Vec<u8>,
    },
}

/// The instance key of an export, opened with `key`.
pub(super) fn open_from_export(key: &StoreKey, sealed: &[u8]) -> Option<[u8; 32]> {
    key.open(INSTANCE_KEY_CONTEXT, sealed)?.try_into().ok()
}

/// Keep an exported sealed instance key as it was exported (so a re-export is byte for byte the same),
/// beside the check value of `key`, which the import checked opens it.
pub(super) fn adopt_sealed_instance_key(
    db: &sled::Db,
    key: &StoreKey,
    sealed: &[u8],
) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    batch.insert(INSTANCE_KEY_SEALED, sealed);
    batch.insert(STORE_KEY_CHECK, &key.check_value()[..]);
    batch.remove(INSTANCE_KEY);
    db.apply_batch(batch)?;
    db.flush()?;
    Ok(())
}
