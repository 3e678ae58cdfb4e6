//! Just enough XML lexing for the hot path: where a tag ends, a tag's name and attributes, and entity
//! decoding of a value.
//!
//! It never builds a tree and never guesses: every function answers `None` for anything it does not fully
//! understand, and callers then hand the bytes to a complete parser (minidom and xmpp-parsers), which
//! gives the precise verdict. So this module may be narrow, but must never be wrong about what it accepts.

use std::borrow::Cow;

/// Longest name or attribute value the fast path reads, in bytes. minidom's lexer (rxml) refuses names and
/// attribute values longer than 8 KiB, so the fast path must refuse them too; real ones are far shorter.
pub const MAX_TOKEN: usize = 4096;

/// The first `byte` in `hay`. Spans inside a tag are a few dozen bytes, where a plain loop beats
/// `memchr`'s SIMD set-up; this is the lexer's one search primitive.
#[inline]
pub fn find(byte: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == byte)
}

/// The index of the `>` that closes the tag opening at `start` (where `buf[start] == b'<'`), skipping
/// quoted attribute values; `None` while the tag is not complete in `buf`.
pub fn tag_end(buf: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        let j = i + buf
            .get(i..)?
            .iter()
            .position(|&b| matches!(b, b'>' | b'\'' | b'"'))?;
        match buf[j] {
            b'>' => return Some(j),
            quote => i = j + 1 + find(quote, buf.get(j + 1..)?)? + 1,
        }
    }
}

/// What kind of tag a [`Tag`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagKind {
    /// `<name ...>`
    Start,
    /// `<name .../>`
    Empty,
    /// `</name>`
    End,
}

/// One element tag, borrowed from the input.
#[derive(Debug, Clone, Copy)]
pub struct Tag<'a> {
    /// The qualified name, prefix included.
    pub name: &'a [u8],
    /// Start, empty or end tag.
    pub kind: TagKind,
    /// Everything between the name and the closing `>` or `/>`.
    attrs: &'a [u8],
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Whether `s` is only XML whitespace.
pub fn is_blank(s: &[u8]) -> bool {
    s.iter().all(|&b| is_space(b))
}

/// A conservative check of an XML name: ASCII name characters only, not starting with a digit, `-` or `.`.
fn is_name(name: &[u8]) -> bool {
    match name.first() {
        None | Some(b'0'..=b'9' | b'-' | b'.') => false,
        Some(_) => name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-' | b'.')),
    }
}

/// [`is_name`], and beyond ASCII any character: a name a full parser may read (it judges the rest).
fn is_envelope_name(name: &[u8]) -> bool {
    if name.is_ascii() {
        return is_name(name);
    }
    !matches!(name.first(), None | Some(b'0'..=b'9' | b'-' | b'.'))
        && std::str::from_utf8(name).is_ok_and(|name| {
            name.chars()
                .all(|c| !c.is_ascii() || c.is_ascii_alphanumeric() || "_:-.".contains(c))
        })
}

/// Whether every character in `raw` is one XML allows, in UTF-8, with every `&` starting a reference
/// [`decode`] knows and no `]]>` outside CDATA. Checks the parts of a stanza the fast path skips, so that
/// skipping them never accepts what a full parser would refuse.
pub fn valid_chars(raw: &[u8]) -> bool {
    // One branch-free pass over the bytes (it vectorises): control characters other than tab and line
    // ends, and whether anything is outside ASCII at all.
    let (control, high) = raw.iter().fold((false, false), |(control, high), &b| {
        (
            control | ((b < 0x20) & (b != b'\t') & (b != b'\n') & (b != b'\r')),
            high | (b >= 0x80),
        )
    });
    if control || memchr::memmem::find(raw, b"]]>").is_some() {
        return false;
    }
    // U+FFFE and U+FFFF are EF BF BE and EF BF BF in UTF-8; ASCII text has neither.
    if high
        && (std::str::from_utf8(raw).is_err()
            || memchr::memmem::find(raw, "\u{FFFE}".as_bytes()).is_some()
            || memchr::memmem::find(raw, "\u{FFFF}".as_bytes()).is_some())
    {
        return false;
    }
    let mut rest = raw;
    while let Some(amp) = memchr::memchr(b'&', rest) {
        rest = &rest[amp..];
        let Some(semi) = find(b';', rest) else {
            return false;
        };
        if decode(&rest[..=semi]).is_none() {
            return false;
        }
        rest = &rest[semi + 1..];
    }
    true
}

