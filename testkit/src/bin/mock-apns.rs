//! `mock-apns`: runs testkit's mock of Apple's APNs provider API as a process, for manual runs,
//! benchmarks and tests in other languages.
//!
//! It prints one JSON line on stdout when listening (`"event":"listening"`), then one per
//! request answered (`"event":"request"`, with the token, `:authority`, topic, push type,
//! priority, expiration, collapse id, body, status, reason, apns-id and connection) unless
//! `--quiet`, which also stops recording requests (for benchmarks: only counts are kept, see
//! `GET /stats`). Per-token behaviour is set with
//! `--behaviour` or, while it runs, through an optional loopback HTTP/1.1 control listener:
//!
//! - `POST /behaviour/<token>/<name>`, `DELETE /behaviour/<token>`, `POST /default/<name>`
//!   (names as `ok`, `unregistered`, `throttled`, `delay:<ms>:<name>`, `fail-times:<n>:<name>`,
//!   `custom:<status>:<Reason>`, ...)
//! - `GET /requests`, `GET /requests/<token>` (JSON arrays), `DELETE /requests`
//! - `POST /recording/on`, `POST /recording/off` (whether requests are kept for `/requests`)
//! - `POST /goaway`, `POST /kill`
//! - `GET /stats`: `{"connections_accepted", "requests" (recorded), "provider_tokens_seen",
//!   "requests_answered", "requests_ok", "requests_cancelled", "requests_by_status"
//!   (`{"200": n, ...}`), "provider_token_verifications", "recording"}`
//!
//! `--pushes-listen ADDR` adds a read-only HTTP/1.1 listener, on any address (a container's, say), for
//! people to see what their app would have got: `GET /pushes`, `GET /pushes/<token>` (JSON arrays of the
//! pushes received, as `/requests` has them) and `GET /stats`. Nothing can be changed through it.
//!
//! It runs until SIGINT or SIGTERM.

use std::convert::Infallible;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use testkit::apns::{Behaviour, MockApns, MockApnsConfig, ReceivedPush};
use testkit::cli::{json, parse_token_behaviour, print_line, text};
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;

#[derive(Parser, Debug)]
#[command(
    name = "mock-apns",
    about = "A mock of Apple's APNs provider API (HTTP/2 + TLS + ES256 JWT)"
)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Apple developer team id expected as the JWT `iss`.
    #[arg(long, default_value = "")]
    team_id: String,
    /// Key id expected as the JWT header `kid`.
    #[arg(long, default_value = "")]
    key_id: String,
    /// ES256 public key (SPKI PEM) that verifies provider JWTs. Without it a fresh key pair is
    /// made, and its private half written to --private-key-out.
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// Where to write a freshly made .p8-style private key (when --public-key is not given).
    #[arg(long)]
    private_key_out: Option<PathBuf>,
    /// Allowed apns-topic (bundle id); repeatable. A VoIP app's PushKit topic (`<bundle id>.voip`) is a
    /// topic of its own: list it too.
    #[arg(long = "topic", required = true)]
    topics: Vec<String>,
    /// Require TLS client certificates signed by this CA (PEM) instead of JWTs.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Where to write the PEM of the CA that signed the server certificate.
    #[arg(long)]
    ca_out: Option<PathBuf>,
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
    /// A DNS name for the TLS certificate besides localhost and the loopback addresses; repeatable.
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
    /// No JSON line per request on stdout (the listening line is still printed), and requests
    /// are not recorded, only counted (see GET /stats); for benchmarks.
    #[arg(long)]
    quiet: bool,
}

