//! Cuts the component stream into stanzas: finds where each top-level element begins and ends without
//! parsing it, so the router can decide how much parsing each one deserves.
//!
//! The scan is resumable (bytes arrive in arbitrary pieces), allocation-free (a stanza is handed out as a
//! zero-copy slice of the read buffer) and bounded: a stanza may be at most [`MAX_STANZA`] bytes, and
//! nesting is only counted, never recursed into. What RFC 6120 forbids on a stream (comments, processing
//! instructions, DTDs, text between stanzas) ends the stream, as the RFC asks; everything inside a stanza
//! is checked later by whoever parses it. A publish shaped like one already read ([`shape`]) is cut out
//! by a compare instead of a scan.

use bytes::{Buf, Bytes, BytesMut};
use memchr::memmem;

use super::shape;
use super::xml::{find, is_blank, tag_end};

/// Largest stanza knock reads; the biggest legitimate one (a registration) is under 2 KiB. Prosody limits
/// client stanzas to 256 KiB, so nothing larger reaches knock from a well-behaved server.
pub const MAX_STANZA: usize = 256 * 1024;

/// One complete top-level element.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The element's bytes, from its `<` to its last `>`.
    pub bytes: Bytes,
    /// How deeply its elements nest (the stanza itself is 1).
    pub depth: usize,
}

/// What the framer found.
#[derive(Debug)]
pub enum Event {
    /// The peer's stream header: the whole `<stream:stream ...>` start tag.
    Header(Bytes),
    /// A top-level element: a stanza, a handshake, a stream error.
    Stanza(Frame),
    /// `</stream:stream>`: the peer closed the stream.
    End,
}

/// Why the stream cannot be read further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not XML that an XMPP stream may carry.
    #[error("the server sent XML a stream may not carry: {0}")]
    NotWellFormed(&'static str),
    /// A stanza grew past [`MAX_STANZA`].
    #[error("the server sent a stanza larger than {MAX_STANZA} bytes")]
    TooBig,
}

/// The resumable scanner. Feed it the read buffer after every read; it consumes what it hands out.
#[derive(Debug, Default)]
pub struct Framer {
    /// Open elements: 0 before the stream header, 1 between stanzas, 2 and more inside one.
    depth: usize,
    /// Deepest nesting seen in the current stanza.
    deepest: usize,
    /// How far `buf` has been scanned; inside a stanza the stanza starts at `buf[0]`.
    scan: usize,
}

const CDATA: &[u8] = b"<![CDATA[";

