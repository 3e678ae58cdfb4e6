//! The `knock` command line: `run` serves, `check` validates a configuration, and the admin commands work on
//! a stopped knock's store ([`knock::admin`]). Everything else is the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use knock::app::App;
use knock::config::Config;
use knock::link::{self, LinkSettings};

/// An XMPP push App Server (XEP-0357) that wakes iOS and Android apps through APNs and FCM.
#[derive(Parser)]
#[command(name = "knock", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect to the XMPP server and serve until SIGTERM or SIGINT.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration: parse it, read the secret, load every key and certificate.
    Check {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Write a new store key (for `[store] key_file`); never overwrites a file.
    Keygen {
        /// Where to write it, e.g. /etc/knock/store.key.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Count the registrations (by app, by domain) of a stopped knock's store.
    Stats {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Write every registration of a stopped knock's store as JSON lines (tokens stay sealed).
    Export {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The file to write (standard output if absent).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Import an export into the configured store, which must be empty (knock stopped).
    Import {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The export file.
        file: PathBuf,
    },
    /// Ask a running knock's /health (on `[admin] listen`): exit 0 if it is healthy. For container health
    /// probes, where no shell or HTTP client is at hand.
    Healthcheck {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Delete one registration from a stopped knock's store.
    Delete {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The registration's pubsub node.
        #[arg(long)]
        node: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config),
        Command::Keygen { out } => {
            knock::admin::keygen(&out, &mut std::io::stdout()).map_err(anyhow::Error::from)
        }
        Command::Stats { config } => Config::load(&config)
            .map_err(anyhow::Error::from)
            .and_then(|c| Ok(knock::admin::stats(&c, &mut std::io::stdout())?)),
        Command::Export { config, out } => export(&config, out.as_deref()),
        Command::Import { config, file } => import(&config, &file),
        Command::Delete { config, node } => delete(&config, &node),
        Command::Healthcheck { config } => healthcheck(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("knock: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// Keep every thread on glibc's main malloc arena. knock does its work on one thread, but the index
/// rebuild and sled's threads each got an arena of their own, and memory freed in one arena cannot serve
/// another: with a million registrations that held about 25 MiB of free heap resident for good (bench/run
/// scale, idle RSS 263 -> 234 MiB). Must run before any thread starts.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The error and its causes on one line, skipping causes whose text the message already shows.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Logs go to stderr; `KNOCK_LOG` (or `RUST_LOG`) sets the filter, `info` by default.
fn init_logging() {
    let filter = std::env::var("KNOCK_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn load(path: &std::path::Path) -> anyhow::Result<(Config, String)> {
    let config = Config::load(path)?;
    let secret = config.component_secret()?;
    Ok((config, secret))
}

fn export(path: &std::path::Path, out: Option<&std::path::Path>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let count = match out {
        Some(file) => {
            let mut writer = std::io::BufWriter::new(
                std::fs::File::create(file)
                    .with_context(|| format!("creating {}", file.display()))?,
            );
            knock::admin::export(&config, &mut writer)?
        }
        None => knock::admin::export(&config, &mut std::io::stdout().lock())?,
    };
    eprintln!("exported {count} registrations");
    Ok(())
}

fn import(path: &std::path::Path, file: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let count = knock::admin::import(&config, file)?;
    println!(
        "imported {count} registrations into {}",
        config.store.describe()
    );
    Ok(())
}

fn delete(path: &std::path::Path, node: &str) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(knock::admin::delete(&config, node))?;
    println!("deleted the registration; its server learns at its next publish (item-not-found)");
    Ok(())
}

fn healthcheck(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let addr = config.admin_listen().context(
        "no [admin] listen in the configuration: the health check asks the admin listener",
    )?;
    let body = knock::http::health::check(addr, std::time::Duration::from_secs(5))?;
    println!("healthy: {body}");
    Ok(())
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let (config, _secret) = load(path)?;
    let store_key = App::store_key(&config)?;
    // Reads a database's password file and CA file too; connects nowhere.
    App::store_options(&config)?;
    // Building the providers reads every key and certificate, so a bad file fails here, not at the first
    // push. hyper's client wants a runtime to exist while it is built; it connects nowhere yet.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async { App::apps_from_config(&config, &Default::default()) })?;
    println!(
        "{}: OK — component {} via {}, store {} {}, {} app(s): {}; tokens {}",
        path.display(),
        config.component.jid,
        config.component.server,
        match config.store.engine {
            knock::config::StoreEngine::Sled => "sled",
            knock::config::StoreEngine::Postgres => "postgres",
        },
        config.store.describe(),
        config.apps.len(),
        config
            .apps
            .iter()
            .map(|a| a.summary())
            .collect::<Vec<_>>()
            .join(", "),
        match (&store_key, config.store.plaintext_tokens) {
            (Some(_), _) => "sealed at rest (store.key_file)",
            (None, true) => "stored in the clear (no store.key_file; plaintext_tokens allows a new store so)",
            (None, false) => "not sealed: no store.key_file, so a new store is refused (knock keygen writes a key); one already in the clear still opens",
        }
    );
    Ok(())
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let (config, secret) = load(path)?;
    one_malloc_arena();
    // One thread: the link, the router and the APNs connection hand each other work on every publish;
    // on one thread that is a function call, across threads a futex wake-up and a cache miss. Measured
    // with bench/run (window 64, mock APNs): 67 -> 45 µs of CPU per push, 16k -> 19k pushes/s. Store
    // flushes still run on the blocking pool.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let app = Arc::new(App::from_config(&config).context("starting knock")?);
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            apps = app.apps().len(),
            "knock starting"
        );
        let (trigger, shutdown) = knock::shutdown::channel();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            trigger.fire();
        });
        tokio::spawn(report_stats(app.clone(), shutdown.clone()));
        tokio::spawn(reload_on_sighup(
            app.clone(),
            path.to_path_buf(),
            shutdown.clone(),
        ));
        let admin = match config.admin_listen() {
            Some(addr) => Some(knock::http::start(app.clone(), addr, shutdown.clone()).await?),
            None => None,
        };
        let settings = LinkSettings {
            jid: config.component_jid(),
            server: config.component.server.clone(),
            secret,
            ping_interval: Duration::from_secs(config.component.ping_interval_secs),
            max_in_flight: config.component.max_in_flight,
            publish_deadline: config.publish_deadline(),
            standby_retry: Duration::from_millis(config.component.standby_retry_ms),
        };
        link::run(app.clone(), settings, shutdown).await;
        if let Some(admin) = admin {
            // It stops on the same signal; a scraper's open connection must not hold the exit up.
            if tokio::time::timeout(Duration::from_secs(1), admin)
                .await
                .is_err()
            {
                tracing::warn!("the admin listener did not stop within 1 s; leaving it");
            }
        }
        app.store.flush().await.context("flushing the store")?;
        tracing::info!(stats = %app.stats.summary(), "knock stopped");
        Ok(())
    })
}

/// SIGTERM (systemd, docker) or SIGINT (Ctrl-C).
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// SIGHUP re-reads the config file and puts its apps (`[[app]]`, or `[[apns]]`) (keys, certificates, topics, endpoints) in
/// force; a file that does not load, or a key that does not, is refused and the running apps stay. The
/// other sections need a restart: the link, the store and the listener are not rebuilt under load.
async fn reload_on_sighup(app: Arc<App>, path: PathBuf, mut shutdown: knock::shutdown::Shutdown) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reloading needs a restart");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.recv() => return,
                got = hangup.recv() => if got.is_none() { return },
            }
            let reloaded = Config::load(&path)
                .map_err(anyhow::Error::from)
                .and_then(|config| Ok(app.reload_apps(&config)?));
            match reloaded {
                Ok(apps) => tracing::info!(
                    apps,
                    "SIGHUP: [[app]] and [[apns]] reloaded; changes to other sections take effect at the next restart"
                ),
                Err(e) => tracing::error!(
                    error = %describe(&e),
                    "SIGHUP: the new configuration was refused; the running one stays in force"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (app, path);
        shutdown.recv().await;
    }
}

/// Log the counters every five minutes when they changed: counts only, never who.
async fn report_stats(app: Arc<App>, mut shutdown: knock::shutdown::Shutdown) {
    let mut last = String::new();
    let mut every = tokio::time::interval(Duration::from_secs(300));
    every.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = every.tick() => {}
        }
        let now = app.stats.summary();
        if now != last {
            tracing::info!(stats = %now, "activity");
            last = now;
        }
    }
}