// One thread, like knock: a benchmark's mock should not spend its CPU waking threads.
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

    let public_key_pem = match (&args.public_key, &args.client_ca) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --public-key {}", path.display()))?,
        (None, Some(_)) if args.private_key_out.is_none() => String::new(),
        (None, _) => {
            let out = args
                .private_key_out
                .as_ref()
                .context("give --public-key, or --private-key-out to have a key pair made")?;
            let (private_pem, public_pem) = testkit::apns::generate_apns_key();
            std::fs::write(out, private_pem)
                .with_context(|| format!("writing --private-key-out {}", out.display()))?;
            public_pem
        }
    };
    let client_ca_pem = match &args.client_ca {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading --client-ca {}", path.display()))?,
        ),
        None => None,
    };

    let mock = MockApns::start_on(
        args.listen,
        MockApnsConfig {
            team_id: args.team_id.clone(),
            key_id: args.key_id.clone(),
            public_key_pem,
            topics: args.topics.clone(),
            client_ca_pem,
            more_keys: Vec::new(),
            server_names: args.tls_names.clone(),
        },
    )
    .await?;
    if let Some(path) = &args.ca_out {
        std::fs::write(path, mock.ca_pem())
            .with_context(|| format!("writing --ca-out {}", path.display()))?;
    }
    mock.set_recording(!args.quiet);
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

    // Quiet, nothing subscribes: then the mock builds no per-request record at all.
    let events = (!args.quiet).then(|| mock.subscribe());
    print_line(&serde_json::json!({
        "event": "listening",
        "url": mock.url(),
        "control": control_addr.map(|a| format!("http://{a}")),
        "pushes": pushes_addr.map(|a| format!("http://{a}/pushes")),
        "ca_file": args.ca_out,
    }));
    let logger = events.map(|mut events| {
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(push) => print_line(&request_line(&push)),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!("request log fell behind; {n} requests not printed")
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        })
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    if let Some(logger) = logger {
        logger.abort();
    }
    for task in tasks {
        task.abort();
        let _ = task.await;
    }
    // A control connection still open may hold a handle; then just say GOAWAY and exit.
    match Arc::try_unwrap(mock) {
        Ok(mock) => mock.shutdown().await,
        Err(mock) => mock.send_goaway(),
    }
    Ok(())
}

fn request_line(p: &ReceivedPush) -> serde_json::Value {
    serde_json::json!({
        "event": "request",
        "token": p.token,
        "authority": p.authority,
        "topic": p.topic,
        "push_type": p.push_type,
        "priority": p.priority,
        "expiration": p.expiration,
        "collapse_id": p.collapse_id,
        "body": p.body,
        "status": p.status,
        "reason": p.reason,
        "apns_id": p.apns_id,
        "connection": p.connection,
    })
}

/// What answers the requests of one HTTP listener.
type Handler = fn(&MockApns, Request<Incoming>) -> Response<Full<Bytes>>;

async fn http_loop(listener: TcpListener, mock: Arc<MockApns>, handler: Handler) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!("control: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let mock = mock.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let mock = mock.clone();
                async move { Ok::<_, Infallible>(handler(&mock, req)) }
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

fn control(mock: &MockApns, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::POST, ["behaviour", token, name]) => match name.parse::<Behaviour>() {
            Ok(b) => {
                mock.set_behaviour(token, b);
                text(StatusCode::OK, "ok\n")
            }
            Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        },
        (&Method::DELETE, ["behaviour", token]) => {
            mock.clear_behaviour(token);
            text(StatusCode::OK, "ok\n")
        }
        (&Method::POST, ["default", name]) => match name.parse::<Behaviour>() {
            Ok(b) => {
                mock.set_default_behaviour(b);
                text(StatusCode::OK, "ok\n")
            }
            Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        },
        (&Method::GET, ["requests"]) => json(&mock.requests()),
        (&Method::GET, ["requests", token]) => json(&mock.requests_for(token)),
        (&Method::DELETE, ["requests"]) => {
            mock.clear_requests();
            text(StatusCode::OK, "ok\n")
        }
        (&Method::POST, ["recording", on @ ("on" | "off")]) => {
            mock.set_recording(*on == "on");
            text(StatusCode::OK, "ok\n")
        }
        (&Method::POST, ["goaway"]) => {
            mock.send_goaway();
            text(StatusCode::OK, "ok\n")
        }
        (&Method::POST, ["kill"]) => {
            mock.kill_connections();
            text(StatusCode::OK, "ok\n")
        }
        (&Method::GET, ["stats"]) => json(&stats(mock)),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The read-only listener: what a tester may look at, nothing they can change.
fn pushes(mock: &MockApns, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
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

/// `GET /stats`.
fn stats(mock: &MockApns) -> serde_json::Value {
    let counts = mock.request_counts();
    let by_status: serde_json::Map<String, serde_json::Value> = counts
        .by_status
        .iter()
        .map(|(status, n)| (status.to_string(), (*n).into()))
        .collect();
    serde_json::json!({
        "connections_accepted": mock.connections_accepted(),
        // Recorded requests (stops growing while not recording).
        "requests": mock.requests_recorded(),
        "provider_tokens_seen": mock.provider_tokens_seen(),
        "requests_answered": counts.answered,
        "requests_ok": counts.ok,
        "requests_cancelled": counts.cancelled,
        "requests_by_status": by_status,
        "provider_token_verifications": mock.provider_token_verifications(),
        "recording": mock.is_recording(),
    })
}
