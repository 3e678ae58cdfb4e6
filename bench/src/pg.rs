//! A throwaway PostgreSQL for the rows of knock's PostgreSQL engine (testkit's [`TempCluster`]: Debian's
//! `postgres`, its own directory and loopback port), filled the way an operator moves a sled store to it:
//! `knock export` of a seeded sled store, then `knock import` into the database.
//!
//! Clusters live under the run's scratch directory, on disk (`main` points `KNOCK_PG_TMPDIR` there before
//! anything starts), not on testkit's default tmpfs: a registration's commit then writes its WAL to a real
//! file system, as it would in production.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use testkit::postgres::TempCluster;

use crate::procs::Proc;
use crate::seed::seed;
use crate::stanzas::Publishes;
use crate::targets::{knock_config, Env, StoreAt};

/// A PostgreSQL cluster and what knock's `[store]` needs to reach its `knock` database.
pub struct Database {
    /// `None` only once stopped.
    cluster: Option<TempCluster>,
    /// `store.url`: the role and database, without the password.
    pub url: String,
    /// `store.password_file`.
    pub password_file: PathBuf,
}

impl Database {
    /// Start a cluster, with `fsync` on or (testkit's default) off; `name` tells its files apart.
    pub async fn start(env: &Env, name: &str, fsync: bool) -> anyhow::Result<Database> {
        let cluster = tokio::task::spawn_blocking(move || {
            if fsync {
                TempCluster::start_with(&[("fsync", "on")])
            } else {
                TempCluster::start()
            }
        })
        .await?
        .context("starting PostgreSQL (testkit::postgres::TempCluster)")?;
        let password_file = env.work.join(format!("{name}.password"));
        std::fs::write(&password_file, cluster.password())
            .with_context(|| format!("writing {}", password_file.display()))?;
        let url = format!(
            "postgres://{}@127.0.0.1:{}/{}",
            cluster.user(),
            cluster.port(),
            cluster.database()
        );
        let database = Database {
            cluster: Some(cluster),
            url,
            password_file,
        };
        let shown = database.setting("fsync")?;
        anyhow::ensure!(
            (shown == "on") == fsync,
            "PostgreSQL says fsync = {shown}, asked for {}",
            if fsync { "on" } else { "off" }
        );
        Ok(database)
    }

    /// A server setting as `SHOW` gives it.
    pub fn setting(&self, name: &str) -> anyhow::Result<String> {
        let cluster = self.cluster.as_ref().context("stopped")?;
        Ok(cluster.psql(&format!("SHOW {name}"))?.trim().to_owned())
    }

    /// Write transactions so far (the current transaction id, which this query's own transaction takes)
    /// and the registrations in the `knock` database: two readings give how many registrations each of
    /// knock's commits carried. Transaction ids count only transactions that wrote, so knock's reads and
    /// notifications do not count, and each reading adds one.
    pub fn writes_and_rows(&self) -> anyhow::Result<(u64, u64)> {
        let cluster = self.cluster.as_ref().context("stopped")?;
        let out = cluster.psql_knock(
            "SELECT pg_current_xact_id()::text::bigint, (SELECT count(*) FROM knock_registrations)",
        )?;
        let (xid, rows) = out.trim().split_once('|').context("psql's output")?;
        Ok((xid.parse()?, rows.parse()?))
    }

    /// Stop the server and remove its directory (off the async runtime's threads).
    pub async fn stop(mut self) {
        if let Some(cluster) = self.cluster.take() {
            let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
        }
    }
}

/// Seed `nodes` registrations into a sled store (as the sled rows' store is seeded), move them into a new
/// PostgreSQL cluster with `knock export` / `knock import`, and return the database and the publishes to them.
pub async fn seeded(
    env: &Env,
    name: &str,
    nodes: usize,
) -> anyhow::Result<(Database, Arc<Publishes>)> {
    let sled = env.work.join(format!("store-{name}-sled"));
    let seeded = seed(&sled, nodes, nodes).await?;
    let database = Database::start(env, name, false).await?;
    let export = env.work.join(format!("{name}.jsonl"));
    knock_cli(
        env,
        &format!("{name}-export"),
        &StoreAt::Sled(&sled),
        &["export", "--out", &export.to_string_lossy()],
    )
    .await?;
    knock_cli(
        env,
        &format!("{name}-import"),
        &StoreAt::Postgres(&database),
        &["import", &export.to_string_lossy()],
    )
    .await?;
    Ok((database, seeded.publishes()))
}

/// Run `knock <args> --config <a config on store>` to the end; fails with its output if it fails.
async fn knock_cli(
    env: &Env,
    name: &str,
    store: &StoreAt<'_>,
    args: &[&str],
) -> anyhow::Result<()> {
    let config = env.work.join(format!("{name}.toml"));
    // An app section, since a config without one is refused; which one does not matter here.
    std::fs::write(
        &config,
        knock_config(
            "127.0.0.1:5347".parse()?,
            store,
            &crate::targets::dry_run_app(),
        ),
    )?;
    let (command, rest) = args.split_first().context("no command")?;
    let mut full = vec![*command, "--config"];
    let config = config.to_string_lossy().into_owned();
    full.push(&config);
    full.extend_from_slice(rest);
    let log = env.work.join(format!("{name}.log"));
    let mut proc = Proc::spawn(
        "knock",
        &env.bin_dir.join("knock"),
        &full,
        &[],
        Some(log),
        false,
    )?;
    let status = proc.wait().await?;
    anyhow::ensure!(
        status.success(),
        "knock {} failed ({status}): {}",
        full.join(" "),
        proc.log_tail()
    );
    Ok(())
}

/// Where clusters go: `<scratch>/pg`, traversable by the unprivileged user testkit runs PostgreSQL as when
/// this runs as root (the scratch directory is otherwise private).
pub fn cluster_parent(scratch: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(scratch, std::fs::Permissions::from_mode(0o711))?;
    let dir = scratch.join("pg");
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}