impl Framer {
    /// The next event in `buf`, or `None` until more bytes arrive.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, FrameError> {
        loop {
            let Some(lt) = find(b'<', &buf[self.scan..]).map(|i| i + self.scan) else {
                self.skip_text(buf, buf.len())?;
                return self.incomplete(buf);
            };
            let lt = self.skip_text(buf, lt)?;
            if self.depth == 1 {
                // A publish shaped like one already read is a whole stanza of known length and depth.
                if let Some((len, depth)) = shape::frame_len(&buf[lt..]) {
                    buf.advance(lt);
                    self.deepest = depth;
                    return self.stanza(buf, len - 1).map(Some);
                }
            }
            let rest = &buf[lt..];
            if rest.len() < 2 {
                return self.incomplete(buf);
            }
            match rest[1] {
                b'?' => {
                    if self.depth != 0 {
                        return Err(FrameError::NotWellFormed("a processing instruction"));
                    }
                    let Some(end) = memmem::find(rest, b"?>") else {
                        return self.incomplete(buf);
                    };
                    buf.advance(lt + end + 2);
                    self.scan = 0;
                }
                b'!' => {
                    if rest.len() < CDATA.len() {
                        return self.incomplete(buf);
                    }
                    if !rest.starts_with(CDATA) || self.depth < 2 {
                        return Err(FrameError::NotWellFormed("a comment or DTD"));
                    }
                    let Some(end) = memmem::find(&rest[CDATA.len()..], b"]]>") else {
                        return self.incomplete(buf);
                    };
                    self.scan = lt + CDATA.len() + end + 3;
                }
                _ => {
                    let Some(gt) = tag_end(buf, lt) else {
                        return self.incomplete(buf);
                    };
                    if let Some(event) = self.tag(buf, lt, gt)? {
                        return Ok(Some(event));
                    }
                }
            }
        }
    }

    /// Account for the text in `buf[scan..end]`; between stanzas it must be whitespace and is dropped.
    /// Returns where `end` is now.
    fn skip_text(&mut self, buf: &mut BytesMut, end: usize) -> Result<usize, FrameError> {
        if self.depth >= 2 {
            return Ok(end);
        }
        if !is_blank(&buf[self.scan..end]) {
            return Err(FrameError::NotWellFormed("text between stanzas"));
        }
        buf.advance(end);
        self.scan = 0;
        Ok(0)
    }

    /// A tag spanning `buf[lt..=gt]`.
    fn tag(
        &mut self,
        buf: &mut BytesMut,
        lt: usize,
        gt: usize,
    ) -> Result<Option<Event>, FrameError> {
        let closing = buf[lt + 1] == b'/';
        let empty = !closing && buf[gt - 1] == b'/';
        self.scan = gt + 1;
        if closing {
            match self.depth {
                0 => {
                    return Err(FrameError::NotWellFormed(
                        "an end tag before the stream began",
                    ))
                }
                1 => {
                    self.depth = 0;
                    buf.advance(gt + 1);
                    self.scan = 0;
                    return Ok(Some(Event::End));
                }
                2 => {
                    self.depth = 1;
                    return self.stanza(buf, gt).map(Some);
                }
                _ => self.depth -= 1,
            }
            return Ok(None);
        }
        match self.depth {
            0 if empty => Err(FrameError::NotWellFormed("an empty stream")),
            0 => {
                if gt >= MAX_STANZA {
                    return Err(FrameError::TooBig);
                }
                self.depth = 1;
                let header = buf.split_to(gt + 1).freeze();
                self.scan = 0;
                Ok(Some(Event::Header(header)))
            }
            1 if empty => {
                self.deepest = 1;
                self.stanza(buf, gt).map(Some)
            }
            1 => {
                self.depth = 2;
                self.deepest = 1;
                Ok(None)
            }
            _ if empty => {
                self.deepest = self.deepest.max(self.depth);
                Ok(None)
            }
            _ => {
                self.depth += 1;
                self.deepest = self.deepest.max(self.depth - 1);
                Ok(None)
            }
        }
    }

    /// The stanza `buf[..=gt]`, unless it is larger than [`MAX_STANZA`]: one that arrived whole in a
    /// single read was never held incomplete, so only here is its size checked.
    fn stanza(&mut self, buf: &mut BytesMut, gt: usize) -> Result<Event, FrameError> {
        if gt >= MAX_STANZA {
            return Err(FrameError::TooBig);
        }
        let bytes = buf.split_to(gt + 1).freeze();
        self.scan = 0;
        Ok(Event::Stanza(Frame {
            bytes,
            depth: std::mem::take(&mut self.deepest),
        }))
    }

    fn incomplete(&mut self, buf: &BytesMut) -> Result<Option<Event>, FrameError> {
        if buf.len() > MAX_STANZA {
            return Err(FrameError::TooBig);
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `input` in pieces of `step` bytes and collect every event.
    fn events(input: &[u8], step: usize) -> Result<Vec<String>, FrameError> {
        let mut framer = Framer::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(event) = framer.next(&mut buf)? {
                out.push(match event {
                    Event::Header(h) => format!("H:{}", String::from_utf8_lossy(&h)),
                    Event::Stanza(f) => {
                        format!("S{}:{}", f.depth, String::from_utf8_lossy(&f.bytes))
                    }
                    Event::End => "END".into(),
                });
            }
        }
        Ok(out)
    }

    const STREAM: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
        xmlns:stream='http://etherx.jabber.org/streams' id='x>y' from='push.localhost'>\n\
        <handshake/> <iq type='set' id='a'><q xmlns='urn:x'><![CDATA[</iq>]]><b a='/>'/></q></iq>\
        <message><body>1 &lt; 2</body></message></stream:stream>";

    #[test]
    fn frames_a_stream_whatever_the_read_sizes() {
        let whole = events(STREAM.as_bytes(), STREAM.len()).expect("frames");
        assert_eq!(whole.len(), 5, "{whole:?}");
        assert!(whole[0].starts_with("H:<stream:stream"));
        assert_eq!(whole[1], "S1:<handshake/>");
        assert_eq!(
            whole[2],
            "S3:<iq type='set' id='a'><q xmlns='urn:x'><![CDATA[</iq>]]><b a='/>'/></q></iq>"
        );
        assert_eq!(whole[3], "S2:<message><body>1 &lt; 2</body></message>");
        assert_eq!(whole[4], "END");
        for step in 1..40 {
            assert_eq!(
                events(STREAM.as_bytes(), step).expect("frames"),
                whole,
                "step {step}"
            );
        }
    }

    #[test]
    fn what_a_stream_may_not_carry_ends_it() {
        let head = "<stream:stream xmlns='jabber:component:accept'>";
        for bad in [
            "<!-- hi -->",
            "<?pi x?>",
            "text",
            "<!DOCTYPE x>",
            "</x></y>",
        ] {
            let input = format!("{head}{bad}<iq/>");
            assert!(
                matches!(
                    events(input.as_bytes(), 7),
                    Err(FrameError::NotWellFormed(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn stanzas_are_bounded() {
        let mut input = b"<stream:stream><iq>".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_STANZA + 1));
        assert_eq!(events(&input, 4096), Err(FrameError::TooBig));
        // However it arrives: complete in a single read, it is refused all the same.
        input.extend_from_slice(b"</iq>");
        assert_eq!(events(&input, input.len()), Err(FrameError::TooBig));
        let header = format!("<stream:stream a='{}'>", "x".repeat(MAX_STANZA));
        assert_eq!(
            events(header.as_bytes(), header.len()),
            Err(FrameError::TooBig)
        );
        // Deep nesting is counted, not recursed into.
        let deep = format!(
            "<stream:stream>{}{}",
            "<a>".repeat(10_000),
            "</a>".repeat(10_000)
        );
        let out = events(deep.as_bytes(), 1000).expect("frames");
        assert!(out[1].starts_with("S10000:"), "{}", &out[1][..10]);
    }
}
