//! `knock-bench`: how many publishes knock answers per second, how fast, at what CPU and memory cost,
//! and how it holds up with a million registrations — each measured against a bare XEP-0114 echo
//! component in the same run, on 127.0.0.1. Run it with `bench/run` (it builds the release binaries
//! first); `bench/README.md` says what each number means.
//!
//! The harness plays the XMPP server: knock (or the echo component) connects to it as to Prosody, and
//! it sends the publishes Prosody's mod_cloud_notify sends, a window of them in flight at a time.

mod echo;
mod failover;
mod h2load;
mod load;
mod mocks;
mod pg;
mod procs;
mod register;
mod report;
mod scale;
mod seed;
mod server;
mod stanzas;
mod targets;
mod throughput;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::mocks::Provider;
use crate::report::{count, num};
use crate::targets::{Env, Target};

/// knock's benchmark. Prints a Markdown report on stdout, progress on stderr.
#[derive(Parser)]
#[command(name = "knock-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    options: Options,
}

#[derive(Subcommand)]
enum Command {
    /// Throughput, scale, registrations and failover (the default).
    All,
    /// Publishes/s, latency, CPU and memory at each window, against the echo ceiling.
    Throughput,
    /// A large store: disk, memory, start-up, latency, registrations/s.
    Scale,
    /// Registrations/s at window 64 with sled and with PostgreSQL (on disk, fsync on).
    Registrations,
    /// Two knocks on one PostgreSQL, the active one killed under load: how soon the standby serves.
    Failover,
    /// (Internal) the echo component the harness measures as the ceiling.
    #[command(hide = true)]
    EchoComponent {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long, default_value = stanzas::COMPONENT_JID)]
        jid: String,
        #[arg(long, default_value = stanzas::COMPONENT_SECRET)]
        secret: String,
    },
    /// (Internal) testkit's mock FCM in a process of its own, its request log kept short.
    #[command(hide = true)]
    MockFcm {
        #[arg(long, default_value = mocks::PROJECT)]
        project: String,
        #[arg(long)]
        service_account_out: PathBuf,
        #[arg(long)]
        ca_out: PathBuf,
    },
}

#[derive(clap::Args)]
struct Options {
    /// A short run to check the harness: 1 repetition of 2 s, 1,000 registrations, a 20,000 store.
    #[arg(long, global = true)]
    quick: bool,
    /// Also write the report to this file.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Keep the scratch directory (stores, configs, logs) and print where it is.
    #[arg(long, global = true)]
    keep_temp: bool,
    /// Repetitions per target and window.
    #[arg(long, global = true)]
    reps: Option<usize>,
    /// Measured seconds per repetition.
    #[arg(long, global = true)]
    secs: Option<f64>,
    /// Windows of in-flight publishes, comma-separated.
    #[arg(long, global = true, value_delimiter = ',')]
    windows: Option<Vec<usize>>,
    /// Registrations in the throughput store.
    #[arg(long, global = true)]
    nodes: Option<usize>,
    /// Throughput targets, comma-separated, among echo, dry_run, dry_run-pg, apns, apns-mock, fcm, fcm-mock
    /// (`-pg`: the store in PostgreSQL; `-mock`: the provider's mock alone, pushed to by the harness).
    /// Default: all.
    #[arg(long, global = true, value_delimiter = ',')]
    targets: Option<Vec<Target>>,
    /// Registrations in the large store of the scale run.
    #[arg(long, global = true)]
    scale_nodes: Option<usize>,
    /// Where knock, mock-apns and knock-bench are (default: beside this binary).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::MockFcm {
        project,
        service_account_out,
        ca_out,
    }) = &cli.command
    {
        // One thread, as testkit's mock-apns and mock-fcm binaries run.
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(mocks::host_fcm(project, service_account_out, ca_out));
    }
    if let Some(Command::EchoComponent {
        server,
        jid,
        secret,
    }) = &cli.command
    {
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(echo::run(*server, jid, secret));
    }
    let scratch = tempfile::Builder::new().prefix("knock-bench-").tempdir()?;
    // PostgreSQL clusters go to the scratch directory, on disk rather than testkit's tmpfs default, so that
    // the registrations' commits write a real disk. Set before any thread starts: testkit reads it once.
    if std::env::var_os("KNOCK_PG_TMPDIR").is_none() {
        std::env::set_var("KNOCK_PG_TMPDIR", pg::cluster_parent(scratch.path())?);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let command = cli.command.unwrap_or(Command::All);
    runtime.block_on(bench(command, &cli.options, scratch))
}

