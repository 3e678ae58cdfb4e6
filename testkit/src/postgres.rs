//! A throwaway PostgreSQL cluster for tests: Debian's real `postgres`, in its own temporary directory, on a
//! loopback port and a Unix socket, stopped and removed on drop.
//!
//! [`TempCluster::start`] runs `initdb` and `postgres` from Debian's package (the newest
//! `/usr/lib/postgresql/*/bin`, or `pg_config --bindir`, or `$KNOCK_PG_BINDIR`), waits until the server
//! accepts connections, and makes a role `knock` (with a random password, not a superuser) owning a database
//! `knock`. Tests then get [`url`](TempCluster::url) and can [`stop`](TempCluster::stop),
//! [`start_again`](TempCluster::start_again) on the same data, or [`kill9`](TempCluster::kill9) the server.
//!
//! Clusters live in `/dev/shm` when it is a tmpfs with 1 GiB free (else the temporary directory;
//! `$KNOCK_PG_TMPDIR` overrides both), and are copies of one cluster `initdb` made for the whole test process:
//! a start then takes about 0.1 to 0.3 s, the first one of a process about 1 s. Each has its own directory,
//! port and processes, so tests run in parallel. If the test process dies without dropping them (SIGKILL, a
//! test timeout), a watchdog shell stops their servers and removes their directories.
//!
//! It is blocking (std processes, no async runtime): call it from a plain `#[test]`, or at the top of a
//! `#[tokio::test]` (nothing else runs yet while it starts).
//!
//! What this must not do: touch any system cluster, listen on anything but 127.0.0.1, or pass when PostgreSQL
//! is not installed; a missing PostgreSQL is an error that says what to install.
//!
//! Durability settings: `fsync=off` and `full_page_writes=off` only matter when the operating system crashes;
//! a killed server ([`kill9`](TempCluster::kill9)) loses nothing that was committed, because
//! `synchronous_commit` stays on (a commit is acknowledged only once its WAL is in the kernel's hands).
//!
//! PostgreSQL refuses to run as root. When the tests run as root (CI), `initdb` and `postgres` run as
//! Debian's `postgres` system user (or `nobody` if there is none), and the temporary directory is theirs;
//! otherwise they run as the current user.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rand::Rng as _;

/// The role and database made for knock.
const KNOCK: &str = "knock";
/// The bootstrap superuser `initdb` makes (reachable over the Unix socket only, without a password).
const SUPERUSER: &str = "postgres";
/// How long a start (or a crash recovery) may take before it counts as failed. Generous: a loaded CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Environment variables that would change what `psql` connects to; cleared for every command run here.
const PG_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGDATA",
    "PGSSLMODE",
];

/// A PostgreSQL server of its own: temporary directory, data, port, socket and process.
pub struct TempCluster {
    /// Holds `data/` (the cluster), the Unix socket and `postgres.log`; `None` only once dropped.
    dir: Option<tempfile::TempDir>,
    /// Binaries, user and template, shared by every cluster of this process.
    host: &'static Host,
    /// The loopback TCP port; kept across [`stop`](Self::stop) and [`start_again`](Self::start_again) so that
    /// a client holding [`url`](Self::url) finds the server again.
    port: u16,
    /// The `knock` role's password (random per cluster), for TCP connections.
    password: String,
    /// Extra `-c name=value` settings given to [`start_with`](Self::start_with), reused on every start.
    settings: Vec<(String, String)>,
    /// The running postmaster, `None` while stopped.
    postmaster: Option<Child>,
    /// A shell that waits for EOF on its stdin and then stops the server and removes the directory: it cleans
    /// up when this process dies without running `Drop` (SIGKILL, abort, a test timeout).
    watchdog: Option<(Child, ChildStdin)>,
}

impl TempCluster {
    /// Make and start a cluster with the defaults (see the module comment for what they are).
    pub fn start() -> anyhow::Result<TempCluster> {
        TempCluster::start_with(&[])
    }

