//! The XEP-0114 component link: connect, handshake, keepalive, reconnect, backpressure, shutdown.
//!
//! Knows sockets and stanzas, not XEPs: every IQ request goes to [`router::handle_frame`], whose reply is
//! written back. [`connection`] speaks the stream (headers, handshake, frames in, stanzas out), and
//! [`crate::stanza::frame`] cuts the bytes read into stanzas. Stanzas are handled concurrently (a slow APNs answer never stalls the
//! stream) but at most `max_in_flight` at once; beyond that knock stops reading and TCP pushes back on the
//! server. Every stanza already read is taken before the socket is read again, and every reply already
//! finished leaves in the same write, so a burst of publishes costs a few system calls, not a few per
//! stanza.
//!
//! When the link is lost, the stanzas in flight are not answered on the next link (their IQs belonged to
//! the lost stream, and the server has given up on them), but their work is finished while knock
//! reconnects: a push already under way still goes out, so the device is woken and the node's coalescing
//! slot is not held by a wake-up that was never sent. They still count against `max_in_flight`.
//!
//! A stanza that does not parse gets a `bad-request` and the link stays up (any user on the network can
//! send knock a broken IQ through its server); only XML that no stream may carry ends the link. A quiet link
//! is pinged (XEP-0199) after one `ping_interval` of silence and declared dead after three; while every slot
//! is busy knock reads nothing, so cannot hear the server either, and that time is not counted as silence.
//! A server that does not take knock's writes for three intervals is dead too. A lost link is
//! retried with backoff from 100 ms: at most 1 s apart for the first minute of an outage, so knock is back
//! within a second of a restarted server, then up to 5 s apart. ejabberd disables users' push while it
//! cannot reach the component, so every second of downtime costs users.
//!
//! Several knocks may run for one component JID. Prosody lets one connect and refuses the others with a
//! `<conflict/>` stream error ([`ConnectError::Duplicate`]): each refused knock is a *standby*. It says so
//! once, then knocks again every `standby_retry` ([`LinkSettings`]) for as long as it is refused that way,
//! with no growing backoff, so it holds the link within that pause (plus a handshake) of the active knock's
//! connection dropping. The pause is fixed, not a backoff, since the active knock may drop at any moment; and
//! it is the admin's to choose (`component.standby_retry_ms`, default 1 s), because Prosody logs each
//! refused attempt, one line at error level and three at info: 4 lines a second at the default, 16 at 250 ms
//! (measured 0.25-0.3 s takeovers behind Prosody 0.12 at 250 ms).
//! ejabberd accepts them all and spreads stanzas over them (active/active): nothing to do here for that.

pub mod connection;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, SelectAll};
use futures::{FutureExt, Stream, StreamExt};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::jid::{BareJid, Jid};
use xmpp_parsers::ping::Ping;
use xmpp_parsers::stream_error::DefinedCondition;

use self::connection::{stream_error, Connection};
use crate::app::App;
use crate::router;
use crate::shutdown::Shutdown;
use crate::stanza::frame::{Event, Frame};
use crate::stanza::{self, Kind};

pub use self::connection::ConnectError;

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// The component JID.
    pub jid: BareJid,
    /// `host:port` of the component listener.
    pub server: String,
    /// The shared secret.
    pub secret: String,
    /// Silence after which the server is pinged; twice as long again without an answer and the link is dead.
    pub ping_interval: Duration,
    /// Most stanzas in flight at once.
    pub max_in_flight: usize,
    /// Longest a publish may take; bounds the drain at shutdown.
    pub publish_deadline: Duration,
    /// Pause between attempts while another knock holds the component (a standby).
    pub standby_retry: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between attempts while the outage is young (a server restart).
const SHORT_OUTAGE_BACKOFF: Duration = Duration::from_secs(1);
/// How long an outage counts as young.
const SHORT_OUTAGE: Duration = Duration::from_secs(60);
/// Longest pause between attempts in a long outage.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A link that stayed up this long was healthy: the next reconnect starts from the shortest delay again.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest knock waits for its stream footer to leave at shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Work read from links that were lost since: run to the end, never answered. Each lost link's in-flight
/// set is kept whole (its futures are pinned where they are), as one stream of finished stanzas.
struct Orphans<'a> {
    links: SelectAll<Pin<Box<dyn Stream<Item = Option<Iq>> + 'a>>>,
}

