//! The load generator: keep a window of IQs in flight over one component connection, match each reply
//! to its request by id, and time it from the moment it was written to the moment its reply was read.
//!
//! Two tasks share the socket: a writer that sends as many stanzas as the window has room for in one
//! write, and a reader that frames replies, frees their slots, and answers the component's pings. The
//! send time travels in the id, so neither task keeps a table of what is in flight.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use knock::stanza::frame::Event;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::procs::cpu_time;
use crate::server::{empty_result, iq_tag, Component};
use crate::stanzas::parse_id;

/// Writes the stanza with the given sequence number and send time (in [`now_ns`]) into the buffer.
pub type Source = Box<dyn FnMut(u64, u64, &mut Vec<u8>) + Send>;

/// How to run one load.
pub struct Load {
    /// IQs in flight at once.
    pub window: usize,
    /// Load before measuring, not counted.
    pub warmup: Duration,
    /// How long to measure.
    pub measure: Duration,
    /// Processes whose CPU time is measured over the same interval.
    pub watch: Vec<u32>,
}

/// What one load measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Replies read within the measured interval.
    pub answered: u64,
    /// The interval's length.
    pub elapsed: Duration,
    /// Latencies of those replies, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// CPU time each watched process used within the interval.
    pub cpu: Vec<Duration>,
    /// Error replies over the whole load (warm-up included).
    pub errors: u64,
    /// The first of them, for the report.
    pub first_error: Option<String>,
}

impl Outcome {
    /// Replies per second within the measured interval.
    pub fn per_sec(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0..=1) of the latencies, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }

    /// CPU microseconds per reply of watched process `i`.
    pub fn cpu_us_per_reply(&self, i: usize) -> f64 {
        self.cpu.get(i).map_or(f64::NAN, |cpu| {
            cpu.as_secs_f64() * 1e6 / (self.answered.max(1) as f64)
        })
    }
}

/// Nanoseconds since the first call: the clock ids carry.
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// How long the load waits for the replies still in flight when it stops sending. knock answers every
/// publish within its `publish_deadline_ms` (10 s by default); a reply later than this is lost.
pub const DRAIN: Duration = Duration::from_secs(15);

/// Most stanzas the writer puts in one write.
const BATCH: usize = 256;

