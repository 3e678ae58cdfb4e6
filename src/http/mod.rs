//! The HTTP admin listener: `/metrics` (Prometheus text format) and `/health`, for operators and their
//! monitoring. Off unless `[admin] listen` is set; it has no authentication, so it belongs on loopback.
//!
//! It only reads: the counters in [`crate::stats`] and, per request, the store (off the runtime's thread, on
//! the blocking pool, since a count may scan while the publish index is still being rebuilt). It never
//! changes knock's state and never shows a node, token, secret or JID.
//!
//! Why knock writes the text format itself instead of using `metrics` + `metrics-exporter-prometheus` or
//! `prometheus`: the counters already exist as plain atomics bumped by the handlers, and a publish must stay
//! one relaxed atomic add (~100k publishes/s on one thread). Both crates can do that only through handles
//! registered up front, and both add a registry, locks and several crates for what is here ~200 lines of
//! formatting over a [`crate::stats::Snapshot`]. The HTTP side is axum (the choice) without default
//! features: it reuses the hyper 1, hyper-util and tokio already in the build and adds eight small crates.

pub mod health;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::app::App;
use crate::shutdown::Shutdown;

/// Why the admin listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("cannot listen on {addr} (admin.listen): {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// The content type of the Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bind `addr` and serve `/metrics` and `/health` until `shutdown`. Binding happens before this returns, so a
/// taken port stops knock at start instead of leaving it running unmonitored.
pub async fn start(
    app: Arc<App>,
    addr: SocketAddr,
    mut shutdown: Shutdown,
) -> Result<JoinHandle<()>, AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    if !bound.ip().is_loopback() {
        tracing::warn!(
            listen = %bound,
            "THE ADMIN LISTENER IS NOT ON LOOPBACK: /metrics and /health have no authentication and \
             anyone who can reach this address can read them; set admin.listen to 127.0.0.1 or [::1] \
             unless a firewall or proxy guards it"
        );
    }
    tracing::info!(listen = %bound, "admin listener up: /metrics, /health");
    let router = Router::new()
        .route("/metrics", get(metrics_endpoint))
        .route("/health", get(health_endpoint))
        .with_state(app);
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.recv().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin listener failed");
        }
    }))
}

/// `GET /metrics`: every counter and gauge, read once.
async fn metrics_endpoint(State(app): State<Arc<App>>) -> Response {
    let stored = health::stored_registrations(app.store.clone()).await;
    // From the in-memory index: no disk read, so no need for the blocking pool.
    let by_app = app.store.counts_by_app().ok().flatten();
    let body = metrics::render(&app.stats.snapshot(), stored, by_app.as_deref());
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response()
}

/// `GET /health`: 200 when the link is up (or stands by for another knock) and the store answers, 503
/// otherwise; a one-line JSON body.
async fn health_endpoint(State(app): State<Arc<App>>) -> Response {
    let store = health::probe_store(app.store.clone()).await;
    let verdict = health::Verdict::of(app.stats.is_link_up(), app.stats.is_link_standby(), store);
    let status = if verdict.healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        verdict.json(),
    )
        .into_response()
}
