//! A small APNs provider client: HTTP/2 over TLS to `/3/device/<token>`, token (ES256 JWT) or certificate auth.
//!
//! One client per configured app. hyper's pooled HTTP/2 client multiplexes every request on one connection
//! and reconnects after GOAWAY or errors. Retries (429, 5xx, network) back off inside a deadline, so a publish
//! is always answered in time. knock has its own client because a2 cannot be pointed at a test endpoint.

use std::io::BufReader;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use serde::Serialize;

use super::http::{
    error_chain, http2_client, invalid, load_certs, lower_hex, node_digest, read, tls_builder,
    ClientSetupError, HttpClient,
};
use super::{Provider, ProviderKind, PushOutcome, Token, TokenError, WakeKind, Wakeup};
use crate::config::{ApnsAuth, ApnsConfig};
use crate::stats::Stats;

/// Shortest and longest APNs device token, in hex digits. Apple's are 32 bytes today and documented as
/// variable length, so knock accepts up to 100 bytes.
const TOKEN_HEX_LEN: std::ops::RangeInclusive<usize> = 32..=200;

/// Check an APNs device token (hex, any case) and keep the bytes it spells: half the size of the text,
/// and one spelling per token.
pub fn parse_token(text: &str) -> Result<Token, TokenError> {
    let refused = TokenError("token must be the APNs device token in hex (32 to 200 hex digits)");
    if !TOKEN_HEX_LEN.contains(&text.len()) {
        return Err(refused);
    }
    hex::decode(text)
        .map(Token::from_bytes)
        .map_err(|_| refused)
}

/// Sign a fresh provider token this often; Apple rejects tokens older than an hour.
const JWT_REFRESH: Duration = Duration::from_secs(50 * 60);
/// Apple answers `TooManyProviderTokenUpdates` to more frequent refreshes.
const JWT_MIN_REFRESH: Duration = Duration::from_secs(20 * 60);
/// Attempts per push, including the first.
const ATTEMPTS: u32 = 3;
/// First retry delay; doubled each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Error bodies are a short JSON object; never read more than this.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// Signs and caches the provider JWT for token auth.
struct JwtSigner {
    /// The `.p8` key.
    key: jsonwebtoken::EncodingKey,
    /// JWT header `kid`.
    key_id: String,
    /// JWT claim `iss`.
    team_id: String,
    /// The token in use and when it was signed (wall clock, like the `iat` Apple checks); shared by all
    /// concurrent pushes.
    current: Mutex<Option<(Jwt, SystemTime)>>,
}

/// A signed provider token, and the `authorization` header that carries it, built once per token rather
/// than once per push.
#[derive(Debug, Clone, PartialEq)]
struct Jwt {
    token: Arc<str>,
    header: HeaderValue,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

impl JwtSigner {
    fn load(path: &Path, key_id: &str, team_id: &str) -> Result<JwtSigner, ClientSetupError> {
        let pem = read(path)?;
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).map_err(|e| {
            ClientSetupError::Invalid {
                path: path.display().to_string(),
                reason: format!("not an ES256 .p8 key: {e}"),
            }
        })?;
        let signer = JwtSigner {
            key,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            current: Mutex::new(None),
        };
        // Sign once now so a bad key fails `knock check`, not the first push.
        signer.sign().map_err(|reason| ClientSetupError::Invalid {
            path: path.display().to_string(),
            reason,
        })?;
        Ok(signer)
    }

    fn sign(&self) -> Result<Jwt, String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            iss: &self.team_id,
            iat,
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| e.to_string())?;
        let header = HeaderValue::try_from(format!("bearer {token}")).map_err(|e| e.to_string())?;
        let jwt = Jwt {
            token: token.into(),
            header,
        };
        *self.lock() = Some((jwt.clone(), SystemTime::now()));
        Ok(jwt)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Jwt, SystemTime)>> {
        // A poisoned lock only means a panic elsewhere mid-assignment of a complete value; the value is usable.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token to send now, signing a new one when the current is near Apple's one-hour limit.
    fn token(&self) -> Result<Jwt, String> {
        if let Some((token, signed)) = self.lock().as_ref() {
            if age(*signed) < JWT_REFRESH {
                return Ok(token.clone());
            }
        }
        self.sign()
    }

    /// Apple said `ExpiredProviderToken` for `rejected`: sign a new one if that is allowed, else `None`.
    fn refresh_after_expiry(&self, rejected: &Jwt) -> Option<Jwt> {
        if let Some((token, signed)) = self.lock().as_ref() {
            if token.token != rejected.token {
                return Some(token.clone());
            }
            if age(*signed) < JWT_MIN_REFRESH {
                return None;
            }
        }
        self.sign().ok()
    }
}

