//! Hostile input on the stanza path (issue 5, "Bad input"): property tests with proptest.
//!
//! What is generated:
//! - the stanzas knock meets (Prosody's and ejabberd's verbatim publishes, XEP-0050 registration and
//!   unregistration, the `<enable/>`/`<disable/>` shorthand, disco, ping, version, IQ results and errors,
//!   messages, presences), each mutated 0 to 4 times: random byte flips, deletions, truncation, copies of
//!   one tag elsewhere (duplicate fields and attributes), huge attribute values, deep nesting, wrong
//!   namespaces, missing `id`/`from`/`to`/`type`, namespace prefixes, CDATA, comments, character
//!   references in place of plain characters, and inserted nasty bytes (NUL, control characters, invalid
//!   UTF-8, U+FFFE, unknown entities, `]]>`, stray quotes and brackets);
//! - random IQs from scratch: random types, ids and senders around random element trees (names,
//!   namespaces, attributes and text drawn from what knock understands and from junk);
//! - arbitrary bytes, and streams of the above, in arbitrary read sizes, for the framer.
//!
//! What must hold:
//! - nothing panics;
//! - every stanza is framed as the link frames it ([`Framer`], after a stream header) and routed as the link
//!   routes it ([`knock::stanza::kind`], then [`router::handle_frame`]); then every IQ get/set that XML
//!   (minidom) reads with an `id` and a valid `from` gets exactly one reply, a well-formed
//!   `<iq type='result'|'error'>` with the same `id`, addressed to the sender, an error carrying an
//!   RFC 6120 defined condition; IQ results and errors, messages and presences get none; anything else gets
//!   nothing or an error; a push goes out only for a request answered `result`;
//! - the framer never panics on arbitrary bytes, yields the same events whatever the read sizes, never
//!   holds more than [`MAX_STANZA`] bytes waiting, and refuses a stanza larger than that (a 10 MB
//!   attribute) however it arrives;
//! - the fast publish reader ([`FastPublish::read`], with its per-thread shapes learnt from earlier reads)
//!   is never more lenient than the full parse ([`knock::stanza::parse_iq`]): whatever it accepts, the
//!   full path parses as the same publish (node, secret, id, from, to). Each case first reads a valid
//!   publish, so that later mutants meet a learnt shape, in the framer and in the reader.
//!
//! Each property runs 256 cases by default (the whole file takes well under a minute in a debug build on
//! two cores). For a longer run: `PROPTEST_CASES=20000 cargo test --release --test hostile`.
//! Failures are not persisted to files; a failure prints the shrunk input, which then becomes a plain
//! regression test at the end of this file.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::BytesMut;
use knock::app::App;
use knock::handlers::publish::PublishRequest;
use knock::router::{self, Request};
use knock::stanza::frame::{Event, Frame, FrameError, Framer, MAX_STANZA};
use knock::stanza::{self, FastPublish, Kind};
use minidom::Element;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{TestCaseError, TestRunner};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::jid::Jid;

mod common;
use common::*;

/// What opens every test stream, as a server sends it.
const HEADER: &str = "<stream:stream xmlns='jabber:component:accept' \
    xmlns:stream='http://etherx.jabber.org/streams' id='s1' from='push.localhost'>";
/// A request that follows each generated stanza, so that a truncated stanza runs on into it.
const TAIL: &str =
    "<iq type='get' id='tail' from='localhost' to='push.localhost'><ping xmlns='urn:xmpp:ping'/></iq>";
const STANZAS_NS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Run a property and fail the test with the shrunk input.
fn check<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: fmt::Debug,
{
    let mut runner = TestRunner::new(config());
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

/// Bytes that print as text.
#[derive(Clone)]
struct Text(Vec<u8>);

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() > 4000 {
            let head = String::from_utf8_lossy(&self.0[..2000]);
            let tail = String::from_utf8_lossy(&self.0[self.0.len() - 2000..]);
            write!(f, "{head:?} ...{} bytes... {tail:?}", self.0.len() - 4000)
        } else {
            write!(f, "{:?}", String::from_utf8_lossy(&self.0))
        }
    }
}

// --- the world the stanzas meet ---

/// knock's state with one registration, on a runtime to drive the async handlers.
struct World {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    app: App,
    backend: Arc<Counting>,
    node: String,
    secret: String,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let (app, backend) = counting_app(dir.path());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let register = register_xml("r1", "alice@localhost/p", "dev1", TOKEN, "");
        let reply = rt
            .block_on(router::handle_frame(&app, raw_frame(register.as_bytes())))
            .expect("registration answered");
        let (node, secret) = node_and_secret(&Element::from(reply));
        World {
            _dir: dir,
            rt,
            app,
            backend,
            node,
            secret,
        }
    }

    /// What the link does with one frame: route it by kind, answer requests.
    fn respond(&self, frame: Frame) -> Option<Iq> {
        match stanza::kind(&frame) {
            Kind::Request => self.rt.block_on(router::handle_frame(&self.app, frame)),
            _ => None,
        }
    }
}

/// A frame of one complete stanza of nesting depth 1..; only for stanzas known to be shallow.
fn raw_frame(bytes: &[u8]) -> Frame {
    let (frames, _) = frame_stream(bytes, &[bytes.len() + HEADER.len()]);
    frames.into_iter().next().expect("one frame")
}

