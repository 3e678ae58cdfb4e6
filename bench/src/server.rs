//! The XMPP server's side of XEP-0114, as much as a benchmark needs: accept the component, send the
//! stream header, check its handshake, and hand over the socket with whatever it already sent.

use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use knock::stanza::frame::{Event, Framer};
use knock::stanza::xml::Tag;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

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

async fn handshake(mut tcp: TcpStream) -> anyhow::Result<Component> {
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
    tcp.write_all(b"<handshake/>").await?;
    Ok(Component { tcp, buf, framer })
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