async fn bench(command: Command, o: &Options, scratch: tempfile::TempDir) -> anyhow::Result<()> {
    let quick = o.quick;
    let throughput_options = throughput::Options {
        reps: o.reps.unwrap_or(if quick { 1 } else { 3 }),
        warmup: Duration::from_secs_f64(if quick { 0.5 } else { 1.0 }),
        measure: Duration::from_secs_f64(o.secs.unwrap_or(if quick { 2.0 } else { 5.0 })),
        windows: o.windows.clone().unwrap_or_else(|| vec![1, 64, 1000]),
        nodes: o.nodes.unwrap_or(if quick { 1_000 } else { 10_000 }),
        targets: o.targets.clone().unwrap_or_else(|| Target::ALL.to_vec()),
    };
    let scale_sizes = [
        1_000,
        o.scale_nodes
            .unwrap_or(if quick { 20_000 } else { 1_000_000 }),
    ];

    let bin_dir = match &o.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no directory")?
            .to_owned(),
    };
    let env = Env {
        bin_dir,
        work: scratch.path().to_owned(),
    };

    let mut report = String::new();
    let _ = writeln!(report, "## knock benchmark\n");
    let _ = writeln!(report, "Machine: {}  ", procs::machine());
    let _ = writeln!(report, "knock: {}\n", version());

    let run_throughput = matches!(command, Command::All | Command::Throughput);
    let run_scale = matches!(command, Command::All | Command::Scale);
    let mut throughput_results = None;
    if run_throughput {
        let results = throughput::run(&env, &throughput_options).await?;
        let _ = writeln!(report, "### Publishes\n");
        report.push_str(&throughput::table(&results, &throughput_options));
        throughput_results = Some(results);
    }
    let mut scale_rows = None;
    if run_scale {
        let rows = scale::run(
            &env,
            &scale_sizes,
            throughput_options.warmup,
            throughput_options.measure,
        )
        .await?;
        let _ = writeln!(report, "\n### A large store\n");
        report.push_str(&scale::table(&rows, throughput_options.measure));
        scale_rows = Some(rows);
    }
    let mut registrations = None;
    if matches!(command, Command::All | Command::Registrations) {
        let results = register::run(
            &env,
            throughput_options.reps,
            throughput_options.warmup,
            throughput_options.measure,
        )
        .await?;
        let _ = writeln!(report, "\n### Registrations\n");
        report.push_str(&register::table(
            &results,
            throughput_options.reps,
            throughput_options.warmup,
            throughput_options.measure,
        ));
        registrations = Some(results);
    }
    let mut takeovers = None;
    if matches!(command, Command::All | Command::Failover) {
        let after = Duration::from_secs(if quick { 2 } else { 3 });
        let results = failover::run(
            &env,
            throughput_options.reps,
            throughput_options.nodes,
            after,
        )
        .await?;
        let _ = writeln!(report, "\n### Failover\n");
        report.push_str(&failover::table(&results, throughput_options.nodes, after));
        takeovers = Some(results);
    }
    report.push_str(&targets_section(
        throughput_results.as_ref(),
        scale_rows.as_deref(),
        registrations.as_ref(),
        takeovers.as_deref(),
    ));

    println!("{report}");
    if let Some(path) = &o.out {
        std::fs::write(path, &report).with_context(|| format!("writing {}", path.display()))?;
    }
    if o.keep_temp {
        eprintln!("scratch directory kept: {}", scratch.keep().display());
    }
    Ok(())
}

/// The commit knock was built from, if this is a git checkout.
fn version() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