/// Frame `HEADER + body` as the link would, reading it in pieces of the given sizes (cycled): the stanzas,
/// and the error that ended the stream, if any.
fn frame_stream(body: &[u8], pieces: &[usize]) -> (Vec<Frame>, Option<FrameError>) {
    let mut input = HEADER.as_bytes().to_vec();
    input.extend_from_slice(body);
    let mut frames = Vec::new();
    match events(&input, pieces, |event| {
        if let Event::Stanza(frame) = event {
            frames.push(frame);
        }
    }) {
        Ok(()) => (frames, None),
        Err(e) => (frames, Some(e)),
    }
}

/// Feed `input` to a fresh framer in pieces of the given sizes (cycled), calling `each` per event, and
/// check on the way that the framer never holds more than [`MAX_STANZA`] bytes waiting and never yields
/// more events than there are bytes.
fn events(input: &[u8], pieces: &[usize], mut each: impl FnMut(Event)) -> Result<(), FrameError> {
    let mut framer = Framer::default();
    let mut buf = BytesMut::new();
    let mut at = 0;
    let mut count = 0;
    for &piece in pieces.iter().cycle() {
        if at >= input.len() {
            break;
        }
        // Pieces of at least 1/256 of the input: a tag scan restarts at the tag on every read, so tiny
        // pieces of a huge tag would cost the test quadratic time (the link reads 64 KiB at a time).
        let end = (at + piece.max(input.len() / 256).max(1)).min(input.len());
        buf.extend_from_slice(&input[at..end]);
        at = end;
        while let Some(event) = framer.next(&mut buf)? {
            count += 1;
            assert!(count <= input.len(), "more events than bytes");
            each(event);
        }
        assert!(
            buf.len() <= MAX_STANZA,
            "{} bytes held for an incomplete stanza",
            buf.len()
        );
    }
    Ok(())
}

// --- stanzas ---

fn enable_xml(node: &str, secret: &str) -> String {
    format!("<iq xmlns='jabber:component:accept' type='set' id='e' from='alice@localhost/p' to='push.localhost'><enable xmlns='urn:xmpp:push:0' jid='push.localhost' node='{node}'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>{secret}</value></field><field var='token'><value>{TOKEN}</value></field></x></enable></iq>")
}

/// Valid stanzas of every kind knock meets; the publishes name the world's registration.
fn templates(node: &str, secret: &str) -> Vec<String> {
    let iq = |attrs: &str, payload: &str| {
        format!("<iq xmlns='jabber:component:accept' {attrs} to='push.localhost'>{payload}</iq>")
    };
    vec![
        prosody_publish("p1", "localhost", node, secret),
        ejabberd_publish("p2", "localhost", node, secret),
        prosody_publish("p3", "localhost", "nosuchnode", secret),
        register_xml("r1", "alice@localhost/p", "dev1", TOKEN, ""),
        register_xml("r2", "bob@localhost/p", "dev9", TOKEN2, "<field var='app'><value>chat</value></field>"),
        unregister_xml("u1", "carol@localhost/p", "dev1"),
        iq("type='set' id='c1' from='alice@localhost/p'", "<command xmlns='http://jabber.org/protocol/commands' node='register-push-apns' action='execute'/>"),
        enable_xml("clientchosennode0123456789", "clientchosensecret0123456789"),
        iq("type='set' id='d1' from='alice@localhost/p'", "<disable xmlns='urn:xmpp:push:0' jid='push.localhost' node='clientchosennode0123456789'/>"),
        iq("type='get' id='i1' from='alice@localhost/p'", "<query xmlns='http://jabber.org/protocol/disco#info'/>"),
        iq("type='get' id='i2' from='alice@localhost/p'", "<query xmlns='http://jabber.org/protocol/disco#items' node='http://jabber.org/protocol/commands'/>"),
        iq("type='get' id='g1' from='localhost'", "<ping xmlns='urn:xmpp:ping'/>"),
        iq("type='get' id='v1' from='alice@localhost/p'", "<query xmlns='jabber:iq:version'/>"),
        iq("type='result' id='knock-ping-1' from='localhost'", ""),
        iq("type='error' id='knock-ping-2' from='localhost'", "<error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"),
        "<message xmlns='jabber:component:accept' from='alice@localhost/p' to='push.localhost' id='m1'><body>hi &amp; bye</body></message>".into(),
        "<presence from='alice@localhost/p' to='push.localhost'/>".into(),
    ]
}

/// Bytes no stanza should carry, or should carry only with care.
const NASTY: &[&[u8]] = &[
    b"\0",
    b"\x01",
    b"\x1b",
    b"\x7f",
    b"\xff",
    b"\xc3(",
    b"\xed\xa0\x80",
    "\u{FFFE}".as_bytes(),
    "\u{FFFF}".as_bytes(),
    "é".as_bytes(),
    "😀".as_bytes(),
    b"&amp;",
    b"&lt;",
    b"&#0;",
    b"&#x1F;",
    b"&#xD800;",
    b"&#1114112;",
    b"&#65;",
    b"&bogus;",
    b"&nbsp;",
    b"&",
    b"&#",
    b"<",
    b">",
    b"'",
    b"\"",
    b"/",
    b"=",
    b"]]>",
    b"<![CDATA[x]]>",
    b"<![CDATA[</iq>]]>",
    b"<!-- c -->",
    b"<?pi x?>",
    b"<!DOCTYPE x [<!ENTITY e 'x'>]>",
    b"<a>",
    b"</a>",
    b"<a/>",
    b"<p:a xmlns:p='urn:p'/>",
    b"<q:a/>",
    b" xmlns='urn:other'",
    b" xmlns:p='urn:p'",
    b" a='1' a='2'",
    b" xml:lang='en'",
    b"\r\n",
    b"\t",
    b" ",
    b"</iq>",
    b"<iq>",
    b"</stream:stream>",
    b"<stream:error/>",
];

