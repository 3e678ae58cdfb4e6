//! The XMPP-server side of an XEP-0114 component link, standing in for Prosody or ejabberd.
//!
//! [`ComponentServer`] listens on a local TCP port and accepts component connections the way a
//! real server does: it reads the component's `<stream:stream xmlns='jabber:component:accept'>`
//! header, answers with its own header carrying a fresh stream `id`, checks
//! `<handshake>hex(sha1(id + secret))</handshake>` and replies `<handshake/>`, or sends a
//! `<not-authorized/>` stream error and closes on a wrong secret.
//!
//! A connected [`ComponentConn`] parses the component's output with a streaming XML parser (so
//! stanzas may be coalesced in one TCP segment or split across many), answers the component's
//! XEP-0199 keepalive pings to the server by itself, and hands every other stanza to the test
//! through [`ComponentConn::recv`]. Writes go through one buffered writer task, so stanzas,
//! verbatim bytes and automatic ping answers interleave safely. For benchmarks a connection can
//! be [split](ComponentConn::split) into a pipelining [`ConnSender`] and a [`ConnReceiver`].
//!
//! With [`ComponentServer::set_refuse_duplicates`] it plays Prosody's rule of one connection per
//! component JID: while an accepted connection is open, a second component that gets the secret right
//! is refused with `<conflict/>` ("Component already connected"), as Prosody 0.12's `mod_component` does.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use minidom::{Element, Node};
use rxml::writer::{Encoder, Item, SimpleNamespaces, TrackNamespace};
use rxml::{AsyncReader, AttrMap, Event, Namespace, NcName, NcNameStr, Parser};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Default namespace of a component stream (XEP-0114).
pub const NS_COMPONENT: &str = "jabber:component:accept";
/// Default namespace of a client stream; stanzas built in it are re-homed to [`NS_COMPONENT`].
pub const NS_CLIENT: &str = "jabber:client";
/// Namespace of the `stream:` prefix.
pub const NS_STREAM: &str = "http://etherx.jabber.org/streams";
/// Namespace of stream error conditions.
pub const NS_STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// XEP-0199 namespace.
pub const NS_PING: &str = "urn:xmpp:ping";

const STREAM_FOOTER: &str = "</stream:stream>";
/// Bound on the queue of not yet written outgoing stanzas (back-pressure for pipelining senders).
const WRITE_QUEUE: usize = 4096;
/// How long [`ComponentConn::close`] waits for the component to finish its side of the stream.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Most stanzas handed from the reader task to the receiver in one go.
const MAX_BATCH: usize = 256;

/// Why [`ComponentServer::accept`] did not produce a connection.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The component's handshake digest did not match the secret; a `<not-authorized/>` stream
    /// error was sent and the connection closed.
    #[error("component sent a wrong handshake digest (bad secret)")]
    BadSecret,
    /// The stream header was addressed to another domain; a `<host-unknown/>` stream error was
    /// sent and the connection closed.
    #[error("component stream addressed to unknown host {0:?}")]
    HostUnknown(String),
    /// [`ComponentServer::accept_timeout`] ran out of time.
    #[error("no component connection completed in time")]
    Timeout,
    /// The component went away before the handshake completed.
    #[error("component closed the connection during the handshake")]
    Closed,
    /// Something other than a component stream header followed by `<handshake/>` arrived.
    #[error("protocol violation during the handshake: {0}")]
    Protocol(String),
    /// Socket error (includes XML that is not well-formed during the handshake).
    #[error("I/O error during the handshake: {0}")]
    Io(#[from] io::Error),
    /// With [`ComponentServer::set_refuse_duplicates`]: a connection for the component is already open,
    /// so this one was refused with a `<conflict/>` stream error, as Prosody refuses it.
    #[error("component already connected: refused with <conflict/>")]
    Duplicate,
}

/// How the component's side of a connection ended, see [`ComponentConn::end_reason`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The component sent `</stream:stream>`; the stand-in answered with its own footer and
    /// closed its side.
    StreamClosed,
    /// The TCP connection was closed without a stream footer.
    Eof,
    /// The component sent XML that is not well-formed; the stand-in answered with a
    /// `<not-well-formed/>` stream error and closed.
    NotWellFormed(String),
    /// Reading failed (e.g. connection reset).
    Io(String),
}

/// Listens for XEP-0114 component connections for one component JID.
pub struct ComponentServer {
    listener: TcpListener,
    addr: SocketAddr,
    component_jid: String,
    secret: String,
    server_domain: String,
    answer_pings: AtomicBool,
    /// Refuse a component while another connection is open (Prosody's default `kick_new`).
    refuse_duplicates: AtomicBool,
    /// Accepted connections whose component side is still open; each holds a [`Live`] guard.
    live: Arc<AtomicUsize>,
    /// Handshakes refused as duplicates so far.
    duplicates_refused: AtomicUsize,
}

impl ComponentServer {
    /// Listen on `127.0.0.1:0` for a component named `component_jid` (e.g. `push.localhost`)
    /// authenticating with `secret`.
    pub async fn bind(component_jid: &str, secret: &str) -> io::Result<ComponentServer> {
        Self::bind_on(SocketAddr::from(([127, 0, 0, 1], 0)), component_jid, secret).await
    }

