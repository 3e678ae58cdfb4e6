//! A mock of Apple's APNs provider API, for knock's tests and benchmarks.
//!
//! It speaks what Apple speaks: HTTP/2 only (ALPN `h2`) over TLS with a fresh test CA,
//! `POST /3/device/<token>`, an ES256 provider JWT (`kid`, `iss`, `iat`, signature and age
//! checked) or a TLS client certificate, the `apns-*` request headers, and Apple's status codes
//! and `reason` strings. Per-token [`Behaviour`] lets a test make APNs answer `Unregistered`,
//! throttle, fail for a while or answer slowly, and every request is recorded as a
//! [`ReceivedPush`] so tests can assert what knock sent (and did not send).
//!
//! For benchmarks, [`MockApns::set_recording`]`(false)` stops keeping the request list (which
//! otherwise grows without bound) while [`MockApns::request_counts`] still counts every answer,
//! and verified provider tokens are cached (by exact token string) so the ES256 signature is
//! checked once per token rather than once per request.

use crate::tls::{ca_params, ServerIdentity};
use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::hash::BuildHasher;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, oneshot, watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// Largest payload Apple accepts for every push type but VoIP, in bytes.
pub const MAX_PAYLOAD: usize = 4096;
/// Largest payload Apple accepts for VoIP pushes, in bytes.
pub const MAX_VOIP_PAYLOAD: usize = 5120;
/// A provider token older than this (by its `iat`) is answered `ExpiredProviderToken`.
pub const PROVIDER_TOKEN_MAX_AGE: Duration = Duration::from_secs(3600);
/// An `iat` further than this in the future is answered `InvalidProviderToken`
/// (catches milliseconds sent where seconds are expected).
pub const PROVIDER_TOKEN_MAX_FUTURE: Duration = Duration::from_secs(300);
/// Push types Apple documents for `apns-push-type`.
pub const PUSH_TYPES: &[&str] = &[
    "alert",
    "background",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "location",
    "liveactivity",
    "pushtotalk",
];
/// How many concurrent streams the mock allows on one connection.
const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// The mock stops reading a request body past this many bytes (and answers `PayloadTooLarge`).
const MAX_BODY_READ: usize = 1 << 20;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`MockApns::shutdown`] lets in-flight streams finish before cutting connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Reason recorded for a request whose client reset the stream before the mock answered.
pub const CANCELLED_REASON: &str = "ClientCancelled";
/// How many provider tokens the verification cache holds (Apple wants one token per key
/// reused for 20 to 60 minutes, so a client needs only a few).
const TOKEN_CACHE_CAPACITY: usize = 256;
/// Statuses below this are counted one by one in [`RequestCounts::by_status`].
const STATUS_SLOTS: usize = 600;

/// Behaviour for a device token (default [`Behaviour::Ok`]). It applies only to requests that
/// passed every check (auth, topic, headers, payload): those are answered as Apple would anyway.
#[derive(Clone, Debug, PartialEq)]
pub enum Behaviour {
    /// 200, empty body, header `apns-id`.
    Ok,
    /// 410 `{"reason":"Unregistered","timestamp":<ms since epoch>}`.
    Unregistered,
    /// 400 `{"reason":"BadDeviceToken"}`.
    BadDeviceToken,
    /// 400 `{"reason":"DeviceTokenNotForTopic"}`.
    DeviceTokenNotForTopic,
    /// 429 `{"reason":"TooManyRequests"}`.
    Throttled,
    /// 503 `{"reason":"ServiceUnavailable"}`.
    Unavailable,
    /// 500 `{"reason":"InternalServerError"}`.
    InternalError,
    /// Answer as the inner behaviour, after a delay.
    Delay(Duration, Box<Behaviour>),
    /// The first n requests for the token (counted since this behaviour was set) get the inner
    /// behaviour, later ones are answered Ok.
    FailTimes(u32, Box<Behaviour>),
    /// Any status with any reason, e.g. `Custom(403, "ExpiredProviderToken".into())` or
    /// `Custom(410, "ExpiredToken".into())` (a 410 also carries `timestamp`).
    Custom(u16, String),
}

impl Behaviour {
    /// `Delay(d, Box::new(b))`.
    pub fn delay(d: Duration, b: Behaviour) -> Behaviour {
        Behaviour::Delay(d, Box::new(b))
    }

    /// `FailTimes(n, Box::new(b))`.
    pub fn fail_times(n: u32, b: Behaviour) -> Behaviour {
        Behaviour::FailTimes(n, Box::new(b))
    }

    /// Whether [`Behaviour::resolve`] looks at the per-token request count (only `FailTimes`
    /// does), so the count need be kept only then.
    fn uses_count(&self) -> bool {
        match self {
            Behaviour::FailTimes(..) => true,
            Behaviour::Delay(_, inner) => inner.uses_count(),
            _ => false,
        }
    }

    /// Resolves to the total delay and the answer, given how many requests for this token were
    /// already answered under this behaviour.
    fn resolve(&self, seen: u32) -> (Duration, Answer) {
        match self {
            Behaviour::Ok => (Duration::ZERO, Answer::ok()),
            Behaviour::Unregistered => (Duration::ZERO, Answer::err(410, "Unregistered")),
            Behaviour::BadDeviceToken => (Duration::ZERO, Answer::err(400, "BadDeviceToken")),
            Behaviour::DeviceTokenNotForTopic => {
                (Duration::ZERO, Answer::err(400, "DeviceTokenNotForTopic"))
            }
            Behaviour::Throttled => (Duration::ZERO, Answer::err(429, "TooManyRequests")),
            Behaviour::Unavailable => (Duration::ZERO, Answer::err(503, "ServiceUnavailable")),
            Behaviour::InternalError => (Duration::ZERO, Answer::err(500, "InternalServerError")),
            Behaviour::Custom(status, reason) => (
                Duration::ZERO,
                Answer {
                    status: *status,
                    reason: if *status == 200 {
                        None
                    } else {
                        Some(Cow::Owned(reason.clone()))
                    },
                },
            ),
            Behaviour::Delay(d, inner) => {
                let (more, answer) = inner.resolve(seen);
                (d.saturating_add(more), answer)
            }
            Behaviour::FailTimes(n, inner) => {
                if seen < *n {
                    inner.resolve(seen)
                } else {
                    (Duration::ZERO, Answer::ok())
                }
            }
        }
    }
}

/// Names as accepted by [`Behaviour::from_str`]: `ok`, `unregistered`, `bad-device-token`,
/// `device-token-not-for-topic`, `throttled`, `unavailable`, `internal-error`,
/// `delay:<ms>:<behaviour>`, `fail-times:<n>:<behaviour>`, `custom:<status>:<Reason>`.
impl fmt::Display for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Behaviour::Ok => f.write_str("ok"),
            Behaviour::Unregistered => f.write_str("unregistered"),
            Behaviour::BadDeviceToken => f.write_str("bad-device-token"),
            Behaviour::DeviceTokenNotForTopic => f.write_str("device-token-not-for-topic"),
            Behaviour::Throttled => f.write_str("throttled"),
            Behaviour::Unavailable => f.write_str("unavailable"),
            Behaviour::InternalError => f.write_str("internal-error"),
            Behaviour::Delay(d, inner) => write!(f, "delay:{}:{}", d.as_millis(), inner),
            Behaviour::FailTimes(n, inner) => write!(f, "fail-times:{n}:{inner}"),
            Behaviour::Custom(status, reason) => write!(f, "custom:{status}:{reason}"),
        }
    }
}

/// Parses the names written by [`Behaviour`]'s `Display` (case and `_`/`-` are not significant
/// in the names; the reason of `custom:` is kept as written).
impl FromStr for Behaviour {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (head, rest) = match s.split_once(':') {
            Some((h, r)) => (h, Some(r)),
            None => (s, None),
        };
        let name = head.to_ascii_lowercase().replace('_', "-");
        let split_arg = |rest: Option<&str>| -> Result<(String, String), String> {
            let rest = rest.ok_or_else(|| format!("`{name}` needs arguments"))?;
            let (a, b) = rest
                .split_once(':')
                .ok_or_else(|| format!("`{name}` needs two arguments separated by `:`"))?;
            Ok((a.to_string(), b.to_string()))
        };
        let simple = |b: Behaviour| -> Result<Behaviour, String> {
            match rest {
                None => Ok(b),
                Some(_) => Err(format!("`{name}` takes no argument")),
            }
        };
        match name.as_str() {
            "ok" => simple(Behaviour::Ok),
            "unregistered" => simple(Behaviour::Unregistered),
            "bad-device-token" | "baddevicetoken" => simple(Behaviour::BadDeviceToken),
            "device-token-not-for-topic" | "devicetokennotfortopic" => {
                simple(Behaviour::DeviceTokenNotForTopic)
            }
            "throttled" | "too-many-requests" | "toomanyrequests" => simple(Behaviour::Throttled),
            "unavailable" | "service-unavailable" | "serviceunavailable" => {
                simple(Behaviour::Unavailable)
            }
            "internal-error" | "internal-server-error" | "internalservererror" => {
                simple(Behaviour::InternalError)
            }
            "delay" => {
                let (ms, inner) = split_arg(rest)?;
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| format!("bad delay in milliseconds: {ms:?}"))?;
                Ok(Behaviour::delay(Duration::from_millis(ms), inner.parse()?))
            }
            "fail-times" | "failtimes" => {
                let (n, inner) = split_arg(rest)?;
                let n: u32 = n.parse().map_err(|_| format!("bad count: {n:?}"))?;
                Ok(Behaviour::fail_times(n, inner.parse()?))
            }
            "custom" => {
                let (status, reason) = split_arg(rest)?;
                let status: u16 = status
                    .parse()
                    .ok()
                    .filter(|s| (200..600).contains(s))
                    .ok_or_else(|| format!("bad status: {status:?}"))?;
                Ok(Behaviour::Custom(status, reason))
            }
            _ => Err(format!("unknown behaviour {s:?}")),
        }
    }
}

