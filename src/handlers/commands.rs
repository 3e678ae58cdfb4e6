//! Registration (and knock's own commands: a self-test, knock tokens) by XEP-0050 ad-hoc commands, named as p2 (Conversations' App Server) names them: one
//! register and one unregister command per push service, each entry of [`COMMANDS`] naming its provider.
//!
//! `register-push-apns` and `register-push-fcm` take `token`, `device-id` (or p2's `android-id`, which the
//! Conversations family sends), an optional `app` (one of that provider's apps; the first is the default)
//! and, as p2 takes it, an optional `muc`: the bare JID of a group chat the device registers for apart from
//! its account. They complete with a result form carrying `jid`, `node` and `secret` for the client's
//! `<enable/>`. Executed without a form they answer the form to fill in, so generic ad-hoc UIs work. The same
//! (JID, device, app, group chat) always gets the same node and secret back; only the token changes.
//! `unregister-push-*` removes the device's registration, or the group chat's when `muc` or `channel` (the
//! room's [`p2_hash`], as Conversations sends it) names one. Storing goes through [`super::save`], which
//! applies the domain policy and the registration flood caps.
//!
//! A registration for a provider whose pushes must name the account ([`ProviderKind::p2_account`]: FCM,
//! for the Conversations family) keeps that name, sealed like the token.

use std::collections::HashMap;

use xmpp_parsers::data_forms::{DataForm, DataFormType, Field, FieldType, Option_};
use xmpp_parsers::jid::Jid;

use super::{
    delete, device_id, device_token, form_values, optional, push_app, required, save, HandlerError,
};
use crate::app::App;
use crate::push::{p2_hash, ProviderKind};
use crate::stanza::xep0050::{Action, Actions, Command, Status};
use crate::store::secrets::{random_id, secret_hash};
use crate::store::Registration;

/// A command knock offers.
#[derive(Debug)]
pub struct CommandInfo {
    /// The command node.
    pub node: &'static str,
    /// Its human-readable name, shown in disco#items.
    pub name: &'static str,
    /// What it does, in whose dialect.
    pub kind: CommandKind,
}

/// The commands knock speaks, by dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    /// p2's (Conversations' App Server): one command pair per push service, device ids, node + secret back.
    P2(ProviderKind, Verb),
    /// Tigase's (Siskin, Snikket iOS): `provider` ids configured per app, no secret ([`super::tigase`]).
    Tigase(Verb),
    /// knock's own: a test push to each of the caller's devices, whatever their dialect
    /// ([`super::selftest`]).
    SelfTest,
    /// knock's own: the caller's knock tokens ([`super::knock`]).
    Knock(super::knock::Op),
}

/// What a command does with a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Store (or update) its token and hand out node and secret.
    Register,
    /// Remove its registration.
    Unregister,
}

/// Register an APNs device.
pub const REGISTER_APNS: &str = "register-push-apns";
/// Unregister an APNs device.
pub const UNREGISTER_APNS: &str = "unregister-push-apns";
/// Register an FCM device (the Conversations family).
pub const REGISTER_FCM: &str = "register-push-fcm";
/// Unregister an FCM device.
pub const UNREGISTER_FCM: &str = "unregister-push-fcm";

/// Every command, in the order disco#items lists them.
pub const COMMANDS: &[CommandInfo] = &[
    CommandInfo {
        node: REGISTER_APNS,
        name: "Register an iOS device for push",
        kind: CommandKind::P2(ProviderKind::Apns, Verb::Register),
    },
    CommandInfo {
        node: UNREGISTER_APNS,
        name: "Unregister an iOS device",
        kind: CommandKind::P2(ProviderKind::Apns, Verb::Unregister),
    },
    CommandInfo {
        node: REGISTER_FCM,
        name: "Register an Android device for push",
        kind: CommandKind::P2(ProviderKind::Fcm, Verb::Register),
    },
    CommandInfo {
        node: UNREGISTER_FCM,
        name: "Unregister an Android device",
        kind: CommandKind::P2(ProviderKind::Fcm, Verb::Unregister),
    },
    CommandInfo {
        node: super::tigase::REGISTER,
        name: "Register a device (Tigase push)",
        kind: CommandKind::Tigase(Verb::Register),
    },
    CommandInfo {
        node: super::tigase::UNREGISTER,
        name: "Unregister a device (Tigase push)",
        kind: CommandKind::Tigase(Verb::Unregister),
    },
    CommandInfo {
        node: super::knock::CREATE,
        name: "Create a knock token for a contact",
        kind: CommandKind::Knock(super::knock::Op::Create),
    },
    CommandInfo {
        node: super::knock::LIST,
        name: "List my knock tokens",
        kind: CommandKind::Knock(super::knock::Op::List),
    },
    CommandInfo {
        node: super::knock::REVOKE,
        name: "Revoke a knock token",
        kind: CommandKind::Knock(super::knock::Op::Revoke),
    },
    CommandInfo {
        node: super::knock::ROTATE,
        name: "Rotate a knock token",
        kind: CommandKind::Knock(super::knock::Op::Rotate),
    },
    CommandInfo {
        node: super::selftest::NODE,
        name: "Send a test push to each of my devices",
        kind: CommandKind::SelfTest,
    },
];