/// How long ago `then` was; zero if the clock went backwards.
fn age(then: SystemTime) -> Duration {
    then.elapsed().unwrap_or(Duration::ZERO)
}

/// An APNs client for one app.
pub struct ApnsClient {
    /// hyper's pooled client: one multiplexed HTTP/2 connection, re-established on demand.
    http: HttpClient,
    /// `https://host[:port]`, no trailing slash.
    base: String,
    /// The app's name, for logs.
    app: String,
    /// `apns-topic`.
    topic: HeaderValue,
    /// `apns-topic` of call pushes: the app's PushKit (VoIP) topic.
    voip_topic: HeaderValue,
    /// Whether the payload carries the node.
    include_node: bool,
    /// The payload of a background push without the node, serialised once.
    background: Bytes,
    /// The payload of an alert push without the node, serialised once.
    alert: Bytes,
    /// The payload of a call push without the node, serialised once.
    call: Bytes,
    /// Seconds Apple may store an undelivered push.
    expiration: u64,
    /// Token auth signer, or `None` for certificate auth.
    jwt: Option<JwtSigner>,
    /// Every push resolves within this, retries included.
    deadline: Duration,
    /// Where every HTTP exchange's status, reason and latency are counted.
    stats: Arc<Stats>,
    /// Whether a push to the app's topic, and to its VoIP topic, has been accepted since this client was
    /// built: until then, `DeviceTokenNotForTopic` more likely means a wrong `topic` (or `voip_topic`) than
    /// a token of another app, and no registration may go for it (see [`classify_for`]).
    proven: [AtomicBool; 2],
}

impl ApnsClient {
    /// Build the client for one app: read keys and CA files, set up TLS. Does not connect yet.
    pub fn new(
        app: &ApnsConfig,
        deadline: Duration,
        stats: Arc<Stats>,
    ) -> Result<ApnsClient, ClientSetupError> {
        let base = app.endpoint_url().map_err(ClientSetupError::Setup)?;
        let auth = match &app.auth {
            Some(auth) => Some(
                auth.kind("apns.auth")
                    .map_err(|e| ClientSetupError::Setup(e.to_string()))?,
            ),
            None => None,
        };

        let builder = tls_builder(app.ca_file.as_deref())?;

        let (tls, jwt) = match auth {
            Some(ApnsAuth::Certificate {
                cert_file,
                key_file,
            }) => {
                let certs = load_certs(&cert_file)?;
                let pem = read(&key_file)?;
                let key = rustls_pemfile::private_key(&mut BufReader::new(pem.as_slice()))
                    .map_err(|e| invalid(&key_file, format!("bad PEM: {e}")))?
                    .ok_or_else(|| invalid(&key_file, "no private key in the file"))?;
                let tls = builder.with_client_auth_cert(certs, key).map_err(|e| {
                    invalid(&cert_file, format!("certificate and key do not fit: {e}"))
                })?;
                (tls, None)
            }
            Some(ApnsAuth::Token {
                key_file,
                key_id,
                team_id,
            }) => (
                builder.with_no_client_auth(),
                Some(JwtSigner::load(&key_file, &key_id, &team_id)?),
            ),
            None => (builder.with_no_client_auth(), None),
        };

        let http = http2_client(tls, deadline);
        let header = |topic: &str| {
            HeaderValue::from_str(topic).map_err(|_| {
                ClientSetupError::Setup(format!("topic {topic:?} is not a valid header value"))
            })
        };
        let topic = header(&app.topic)?;
        let voip_topic = header(&app.voip_topic())?;
        Ok(ApnsClient {
            http,
            base,
            app: app.name.clone(),
            topic,
            voip_topic,
            include_node: app.include_node,
            background: fixed_payload(WakeKind::Background, &app.alert_title),
            alert: fixed_payload(WakeKind::Alert, &app.alert_title),
            call: fixed_payload(WakeKind::Call, &app.alert_title),
            expiration: app.expiration_secs,
            jwt,
            deadline,
            stats,
            proven: Default::default(),
        })
    }

