//! The real `knock` binary and its peers on 127.0.0.1 (an XEP-0114 server stand-in, a mock APNs and, when a
//! test asks, a mock FCM), configured and started for one test, with what tests ask of them most.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use minidom::Element;
use testkit::apns::{generate_apns_key, MockApns, MockApnsConfig, TestClientCa};
use testkit::fcm::{MockFcm, MockFcmConfig};
use testkit::proxy::Blackhole;
use testkit::server::{ComponentConn, ComponentServer};

use super::{node_and_secret, prosody_publish, register_xml};

/// The JWT `iss` knock is configured with and the mock expects.
pub const TEAM_ID: &str = "TEAM123456";
/// The JWT `kid`.
pub const KEY_ID: &str = "KEYID12345";
/// The `kid` of the team's second key (`AuthKey2.p8` beside the config), which the mock accepts as well:
/// what an admin rotates to.
pub const SECOND_KEY_ID: &str = "KEYID67890";
/// The app's bundle id (`apns-topic`).
pub const TOPIC: &str = "im.knock.test";
/// The Firebase project of the mock FCM.
pub const FCM_PROJECT: &str = "knock-test";
/// The component secret the server stand-in expects.
pub const COMPONENT_SECRET: &str = "component-secret";
/// How long a test waits for anything that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);

/// knock, its peers, and its files.
pub struct Harness {
    /// Holds the config, the store and the log; removed on drop.
    pub dir: tempfile::TempDir,
    /// The XMPP server stand-in knock connects to.
    pub server: ComponentServer,
    /// The mock APNs knock pushes to.
    pub apns: MockApns,
    /// The mock FCM knock pushes the `android` app to, with [`Options::fcm`].
    pub fcm: Option<MockFcm>,
    /// The relay knock reaches the mock through, with [`Options::apns_via_blackhole`].
    pub blackhole: Option<Blackhole>,
    /// Where `/metrics` and `/health` are served, with [`Options::admin`].
    pub admin: Option<std::net::SocketAddr>,
    config: PathBuf,
    log: PathBuf,
    log_filter: &'static str,
    knock: Option<Child>,
}

/// Knobs a test may turn in knock's config.
pub struct Options {
    /// `limits.push_interval_ms`.
    pub push_interval_ms: u64,
    /// `limits.publish_deadline_ms`.
    pub publish_deadline_ms: u64,
    /// `component.ping_interval_secs`.
    pub ping_interval_secs: u64,
    /// `component.max_in_flight`.
    pub max_in_flight: usize,
    /// The component secret knock is given.
    pub secret: &'static str,
    /// APNs certificate auth instead of token auth.
    pub certificate_auth: bool,
    /// Extra lines for the `[[apns]]` table.
    pub apns_extra: &'static str,
    /// knock's log filter; the privacy check wants `debug`, floods want less.
    pub log_filter: &'static str,
    /// Reach the mock APNs through a relay whose connections a test can blackhole.
    pub apns_via_blackhole: bool,
    /// Extra lines for the `[limits]` table.
    pub limits_extra: &'static str,
    /// `admin.listen`: serve `/metrics` and `/health` there.
    pub admin: Option<std::net::SocketAddr>,
    /// A second app, `android`, woken through a mock FCM, with these extra lines in its table.
    pub fcm: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            push_interval_ms: 0,
            publish_deadline_ms: 10_000,
            ping_interval_secs: 30,
            max_in_flight: 1024,
            secret: COMPONENT_SECRET,
            certificate_auth: false,
            apns_extra: "",
            log_filter: "debug",
            apns_via_blackhole: false,
            limits_extra: "",
            admin: None,
            fcm: None,
        }
    }
}

impl Harness {
    /// knock with the default options, started and connecting.
    pub async fn start() -> Harness {
        Harness::start_with(Options::default()).await
    }

