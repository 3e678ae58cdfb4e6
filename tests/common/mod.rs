//! Stanzas as real servers and clients send them, and reply readers, shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use knock::app::{App, PushApp};
use knock::push::{Provider, ProviderKind, PushOutcome, Wakeup};
use knock::store::SledStore;
use minidom::Element;

pub mod fixture;
pub mod harness;

/// The stream namespace of a component link.
pub const NS: &str = "jabber:component:accept";
/// A well-formed APNs token.
pub const TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
/// Another one.
pub const TOKEN2: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

/// Parse test XML.
pub fn xml(text: &str) -> Element {
    text.parse().expect("test XML parses")
}

/// A one-step `register-push-apns` with `extra` fields appended to the form.
pub fn register_xml(id: &str, from: &str, device: &str, token: &str, extra: &str) -> String {
    format!(
        "<iq xmlns='{NS}' type='set' id='{id}' from='{from}' to='push.localhost'>\
         <command xmlns='http://jabber.org/protocol/commands' node='register-push-apns' action='execute'>\
         <x xmlns='jabber:x:data' type='submit'>\
         <field var='token'><value>{token}</value></field>\
         <field var='device-id'><value>{device}</value></field>{extra}</x></command></iq>"
    )
}

/// `register-push-fcm` exactly as the Conversations family sends it (`IqGenerator.pushTokenToAppServer`):
/// `token` and `android-id`, no FORM_TYPE, one stage; `extra` adds fields (an older fork's `muc`).
pub fn conversations_register_xml(
    id: &str,
    from: &str,
    android_id: &str,
    token: &str,
    extra: &str,
) -> String {
    format!(
        "<iq xmlns='{NS}' type='set' id='{id}' from='{from}' to='push.localhost'>\
         <command xmlns='http://jabber.org/protocol/commands' node='register-push-fcm' action='execute'>\
         <x xmlns='jabber:x:data' type='submit'>\
         <field var='token'><value>{token}</value></field>\
         <field var='android-id'><value>{android_id}</value></field>{extra}</x></command></iq>"
    )
}

/// `unregister-push-fcm` as Conversations sends it for a group chat (`unregisterChannelOnAppServer`), or,
/// with no `channel`, for the device's own registration.
pub fn conversations_unregister_xml(
    id: &str,
    from: &str,
    android_id: &str,
    channel: Option<&str>,
) -> String {
    let channel = channel
        .map(|c| format!("<field var='channel'><value>{c}</value></field>"))
        .unwrap_or_default();
    format!(
        "<iq xmlns='{NS}' type='set' id='{id}' from='{from}' to='push.localhost'>\
         <command xmlns='http://jabber.org/protocol/commands' node='unregister-push-fcm' action='execute'>\
         <x xmlns='jabber:x:data' type='submit'>{channel}\
         <field var='android-id'><value>{android_id}</value></field></x></command></iq>"
    )
}

/// `unregister-push-apns` for a device.
pub fn unregister_xml(id: &str, from: &str, device: &str) -> String {
    format!(
        "<iq xmlns='{NS}' type='set' id='{id}' from='{from}' to='push.localhost'>\
         <command xmlns='http://jabber.org/protocol/commands' node='unregister-push-apns' action='execute'>\
         <x xmlns='jabber:x:data' type='submit'><field var='device-id'><value>{device}</value></field></x>\
         </command></iq>"
    )
}

/// The publish Prosody 0.12 sends (verbatim capture; id, from, node and secret substituted).
pub fn prosody_publish(id: &str, from: &str, node: &str, secret: &str) -> String {
    format!("<iq xmlns='{NS}' from='{from}' to='push.localhost' id='{id}' type='set'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item><notification xmlns='urn:xmpp:push:0'><x xmlns='jabber:x:data' type='form'><field type='hidden' var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field><field type='text-single' var='message-count'><value>1</value></field><field type='text-single' var='pending-subscription-count'/><field type='jid-single' var='last-message-sender'/><field type='text-single' var='last-message-body'><value>New Message!</value></field></x></notification></item></publish><publish-options><x type='submit' xmlns='jabber:x:data'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>{secret}</value></field></x></publish-options></pubsub></iq>")
}

