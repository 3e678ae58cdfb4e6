//! The ceiling: a component that answers every IQ request with an empty result and does nothing else.
//! It reads, frames and writes the way knock's link does (one read, every stanza in it, one write), so
//! the gap between it and knock is what knock does with a publish, not how it moves bytes.

use std::net::SocketAddr;

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use knock::stanza::frame::{Event, Framer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::server::{empty_result, handshake_digest, iq_tag, next};

/// Connect to `server` as `jid`, authenticate with `secret`, and answer IQs until the stream ends.
pub async fn run(server: SocketAddr, jid: &str, secret: &str) -> anyhow::Result<()> {
    let mut tcp = TcpStream::connect(server)
        .await
        .with_context(|| format!("connecting to {server}"))?;
    tcp.set_nodelay(true)?;
    tcp.write_all(
        format!(
            "<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' \
             xmlns='jabber:component:accept' to='{jid}'>"
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut framer = Framer::default();
    let stream_id = match next(&mut tcp, &mut buf, &mut framer).await? {
        Event::Header(header) => knock::stanza::xml::Tag::parse(&header)
            .and_then(|tag| tag.attr(b"id"))
            .map(|id| String::from_utf8_lossy(id).into_owned())
            .context("the stream header has no id")?,
        other => bail!("expected a stream header, got {other:?}"),
    };
    tcp.write_all(
        format!(
            "<handshake>{}</handshake>",
            handshake_digest(&stream_id, secret)
        )
        .as_bytes(),
    )
    .await?;
    match next(&mut tcp, &mut buf, &mut framer).await? {
        Event::Stanza(frame) if frame.bytes.starts_with(b"<handshake") => {}
        other => bail!("handshake refused: {other:?}"),
    }

    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        while let Some(event) = framer.next(&mut buf)? {
            match event {
                Event::Stanza(frame) => {
                    if let Some(tag) = iq_tag(&frame.bytes) {
                        if matches!(tag.attr(b"type"), Some(b"get" | b"set")) {
                            empty_result(&tag, &mut out);
                        }
                    }
                }
                Event::End => return Ok(()),
                Event::Header(_) => bail!("a second stream header"),
            }
        }
        if !out.is_empty() {
            tcp.write_all(&out).await?;
            out.clear();
        }
        if tcp.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}