impl<'a> Tag<'a> {
    /// Read a whole tag, `<` and `>` included. `None` for comments, CDATA, processing instructions and
    /// anything that is not a plain element tag.
    pub fn parse(raw: &'a [u8]) -> Option<Tag<'a>> {
        let inner = raw.strip_prefix(b"<")?.strip_suffix(b">")?;
        if let Some(rest) = inner.strip_prefix(b"/") {
            let end = rest.iter().rposition(|&b| !is_space(b))? + 1;
            let name = &rest[..end];
            return is_name(name).then_some(Tag {
                name,
                kind: TagKind::End,
                attrs: &[],
            });
        }
        let (inner, kind) = match inner.strip_suffix(b"/") {
            Some(inner) => (inner, TagKind::Empty),
            None => (inner, TagKind::Start),
        };
        let name_len = inner
            .iter()
            .position(|&b| is_space(b))
            .unwrap_or(inner.len());
        let (name, attrs) = inner.split_at(name_len);
        is_name(name).then_some(Tag { name, kind, attrs })
    }

    /// Call `each(name, raw_value)` for every attribute, in order. `None` when the attribute syntax is
    /// broken (an attribute name outside `is_name`'s ASCII included) or `each` says so.
    pub fn for_each_attr(&self, each: impl FnMut(&'a [u8], &'a [u8]) -> Option<()>) -> Option<()> {
        self.scan_attrs(is_name, each)
    }

    /// The raw value of one attribute, if present and the syntax is sound.
    pub fn attr(&self, wanted: &[u8]) -> Option<&'a [u8]> {
        self.find_attr(is_name, wanted)
    }

    /// The raw value of one attribute, reading past attribute names outside ASCII (`\u{e9}to='x'` is a
    /// name XML allows). For reading what a stanza is and who sent it as a full parser would, so that an
    /// odd attribute does not hide its `id` and `from`; never for accepting a stanza on the fast path,
    /// which must stay as strict as [`Tag::attr`].
    pub fn envelope_attr(&self, wanted: &[u8]) -> Option<&'a [u8]> {
        self.find_attr(is_envelope_name, wanted)
    }

    fn find_attr(&self, name_ok: fn(&[u8]) -> bool, wanted: &[u8]) -> Option<&'a [u8]> {
        let mut found = None;
        self.scan_attrs(name_ok, |name, value| {
            if name == wanted {
                found = Some(value);
            }
            Some(())
        })?;
        found
    }

    fn scan_attrs(
        &self,
        name_ok: fn(&[u8]) -> bool,
        mut each: impl FnMut(&'a [u8], &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        let mut rest = self.attrs;
        loop {
            let start = rest.iter().position(|&b| !is_space(b));
            let Some(start) = start else { return Some(()) };
            // Attributes must be separated by whitespace from the name and from each other.
            if start == 0 {
                return None;
            }
            rest = &rest[start..];
            let eq = find(b'=', rest)?;
            let name_end = rest[..eq].iter().rposition(|&b| !is_space(b))? + 1;
            let name = &rest[..name_end];
            if !name_ok(name) {
                return None;
            }
            let after = &rest[eq + 1..];
            let open = after.iter().position(|&b| !is_space(b))?;
            let quote = after[open];
            if quote != b'\'' && quote != b'"' {
                return None;
            }
            let value_start = open + 1;
            let len = find(quote, &after[value_start..])?;
            let value = &after[value_start..value_start + len];
            if find(b'<', value).is_some() {
                return None;
            }
            each(name, value)?;
            rest = &after[value_start + len + 1..];
        }
    }
}

/// The bytes with their line ends normalised as XML 1.0 §2.11 has a processor do before anything else:
/// `\r\n` and a lone `\r` become `\n`. minidom's parser does not: it refuses a lone `\r` in an attribute
/// and drops one before the closing quote, so `id='\r'` read as `''`, not the `' '` the sender means.
pub fn normalize_line_ends(raw: &[u8]) -> Cow<'_, [u8]> {
    if memchr::memchr(b'\r', raw).is_none() {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter().peekable();
    while let Some(&b) = bytes.next() {
        if b == b'\r' {
            bytes.next_if_eq(&&b'\n');
            out.push(b'\n');
        } else {
            out.push(b);
        }
    }
    Cow::Owned(out)
}

/// Decode a value (attribute or text) into a string: UTF-8 checked, the five predefined entities and
/// character references expanded. `None` for anything a full parser might read differently: control
/// characters, `\r` (line-end normalisation), bare `>`, or an unknown entity.
pub fn decode(raw: &[u8]) -> Option<Cow<'_, str>> {
    let text = std::str::from_utf8(raw).ok()?;
    if raw.iter().any(|&b| b < 0x20 || b == b'>') {
        return None;
    }
    if find(b'&', raw).is_none() {
        return Some(Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let semi = rest[amp..].find(';')? + amp;
        let entity = &rest[amp + 1..semi];
        let c = match entity {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "apos" => '\'',
            "quot" => '"',
            _ => {
                let code = match entity.strip_prefix("#x") {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => entity.strip_prefix('#')?.parse().ok()?,
                };
                let c = char::from_u32(code)?;
                if (c as u32) < 0x20 || matches!(c, '\u{FFFE}' | '\u{FFFF}') {
                    return None;
                }
                c
            }
        };
        out.push(c);
        rest = &rest[semi + 1..];
    }
    out.push_str(rest);
    Some(Cow::Owned(out))
}

