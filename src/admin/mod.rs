//! The admin commands that work on a stopped knock's store: `keygen`, `stats`, `export`, `import`,
//! `delete`. Each opens the store as `knock run` would (with its store key), so a running knock holding
//! the store makes them fail with [`StoreError::InUse`] rather than race it.
//!
//! What they print names no token, secret or JID: counts, app names and domains only, and the export file,
//! whose tokens stay sealed when the store has a key.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::app::{App, SetupError};
use crate::config::Config;
use crate::store::{BackupError, KeyFileError, StoreError, StoreKey};

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    /// The store could not be opened (in use, wrong key, I/O).
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Export or import failed.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The key file could not be written.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
    /// `delete` named a node the store does not hold.
    #[error("no registration has node {0:?}")]
    NoSuchNode(String),
}

/// `knock keygen --out FILE`: write a new store key, readable by its owner only; never overwrites.
pub fn keygen(out: &Path, say: &mut dyn Write) -> Result<(), MaintenanceError> {
    StoreKey::generate().write_new(out)?;
    writeln!(
        say,
        "wrote a new store key to {}\nset  [store] key_file = \"{}\"  in knock.toml; keep the file out of the store's backups",
        out.display(),
        out.display()
    )?;
    Ok(())
}

/// `knock stats`: how many registrations, by app and by domain, and whether tokens are sealed.
pub fn stats(config: &Config, say: &mut dyn Write) -> Result<(), MaintenanceError> {
    let store = App::open_store(config)?;
    let mut by_app: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_domain: BTreeMap<String, usize> = BTreeMap::new();
    let total = store.scan(&mut |r| {
        *by_app.entry(r.app).or_default() += 1;
        *by_domain.entry(r.domain).or_default() += 1;
    })?;
    writeln!(
        say,
        "store {}: {total} registrations, tokens {}",
        config.store.describe(),
        if store.is_sealed() {
            "sealed under store.key_file"
        } else {
            "in the clear (no store.key_file)"
        }
    )?;
    for (app, n) in &by_app {
        let configured = config.apps.iter().any(|a| a.name() == app);
        let note = if configured {
            ""
        } else {
            "  (not configured: these get no pushes)"
        };
        writeln!(say, "  app {app}: {n}{note}")?;
    }
    writeln!(say, "  domains: {}", by_domain.len())?;
    for (domain, n) in by_domain.iter().rev().take(20) {
        writeln!(say, "    {domain}: {n}")?;
    }
    Ok(())
}

/// `knock export`: every registration as JSON lines to `out`; returns how many.
pub fn export(config: &Config, out: &mut dyn Write) -> Result<usize, MaintenanceError> {
    let store = App::open_store(config)?;
    Ok(store.export(out)?)
}

/// `knock import FILE`: an export into the configured store, which must be empty; returns how many.
pub fn import(config: &Config, file: &Path) -> Result<usize, MaintenanceError> {
    Ok(crate::store::import(&App::store_options(config)?, file)?)
}

/// `knock delete --node NODE`: remove one registration durably. The user's server learns at its next
/// publish (`item-not-found`).
pub async fn delete(config: &Config, node: &str) -> Result<(), MaintenanceError> {
    let store = App::open_store(config)?;
    if store.remove(node)?.is_none() {
        return Err(MaintenanceError::NoSuchNode(node.to_string()));
    }
    store.flush().await?;
    Ok(())
}
