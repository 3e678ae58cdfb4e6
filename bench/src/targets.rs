//! What a load runs against: the echo component (the ceiling), knock with its dry-run backend, knock
//! pushing to a provider's mock (APNs or FCM) over HTTP/2 and TLS, or that mock alone, driven by the
//! harness without knock. Each run starts its processes fresh, so peak memory belongs to that run
//! alone, and stops them afterwards.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::net::TcpListener;

use crate::mocks::{self, Endpoint, Provider, KEY_ID, TEAM_ID};
use crate::pg::Database;
use crate::procs::Proc;
use crate::server::{self, Component};
use crate::stanzas::{APP, COMPONENT_JID, COMPONENT_SECRET, TOPIC};

/// How often a standby knock tries again while another holds the component (`component.standby_retry_ms`):
/// 250 ms rather than knock's 1 s default, as the tests use, so the failover row shows the takeover itself.
pub const STANDBY_RETRY_MS: u64 = 250;

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The harness's own echo component.
    Echo,
    /// knock, its app in `dry_run`.
    DryRun,
    /// knock, its app in `dry_run`, its store in PostgreSQL.
    DryRunPg,
    /// knock pushing to the provider's mock.
    Push(Provider),
    /// The provider's mock, pushed to by the harness itself over HTTP/2: what the mock alone can take.
    MockAlone(Provider),
}

impl Target {
    /// The name `--targets` takes.
    pub fn name(self) -> &'static str {
        match self {
            Target::Echo => "echo",
            Target::DryRun => "dry_run",
            Target::DryRunPg => "dry_run-pg",
            Target::Push(Provider::Apns) => "apns",
            Target::Push(Provider::Fcm) => "fcm",
            Target::MockAlone(Provider::Apns) => "apns-mock",
            Target::MockAlone(Provider::Fcm) => "fcm-mock",
        }
    }

    /// Every target, in report order.
    pub const ALL: [Target; 7] = [
        Target::Echo,
        Target::DryRun,
        Target::DryRunPg,
        Target::Push(Provider::Apns),
        Target::MockAlone(Provider::Apns),
        Target::Push(Provider::Fcm),
        Target::MockAlone(Provider::Fcm),
    ];
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
                format!("unknown target {s:?}; one of {}", names.join(", "))
            })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Echo => f.write_str("echo component"),
            Target::DryRun => f.write_str("knock, dry_run"),
            Target::DryRunPg => f.write_str("knock, dry_run, PostgreSQL"),
            Target::Push(p) => write!(f, "knock → mock {p}"),
            Target::MockAlone(p) => write!(f, "mock {p} alone"),
        }
    }
}

/// Where the binaries are and where runs keep their files.
pub struct Env {
    /// Holds knock, mock-apns and knock-bench (which also hosts the mock FCM).
    pub bin_dir: PathBuf,
    /// Scratch space for configs, keys and logs.
    pub work: PathBuf,
}

/// A started target.
pub struct Running {
    /// knock or the echo component; none when a mock runs alone.
    pub component: Option<Proc>,
    /// The provider's mock, if the target pushes to one.
    pub mock: Option<Proc>,
}

impl Running {
    /// The component's process (knock or echo).
    pub fn component(&self) -> anyhow::Result<&Proc> {
        self.component
            .as_ref()
            .context("this target has no component")
    }

    /// Fail with the log of whichever process died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.component
            .iter_mut()
            .chain(self.mock.iter_mut())
            .try_for_each(Proc::check_alive)
    }

    /// Stop every process.
    pub async fn stop(self) {
        for proc in self.component.into_iter().chain(self.mock) {
            proc.stop().await;
        }
    }
}

