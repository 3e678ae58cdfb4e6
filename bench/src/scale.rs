//! knock with a large store: disk size, memory, time from start to the first publish answered, publish
//! latency against a small store's, and how fast registrations become durable.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::{bail, Context as _};

use crate::load::{self, round_trip, Load, Outcome, Source};
use crate::procs::{disk_usage, memory};
use crate::report::{count, mib, num};
use crate::seed::{seed, Seeded};
use crate::server::Component;
use crate::stanzas::{registration, Publishes};
use crate::targets::{start, Env, Running, StoreAt, Target};
use crate::throughput::publishes;

/// Publishes go to this many registrations, spread evenly over the store.
const PUBLISH_SAMPLE: usize = 100_000;

/// One store size, measured.
pub struct Row {
    /// Registrations in the store.
    pub size: usize,
    /// Writing them directly into the store (not over XMPP).
    pub seed_took: Duration,
    /// The store's files after seeding.
    pub disk: u64,
    /// From spawning knock to the reply to its first publish: the first start after seeding, and a restart.
    pub ready: [Duration; 2],
    /// How long knock took to build its in-memory publish index, as it logs it (first start, restart).
    /// Publishes are answered meanwhile, from sled; the latencies below are measured after it.
    pub index_ready: [Duration; 2],
    /// Resident memory one second after that.
    pub rss_idle: u64,
    /// Peak resident memory over the whole run.
    pub peak_rss: u64,
    /// Publishes at windows 1 and 64.
    pub publish: [Outcome; 2],
    /// Registrations (XEP-0050, durable before the reply) at windows 1 and 64.
    pub register: [Outcome; 2],
}

/// Publish measurements per store and window, interleaved across stores so that drift on the machine
/// hits every store alike (one store after the other, the large store's p99 ratio ranged from 1.0x to 2.3x
/// over runs of the same build); each row reports the repetition with the median p99.
const PUBLISH_REPS: usize = 3;

/// A seeded store with knock running on it.
struct Live {
    size: usize,
    seeded: Seeded,
    disk: u64,
    set: Arc<Publishes>,
    running: Running,
    component: Option<Component>,
    pid: u32,
    first_ready: Duration,
    first_index: Duration,
    rss_idle: u64,
    publish: [Vec<Outcome>; 2],
}

