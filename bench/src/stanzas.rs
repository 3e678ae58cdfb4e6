//! What the load generator sends: Prosody 0.12's publish, byte for byte, and a client's XEP-0050
//! registration, each cut around its `id` so that sending one costs a copy and a number, not a format.

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
/// integration tests; only the id, node and secret change).
pub fn prosody_publish(node: &str, secret: &str) -> Template {
    Template::around_id(format!(
        "<iq xmlns='jabber:component:accept' from='{SERVER_DOMAIN}' to='{COMPONENT_JID}' id='\u{0}ID\u{0}' type='set'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item><notification xmlns='urn:xmpp:push:0'><x xmlns='jabber:x:data' type='form'><field type='hidden' var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field><field type='text-single' var='message-count'><value>1</value></field><field type='text-single' var='pending-subscription-count'/><field type='jid-single' var='last-message-sender'/><field type='text-single' var='last-message-body'><value>New Message!</value></field></x></notification></item></publish><publish-options><x type='submit' xmlns='jabber:x:data'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>{secret}</value></field></x></publish-options></pubsub></iq>"
    ))
}

/// A one-step `register-push-apns` command from `user`'s device `device`.
pub fn registration(user: &str, device: &str, token: &str) -> Template {
    Template::around_id(format!(
        "<iq xmlns='jabber:component:accept' type='set' id='\u{0}ID\u{0}' from='{user}@{SERVER_DOMAIN}/phone' to='{COMPONENT_JID}'><command xmlns='http://jabber.org/protocol/commands' node='register-push-apns' action='execute'><x xmlns='jabber:x:data' type='submit'><field var='token'><value>{token}</value></field><field var='device-id'><value>{device}</value></field><field var='app'><value>{APP}</value></field></x></command></iq>"
    ))
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
        let t = prosody_publish("n0de", "s3cret");
        let mut out = Vec::new();
        t.write(b'p', 42, 123_456_789, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("id='p42.123456789'"));
        assert!(text.contains("<publish node='n0de'>"));
        assert!(text.contains("<value>s3cret</value>"));
        assert!(text.ends_with("</iq>"));
        assert_eq!(parse_id(b"p42.123456789"), Some((b'p', 123_456_789)));
        assert_eq!(parse_id(b"p42"), None);
    }
}
