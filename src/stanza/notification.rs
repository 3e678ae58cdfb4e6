//! What a publish's notification says about delivery, and nothing else: whether the user's server marked
//! the stanza behind it important, and the payload a client encrypted for itself.
//!
//! Servers say "important" three ways: Prosody's `mod_cloud_notify` gives the summary form a non-empty
//! `last-message-body` only for important stanzas (a body, an encrypted message; a placeholder text by
//! default) and ejabberd sends one only for messages with a body; `mod_cloud_notify_priority_tag` adds
//! Tigase's `<priority>high</priority>`; `mod_cloud_notify_encrypted` replaces the summary with an
//! `<encrypted/>` payload for the client (a message or a call), which knock passes on unread. The body's
//! text is only tested for being empty: never kept, logged or forwarded.
//!
//! [`Notification::of_item`] reads a parsed item; the fast publish reader (`super::skip_item`) reads the
//! same facts straight from the bytes, by the same rules, and leaves encrypted payloads to this one.

use std::borrow::Cow;

use minidom::Element;
use xmpp_parsers::ns;

/// Tigase's priority tag (`mod_cloud_notify_priority_tag`).
pub const PRIORITY_NS: &str = "tigase:push:priority:0";
/// Tigase's encrypted push payloads (`mod_cloud_notify_encrypted`).
pub const ENCRYPT_NS: &str = "tigase:push:encrypt:0";
/// The summary field whose presence marks an important stanza.
pub const BODY_FIELD: &str = "last-message-body";
/// Longest encrypted payload read (base64 text); an app's own `max_payload_size` is checked later.
pub const MAX_ENCRYPTED_LEN: usize = 16 * 1024;

/// What a notification says about delivery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notification<'a> {
    /// The user's server marked the stanza important (see the module's header).
    pub important: bool,
    /// A payload the client encrypted for itself, to be passed on untouched.
    pub encrypted: Option<Encrypted<'a>>,
}

/// `<encrypted xmlns='tigase:push:encrypt:0' iv='..' [type='voip']>base64</encrypted>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encrypted<'a> {
    /// The base64 ciphertext, as sent.
    pub data: Cow<'a, str>,
    /// The base64 initialisation vector, as sent.
    pub iv: Cow<'a, str>,
    /// `type='voip'`: an incoming call, to be delivered as a call push.
    pub call: bool,
}

impl Notification<'static> {
    /// Read the payload of a publish's item. Anything but a notification says nothing; a malformed
    /// `<encrypted/>` is refused with the reason.
    pub fn of_item(payload: Option<&Element>) -> Result<Notification<'static>, &'static str> {
        let mut notification = Notification::default();
        let Some(payload) = payload.filter(|p| p.is("notification", ns::PUSH)) else {
            return Ok(notification);
        };
        for child in payload.children() {
            if child.is("x", ns::DATA_FORMS) {
                let body = child
                    .children()
                    .filter(|f| f.is("field", ns::DATA_FORMS) && f.attr("var") == Some(BODY_FIELD))
                    .flat_map(|f| f.children().filter(|v| v.is("value", ns::DATA_FORMS)));
                for value in body {
                    notification.important |= says_something(value)?;
                }
            } else if child.is("priority", PRIORITY_NS) {
                notification.important |= is_high(child)?;
            } else if child.is("encrypted", ENCRYPT_NS) {
                if notification.encrypted.is_some() {
                    return Err("more than one encrypted payload");
                }
                notification.encrypted = Some(Encrypted::of(child)?);
                notification.important = true;
            }
        }
        Ok(notification)
    }
}

/// The text of an element without children; `Err` when it has children, which the fast reader does not
/// read either (so the two can never disagree on such a value).
fn text_only(element: &Element) -> Result<String, &'static str> {
    if element.children().next().is_some() {
        return Err("a notification value with child elements");
    }
    Ok(element.text())
}

/// Whether a summary body value is non-empty.
fn says_something(value: &Element) -> Result<bool, &'static str> {
    Ok(is_body(&text_only(value)?))
}

/// Whether a priority tag says `high`.
fn is_high(priority: &Element) -> Result<bool, &'static str> {
    Ok(is_high_text(&text_only(priority)?))
}