/// Whole-string edits: wrong namespaces, missing addressing, prefixes, duplicates, CDATA, comments.
const EDITS: &[(&str, &str)] = &[
    (
        "'http://jabber.org/protocol/pubsub'",
        "'http://jabber.org/protocol/pubsub#owner'",
    ),
    ("'jabber:x:data'", "'jabber:x:dat'"),
    ("'urn:xmpp:push:0'", "'urn:xmpp:push:1'"),
    (
        "'http://jabber.org/protocol/commands'",
        "'jabber:iq:commands'",
    ),
    ("'jabber:component:accept'", "'jabber:client'"),
    ("'urn:xmpp:ping'", "'urn:xmpp:pong'"),
    (
        "'http://jabber.org/protocol/disco#info'",
        "'http://jabber.org/protocol/disco#items'",
    ),
    ("type='set'", "type='get'"),
    ("type='get'", "type='set'"),
    ("type='set'", "type='result'"),
    ("type='get'", "type='error'"),
    ("type='set'", "type='SET'"),
    ("type='set'", "type='s&#101;t'"),
    ("type='get'", "type='&#x67;et'"),
    ("type='submit'", "type='form'"),
    ("type='submit'", "type='cancel'"),
    (" type='set'", ""),
    ("<iq ", "<iq xml:lang='en' "),
    ("<iq ", "<iq id='dup' "),
    ("<iq ", "<iq from='x@y' "),
    ("<iq ", "<iq xmlns:c='jabber:component:accept' "),
    ("<pubsub xmlns=", "<pubsub xmlns:p='urn:p' xmlns="),
    ("<command xmlns=", "<c:command xmlns:c="),
    ("<pubsub xmlns=", "<ps:pubsub xmlns:ps="),
    ("<x xmlns=", "<d:x xmlns:d="),
    ("<x type='submit' xmlns=", "<d:x type='submit' xmlns:d="),
    (
        "<field var='secret'>",
        "<field var='secret'><value>x</value></field><field var='secret'>",
    ),
    (
        "<field var='token'>",
        "<field var='token'><value>00</value></field><field var='token'>",
    ),
    (
        "<field var='device-id'>",
        "<field var='device-id'><value>a</value><value>b</value></field><field var='device-id'>",
    ),
    ("<value>", "<value>a</value><value>"),
    ("<value>", "<value><![CDATA["),
    ("</value>", "]]></value>"),
    ("<value>", "<value><!-- c -->"),
    ("New Message!", "<![CDATA[New <b> & Message]]>"),
    ("New message", "New\u{0}message"),
    ("node='", "node='x' node='"),
    ("<item>", "<item id='i1'>"),
    ("<item>", "<item><a/>"),
    ("</item>", "<item/></item>"),
    (
        "</publish>",
        "</publish><publish node='x'><item/></publish>",
    ),
    ("</pubsub>", "</pubsub><x xmlns='urn:x'/>"),
    (
        "</notification>",
        "</notification><notification xmlns='urn:xmpp:push:0'/>",
    ),
    ("<publish-options>", "<publish-options node='n'>"),
    ("'", "\""),
    ("></iq>", "/>"),
    ("<iq ", "<message "),
    ("<iq ", "<presence "),
];

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte with a non-zero mask.
    Flip(Index, u8),
    /// Delete up to 8 bytes.
    Delete(Index, usize),
    /// Insert one of [`NASTY`].
    Insert(Index, Index),
    /// Cut the stanza short.
    Truncate(Index),
    /// Copy the tag found at the first index to the second.
    CopyTag(Index, Index),
    /// Replace the attribute value found at or after the index with `n` copies of a character.
    Huge(Index, usize, char),
    /// Wrap the stanza's content in `n` levels of elements.
    Nest(usize),
    /// Apply one of [`EDITS`] (first occurrence).
    Edit(Index),
    /// Remove an attribute by name.
    DropAttr(Index),
    /// Write the ASCII letter at or after the index as a character reference.
    CharRef(Index, bool),
}

const ATTRS: &[&str] = &["id", "from", "to", "type", "xmlns", "node", "var", "action"];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 1..=255u8).prop_map(|(i, m)| Mutation::Flip(i, m)),
        2 => (any::<Index>(), 1..8usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, n)| Mutation::Insert(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::CopyTag(a, b)),
        1 => (
            any::<Index>(),
            prop_oneof![1000..5000usize, 8180..8200usize, 60_000..70_000usize, Just(MAX_STANZA)],
            prop_oneof![Just('a'), Just('é'), Just(' '), Just('&')]
        )
            .prop_map(|(i, n, c)| Mutation::Huge(i, n, c)),
        1 => prop_oneof![1..8usize, 30..40usize, 100..300usize].prop_map(Mutation::Nest),
        4 => any::<Index>().prop_map(Mutation::Edit),
        2 => any::<Index>().prop_map(Mutation::DropAttr),
        2 => (any::<Index>(), any::<bool>()).prop_map(|(i, hex)| Mutation::CharRef(i, hex)),
    ]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn replace_first(bytes: &mut Vec<u8>, from: &[u8], to: &[u8]) {
    if let Some(at) = find(bytes, from) {
        bytes.splice(at..at + from.len(), to.iter().copied());
    }
}