/// What the mock expects of its clients.
#[derive(Clone, Debug, Default)]
pub struct MockApnsConfig {
    /// Expected JWT `iss` (the Apple developer team id).
    pub team_id: String,
    /// Expected JWT header `kid`.
    pub key_id: String,
    /// ES256 public key (PEM, SPKI `PUBLIC KEY`) that verifies the provider JWT. May be empty
    /// only when `client_ca_pem` is set.
    pub public_key_pem: String,
    /// Allowed `apns-topic` values (bundle ids), compared exactly. An app's PushKit topic for VoIP pushes
    /// (`<bundle id>.voip`) is a topic of its own and must be listed too.
    pub topics: Vec<String>,
    /// If set: every TLS client must present a certificate signed by this CA (certificate
    /// auth), and then no JWT is required. See [`TestClientCa`].
    pub client_ca_pem: Option<String>,
    /// More keys of the same team, as (`kid`, public key PEM), accepted beside `key_id`'s: Apple accepts
    /// every key a team has, which is what lets a provider rotate its key without downtime.
    pub more_keys: Vec<(String, String)>,
    /// DNS names the server certificate carries besides `localhost` and the loopback addresses: the
    /// name other containers reach the mock by (`mock-apns` in a compose stack).
    pub server_names: Vec<String>,
}

impl MockApnsConfig {
    /// Token-auth config.
    pub fn token_auth(
        team_id: impl Into<String>,
        key_id: impl Into<String>,
        public_key_pem: impl Into<String>,
        topics: &[&str],
    ) -> MockApnsConfig {
        MockApnsConfig {
            team_id: team_id.into(),
            key_id: key_id.into(),
            public_key_pem: public_key_pem.into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            client_ca_pem: None,
            more_keys: Vec::new(),
            server_names: Vec::new(),
        }
    }
}

/// One request the mock received, and what it answered.
#[derive(Clone, Debug, Serialize)]
pub struct ReceivedPush {
    /// From the path `/3/device/<token>` (empty when the path had another shape).
    pub token: String,
    /// The request path as sent.
    pub path: String,
    /// The `:authority` the client addressed (`127.0.0.1:PORT`, `localhost:PORT`, ...), so a test can tell
    /// two endpoint URLs served by one mock apart (e.g. a production and a sandbox endpoint).
    pub authority: Option<String>,
    pub method: String,
    /// `apns-topic`.
    pub topic: Option<String>,
    /// `apns-push-type`.
    pub push_type: Option<String>,
    /// `apns-priority`.
    pub priority: Option<String>,
    /// `apns-expiration`.
    pub expiration: Option<String>,
    /// `apns-collapse-id`.
    pub collapse_id: Option<String>,
    /// JWT header `kid`, if a readable JWT was sent.
    pub kid: Option<String>,
    /// All request headers in order, for privacy assertions (values decoded lossily as UTF-8).
    pub headers: Vec<(String, String)>,
    /// Raw body text (lossy UTF-8).
    pub body: String,
    /// Status the mock answered; 0 when the client reset the stream before the answer.
    pub status: u16,
    /// Reason the mock answered, if an error ([`CANCELLED_REASON`] for a reset stream).
    pub reason: Option<String>,
    /// `apns-id` the mock answered with (the request's own if it sent a valid one).
    pub apns_id: String,
    /// Which TLS connection it came on: 1 for the first accepted, and so on.
    pub connection: usize,
}

impl ReceivedPush {
    /// The first value of a request header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }
}

/// The answer decided for a request.
#[derive(Clone, Debug)]
struct Answer {
    status: u16,
    reason: Option<Cow<'static, str>>,
}

impl Answer {
    fn ok() -> Answer {
        Answer {
            status: 200,
            reason: None,
        }
    }

    fn err(status: u16, reason: &'static str) -> Answer {
        Answer {
            status,
            reason: Some(Cow::Borrowed(reason)),
        }
    }
}

/// How many requests the mock answered, counted whether or not they are recorded (see
/// [`MockApns::set_recording`]). The counts only grow: [`MockApns::clear_requests`] leaves them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    /// Every request answered, whatever the status (rejections included, cancelled ones not).
    pub answered: u64,
    /// Requests answered 200.
    pub ok: u64,
    /// Requests whose client reset the stream before the mock answered (recorded with status 0
    /// and [`CANCELLED_REASON`]); not in `answered`.
    pub cancelled: u64,
    /// Answers per status (only statuses that occurred).
    pub by_status: BTreeMap<u16, u64>,
}

/// Lock-free answer counters, bumped on every request.
struct Counters {
    answered: AtomicU64,
    cancelled: AtomicU64,
    /// Indexed by status; statuses past the end are counted only in `answered`.
    by_status: Box<[AtomicU64]>,
}

impl Counters {
    fn new() -> Counters {
        Counters {
            answered: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            by_status: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn answered(&self, status: u16) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.by_status.get(usize::from(status)) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> RequestCounts {
        let by_status: BTreeMap<u16, u64> = self
            .by_status
            .iter()
            .enumerate()
            .filter_map(|(status, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then_some((status as u16, n))
            })
            .collect();
        RequestCounts {
            answered: self.answered.load(Ordering::Relaxed),
            ok: by_status.get(&200).copied().unwrap_or(0),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            by_status,
        }
    }
}

/// What the signature check found for one provider token. Everything here depends only on the
/// token string and the mock's config, so it can be cached; the time checks on `iat` cannot.
#[derive(Clone, Copy)]
struct VerifiedToken {
    /// `Some(iat)` when header, `kid`, signature and `iss` are good, `None` when not.
    iat: Option<i64>,
    /// Whether the token is already in [`ProviderTokens::accepted`].
    counted: bool,
}

#[derive(Default)]
struct ProviderTokens {
    /// Signature check results by exact token string, at most [`TOKEN_CACHE_CAPACITY`].
    verified: HashMap<Box<str>, VerifiedToken>,
    /// Every distinct token accepted so far (for [`MockApns::provider_tokens_seen`]).
    accepted: HashSet<Box<str>>,
}

struct State {
    behaviours: HashMap<String, Behaviour>,
    default_behaviour: Behaviour,
    /// Requests per token answered under the behaviour currently in force for it.
    seen: HashMap<String, u32>,
    requests: Vec<ReceivedPush>,
}

struct Inner {
    config: MockApnsConfig,
    decoding_key: Option<DecodingKey>,
    /// [`MockApnsConfig::more_keys`], parsed.
    more_keys: Vec<(String, DecodingKey)>,
    state: Mutex<State>,
    tokens: Mutex<ProviderTokens>,
    /// Signature checks actually done (cache misses).
    token_verifications: AtomicU64,
    /// Requests whose headers arrived, answered or not yet (see [`MockApns::requests_received`]).
    received: AtomicU64,
    notify: Notify,
    connections: AtomicUsize,
    /// Whether answered requests are kept in `State::requests`.
    recording: AtomicBool,
    counters: Counters,
    events: broadcast::Sender<ReceivedPush>,
    /// Set by the first [`MockApns::subscribe`], so that until then no request pays for
    /// asking the channel whether anyone listens.
    ever_subscribed: AtomicBool,
    goaway: watch::Sender<u64>,
    kill: watch::Sender<u64>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way that matters.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tokens(&self) -> MutexGuard<'_, ProviderTokens> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_subscribers(&self) -> bool {
        self.ever_subscribed.load(Ordering::Relaxed) && self.events.receiver_count() > 0
    }

    /// Whether anything would look at a [`ReceivedPush`] for the next request: if not, the
    /// request is only counted, and none is built.
    fn wants_records(&self) -> bool {
        self.recording.load(Ordering::Relaxed) || self.has_subscribers()
    }

    fn record(&self, push: ReceivedPush) {
        let subscribed = self.has_subscribers();
        if self.recording.load(Ordering::Relaxed) {
            if subscribed {
                self.state().requests.push(push.clone());
                self.notify.notify_waiters();
                let _ = self.events.send(push);
            } else {
                self.state().requests.push(push);
                self.notify.notify_waiters();
            }
        } else if subscribed {
            let _ = self.events.send(push);
        }
    }
}

/// A running mock APNs server. Dropping it stops it abruptly; [`MockApns::shutdown`] stops it
/// gracefully.
pub struct MockApns {
    inner: Arc<Inner>,
    addr: SocketAddr,
    ca_pem: String,
    /// Kept so that [`MockApns::come_back`] serves the same certificate on the same port.
    acceptor: TlsAcceptor,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for MockApns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockApns")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MockApns {
    /// Listens on 127.0.0.1 on a free port with a fresh CA and a server certificate for
    /// `localhost`, `127.0.0.1` and `::1`; HTTP/2 only (ALPN `h2`).
    pub async fn start(config: MockApnsConfig) -> anyhow::Result<MockApns> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
    }

