//! A mock of Google's FCM HTTP v1 API and of the OAuth2 token endpoint in front of it, for knock's tests.
//!
//! It speaks what Google speaks, over TLS with a fresh test CA (HTTP/2 by ALPN `h2`, or HTTP/1.1):
//!
//! - `POST /token`: the service-account JWT-bearer grant (RFC 7523). The assertion must be signed RS256 by
//!   a registered [`ServiceAccount`]'s key, `iss` must be its `client_email`, `aud` this endpoint's own URL
//!   (as the `token_uri` of the account file says), `exp - iat` at most an hour and the pair in a
//!   reasonable timeframe (60 s of skew). Answers `{"access_token","expires_in","token_type":"Bearer"}`
//!   or Google's `{"error":"invalid_grant","error_description":...}` texts.
//! - `POST /v1/projects/<project>/messages:send`: a bearer access token the mock issued (and not expired:
//!   see [`MockFcm::expire_access_tokens`]), the configured project, and a body checked as Google checks
//!   it (unknown names, types, data keys and size, `android.priority`, `android.ttl`, one recipient).
//!   Errors carry Google's body shape: `{"error":{"code","message","status","details":[...]}}` with an
//!   `FcmError` detail where Google gives one.
//!
//! Per-token [`Behaviour`] lets a test have FCM answer `UNREGISTERED`, throttle with `Retry-After`, fail
//! for a while or answer slowly, and every send is recorded as an [`FcmRequest`] (token grants as
//! [`TokenRequest`]) so tests can assert what knock sent and with which access token.
//!
//! Where no source gave Google's exact text, the mock uses Google's generic message for the status
//! (`Request contains an invalid argument.`) and names the field in a `google.rpc.BadRequest` detail.

use crate::tls::ServerIdentity;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng as _;
use rustls::ServerConfig;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, oneshot, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// The OAuth scope for sending with FCM.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// The broad Google Cloud scope, which FCM accepts too.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// The JWT-bearer `grant_type` (RFC 7523).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Lifetime of the access tokens the mock issues unless configured (Google answers `expires_in: 3599`).
pub const DEFAULT_ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(3599);
/// Longest `exp - iat` Google accepts in an assertion.
pub const MAX_ASSERTION_LIFETIME: i64 = 3600;
/// Clock skew allowed on an assertion's `iat` and `exp`.
pub const ASSERTION_SKEW: i64 = 60;
/// Largest data payload (keys and values) FCM accepts for a message to a token, in bytes.
pub const MAX_DATA_BYTES: usize = 4096;
/// Largest `android.ttl` FCM accepts, in seconds (4 weeks).
pub const MAX_TTL_SECS: u64 = 2_419_200;
/// `Retry-After` of [`Behaviour::QuotaExceeded`] when none is given by name.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 10;
const MAX_BODY_READ: usize = 1 << 20;
/// Streams one HTTP/2 connection may have open, as the mock APNs allows (hyper's default is 200), so a
/// benchmark at window 1000 is not capped by the mock.
const MAX_CONCURRENT_STREAMS: u32 = 1000;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
const FCM_ERROR_TYPE: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";
const BAD_REQUEST_TYPE: &str = "type.googleapis.com/google.rpc.BadRequest";
const ERROR_INFO_TYPE: &str = "type.googleapis.com/google.rpc.ErrorInfo";
const INVALID_ARGUMENT_MESSAGE: &str = "Request contains an invalid argument.";
/// Google's 401 text for an access token that is unknown or expired.
pub const UNAUTHENTICATED_MESSAGE: &str = "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
const MISSING_CREDENTIALS_MESSAGE: &str = "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
/// Google's `error_description` for a bad signature, an unknown or rotated key.
pub const INVALID_SIGNATURE: &str = "Invalid JWT Signature.";
/// Google's `error_description` for an `iat`/`exp` pair it does not accept.
pub const INVALID_TIMEFRAME: &str = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.";
/// Google's `error_description` for an `iss` that names no service account.
pub const ACCOUNT_NOT_FOUND: &str = "Invalid grant: account not found";
const BAD_GATEWAY_HTML: &str = "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <meta name=viewport content=\"initial-scale=1, minimum-scale=1, width=device-width\">\n  <title>Error 502 (Server Error)!!1</title>\n  <a href=//www.google.com/><span id=logo aria-label=Google></span></a>\n  <p><b>502.</b> <ins>That\u{2019}s an error.</ins>\n  <p>The server encountered a temporary error and could not complete your request.<p>Please try again in 30 seconds.  <ins>That\u{2019}s all we know.</ins>\n";

/// Behaviour for a registration token (default [`Behaviour::Ok`]). It applies only to sends that passed
/// every check (auth, project, body): those are answered as Google would anyway.
#[derive(Clone, Debug, PartialEq)]
pub enum Behaviour {
    /// 200 `{"name":"projects/<project>/messages/<id>"}`.
    Ok,
    /// 404 `NOT_FOUND`, FcmError `UNREGISTERED`: the app was uninstalled or the token is stale.
    Unregistered,
    /// 403 `PERMISSION_DENIED`, FcmError `SENDER_ID_MISMATCH`: the token belongs to another sender.
    SenderIdMismatch,
    /// 400 `INVALID_ARGUMENT`, FcmError `INVALID_ARGUMENT` and a BadRequest on `message.token`.
    InvalidToken,
    /// 429 `RESOURCE_EXHAUSTED`, FcmError `QUOTA_EXCEEDED`, with `Retry-After: <secs>`.
    QuotaExceeded(u64),
    /// 503 `UNAVAILABLE`, FcmError `UNAVAILABLE`.
    Unavailable,
    /// 500 `INTERNAL`, FcmError `INTERNAL`.
    Internal,
    /// 502 with an HTML body, as Google's front end answers.
    BadGateway,
    /// Answer as the inner behaviour, after a delay.
    Delay(Duration, Box<Behaviour>),
    /// The first n sends to the token (counted since this behaviour was set) get the inner behaviour,
    /// later ones are answered Ok.
    FailTimes(u32, Box<Behaviour>),
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

    fn uses_count(&self) -> bool {
        match self {
            Behaviour::FailTimes(..) => true,
            Behaviour::Delay(_, inner) => inner.uses_count(),
            _ => false,
        }
    }

    /// The total delay and the behaviour that answers, given how many sends to this token were already
    /// answered under this behaviour.
    fn resolve(&self, seen: u32) -> (Duration, &Behaviour) {
        match self {
            Behaviour::Delay(d, inner) => {
                let (more, b) = inner.resolve(seen);
                (d.saturating_add(more), b)
            }
            Behaviour::FailTimes(n, inner) if seen < *n => inner.resolve(seen),
            Behaviour::FailTimes(..) => (Duration::ZERO, &Behaviour::Ok),
            b => (Duration::ZERO, b),
        }
    }
}

/// Names as accepted by [`Behaviour::from_str`]: `ok`, `unregistered`, `sender-id-mismatch`,
/// `invalid-token`, `quota-exceeded[:<retry-after secs>]`, `unavailable`, `internal`, `bad-gateway`,
/// `delay:<ms>:<behaviour>`, `fail-times:<n>:<behaviour>`.
impl fmt::Display for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Behaviour::Ok => f.write_str("ok"),
            Behaviour::Unregistered => f.write_str("unregistered"),
            Behaviour::SenderIdMismatch => f.write_str("sender-id-mismatch"),
            Behaviour::InvalidToken => f.write_str("invalid-token"),
            Behaviour::QuotaExceeded(secs) => write!(f, "quota-exceeded:{secs}"),
            Behaviour::Unavailable => f.write_str("unavailable"),
            Behaviour::Internal => f.write_str("internal"),
            Behaviour::BadGateway => f.write_str("bad-gateway"),
            Behaviour::Delay(d, inner) => write!(f, "delay:{}:{inner}", d.as_millis()),
            Behaviour::FailTimes(n, inner) => write!(f, "fail-times:{n}:{inner}"),
        }
    }
}

/// Parses the names written by [`Behaviour`]'s `Display` (case and `_`/`-` are not significant; FCM's
/// own error codes such as `UNREGISTERED` or `QUOTA_EXCEEDED` are accepted too).
impl FromStr for Behaviour {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (head, rest) = match s.split_once(':') {
            Some((h, r)) => (h, Some(r)),
            None => (s, None),
        };
        let name = head.to_ascii_lowercase().replace('_', "-");
        let simple = |b: Behaviour| match rest {
            None => Ok(b),
            Some(_) => Err(format!("`{name}` takes no argument")),
        };
        let two = |rest: Option<&str>| -> Result<(String, String), String> {
            rest.and_then(|r| r.split_once(':'))
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("`{name}` needs two arguments separated by `:`"))
        };
        match name.as_str() {
            "ok" => simple(Behaviour::Ok),
            "unregistered" | "not-found" => simple(Behaviour::Unregistered),
            "sender-id-mismatch" => simple(Behaviour::SenderIdMismatch),
            "invalid-token" | "invalid-argument" => simple(Behaviour::InvalidToken),
            "quota-exceeded" => match rest {
                None => Ok(Behaviour::QuotaExceeded(DEFAULT_RETRY_AFTER_SECS)),
                Some(secs) => secs
                    .parse()
                    .map(Behaviour::QuotaExceeded)
                    .map_err(|_| format!("bad Retry-After seconds: {secs:?}")),
            },
            "unavailable" => simple(Behaviour::Unavailable),
            "internal" => simple(Behaviour::Internal),
            "bad-gateway" => simple(Behaviour::BadGateway),
            "delay" => {
                let (ms, inner) = two(rest)?;
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| format!("bad delay in milliseconds: {ms:?}"))?;
                Ok(Behaviour::delay(Duration::from_millis(ms), inner.parse()?))
            }
            "fail-times" => {
                let (n, inner) = two(rest)?;
                let n: u32 = n.parse().map_err(|_| format!("bad count: {n:?}"))?;
                Ok(Behaviour::fail_times(n, inner.parse()?))
            }
            _ => Err(format!("unknown behaviour {s:?}")),
        }
    }
}

