//! Failover: two knocks on one PostgreSQL database for one component JID, behind the harness playing
//! Prosody's rule of one connection per component ([`OneAtATime`]): the first holds the link, the second is
//! refused with `<conflict/>` and stands by, knocking again every 250 ms. While publishes flow (window 64)
//! over the active knock's link, it is killed with SIGKILL; the harness sees its connection drop, as Prosody
//! would, and lets the next handshake through. Measured from the kill: when the harness saw the connection
//! drop, when the standby's handshake was answered, and when its first publish was answered `result`; then
//! whether any publish over the standby's link failed or went unanswered.
//!
//! Publishes the harness has no component for in between are not sent (Prosody would bounce them with an
//! error of its own); the publishes in flight on the killed link get no reply and are counted as lost.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use knock::stanza::frame::Event;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::load::{now_ns, Source, DRAIN};
use crate::pg::{self, Database};
use crate::report::{count, median, num};
use crate::server::{empty_result, iq_tag, Component, OneAtATime};
use crate::stanzas::{parse_id, Publishes};
use crate::targets::{dry_run_app, knock_config, spawn_knock, Env, StoreAt};
use crate::throughput::publishes;

/// Publishes in flight.
pub const WINDOW: usize = 64;
/// How long publishes flow through the active knock before it is killed, at least; plus a random part of
/// [`STANDBY_RETRY`].
const BEFORE_KILL: Duration = Duration::from_secs(1);
/// knock's pause between a standby's attempts, as the bench configures it (`component.standby_retry_ms` in
/// [`crate::targets::knock_config`]). The kill lands at a random point of it: started at a fixed time after a
/// refusal, it would always land just after one, and every takeover would wait the whole pause.
const STANDBY_RETRY: Duration = Duration::from_millis(crate::targets::STANDBY_RETRY_MS);

/// One failover.
#[derive(Debug, Clone)]
pub struct Takeover {
    /// From the kill to the harness reading the end of the killed knock's connection.
    pub dropped_ms: f64,
    /// From the kill to the standby's handshake answered.
    pub handshake_ms: f64,
    /// From the kill to the first publish the standby answered `result`.
    pub first_result_ms: f64,
    /// Publishes in flight on the killed link: never answered.
    pub lost: u64,
    /// Publishes sent to the standby.
    pub after_sent: u64,
    /// Of those, answered `result`.
    pub after_ok: u64,
    /// Of those, answered with an error (the first one's text in `first_error`).
    pub after_errors: u64,
    /// The first error reply after the takeover.
    pub first_error: Option<String>,
    /// Handshakes refused as duplicates while the standby waited.
    pub refused: usize,
}

/// Measure `reps` failovers, each with two fresh knocks on one database seeded with `nodes` registrations.
pub async fn run(
    env: &Env,
    reps: usize,
    nodes: usize,
    after: Duration,
) -> anyhow::Result<Vec<Takeover>> {
    eprintln!("failover: seeding {nodes} registrations into PostgreSQL…");
    let (db, set) = pg::seeded(env, "failover-pg", nodes).await?;
    let mut takeovers = Vec::new();
    for rep in 1..=reps {
        let takeover = once(env, &db, &set, after).await?;
        eprintln!(
            "  failover rep {rep}/{reps}: link dropped {} ms, standby's handshake {} ms, first result {} ms after the kill; \
             {} lost in flight; after: {} sent, {} result, {} error ({} refusals while standing by)",
            num(takeover.dropped_ms, 1),
            num(takeover.handshake_ms, 1),
            num(takeover.first_result_ms, 1),
            takeover.lost,
            takeover.after_sent,
            takeover.after_ok,
            takeover.after_errors,
            takeover.refused,
        );
        takeovers.push(takeover);
    }
    db.stop().await;
    Ok(takeovers)
}

