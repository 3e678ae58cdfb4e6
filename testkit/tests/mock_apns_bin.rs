//! The `mock-apns` binary: its stdout lines, `--quiet`, and the counts in `GET /stats`.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use testkit::apns::{provider_token, unix_now};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};

const TEAM: &str = "TEAM123456";
const KID: &str = "KEY1234567";
const TOPIC: &str = "im.knock.app";
const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const BODY: &str = r#"{"aps":{"alert":{"title":"New message"},"mutable-content":1}}"#;
const WAIT: Duration = Duration::from_secs(20);

struct Running {
    child: Child,
    stdout: BufReader<ChildStdout>,
    url: String,
    control: String,
    ca_pem: String,
    private_pem: String,
    _dir: tempfile::TempDir,
}

async fn start(quiet: bool) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.p8");
    let ca = dir.path().join("ca.pem");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mock-apns"));
    cmd.args(["--team-id", TEAM, "--key-id", KID, "--topic", TOPIC])
        .args(["--control", "127.0.0.1:0"])
        .arg("--private-key-out")
        .arg(&key)
        .arg("--ca-out")
        .arg(&ca)
        .args([
            "--behaviour",
            &format!("{}=unregistered", TOKEN.replace('0', "2")),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if quiet {
        cmd.arg("--quiet");
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(WAIT, stdout.read_line(&mut line))
        .await
        .expect("mock-apns to listen")
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"], "listening", "{line}");
    Running {
        child,
        stdout,
        url: v["url"].as_str().unwrap().to_string(),
        control: v["control"].as_str().unwrap().to_string(),
        ca_pem: std::fs::read_to_string(&ca).unwrap(),
        private_pem: std::fs::read_to_string(&key).unwrap(),
        _dir: dir,
    }
}

impl Running {
    /// Sends pushes on one HTTP/2 connection, with one JWT; returns the statuses.
    async fn push(&self, tokens: &[String]) -> Vec<u16> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let addr = self.url.strip_prefix("https://").unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let jwt = provider_token(&self.private_pem, KID, TEAM, unix_now()).unwrap();
        let mut statuses = Vec::new();
        for token in tokens {
            let req = Request::builder()
                .method("POST")
                .uri(format!("{}/3/device/{token}", self.url))
                .header("authorization", format!("bearer {jwt}"))
                .header("apns-topic", TOPIC)
                .header("apns-push-type", "alert")
                .header("apns-priority", "10")
                .header("apns-expiration", "0")
                .header("apns-collapse-id", "knock-c1")
                .body(Full::new(Bytes::from(BODY)))
                .unwrap();
            send.ready().await.unwrap();
            let resp = send.send_request(req).await.unwrap();
            statuses.push(resp.status().as_u16());
            let _ = resp.into_body().collect().await.unwrap();
        }
        statuses
    }

    /// One HTTP/1.1 request to the control listener; the response body.
    async fn control(&self, method: &str, path: &str) -> String {
        let addr = self.control.strip_prefix("http://").unwrap();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut resp = String::new();
        tokio::time::timeout(WAIT, tcp.read_to_string(&mut resp))
            .await
            .unwrap()
            .unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        resp.split_once("\r\n\r\n").unwrap().1.to_string()
    }

    async fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.control("GET", "/stats").await).unwrap()
    }

    /// The next `n` lines on stdout, as JSON.
    async fn lines(&mut self, n: usize) -> Vec<serde_json::Value> {
        let mut lines = Vec::new();
        for _ in 0..n {
            let mut line = String::new();
            tokio::time::timeout(WAIT, self.stdout.read_line(&mut line))
                .await
                .expect("a request line")
                .unwrap();
            lines.push(serde_json::from_str(&line).unwrap());
        }
        lines
    }

    /// Stops the process and returns what else it printed on stdout.
    async fn stop(mut self) -> String {
        self.child.kill().await.unwrap();
        let mut rest = String::new();
        tokio::time::timeout(WAIT, self.stdout.read_to_string(&mut rest))
            .await
            .unwrap()
            .unwrap();
        rest
    }
}

