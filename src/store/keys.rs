//! The store's own keys, in every engine's small table of named values ([`Meta`]): the instance key (in the
//! clear, or sealed under the store key beside that key's check value) — read or created once, when the
//! store is opened.

use rand::RngCore;

use crate::store::seal::StoreKey;
use crate::store::StoreError;

/// The instance key in the clear (a store without a store key).
const INSTANCE_KEY: &str = "instance-key";
/// The instance key sealed under the store key.
const INSTANCE_KEY_SEALED: &str = "instance-key-sealed";
/// The store key's check value: which key sealed this store.
const STORE_KEY_CHECK: &str = "store-key-check";

/// A store's named values, as each engine keeps them (sled: its default tree; PostgreSQL: a table).
pub(crate) trait Meta {
    /// The value named `name`, if any.
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Set `name` to `value` unless it has one already (concurrent openers agree on one); the value after.
    fn get_or_insert(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError>;
    /// Set and remove named values, all or none, durably.
    fn apply(&self, set: &[(&str, &[u8])], remove: &[&str]) -> Result<(), StoreError>;
}
/// What the sealed instance key is bound to.
const INSTANCE_KEY_CONTEXT: &[u8] = b"knock instance key v1";

/// Whether the store has an instance key yet: a store without one is new (no knock has opened it).
pub(crate) fn is_new(db: &dyn Meta) -> Result<bool, StoreError> {
    Ok(db.get(INSTANCE_KEY)?.is_none() && db.get(INSTANCE_KEY_SEALED)?.is_none())
}

/// Read the instance key, creating it on a new store; seals it (and records the key's check value) the
/// first time the store is opened with a store key. A new store without a store key is created only if
/// `plaintext` allows it.
pub(crate) fn instance_key(
    db: &dyn Meta,
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
        return as_key(&db.get_or_insert(INSTANCE_KEY, &fresh)?);
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
pub(crate) fn write_instance_key(
    db: &dyn Meta,
    key: Option<&StoreKey>,
    instance: &[u8; 32],
) -> Result<(), StoreError> {
    match key {
        Some(key) => db.apply(
            &[
                (
                    INSTANCE_KEY_SEALED,
                    &key.seal(INSTANCE_KEY_CONTEXT, instance),
                ),
                (STORE_KEY_CHECK, &key.check_value()[..]),
            ],
            &[INSTANCE_KEY],
        ),
        None => db.apply(
            &[(INSTANCE_KEY, &instance[..])],
            &[INSTANCE_KEY_SEALED, STORE_KEY_CHECK],
        ),
    }
}

/// The instance key as the store holds it, for an export: sealed (with the key's check value) or clear.
pub(crate) fn stored_instance_key(db: &dyn Meta) -> Result<StoredInstanceKey, StoreError> {
    Ok(match db.get(INSTANCE_KEY_SEALED)? {
        Some(sealed) => StoredInstanceKey::Sealed {
            sealed,
            check: db.get(STORE_KEY_CHECK)?.unwrap_or_default(),
        },
        None => StoredInstanceKey::Clear(db.get(INSTANCE_KEY)?.unwrap_or_default()),
    })
}

/// The instance key in the form the store keeps it.
pub(crate) enum StoredInstanceKey {
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
pub(crate) fn open_from_export(key: &StoreKey, sealed: &[u8]) -> Option<[u8; 32]> {
    key.open(INSTANCE_KEY_CONTEXT, sealed)?.try_into().ok()
}

/// Keep an exported sealed instance key as it was exported (so a re-export is byte for byte the same),
/// beside the check value of `key`, which the import checked opens it.
pub(crate) fn adopt_sealed_instance_key(
    db: &dyn Meta,
    key: &StoreKey,
    sealed: &[u8],
) -> Result<(), StoreError> {
    db.apply(
        &[
            (INSTANCE_KEY_SEALED, sealed),
            (STORE_KEY_CHECK, &key.check_value()[..]),
        ],
        &[INSTANCE_KEY],
    )
}