/// The rule for a summary body's text, shared with the fast reader.
pub fn is_body(text: &str) -> bool {
    !text.trim().is_empty()
}

/// The rule for a priority tag's text, shared with the fast reader.
pub fn is_high_text(text: &str) -> bool {
    text.trim() == "high"
}

impl Encrypted<'static> {
    fn of(element: &Element) -> Result<Encrypted<'static>, &'static str> {
        let iv = element
            .attr("iv")
            .filter(|iv| !iv.is_empty())
            .ok_or("an encrypted payload without its iv")?;
        let data = text_only(element)?;
        let data = data.trim();
        if data.is_empty() {
            return Err("an empty encrypted payload");
        }
        if data.len() > MAX_ENCRYPTED_LEN || iv.len() > 256 {
            return Err("an encrypted payload too large to push");
        }
        Ok(Encrypted {
            data: Cow::Owned(data.to_owned()),
            iv: Cow::Owned(iv.to_owned()),
            call: element.attr("type") == Some("voip"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(xml: &str) -> Element {
        xml.parse().expect("well-formed")
    }

    #[test]
    fn prosody_and_ejabberd_summaries() {
        let important = item("<notification xmlns='urn:xmpp:push:0'><x xmlns='jabber:x:data' type='form'><field type='hidden' var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field><field type='text-single' var='message-count'><value>1</value></field><field type='text-single' var='last-message-body'><value>New Message!</value></field></x></notification>");
        assert!(
            Notification::of_item(Some(&important))
                .expect("reads")
                .important
        );
        let quiet = item("<notification xmlns='urn:xmpp:push:0'><x xmlns='jabber:x:data' type='form'><field type='text-single' var='message-count'><value>1</value></field><field type='text-single' var='last-message-body'/></x></notification>");
        assert_eq!(
            Notification::of_item(Some(&quiet)).expect("reads"),
            Notification::default()
        );
        let bare = item("<notification xmlns='urn:xmpp:push:0'/>");
        assert!(!Notification::of_item(Some(&bare)).expect("reads").important);
        assert!(!Notification::of_item(None).expect("reads").important);
        // The same words in another namespace say nothing.
        let foreign = item("<notification xmlns='urn:xmpp:push:0'><x xmlns='urn:other'><field var='last-message-body'><value>x</value></field></x><priority xmlns='urn:other'>high</priority></notification>");
        assert!(
            !Notification::of_item(Some(&foreign))
                .expect("reads")
                .important
        );
    }

    #[test]
    fn tigase_priority_and_encrypted_payloads() {
        let high = item("<notification xmlns='urn:xmpp:push:0'><priority xmlns='tigase:push:priority:0'>high</priority></notification>");
        assert!(Notification::of_item(Some(&high)).expect("reads").important);
        // Prosody's capture (../shared/reference/publish-prosody-encrypted-voip.xml), payload shortened.
        let call = item("<notification xmlns='urn:xmpp:push:0'><encrypted iv='Ug8KJMBE/qdUdshT' type='voip' xmlns='tigase:push:encrypt:0'>tOJiO8lWg110v4H/hjjC6mgc5jZtD8Nzs==</encrypted><priority xmlns='tigase:push:priority:0'>high</priority></notification>");
        let read = Notification::of_item(Some(&call)).expect("reads");
        assert_eq!(
            read.encrypted,
            Some(Encrypted {
                data: "tOJiO8lWg110v4H/hjjC6mgc5jZtD8Nzs==".into(),
                iv: "Ug8KJMBE/qdUdshT".into(),
                call: true,
            })
        );
        assert!(read.important);
        for bad in [
            "<encrypted xmlns='tigase:push:encrypt:0'>abc</encrypted>",
            "<encrypted xmlns='tigase:push:encrypt:0' iv='a'/>",
            "<encrypted xmlns='tigase:push:encrypt:0' iv='a'>x</encrypted><encrypted xmlns='tigase:push:encrypt:0' iv='a'>x</encrypted>",
            "<encrypted xmlns='tigase:push:encrypt:0' iv='a'><b/></encrypted>",
        ] {
            let xml = format!("<notification xmlns='urn:xmpp:push:0'>{bad}</notification>");
            assert!(Notification::of_item(Some(&item(&xml))).is_err(), "{bad}");
        }
    }
}