/// Run `load` over `component`, stanzas from `source`, and hand the connection back for the next load.
pub async fn run(
    component: Component,
    load: &Load,
    source: Source,
) -> anyhow::Result<(Component, Outcome)> {
    let Component {
        tcp,
        mut buf,
        mut framer,
    } = component;
    let (mut rd, wr) = tcp.into_split();
    let window = Arc::new(Semaphore::new(load.window));
    let (pong_tx, pong_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let (sent_tx, mut sent_rx) = watch::channel(None::<u64>);
    let answered_total = Arc::new(AtomicU64::new(0));

    let writer = tokio::spawn(write_loop(wr, window.clone(), pong_rx, source));

    let reader_window = window.clone();
    let reader_answered = answered_total.clone();
    let reader = tokio::spawn(async move {
        let mut replies: Vec<(u64, u32)> = Vec::with_capacity(1 << 20);
        let mut errors = 0u64;
        let mut first_error = None;
        loop {
            let mut freed = 0;
            while let Some(event) = framer.next(&mut buf)? {
                let frame = match event {
                    Event::Stanza(frame) => frame,
                    Event::End => bail!("the component closed its stream"),
                    Event::Header(_) => bail!("a second stream header"),
                };
                let Some(tag) = iq_tag(&frame.bytes) else {
                    continue;
                };
                match tag.attr(b"type") {
                    Some(b"get" | b"set") => {
                        let mut pong = Vec::new();
                        empty_result(&tag, &mut pong);
                        let _ = pong_tx.send(pong);
                    }
                    Some(kind) => {
                        let Some((_, sent)) = tag.attr(b"id").and_then(parse_id) else {
                            continue;
                        };
                        let now = now_ns();
                        replies.push((now, ((now.saturating_sub(sent)) / 1000) as u32));
                        freed += 1;
                        if kind == b"error" {
                            errors += 1;
                            first_error.get_or_insert_with(|| {
                                String::from_utf8_lossy(&frame.bytes[..frame.bytes.len().min(400)])
                                    .into_owned()
                            });
                        }
                    }
                    None => {}
                }
            }
            reader_window.add_permits(freed);
            let answered =
                reader_answered.fetch_add(freed as u64, Ordering::Relaxed) + freed as u64;
            if matches!(*sent_rx.borrow(), Some(total) if answered >= total) {
                return Ok((rd, buf, framer, replies, errors, first_error));
            }
            tokio::select! {
                read = rd.read_buf(&mut buf) => {
                    if read? == 0 {
                        bail!("the component closed the connection");
                    }
                }
                _ = sent_rx.changed() => {}
            }
        }
    });

    let interval = Interval::measure(load).await?;
    window.close();

    let (wr, sent) = writer.await.context("the writer panicked")??;
    let _ = sent_tx.send(Some(sent));
    let (rd, buf, framer, replies, errors, first_error) =
        match tokio::time::timeout(DRAIN, reader).await {
            Ok(joined) => joined.context("the reader panicked")??,
            Err(_) => bail!(
                "{} of {sent} requests got no reply within {DRAIN:?} after the load stopped",
                sent - answered_total.load(Ordering::Relaxed)
            ),
        };
    let outcome = interval.outcome(&replies, errors, first_error);
    let tcp = rd.reunite(wr).context("reuniting the socket")?;
    Ok((Component { tcp, buf, framer }, outcome))
}

/// The measured interval of a load: its bounds and the watched processes' CPU time at each.
pub struct Interval {
    t0: u64,
    t1: u64,
    cpu0: Vec<Duration>,
    cpu1: Vec<Duration>,
}

impl Interval {
    /// Sleep through the warm-up, then measure for `load.measure` while the load runs.
    pub async fn measure(load: &Load) -> anyhow::Result<Interval> {
        tokio::time::sleep(load.warmup).await;
        let (t0, cpu0) = (now_ns(), cpu_of(&load.watch)?);
        tokio::time::sleep(load.measure).await;
        let (t1, cpu1) = (now_ns(), cpu_of(&load.watch)?);
        Ok(Interval { t0, t1, cpu0, cpu1 })
    }

    /// The outcome of the replies `(read at, latency µs)` read within the interval.
    pub fn outcome(
        &self,
        replies: &[(u64, u32)],
        errors: u64,
        first_error: Option<String>,
    ) -> Outcome {
        let mut latencies_us: Vec<u32> = replies
            .iter()
            .filter(|(at, _)| (self.t0..self.t1).contains(at))
            .map(|&(_, lat)| lat)
            .collect();
        latencies_us.sort_unstable();
        Outcome {
            answered: latencies_us.len() as u64,
            elapsed: Duration::from_nanos(self.t1 - self.t0),
            latencies_us,
            cpu: self
                .cpu1
                .iter()
                .zip(&self.cpu0)
                .map(|(b, a)| b.saturating_sub(*a))
                .collect(),
            errors,
            first_error,
        }
    }
}

fn cpu_of(pids: &[u32]) -> anyhow::Result<Vec<Duration>> {
    pids.iter().map(|&pid| cpu_time(pid)).collect()
}

/// Send while the window has room, pongs first; stop when the window is closed. Returns how many
/// stanzas were sent.
async fn write_loop(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    window: Arc<Semaphore>,
    mut pongs: mpsc::UnboundedReceiver<Vec<u8>>,
    mut source: Source,
) -> anyhow::Result<(tokio::net::tcp::OwnedWriteHalf, u64)> {
    let mut out = Vec::with_capacity(BATCH * 1024);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            biased;
            Some(pong) = pongs.recv() => wr.write_all(&pong).await?,
            permit = window.acquire() => {
                let Ok(permit) = permit else { break };
                permit.forget();
                let mut n = 1;
                while n < BATCH {
                    match window.try_acquire() {
                        Ok(permit) => {
                            permit.forget();
                            n += 1;
                        }
                        Err(_) => break,
                    }
                }
                for _ in 0..n {
                    source(seq, now_ns(), &mut out);
                    seq += 1;
                }
                wr.write_all(&out).await?;
                out.clear();
            }
        }
    }
    Ok((wr, seq))
}

/// Send one stanza and wait (at most `within`) for the IQ reply to it; returns the reply.
pub async fn round_trip(
    component: &mut Component,
    stanza: &[u8],
    within: Duration,
) -> anyhow::Result<Vec<u8>> {
    component.tcp.write_all(stanza).await?;
    let wait = async {
        loop {
            let event = crate::server::next(
                &mut component.tcp,
                &mut component.buf,
                &mut component.framer,
            )
            .await?;
            if let Event::Stanza(frame) = event {
                if let Some(tag) = iq_tag(&frame.bytes) {
                    if matches!(tag.attr(b"type"), Some(b"result" | b"error")) {
                        return Ok(frame.bytes.to_vec());
                    }
                }
            }
        }
    };
    tokio::time::timeout(within, wait)
        .await
        .context("no reply in time")?
}