/// Issue 4's and issue 20's targets, each with the measured value and whether it was met.
fn targets_section(
    t: Option<&throughput::Results>,
    scale: Option<&[scale::Row]>,
    registrations: Option<&register::Results>,
    takeovers: Option<&[failover::Takeover]>,
) -> String {
    let mut out = String::from(
        "\n### Against the targets\n\n| target | measured | met |\n|---|---:|:---:|\n",
    );
    let mut line = |what: &str, measured: String, met: bool| {
        let _ = writeln!(
            out,
            "| {what} | {measured} | {} |",
            if met { "yes" } else { "**no**" }
        );
    };
    if let Some(t) = t {
        if let (Some(dry), Some(echo)) = (t.get(64, Target::DryRun), t.get(64, Target::Echo)) {
            let ratio = dry.per_sec[1] / echo.per_sec[1];
            line(
                "dry_run, window 64: ≥ 0.5 × echo",
                format!("{} × ({}/s)", num(ratio, 2), count(dry.per_sec[1])),
                ratio >= 0.5,
            );
            line(
                "dry_run, window 64: p99 ≤ 2 ms",
                format!("{} ms", num(dry.latency_ms[1], 2)),
                dry.latency_ms[1] <= 2.0,
            );
            line(
                "dry_run: ≤ 15 µs knock CPU per publish (window 64)",
                format!("{} µs", num(dry.cpu_us, 1)),
                dry.cpu_us <= 15.0,
            );
        }
        if let (Some(pg), Some(sled)) = (t.get(64, Target::DryRunPg), t.get(64, Target::DryRun)) {
            let ratio = pg.per_sec[1] / sled.per_sec[1];
            line(
                "dry_run with PostgreSQL, window 64: within 10 % of sled",
                format!("{} × sled ({}/s)", num(ratio, 2), count(pg.per_sec[1])),
                ratio >= 0.9,
            );
        }
        for provider in [Provider::Apns, Provider::Fcm] {
            if let Some(push) = t.get(64, Target::Push(provider)) {
                line(
                    &format!("mock {provider}, window 64: ≥ 30,000 publishes/s"),
                    format!("{}/s", count(push.per_sec[1])),
                    push.per_sec[1] >= 30_000.0,
                );
            }
        }
    }
    if let Some(rows) = scale {
        if let (Some(small), Some(big)) = (rows.first(), rows.last()) {
            let label = count(big.size as f64);
            line(
                &format!("{label} registrations: RSS ≤ 200 MiB"),
                format!(
                    "{} MiB idle, {} MiB peak",
                    report::mib(big.rss_idle),
                    report::mib(big.peak_rss)
                ),
                big.rss_idle <= 200 << 20,
            );
            line(
                &format!("{label} registrations: ready ≤ 1 s"),
                format!(
                    "{} ms first start, {} ms restart",
                    num(big.ready[0].as_secs_f64() * 1000.0, 0),
                    num(big.ready[1].as_secs_f64() * 1000.0, 0)
                ),
                big.ready.iter().all(|r| *r <= Duration::from_secs(1)),
            );
            for (i, w) in [(0, 1), (1, 64)] {
                let ratio = big.publish[i].quantile_ms(0.99) / small.publish[i].quantile_ms(0.99);
                line(
                    &format!(
                        "{label} registrations: p99 within 20 % of {} (window {w})",
                        count(small.size as f64)
                    ),
                    format!("{} ×", num(ratio, 2)),
                    ratio <= 1.2,
                );
            }
        }
    }
    if let Some(pg) = registrations.and_then(|r| r.get("PostgreSQL")) {
        line(
            &format!(
                "PostgreSQL registrations, window {}: ≥ 5,000/s",
                register::WINDOW
            ),
            format!("{}/s", count(pg.per_sec[1])),
            pg.per_sec[1] >= 5_000.0,
        );
    }
    if let Some(takeovers) = takeovers.filter(|t| !t.is_empty()) {
        let worst = takeovers
            .iter()
            .map(|t| t.first_result_ms)
            .fold(0.0, f64::max);
        line(
            "failover: the standby answers a publish within 2 s of the kill (worst)",
            format!("{} ms", num(worst, 0)),
            worst <= 2000.0,
        );
        let failed: u64 = takeovers.iter().map(|t| t.after_errors).sum();
        line(
            "failover: no publish fails after the takeover",
            format!("{failed} failed"),
            failed == 0,
        );
    }
    out
}
