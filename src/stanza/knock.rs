//! The knock element (knock's own protocol, `xep/knock-registration.md` §19): someone holding a knock token
//! asks knock to wake the token's owner. `<knock xmlns='knock:token:0' token='…'/>`, in an IQ set.
//!
//! The namespace is knock's, in the style of Tigase's `tigase:push:…` ones, and not under `urn:xmpp:`, which
//! only the XSF assigns. Unknown attributes and children are ignored, so a later revision may add some.

use xso::{AsXml, FromXml};

/// The knock-token protocol's namespace (also its disco#info feature).
pub const NS: &str = "knock:token:0";

/// A knock: wake the owner of this token.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq)]
#[xml(namespace = NS, name = "knock", on_unknown_attribute = Discard, on_unknown_child = Discard)]
pub struct Knock {
    /// The token as its owner handed it out: 43 characters of URL-safe base64 (256 bits).
    #[xml(attribute)]
    pub token: String,
}

impl xmpp_parsers::iq::IqSetPayload for Knock {}

#[cfg(test)]
mod tests {
    use super::*;
    use minidom::Element;

    #[test]
    fn reads_a_knock_and_refuses_one_without_a_token() {
        let elem: Element = "<knock xmlns='knock:token:0' token='abc' future='x'/>"
            .parse()
            .expect("xml");
        assert_eq!(Knock::try_from(elem).expect("knock").token, "abc");
        let elem: Element = "<knock xmlns='knock:token:0'/>".parse().expect("xml");
        assert!(Knock::try_from(elem).is_err());
    }
}
