//! The XEP-0050 ad-hoc command element, typed with xso (xmpp-parsers 0.23 has none).
//!
//! Only the parts knock uses: `node`, `action`, `status`, `sessionid`, the `<actions/>` hint, `<note/>`, one
//! data form and, in a listing's reply, one multi-item result ([`Report`]). Unknown attributes and children
//! are ignored rather than rejected, so newer clients still work.

use std::borrow::Cow;

use rxml::{xml_ncname, Namespace};
use xmpp_parsers::data_forms::DataForm;

use super::report::Report;
use xso::{error::Error, AsXml, AsXmlText, FromXml, FromXmlText};

/// The XEP-0050 namespace.
pub const NS: &str = "http://jabber.org/protocol/commands";

/// Generates a text-valued enum for an XML attribute.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vmeta])* $variant,)+ }

        impl FromXmlText for $name {
            fn from_xml_text(data: String) -> Result<Self, Error> {
                match data.as_str() {
                    $($text => Ok($name::$variant),)+
                    _ => Err(Error::Other(concat!("unknown ", stringify!($name), " value"))),
                }
            }
        }

        impl AsXmlText for $name {
            fn as_xml_text(&self) -> Result<Cow<'_, str>, Error> {
                Ok(Cow::Borrowed(match self { $($name::$variant => $text,)+ }))
            }
        }
    };
}

text_enum!(
    /// What the requester wants done (`action` attribute).
    Action {
        /// Run the command, or submit its form.
        Execute => "execute",
        /// Submit the form and finish.
        Complete => "complete",
        /// Submit the form and go to the next stage.
        Next => "next",
        /// Go back a stage.
        Prev => "prev",
        /// Abandon the session.
        Cancel => "cancel",
    }
);

text_enum!(
    /// Where the command stands (`status` attribute of a reply).
    Status {
        /// More input is expected.
        Executing => "executing",
        /// Done.
        Completed => "completed",
        /// Abandoned.
        Canceled => "canceled",
    }
);

text_enum!(
    /// Severity of a `<note/>`.
    NoteType {
        /// Informational.
        Info => "info",
        /// A warning.
        Warn => "warn",
        /// An error.
        Error => "error",
    }
);

/// A human-readable note in a command reply.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq)]
#[xml(namespace = NS, name = "note", on_unknown_attribute = Discard)]
pub struct Note {
    /// Severity; `info` when absent.
    #[xml(attribute(name = "type", default))]
    pub type_: Option<NoteType>,
    /// The text.
    #[xml(text)]
    pub text: String,
}

/// The `<actions/>` hint: which actions the requester may take next.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq, Default)]
#[xml(namespace = NS, name = "actions", on_unknown_attribute = Discard, on_unknown_child = Discard)]
pub struct Actions {
    /// The default action.
    #[xml(attribute(default))]
    pub execute: Option<Action>,
    /// `<complete/>` is allowed.
    #[xml(flag(namespace = NS, name = "complete"))]
    pub complete: bool,
    /// `<next/>` is allowed.
    #[xml(flag(namespace = NS, name = "next"))]
    pub next: bool,
    /// `<prev/>` is allowed.
    #[xml(flag(namespace = NS, name = "prev"))]
    pub prev: bool,
}

/// The `<command/>` element, in requests and replies.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq)]
#[xml(namespace = NS, name = "command", on_unknown_attribute = Discard, on_unknown_child = Discard)]
pub struct Command {
    /// Which command, e.g. `register-push-apns`.
    #[xml(attribute)]
    pub node: String,
    /// Requested action; `execute` when absent.
    #[xml(attribute(default))]
    pub action: Option<Action>,
    /// Reply status.
    #[xml(attribute(default))]
    pub status: Option<Status>,
    /// Session id for multi-stage commands.
    #[xml(attribute(default))]
    pub sessionid: Option<String>,
    /// Allowed next actions (replies with status `executing`).
    #[xml(child(default))]
    pub actions: Option<Actions>,
    /// Notes for the user.
    #[xml(child(n = ..))]
    pub notes: Vec<Note>,
    /// The form to fill in, the submitted form, or the result form.
    #[xml(child(default))]
    pub form: Option<DataForm>,
    /// A result table (XEP-0004 multi-item), in replies that list things. Never read from a request: a
    /// form there is [`Command::form`].
    #[xml(child(default))]
    pub report: Option<Report>,
}