impl Mutation {
    fn apply(&self, s: &mut Vec<u8>) {
        let len = s.len();
        if len == 0 {
            return;
        }
        match self {
            Mutation::Flip(i, mask) => s[i.index(len)] ^= mask,
            Mutation::Delete(i, n) => {
                let at = i.index(len);
                s.drain(at..(at + n).min(len));
            }
            Mutation::Insert(i, n) => {
                let at = i.index(len + 1);
                let nasty = NASTY[n.index(NASTY.len())];
                s.splice(at..at, nasty.iter().copied());
            }
            Mutation::Truncate(i) => s.truncate(i.index(len)),
            Mutation::CopyTag(from, to) => {
                let start = from.index(len);
                let Some(lt) = s[..=start].iter().rposition(|&b| b == b'<') else {
                    return;
                };
                let Some(gt) = s[lt..].iter().position(|&b| b == b'>') else {
                    return;
                };
                let tag = s[lt..=lt + gt].to_vec();
                let at = to.index(len + 1);
                s.splice(at..at, tag);
            }
            Mutation::Huge(i, n, c) => {
                let start = i.index(len);
                let Some(q) = s[start..].iter().position(|&b| b == b'\'') else {
                    return;
                };
                let open = start + q + 1;
                let Some(close) = s[open..].iter().position(|&b| b == b'\'') else {
                    return;
                };
                let value = c.to_string().repeat(*n);
                s.splice(open..open + close, value.into_bytes());
            }
            Mutation::Nest(n) => {
                let Some(gt) = s.iter().position(|&b| b == b'>') else {
                    return;
                };
                let Some(last) = s.iter().rposition(|&b| b == b'<') else {
                    return;
                };
                if last <= gt {
                    return;
                }
                let close = "</a>".repeat(*n);
                s.splice(last..last, close.into_bytes());
                let open = "<a>".repeat(*n);
                s.splice(gt + 1..gt + 1, open.into_bytes());
            }
            Mutation::Edit(i) => {
                let (from, to) = EDITS[i.index(EDITS.len())];
                if from == "'" {
                    // Every quote, so the stanza stays well-formed.
                    *s = String::from_utf8_lossy(s).replace('\'', "\"").into_bytes();
                } else {
                    replace_first(s, from.as_bytes(), to.as_bytes());
                    if from.starts_with("<pubsub") && to.contains("<ps:") {
                        replace_first(s, b"</pubsub>", b"</ps:pubsub>");
                    }
                    if to.starts_with("<c:command") {
                        replace_first(s, b"</command>", b"</c:command>");
                        replace_first(s, b"<command", b"<c:command");
                    }
                    if to.starts_with("<d:x") {
                        replace_first(s, b"</x>", b"</d:x>");
                    }
                }
            }
            Mutation::DropAttr(i) => {
                let name = ATTRS[i.index(ATTRS.len())];
                let pattern = format!(" {name}='");
                if let Some(at) = find(s, pattern.as_bytes()) {
                    let open = at + pattern.len();
                    if let Some(close) = s[open..].iter().position(|&b| b == b'\'') {
                        s.drain(at..=open + close);
                    }
                }
            }
            Mutation::CharRef(i, hex) => {
                let start = i.index(len);
                let Some(at) = s[start..].iter().position(u8::is_ascii_alphanumeric) else {
                    return;
                };
                let at = start + at;
                let c = s[at];
                let reference = if *hex {
                    format!("&#x{c:X};")
                } else {
                    format!("&#{c};")
                };
                s.splice(at..=at, reference.into_bytes());
            }
        }
    }
}

/// One template, mutated 0 to 4 times.
fn mutated(templates: Vec<String>) -> impl Strategy<Value = Text> {
    (any::<Index>(), prop::collection::vec(mutation(), 0..=4)).prop_map(
        move |(which, mutations)| {
            let mut bytes = templates[which.index(templates.len())].clone().into_bytes();
            for m in &mutations {
                m.apply(&mut bytes);
            }
            Text(bytes)
        },
    )
}

/// Attribute values: plain, escaped junk, raw junk, or large.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9@/._-]{0,16}",
        2 => "[^'<&]{0,12}",
        1 => ".{0,8}",
        1 => prop_oneof![Just("&amp;"), Just("&#x41;"), Just("&bogus;"), Just("a\tb"), Just("a\nb"), Just("a\r\nb")]
            .prop_map(String::from),
        1 => (100..3000usize).prop_map(|n| "v".repeat(n)),
    ]
}

