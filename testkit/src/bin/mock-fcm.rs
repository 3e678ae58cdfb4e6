//! `mock-fcm`: runs testkit's mock of Google's FCM HTTP v1 API and OAuth token endpoint as a process, for
//! manual runs, a compose stack and tests in other languages.
//!
//! It makes a service account of `--project` and writes its key file to `--service-account-out`, with
//! `token_uri` pointing at the mock (at the first `--tls-name` if given, so other containers can use it),
//! and the CA that signed the server certificate to `--ca-out`. It prints one JSON line on stdout when
//! listening (`{"event":"listening","url","token_uri","send_url",...}`), then one per request answered:
//! `"event":"request"` for a send, `"event":"token"` for a token grant.
//!
//! Per-token behaviour is set with `--behaviour` or, while it runs, through an optional loopback HTTP/1.1
//! control listener (`--control`):
//!
//! - `POST /behaviour/<token>/<name>`, `DELETE /behaviour/<token>`, `POST /default/<name>` (names as `ok`,
//!   `unregistered`, `sender-id-mismatch`, `invalid-token`, `quota-exceeded[:<secs>]`, `unavailable`,
//!   `internal`, `bad-gateway`, `delay:<ms>:<name>`, `fail-times:<n>:<name>`)
//! - `POST /expire-tokens`: every access token issued so far expires now (the next send gets 401)
//! - `POST /token-failure` (body: the `error_description`, e.g. `Invalid JWT Signature.`): every token
//!   request is answered 400 `invalid_grant` until `DELETE /token-failure`
//! - `GET /requests`, `GET /requests/<token>`, `GET /token-requests` (JSON arrays), `DELETE /requests`
//! - `GET /stats`: `{"connections_accepted", "requests", "token_requests"}`
//!
//! `--pushes-listen ADDR` adds a read-only HTTP/1.1 listener, on any address, for people to see what their
//! app would have got: `GET /pushes`, `GET /pushes/<token>` and `GET /stats`.
//!
//! It runs until SIGINT or SIGTERM.

use std::convert::Infallible;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use testkit::cli::{json, parse_token_behaviour, print_line, text};
use testkit::fcm::{Behaviour, FcmEvent, FcmRequest, MockFcm, MockFcmConfig, TokenRequest};
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;

#[derive(Parser, Debug)]
#[command(
    name = "mock-fcm",
    about = "A mock of Google's FCM HTTP v1 API and its OAuth2 token endpoint (TLS, HTTP/2 or HTTP/1.1)"
)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The Firebase project id sends must name.
    #[arg(long, default_value = "knock-test")]
    project: String,
    /// Where to write the service account key file (JSON) whose token_uri points at the mock.
    #[arg(long)]
    service_account_out: Option<PathBuf>,
    /// Where to write the PEM of the CA that signed the server certificate.
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// A DNS name for the TLS certificate besides localhost and the loopback addresses; repeatable. The first
    /// one is the host of the token_uri written to --service-account-out.
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
    /// Lifetime of the access tokens issued, in seconds (`expires_in`).
    #[arg(long, default_value_t = 3599)]
    access_token_lifetime: u64,
    /// Behaviour for a token, as TOKEN=NAME; repeatable.
    #[arg(long = "behaviour", value_parser = parse_token_behaviour::<Behaviour>)]
    behaviours: Vec<(String, Behaviour)>,
    /// Behaviour for every token without its own.
    #[arg(long, default_value = "ok")]
    default_behaviour: Behaviour,
    /// Loopback address for the HTTP/1.1 control listener.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Address of the read-only listener (`GET /pushes`, `/pushes/<token>`, `/stats`); any address.
    #[arg(long)]
    pushes_listen: Option<SocketAddr>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    if let Some(control) = args.control {
        anyhow::ensure!(
            control.ip().is_loopback(),
            "--control must be a loopback address, got {control}"
        );
    }

    let mock = MockFcm::start_on(
        args.listen,
        MockFcmConfig {
            project_id: args.project.clone(),
            access_token_lifetime: Duration::from_secs(args.access_token_lifetime),
            server_names: args.tls_names.clone(),
        },
    )
    .await?;
    let port = mock.addr().port();
    let token_uri = match args.tls_names.first() {
        Some(name) => format!("https://{name}:{port}/token"),
        None => mock.token_uri(),
    };
    let account = mock.service_account().with_token_uri(&token_uri);
    if let Some(path) = &args.service_account_out {
        std::fs::write(path, &account.json)
            .with_context(|| format!("writing --service-account-out {}", path.display()))?;
    }
    if let Some(path) = &args.ca_out {
        std::fs::write(path, mock.ca_pem())
            .with_context(|| format!("writing --ca-out {}", path.display()))?;
    }
    mock.set_default_behaviour(args.default_behaviour.clone());
    for (token, behaviour) in &args.behaviours {
        mock.set_behaviour(token, behaviour.clone());
    }
    let mock = Arc::new(mock);

    let mut tasks = Vec::new();
    let mut serve = |addr: Option<SocketAddr>, what: &str, handler: Handler| match addr {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding --{what} {addr}"))?;
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)?;
            let local = listener.local_addr()?;
            tasks.push(tokio::spawn(http_loop(listener, mock.clone(), handler)));
            anyhow::Ok(Some(local))
        }
        None => Ok(None),
    };
    let control_addr = serve(args.control, "control", control)?;
    let pushes_addr = serve(args.pushes_listen, "pushes-listen", pushes)?;

    let mut events = mock.subscribe();
    print_line(&serde_json::json!({
        "event": "listening",
        "url": mock.url(),
        "token_uri": token_uri,
        "send_url": format!("{}/v1/projects/{}/messages:send", mock.url(), args.project),
        "project_id": args.project,
        "client_email": account.client_email,
        "control": control_addr.map(|a| format!("http://{a}")),
        "pushes": pushes_addr.map(|a| format!("http://{a}/pushes")),
        "service_account_file": args.service_account_out,
        "ca_file": args.ca_out,
    }));
    let logger = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(FcmEvent::Send(r)) => print_line(&request_line(&r)),
                Ok(FcmEvent::Token(t)) => print_line(&token_line(&t)),
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!("request log fell behind; {n} requests not printed")
                }
                Err(RecvError::Closed) => break,
            }
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    logger.abort();
    for task in tasks {
        task.abort();
        let _ = task.await;
    }
    if let Ok(mock) = Arc::try_unwrap(mock) {
        mock.shutdown().await;
    }
    Ok(())
}