    /// Listen on a given address, e.g. the [`addr`](Self::addr) of a dropped server to play a
    /// server restart on the same port (`SO_REUSEADDR` is set).
    pub async fn bind_on(
        addr: SocketAddr,
        component_jid: &str,
        secret: &str,
    ) -> io::Result<ComponentServer> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        let addr = listener.local_addr()?;
        let server_domain = match component_jid.split_once('.') {
            Some((_, parent)) if !parent.is_empty() => parent.to_owned(),
            _ => component_jid.to_owned(),
        };
        Ok(ComponentServer {
            listener,
            addr,
            component_jid: component_jid.to_owned(),
            secret: secret.to_owned(),
            server_domain,
            answer_pings: AtomicBool::new(true),
            refuse_duplicates: AtomicBool::new(false),
            live: Arc::new(AtomicUsize::new(0)),
            duplicates_refused: AtomicUsize::new(0),
        })
    }

    /// The address the server listens on (give `addr().to_string()` to knock's config).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The component JID this server expects in the stream header's `to`.
    pub fn component_jid(&self) -> &str {
        &self.component_jid
    }

    /// The server's own domain: the component JID's parent (`push.localhost` → `localhost`).
    /// Pongs to pings without a `to` come from this domain.
    pub fn server_domain(&self) -> &str {
        &self.server_domain
    }

    /// Override [`server_domain`](Self::server_domain).
    pub fn set_server_domain(&mut self, domain: &str) {
        self.server_domain = domain.to_owned();
    }

    /// Whether connections accepted from now on answer pings automatically (default true).
    /// Set this before `accept` to leave even the first ping after the handshake unanswered.
    pub fn set_answer_pings(&self, yes: bool) {
        self.answer_pings.store(yes, Ordering::Relaxed);
    }

    /// Refuse, like Prosody, a component that authenticates while an accepted connection is still
    /// open: `<stream:error><conflict/><text>Component already connected</text></stream:error>` right
    /// after its correct `<handshake>`, then close. Off by default (ejabberd accepts several).
    pub fn set_refuse_duplicates(&self, yes: bool) {
        self.refuse_duplicates.store(yes, Ordering::Relaxed);
    }

    /// How many handshakes were refused as duplicates so far.
    pub fn duplicates_refused(&self) -> usize {
        self.duplicates_refused.load(Ordering::Relaxed)
    }

    /// Accepted connections whose component side is still open (a connection counts until its
    /// component closes or goes away, or the test drops it).
    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Accept connections, refusing duplicates, until one completes its handshake; with a deadline
    /// for the whole. For a standby's takeover: it is refused while the active connection is open
    /// and gets through once that is gone.
    pub async fn accept_past_duplicates(&self, d: Duration) -> Result<ComponentConn, AcceptError> {
        let deadline = Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.accept()).await {
                Err(_) => return Err(AcceptError::Timeout),
                Ok(Err(AcceptError::Duplicate)) => continue,
                Ok(other) => return other,
            }
        }
    }

    /// Accept the next component connection and complete the handshake.
    ///
    /// On a wrong secret, sends `<stream:error><not-authorized/></stream:error></stream:stream>`,
    /// closes, and returns [`AcceptError::BadSecret`]. The listener stays usable, so call
    /// `accept` again for the component's next attempt.
    pub async fn accept(&self) -> Result<ComponentConn, AcceptError> {
        let (stream, _) = self.listener.accept().await?;
        self.handshake(stream).await
    }

    /// [`accept`](Self::accept) with a deadline covering both the TCP accept and the handshake.
    pub async fn accept_timeout(&self, d: Duration) -> Result<ComponentConn, AcceptError> {
        match tokio::time::timeout(d, self.accept()).await {
            Ok(r) => r,
            Err(_) => Err(AcceptError::Timeout),
        }
    }

    /// Accept a TCP connection and do nothing else with it, for tests of a server that hangs
    /// or talks nonsense (keep the stream alive as long as the server should seem alive).
    pub async fn accept_tcp(&self) -> io::Result<TcpStream> {
        Ok(self.listener.accept().await?.0)
    }

    async fn handshake(&self, stream: TcpStream) -> Result<ComponentConn, AcceptError> {
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut reader = XmlReader::new(r);
        let mut w = BufWriter::new(w);
        let stream_id = new_stream_id();

        let attrs = match reader.next().await {
            Ok(Frame::Header(attrs)) => attrs,
            Ok(Frame::Eof) => return Err(AcceptError::Closed),
            Ok(other) => {
                return Err(AcceptError::Protocol(format!(
                    "expected a stream header, got {}",
                    other.describe()
                )))
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    let _ = self
                        .refuse(
                            &mut w,
                            &mut reader,
                            &stream_id,
                            false,
                            "not-well-formed",
                            None,
                        )
                        .await;
                }
                return Err(e.into());
            }
        };
        let to = attrs
            .get(Namespace::none(), "to")
            .map(String::as_str)
            .unwrap_or("");
        if to != self.component_jid {
            let to = to.to_owned();
            let _ = self
                .refuse(&mut w, &mut reader, &stream_id, false, "host-unknown", None)
                .await;
            return Err(AcceptError::HostUnknown(to));
        }

        let header = stream_header(&self.component_jid, &stream_id);
        w.write_all(header.as_bytes()).await?;
        w.flush().await?;

        let handshake = match reader.next().await {
            Ok(Frame::Stanza(el)) => el,
            Ok(Frame::Eof) | Ok(Frame::Footer) => return Err(AcceptError::Closed),
            Ok(Frame::Header(_)) => {
                return Err(AcceptError::Protocol("second stream header".into()));
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    let _ = self
                        .refuse(
                            &mut w,
                            &mut reader,
                            &stream_id,
                            true,
                            "not-well-formed",
                            None,
                        )
                        .await;
                }
                return Err(e.into());
            }
        };
        if !handshake.is("handshake", NS_COMPONENT) {
            let _ = self
                .refuse(
                    &mut w,
                    &mut reader,
                    &stream_id,
                    true,
                    "not-authorized",
                    None,
                )
                .await;
            return Err(AcceptError::Protocol(format!(
                "expected <handshake xmlns='{NS_COMPONENT}'/>, got <{} xmlns='{}'>",
                handshake.name(),
                handshake.ns()
            )));
        }
        let expected = hex::encode(Sha1::digest(format!("{stream_id}{}", self.secret)));
        if !handshake.text().trim().eq_ignore_ascii_case(&expected) {
            let _ = self
                .refuse(
                    &mut w,
                    &mut reader,
                    &stream_id,
                    true,
                    "not-authorized",
                    None,
                )
                .await;
            return Err(AcceptError::BadSecret);
        }
        // Prosody checks the secret first and the duplicate after, so only a right secret meets this.
        if self.refuse_duplicates.load(Ordering::Relaxed) && self.live_connections() > 0 {
            self.duplicates_refused.fetch_add(1, Ordering::Relaxed);
            let text = Some("Component already connected");
            let _ = self
                .refuse(&mut w, &mut reader, &stream_id, true, "conflict", text)
                .await;
            return Err(AcceptError::Duplicate);
        }
        let live = Live::new(self.live.clone());
        w.write_all(b"<handshake/>").await?;
        w.flush().await?;

        let shared = Arc::new(Shared {
            component_jid: self.component_jid.clone(),
            server_domain: self.server_domain.clone(),
            answer_pings: AtomicBool::new(self.answer_pings.load(Ordering::Relaxed)),
            pings: AtomicUsize::new(0),
            footer_sent: AtomicBool::new(false),
            hung: AtomicBool::new(false),
            end: Mutex::new(None),
        });
        Ok(ComponentConn::start(reader, w, shared, live))
    }

    /// Send a stream error (with our header first if it was not sent yet), close our side and
    /// wait briefly for the component to go away, as a real server does.
    async fn refuse(
        &self,
        w: &mut BufWriter<OwnedWriteHalf>,
        reader: &mut XmlReader,
        stream_id: &str,
        header_sent: bool,
        condition: &str,
        text: Option<&str>,
    ) -> io::Result<()> {
        let mut out = String::new();
        if !header_sent {
            out.push_str(&stream_header(&self.component_jid, stream_id));
        }
        out.push_str(&stream_error_xml(condition, text));
        out.push_str(STREAM_FOOTER);
        w.write_all(out.as_bytes()).await?;
        w.flush().await?;
        w.shutdown().await?;
        // Drain until the peer closes so that closing our socket does not turn into a RST that
        // could destroy the stream error before the component reads it.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(f) = reader.next().await {
                if matches!(f, Frame::Eof) {
                    break;
                }
            }
        })
        .await;
        Ok(())
    }
}

/// One accepted, authenticated component connection.
///
/// Dropping it (or [`abort`](Self::abort)) drops the TCP connection without a stream footer.
pub struct ComponentConn {
    sender: ConnSender,
    receiver: ConnReceiver,
}