const NAMES: &[&str] = &[
    "query",
    "command",
    "pubsub",
    "publish",
    "publish-options",
    "item",
    "x",
    "field",
    "value",
    "enable",
    "disable",
    "ping",
    "notification",
    "error",
    "iq",
    "a",
    "p:a",
    "bad-request",
];
const NAMESPACES: &[&str] = &[
    "http://jabber.org/protocol/disco#info",
    "http://jabber.org/protocol/disco#items",
    "http://jabber.org/protocol/commands",
    "http://jabber.org/protocol/pubsub",
    "jabber:x:data",
    "urn:xmpp:push:0",
    "urn:xmpp:ping",
    "jabber:component:accept",
    "urn:ietf:params:xml:ns:xmpp-stanzas",
    "",
    "urn:junk",
];
const ATTR_NAMES: &[&str] = &[
    "node",
    "var",
    "type",
    "action",
    "sessionid",
    "jid",
    "id",
    "label",
    "xml:lang",
    "p:q",
    "xmlns:p",
];

/// A random element tree, as text.
fn tree() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just(String::new()),
        "[^<&]{0,12}",
        ".{0,6}",
        Just("<![CDATA[<x/>&]]>".to_string()),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        (
            any::<Index>(),
            prop::option::of(any::<Index>()),
            prop::collection::vec((any::<Index>(), value()), 0..4),
            prop::collection::vec(inner, 0..5),
            any::<bool>(),
        )
            .prop_map(|(name, ns, attrs, children, empty)| {
                let name = NAMES[name.index(NAMES.len())];
                let mut s = format!("<{name}");
                if let Some(ns) = ns {
                    s += &format!(" xmlns='{}'", NAMESPACES[ns.index(NAMESPACES.len())]);
                }
                for (attr, value) in attrs {
                    s += &format!(" {}='{value}'", ATTR_NAMES[attr.index(ATTR_NAMES.len())]);
                }
                if empty && children.is_empty() {
                    s += "/>";
                } else {
                    s += ">";
                    s += &children.concat();
                    s += &format!("</{name}>");
                }
                s
            })
    })
}

/// A random IQ around a random tree.
fn random_iq() -> impl Strategy<Value = Text> {
    let opt = |values: &'static [&'static str]| {
        prop::option::of(prop::sample::select(values)).prop_map(|v| v.map(String::from))
    };
    (
        opt(&["get", "set", "result", "error", "bogus", ""]),
        prop::option::of(value()),
        prop_oneof![
            3 => opt(&["localhost", "alice@localhost/p", "a@b", "push.localhost"]),
            1 => prop::option::of(value()),
        ],
        opt(&["push.localhost", "other.example", "@bad"]),
        prop::collection::vec(tree(), 0..3),
    )
        .prop_map(|(kind, id, from, to, payload)| {
            let mut s = "<iq".to_string();
            for (name, value) in [("type", kind), ("id", id), ("from", from), ("to", to)] {
                if let Some(value) = value {
                    s += &format!(" {name}='{value}'");
                }
            }
            s += ">";
            s += &payload.concat();
            s += "</iq>";
            Text(s.into_bytes())
        })
}

// --- what a reply must be ---

/// What XML says a stanza asks of knock.
#[derive(Debug)]
enum Expect {
    /// An IQ get or set with an id and a valid sender: exactly one reply.
    Answer { id: String, from: Jid },
    /// An IQ result or error, a message, a presence: no reply.
    Silence,
    /// Anything else (not well-formed, no id, no sender, an unknown type): nothing or an error.
    ErrorIfAny,
}

fn expect(frame: &Frame) -> Expect {
    let prefixes = BTreeMap::from([
        (None, "jabber:component:accept".to_owned()),
        (
            Some("stream".to_owned()),
            "http://etherx.jabber.org/streams".to_owned(),
        ),
    ]);
    // Line ends first, as XML has every processor do (minidom does not).
    let bytes = knock::stanza::xml::normalize_line_ends(&frame.bytes);
    let Ok(element) = Element::from_reader_with_prefixes(&bytes[..], prefixes) else {
        return Expect::ErrorIfAny;
    };
    if element.ns() != "jabber:component:accept" {
        return Expect::ErrorIfAny;
    }
    match (element.name(), element.attr("type")) {
        ("iq", Some("get" | "set")) => {
            match (
                element.attr("id"),
                element.attr("from").map(str::parse::<Jid>),
            ) {
                (Some(id), Some(Ok(from))) => Expect::Answer {
                    id: id.to_owned(),
                    from,
                },
                _ => Expect::ErrorIfAny,
            }
        }
        ("iq", Some("result" | "error")) | ("message" | "presence", _) => Expect::Silence,
        _ => Expect::ErrorIfAny,
    }
}

const CONDITIONS: &[&str] = &[
    "bad-request",
    "conflict",
    "feature-not-implemented",
    "forbidden",
    "gone",
    "internal-server-error",
    "item-not-found",
    "jid-malformed",
    "not-acceptable",
    "not-allowed",
    "not-authorized",
    "policy-violation",
    "recipient-unavailable",
    "redirect",
    "registration-required",
    "remote-server-not-found",
    "remote-server-timeout",
    "resource-constraint",
    "service-unavailable",
    "subscription-required",
    "undefined-condition",
    "unexpected-request",
];