/// The publish ejabberd 23.01 sends (verbatim capture; id, from, node and secret substituted).
pub fn ejabberd_publish(id: &str, from: &str, node: &str, secret: &str) -> String {
    format!("<iq xmlns='{NS}' to='push.localhost' from='{from}' type='set' id='{id}'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item><notification xmlns='urn:xmpp:push:0'><x type='submit' xmlns='jabber:x:data'><field var='FORM_TYPE' type='hidden'><value>urn:xmpp:push:summary</value></field><field var='last-message-body' type='text-single' label='The body text of the last received message'><value>New message</value></field></x></notification></item></publish><publish-options><x type='submit' xmlns='jabber:x:data'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>{secret}</value></field></x></publish-options></pubsub></iq>")
}

/// (type, condition) of an error reply, or `None` for a result.
pub fn error_of(reply: &Element) -> Option<(String, String)> {
    if reply.attr("type") == Some("result") {
        return None;
    }
    assert_eq!(reply.attr("type"), Some("error"), "{}", String::from(reply));
    let error = reply.get_child("error", NS).expect("error child");
    let condition = error
        .children()
        .find(|c| c.ns() == "urn:ietf:params:xml:ns:xmpp-stanzas" && c.name() != "text")
        .expect("a defined condition");
    Some((
        error.attr("type").expect("error type").to_owned(),
        condition.name().to_owned(),
    ))
}

/// Shorthand for an expected error.
pub fn err(kind: &str, condition: &str) -> Option<(String, String)> {
    Some((kind.into(), condition.into()))
}

/// A field of the data form inside a command reply.
pub fn field(reply: &Element, var: &str) -> Option<String> {
    let command = reply.get_child("command", "http://jabber.org/protocol/commands")?;
    let form = command.get_child("x", "jabber:x:data")?;
    form.children()
        .find(|f| f.attr("var") == Some(var))
        .and_then(|f| f.get_child("value", "jabber:x:data"))
        .map(|v| v.text())
}

/// The (node, secret) of a completed registration reply.
pub fn node_and_secret(reply: &Element) -> (String, String) {
    assert_eq!(error_of(reply), None, "{}", String::from(reply));
    let command = reply
        .get_child("command", "http://jabber.org/protocol/commands")
        .expect("command");
    assert_eq!(command.attr("status"), Some("completed"));
    assert_eq!(field(reply, "jid").as_deref(), Some("push.localhost"));
    (
        field(reply, "node").expect("node"),
        field(reply, "secret").expect("secret"),
    )
}

/// A push provider that delivers every wake-up and counts them.
#[derive(Default)]
pub struct Counting {
    woken: AtomicUsize,
}

impl Counting {
    /// Wake-ups so far.
    pub fn woken(&self) -> usize {
        self.woken.load(Ordering::SeqCst)
    }
}

impl Provider for Counting {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Apns
    }

    fn wake<'a>(&'a self, _: Wakeup<'a>) -> BoxFuture<'a, PushOutcome> {
        self.woken.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { PushOutcome::Delivered })
    }
}

/// knock's state on a real sled store in `dir`, with one app, `chat`, whose pushes all succeed, and no
/// rate limit.
pub fn counting_app(dir: &Path) -> (App, Arc<Counting>) {
    let store = SledStore::open(dir).expect("store opens");
    let backend = Arc::new(Counting::default());
    let app = App::builder("push.localhost".parse().expect("JID"), Arc::new(store))
        .apps(vec![PushApp::new("chat", backend.clone())])
        .publish_deadline(Duration::from_secs(2))
        .build()
        .expect("app");
    (app, backend)
}
