//! The push providers' mocks a run pushes to, each a process of its own so that its CPU is measured
//! apart from knock's: testkit's `mock-apns --quiet`, and testkit's mock FCM hosted by
//! `knock-bench mock-fcm` (the `mock-fcm` binary prints a JSON line per request and keeps every request
//! it answered, with no switch to stop either; this host subscribes to nothing and clears the request
//! list as it goes, as `mock-apns --quiet` does).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use testkit::fcm::{MockFcm, MockFcmConfig};

use crate::procs::Proc;
use crate::stanzas::TOPIC;

/// A push provider knock speaks, as a benchmark parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Apple's APNs (HTTP/2, ES256 provider JWT).
    Apns,
    /// Google's FCM HTTP v1 (HTTP/2, OAuth2 access token from a service account).
    Fcm,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Apns => "APNs",
            Provider::Fcm => "FCM",
        })
    }
}

/// The APNs provider key's id and team (the mock checks both in the JWT).
pub const KEY_ID: &str = "BENCHKEY01";
pub const TEAM_ID: &str = "BENCHTEAM1";
/// The Firebase project of the mock FCM.
pub const PROJECT: &str = "knock-bench";

/// What a client needs to push to a running mock.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Whose mock it is.
    pub provider: Provider,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The CA that signed its certificate (PEM file).
    pub ca_file: PathBuf,
    /// APNs: the ES256 provider key (`.p8`); FCM: the service-account key file (JSON).
    pub key_file: PathBuf,
}

/// Start the mock of `provider`, its files under `work`; its log is `mock-<provider>.log`, or
/// `mock-<provider>-alone.log` when `alone` (so that `--keep-temp` shows what knock sent apart from what
/// the harness sent).
pub async fn start(
    provider: Provider,
    bin_dir: &Path,
    work: &Path,
    alone: bool,
) -> anyhow::Result<(Proc, Endpoint)> {
    let ca_file = work.join(format!("mock-{}-ca.pem", slug(provider)));
    let suffix = if alone { "-alone" } else { "" };
    let (ca, log) = (
        ca_file.to_string_lossy().into_owned(),
        work.join(format!("mock-{}{suffix}.log", slug(provider))),
    );
    // What differs between the mocks: the binary, its arguments, and where it writes the app's key.
    let (name, bin, key_file, args): (_, _, _, Vec<String>) = match provider {
        Provider::Apns => {
            let key_file = work.join("mock-key.p8");
            let args = [
                "--topic",
                TOPIC,
                "--team-id",
                TEAM_ID,
                "--key-id",
                KEY_ID,
                "--private-key-out",
                &key_file.to_string_lossy(),
                "--ca-out",
                &ca,
                "--quiet",
            ]
            .map(String::from)
            .to_vec();
            ("mock APNs", "mock-apns", key_file, args)
        }
        Provider::Fcm => {
            let key_file = work.join("mock-fcm-sa.json");
            let args = [
                "mock-fcm",
                "--project",
                PROJECT,
                "--service-account-out",
                &key_file.to_string_lossy(),
                "--ca-out",
                &ca,
            ]
            .map(String::from)
            .to_vec();
            ("mock FCM", "knock-bench", key_file, args)
        }
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proc = Proc::spawn(name, &bin_dir.join(bin), &args, &[], Some(log), true)?;
    let line = proc.first_json_line().await?;
    let url = line["url"]
        .as_str()
        .with_context(|| format!("the mock {provider} announced no url"))?
        .to_owned();
    Ok((
        proc,
        Endpoint {
            provider,
            url,
            ca_file,
            key_file,
        },
    ))
}

fn slug(provider: Provider) -> &'static str {
    match provider {
        Provider::Apns => "apns",
        Provider::Fcm => "fcm",
    }
}

/// How often the host forgets the requests the mock recorded: at 50,000 pushes/s, 1,000 records, whose
/// freeing holds up the mock's one thread for a fraction of a millisecond.
const CLEAR_EVERY: Duration = Duration::from_millis(20);

/// `knock-bench mock-fcm`: run testkit's mock FCM until SIGTERM, after writing its service-account file
/// and CA, and announcing `{"url": ...}` on stdout. Nothing subscribes to its events (so it builds no
/// copy of a request for a listener) and its request list is taken and cleared every [`CLEAR_EVERY`],
/// which keeps its memory flat; what it checks and answers per request is the library's, unchanged.
/// On its way out it logs (stderr: `mock-fcm.log`) its connections, token grants and the first send
/// whole.
pub async fn host_fcm(
    project: &str,
    service_account_out: &Path,
    ca_out: &Path,
) -> anyhow::Result<()> {
    let mock = MockFcm::start(MockFcmConfig::new(project)).await?;
    std::fs::write(service_account_out, &mock.service_account().json)
        .with_context(|| format!("writing {}", service_account_out.display()))?;
    std::fs::write(ca_out, mock.ca_pem())
        .with_context(|| format!("writing {}", ca_out.display()))?;
    println!(
        "{}",
        serde_json::json!({ "event": "listening", "url": mock.url(), "project_id": project })
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut clear = tokio::time::interval(CLEAR_EVERY);
    // The first send of the run, kept for the log: what knock sent, for a reader of --keep-temp. Taken
    // once: copying the request list on every tick would cost the mock more than clearing it.
    let mut first = None;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = clear.tick() => {
                if first.is_none() {
                    first = mock.requests().into_iter().next();
                }
                mock.clear_requests();
            }
        }
    }
    eprintln!(
        "mock FCM: {} TLS connections, {} token requests",
        mock.connections_accepted(),
        mock.token_requests(),
    );
    if let Some(r) = first {
        eprintln!(
            "first send: {} {} {:?}\nheaders: {:?}\nbody: {}\nanswer: {} {}",
            r.method,
            r.path,
            r.version,
            r.headers,
            r.body,
            r.status,
            r.error_code.unwrap_or_default()
        );
    }
    mock.shutdown().await;
    Ok(())
}