/// Serialise a reply and read it back: it must be a well-formed IQ result or error, an error with a
/// defined condition. Returns it.
fn well_formed(reply: Iq) -> Result<Element, TestCaseError> {
    let original = Element::from(reply);
    let text = String::from(&original);
    let back: Element = match text.parse() {
        Ok(back) => back,
        // Well-formed, but over minidom's own limit on one value (8 KiB): an implementation limit, not an
        // XML error. Seen for requests whose id sits right at that limit; the reply is still one IQ.
        Err(minidom::Error::XmlError(rxml::Error::RestrictedXml(_))) if text.len() > 8192 => {
            return Ok(original);
        }
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "reply is not XML ({e}): {text}"
            )))
        }
    };
    prop_assert_eq!(back.name(), "iq", "{}", text);
    match back.attr("type") {
        Some("result") => {}
        Some("error") => {
            let error = back
                .get_child("error", NS)
                .ok_or_else(|| TestCaseError::fail(format!("no <error/>: {text}")))?;
            prop_assert!(
                matches!(
                    error.attr("type"),
                    Some("auth" | "cancel" | "continue" | "modify" | "wait")
                ),
                "error type: {}",
                text
            );
            let conditions = error
                .children()
                .filter(|c| c.ns() == STANZAS_NS && c.name() != "text")
                .collect::<Vec<_>>();
            prop_assert!(
                conditions.len() == 1 && CONDITIONS.contains(&conditions[0].name()),
                "one defined condition: {}",
                text
            );
        }
        _ => prop_assert!(false, "reply type: {}", text),
    }
    Ok(back)
}

/// Frame `stanza` (followed by [`TAIL`]) as the link does and check every frame's reply.
fn check_replies(world: &World, stanza: &[u8], pieces: &[usize]) -> Result<(), TestCaseError> {
    let mut body = stanza.to_vec();
    body.extend_from_slice(TAIL.as_bytes());
    let (frames, _) = frame_stream(&body, pieces);
    for frame in frames {
        let expected = expect(&frame);
        let pushes = world.backend.woken();
        let reply = world.respond(frame.clone());
        let pushed = world.backend.woken() > pushes;
        let shown = Text(frame.bytes.to_vec());
        match (expected, reply) {
            (Expect::Answer { id, from }, Some(reply)) => {
                let reply = well_formed(reply)?;
                prop_assert_eq!(reply.attr("id"), Some(id.as_str()), "{:?}", shown);
                let to = reply.attr("to").map(str::parse::<Jid>);
                prop_assert!(
                    matches!(&to, Some(Ok(to)) if *to == from),
                    "reply to {:?}, not {}: {:?}",
                    to,
                    from,
                    shown
                );
                prop_assert!(
                    !pushed || reply.attr("type") == Some("result"),
                    "pushed, answered error: {:?}",
                    shown
                );
            }
            (Expect::Answer { .. }, None) => {
                prop_assert!(false, "request left unanswered: {:?}", shown)
            }
            (Expect::Silence, Some(reply)) => {
                prop_assert!(false, "answered {:?}: {:?}", Element::from(reply), shown)
            }
            (Expect::Silence, None) | (Expect::ErrorIfAny, None) => {}
            (Expect::ErrorIfAny, Some(reply)) => {
                let reply = well_formed(reply)?;
                prop_assert_eq!(reply.attr("type"), Some("error"), "{:?}", shown);
            }
        }
        if pushed {
            prop_assert!(
                matches!(stanza::parse_iq(&frame), Ok(Iq::Set { .. })),
                "pushed for a stanza the full parser refuses: {:?}",
                shown
            );
        }
    }
    Ok(())
}

fn pieces() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![usize::MAX / 2]),
        Just(vec![64 * 1024]),
        prop::collection::vec(1..200usize, 1..6),
    ]
}

// --- the properties ---

#[test]
fn mutated_stanzas_get_one_well_formed_reply_or_none_as_xmpp_says() {
    let world = World::new();
    let templates = templates(&world.node, &world.secret);
    check((mutated(templates), pieces()), |(stanza, pieces)| {
        check_replies(&world, &stanza.0, &pieces)
    });
    assert!(
        world.backend.woken() > 0,
        "some valid publishes got through"
    );
}

#[test]
fn random_iqs_get_one_well_formed_reply_or_none_as_xmpp_says() {
    let world = World::new();
    check(random_iq(), |stanza| {
        check_replies(&world, &stanza.0, &[usize::MAX / 2])
    });
}

/// Arbitrary bytes, and bytes built from the tokens the framer's states turn on.
fn stream_bytes() -> impl Strategy<Value = Text> {
    const TOKENS: &[&str] = &[
        "<",
        ">",
        "/",
        "'",
        "\"",
        "=",
        "?",
        "!",
        "<![CDATA[",
        "]]>",
        "]]",
        "<?",
        "?>",
        "<!--",
        "-->",
        "<iq>",
        "</iq>",
        "<iq type='get' id='x' from='localhost'>",
        "<a/>",
        "<a b='>'>",
        "</a>",
        " ",
        "\n",
        "text",
        "&amp;",
        "<stream:stream>",
        "</stream:stream>",
        HEADER,
        TAIL,
    ];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048).prop_map(Text),
        prop::collection::vec(prop::sample::select(TOKENS), 0..64)
            .prop_map(|t| Text(t.concat().into_bytes())),
    ]
}

#[test]
fn the_framer_survives_arbitrary_bytes_in_arbitrary_pieces() {
    check(
        (
            stream_bytes(),
            any::<bool>(),
            prop::collection::vec(1..64usize, 1..8),
        ),
        |(bytes, with_header, pieces)| {
            let mut input = if with_header {
                HEADER.as_bytes().to_vec()
            } else {
                Vec::new()
            };
            input.extend_from_slice(&bytes.0);
            let mut seen = Vec::new();
            let _ = events(&input, &pieces, |e| seen.push(format!("{e:?}")));
            Ok(())
        },
    );
}

