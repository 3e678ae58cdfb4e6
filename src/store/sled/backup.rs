//! Export and import: every registration as JSON lines, for backups and for moving a store.
//!
//! The first line names the format and carries the instance key (sealed under the store key when there is
//! one, so the file alone reveals no more than the database would). Each further line is one registration:
//! its node, domain and app for people and `jq`, and the stored record itself (base64) as the authority, so
//! an export round-trips byte for byte and sealed tokens stay sealed. An import goes into an empty store
//! only, checks every line before it writes any, and keeps the instance key, so device hashes and derived
//! secrets stay valid.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::record::Codec;
use super::{keys, open_db, SledStore};
use crate::store::{BackupError, StoreError, StoreOptions};

/// The export format's version.
const FORMAT: u32 = 1;
/// Registrations written per sled batch on import.
const IMPORT_BATCH: usize = 10_000;

impl From<sled::Error> for BackupError {
    fn from(e: sled::Error) -> Self {
        BackupError::Store(e.into())
    }
}

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

impl SledStore {
    /// Write every registration to `out` as JSON lines; returns how many.
    pub(super) fn write_export(&self, out: &mut dyn Write) -> Result<usize, BackupError> {
        let open = self.database()?;
        let header = match keys::stored_instance_key(&open.db)? {
            keys::StoredInstanceKey::Sealed { sealed, check } => Header {
                knock_export: FORMAT,
                instance_key: None,
                instance_key_sealed: Some(STANDARD.encode(sealed)),
                store_key_check: Some(hex::encode(check)),
            },
            keys::StoredInstanceKey::Clear(clear) => Header {
                knock_export: FORMAT,
                instance_key: Some(hex::encode(clear)),
                instance_key_sealed: None,
                store_key_check: None,
            },
        };
        write_json(out, &header)?;
        let mut count = 0;
        for item in open.registrations.iter() {
            let (node, record) = item.map_err(StoreError::from)?;
            let codec = &self.shared.codec;
            let registration = codec.decode(&node, &record)?;
            // A record the index rebuild has not rewritten yet (a store just given its key, or one from an
            // older knock) is exported as the rebuild would write it: sealed, if the store has a key.
            let record = if codec.is_current(&record) {
                record.to_vec()
            } else {
                codec.encode(&registration)?
            };
            write_json(
                out,
                &Line {
                    node: registration.node,
                    domain: registration.domain,
                    app: registration.app,
                    record: STANDARD.encode(&record),
                },
            )?;
            count += 1;
        }
        out.flush()?;
        Ok(count)
    }

    /// Import an export file into the empty store `options` describe; returns how many registrations it
    /// holds after. The file is read twice: every line is checked before anything is written.
    pub fn import(options: &StoreOptions, file: &Path) -> Result<usize, BackupError> {
        let codec = Codec::new(options.key.clone());
        let existed = options.path.exists();
        let db = open_db(&options.path)?;
        if codec.key().is_none() && !options.plaintext_tokens && keys::is_new(&db)? {
            // Refused before anything was stored: leave no empty database behind either.
            drop(db);
            if !existed {
                let _ = std::fs::remove_dir_all(&options.path);
            }
            return Err(StoreError::KeyNeeded.into());
        }
        let registrations = db.open_tree("registrations")?;
        let devices = db.open_tree("devices")?;
        let owners = db.open_tree("owners")?;
        if !registrations.is_empty() {
            return Err(BackupError::NotEmpty(registrations.len()));
        }
        // 1. Check everything.
        let instance = read(file, &codec, |_, _| Ok(()))?;
        // 2. Write the instance key (a sealed one as it was exported), then the records, then make it all
        //    durable.
        match (&instance, codec.key()) {
            (ExportedKey::Sealed(sealed), Some(key)) => {
                keys::adopt_sealed_instance_key(&db, key, sealed)?;
            }
            (ExportedKey::Clear(clear), key) => keys::write_instance_key(&db, key, clear)?,
            (ExportedKey::Sealed(_), None) => return Err(StoreError::KeyRequired.into()),
        }
        let (mut regs, mut devs, mut pending) = (sled::Batch::default(), sled::Batch::default(), 0);
        read(file, &codec, |node, (record, device)| {
            regs.insert(node.as_bytes(), record);
            devs.insert(&device[..], node.as_bytes());
            pending += 1;
            if pending == IMPORT_BATCH {
                registrations.apply_batch(std::mem::take(&mut regs))?;
                devices.apply_batch(std::mem::take(&mut devs))?;
                pending = 0;
            }
            Ok(())
        })?;
        registrations.apply_batch(regs)?;
        devices.apply_batch(devs)?;
        super::owners::build(&registrations, &owners, &codec)?;
        db.flush().map_err(StoreError::from)?;
        Ok(registrations.len())
    }
}

fn write_json(out: &mut dyn Write, value: &impl Serialize) -> Result<(), BackupError> {
    serde_json::to_writer(&mut *out, value).map_err(std::io::Error::from)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// The instance key an export carries, checked.
enum ExportedKey {
    /// In the clear.
    Clear([u8; 32]),
    /// Sealed under the importing store's key (checked to open).
    Sealed(Vec<u8>),
}

/// A checked record: its bytes and the device hash its index entry needs.
type Checked = (Vec<u8>, [u8; 32]);

/// Read an export file, check every line against `codec`, hand each registration to `each`; returns the
/// instance key.
fn read(
    file: &Path,
    codec: &Codec,
    mut each: impl FnMut(&str, Checked) -> Result<(), StoreError>,
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
    if header.knock_export != FORMAT {
        return Err(bad(
            0,
            &format!("export format {} is not {FORMAT}", header.knock_export),
        ));
    }
    let instance = instance_key(&header, codec).map_err(|e| match e {
        Ok(store) => BackupError::Store(store),
        Err(why) => bad(0, &why),
    })?;
    let mut seen = HashSet::new();
    for (i, text) in lines {
        let text = text?;
        if text.trim().is_empty() {
            continue;
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