/// Walks the tags of one complete element, returning each with the text before it.
pub struct Tags<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Tags<'a> {
    /// Walk `buf` from its start.
    pub fn new(buf: &'a [u8]) -> Tags<'a> {
        Tags { buf, pos: 0 }
    }

    /// The next tag and the text before it; `None` at the end or at anything that is not a plain tag.
    pub fn next_tag(&mut self) -> Option<(&'a [u8], Tag<'a>)> {
        let lt = self.pos + find(b'<', &self.buf[self.pos..])?;
        let gt = tag_end(self.buf, lt)?;
        let text = &self.buf[self.pos..lt];
        self.pos = gt + 1;
        Some((text, Tag::parse(&self.buf[lt..=gt])?))
    }

    /// Whether only whitespace is left.
    pub fn at_end(&self) -> bool {
        is_blank(&self.buf[self.pos..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_end_skips_quoted_values() {
        let buf = b"<a b='x>y' c=\"'>\">rest";
        assert_eq!(tag_end(buf, 0), Some(17));
        assert_eq!(tag_end(b"<a b='x>", 0), None);
        assert_eq!(tag_end(b"<a", 0), None);
    }

    #[test]
    fn tags_and_attributes() {
        let tag = Tag::parse(b"<iq from='a&amp;b' to=\"c\"\n type = 'set'>").expect("tag");
        assert_eq!(tag.name, b"iq");
        assert_eq!(tag.kind, TagKind::Start);
        let mut seen = Vec::new();
        tag.for_each_attr(|n, v| {
            seen.push((n.to_vec(), v.to_vec()));
            Some(())
        })
        .expect("attrs");
        assert_eq!(seen.len(), 3);
        assert_eq!(tag.attr(b"type"), Some(&b"set"[..]));
        assert_eq!(decode(tag.attr(b"from").unwrap()).unwrap(), "a&b");
        assert_eq!(Tag::parse(b"<item/>").unwrap().kind, TagKind::Empty);
        assert_eq!(Tag::parse(b"</item >").unwrap().kind, TagKind::End);
        assert!(Tag::parse(b"<!-- x -->").is_none());
        assert!(Tag::parse(b"<?xml version='1.0'?>").is_none());
        assert!(Tag::parse(b"<a b=c>")
            .unwrap()
            .for_each_attr(|_, _| Some(()))
            .is_none());
        assert!(Tag::parse(b"<a b='1'c='2'>")
            .unwrap()
            .for_each_attr(|_, _| Some(()))
            .is_none());
        // A name outside ASCII: the fast path's reading refuses the tag, the envelope's reads past it;
        // broken UTF-8 in a name stops both.
        let tag = Tag::parse("<iq \u{e9}to='x' id='i1'>".as_bytes()).expect("tag");
        assert_eq!(tag.attr(b"id"), None);
        assert_eq!(tag.envelope_attr(b"id"), Some(&b"i1"[..]));
        let broken = Tag::parse(b"<iq \xe9to='x' id='i1'>").expect("tag");
        assert_eq!(broken.envelope_attr(b"id"), None);
    }

    #[test]
    fn line_ends_are_normalised_as_xml_says() {
        assert_eq!(
            &*normalize_line_ends(b"a\r\nb\rc\r\r\nd\r"),
            b"a\nb\nc\n\nd\n"
        );
        assert!(matches!(normalize_line_ends(b"a\nb"), Cow::Borrowed(_)));
    }

    #[test]
    fn decode_is_strict() {
        assert_eq!(decode(b"plain").unwrap(), "plain");
        assert_eq!(decode(b"&lt;&#65;&#x42;&apos;").unwrap(), "<AB'");
        assert!(decode(b"&nbsp;").is_none());
        assert!(decode(b"a\rb").is_none());
        assert!(decode(b"&#1;").is_none());
        assert!(decode(b"\xff").is_none());
        assert!(decode(b"a>b").is_none());
        assert!(valid_chars(b"<a b='&amp;'>x\ny</a>"));
        assert!(!valid_chars(b"<a>&bogus;</a>"));
        assert!(!valid_chars(b"<a>\x01</a>"));
        assert!(!valid_chars(b"<a>]]></a>"));
        assert!(!valid_chars(b"<a>\xef\xbf\xbf</a>"));
    }
}
