//! What the load generator sends: Prosody 0.12's publish, byte for byte, and a client's XEP-0050
//! registration, each cut into constant pieces around what changes, so that sending one costs copies
//! and a number, not a format.

use std::io::Write as _;

/// The component's JID in every benchmark config.
pub const COMPONENT_JID: &str = "push.localhost";
/// The XMPP server the generator plays; registrations name it as the user's domain.
pub const SERVER_DOMAIN: &str = "localhost";
/// The component secret in every benchmark config.
pub const COMPONENT_SECRET: &str = "bench-secret";
/// The app every registration belongs to.
pub const APP: &str = "bench";
/// Its bundle id.
pub const TOPIC: &str = "org.knock.bench";

/// A stanza as `head` + id + `tail`.
#[derive(Debug, Clone)]
pub struct Template {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Template {
    fn around_id(text: String) -> Template {
        const MARK: &str = "\u{0}ID\u{0}";
        let (head, tail) = text
            .split_once(MARK)
            .expect("every template has an id mark");
        Template {
            head: head.as_bytes().to_vec(),
            tail: tail.as_bytes().to_vec(),
        }
    }

    /// Append the stanza with id `<kind><seq>.<sent_ns>` to `out`.
    pub fn write(&self, kind: u8, seq: u64, sent_ns: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        out.push(kind);
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{seq}.{sent_ns}");
        out.extend_from_slice(&self.tail);
    }
}

/// The publish Prosody 0.12's mod_cloud_notify sends for one message (a verbatim capture, as in the
/// integration tests; only the id, node and secret change), with marks where those go.
fn prosody_publish_text(id: &str, node: &str, secret: &str) -> String {
    format!(
        "<iq xmlns='jabber:component:accept' from='{SERVER_DOMAIN}' to='{COMPONENT_JID}' id='{id}' type='set'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item><notification xmlns='urn:xmpp:push:0'><x xmlns='jabber:x:data' type='form'><field type='hidden' var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field><field type='text-single' var='message-count'><value>1</value></field><field type='text-single' var='pending-subscription-count'/><field type='jid-single' var='last-message-sender'/><field type='text-single' var='last-message-body'><value>New Message!</value></field></x></notification></item></publish><publish-options><x type='submit' xmlns='jabber:x:data'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>{secret}</value></field></x></publish-options></pubsub></iq>"
    )
}

/// Prosody's publish to any of many nodes. The constant text is held once and each node only as its
/// node and secret, side by side: sending one reads about 70 bytes that differ per node. A whole
/// stanza per node (1.2 KB, two allocations) made the generator itself slower with 100,000 nodes than
/// with 1,000, from cache and TLB misses, and that showed up as knock's latency at scale.
pub struct Publishes {
    /// The text before the id, between id and node, between node and secret, after the secret.
    pieces: [Vec<u8>; 4],
    /// Every node's node and secret, one after the other.
    fields: Vec<u8>,
    /// Per node: where its node starts in `fields`, and the lengths of node and secret.
    spans: Vec<(u32, u16, u16)>,
}

impl Publishes {
    /// Publishes to each (node, secret).
    pub fn new<'a>(nodes: impl IntoIterator<Item = (&'a str, &'a str)>) -> Publishes {
        const ID: &str = "\u{0}ID\u{0}";
        const NODE: &str = "\u{0}NODE\u{0}";
        const SECRET: &str = "\u{0}SECRET\u{0}";
        let text = prosody_publish_text(ID, NODE, SECRET);
        let (before_id, rest) = text.split_once(ID).expect("id mark");
        let (before_node, rest) = rest.split_once(NODE).expect("node mark");
        let (before_secret, after) = rest.split_once(SECRET).expect("secret mark");
        let mut set = Publishes {
            pieces: [before_id, before_node, before_secret, after].map(|p| p.as_bytes().to_vec()),
            fields: Vec::new(),
            spans: Vec::new(),
        };
        for (node, secret) in nodes {
            let start = u32::try_from(set.fields.len()).expect("under 4 GiB of nodes");
            let len = |s: &str| u16::try_from(s.len()).expect("a node or secret under 64 KiB");
            set.spans.push((start, len(node), len(secret)));
            set.fields.extend_from_slice(node.as_bytes());
            set.fields.extend_from_slice(secret.as_bytes());
        }
        set
    }

    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Append the publish to node `i` with id `<kind><seq>.<sent_ns>` to `out`.
    pub fn write(&self, i: usize, kind: u8, seq: u64, sent_ns: u64, out: &mut Vec<u8>) {
        let (start, node, secret) = self.spans[i];
        let node_at = start as usize;
        let secret_at = node_at + node as usize;
        out.extend_from_slice(&self.pieces[0]);
        out.push(kind);
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{seq}.{sent_ns}");
        out.extend_from_slice(&self.pieces[1]);
        out.extend_from_slice(&self.fields[node_at..secret_at]);
        out.extend_from_slice(&self.pieces[2]);
        out.extend_from_slice(&self.fields[secret_at..secret_at + secret as usize]);
        out.extend_from_slice(&self.pieces[3]);
    }
}

