//! Export and import of a sled store, in the format of [`crate::store::backup`].

use std::io::Write;
use std::path::Path;

use super::{open_db, SledStore};
use crate::store::backup::{adopt_key, read, write_header, write_knock_line, write_line};
use crate::store::keys;
use crate::store::record::Codec;
use crate::store::{BackupError, StoreError, StoreOptions};

/// Registrations written per sled batch on import.
const IMPORT_BATCH: usize = 10_000;

impl From<sled::Error> for BackupError {
    fn from(e: sled::Error) -> Self {
        BackupError::Store(e.into())
    }
}

impl SledStore {
    /// Write every registration to `out` as JSON lines; returns how many.
    pub(super) fn write_export(&self, out: &mut dyn Write) -> Result<usize, BackupError> {
        let open = self.database()?;
        write_header(out, &open.db)?;
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
            write_line(out, registration, &record)?;
            count += 1;
        }
        for item in open.knock_tokens.iter() {
            let (hash, record) = item.map_err(StoreError::from)?;
            let hash = crate::store::Digest::try_from(&*hash)
                .map_err(|_| StoreError::Corrupt("a knock token's hash is not 32 bytes".into()))?;
            write_knock_line(out, &hash, &record)?;
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
        let instance = read(file, &codec, |_, _| Ok(()), |_| Ok(()))?;
        // 2. Write the instance key (a sealed one as it was exported), then the records, then make it all
        //    durable.
        adopt_key(&db, &codec, &instance)?;
        let (mut regs, mut devs, mut pending) = (sled::Batch::default(), sled::Batch::default(), 0);
        let (mut knocks, mut knock_owners) = (sled::Batch::default(), sled::Batch::default());
        read(
            file,
            &codec,
            |node, (record, device)| {
                regs.insert(node.as_bytes(), record);
                devs.insert(&device[..], node.as_bytes());
                pending += 1;
                if pending == IMPORT_BATCH {
                    registrations.apply_batch(std::mem::take(&mut regs))?;
                    devices.apply_batch(std::mem::take(&mut devs))?;
                    pending = 0;
                }
                Ok(())
            },
            // Few per owner, so kept for one batch at the end.
            |knock| {
                knocks.insert(&knock.hash[..], knock.record);
                knock_owners.insert(super::owners::key(&knock.owner, &knock.hash), &[]);
                Ok(())
            },
        )?;
        registrations.apply_batch(regs)?;
        devices.apply_batch(devs)?;
        db.open_tree("knock_tokens")?.apply_batch(knocks)?;
        db.open_tree("knock_owners")?.apply_batch(knock_owners)?;
        super::owners::build(&registrations, &owners, &codec)?;
        db.flush().map_err(StoreError::from)?;
        Ok(registrations.len())
    }
}
