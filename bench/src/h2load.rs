//! The "mock alone" load: the harness pushes to a provider's mock itself, over one HTTP/2 connection
//! with TLS as knock does, a window of requests in flight, with the requests knock would send (APNs:
//! ES256 provider JWT, `/3/device/<token>`; FCM: an OAuth2 access token from the service account's
//! JWT-bearer grant, `messages:send` with a data-only message). No XMPP and no knock: if knock → mock
//! comes close to this, the mock (and the generator beside it on the same cores) is the ceiling.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::load::{now_ns, Interval, Load, Outcome, DRAIN};
use crate::mocks::{Endpoint, Provider, KEY_ID, PROJECT, TEAM_ID};
use crate::stanzas::TOPIC;

/// Distinct device tokens the load pushes to, at random.
const TOKENS: usize = 1_000;

/// Run `load` against the mock at `endpoint`.
pub async fn run(endpoint: &Endpoint, load: &Load) -> anyhow::Result<Outcome> {
    let mut sender = connect(endpoint).await?;
    let requests = Arc::new(Requests::new(endpoint, &mut sender).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..load.window)
        .map(|i| {
            let (sender, requests, stop) = (sender.clone(), requests.clone(), stop.clone());
            tokio::spawn(worker(sender, requests, stop, i as u64))
        })
        .collect();
    let interval = Interval::measure(load).await?;
    stop.store(true, Ordering::Relaxed);
    let joined = async {
        let mut all = Vec::new();
        for w in workers {
            all.push(w.await.context("a worker panicked")??);
        }
        anyhow::Ok(all)
    };
    let done = tokio::time::timeout(DRAIN, joined)
        .await
        .with_context(|| {
            format!("requests got no answer within {DRAIN:?} after the load stopped")
        })??;
    let mut replies = Vec::new();
    let (mut errors, mut first_error) = (0, None);
    for w in done {
        replies.extend(w.replies);
        errors += w.errors;
        first_error = first_error.or(w.first_error);
    }
    Ok(interval.outcome(&replies, errors, first_error))
}

/// One TLS connection (ALPN h2, trusting only the mock's CA) and its HTTP/2 client.
async fn connect(endpoint: &Endpoint) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let authority = endpoint
        .url
        .strip_prefix("https://")
        .with_context(|| format!("not an https URL: {}", endpoint.url))?;
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_matches(['[', ']']);
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&endpoint.ca_file)
        .with_context(|| format!("reading {}", endpoint.ca_file.display()))?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    tcp.set_nodelay(true)?;
    let tls = TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from(host.to_owned())?, tcp)
        .await
        .context("TLS handshake with the mock")?;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .context("HTTP/2 handshake with the mock")?;
    tokio::spawn(connection);
    Ok(sender)
}

/// What every request of a load shares.
struct Requests {
    provider: Provider,
    /// The send URL (FCM) or the URL up to the device token (APNs).
    url: String,
    /// `authorization`'s value.
    authorization: String,
    /// The device tokens pushed to.
    tokens: Vec<String>,
}