    /// Make and start a cluster with extra server settings, e.g. `[("max_connections", "300")]`; they apply
    /// to every later [`start_again`](Self::start_again) too.
    pub fn start_with(settings: &[(&str, &str)]) -> anyhow::Result<TempCluster> {
        // 1. Binaries, the user to run them as, and a freshly initialised cluster to copy (made once).
        let host = Host::get()?;

        // 2. The directory, owned by that user, and a copy of the template's data in it.
        let dir = host.make_dir("knock-pg-")?;
        let mut cluster = TempCluster {
            dir: Some(dir),
            host,
            port: 0,
            password: random_hex(16),
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            postmaster: None,
            watchdog: None,
        };
        cluster.watchdog = Some(spawn_watchdog(cluster.socket_dir())?);
        let mut cp = host.server_command("cp");
        cp.arg("-a")
            .arg(host.template_data())
            .arg(cluster.data_dir());
        run(&mut cp, "cp (the template cluster)")?;

        // 4. Start on a free port; another cluster (another test process) may take the same one first.
        let mut tries = 0;
        loop {
            tries += 1;
            cluster.port = pick_port()?;
            match cluster.spawn_and_wait() {
                Ok(()) => break,
                Err(e) if tries < 10 && cluster.log().contains("could not bind") => {
                    tracing::debug!("port {} taken, trying another: {e:#}", cluster.port);
                    cluster.truncate_log();
                }
                Err(e) => return Err(e),
            }
        }

        // 5. The role and database knock uses (two transactions: CREATE DATABASE cannot share one).
        let mut psql = cluster.superuser_psql("postgres");
        psql.args([
            "-c",
            &format!("CREATE ROLE {KNOCK} LOGIN PASSWORD '{}'", cluster.password),
            "-c",
            &format!("CREATE DATABASE {KNOCK} OWNER {KNOCK}"),
        ]);
        run(&mut psql, "psql (making the knock role and database)")?;
        Ok(cluster)
    }

    /// `postgres://knock:PASSWORD@127.0.0.1:PORT/knock`: the role `knock` (not a superuser) over TCP.
    pub fn url(&self) -> String {
        format!(
            "postgres://{KNOCK}:{}@127.0.0.1:{}/{KNOCK}",
            self.password, self.port
        )
    }

    /// `postgresql://knock:PASSWORD@/knock?host=SOCKET_DIR&port=PORT`: the same role over the Unix socket.
    pub fn socket_url(&self) -> String {
        format!(
            "postgresql://{KNOCK}:{}@/{KNOCK}?host={}&port={}",
            self.password,
            self.socket_dir().display(),
            self.port
        )
    }

