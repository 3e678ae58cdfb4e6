//! One XEP-0114 connection: TCP, the stream headers, the handshake, then frames in and typed stanzas out.
//!
//! Reading goes through the [`Framer`] (no parsing here: the router decides how much each stanza needs).
//! Writing encodes xmpp-parsers types with one long-lived rxml encoder, so stanzas inherit the stream's
//! namespace instead of repeating it, and queued stanzas leave in one write when [`Connection::flush`]ed.

use std::borrow::Cow;

use bytes::BytesMut;
use rxml::writer::TrackNamespace;
use rxml::{xml_ncname, Namespace};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xmpp_parsers::component::Handshake;
use xmpp_parsers::jid::BareJid;
use xmpp_parsers::ns;
use xmpp_parsers::stream_error::{DefinedCondition, StreamError};
use xso::AsXml;

use crate::stanza;
use crate::stanza::frame::{Event, Frame, FrameError, Framer};
use crate::stanza::xml::{decode, Tag};

/// Bytes asked of the socket per read; a burst of publishes is read and framed in one go.
const READ_CHUNK: usize = 64 * 1024;

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
    /// The server accepted the secret but another connection holds the component JID: a `<conflict/>`
    /// stream error, which is how Prosody refuses a second component connection ("Component already
    /// connected"). Another knock is serving; this one is a standby. Told apart by the stream error's
    /// condition, not its text, which is Prosody's wording and may change or be translated.
    #[error("another connection holds the component ({0})")]
    Duplicate(String),
    /// The server said something that is not XEP-0114.
    #[error("unexpected answer during the handshake: {0}")]
    Protocol(String),
}

/// Why a connection stopped being readable.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server sent something no XMPP stream may carry.
    #[error("{0}")]
    Frame(#[from] FrameError),
}

impl From<LinkError> for ConnectError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Io(e) => ConnectError::Io(e),
            LinkError::Frame(e) => ConnectError::Protocol(e.to_string()),
        }
    }
}

/// An authenticated component stream.
pub struct Connection {
    tcp: TcpStream,
    read_buf: BytesMut,
    framer: Framer,
    /// Lives as long as the stream, so it knows the namespaces the stream header declared.
    encoder: rxml::writer::Encoder<rxml::writer::SimpleNamespaces>,
    write_buf: BytesMut,
}