impl ComponentConn {
    fn start(
        reader: XmlReader,
        w: BufWriter<OwnedWriteHalf>,
        shared: Arc<Shared>,
        live: Live,
    ) -> Self {
        let (user_tx, user_rx) = mpsc::channel(WRITE_QUEUE);
        let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
        let (stanza_tx, stanza_rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(writer_task(w, user_rx, ctrl_rx));
        let reader = tokio::spawn(reader_task(
            reader,
            stanza_tx,
            ctrl_tx.clone(),
            shared.clone(),
            live,
        ));
        let tasks = Arc::new(Tasks { reader, writer });
        ComponentConn {
            sender: ConnSender {
                tx: user_tx,
                ctrl: ctrl_tx,
                encoder: StanzaEncoder::new(),
                shared: shared.clone(),
                _tasks: tasks.clone(),
            },
            receiver: ConnReceiver {
                rx: stanza_rx,
                pending: VecDeque::new(),
                shared,
                _tasks: tasks,
            },
        }
    }

    /// Send a stanza and wait until it has been written to the socket.
    ///
    /// It is serialized in the stream's `jabber:component:accept` default namespace (no
    /// `xmlns` on the top element, like Prosody); elements in `jabber:client` are re-homed.
    pub async fn send(&mut self, stanza: Element) -> io::Result<()> {
        self.sender.send(stanza).await?;
        self.sender.flush().await
    }

    /// Send `xml` verbatim (captured server output, malformed XML, several stanzas at once) and
    /// wait until it has been written to the socket.
    pub async fn send_raw(&mut self, xml: &str) -> io::Result<()> {
        self.sender.send_raw(xml).await?;
        self.sender.flush().await
    }

    /// Queue a stanza without waiting for the write (see [`flush`](Self::flush)).
    pub async fn feed(&mut self, stanza: Element) -> io::Result<()> {
        self.sender.send(stanza).await
    }

    /// Queue raw bytes without waiting for the write (see [`flush`](Self::flush)).
    pub async fn feed_raw(&mut self, xml: &str) -> io::Result<()> {
        self.sender.send_raw(xml).await
    }

    /// Wait until everything queued so far has been written to the socket.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.sender.flush().await
    }

    /// Next stanza from the component that is not an auto-answered server ping; `None` on
    /// timeout or once the component's stream has ended and everything was received.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Element> {
        self.receiver.recv(timeout).await
    }

    /// A stanza that has already arrived, without waiting.
    pub fn try_recv(&mut self) -> Option<Element> {
        self.receiver.try_recv()
    }

    /// Send an IQ (an `id` is added if missing) and wait for the component's `result` or
    /// `error` with the same id; other stanzas arriving meanwhile are kept for
    /// [`recv`](Self::recv).
    pub async fn request(&mut self, mut iq: Element, timeout: Duration) -> Option<Element> {
        let id = match iq.attr("id") {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => {
                let id = next_request_id();
                iq.set_attr(Namespace::NONE, NcName::try_from("id").ok()?, id.clone());
                id
            }
        };
        let deadline = Instant::now() + timeout;
        self.send(iq).await.ok()?;
        self.receiver.recv_reply_until(&id, deadline).await
    }

    /// Wait for a `result`/`error` IQ with this id (e.g. after [`feed`](Self::feed)), keeping
    /// other stanzas for [`recv`](Self::recv).
    pub async fn recv_reply(&mut self, id: &str, timeout: Duration) -> Option<Element> {
        self.receiver.recv_reply(id, timeout).await
    }

    /// Whether server pings from the component are answered automatically (default true; they
    /// are counted and kept away from [`recv`](Self::recv) either way).
    pub fn set_answer_pings(&mut self, yes: bool) {
        self.receiver.set_answer_pings(yes);
    }

    /// Number of server pings the component has sent on this connection.
    pub fn pings_received(&self) -> usize {
        self.receiver.pings_received()
    }

    /// Play a hung server: stop reading the socket for good (after the read under way), keeping the
    /// connection open, so the component's writes fill the socket buffers and then block. Writing
    /// still works until the component stops reading in turn.
    pub fn stop_reading(&self) {
        self.receiver.shared.hung.store(true, Ordering::SeqCst);
    }

    /// How the component's side ended, once it has (`None` while it is still open).
    pub fn end_reason(&self) -> Option<EndReason> {
        self.receiver.end_reason()
    }

    /// Wait up to `timeout` for the component's side to end, keeping stanzas that arrive
    /// meanwhile for [`recv`](Self::recv). `None` if it is still open.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Option<EndReason> {
        self.receiver.wait_closed(timeout).await
    }

    /// Close like a server shutting down: send `</stream:stream>`, close our sending side, give
    /// the component a moment to close its side, then drop the socket.
    pub async fn close(self) {
        self.close_with(None).await
    }

    /// Send `<stream:error><{condition}/>…</stream:error>` (e.g. `system-shutdown`, `conflict`),
    /// then close as [`close`](Self::close) does.
    pub async fn stream_error(self, condition: &str, text: Option<&str>) {
        let err = stream_error_xml(condition, text);
        self.close_with(Some(err)).await
    }

    async fn close_with(self, prefix: Option<String>) {
        let ComponentConn {
            sender,
            mut receiver,
        } = self;
        let mut out = prefix.unwrap_or_default();
        if !sender.shared.footer_sent.swap(true, Ordering::SeqCst) {
            out.push_str(STREAM_FOOTER);
        }
        // Bounded: the queue may be full and the component not reading.
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            let (done_tx, done_rx) = oneshot::channel();
            sender
                .tx
                .send(WriteCmd::Data(out.into_bytes()))
                .await
                .ok()?;
            sender
                .tx
                .send(WriteCmd::Shutdown(Some(done_tx)))
                .await
                .ok()?;
            done_rx.await.ok()
        })
        .await;
        let _ = receiver.wait_closed(CLOSE_GRACE).await;
    }

    /// Drop the TCP connection abruptly (FIN, no stream footer), like a crashed server.
    /// Data queued with `feed` but not flushed may be lost.
    pub fn abort(self) {
        drop(self);
    }

    /// Reset the TCP connection (RST via `SO_LINGER` 0), discarding anything unsent. If the
    /// writer is stuck on a full socket for 2 s, this degrades to [`abort`](Self::abort).
    pub async fn reset(self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.sender.ctrl.send(WriteCmd::Reset(done_tx)).is_ok() {
            let _ = tokio::time::timeout(CLOSE_GRACE, done_rx).await;
        }
        drop(self);
    }

    /// Split into a pipelining sender and a receiver. Pings stay auto-answered; the connection
    /// is dropped when both halves are.
    pub fn split(self) -> (ConnSender, ConnReceiver) {
        (self.sender, self.receiver)
    }

    /// Serialize a stanza exactly as [`send`](Self::send) would put it on the wire.
    pub fn serialize(&mut self, stanza: &Element) -> io::Result<Vec<u8>> {
        self.sender.serialize(stanza)
    }
}