impl<'a> Orphans<'a> {
    fn new() -> Orphans<'a> {
        Orphans {
            links: SelectAll::new(),
        }
    }

    /// Take over a lost link's unfinished work.
    fn adopt<F: Future<Output = Option<Iq>> + 'a>(&mut self, work: FuturesUnordered<F>) {
        if !work.is_empty() {
            tracing::debug!(
                abandoned = work.len(),
                "finishing the lost link's stanzas without answering them"
            );
            self.links.push(Box::pin(work));
        }
    }

    /// Stanzas still being worked on.
    fn len(&self) -> usize {
        // A set of futures knows its exact length; there is one set per lost link still finishing.
        self.links.iter().map(|set| set.size_hint().0).sum()
    }

    fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Wait for the next orphan to finish; its reply is dropped.
    async fn finish_one(&mut self) {
        let _ = self.links.next().await;
    }

    /// Shutdown while the link is down: give the orphans the time in-flight work gets (see [`drain`]).
    async fn finish_all(mut self, deadline: Duration) {
        let all = async { while self.links.next().await.is_some() {} };
        if tokio::time::timeout(deadline + Duration::from_secs(1), all)
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.len(),
                "gave up on the lost link's stanzas at the deadline"
            );
        }
    }
}

/// Await `work` while running `orphans` to the end alongside it.
async fn meanwhile<T>(orphans: &mut Orphans<'_>, work: impl Future<Output = T>) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            _ = orphans.finish_one(), if !orphans.is_empty() => {}
        }
    }
}

/// Why a served link ended.
enum Ended {
    /// Shutdown was requested and in-flight work was answered.
    Shutdown,
    /// The link broke; reconnect.
    Lost(String),
}

/// Keep the component connected and serving until shutdown. Returns only on shutdown.
pub async fn run(app: Arc<App>, settings: LinkSettings, mut shutdown: Shutdown) {
    let mut backoff = FIRST_BACKOFF;
    let mut down_since = Instant::now();
    // Failed attempts in this outage; only the 1st, 2nd, 4th, 8th... are logged loudly, so a long outage
    // does not flood the log with one line a second.
    let mut failures: u64 = 0;
    // Since when another knock holds the component and this one stands by; None while it does not.
    let mut standby: Option<Instant> = None;
    let mut orphans = Orphans::new();
    loop {
        let attempt = tokio::select! {
            _ = shutdown.recv() => return orphans.finish_all(settings.publish_deadline).await,
            attempt = meanwhile(&mut orphans, tokio::time::timeout(
                CONNECT_TIMEOUT,
                Connection::connect(&settings.server, &settings.jid, &settings.secret),
            )) => attempt,
        };
        // A standby knocks again soon whatever the outage's age; everything else backs off.
        let mut pause = None;
        match attempt {
            Ok(Ok(link)) => {
                match standby.take() {
                    Some(since) => {
                        app.stats.link_standby(false);
                        tracing::info!(
                            server = %settings.server, jid = %settings.jid,
                            stood_by_secs = since.elapsed().as_secs(),
                            "the other knock let go of {}; this one has taken over and is serving",
                            settings.jid
                        );
                    }
                    None => tracing::info!(
                        server = %settings.server, failed_attempts = failures, "component link up"
                    ),
                }
                failures = 0;
                app.stats.link_up();
                let since = Instant::now();
                let ended = serve(&app, link, &settings, &mut shutdown, &mut orphans).await;
                app.stats.link_down();
                match ended {
                    Ended::Shutdown => {
                        tracing::info!("component link closed for shutdown");
                        return;
                    }
                    Ended::Lost(reason) => {
                        tracing::warn!(%reason, "component link lost; reconnecting");
                        if since.elapsed() >= STABLE_AFTER {
                            backoff = FIRST_BACKOFF;
                            down_since = Instant::now();
                        }
                    }
                }
            }
            Ok(Err(ConnectError::Duplicate(condition))) => {
                if standby.is_none() {
                    standby = Some(Instant::now());
                    app.stats.link_standby(true);
                    tracing::info!(
                        server = %settings.server, %condition,
                        "another knock holds {}; standing by, taking over when it lets go",
                        settings.jid
                    );
                }
                pause = Some(settings.standby_retry);
            }
            Ok(Err(e)) => {
                leave_standby(
                    &app,
                    &mut standby,
                    &mut backoff,
                    &mut down_since,
                    &mut failures,
                );
                failures += 1;
                let loud = failures.is_power_of_two();
                match e {
                    ConnectError::Refused(_) if loud => {
                        tracing::error!(server = %settings.server, failures, "{e}")
                    }
                    _ if loud => tracing::warn!(
                        server = %settings.server, failures, error = %e, "cannot connect to the XMPP server"
                    ),
                    _ => {
                        tracing::debug!(server = %settings.server, failures, error = %e, "still cannot connect")
                    }
                }
            }
            Err(_) => {
                leave_standby(
                    &app,
                    &mut standby,
                    &mut backoff,
                    &mut down_since,
                    &mut failures,
                );
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(server = %settings.server, failures, "connecting to the XMPP server timed out")
                }
            }
        }
        tokio::select! {
            _ = shutdown.recv() => return orphans.finish_all(settings.publish_deadline).await,
            _ = meanwhile(&mut orphans, tokio::time::sleep(pause.unwrap_or(backoff))) => {}
        }
        if pause.is_none() {
            backoff = next_backoff(backoff, down_since.elapsed());
        }
    }
}