fn encode_error(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

impl Connection {
    /// Open the TCP connection, exchange stream headers, and complete the XEP-0114 handshake.
    pub async fn connect(
        server: &str,
        jid: &BareJid,
        secret: &str,
    ) -> Result<Connection, ConnectError> {
        let tcp = TcpStream::connect(server).await?;
        tcp.set_nodelay(true)?;
        let mut encoder = rxml::writer::Encoder::new();
        encoder
            .ns_tracker_mut()
            .declare_fixed(Some(xml_ncname!("stream")), ns::STREAM.into());
        encoder
            .ns_tracker_mut()
            .declare_fixed(None, ns::COMPONENT.into());
        let mut conn = Connection {
            tcp,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            framer: Framer::default(),
            encoder,
            write_buf: BytesMut::with_capacity(READ_CHUNK),
        };
        conn.send_header(jid).await?;

        let stream_id = match conn.read().await? {
            Some(Event::Header(header)) => Tag::parse(&header)
                .and_then(|tag| tag.attr(b"id"))
                .and_then(decode)
                .map(Cow::into_owned)
                .ok_or_else(|| {
                    ConnectError::Protocol("the server's stream header has no id".into())
                })?,
            Some(Event::Stanza(frame)) => return Err(refusal(&frame)),
            Some(Event::End) | None => {
                return Err(ConnectError::Refused("the server closed the stream".into()))
            }
        };
        conn.queue(&Handshake::from_stream_id_and_password(stream_id, secret))?;
        conn.flush().await?;
        match conn.read().await? {
            Some(Event::Stanza(frame)) if stanza::root_name(&frame) == Some(b"handshake") => {
                Ok(conn)
            }
            Some(Event::Stanza(frame)) => Err(refusal(&frame)),
            Some(Event::Header(_)) => Err(ConnectError::Protocol("a second stream header".into())),
            Some(Event::End) | None => {
                Err(ConnectError::Refused("the server closed the stream".into()))
            }
        }
    }

    /// `<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' xmlns:stream=... to=JID>`
    async fn send_header(&mut self, jid: &BareJid) -> Result<(), std::io::Error> {
        let to = jid.to_string();
        let items = [
            rxml::Item::XmlDeclaration(rxml::XmlVersion::V1_0),
            rxml::Item::ElementHeadStart(Namespace::from(ns::STREAM), xml_ncname!("stream")),
            rxml::Item::Attribute(Namespace::NONE, xml_ncname!("to"), &to),
            rxml::Item::ElementHeadEnd,
        ];
        for item in items {
            self.encoder
                .encode(item, &mut self.write_buf)
                .map_err(encode_error)?;
        }
        self.flush().await
    }

    /// The next event from the server, reading as needed; `None` when the TCP connection closed.
    /// Cancel-safe: nothing read is lost if the future is dropped.
    pub async fn read(&mut self) -> Result<Option<Event>, LinkError> {
        loop {
            if let Some(event) = self.framer.next(&mut self.read_buf)? {
                return Ok(Some(event));
            }
            self.read_buf.reserve(READ_CHUNK);
            if self.tcp.read_buf(&mut self.read_buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// An event already read, without waiting for the socket.
    pub fn buffered(&mut self) -> Result<Option<Event>, LinkError> {
        Ok(self.framer.next(&mut self.read_buf)?)
    }

    /// Encode a stanza into the write buffer; it leaves at the next [`Connection::flush`].
    pub fn queue(&mut self, stanza: &impl AsXml) -> Result<(), std::io::Error> {
        for item in stanza.as_xml_iter().map_err(encode_error)? {
            let item = item.map_err(encode_error)?;
            self.encoder
                .encode(item.as_rxml_item(), &mut self.write_buf)
                .map_err(encode_error)?;
        }
        Ok(())
    }

    /// Write everything queued.
    pub async fn flush(&mut self) -> Result<(), std::io::Error> {
        if !self.write_buf.is_empty() {
            self.tcp.write_all_buf(&mut self.write_buf).await?;
        }
        Ok(())
    }

    /// Close the stream politely and the socket after it.
    pub async fn close(&mut self) -> Result<(), std::io::Error> {
        self.encoder
            .encode(rxml::Item::ElementFoot, &mut self.write_buf)
            .map_err(encode_error)?;
        self.flush().await?;
        self.tcp.shutdown().await
    }
}

/// What the server meant by answering the handshake with something else.
fn refusal(frame: &Frame) -> ConnectError {
    match stream_error(frame) {
        Some(e) if e.condition == DefinedCondition::Conflict => {
            ConnectError::Duplicate(e.to_string())
        }
        Some(e) => ConnectError::Refused(e.to_string()),
        None => ConnectError::Protocol(String::from_utf8_lossy(&frame.bytes).into_owned()),
    }
}

/// The stream error in a frame, if it is one.
pub fn stream_error(frame: &Frame) -> Option<StreamError> {
    let element = stanza::parse_element(frame).ok()?;
    StreamError::try_from(element).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(xml: &'static str) -> Frame {
        Frame {
            bytes: bytes::Bytes::from_static(xml.as_bytes()),
            depth: 2,
        }
    }

    #[test]
    fn a_conflict_is_a_duplicate_whatever_its_text_says() {
        // What Prosody 0.12's mod_component sends a second component with the right secret.
        let prosody = frame(
            "<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>Component already connected</text>\
             </stream:error>",
        );
        assert!(matches!(refusal(&prosody), ConnectError::Duplicate(_)));
        let reworded = frame(
            "<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams' xml:lang='de'>Komponente schon verbunden</text>\
             </stream:error>",
        );
        assert!(matches!(refusal(&reworded), ConnectError::Duplicate(_)));
    }

    #[test]
    fn other_stream_errors_stay_refusals() {
        let wrong_secret =
            frame("<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>");
        assert!(matches!(refusal(&wrong_secret), ConnectError::Refused(_)));
        // A text that merely mentions the word is no conflict.
        let text_only = frame(
            "<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>conflict: Component already connected</text>\
             </stream:error>",
        );
        assert!(matches!(refusal(&text_only), ConnectError::Refused(_)));
    }
}