async fn once(
    env: &Env,
    db: &Database,
    set: &Arc<Publishes>,
    after: Duration,
) -> anyhow::Result<Takeover> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let config = knock_config(
        listener.local_addr()?,
        &StoreAt::Postgres(db),
        &dry_run_app(),
    );
    let mut board = OneAtATime::serve(listener);
    let mut active = spawn_knock(env, "knock-active", &config)?;
    let (first, _) = board
        .next(Duration::from_secs(60))
        .await
        .with_context(|| format!("the first knock did not connect: {}", active.log_tail()))?;
    let mut standby = spawn_knock(env, "knock-standby", &config)?;
    // Standing by: refused at least twice (it has its store open and retries).
    let deadline = Instant::now() + Duration::from_secs(60);
    while board.refused() < 2 {
        standby.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "the second knock was never refused as a duplicate: {}",
                standby.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Publishes through the active knock; kill it after a while; the harness lets the next one in once it
    // has read the end of the killed knock's connection, as Prosody does.
    let mut source = publishes(set.clone());
    let flowing = tokio::spawn(async move {
        let pumped = pump(first, &mut source, None).await;
        (pumped, source)
    });
    let jitter = STANDBY_RETRY.mul_f64(rand::random::<f64>());
    tokio::time::sleep(BEFORE_KILL + jitter).await;
    let killed_at = now_ns();
    active.kill9().await?;
    let (before, mut source) = flowing.await.context("the load panicked")?;
    let before = before?;
    anyhow::ensure!(
        before.closed_at.is_some(),
        "the killed knock's connection never ended"
    );
    anyhow::ensure!(
        before.errors == 0,
        "publishes failed before the kill: {}",
        before.first_error.unwrap_or_default()
    );
    board.release();
    let refused = board.refused();

    let (second, admitted_at) = board
        .next(Duration::from_secs(10))
        .await
        .with_context(|| format!("the standby did not take over: {}", standby.log_tail()))?;
    let after_kill = pump(second, &mut source, Some(after)).await?;
    standby.check_alive()?;
    standby.stop().await;
    let ms = |t: u64| t.saturating_sub(killed_at) as f64 / 1e6;
    Ok(Takeover {
        dropped_ms: ms(before.closed_at.unwrap_or_default()),
        handshake_ms: ms(admitted_at),
        first_result_ms: after_kill.first_ok.map_or(f64::NAN, ms),
        lost: before.sent - before.answered,
        after_sent: after_kill.sent,
        after_ok: after_kill.answered - after_kill.errors,
        after_errors: after_kill.errors + (after_kill.sent - after_kill.answered),
        first_error: after_kill.first_error,
        refused,
    })
}

/// What one link carried.
struct Pumped {
    sent: u64,
    answered: u64,
    errors: u64,
    first_error: Option<String>,
    /// When the first `result` came.
    first_ok: Option<u64>,
    /// When the component's end of the connection was read, if it ended.
    closed_at: Option<u64>,
}

