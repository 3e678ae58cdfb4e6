//! `/health`: is knock able to do its job right now? Yes when the component link is up and the store
//! answers a read; otherwise 503 with a one-line JSON reason a human or a probe can read. A standby (the
//! server refuses it because another knock holds the component) is doing its job too, waiting to take over:
//! 200 with `"status":"standby"`, so a container runtime or orchestrator that restarts unhealthy instances
//! leaves it alone. Whether *some* instance serves is a question for monitoring across instances
//! (`knock_component_link_up`), which no single instance can answer.
//!
//! Also the store reads `/metrics` needs. Both run on the blocking pool, bounded in time: sled is
//! synchronous, and a count may scan while the publish index is rebuilt, which must not stall the one
//! thread that serves the link.

use std::sync::Arc;
use std::time::Duration;

use crate::store::Store;

/// How long a store read may take before the store counts as not answering.
pub const STORE_DEADLINE: Duration = Duration::from_secs(2);

/// Why the store check failed; fixed texts, so no store error detail (a path, a key) reaches the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreProblem {
    /// The read returned an error.
    Failed,
    /// The read did not finish within [`STORE_DEADLINE`].
    Timeout,
}

/// Read one key that no registration has: it goes through sled, not just the in-memory index.
pub async fn probe_store(store: Arc<dyn Store>) -> Result<(), StoreProblem> {
    // Nodes are random and never empty, so this finds nothing; only whether the read succeeds matters.
    let read = tokio::task::spawn_blocking(move || store.get("").map(drop));
    match tokio::time::timeout(STORE_DEADLINE, read).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(error))) => {
            tracing::warn!(%error, "health check: the store failed a read");
            Err(StoreProblem::Failed)
        }
        // The blocking task panicked or was cancelled at shutdown.
        Ok(Err(_)) => Err(StoreProblem::Failed),
        Err(_) => Err(StoreProblem::Timeout),
    }
}

/// How many registrations the store holds, or `None` if it cannot say in time.
pub async fn stored_registrations(store: Arc<dyn Store>) -> Option<u64> {
    let count = tokio::task::spawn_blocking(move || store.len());
    match tokio::time::timeout(STORE_DEADLINE, count).await {
        Ok(Ok(Ok(n))) => u64::try_from(n).ok(),
        Ok(Ok(Err(error))) => {
            tracing::debug!(%error, "metrics: the store could not count registrations");
            None
        }
        _ => None,
    }
}

/// The answer to `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Link up, store answering.
    Healthy,
    /// Another knock holds the component; this one's store answers, so it can serve the moment it takes
    /// over. A 200: restarting it would only lose the standby.
    Standby,
    /// Something is wrong; the reason says what (the link first: it is what an operator can fix fastest).
    Unhealthy(&'static str),
}

impl Verdict {
    /// Judge from the link state (up, or standing by for another knock) and the store probe.
    pub fn of(link_up: bool, standby: bool, store: Result<(), StoreProblem>) -> Verdict {
        match (link_up, store) {
            (true, Ok(())) => Verdict::Healthy,
            (false, Ok(())) if standby => Verdict::Standby,
            (false, Ok(())) => Verdict::Unhealthy("the component link to the XMPP server is down"),
            (false, Err(_)) => {
                Verdict::Unhealthy("the component link is down and the store does not answer")
            }
            (true, Err(StoreProblem::Failed)) => Verdict::Unhealthy("the store failed a read"),
            (true, Err(StoreProblem::Timeout)) => {
                Verdict::Unhealthy("the store did not answer a read within 2 s")
            }
        }
    }

    /// Whether this is a 200.
    pub fn healthy(self) -> bool {
        matches!(self, Verdict::Healthy | Verdict::Standby)
    }

    /// The body: one line of JSON, `{"status":"ok"}`, `{"status":"standby","reason":"..."}` or
    /// `{"status":"unavailable","reason":"..."}`.
    pub fn json(self) -> String {
        let value = match self {
            Verdict::Healthy => serde_json::json!({ "status": "ok" }),
            Verdict::Standby => serde_json::json!({
                "status": "standby",
                "reason": "another knock holds the component; this one takes over when it lets go",
            }),
            Verdict::Unhealthy(reason) => {
                serde_json::json!({ "status": "unavailable", "reason": reason })
            }
        };
        value.to_string()
    }
}

/// Why `knock healthcheck` says knock is not healthy.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Nothing answered, or not in time.
    #[error("no answer from {addr}: {source}")]
    Unreachable {
        /// Where it asked.
        addr: std::net::SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// knock answered, but not healthy (or not HTTP).
    #[error("{0}")]
    Unhealthy(String),
}

/// `knock healthcheck`: ask a running knock's `/health` at `addr` (an unspecified address means this
/// host's loopback). `Ok` with the body when it answers 200. Blocking and bounded: it runs alone, as a
/// container's health probe, where no shell or HTTP client may exist.
pub fn check(addr: std::net::SocketAddr, timeout: Duration) -> Result<String, CheckError> {
    use std::io::{Read, Write};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let unreachable = |source| CheckError::Unreachable { addr, source };
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(unreachable)?;
    stream
        .write_all(
            format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(unreachable)?;
    let mut response = Vec::new();
    // The answer is a status line, a few headers and a one-line JSON body.
    stream
        .take(64 * 1024)
        .read_to_end(&mut response)
        .map_err(unreachable)?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .filter(|_| text.starts_with("HTTP/1."));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim())
        .unwrap_or("");
    match status {
        Some("200") => Ok(body.to_owned()),
        Some(status) => Err(CheckError::Unhealthy(format!(
            "/health answered {status}: {body}"
        ))),
        None => Err(CheckError::Unhealthy("the answer is not HTTP".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_with_the_link_up_and_the_store_answering() {
        assert!(Verdict::of(true, false, Ok(())).healthy());
        for (link, standby, store) in [
            (false, false, Ok(())),
            (true, false, Err(StoreProblem::Failed)),
            (true, false, Err(StoreProblem::Timeout)),
            (false, false, Err(StoreProblem::Timeout)),
            (false, true, Err(StoreProblem::Failed)),
        ] {
            let verdict = Verdict::of(link, standby, store);
            assert!(!verdict.healthy(), "{link} {standby} {store:?}");
            let body: serde_json::Value =
                serde_json::from_str(&verdict.json()).expect("the body is JSON");
            assert_eq!(body["status"], "unavailable");
            assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()));
            assert!(!verdict.json().contains('\n'), "one line");
        }
        assert_eq!(
            Verdict::of(true, false, Ok(())).json(),
            r#"{"status":"ok"}"#
        );
        assert!(Verdict::of(false, false, Ok(())).json().contains("link"));
    }

    #[test]
    fn a_standby_with_a_store_is_a_200_that_says_standby() {
        let verdict = Verdict::of(false, true, Ok(()));
        assert!(verdict.healthy(), "an orchestrator must not restart it");
        let body: serde_json::Value =
            serde_json::from_str(&verdict.json()).expect("the body is JSON");
        assert_eq!(body["status"], "standby");
        assert!(body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("another knock")));
    }

    #[tokio::test]
    async fn a_real_store_answers_the_probe_and_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SledStore::open(dir.path()).expect("store opens"));
        assert_eq!(probe_store(store.clone()).await, Ok(()));
        assert_eq!(stored_registrations(store).await, Some(0));
    }
}
