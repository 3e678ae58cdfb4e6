//! The XMPP server's side of XEP-0114, as much as a benchmark needs: accept the component, send the
//! stream header, check its handshake, and hand over the socket with whatever it already sent.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use knock::stanza::frame::{Event, Framer};
use knock::stanza::xml::Tag;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::stanzas::{COMPONENT_JID, COMPONENT_SECRET};

/// An authenticated component connection.
pub struct Component {
    /// The socket, after the handshake.
    pub tcp: TcpStream,
    /// Bytes read past the handshake.
    pub buf: BytesMut,
    /// The framer's state over `buf`.
    pub framer: Framer,
}

/// The stream id we hand out; the handshake is SHA-1 over it and the secret.
const STREAM_ID: &str = "knock-bench-stream";

/// The handshake a component with the right secret sends (XEP-0114 §3).
pub fn handshake_digest(stream_id: &str, secret: &str) -> String {
    hex::encode(Sha1::digest(format!("{stream_id}{secret}").as_bytes()))
}

/// Wait (at most `within`) for one component to connect and authenticate.
pub async fn accept(listener: &TcpListener, within: Duration) -> anyhow::Result<Component> {
    let (tcp, _) = tokio::time::timeout(within, listener.accept())
        .await
        .context("the component did not connect")??;
    tokio::time::timeout(within, handshake(tcp))
        .await
        .context("the component did not complete the handshake")?
}

async fn handshake(tcp: TcpStream) -> anyhow::Result<Component> {
    match handshake_or_refuse(tcp, || true).await? {
        Some(component) => Ok(component),
        None => bail!("refused as a duplicate"),
    }
}

/// The handshake, with `admit` asked once the secret is right: if it says no, the component is refused as
/// Prosody refuses a second connection for a component JID already connected, and `None` is returned.
async fn handshake_or_refuse(
    mut tcp: TcpStream,
    admit: impl FnOnce() -> bool,
) -> anyhow::Result<Option<Component>> {
    tcp.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut framer = Framer::default();
    match next(&mut tcp, &mut buf, &mut framer).await? {
        Event::Header(_) => {}
        other => bail!("expected a stream header, got {other:?}"),
    }
    tcp.write_all(
        format!(
            "<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' \
             xmlns='jabber:component:accept' id='{STREAM_ID}' from='{COMPONENT_JID}'>"
        )
        .as_bytes(),
    )
    .await?;
    let frame = match next(&mut tcp, &mut buf, &mut framer).await? {
        Event::Stanza(frame) => frame,
        other => bail!("expected a handshake, got {other:?}"),
    };
    let text = std::str::from_utf8(&frame.bytes)?;
    let digest = text
        .strip_prefix("<handshake>")
        .and_then(|t| t.strip_suffix("</handshake>"))
        .with_context(|| format!("expected a handshake, got {text}"))?;
    if digest != handshake_digest(STREAM_ID, COMPONENT_SECRET) {
        tcp.write_all(b"<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>").await?;
        bail!("the component sent a wrong handshake");
    }
    if !admit() {
        // Prosody 0.12's mod_component, word for word.
        tcp.write_all(
            b"<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
              <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>Component already connected</text>\
              </stream:error></stream:stream>",
        )
        .await?;
        let _ = tcp.shutdown().await;
        return Ok(None);
    }
    tcp.write_all(b"<handshake/>").await?;
    Ok(Some(Component { tcp, buf, framer }))
}

/// Prosody's rule of one connection per component JID: components connect at any time; the first to
/// authenticate holds the JID, and every other one that gets the secret right is refused with a
/// `<conflict/>` stream error ("Component already connected") until the holder's connection is
/// [`release`](OneAtATime::release)d. A knock refused that way stands by and knocks again every 250 ms.
pub struct OneAtATime {
    held: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    admitted: mpsc::UnboundedReceiver<(Component, u64)>,
    task: JoinHandle<()>,
}

impl OneAtATime {
    /// Accept on `listener` until dropped.
    pub fn serve(listener: TcpListener) -> OneAtATime {
        let held = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let (tx, admitted) = mpsc::unbounded_channel();
        let (task_held, task_refused) = (held.clone(), refused.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (held, refused, tx) = (task_held.clone(), task_refused.clone(), tx.clone());
                tokio::spawn(async move {
                    let admit = || !held.swap(true, Ordering::SeqCst);
                    let handshake = tokio::time::timeout(
                        Duration::from_secs(10),
                        handshake_or_refuse(tcp, admit),
                    );
                    match handshake.await {
                        Ok(Ok(Some(component))) => {
                            let _ = tx.send((component, crate::load::now_ns()));
                        }
                        Ok(Ok(None)) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        // A component that failed its handshake holds nothing; it may try again.
                        Ok(Err(_)) | Err(_) => {}
                    }
                });
            }
        });
        OneAtATime {
            held,
            refused,
            admitted,
            task,
        }
    }

    /// The next component admitted (within `within`), and when its handshake was answered ([`crate::load::now_ns`]).
    pub async fn next(&mut self, within: Duration) -> anyhow::Result<(Component, u64)> {
        tokio::time::timeout(within, self.admitted.recv())
            .await
            .context("no component was admitted in time")?
            .context("the acceptor stopped")
    }

    /// The holder's connection is gone: the next component to authenticate is admitted.
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }

    /// How many handshakes were refused as duplicates so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for OneAtATime {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Read until the framer has an event.
pub async fn next(
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    framer: &mut Framer,
) -> anyhow::Result<Event> {
    loop {
        if let Some(event) = framer.next(buf)? {
            return Ok(event);
        }
        if tcp.read_buf(buf).await? == 0 {
            bail!("the peer closed the connection");
        }
    }
}

/// An IQ's root tag, if the stanza is one.
pub fn iq_tag(bytes: &[u8]) -> Option<Tag<'_>> {
    let end = knock::stanza::xml::tag_end(bytes, 0)?;
    Tag::parse(&bytes[..=end]).filter(|tag| tag.name == b"iq")
}

/// An empty result for an IQ request (`type` get or set), with `to` and `from` swapped.
pub fn empty_result(tag: &Tag<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"<iq type='result' id='");
    out.extend_from_slice(tag.attr(b"id").unwrap_or_default());
    if let Some(from) = tag.attr(b"from") {
        out.extend_from_slice(b"' to='");
        out.extend_from_slice(from);
    }
    if let Some(to) = tag.attr(b"to") {
        out.extend_from_slice(b"' from='");
        out.extend_from_slice(to);
    }
    out.extend_from_slice(b"'/>");
}
