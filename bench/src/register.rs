//! Registrations per second with each store engine: new users registering their phones
//! (`register-push-apns`, token and device id), a window of 64 in flight, each answered only once it is
//! durable (sled: flushed to disk; PostgreSQL: its transaction committed, changes committed in batches).
//! Repetitions alternate between the engines so that drift on the machine hits both alike.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::bail;

use crate::load::{self, Load};
use crate::pg::Database;
use crate::report::{count, num, summarize, Rep, Summary};
use crate::scale::registrations;
use crate::targets::{start, Env, StoreAt, Target};

/// Registrations in flight.
pub const WINDOW: usize = 64;

/// The engines measured, in report order: sled, PostgreSQL with fsync on (what the goal is about) and, to
/// show what the disk costs, with fsync off.
const ENGINES: [&str; 3] = ["sled", "PostgreSQL", "PostgreSQL, fsync off"];

/// What was measured: per engine, the summary of its repetitions.
pub struct Results {
    /// (engine, summary, registrations per commit over its repetitions: PostgreSQL only).
    pub rows: Vec<(&'static str, Summary, f64)>,
    /// `SHOW synchronous_commit` on the PostgreSQL server with fsync on.
    pub synchronous_commit: String,
}

impl Results {
    /// The summary of one engine.
    pub fn get(&self, engine: &str) -> Option<&Summary> {
        self.rows
            .iter()
            .find(|(e, _, _)| *e == engine)
            .map(|(_, s, _)| s)
    }
}

/// Measure registrations on a fresh sled store and on two fresh PostgreSQL clusters on disk, one with
/// `fsync=on`, one with `fsync=off`.
pub async fn run(
    env: &Env,
    reps: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Results> {
    let sled = env.work.join("store-register");
    eprintln!("starting PostgreSQL (fsync on, and off) for the registrations…");
    let synced = Database::start(env, "register-pg", true).await?;
    let unsynced = Database::start(env, "register-pg-nofsync", false).await?;
    let synchronous_commit = synced.setting("synchronous_commit")?;
    let mut done: Vec<Vec<Rep>> = vec![Vec::new(); ENGINES.len()];
    // Per engine: registrations and write transactions, summed over repetitions.
    let mut batching = [(0u64, 0u64); ENGINES.len()];
    for rep in 0..reps {
        for (e, engine) in ENGINES.iter().enumerate() {
            let (store, db) = match e {
                0 => (StoreAt::Sled(&sled), None),
                1 => (StoreAt::Postgres(&synced), Some(&synced)),
                _ => (StoreAt::Postgres(&unsynced), Some(&unsynced)),
            };
            let (mut running, component) = start(Target::DryRun, env, &store).await?;
            let before = db.map(Database::writes_and_rows).transpose()?;
            let pid = running.component()?.pid()?;
            let load = Load {
                window: WINDOW,
                warmup,
                measure,
                watch: vec![pid],
            };
            // New users every time: `b<run>u<seq>`, runs 100 and up (the scale run uses 0 to 3).
            let run = 100 + rep * ENGINES.len() + e;
            let outcome = load::run(component, &load, registrations(run)).await;
            if let (Some(db), Some((xid0, rows0))) = (db, before) {
                let (xid1, rows1) = db.writes_and_rows()?;
                // Less the reading's own transaction.
                batching[e].0 += rows1 - rows0;
                batching[e].1 += (xid1 - xid0).saturating_sub(1);
            }
            let alive = running.check_alive();
            running.stop().await;
            let (_, outcome) = outcome?;
            alive?;
            if outcome.errors > 0 {
                bail!(
                    "{engine}: {} registrations refused, the first: {}",
                    outcome.errors,
                    outcome.first_error.unwrap_or_default()
                );
            }
            eprintln!(
                "  registrations, {engine:<21} window {WINDOW}  rep {}/{reps}: {:>7}/s  p50 {} ms  p99 {} ms  cpu {} µs/registration",
                rep + 1,
                count(outcome.per_sec()),
                num(outcome.quantile_ms(0.5), 2),
                num(outcome.quantile_ms(0.99), 2),
                num(outcome.cpu_us_per_reply(0), 1),
            );
            done[e].push(Rep {
                cpu_us: outcome.cpu_us_per_reply(0),
                mock_cpu_us: f64::NAN,
                peak_rss: None,
                outcome,
            });
        }
    }
    synced.stop().await;
    unsynced.stop().await;
    Ok(Results {
        rows: ENGINES
            .iter()
            .zip(&done)
            .zip(batching)
            .map(|((engine, reps), (rows, commits))| {
                let per_commit = if commits == 0 {
                    f64::NAN
                } else {
                    rows as f64 / commits as f64
                };
                (*engine, summarize(reps), per_commit)
            })
            .collect(),
        synchronous_commit,
    })
}

/// The registrations table, Markdown.
pub fn table(results: &Results, reps: usize, warmup: Duration, measure: Duration) -> String {
    let mut out = String::from(
        "| engine | window | registrations/s (min / median / max) | p50 ms | p99 ms | max ms | knock CPU µs/registration | registrations per commit |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (engine, s, per_commit) in &results.rows {
        let _ = writeln!(
            out,
            "| {engine} | {WINDOW} | {} | {} |",
            s.cells(),
            num(*per_commit, 1),
        );
    }
    let _ = writeln!(
        out,
        "\n`register-push-apns` commands (token and device id) from new users, {WINDOW} in flight, each \
         answered only once durable: sled flushes it to disk, PostgreSQL commits its transaction (knock \
         commits the changes queued meanwhile together). {reps} repetitions of {} s each after {} s of \
         warm-up, alternating between the engines, each on a store of its own that starts empty. PostgreSQL \
         runs on this machine, each cluster in the run's scratch directory on disk, with synchronous_commit = {} \
         and full_page_writes = off; *PostgreSQL* has fsync = on, so a commit waits for its WAL to reach the \
         disk; *fsync off* only shows what that wait costs (a commit is then in the kernel's hands only). \
         knock's CPU only: PostgreSQL's own is not in it. *Registrations per commit*: rows added over write \
         transactions, warm-up included (from `pg_current_xact_id()` before and after each load).",
        measure.as_secs_f64(),
        warmup.as_secs_f64(),
        results.synchronous_commit,
    );
    out
}
