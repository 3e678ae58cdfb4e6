//! Registration by the XEP-0357 `<enable/>`/`<disable/>` shorthand, sent to knock itself.
//!
//! The client sends knock the very `<enable/>` it sends its own server, with `token` (and optionally `app`
//! and `device-id`) added to the publish-options form. The node and secret are the client's choice, so they
//! must be long enough to be unguessable. `<disable/>` removes a node, but only for the JID that enabled it.
//! `<enable/>` stores through [`super::save`], so it is capped exactly as the commands are.

use xmpp_parsers::jid::Jid;
use xmpp_parsers::push::{Disable, Enable};

use super::{
    delete, device_id, device_token, form_values, optional, push_app, required, save, HandlerError,
};
use crate::app::App;
use crate::store::secrets::secret_hash;
use crate::store::Registration;

/// Shortest node or secret a client may choose: 22 URL-safe characters carry 128 bits.
pub const MIN_CHOSEN_LEN: usize = 22;
/// Longest node knock stores.
pub const MAX_NODE_LEN: usize = 256;

const PUBLISH_OPTIONS: &str = "http://jabber.org/protocol/pubsub#publish-options";

fn check_node(
    app: &App,
    jid: &xmpp_parsers::jid::BareJid,
    node: Option<&str>,
) -> Result<String, HandlerError> {
    if *jid != app.jid {
        return Err(HandlerError::bad_request(
            "jid must be this push service's JID",
        ));
    }
    let node = node.ok_or_else(|| HandlerError::bad_request("node is required"))?;
    if node.len() < MIN_CHOSEN_LEN
        || node.len() > MAX_NODE_LEN
        || !node.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(HandlerError::bad_request(format!(
            "node must be {MIN_CHOSEN_LEN} to {MAX_NODE_LEN} printable ASCII characters"
        )));
    }
    Ok(node.to_owned())
}

/// Register (or update) the node named in an `<enable/>`.
pub async fn enable(app: &App, from: &Jid, enable: Enable) -> Result<(), HandlerError> {
    let node = check_node(app, &enable.jid, enable.node.as_deref())?;
    let form = enable.form.as_ref().ok_or_else(|| {
        HandlerError::bad_request("publish-options form with secret and token is required")
    })?;
    if form.form_type().is_some_and(|t| t != PUBLISH_OPTIONS) {
        return Err(HandlerError::bad_request(format!(
            "form must be {PUBLISH_OPTIONS}"
        )));
    }
    let values = form_values(form)?;
    // The secret is compared byte for byte at publish time, so it is taken exactly as sent, spaces and all.
    let secret = values.get("secret").copied().unwrap_or("");
    if secret.len() < MIN_CHOSEN_LEN {
        return Err(HandlerError::bad_request(format!(
            "secret must be at least {MIN_CHOSEN_LEN} characters"
        )));
    }
    let push_app = push_app(app, optional(&values, "app"), None)?;
    let token = device_token(&push_app, required(&values, "token")?)?;
    let bare = from.to_bare();
    // Shorthand devices live in their own namespace, so a command registration for the same device id never
    // hands out a derived secret for a node whose secret the client chose. Without a device id, the node
    // itself names the device.
    let device = match optional(&values, "device-id") {
        Some(id) => format!("enable:{}", device_id(id)?),
        None => format!("enable-node:{node}"),
    };
    let registration = Registration {
        device: app.keys.device(bare.as_str(), &device, &push_app.name),
        owner: app.keys.owner(bare.as_str()),
        domain: from.domain().to_string(),
        app: push_app.name.clone(),
        provider: push_app.provider.kind(),
        token,
        secret_hash: Some(secret_hash(secret)),
        call_token: None,
        account: None,
        node,
    };
    save(app, &registration).await?;
    tracing::debug!(app = %push_app.name, "device enabled by shorthand");
    Ok(())
}

/// Remove the node named in a `<disable/>`, if `from` enabled it.
pub async fn disable(app: &App, from: &Jid, disable: Disable) -> Result<(), HandlerError> {
    let node = check_node(app, &disable.jid, disable.node.as_deref())?;
    let owner = app.keys.owner(from.to_bare().as_str());
    // Someone else's node looks exactly like a missing one: no probing for nodes.
    match app.store.get(&node)? {
        Some(registration) if registration.owner == owner => {
            delete(app, &node).await?;
            tracing::debug!("device disabled by shorthand");
            Ok(())
        }
        _ => Err(HandlerError::item_not_found("no such node")),
    }
}