/// A standby's attempt failed some other way (the server went away, say): it is an outage like any other
/// from now on, and a young one, so retries start again from the shortest delay rather than at the 5 s of an
/// outage that began when standing by did, and its first failure is logged loudly.
fn leave_standby(
    app: &App,
    standby: &mut Option<Instant>,
    backoff: &mut Duration,
    down_since: &mut Instant,
    failures: &mut u64,
) {
    if standby.take().is_some() {
        app.stats.link_standby(false);
        *backoff = FIRST_BACKOFF;
        *down_since = Instant::now();
        *failures = 0;
        // The failure itself is logged next, as the first of a new outage.
        tracing::info!(
            "no longer standing by: the server stopped refusing this knock as a duplicate"
        );
    }
}

/// The pause before the next attempt: doubling, capped at 1 s while the outage is young and at 5 s after.
fn next_backoff(current: Duration, outage: Duration) -> Duration {
    let cap = if outage < SHORT_OUTAGE {
        SHORT_OUTAGE_BACKOFF
    } else {
        MAX_BACKOFF
    };
    (current * 2).min(cap)
}

/// The server to ping: the component's parent domain (push.example.org -> example.org), which is the host
/// that accepted the component on every common setup. Any answer, even an error, proves the link is alive.
fn ping_target(jid: &BareJid) -> Jid {
    let domain = jid.domain().as_str();
    domain
        .split_once('.')
        .and_then(|(_, parent)| parent.parse::<BareJid>().ok())
        .unwrap_or_else(|| jid.clone())
        .into()
}

/// Keepalive: after one interval of silence knock pings; after three the link is declared dead.
struct Keepalive {
    interval: Duration,
    last_heard: Instant,
    pinged: bool,
    /// Since when knock has not been reading (every slot busy). The server's pongs wait unread in the
    /// socket then, so the pause is not silence: without this a full cap for three intervals ended a live link.
    paused: Option<Instant>,
    seq: u64,
}

impl Keepalive {
    fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.pinged = false;
    }

    /// Whether knock reads the link now; a pause moves the silence clock on by its length when it ends.
    fn reading(&mut self, reading: bool) {
        match (reading, self.paused) {
            (false, None) => self.paused = Some(Instant::now()),
            (true, Some(since)) => {
                self.last_heard += since.elapsed();
                self.paused = None;
            }
            _ => {}
        }
    }

    /// When to look again.
    fn deadline(&self) -> tokio::time::Instant {
        let silence = if self.pinged {
            self.interval * 3
        } else {
            self.interval
        };
        (self.last_heard + silence).into()
    }
}

