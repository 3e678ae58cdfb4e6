//! Firebase Cloud Messaging (HTTP v1): Google's push service, which wakes Android apps.
//!
//! One client per configured app: `POST /v1/projects/<project>/messages:send` over one pooled HTTP/2
//! connection, authorised by an OAuth2 access token that the client gets for the app's service account
//! (the JWT-bearer grant, RS256), caches, and renews before it expires and once whenever Google calls it
//! stale. A wake-up is a data-only message: the registration's opaque `account` id (what Conversations
//! compares), and a client-encrypted payload if there is one, never any content. Its `android.priority`
//! is HIGH for a visible or call wake-up and NORMAL for a silent one, since Google deprioritises an app's
//! high-priority messages that lead to no notification; `collapse_key` keeps one undelivered message per
//! node. Retries (429 with `Retry-After`, 5xx, network) back off inside the publish deadline.
//!
//! An FCM registration token is opaque: Google documents no format and no length, and tokens seen in the
//! wild are 150 to 350 characters of `[A-Za-z0-9_:-]`, some longer. knock keeps the token's exact bytes and
//! checks only what would make it unusable in a JSON body or dangerous in a log: printable ASCII without
//! spaces, at most 4096 bytes (the most any source has seen Google allow).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

use super::http::{
    error_chain, http2_client, invalid, node_digest, read, tls_builder, ClientSetupError,
    HttpClient,
};
use super::{Provider, ProviderKind, PushOutcome, Token, TokenError, WakeKind, Wakeup};
use crate::config::FcmConfig;
use crate::stats::Stats;

/// Longest FCM token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Check an FCM registration token and keep its bytes as they are.
pub fn parse_token(text: &str) -> Result<Token, TokenError> {
    let printable = |b: &u8| (0x21..=0x7e).contains(b);
    if text.is_empty() || text.len() > MAX_TOKEN_LEN || !text.bytes().all(|b| printable(&b)) {
        return Err(TokenError(
            "token must be the FCM registration token (1 to 4096 printable ASCII characters, no spaces)",
        ));
    }
    Ok(Token::from_bytes(text.as_bytes()))
}

/// The OAuth scope that lets a service account send with FCM.
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// RFC 7523's grant type, form-encoded.
const JWT_BEARER_GRANT: &str = "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer";
/// Google's token endpoint, for service-account files that do not name one.
const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// How long an assertion is valid: Google's maximum.
const ASSERTION_LIFETIME_SECS: u64 = 3600;
/// Renew an access token this long before it expires, so no send carries one that expires in flight.
const RENEW_BEFORE_EXPIRY: Duration = Duration::from_secs(300);
/// After the token endpoint refused the service account (a revoked key, a clock far off), ask again no
/// sooner than this: every push meanwhile is answered at once, and Google is not hammered.
const REFUSED_GRANT_PAUSE: Duration = Duration::from_secs(60);
/// After the token endpoint could not be reached or failed, ask again no sooner than this.
const FAILED_GRANT_PAUSE: Duration = Duration::from_secs(1);
/// First retry delay of a send; doubled each time, with jitter, as Google asks.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Most attempts per wake-up, the first included. The deadline ends them first: with backoff doubling from
/// 200 ms, a 10 s deadline allows six; the cap only bounds what a long deadline could add.
const MAX_ATTEMPTS: u32 = 8;
/// Error bodies are a short JSON object (or a short HTML page from Google's front end): read no more.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// The service-account key file, as the Firebase console writes it: only what knock reads.
#[derive(Deserialize)]
struct ServiceAccountFile {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    private_key_id: Option<String>,
    private_key: String,
    client_email: String,
    #[serde(default)]
    token_uri: Option<String>,
}

/// An access token, with the `authorization` header that carries it, built once per token.
#[derive(Clone)]
struct AccessToken {
    header: HeaderValue,
    /// When to ask for the next one.
    renew_at: Instant,
    /// When Google stops accepting it.
    expires_at: Instant,
}

/// The JWT claims of a JWT-bearer grant.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// Google's answer to a grant.
#[derive(Deserialize)]
struct Grant {
    access_token: String,
    expires_in: u64,
}

