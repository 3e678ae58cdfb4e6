//! Knock tokens (issue 21): what the store keeps of a per-contact token, and its record, shared by every
//! engine.
//!
//! A knock token is 32 random bytes handed to its owner once; the store keeps only its keyed hash (the
//! caller's [`Digest`], the table's key) and never who holds it. The record carries the token's opaque id,
//! the registration it wakes, its owner's hash (for listing and revoking), expiry, rate and use count.
//!
//! The record is small and binary, versioned by its first byte. The use count sits at a fixed offset in
//! the clear, so counting a use rewrites eight bytes without opening anything sealed. With a store key the
//! node is sealed like a device token, bound to the token's hash, so a copy of a sled store does not tell
//! which of an owner's devices a token wakes (the owner's hash stays in the clear: listing needs it).
//! PostgreSQL keeps the node in a column of its own as well, a foreign key that takes a registration's
//! tokens along whichever instance removes it; there the node is in the clear anyway.

use crate::store::seal::StoreKey;
use crate::store::{Digest, StoreError};

/// The record format's version, its first byte.
const FORMAT_1: u8 = 1;
/// Flag: the node is sealed under the store key.
const FLAG_SEALED: u8 = 1;
/// Flag: a grace period follows the rate.
const FLAG_GRACE: u8 = 2;
/// Where the use count is: after the version and flag bytes.
pub(crate) const USES_AT: usize = 2;
/// Fixed part of a record: version, flags, uses, id, owner, expiry, rate, node length.
const FIXED: usize = 2 + 8 + 8 + 32 + 8 + 4 + 2;

/// One knock token, as the store keeps it (the token itself is never kept: only its keyed hash, the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnockToken {
    /// An opaque id per token, carried in the pushes it causes so the app can tell which contact knocked
    /// (neither the token nor a JID ever travels to the push service).
    pub id: [u8; 8],
    /// The registration (pubsub node) a knock wakes. The token goes when the registration does.
    pub node: String,
    /// The owner's keyed hash: the owner lists and revokes their tokens by it.
    pub owner: Digest,
    /// When the token stops working (seconds since the Unix epoch).
    pub expires: u64,
    /// How many knocks an hour the token is allowed.
    pub per_hour: u32,
    /// Set on the old token when it is rotated: it keeps working until then (seconds since the epoch).
    pub grace_until: Option<u64>,
    /// How many knocks were accepted: the only counter kept (no times, no knockers).
    pub uses: u64,
}

impl KnockToken {
    /// The token's id as the protocol writes it, in commands and in pushes: 16 lowercase hex digits.
    pub fn id_text(&self) -> String {
        hex::encode(self.id)
    }

    /// The id a command names, if it is 16 hex digits.
    pub fn parse_id(text: &str) -> Option<[u8; 8]> {
        let mut id = [0u8; 8];
        hex::decode_to_slice(text, &mut id).ok().map(|()| id)
    }
}

/// What a sealed node is bound to: the token's hash, so a sealed node cannot be moved to another token.
fn context(hash: &Digest) -> Vec<u8> {
    [&b"knock knock-token node v1\0"[..], hash].concat()
}

/// Encode `token`, stored under `hash`, sealing its node when there is a store key.
///
/// Fails only for a node over 64 KiB, which no handler lets through.
pub(crate) fn encode(
    key: Option<&StoreKey>,
    hash: &Digest,
    token: &KnockToken,
) -> Result<Vec<u8>, StoreError> {
    let node = match key {
        Some(key) => key.seal(&context(hash), token.node.as_bytes()),
        None => token.node.as_bytes().to_vec(),
    };
    let node_len = u16::try_from(node.len())
        .map_err(|_| StoreError::Invalid("a knock token's node is over 64 KiB".into()))?;
    let mut flags = 0;
    if key.is_some() {
        flags |= FLAG_SEALED;
    }
    if token.grace_until.is_some() {
        flags |= FLAG_GRACE;
    }
    let mut out = Vec::with_capacity(FIXED + 8 + node.len());
    out.push(FORMAT_1);
    out.push(flags);
    out.extend_from_slice(&token.uses.to_be_bytes());
    out.extend_from_slice(&token.id);
    out.extend_from_slice(&token.owner);
    out.extend_from_slice(&token.expires.to_be_bytes());
    out.extend_from_slice(&token.per_hour.to_be_bytes());
    if let Some(grace) = token.grace_until {
        out.extend_from_slice(&grace.to_be_bytes());
    }
    out.extend_from_slice(&node_len.to_be_bytes());
    out.extend_from_slice(&node);
    Ok(out)
}