/// The command with this node, if knock offers it.
pub fn by_node(node: &str) -> Option<&'static CommandInfo> {
    COMMANDS.iter().find(|c| c.node == node)
}

/// Whether a command is offered (listed, and run): p2's for a push service only when an app uses it,
/// Tigase's only when an app serves a Tigase provider id.
pub fn offered(app: &App, command: &CommandInfo) -> bool {
    match command.kind {
        CommandKind::SelfTest => true,
        CommandKind::Knock(_) => app.knock_tokens_per_user > 0,
        CommandKind::P2(provider, _) => app.apps().iter().any(|a| a.provider.kind() == provider),
        CommandKind::Tigase(_) => app.apps().iter().any(|a| !a.tigase_providers.is_empty()),
    }
}

/// Run a command for `from`.
pub async fn execute(app: &App, from: &Jid, command: Command) -> Result<Command, HandlerError> {
    let Some(info) = by_node(&command.node).filter(|info| offered(app, info)) else {
        return Err(HandlerError::item_not_found("no such command"));
    };
    match command.action.unwrap_or(Action::Execute) {
        Action::Cancel => return Ok(Command::reply(&command, Status::Canceled, None, random_id)),
        Action::Prev => return Err(HandlerError::bad_request("this command has a single stage")),
        Action::Execute | Action::Complete | Action::Next => {}
    }
    let submitted = command
        .form
        .as_ref()
        .filter(|f| f.type_ != DataFormType::Cancel && !f.fields.is_empty());
    let (provider, verb) = match info.kind {
        CommandKind::P2(provider, verb) => (provider, verb),
        // Nothing to fill in.
        CommandKind::SelfTest => return super::selftest::execute(app, from, &command).await,
        // Every field of these is optional, so a submitted form counts even when empty.
        CommandKind::Knock(op) => {
            let form = command
                .form
                .as_ref()
                .filter(|f| f.type_ == DataFormType::Submit);
            return super::knock::execute(app, from, &command, info, op, form).await;
        }
        CommandKind::Tigase(verb) => {
            return match submitted {
                Some(form) => super::tigase::execute(app, from, &command, verb, form).await,
                None => Ok(super::tigase::ask_for_form(app, &command, info, verb)),
            }
        }
    };
    let Some(form) = submitted else {
        return Ok(ask_for_form(app, &command, info, provider, verb));
    };
    let values = form_values(form)?;
    let device = required(&values, "device-id")
        .or_else(|_| required(&values, "android-id"))
        .map_err(|_| HandlerError::bad_request("missing field \"device-id\""))?;
    let device = device_id(device)?;
    let push_app = push_app(app, optional(&values, "app"), Some(provider))?;
    let bare = from.to_bare();
    let device_key = match channel(&values, device)? {
        None => app.keys.device(bare.as_str(), device, &push_app.name),
        Some(channel) => app
            .keys
            .device_channel(bare.as_str(), device, &channel, &push_app.name),
    };

    if verb == Verb::Unregister {
        let Some(node) = app.store.node_for_device(&device_key)? else {
            return Err(HandlerError::item_not_found(
                "this device is not registered",
            ));
        };
        delete(app, &node).await?;
        tracing::debug!(app = %push_app.name, "device unregistered");
        return Ok(Command::reply(&command, Status::Completed, None, random_id));
    }

    let token = device_token(&push_app, required(&values, "token")?)?;
    // A device keeps its node for life, so the client's <enable/> at its server stays valid.
    let node = match app.store.node_for_device(&device_key)? {
        Some(node) => node,
        None => random_id(),
    };
    let secret = app.keys.node_secret(&node);
    let registration = Registration {
        node: node.clone(),
        device: device_key,
        owner: app.keys.owner(bare.as_str()),
        domain: from.domain().to_string(),
        app: push_app.name.clone(),
        provider,
        token,
        secret_hash: Some(secret_hash(&secret)),
        call_token: None,
        account: provider.p2_account(bare.as_str(), device),
    };
    save(app, &registration).await?;
    tracing::debug!(app = %push_app.name, "device registered");
    let result = DataForm {
        type_: DataFormType::Result_,
        title: None,
        instructions: None,
        fields: vec![
            Field::new("jid", FieldType::JidSingle).with_value(app.jid.as_str()),
            Field::text_single("node", &node),
            Field::new("secret", FieldType::TextPrivate).with_value(&secret),
        ],
    };
    Ok(Command::reply(
        &command,
        Status::Completed,
        Some(result),
        random_id,
    ))
}

