//! The export format every engine writes and reads: every registration as JSON lines, for backups and for
//! moving a store (also from one engine to another).
//!
//! The first line names the format and carries the instance key (sealed under the store key when there is
//! one, so the file alone reveals no more than the database would). Each further line is one registration:
//! its node, domain and app for people and `jq`, and the stored record itself (base64, [`super::record`]) as
//! the authority, so an export round-trips byte for byte and sealed tokens stay sealed. An import goes into
//! an empty store only, checks every line before it writes any, and keeps the instance key, so device hashes
//! and derived secrets stay valid.
//!
//! Format 2 adds knock tokens (issue 21): after the registrations, one `{"knock_token": {...}}` line each,
//! with the token's hash and owner in hex and its record (node sealed as stored) in base64. Format 1 files,
//! which have none, are still read.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::keys::{self, Meta, StoredInstanceKey};
use super::record::Codec;
use super::{BackupError, Digest, Registration, StoreError};

/// The export format's version: what is written.
const FORMAT: u32 = 2;
/// The oldest format still read (no knock tokens).
const FORMAT_1: u32 = 1;

/// The first line of an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    /// Always [`FORMAT`].
    knock_export: u32,
    /// The instance key, hex, when the store has no store key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    instance_key: Option<String>,
    /// The instance key sealed under the store key, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    instance_key_sealed: Option<String>,
    /// Which store key sealed it, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store_key_check: Option<String>,
}

/// One registration.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    node: String,
    domain: String,
    app: String,
    /// The stored record, base64.
    record: String,
}

/// One knock token: the line's only key is `knock_token`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KnockLine {
    knock_token: KnockFields,
}

/// A knock token's fields in an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KnockFields {
    /// The token's keyed hash, hex.
    hash: String,
    /// The owner's keyed hash, hex (also in the record; here for people and `jq`).
    owner: String,
    /// The stored record, base64.
    record: String,
}

/// A knock token as read from an export: its hash, owner and stored record, checked.
pub(crate) struct CheckedKnock {
    /// The token's keyed hash.
    pub hash: Digest,
    /// The owner's keyed hash.
    pub owner: Digest,
    /// The record, as stored.
    pub record: Vec<u8>,
}

/// Write one knock token's line, `record` being its stored record.
pub(crate) fn write_knock_line(
    out: &mut dyn Write,
    hash: &Digest,
    record: &[u8],
) -> Result<(), BackupError> {
    let owner = super::knock::owner_of(record)?;
    write_json(
        out,
        &KnockLine {
            knock_token: KnockFields {
                hash: hex::encode(hash),
                owner: hex::encode(owner),
                record: STANDARD.encode(record),
            },
        },
    )
}

/// Write the header line: the format and the store's instance key as the store keeps it.
pub(crate) fn write_header(out: &mut dyn Write, meta: &dyn Meta) -> Result<(), BackupError> {
    let header = match keys::stored_instance_key(meta)? {
        StoredInstanceKey::Sealed { sealed, check } => Header {
            knock_export: FORMAT,
            instance_key: None,
            instance_key_sealed: Some(STANDARD.encode(sealed)),
            store_key_check: Some(hex::encode(check)),
        },
        StoredInstanceKey::Clear(clear) => Header {
            knock_export: FORMAT,
            instance_key: Some(hex::encode(clear)),
            instance_key_sealed: None,
            store_key_check: None,
        },
    };
    write_json(out, &header)
}

/// Write one registration's line, `record` being its stored record in the current format.
pub(crate) fn write_line(
    out: &mut dyn Write,
    registration: Registration,
    record: &[u8],
) -> Result<(), BackupError> {
    write_json(
        out,
        &Line {
            node: registration.node,
            domain: registration.domain,
            app: registration.app,
            record: STANDARD.encode(record),
        },
    )
}

/// Make the export's instance key the store's (a sealed one as it was exported, so a re-export is the
/// same byte for byte).
pub(crate) fn adopt_key(
    meta: &dyn Meta,
    codec: &Codec,
    exported: &ExportedKey,
) -> Result<(), BackupError> {
    match (exported, codec.key()) {
        (ExportedKey::Sealed(sealed), Some(key)) => {
            keys::adopt_sealed_instance_key(meta, key, sealed)?
        }
        (ExportedKey::Clear(clear), key) => keys::write_instance_key(meta, key, clear)?,
        (ExportedKey::Sealed(_), None) => return Err(StoreError::KeyRequired.into()),
    }
    Ok(())
}