    /// Which of [`ApnsClient::proven`] a kind of push tells about: its topic's.
    fn topic_index(kind: WakeKind) -> usize {
        usize::from(kind == WakeKind::Call)
    }

    /// The JSON payload: a bare wake-up, never any message content; the node, the account, the client's
    /// encrypted payload and a knock's token id as top-level keys when the wake-up has them.
    fn payload(&self, wakeup: &Wakeup<'_>) -> Bytes {
        let fixed = match wakeup.kind {
            WakeKind::Background => &self.background,
            WakeKind::Alert => &self.alert,
            WakeKind::Call => &self.call,
        };
        let node = self.include_node.then_some(wakeup.node);
        let encrypted = wakeup.encrypted.as_ref();
        let extra = [
            ("node", node),
            ("account", wakeup.account),
            ("encrypted", encrypted.map(|e| e.data)),
            ("iv", encrypted.map(|e| e.iv)),
            ("knock", wakeup.knock),
        ];
        if extra.iter().all(|(_, value)| value.is_none()) {
            return fixed.clone();
        }
        // `{...,"key":"value"}`: the fixed part with each value spliced in before its closing brace.
        let mut body = Vec::with_capacity(fixed.len() + 64);
        body.extend_from_slice(&fixed[..fixed.len() - 1]);
        for (key, value) in extra {
            let Some(value) = value else { continue };
            if body.len() > 1 {
                body.push(b',');
            }
            body.push(b'"');
            body.extend_from_slice(key.as_bytes());
            body.extend_from_slice(b"\":");
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut body, value);
        }
        body.push(b'}');
        Bytes::from(body)
    }

    fn request(
        &self,
        wakeup: Wakeup<'_>,
        jwt: Option<&Jwt>,
    ) -> Result<Request<Full<Bytes>>, String> {
        // Built in place rather than through `Request::builder`, which moves the whole request once per
        // header; constant values are static, the token's header is the signer's.
        let (push_type, priority, topic) = match wakeup.kind {
            WakeKind::Background => ("background", "5", &self.topic),
            WakeKind::Alert => ("alert", "10", &self.topic),
            WakeKind::Call => ("voip", "10", &self.voip_topic),
        };
        // A call is answered now or never: Apple must not deliver it late.
        let expiration = if self.expiration == 0 || wakeup.kind == WakeKind::Call {
            HeaderValue::from_static("0")
        } else {
            let at = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
                + self.expiration;
            HeaderValue::from(at)
        };
        let mut request = Request::new(Full::new(self.payload(&wakeup)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = format!("{}/3/device/{}", self.base, lower_hex(wakeup.token))
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| e.to_string())?;
        let headers = request.headers_mut();
        headers.insert("apns-topic", topic.clone());
        headers.insert("apns-push-type", HeaderValue::from_static(push_type));
        if wakeup.kind == WakeKind::Background && wakeup.knock.is_none() {
            // Apple keeps only the newest of a device's undelivered pushes with one collapse id: a device
            // off for a while gets one wake-up for its node, not a queue of them. Not a knock: it names
            // who knocked, which a later wake-up must not replace.
            headers.insert("apns-collapse-id", collapse_id(wakeup.node));
        }
        headers.insert("apns-priority", HeaderValue::from_static(priority));
        headers.insert("apns-expiration", expiration);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(jwt) = jwt {
            headers.insert(AUTHORIZATION, jwt.header.clone());
        }
        Ok(request)
    }

    /// One HTTP exchange: the status and Apple's `reason`, if any.
    async fn send_once(
        &self,
        wakeup: Wakeup<'_>,
        jwt: Option<&Jwt>,
    ) -> Result<(StatusCode, String), String> {
        let request = self.request(wakeup, jwt)?;
        let started = Instant::now();
        let response = self.http.request(request).await.map_err(|e| {
            self.stats.apns.transport_error(started.elapsed());
            // hyper's error chain says *why* (connect refused, TLS, GOAWAY); the top level rarely does.
            error_chain(&e)
        })?;
        let status = response.status();
        if status.is_success() {
            self.stats
                .apns
                .response(status.as_u16(), "", started.elapsed());
            return Ok((status, String::new()));
        }
        let body = Limited::new(response.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let reason = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_owned))
            .unwrap_or_default();
        self.stats
            .apns
            .response(status.as_u16(), &reason, started.elapsed());
        Ok((status, reason))
    }

    async fn push(&self, wakeup: Wakeup<'_>) -> PushOutcome {
        let mut jwt = match self.jwt.as_ref().map(JwtSigner::token).transpose() {
            Ok(jwt) => jwt,
            Err(reason) => return PushOutcome::Misconfigured { reason },
        };
        let mut refreshed = false;
        let mut backoff = FIRST_BACKOFF;
        let mut last = PushOutcome::Unavailable {
            reason: "no attempt made".into(),
        };
        for attempt in 1..=ATTEMPTS {
            let retry = match self.send_once(wakeup, jwt.as_ref()).await {
                Ok((status, reason)) => {
                    let proven = &self.proven[Self::topic_index(wakeup.kind)];
                    match classify_for(wakeup.kind, proven.load(Ordering::Relaxed), status, &reason)
                    {
                        Verdict::Final(outcome) => {
                            if outcome == PushOutcome::Delivered {
                                proven.store(true, Ordering::Relaxed);
                            }
                            return outcome;
                        }
                        Verdict::ExpiredJwt => {
                            let fresh = match (&self.jwt, &jwt) {
                                (Some(signer), Some(old)) if !refreshed => {
                                    signer.refresh_after_expiry(old)
                                }
                                _ => None,
                            };
                            match fresh {
                                Some(fresh) => {
                                    refreshed = true;
                                    jwt = Some(fresh);
                                    last = PushOutcome::Misconfigured { reason };
                                    continue;
                                }
                                None => return PushOutcome::Misconfigured { reason },
                            }
                        }
                        Verdict::Retry(outcome) => outcome,
                    }
                }
                Err(reason) => PushOutcome::Unavailable { reason },
            };
            tracing::debug!(app = %self.app, attempt, outcome = ?retry, "APNs attempt failed");
            last = retry;
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        last
    }
}

