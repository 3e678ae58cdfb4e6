//! Publishes per second and their latency at each window, for the echo ceiling, knock in dry-run, knock
//! pushing to each provider's mock (APNs, FCM) and each mock alone, repetitions interleaved so drift on
//! the machine hits all alike.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::h2load;
use crate::load::{self, Load, Source};
use crate::mocks::Provider;
use crate::pg;
use crate::procs::memory;
use crate::report::{count, mib_or_dash, num, summarize, Rep, Summary};
use crate::seed::{register_fcm, seed};
use crate::stanzas::Publishes;
use crate::targets::{start, start_mock, Env, Running, StoreAt, Target};

/// What to measure.
pub struct Options {
    /// Repetitions per (target, window).
    pub reps: usize,
    /// Warm-up before each measurement.
    pub warmup: Duration,
    /// Measured time per repetition.
    pub measure: Duration,
    /// Windows (IQs in flight).
    pub windows: Vec<usize>,
    /// Registrations in the store, all published to.
    pub nodes: usize,
    /// What to measure, in report order.
    pub targets: Vec<Target>,
}

/// The summaries of every (window, target).
pub struct Results {
    /// (window, target, summary), in report order.
    pub rows: Vec<(usize, Target, Summary)>,
}

impl Results {
    /// The summary of one (window, target).
    pub fn get(&self, window: usize, target: Target) -> Option<&Summary> {
        self.rows
            .iter()
            .find(|(w, t, _)| *w == window && *t == target)
            .map(|(_, _, s)| s)
    }
}

/// Publishes to random nodes of `set` (xorshift: cheap, and the same sequence every run).
pub fn publishes(set: Arc<Publishes>) -> Source {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    Box::new(move |seq, sent, out| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        set.write((x % set.len() as u64) as usize, b'p', seq, sent, out);
    })
}

/// Seed the stores, run every load, and return the summaries.
pub async fn run(env: &Env, options: &Options) -> anyhow::Result<Results> {
    let wants = |f: fn(&Target) -> bool| options.targets.iter().any(f);
    // The echo component, dry_run and the APNs app publish to an APNs store written directly.
    let apns_store = env.work.join("store-throughput");
    let apns_set = if wants(|t| {
        matches!(
            t,
            Target::Echo | Target::DryRun | Target::Push(Provider::Apns)
        )
    }) {
        eprintln!("seeding {} registrations…", options.nodes);
        Some(
            seed(&apns_store, options.nodes, options.nodes)
                .await?
                .publishes(),
        )
    } else {
        None
    };
    // The FCM app publishes to a store of Android devices registered over XMPP.
    let fcm_store = env.work.join("store-throughput-fcm");
    let fcm_set = if wants(|t| *t == Target::Push(Provider::Fcm)) {
        eprintln!(
            "registering {} Android devices with register-push-fcm…",
            options.nodes
        );
        let (running, mut component) =
            start(Target::Push(Provider::Fcm), env, &StoreAt::Sled(&fcm_store)).await?;
        let registered = register_fcm(&mut component, options.nodes).await;
        running.stop().await;
        let registered = registered?;
        eprintln!("  registered in {:.1} s", registered.took.as_secs_f64());
        Some(registered.publishes())
    } else {
        None
    };

    // dry_run-pg publishes to the same kind of store, seeded the same way, then moved into PostgreSQL with
    // `knock export` / `knock import`.
    let pg = if wants(|t| *t == Target::DryRunPg) {
        eprintln!(
            "seeding {} registrations into PostgreSQL (knock export | knock import)…",
            options.nodes
        );
        Some(pg::seeded(env, "throughput-pg", options.nodes).await?)
    } else {
        None
    };

    let mut reps: Vec<(usize, Target, Vec<Rep>)> = Vec::new();
    for &window in &options.windows {
        for &target in &options.targets {
            // A mock alone is a ceiling question, which one push at a time does not ask: knock → mock
            // at window 1 already shows the round trip.
            if window == 1 && matches!(target, Target::MockAlone(_)) {
                continue;
            }
            reps.push((window, target, Vec::new()));
        }
    }
    for rep in 1..=options.reps {
        for (window, target, done) in &mut reps {
            let load = Load {
                window: *window,
                warmup: options.warmup,
                measure: options.measure,
                watch: Vec::new(),
            };
            let (store, set) = match (*target, &pg) {
                (Target::Push(Provider::Fcm), _) => (StoreAt::Sled(&fcm_store), fcm_set.clone()),
                (Target::DryRunPg, Some((db, set))) => (StoreAt::Postgres(db), Some(set.clone())),
                _ => (StoreAt::Sled(&apns_store), apns_set.clone()),
            };
            // On an error the cluster goes with `pg` (testkit stops it on drop).
            let result = one(env, *target, &store, load, set).await?;
            eprintln!(
                "  {:<18} window {window:>4}  rep {rep}/{}: {:>9}/s  p50 {} ms  p99 {} ms  cpu {} µs/publish  mock {} µs/push",
                target.to_string(),
                options.reps,
                count(result.outcome.per_sec()),
                num(result.outcome.quantile_ms(0.5), 2),
                num(result.outcome.quantile_ms(0.99), 2),
                num(result.cpu_us, 1),
                num(result.mock_cpu_us, 1),
            );
            done.push(result);
        }
    }
    if let Some((db, _)) = pg {
        db.stop().await;
    }
    Ok(Results {
        rows: reps
            .into_iter()
            .map(|(w, t, r)| (w, t, summarize(&r)))
            .collect(),
    })
}