/// A Google service account as the console hands it out: [`ServiceAccount::json`] is the key file.
#[derive(Clone, Debug)]
pub struct ServiceAccount {
    /// The key file: `type`, `project_id`, `private_key_id`, `private_key` (PKCS#8 PEM), `client_email`,
    /// `client_id`, `auth_uri`, `token_uri`, `auth_provider_x509_cert_url`, `client_x509_cert_url`,
    /// `universe_domain`.
    pub json: String,
    /// The public half (SPKI `PUBLIC KEY` PEM), what Google keeps.
    pub public_key_pem: String,
    /// The private key (PKCS#8 `PRIVATE KEY` PEM), as in the file.
    pub private_key_pem: String,
    pub project_id: String,
    pub private_key_id: String,
    pub client_email: String,
    pub client_id: String,
    pub token_uri: String,
}

/// One RSA-2048 key pair for the whole process: generating one takes seconds in a debug build, so every
/// [`ServiceAccount::generate`] shares it (each account still has its own key id and email).
fn shared_key() -> &'static (String, String) {
    static KEY: OnceLock<(String, String)> = OnceLock::new();
    KEY.get_or_init(generate_rsa_key)
}

/// A fresh RSA-2048 key pair: (PKCS#8 PEM, SPKI PEM).
fn generate_rsa_key() -> (String, String) {
    use rsa::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("generating an RSA key");
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .expect("encoding an RSA key")
        .to_string();
    let public = key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("encoding an RSA public key");
    (private, public)
}

impl ServiceAccount {
    /// A service account of `project_id` whose file points at `token_uri`. The RSA-2048 key is made once
    /// per process and shared by every account made this way (see [`ServiceAccount::generate_with_new_key`]).
    pub fn generate(project_id: &str, token_uri: &str) -> ServiceAccount {
        let (private, public) = shared_key();
        Self::with_key(project_id, token_uri, private.clone(), public.clone())
    }

    /// As [`ServiceAccount::generate`] with a key of its own (seconds in a debug build).
    pub fn generate_with_new_key(project_id: &str, token_uri: &str) -> ServiceAccount {
        let (private, public) = generate_rsa_key();
        Self::with_key(project_id, token_uri, private, public)
    }

    fn with_key(
        project_id: &str,
        token_uri: &str,
        private_key_pem: String,
        public_key_pem: String,
    ) -> ServiceAccount {
        let mut rng = rand::thread_rng();
        let private_key_id = hex::encode(rng.gen::<[u8; 20]>());
        let client_id: String = format!("1{:020}", rng.gen::<u64>());
        let client_email = format!(
            "firebase-adminsdk-{}@{project_id}.iam.gserviceaccount.com",
            random_chars(5).to_ascii_lowercase()
        );
        let mut sa = ServiceAccount {
            json: String::new(),
            public_key_pem,
            private_key_pem,
            project_id: project_id.to_string(),
            private_key_id,
            client_email,
            client_id,
            token_uri: token_uri.to_string(),
        };
        sa.json = sa.render_json();
        sa
    }

    /// The same account (same key, id and email) with its file pointing at another token URI.
    pub fn with_token_uri(&self, token_uri: &str) -> ServiceAccount {
        let mut sa = self.clone();
        sa.token_uri = token_uri.to_string();
        sa.json = sa.render_json();
        sa
    }

    fn render_json(&self) -> String {
        let email_escaped = self.client_email.replace('@', "%40");
        let v = json!({
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": self.private_key_pem,
            "client_email": self.client_email,
            "client_id": self.client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": format!("https://www.googleapis.com/robot/v1/metadata/x509/{email_escaped}"),
            "universe_domain": "googleapis.com",
        });
        serde_json::to_string_pretty(&v).expect("JSON") + "\n"
    }

    /// An assertion signed as Google's libraries sign it: header `{"alg":"RS256","typ":"JWT","kid":
    /// private_key_id}`, claims `iss` = `client_email`, `scope` = [`FCM_SCOPE`], `aud` = `token_uri`,
    /// `iat` = `now`, `exp` = `now + 3600`.
    pub fn assertion(&self, now: u64) -> String {
        self.sign_claims(&json!({
            "iss": self.client_email,
            "scope": FCM_SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + 3600,
        }))
    }

    /// Signs any claims RS256 with this account's key (header `kid` = `private_key_id`).
    pub fn sign_claims(&self, claims: &Value) -> String {
        let key = EncodingKey::from_rsa_pem(self.private_key_pem.as_bytes())
            .expect("the account's own PKCS#8 key");
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.private_key_id.clone());
        jsonwebtoken::encode(&header, claims, &key).expect("signing an assertion")
    }

    /// The form body of a token request carrying `assertion`.
    pub fn token_request_body(assertion: &str) -> String {
        format!("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}")
    }
}

/// What the mock expects of its clients.
#[derive(Clone, Debug)]
pub struct MockFcmConfig {
    /// The Firebase project id sends must name in their path.
    pub project_id: String,
    /// `expires_in` of the access tokens issued, and how long they are accepted.
    pub access_token_lifetime: Duration,
    /// DNS names the server certificate carries besides `localhost` and the loopback addresses (the name
    /// other containers reach the mock by); `https://<name>:<port>/token` is then an accepted audience too.
    pub server_names: Vec<String>,
}

impl MockFcmConfig {
    pub fn new(project_id: impl Into<String>) -> MockFcmConfig {
        MockFcmConfig {
            project_id: project_id.into(),
            access_token_lifetime: DEFAULT_ACCESS_TOKEN_LIFETIME,
            server_names: Vec::new(),
        }
    }
}

/// One send request the mock received, and what it answered.
#[derive(Clone, Debug, Serialize)]
pub struct FcmRequest {
    /// `message.token` if it was a string.
    pub token: Option<String>,
    /// The project named in the path (empty when the path had another shape).
    pub project: String,
    pub path: String,
    pub method: String,
    /// `HTTP/2.0` or `HTTP/1.1`.
    pub version: String,
    pub authority: Option<String>,
    /// `message.android.priority` as sent (a string or the JSON of whatever else).
    pub priority: Option<String>,
    /// `message.android.collapse_key` (or `collapseKey`).
    pub collapse_key: Option<String>,
    /// `message.android.ttl` as sent.
    pub ttl: Option<String>,
    /// `message.data` (string values as they are, others as their JSON).
    pub data: BTreeMap<String, String>,
    /// `message.android.data`, which overrides `message.data` on Android.
    pub android_data: Option<BTreeMap<String, String>>,
    /// `validate_only` (dry run: answered, not delivered).
    pub validate_only: bool,
    /// The bearer token of `Authorization`, if any.
    pub access_token: Option<String>,
    /// Raw body text (lossy UTF-8).
    pub body: String,
    /// All request headers in order (values decoded lossily as UTF-8).
    pub headers: Vec<(String, String)>,
    /// Status the mock answered; 0 when the client gave up before the answer.
    pub status: u16,
    /// The canonical `error.status` answered (`NOT_FOUND`, `UNAUTHENTICATED`, ...).
    pub error_status: Option<String>,
    /// The FcmError `errorCode` answered, if the answer had one (`UNREGISTERED`, ...).
    pub error_code: Option<String>,
    /// `error.message` answered.
    pub error_message: Option<String>,
    /// The message name answered on success.
    pub name: Option<String>,
    /// Which TLS connection it came on: 1 for the first accepted, and so on.
    pub connection: usize,
}

impl FcmRequest {
    /// The first value of a request header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }
}

/// One request to the token endpoint, and what it answered.
#[derive(Clone, Debug, Serialize)]
pub struct TokenRequest {
    pub status: u16,
    /// `error` answered (`invalid_grant`, ...).
    pub error: Option<String>,
    pub error_description: Option<String>,
    /// Claims and header of the assertion, as far as they could be read.
    pub iss: Option<String>,
    pub kid: Option<String>,
    pub scope: Option<String>,
    pub aud: Option<String>,
    /// The access token issued.
    pub access_token: Option<String>,
    pub body: String,
    pub connection: usize,
}

/// What [`MockFcm::subscribe`] reports, as each request is answered.
#[derive(Clone, Debug)]
pub enum FcmEvent {
    Send(Box<FcmRequest>),
    Token(Box<TokenRequest>),
}

/// An access token the mock issued.
struct Issued {
    expires: SystemTime,
    scopes: Vec<String>,
}

/// A registered account's key.
struct AccountKey {
    private_key_id: String,
    key: DecodingKey,
}

struct State {
    behaviours: HashMap<String, Behaviour>,
    default_behaviour: Behaviour,
    seen: HashMap<String, u32>,
    requests: Vec<FcmRequest>,
    token_requests: Vec<TokenRequest>,
    issued: HashMap<String, Issued>,
    /// By `client_email`.
    accounts: HashMap<String, AccountKey>,
    /// If set, every token request is answered 400 `invalid_grant` with this description.
    token_failure: Option<String>,
}

struct Inner {
    config: MockFcmConfig,
    /// Accepted assertion audiences: `https://<name>:<port>/token` for every name of the certificate.
    audiences: Vec<String>,
    token_uri: String,
    state: Mutex<State>,
    notify: Notify,
    connections: AtomicUsize,
    token_requests: AtomicU64,
    events: broadcast::Sender<FcmEvent>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running mock FCM. Dropping it stops it abruptly; [`MockFcm::shutdown`] stops it gracefully.
pub struct MockFcm {
    inner: Arc<Inner>,
    addr: SocketAddr,
    ca_pem: String,
    service_account: ServiceAccount,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for MockFcm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockFcm")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MockFcm {
    /// Listens on 127.0.0.1 on a free port with a fresh CA and a server certificate for `localhost`,
    /// `127.0.0.1` and `::1` (ALPN `h2` and `http/1.1`), with one service account of the project
    /// registered: [`MockFcm::service_account`].
    pub async fn start(config: MockFcmConfig) -> anyhow::Result<MockFcm> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
    }

