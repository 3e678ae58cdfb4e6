//! Registrations written straight into a knock store, as many as a benchmark needs, with secrets the
//! generator can publish with. The records are knock's own (same keyed hashes, same derived secrets);
//! only the XMPP round trip of registering is skipped, since that is measured separately.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use knock::push::{ProviderKind, Token};
use knock::stanza::frame::Event;
use knock::store::secrets::{random_id, secret_hash, Keyring};
use knock::store::{Registration, SledStore, Store};
use rand::RngCore as _;
use tokio::io::AsyncWriteExt as _;

use crate::h2load::fcm_token;
use crate::server::{empty_result, iq_tag, next, Component};
use crate::stanzas::{fcm_registration, field_value, parse_id, Publishes, APP, SERVER_DOMAIN};

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

/// Registrations in flight at once while registering over XMPP.
const REGISTER_WINDOW: usize = 64;

/// Register `count` Android devices of new users with the knock behind `component`, as Conversations
/// does (`register-push-fcm` with an FCM token and an `android-id`, p2's dialect), a window at a time,
/// and keep every reply's node and secret. This goes through knock's own registration path rather than
/// writing the store, so an FCM registration holds whatever knock keeps for one (the `account` id its
/// pushes carry among it).
pub async fn register_fcm(component: &mut Component, count: usize) -> anyhow::Result<Seeded> {
    let started = Instant::now();
    let mut kept: Vec<Option<(String, String)>> = vec![None; count];
    let mut out = Vec::new();
    for batch in (0..count).collect::<Vec<_>>().chunks(REGISTER_WINDOW) {
        for &i in batch {
            let user = format!("droid{i}");
            let android_id = format!("{:016x}", 0x5eed_0000_0000_0000u64 | i as u64);
            fcm_registration(&user, &android_id, &fcm_token(i)).write(b'f', i as u64, 0, &mut out);
        }
        component.tcp.write_all(&out).await?;
        out.clear();
        let mut waiting = batch.len();
        while waiting > 0 {
            let event = tokio::time::timeout(
                Duration::from_secs(30),
                next(
                    &mut component.tcp,
                    &mut component.buf,
                    &mut component.framer,
                ),
            )
            .await
            .context("knock did not answer a registration within 30 s")??;
            let Event::Stanza(frame) = event else {
                bail!("knock ended its stream while registering");
            };
            let Some(tag) = iq_tag(&frame.bytes) else {
                continue;
            };
            let kind = tag.attr(b"type").unwrap_or_default();
            if matches!(kind, b"get" | b"set") {
                let mut pong = Vec::new();
                empty_result(&tag, &mut pong);
                component.tcp.write_all(&pong).await?;
                continue;
            }
            let text = String::from_utf8_lossy(&frame.bytes);
            let i = tag
                .attr(b"id")
                .and_then(|id| {
                    let dot = id.iter().position(|&b| b == b'.')?;
                    std::str::from_utf8(&id[1..dot]).ok()?.parse::<usize>().ok()
                })
                .filter(|&i| i < count && parse_id(tag.attr(b"id").unwrap_or_default()).is_some())
                .with_context(|| format!("a reply to no registration of ours: {text}"))?;
            if kind != b"result" {
                bail!("register-push-fcm was refused: {text}");
            }
            let (node, secret) = field_value(&text, "node")
                .zip(field_value(&text, "secret"))
                .with_context(|| {
                    format!("register-push-fcm's reply has no node and secret: {text}")
                })?;
            kept[i] = Some((node.to_owned(), secret.to_owned()));
            waiting -= 1;
        }
    }
    let sample = kept
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .context("a registration got no reply")?;
    Ok(Seeded {
        sample,
        took: started.elapsed(),
    })
}