fn tokens() -> Vec<String> {
    let mut tokens: Vec<String> = (1..=5).map(|i| format!("{i:064x}")).collect();
    tokens.push(TOKEN.replace('0', "2"));
    tokens
}

#[tokio::test]
async fn quiet_prints_and_records_nothing_but_counts() {
    let mock = start(true).await;
    let statuses = mock.push(&tokens()).await;
    assert_eq!(statuses, [200, 200, 200, 200, 200, 410]);

    let stats = mock.stats().await;
    assert_eq!(stats["requests"], 0, "{stats}");
    assert_eq!(stats["recording"], false, "{stats}");
    assert_eq!(stats["requests_answered"], 6, "{stats}");
    assert_eq!(stats["requests_ok"], 5, "{stats}");
    assert_eq!(stats["requests_cancelled"], 0, "{stats}");
    assert_eq!(
        stats["requests_by_status"],
        serde_json::json!({"200": 5, "410": 1}),
        "{stats}"
    );
    assert_eq!(stats["connections_accepted"], 1, "{stats}");
    assert_eq!(stats["provider_tokens_seen"], 1, "{stats}");
    assert_eq!(stats["provider_token_verifications"], 1, "{stats}");
    assert_eq!(mock.control("GET", "/requests").await, "[]");

    // Recording can be switched on while it runs.
    mock.control("POST", "/recording/on").await;
    assert_eq!(mock.push(&tokens()[..1]).await, [200]);
    let stats = mock.stats().await;
    assert_eq!(
        (&stats["requests"], &stats["requests_answered"]),
        (&serde_json::json!(1), &serde_json::json!(7)),
        "{stats}"
    );
    assert_eq!(stats["recording"], true, "{stats}");

    // Quiet: nothing after the listening line.
    assert_eq!(mock.stop().await, "");
}

#[tokio::test]
async fn not_quiet_prints_and_records_every_request() {
    let mut mock = start(false).await;
    let statuses = mock.push(&tokens()).await;
    assert_eq!(statuses, [200, 200, 200, 200, 200, 410]);

    let stats = mock.stats().await;
    assert_eq!(stats["requests"], 6, "{stats}");
    assert_eq!(stats["recording"], true, "{stats}");
    assert_eq!(stats["requests_answered"], 6, "{stats}");
    assert_eq!(stats["requests_ok"], 5, "{stats}");
    let recorded: Vec<serde_json::Value> =
        serde_json::from_str(&mock.control("GET", "/requests").await).unwrap();
    assert_eq!(recorded.len(), 6);

    // Stopping recording leaves what was recorded and keeps counting.
    mock.control("POST", "/recording/off").await;
    assert_eq!(mock.push(&tokens()[..1]).await, [200]);
    let stats = mock.stats().await;
    assert_eq!(
        (&stats["requests"], &stats["requests_answered"]),
        (&serde_json::json!(6), &serde_json::json!(7)),
        "{stats}"
    );

    // The subscriber printing lines still sees requests while not recording.
    let lines = mock.lines(7).await;
    assert!(lines.iter().all(|l| l["event"] == "request"), "{lines:?}");
    assert_eq!(lines[5]["status"], 410);
    // Every line carries what was asked of APNs, not only the answer.
    let first = &lines[0];
    assert_eq!(first["token"], tokens()[0], "{first}");
    assert_eq!(first["topic"], TOPIC, "{first}");
    assert_eq!(first["push_type"], "alert", "{first}");
    assert_eq!(first["priority"], "10", "{first}");
    assert_eq!(first["expiration"], "0", "{first}");
    assert_eq!(first["collapse_id"], "knock-c1", "{first}");
    assert_eq!(first["body"], BODY, "{first}");
    assert_eq!(
        first["authority"],
        mock.url.strip_prefix("https://").unwrap(),
        "{first}"
    );
    assert_eq!(first["status"], 200, "{first}");
    assert_eq!(lines[6]["token"], tokens()[0]);
    assert_eq!(mock.stop().await, "");
}
