//! The XEP-0114 component link: connect, handshake, keepalive, reconnect, backpressure, shutdown.
//!
//! Knows sockets and stanzas, not XEPs: every IQ goes to [`router::handle`], whose reply is written back.
//! Stanzas are handled concurrently (a slow APNs answer never stalls the stream) but at most
//! `max_in_flight` at once; beyond that knock stops reading and TCP pushes back on the server.
//!
//! The link runs on tokio-xmpp's XML stream directly rather than its `Component` wrapper, because the
//! wrapper ends the whole stream on any stanza that does not parse (`<iq type='get'/>` with no payload, which
//! any user on the network can send, would force a reconnect) and on its read timeout. Here a stanza that
//! does not parse gets a `bad-request` and the link stays up; a quiet link is pinged (XEP-0199) after one
//! `ping_interval` of silence and declared dead when the ping goes unanswered. A lost link is retried with
//! backoff from 100 ms: at most 1 s apart for the first minute of an outage, so knock is back within a second
//! of a restarted server, then up to 5 s apart. ejabberd disables users' push while it cannot reach the
//! component, so every second of downtime costs users.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_xmpp::xmlstream::{
    initiate_stream, FallibleStreamElement, ReadError, StreamElementError, StreamHeader, Timeouts,
    XmppStream, XmppStreamElement,
};
use tokio_xmpp::Stanza;
use xmpp_parsers::component::Handshake;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::jid::{BareJid, Jid};
use xmpp_parsers::ns;
use xmpp_parsers::ping::Ping;

use crate::app::App;
use crate::handlers::HandlerError;
use crate::router;
use crate::shutdown::Shutdown;

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
}

/// Why the component could not attach.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP or stream I/O failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server answered the handshake with a stream error or closed the stream: usually a wrong secret or
    /// a component JID the server does not know.
    #[error("the server refused the component handshake ({0}): check component.jid and the secret against the server's config")]
    Refused(String),
    /// The server said something that is not XEP-0114.
    #[error("unexpected answer during the handshake: {0}")]
    Protocol(String),
}

/// The component stream: tokio-xmpp's XML stream over buffered TCP.
type Link = XmppStream<BufStream<TcpStream>>;

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
    loop {
        let attempt = tokio::select! {
            _ = shutdown.recv() => return,
            attempt = tokio::time::timeout(CONNECT_TIMEOUT, connect(&settings)) => attempt,
        };
        match attempt {
            Ok(Ok(link)) => {
                tracing::info!(server = %settings.server, failed_attempts = failures, "component link up");
                failures = 0;
                let since = Instant::now();
                match serve(&app, link, &settings, &mut shutdown).await {
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
            Ok(Err(e)) => {
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
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(server = %settings.server, failures, "connecting to the XMPP server timed out")
                }
            }
        }
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = next_backoff(backoff, down_since.elapsed());
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

/// Open the TCP connection, exchange stream headers, and complete the XEP-0114 handshake.
async fn connect(settings: &LinkSettings) -> Result<Link, ConnectError> {
    let tcp = TcpStream::connect(&settings.server).await?;
    tcp.set_nodelay(true)?;
    // After one interval of silence the stream reports a soft timeout and knock pings; the hard timeout then
    // gives the server the rest of the response timeout to answer.
    let timeouts = Timeouts {
        read_timeout: settings.ping_interval,
        response_timeout: settings.ping_interval * 2,
    };
    let header = StreamHeader {
        to: Some(Cow::Owned(settings.jid.to_string())),
        from: None,
        id: None,
    };
    let mut pending = initiate_stream(BufStream::new(tcp), ns::COMPONENT, header, timeouts).await?;
    let stream_id = pending
        .take_header()
        .id
        .ok_or_else(|| ConnectError::Protocol("the server's stream header has no id".into()))?;
    let mut link: Link = pending.skip_features();
    let handshake =
        Handshake::from_stream_id_and_password(stream_id.into_owned(), &settings.secret);
    link.send(&XmppStreamElement::ComponentHandshake(handshake))
        .await?;
    loop {
        match link.next().await {
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::ComponentHandshake(_)))) => {
                return Ok(link)
            }
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::StreamError(e)))) => {
                return Err(ConnectError::Refused(e.0.to_string()))
            }
            Some(Err(ReadError::SoftTimeout)) => continue,
            Some(Err(ReadError::HardError(e))) => return Err(e.into()),
            Some(Err(ReadError::StreamFooterReceived)) | None => {
                return Err(ConnectError::Refused("the server closed the stream".into()))
            }
            Some(Ok(other)) => return Err(ConnectError::Protocol(format!("{other:?}"))),
            Some(Err(e)) => return Err(ConnectError::Protocol(e.to_string())),
        }
    }
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