    /// As [`MockApns::start`], on the given address (its IP is added to the certificate).
    pub async fn start_on(addr: SocketAddr, config: MockApnsConfig) -> anyhow::Result<MockApns> {
        let decoding_key = if config.public_key_pem.trim().is_empty() {
            if config.client_ca_pem.is_none() {
                anyhow::bail!(
                    "mock APNs needs public_key_pem, or client_ca_pem for certificate auth"
                );
            }
            None
        } else {
            Some(
                DecodingKey::from_ec_pem(config.public_key_pem.as_bytes())
                    .context("mock APNs: public_key_pem is not an EC public key in PEM")?,
            )
        };

        let more_keys = config
            .more_keys
            .iter()
            .map(|(kid, pem)| {
                DecodingKey::from_ec_pem(pem.as_bytes())
                    .map(|key| (kid.clone(), key))
                    .context("mock APNs: a key of more_keys is not an EC public key in PEM")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;

        let identity = ServerIdentity::generate(
            "knock testkit mock APNs CA",
            addr.ip(),
            &config.server_names,
        )?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("mock APNs: TLS versions")?;
        let builder = match &config.client_ca_pem {
            Some(pem) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    roots
                        .add(cert.context("mock APNs: client_ca_pem")?)
                        .context("mock APNs: client_ca_pem")?;
                }
                anyhow::ensure!(
                    !roots.is_empty(),
                    "mock APNs: client_ca_pem holds no certificate"
                );
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .context("mock APNs: client certificate verifier")?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut tls = builder
            .with_single_cert(identity.chain, identity.key)
            .context("mock APNs: server certificate")?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("mock APNs: bind {addr}"))?;
        let addr = listener.local_addr()?;

        let (events, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            config,
            decoding_key,
            more_keys,
            state: Mutex::new(State {
                behaviours: HashMap::new(),
                default_behaviour: Behaviour::Ok,
                seen: HashMap::new(),
                requests: Vec::new(),
            }),
            tokens: Mutex::new(ProviderTokens::default()),
            token_verifications: AtomicU64::new(0),
            received: AtomicU64::new(0),
            notify: Notify::new(),
            connections: AtomicUsize::new(0),
            recording: AtomicBool::new(true),
            counters: Counters::new(),
            events,
            ever_subscribed: AtomicBool::new(false),
            goaway: watch::channel(0).0,
            kill: watch::channel(0).0,
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(
            listener,
            acceptor.clone(),
            inner.clone(),
            stop_rx,
        ));
        Ok(MockApns {
            inner,
            addr,
            ca_pem: identity.ca_pem,
            acceptor,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// `https://127.0.0.1:PORT` (the base URL: knock appends `/3/device/<token>`).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM of the CA that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes [`MockApns::ca_pem`] to `dir/mock-apns-ca-<port>.pem` and returns that path.
    pub fn write_ca_file(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join(format!("mock-apns-ca-{}.pem", self.addr.port()));
        std::fs::write(&path, &self.ca_pem)?;
        Ok(path)
    }

    /// Sets the behaviour for one token (and restarts its `FailTimes` count).
    pub fn set_behaviour(&self, token: &str, b: Behaviour) {
        let mut st = self.inner.state();
        st.behaviours.insert(token.to_string(), b);
        st.seen.remove(token);
    }

    /// Removes a token's own behaviour, so the default applies to it again.
    pub fn clear_behaviour(&self, token: &str) {
        let mut st = self.inner.state();
        st.behaviours.remove(token);
        st.seen.remove(token);
    }

    /// Sets the behaviour of every token without its own (e.g. an outage), restarting their
    /// `FailTimes` counts.
    pub fn set_default_behaviour(&self, b: Behaviour) {
        let mut st = self.inner.state();
        st.default_behaviour = b;
        let State {
            behaviours, seen, ..
        } = &mut *st;
        seen.retain(|token, _| behaviours.contains_key(token));
    }

    /// Whether answered requests are kept for [`MockApns::requests`] and friends (default on).
    /// Off, the request list stops growing (what is already in it stays) and no
    /// [`ReceivedPush`] is even built unless someone [subscribed](MockApns::subscribe); the
    /// counts ([`MockApns::request_counts`]) go on either way. For benchmarks.
    pub fn set_recording(&self, on: bool) {
        self.inner.recording.store(on, Ordering::Relaxed);
    }

    /// See [`MockApns::set_recording`].
    pub fn is_recording(&self) -> bool {
        self.inner.recording.load(Ordering::Relaxed)
    }

    /// Every request received, in the order they were answered, including rejected ones
    /// (while recording, see [`MockApns::set_recording`]).
    pub fn requests(&self) -> Vec<ReceivedPush> {
        self.inner.state().requests.clone()
    }

    /// How many requests are recorded, i.e. `requests().len()` without copying them.
    pub fn requests_recorded(&self) -> usize {
        self.inner.state().requests.len()
    }

    /// Requests answered so far, whatever the status, recorded or not (cancelled ones, whose
    /// client reset the stream first, are not answered: see [`RequestCounts::cancelled`]).
    pub fn requests_answered(&self) -> u64 {
        self.inner.counters.answered.load(Ordering::Relaxed)
    }

    /// Requests received so far, counted as soon as their headers arrive: with
    /// [`MockApns::requests_answered`] and [`RequestCounts::cancelled`], tells a test how many are
    /// in flight (e.g. under a [`Behaviour::Delay`]) before it breaks a connection.
    pub fn requests_received(&self) -> u64 {
        self.inner.received.load(Ordering::SeqCst)
    }

    /// Requests answered 200 so far, recorded or not.
    pub fn requests_ok(&self) -> u64 {
        self.inner.counters.by_status[200].load(Ordering::Relaxed)
    }

    /// All the answer counts (a snapshot; concurrent requests may land between fields).
    pub fn request_counts(&self) -> RequestCounts {
        self.inner.counters.snapshot()
    }

    /// The requests for one device token.
    pub fn requests_for(&self, token: &str) -> Vec<ReceivedPush> {
        self.inner
            .state()
            .requests
            .iter()
            .filter(|r| r.token == token)
            .cloned()
            .collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.inner.state().requests.clear();
    }

    /// Waits until at least `n` requests were recorded and returns them all, or returns what
    /// there is when `timeout` passes.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<ReceivedPush> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.inner.state();
                if st.requests.len() >= n {
                    return st.requests.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.requests();
            }
        }
    }

    /// A live feed of requests as they are answered (lagging receivers lose the oldest).
    /// Events are sent whether or not requests are recorded.
    pub fn subscribe(&self) -> broadcast::Receiver<ReceivedPush> {
        let rx = self.inner.events.subscribe();
        self.inner.ever_subscribed.store(true, Ordering::Relaxed);
        rx
    }

    /// TLS connections accepted so far (handshake completed).
    pub fn connections_accepted(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// How many distinct provider JWTs were accepted so far (Apple wants a token reused for
    /// 20 to 60 minutes, not minted per request).
    pub fn provider_tokens_seen(&self) -> usize {
        self.inner.tokens().accepted.len()
    }

    /// How many provider JWT signatures were actually checked: tokens are cached by exact
    /// string, so a token reused is checked once (while it stays in the cache), whatever its age.
    pub fn provider_token_verifications(&self) -> u64 {
        self.inner.token_verifications.load(Ordering::Relaxed)
    }

    /// Gracefully shuts down the current HTTP/2 connections (GOAWAY; in-flight streams finish),
    /// and keeps listening for new ones.
    pub fn send_goaway(&self) {
        self.inner.goaway.send_modify(|g| *g += 1);
    }

    /// Drops the current connections at once, without GOAWAY (as a network failure would),
    /// and keeps listening.
    pub fn kill_connections(&self) {
        self.inner.kill.send_modify(|g| *g += 1);
    }

    /// An outage: stops listening and drops every connection at once, so the port refuses
    /// connections (or a test may put another peer on it, see [`crate::silent`]) until
    /// [`MockApns::come_back`]. Behaviours and counters are kept.
    pub async fn go_down(&mut self) {
        self.stop = None;
        if let Some(task) = self.task.take() {
            task.abort();
            // Wait for the abort, so the listener is closed when this returns.
            let _ = task.await;
        }
    }

    /// After [`MockApns::go_down`]: listen on the same port again with the same certificate, so
    /// a client configured for this mock finds it again. Does nothing if it is not down.
    pub async fn come_back(&mut self) -> anyhow::Result<()> {
        if self.task.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("mock APNs: bind {} again", self.addr))?;
        let (stop_tx, stop_rx) = oneshot::channel();
        self.task = Some(tokio::spawn(accept_loop(
            listener,
            self.acceptor.clone(),
            self.inner.clone(),
            stop_rx,
        )));
        self.stop = Some(stop_tx);
        Ok(())
    }

    /// Stops listening, sends GOAWAY on every connection, lets in-flight streams finish for a
    /// moment and then closes what is left.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockApns {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Generates a fresh ES256 (P-256) key pair as Apple hands one out in a `.p8` file:
/// (PKCS#8 `PRIVATE KEY` PEM, SPKI `PUBLIC KEY` PEM).
pub fn generate_apns_key() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .expect("generating a P-256 key pair");
    (key.serialize_pem(), key.public_key_pem())
}

/// Signs a provider JWT as Apple wants it: header `{"alg":"ES256","kid":key_id}`, claims
/// `{"iss":team_id,"iat":iat}` (seconds since the epoch), no `exp`.
pub fn provider_token(
    private_key_pem: &str,
    key_id: &str,
    team_id: &str,
    iat: u64,
) -> anyhow::Result<String> {
    let key = EncodingKey::from_ec_pem(private_key_pem.as_bytes())
        .context("provider_token: not an EC private key in PEM")?;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key_id.to_string());
    let claims = serde_json::json!({ "iss": team_id, "iat": iat });
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A CA for certificate-auth tests: put [`TestClientCa::ca_pem`] in
/// [`MockApnsConfig::client_ca_pem`] and give the client a certificate from
/// [`TestClientCa::issue`].
pub struct TestClientCa {
    ca_pem: String,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestClientCa {
    pub fn new() -> anyhow::Result<TestClientCa> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = ca_params("knock testkit client CA")?.self_signed(&key)?;
        Ok(TestClientCa {
            ca_pem: cert.pem(),
            cert,
            key,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A client certificate for `common_name`: (certificate PEM, PKCS#8 private key PEM).
    pub fn issue(&self, common_name: &str) -> anyhow::Result<(String, String)> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.is_ca = rcgen::IsCa::NoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    inner: Arc<Inner>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    let _ = tcp.set_nodelay(true);
                    conns.spawn(serve_connection(
                        tcp,
                        acceptor.clone(),
                        inner.clone(),
                        inner.goaway.subscribe(),
                        inner.kill.subscribe(),
                    ));
                }
                Err(e) => {
                    tracing::warn!("mock APNs: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    inner.goaway.send_modify(|g| *g += 1);
    let drained = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, drained).await;
    conns.shutdown().await;
}

#[derive(Clone, Copy)]
struct ConnInfo {
    id: usize,
    client_cert: bool,
}

async fn serve_connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    inner: Arc<Inner>,
    mut goaway: watch::Receiver<u64>,
    mut kill: watch::Receiver<u64>,
) {
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!("mock APNs: TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("mock APNs: TLS handshake timed out");
            return;
        }
    };
    let id = inner.connections.fetch_add(1, Ordering::SeqCst) + 1;
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    let info = ConnInfo { id, client_cert };

    let svc_inner = inner.clone();
    let service = hyper::service::service_fn(move |req| handle(svc_inner.clone(), info, req));
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);

    let mut goaway_open = true;
    let mut kill_open = true;
    let mut closing = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!("mock APNs: connection {id} ended: {e}");
                }
                return;
            }
            changed = goaway.changed(), if goaway_open && !closing => {
                if changed.is_err() {
                    goaway_open = false;
                } else {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            changed = kill.changed(), if kill_open => {
                if changed.is_err() {
                    kill_open = false;
                } else {
                    return;
                }
            }
        }
    }
}

/// Counts the request, and records it if a [`ReceivedPush`] was built for it; when dropped
/// unanswered (the client reset the stream mid-delay), as cancelled.
struct PendingRecord<'a> {
    inner: &'a Inner,
    push: Option<ReceivedPush>,
    done: bool,
}