async fn serve<'a>(
    app: &'a App,
    mut conn: Connection,
    settings: &LinkSettings,
    shutdown: &mut Shutdown,
    orphans: &mut Orphans<'a>,
) -> Ended {
    let mut in_flight = FuturesUnordered::new();
    let me: Jid = settings.jid.clone().into();
    let target = ping_target(&settings.jid);
    let mut keepalive = Keepalive {
        interval: settings.ping_interval,
        last_heard: Instant::now(),
        pinged: false,
        paused: None,
        seq: 0,
    };

    let ended = 'serve: loop {
        let reading = in_flight.len() + orphans.len() < settings.max_in_flight;
        keepalive.reading(reading);
        tokio::select! {
            biased;
            _ = shutdown.recv() => {
                break 'serve drain(&mut conn, &mut in_flight, orphans, settings.publish_deadline).await;
            }
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                let written = within(
                    settings.ping_interval * 3,
                    write_replies(&mut conn, reply, &mut in_flight),
                );
                // A write to a server that stopped reading may block for that long: shutdown must not wait.
                let written = tokio::select! {
                    biased;
                    _ = shutdown.recv() => None,
                    written = written => Some(written),
                };
                match written {
                    None => {
                        break 'serve drain(&mut conn, &mut in_flight, orphans, settings.publish_deadline).await;
                    }
                    Some(Err(reason)) => break 'serve Ended::Lost(reason),
                    Some(Ok(())) => {}
                }
            }
            _ = orphans.finish_one(), if !orphans.is_empty() => {}
            event = conn.read(), if reading => {
                keepalive.heard();
                let mut event = event;
                // Take every stanza already read before going back to the socket, so a burst becomes one
                // batch of work and, below, one write of replies.
                loop {
                    match event {
                        Ok(Some(Event::Stanza(frame))) => match route(app, frame) {
                            Ok(Some(work)) => in_flight.push(work),
                            Ok(None) => {}
                            Err(reason) => break 'serve Ended::Lost(reason),
                        },
                        Ok(Some(Event::Header(_))) => {
                            break 'serve Ended::Lost("the server sent a second stream header".into());
                        }
                        Ok(Some(Event::End)) => break 'serve Ended::Lost("the server closed the stream".into()),
                        Ok(None) => break 'serve Ended::Lost("connection closed".into()),
                        Err(e) => break 'serve Ended::Lost(e.to_string()),
                    }
                    if in_flight.len() + orphans.len() >= settings.max_in_flight {
                        break;
                    }
                    match conn.buffered() {
                        Ok(None) => break,
                        other => event = other,
                    }
                }
            }
            _ = tokio::time::sleep_until(keepalive.deadline()), if reading => {
                if keepalive.pinged {
                    break 'serve Ended::Lost("the server did not answer a ping".into());
                }
                keepalive.pinged = true;
                keepalive.seq += 1;
                let ping = Iq::from_get(format!("knock-ping-{}", keepalive.seq), Ping)
                    .with_from(me.clone())
                    .with_to(target.clone());
                if let Err(reason) = within(settings.ping_interval * 3, send(&mut conn, &ping)).await {
                    break 'serve Ended::Lost(reason);
                }
            }
        }
    };
    orphans.adopt(in_flight);
    ended
}

/// What becomes of one stanza: work for the router, nothing (answers, messages, presences), or the end of
/// the link (a stream error).
fn route(app: &App, frame: Frame) -> Result<Option<impl Future<Output = Option<Iq>> + '_>, String> {
    match stanza::kind(&frame) {
        Kind::Request => Ok(Some(router::handle_frame(app, frame))),
        // Pongs and other answers need no reply; any traffic already proved the link alive.
        Kind::Answer => Ok(None),
        Kind::Ignored => {
            tracing::trace!("ignoring a message or presence");
            Ok(None)
        }
        Kind::StreamError => Err(match stream_error(&frame) {
            // Prosody with `component_conflict_resolve = "kick_old"` hands the JID to each new connection:
            // two knocks would then take the link from each other for ever, with no standby possible.
            Some(e) if e.condition == DefinedCondition::Conflict => format!(
                "the server sent a stream error: {e}; another connection took over the component \
                 (on Prosody, keep component_conflict_resolve at its default kick_new when several knocks run)"
            ),
            Some(e) => format!("the server sent a stream error: {e}"),
            None => "the server sent an unreadable stream error".into(),
        }),
        Kind::Unknown => {
            tracing::debug!("ignoring an element that is neither an IQ, a message nor a presence");
            Ok(None)
        }
    }
}

/// A write to the server, given up after `limit`: a server that does not take knock's replies for as long as
/// keepalive allows a silence (three ping intervals) is as dead as a silent one, and while knock waits on the
/// write it hears nothing and finishes nothing. Without the limit a hung server held the link forever.
async fn within(
    limit: Duration,
    write: impl Future<Output = Result<(), std::io::Error>>,
) -> Result<(), String> {
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err(format!(
            "a write to the server did not finish within {limit:?}"
        )),
    }
}