/// Google's refusal of a grant.
#[derive(Deserialize, Default)]
struct GrantError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// A service account's access tokens: one in use, shared by every send, and one renewal at a time.
struct Credentials {
    key: jsonwebtoken::EncodingKey,
    key_id: Option<String>,
    client_email: String,
    token_uri: Uri,
    current: RwLock<Option<AccessToken>>,
    /// Held while a grant is being asked for; remembers a failed one, and until when it stands.
    renewing: tokio::sync::Mutex<Option<(Instant, PushOutcome)>>,
}

impl Credentials {
    fn load(
        path: &Path,
        token_uri: Option<&str>,
    ) -> Result<(Credentials, Option<String>), ClientSetupError> {
        let file: ServiceAccountFile = serde_json::from_slice(&read(path)?)
            .map_err(|e| invalid(path, format!("not a service-account key file (JSON): {e}")))?;
        if file.kind.as_deref().is_some_and(|k| k != "service_account") {
            return Err(invalid(
                path,
                "its \"type\" is not \"service_account\": download the key of a service account (Firebase console: Project settings, Service accounts)",
            ));
        }
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(file.private_key.as_bytes())
            .map_err(|e| invalid(path, format!("private_key is not an RSA key in PEM: {e}")))?;
        let token_uri = token_uri
            .or(file.token_uri.as_deref())
            .unwrap_or(GOOGLE_TOKEN_URI);
        let token_uri: Uri = token_uri
            .parse()
            .ok()
            .filter(|u: &Uri| u.scheme_str() == Some("https") && u.host().is_some())
            .ok_or_else(|| invalid(path, "token_uri must be an https:// URL"))?;
        let credentials = Credentials {
            key,
            key_id: file.private_key_id,
            client_email: file.client_email,
            token_uri,
            current: RwLock::new(None),
            renewing: tokio::sync::Mutex::new(None),
        };
        // Sign once now, so a key jsonwebtoken cannot use fails `knock check`, not the first push.
        credentials.assertion().map_err(|e| invalid(path, e))?;
        Ok((credentials, file.project_id))
    }

    /// A signed JWT-bearer assertion for now.
    fn assertion(&self) -> Result<String, String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = self.key_id.clone();
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let audience = self.token_uri.to_string();
        let claims = Claims {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &audience,
            iat,
            exp: iat + ASSERTION_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| e.to_string())
    }

    fn current(&self) -> Option<AccessToken> {
        // A poisoned lock only means a panic elsewhere mid-assignment of a complete value; it is usable.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The access token to send with now: the current one, or a new one when it is due for renewal. A
    /// renewal that fails leaves the current one in use until it expires.
    async fn token(
        &self,
        http: &HttpClient,
        stale: Option<&HeaderValue>,
    ) -> Result<AccessToken, PushOutcome> {
        let usable = |t: &AccessToken, now: Instant| Some(&t.header) != stale && now < t.expires_at;
        if let Some(t) = self.current() {
            if Some(&t.header) != stale && Instant::now() < t.renew_at {
                return Ok(t);
            }
        }
        let mut renewing = self.renewing.lock().await;
        // Another send may have renewed it while this one waited.
        let now = Instant::now();
        let current = self.current();
        if let Some(t) = &current {
            if Some(&t.header) != stale && now < t.renew_at {
                return Ok(t.clone());
            }
        }
        if let Some((until, outcome)) = renewing.as_ref() {
            if now < *until {
                return match current.filter(|t| usable(t, now)) {
                    Some(t) => Ok(t),
                    None => Err(outcome.clone()),
                };
            }
        }
        match self.grant(http).await {
            Ok(token) => {
                tracing::debug!(stale = stale.is_some(), "FCM access token renewed");
                *renewing = None;
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
                Ok(token)
            }
            Err(outcome) => {
                let pause = match outcome {
                    PushOutcome::Misconfigured { .. } => REFUSED_GRANT_PAUSE,
                    _ => FAILED_GRANT_PAUSE,
                };
                tracing::warn!(outcome = ?outcome, "FCM access token could not be renewed");
                *renewing = Some((Instant::now() + pause, outcome.clone()));
                match current.filter(|t| usable(t, Instant::now())) {
                    Some(t) => Ok(t),
                    None => Err(outcome),
                }
            }
        }
    }

    /// Ask the token endpoint for a new access token.
    async fn grant(&self, http: &HttpClient) -> Result<AccessToken, PushOutcome> {
        let assertion = self
            .assertion()
            .map_err(|reason| PushOutcome::Misconfigured { reason })?;
        let mut request = Request::new(Full::new(Bytes::from(format!(
            "grant_type={JWT_BEARER_GRANT}&assertion={assertion}"
        ))));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.token_uri.clone();
        request.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        let asked = Instant::now();
        let response = http
            .request(request)
            .await
            .map_err(|e| PushOutcome::Unavailable {
                reason: format!("token endpoint: {}", error_chain(&e)),
            })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| PushOutcome::Unavailable {
                reason: format!("token endpoint: {e}"),
            })?;
        if status.is_success() {
            let grant: Grant =
                serde_json::from_slice(&body).map_err(|e| PushOutcome::Unavailable {
                    reason: format!("token endpoint answered {status} without a token: {e}"),
                })?;
            let header =
                HeaderValue::try_from(format!("Bearer {}", grant.access_token)).map_err(|_| {
                    PushOutcome::Unavailable {
                        reason: "token endpoint answered an unusable access token".into(),
                    }
                })?;
            let lifetime = Duration::from_secs(grant.expires_in);
            // A short-lived token is renewed at half its life rather than never.
            let renew_after = lifetime
                .checked_sub(RENEW_BEFORE_EXPIRY)
                .unwrap_or(lifetime / 2);
            return Ok(AccessToken {
                header,
                renew_at: asked + renew_after,
                expires_at: asked + lifetime,
            });
        }
        let refusal: GrantError = serde_json::from_slice(&body).unwrap_or_default();
        let reason = format!(
            "token endpoint answered {}: {} {}",
            status.as_u16(),
            refusal.error,
            refusal.error_description
        );
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Err(PushOutcome::Unavailable { reason })
        } else {
            // invalid_grant and its kin: a revoked or rotated key, a deleted account, a clock far off.
            Err(PushOutcome::Misconfigured { reason })
        }
    }
}