impl PendingRecord<'_> {
    fn finish(mut self, answer: &Answer) {
        self.done = true;
        self.inner.counters.answered(answer.status);
        if let Some(mut push) = self.push.take() {
            push.status = answer.status;
            push.reason = answer.reason.as_deref().map(str::to_string);
            self.inner.record(push);
        }
    }
}

impl Drop for PendingRecord<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.inner
            .counters
            .cancelled
            .fetch_add(1, Ordering::Relaxed);
        if let Some(mut push) = self.push.take() {
            push.status = 0;
            push.reason = Some(CANCELLED_REASON.to_string());
            self.inner.record(push);
        }
    }
}

/// The record of a request, before its answer.
fn received_push(
    parts: &hyper::http::request::Parts,
    body: &[u8],
    token: &str,
    apns_id: &str,
    connection: usize,
) -> ReceivedPush {
    let headers = &parts.headers;
    let kid = headers
        .get("authorization")
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .and_then(|auth| {
            let jwt = bearer_token(&auth)?;
            jsonwebtoken::decode_header(jwt).ok()?.kid
        });
    ReceivedPush {
        token: token.to_string(),
        path: parts.uri.path().to_string(),
        authority: parts.uri.authority().map(|a| a.to_string()),
        method: parts.method.to_string(),
        topic: header_str(headers, "apns-topic"),
        push_type: header_str(headers, "apns-push-type"),
        priority: header_str(headers, "apns-priority"),
        expiration: header_str(headers, "apns-expiration"),
        collapse_id: header_str(headers, "apns-collapse-id"),
        kid,
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(body).into_owned(),
        status: 0,
        reason: None,
        apns_id: apns_id.to_string(),
        connection,
    }
}

async fn handle(
    inner: Arc<Inner>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    inner.received.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let (body, body_too_big) = match Limited::new(body, MAX_BODY_READ).collect().await {
        Ok(collected) => (collected.to_bytes(), false),
        Err(e) => (Bytes::new(), e.downcast_ref::<LengthLimitError>().is_some()),
    };

    let headers = &parts.headers;
    let path = parts.uri.path();
    let token = path.strip_prefix("/3/device/").unwrap_or_default();
    let apns_id = match headers.get("apns-id").and_then(|v| v.to_str().ok()) {
        Some(id) if is_uuid(id) => id.to_string(),
        _ => new_apns_id(),
    };

    // Counted (and recorded, if anything looks at records) when answered or dropped.
    let pending = PendingRecord {
        inner: &inner,
        push: inner
            .wants_records()
            .then(|| received_push(&parts, &body, token, &apns_id, conn.id)),
        done: false,
    };

    let checked = validate(
        &inner,
        conn,
        &parts.method,
        path,
        headers,
        &body,
        body_too_big,
    );
    let answer = match checked {
        Err(answer) => answer,
        Ok(()) => {
            let (delay, answer) = {
                let mut st = inner.state();
                let State {
                    behaviours,
                    default_behaviour,
                    seen,
                    ..
                } = &mut *st;
                let behaviour = behaviours.get(token).unwrap_or(default_behaviour);
                // Only FailTimes looks at the count, and every change of behaviour restarts it,
                // so it is kept only under a behaviour that uses it.
                let count = if behaviour.uses_count() {
                    match seen.get_mut(token) {
                        Some(n) => {
                            let count = *n;
                            *n = n.saturating_add(1);
                            count
                        }
                        None => {
                            seen.insert(token.to_string(), 1);
                            0
                        }
                    }
                } else {
                    0
                };
                behaviour.resolve(count)
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            answer
        }
    };

    let response = build_response(&answer, &apns_id);
    pending.finish(&answer);
    Ok(response)
}

/// Apple's checks, in order. `Err` holds the rejection.
fn validate(
    inner: &Inner,
    conn: ConnInfo,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    body_too_big: bool,
) -> Result<(), Answer> {
    let reject = |status: u16, reason: &'static str| Err(Answer::err(status, reason));

    if method != Method::POST {
        return reject(405, "MethodNotAllowed");
    }
    let token = match path.strip_prefix("/3/device") {
        Some("") | Some("/") => return reject(400, "MissingDeviceToken"),
        Some(rest) => match rest.strip_prefix('/') {
            Some(token) if !token.contains('/') => token,
            _ => return reject(404, "BadPath"),
        },
        None => return reject(404, "BadPath"),
    };

    const SINGLE: &[&str] = &[
        "authorization",
        "apns-id",
        "apns-topic",
        "apns-push-type",
        "apns-priority",
        "apns-expiration",
        "apns-collapse-id",
    ];
    if SINGLE
        .iter()
        .any(|name| headers.get_all(*name).iter().count() > 1)
    {
        return reject(400, "DuplicateHeaders");
    }

    let cert_auth = conn.client_cert && inner.config.client_ca_pem.is_some();
    if !cert_auth {
        let Some(auth) = headers.get("authorization") else {
            return reject(403, "MissingProviderToken");
        };
        let Some(jwt) = auth.to_str().ok().and_then(bearer_token) else {
            return reject(403, "InvalidProviderToken");
        };
        if let Err(reason) = check_provider_token(inner, jwt) {
            return reject(403, reason);
        }
    }

    if let Some(id) = headers.get("apns-id") {
        if !id.to_str().is_ok_and(is_uuid) {
            return reject(400, "BadMessageId");
        }
    }

    let topics = &inner.config.topics;
    let topic = match headers.get("apns-topic") {
        None if cert_auth && topics.len() == 1 => Some(topics[0].as_str()),
        None => return reject(400, "MissingTopic"),
        Some(topic) => match topic
            .to_str()
            .ok()
            .filter(|t| topics.iter().any(|allowed| allowed == t))
        {
            Some(t) => Some(t),
            None => return reject(400, "TopicDisallowed"),
        },
    };

    let hex_ok = token.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex_ok || token.len() % 2 != 0 || !(64..=200).contains(&token.len()) {
        return reject(400, "BadDeviceToken");
    }

    let push_type = match headers.get("apns-push-type") {
        None => None,
        Some(v) => match v.to_str().ok().filter(|t| PUSH_TYPES.contains(t)) {
            Some(t) => Some(t),
            None => return reject(400, "InvalidPushType"),
        },
    };

    // VoIP pushes go to the app's PushKit topic, the bundle id with `.voip` appended, and that topic takes
    // nothing else (Apple: "the apns-topic header field must use your app's bundle ID with .voip appended").
    // Apple documents no reason for either mismatch; these are what providers report getting:
    // `apns-push-type: voip` with the plain bundle id -> DeviceTokenNotForTopic
    // (laravel-notification-channels/apn#88, edamov/pushok#108), and a `.voip` topic with push type alert or
    // background -> InvalidPushType (AndrewBarba/apns2#23, Pr0Ger/PyAPNs2#87). A `.voip` topic without any
    // push type is accepted (Apple once allowed leaving the header out).
    if let Some(topic) = topic {
        let voip_topic = topic.ends_with(".voip");
        match push_type {
            Some("voip") if !voip_topic => return reject(400, "DeviceTokenNotForTopic"),
            Some(t) if voip_topic && t != "voip" => return reject(400, "InvalidPushType"),
            _ => {}
        }
    }

    if let Some(priority) = headers.get("apns-priority") {
        let priority = priority.to_str().unwrap_or("");
        if !matches!(priority, "1" | "5" | "10") {
            return reject(400, "BadPriority");
        }
        if priority == "10" && push_type == Some("background") {
            return reject(400, "BadPriority");
        }
    }

    if let Some(expiration) = headers.get("apns-expiration") {
        let valid = expiration.to_str().is_ok_and(|e| {
            !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) && e.parse::<u64>().is_ok()
        });
        if !valid {
            return reject(400, "BadExpirationDate");
        }
    }

    if let Some(collapse_id) = headers.get("apns-collapse-id") {
        if collapse_id.as_bytes().len() > 64 {
            return reject(400, "BadCollapseId");
        }
    }

    let limit = if push_type == Some("voip") {
        MAX_VOIP_PAYLOAD
    } else {
        MAX_PAYLOAD
    };
    if body_too_big || body.len() > limit {
        return reject(413, "PayloadTooLarge");
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return reject(400, "PayloadEmpty");
    }
    // Apple documents no reason of its own for a payload that is not a JSON dictionary;
    // the mock answers it as an empty one.
    if !matches!(
        serde_json::from_slice::<serde_json::Value>(body),
        Ok(serde_json::Value::Object(_))
    ) {
        return reject(400, "PayloadEmpty");
    }
    Ok(())
}

#[derive(Deserialize)]
struct ProviderClaims {
    iss: Option<String>,
    iat: Option<serde_json::Value>,
}

const INVALID_PROVIDER_TOKEN: &str = "InvalidProviderToken";

/// Checks a provider JWT, and counts it as seen when accepted. The signature check (with the
/// header, `kid` and `iss` checks) is cached by exact token string; the time checks on `iat`
/// are redone on every request.
fn check_provider_token(inner: &Inner, jwt: &str) -> Result<(), &'static str> {
    {
        let mut tokens = inner.tokens();
        let ProviderTokens { verified, accepted } = &mut *tokens;
        if let Some(v) = verified.get_mut(jwt) {
            let result = check_iat(v.iat);
            if result.is_ok() && !v.counted {
                accepted.insert(jwt.into());
                v.counted = true;
            }
            return result;
        }
    }
    // Not cached: check the signature without holding the lock (it is the slow part).
    let iat = verify_provider_token(inner, jwt).ok();
    inner.token_verifications.fetch_add(1, Ordering::Relaxed);
    let result = check_iat(iat);
    let mut tokens = inner.tokens();
    let ProviderTokens { verified, accepted } = &mut *tokens;
    if result.is_ok() {
        accepted.insert(jwt.into());
    }
    if verified.len() >= TOKEN_CACHE_CAPACITY && !verified.contains_key(jwt) {
        // Evict any one entry: a client that cycles through more tokens than this is not
        // reusing them, and just costs a signature check per request as before.
        if let Some(old) = verified.keys().next().cloned() {
            verified.remove(&old);
        }
    }
    verified.insert(
        jwt.into(),
        VerifiedToken {
            iat,
            counted: result.is_ok(),
        },
    );
    result
}