/// The group chat a p2 registration is for, by its channel id: `muc` names the room (a bare JID), and
/// `channel` its id as the client computed it ([`p2_hash`] of the room and the device); `None` for the
/// device's own registration.
fn channel(values: &HashMap<&str, &str>, device: &str) -> Result<Option<String>, HandlerError> {
    if let Some(muc) = optional(values, "muc") {
        let room = muc
            .parse::<Jid>()
            .ok()
            .filter(|jid| jid.resource().is_none())
            .ok_or_else(|| HandlerError::bad_request("muc must be the group chat's bare JID"))?;
        return Ok(Some(p2_hash(room.as_str(), device)));
    }
    match optional(values, "channel") {
        None => Ok(None),
        Some(id)
            if id.len() == 40 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(Some(id.to_owned()))
        }
        Some(_) => Err(HandlerError::bad_request(
            "channel must be the group chat's id: 40 lowercase hex digits",
        )),
    }
}

/// The first stage of a two-step execution: the form to fill in.
fn ask_for_form(
    app: &App,
    request: &Command,
    info: &CommandInfo,
    provider: ProviderKind,
    verb: Verb,
) -> Command {
    let mut fields = Vec::new();
    if verb == Verb::Register {
        let mut token = Field::new("token", FieldType::TextSingle);
        token.label = Some(provider.token_label().into());
        token.required = true;
        fields.push(token);
    }
    let mut device = Field::new("device-id", FieldType::TextSingle);
    device.label = Some("A stable id for this device".into());
    device.required = true;
    fields.push(device);
    let apps: Vec<_> = app
        .apps()
        .iter()
        .filter(|a| a.provider.kind() == provider)
        .cloned()
        .collect();
    if apps.len() > 1 {
        let mut choice = Field::new("app", FieldType::ListSingle);
        choice.label = Some("App".into());
        choice.options = apps
            .iter()
            .map(|a| Option_ {
                label: None,
                value: a.name.clone(),
            })
            .collect();
        if let Some(first) = apps.first() {
            choice.values = vec![first.name.clone()];
        }
        fields.push(choice);
    }
    // What a person filling the form in by hand needs to know: the fields alone do not say it.
    let instructions = match verb {
        Verb::Register => format!(
            "Token: the {} your app got for this device. Device id: any name that stays the same for \
             this installation. The reply gives the node and secret your client then enables at your own \
             server (XEP-0357).",
            provider.token_label()
        ),
        Verb::Unregister => {
            "Device id: the one this device was registered with.".to_owned()
        }
    };
    form_stage(request, info, instructions, fields)
}

/// The first stage of a two-step execution: a form titled with the command's name, completed in one step.
pub(super) fn form_stage(
    request: &Command,
    info: &CommandInfo,
    instructions: String,
    fields: Vec<Field>,
) -> Command {
    let form = DataForm {
        type_: DataFormType::Form,
        title: Some(info.name.to_owned()),
        instructions: Some(instructions),
        fields,
    };
    let mut reply = Command::reply(request, Status::Executing, Some(form), random_id);
    reply.actions = Some(Actions {
        execute: Some(Action::Complete),
        complete: true,
        ..Actions::default()
    });
    reply
}