/// Decode the record stored under `hash`.
pub(crate) fn decode(
    key: Option<&StoreKey>,
    hash: &Digest,
    bytes: &[u8],
) -> Result<KnockToken, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("knock token: {why}"));
    let mut rest = bytes;
    let mut take = |n: usize| -> Result<&[u8], StoreError> {
        if rest.len() < n {
            return Err(corrupt("record too short"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let head = take(2)?;
    if head[0] != FORMAT_1 {
        return Err(corrupt("unknown record format"));
    }
    let flags = head[1];
    let u64_of = |b: &[u8]| {
        <[u8; 8]>::try_from(b)
            .map(u64::from_be_bytes)
            .map_err(|_| corrupt("bad number"))
    };
    let uses = u64_of(take(8)?)?;
    let id = <[u8; 8]>::try_from(take(8)?).map_err(|_| corrupt("bad id"))?;
    let owner = Digest::try_from(take(32)?).map_err(|_| corrupt("bad owner"))?;
    let expires = u64_of(take(8)?)?;
    let per_hour = <[u8; 4]>::try_from(take(4)?)
        .map(u32::from_be_bytes)
        .map_err(|_| corrupt("bad rate"))?;
    let grace_until = if flags & FLAG_GRACE != 0 {
        Some(u64_of(take(8)?)?)
    } else {
        None
    };
    let node_len = <[u8; 2]>::try_from(take(2)?)
        .map(u16::from_be_bytes)
        .map_err(|_| corrupt("bad node length"))?;
    let node = take(usize::from(node_len))?;
    if !rest.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    let node = if flags & FLAG_SEALED != 0 {
        let key = key.ok_or(StoreError::KeyRequired)?;
        key.open(&context(hash), node)
            .ok_or_else(|| corrupt("the node does not open under the store key"))?
    } else {
        node.to_vec()
    };
    let node = String::from_utf8(node).map_err(|_| corrupt("node is not UTF-8"))?;
    Ok(KnockToken {
        id,
        node,
        owner,
        expires,
        per_hour,
        grace_until,
        uses,
    })
}

/// What putting a knock token for a node nobody holds answers.
pub(crate) fn unregistered() -> StoreError {
    StoreError::Invalid("a knock token's node must be registered".into())
}

/// Count one more use in a record, in place, without opening its sealed node.
pub(crate) fn count_use(record: &mut [u8]) -> Result<(), StoreError> {
    let corrupt = || StoreError::Corrupt("knock token: record too short".into());
    let field = record.get_mut(USES_AT..USES_AT + 8).ok_or_else(corrupt)?;
    let uses = <[u8; 8]>::try_from(&*field).map_err(|_| corrupt())?;
    let uses = u64::from_be_bytes(uses).saturating_add(1);
    field.copy_from_slice(&uses.to_be_bytes());
    Ok(())
}

/// The owner stored in a record, read without opening the node.
pub(crate) fn owner_of(record: &[u8]) -> Result<Digest, StoreError> {
    record
        .get(18..50)
        .and_then(|o| Digest::try_from(o).ok())
        .ok_or_else(|| StoreError::Corrupt("knock token: record too short".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> KnockToken {
        KnockToken {
            id: [1, 2, 3, 4, 5, 6, 7, 8],
            node: "node-a".into(),
            owner: [9; 32],
            expires: 1_900_000_000,
            per_hour: 12,
            grace_until: Some(1_800_000_000),
            uses: 3,
        }
    }

    #[test]
    fn records_round_trip_clear_and_sealed() {
        let hash = [7; 32];
        let key = StoreKey::generate();
        for key in [None, Some(&key)] {
            for grace in [None, Some(5)] {
                let t = KnockToken {
                    grace_until: grace,
                    ..token()
                };
                let record = encode(key, &hash, &t).unwrap();
                assert_eq!(decode(key, &hash, &record).unwrap(), t);
                assert_eq!(owner_of(&record).unwrap(), t.owner);
            }
        }
    }

    #[test]
    fn a_sealed_node_is_hidden_and_bound_to_its_hash() {
        let key = StoreKey::generate();
        let record = encode(Some(&key), &[7; 32], &token()).unwrap();
        assert!(!record.windows(6).any(|w| w == b"node-a"));
        assert!(matches!(
            decode(Some(&key), &[8; 32], &record),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode(None, &[7; 32], &record),
            Err(StoreError::KeyRequired)
        ));
    }

    #[test]
    fn ids_are_written_and_read_as_16_hex_digits() {
        assert_eq!(token().id_text(), "0102030405060708");
        assert_eq!(KnockToken::parse_id("0102030405060708"), Some(token().id));
        assert_eq!(
            KnockToken::parse_id("ABCDEF0102030405").map(|_| ()),
            Some(())
        );
        for bad in ["", "0102", "01020304050607089", "zz02030405060708"] {
            assert_eq!(KnockToken::parse_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn counting_a_use_touches_only_the_count() {
        let key = StoreKey::generate();
        let mut record = encode(Some(&key), &[7; 32], &token()).unwrap();
        count_use(&mut record).unwrap();
        let t = decode(Some(&key), &[7; 32], &record).unwrap();
        assert_eq!(t.uses, 4);
        assert_eq!(t.node, "node-a");
        assert!(count_use(&mut [1, 0, 0]).is_err());
        assert!(decode(None, &[7; 32], &record[..20]).is_err());
    }
}