/// The store a knock runs on.
pub enum StoreAt<'a> {
    /// A sled store in this directory.
    Sled(&'a Path),
    /// A PostgreSQL database.
    Postgres(&'a Database),
}

/// Start `target` (knock on `store`) and wait for its handshake; returns the processes and
/// the authenticated component connection. Not for [`Target::MockAlone`]: see [`start_mock`].
pub async fn start(
    target: Target,
    env: &Env,
    store: &StoreAt<'_>,
) -> anyhow::Result<(Running, Component)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server = listener.local_addr()?;
    let mut running = Running {
        component: None,
        mock: None,
    };
    match target {
        Target::Echo => {
            let addr = server.to_string();
            running.component = Some(Proc::spawn(
                "echo component",
                &env.bin_dir.join("knock-bench"),
                &["echo-component", "--server", &addr],
                &[],
                Some(env.work.join("echo.log")),
                false,
            )?);
        }
        Target::DryRun | Target::DryRunPg => {
            let config = knock_config(server, store, &dry_run_app());
            running.component = Some(spawn_knock(env, "knock", &config)?);
        }
        Target::Push(provider) => {
            let (proc, endpoint) = mocks::start(provider, &env.bin_dir, &env.work, false).await?;
            running.mock = Some(proc);
            let app = app_for(&endpoint);
            running.component = Some(spawn_knock(
                env,
                "knock",
                &knock_config(server, store, &app),
            )?);
        }
        Target::MockAlone(_) => bail!("{target} has no component; start it with start_mock"),
    }
    let component = match server::accept(&listener, Duration::from_secs(60)).await {
        Ok(component) => component,
        Err(e) => {
            let log = running
                .component
                .as_ref()
                .map(Proc::log_tail)
                .unwrap_or_default();
            running.stop().await;
            return Err(e.context(format!("{target} did not connect; its log:\n{log}")));
        }
    };
    Ok((running, component))
}

/// Start the provider's mock alone; returns it and where a client reaches it.
pub async fn start_mock(provider: Provider, env: &Env) -> anyhow::Result<(Running, Endpoint)> {
    let (proc, endpoint) = mocks::start(provider, &env.bin_dir, &env.work, true).await?;
    Ok((
        Running {
            component: None,
            mock: Some(proc),
        },
        endpoint,
    ))
}

/// The APNs app in `dry_run`: every publish checked against the store and "pushed" by the dry-run backend.
pub fn dry_run_app() -> String {
    apns_app("dry_run = true\n")
}

/// The `[[apns]]` app every registration of the APNs stores belongs to, with `rest` appended.
fn apns_app(rest: &str) -> String {
    format!("[[apns]]\nname = \"{APP}\"\ntopic = \"{TOPIC}\"\n{rest}")
}

/// The app that pushes to the mock at `endpoint`: an APNs app with the mock's provider key, or an FCM
/// app (`[[app]] provider = "fcm"`) with the mock's service-account file.
fn app_for(endpoint: &Endpoint) -> String {
    let (url, ca, key) = (
        &endpoint.url,
        endpoint.ca_file.display(),
        endpoint.key_file.display(),
    );
    match endpoint.provider {
        Provider::Apns => apns_app(&format!(
            "endpoint = \"{url}\"\nca_file = \"{ca}\"\n\n[apns.auth]\nkey_file = \"{key}\"\nkey_id = \"{KEY_ID}\"\nteam_id = \"{TEAM_ID}\"\n"
        )),
        Provider::Fcm => format!(
            "[[app]]\nname = \"{APP}\"\nprovider = \"fcm\"\nservice_account_file = \"{key}\"\nendpoint = \"{url}\"\nca_file = \"{ca}\"\n"
        ),
    }
}

/// knock's config for a run: pushes are never coalesced (every publish is a push), registrations are not
/// capped (the registration load is thousands of users of one domain), the link is not pinged, and tokens
/// are kept in the clear (the seeded stores are; publishes read the in-memory index either way, and the
/// numbers stay comparable with earlier runs).
pub fn knock_config(server: std::net::SocketAddr, store: &StoreAt<'_>, app: &str) -> String {
    let store = match store {
        StoreAt::Sled(path) => format!("path = \"{}\"", path.display()),
        // Loopback: `tls` is off by default.
        StoreAt::Postgres(db) => format!(
            "engine = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"",
            db.url,
            db.password_file.display()
        ),
    };
    format!(
        "[component]\njid = \"{COMPONENT_JID}\"\nserver = \"{server}\"\nsecret = \"{COMPONENT_SECRET}\"\n\
         ping_interval_secs = 3600\nstandby_retry_ms = {STANDBY_RETRY_MS}\n\n[store]\n{store}\nplaintext_tokens = true\n\n[limits]\npush_interval_ms = 0\n\
         registrations_per_user_per_hour = 0\nregistrations_per_domain_per_hour = 0\n\n{app}",
    )
}

/// Start knock on `config`; its config and log are `<name>.toml` and `<name>.log` in the scratch directory.
pub fn spawn_knock(env: &Env, name: &str, config: &str) -> anyhow::Result<Proc> {
    let path = env.work.join(format!("{name}.toml"));
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let path = path.to_string_lossy().into_owned();
    Proc::spawn(
        "knock",
        &env.bin_dir.join("knock"),
        &["run", "--config", &path],
        // The store's info line says when the publish index is complete; the scale table reports it.
        &[("KNOCK_LOG", "warn,knock::store=info")],
        Some(env.work.join(format!("{name}.log"))),
        false,
    )
}