    /// As [`MockFcm::start`], on the given address (its IP is added to the certificate).
    pub async fn start_on(addr: SocketAddr, config: MockFcmConfig) -> anyhow::Result<MockFcm> {
        let identity =
            ServerIdentity::generate("knock testkit mock FCM CA", addr.ip(), &config.server_names)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("mock FCM: TLS versions")?
            .with_no_client_auth()
            .with_single_cert(identity.chain, identity.key)
            .context("mock FCM: server certificate")?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("mock FCM: bind {addr}"))?;
        let addr = listener.local_addr()?;
        let port = addr.port();
        let mut hosts = vec![
            "localhost".to_string(),
            Ipv4Addr::LOCALHOST.to_string(),
            format!("[{}]", Ipv6Addr::LOCALHOST),
        ];
        if !addr.ip().is_unspecified() && !addr.ip().is_loopback() {
            hosts.push(match addr.ip() {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => format!("[{ip}]"),
            });
        }
        hosts.extend(config.server_names.iter().cloned());
        let audiences = hosts
            .iter()
            .map(|h| format!("https://{h}:{port}/token"))
            .collect();
        let url_host = if addr.ip().is_unspecified() {
            Ipv4Addr::LOCALHOST.to_string()
        } else {
            match addr.ip() {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => format!("[{ip}]"),
            }
        };
        let url = format!("https://{url_host}:{port}");
        let token_uri = format!("{url}/token");
        let service_account = ServiceAccount::generate(&config.project_id, &token_uri);

        let inner = Arc::new(Inner {
            config,
            audiences,
            token_uri,
            state: Mutex::new(State {
                behaviours: HashMap::new(),
                default_behaviour: Behaviour::Ok,
                seen: HashMap::new(),
                requests: Vec::new(),
                token_requests: Vec::new(),
                issued: HashMap::new(),
                accounts: HashMap::new(),
                token_failure: None,
            }),
            notify: Notify::new(),
            connections: AtomicUsize::new(0),
            token_requests: AtomicU64::new(0),
            events: broadcast::channel(1024).0,
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, acceptor, inner.clone(), stop_rx));
        let mock = MockFcm {
            inner,
            addr,
            ca_pem: identity.ca_pem,
            service_account,
            stop: Some(stop_tx),
            task: Some(task),
        };
        mock.add_service_account(&mock.service_account.clone())?;
        Ok(mock)
    }

    /// `https://127.0.0.1:PORT` (the FCM endpoint: sends go to `<url>/v1/projects/<project>/messages:send`);
    /// a mock listening on an unspecified address (`0.0.0.0`) is named by 127.0.0.1 here.
    pub fn url(&self) -> String {
        let token_uri = &self.inner.token_uri;
        token_uri
            .strip_suffix("/token")
            .unwrap_or(token_uri)
            .to_string()
    }

    /// `<url>/token`, the token URI of [`MockFcm::service_account`].
    pub fn token_uri(&self) -> String {
        self.inner.token_uri.clone()
    }

    /// `<url>/v1/projects/<project>/messages:send`.
    pub fn send_url(&self) -> String {
        format!(
            "{}/v1/projects/{}/messages:send",
            self.url(),
            self.inner.config.project_id
        )
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn project_id(&self) -> &str {
        &self.inner.config.project_id
    }

    /// The service account registered at start, its file pointing at [`MockFcm::token_uri`].
    pub fn service_account(&self) -> &ServiceAccount {
        &self.service_account
    }

    /// Registers another account (by its `client_email`; a later one of the same email replaces it).
    pub fn add_service_account(&self, sa: &ServiceAccount) -> anyhow::Result<()> {
        let key = DecodingKey::from_rsa_pem(sa.public_key_pem.as_bytes())
            .context("mock FCM: the account's public key is not an RSA PEM")?;
        self.inner.state().accounts.insert(
            sa.client_email.clone(),
            AccountKey {
                private_key_id: sa.private_key_id.clone(),
                key,
            },
        );
        Ok(())
    }

    /// Forgets an account, as when it is deleted in the console: its assertions get `account not found`
    /// (tokens already issued stay good until they expire, as with Google).
    pub fn remove_service_account(&self, client_email: &str) {
        self.inner.state().accounts.remove(client_email);
    }

    /// PEM of the CA that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes [`MockFcm::ca_pem`] to `dir/mock-fcm-ca-<port>.pem` and returns that path.
    pub fn write_ca_file(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join(format!("mock-fcm-ca-{}.pem", self.addr.port()));
        std::fs::write(&path, &self.ca_pem)?;
        Ok(path)
    }

    /// Writes [`MockFcm::service_account`]'s file to `dir/mock-fcm-sa-<port>.json` and returns that path.
    pub fn write_service_account_file(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join(format!("mock-fcm-sa-{}.json", self.addr.port()));
        std::fs::write(&path, &self.service_account.json)?;
        Ok(path)
    }

    /// Sets the behaviour for one registration token (and restarts its `FailTimes` count).
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

    /// Sets the behaviour of every token without its own (e.g. an outage), restarting their counts.
    pub fn set_default_behaviour(&self, b: Behaviour) {
        let mut st = self.inner.state();
        st.default_behaviour = b;
        let State {
            behaviours, seen, ..
        } = &mut *st;
        seen.retain(|token, _| behaviours.contains_key(token));
    }

    /// Makes every access token issued so far expire now: the next send with one is answered 401.
    pub fn expire_access_tokens(&self) {
        let now = SystemTime::now();
        for issued in self.inner.state().issued.values_mut() {
            issued.expires = now;
        }
    }

    /// While `Some`, every token request is answered 400 `invalid_grant` with this description (a key
    /// deleted in the console, say: [`INVALID_SIGNATURE`]).
    pub fn set_token_failure(&self, description: Option<&str>) {
        self.inner.state().token_failure = description.map(str::to_string);
    }

    /// Requests to the token endpoint so far, whatever the answer.
    pub fn token_requests(&self) -> u64 {
        self.inner.token_requests.load(Ordering::SeqCst)
    }

    /// The token requests, in order.
    pub fn token_grants(&self) -> Vec<TokenRequest> {
        self.inner.state().token_requests.clone()
    }

    /// Every send request received, in the order they were answered, rejected ones included.
    pub fn requests(&self) -> Vec<FcmRequest> {
        self.inner.state().requests.clone()
    }

    /// The send requests for one registration token.
    pub fn requests_for(&self, token: &str) -> Vec<FcmRequest> {
        self.inner
            .state()
            .requests
            .iter()
            .filter(|r| r.token.as_deref() == Some(token))
            .cloned()
            .collect()
    }

    /// Forgets the recorded send and token requests (the token request count stays).
    pub fn clear_requests(&self) {
        let mut st = self.inner.state();
        st.requests.clear();
        st.token_requests.clear();
    }

    /// Waits until at least `n` send requests were recorded and returns them all, or returns what there
    /// is when `timeout` passes.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<FcmRequest> {
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
    pub fn subscribe(&self) -> broadcast::Receiver<FcmEvent> {
        self.inner.events.subscribe()
    }

    /// TLS connections accepted so far (handshake completed).
    pub fn connections_accepted(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Stops listening and lets in-flight requests finish for a moment, then closes what is left.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockFcm {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_chars(n: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect()
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
                    conns.spawn(serve_connection(tcp, acceptor.clone(), inner.clone()));
                }
                Err(e) => {
                    tracing::warn!("mock FCM: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let drained = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, drained).await;
    conns.shutdown().await;
}

async fn serve_connection(tcp: TcpStream, acceptor: TlsAcceptor, inner: Arc<Inner>) {
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!("mock FCM: TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("mock FCM: TLS handshake timed out");
            return;
        }
    };
    let id = inner.connections.fetch_add(1, Ordering::SeqCst) + 1;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let service = hyper::service::service_fn(move |req| handle(inner.clone(), id, req));
    let io = TokioIo::new(tls);
    let res = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .serve_connection(io, service)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await
    };
    if let Err(e) = res {
        tracing::debug!("mock FCM: connection {id} ended: {e}");
    }
}

/// What the record shows of an answer.
#[derive(Default)]
struct Meta {
    /// Canonical status (or OAuth `error`), FcmError code, message (or `error_description`), message name.
    error_status: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
    name: Option<String>,
}

/// An answer: status, headers, body.
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    content_type: &'static str,
    body: String,
    /// For the record: canonical status, FcmError code, message, name.
    meta: Box<Meta>,
}

impl Answer {
    /// A JSON answer, pretty-printed as Google's front end prints it.
    fn json(status: u16, v: &Value) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            content_type: "application/json; charset=UTF-8",
            body: serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
            meta: Box::default(),
        }
    }

    /// Google's error shape: `{"error":{"code","message","status","details"?}}`.
    fn google_error(status: u16, canonical: &str, message: &str, details: Vec<Value>) -> Answer {
        let error_code = details
            .iter()
            .find(|d| d["@type"] == FCM_ERROR_TYPE)
            .and_then(|d| d["errorCode"].as_str())
            .map(str::to_string);
        let mut error = json!({ "code": status, "message": message, "status": canonical });
        if !details.is_empty() {
            error["details"] = Value::Array(details);
        }
        let mut a = Answer::json(status, &json!({ "error": error }));
        a.meta.error_status = Some(canonical.to_string());
        a.meta.error_code = error_code;
        a.meta.error_message = Some(message.to_string());
        a
    }

    /// 400 INVALID_ARGUMENT with a BadRequest field violation (and an FcmError if `fcm_error`).
    fn invalid_argument(message: &str, field: &str, description: &str, fcm_error: bool) -> Answer {
        let mut details = vec![json!({
            "@type": BAD_REQUEST_TYPE,
            "fieldViolations": [{ "field": field, "description": description }],
        })];
        if fcm_error {
            details.push(fcm_error_detail("INVALID_ARGUMENT"));
        }
        Answer::google_error(400, "INVALID_ARGUMENT", message, details)
    }

    /// A JSON-parse style error Google gives before FCM looks at the message (no FcmError).
    fn bad_json(field: &str, message: String) -> Answer {
        Answer::invalid_argument(&message, field, &message, false)
    }

    fn oauth_error(error: &str, description: &str) -> Answer {
        let mut a = Answer::json(
            400,
            &json!({ "error": error, "error_description": description }),
        );
        a.meta.error_status = Some(error.to_string());
        a.meta.error_message = Some(description.to_string());
        a
    }

    fn html(status: u16, body: &str) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            content_type: "text/html; charset=UTF-8",
            body: body.to_string(),
            meta: Box::default(),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = Response::new(Full::new(Bytes::from(self.body)));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                r.headers_mut().append(name, v);
            }
        }
        r
    }
}