/// An FCM client for one app.
pub struct FcmClient {
    http: HttpClient,
    /// `<endpoint>/v1/projects/<project>/messages:send`.
    send_url: Uri,
    /// The app's name, for logs.
    app: String,
    credentials: Credentials,
    /// `android.ttl`, as Google writes a duration (`"3600s"`).
    ttl: String,
    /// Every push resolves within this, retries included.
    deadline: Duration,
    stats: Arc<Stats>,
    /// Whether a message of this project has been accepted since this client was built: until then,
    /// `SENDER_ID_MISMATCH` more likely means the wrong service account for the app than a token of
    /// another app, and no registration may go for it (see [`classify`]).
    proven: AtomicBool,
}

impl FcmClient {
    /// Build the client for one app: read the service account and the CA file, set up TLS. Does not connect.
    pub fn new(
        app: &FcmConfig,
        deadline: Duration,
        stats: Arc<Stats>,
    ) -> Result<FcmClient, ClientSetupError> {
        let path = app
            .service_account_file
            .as_deref()
            .ok_or_else(|| ClientSetupError::Setup("service_account_file is not set".into()))?;
        let (credentials, file_project) = Credentials::load(path, app.token_uri.as_deref())?;
        let project = app.project_id.clone().or(file_project).ok_or_else(|| {
            invalid(
                path,
                "no project_id in the file: set project_id in the app's table",
            )
        })?;
        let endpoint = crate::config::https_url(&app.endpoint).map_err(ClientSetupError::Setup)?;
        let send_url = format!("{endpoint}/v1/projects/{project}/messages:send")
            .parse()
            .map_err(|e| ClientSetupError::Setup(format!("endpoint or project_id: {e}")))?;
        let tls = tls_builder(app.ca_file.as_deref())?.with_no_client_auth();
        Ok(FcmClient {
            http: http2_client(tls, deadline),
            send_url,
            app: app.name.clone(),
            credentials,
            ttl: format!("{}s", app.expiration_secs),
            deadline,
            stats,
            proven: AtomicBool::new(false),
        })
    }