/// The time checks on a verified token's `iat` (`None`: the token failed verification).
fn check_iat(iat: Option<i64>) -> Result<(), &'static str> {
    let iat = iat.ok_or(INVALID_PROVIDER_TOKEN)?;
    let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
    if iat > now.saturating_add(PROVIDER_TOKEN_MAX_FUTURE.as_secs() as i64) {
        return Err(INVALID_PROVIDER_TOKEN);
    }
    if now.saturating_sub(iat) > PROVIDER_TOKEN_MAX_AGE.as_secs() as i64 {
        return Err("ExpiredProviderToken");
    }
    Ok(())
}

/// The checks on a provider JWT that do not depend on the time: header, `kid`, ES256 signature,
/// `iss`, and an `iat` present. Gives the `iat`.
fn verify_provider_token(inner: &Inner, jwt: &str) -> Result<i64, &'static str> {
    const INVALID: &str = INVALID_PROVIDER_TOKEN;
    let header = jsonwebtoken::decode_header(jwt).map_err(|_| INVALID)?;
    if header.alg != Algorithm::ES256 {
        return Err(INVALID);
    }
    let kid = header.kid.as_deref().ok_or(INVALID)?;
    let key = if kid == inner.config.key_id {
        inner.decoding_key.as_ref().ok_or(INVALID)?
    } else {
        inner
            .more_keys
            .iter()
            .find(|(k, _)| k == kid)
            .map(|(_, key)| key)
            .ok_or(INVALID)?
    };
    let mut validation = Validation::new(Algorithm::ES256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let data =
        jsonwebtoken::decode::<ProviderClaims>(jwt, key, &validation).map_err(|_| INVALID)?;
    if data.claims.iss.as_deref() != Some(inner.config.team_id.as_str()) {
        return Err(INVALID);
    }
    data.claims
        .iat
        .as_ref()
        .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
        .ok_or(INVALID)
}

