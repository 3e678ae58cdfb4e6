//! Publish shapes: a server sends the same publish again and again, with only its addressing, id, node
//! and publish-options values (secret, push module) changed. Once a publish has been read in full, its bytes with those parts cut out are a
//! *shape*; a later publish that matches a shape byte for byte around parts made only of plain
//! characters reads exactly as the full read would, for a compare instead of a lexing pass.
//!
//! Why that is sound: the constant bytes were already accepted by the full fast reader, and a part of
//! plain characters (no quote, `<`, `>`, `&`, `]`, space or control character, ASCII only) cannot change
//! how anything around it lexes, needs no decoding, and cannot complete a `]]>`. The only checks in the
//! full reader that depend on a part's content, the lengths of the parts, are made here too.
//!
//! The framer asks the same question first ([`frame_len`]), so a publish of a known shape is also cut out
//! of the stream without a scan.
//!
//! Shapes are kept per thread (the link reads and routes on one), the most recently used first, a few at most:
//! one per publishing server and form is what real traffic has.

use std::borrow::Cow;
use std::cell::RefCell;

use super::frame::Frame;
use super::xml::MAX_TOKEN;
use super::FastPublish;
use super::MAX_FIELD_LEN;

/// Shapes kept per thread.
const SHAPES: usize = 8;

/// Which field a part is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    From,
    To,
    Id,
    Node,
    Secret,
    PushModule,
}

/// How many kinds of [`Part`] there are.
const PARTS: usize = 6;

/// A publish with its parts cut out: `constants[0] part[0] constants[1] part[1] ... constants[n]`.
#[derive(Debug)]
struct Shape {
    constants: Vec<Box<[u8]>>,
    parts: Vec<Part>,
    /// The framer's nesting depth for the stanza.
    depth: usize,
    /// Whether the notification marks its stanza important: read from bytes that are all constant.
    important: bool,
}

thread_local! {
    static KNOWN: RefCell<Vec<Shape>> = const { RefCell::new(Vec::new()) };
}

/// Whether a byte may appear in a part: ASCII letters, digits and `-._~+/=:@!$*,;%`.
#[inline]
fn plain(b: u8) -> bool {
    PLAIN[usize::from(b)]
}

/// [`plain`] as a table: it is asked of every byte of every part.
const PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"-._~+/=:@!$*,;%";
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
};

/// If `buf` starts with a whole stanza of a known shape: its length and nesting depth. Lets the framer
/// cut a publish out of the stream with a compare instead of a scan.
pub fn frame_len(buf: &[u8]) -> Option<(usize, usize)> {
    KNOWN.with(|known| {
        known
            .borrow()
            .iter()
            .find_map(|shape| Some((shape.matched(buf)?.0, shape.depth)))
    })
}

/// Read `bytes` if it matches a known shape.
pub(super) fn read(bytes: &[u8]) -> Option<FastPublish<'_>> {
    KNOWN.with(|known| {
        let mut known = known.borrow_mut();
        let (index, publish) = known
            .iter()
            .enumerate()
            .find_map(|(i, shape)| shape.read(bytes).map(|p| (i, p)))?;
        if index > 0 {
            let shape = known.remove(index);
            known.insert(0, shape);
        }
        Some(publish)
    })
}

/// Remember the shape of `bytes`, which the full fast reader read as `publish`. Publishes whose parts
/// are not plain (entities, spaces, non-ASCII) have no shape and are always read in full.
pub(super) fn learn(frame: &Frame, publish: &FastPublish<'_>) {
    let Some(shape) = Shape::of(&frame.bytes, frame.depth, publish) else {
        return;
    };
    KNOWN.with(|known| {
        let mut known = known.borrow_mut();
        known.truncate(SHAPES - 1);
        known.insert(0, shape);
    });
}