/// Start `target`, run one load (publishes to random nodes of `set`, or for a mock alone, pushes from
/// the harness), read its peak memory, stop it.
async fn one(
    env: &Env,
    target: Target,
    store: &StoreAt<'_>,
    mut load: Load,
    set: Option<Arc<Publishes>>,
) -> anyhow::Result<Rep> {
    if let Target::MockAlone(provider) = target {
        let (mut running, endpoint) = start_mock(provider, env).await?;
        load.watch = vec![running.mock.as_ref().map_or(Ok(0), |m| m.pid())?];
        let outcome = h2load::run(&endpoint, &load).await;
        let alive = running.check_alive();
        running.stop().await;
        let outcome =
            outcome.map_err(|e| e.context(format!("{target}, window {}", load.window)))?;
        alive?;
        return finish(
            target,
            Rep {
                mock_cpu_us: outcome.cpu_us_per_reply(0),
                cpu_us: f64::NAN,
                peak_rss: None,
                outcome,
            },
        );
    }
    let set = set.with_context(|| format!("{target}: no registrations to publish to"))?;
    let (mut running, component) = start(target, env, store).await?;
    load.watch = pids(&running)?;
    let (_component, outcome) = match load::run(component, &load, publishes(set)).await {
        Ok(done) => done,
        Err(e) => {
            let alive = running.check_alive();
            running.stop().await;
            alive?;
            return Err(e.context(format!("{target}, window {}", load.window)));
        }
    };
    let peak_rss = memory(load.watch[0], "VmHWM")?;
    running.check_alive()?;
    running.stop().await;
    finish(
        target,
        Rep {
            cpu_us: outcome.cpu_us_per_reply(0),
            mock_cpu_us: outcome.cpu_us_per_reply(1),
            peak_rss: Some(peak_rss),
            outcome,
        },
    )
}

/// The component's pid, then the mock's if there is one.
fn pids(running: &Running) -> anyhow::Result<Vec<u32>> {
    let mut pids = vec![running.component()?.pid()?];
    if let Some(mock) = &running.mock {
        pids.push(mock.pid()?);
    }
    Ok(pids)
}

/// The repetition, unless some replies were errors.
fn finish(target: Target, rep: Rep) -> anyhow::Result<Rep> {
    if rep.outcome.errors > 0 {
        bail!(
            "{target}: {} error replies, the first: {}",
            rep.outcome.errors,
            rep.outcome.first_error.unwrap_or_default()
        );
    }
    Ok(rep)
}

/// The throughput table, Markdown.
pub fn table(results: &Results, options: &Options) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| window | target | publishes/s (min / median / max) | p50 ms | p99 ms | max ms | CPU µs/publish | mock CPU µs/push | peak RSS MiB | × echo |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (window, target, s) in &results.rows {
        let echo = results
            .get(*window, Target::Echo)
            .map_or(f64::NAN, |e| e.per_sec[1]);
        let _ = writeln!(
            out,
            "| {window} | {target} | {} | {} | {} | {} |",
            s.cells(),
            num(s.mock_cpu_us, 1),
            mib_or_dash(s.peak_rss),
            if *target == Target::Echo {
                "1".into()
            } else {
                num(s.per_sec[1] / echo, 2)
            },
        );
    }
    let _ = writeln!(
        out,
        "\n{} repetitions of {} s each after {} s of warm-up; {} registrations, publishes to random ones. \
         CPU is user + system time of the component process over the measured seconds, per reply; \
         the mock's is per push. A mock alone is pushed to by the harness over one HTTP/2 connection \
         (no XMPP, no knock), with the requests knock sends.",
        options.reps,
        options.measure.as_secs_f64(),
        options.warmup.as_secs_f64(),
        count(options.nodes as f64),
    );
    out
}
