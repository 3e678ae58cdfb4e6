//! `pg-cluster`: a throwaway PostgreSQL cluster ([`testkit::postgres::TempCluster`]) as a process, for the
//! end-to-end scripts (shell and Python) to use the same code as `cargo test`.
//!
//! It starts the cluster and prints one JSON line on stdout when it accepts connections:
//! `{"event":"ready","url","socket_url","port","socket_dir","data_dir","pid","user","password","database",
//! "startup_ms"}`. It runs until SIGTERM, SIGINT or SIGHUP, then stops the server and removes its directory.
//!
//! With `--control-stdin` it also reads commands, one a line, and answers each with one JSON line:
//! `stop` (fast shutdown) -> `{"event":"stopped"}`, `start` (same data and port) -> `{"event":"ready",...}`,
//! `kill9` (every server process SIGKILLed) -> `{"event":"killed"}`, `sql <statement>` (as the superuser, in
//! the knock database) -> `{"event":"sql","output"}`; a failure -> `{"event":"error","error"}`. End of input
//! (the controlling script went away) ends it like SIGTERM.

use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use serde_json::json;
use testkit::postgres::TempCluster;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(about = "Start a throwaway PostgreSQL cluster; print its URL as JSON; run until SIGTERM")]
struct Args {
    /// An extra server setting, NAME=VALUE (e.g. max_connections=300); repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    settings: Vec<String>,
    /// Read stop/start/kill9/sql commands from stdin; end of input ends the cluster.
    #[arg(long)]
    control_stdin: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut settings = Vec::new();
    for setting in &args.settings {
        let (name, value) = setting
            .split_once('=')
            .with_context(|| format!("--set {setting}: expected NAME=VALUE"))?;
        settings.push((name, value));
    }

    // Signals first, so that one arriving during startup is not lost.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;

    let started = Instant::now();
    let mut cluster = TempCluster::start_with(&settings)?;
    let startup_ms = started.elapsed().as_millis() as u64;
    say(ready(&mut cluster, startup_ms));

    // Commands are read on a thread of their own: tokio's stdin would keep the runtime from shutting down
    // while a read is pending. `None` is end of input.
    let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel();
    if args.control_stdin {
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if tx.send(Some(line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(None);
        });
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => break,
            Some(line) = commands.recv() => {
                let Some(line) = line else { break };
                say(command(&mut cluster, line.trim()));
            }
        }
    }
    drop(cluster);
    Ok(())
}

fn command(cluster: &mut TempCluster, line: &str) -> serde_json::Value {
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    let done = match verb {
        "stop" => cluster.stop().map(|()| json!({"event": "stopped"})),
        "start" => {
            let started = Instant::now();
            cluster
                .start_again()
                .map(|()| ready(cluster, started.elapsed().as_millis() as u64))
        }
        "kill9" => cluster.kill9().map(|()| json!({"event": "killed"})),
        "sql" => cluster
            .psql_knock(rest)
            .map(|output| json!({"event": "sql", "output": output})),
        _ => Err(anyhow::anyhow!(
            "unknown command {verb:?}: stop, start, kill9 or sql <statement>"
        )),
    };
    done.unwrap_or_else(|e| json!({"event": "error", "error": format!("{e:#}")}))
}

fn ready(cluster: &mut TempCluster, startup_ms: u64) -> serde_json::Value {
    json!({
        "event": "ready",
        "url": cluster.url(),
        "socket_url": cluster.socket_url(),
        "port": cluster.port(),
        "socket_dir": cluster.socket_dir(),
        "data_dir": cluster.data_dir(),
        "pid": cluster.pid(),
        "user": cluster.user(),
        "password": cluster.password(),
        "database": cluster.database(),
        "startup_ms": startup_ms,
    })
}

fn say(event: serde_json::Value) {
    // One line per event, flushed: the reader waits for it.
    println!("{event}");
}