async fn serve(
    app: &App,
    mut link: Link,
    settings: &LinkSettings,
    shutdown: &mut Shutdown,
) -> Ended {
    let mut in_flight = FuturesUnordered::new();
    let me: Jid = settings.jid.clone().into();
    let target = ping_target(&settings.jid);
    let mut ping_seq: u64 = 0;

    loop {
        tokio::select! {
            biased;
            _ = shutdown.recv() => {
                return drain(&mut link, in_flight, settings.publish_deadline).await;
            }
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(e) = write_replies(&mut link, reply, &mut in_flight).await {
                    return Ended::Lost(format!("write failed: {e}"));
                }
            }
            item = link.next(), if in_flight.len() < settings.max_in_flight => {
                let reply = match item {
                    Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(Stanza::Iq(iq))))) => {
                        // Answers (pongs included) need no reply; any traffic already proved the link alive.
                        if !matches!(iq, Iq::Result { .. } | Iq::Error { .. }) {
                            in_flight.push(router::handle(app, iq));
                        }
                        continue;
                    }
                    Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(_)))) => {
                        tracing::trace!("ignoring a message or presence");
                        continue;
                    }
                    Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::StreamError(e)))) => {
                        return Ended::Lost(format!("the server sent a stream error: {}", e.0));
                    }
                    Some(Ok(FallibleStreamElement::Ok(other))) => {
                        tracing::debug!(element = ?other, "ignoring an unexpected stream element");
                        continue;
                    }
                    Some(Ok(FallibleStreamElement::Err(e))) => match reject_malformed(&me, e) {
                        Some(reply) => reply,
                        None => continue,
                    },
                    Some(Err(ReadError::SoftTimeout)) => {
                        ping_seq += 1;
                        Iq::from_get(format!("knock-ping-{ping_seq}"), Ping)
                            .with_from(me.clone())
                            .with_to(target.clone())
                    }
                    Some(Err(ReadError::ParseError(e))) => {
                        tracing::debug!(error = %e, "skipping an element that does not parse");
                        continue;
                    }
                    Some(Err(ReadError::StreamFooterReceived)) => {
                        return Ended::Lost("the server closed the stream".into());
                    }
                    Some(Err(ReadError::HardError(e))) => return Ended::Lost(e.to_string()),
                    None => return Ended::Lost("connection closed".into()),
                };
                if let Err(e) = link.send(&XmppStreamElement::Stanza(Stanza::Iq(reply))).await {
                    return Ended::Lost(format!("write failed: {e}"));
                }
            }
        }
    }
}

/// The `bad-request` for an IQ request that does not parse, built from its raw header; `None` when there is
/// nobody to answer (no sender or id) or nothing to answer (not a get/set: answers are never answered).
fn reject_malformed(me: &Jid, error: StreamElementError) -> Option<Iq> {
    let StreamElementError::InvalidStanza { header, error, .. } = error else {
        return None;
    };
    tracing::debug!(%error, "malformed stanza");
    if !matches!(header.type_.as_deref(), Some("get" | "set")) {
        return None;
    }
    let from: Jid = header.from?.parse().ok()?;
    let id = header.id?;
    let to = header
        .to
        .and_then(|to| to.parse().ok())
        .unwrap_or_else(|| me.clone());
    let error = HandlerError::bad_request("malformed stanza");
    Some(Iq::Error {
        error: error.to_stanza_error(Some(to.clone())),
        from: Some(to),
        to: Some(from),
        id,
        payload: None,
    })
}

/// Write one reply, plus every other reply already finished, then flush once.
async fn write_replies<F>(
    link: &mut Link,
    first: Option<Iq>,
    in_flight: &mut FuturesUnordered<F>,
) -> Result<(), std::io::Error>
where
    F: std::future::Future<Output = Option<Iq>>,
{
    let mut reply = first;
    loop {
        if let Some(iq) = reply.take() {
            link.feed(&XmppStreamElement::Stanza(Stanza::Iq(iq)))
                .await?;
        }
        match in_flight.next().now_or_never() {
            Some(Some(next)) => reply = next,
            _ => break,
        }
    }
    SinkExt::<&XmppStreamElement>::flush(link).await
}

/// Shutdown: read nothing more, answer what is in flight (bounded by the publish deadline), close the stream.
async fn drain<F>(link: &mut Link, mut in_flight: FuturesUnordered<F>, deadline: Duration) -> Ended
where
    F: std::future::Future<Output = Option<Iq>>,
{
    let pending = in_flight.len();
    if pending > 0 {
        tracing::info!(pending, "answering in-flight stanzas before shutdown");
    }
    let answered = tokio::time::timeout(deadline + Duration::from_secs(1), async {
        while let Some(reply) = in_flight.next().await {
            if let Some(iq) = reply {
                link.send(&XmppStreamElement::Stanza(Stanza::Iq(iq)))
                    .await?;
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    match answered {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not answer every in-flight stanza"),
        Err(_) => tracing::warn!(
            left = in_flight.len(),
            "gave up on in-flight stanzas at the deadline"
        ),
    }
    if let Err(e) = SinkExt::<&XmppStreamElement>::close(link).await {
        tracing::debug!(error = %e, "closing the stream");
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
}