fn fcm_error_detail(code: &str) -> Value {
    json!({ "@type": FCM_ERROR_TYPE, "errorCode": code })
}

async fn handle(
    inner: Arc<Inner>,
    connection: usize,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let (body, too_big) = match Limited::new(body, MAX_BODY_READ).collect().await {
        Ok(c) => (c.to_bytes(), false),
        Err(_) => (Bytes::new(), true),
    };
    let path = parts.uri.path().to_string();
    if path == "/token" {
        inner.token_requests.fetch_add(1, Ordering::SeqCst);
        let (answer, mut record) = token_endpoint(&inner, &parts.method, &body);
        record.connection = connection;
        record.status = answer.status;
        record.error = answer.meta.error_status.clone();
        record.error_description = answer.meta.error_message.clone();
        if inner.events.receiver_count() > 0 {
            let _ = inner.events.send(FcmEvent::Token(Box::new(record.clone())));
        }
        inner.state().token_requests.push(record);
        return Ok(answer.into_response());
    }
    let Some(project) = path
        .strip_prefix("/v1/projects/")
        .and_then(|rest| rest.strip_suffix("/messages:send"))
        .filter(|p| !p.is_empty() && !p.contains('/'))
    else {
        return Ok(Answer::html(404, &not_found_html(&path)).into_response());
    };

    let mut record = FcmRequest {
        token: None,
        project: project.to_string(),
        path: path.clone(),
        method: parts.method.to_string(),
        version: format!("{:?}", parts.version),
        authority: parts.uri.authority().map(|a| a.to_string()),
        priority: None,
        collapse_key: None,
        ttl: None,
        data: BTreeMap::new(),
        android_data: None,
        validate_only: false,
        access_token: parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .map(str::to_string),
        body: String::from_utf8_lossy(&body).into_owned(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        status: 0,
        error_status: None,
        error_code: None,
        error_message: None,
        name: None,
        connection,
    };
    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
        fill_record(&mut record, &v);
    }

    let answer = match check_send(&inner, &parts, project, &record, &body, too_big) {
        Err(answer) => answer,
        Ok(token) => {
            let (delay, answer) = {
                let mut st = inner.state();
                let State {
                    behaviours,
                    default_behaviour,
                    seen,
                    ..
                } = &mut *st;
                let behaviour = behaviours.get(&token).unwrap_or(default_behaviour);
                let count = if behaviour.uses_count() {
                    let n = seen.entry(token.clone()).or_insert(0);
                    let count = *n;
                    *n = n.saturating_add(1);
                    count
                } else {
                    0
                };
                let (delay, b) = behaviour.resolve(count);
                (delay, behaviour_answer(b, project, record.validate_only))
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            answer
        }
    };
    record.status = answer.status;
    record.error_status = answer.meta.error_status.clone();
    record.error_code = answer.meta.error_code.clone();
    record.error_message = answer.meta.error_message.clone();
    record.name = answer.meta.name.clone();
    if inner.events.receiver_count() > 0 {
        let _ = inner.events.send(FcmEvent::Send(Box::new(record.clone())));
    }
    inner.state().requests.push(record);
    inner.notify.notify_waiters();
    Ok(answer.into_response())
}

fn not_found_html(path: &str) -> String {
    format!("<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error 404 (Not Found)!!1</title>\n  <p><b>404.</b> <ins>That\u{2019}s an error.</ins>\n  <p>The requested URL <code>{path}</code> was not found on this server.  <ins>That\u{2019}s all we know.</ins>\n")
}

/// What a send answers under a behaviour (after every check passed).
fn behaviour_answer(b: &Behaviour, project: &str, validate_only: bool) -> Answer {
    match b {
        Behaviour::Ok | Behaviour::Delay(..) | Behaviour::FailTimes(..) => {
            let name = if validate_only {
                format!("projects/{project}/messages/fake_message_id")
            } else {
                let mut rng = rand::thread_rng();
                let micros = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_micros())
                    .unwrap_or(0);
                let tag = hex::encode(rng.gen::<[u8; 4]>());
                format!("projects/{project}/messages/0:{micros}%{tag}{tag}")
            };
            let mut a = Answer::json(200, &json!({ "name": name }));
            a.meta.name = Some(name);
            a
        }
        Behaviour::Unregistered => Answer::google_error(
            404,
            "NOT_FOUND",
            "Requested entity was not found.",
            vec![fcm_error_detail("UNREGISTERED")],
        ),
        Behaviour::SenderIdMismatch => Answer::google_error(
            403,
            "PERMISSION_DENIED",
            "SenderId mismatch",
            vec![fcm_error_detail("SENDER_ID_MISMATCH")],
        ),
        Behaviour::InvalidToken => {
            let mut details = vec![fcm_error_detail("INVALID_ARGUMENT")];
            details.push(json!({
                "@type": BAD_REQUEST_TYPE,
                "fieldViolations": [{ "field": "message.token", "description": "Invalid registration token" }],
            }));
            Answer::google_error(400, "INVALID_ARGUMENT", INVALID_ARGUMENT_MESSAGE, details)
        }
        Behaviour::QuotaExceeded(secs) => {
            let mut a = Answer::google_error(
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for sending messages to this device.",
                vec![
                    fcm_error_detail("QUOTA_EXCEEDED"),
                    json!({
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [{ "subject": "device", "description": "Device message rate exceeded." }],
                    }),
                ],
            );
            a.headers.push(("retry-after", secs.to_string()));
            a
        }
        Behaviour::Unavailable => Answer::google_error(
            503,
            "UNAVAILABLE",
            "The service is currently unavailable.",
            vec![fcm_error_detail("UNAVAILABLE")],
        ),
        Behaviour::Internal => Answer::google_error(
            500,
            "INTERNAL",
            "Internal error encountered.",
            vec![fcm_error_detail("INTERNAL")],
        ),
        Behaviour::BadGateway => Answer::html(502, BAD_GATEWAY_HTML),
    }
}

/// `Bearer <token>` (scheme case-insensitive) → the token.
fn bearer_token(auth: &str) -> Option<&str> {
    let (scheme, token) = auth.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Fills what the record shows from the body, however wrong it is.
fn fill_record(r: &mut FcmRequest, v: &Value) {
    let m = &v["message"];
    r.validate_only = v
        .get("validate_only")
        .or_else(|| v.get("validateOnly"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    r.token = m["token"].as_str().map(str::to_string);
    let map = |d: &Value| {
        d.as_object().map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), value_text(v)))
                .collect::<BTreeMap<_, _>>()
        })
    };
    r.data = map(&m["data"]).unwrap_or_default();
    let a = &m["android"];
    r.android_data = map(&a["data"]);
    r.priority = a.get("priority").map(value_text);
    r.collapse_key = a
        .get("collapse_key")
        .or_else(|| a.get("collapseKey"))
        .map(value_text);
    r.ttl = a.get("ttl").map(value_text);
}

/// Auth, project and body checks, in Google's order. `Ok` holds the registration token.
fn check_send(
    inner: &Inner,
    parts: &hyper::http::request::Parts,
    project: &str,
    record: &FcmRequest,
    body: &[u8],
    too_big: bool,
) -> Result<String, Answer> {
    if parts.method != Method::POST {
        return Err(Answer::html(405, &not_found_html(parts.uri.path())));
    }
    let www_auth = |mut a: Answer| {
        a.headers.push((
            "www-authenticate",
            "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"".to_string(),
        ));
        a
    };
    let Some(access_token) = &record.access_token else {
        return Err(www_auth(Answer::google_error(
            401,
            "UNAUTHENTICATED",
            MISSING_CREDENTIALS_MESSAGE,
            Vec::new(),
        )));
    };
    let scopes = {
        let st = inner.state();
        match st.issued.get(access_token) {
            Some(issued) if issued.expires > SystemTime::now() => issued.scopes.clone(),
            _ => {
                return Err(www_auth(Answer::google_error(
                    401,
                    "UNAUTHENTICATED",
                    UNAUTHENTICATED_MESSAGE,
                    Vec::new(),
                )))
            }
        }
    };
    if !scopes
        .iter()
        .any(|s| s == FCM_SCOPE || s == CLOUD_PLATFORM_SCOPE)
    {
        return Err(Answer::google_error(
            403,
            "PERMISSION_DENIED",
            "Request had insufficient authentication scopes.",
            vec![json!({
                "@type": ERROR_INFO_TYPE,
                "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                "domain": "googleapis.com",
                "metadata": {
                    "service": "fcm.googleapis.com",
                    "method": "google.firebase.fcm.v1.FcmService.SendMessage",
                },
            })],
        ));
    }
    if project != inner.config.project_id {
        return Err(Answer::google_error(
            403,
            "PERMISSION_DENIED",
            &format!("Permission 'cloudmessaging.messages.create' denied on resource '//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist)."),
            vec![json!({
                "@type": ERROR_INFO_TYPE,
                "reason": "IAM_PERMISSION_DENIED",
                "domain": "cloudresourcemanager.googleapis.com",
                "metadata": {
                    "permission": "cloudmessaging.messages.create",
                    "resource": format!("projects/{project}"),
                },
            })],
        ));
    }
    if too_big {
        return Err(Answer::google_error(
            413,
            "INVALID_ARGUMENT",
            "Request payload size exceeds the limit: 1048576 bytes.",
            Vec::new(),
        ));
    }
    validate_body(body)
}

/// A JSON object's members in the order they were written (serde_json's map is sorted).
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The data maps of a body, members in their written order.
#[derive(Deserialize)]
struct DataMaps {
    message: Option<DataMapsMessage>,
}

#[derive(Deserialize)]
struct DataMapsMessage {
    data: Option<Ordered>,
    android: Option<DataMapsAndroid>,
}

#[derive(Deserialize)]
struct DataMapsAndroid {
    data: Option<Ordered>,
}

