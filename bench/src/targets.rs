//! What a load runs against: the echo component (the ceiling), knock with its dry-run backend, or
//! knock pushing to the mock APNs over HTTP/2 and TLS. Each run starts its processes fresh, so peak
//! memory belongs to that run alone, and stops them afterwards.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::procs::Proc;
use crate::server::{self, Component};
use crate::stanzas::{APP, COMPONENT_JID, COMPONENT_SECRET, TOPIC};

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The harness's own echo component.
    Echo,
    /// knock, its app in `dry_run`.
    DryRun,
    /// knock pushing to the mock APNs.
    Apns,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Echo => "echo component",
            Target::DryRun => "knock, dry_run",
            Target::Apns => "knock → mock APNs",
        })
    }
}

/// Where the binaries are and where runs keep their files.
pub struct Env {
    /// Holds knock, mock-apns and knock-bench.
    pub bin_dir: PathBuf,
    /// Scratch space for configs, keys and logs.
    pub work: PathBuf,
}

/// A started target.
pub struct Running {
    /// The component (knock or echo) first, the mock APNs second if there is one.
    pub procs: Vec<Proc>,
}

impl Running {
    /// Process ids whose CPU a load measures, component first.
    pub fn pids(&self) -> anyhow::Result<Vec<u32>> {
        self.procs.iter().map(Proc::pid).collect()
    }

    /// Fail with the component's log if it died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }

    /// Stop every process.
    pub async fn stop(self) {
        for proc in self.procs {
            proc.stop().await;
        }
    }
}

/// Start `target` (knock on the store at `store`) and wait for its handshake; returns the processes and
/// the authenticated component connection.
pub async fn start(
    target: Target,
    env: &Env,
    store: &Path,
) -> anyhow::Result<(Running, Component)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server = listener.local_addr()?;
    let mut procs = Vec::new();
    match target {
        Target::Echo => {
            let addr = server.to_string();
            procs.push(Proc::spawn(
                "echo component",
                &env.bin_dir.join("knock-bench"),
                &["echo-component", "--server", &addr],
                &[],
                Some(env.work.join("echo.log")),
                false,
            )?);
        }
        Target::DryRun => {
            let config = knock_config(server, store, "dry_run = true\n");
            procs.push(spawn_knock(env, &config)?);
        }
        Target::Apns => {
            let mock = start_mock(env).await?;
            let url = mock.1;
            let app = format!(
                "endpoint = \"{url}\"\nca_file = \"{ca}\"\n\n[apns.auth]\nkey_file = \"{key}\"\nkey_id = \"{KEY_ID}\"\nteam_id = \"{TEAM_ID}\"\n",
                ca = env.work.join("mock-ca.pem").display(),
                key = env.work.join("mock-key.p8").display(),
            );
            let config = knock_config(server, store, &app);
            procs.push(spawn_knock(env, &config)?);
            procs.push(mock.0);
        }
    }
    let component = match server::accept(&listener, Duration::from_secs(60)).await {
        Ok(component) => component,
        Err(e) => {
            let log = procs.first().map(Proc::log_tail).unwrap_or_default();
            return Err(e.context(format!("{target} did not connect; its log:\n{log}")));
        }
    };
    Ok((Running { procs }, component))
}

const KEY_ID: &str = "BENCHKEY01";
const TEAM_ID: &str = "BENCHTEAM1";

/// knock's config for a run: pushes are never coalesced (every publish is a push), registrations are not
/// capped (the registration load is thousands of users of one domain), the link is not pinged, and tokens
/// are kept in the clear (the seeded stores are; publishes read the in-memory index either way, and the
/// numbers stay comparable with earlier runs).
fn knock_config(server: std::net::SocketAddr, store: &Path, app: &str) -> String {
    format!(
        "[component]\njid = \"{COMPONENT_JID}\"\nserver = \"{server}\"\nsecret = \"{COMPONENT_SECRET}\"\n\
         ping_interval_secs = 3600\n\n[store]\npath = \"{store}\"\nplaintext_tokens = true\n\n[limits]\npush_interval_ms = 0\n\
         registrations_per_user_per_hour = 0\nregistrations_per_domain_per_hour = 0\n\n\
         [[apns]]\nname = \"{APP}\"\ntopic = \"{TOPIC}\"\n{app}",
        store = store.display(),
    )
}

fn spawn_knock(env: &Env, config: &str) -> anyhow::Result<Proc> {
    let path = env.work.join("knock.toml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let path = path.to_string_lossy().into_owned();
    Proc::spawn(
        "knock",
        &env.bin_dir.join("knock"),
        &["run", "--config", &path],
        // The store's info line says when the publish index is complete; the scale table reports it.
        &[("KNOCK_LOG", "warn,knock::store=info")],
        Some(env.work.join("knock.log")),
        false,
    )
}

/// Start the mock APNs (quiet: no line per request, no request log kept) and return it with its URL.
async fn start_mock(env: &Env) -> anyhow::Result<(Proc, String)> {
    let key = env.work.join("mock-key.p8");
    let ca = env.work.join("mock-ca.pem");
    let (key, ca) = (key.to_string_lossy(), ca.to_string_lossy());
    let mut mock = Proc::spawn(
        "mock APNs",
        &env.bin_dir.join("mock-apns"),
        &[
            "--topic",
            TOPIC,
            "--team-id",
            TEAM_ID,
            "--key-id",
            KEY_ID,
            "--private-key-out",
            &key,
            "--ca-out",
            &ca,
            "--quiet",
        ],
        &[],
        Some(env.work.join("mock-apns.log")),
        true,
    )?;
    let line = mock.first_json_line().await?;
    let url = line["url"]
        .as_str()
        .context("the mock APNs announced no url")?
        .to_owned();
    Ok((mock, url))
}
