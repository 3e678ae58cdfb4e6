//! Publishes per second and their latency at each window, for the echo ceiling, knock in dry-run and
//! knock pushing to the mock APNs, repetitions interleaved so drift on the machine hits all alike.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use crate::load::{self, Load, Source};
use crate::procs::memory;
use crate::report::{count, mib, num, summarize, Rep, Summary};
use crate::seed::seed;
use crate::stanzas::Publishes;
use crate::targets::{start, Env, Target};

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

const TARGETS: [Target; 3] = [Target::Echo, Target::DryRun, Target::Apns];

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

/// Seed the store, run every load, and return the summaries.
pub async fn run(env: &Env, options: &Options) -> anyhow::Result<Results> {
    let store = env.work.join("store-throughput");
    eprintln!("seeding {} registrations…", options.nodes);
    let seeded = seed(&store, options.nodes, options.nodes).await?;
    let set = seeded.publishes();
    let mut reps: Vec<(usize, Target, Vec<Rep>)> = Vec::new();
    for &window in &options.windows {
        for target in TARGETS {
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
            let result = one(env, *target, &store, load, publishes(set.clone())).await?;
            eprintln!(
                "  {target:<18} window {window:>4}  rep {rep}/{}: {:>9}/s  p50 {} ms  p99 {} ms  cpu {} µs/publish",
                options.reps,
                count(result.outcome.per_sec()),
                num(result.outcome.quantile_ms(0.5), 2),
                num(result.outcome.quantile_ms(0.99), 2),
                num(result.outcome.cpu_us_per_reply(0), 1),
            );
            done.push(result);
        }
    }
    Ok(Results {
        rows: reps
            .into_iter()
            .map(|(w, t, r)| (w, t, summarize(&r)))
            .collect(),
    })
}

/// Start `target`, run one load, read its peak memory, stop it.
async fn one(
    env: &Env,
    target: Target,
    store: &std::path::Path,
    mut load: Load,
    source: Source,
) -> anyhow::Result<Rep> {
    let (mut running, component) = start(target, env, store).await?;
    load.watch = running.pids()?;
    let (_component, outcome) = match load::run(component, &load, source).await {
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
    if outcome.errors > 0 {
        bail!(
            "{target}: {} error replies, the first: {}",
            outcome.errors,
            outcome.first_error.unwrap_or_default()
        );
    }
    Ok(Rep { outcome, peak_rss })
}

/// The throughput table, Markdown.
pub fn table(results: &Results, options: &Options) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| window | target | publishes/s (min / median / max) | p50 ms | p99 ms | max ms | CPU µs/publish | mock APNs CPU µs/push | peak RSS MiB | × echo |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (window, target, s) in &results.rows {
        let echo = results
            .get(*window, Target::Echo)
            .map_or(f64::NAN, |e| e.per_sec[1]);
        let _ = writeln!(
            out,
            "| {window} | {target} | {} / **{}** / {} | {} | {} | {} | {} | {} | {} | {} |",
            count(s.per_sec[0]),
            count(s.per_sec[1]),
            count(s.per_sec[2]),
            num(s.latency_ms[0], 2),
            num(s.latency_ms[1], 2),
            num(s.latency_ms[2], 1),
            num(s.cpu_us, 1),
            num(s.mock_cpu_us, 1),
            mib(s.peak_rss),
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
         the mock APNs's is per push.",
        options.reps,
        options.measure.as_secs_f64(),
        options.warmup.as_secs_f64(),
        count(options.nodes as f64),
    );
    out
}