    /// The loopback TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the Unix socket `.s.PGSQL.<port>`.
    pub fn socket_dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory lives until drop")
            .path()
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.socket_dir().join("data")
    }

    /// The role's name (`knock`).
    pub fn user(&self) -> &str {
        KNOCK
    }

    /// The role's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The database's name (`knock`).
    pub fn database(&self) -> &str {
        KNOCK
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Child::id)
    }

    /// Everything the server has logged so far (all starts), for a failing test to print.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Run SQL as the superuser over the Unix socket with `psql` (unaligned, tuples only) and return what it
    /// printed: setup, inspection, and breaking things (`SELECT pg_terminate_backend(...)`).
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let mut psql = self.superuser_psql("postgres");
        psql.args(["-c", sql]);
        run(&mut psql, "psql")
    }

    /// Like [`psql`](Self::psql), in the `knock` database.
    pub fn psql_knock(&self, sql: &str) -> anyhow::Result<String> {
        let mut psql = self.superuser_psql(KNOCK);
        psql.args(["-c", sql]);
        run(&mut psql, "psql")
    }

    /// Whether the postmaster is running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.postmaster {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stop the server the way an administrator would (a fast shutdown: clients are disconnected, a
    /// checkpoint is written). Killed if it takes over 30 s. Nothing happens if it is already stopped.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.postmaster.take() else {
            return Ok(());
        };
        signal(child.id(), libc::SIGINT);
        if wait_timeout(&mut child, STOP_TIMEOUT)?.is_none() {
            self.postmaster = Some(child);
            self.kill9()?;
            bail!(
                "PostgreSQL did not stop within {STOP_TIMEOUT:?} of SIGINT and was killed; its log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    /// Start the stopped (or killed) server again on the same data, port and socket, and wait until it
    /// accepts connections (after crash recovery, if it was killed).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!(
                "start_again: PostgreSQL is still running (pid {:?})",
                self.pid()
            );
        }
        // The port was free when stop() returned, but another process may have bound it since; give it a
        // moment rather than fail at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(e)
                    if Instant::now() < deadline && self.log_tail().contains("could not bind") =>
                {
                    tracing::debug!("port {} busy on start_again: {e:#}", self.port);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Crash the server: SIGKILL to the postmaster and to every process it started, all at once, as a machine
    /// losing power would leave it (but with the kernel's page cache intact). Returns once they are all
    /// gone; [`start_again`](Self::start_again) then runs crash recovery.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.postmaster.take() else {
            return Ok(());
        };
        let pid = child.id();
        // Frozen first, so it forks nothing between listing its children and their deaths. Its children
        // (backends, checkpointer, WAL writer, ...) are each their own session, so no process group covers
        // them: they are found by parent pid.
        signal(pid, libc::SIGSTOP);
        let children = children_of(pid);
        for &c in &children {
            signal(c, libc::SIGKILL);
        }
        child.kill().context("SIGKILL to the postmaster")?;
        child.wait().context("reaping the postmaster")?;
        // The children are reparented and reaped elsewhere; wait until the kernel has let them go, so the new
        // postmaster finds no process attached to the old shared memory.
        let deadline = Instant::now() + Duration::from_secs(10);
        while children.iter().any(|&c| alive_not_zombie(c)) {
            if Instant::now() > deadline {
                bail!("kill9: processes of the killed PostgreSQL still alive after 10 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// A killed server leaves its small System V shared memory segment behind (the next start of the same
    /// data would remove it); nothing will start again, so remove it here. Its id is on line 7 of
    /// `postmaster.pid`, which a cleanly stopped server has removed.
    fn remove_killed_shared_memory(&self) {
        let Ok(text) = std::fs::read_to_string(self.data_dir().join("postmaster.pid")) else {
            return;
        };
        let shmid = text
            .lines()
            .nth(6)
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|id| id.parse::<libc::c_int>().ok());
        if let Some(shmid) = shmid {
            // SAFETY: IPC_RMID takes no buffer; at worst the id is stale and the call fails.
            unsafe {
                libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut());
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.socket_dir().join("postgres.log")
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn truncate_log(&self) {
        if let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .open(self.log_path())
        {
            let _ = f.set_len(0);
        }
    }

    /// `psql` as the superuser over the Unix socket into `database`, unaligned and tuples only.
    fn superuser_psql(&self, database: &str) -> Command {
        let mut psql = self.host.client_command("psql");
        psql.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                database,
            ]);
        psql
    }

    /// Start the postmaster on `self.port` and wait until it is ready, or has exited (error with its log).
    fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening postgres.log")?;
        if let Some((uid, gid)) = self.host.run_as {
            let _ = std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid));
        }
        let mut postgres = self.host.server_command("postgres");
        postgres
            .arg("-D")
            .arg(self.data_dir())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("port={}", self.port)])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.socket_dir().display()
            ))
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            // Dynamic shared memory as files in data/pg_dynshmem, not in /dev/shm: a killed server's segments
            // go with the directory.
            .args(["-c", "dynamic_shared_memory_type=mmap"])
            .args(["-c", "log_line_prefix=%m [%p] "]);
        for (name, value) in &self.settings {
            postgres.arg("-c").arg(format!("{name}={value}"));
        }
        // Its own process group: a Ctrl-C meant for the test run reaches the test process (whose Drop or
        // watchdog stops the server in order), not the postmaster directly.
        postgres
            .process_group(0)
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = postgres
            .spawn()
            .with_context(|| format!("starting {}", self.host.bindir.join("postgres").display()))?;

        // Ready when postmaster.pid says so (line 8), as pg_ctl decides it.
        let pidfile = self.data_dir().join("postmaster.pid");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "PostgreSQL exited at startup ({status}) on port {}; its log:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&pidfile) {
                let mut lines = text.lines();
                let pid_matches = lines.next().map(str::trim) == Some(&child.id().to_string());
                if pid_matches && lines.nth(6).map(str::trim) == Some("ready") {
                    break;
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "PostgreSQL not ready within {START_TIMEOUT:?}; its log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.postmaster = Some(child);
        Ok(())
    }
}