/// The payload every push of an app shares: a bare wake-up, never any message content.
fn fixed_payload(kind: WakeKind, alert_title: &str) -> Bytes {
    let body = match kind {
        WakeKind::Background => serde_json::json!({ "aps": { "content-available": 1 } }),
        WakeKind::Alert => serde_json::json!({
            "aps": { "alert": { "title": alert_title }, "mutable-content": 1 }
        }),
        // PushKit hands the whole payload to the app, which must report a call at once: nothing to show.
        WakeKind::Call => serde_json::json!({}),
    };
    Bytes::from(body.to_string())
}

/// The `apns-collapse-id` of a node's background pushes: 32 hex digits of its SHA-256, so any node, however
/// long, fits Apple's 64 bytes, and the node itself is not repeated in a header.
fn collapse_id(node: &str) -> HeaderValue {
    // Hex digits are always a valid header value.
    HeaderValue::from_str(&node_digest(node)).expect("hex is a valid header value")
}

/// What one APNs answer means for the push.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Settled: delivered, dead, or a problem retrying cannot fix.
    Final(PushOutcome),
    /// Worth another attempt; this is the outcome if none is left.
    Retry(PushOutcome),
    /// The provider token expired: sign a new one and retry once.
    ExpiredJwt,
}

/// [`classify`], for a push of `kind` to a topic that has (`proven`) or has not yet had a push accepted.
/// "The device token does not match the topic" is a token of another app only once the topic is known to
/// be right; before that it is as likely a wrong `topic` or `voip_topic`, which would answer it for every
/// device: a configuration error for the admin, and no registration goes for it.
fn classify_for(kind: WakeKind, proven: bool, status: StatusCode, reason: &str) -> Verdict {
    match classify(status, reason) {
        Verdict::Final(PushOutcome::DeadToken { reason })
            if !proven && reason == "DeviceTokenNotForTopic" =>
        {
            let key = if kind == WakeKind::Call {
                "voip_topic"
            } else {
                "topic"
            };
            Verdict::Final(PushOutcome::Misconfigured {
                reason: format!(
                    "{reason}, and no push to this topic has been accepted yet: is {key} right?"
                ),
            })
        }
        verdict => verdict,
    }
}

