//! Registrations written straight into a knock store, as many as a benchmark needs, with secrets the
//! generator can publish with. The records are knock's own (same keyed hashes, same derived secrets);
//! only the XMPP round trip of registering is skipped, since that is measured separately.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use knock::push::{ProviderKind, Token};
use knock::store::secrets::{random_id, secret_hash, Keyring};
use knock::store::{Registration, SledStore, Store};
use rand::RngCore as _;

use crate::stanzas::{Publishes, APP, SERVER_DOMAIN};

/// A seeded store.
pub struct Seeded {
    /// (node, secret) of up to the requested sample of the registrations, spread evenly over them.
    pub sample: Vec<(String, String)>,
    /// How long writing and flushing took.
    pub took: Duration,
}

impl Seeded {
    /// Prosody's publish to each sampled registration.
    pub fn publishes(&self) -> Arc<Publishes> {
        Arc::new(Publishes::new(
            self.sample.iter().map(|(n, s)| (n.as_str(), s.as_str())),
        ))
    }
}

/// Write `count` registrations into the store at `path` and keep about `sample` of them to publish to.
pub async fn seed(path: &Path, count: usize, sample: usize) -> anyhow::Result<Seeded> {
    let started = Instant::now();
    let store = SledStore::open(path).context("opening the store to seed")?;
    let keyring = Keyring::new(store.instance_key()?);
    let every = (count / sample.max(1)).max(1);
    // Two writers: sled takes concurrent inserts, and a million of them is otherwise minutes.
    let writers: Vec<_> = (0..2)
        .map(|writer| {
            let (store, keyring) = (store.clone(), keyring.clone());
            tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, String)>> {
                let mut kept = Vec::new();
                let mut token = [0u8; 32];
                for i in (writer..count).step_by(2) {
                    let jid = format!("user{i}@{SERVER_DOMAIN}");
                    let node = random_id();
                    let secret = keyring.node_secret(&node);
                    rand::thread_rng().fill_bytes(&mut token);
                    store.put(&Registration {
                        device: keyring.device(&jid, "phone", APP),
                        owner: keyring.owner(&jid),
                        domain: SERVER_DOMAIN.into(),
                        app: APP.into(),
                        provider: ProviderKind::Apns,
                        token: Token::from_bytes(token),
                        secret_hash: Some(secret_hash(&secret)),
                        call_token: None,
                        account: None,
                        node: node.clone(),
                    })?;
                    if i % every == 0 {
                        kept.push((node, secret));
                    }
                }
                Ok(kept)
            })
        })
        .collect();
    let mut sample_kept = Vec::new();
    for writer in writers {
        sample_kept.extend(writer.await??);
    }
    sample_kept.truncate(sample);
    let sample = sample_kept;
    store.flush().await?;
    Ok(Seeded {
        sample,
        took: started.elapsed(),
    })
}