const TOP_FIELDS: &[&str] = &["validate_only", "validateOnly", "message"];
const MESSAGE_FIELDS: &[&str] = &[
    "name",
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
    "fcmOptions",
    "token",
    "topic",
    "condition",
];
const ANDROID_FIELDS: &[&str] = &[
    "collapse_key",
    "collapseKey",
    "priority",
    "ttl",
    "restricted_package_name",
    "restrictedPackageName",
    "data",
    "notification",
    "fcm_options",
    "fcmOptions",
    "direct_boot_ok",
    "directBootOk",
    "bandwidth_constrained_ok",
    "bandwidthConstrainedOk",
    "restricted_satellite_ok",
    "restrictedSatelliteOk",
];

/// `Invalid JSON payload received. Unknown name "x" at 'path': Cannot find field.`
fn unknown_names(obj: &serde_json::Map<String, Value>, known: &[&str], at: &str) -> Option<Answer> {
    let name = obj.keys().find(|k| !known.contains(&k.as_str()))?;
    let place = if at.is_empty() {
        String::new()
    } else {
        format!(" at '{at}'")
    };
    Some(Answer::bad_json(
        at,
        format!(
            "Invalid JSON payload received. Unknown name \"{name}\"{place}: Cannot find field."
        ),
    ))
}

/// `Invalid value at 'path' (TYPE), value`.
fn invalid_value(field: &str, ty: &str, v: &Value) -> Answer {
    Answer::bad_json(field, format!("Invalid value at '{field}' ({ty}), {v}"))
}

/// The body checks Google makes: JSON shape, names and types, then FCM's own rules. `Ok` holds the token.
fn validate_body(body: &[u8]) -> Result<String, Answer> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        Answer::bad_json(
            "",
            format!("Invalid JSON payload received. Unexpected token.\n{e}"),
        )
    })?;
    let Some(top) = v.as_object() else {
        return Err(Answer::bad_json(
            "",
            format!("Invalid JSON payload received. Expected an object.\n{v}"),
        ));
    };
    if let Some(a) = unknown_names(top, TOP_FIELDS, "") {
        return Err(a);
    }
    for name in ["validate_only", "validateOnly"] {
        if let Some(x) = top.get(name).filter(|x| !x.is_boolean()) {
            return Err(invalid_value(name, "TYPE_BOOL", x));
        }
    }
    let empty = serde_json::Map::new();
    let message = match top.get("message") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(invalid_value(
                "message",
                "type.googleapis.com/google.firebase.fcm.v1.Message",
                other,
            ))
        }
    };
    if let Some(a) = unknown_names(message, MESSAGE_FIELDS, "message") {
        return Err(a);
    }
    for field in ["token", "topic", "condition", "name"] {
        if let Some(x) = message
            .get(field)
            .filter(|x| !x.is_string() && !x.is_null())
        {
            return Err(invalid_value(&format!("message.{field}"), "TYPE_STRING", x));
        }
    }
    let targets: Vec<&str> = ["token", "topic", "condition"]
        .into_iter()
        .filter(|f| {
            message
                .get(*f)
                .and_then(Value::as_str)
                .is_some_and(|x| !x.is_empty())
        })
        .collect();
    if let [_, second, ..] = targets.as_slice() {
        return Err(Answer::bad_json(
            "message",
            format!("Invalid value at 'message' (oneof), oneof field 'target' is already set. Cannot set '{second}'"),
        ));
    }

    // Data maps, their members in written order (Google names the index of a bad value).
    let maps: Option<DataMaps> = serde_json::from_slice(body).ok();
    let (data, android_data) = match maps.and_then(|m| m.message) {
        Some(m) => (m.data, m.android.and_then(|a| a.data)),
        None => (None, None),
    };
    if let Some(x) = message
        .get("data")
        .filter(|x| !x.is_object() && !x.is_null())
    {
        return Err(invalid_value("message.data", "TYPE_MAP", x));
    }
    check_data_types(data.as_ref(), "message.data")?;

    let android = match message.get("android") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(a)) => a,
        Some(other) => {
            return Err(invalid_value(
                "message.android",
                "type.googleapis.com/google.firebase.fcm.v1.AndroidConfig",
                other,
            ))
        }
    };
    if let Some(a) = unknown_names(android, ANDROID_FIELDS, "message.android") {
        return Err(a);
    }
    if let Some(x) = android
        .get("data")
        .filter(|x| !x.is_object() && !x.is_null())
    {
        return Err(invalid_value("message.android.data", "TYPE_MAP", x));
    }
    check_data_types(android_data.as_ref(), "message.android.data")?;
    for field in [
        "collapse_key",
        "collapseKey",
        "restricted_package_name",
        "restrictedPackageName",
    ] {
        if let Some(x) = android
            .get(field)
            .filter(|x| !x.is_string() && !x.is_null())
        {
            return Err(invalid_value(
                &format!("message.android.{field}"),
                "TYPE_STRING",
                x,
            ));
        }
    }
    match android.get("priority") {
        None | Some(Value::Null) => {}
        Some(p) => {
            let ok = match p {
                Value::String(s) => ["normal", "high"].contains(&s.to_ascii_lowercase().as_str()),
                Value::Number(n) => matches!(n.as_u64(), Some(0..=1)),
                _ => false,
            };
            if !ok {
                return Err(invalid_value(
                    "message.android.priority",
                    "type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority",
                    p,
                ));
            }
        }
    }
    match android.get("ttl") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => match parse_duration(s) {
            Err(why) => {
                return Err(Answer::bad_json(
                    "message.android.ttl",
                    format!("Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration), Field 'ttl', {why}"),
                ))
            }
            Ok(secs) if !(0..=MAX_TTL_SECS as i64).contains(&secs) => {
                return Err(Answer::invalid_argument(
                    INVALID_ARGUMENT_MESSAGE,
                    "message.android.ttl",
                    "Invalid TTL: the ttl must be between 0 and 2419200 seconds (4 weeks).",
                    true,
                ))
            }
            Ok(_) => {}
        },
        Some(other) => {
            return Err(invalid_value(
                "message.android.ttl",
                "type.googleapis.com/google.protobuf.Duration",
                other,
            ))
        }
    }

    // FCM's own rules, once the JSON maps onto the proto.
    let token = match message.get("token").and_then(Value::as_str) {
        Some(t) if !t.is_empty() => t.to_string(),
        _ if !targets.is_empty() => {
            // A topic or condition: the mock knows no topics; answer as for a token it does not know.
            return Err(Answer::invalid_argument(
                INVALID_ARGUMENT_MESSAGE,
                "message.topic",
                "The mock FCM sends to registration tokens only",
                true,
            ));
        }
        _ => {
            let msg = "Recipient of the message is not set.";
            return Err(Answer::invalid_argument(msg, "message", msg, true));
        }
    };
    for (map, field) in [
        (data.as_ref(), "message.data"),
        (android_data.as_ref(), "message.android.data"),
    ] {
        let Some(map) = map else { continue };
        if let Some((key, _)) = map
            .0
            .iter()
            .find(|(k, _)| k == "from" || k == "gcm" || k.starts_with("google"))
        {
            return Err(Answer::invalid_argument(
                INVALID_ARGUMENT_MESSAGE,
                field,
                &format!("Invalid data key: {key:?} is reserved (from, gcm, or anything starting with google)"),
                true,
            ));
        }
        let size: usize = map
            .0
            .iter()
            .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
            .sum();
        if size > MAX_DATA_BYTES {
            // Google gives no detail for this one.
            return Err(Answer::google_error(
                400,
                "INVALID_ARGUMENT",
                INVALID_ARGUMENT_MESSAGE,
                Vec::new(),
            ));
        }
    }
    Ok(token)
}

/// Data values must be strings: `Invalid value at 'message.data[0].value' (TYPE_STRING), 12`.
fn check_data_types(map: Option<&Ordered>, field: &str) -> Result<(), Answer> {
    let Some(map) = map else { return Ok(()) };
    match map.0.iter().position(|(_, v)| !v.is_string()) {
        Some(i) => Err(invalid_value(
            &format!("{field}[{i}].value"),
            "TYPE_STRING",
            &map.0[i].1,
        )),
        None => Ok(()),
    }
}

/// A `google.protobuf.Duration` in JSON: `<seconds>[.<up to 9 digits>]s`, possibly negative; whole seconds
/// (rounded down, as FCM does).
fn parse_duration(s: &str) -> Result<i64, &'static str> {
    let Some(num) = s.strip_suffix('s') else {
        return Err("Illegal duration format; duration must end with 's'");
    };
    let (neg, num) = match num.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, num),
    };
    let (whole, frac) = match num.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (num, None),
    };
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || frac.is_some_and(|f| !digits(f) || f.len() > 9) {
        return Err(
            "Illegal duration format; duration must be a number of seconds followed by 's'",
        );
    }
    let secs: i64 = whole
        .parse()
        .map_err(|_| "Illegal duration format; seconds out of range")?;
    let frac_nonzero = frac.is_some_and(|f| f.bytes().any(|b| b != b'0'));
    Ok(if neg {
        -secs - i64::from(frac_nonzero)
    } else {
        secs
    })
}

/// Decodes `application/x-www-form-urlencoded`.
fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

/// The token endpoint: the answer, and the record (status filled in by the caller).
fn token_endpoint(inner: &Inner, method: &Method, body: &[u8]) -> (Answer, TokenRequest) {
    let mut record = TokenRequest {
        status: 0,
        error: None,
        error_description: None,
        iss: None,
        kid: None,
        scope: None,
        aud: None,
        access_token: None,
        body: String::from_utf8_lossy(body).into_owned(),
        connection: 0,
    };
    if method != Method::POST {
        let mut a = Answer::html(
            405,
            "<!DOCTYPE html>\n<title>Error 405 (Method Not Allowed)!!1</title>\n",
        );
        a.meta.error_status = Some("method_not_allowed".into());
        return (a, record);
    }
    let form = parse_form(body);
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    match field("grant_type") {
        Some(JWT_BEARER_GRANT) => {}
        Some(other) => {
            return (
                Answer::oauth_error(
                    "unsupported_grant_type",
                    &format!("Invalid grant_type: {other}"),
                ),
                record,
            )
        }
        None => {
            return (
                Answer::oauth_error("unsupported_grant_type", "Invalid grant_type: "),
                record,
            )
        }
    }
    let Some(assertion) = field("assertion").filter(|a| !a.is_empty()) else {
        return (
            Answer::oauth_error("invalid_request", "Missing required parameter: assertion"),
            record,
        );
    };
    let answer = match grant(inner, assertion, &mut record) {
        Ok(answer) => answer,
        Err((error, description)) => Answer::oauth_error(error, &description),
    };
    (answer, record)
}