impl Requests {
    async fn new(
        endpoint: &Endpoint,
        sender: &mut SendRequest<Full<Bytes>>,
    ) -> anyhow::Result<Requests> {
        let key = std::fs::read(&endpoint.key_file)
            .with_context(|| format!("reading {}", endpoint.key_file.display()))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        Ok(match endpoint.provider {
            Provider::Apns => {
                let mut header = Header::new(Algorithm::ES256);
                header.kid = Some(KEY_ID.into());
                let claims = serde_json::json!({ "iss": TEAM_ID, "iat": now });
                let jwt = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_pem(&key)?)?;
                Requests {
                    provider: Provider::Apns,
                    url: format!("{}/3/device/", endpoint.url),
                    authorization: format!("bearer {jwt}"),
                    tokens: (0..TOKENS).map(|i| format!("{i:064x}")).collect(),
                }
            }
            Provider::Fcm => {
                let token = access_token(&key, now, sender).await?;
                Requests {
                    provider: Provider::Fcm,
                    url: format!("{}/v1/projects/{PROJECT}/messages:send", endpoint.url),
                    authorization: format!("Bearer {token}"),
                    tokens: (0..TOKENS).map(fcm_token).collect(),
                }
            }
        })
    }

    /// The push to token `i`: what knock sends for a message (an alert, HIGH on FCM).
    fn request(&self, i: usize) -> anyhow::Result<Request<Full<Bytes>>> {
        let token = &self.tokens[i];
        let builder = Request::post(match self.provider {
            Provider::Apns => format!("{}{token}", self.url),
            Provider::Fcm => self.url.clone(),
        })
        .header("authorization", &self.authorization);
        Ok(match self.provider {
            Provider::Apns => builder
                .header("apns-topic", TOPIC)
                .header("apns-push-type", "alert")
                .header("apns-priority", "10")
                .body(Full::new(Bytes::from_static(
                    br#"{"aps":{"alert":{"title":"New message"},"mutable-content":1}}"#,
                )))?,
            Provider::Fcm => builder
                .header("content-type", "application/json; charset=utf-8")
                .body(Full::new(Bytes::from(format!(
                    r#"{{"message":{{"token":"{token}","data":{{"account":"{i:040x}"}},"android":{{"priority":"HIGH","collapse_key":"{i:016x}","ttl":"2419200s"}}}}}}"#
                ))))?,
        })
    }
}

/// A registration token shaped like FCM's: 22 characters, `:APA91b`, 134 more (all printable ASCII).
pub fn fcm_token(i: usize) -> String {
    let tail = format!("{i:0>134}");
    format!("bench{i:0>17}:APA91b{tail}")
}

/// The service account's JWT-bearer grant (RS256, as Google wants it) at the token endpoint the account
/// file names; returns the access token.
async fn access_token(
    key_file: &[u8],
    now: u64,
    sender: &mut SendRequest<Full<Bytes>>,
) -> anyhow::Result<String> {
    let account: serde_json::Value = serde_json::from_slice(key_file)?;
    let field = |name: &str| {
        account[name]
            .as_str()
            .with_context(|| format!("the service-account file has no {name}"))
    };
    let token_uri = field("token_uri")?;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(field("private_key_id")?.to_owned());
    let claims = serde_json::json!({
        "iss": field("client_email")?,
        "scope": testkit::fcm::FCM_SCOPE,
        "aud": token_uri,
        "iat": now,
        "exp": now + 3600,
    });
    let key = EncodingKey::from_rsa_pem(field("private_key")?.as_bytes())?;
    let assertion = jsonwebtoken::encode(&header, &claims, &key)?;
    let request = Request::post(token_uri)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(
            testkit::fcm::ServiceAccount::token_request_body(&assertion),
        )))?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        bail!(
            "the token endpoint answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let answer: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(answer["access_token"]
        .as_str()
        .context("no access_token in the token endpoint's answer")?
        .to_owned())
}

/// What one worker saw.
struct Seen {
    /// (read at, latency µs) per answer.
    replies: Vec<(u64, u32)>,
    errors: u64,
    first_error: Option<String>,
}

/// Push, wait for the answer, push again, until told to stop.
async fn worker(
    mut sender: SendRequest<Full<Bytes>>,
    requests: Arc<Requests>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> anyhow::Result<Seen> {
    let mut seen = Seen {
        replies: Vec::with_capacity(1 << 14),
        errors: 0,
        first_error: None,
    };
    // xorshift, seeded per worker.
    let mut x = 0x9E37_79B9_7F4A_7C15 ^ (seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let request = requests.request((x % requests.tokens.len() as u64) as usize)?;
        sender
            .ready()
            .await
            .context("the mock closed the connection")?;
        let sent = now_ns();
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        let now = now_ns();
        seen.replies
            .push((now, (now.saturating_sub(sent) / 1000) as u32));
        if status != StatusCode::OK {
            seen.errors += 1;
            seen.first_error.get_or_insert_with(|| {
                format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(400)])
                )
            });
        }
    }
    Ok(seen)
}