/// An event as comparable text.
fn show(event: Event) -> String {
    match event {
        Event::Header(h) => format!("H {:?}", Text(h.to_vec())),
        Event::Stanza(f) => format!("S{} {:?}", f.depth, Text(f.bytes.to_vec())),
        Event::End => "END".into(),
    }
}

#[test]
fn the_framer_yields_the_same_whatever_the_read_sizes() {
    let world_templates = templates("node0123456789abcdefgh", "secret0123456789abcdefgh");
    // A learnt shape, so that publishes are also cut out by compare.
    let learnt = raw_frame(prosody_publish("a1", "localhost", "n1", "s1").as_bytes());
    assert!(FastPublish::read(&learnt).is_some());
    let stanzas = prop::collection::vec(
        prop_oneof![3 => mutated(world_templates), 1 => stream_bytes()],
        1..6,
    );
    check(
        (stanzas, prop::collection::vec(1..300usize, 1..8)),
        |(stanzas, pieces)| {
            let mut input = HEADER.as_bytes().to_vec();
            for s in &stanzas {
                input.extend_from_slice(&s.0);
            }
            if input.len() >= MAX_STANZA {
                return Ok(());
            }
            let mut whole = Vec::new();
            let whole_end = events(&input, &[input.len()], |e| whole.push(show(e)));
            let mut split = Vec::new();
            let split_end = events(&input, &pieces, |e| split.push(show(e)));
            prop_assert_eq!(&whole, &split);
            prop_assert_eq!(whole_end, split_end);
            Ok(())
        },
    );
}

#[test]
fn a_stanza_larger_than_max_stanza_is_refused_however_it_arrives() {
    let huge = "a".repeat(10 * 1024 * 1024);
    let ten_mb_attribute =
        format!("<iq type='get' id='{huge}' from='localhost'><ping xmlns='urn:xmpp:ping'/></iq>");
    let just_over = format!(
        "<iq type='get' id='{}' from='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
        "a".repeat(MAX_STANZA)
    );
    for stanza in [&ten_mb_attribute, &just_over] {
        for piece in [1024, 64 * 1024, usize::MAX / 2] {
            let (frames, error) = frame_stream(stanza.as_bytes(), &[piece]);
            assert!(
                frames.is_empty(),
                "{} bytes in pieces of {piece}: framed",
                stanza.len()
            );
            assert_eq!(error, Some(FrameError::TooBig), "pieces of {piece}");
        }
    }
    // A publish of a learnt shape, whose parts are only compared, is bounded too.
    let learnt = raw_frame(prosody_publish("a1", "localhost", "n1", "s1").as_bytes());
    assert!(FastPublish::read(&learnt).is_some());
    let publish = prosody_publish(&huge, "localhost", "n1", "s1");
    for piece in [64 * 1024, usize::MAX / 2] {
        let (frames, error) = frame_stream(publish.as_bytes(), &[piece]);
        assert!(frames.is_empty(), "pieces of {piece}: framed");
        assert_eq!(error, Some(FrameError::TooBig), "pieces of {piece}");
    }
    // And right at the limit a stanza still passes.
    let at_limit = {
        let empty = "<iq type='get' id='' from='localhost'><ping xmlns='urn:xmpp:ping'/></iq>";
        empty.replace(
            "id=''",
            &format!("id='{}'", "a".repeat(MAX_STANZA - empty.len())),
        )
    };
    assert_eq!(at_limit.len(), MAX_STANZA);
    let (frames, error) = frame_stream(at_limit.as_bytes(), &[usize::MAX / 2]);
    assert_eq!((frames.len(), error), (1, None));
}

/// A publish whose parts are plain, so that its shape is learnt.
fn plain_publish() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        "[a-zA-Z0-9-]{1,12}",
        "[a-zA-Z0-9_-]{1,24}",
        "[a-zA-Z0-9+/=]{0,32}",
        (any::<bool>(), any::<bool>(), any::<bool>()),
    )
        .prop_map(|(prosody, id, node, secret, (quiet, priority, module))| {
            let mut xml = if prosody {
                prosody_publish(&id, "localhost", &node, &secret)
            } else {
                ejabberd_publish(&id, "localhost", &node, &secret)
            };
            // What delivery reads: an empty body (unimportant), Tigase's priority tag, Monal's push module.
            if quiet {
                xml = xml.replace(">New Message!<", "><").replace(">New message<", "><");
            }
            if priority {
                xml = xml.replace(
                    "</notification>",
                    "<priority xmlns='tigase:push:priority:0'>high</priority></notification>",
                );
            }
            if module {
                xml = xml.replace(
                    "<field var='secret'>",
                    "<field var='pushModule'><value>monalProdiOS</value></field><field var='secret'>",
                );
            }
            xml
        })
}