impl Drop for TempCluster {
    /// An immediate shutdown (the data is thrown away, so no checkpoint), then the directory goes.
    fn drop(&mut self) {
        if let Some((mut watchdog, stdin)) = self.watchdog.take() {
            // Ours to do now; the watchdog must not remove the directory after a new one took its name.
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            drop(stdin);
        }
        if let Some(mut child) = self.postmaster.take() {
            signal(child.id(), libc::SIGQUIT);
            if !matches!(
                wait_timeout(&mut child, Duration::from_secs(10)),
                Ok(Some(_))
            ) {
                self.postmaster = Some(child);
                let _ = self.kill9();
            }
        }
        self.remove_killed_shared_memory();
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_owned();
            if let Err(e) = dir.close() {
                tracing::warn!("removing {}: {e}", path.display());
            }
        }
    }
}

/// A shell that waits for EOF on its stdin (when the write end, which we keep, closes with this process), then
/// stops the server whose data is in `dir/data`, if one runs, and removes `dir`. It runs as the current user
/// (root may signal the server's user), in its own process group so that a Ctrl-C does not end it before the
/// test process.
fn spawn_watchdog(dir: &Path) -> anyhow::Result<(Child, ChildStdin)> {
    const SCRIPT: &str = r#"
        trap '' INT TERM HUP
        cat >/dev/null
        pid=$(head -n 1 "$1/data/postmaster.pid" 2>/dev/null)
        if [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null; then
            i=0
            while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        fi
        rm -rf "$1"
    "#;
    let mut child = Command::new("sh")
        .args(["-c", SCRIPT, "knock-pg-watchdog"])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the cleanup watchdog (sh)")?;
    let stdin = child.stdin.take().expect("stdin was piped");
    Ok((child, stdin))
}

/// What every cluster of this process shares: where the binaries are, whom they run as, where clusters go, and
/// a cluster initialised once to copy (`initdb` costs 0.3 to 1.5 s of CPU; a copy on tmpfs, under 0.1 s).
struct Host {
    /// Where `initdb`, `postgres` and `psql` are (e.g. `/usr/lib/postgresql/15/bin`).
    bindir: PathBuf,
    /// uid and gid the server runs as, when the tests run as root; `None` runs it as the current user.
    run_as: Option<(u32, u32)>,
    /// Where cluster directories are made: `$KNOCK_PG_TMPDIR`, else `/dev/shm` when it is a tmpfs with room,
    /// else the temporary directory.
    parent: PathBuf,
    /// Holds `data/`, the template; never dropped (a static): its watchdog removes it when the process ends.
    template: tempfile::TempDir,
    /// Kept for its stdin, whose closing at exit sets the watchdog off.
    _watchdog: (Child, ChildStdin),
}

impl Host {
    /// The process's host, made on first use. An error (no PostgreSQL installed) is remembered and repeated.
    fn get() -> anyhow::Result<&'static Host> {
        static HOST: OnceLock<Result<Host, String>> = OnceLock::new();
        HOST.get_or_init(|| Host::make().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn make() -> anyhow::Result<Host> {
        let bindir = match find_bindir() {
            Ok(bindir) => bindir,
            // As root on a fresh machine, install it as the end-to-end scripts do, so that
            // `cargo test --workspace` needs no step before it.
            Err(missing) if is_root() => {
                install_postgresql().with_context(|| format!("{missing:#}"))?;
                find_bindir()?
            }
            Err(missing) => return Err(missing),
        };
        let run_as = unprivileged_user()?;
        let parent = cluster_parent();
        let template = make_dir_in(&parent, "knock-pg-template-", run_as)?;
        let watchdog = spawn_watchdog(template.path())?;
        let host = Host {
            bindir,
            run_as,
            parent,
            template,
            _watchdog: watchdog,
        };
        // trust on the socket (the superuser, for setup and psql), SCRAM passwords over TCP.
        let mut initdb = host.server_command("initdb");
        initdb
            .arg("--pgdata")
            .arg(host.template_data())
            .args(["--username", SUPERUSER])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .args(["--encoding=UTF8", "--locale=C", "--no-sync"]);
        run(&mut initdb, "initdb")?;
        Ok(host)
    }

    fn template_data(&self) -> PathBuf {
        self.template.path().join("data")
    }

    fn make_dir(&self, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
        make_dir_in(&self.parent, prefix, self.run_as)
    }

    /// A command for one of the server's programs, run as the unprivileged user, with a clean PG environment.
    fn server_command(&self, program: &str) -> Command {
        let path = if program == "cp" {
            PathBuf::from("cp")
        } else {
            self.bindir.join(program)
        };
        let mut cmd = Command::new(path);
        clean_env(&mut cmd);
        // The test's working directory may be closed to the server's user (/root, say); all paths are absolute.
        cmd.current_dir("/");
        if let Some((uid, gid)) = self.run_as {
            // std drops the supplementary groups too when it changes uid as root.
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// A command for a client program (`psql`), run as the current user.
    fn client_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        clean_env(&mut cmd);
        cmd
    }
}

fn clean_env(cmd: &mut Command) {
    for var in PG_ENV {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C").stdin(Stdio::null());
}

/// See [`Host::parent`]. The socket path inside must stay under its 107-byte limit, so a long temporary
/// directory gives way to `/tmp`.
fn cluster_parent() -> PathBuf {
    if let Some(dir) = std::env::var_os("KNOCK_PG_TMPDIR") {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    if is_tmpfs(shm) && free_bytes(shm).is_some_and(|free| free >= 1 << 30) {
        return shm.to_owned();
    }
    let tmp = std::env::temp_dir();
    if tmp.as_os_str().len() > 60 {
        PathBuf::from("/tmp")
    } else {
        tmp
    }
}

/// Whether `path` is on a tmpfs (and not, say, a plain directory in a chroot).
fn is_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs only writes into the zeroed struct we own; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return false;
    }
    stat.f_type == libc::TMPFS_MAGIC
}

/// Bytes an unprivileged user may still write under `path`, if it is a writable directory.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes into the zeroed struct we own; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    // SAFETY: access has no memory preconditions beyond the NUL-terminated path.
    if unsafe { libc::access(c_path.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// A temporary directory under `parent`, owned by `run_as`, readable by all (the socket is in it; `data/`
/// inside stays 0700).
fn make_dir_in(
    parent: &Path,
    prefix: &str,
    run_as: Option<(u32, u32)>,
) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .with_context(|| format!("making a temporary directory in {}", parent.display()))?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
            .with_context(|| format!("giving {} to uid {uid}", dir.path().display()))?;
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// The newest PostgreSQL server binaries: `$KNOCK_PG_BINDIR`, then Debian's `/usr/lib/postgresql/<major>/bin`,
/// then `pg_config --bindir`.
pub fn find_bindir() -> anyhow::Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("KNOCK_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_server(&dir) {
            return Ok(dir);
        }
        bail!(
            "KNOCK_PG_BINDIR={} has no initdb and postgres in it",
            dir.display()
        );
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((major, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    bail!(
        "PostgreSQL is not installed: no initdb and postgres in /usr/lib/postgresql/*/bin nor in \
         `pg_config --bindir`. Install Debian's PostgreSQL server: `apt-get install postgresql` (as root; \
         pg_ensure_installed in prosody-test/lib/postgres.sh does it, without a system cluster), or set \
         KNOCK_PG_BINDIR"
    )
}

/// Whether this process runs as root.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Install Debian's PostgreSQL with the repository's own `pg_ensure_installed` (no system cluster), one test
/// process at a time.
fn install_postgresql() -> anyhow::Result<()> {
    let library = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../prosody-test/lib/postgres.sh"
    );
    eprintln!(
        "PostgreSQL is not installed: installing Debian's package (prosody-test/lib/postgres.sh)"
    );
    let status = Command::new("flock")
        .args(["/tmp/knock-pg-install.lock", "bash", "-c"])
        .arg(format!("source {library} && pg_ensure_installed"))
        .status()
        .context("running pg_ensure_installed")?;
    anyhow::ensure!(status.success(), "pg_ensure_installed failed ({status})");
    Ok(())
}

/// uid and gid to run the server as: `None` (the current user) unless we are root, then Debian's `postgres`
/// system user, or `nobody`.
fn unprivileged_user() -> anyhow::Result<Option<(u32, u32)>> {
    if !is_root() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for name in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 4 && fields[0] == name {
                if let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse()) {
                    if uid != 0 {
                        return Ok(Some((uid, gid)));
                    }
                }
            }
        }
    }
    bail!(
        "running as root and /etc/passwd has neither a postgres nor a nobody user to run PostgreSQL as \
         (it refuses to run as root); `apt-get install postgresql` makes the postgres user"
    )
}

/// A port in 20000..32000 that is free now. Below Linux's ephemeral range (32768..60999), so that no
/// client connection's local port takes it while the server is stopped between `stop` and `start_again`.
fn pick_port() -> anyhow::Result<u16> {
    let mut rng = rand::thread_rng();
    for _ in 0..100 {
        let port = rng.gen_range(20000..32000);
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found on 127.0.0.1 in 20000..32000 after 100 tries")
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..bytes).fold(String::new(), |mut s, _| {
        let _ = write!(s, "{:02x}", rng.gen::<u8>());
        s
    })
}

/// Run to completion; its stdout, or an error with its stderr.
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {what} ({:?})", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions; the pid is a process this cluster started (or its child).
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Wait up to `timeout` for the child to exit.
fn wait_timeout(
    child: &mut Child,
    timeout: Duration,
) -> anyhow::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pids whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let (_, ppid) = stat_state_ppid(pid)?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// A process that exists and is not a zombie (a zombie holds no memory, shared or not).
fn alive_not_zombie(pid: u32) -> bool {
    matches!(stat_state_ppid(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// State letter and parent pid from `/proc/<pid>/stat` (fields 3 and 4, after the parenthesised name).
fn stat_state_ppid(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// psql over TCP with the role's password: what knock itself will do, through the URL.
    fn knock_sql(cluster: &TempCluster, sql: &str) -> anyhow::Result<String> {
        let mut psql = cluster.host.client_command("psql");
        psql.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(cluster.url())
            .args(["-c", sql]);
        run(&mut psql, "psql")
    }

    #[test]
    fn starts_restarts_and_survives_a_kill9() -> anyhow::Result<()> {
        let started = Instant::now();
        let mut pg = TempCluster::start()?;
        eprintln!("TempCluster::start took {:?}", started.elapsed());

        // The knock role owns its database, is no superuser, and reaches it over TCP with the password.
        knock_sql(
            &pg,
            "CREATE TABLE reg (id int PRIMARY KEY, node text NOT NULL)",
        )?;
        knock_sql(&pg, "INSERT INTO reg VALUES (1, 'before restart')")?;
        assert_eq!(knock_sql(&pg, "SELECT current_user")?.trim(), "knock");
        assert_eq!(
            pg.psql("SELECT rolsuper FROM pg_roles WHERE rolname = 'knock'")?
                .trim(),
            "f"
        );
        let wrong = pg.url().replace(pg.password(), "wrong");
        let mut psql = pg.host.client_command("psql");
        psql.args(["-X", "-c", "SELECT 1"]).arg(&wrong);
        assert!(run(&mut psql, "psql").is_err(), "a wrong password gets in");

        // stop + start_again: same port, same data.
        let port = pg.port();
        pg.stop()?;
        assert!(!pg.is_running());
        assert!(
            knock_sql(&pg, "SELECT 1").is_err(),
            "stopped, yet answering"
        );
        let started = Instant::now();
        pg.start_again()?;
        eprintln!("start_again took {:?}", started.elapsed());
        assert_eq!(pg.port(), port);
        assert_eq!(
            knock_sql(&pg, "SELECT node FROM reg WHERE id = 1")?.trim(),
            "before restart"
        );

        // kill9 with a committed row and an open connection: every process gone, the row survives recovery.
        knock_sql(&pg, "INSERT INTO reg VALUES (2, 'before kill9')")?;
        let mut idle = pg.host.client_command("psql");
        let mut idle = idle
            .args(["-X", "-q"])
            .arg(pg.url())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(200));
        let pid = pg.pid().expect("running");
        let children = children_of(pid);
        assert!(children.len() >= 4, "backend and helpers: {children:?}");
        pg.kill9()?;
        assert!(children.iter().all(|&c| !alive_not_zombie(c)));
        let started = Instant::now();
        pg.start_again()?;
        eprintln!("start_again after kill9 took {:?}", started.elapsed());
        assert!(pg.log().contains("database system was interrupted"));
        assert_eq!(
            knock_sql(&pg, "SELECT string_agg(node, ',' ORDER BY id) FROM reg")?.trim(),
            "before restart,before kill9"
        );
        drop(idle.stdin.take());
        let _ = idle.wait();

        // Drop stops the server and removes everything.
        let dir = pg.socket_dir().to_owned();
        let pid = pg.pid().expect("running");
        drop(pg);
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert!(!alive_not_zombie(pid));
        Ok(())
    }

    #[test]
    fn a_killed_cluster_leaves_nothing_behind() -> anyhow::Result<()> {
        let mut pg = TempCluster::start()?;
        let pidfile = std::fs::read_to_string(pg.data_dir().join("postmaster.pid"))?;
        let shmid = pidfile
            .lines()
            .nth(6)
            .and_then(|l| l.split_whitespace().nth(1));
        let shmid = shmid
            .expect("postmaster.pid line 7: key and shmid")
            .to_owned();
        let listed = || -> anyhow::Result<bool> {
            let segments = std::fs::read_to_string("/proc/sysvipc/shm")?;
            Ok(segments
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(shmid.as_str())))
        };
        assert!(listed()?, "segment {shmid} not in /proc/sysvipc/shm");
        pg.kill9()?;
        let dir = pg.socket_dir().to_owned();
        drop(pg);
        assert!(!listed()?, "segment {shmid} left behind");
        assert!(!dir.exists());
        Ok(())
    }

    #[test]
    fn clusters_run_side_by_side() -> anyhow::Result<()> {
        let started = Instant::now();
        let a = TempCluster::start()?;
        eprintln!("first TempCluster::start took {:?}", started.elapsed());
        let started = Instant::now();
        let b = TempCluster::start()?;
        eprintln!("second TempCluster::start took {:?}", started.elapsed());
        assert_ne!(a.port(), b.port());
        assert_ne!(a.socket_dir(), b.socket_dir());
        knock_sql(&a, "CREATE TABLE only_in_a (x int)")?;
        assert!(knock_sql(&b, "SELECT * FROM only_in_a").is_err());
        // The socket URL names the same database.
        let mut psql = b.host.client_command("psql");
        psql.args(["-X", "-A", "-t", "-c", "SELECT current_database()"])
            .arg(b.socket_url());
        assert_eq!(run(&mut psql, "psql")?.trim(), "knock");
        Ok(())
    }

    #[test]
    fn settings_reach_the_server() -> anyhow::Result<()> {
        let mut pg = TempCluster::start_with(&[("max_connections", "42")])?;
        assert_eq!(pg.psql("SHOW max_connections")?.trim(), "42");
        assert_eq!(pg.psql("SHOW fsync")?.trim(), "off");
        assert_eq!(pg.psql("SHOW synchronous_commit")?.trim(), "on");
        pg.stop()?;
        pg.start_again()?;
        assert_eq!(pg.psql("SHOW max_connections")?.trim(), "42");
        Ok(())
    }
}
