//! The `mock-fcm` binary, used as knock will use Google: read the service account file it wrote, sign the
//! assertion from it, get an access token from its `token_uri`, send over HTTP/2; and its stdout lines,
//! control and read-only listeners.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};

const PROJECT: &str = "knock-bin-test";
const TOKEN: &str = "dTxbVurMB3E:APA91bFs-registration-token";
const WAIT: Duration = Duration::from_secs(20);

struct Running {
    _child: Child,
    stdout: BufReader<ChildStdout>,
    listening: Value,
    account: Value,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let sa = dir.path().join("sa.json");
    let ca = dir.path().join("ca.pem");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-fcm"))
        .args(["--project", PROJECT, "--access-token-lifetime", "600"])
        .args(["--control", "127.0.0.1:0", "--pushes-listen", "127.0.0.1:0"])
        .arg("--service-account-out")
        .arg(&sa)
        .arg("--ca-out")
        .arg(&ca)
        .args(["--behaviour", "gone:APA91b=unregistered"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(WAIT, stdout.read_line(&mut line))
        .await
        .expect("mock-fcm to listen")
        .unwrap();
    let listening: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(listening["event"], "listening", "{line}");
    Running {
        _child: child,
        stdout,
        listening,
        account: serde_json::from_str(&std::fs::read_to_string(&sa).unwrap()).unwrap(),
        ca_pem: std::fs::read_to_string(&ca).unwrap(),
        _dir: dir,
    }
}

struct Reply {
    status: u16,
    body: Value,
}

impl Running {
    fn url(&self, key: &str) -> String {
        self.listening[key].as_str().unwrap().to_string()
    }

    async fn connect(&self) -> SendRequest<Full<Bytes>> {
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
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let url = self.url("url");
        let addr = url.strip_prefix("https://").unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        send
    }

    /// Signs the assertion as Google's libraries do, from the key file alone.
    fn assertion(&self) -> String {
        let a = &self.account;
        let key =
            jsonwebtoken::EncodingKey::from_rsa_pem(a["private_key"].as_str().unwrap().as_bytes())
                .unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(a["private_key_id"].as_str().unwrap().to_string());
        let now = testkit::fcm::unix_now();
        let claims = json!({
            "iss": a["client_email"], "scope": testkit::fcm::FCM_SCOPE, "aud": a["token_uri"],
            "iat": now, "exp": now + 3600,
        });
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    async fn post(
        c: &mut SendRequest<Full<Bytes>>,
        uri: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> Reply {
        let mut b = Request::post(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        c.ready().await.unwrap();
        let resp = c
            .send_request(b.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        }
    }

    async fn access_token(&self, c: &mut SendRequest<Full<Bytes>>) -> String {
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={}",
            self.assertion()
        );
        let uri = self.account["token_uri"].as_str().unwrap().to_string();
        let r = Self::post(
            c,
            &uri,
            &[("content-type", "application/x-www-form-urlencoded")],
            form,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["expires_in"], 600);
        r.body["access_token"].as_str().unwrap().to_string()
    }

    async fn send(&self, c: &mut SendRequest<Full<Bytes>>, at: &str, token: &str) -> Reply {
        let body = json!({"message": {"token": token, "data": {"account": "ab"},
            "android": {"priority": "HIGH", "ttl": "60s"}}});
        let bearer = format!("Bearer {at}");
        Self::post(
            c,
            &self.url("send_url"),
            &[
                ("authorization", &bearer),
                ("content-type", "application/json; UTF-8"),
            ],
            body.to_string(),
        )
        .await
    }

    /// One HTTP/1.1 request to a plain listener; status and body.
    async fn http(&self, base: &str, method: &str, path: &str) -> (u16, String) {
        let addr = base.strip_prefix("http://").unwrap();
        let addr = addr.split('/').next().unwrap();
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
        let status = resp[9..12].parse().unwrap();
        (status, resp.split_once("\r\n\r\n").unwrap().1.to_string())
    }

    async fn next_line(&mut self) -> Value {
        let mut line = String::new();
        tokio::time::timeout(WAIT, self.stdout.read_line(&mut line))
            .await
            .expect("a line")
            .unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

#[tokio::test]
async fn the_binary_serves_the_account_it_wrote() {
    let mut m = start().await;
    let a = &m.account;
    assert_eq!(a["type"], "service_account");
    assert_eq!(a["project_id"], PROJECT);
    assert_eq!(a["token_uri"], m.listening["token_uri"]);
    assert_eq!(a["client_email"], m.listening["client_email"]);

    let mut c = m.connect().await;
    let at = m.access_token(&mut c).await;
    let line = m.next_line().await;
    assert_eq!(
        (line["event"].as_str(), line["status"].as_u64()),
        (Some("token"), Some(200)),
        "{line}"
    );

    let r = m.send(&mut c, &at, TOKEN).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let line = m.next_line().await;
    assert_eq!(line["event"], "request");
    assert_eq!(line["token"], TOKEN);
    assert_eq!(line["priority"], "HIGH");
    assert_eq!(line["ttl"], "60s");
    assert_eq!(line["data"], json!({"account": "ab"}));
    assert_eq!(line["status"], 200);

    // --behaviour, then the control listener.
    let r = m.send(&mut c, &at, "gone:APA91b").await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.body["error"]["details"][0]["errorCode"], "UNREGISTERED",
        "{}",
        r.body
    );
    let control = m.url("control");
    let path = format!("/behaviour/{TOKEN}/quota-exceeded:5");
    assert_eq!(m.http(&control, "POST", &path).await.0, 200);
    assert_eq!(m.send(&mut c, &at, TOKEN).await.status, 429);
    assert_eq!(
        m.http(&control, "DELETE", &format!("/behaviour/{TOKEN}"))
            .await
            .0,
        200
    );
    assert_eq!(m.http(&control, "POST", "/expire-tokens").await.0, 200);
    let r = m.send(&mut c, &at, TOKEN).await;
    assert_eq!(
        (r.status, r.body["error"]["status"].as_str()),
        (401, Some("UNAUTHENTICATED"))
    );
    let fresh = m.access_token(&mut c).await;
    assert_eq!(m.send(&mut c, &fresh, TOKEN).await.status, 200);

    // The read-only listener shows what the app would have got, and changes nothing.
    let pushes = m.url("pushes");
    let (status, body) = m.http(&pushes, "GET", &format!("/pushes/{TOKEN}")).await;
    assert_eq!(status, 200);
    let list: Vec<Value> = serde_json::from_str(&body).unwrap();
    let statuses: Vec<u64> = list.iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [200, 429, 401, 200]);
    assert_eq!(m.http(&pushes, "POST", "/expire-tokens").await.0, 405);
    let (_, stats) = m.http(&control, "GET", "/stats").await;
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["token_requests"], 2, "{stats}");
    assert_eq!(stats["requests"], 5, "{stats}");
}
