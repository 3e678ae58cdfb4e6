//! Registration in Tigase's dialect, as Siskin, Snikket iOS and Beagle speak it: ad-hoc `register-device`
//! with `provider` (an id the admin maps to an app, e.g. Siskin's `tigase:messenger:apns:1`),
//! `device-token` and, when the user's server can push calls, `device-second-token` (the PushKit VoIP
//! token); the completed reply carries `node`, `features` and `max-payload-size`. `unregister-device`
//! takes `provider` and `device-token`.
//!
//! The client's `<enable/>` at its own server carries no secret, so publishes to these nodes are accepted
//! from the registering user's server alone. The app's push must name the account, so the user's bare JID
//! is kept with the registration (sealed at rest), for these registrations only.

use xmpp_parsers::data_forms::{DataForm, DataFormType, Field, FieldType, Option_};
use xmpp_parsers::jid::Jid;

use super::commands::{form_stage, CommandInfo, Verb};
use super::{delete, device_token, form_values, optional, required, save, HandlerError};
use crate::app::{App, PushApp};
use crate::push::Token;
use crate::stanza::notification::ENCRYPT_NS;
use crate::stanza::xep0050::{Command, Status};
use crate::store::secrets::random_id;
use crate::store::{Digest, Registration};

/// Register a device.
pub const REGISTER: &str = "register-device";
/// Unregister a device.
pub const UNREGISTER: &str = "unregister-device";

/// What knock can do with a Tigase registration's pushes, as `features` says it in the reply and
/// disco#info lists it: pass encrypted payloads through, and push calls to a second token.
pub const FEATURES: &[&str] = &[ENCRYPT_NS, "tigase:push:encrypt:aes-128-gcm", JINGLE_NS];
/// Tigase's call pushes: a client sends its VoIP token only to an App Server that can push calls.
pub const JINGLE_NS: &str = "tigase:push:jingle:0";

/// Run a submitted `register-device` or `unregister-device`.
pub async fn execute(
    app: &App,
    from: &Jid,
    command: &Command,
    verb: Verb,
    form: &DataForm,
) -> Result<Command, HandlerError> {
    let values = form_values(form)?;
    let provider = required(&values, "provider")?;
    let Some(push_app) = app.app_for_tigase_provider(provider) else {
        return Err(HandlerError::bad_request(
            "unknown provider: this push service does not serve it",
        ));
    };
    // By the app's provider's rules: Siskin sends its APNs token in upper case, PushKit's in lower.
    let token = device_token(&push_app, required(&values, "device-token")?)?;
    let bare = from.to_bare();
    let device = app
        .keys
        .device_by_token(bare.as_str(), token.as_bytes(), &push_app.name);

    if verb == Verb::Unregister {
        let Some(node) = app.store.node_for_device(&device)? else {
            // Siskin takes this as "already gone".
            return Err(HandlerError::item_not_found(
                "this device is not registered",
            ));
        };
        delete(app, &node).await?;
        tracing::debug!(app = %push_app.name, "device unregistered (Tigase dialect)");
        return Ok(Command::reply(command, Status::Completed, None, random_id));
    }

    let call_token = optional(&values, "device-second-token")
        .map(|t| device_token(&push_app, t))
        .transpose()?;
    let node = register(app, from, &push_app, device, token, call_token).await?;
    tracing::debug!(app = %push_app.name, "device registered (Tigase dialect)");
    let mut features = Field::new("features", FieldType::TextMulti);
    features.values = FEATURES.iter().map(|f| (*f).to_owned()).collect();
    let result = DataForm {
        type_: DataFormType::Result_,
        title: None,
        instructions: None,
        fields: vec![
            Field::text_single("node", &node),
            features,
            Field::text_single("max-payload-size", &push_app.max_payload_size.to_string()),
        ],
    };
    Ok(Command::reply(
        command,
        Status::Completed,
        Some(result),
        random_id,
    ))
}

/// Store the registration; the same device (user, token, app) keeps its node.
async fn register(
    app: &App,
    from: &Jid,
    push_app: &PushApp,
    device: Digest,
    token: Token,
    call_token: Option<Token>,
) -> Result<String, HandlerError> {
    let bare = from.to_bare();
    let node = match app.store.node_for_device(&device)? {
        Some(node) => node,
        None => random_id(),
    };
    let registration = Registration {
        node: node.clone(),
        device,
        owner: app.keys.owner(bare.as_str()),
        domain: from.domain().to_string(),
        app: push_app.name.clone(),
        provider: push_app.provider.kind(),
        token,
        secret_hash: None,
        call_token,
        account: Some(bare.to_string()),
    };
    save(app, &registration).await?;
    Ok(node)
}

/// The first stage of a two-step execution, for generic ad-hoc clients.
pub fn ask_for_form(app: &App, request: &Command, info: &CommandInfo) -> Command {
    let ids: Vec<String> = app
        .apps()
        .iter()
        .flat_map(|a| a.tigase_providers.iter().cloned())
        .collect();
    let mut provider = Field::new("provider", FieldType::ListSingle);
    provider.label = Some("Push provider".into());
    provider.required = true;
    provider.values = ids.first().cloned().into_iter().collect();
    provider.options = ids
        .into_iter()
        .map(|value| Option_ { label: None, value })
        .collect();
    let mut token = Field::new("device-token", FieldType::TextSingle);
    token.label = Some("Device token".into());
    token.required = true;
    let mut fields = vec![provider, token];
    if info.verb == Verb::Register {
        let mut second = Field::new("device-second-token", FieldType::TextSingle);
        second.label = Some("Call (VoIP) token, if any".into());
        fields.push(second);
    }
    let instructions = match info.verb {
        Verb::Register => "Provider: your app's push provider. Device token: the token your app got for this \
                           device; the call token is the app's VoIP token, if it takes calls. The reply gives \
                           the node your client then enables at your own server (XEP-0357), with no secret."
            .to_owned(),
        Verb::Unregister => "The provider and device token this device was registered with.".to_owned(),
    };
    form_stage(request, info, instructions, fields)
}