/// A one-step `register-push-apns` command from `user`'s device `device`.
pub fn registration(user: &str, device: &str, token: &str) -> Template {
    Template::around_id(format!(
        "<iq xmlns='jabber:component:accept' type='set' id='\u{0}ID\u{0}' from='{user}@{SERVER_DOMAIN}/phone' to='{COMPONENT_JID}'><command xmlns='http://jabber.org/protocol/commands' node='register-push-apns' action='execute'><x xmlns='jabber:x:data' type='submit'><field var='token'><value>{token}</value></field><field var='device-id'><value>{device}</value></field><field var='app'><value>{APP}</value></field></x></command></iq>"
    ))
}

/// Conversations' `register-push-fcm` (p2's dialect, as `IqGenerator.pushTokenToAppServer` sends it) from
/// `user`'s device `android_id`: the FCM token and the device's id, no app, no form type.
pub fn fcm_registration(user: &str, android_id: &str, token: &str) -> Template {
    Template::around_id(format!(
        "<iq xmlns='jabber:component:accept' type='set' id='\u{0}ID\u{0}' from='{user}@{SERVER_DOMAIN}/Conversations.bnch' to='{COMPONENT_JID}'><command xmlns='http://jabber.org/protocol/commands' node='register-push-fcm' action='execute'><x xmlns='jabber:x:data' type='submit'><field var='token'><value>{token}</value></field><field var='android-id'><value>{android_id}</value></field></x></command></iq>"
    ))
}

/// The text of the first `<value>` of the data-form field `var` in `stanza`, if there is one (enough
/// for knock's command replies: no CDATA, values without markup).
pub fn field_value<'a>(stanza: &'a str, var: &str) -> Option<&'a str> {
    let at = [format!("var='{var}'"), format!("var=\"{var}\"")]
        .iter()
        .find_map(|attr| stanza.find(attr.as_str()))?;
    let rest = &stanza[at..];
    let field_end = rest.find("</field>").unwrap_or(rest.len());
    let rest = &rest[..field_end];
    let start = rest.find("<value>")? + "<value>".len();
    let end = rest[start..].find("</value>")? + start;
    Some(&rest[start..end])
}

/// The id's send time and kind, if it is one of ours.
pub fn parse_id(id: &[u8]) -> Option<(u8, u64)> {
    let (&kind, rest) = id.split_first()?;
    let dot = rest.iter().position(|&b| b == b'.')?;
    let sent = std::str::from_utf8(&rest[dot + 1..]).ok()?.parse().ok()?;
    Some((kind, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_the_stanza_stays_whole() {
        let set = Publishes::new([("n0de", "s3cret"), ("other", "pass")]);
        assert_eq!(set.len(), 2);
        let mut out = Vec::new();
        set.write(0, b'p', 42, 123_456_789, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            prosody_publish_text("p42.123456789", "n0de", "s3cret")
        );
        let mut out = Vec::new();
        set.write(1, b'p', 7, 8, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            prosody_publish_text("p7.8", "other", "pass")
        );
        assert_eq!(parse_id(b"p42.123456789"), Some((b'p', 123_456_789)));
        assert_eq!(parse_id(b"p42"), None);
    }

    #[test]
    fn reads_a_command_reply_field() {
        let reply = r#"<iq type="result" id="f1.0"><command xmlns="http://jabber.org/protocol/commands" status="completed"><x xmlns="jabber:x:data" type="result"><field var="jid"><value>push.localhost</value></field><field var='node'><value>n0de</value></field><field var="secret"><value>s3cret</value></field><field var="empty"/></x></command></iq>"#;
        assert_eq!(field_value(reply, "jid"), Some("push.localhost"));
        assert_eq!(field_value(reply, "node"), Some("n0de"));
        assert_eq!(field_value(reply, "secret"), Some("s3cret"));
        assert_eq!(field_value(reply, "empty"), None);
        assert_eq!(field_value(reply, "missing"), None);
    }
}