impl Shape {
    fn of(bytes: &[u8], depth: usize, publish: &FastPublish<'_>) -> Option<Shape> {
        let base = bytes.as_ptr() as usize;
        // Where each part lies in `bytes`; every one must be borrowed from it (not decoded) and plain.
        let mut spans: Vec<(usize, usize, Part)> = Vec::with_capacity(PARTS);
        let mut add = |value: Option<&Cow<'_, str>>, part: Part| -> Option<()> {
            let Some(value) = value else { return Some(()) };
            let Cow::Borrowed(text) = value else {
                return None;
            };
            let start = (text.as_ptr() as usize).checked_sub(base)?;
            (start + text.len() <= bytes.len() && text.bytes().all(plain)).then_some(())?;
            spans.push((start, start + text.len(), part));
            Some(())
        };
        add(Some(&publish.from), Part::From)?;
        add(publish.to.as_ref(), Part::To)?;
        add(Some(&publish.id), Part::Id)?;
        add(Some(&publish.node), Part::Node)?;
        add(publish.secret.as_ref(), Part::Secret)?;
        add(publish.push_module.as_ref(), Part::PushModule)?;
        spans.sort_unstable_by_key(|&(start, _, _)| start);
        let mut constants: Vec<Box<[u8]>> = Vec::with_capacity(spans.len() + 1);
        let mut at = 0;
        for &(start, end, _) in &spans {
            if start < at {
                return None;
            }
            constants.push(bytes[at..start].into());
            at = end;
        }
        constants.push(bytes[at..].into());
        // A part must be followed by a byte that cannot belong to it, so where it ends is never in doubt.
        if constants[1..]
            .iter()
            .any(|c| c.first().is_none_or(|&b| plain(b)))
        {
            return None;
        }
        Some(Shape {
            constants,
            parts: spans.into_iter().map(|(_, _, part)| part).collect(),
            depth,
            important: publish.important,
        })
    }

    /// If `buf` starts with a stanza of this shape: its length and its parts (indexed by [`Part`]).
    fn matched<'a>(&self, buf: &'a [u8]) -> Option<(usize, [Option<&'a str>; PARTS])> {
        let mut rest = buf.strip_prefix(&*self.constants[0])?;
        let mut at = buf.len() - rest.len();
        let mut fields: [Option<&'a str>; PARTS] = [None; PARTS];
        for (part, constant) in self.parts.iter().zip(&self.constants[1..]) {
            let len = rest.iter().position(|&b| !plain(b)).unwrap_or(rest.len());
            let form_value = matches!(part, Part::Secret | Part::PushModule);
            if len > MAX_TOKEN || (form_value && len > MAX_FIELD_LEN) {
                return None;
            }
            // Plain bytes are ASCII, so this cannot fail; it only proves it to the type system.
            fields[*part as usize] = Some(std::str::from_utf8(&buf[at..at + len]).ok()?);
            rest = rest[len..].strip_prefix(&**constant)?;
            at = buf.len() - rest.len();
        }
        Some((at, fields))
    }

    fn read<'a>(&self, bytes: &'a [u8]) -> Option<FastPublish<'a>> {
        let (len, [from, to, id, node, secret, push_module]) = self.matched(bytes)?;
        if len != bytes.len() {
            return None;
        }
        Some(FastPublish {
            from: Cow::Borrowed(from?),
            to: to.map(Cow::Borrowed),
            id: Cow::Borrowed(id?),
            node: Cow::Borrowed(node?),
            secret: secret.map(Cow::Borrowed),
            push_module: push_module.map(Cow::Borrowed),
            important: self.important,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(id: &str, node: &str, secret: &str, body: &str) -> Frame {
        let xml = format!("<iq from='localhost' to='push.localhost' id='{id}' type='set'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item><notification xmlns='urn:xmpp:push:0'><x xmlns='jabber:x:data' type='form'><field type='hidden' var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field><field type='text-single' var='last-message-body'><value>{body}</value></field></x></notification></item></publish><publish-options><x type='submit' xmlns='jabber:x:data'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>{secret}</value></field></x></publish-options></pubsub></iq>");
        Frame {
            bytes: xml.into_bytes().into(),
            depth: 8,
        }
    }

    #[test]
    fn a_known_shape_reads_as_the_lexer_does() {
        let first = publish("a1", "node1", "secret1", "New Message!");
        assert!(
            read(&first.bytes).is_none(),
            "nothing learnt yet on this thread"
        );
        let lexed = FastPublish::read(&first).expect("fast path");
        assert_eq!(
            read(&first.bytes),
            Some(lexed),
            "learnt from the first read"
        );

        for (id, node, secret) in [
            ("b-2.x", "AAAAbbbb_cc-dd", "s3cr3t+/="),
            ("", "n", ""),
            ("purple3@a:b", "x", &"k".repeat(MAX_FIELD_LEN)),
        ] {
            let frame = publish(id, node, secret, "New Message!");
            let by_shape = read(&frame.bytes).expect("same shape");
            assert_eq!(
                Some(by_shape),
                FastPublish::read_lexed(&frame),
                "{id} {node} {secret}"
            );
        }
    }

    #[test]
    fn a_shape_keeps_whether_its_stanza_is_important() {
        let loud = publish("a1", "n1", "s1", "New Message!");
        let quiet = publish("a1", "n1", "s1", "");
        assert!(FastPublish::read(&loud).expect("lexed").important);
        assert!(!FastPublish::read(&quiet).expect("lexed").important);
        for (frame, important) in [
            (publish("b2", "n2", "s2", "New Message!"), true),
            (publish("b2", "n2", "s2", ""), false),
        ] {
            assert_eq!(read(&frame.bytes).expect("by shape").important, important);
        }
    }

    #[test]
    fn anything_but_plain_parts_is_lexed_again() {
        FastPublish::read(&publish("a1", "node1", "secret1", "New Message!")).expect("learnt");
        for frame in [
            publish("a&amp;1", "node1", "secret1", "New Message!"),
            publish("a1", "no de", "secret1", "New Message!"),
            publish("a1", "node1", "sécret", "New Message!"),
            publish("a1", "node1", "secret1", "Another body"),
            publish("a1", "node1", "s]]", "New Message!"),
            publish("a1", "node1", "s<x/>", "New Message!"),
            publish(
                "a1",
                "node1",
                &"k".repeat(MAX_FIELD_LEN + 1),
                "New Message!",
            ),
            publish(&"i".repeat(8193), "node1", "secret1", "New Message!"),
            publish("a1", &"n".repeat(8193), "secret1", "New Message!"),
        ] {
            assert!(read(&frame.bytes).is_none(), "{:?}", frame.bytes);
            // And the full read still gives its own verdict.
            assert_eq!(FastPublish::read(&frame), FastPublish::read_lexed(&frame));
        }
        let long = publish(
            "a1",
            "node1",
            &"k".repeat(MAX_FIELD_LEN + 1),
            "New Message!",
        );
        assert!(
            FastPublish::read(&long).is_none(),
            "too long a secret is refused either way"
        );
        let entity = publish("a&amp;1", "node1", "secret1", "New Message!");
        assert_eq!(FastPublish::read(&entity).expect("lexed").id, "a&1");
    }

    #[test]
    fn the_framer_cuts_known_shapes_exactly_where_it_would_scan() {
        use crate::stanza::frame::{Event, Framer};
        use bytes::BytesMut;

        let stream = |frames: &[Frame]| -> Vec<u8> {
            let mut bytes = b"<stream:stream xmlns='jabber:component:accept'>".to_vec();
            for frame in frames {
                bytes.extend_from_slice(b"\n ");
                bytes.extend_from_slice(&frame.bytes);
            }
            bytes
        };
        let frames: Vec<Frame> = (0..20)
            .map(|i| match i % 4 {
                3 => publish("x&amp;y", &format!("node{i}"), "s", "New Message!"),
                2 => publish(&format!("id{i}"), "n", "s", "Other body"),
                _ => publish(
                    &format!("id{i}"),
                    &format!("node{i}"),
                    &format!("s{i}"),
                    "New Message!",
                ),
            })
            .collect();
        let input = stream(&frames);
        // Learn the shape, then frame the stream in pieces of every size: the frames (bytes and depth)
        // must be exactly the originals, whether a piece ends mid-stanza or not.
        FastPublish::read(&frames[0]).expect("learnt");
        for piece in [1, 7, 64, 500, input.len()] {
            let mut framer = Framer::default();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for chunk in input.chunks(piece) {
                buf.extend_from_slice(chunk);
                while let Some(event) = framer.next(&mut buf).expect("frames") {
                    if let Event::Stanza(frame) = event {
                        out.push((frame.bytes.to_vec(), frame.depth));
                    }
                }
            }
            let want: Vec<_> = frames.iter().map(|f| (f.bytes.to_vec(), 8)).collect();
            assert_eq!(out, want, "pieces of {piece}");
        }
        assert!(
            frame_len(&frames[1].bytes).is_some(),
            "the fast cut was taken"
        );
    }

    #[test]
    fn shapes_are_bounded_and_most_recent_first() {
        for i in 0..SHAPES + 4 {
            FastPublish::read(&publish("a", "n", "s", &format!("body {i}"))).expect("read");
        }
        KNOWN.with(|known| assert_eq!(known.borrow().len(), SHAPES));
        let again = publish("b", "m", "t", &format!("body {}", SHAPES + 3));
        assert!(read(&again.bytes).is_some(), "the newest shape is kept");
        let oldest = publish("b", "m", "t", "body 0");
        assert!(read(&oldest.bytes).is_none(), "the oldest was dropped");
    }
}
