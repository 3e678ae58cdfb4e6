//! The real `knock` binary with its admin listener on, between testkit's XEP-0114 server stand-in and mock
//! APNs, plus a bare HTTP/1.1 client and a reader for the Prometheus text format. For `tests/admin.rs`; any
//! test that needs a knock process with `[admin]` can include it (`#[path = "common/admin.rs"] mod ...`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use testkit::apns::{generate_apns_key, MockApns, MockApnsConfig};
use testkit::server::{ComponentConn, ComponentServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEAM_ID: &str = "TEAM123456";
const KEY_ID: &str = "KEYID12345";
const TOPIC: &str = "im.knock.test";
const COMPONENT_SECRET: &str = "component-secret";
/// How long anything may take before a test gives up.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running knock, its peers, and its files. Killed on drop.
pub struct Knock {
    /// Holds the config, the store and the log; removed on drop.
    _dir: tempfile::TempDir,
    /// The XMPP server stand-in knock connects to.
    pub server: ComponentServer,
    /// The APNs stand-in knock pushes to.
    pub apns: MockApns,
    /// Where `/metrics` and `/health` are served.
    pub admin: SocketAddr,
    /// knock's stderr, at debug level.
    log: PathBuf,
    /// The process.
    child: Child,
}

impl Knock {
    /// Start knock with `limits` as the body of its `[limits]` table and the admin listener on a free
    /// loopback port, and wait until the listener answers.
    pub async fn start(limits: &str) -> Knock {
        let knock = Knock::spawn(limits, free_port()).await;
        knock.wait_for_admin().await;
        knock
    }

    /// Start knock with its admin listener on `admin`; do not wait for anything.
    pub async fn spawn(limits: &str, admin: SocketAddr) -> Knock {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = ComponentServer::bind("push.localhost", COMPONENT_SECRET)
            .await
            .expect("bind the component listener");
        let (p8, public_pem) = generate_apns_key();
        std::fs::write(dir.path().join("AuthKey.p8"), p8).expect("write key");
        let apns = MockApns::start(MockApnsConfig::token_auth(
            TEAM_ID,
            KEY_ID,
            public_pem,
            &[TOPIC],
        ))
        .await
        .expect("start mock APNs");
        let ca = apns.write_ca_file(dir.path()).expect("write CA");
        let config = dir.path().join("knock.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[component]
jid = "push.localhost"
server = "{server}"
secret = "{COMPONENT_SECRET}"

[store]
path = "store"

[limits]
{limits}

[admin]
listen = "{admin}"

[[apns]]
name = "chat"
topic = "{TOPIC}"
endpoint = "{url}"
ca_file = "{ca}"

[apns.auth]
key_file = "AuthKey.p8"
key_id = "{KEY_ID}"
team_id = "{TEAM_ID}"
"#,
                server = server.addr(),
                url = apns.url(),
                ca = ca.display(),
            ),
        )
        .expect("write config");
        let log = dir.path().join("knock.log");
        let child = Command::new(env!("CARGO_BIN_EXE_knock"))
            .args(["run", "--config"])
            .arg(&config)
            .env("KNOCK_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"))
            .spawn()
            .expect("spawn knock");
        Knock {
            _dir: dir,
            server,
            apns,
            admin,
            log,
            child,
        }
    }

    /// Wait up to [`WAIT`] for knock to exit by itself.
    pub async fn exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for knock") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "knock did not exit\n--- knock log ---\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, and wait for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
        self.exit().await
    }

    /// knock's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Complete knock's next handshake.
    pub async fn accept(&self) -> ComponentConn {
        match self.server.accept_timeout(WAIT).await {
            Ok(conn) => conn,
            Err(e) => panic!(
                "knock did not connect: {e}\n--- knock log ---\n{}",
                self.log_text()
            ),
        }
    }

    async fn wait_for_admin(&self) {
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(self.admin).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the admin listener never came up\n--- knock log ---\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET path` on the admin listener: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n--- knock log ---\n{}", self.log_text()))
    }

    /// `/metrics`, checked to be 200 and read into `series -> value`; also the raw text.
    pub async fn metrics(&self) -> (Metrics, String) {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        (Metrics::parse(&body), body)
    }

    /// `/health`: the status and the JSON body.
    pub async fn health(&self) -> (u16, serde_json::Value) {
        let (status, body) = self.get("/health").await;
        assert_eq!(body.lines().count(), 1, "one line: {body:?}");
        let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        (status, json)
    }

    /// Scrape until `series` reads `value`, for states that settle a moment after the event (the link).
    pub async fn wait_for_metric(&self, series: &str, value: u64) {
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

impl Drop for Knock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
