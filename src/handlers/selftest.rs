//! `push-self-test`: a user asks knock to push once to each of their registered devices and reads what
//! became of each push in the command's notes. So a user can find out whether push works without waiting
//! for a message (Siskin users ask for it: tigase/siskin-im #81), and an admin can tell "the App Server
//! reaches Apple or Google" from "the user's server never publishes".
//!
//! Only the caller's own registrations are touched (found by the keyed hash of their bare JID); the push
//! is visible, with the app's fixed title, like any other; a dead token ends its registration exactly as
//! a publish would. A few runs per user per hour at most.

use xmpp_parsers::jid::Jid;

use super::HandlerError;
use crate::app::App;
use crate::push::{PushOutcome, WakeKind, Wakeup};
use crate::stanza::xep0050::{Command, Note, NoteType, Status};
use crate::store::secrets::random_id;

/// The command node.
pub const NODE: &str = "push-self-test";

/// Self-tests per user per hour.
pub const PER_HOUR: u32 = 6;

/// Push to each of the caller's devices and report.
pub async fn execute(app: &App, from: &Jid, command: &Command) -> Result<Command, HandlerError> {
    let owner = app.keys.owner(from.to_bare().as_str());
    if !app.self_test_budget.try_take(&owner, PER_HOUR) {
        return Err(HandlerError::resource_constraint(format!(
            "at most {PER_HOUR} self-tests an hour; try again later"
        )));
    }
    let nodes = app.store.nodes_of(&owner)?;
    let mut notes = Vec::new();
    if nodes.is_empty() {
        notes.push(note(
            NoteType::Warn,
            "No device of yours is registered with this push service: register one first.".into(),
        ));
    }
    for (i, node) in nodes.iter().enumerate() {
        let (kind, text) = test_one(app, node).await?;
        notes.push(note(kind, format!("Device {}: {text}", i + 1)));
    }
    let mut reply = Command::reply(command, Status::Completed, None, random_id);
    reply.notes = notes;
    Ok(reply)
}

fn note(type_: NoteType, text: String) -> Note {
    Note {
        type_: Some(type_),
        text,
    }
}

/// Push once to one node; what to tell the user of it.
async fn test_one(app: &App, node: &str) -> Result<(NoteType, String), HandlerError> {
    let Some(target) = app.store.publish_target(node)? else {
        return Ok((NoteType::Warn, "unregistered meanwhile.".into()));
    };
    let Some(push_app) = app.app(Some(&target.app)) else {
        return Ok((
            NoteType::Error,
            "its app is no longer configured on this push service (ask its admin).".into(),
        ));
    };
    if push_app.provider.kind() != target.provider {
        return Ok((
            NoteType::Error,
            "its app is now configured for another push service (ask its admin).".into(),
        ));
    }
    let wakeup = Wakeup {
        account: target.account.as_deref(),
        ..Wakeup::new(target.token.as_bytes(), node, WakeKind::Alert)
    };
    let app_name = &push_app.name;
    let outcome = tokio::time::timeout(app.publish_deadline, push_app.provider.wake(wakeup))
        .await
        .unwrap_or(PushOutcome::Unavailable {
            reason: "no answer in time".into(),
        });
    Ok(match outcome {
        PushOutcome::Delivered => (
            NoteType::Info,
            format!("the push service accepted a test push for app {app_name}; it should show on the device now."),
        ),
        PushOutcome::DeadToken { reason } => {
            if app.store.remove_if_token(node, &target.token)? {
                app.store.flush().await?;
            }
            (
                NoteType::Error,
                format!("the push service says this device's token is no longer valid ({reason}); its registration was removed: open the app to register again."),
            )
        }
        PushOutcome::Throttled => (
            NoteType::Warn,
            "the push service is throttling this push service; try again later.".into(),
        ),
        PushOutcome::Unavailable { reason } => (
            NoteType::Warn,
            format!("the push service could not be reached ({reason}); try again later."),
        ),
        PushOutcome::Misconfigured { reason } => (
            NoteType::Error,
            format!("the push service refused this service's credentials ({reason}): tell its admin."),
        ),
    })
}