fn write_json(out: &mut dyn Write, value: &impl Serialize) -> Result<(), BackupError> {
    serde_json::to_writer(&mut *out, value).map_err(std::io::Error::from)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// The instance key an export carries, checked.
pub(crate) enum ExportedKey {
    /// In the clear.
    Clear([u8; 32]),
    /// Sealed under the importing store's key (checked to open).
    Sealed(Vec<u8>),
}

/// A checked record: its bytes and the device hash its index entry needs.
pub(crate) type Checked = (Vec<u8>, [u8; 32]);

/// Read an export file, check every line against `codec`, hand each registration to `each` and each knock
/// token to `each_knock`; returns the instance key.
pub(crate) fn read(
    file: &Path,
    codec: &Codec,
    mut each: impl FnMut(&str, Checked) -> Result<(), StoreError>,
    mut each_knock: impl FnMut(CheckedKnock) -> Result<(), StoreError>,
) -> Result<ExportedKey, BackupError> {
    let reader = std::io::BufReader::new(std::fs::File::open(file)?);
    let mut lines = reader.lines().enumerate();
    let bad = |line: usize, why: &str| BackupError::Format {
        line: line + 1,
        why: why.to_string(),
    };
    let (_, first) = lines.next().ok_or_else(|| bad(0, "the file is empty"))?;
    let header: Header = serde_json::from_str(&first?)
        .map_err(|e| bad(0, &format!("not a knock export header: {e}")))?;
    if header.knock_export != FORMAT && header.knock_export != FORMAT_1 {
        return Err(bad(
            0,
            &format!(
                "export format {} is not {FORMAT_1} or {FORMAT}",
                header.knock_export
            ),
        ));
    }
    let instance = instance_key(&header, codec).map_err(|e| match e {
        Ok(store) => BackupError::Store(store),
        Err(why) => bad(0, &why),
    })?;
    let mut seen = HashSet::new();
    let mut knocks = HashSet::new();
    for (i, text) in lines {
        let text = text?;
        if text.trim().is_empty() {
            continue;
        }
        if text.trim_start().starts_with("{\"knock_token\"") {
            if header.knock_export == FORMAT_1 {
                return Err(bad(i, "a knock token in a format 1 export"));
            }
            let knock = knock_line(&text, codec, &seen).map_err(|why| bad(i, &why))?;
            if !knocks.insert(knock.hash) {
                return Err(bad(i, "knock token appears twice"));
            }
            each_knock(knock)?;
            continue;
        }
        if !knocks.is_empty() {
            return Err(bad(i, "a registration after the knock tokens"));
        }
        let line: Line = serde_json::from_str(&text).map_err(|e| bad(i, &e.to_string()))?;
        let record = STANDARD
            .decode(&line.record)
            .map_err(|_| bad(i, "record is not base64"))?;
        let registration = codec
            .decode(line.node.as_bytes(), &record)
            .map_err(|e| bad(i, &e.to_string()))?;
        if registration.domain != line.domain || registration.app != line.app {
            return Err(bad(i, "domain or app differs from the record"));
        }
        if !seen.insert(line.node.clone()) {
            return Err(bad(i, "node appears twice"));
        }
        each(&line.node, (record, registration.device))?;
    }
    Ok(instance)
}

/// A knock token's line, checked: its record opens under `codec`'s key and hash, names the line's owner,
/// and wakes a node registered earlier in the file.
fn knock_line(text: &str, codec: &Codec, nodes: &HashSet<String>) -> Result<CheckedKnock, String> {
    let line: KnockLine = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let fields = line.knock_token;
    let digest = |text: &str, what: &str| {
        let mut d = [0u8; 32];
        hex::decode_to_slice(text, &mut d).map_err(|_| format!("{what} is not 64 hex digits"))?;
        Ok::<_, String>(d)
    };
    let hash = digest(&fields.hash, "hash")?;
    let owner = digest(&fields.owner, "owner")?;
    let record = STANDARD
        .decode(&fields.record)
        .map_err(|_| "record is not base64".to_string())?;
    let token = super::knock::decode(codec.key(), &hash, &record).map_err(|e| e.to_string())?;
    if token.owner != owner {
        return Err("owner differs from the record".into());
    }
    if !nodes.contains(&token.node) {
        return Err("the knock token wakes a node the export does not hold".into());
    }
    Ok(CheckedKnock {
        hash,
        owner,
        record,
    })
}

/// The instance key an export header carries, opened with the codec's key. `Err(Ok(_))` is a key problem,
/// `Err(Err(_))` a malformed header.
fn instance_key(header: &Header, codec: &Codec) -> Result<ExportedKey, Result<StoreError, String>> {
    match (&header.instance_key, &header.instance_key_sealed) {
        (Some(clear), None) => {
            let mut instance = [0u8; 32];
            hex::decode_to_slice(clear, &mut instance)
                .map_err(|_| Err("instance_key is not 64 hex digits".to_string()))?;
            Ok(ExportedKey::Clear(instance))
        }
        (None, Some(sealed)) => {
            let key = codec.key().ok_or(Ok(StoreError::KeyRequired))?;
            if header.store_key_check.as_deref() != Some(hex::encode(key.check_value()).as_str()) {
                return Err(Ok(StoreError::WrongKey));
            }
            let sealed = STANDARD
                .decode(sealed)
                .map_err(|_| Err("instance_key_sealed is not base64".to_string()))?;
            match keys::open_from_export(key, &sealed) {
                Some(_) => Ok(ExportedKey::Sealed(sealed)),
                None => Err(Err("instance_key_sealed does not open".to_string())),
            }
        }
        _ => Err(Err(
            "the header needs exactly one of instance_key and instance_key_sealed".to_string(),
        )),
    }
}