fn build_response(answer: &Answer, apns_id: &str) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut builder = Response::builder().status(status);
    if let Ok(id) = HeaderValue::from_str(apns_id) {
        builder = builder.header("apns-id", id);
    }
    let body = match &answer.reason {
        None => Bytes::new(),
        Some(reason) => {
            builder = builder.header(CONTENT_TYPE, "application/json");
            let json = if answer.status == 410 {
                serde_json::json!({ "reason": reason, "timestamp": unix_millis() })
            } else {
                serde_json::json!({ "reason": reason })
            };
            Bytes::from(json.to_string())
        }
    };
    builder.body(Full::new(body)).unwrap_or_else(|_| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// `bearer <jwt>` (scheme case-insensitive) → the JWT.
fn bearer_token(auth: &str) -> Option<&str> {
    let (scheme, token) = auth.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The canonical 8-4-4-4-12 hex form Apple uses for `apns-id`.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// A random, uppercase, version-4-shaped UUID, as APNs hands out.
fn new_apns_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let hasher = RandomState::new();
    let hi = hasher.hash_one((n, unix_millis(), 1u8));
    let lo = hasher.hash_one((n, 2u8));
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi.to_be_bytes());
    b[8..].copy_from_slice(&lo.to_be_bytes());
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut id = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            id.push('-');
        }
        id.push(char::from(HEX[usize::from(x >> 4)]));
        id.push(char::from(HEX[usize::from(x & 0x0f)]));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::client::conn::http2::SendRequest;
    use rustls::pki_types::PrivateKeyDer;
    use tokio_rustls::TlsConnector;

    const TEAM: &str = "TEAM123456";
    const KID: &str = "KEY1234567";
    const TOPIC: &str = "im.knock.app";
    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    struct Fixture {
        mock: MockApns,
        private_pem: String,
    }

    async fn fixture() -> Fixture {
        let (private_pem, public_pem) = generate_apns_key();
        let mock = MockApns::start(MockApnsConfig::token_auth(TEAM, KID, public_pem, &[TOPIC]))
            .await
            .unwrap();
        Fixture { mock, private_pem }
    }

    impl Fixture {
        fn jwt(&self) -> String {
            provider_token(&self.private_pem, KID, TEAM, unix_now()).unwrap()
        }
    }

    fn client_config(
        ca_pem: &str,
        client_cert: Option<(&str, &str)>,
        alpn: &[&[u8]],
    ) -> rustls::ClientConfig {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert_pem, key_pem)) => {
                let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .map(|c| c.unwrap())
                    .collect();
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// A raw HTTP/2 connection; the handle resolves when the connection ends.
    async fn connect_with(
        mock: &MockApns,
        config: rustls::ClientConfig,
    ) -> (SendRequest<Full<Bytes>>, JoinHandle<()>) {
        let tcp = TcpStream::connect(mock.addr()).await.unwrap();
        // As knock does; else Nagle holds each request's DATA frame for the HEADERS' ACK.
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        (send, driver)
    }

    async fn connect(mock: &MockApns) -> SendRequest<Full<Bytes>> {
        connect_with(mock, client_config(mock.ca_pem(), None, &[b"h2"]))
            .await
            .0
    }

    struct Reply {
        status: u16,
        apns_id: Option<String>,
        content_type: Option<String>,
        body: String,
    }

    impl Reply {
        fn reason(&self) -> Option<String> {
            let v: serde_json::Value = serde_json::from_str(&self.body).ok()?;
            v["reason"].as_str().map(str::to_string)
        }
    }

    fn push_request(
        mock: &MockApns,
        token: &str,
        jwt: Option<&str>,
        extra: &[(&str, &str)],
        body: &str,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method("POST")
            .uri(format!("{}/3/device/{token}", mock.url()));
        if let Some(jwt) = jwt {
            b = b.header("authorization", format!("bearer {jwt}"));
        }
        for (n, v) in extra {
            b = b.header(*n, *v);
        }
        b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
    }

    fn wake_headers() -> Vec<(&'static str, &'static str)> {
        vec![
            ("apns-topic", TOPIC),
            ("apns-push-type", "alert"),
            ("apns-priority", "10"),
            ("apns-expiration", "0"),
        ]
    }

    const BODY: &str = r#"{"aps":{"alert":{"title":"New message"},"mutable-content":1}}"#;

    async fn send(client: &mut SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> Reply {
        client.ready().await.unwrap();
        let resp = client.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let apns_id = header("apns-id");
        let content_type = header("content-type");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            apns_id,
            content_type,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }

    #[tokio::test]
    async fn valid_push_is_accepted_and_recorded() {
        let f = fixture().await;
        let mut c = connect(&f.mock).await;
        let jwt = f.jwt();
        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, Some(&jwt), &wake_headers(), BODY),
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty());
        let id = r.apns_id.unwrap();
        assert!(is_uuid(&id), "{id}");

        let reqs = f.mock.wait_for_requests(1, Duration::from_secs(5)).await;
        assert_eq!(reqs.len(), 1);
        let p = &reqs[0];
        assert_eq!(p.token, TOKEN);
        assert_eq!(p.method, "POST");
        assert_eq!(p.topic.as_deref(), Some(TOPIC));
        assert_eq!(p.push_type.as_deref(), Some("alert"));
        assert_eq!(p.priority.as_deref(), Some("10"));
        assert_eq!(p.expiration.as_deref(), Some("0"));
        assert_eq!(p.kid.as_deref(), Some(KID));
        assert_eq!(p.status, 200);
        assert_eq!(p.reason, None);
        assert_eq!(p.apns_id, id);
        assert_eq!(p.connection, 1);
        assert_eq!(p.body, BODY);
        assert_eq!(p.json().unwrap()["aps"]["mutable-content"], 1);
        assert!(p.header("authorization").unwrap().starts_with("bearer "));
        assert_eq!(f.mock.requests_for(TOKEN).len(), 1);
        assert_eq!(f.mock.provider_tokens_seen(), 1);
    }

    #[tokio::test]
    async fn request_apns_id_is_echoed_and_bad_one_rejected() {
        let f = fixture().await;
        let mut c = connect(&f.mock).await;
        let jwt = f.jwt();
        let id = "123E4567-E89B-12D3-A456-4266554400A0";
        let mut h = wake_headers();
        h.push(("apns-id", id));
        let r = send(&mut c, push_request(&f.mock, TOKEN, Some(&jwt), &h, BODY)).await;
        assert_eq!((r.status, r.apns_id.as_deref()), (200, Some(id)));

        let mut h = wake_headers();
        h.push(("apns-id", "not-a-uuid"));
        let r = send(&mut c, push_request(&f.mock, TOKEN, Some(&jwt), &h, BODY)).await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (400, Some("BadMessageId"))
        );
    }

    #[tokio::test]
    async fn provider_token_checks() {
        let f = fixture().await;
        let mut c = connect(&f.mock).await;
        let h = wake_headers();

        let r = send(&mut c, push_request(&f.mock, TOKEN, None, &h, BODY)).await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (403, Some("MissingProviderToken"))
        );
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert!(r.apns_id.is_some());

        let wrong_kid = provider_token(&f.private_pem, "OTHERKEY00", TEAM, unix_now()).unwrap();
        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, Some(&wrong_kid), &h, BODY),
        )
        .await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (403, Some("InvalidProviderToken"))
        );

        let wrong_team = provider_token(&f.private_pem, KID, "OTHERTEAM0", unix_now()).unwrap();
        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, Some(&wrong_team), &h, BODY),
        )
        .await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (403, Some("InvalidProviderToken"))
        );

        let (other_key, _) = generate_apns_key();
        let wrong_sig = provider_token(&other_key, KID, TEAM, unix_now()).unwrap();
        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, Some(&wrong_sig), &h, BODY),
        )
        .await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (403, Some("InvalidProviderToken"))
        );

        let old = provider_token(&f.private_pem, KID, TEAM, unix_now() - 3700).unwrap();
        let r = send(&mut c, push_request(&f.mock, TOKEN, Some(&old), &h, BODY)).await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (403, Some("ExpiredProviderToken"))
        );

        let millis = provider_token(&f.private_pem, KID, TEAM, unix_millis()).unwrap();
        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, Some(&millis), &h, BODY),
        )
        .await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (403, Some("InvalidProviderToken"))
        );

        let recorded = f.mock.requests();
        assert_eq!(recorded.len(), 6);
        assert_eq!(recorded[1].kid.as_deref(), Some("OTHERKEY00"));
        assert_eq!(recorded[1].status, 403);
        assert_eq!(recorded[1].reason.as_deref(), Some("InvalidProviderToken"));
        assert_eq!(f.mock.provider_tokens_seen(), 0);
    }

    #[tokio::test]
    async fn header_and_path_checks() {
        let f = fixture().await;
        let mut c = connect(&f.mock).await;
        let jwt = f.jwt();
        let jwt = Some(jwt.as_str());

        let without = |name: &str| -> Vec<(&'static str, &'static str)> {
            wake_headers()
                .into_iter()
                .filter(|(n, _)| *n != name)
                .collect()
        };
        let with = |name: &'static str, value: &'static str| {
            let mut h = without(name);
            h.push((name, value));
            h
        };

        let long_collapse_id: &'static str = "x".repeat(65).leak();
        let cases: Vec<(Request<Full<Bytes>>, u16, &str)> = vec![
            (
                push_request(&f.mock, TOKEN, jwt, &without("apns-topic"), BODY),
                400,
                "MissingTopic",
            ),
            (
                push_request(&f.mock, TOKEN, jwt, &with("apns-topic", "com.other"), BODY),
                400,
                "TopicDisallowed",
            ),
            (
                push_request(&f.mock, "abc123", jwt, &wake_headers(), BODY),
                400,
                "BadDeviceToken",
            ),
            (
                push_request(
                    &f.mock,
                    &TOKEN.replace('a', "z"),
                    jwt,
                    &wake_headers(),
                    BODY,
                ),
                400,
                "BadDeviceToken",
            ),
            (
                push_request(&f.mock, "", jwt, &wake_headers(), BODY),
                400,
                "MissingDeviceToken",
            ),
            (
                push_request(&f.mock, TOKEN, jwt, &with("apns-push-type", "silent"), BODY),
                400,
                "InvalidPushType",
            ),
            (
                push_request(&f.mock, TOKEN, jwt, &with("apns-priority", "7"), BODY),
                400,
                "BadPriority",
            ),
            (
                push_request(
                    &f.mock,
                    TOKEN,
                    jwt,
                    &[
                        ("apns-topic", TOPIC),
                        ("apns-push-type", "background"),
                        ("apns-priority", "10"),
                    ],
                    r#"{"aps":{"content-available":1}}"#,
                ),
                400,
                "BadPriority",
            ),
            (
                push_request(
                    &f.mock,
                    TOKEN,
                    jwt,
                    &with("apns-expiration", "tomorrow"),
                    BODY,
                ),
                400,
                "BadExpirationDate",
            ),
            (
                push_request(
                    &f.mock,
                    TOKEN,
                    jwt,
                    &with("apns-collapse-id", long_collapse_id),
                    BODY,
                ),
                400,
                "BadCollapseId",
            ),
            (
                push_request(&f.mock, TOKEN, jwt, &wake_headers(), ""),
                400,
                "PayloadEmpty",
            ),
            (
                push_request(&f.mock, TOKEN, jwt, &wake_headers(), "not json"),
                400,
                "PayloadEmpty",
            ),
            (
                push_request(
                    &f.mock,
                    TOKEN,
                    jwt,
                    &wake_headers(),
                    &format!(r#"{{"aps":{{}},"pad":"{}"}}"#, "x".repeat(5000)),
                ),
                413,
                "PayloadTooLarge",
            ),
        ];
        for (i, (req, status, reason)) in cases.into_iter().enumerate() {
            let r = send(&mut c, req).await;
            assert_eq!(
                (r.status, r.reason().as_deref()),
                (status, Some(reason)),
                "case {i}"
            );
        }

        // Wrong method and path.
        let req = Request::builder()
            .method("GET")
            .uri(format!("{}/3/device/{TOKEN}", f.mock.url()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = send(&mut c, req).await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (405, Some("MethodNotAllowed"))
        );
        let req = Request::builder()
            .method("POST")
            .uri(format!("{}/2/device/{TOKEN}", f.mock.url()))
            .body(Full::new(Bytes::from(BODY)))
            .unwrap();
        let r = send(&mut c, req).await;
        assert_eq!((r.status, r.reason().as_deref()), (404, Some("BadPath")));

        // A background push at priority 5 with no alert is fine; priority 1 too.
        let h = [
            ("apns-topic", TOPIC),
            ("apns-push-type", "background"),
            ("apns-priority", "5"),
        ];
        let r = send(
            &mut c,
            push_request(
                &f.mock,
                TOKEN,
                jwt,
                &h,
                r#"{"aps":{"content-available":1}}"#,
            ),
        )
        .await;
        assert_eq!(r.status, 200);
        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, jwt, &with("apns-priority", "1"), BODY),
        )
        .await;
        assert_eq!(r.status, 200);
    }

    #[tokio::test]
    async fn unregistered_answers_410_with_timestamp() {
        let f = fixture().await;
        f.mock.set_behaviour(TOKEN, Behaviour::Unregistered);
        let mut c = connect(&f.mock).await;
        let jwt = f.jwt();
        let before = unix_millis();
        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, Some(&jwt), &wake_headers(), BODY),
        )
        .await;
        assert_eq!(r.status, 410);
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["reason"], "Unregistered");
        let ts = v["timestamp"].as_u64().unwrap();
        assert!(ts >= before && ts <= unix_millis());
        let rec = f.mock.requests_for(TOKEN);
        assert_eq!(rec[0].status, 410);
        assert_eq!(rec[0].reason.as_deref(), Some("Unregistered"));

        // Other tokens are unaffected.
        let other = TOKEN.replace('0', "1");
        let r = send(
            &mut c,
            push_request(&f.mock, &other, Some(&jwt), &wake_headers(), BODY),
        )
        .await;
        assert_eq!(r.status, 200);
    }

    #[tokio::test]
    async fn fail_times_default_behaviour_and_custom() {
        let f = fixture().await;
        let mut c = connect(&f.mock).await;
        let jwt = f.jwt();
        let go = |c: &mut SendRequest<Full<Bytes>>| {
            let req = push_request(&f.mock, TOKEN, Some(&jwt), &wake_headers(), BODY);
            let mut c = c.clone();
            async move { send(&mut c, req).await }
        };

        f.mock
            .set_behaviour(TOKEN, Behaviour::fail_times(2, Behaviour::Unavailable));
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(go(&mut c).await.status);
        }
        assert_eq!(statuses, [503, 503, 200]);

        f.mock.clear_behaviour(TOKEN);
        f.mock.set_default_behaviour(Behaviour::Throttled);
        let r = go(&mut c).await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (429, Some("TooManyRequests"))
        );
        f.mock.set_default_behaviour(Behaviour::InternalError);
        let r = go(&mut c).await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (500, Some("InternalServerError"))
        );
        f.mock
            .set_default_behaviour(Behaviour::Custom(410, "ExpiredToken".into()));
        let r = go(&mut c).await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (410, Some("ExpiredToken"))
        );
        assert!(r.body.contains("timestamp"));
        f.mock.set_default_behaviour(Behaviour::Ok);
        assert_eq!(go(&mut c).await.status, 200);
    }

    #[tokio::test]
    async fn delay_holds_only_its_own_stream() {
        let f = fixture().await;
        let slow = TOKEN.replace('f', "e");
        f.mock.set_behaviour(
            &slow,
            Behaviour::delay(Duration::from_millis(400), Behaviour::BadDeviceToken),
        );
        let c = connect(&f.mock).await;
        let jwt = f.jwt();
        let started = std::time::Instant::now();
        let slow_req = push_request(&f.mock, &slow, Some(&jwt), &wake_headers(), BODY);
        let mut c1 = c.clone();
        let slow_task = tokio::spawn(async move { send(&mut c1, slow_req).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c2 = c.clone();
        let fast = send(
            &mut c2,
            push_request(&f.mock, TOKEN, Some(&jwt), &wake_headers(), BODY),
        )
        .await;
        assert_eq!(fast.status, 200);
        assert!(started.elapsed() < Duration::from_millis(400));
        let r = slow_task.await.unwrap();
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (400, Some("BadDeviceToken"))
        );
        assert!(started.elapsed() >= Duration::from_millis(400));
        let order: Vec<_> = f.mock.requests().into_iter().map(|r| r.token).collect();
        assert_eq!(order, [TOKEN.to_string(), slow]);
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_connection() {
        let f = fixture().await;
        let c = connect(&f.mock).await;
        let jwt = f.jwt();
        let mut tasks = JoinSet::new();
        for i in 0..100 {
            let token = format!("{:064x}", i + 1);
            let req = push_request(&f.mock, &token, Some(&jwt), &wake_headers(), BODY);
            let mut c = c.clone();
            tasks.spawn(async move { send(&mut c, req).await.status });
        }
        while let Some(status) = tasks.join_next().await {
            assert_eq!(status.unwrap(), 200);
        }
        assert_eq!(f.mock.connections_accepted(), 1);
        let reqs = f.mock.wait_for_requests(100, Duration::from_secs(5)).await;
        assert_eq!(reqs.len(), 100);
        assert!(reqs.iter().all(|r| r.connection == 1));
        assert_eq!(f.mock.provider_tokens_seen(), 1);
    }

    #[tokio::test]
    async fn goaway_closes_connection_and_server_keeps_listening() {
        let f = fixture().await;
        let (mut c, driver) =
            connect_with(&f.mock, client_config(f.mock.ca_pem(), None, &[b"h2"])).await;
        let jwt = f.jwt();
        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, Some(&jwt), &wake_headers(), BODY),
        )
        .await;
        assert_eq!(r.status, 200);

        f.mock.send_goaway();
        tokio::time::timeout(Duration::from_secs(5), driver)
            .await
            .expect("client connection should end after GOAWAY")
            .unwrap();

        let mut c = connect(&f.mock).await;
        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, Some(&jwt), &wake_headers(), BODY),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(f.mock.connections_accepted(), 2);
        assert_eq!(f.mock.requests()[1].connection, 2);

        f.mock.kill_connections();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(c.is_closed() || c.ready().await.is_err());
    }

    #[tokio::test]
    async fn cancelled_request_is_recorded() {
        let f = fixture().await;
        f.mock.set_behaviour(
            TOKEN,
            Behaviour::delay(Duration::from_secs(30), Behaviour::Ok),
        );
        let mut c = connect(&f.mock).await;
        let jwt = f.jwt();
        let req = push_request(&f.mock, TOKEN, Some(&jwt), &wake_headers(), BODY);
        let sent = tokio::time::timeout(Duration::from_millis(200), send(&mut c, req)).await;
        assert!(sent.is_err());
        let reqs = f.mock.wait_for_requests(1, Duration::from_secs(5)).await;
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].status, 0);
        assert_eq!(reqs[0].reason.as_deref(), Some(CANCELLED_REASON));
        let counts = f.mock.request_counts();
        assert_eq!((counts.answered, counts.cancelled), (0, 1));
    }

    #[tokio::test]
    async fn recording_off_counts_but_keeps_no_requests() {
        let f = fixture().await;
        let mut c = connect(&f.mock).await;
        let jwt = f.jwt();
        let bad = TOKEN.replace('0', "2");
        f.mock.set_behaviour(&bad, Behaviour::Unregistered);
        assert!(f.mock.is_recording());

        // One recorded while on.
        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, Some(&jwt), &wake_headers(), BODY),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(f.mock.requests_recorded(), 1);

        f.mock.set_recording(false);
        assert!(!f.mock.is_recording());
        for _ in 0..3 {
            let r = send(
                &mut c,
                push_request(&f.mock, TOKEN, Some(&jwt), &wake_headers(), BODY),
            )
            .await;
            assert_eq!(r.status, 200);
        }
        // Rejected by the checks, and by the token's behaviour: counted too.
        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, None, &wake_headers(), BODY),
        )
        .await;
        assert_eq!(r.status, 403);
        let r = send(
            &mut c,
            push_request(&f.mock, &bad, Some(&jwt), &wake_headers(), BODY),
        )
        .await;
        assert_eq!(r.status, 410);

        // Still only the one from before; the answers all counted.
        assert_eq!(f.mock.requests().len(), 1);
        assert_eq!(f.mock.requests_recorded(), 1);
        assert!(f.mock.requests_for(&bad).is_empty());
        assert_eq!(f.mock.requests_answered(), 6);
        assert_eq!(f.mock.requests_ok(), 4);
        assert_eq!(
            f.mock.request_counts(),
            RequestCounts {
                answered: 6,
                ok: 4,
                cancelled: 0,
                by_status: [(200, 4), (403, 1), (410, 1)].into_iter().collect(),
            }
        );
        // Tokens are still counted while not recording.
        assert_eq!(f.mock.provider_tokens_seen(), 1);

        // A subscriber still gets every request while not recording.
        let mut events = f.mock.subscribe();
        let r = send(
            &mut c,
            push_request(&f.mock, &bad, Some(&jwt), &wake_headers(), BODY),
        )
        .await;
        assert_eq!(r.status, 410);
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((event.token.as_str(), event.status), (bad.as_str(), 410));
        assert_eq!(event.kid.as_deref(), Some(KID));
        assert_eq!(f.mock.requests_recorded(), 1);
        drop(events);

        // On again: recorded as before.
        f.mock.set_recording(true);
        let r = send(
            &mut c,
            push_request(&f.mock, &bad, Some(&jwt), &wake_headers(), BODY),
        )
        .await;
        assert_eq!(r.status, 410);
        let reqs = f.mock.wait_for_requests(2, Duration::from_secs(5)).await;
        assert_eq!(reqs.len(), 2);
        assert_eq!(
            (reqs[1].token.as_str(), reqs[1].status),
            (bad.as_str(), 410)
        );
        assert_eq!(reqs[1].reason.as_deref(), Some("Unregistered"));
        assert_eq!(f.mock.requests_answered(), 8);
        assert_eq!(f.mock.requests_ok(), 4);

        // Clearing the requests leaves the counts.
        f.mock.clear_requests();
        assert_eq!(f.mock.requests_recorded(), 0);
        assert_eq!(f.mock.requests_answered(), 8);
    }

    #[tokio::test]
    async fn fail_times_counts_while_not_recording() {
        let f = fixture().await;
        let mut c = connect(&f.mock).await;
        let jwt = f.jwt();
        f.mock.set_recording(false);
        f.mock.set_behaviour(
            TOKEN,
            Behaviour::delay(
                Duration::from_millis(1),
                Behaviour::fail_times(2, Behaviour::Throttled),
            ),
        );
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let req = push_request(&f.mock, TOKEN, Some(&jwt), &wake_headers(), BODY);
            statuses.push(send(&mut c, req).await.status);
        }
        assert_eq!(statuses, [429, 429, 200]);
        // A behaviour set again starts its count again.
        f.mock
            .set_behaviour(TOKEN, Behaviour::fail_times(1, Behaviour::Unavailable));
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let req = push_request(&f.mock, TOKEN, Some(&jwt), &wake_headers(), BODY);
            statuses.push(send(&mut c, req).await.status);
        }
        assert_eq!(statuses, [503, 200]);
        assert!(f.mock.requests().is_empty());
        assert_eq!(f.mock.requests_answered(), 5);
    }

    #[tokio::test]
    async fn provider_token_signature_is_checked_once_per_token() {
        let f = fixture().await;
        let mut c = connect(&f.mock).await;
        let h = wake_headers();
        let jwt = f.jwt();
        for _ in 0..5 {
            let r = send(&mut c, push_request(&f.mock, TOKEN, Some(&jwt), &h, BODY)).await;
            assert_eq!(r.status, 200);
        }
        assert_eq!(f.mock.provider_token_verifications(), 1);
        assert_eq!(f.mock.provider_tokens_seen(), 1);

        // With a good token cached, one with the same claims but another key's signature is
        // still refused, every time; so is one with a signature of the good key on other claims.
        let (other_key, _) = generate_apns_key();
        let wrong_sig = provider_token(&other_key, KID, TEAM, unix_now()).unwrap();
        let wrong_team = provider_token(&f.private_pem, KID, "OTHERTEAM0", unix_now()).unwrap();
        let (good_head, _) = jwt.rsplit_once('.').unwrap();
        let (_, other_tail) = wrong_team.rsplit_once('.').unwrap();
        let spliced = format!("{good_head}.{other_tail}");
        for bad in [&wrong_sig, &spliced, &wrong_team] {
            for _ in 0..2 {
                let r = send(&mut c, push_request(&f.mock, TOKEN, Some(bad), &h, BODY)).await;
                assert_eq!(
                    (r.status, r.reason().as_deref()),
                    (403, Some("InvalidProviderToken")),
                    "{bad}"
                );
            }
        }
        // The good one still works, from the cache.
        let r = send(&mut c, push_request(&f.mock, TOKEN, Some(&jwt), &h, BODY)).await;
        assert_eq!(r.status, 200);
        assert_eq!(f.mock.provider_token_verifications(), 4);
        assert_eq!(f.mock.provider_tokens_seen(), 1);
    }

    #[tokio::test]
    async fn cached_provider_token_is_still_timed() {
        let f = fixture().await;
        let mut c = connect(&f.mock).await;
        let h = wake_headers();
        let max_age = PROVIDER_TOKEN_MAX_AGE.as_secs();
        let max_future = PROVIDER_TOKEN_MAX_FUTURE.as_secs();
        // One second from expiring, and two seconds from no longer being too far ahead.
        let now = unix_now();
        let ageing = provider_token(&f.private_pem, KID, TEAM, now - max_age + 1).unwrap();
        let early = provider_token(&f.private_pem, KID, TEAM, now + max_future + 2).unwrap();

        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, Some(&ageing), &h, BODY),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.reason());
        let r = send(&mut c, push_request(&f.mock, TOKEN, Some(&early), &h, BODY)).await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (403, Some("InvalidProviderToken"))
        );
        assert!(unix_now() <= now + 1, "too slow to test the boundaries");
        assert_eq!(f.mock.provider_token_verifications(), 2);
        assert_eq!(f.mock.provider_tokens_seen(), 1);

        // Wait until `ageing` is past the maximum age and `early` is no longer too far ahead.
        while unix_now() < now + 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = send(
            &mut c,
            push_request(&f.mock, TOKEN, Some(&ageing), &h, BODY),
        )
        .await;
        assert_eq!(
            (r.status, r.reason().as_deref()),
            (403, Some("ExpiredProviderToken"))
        );
        let r = send(&mut c, push_request(&f.mock, TOKEN, Some(&early), &h, BODY)).await;
        assert_eq!(r.status, 200, "{:?}", r.reason());
        // Both answered from the cache; the one accepted late now counts as seen.
        assert_eq!(f.mock.provider_token_verifications(), 2);
        assert_eq!(f.mock.provider_tokens_seen(), 2);
    }

    #[tokio::test]
    async fn provider_token_cache_is_bounded_and_tokens_seen_still_counted() {
        let f = fixture().await;
        let mut c = connect(&f.mock).await;
        let h = wake_headers();
        let now = unix_now();
        // A few good tokens among many more bad ones (cached as bad, and cheap to make).
        let good: Vec<String> = (0..8)
            .map(|i| provider_token(&f.private_pem, KID, TEAM, now - i).unwrap())
            .collect();
        let mut jwts: Vec<(String, bool)> = (0..TOKEN_CACHE_CAPACITY + 44)
            .map(|i| (format!("not.a.jwt{i}"), false))
            .collect();
        for (i, jwt) in good.iter().enumerate() {
            jwts.insert(i * 37, (jwt.clone(), true));
        }
        let n = jwts.len() as u64;
        for _ in 0..2 {
            for (jwt, ok) in &jwts {
                let r = send(&mut c, push_request(&f.mock, TOKEN, Some(jwt), &h, BODY)).await;
                if *ok {
                    assert_eq!(r.status, 200);
                } else {
                    assert_eq!(
                        (r.status, r.reason().as_deref()),
                        (403, Some("InvalidProviderToken"))
                    );
                }
            }
            assert!(f.mock.inner.tokens().verified.len() <= TOKEN_CACHE_CAPACITY);
            assert_eq!(f.mock.provider_tokens_seen(), good.len());
        }
        // The second round found some in the cache, not all.
        let checks = f.mock.provider_token_verifications();
        assert!(checks > n && checks < 2 * n, "{checks}");
    }

    #[tokio::test]
    async fn voip_pushes_need_the_voip_topic_and_may_be_bigger() {
        let (private_pem, public_pem) = generate_apns_key();
        let voip_topic = format!("{TOPIC}.voip");
        let mock = MockApns::start(MockApnsConfig::token_auth(
            TEAM,
            KID,
            public_pem,
            &[TOPIC, &voip_topic],
        ))
        .await
        .unwrap();
        let mut c = connect(&mock).await;
        let jwt = provider_token(&private_pem, KID, TEAM, unix_now()).unwrap();
        let headers = |topic: &'static str, push_type: &'static str, priority: &'static str| {
            vec![
                ("apns-topic", topic),
                ("apns-push-type", push_type),
                ("apns-priority", priority),
                ("apns-expiration", "0"),
            ]
        };
        let voip: &'static str = voip_topic.clone().leak();
        let padded = |len: usize| {
            let head = r#"{"aps":{},"pad":""#;
            let tail = r#""}"#;
            format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
        };
        // (headers, body, status, reason)
        type Case<'a> = (Vec<(&'a str, &'a str)>, String, u16, Option<&'a str>);
        let cases: Vec<Case> = vec![
            // a call to the PushKit topic
            (headers(voip, "voip", "10"), BODY.into(), 200, None),
            // voip to the plain bundle id, alert or background to the PushKit topic
            (
                headers(TOPIC, "voip", "10"),
                BODY.into(),
                400,
                Some("DeviceTokenNotForTopic"),
            ),
            (
                headers(voip, "alert", "10"),
                BODY.into(),
                400,
                Some("InvalidPushType"),
            ),
            (
                headers(voip, "background", "5"),
                r#"{"aps":{"content-available":1}}"#.into(),
                400,
                Some("InvalidPushType"),
            ),
            // a topic that is not the app's at all is still TopicDisallowed, voip or not
            (
                headers("im.knock.other.voip", "voip", "10"),
                BODY.into(),
                400,
                Some("TopicDisallowed"),
            ),
            // payload limits: 4096 bytes, 5120 for VoIP
            (
                headers(TOPIC, "alert", "10"),
                padded(MAX_PAYLOAD),
                200,
                None,
            ),
            (
                headers(TOPIC, "alert", "10"),
                padded(MAX_PAYLOAD + 1),
                413,
                Some("PayloadTooLarge"),
            ),
            (
                headers(voip, "voip", "10"),
                padded(MAX_VOIP_PAYLOAD),
                200,
                None,
            ),
            (
                headers(voip, "voip", "10"),
                padded(MAX_VOIP_PAYLOAD + 1),
                413,
                Some("PayloadTooLarge"),
            ),
        ];
        for (i, (h, body, status, reason)) in cases.into_iter().enumerate() {
            let r = send(&mut c, push_request(&mock, TOKEN, Some(&jwt), &h, &body)).await;
            assert_eq!(
                (r.status, r.reason().as_deref()),
                (status, reason),
                "case {i}"
            );
        }
        let reqs = mock.requests();
        assert_eq!(reqs.len(), 9);
        let call = &reqs[0];
        assert_eq!(
            (
                call.topic.as_deref(),
                call.push_type.as_deref(),
                call.priority.as_deref(),
                call.expiration.as_deref(),
                call.status
            ),
            (Some(voip), Some("voip"), Some("10"), Some("0"), 200)
        );
        assert_eq!(
            call.authority.as_deref(),
            Some(mock.url().trim_start_matches("https://"))
        );
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn wait_for_requests_returns_what_it_has_at_timeout() {
        let f = fixture().await;
        let got = f.mock.wait_for_requests(1, Duration::from_millis(50)).await;
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn only_h2_is_offered() {
        let f = fixture().await;
        let tcp = TcpStream::connect(f.mock.addr()).await.unwrap();
        let config = client_config(f.mock.ca_pem(), None, &[b"http/1.1"]);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let res = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await;
        assert!(res.is_err(), "an http/1.1-only client must be refused");
        assert_eq!(f.mock.connections_accepted(), 0);
    }

    #[tokio::test]
    async fn the_certificate_carries_the_extra_names_and_no_others() {
        let (_, public_key_pem) = generate_apns_key();
        let config = MockApnsConfig {
            public_key_pem,
            topics: vec![TOPIC.into()],
            server_names: vec!["mock-apns".into()],
            ..Default::default()
        };
        let mock = MockApns::start(config).await.unwrap();
        let handshake = |host: &'static str| {
            let mock = &mock;
            async move {
                let tcp = TcpStream::connect(mock.addr()).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from(host).unwrap();
                TlsConnector::from(Arc::new(client_config(mock.ca_pem(), None, &[b"h2"])))
                    .connect(name, tcp)
                    .await
            }
        };
        assert!(
            handshake("mock-apns").await.is_ok(),
            "the name other containers use"
        );
        assert!(handshake("localhost").await.is_ok());
        assert!(
            handshake("elsewhere").await.is_err(),
            "a name it was not given"
        );
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn certificate_auth() {
        let client_ca = TestClientCa::new().unwrap();
        let config = MockApnsConfig {
            topics: vec![TOPIC.into()],
            client_ca_pem: Some(client_ca.ca_pem().to_string()),
            ..Default::default()
        };
        let mock = MockApns::start(config).await.unwrap();
        let (cert, key) = client_ca.issue("knock").unwrap();
        let (mut c, _) = connect_with(
            &mock,
            client_config(mock.ca_pem(), Some((&cert, &key)), &[b"h2"]),
        )
        .await;
        // No JWT needed, and a single allowed topic may be left out.
        let r = send(
            &mut c,
            push_request(&mock, TOKEN, None, &[("apns-push-type", "alert")], BODY),
        )
        .await;
        assert_eq!(r.status, 200);

        // Without a client certificate the handshake fails.
        let tcp = TcpStream::connect(mock.addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = TlsConnector::from(Arc::new(client_config(mock.ca_pem(), None, &[b"h2"])))
            .connect(name, tcp)
            .await;
        // TLS 1.3 reports the refusal on first use rather than in the handshake.
        let refused = match tls {
            Err(_) => true,
            Ok(tls) => match hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
                TokioExecutor::new(),
                TokioIo::new(tls),
            )
            .await
            {
                Err(_) => true,
                Ok((mut send_req, conn)) => {
                    tokio::spawn(conn);
                    let req = push_request(&mock, TOKEN, None, &wake_headers(), BODY);
                    let res = async {
                        send_req.ready().await?;
                        send_req.send_request(req).await
                    }
                    .await;
                    res.is_err()
                }
            },
        };
        assert!(refused, "a client without a certificate must be refused");
        assert_eq!(mock.connections_accepted(), 1);
        assert_eq!(mock.requests().len(), 1);
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_stops_listening() {
        let f = fixture().await;
        let addr = f.mock.addr();
        let _ = connect(&f.mock).await;
        f.mock.shutdown().await;
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn an_outage_refuses_connections_and_the_mock_comes_back_as_it_was() {
        let mut f = fixture().await;
        let addr = f.mock.addr();
        let jwt = f.jwt();
        let mut c = connect(&f.mock).await;
        let push = |mock: &MockApns| push_request(mock, TOKEN, Some(&jwt), &wake_headers(), BODY);
        assert_eq!(send(&mut c, push(&f.mock)).await.status, 200);

        f.mock.go_down().await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "refused while down"
        );
        assert!(
            c.send_request(push(&f.mock)).await.is_err(),
            "open connections are dropped"
        );

        f.mock.come_back().await.unwrap();
        assert_eq!(f.mock.addr(), addr);
        // Same port, same certificate: a client set up for the mock before the outage connects again.
        let mut c = connect(&f.mock).await;
        assert_eq!(send(&mut c, push(&f.mock)).await.status, 200);
        assert_eq!(f.mock.requests_ok(), 2, "counts survive the outage");
        assert_eq!(f.mock.requests_received(), 2);
    }

    #[test]
    fn behaviour_names_round_trip() {
        let all = [
            Behaviour::Ok,
            Behaviour::Unregistered,
            Behaviour::BadDeviceToken,
            Behaviour::DeviceTokenNotForTopic,
            Behaviour::Throttled,
            Behaviour::Unavailable,
            Behaviour::InternalError,
            Behaviour::delay(Duration::from_millis(250), Behaviour::Unavailable),
            Behaviour::fail_times(
                3,
                Behaviour::delay(Duration::from_millis(5), Behaviour::Throttled),
            ),
            Behaviour::Custom(403, "ExpiredProviderToken".into()),
        ];
        for b in all {
            assert_eq!(b.to_string().parse::<Behaviour>(), Ok(b.clone()), "{b}");
        }
        assert_eq!("Bad_Device_Token".parse(), Ok(Behaviour::BadDeviceToken));
        assert!("nonsense".parse::<Behaviour>().is_err());
        assert!("ok:1".parse::<Behaviour>().is_err());
        assert!("custom:999:X".parse::<Behaviour>().is_err());
    }

    #[test]
    fn generated_ids_are_uuids() {
        let a = new_apns_id();
        let b = new_apns_id();
        assert!(is_uuid(&a) && is_uuid(&b));
        assert_ne!(a, b);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "A" | "B"), "{a}");
        assert_eq!(a, a.to_ascii_uppercase());
    }
}