/// Sending half of a [`ComponentConn`]: queues without waiting for each write, for pipelining.
/// Cloning gives another independent sender on the same connection.
pub struct ConnSender {
    tx: mpsc::Sender<WriteCmd>,
    ctrl: mpsc::UnboundedSender<WriteCmd>,
    encoder: StanzaEncoder,
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

impl Clone for ConnSender {
    fn clone(&self) -> Self {
        ConnSender {
            tx: self.tx.clone(),
            ctrl: self.ctrl.clone(),
            encoder: StanzaEncoder::new(),
            shared: self.shared.clone(),
            _tasks: self._tasks.clone(),
        }
    }
}

impl ConnSender {
    /// Serialize a stanza (see [`ComponentConn::send`]) and queue it. Waits only when the
    /// write queue is full; errors once the connection is gone.
    pub async fn send(&mut self, stanza: Element) -> io::Result<()> {
        let bytes = self.serialize(&stanza)?;
        self.send_bytes(bytes).await
    }

    /// Queue `xml` verbatim.
    pub async fn send_raw(&mut self, xml: &str) -> io::Result<()> {
        self.send_bytes(xml.as_bytes().to_vec()).await
    }

    /// Queue bytes verbatim, without copying.
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        self.tx
            .send(WriteCmd::Data(bytes))
            .await
            .map_err(|_| gone())
    }

    /// Wait until everything queued so far has been written to the socket.
    pub async fn flush(&mut self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(WriteCmd::Flush(tx))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Serialize a stanza exactly as [`send`](Self::send) would put it on the wire.
    pub fn serialize(&mut self, stanza: &Element) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(256);
        self.encoder.encode(stanza, &mut out)?;
        Ok(out)
    }
}

/// Receiving half of a [`ComponentConn`].
pub struct ConnReceiver {
    rx: mpsc::UnboundedReceiver<Vec<Element>>,
    pending: VecDeque<Element>,
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

impl ConnReceiver {
    /// Move the next batch from the reader task into `pending`; false on timeout or once the
    /// stream has ended.
    async fn fill(&mut self, deadline: Instant) -> bool {
        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
            Ok(Some(batch)) => {
                self.pending.extend(batch);
                true
            }
            _ => false,
        }
    }

    fn try_fill(&mut self) -> bool {
        match self.rx.try_recv() {
            Ok(batch) => {
                self.pending.extend(batch);
                true
            }
            Err(_) => false,
        }
    }

    /// See [`ComponentConn::recv`].
    pub async fn recv(&mut self, timeout: Duration) -> Option<Element> {
        let deadline = Instant::now() + timeout;
        while self.pending.is_empty() {
            if !self.fill(deadline).await {
                return None;
            }
        }
        self.pending.pop_front()
    }

    /// A stanza that has already arrived, without waiting.
    pub fn try_recv(&mut self) -> Option<Element> {
        while self.pending.is_empty() {
            if !self.try_fill() {
                return None;
            }
        }
        self.pending.pop_front()
    }

    /// Append up to `max` stanzas to `out`: those already arrived, or else the first ones to
    /// arrive within `timeout`. Returns how many were added (0 on timeout or end of stream).
    pub async fn recv_many(
        &mut self,
        out: &mut Vec<Element>,
        max: usize,
        timeout: Duration,
    ) -> usize {
        if self.pending.is_empty() {
            let deadline = Instant::now() + timeout;
            while self.pending.is_empty() {
                if !self.fill(deadline).await {
                    return 0;
                }
            }
        }
        while self.pending.len() < max && self.try_fill() {}
        let n = max.min(self.pending.len());
        out.extend(self.pending.drain(..n));
        n
    }

    /// See [`ComponentConn::recv_reply`].
    pub async fn recv_reply(&mut self, id: &str, timeout: Duration) -> Option<Element> {
        self.recv_reply_until(id, Instant::now() + timeout).await
    }

    async fn recv_reply_until(&mut self, id: &str, deadline: Instant) -> Option<Element> {
        let mut checked = 0;
        loop {
            if let Some(pos) = self
                .pending
                .iter()
                .skip(checked)
                .position(|el| is_reply_to(el, id))
            {
                return self.pending.remove(checked + pos);
            }
            checked = self.pending.len();
            if !self.fill(deadline).await {
                return None;
            }
        }
    }

    /// See [`ComponentConn::set_answer_pings`].
    pub fn set_answer_pings(&mut self, yes: bool) {
        self.shared.answer_pings.store(yes, Ordering::Relaxed);
    }

    /// See [`ComponentConn::pings_received`].
    pub fn pings_received(&self) -> usize {
        self.shared.pings.load(Ordering::Relaxed)
    }