/// Whatever the fast reader accepts, the full path reads as the same publish.
fn no_more_lenient(frame: &Frame) -> Result<(), TestCaseError> {
    let Some(fast) = FastPublish::read(frame) else {
        return Ok(());
    };
    let shown = Text(frame.bytes.to_vec());
    let (Ok(from), Ok(to)) = (
        fast.from.parse::<Jid>(),
        fast.to.as_deref().map(str::parse::<Jid>).transpose(),
    ) else {
        // The router takes the full path for these.
        return Ok(());
    };
    let full = stanza::parse_iq(frame);
    let Ok(Iq::Set {
        from: full_from,
        to: full_to,
        id,
        payload,
    }) = full
    else {
        return Err(TestCaseError::fail(format!(
            "fast path accepted what the full path reads as {full:?}: {shown:?}"
        )));
    };
    prop_assert_eq!(full_from, Some(from), "{:?}", shown);
    prop_assert_eq!(full_to, to, "{:?}", shown);
    prop_assert_eq!(&id, &*fast.id, "{:?}", shown);
    match Request::parse(false, payload) {
        Ok(Request::Publish(PublishRequest {
            node,
            secret,
            push_module,
            notification,
        })) => {
            prop_assert_eq!(&*node, &*fast.node, "{:?}", shown);
            prop_assert_eq!(secret.as_deref(), fast.secret.as_deref(), "{:?}", shown);
            prop_assert_eq!(
                push_module.as_deref(),
                fast.push_module.as_deref(),
                "{:?}",
                shown
            );
            prop_assert_eq!(notification.important, fast.important, "{:?}", shown);
            prop_assert!(
                notification.encrypted.is_none(),
                "the fast reader leaves encrypted payloads to the full path: {:?}",
                shown
            );
        }
        other => {
            return Err(TestCaseError::fail(format!(
                "fast path accepted what the full path reads as {other:?}: {shown:?}"
            )))
        }
    }
    Ok(())
}

#[test]
fn the_fast_publish_reader_is_never_more_lenient_than_the_full_parse() {
    let mutant = (plain_publish(), prop::collection::vec(mutation(), 1..=3)).prop_map(
        |(publish, mutations)| {
            let mut bytes = publish.into_bytes();
            for m in &mutations {
                m.apply(&mut bytes);
            }
            Text(bytes)
        },
    );
    check(
        (
            plain_publish(),
            prop::collection::vec(mutant, 1..8),
            prop::collection::vec(1..300usize, 1..4),
        ),
        |(valid, mutants, pieces)| {
            // First a valid publish: its shape is learnt, on this thread, for the reader and the framer.
            let frame = raw_frame(valid.as_bytes());
            prop_assert!(
                FastPublish::read(&frame).is_some(),
                "valid publish refused: {}",
                valid
            );
            no_more_lenient(&frame)?;
            // Then the mutants, framed as the link frames them, each also read directly.
            let mut body = Vec::new();
            for m in &mutants {
                body.extend_from_slice(&m.0);
            }
            let (frames, _) = frame_stream(&body, &pieces);
            for frame in &frames {
                no_more_lenient(frame)?;
            }
            Ok(())
        },
    );
}

// --- regressions: inputs the properties found ---

/// Each found by the properties above and fixed in src/; run through the same checks.
#[test]
fn regressions() {
    let world = World::new();
    let long_node = prosody_publish("p1", "localhost", &"a".repeat(8193), "s");
    let cases: [&[u8]; 8] = [
        // An `xmlns` on a publish-options value: the fast path read past it, the full path refuses it.
        b"<iq xmlns='jabber:component:accept' from='localhost' to='push.localhost' id='A0' type='set'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='Aaaa0'><item><notification xmlns='urn:xmpp:push:0'><x xmlns='jabber:x:data' type='form'><field type='hidden' var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field></x></notification></item></publish><publish-options><x type='submit' xmlns='jabber:x:data'><field var='FORM_TYPE'><value xmlns='urn:other'>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>aaA=aa0A0aA+</value></field></x></publish-options></pubsub></iq>",
        // U+FFFE in the id of a stanza the parser refuses: echoing it made an unwritable reply.
        "<iq xmlns='jabber:component:accept' type='set' id='\u{fffe}r1' from='alice@localhost/p'><command xmlns='jabber:iq:commands' node='register-push-apns' action='execute'/></iq>".as_bytes(),
        // A carriage return as the whole id.
        b"<iq type='get' id='\r' from='localhost'></iq>",
        // A non-ASCII letter starting an attribute name (so no `to`): the request went unanswered.
        "<iq xmlns='jabber:component:accept' type='get' id='i1' from='alice@localhost/p' \u{e9}to='push.localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>".as_bytes(),
        // An IQ type written with a character reference went unanswered.
        b"<iq xmlns='jabber:component:accept' type='&#115;et' id='c1' from='alice@localhost/p' to='push.localhost'><command xmlns='http://jabber.org/protocol/commands' node='register-push-apns' action='execute'/></iq>",
        // A tab in the id of an IQ that fails to parse: its error reply was lost.
        b"<iq type='get' id='a\tb' from='localhost'></iq>",
        b"<iq type='get' id='a>b' from='localhost'><ping xmlns='urn:xmpp:ping'/><ping xmlns='urn:xmpp:ping'/></iq>",
        // The fast path read a node longer than minidom's lexer accepts.
        long_node.as_bytes(),
    ];
    for case in cases {
        if let Err(e) = check_replies(&world, case, &[usize::MAX / 2]) {
            panic!("{e}");
        }
        let (frames, _) = frame_stream(case, &[usize::MAX / 2]);
        if let Err(e) = no_more_lenient(&frames[0]) {
            panic!("{e}");
        }
    }
}
