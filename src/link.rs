//! The XEP-0114 component link: connect, handshake, keepalive, reconnect, backpressure, shutdown.
//!
//! Knows sockets and stanzas, not XEPs: every IQ goes to [`router::handle`], whose reply is written back.
//! Stanzas are handled concurrently (a slow APNs answer never stalls the stream) but at most
//! `max_in_flight` at once; beyond that knock stops reading and TCP pushes back on the server.
//! tokio-xmpp's stream ends (`None`) on a read timeout even when the socket is fine, so the link pings
//! the server and treats a real end of stream or an unanswered ping as a disconnect, then reconnects
//! with backoff from 100 ms to 5 s: ejabberd disables users' push when it cannot reach the component.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio_xmpp::connect::{DnsConfig, TcpServerConnector};
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::{Component, Stanza};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::jid::{BareJid, Jid};
use xmpp_parsers::ping::Ping;

use crate::app::App;
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
    /// Keepalive ping interval.
    pub ping_interval: Duration,
    /// Most stanzas in flight at once.
    pub max_in_flight: usize,
    /// Longest a publish may take; bounds the drain at shutdown.
    pub publish_deadline: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
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
    loop {
        let attempt = tokio::select! {
            _ = shutdown.recv() => return,
            attempt = tokio::time::timeout(CONNECT_TIMEOUT, connect(&settings)) => attempt,
        };
        match attempt {
            Ok(Ok(component)) => {
                tracing::info!(server = %settings.server, "component link up");
                let since = Instant::now();
                match serve(&app, component, &settings, &mut shutdown).await {
                    Ended::Shutdown => {
                        tracing::info!("component link closed for shutdown");
                        return;
                    }
                    Ended::Lost(reason) => {
                        tracing::warn!(%reason, "component link lost; reconnecting");
                        if since.elapsed() >= STABLE_AFTER {
                            backoff = FIRST_BACKOFF;
                        }
                    }
                }
            }
            Ok(Err(e)) => match e {
                tokio_xmpp::Error::Auth(_) => tracing::error!(
                    server = %settings.server,
                    "the server refused the component handshake: check component.jid and the secret against the server's config"
                ),
                e => {
                    tracing::warn!(server = %settings.server, error = %e, "cannot connect to the XMPP server")
                }
            },
            Err(_) => {
                tracing::warn!(server = %settings.server, "connecting to the XMPP server timed out")
            }
        }
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(
    settings: &LinkSettings,
) -> Result<Component<TcpServerConnector>, tokio_xmpp::Error> {
    // A healthy link carries a pong every ping interval, so three silent intervals mean it is dead.
    let timeouts = Timeouts {
        read_timeout: settings.ping_interval * 3,
        response_timeout: settings.ping_interval * 2,
    };
    Component::new_plaintext(
        settings.jid.as_str(),
        &settings.secret,
        DnsConfig::addr(&settings.server),
        timeouts,
    )
    .await
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
    mut component: Component<TcpServerConnector>,
    settings: &LinkSettings,
    shutdown: &mut Shutdown,
) -> Ended {
    let mut in_flight = FuturesUnordered::new();
    let mut ping_timer = tokio::time::interval(settings.ping_interval);
    ping_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping_timer.tick().await;
    let me: Jid = settings.jid.clone().into();
    let target = ping_target(&settings.jid);
    let mut ping_seq: u64 = 0;
    // The id of the ping awaiting its answer, and when it was sent.
    let mut ping_pending: Option<(String, Instant)> = None;

    loop {
        tokio::select! {
            biased;
            _ = shutdown.recv() => {
                return drain(&mut component, in_flight, settings.publish_deadline).await;
            }
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(e) = write_replies(&mut component, reply, &mut in_flight).await {
                    return Ended::Lost(format!("write failed: {e}"));
                }
            }
            stanza = component.next(), if in_flight.len() < settings.max_in_flight => {
                match stanza {
                    None => return Ended::Lost("stream ended".into()),
                    Some(Stanza::Iq(iq)) => {
                        let is_answer = matches!(iq, Iq::Result { .. } | Iq::Error { .. });
                        if is_answer {
                            if ping_pending.as_ref().is_some_and(|(id, _)| id == iq.id()) {
                                ping_pending = None;
                            }
                            continue;
                        }
                        in_flight.push(router::handle(app, iq));
                    }
                    Some(_) => tracing::trace!("ignoring a message or presence"),
                }
            }
            _ = ping_timer.tick() => {
                if let Some((_, sent)) = &ping_pending {
                    if sent.elapsed() >= settings.ping_interval * 2 {
                        return Ended::Lost("keepalive ping unanswered".into());
                    }
                    continue;
                }
                ping_seq += 1;
                let id = format!("knock-ping-{ping_seq}");
                let ping = Iq::from_get(id.clone(), Ping).with_from(me.clone()).with_to(target.clone());
                if let Err(e) = component.send(Stanza::Iq(ping)).await {
                    return Ended::Lost(format!("write failed: {e}"));
                }
                ping_pending = Some((id, Instant::now()));
            }
        }
    }
}

/// Write one reply, plus every other reply already finished, then flush once.
async fn write_replies<F>(
    component: &mut Component<TcpServerConnector>,
    first: Option<Iq>,
    in_flight: &mut FuturesUnordered<F>,
) -> Result<(), tokio_xmpp::Error>
where
    F: std::future::Future<Output = Option<Iq>>,
{
    let mut reply = first;
    loop {
        if let Some(iq) = reply.take() {
            component.feed(Stanza::Iq(iq)).await?;
        }
        match in_flight.next().now_or_never() {
            Some(Some(next)) => reply = next,
            _ => break,
        }
    }
    component.flush().await
}

/// Shutdown: read nothing more, answer what is in flight (bounded by the publish deadline), close the stream.
async fn drain<F>(
    component: &mut Component<TcpServerConnector>,
    mut in_flight: FuturesUnordered<F>,
    deadline: Duration,
) -> Ended
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
                component.send(Stanza::Iq(iq)).await?;
            }
        }
        Ok::<(), tokio_xmpp::Error>(())
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
    if let Err(e) = component.send_end().await {
        tracing::debug!(error = %e, "closing the stream");
    }
    Ended::Shutdown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_go_to_the_parent_domain() {
        let p = |s: &str| ping_target(&s.parse().expect("jid")).to_string();
        assert_eq!(p("push.example.org"), "example.org");
        assert_eq!(p("push.localhost"), "localhost");
        assert_eq!(p("localhost"), "localhost");
    }
}
