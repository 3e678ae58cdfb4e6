//! What every push service client shares: TLS roots (the public ones, plus an admin's CA file for a test
//! or proxy endpoint), one pooled HTTP/2 client with keep-alive pings, and the setup errors.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The HTTP/2 client a provider sends with.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Shortest wait for a PING's answer before a connection with requests waiting is declared dead.
const MIN_KEEP_ALIVE: Duration = Duration::from_secs(1);

/// Why a push client could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    /// A key, certificate, account or CA file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file was read but does not hold what it should.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The endpoint or TLS setup was rejected.
    #[error("{0}")]
    Setup(String),
}

/// Read a file a client needs.
pub fn read(path: &Path) -> Result<Vec<u8>, ClientSetupError> {
    std::fs::read(path).map_err(|source| ClientSetupError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// A file that was read but is unusable.
pub fn invalid(path: &Path, reason: impl Into<String>) -> ClientSetupError {
    ClientSetupError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// The PEM certificates in a file (at least one).
pub fn load_certs(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ClientSetupError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(pem.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// A TLS configuration trusting the public roots and, if given, the certificates of `ca_file`; client
/// authentication is the caller's to add.
pub fn tls_builder(
    ca_file: Option<&Path>,
) -> Result<
    rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    ClientSetupError,
> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca_file {
        for cert in load_certs(ca)? {
            roots
                .add(cert)
                .map_err(|e| invalid(ca, format!("unusable CA certificate: {e}")))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientSetupError::Setup(e.to_string()))?
    .with_root_certificates(roots))
}

/// hyper's pooled HTTP/2 client over `tls`: one multiplexed connection per host, re-established on demand.
/// `deadline` is how long a push may take, retries included.
pub fn http2_client(tls: rustls::ClientConfig, deadline: Duration) -> HttpClient {
    // Nagle would hold each small HTTP/2 frame back until the previous one is acknowledged: tens of
    // milliseconds per push when pushes come one at a time.
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .wrap_connector(tcp);
    // A connection whose path died silently (no FIN, no RST) would take every push until the OS gave up
    // on it, minutes later; pooled, it is never replaced. So while pushes are waiting, a connection that
    // has been quiet for half a deadline is pinged, and one that does not answer within half a deadline
    // more is closed: its pushes are retried on a new one, usually inside their deadline. The floor keeps
    // a short deadline from mistaking a long round trip to the provider for a dead path.
    let keep_alive = (deadline / 2).max(MIN_KEEP_ALIVE);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_only(true)
        .http2_keep_alive_interval(keep_alive)
        .http2_keep_alive_timeout(keep_alive)
        .pool_idle_timeout(Duration::from_secs(600))
        .build(connector)
}

/// An error and its chain of causes on one line: hyper's top level rarely says *why* (connect refused,
/// TLS, GOAWAY); its sources do.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Lowercase hex of `bytes`, by table: this runs on every push (`hex::encode` goes char by char).
pub fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// 32 hex digits of the SHA-256 of a node: a collapse key for its pushes that fits any provider's limit
/// however long the node, and does not repeat the node to the provider.
pub fn node_digest(node: &str) -> String {
    use sha2::{Digest, Sha256};
    lower_hex(&Sha256::digest(node.as_bytes())[..16])
}