    /// The message: a wake-up with the registration's account id and the client's own encrypted payload
    /// when it has them, and never anything else.
    fn body(&self, token: &str, wakeup: &Wakeup<'_>) -> Bytes {
        // A call is now or never; a knock names who knocked, which a later wake-up must not replace.
        let collapse_key = (wakeup.kind != WakeKind::Call && wakeup.knock.is_none())
            .then(|| node_digest(wakeup.node));
        let message = Send {
            message: Message {
                token,
                data: Data {
                    account: wakeup.account,
                    encrypted: wakeup.encrypted.map(|e| e.data),
                    iv: wakeup.encrypted.map(|e| e.iv),
                    knock: wakeup.knock,
                },
                android: Android {
                    priority: match wakeup.kind {
                        WakeKind::Background => "NORMAL",
                        WakeKind::Alert | WakeKind::Call => "HIGH",
                    },
                    collapse_key,
                    // A call is answered now or never: Google must not deliver it late.
                    ttl: if wakeup.kind == WakeKind::Call {
                        "0s"
                    } else {
                        &self.ttl
                    },
                },
            },
        };
        // Serialising strings into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&message).unwrap_or_default())
    }

    /// One HTTP exchange: what it means, and Google's `Retry-After`, if any.
    async fn send_once(&self, body: &Bytes, access: &AccessToken) -> (Verdict, Option<Duration>) {
        let mut request = Request::new(Full::new(body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.send_url.clone();
        let headers = request.headers_mut();
        headers.insert(AUTHORIZATION, access.header.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let started = Instant::now();
        let response = match self.http.request(request).await {
            Ok(response) => response,
            Err(e) => {
                self.stats.fcm.transport_error(started.elapsed());
                let outcome = PushOutcome::Unavailable {
                    reason: error_chain(&e),
                };
                return (Verdict::Retry(outcome), None);
            }
        };
        let status = response.status();
        if status.is_success() {
            self.stats
                .fcm
                .response(status.as_u16(), "", started.elapsed());
            return (Verdict::Final(PushOutcome::Delivered), None);
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = Limited::new(response.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let error = GoogleError::parse(&body);
        self.stats
            .fcm
            .response(status.as_u16(), error.reason(), started.elapsed());
        (
            classify(status, &error, self.proven.load(Ordering::Relaxed)),
            retry_after,
        )
    }

    async fn push(&self, wakeup: Wakeup<'_>) -> PushOutcome {
        let give_up_at = Instant::now() + self.deadline;
        let Ok(token) = std::str::from_utf8(wakeup.token) else {
            // Only a damaged record could hold one: registration checks every token.
            return PushOutcome::DeadToken {
                reason: "stored token is not text".into(),
            };
        };
        let body = self.body(token, &wakeup);
        let mut access = match self.credentials.token(&self.http, None).await {
            Ok(access) => access,
            Err(outcome) => return outcome,
        };
        let mut reauthenticated = false;
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=MAX_ATTEMPTS {
            let (verdict, retry_after) = self.send_once(&body, &access).await;
            let last = match verdict {
                Verdict::Final(outcome) => {
                    if outcome == PushOutcome::Delivered {
                        self.proven.store(true, Ordering::Relaxed);
                    }
                    return outcome;
                }
                Verdict::Reauthenticate(outcome) if !reauthenticated => {
                    reauthenticated = true;
                    match self
                        .credentials
                        .token(&self.http, Some(&access.header))
                        .await
                    {
                        Ok(fresh) => {
                            access = fresh;
                            continue;
                        }
                        Err(_) => return outcome,
                    }
                }
                Verdict::Reauthenticate(outcome) => return outcome,
                Verdict::Retry(outcome) => outcome,
            };
            tracing::debug!(app = %self.app, attempt, outcome = ?last, "FCM attempt failed");
            // Google's pause if it named one, else exponential backoff with up to a quarter of jitter.
            let wait = retry_after
                .unwrap_or_else(|| backoff.mul_f64(1.0 + rand::thread_rng().gen_range(0.0..0.25)));
            backoff *= 2;
            if attempt == MAX_ATTEMPTS || Instant::now() + wait >= give_up_at {
                return last;
            }
            tokio::time::sleep(wait).await;
        }
        PushOutcome::Unavailable {
            reason: "no attempt made".into(),
        }
    }
}

/// `{"message": ...}`.
#[derive(Serialize)]
struct Send<'a> {
    message: Message<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    token: &'a str,
    #[serde(skip_serializing_if = "Data::is_empty")]
    data: Data<'a>,
    android: Android<'a>,
}

/// The data payload: strings only, as FCM requires.
#[derive(Serialize)]
struct Data<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encrypted: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iv: Option<&'a str>,
    /// A knock's token id ([`Wakeup::knock`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    knock: Option<&'a str>,
}

impl Data<'_> {
    fn is_empty(&self) -> bool {
        self.account.is_none() && self.encrypted.is_none() && self.knock.is_none()
    }
}

#[derive(Serialize)]
struct Android<'a> {
    priority: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    collapse_key: Option<String>,
    ttl: &'a str,
}

/// What Google's error body says: `{"error":{"code","message","status","details":[...]}}`, of which knock
/// reads the canonical status, the `FcmError` detail's `errorCode` and whether a `BadRequest` detail names
/// the token. Anything else (a 502's HTML page) reads as nothing said.
#[derive(Debug, Default, PartialEq)]
struct GoogleError {
    status: String,
    message: String,
    error_code: Option<String>,
    about_token: bool,
}

impl GoogleError {
    fn parse(body: &[u8]) -> GoogleError {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
            return GoogleError::default();
        };
        let error = &value["error"];
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        let details = error["details"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let error_code = details
            .iter()
            .find(|d| {
                d["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("google.firebase.fcm.v1.FcmError"))
            })
            .and_then(|d| d["errorCode"].as_str())
            .map(str::to_owned);
        let about_token = details.iter().any(|d| {
            d["fieldViolations"].as_array().is_some_and(|v| {
                v.iter()
                    .any(|f| f["field"].as_str() == Some("message.token"))
            })
        });
        GoogleError {
            status: text(&error["status"]),
            message: text(&error["message"]),
            error_code,
            about_token,
        }
    }

    /// The label for `/metrics`: the FCM error code, else Google's status.
    fn reason(&self) -> &str {
        self.error_code.as_deref().unwrap_or(&self.status)
    }
}

/// What one FCM answer means for the push.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Settled: delivered, dead, or a problem retrying cannot fix.
    Final(PushOutcome),
    /// Worth another attempt; this is the outcome if none is left.
    Retry(PushOutcome),
    /// The access token was refused: get a new one and retry once; this is the outcome if that fails.
    Reauthenticate(PushOutcome),
}

/// Google's answers, mapped to what knock does, for an app that has (`proven`) or has not yet had a
/// message accepted.
fn classify(status: StatusCode, error: &GoogleError, proven: bool) -> Verdict {
    let said = || {
        format!("{} {} {}", status.as_u16(), error.reason(), error.message)
            .trim_end()
            .to_owned()
    };
    if status.is_success() {
        return Verdict::Final(PushOutcome::Delivered);
    }
    match (status.as_u16(), error.error_code.as_deref()) {
        (_, Some("UNREGISTERED")) => Verdict::Final(PushOutcome::DeadToken {
            reason: "UNREGISTERED".into(),
        }),
        // A token of another Firebase project, or every token when the service account is the wrong
        // project's: only the first is a dead device, and only once this project is known to be right.
        (_, Some("SENDER_ID_MISMATCH")) if proven => Verdict::Final(PushOutcome::DeadToken {
            reason: "SENDER_ID_MISMATCH".into(),
        }),
        (_, Some("SENDER_ID_MISMATCH")) => Verdict::Final(PushOutcome::Misconfigured {
            reason: format!(
                "{}, and no message of this app has been accepted yet: is service_account_file the app's Firebase project's?",
                said()
            ),
        }),
        (400, _) if error.about_token || error.message.contains("registration token") => {
            Verdict::Final(PushOutcome::DeadToken {
                reason: "INVALID_ARGUMENT (token)".into(),
            })
        }
        (401 | 403, _) => Verdict::Reauthenticate(PushOutcome::Misconfigured { reason: said() }),
        (429, _) => Verdict::Retry(PushOutcome::Throttled),
        (500..=599, _) => Verdict::Retry(PushOutcome::Unavailable { reason: said() }),
        _ => Verdict::Final(PushOutcome::Misconfigured { reason: said() }),
    }
}

impl Provider for FcmClient {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Fcm
    }