/// Measure a store of every size in `sizes`.
pub async fn run(
    env: &Env,
    sizes: &[usize],
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Vec<Row>> {
    let mut live = Vec::new();
    for &size in sizes {
        live.push(start_on_seeded(env, size).await?);
    }
    for _ in 0..PUBLISH_REPS {
        for store in &mut live {
            for (w, window) in [1, 64].into_iter().enumerate() {
                let timing = (warmup, measure, store.pid, store.size);
                let c = store.component.take().context("connection kept")?;
                let (c, outcome) =
                    measured(c, "publish", window, publishes(store.set.clone()), timing).await?;
                store.component = Some(c);
                store.publish[w].push(outcome);
            }
        }
    }
    let mut rows = Vec::new();
    for (index, store) in live.into_iter().enumerate() {
        rows.push(finish(env, index, store, warmup, measure).await?);
    }
    Ok(rows)
}

/// Seed a store of `size`, start knock on it, and wait until its index is built.
async fn start_on_seeded(env: &Env, size: usize) -> anyhow::Result<Live> {
    let store = env.work.join(format!("store-scale-{size}"));
    eprintln!("seeding {} registrations…", count(size as f64));
    let seeded = seed(&store, size, PUBLISH_SAMPLE).await?;
    let disk = disk_usage(&store)?;
    eprintln!(
        "  {} written in {:.1} s; {} MiB on disk",
        count(size as f64),
        seeded.took.as_secs_f64(),
        mib(disk)
    );
    let set = seeded.publishes();
    let (running, component, first_ready) = start_and_publish(env, &store, &set).await?;
    let first_index = index_ready(&running).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = running.component()?.pid()?;
    let rss_idle = memory(pid, "VmRSS")?;
    Ok(Live {
        size,
        seeded,
        disk,
        set,
        running,
        component: Some(component),
        pid,
        first_ready,
        first_index,
        rss_idle,
        publish: [Vec::new(), Vec::new()],
    })
}

/// Registrations on a store, then a restart; the row.
async fn finish(
    env: &Env,
    index: usize,
    store: Live,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Row> {
    let timing = (warmup, measure, store.pid, store.size);
    let c = store.component.context("connection kept")?;
    let (c, register_1) = measured(c, "register", 1, registrations(index * 2), timing).await?;
    let (_, register_64) =
        measured(c, "register", 64, registrations(index * 2 + 1), timing).await?;
    let peak_rss = memory(store.pid, "VmHWM")?;
    store.running.stop().await;
    let path = env.work.join(format!("store-scale-{}", store.size));
    let (running, _, restart_ready) = start_and_publish(env, &path, &store.set).await?;
    let restart_index = index_ready(&running).await?;
    running.stop().await;
    let [publish_1, publish_64] = store.publish.map(median_by_p99);
    Ok(Row {
        size: store.size,
        seed_took: store.seeded.took,
        disk: store.disk,
        ready: [store.first_ready, restart_ready],
        index_ready: [store.first_index, restart_index],
        rss_idle: store.rss_idle,
        peak_rss,
        publish: [publish_1, publish_64],
        register: [register_1, register_64],
    })
}

/// The repetition whose p99 is the median.
fn median_by_p99(mut reps: Vec<Outcome>) -> Outcome {
    reps.sort_by(|a, b| a.quantile_ms(0.99).total_cmp(&b.quantile_ms(0.99)));
    let middle = reps.len() / 2;
    reps.swap_remove(middle)
}

/// Start knock on `store` and publish once; returns it with the time from spawning to the reply.
async fn start_and_publish(
    env: &Env,
    store: &std::path::Path,
    publishes: &Publishes,
) -> anyhow::Result<(Running, Component, Duration)> {
    let spawned = Instant::now();
    let (running, mut component) = start(Target::DryRun, env, &StoreAt::Sled(store)).await?;
    let mut first = Vec::new();
    publishes.write(0, b'p', 0, load::now_ns(), &mut first);
    let reply = round_trip(&mut component, &first, Duration::from_secs(30)).await?;
    let ready = spawned.elapsed();
    if crate::server::iq_tag(&reply).and_then(|tag| tag.attr(b"type")) != Some(b"result") {
        bail!(
            "the first publish failed: {}",
            String::from_utf8_lossy(&reply)
        );
    }
    Ok((running, component, ready))
}

/// Wait for knock's "publish index ready" log line and return the time it gives.
async fn index_ready(running: &Running) -> anyhow::Result<Duration> {
    const LINE: &str = "publish index ready";
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let log = running.component()?.log_text();
        if let Some(line) = log.lines().find(|l| l.contains(LINE)) {
            let ms = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("ms="))
                .and_then(|v| v.parse::<u64>().ok());
            match ms {
                Some(ms) => return Ok(Duration::from_millis(ms)),
                None => bail!("knock's index line has no ms=: {line}"),
            }
        }
        if Instant::now() > deadline {
            bail!("knock did not log {LINE:?} within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One load at `window` over the connection, failing on any error reply; hands the connection back.
async fn measured(
    component: Component,
    what: &str,
    window: usize,
    source: Source,
    (warmup, measure, pid, size): (Duration, Duration, u32, usize),
) -> anyhow::Result<(Component, Outcome)> {
    let load = Load {
        window,
        warmup,
        measure,
        watch: vec![pid],
    };
    let (component, outcome) = load::run(component, &load, source).await?;
    if outcome.errors > 0 {
        bail!(
            "{} error replies, the first: {}",
            outcome.errors,
            outcome.first_error.unwrap_or_default()
        );
    }
    eprintln!(
        "  store of {:>9}, {what} window {window:>2}: {:>7}/s  p50 {} ms  p99 {} ms",
        count(size as f64),
        count(outcome.per_sec()),
        num(outcome.quantile_ms(0.5), 2),
        num(outcome.quantile_ms(0.99), 2)
    );
    Ok((component, outcome))
}

/// Registrations of new users (`b<run>u<seq>`), each with its own token.
pub fn registrations(run: usize) -> Source {
    Box::new(move |seq, sent, out| {
        let user = format!("b{run}u{seq}");
        let token = format!("{:064x}", (u128::from(seq) << 16) | run as u128);
        registration(&user, "phone", &token).write(b'r', seq, sent, out);
    })
}

/// The scale table, Markdown; p99 ratios are against the first (smallest) store.
pub fn table(rows: &[Row], measure: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| registrations | seeded in s | disk MiB | ready ms (first start / restart) | index ms (first / restart) | RSS idle MiB | peak RSS MiB | publish w1 p50 / p99 ms | publish w64 /s | w64 p50 / p99 ms | p99 vs smallest (w1 / w64) | registrations/s w1 (p99 ms) | registrations/s w64 (p99 ms) |"
    );
    let _ = writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let base = rows.first();
    for row in rows {
        let ratio = |i: usize| {
            base.map_or(f64::NAN, |b| {
                row.publish[i].quantile_ms(0.99) / b.publish[i].quantile_ms(0.99)
            })
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} / {} | {} / {} | {} | {} | {} / {} | {} | {} / {} | {} / {} | {} ({}) | {} ({}) |",
            count(row.size as f64),
            num(row.seed_took.as_secs_f64(), 1),
            mib(row.disk),
            num(row.ready[0].as_secs_f64() * 1000.0, 0),
            num(row.ready[1].as_secs_f64() * 1000.0, 0),
            num(row.index_ready[0].as_secs_f64() * 1000.0, 0),
            num(row.index_ready[1].as_secs_f64() * 1000.0, 0),
            mib(row.rss_idle),
            mib(row.peak_rss),
            num(row.publish[0].quantile_ms(0.5), 2),
            num(row.publish[0].quantile_ms(0.99), 2),
            count(row.publish[1].per_sec()),
            num(row.publish[1].quantile_ms(0.5), 2),
            num(row.publish[1].quantile_ms(0.99), 2),
            num(ratio(0), 2),
            num(ratio(1), 2),
            count(row.register[0].per_sec()),
            num(row.register[0].quantile_ms(0.99), 1),
            count(row.register[1].per_sec()),
            num(row.register[1].quantile_ms(0.99), 1),
        );
    }
    let _ = writeln!(
        out,
        "\nknock in dry_run; each load runs {} s. Registrations are seeded straight into the store, then \
         publishes go to up to {} of them spread evenly over it, {} times per store and window, taking \
         turns between the stores; each publish column shows the repetition with the median p99. *Ready* is from spawning knock to the \
         reply to its first publish, on the first start after seeding (sled replays the log the seeding \
         wrote) and on a restart after a clean stop. *Index* is the time knock logs for building its in-memory \
         publish index in the background (publishes are answered from sled meanwhile); the latencies are \
         measured after it. Registrations are `register-push-apns` commands from new users, each \
         durable on disk before its reply.",
        measure.as_secs_f64(),
        count(PUBLISH_SAMPLE as f64),
        PUBLISH_REPS,
    );
    out
}