    /// knock with these options, started and connecting.
    pub async fn start_with(options: Options) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = ComponentServer::bind("push.localhost", COMPONENT_SECRET)
            .await
            .expect("bind the component listener");
        let (p8, public_pem) = generate_apns_key();
        let mut mock_config = MockApnsConfig::token_auth(TEAM_ID, KEY_ID, public_pem, &[TOPIC]);
        let (second_p8, second_pem) = generate_apns_key();
        std::fs::write(dir.path().join("AuthKey2.p8"), second_p8).expect("write key");
        mock_config.more_keys = vec![(SECOND_KEY_ID.to_owned(), second_pem)];
        let auth = if options.certificate_auth {
            let client_ca = TestClientCa::new().expect("client CA");
            let (cert, key) = client_ca.issue("knock test").expect("client certificate");
            std::fs::write(dir.path().join("apns-cert.pem"), cert).expect("write cert");
            std::fs::write(dir.path().join("apns-key.pem"), key).expect("write key");
            mock_config.client_ca_pem = Some(client_ca.ca_pem().to_owned());
            "cert_file = \"apns-cert.pem\"\nkey_file = \"apns-key.pem\"".to_owned()
        } else {
            std::fs::write(dir.path().join("AuthKey.p8"), p8).expect("write key");
            format!("key_file = \"AuthKey.p8\"\nkey_id = \"{KEY_ID}\"\nteam_id = \"{TEAM_ID}\"")
        };
        let apns = MockApns::start(mock_config).await.expect("start mock APNs");
        let ca = apns.write_ca_file(dir.path()).expect("write CA");
        let blackhole = match options.apns_via_blackhole {
            true => Some(
                Blackhole::start(apns.addr())
                    .await
                    .expect("start the relay to the mock APNs"),
            ),
            false => None,
        };
        // The mock's certificate names 127.0.0.1, so TLS through the relay checks out.
        let url = match &blackhole {
            Some(relay) => format!("https://{}", relay.addr()),
            None => apns.url(),
        };
        let (fcm, fcm_app) = match options.fcm {
            None => (None, String::new()),
            Some(extra) => {
                let fcm = MockFcm::start(MockFcmConfig::new(FCM_PROJECT))
                    .await
                    .expect("start mock FCM");
                let account = fcm
                    .write_service_account_file(dir.path())
                    .expect("write the service account");
                let ca = fcm.write_ca_file(dir.path()).expect("write CA");
                let table = format!(
                    "[[app]]\nname = \"android\"\nprovider = \"fcm\"\nservice_account_file = \"{}\"\n\
                     endpoint = \"{}\"\nca_file = \"{}\"\n{extra}\n",
                    account.display(),
                    fcm.url(),
                    ca.display()
                );
                (Some(fcm), table)
            }
        };
        // Tokens sealed at rest, as an admin following the README runs knock.
        knock::store::StoreKey::generate()
            .write_new(&dir.path().join("store.key"))
            .expect("write the store key");
        let config = dir.path().join("knock.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[component]
jid = "push.localhost"
server = "{server}"
secret = "{secret}"
ping_interval_secs = {ping}
max_in_flight = {max_in_flight}

[store]
path = "store"
key_file = "store.key"

[limits]
push_interval_ms = {interval}
publish_deadline_ms = {deadline}
{limits_extra}
{admin}

[[app]]
name = "chat"
provider = "apns"
topic = "{TOPIC}"
endpoint = "{url}"
ca_file = "{ca}"
{extra}

[app.auth]
{auth}

{fcm_app}
"#,
                server = server.addr(),
                secret = options.secret,
                ping = options.ping_interval_secs,
                max_in_flight = options.max_in_flight,
                interval = options.push_interval_ms,
                deadline = options.publish_deadline_ms,
                ca = ca.display(),
                extra = options.apns_extra,
                limits_extra = options.limits_extra,
                admin = options
                    .admin
                    .map(|addr| format!("[admin]\nlisten = \"{addr}\"\n"))
                    .unwrap_or_default(),
            ),
        )
        .expect("write config");
        let log = dir.path().join("knock.log");
        let mut harness = Harness {
            admin: options.admin,
            dir,
            server,
            apns,
            fcm,
            blackhole,
            config,
            log,
            log_filter: options.log_filter,
            knock: None,
        };
        harness.spawn();
        harness
    }

    /// Start the knock binary; its log (debug level by default, for the privacy check) goes to a file.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let child = Command::new(env!("CARGO_BIN_EXE_knock"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("KNOCK_LOG", self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn knock");
        self.knock = Some(child);
    }

    /// knock's configuration file (tests rewrite it before a SIGHUP).
    pub fn config_path(&self) -> &std::path::Path {
        &self.config
    }

    /// Send knock a signal by name (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{name} failed");
    }

    /// Wait until knock's log contains `text`; panics with the log if it does not within [`WAIT`].
    pub async fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log_text().contains(text) {
            assert!(
                Instant::now() < deadline,
                "knock never logged {text:?}\n--- knock log ---\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The next connection from knock, handshake done; panics with knock's log if none comes.
    pub async fn accept(&self) -> ComponentConn {
        match self.server.accept_timeout(WAIT).await {
            Ok(conn) => conn,
            Err(e) => panic!(
                "knock did not connect: {e}\n--- knock log ---\n{}",
                self.log_text()
            ),
        }
    }

    /// knock's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// knock's process id.
    pub fn pid(&self) -> u32 {
        self.knock.as_ref().expect("knock running").id()
    }

    /// kill -9: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.knock.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    /// Wait up to [`WAIT`] for knock to exit by itself (a config it refuses at start, say).
    pub async fn exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            let child = self.knock.as_mut().expect("knock running");
            if let Some(status) = child.try_wait().expect("wait for knock") {
                self.knock = None;
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
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let mut child = self.knock.take().expect("knock running");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "knock did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Harness {
    /// knock's resident set size in KiB, from `/proc/<pid>/status` (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("knock's /proc status is readable");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Send an IQ and wait for its answer.
pub async fn ask(conn: &mut ComponentConn, xml: &str) -> Element {
    conn.request(super::xml(xml), WAIT)
        .await
        .expect("knock answers every IQ in time")
}

/// Publish as Prosody does, from the server's domain.
pub async fn publish(conn: &mut ComponentConn, id: &str, node: &str, secret: &str) -> Element {
    ask(conn, &prosody_publish(id, "localhost", node, secret)).await
}

/// Register `token` for alice's `device`; the node and secret.
pub async fn register(conn: &mut ComponentConn, device: &str, token: &str) -> (String, String) {
    node_and_secret(
        &ask(
            conn,
            &register_xml("reg", "alice@localhost/phone", device, token, ""),
        )
        .await,
    )
}