impl Command {
    /// The element sent on the wire. Every field of its form names its `type`, the text-single ones too:
    /// XEP-0004 makes text-single the default, and xmpp-parsers leaves the default out, but some ad-hoc
    /// clients (libstrophe's) let a user edit only the fields whose type they are told.
    pub fn into_element(self) -> minidom::Element {
        let mut element = minidom::Element::from(self);
        for form in element
            .children_mut()
            .filter(|c| c.is("x", xmpp_parsers::ns::DATA_FORMS))
        {
            name_field_types(form);
            // A table's columns too (its rows' fields carry values only).
            if let Some(columns) = form.get_child_mut("reported", xmpp_parsers::ns::DATA_FORMS) {
                name_field_types(columns);
            }
        }
        element
    }
}

/// Give each field directly under `parent` without a `type` the default one, spelled out.
fn name_field_types(parent: &mut minidom::Element) {
    for field in parent.children_mut().filter(|c| c.name() == "field") {
        if field.attr("type").is_none() {
            field.set_attr(
                Namespace::NONE,
                xml_ncname!("type").to_owned(),
                "text-single",
            );
        }
    }
}

impl xmpp_parsers::iq::IqSetPayload for Command {}
impl xmpp_parsers::iq::IqResultPayload for Command {}

impl Command {
    /// A reply to `request` with the given status and form, carrying over node and session (XEP-0050 wants a
    /// `sessionid` on every reply; `new_session` supplies one when the request had none).
    pub fn reply(
        request: &Command,
        status: Status,
        form: Option<DataForm>,
        new_session: impl FnOnce() -> String,
    ) -> Command {
        Command {
            node: request.node.clone(),
            action: None,
            status: Some(status),
            sessionid: Some(request.sessionid.clone().unwrap_or_else(new_session)),
            actions: None,
            notes: Vec::new(),
            form,
            report: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minidom::Element;

    #[test]
    fn parses_a_p2_style_submission() {
        let xml = "<command xmlns='http://jabber.org/protocol/commands' node='register-push-apns' action='execute' extra='x'>\
            <x xmlns='jabber:x:data' type='submit'>\
            <field var='token'><value>abcd</value></field>\
            <field var='device-id'><value>dev1</value></field></x></command>";
        let elem: Element = xml.parse().expect("xml");
        let cmd = Command::try_from(elem).expect("command");
        assert_eq!(cmd.node, "register-push-apns");
        assert_eq!(cmd.action, Some(Action::Execute));
        assert_eq!(cmd.form.map(|f| f.fields.len()), Some(2));
    }

    #[test]
    fn round_trips_a_reply_with_actions() {
        let request = Command {
            node: "n".into(),
            action: None,
            status: None,
            sessionid: Some("s".into()),
            actions: None,
            notes: vec![],
            form: None,
            report: None,
        };
        let mut reply = Command::reply(&request, Status::Executing, None, || "fresh".into());
        reply.actions = Some(Actions {
            execute: Some(Action::Complete),
            complete: true,
            ..Actions::default()
        });
        let elem = Element::from(reply.clone());
        assert!(elem
            .get_child("actions", NS)
            .and_then(|a| a.get_child("complete", NS))
            .is_some());
        assert_eq!(Command::try_from(elem).expect("parse"), reply);
    }

    #[test]
    fn rejects_an_unknown_action() {
        let xml =
            "<command xmlns='http://jabber.org/protocol/commands' node='n' action='explode'/>";
        let elem: Element = xml.parse().expect("xml");
        assert!(Command::try_from(elem).is_err());
    }
}