fn request_line(r: &FcmRequest) -> serde_json::Value {
    serde_json::json!({
        "event": "request",
        "token": r.token,
        "project": r.project,
        "version": r.version,
        "priority": r.priority,
        "collapse_key": r.collapse_key,
        "ttl": r.ttl,
        "data": r.data,
        "android_data": r.android_data,
        "validate_only": r.validate_only,
        "status": r.status,
        "error_status": r.error_status,
        "error_code": r.error_code,
        "name": r.name,
        "access_token": r.access_token,
        "connection": r.connection,
    })
}

fn token_line(t: &TokenRequest) -> serde_json::Value {
    serde_json::json!({
        "event": "token",
        "iss": t.iss,
        "kid": t.kid,
        "aud": t.aud,
        "scope": t.scope,
        "status": t.status,
        "error": t.error,
        "error_description": t.error_description,
        "access_token": t.access_token,
        "connection": t.connection,
    })
}

/// What answers the requests of one HTTP listener.
type Handler = fn(&MockFcm, &Method, &[&str], &[u8]) -> Response<Full<Bytes>>;

async fn http_loop(listener: TcpListener, mock: Arc<MockFcm>, handler: Handler) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!("control: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let mock = mock.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let mock = mock.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = match Limited::new(body, 64 * 1024).collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(_) => {
                            return Ok::<_, Infallible>(text(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                "too large\n",
                            ))
                        }
                    };
                    let path = parts.uri.path();
                    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
                    Ok(handler(&mock, &parts.method, &segments, &body))
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await
            {
                tracing::debug!("HTTP connection: {e}");
            }
        });
    }
}

fn control(
    mock: &MockFcm,
    method: &Method,
    segments: &[&str],
    body: &[u8],
) -> Response<Full<Bytes>> {
    let ok = || text(StatusCode::OK, "ok\n");
    match (method, segments) {
        (&Method::POST, ["behaviour", token, name]) => match name.parse::<Behaviour>() {
            Ok(b) => {
                mock.set_behaviour(token, b);
                ok()
            }
            Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        },
        (&Method::DELETE, ["behaviour", token]) => {
            mock.clear_behaviour(token);
            ok()
        }
        (&Method::POST, ["default", name]) => match name.parse::<Behaviour>() {
            Ok(b) => {
                mock.set_default_behaviour(b);
                ok()
            }
            Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        },
        (&Method::POST, ["expire-tokens"]) => {
            mock.expire_access_tokens();
            ok()
        }
        (&Method::POST, ["token-failure"]) => {
            let description = String::from_utf8_lossy(body).trim().to_string();
            if description.is_empty() {
                return text(
                    StatusCode::BAD_REQUEST,
                    "the body is the error_description, e.g. Invalid JWT Signature.\n",
                );
            }
            mock.set_token_failure(Some(&description));
            ok()
        }
        (&Method::DELETE, ["token-failure"]) => {
            mock.set_token_failure(None);
            ok()
        }
        (&Method::GET, ["requests"]) => json(&mock.requests()),
        (&Method::GET, ["requests", token]) => json(&mock.requests_for(token)),
        (&Method::GET, ["token-requests"]) => json(&mock.token_grants()),
        (&Method::DELETE, ["requests"]) => {
            mock.clear_requests();
            ok()
        }
        (&Method::GET, ["stats"]) => json(&stats(mock)),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The read-only listener: what a tester may look at, nothing they can change.
fn pushes(
    mock: &MockFcm,
    method: &Method,
    segments: &[&str],
    _body: &[u8],
) -> Response<Full<Bytes>> {
    match (method, segments) {
        (&Method::GET, ["pushes"]) => json(&mock.requests()),
        (&Method::GET, ["pushes", token]) => json(&mock.requests_for(token)),
        (&Method::GET, ["stats"]) => json(&stats(mock)),
        (&Method::GET, _) => text(
            StatusCode::NOT_FOUND,
            "not found: GET /pushes, /pushes/<token> or /stats\n",
        ),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "read-only\n"),
    }
}

fn stats(mock: &MockFcm) -> serde_json::Value {
    serde_json::json!({
        "connections_accepted": mock.connections_accepted(),
        "requests": mock.requests().len(),
        "token_requests": mock.token_requests(),
    })
}