/// Checks an assertion and issues an access token.
fn grant(
    inner: &Inner,
    assertion: &str,
    record: &mut TokenRequest,
) -> Result<Answer, (&'static str, String)> {
    let invalid_grant = |d: &str| ("invalid_grant", d.to_string());
    let segments: Vec<&str> = assertion.split('.').collect();
    if segments.len() != 3 {
        return Err(invalid_grant(INVALID_SIGNATURE));
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let part = |s: &str| -> Option<Value> { serde_json::from_slice(&b64.decode(s).ok()?).ok() };
    let (Some(header), Some(claims)) = (part(segments[0]), part(segments[1])) else {
        return Err(invalid_grant(INVALID_SIGNATURE));
    };
    let text = |v: &Value| v.as_str().map(str::to_string);
    record.kid = text(&header["kid"]);
    record.iss = text(&claims["iss"]);
    record.scope = text(&claims["scope"]);
    record.aud = text(&claims["aud"]);

    let failure = inner.state().token_failure.clone();
    if let Some(description) = failure {
        return Err(invalid_grant(&description));
    }
    let iss = record.iss.clone().unwrap_or_default();
    {
        let st = inner.state();
        let Some(account) = st.accounts.get(&iss) else {
            return Err(invalid_grant(ACCOUNT_NOT_FOUND));
        };
        if header["alg"] != "RS256" {
            return Err(invalid_grant(INVALID_SIGNATURE));
        }
        if record
            .kid
            .as_deref()
            .is_some_and(|kid| kid != account.private_key_id)
        {
            return Err(invalid_grant(INVALID_SIGNATURE));
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        if jsonwebtoken::decode::<Value>(assertion, &account.key, &validation).is_err() {
            return Err(invalid_grant(INVALID_SIGNATURE));
        }
    }
    let now = unix_now() as i64;
    let (Some(iat), Some(exp)) = (claims["iat"].as_i64(), claims["exp"].as_i64()) else {
        return Err(invalid_grant(INVALID_TIMEFRAME));
    };
    if exp - iat > MAX_ASSERTION_LIFETIME
        || exp <= iat
        || iat > now + ASSERTION_SKEW
        || exp < now - ASSERTION_SKEW
    {
        return Err(invalid_grant(INVALID_TIMEFRAME));
    }
    let aud = record.aud.clone().unwrap_or_default();
    if !inner.audiences.contains(&aud) {
        return Err(invalid_grant(&format!(
            "Invalid JWT: Failed audience check. The right audience is {}",
            inner.token_uri
        )));
    }
    let scopes: Vec<String> = record
        .scope
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if scopes.is_empty() {
        return Err((
            "invalid_scope",
            "Invalid oauth scope or ID token audience provided.".to_string(),
        ));
    }
    let access_token = format!("ya29.c.{}", random_chars(180));
    let lifetime = inner.config.access_token_lifetime;
    inner.state().issued.insert(
        access_token.clone(),
        Issued {
            expires: SystemTime::now() + lifetime,
            scopes,
        },
    );
    record.access_token = Some(access_token.clone());
    Ok(Answer::json(
        200,
        &json!({
            "access_token": access_token,
            "expires_in": lifetime.as_secs(),
            "token_type": "Bearer",
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use rustls::RootCertStore;
    use tokio_rustls::TlsConnector;

    const PROJECT: &str = "knock-test-1234";
    const TOKEN: &str = "eeDXSJjASJY:APA91bEKxhXK54-test-registration-token-0123456789";

    /// One client connection, HTTP/2 or HTTP/1.1 by ALPN.
    enum Client {
        H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
        H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    }

    struct Reply {
        status: u16,
        content_type: Option<String>,
        retry_after: Option<String>,
        body: String,
    }

    impl Reply {
        fn json(&self) -> Value {
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
        }

        /// `error.status`, and the FcmError `errorCode` if any.
        fn error(&self) -> (String, Option<String>) {
            let v = self.json();
            let code = v["error"]["details"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|d| d["@type"] == FCM_ERROR_TYPE)
                .and_then(|d| d["errorCode"].as_str())
                .map(str::to_string);
            (v["error"]["status"].as_str().unwrap().to_string(), code)
        }
    }

    async fn connect(mock: &MockFcm, alpn: &[u8]) -> Client {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(mock.ca_pem().as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(mock.addr()).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        let io = TokioIo::new(tls);
        if alpn == b"h2" {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Client::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Client::H1(send)
        }
    }

    impl Client {
        async fn send(&mut self, req: Request<Full<Bytes>>) -> Reply {
            let resp = match self {
                Client::H2(c) => {
                    c.ready().await.unwrap();
                    c.send_request(req).await.unwrap()
                }
                Client::H1(c) => {
                    c.ready().await.unwrap();
                    c.send_request(req).await.unwrap()
                }
            };
            let header = |n: &str| {
                resp.headers()
                    .get(n)
                    .map(|v| v.to_str().unwrap().to_string())
            };
            let content_type = header("content-type");
            let retry_after = header("retry-after");
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            Reply {
                status,
                content_type,
                retry_after,
                body: String::from_utf8(body.to_vec()).unwrap(),
            }
        }

        /// Posts a form to `/token`.
        async fn token_form(&mut self, mock: &MockFcm, form: String) -> Reply {
            let req = Request::post(mock.token_uri())
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(form)))
                .unwrap();
            self.send(req).await
        }

        async fn grant(&mut self, mock: &MockFcm, assertion: &str) -> Reply {
            self.token_form(mock, ServiceAccount::token_request_body(assertion))
                .await
        }

        /// A fresh access token for the mock's own account.
        async fn access_token(&mut self, mock: &MockFcm) -> String {
            let r = self
                .grant(mock, &mock.service_account().assertion(unix_now()))
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["access_token"].as_str().unwrap().to_string()
        }

        async fn post_send(&mut self, url: &str, access_token: Option<&str>, body: &str) -> Reply {
            let mut b = Request::post(url).header("content-type", "application/json; UTF-8");
            if let Some(t) = access_token {
                b = b.header("authorization", format!("Bearer {t}"));
            }
            self.send(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
                .await
        }
    }

    fn message(token: &str) -> String {
        json!({"message": {
            "token": token,
            "data": {"account": "532e27275c60cde28baeaa88e6815a366c8996de"},
            "android": {"priority": "HIGH", "collapse_key": "knock", "ttl": "2419200s"},
        }})
        .to_string()
    }

    async fn fixture() -> (MockFcm, Client, String) {
        let mock = MockFcm::start(MockFcmConfig::new(PROJECT)).await.unwrap();
        let mut c = connect(&mock, b"h2").await;
        let at = c.access_token(&mock).await;
        (mock, c, at)
    }

    #[tokio::test]
    async fn grant_and_send_are_answered_and_recorded() {
        let (mock, mut c, at) = fixture().await;
        let grants = mock.token_grants();
        assert_eq!(grants.len(), 1);
        assert_eq!(mock.token_requests(), 1);
        let sa = mock.service_account();
        assert_eq!(grants[0].iss.as_deref(), Some(sa.client_email.as_str()));
        assert_eq!(grants[0].kid.as_deref(), Some(sa.private_key_id.as_str()));
        assert_eq!(grants[0].access_token.as_deref(), Some(at.as_str()));

        let r = c
            .post_send(&mock.send_url(), Some(&at), &message(TOKEN))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/json; charset=UTF-8")
        );
        let name = r.json()["name"].as_str().unwrap().to_string();
        assert!(
            name.starts_with(&format!("projects/{PROJECT}/messages/0:")),
            "{name}"
        );

        let reqs = mock.wait_for_requests(1, Duration::from_secs(5)).await;
        let req = &reqs[0];
        assert_eq!(req.token.as_deref(), Some(TOKEN));
        assert_eq!(req.priority.as_deref(), Some("HIGH"));
        assert_eq!(req.collapse_key.as_deref(), Some("knock"));
        assert_eq!(req.ttl.as_deref(), Some("2419200s"));
        assert_eq!(
            req.data["account"],
            "532e27275c60cde28baeaa88e6815a366c8996de"
        );
        assert_eq!(req.access_token.as_deref(), Some(at.as_str()));
        assert_eq!(
            (req.status, req.name.as_deref()),
            (200, Some(name.as_str()))
        );
        assert_eq!(req.version, "HTTP/2.0");
        assert_eq!(mock.requests_for(TOKEN).len(), 1);
        assert!(mock.requests_for("other").is_empty());

        // validate_only: Google's dry-run name.
        let dry = json!({"validate_only": true, "message": {"token": TOKEN}}).to_string();
        let r = c.post_send(&mock.send_url(), Some(&at), &dry).await;
        assert_eq!(
            r.json()["name"],
            format!("projects/{PROJECT}/messages/fake_message_id")
        );
        mock.clear_requests();
        assert!(mock.requests().is_empty() && mock.token_grants().is_empty());
        mock.shutdown().await;
    }

    #[tokio::test]
    async fn http1_is_served_too() {
        let mock = MockFcm::start(MockFcmConfig::new(PROJECT)).await.unwrap();
        let mut c = connect(&mock, b"http/1.1").await;
        let at = c.access_token(&mock).await;
        let r = c
            .post_send(&mock.send_url(), Some(&at), &message(TOKEN))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(mock.requests()[0].version, "HTTP/1.1");
    }

    #[tokio::test]
    async fn token_endpoint_checks_the_assertion() {
        let mock = MockFcm::start(MockFcmConfig::new(PROJECT)).await.unwrap();
        let mut c = connect(&mock, b"h2").await;
        let sa = mock.service_account().clone();
        let now = unix_now();
        let claims = |f: &dyn Fn(&mut Value)| {
            let mut v = json!({"iss": sa.client_email, "scope": FCM_SCOPE, "aud": sa.token_uri,
                "iat": now, "exp": now + 3600});
            f(&mut v);
            v
        };
        let expect = |r: &Reply, error: &str, description: &str| {
            assert_eq!(r.status, 400, "{}", r.body);
            assert_eq!(r.json()["error"], error, "{}", r.body);
            assert_eq!(r.json()["error_description"], description, "{}", r.body);
        };

        // Good, and the answer's shape.
        let r = c.grant(&mock, &sa.assertion(now)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["expires_in"], 3599);
        assert_eq!(v["token_type"], "Bearer");
        assert!(v["access_token"].as_str().unwrap().starts_with("ya29."));
        // The cloud-platform scope, several scopes, and a little clock skew are fine.
        let both = format!("{CLOUD_PLATFORM_SCOPE} {FCM_SCOPE}");
        let skewed = sa.sign_claims(&claims(&|v| {
            v["scope"] = json!(both);
            v["iat"] = json!(now + 30);
            v["exp"] = json!(now + 30 + 3600);
        }));
        assert_eq!(c.grant(&mock, &skewed).await.status, 200);

        // A tampered signature.
        let good = sa.assertion(now);
        let (head, sig) = good.rsplit_once('.').unwrap();
        let mut sig = sig.as_bytes().to_vec();
        sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
        let tampered = format!("{head}.{}", String::from_utf8(sig).unwrap());
        expect(
            &c.grant(&mock, &tampered).await,
            "invalid_grant",
            INVALID_SIGNATURE,
        );
        // Another key (same email): as after the key was rotated or deleted.
        let other = ServiceAccount::generate_with_new_key(PROJECT, &sa.token_uri);
        let mut impostor = other.clone();
        impostor.client_email = sa.client_email.clone();
        impostor.private_key_id = sa.private_key_id.clone();
        expect(
            &c.grant(&mock, &impostor.assertion(now)).await,
            "invalid_grant",
            INVALID_SIGNATURE,
        );
        // A kid that is not the account's.
        let mut wrong_kid = sa.clone();
        wrong_kid.private_key_id = "0".repeat(40);
        expect(
            &c.grant(&mock, &wrong_kid.assertion(now)).await,
            "invalid_grant",
            INVALID_SIGNATURE,
        );
        // An account Google does not know; then registered, it works.
        expect(
            &c.grant(&mock, &other.assertion(now)).await,
            "invalid_grant",
            ACCOUNT_NOT_FOUND,
        );
        mock.add_service_account(&other).unwrap();
        assert_eq!(c.grant(&mock, &other.assertion(now)).await.status, 200);
        // Wrong audience: Google's real one, when the file says the mock.
        let google_aud = sa.sign_claims(&claims(&|v| {
            v["aud"] = json!("https://oauth2.googleapis.com/token")
        }));
        let r = c.grant(&mock, &google_aud).await;
        assert_eq!(r.json()["error"], "invalid_grant");
        assert!(r.json()["error_description"]
            .as_str()
            .unwrap()
            .starts_with("Invalid JWT: Failed audience check"));
        // localhost names the same endpoint.
        let localhost = sa.sign_claims(&claims(&|v| {
            v["aud"] = json!(format!("https://localhost:{}/token", mock.addr().port()))
        }));
        assert_eq!(c.grant(&mock, &localhost).await.status, 200);
        // Times: expired, too long, issued in the future, missing.
        for bad in [
            claims(&|v| {
                v["iat"] = json!(now - 7200);
                v["exp"] = json!(now - 3600);
            }),
            claims(&|v| v["exp"] = json!(now + 3601)),
            claims(&|v| {
                v["iat"] = json!(now + 600);
                v["exp"] = json!(now + 1200);
            }),
            claims(&|v| {
                v.as_object_mut().unwrap().remove("exp");
            }),
        ] {
            expect(
                &c.grant(&mock, &sa.sign_claims(&bad)).await,
                "invalid_grant",
                INVALID_TIMEFRAME,
            );
        }
        // No scope.
        let no_scope = sa.sign_claims(&claims(&|v| {
            v.as_object_mut().unwrap().remove("scope");
        }));
        expect(
            &c.grant(&mock, &no_scope).await,
            "invalid_scope",
            "Invalid oauth scope or ID token audience provided.",
        );
        // The form.
        expect(
            &c.token_form(&mock, "grant_type=client_credentials".into())
                .await,
            "unsupported_grant_type",
            "Invalid grant_type: client_credentials",
        );
        expect(
            &c.token_form(&mock, format!("grant_type={}", JWT_BEARER_GRANT))
                .await,
            "invalid_request",
            "Missing required parameter: assertion",
        );
        // Unencoded grant_type is the same form.
        let plain = format!(
            "grant_type={JWT_BEARER_GRANT}&assertion={}",
            sa.assertion(now)
        );
        assert_eq!(c.token_form(&mock, plain).await.status, 200);
        // The knob.
        mock.set_token_failure(Some(INVALID_SIGNATURE));
        expect(
            &c.grant(&mock, &sa.assertion(now)).await,
            "invalid_grant",
            INVALID_SIGNATURE,
        );
        mock.set_token_failure(None);
        assert_eq!(c.grant(&mock, &sa.assertion(now)).await.status, 200);
        assert_eq!(mock.token_requests(), mock.token_grants().len() as u64);
    }

    #[tokio::test]
    async fn access_tokens_are_checked_and_expire() {
        let (mock, mut c, at) = fixture().await;
        let unauthenticated = |r: &Reply, message: &str| {
            assert_eq!(r.status, 401, "{}", r.body);
            let v = r.json();
            assert_eq!(
                v,
                json!({"error": {"code": 401, "message": message, "status": "UNAUTHENTICATED"}})
            );
        };
        unauthenticated(
            &c.post_send(&mock.send_url(), None, &message(TOKEN)).await,
            MISSING_CREDENTIALS_MESSAGE,
        );
        unauthenticated(
            &c.post_send(&mock.send_url(), Some("ya29.made-up"), &message(TOKEN))
                .await,
            UNAUTHENTICATED_MESSAGE,
        );
        assert_eq!(
            c.post_send(&mock.send_url(), Some(&at), &message(TOKEN))
                .await
                .status,
            200
        );

        mock.expire_access_tokens();
        unauthenticated(
            &c.post_send(&mock.send_url(), Some(&at), &message(TOKEN))
                .await,
            UNAUTHENTICATED_MESSAGE,
        );
        let fresh = c.access_token(&mock).await;
        assert_ne!(fresh, at);
        assert_eq!(
            c.post_send(&mock.send_url(), Some(&fresh), &message(TOKEN))
                .await
                .status,
            200
        );
        let used: Vec<_> = mock
            .requests_for(TOKEN)
            .iter()
            .filter_map(|r| Some((r.status, r.access_token.clone()?)))
            .collect();
        assert_eq!(
            used,
            vec![
                (401, "ya29.made-up".to_string()),
                (200, at.clone()),
                (401, at),
                (200, fresh.clone())
            ]
        );

        // A configured lifetime is what expires_in says, and is enforced.
        let short = MockFcm::start(MockFcmConfig {
            access_token_lifetime: Duration::from_secs(1),
            ..MockFcmConfig::new(PROJECT)
        })
        .await
        .unwrap();
        let mut c2 = connect(&short, b"h2").await;
        let r = c2
            .grant(&short, &short.service_account().assertion(unix_now()))
            .await;
        assert_eq!(r.json()["expires_in"], 1);
        let at2 = r.json()["access_token"].as_str().unwrap().to_string();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            c2.post_send(&short.send_url(), Some(&at2), &message(TOKEN))
                .await
                .status,
            401
        );
    }

    #[tokio::test]
    async fn project_and_scope_are_checked() {
        let (mock, mut c, at) = fixture().await;
        let other = mock.send_url().replace(PROJECT, "someone-else");
        let r = c.post_send(&other, Some(&at), &message(TOKEN)).await;
        assert_eq!(r.status, 403);
        assert_eq!(r.error(), ("PERMISSION_DENIED".to_string(), None));
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("projects/someone-else"));

        let sa = mock.service_account();
        let now = unix_now();
        let assertion = sa.sign_claims(&json!({"iss": sa.client_email, "scope": "https://www.googleapis.com/auth/userinfo.email",
            "aud": sa.token_uri, "iat": now, "exp": now + 3600}));
        let r = c.grant(&mock, &assertion).await;
        assert_eq!(r.status, 200);
        let narrow = r.json()["access_token"].as_str().unwrap().to_string();
        let r = c
            .post_send(&mock.send_url(), Some(&narrow), &message(TOKEN))
            .await;
        assert_eq!(r.status, 403);
        assert_eq!(
            r.json()["error"]["message"],
            "Request had insufficient authentication scopes."
        );

        let r = c
            .post_send(
                &format!("{}/v1/projects/{PROJECT}/messages:sendAll", mock.url()),
                Some(&at),
                &message(TOKEN),
            )
            .await;
        assert_eq!(r.status, 404);
    }

    #[tokio::test]
    async fn behaviours_answer_as_google() {
        let (mock, mut c, at) = fixture().await;
        let cases: &[(&str, u16, &str, Option<&str>)] = &[
            ("unregistered", 404, "NOT_FOUND", Some("UNREGISTERED")),
            (
                "sender-id-mismatch",
                403,
                "PERMISSION_DENIED",
                Some("SENDER_ID_MISMATCH"),
            ),
            (
                "invalid-token",
                400,
                "INVALID_ARGUMENT",
                Some("INVALID_ARGUMENT"),
            ),
            (
                "quota-exceeded:42",
                429,
                "RESOURCE_EXHAUSTED",
                Some("QUOTA_EXCEEDED"),
            ),
            ("unavailable", 503, "UNAVAILABLE", Some("UNAVAILABLE")),
            ("internal", 500, "INTERNAL", Some("INTERNAL")),
        ];
        for (name, status, canonical, code) in cases {
            let token = format!("token-{name}");
            mock.set_behaviour(&token, name.parse().unwrap());
            let r = c
                .post_send(&mock.send_url(), Some(&at), &message(&token))
                .await;
            assert_eq!(r.status, *status, "{name}: {}", r.body);
            assert_eq!(
                r.error(),
                (canonical.to_string(), code.map(str::to_string)),
                "{name}"
            );
            assert_eq!(r.json()["error"]["code"], *status);
            let rec = &mock.requests_for(&token)[0];
            assert_eq!((rec.status, rec.error_code.as_deref()), (*status, *code));
        }
        let unregistered = c
            .post_send(&mock.send_url(), Some(&at), &message("token-unregistered"))
            .await;
        assert_eq!(
            unregistered.json()["error"]["message"],
            "Requested entity was not found."
        );
        let invalid = c
            .post_send(&mock.send_url(), Some(&at), &message("token-invalid-token"))
            .await;
        let details = invalid.json()["error"]["details"].clone();
        assert!(
            details
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["@type"] == BAD_REQUEST_TYPE
                    && d["fieldViolations"][0]["field"] == "message.token"),
            "{details}"
        );
        let quota = c
            .post_send(
                &mock.send_url(),
                Some(&at),
                &message("token-quota-exceeded:42"),
            )
            .await;
        assert_eq!(quota.retry_after.as_deref(), Some("42"));

        mock.set_behaviour("gw", Behaviour::BadGateway);
        let r = c
            .post_send(&mock.send_url(), Some(&at), &message("gw"))
            .await;
        assert_eq!(r.status, 502);
        assert!(r.content_type.unwrap().starts_with("text/html"));
        assert!(r
            .body
            .contains("<title>Error 502 (Server Error)!!1</title>"));
        assert!(serde_json::from_str::<Value>(&r.body).is_err());

        // fail-times, then ok; the default behaviour.
        mock.set_behaviour("ft", "fail-times:2:unavailable".parse().unwrap());
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(
                c.post_send(&mock.send_url(), Some(&at), &message("ft"))
                    .await
                    .status,
            );
        }
        assert_eq!(statuses, [503, 503, 200]);
        mock.set_default_behaviour(Behaviour::QuotaExceeded(DEFAULT_RETRY_AFTER_SECS));
        let r = c
            .post_send(&mock.send_url(), Some(&at), &message("anyone"))
            .await;
        assert_eq!((r.status, r.retry_after.as_deref()), (429, Some("10")));
        mock.set_default_behaviour(Behaviour::Ok);

        // delay holds only its own stream.
        mock.set_behaviour("slow", "delay:400:ok".parse().unwrap());
        let Client::H2(send) = &c else { unreachable!() };
        let mut c2 = Client::H2(send.clone());
        let url = mock.send_url();
        let slow_body = message("slow");
        let started = std::time::Instant::now();
        let slow = c2.post_send(&url, Some(&at), &slow_body);
        let fast = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let r = c.post_send(&url, Some(&at), &message("fast")).await;
            (r.status, started.elapsed())
        };
        let (slow, (fast_status, fast_at)) = tokio::join!(slow, fast);
        assert_eq!((slow.status, fast_status), (200, 200));
        assert!(fast_at < Duration::from_millis(350), "{fast_at:?}");
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    #[tokio::test]
    async fn bodies_are_validated_as_google_does() {
        let (mock, mut c, at) = fixture().await;
        let url = mock.send_url();
        // (body, expected message prefix, expected FcmError code)
        let bad: Vec<(Value, &str, Option<&str>)> = vec![
            (json!({"message": {"token": TOKEN, "data": {"a": "x", "n": 12}}}),
                "Invalid value at 'message.data[1].value' (TYPE_STRING), 12", None),
            (json!({"message": {"token": TOKEN, "data": {"from": "x"}}}), INVALID_ARGUMENT_MESSAGE, Some("INVALID_ARGUMENT")),
            (json!({"message": {"token": TOKEN, "data": {"google.c.a": "x"}}}), INVALID_ARGUMENT_MESSAGE, Some("INVALID_ARGUMENT")),
            (json!({"message": {"token": TOKEN, "android": {"ttl": "60"}}}),
                "Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration)", None),
            (json!({"message": {"token": TOKEN, "android": {"ttl": 60}}}),
                "Invalid value at 'message.android.ttl'", None),
            (json!({"message": {"token": TOKEN, "android": {"ttl": "2419201s"}}}), INVALID_ARGUMENT_MESSAGE, Some("INVALID_ARGUMENT")),
            (json!({"message": {"token": TOKEN, "android": {"ttl": "-1s"}}}), INVALID_ARGUMENT_MESSAGE, Some("INVALID_ARGUMENT")),
            (json!({"message": {"token": TOKEN, "android": {"priority": "URGENT"}}}),
                "Invalid value at 'message.android.priority' (type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), \"URGENT\"", None),
            (json!({"message": {"data": {"a": "b"}}}), "Recipient of the message is not set.", Some("INVALID_ARGUMENT")),
            (json!({"message": {"token": ""}}), "Recipient of the message is not set.", Some("INVALID_ARGUMENT")),
            (json!({"message": {"token": TOKEN, "topic": "news"}}), "Invalid value at 'message' (oneof)", None),
            (json!({"message": {"token": TOKEN, "priority": "high"}}),
                "Invalid JSON payload received. Unknown name \"priority\" at 'message': Cannot find field.", None),
            (json!({"message": {"token": TOKEN, "android": {"time_to_live": 5}}}),
                "Invalid JSON payload received. Unknown name \"time_to_live\" at 'message.android': Cannot find field.", None),
            (json!({"to": TOKEN}), "Invalid JSON payload received. Unknown name \"to\": Cannot find field.", None),
            (json!({"message": {"token": TOKEN, "data": {"k": "v".repeat(4096)}}}), INVALID_ARGUMENT_MESSAGE, None),
        ];
        for (body, prefix, code) in bad {
            let r = c.post_send(&url, Some(&at), &body.to_string()).await;
            assert_eq!(r.status, 400, "{body}: {}", r.body);
            let (status, got_code) = r.error();
            assert_eq!(status, "INVALID_ARGUMENT", "{body}");
            assert_eq!(got_code.as_deref(), code, "{body}: {}", r.body);
            let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(msg.starts_with(prefix), "{body}: {msg}");
        }
        let r = c.post_send(&url, Some(&at), "{not json").await;
        assert_eq!((r.status, r.error().0.as_str()), (400, "INVALID_ARGUMENT"));
        // Too big has no detail at all, as Google answers.
        let big = json!({"message": {"token": TOKEN, "data": {"k": "v".repeat(4096)}}}).to_string();
        assert!(c.post_send(&url, Some(&at), &big).await.json()["error"]
            .get("details")
            .is_none());

        let good = [
            json!({"message": {"token": TOKEN, "android": {"priority": "high", "ttl": "0s"}}}),
            json!({"message": {"token": TOKEN, "android": {"priority": "normal", "ttl": "1.5s", "collapseKey": "x"}}}),
            json!({"message": {"token": TOKEN, "android": {"priority": "NORMAL", "data": {"a": "b"}}}}),
            json!({"message": {"token": TOKEN, "data": {"k": "v".repeat(4095)}}}),
            json!({"message": {"token": TOKEN, "data": {"collapse_key": "allowed"}, "notification": {"title": "t"}}}),
        ];
        for body in good {
            let r = c.post_send(&url, Some(&at), &body.to_string()).await;
            assert_eq!(r.status, 200, "{body}: {}", r.body);
        }
    }

    #[test]
    fn behaviour_names_round_trip() {
        for name in [
            "ok",
            "unregistered",
            "sender-id-mismatch",
            "invalid-token",
            "quota-exceeded:7",
            "unavailable",
            "internal",
            "bad-gateway",
            "delay:250:unregistered",
            "fail-times:3:delay:10:internal",
        ] {
            let b: Behaviour = name.parse().unwrap();
            assert_eq!(b.to_string(), name);
        }
        assert_eq!(
            "QUOTA_EXCEEDED".parse::<Behaviour>().unwrap(),
            Behaviour::QuotaExceeded(DEFAULT_RETRY_AFTER_SECS)
        );
        assert_eq!(
            "UNREGISTERED".parse::<Behaviour>().unwrap(),
            Behaviour::Unregistered
        );
        assert!("nope".parse::<Behaviour>().is_err());
        assert!("ok:1".parse::<Behaviour>().is_err());
        assert!("quota-exceeded:x".parse::<Behaviour>().is_err());
    }

    #[test]
    fn service_account_file_is_as_google_hands_it_out() {
        let sa = ServiceAccount::generate("proj-1", "https://127.0.0.1:1/token");
        let v: Value = serde_json::from_str(&sa.json).unwrap();
        assert_eq!(v["type"], "service_account");
        assert_eq!(v["project_id"], "proj-1");
        assert_eq!(v["token_uri"], "https://127.0.0.1:1/token");
        assert_eq!(v["private_key_id"].as_str().unwrap().len(), 40);
        assert!(v["client_email"]
            .as_str()
            .unwrap()
            .ends_with("@proj-1.iam.gserviceaccount.com"));
        let pk = v["private_key"].as_str().unwrap();
        assert!(pk.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pk}");
        // In the file the newlines are JSON escapes.
        assert!(sa.json.contains("-----BEGIN PRIVATE KEY-----\\n"));
        // The private key verifies against the public one.
        let jwt = sa.assertion(unix_now());
        let key = DecodingKey::from_rsa_pem(sa.public_key_pem.as_bytes()).unwrap();
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&["https://127.0.0.1:1/token"]);
        jsonwebtoken::decode::<Value>(&jwt, &key, &validation).unwrap();
        let moved = sa.with_token_uri("https://mock-fcm:4000/token");
        assert_eq!(moved.private_key_id, sa.private_key_id);
        assert!(moved.json.contains("https://mock-fcm:4000/token"));
    }

    #[test]
    fn durations_parse_as_protobuf_json() {
        assert_eq!(parse_duration("0s"), Ok(0));
        assert_eq!(parse_duration("2419200s"), Ok(2_419_200));
        assert_eq!(parse_duration("1.999999999s"), Ok(1));
        assert_eq!(parse_duration("-1s"), Ok(-1));
        assert_eq!(parse_duration("-0.5s"), Ok(-1));
        for bad in [
            "",
            "s",
            "1",
            "1.s",
            "1.0000000001s",
            "+1s",
            "1e3s",
            " 1s",
            "1 s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