async fn send(conn: &mut Connection, iq: &Iq) -> Result<(), std::io::Error> {
    conn.queue(iq)?;
    conn.flush().await
}

/// Write one reply, plus every other reply already finished, then flush once.
async fn write_replies<F>(
    conn: &mut Connection,
    first: Option<Iq>,
    in_flight: &mut FuturesUnordered<F>,
) -> Result<(), std::io::Error>
where
    F: Future<Output = Option<Iq>>,
{
    let mut reply = first;
    loop {
        if let Some(iq) = reply.take() {
            conn.queue(&iq)?;
        }
        match in_flight.next().now_or_never() {
            Some(Some(next)) => reply = next,
            _ => break,
        }
    }
    conn.flush().await
}

/// Shutdown: read nothing more, answer what is in flight and finish the orphans of lost links (bounded by
/// the publish deadline), close the stream.
async fn drain<F>(
    conn: &mut Connection,
    in_flight: &mut FuturesUnordered<F>,
    orphans: &mut Orphans<'_>,
    deadline: Duration,
) -> Ended
where
    F: Future<Output = Option<Iq>>,
{
    let pending = in_flight.len();
    if pending > 0 {
        tracing::info!(pending, "answering in-flight stanzas before shutdown");
    }
    let answered = tokio::time::timeout(deadline + Duration::from_secs(1), async {
        while !in_flight.is_empty() || !orphans.is_empty() {
            tokio::select! {
                Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                    if let Some(iq) = reply {
                        send(conn, &iq).await?;
                    }
                }
                _ = orphans.finish_one(), if !orphans.is_empty() => {}
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    match answered {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not answer every in-flight stanza"),
        Err(_) => tracing::warn!(
            left = in_flight.len() + orphans.len(),
            "gave up on in-flight stanzas at the deadline"
        ),
    }
    // Bounded: a server that stopped reading would hold the last write, and the exit, forever.
    if let Err(reason) = within(CLOSE_TIMEOUT, conn.close()).await {
        tracing::debug!(%reason, "closing the stream");
    }
    Ended::Shutdown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_a_second_apart_early_in_an_outage() {
        let mut pause = FIRST_BACKOFF;
        let mut schedule = Vec::new();
        for _ in 0..6 {
            pause = next_backoff(pause, Duration::from_secs(5));
            schedule.push(pause.as_millis());
        }
        assert_eq!(schedule, [200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(
            next_backoff(Duration::from_secs(1), Duration::from_secs(61)),
            Duration::from_secs(2)
        );
        assert_eq!(
            next_backoff(Duration::from_secs(4), Duration::from_secs(600)),
            MAX_BACKOFF
        );
    }

    #[test]
    fn pings_go_to_the_parent_domain() {
        let p = |s: &str| ping_target(&s.parse().expect("jid")).to_string();
        assert_eq!(p("push.example.org"), "example.org");
        assert_eq!(p("push.localhost"), "localhost");
        assert_eq!(p("localhost"), "localhost");
    }

    #[test]
    fn time_spent_not_reading_is_not_silence() {
        let interval = Duration::from_secs(1);
        let mut keepalive = Keepalive {
            interval,
            last_heard: Instant::now(),
            pinged: true,
            paused: None,
            seq: 1,
        };
        let before = keepalive.deadline();
        keepalive.reading(false);
        // A pause of five intervals, longer than the three that end a link.
        keepalive.paused = keepalive.paused.map(|at| at - interval * 5);
        keepalive.reading(true);
        assert!(keepalive.paused.is_none());
        assert!(
            keepalive.deadline() >= before + interval * 5,
            "the pause moved the deadline on"
        );
    }

    #[tokio::test]
    async fn orphans_count_every_unfinished_stanza_of_every_lost_link() {
        let mut orphans = Orphans::new();
        for n in [2, 3] {
            let work: FuturesUnordered<_> =
                (0..n).map(|_| futures::future::ready(None::<Iq>)).collect();
            orphans.adopt(work);
        }
        orphans.adopt(FuturesUnordered::<futures::future::Ready<Option<Iq>>>::new());
        assert_eq!(orphans.len(), 5);
        orphans.finish_one().await;
        assert_eq!(orphans.len(), 4);
        orphans.finish_all(Duration::from_secs(1)).await;
    }
}