/// Keep [`WINDOW`] publishes in flight over `component` until it closes, or for `for_` and then until every
/// publish is answered (at most [`DRAIN`]). One task reads and writes: the window is small, so a write
/// never waits on the component for long.
async fn pump(
    component: Component,
    source: &mut Source,
    for_: Option<Duration>,
) -> anyhow::Result<Pumped> {
    let Component {
        mut tcp,
        mut buf,
        mut framer,
    } = component;
    let mut p = Pumped {
        sent: 0,
        answered: 0,
        errors: 0,
        first_error: None,
        first_ok: None,
        closed_at: None,
    };
    let stop_at = for_.map(|d| tokio::time::Instant::now() + d);
    let mut out = Vec::with_capacity(WINDOW * 1500);
    let mut seq = 0u64;
    let mut sending = true;
    loop {
        if sending && stop_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
            sending = false;
        }
        if sending {
            while p.sent - p.answered < WINDOW as u64 {
                source(seq, now_ns(), &mut out);
                seq += 1;
                p.sent += 1;
            }
        }
        if !out.is_empty() {
            if tcp.write_all(&out).await.is_err() {
                p.closed_at = Some(now_ns());
                return Ok(p);
            }
            out.clear();
        }
        if !sending && p.answered == p.sent {
            return Ok(p);
        }
        let wake = match (sending, stop_at) {
            (true, Some(at)) => at,
            (true, None) => tokio::time::Instant::now() + Duration::from_secs(3600),
            (false, Some(at)) => at + DRAIN,
            (false, None) => unreachable!("a load without an end stops only when closed"),
        };
        tokio::select! {
            read = tcp.read_buf(&mut buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    p.closed_at = Some(now_ns());
                    return Ok(p);
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                if !sending {
                    return Ok(p);
                }
                continue;
            }
        }
        while let Some(event) = framer.next(&mut buf)? {
            let frame = match event {
                Event::Stanza(frame) => frame,
                Event::End => {
                    p.closed_at = Some(now_ns());
                    return Ok(p);
                }
                Event::Header(_) => bail!("a second stream header"),
            };
            let Some(tag) = iq_tag(&frame.bytes) else {
                continue;
            };
            match tag.attr(b"type") {
                Some(b"get" | b"set") => empty_result(&tag, &mut out),
                Some(kind) => {
                    if tag.attr(b"id").and_then(parse_id).is_none() {
                        continue;
                    }
                    p.answered += 1;
                    if kind == b"result" {
                        p.first_ok.get_or_insert_with(now_ns);
                    } else {
                        p.errors += 1;
                        p.first_error.get_or_insert_with(|| {
                            String::from_utf8_lossy(&frame.bytes[..frame.bytes.len().min(400)])
                                .into_owned()
                        });
                    }
                }
                None => {}
            }
        }
    }
}

/// The failover table, Markdown.
pub fn table(takeovers: &[Takeover], nodes: usize, after: Duration) -> String {
    let mut out = String::new();
    let stat = |f: &dyn Fn(&Takeover) -> f64| {
        let values: Vec<f64> = takeovers.iter().map(f).collect();
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!(
            "{} / **{}** / {}",
            num(min, 0),
            num(median(values), 0),
            num(max, 0)
        )
    };
    let sum = |f: &dyn Fn(&Takeover) -> u64| takeovers.iter().map(f).sum::<u64>();
    let _ = writeln!(
        out,
        "| from the kill, ms (min / median / max) | link dropped | standby's handshake | first publish answered `result` | lost in flight at the kill | publishes after the takeover | failed after the takeover |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    let _ = writeln!(
        out,
        "| {} failovers | {} | {} | {} | {} | {} | {} |",
        takeovers.len(),
        stat(&|t| t.dropped_ms),
        stat(&|t| t.handshake_ms),
        stat(&|t| t.first_result_ms),
        count(sum(&|t| t.lost) as f64),
        count(sum(&|t| t.after_sent) as f64),
        count(sum(&|t| t.after_errors) as f64),
    );
    if let Some(error) = takeovers.iter().find_map(|t| t.first_error.as_ref()) {
        let _ = writeln!(
            out,
            "\nThe first failed publish after a takeover: `{error}`"
        );
    }
    let _ = writeln!(
        out,
        "\nTwo knocks (dry_run) on one PostgreSQL database of {} registrations, behind the harness playing \
         Prosody's one connection per component: the second is refused with `<conflict/>` (\"Component \
         already connected\") and stands by, retrying every {} ms. Publishes flow through the active one, \
         {WINDOW} in flight, for {} s plus a random part of the standby's {} ms retry pause (so the kill \
         lands anywhere in its cycle); it is killed with SIGKILL; the harness admits the next handshake once \
         it has read the end of the killed connection. Nothing is sent while no knock holds the link. *Lost \
         in flight*: publishes the killed knock never answered (Prosody would bounce them). Then {} s of \
         publishes through the standby: *failed* counts those answered with an error or not at all.",
        count(nodes as f64),
        STANDBY_RETRY.as_millis(),
        BEFORE_KILL.as_secs_f64(),
        STANDBY_RETRY.as_millis(),
        after.as_secs_f64(),
    );
    out
}