    /// See [`ComponentConn::end_reason`].
    pub fn end_reason(&self) -> Option<EndReason> {
        self.shared
            .end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// See [`ComponentConn::wait_closed`].
    pub async fn wait_closed(&mut self, timeout: Duration) -> Option<EndReason> {
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(batch)) => self.pending.extend(batch),
                Ok(None) => return self.end_reason(),
                Err(_) => return None,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connection internals

struct Shared {
    component_jid: String,
    server_domain: String,
    answer_pings: AtomicBool,
    pings: AtomicUsize,
    footer_sent: AtomicBool,
    /// Set by [`ComponentConn::stop_reading`]: the reader task reads nothing more.
    hung: AtomicBool,
    end: Mutex<Option<EndReason>>,
}

/// One open component connection, counted in [`ComponentServer::live_connections`] while it lives.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(count: Arc<AtomicUsize>) -> Live {
        count.fetch_add(1, Ordering::SeqCst);
        Live(count)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Tasks {
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

enum WriteCmd {
    Data(Vec<u8>),
    Flush(oneshot::Sender<()>),
    /// Flush, then shut the sending side down and stop.
    Shutdown(Option<oneshot::Sender<()>>),
    /// Set `SO_LINGER` 0 and stop, so that the socket is reset when the reader goes too.
    Reset(oneshot::Sender<()>),
}

async fn writer_task(
    w: BufWriter<OwnedWriteHalf>,
    mut user: mpsc::Receiver<WriteCmd>,
    mut ctrl: mpsc::UnboundedReceiver<WriteCmd>,
) {
    let mut w = if w.buffer().is_empty() {
        BufWriter::with_capacity(64 * 1024, w.into_inner())
    } else {
        w
    };
    loop {
        let first = tokio::select! {
            biased;
            Some(cmd) = ctrl.recv() => cmd,
            Some(cmd) = user.recv() => cmd,
            else => break,
        };
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                WriteCmd::Data(bytes) => {
                    if w.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                WriteCmd::Flush(done) => {
                    if w.flush().await.is_err() {
                        return;
                    }
                    let _ = done.send(());
                }
                WriteCmd::Shutdown(done) => {
                    let _ = w.flush().await;
                    let _ = w.shutdown().await;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                WriteCmd::Reset(done) => {
                    let half = w.into_inner();
                    let _ = half.as_ref().set_zero_linger();
                    // No FIN now: the socket is closed (with RST) when the read half goes.
                    half.forget();
                    let _ = done.send(());
                    return;
                }
            }
            next = match ctrl.try_recv() {
                Ok(cmd) => Some(cmd),
                Err(_) => user.try_recv().ok(),
            };
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.flush().await;
}

async fn reader_task(
    mut reader: XmlReader,
    stanzas: mpsc::UnboundedSender<Vec<Element>>,
    ctrl: mpsc::UnboundedSender<WriteCmd>,
    shared: Arc<Shared>,
    // Dropped when the component's side ends or the task is aborted (the test dropped the connection):
    // either way the component is no longer connected, which is what Prosody's duplicate rule asks.
    _live: Live,
) {
    // Stanzas already in the read buffer are handed over in one batch, so a burst costs one
    // wake-up of the receiving task instead of one per stanza.
    let mut batch: Vec<Element> = Vec::new();
    let end = loop {
        if shared.hung.load(Ordering::SeqCst) {
            if !batch.is_empty() {
                let _ = stanzas.send(std::mem::take(&mut batch));
            }
            // The socket stays open and unread until the connection is dropped.
            std::future::pending::<()>().await;
        }
        let frame = if batch.is_empty() {
            reader.next().await
        } else if batch.len() >= MAX_BATCH {
            let _ = stanzas.send(std::mem::take(&mut batch));
            continue;
        } else {
            // `XmlReader::next` is cancel-safe: its state lives in `reader`.
            match reader.next().now_or_never() {
                Some(frame) => frame,
                None => {
                    let _ = stanzas.send(std::mem::take(&mut batch));
                    continue;
                }
            }
        };
        match frame {
            Ok(Frame::Stanza(el)) => {
                if is_server_ping(&el, &shared.component_jid) {
                    shared.pings.fetch_add(1, Ordering::Relaxed);
                    if shared.answer_pings.load(Ordering::Relaxed) {
                        let _ = ctrl.send(WriteCmd::Data(pong_for(&el, &shared.server_domain)));
                    }
                } else {
                    batch.push(el);
                }
            }
            Ok(Frame::Footer) => {
                if !shared.footer_sent.swap(true, Ordering::SeqCst) {
                    let _ = ctrl.send(WriteCmd::Data(STREAM_FOOTER.as_bytes().to_vec()));
                }
                let _ = ctrl.send(WriteCmd::Shutdown(None));
                break EndReason::StreamClosed;
            }
            Ok(Frame::Eof) => {
                let _ = ctrl.send(WriteCmd::Shutdown(None));
                break EndReason::Eof;
            }
            Ok(Frame::Header(_)) => {
                // Unreachable: the reader reports a header only at depth 0.
                break EndReason::Io("second stream header".into());
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let mut out = stream_error_xml("not-well-formed", None);
                if !shared.footer_sent.swap(true, Ordering::SeqCst) {
                    out.push_str(STREAM_FOOTER);
                }
                let _ = ctrl.send(WriteCmd::Data(out.into_bytes()));
                let _ = ctrl.send(WriteCmd::Shutdown(None));
                break EndReason::NotWellFormed(e.to_string());
            }
            Err(e) => break EndReason::Io(e.to_string()),
        }
    };
    if !batch.is_empty() {
        let _ = stanzas.send(batch);
    }
    *shared.end.lock().unwrap_or_else(|e| e.into_inner()) = Some(end);
    // `stanzas` is dropped here, after the end reason is visible.
}

/// A server ping: `<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>` addressed to a domain
/// other than the component itself (or to nobody), as opposed to pings to user JIDs.
fn is_server_ping(el: &Element, component_jid: &str) -> bool {
    el.is("iq", NS_COMPONENT)
        && el.attr("type") == Some("get")
        && el.get_child("ping", NS_PING).is_some()
        && match el.attr("to") {
            None => true,
            Some(to) => !to.contains('@') && !to.contains('/') && to != component_jid,
        }
}

fn pong_for(ping: &Element, server_domain: &str) -> Vec<u8> {
    let mut s = String::with_capacity(128);
    s.push_str("<iq type='result'");
    if let Some(id) = ping.attr("id") {
        s.push_str(" id='");
        s.push_str(&escape(id));
        s.push('\'');
    }
    s.push_str(" from='");
    s.push_str(&escape(ping.attr("to").unwrap_or(server_domain)));
    s.push('\'');
    if let Some(to) = ping.attr("from") {
        s.push_str(" to='");
        s.push_str(&escape(to));
        s.push('\'');
    }
    s.push_str("/>");
    s.into_bytes()
}

fn is_reply_to(el: &Element, id: &str) -> bool {
    el.name() == "iq"
        && el.attr("id") == Some(id)
        && matches!(el.attr("type"), Some("result") | Some("error"))
}

/// The server's stream header, as Prosody writes it.
fn stream_header(from: &str, id: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns:stream='{NS_STREAM}' \
         xmlns='{NS_COMPONENT}' from='{}' id='{}'>",
        escape(from),
        escape(id)
    )
}

fn stream_error_xml(condition: &str, text: Option<&str>) -> String {
    let mut s = format!("<stream:error><{condition} xmlns='{NS_STREAM_ERRORS}'/>");
    if let Some(text) = text {
        s.push_str(&format!(
            "<text xmlns='{NS_STREAM_ERRORS}'>{}</text>",
            escape(text)
        ));
    }
    s.push_str("</stream:error>");
    s
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "component connection is closed")
}

fn new_stream_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let digest = Sha1::digest(format!("{t}:{n}:{}", std::process::id()));
    hex::encode(&digest[..8])
}

fn next_request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("srv-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Escape for an attribute value in single or double quotes, or for text.
fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(['&', '<', '>', '\'', '"']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

// ---------------------------------------------------------------------------------------------
// Streaming XML → minidom

enum Frame {
    /// The `<stream:stream>` header's attributes.
    Header(AttrMap),
    /// A complete top-level element.
    Stanza(Element),
    /// `</stream:stream>`.
    Footer,
    /// End of the TCP stream.
    Eof,
}

impl Frame {
    fn describe(&self) -> String {
        match self {
            Frame::Header(_) => "a stream header".into(),
            Frame::Stanza(el) => format!("<{} xmlns='{}'>", el.name(), el.ns()),
            Frame::Footer => "</stream:stream>".into(),
            Frame::Eof => "end of stream".into(),
        }
    }
}

/// Incremental parser: rxml events (fed from whatever TCP segments arrive) folded into
/// minidom elements, one per top-level child of `<stream:stream>`.
struct XmlReader {
    inner: AsyncReader<BufReader<OwnedReadHalf>>,
    stack: Vec<Element>,
    in_stream: bool,
}

impl XmlReader {
    fn new(r: OwnedReadHalf) -> Self {
        XmlReader {
            inner: AsyncReader::wrap(BufReader::with_capacity(64 * 1024, r), Parser::default()),
            stack: Vec::new(),
            in_stream: false,
        }
    }

    async fn next(&mut self) -> io::Result<Frame> {
        loop {
            let Some(ev) = self.inner.read().await? else {
                return Ok(Frame::Eof);
            };
            match ev {
                Event::XmlDeclaration(..) => {}
                Event::StartElement(_, (ns, name), attrs) => {
                    if !self.in_stream {
                        if ns != NS_STREAM || name.as_str() != "stream" {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("expected <stream:stream>, got <{name} xmlns='{ns}'>"),
                            ));
                        }
                        self.in_stream = true;
                        return Ok(Frame::Header(attrs));
                    }
                    let mut el = Element::builder(name.as_str(), ns.as_str()).build();
                    *el.attrs_mut() = attrs;
                    self.stack.push(el);
                }
                Event::EndElement(_) => match self.stack.pop() {
                    Some(el) => match self.stack.last_mut() {
                        Some(parent) => {
                            parent.append_child(el);
                        }
                        None => return Ok(Frame::Stanza(el)),
                    },
                    None => return Ok(Frame::Footer),
                },
                Event::Text(_, text) => {
                    // Text directly inside <stream:stream> is whitespace keepalive; drop it.
                    if let Some(top) = self.stack.last_mut() {
                        top.append_text(text);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// minidom → bytes, in the stream's default namespace

/// Encoder primed with the stream header's namespace declarations, so that stanzas come out
/// without a redundant `xmlns='jabber:component:accept'`, as a real server writes them.
struct StanzaEncoder {
    enc: Encoder<SimpleNamespaces>,
}

impl StanzaEncoder {
    fn new() -> Self {
        let mut enc = Encoder::new();
        let mut scratch = Vec::new();
        let primed = (|| -> Result<(), rxml::Error> {
            let stream = NcNameStr::from_str("stream")?;
            enc.ns_tracker_mut()
                .declare_fixed(Some(stream), Namespace::from(NS_STREAM.to_owned()));
            enc.ns_tracker_mut()
                .declare_fixed(None, Namespace::from(NS_COMPONENT.to_owned()));
            enc.encode(
                Item::ElementHeadStart(Namespace::from_str(NS_STREAM), stream),
                &mut scratch,
            )?;
            enc.encode(Item::ElementHeadEnd, &mut scratch)
        })();
        debug_assert!(primed.is_ok(), "priming the stanza encoder failed");
        StanzaEncoder { enc }
    }

    fn encode(&mut self, el: &Element, out: &mut Vec<u8>) -> io::Result<()> {
        let start = out.len();
        match encode_element(&mut self.enc, el, out) {
            Ok(()) => Ok(()),
            Err(e) => {
                // The encoder is mid-element now; start over with a fresh one.
                out.truncate(start);
                *self = StanzaEncoder::new();
                Err(io::Error::new(io::ErrorKind::InvalidInput, e))
            }
        }
    }
}

fn encode_element(
    enc: &mut Encoder<SimpleNamespaces>,
    el: &Element,
    out: &mut Vec<u8>,
) -> Result<(), rxml::Error> {
    let ns = if el.has_ns(NS_COMPONENT) || el.has_ns(NS_CLIENT) {
        Namespace::from_str(NS_COMPONENT)
    } else {
        Namespace::from(el.ns())
    };
    let name = NcNameStr::from_str(el.name())?;
    enc.encode(Item::ElementHeadStart(ns, name), out)?;
    for ((ans, aname), value) in el.attrs().iter() {
        enc.encode(Item::Attribute(ans.borrow(), aname, value), out)?;
    }
    let mut nodes = el.nodes().peekable();
    if nodes.peek().is_some() {
        enc.encode(Item::ElementHeadEnd, out)?;
        for node in nodes {
            match node {
                Node::Element(child) => encode_element(enc, child, out)?,
                Node::Text(text) => enc.encode(Item::Text(text), out)?,
            }
        }
    }
    enc.encode(Item::ElementFoot, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures::StreamExt;
    use tokio::io::AsyncReadExt;
    use tokio_xmpp::connect::{DnsConfig, TcpServerConnector};
    use tokio_xmpp::xmlstream::Timeouts;
    use tokio_xmpp::{Component, Stanza};
    use xmpp_parsers::iq::Iq;
    use xmpp_parsers::jid::Jid;

    const JID: &str = "push.localhost";
    const SECRET: &str = "s3cr3t";
    const T: Duration = Duration::from_secs(5);

    async fn connect(
        server: &ComponentServer,
        secret: &str,
    ) -> Result<Component<TcpServerConnector>, tokio_xmpp::Error> {
        Component::new_plaintext(
            JID,
            secret,
            DnsConfig::addr(&server.addr().to_string()),
            Timeouts::tight(),
        )
        .await
    }

    async fn pair() -> (
        ComponentServer,
        Component<TcpServerConnector>,
        ComponentConn,
    ) {
        let server = ComponentServer::bind(JID, SECRET).await.unwrap();
        let (client, conn) = tokio::join!(connect(&server, SECRET), server.accept_timeout(T));
        (server, client.unwrap(), conn.unwrap())
    }

    fn parse(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    async fn next_stanza(c: &mut Component<TcpServerConnector>) -> Option<Stanza> {
        tokio::time::timeout(T, c.next()).await.ok().flatten()
    }

    #[tokio::test]
    async fn handshake_ok() {
        let (server, client, conn) = pair().await;
        assert_eq!(client.jid.to_string(), JID);
        assert_eq!(server.server_domain(), "localhost");
        assert_eq!(conn.pings_received(), 0);
        assert_eq!(conn.end_reason(), None);
    }

    #[tokio::test]
    async fn wrong_secret_is_refused() {
        let server = ComponentServer::bind(JID, SECRET).await.unwrap();
        let (client, conn) = tokio::join!(connect(&server, "wrong"), server.accept_timeout(T));
        assert!(client.is_err(), "component must fail to log in");
        assert!(
            matches!(conn, Err(AcceptError::BadSecret)),
            "{:?}",
            conn.err()
        );
        // The listener stays usable for the next attempt.
        let (client, conn) = tokio::join!(connect(&server, SECRET), server.accept_timeout(T));
        assert!(client.is_ok() && conn.is_ok());
    }

    #[tokio::test]
    async fn unknown_host_is_refused() {
        let server = ComponentServer::bind("other.localhost", SECRET)
            .await
            .unwrap();
        let (client, conn) = tokio::join!(connect(&server, SECRET), server.accept_timeout(T));
        assert!(client.is_err());
        assert!(matches!(conn, Err(AcceptError::HostUnknown(h)) if h == JID));
    }

    #[tokio::test]
    async fn request_gets_reply_and_buffers_other_stanzas() {
        let (_server, mut client, mut conn) = pair().await;
        let echo = tokio::spawn(async move {
            while let Some(stanza) = next_stanza(&mut client).await {
                if let Stanza::Iq(Iq::Get { from, to, id, .. }) = stanza {
                    // Something unrelated first, then the answer.
                    let note = parse(
                        "<message xmlns='jabber:component:accept' from='push.localhost' \
                         to='u@localhost' id='note'><body>hi</body></message>",
                    );
                    client
                        .send_stanza(Stanza::try_from(note).unwrap())
                        .await
                        .unwrap();
                    let reply = Iq::Result {
                        from: to,
                        to: from,
                        id,
                        payload: None,
                    };
                    client.send_stanza(reply.into()).await.unwrap();
                }
            }
        });
        let iq = parse(
            "<iq xmlns='jabber:client' type='get' from='localhost' to='push.localhost'>\
             <query xmlns='jabber:iq:version'/></iq>",
        );
        let reply = conn.request(iq, T).await.expect("reply");
        assert!(reply.is("iq", NS_COMPONENT));
        assert_eq!(reply.attr("type"), Some("result"));
        assert_eq!(reply.attr("to"), Some("localhost"));
        let note = conn.recv(T).await.expect("buffered message");
        assert!(note.is("message", NS_COMPONENT));
        assert_eq!(note.attr("id"), Some("note"));
        assert_eq!(
            note.get_child("body", NS_COMPONENT).map(|b| b.text()),
            Some("hi".to_owned())
        );
        conn.close().await;
        echo.await.unwrap();
    }

    #[tokio::test]
    async fn pings_are_answered_not_passed_on() {
        let (_server, mut client, mut conn) = pair().await;
        let ping = parse(
            "<iq xmlns='jabber:component:accept' type='get' id='p1' from='push.localhost' \
             to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
        );
        client
            .send_stanza(Stanza::try_from(ping.clone()).unwrap())
            .await
            .unwrap();
        match next_stanza(&mut client).await {
            Some(Stanza::Iq(Iq::Result { id, from, to, .. })) => {
                assert_eq!(id, "p1");
                assert_eq!(from, Some(Jid::new("localhost").unwrap()));
                assert_eq!(to, Some(Jid::new("push.localhost").unwrap()));
            }
            other => panic!("expected a pong, got {other:?}"),
        }
        assert_eq!(conn.recv(Duration::from_millis(200)).await, None);
        assert_eq!(conn.pings_received(), 1);

        // Unanswered when told so, but still counted and hidden.
        conn.set_answer_pings(false);
        client
            .send_stanza(Stanza::try_from(ping).unwrap())
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_millis(300), client.next()).await;
        assert!(got.is_err(), "no pong expected, got {got:?}");
        assert_eq!(conn.recv(Duration::from_millis(100)).await, None);
        assert_eq!(conn.pings_received(), 2);

        // A ping to a user is an ordinary stanza.
        let user_ping = parse(
            "<iq xmlns='jabber:component:accept' type='get' id='p3' from='push.localhost' \
             to='u@localhost/r'><ping xmlns='urn:xmpp:ping'/></iq>",
        );
        client
            .send_stanza(Stanza::try_from(user_ping).unwrap())
            .await
            .unwrap();
        let got = conn.recv(T).await.expect("user ping");
        assert_eq!(got.attr("id"), Some("p3"));
        assert_eq!(conn.pings_received(), 2);
    }

    #[tokio::test]
    async fn two_stanzas_in_one_send_raw() {
        let (_server, mut client, mut conn) = pair().await;
        conn.send_raw(
            "<message from='a@localhost' to='push.localhost' id='m1'><body>1</body></message>\
             <message from='a@localhost' to='push.localhost' id='m2'><body>2</body></message>",
        )
        .await
        .unwrap();
        for want in ["m1", "m2"] {
            match next_stanza(&mut client).await {
                Some(Stanza::Message(m)) => {
                    assert_eq!(m.id.map(|i| i.0), Some(want.to_owned()))
                }
                other => panic!("expected message {want}, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn client_namespace_is_normalised() {
        let (_server, mut client, mut conn) = pair().await;
        let msg = parse(
            "<message xmlns='jabber:client' from='a@localhost' to='push.localhost' id='c1'>\
             <body>x &amp; y</body><x xmlns='urn:example' a='&apos;'/></message>",
        );
        let wire = String::from_utf8(conn.serialize(&msg).unwrap()).unwrap();
        assert!(!wire.contains("jabber:client"), "{wire}");
        assert!(wire.starts_with("<message "), "{wire}");
        assert!(wire.contains("<body>x &amp; y</body>"), "{wire}");
        assert!(wire.contains("xmlns='urn:example'"), "{wire}");
        conn.send(msg).await.unwrap();
        match next_stanza(&mut client).await {
            Some(Stanza::Message(m)) => {
                assert_eq!(m.id.map(|i| i.0), Some("c1".to_owned()));
                assert_eq!(m.bodies.values().next().map(String::as_str), Some("x & y"));
            }
            other => panic!("expected message, got {other:?}"),
        }
    }

    /// A hand-rolled component that dribbles its output one byte at a time and coalesces
    /// several stanzas, to exercise the streaming parser.
    #[tokio::test]
    async fn split_and_coalesced_input() {
        let server = ComponentServer::bind(JID, SECRET).await.unwrap();
        let addr = server.addr();
        let raw = tokio::spawn(async move {
            let mut s = raw_login(addr).await;
            let out = "<iq type='get' id='k1' to='localhost' from='push.localhost'>\
                       <ping xmlns='urn:xmpp:ping'/></iq> \n\
                       <message from='x@push.localhost' to='y@localhost'>\
                       <body>hi &amp; bye</body></message>";
            for b in out.as_bytes().chunks(1) {
                s.write_all(b).await.unwrap();
                s.flush().await.unwrap();
            }
            let pong = read_until(&mut s, "/>").await;
            s.write_all(b"</stream:stream>").await.unwrap();
            let rest = read_until(&mut s, "</stream:stream>").await;
            (pong, rest)
        });
        let mut conn = server.accept_timeout(T).await.unwrap();
        let msg = conn.recv(T).await.expect("message");
        assert!(msg.is("message", NS_COMPONENT));
        assert_eq!(
            msg.get_child("body", NS_COMPONENT).map(|b| b.text()),
            Some("hi & bye".to_owned())
        );
        let (pong, rest) = raw.await.unwrap();
        assert_eq!(
            pong,
            "<iq type='result' id='k1' from='localhost' to='push.localhost'/>"
        );
        assert_eq!(rest, "</stream:stream>");
        assert_eq!(conn.wait_closed(T).await, Some(EndReason::StreamClosed));
        assert_eq!(conn.pings_received(), 1);
        assert_eq!(conn.recv(Duration::from_millis(50)).await, None);
    }

    /// Log in as a component by hand, with the header as tokio-xmpp leaves it out (no XML
    /// declaration, no version).
    async fn raw_login(addr: SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"<stream:stream xmlns='jabber:component:accept' \
              xmlns:stream='http://etherx.jabber.org/streams' to='push.localhost'>",
        )
        .await
        .unwrap();
        let header = read_until(&mut s, "'>").await;
        let id = header
            .split("id='")
            .nth(1)
            .and_then(|r| r.split('\'').next())
            .unwrap()
            .to_owned();
        let digest = hex::encode(Sha1::digest(format!("{id}{SECRET}")));
        s.write_all(format!("<handshake>{digest}</handshake>").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_until(&mut s, "<handshake/>").await, "<handshake/>");
        s
    }

    /// Log in as a component by hand and return all the server says after the handshake, to EOF.
    async fn raw_refused_login(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"<stream:stream xmlns='jabber:component:accept' \
              xmlns:stream='http://etherx.jabber.org/streams' to='push.localhost'>",
        )
        .await
        .unwrap();
        let header = read_until(&mut s, "'>").await;
        let id = header
            .split("id='")
            .nth(1)
            .unwrap()
            .split('\'')
            .next()
            .unwrap();
        let digest = hex::encode(Sha1::digest(format!("{id}{SECRET}")));
        s.write_all(format!("<handshake>{digest}</handshake>").as_bytes())
            .await
            .unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8(rest).unwrap()
    }

    #[tokio::test]
    async fn a_second_component_is_refused_with_conflict_until_the_first_goes() {
        let server = ComponentServer::bind(JID, SECRET).await.unwrap();
        server.set_refuse_duplicates(true);
        let (first, conn) = tokio::join!(raw_login(server.addr()), server.accept_timeout(T));
        let mut conn = conn.unwrap();
        assert_eq!(server.live_connections(), 1);

        let (said, refused) =
            tokio::join!(raw_refused_login(server.addr()), server.accept_timeout(T));
        assert!(
            matches!(refused, Err(AcceptError::Duplicate)),
            "{:?}",
            refused.err()
        );
        assert_eq!(
            said,
            "<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>Component already connected</text>\
             </stream:error></stream:stream>"
        );
        assert_eq!(server.duplicates_refused(), 1);

        // The first component goes away (a crash: no footer); the next one gets in.
        drop(first);
        assert!(conn.wait_closed(T).await.is_some(), "the crash is seen");
        assert_eq!(
            server.live_connections(),
            0,
            "gone, though the test still holds it"
        );
        let (_second, conn) =
            tokio::join!(raw_login(server.addr()), server.accept_past_duplicates(T));
        conn.unwrap();
        assert_eq!(server.live_connections(), 1);
    }

    #[tokio::test]
    async fn abort_and_reset_drop_the_connection() {
        let server = ComponentServer::bind(JID, SECRET).await.unwrap();
        let (mut s, conn) = tokio::join!(raw_login(server.addr()), server.accept_timeout(T));
        conn.unwrap().abort();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(T, s.read_to_end(&mut buf))
            .await
            .unwrap();
        assert_eq!(n.unwrap(), 0, "no footer on abort: {buf:?}");

        let (mut s, conn) = tokio::join!(raw_login(server.addr()), server.accept_timeout(T));
        let mut conn = conn.unwrap();
        conn.send_raw("<message id='before-reset'/>").await.unwrap();
        assert_eq!(
            read_until(&mut s, "/>").await,
            "<message id='before-reset'/>"
        );
        conn.reset().await;
        let r = tokio::time::timeout(T, s.read_to_end(&mut buf))
            .await
            .unwrap();
        assert_eq!(
            r.map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::ConnectionReset)
        );
    }

    async fn read_until(s: &mut TcpStream, end: &str) -> String {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(end.as_bytes()) {
            let n = tokio::time::timeout(T, s.read(&mut byte))
                .await
                .unwrap()
                .unwrap();
            assert!(n == 1, "EOF after {:?}", String::from_utf8_lossy(&buf));
            buf.push(byte[0]);
        }
        String::from_utf8(buf).unwrap()
    }

    #[tokio::test]
    async fn close_ends_component_stream_and_component_close_is_seen() {
        let (_server, mut client, conn) = pair().await;
        conn.close().await;
        assert!(next_stanza(&mut client).await.is_none());

        let (_server, mut client, mut conn) = pair().await;
        client.send_end().await.unwrap();
        assert_eq!(conn.wait_closed(T).await, Some(EndReason::StreamClosed));
        assert_eq!(conn.recv(Duration::from_millis(10)).await, None);
    }

    #[tokio::test]
    async fn stream_error_reaches_component() {
        let (_server, mut client, conn) = pair().await;
        conn.stream_error("system-shutdown", Some("bye")).await;
        assert!(next_stanza(&mut client).await.is_none());
    }

    #[tokio::test]
    async fn restart_on_same_port() {
        let (server, _client, conn) = pair().await;
        let addr = server.addr();
        conn.abort();
        drop(server);
        let server = ComponentServer::bind_on(addr, JID, SECRET).await.unwrap();
        assert_eq!(server.addr(), addr);
        let (client, conn) = tokio::join!(connect(&server, SECRET), server.accept_timeout(T));
        assert!(client.is_ok() && conn.is_ok());
    }

    #[tokio::test]
    async fn split_pipelines_many_iqs() {
        const N: usize = 2000;
        let (_server, client, conn) = pair().await;
        let (mut sink, mut stream) = client.split();
        let echo = tokio::spawn(async move {
            use futures::SinkExt;
            while let Some(stanza) = stream.next().await {
                if let Stanza::Iq(Iq::Set { from, to, id, .. }) = stanza {
                    let reply = Iq::Result {
                        from: to,
                        to: from,
                        id,
                        payload: None,
                    };
                    if sink.send(Stanza::from(reply)).await.is_err() {
                        break;
                    }
                }
            }
        });
        let (mut tx, mut rx) = conn.split();
        let sender = tokio::spawn(async move {
            for i in 0..N {
                let xml = format!(
                    "<iq type='set' id='b{i}' from='localhost' to='push.localhost'>\
                     <enable xmlns='urn:example'/></iq>"
                );
                tx.send_raw(&xml).await.unwrap();
            }
            tx.flush().await.unwrap();
            tx
        });
        let mut got = Vec::with_capacity(N);
        while got.len() < N {
            let want = N - got.len();
            let n = rx.recv_many(&mut got, want, T).await;
            assert!(n > 0, "only {} replies", got.len());
        }
        assert!(got.iter().all(|el| el.attr("type") == Some("result")));
        assert_eq!(got[N - 1].attr("id"), Some(format!("b{}", N - 1).as_str()));
        drop(sender.await.unwrap());
        drop(rx);
        let _ = tokio::time::timeout(T, echo).await;
    }

    #[tokio::test]
    async fn malformed_xml_from_component_gets_stream_error() {
        let server = ComponentServer::bind(JID, SECRET).await.unwrap();
        let addr = server.addr();
        let raw = tokio::spawn(async move {
            let mut s = raw_login(addr).await;
            s.write_all(b"<message><body></message>").await.unwrap();
            read_until(&mut s, "</stream:stream>").await
        });
        let mut conn = server.accept_timeout(T).await.unwrap();
        let tail = raw.await.unwrap();
        assert!(tail.contains("<not-well-formed"), "{tail}");
        assert!(matches!(
            conn.wait_closed(T).await,
            Some(EndReason::NotWellFormed(_))
        ));
    }
}