    fn wake<'a>(&'a self, wakeup: Wakeup<'a>) -> BoxFuture<'a, PushOutcome> {
        Box::pin(async move {
            match tokio::time::timeout(self.deadline, self.push(wakeup)).await {
                Ok(outcome) => outcome,
                Err(_) => PushOutcome::Unavailable {
                    reason: format!("no answer from FCM within {:?}", self.deadline),
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_kept_byte_for_byte_and_bounded() {
        let real = "eeDXSJjASJY:APA91bEKxhXK54-vHhY9O55JmU2R0nDJL2rRENm-W9uPY6x3jHi0i0OyvPu6js9jVPZqDeX9ZQydZCBZE19o7a0kK4_n88fCgufXjaOlvalh9VibB2zOI7dQRTaDNB3H5s4dicpWD0m4";
        assert_eq!(
            parse_token(real).expect("p2's example").as_bytes(),
            real.as_bytes()
        );
        assert!(parse_token(&"a".repeat(MAX_TOKEN_LEN)).is_ok());
        for bad in [
            "",
            " leading",
            "in side",
            "tab\t",
            "new\nline",
            "é",
            "\u{0}",
        ] {
            assert!(parse_token(bad).is_err(), "{bad:?}");
        }
        assert!(parse_token(&"a".repeat(MAX_TOKEN_LEN + 1)).is_err());
    }

    fn verdict(status: u16, body: &str, proven: bool) -> Verdict {
        let status = StatusCode::from_u16(status).expect("a status");
        classify(status, &GoogleError::parse(body.as_bytes()), proven)
    }

    fn dead(v: &Verdict) -> bool {
        matches!(v, Verdict::Final(PushOutcome::DeadToken { .. }))
    }

    #[test]
    fn googles_answers_map_to_what_knock_does() {
        // Real bodies (Google's docs, bloomberg/pushiko's captures).
        let unregistered = r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        let bad_token = r#"{"error":{"code":400,"message":"The registration token is not a valid FCM registration token","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#;
        let bad_field = r#"{"error":{"code":400,"message":"Request contains an invalid argument.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"},{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.token","description":"Invalid registration token"}]}]}}"#;
        let too_big = r#"{"error":{"code":400,"message":"Request contains an invalid argument.","status":"INVALID_ARGUMENT"}}"#;
        let mismatch = r#"{"error":{"code":403,"message":"SenderId mismatch","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"SENDER_ID_MISMATCH"}]}}"#;
        let expired = r#"{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}"#;
        let html = "<!DOCTYPE html><html><title>Error 502 (Server Error)!!1</title></html>";

        assert!(dead(&verdict(404, unregistered, false)));
        assert!(dead(&verdict(400, bad_token, false)));
        assert!(dead(&verdict(400, bad_field, false)));
        assert!(matches!(
            verdict(400, too_big, true),
            Verdict::Final(PushOutcome::Misconfigured { .. })
        ));
        assert!(matches!(
            verdict(403, mismatch, false),
            Verdict::Final(PushOutcome::Misconfigured { .. })
        ));
        assert!(dead(&verdict(403, mismatch, true)));
        assert!(matches!(
            verdict(401, expired, true),
            Verdict::Reauthenticate(_)
        ));
        assert!(matches!(
            verdict(403, "{}", true),
            Verdict::Reauthenticate(_)
        ));
        assert_eq!(
            verdict(429, "", true),
            Verdict::Retry(PushOutcome::Throttled)
        );
        for status in [500, 502, 503] {
            assert!(matches!(
                verdict(status, html, true),
                Verdict::Retry(PushOutcome::Unavailable { .. })
            ));
        }
        // A 404 that does not say UNREGISTERED (a wrong project path) deletes nothing.
        assert!(!dead(&verdict(
            404,
            r#"{"error":{"status":"NOT_FOUND"}}"#,
            true
        )));
        assert_eq!(
            GoogleError::parse(unregistered.as_bytes()).reason(),
            "UNREGISTERED"
        );
        assert_eq!(
            GoogleError::parse(expired.as_bytes()).reason(),
            "UNAUTHENTICATED"
        );
        assert_eq!(GoogleError::parse(html.as_bytes()).reason(), "");
    }
}
