//! Scraping knock's admin listener in tests: a bare HTTP/1.1 client, a reader for the Prometheus text format,
//! and [`Scrape`], which gives a [`Harness`] started with [`Options::admin`](super::harness::Options) its
//! `/metrics` and `/health`. Tests include it with `#[path = "common/admin.rs"] mod admin;` beside `mod common;`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::harness::{Harness, WAIT};

/// The admin endpoints of a knock started with an admin listener.
#[allow(async_fn_in_trait)]
pub trait Scrape {
    /// Where the listener is.
    fn admin_addr(&self) -> SocketAddr;
    /// knock's log, for failure messages.
    fn log(&self) -> String;

    /// Wait until the listener accepts connections.
    async fn wait_for_admin(&self) {
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(self.admin_addr()).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the admin listener never came up\n--- knock log ---\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET path` on the admin listener: (status, body).
    async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin_addr(), path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n--- knock log ---\n{}", self.log()))
    }

    /// `/metrics`, checked to be 200 and read into `series -> value`; also the raw text.
    async fn metrics(&self) -> (Metrics, String) {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        (Metrics::parse(&body), body)
    }

    /// `/health`: the status and the JSON body.
    async fn health(&self) -> (u16, serde_json::Value) {
        let (status, body) = self.get("/health").await;
        assert_eq!(body.lines().count(), 1, "one line: {body:?}");
        let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        (status, json)
    }

    /// Scrape until `series` reads `value`, for states that settle a moment after the event (the link).
    async fn wait_for_metric(&self, series: &str, value: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (m, text) = self.metrics().await;
            if m.get(series) == Some(value) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} never became {value}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Scrape for Harness {
    fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("knock was started with Options::admin")
    }

    fn log(&self) -> String {
        self.log_text()
    }
}

/// A loopback port nobody listens on right now (the OS picks it; knock binds it a moment later).
pub fn free_port() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    probe.local_addr().expect("probe address")
}

/// One HTTP/1.1 GET with `Connection: close`; knock's bodies carry a `content-length`, not chunks.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .map_err(|_| bad("no complete answer in time"))??;
    let text = String::from_utf8(raw).map_err(|_| bad("not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Err(bad("chunked body"));
    }
    Ok((status, body.to_owned()))
}

/// The samples of one scrape: `series` (name and labels, exactly as exposed) -> value.
#[derive(Debug)]
pub struct Metrics(HashMap<String, f64>);

impl Metrics {
    /// Read the Prometheus text format, skipping comments.
    pub fn parse(text: &str) -> Metrics {
        Metrics(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .map(|l| {
                    let (series, value) = l.rsplit_once(' ').expect("a sample has a value");
                    (series.to_owned(), value.parse().expect("a numeric value"))
                })
                .collect(),
        )
    }

    /// A counter or gauge, as an integer.
    pub fn get(&self, series: &str) -> Option<u64> {
        self.0.get(series).map(|v| *v as u64)
    }

    /// Every series, for a failure message.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.0.keys().map(String::as_str).collect();
        names.sort();
        names
    }
}
