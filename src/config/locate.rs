//! Where a key stands in the configuration file: dotted keys (`apns[1].auth.key_id`) to lines and back, so
//! every error can say which key, on which line.
//!
//! It reads the file once more with toml_edit, which keeps every key's and value's byte span. It only ever
//! answers questions about a file that has parsed; a file that does not parse is located by toml's own span.

use std::ops::Range;

use toml_edit::{ImDocument, Item, TableLike, Value};

/// A parsed file's keys and their places.
pub struct Locator<'a> {
    /// The file's text, to turn byte offsets into lines.
    text: &'a str,
    /// The file with spans, if it parses.
    doc: Option<ImDocument<&'a str>>,
}

impl<'a> Locator<'a> {
    /// Read `text` for its keys' places.
    pub fn new(text: &'a str) -> Locator<'a> {
        Locator {
            text,
            doc: ImDocument::parse(text).ok(),
        }
    }

    /// The 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// The dotted key whose name or value holds `offset` (the innermost), if any.
    pub fn key_at(&self, offset: usize) -> Option<String> {
        let doc = self.doc.as_ref()?;
        let mut found = None;
        walk_table(doc.as_table(), "", offset, &mut found);
        found
    }

    /// The line of a dotted key as the admin wrote it (`limits.allowed_domains[2]`, `apns[0].auth`): the
    /// key's own line, or, for a key that is absent, the line of the nearest enclosing key or table.
    pub fn line_of_key(&self, path: &str) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let segments: Vec<&str> = path.split('.').collect();
        find(doc.as_table(), &segments, None).map(|span| self.line_of(span.start))
    }
}

/// The span of the deepest key along `segments` that `table` holds, or `best` if it holds none.
fn find(
    table: &dyn TableLike,
    segments: &[&str],
    best: Option<Range<usize>>,
) -> Option<Range<usize>> {
    let Some((segment, rest)) = segments.split_first() else {
        return best;
    };
    let (name, index) = split_index(segment);
    let Some((key, child)) = table.get_key_value(name) else {
        return best;
    };
    let best = key.span().or_else(|| child.span()).or(best);
    let next: Option<(&dyn TableLike, Option<Range<usize>>)> = match (index, child) {
        (None, child) => child.as_table_like().map(|t| (t, best.clone())),
        // An element of an array of tables is found by its own header.
        (Some(i), Item::ArrayOfTables(tables)) => tables
            .get(i)
            .map(|t| (t as &dyn TableLike, t.span().or(best.clone()))),
        (Some(i), Item::Value(Value::Array(values))) => {
            return values.get(i).and_then(Value::span).or(best)
        }
        _ => None,
    };
    match next {
        Some((table, best)) => find(table, rest, best),
        None => best,
    }
}

/// `name[3]` -> (`name`, Some(3)); `name` -> (`name`, None).
fn split_index(segment: &str) -> (&str, Option<usize>) {
    match segment.strip_suffix(']').and_then(|s| s.split_once('[')) {
        Some((name, index)) => (name, index.parse().ok()),
        None => (segment, None),
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn holds(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
}

fn walk_table(table: &dyn TableLike, prefix: &str, offset: usize, found: &mut Option<String>) {
    for (name, item) in table.iter() {
        let path = join(prefix, name);
        if holds(table.key(name).and_then(|k| k.span()), offset) {
            *found = Some(path.clone());
        }
        walk_item(item, &path, offset, found);
    }
}

fn walk_item(item: &Item, path: &str, offset: usize, found: &mut Option<String>) {
    match item {
        Item::Table(table) => {
            // A table's own span (header and body) is where toml places a key missing from it.
            if holds(table.span(), offset) {
                *found = Some(path.to_owned());
            }
            walk_table(table, path, offset, found)
        }
        Item::ArrayOfTables(tables) => {
            for (i, table) in tables.iter().enumerate() {
                let element = format!("{path}[{i}]");
                if holds(table.span(), offset) {
                    *found = Some(element.clone());
                }
                walk_table(table, &element, offset, found);
            }
        }
        Item::Value(value) => walk_value(value, path, offset, found),
        Item::None => {}
    }
}

fn walk_value(value: &Value, path: &str, offset: usize, found: &mut Option<String>) {
    if holds(value.span(), offset) {
        *found = Some(path.to_owned());
    }
    match value {
        Value::Array(values) => {
            for (i, v) in values.iter().enumerate() {
                walk_value(v, &format!("{path}[{i}]"), offset, found);
            }
        }
        Value::InlineTable(table) => walk_table(table, path, offset, found),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[component]\njid = \"a\"\nping_interval_secs = \"thirty\"\n\n[limits]\nallowed_domains = [\"x\", \"y\"]\n\n[[apns]]\nname = \"one\"\n\n[[apns]]\nname = \"two\"\n[apns.auth]\nkey_id = \"K\"\n";

    fn offset_of(needle: &str) -> usize {
        TEXT.find(needle).expect("in the text")
    }

    #[test]
    fn offsets_become_keys_and_lines() {
        let at = Locator::new(TEXT);
        assert_eq!(
            at.key_at(offset_of("\"thirty\"")).as_deref(),
            Some("component.ping_interval_secs")
        );
        assert_eq!(at.line_of(offset_of("\"thirty\"")), 3);
        assert_eq!(
            at.key_at(offset_of("\"y\"")).as_deref(),
            Some("limits.allowed_domains[1]")
        );
        assert_eq!(
            at.key_at(offset_of("\"two\"")).as_deref(),
            Some("apns[1].name")
        );
        assert_eq!(
            at.key_at(offset_of("key_id")).as_deref(),
            Some("apns[1].auth.key_id")
        );
    }

    #[test]
    fn keys_become_lines() {
        let at = Locator::new(TEXT);
        assert_eq!(at.line_of_key("component.jid"), Some(2));
        assert_eq!(at.line_of_key("component.ping_interval_secs"), Some(3));
        assert_eq!(at.line_of_key("limits.allowed_domains[1]"), Some(6));
        assert_eq!(at.line_of_key("apns[1].name"), Some(12));
        assert_eq!(at.line_of_key("apns[1].auth.key_id"), Some(14));
        // Absent keys fall back to the nearest present one.
        assert_eq!(at.line_of_key("apns[0].topic"), Some(8));
        assert_eq!(at.line_of_key("component.secret"), Some(1));
        assert_eq!(at.line_of_key("nowhere"), None);
    }
}