/// Apple's status codes and reasons, mapped to what knock does.
fn classify(status: StatusCode, reason: &str) -> Verdict {
    let reason = reason.to_owned();
    match status.as_u16() {
        200..=299 => Verdict::Final(PushOutcome::Delivered),
        410 => Verdict::Final(PushOutcome::DeadToken { reason }),
        400 if reason == "BadDeviceToken" || reason == "DeviceTokenNotForTopic" => {
            Verdict::Final(PushOutcome::DeadToken { reason })
        }
        403 if reason == "ExpiredProviderToken" => Verdict::ExpiredJwt,
        429 => Verdict::Retry(PushOutcome::Throttled),
        500..=599 => Verdict::Retry(PushOutcome::Unavailable {
            reason: format!("{} {reason}", status.as_u16()),
        }),
        _ => Verdict::Final(PushOutcome::Misconfigured {
            reason: format!("{} {reason}", status.as_u16()),
        }),
    }
}

impl Provider for ApnsClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Apns
    }

    fn wake<'a>(&'a self, wakeup: Wakeup<'a>) -> BoxFuture<'a, PushOutcome> {
        Box::pin(async move {
            match tokio::time::timeout(self.deadline, self.push(wakeup)).await {
                Ok(outcome) => outcome,
                Err(_) => PushOutcome::Unavailable {
                    reason: format!("no answer from APNs within {:?}", self.deadline),
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::Encrypted;

    /// A P-256 key in PKCS#8 PEM, as Apple's .p8 files are (generated for these tests only).
    fn signer() -> JwtSigner {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("AuthKey.p8");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        std::fs::write(&path, key.serialize_pem()).expect("write key");
        JwtSigner::load(&path, "KEYID12345", "TEAM123456").expect("load key")
    }

    fn age(signer: &JwtSigner, by: Duration) {
        let mut current = signer.lock();
        if let Some((_, signed)) = current.as_mut() {
            *signed -= by;
        }
    }

    #[test]
    fn device_tokens_must_be_hex_of_sane_length() {
        let good = "AB".repeat(32);
        assert_eq!(
            parse_token(&good).map(|t| lower_hex(t.as_bytes())),
            Ok("ab".repeat(32))
        );
        assert!(parse_token("abc").is_err());
        assert!(parse_token(&"zz".repeat(32)).is_err());
        assert!(parse_token(&"a".repeat(65)).is_err());
        assert!(parse_token(&"ab".repeat(101)).is_err());
    }

    /// A client for `org.example.chat` with no auth (nothing is sent: only requests are built).
    fn client(include_node: bool) -> ApnsClient {
        let config = ApnsConfig {
            name: "chat".into(),
            topic: "org.example.chat".into(),
            voip_topic: None,
            endpoint: "https://apns.test".into(),
            ca_file: None,
            push_type: crate::config::PushType::Auto,
            alert_title: "New message".into(),
            include_node,
            expiration_secs: 3600,
            dry_run: false,
            auth: None,
            sandbox_endpoint: None,
            background_per_hour: 3,
            push_modules: Vec::new(),
            tigase_providers: Vec::new(),
            max_payload_size: 3072,
        };
        ApnsClient::new(&config, Duration::from_secs(5), Arc::default()).expect("client")
    }

    fn sent(
        client: &ApnsClient,
        wakeup: Wakeup<'_>,
    ) -> (hyper::HeaderMap, serde_json::Value, String) {
        let request = client.request(wakeup, None).expect("request");
        let uri = request.uri().to_string();
        let headers = request.headers().clone();
        let body = futures::executor::block_on(request.into_body().collect())
            .expect("body")
            .to_bytes();
        (headers, serde_json::from_slice(&body).expect("JSON"), uri)
    }

    #[test]
    fn each_kind_of_wake_up_is_the_push_apple_expects() {
        let client = client(true);
        let token = [0xab; 32];
        let header = |h: &hyper::HeaderMap, name: &str| {
            h.get(name).map(|v| v.to_str().expect("ascii").to_owned())
        };

        let (h, body, uri) = sent(&client, Wakeup::new(&token, "node1", WakeKind::Background));
        assert_eq!(
            uri,
            format!("https://apns.test/3/device/{}", "ab".repeat(32))
        );
        assert_eq!(header(&h, "apns-push-type").as_deref(), Some("background"));
        assert_eq!(header(&h, "apns-priority").as_deref(), Some("5"));
        assert_eq!(
            header(&h, "apns-topic").as_deref(),
            Some("org.example.chat")
        );
        let collapse = header(&h, "apns-collapse-id").expect("collapse id");
        assert_eq!(
            collapse.len(),
            32,
            "within Apple's 64 bytes, and not the node"
        );
        assert_ne!(collapse, "node1");
        let (again, _, _) = sent(&client, Wakeup::new(&token, "node1", WakeKind::Background));
        assert_eq!(
            header(&again, "apns-collapse-id"),
            Some(collapse),
            "one per node"
        );
        assert!(
            header(&h, "apns-expiration")
                .expect("expiration")
                .parse::<u64>()
                .expect("a time")
                > 0
        );
        assert_eq!(
            body,
            serde_json::json!({ "aps": { "content-available": 1 }, "node": "node1" })
        );

        let (h, body, _) = sent(&client, Wakeup::new(&token, "node1", WakeKind::Alert));
        assert_eq!(header(&h, "apns-push-type").as_deref(), Some("alert"));
        assert_eq!(header(&h, "apns-priority").as_deref(), Some("10"));
        assert_eq!(header(&h, "apns-collapse-id"), None, "every message shows");
        assert_eq!(
            body,
            serde_json::json!({ "aps": { "alert": { "title": "New message" }, "mutable-content": 1 }, "node": "node1" })
        );

        // A knock: its token's id beside aps, and never collapsed, even silent, so no later wake-up
        // replaces who knocked.
        let knocked = Wakeup {
            knock: Some("0011223344556677"),
            ..Wakeup::new(&token, "node1", WakeKind::Background)
        };
        let (h, body, _) = sent(&client, knocked);
        assert_eq!(header(&h, "apns-collapse-id"), None);
        assert_eq!(body["knock"], "0011223344556677");
        assert_eq!(body["node"], "node1");

        // A Tigase-dialect message: the account and the client's payload, untouched, beside aps.
        let encrypted = Encrypted {
            data: "aqJJ+/==",
            iv: "tyNBXvy5//xf9ckN",
        };
        let wakeup = Wakeup {
            account: Some("alice@example.org"),
            encrypted: Some(encrypted),
            ..Wakeup::new(&token, "node1", WakeKind::Alert)
        };
        let (_, body, _) = sent(&client, wakeup);
        assert_eq!(body["account"], "alice@example.org");
        assert_eq!(body["encrypted"], "aqJJ+/==");
        assert_eq!(body["iv"], "tyNBXvy5//xf9ckN");
        assert_eq!(body["aps"]["mutable-content"], 1);

        // A call: PushKit's push type and topic, now or never.
        let call = Wakeup {
            account: Some("alice@example.org"),
            encrypted: Some(encrypted),
            ..Wakeup::new(&token, "node1", WakeKind::Call)
        };
        let (h, body, _) = sent(&client, call);
        assert_eq!(header(&h, "apns-push-type").as_deref(), Some("voip"));
        assert_eq!(
            header(&h, "apns-topic").as_deref(),
            Some("org.example.chat.voip")
        );
        assert_eq!(header(&h, "apns-priority").as_deref(), Some("10"));
        assert_eq!(header(&h, "apns-expiration").as_deref(), Some("0"));
        assert_eq!(
            body,
            serde_json::json!({ "node": "node1", "account": "alice@example.org", "encrypted": "aqJJ+/==", "iv": "tyNBXvy5//xf9ckN" })
        );

        // Without the node, a bare call payload is still an object.
        let (_, body, _) = sent(
            &self::client(false),
            Wakeup::new(&token, "n", WakeKind::Call),
        );
        assert_eq!(body, serde_json::json!({}));
    }

    #[test]
    fn hex_is_lowercase_and_whole() {
        assert_eq!(lower_hex(&[0x00, 0x9f, 0xa0, 0xff]), "009fa0ff");
        assert_eq!(lower_hex(&[]), "");
    }

    #[test]
    fn provider_tokens_are_reused_then_refreshed_near_the_hour() {
        let signer = signer();
        let first = signer.token().expect("token");
        assert_eq!(signer.token().expect("token"), first, "reused while fresh");
        let header = jsonwebtoken::decode_header(&first.token).expect("header");
        assert_eq!(
            first.header.to_str().expect("ascii"),
            format!("bearer {}", first.token)
        );
        assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some("KEYID12345"));
        age(&signer, JWT_REFRESH + Duration::from_secs(1));
        assert_ne!(
            signer.token().expect("token"),
            first,
            "re-signed after 50 minutes"
        );
    }

    #[test]
    fn an_expired_token_is_replaced_at_most_once_per_twenty_minutes() {
        let signer = signer();
        let token = signer.token().expect("token");
        assert!(
            signer.refresh_after_expiry(&token).is_none(),
            "too soon to re-sign"
        );
        age(&signer, JWT_MIN_REFRESH + Duration::from_secs(1));
        let fresh = signer.refresh_after_expiry(&token).expect("re-signed");
        assert_ne!(fresh, token);
        // A push that still held the old token just picks up the fresh one.
        assert_eq!(signer.refresh_after_expiry(&token), Some(fresh));
    }

    #[test]
    fn a_token_not_for_the_topic_is_dead_only_once_the_topic_is_proven() {
        let not_for_topic = |kind, proven| {
            classify_for(
                kind,
                proven,
                StatusCode::BAD_REQUEST,
                "DeviceTokenNotForTopic",
            )
        };
        for kind in [WakeKind::Alert, WakeKind::Background, WakeKind::Call] {
            assert!(matches!(
                not_for_topic(kind, false),
                Verdict::Final(PushOutcome::Misconfigured { .. })
            ));
            assert!(matches!(
                not_for_topic(kind, true),
                Verdict::Final(PushOutcome::DeadToken { .. })
            ));
        }
        // Only this reason waits for proof: a 410 is dead whatever.
        assert!(matches!(
            classify_for(WakeKind::Call, false, StatusCode::GONE, "Unregistered"),
            Verdict::Final(PushOutcome::DeadToken { .. })
        ));
    }

    #[test]
    fn apple_answers_map_to_outcomes() {
        let dead = |r: &str| Verdict::Final(PushOutcome::DeadToken { reason: r.into() });
        assert_eq!(
            classify(StatusCode::OK, ""),
            Verdict::Final(PushOutcome::Delivered)
        );
        assert_eq!(
            classify(StatusCode::GONE, "Unregistered"),
            dead("Unregistered")
        );
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, "BadDeviceToken"),
            dead("BadDeviceToken")
        );
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, "DeviceTokenNotForTopic"),
            dead("DeviceTokenNotForTopic")
        );
        assert_eq!(
            classify(StatusCode::FORBIDDEN, "ExpiredProviderToken"),
            Verdict::ExpiredJwt
        );
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests"),
            Verdict::Retry(PushOutcome::Throttled)
        );
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            Verdict::Retry(PushOutcome::Unavailable { .. })
        ));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, "InvalidProviderToken"),
            Verdict::Final(PushOutcome::Misconfigured { .. })
        ));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, "TopicDisallowed"),
            Verdict::Final(PushOutcome::Misconfigured { .. })
        ));
    }
}
