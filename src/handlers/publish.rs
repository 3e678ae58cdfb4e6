//! XEP-0357 publishes: the user's server says "wake this node"; knock checks and pushes.
//!
//! The reply tells the server what to do with the registration: Prosody counts non-`wait` errors and drops
//! it after 16, ejabberd drops it at the first; both keep it on `wait`. So a dead token or unknown node is a
//! `cancel`, while anything that may heal (the push service down, throttled, our own misconfiguration) is a `wait`.
//! The notification's content (sender, body, counts) is never read, logged or forwarded: only whether the
//! server marked it important ([`Notification`]), and a payload the client encrypted for itself, which is
//! passed on untouched.
//!
//! A publish wakes one of two kinds of target: a registered node, or, in registration-free mode (Monal's
//! dialect, an app with `push_module`), a device token named by the node itself. Then the app's delivery
//! picks the kind of wake-up (visible, silent within the device's hourly budget, or a call), and the
//! provider sends it.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use xmpp_parsers::jid::Jid;
use xmpp_parsers::pubsub::pubsub::{Publish, PublishOptions};

use super::{form_values, HandlerError};
use crate::app::{App, Delivery, ModuleRoute, PushApp};
use crate::push::{self, Provider, PushOutcome, Token, WakeKind, Wakeup};
use crate::stanza::notification::Notification;
use crate::stats::log_limit::LogLimit;
use crate::stats::Stats;
use crate::store::secrets::secret_matches;
use crate::store::{Digest, PublishTarget};

/// Failures that repeat on every publish while they last are logged once per interval (see
/// [`crate::stats::log_limit`]); `held` in the line says how many more it stands for.
static THROTTLED: LogLimit = LogLimit::new(Duration::from_secs(10));
static UNAVAILABLE: LogLimit = LogLimit::new(Duration::from_secs(10));
static MISCONFIGURED: LogLimit = LogLimit::new(Duration::from_secs(10));

/// What knock did with an accepted publish (all are answered `result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// A wake-up of this kind went out.
    Pushed(WakeKind),
    /// A wake-up went out less than one interval ago; this one was folded into it.
    Coalesced,
    /// The device had its silent wake-ups for the hour (or a registration-free token its wake-ups): none
    /// was sent. The next important publish still shows.
    OverBudget,
}

/// What a publish asks for, however it was read (straight from the bytes, or through xmpp-parsers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest<'a> {
    /// The pubsub node to wake.
    pub node: Cow<'a, str>,
    /// The `secret` field of the publish-options, if any.
    pub secret: Option<Cow<'a, str>>,
    /// The `pushModule` field of the publish-options, if any: registration-free clients name their app
    /// with it (Monal's dialect).
    pub push_module: Option<Cow<'a, str>>,
    /// What the notification says about delivery.
    pub notification: Notification<'a>,
}

impl PublishRequest<'static> {
    /// Check the shape of a parsed publish: one item, as XEP-0357 §7 has it, and publish-options within the
    /// form limits.
    pub fn from_pubsub(
        publish: Publish,
        options: Option<PublishOptions>,
    ) -> Result<PublishRequest<'static>, HandlerError> {
        let Some(item) = publish.items.first() else {
            return Err(HandlerError::bad_request("publish has no item"));
        };
        let notification =
            Notification::of_item(item.payload.as_ref()).map_err(HandlerError::bad_request)?;
        let values = options
            .as_ref()
            .and_then(|o| o.form.as_ref())
            .map(form_values)
            .transpose()?;
        let value = |var: &str| {
            values
                .as_ref()
                .and_then(|values| values.get(var).map(|s| Cow::Owned(s.to_string())))
        };
        Ok(PublishRequest {
            secret: value("secret"),
            push_module: value("pushModule"),
            node: Cow::Owned(publish.node.0),
            notification,
        })
    }
}

/// Handle a publish from `from`; `Ok` is answered with an empty result.
pub async fn publish(
    app: &App,
    from: &Jid,
    request: PublishRequest<'_>,
) -> Result<Published, HandlerError> {
    let _in_flight = app.stats.publish_started();
    let result = check_and_push(app, from, request).await;
    if let Ok(Published::Pushed(kind)) = &result {
        Stats::bump(match kind {
            WakeKind::Background => &app.stats.pushed_background,
            WakeKind::Alert => &app.stats.pushed_alert,
            WakeKind::Call => &app.stats.pushed_call,
        });
    }
    let counter = match &result {
        Ok(Published::Pushed(_)) => &app.stats.pushed,
        Ok(Published::Coalesced) => &app.stats.coalesced,
        Ok(Published::OverBudget) => &app.stats.over_budget,
        Err(Refusal { why, .. }) => match why {
            Refused::UnknownNode => &app.stats.unknown_node,
            Refused::Forbidden => &app.stats.forbidden,
            Refused::DeadToken => &app.stats.dead_token,
            Refused::TransientFailure => &app.stats.transient_failure,
        },
    };
    Stats::bump(counter);
    result.map_err(|r| r.error)
}

/// Why a publish was refused, for the counters: the reply alone does not tell a dead token from an
/// unknown node (both are `item-not-found`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Refused {
    UnknownNode,
    Forbidden,
    DeadToken,
    /// The push or the store failed; the server is told to wait.
    TransientFailure,
}

/// A refused publish: why, and the reply.
pub(super) struct Refusal {
    pub(super) why: Refused,
    pub(super) error: HandlerError,
}

impl Refused {
    fn with(self, error: HandlerError) -> Refusal {
        Refusal { why: self, error }
    }
}

impl From<crate::store::StoreError> for Refusal {
    fn from(e: crate::store::StoreError) -> Self {
        Refused::TransientFailure.with(e.into())
    }
}

/// Who a publish wakes, found and authorised.
pub(super) struct Target {
    /// The app the token belongs to.
    push_app: Arc<PushApp>,
    /// The provider that sends (the app's own, or its sandbox in registration-free mode).
    provider: Arc<dyn Provider>,
    /// The device token.
    token: Token,
    /// The device's call token, if it gave one.
    call_token: Option<Token>,
    /// The account to name in the push, for dialects that need it.
    account: Option<Arc<str>>,
    /// Registration-free mode: the token's keyed hashes. `None`: a registered node, whose registration
    /// goes when its token dies.
    unregistered: Option<Unregistered>,
}

/// The keyed hashes a registration-free token is known by.
struct Unregistered {
    /// For its hourly budget, whatever module names it.
    budget: Digest,
    /// For the dead-token memory: this token as this app and environment push to it.
    route: Digest,
}

async fn check_and_push(
    app: &App,
    from: &Jid,
    request: PublishRequest<'_>,
) -> Result<Published, Refusal> {
    // 1. The shape was checked when the request was read. Find who the node wakes: a registration, or
    //    in registration-free mode the token the node names. The registration comes first, so a node that
    //    is registered is always served as registered.
    let node = &*request.node;
    let target = match app.store.publish_target(node)? {
        Some(registration) => registered(app, from, &request, registration)?,
        None => match request.push_module.as_deref() {
            Some(module) => registration_free(app, node, module)?,
            None => {
                return Err(Refused::UnknownNode.with(HandlerError::item_not_found("no such node")))
            }
        },
    };

    // 2. Which wake-up: the app's delivery and what the server says of the stanza decide.
    let notification = &request.notification;
    let (kind, silent_budget) = wake_kind(&target, notification)?;
    let encrypted = match &notification.encrypted {
        Some(e) if e.data.len() > target.push_app.max_payload_size => {
            if kind == WakeKind::Call {
                return Err(Refused::TransientFailure.with(HandlerError::undeliverable(
                    "the call's encrypted payload is larger than this app's max-payload-size",
                )));
            }
            // A message still wakes the device, only without the payload it could not carry: the app
            // then shows its generic notification.
            tracing::debug!(app = %target.push_app.name, "encrypted payload over max-payload-size: pushed without it");
            None
        }
        Some(e) => Some(push::Encrypted {
            data: &e.data,
            iv: &e.iv,
        }),
        None => None,
    };

    // 3. Coalesce bursts (calls never), then spend the hourly budgets.
    let coalesced = kind != WakeKind::Call;
    if coalesced
        && !app
            .coalescer
            .try_acquire_as(node, kind != WakeKind::Background)
    {
        return Ok(Published::Coalesced);
    }
    let release = || {
        if coalesced {
            app.coalescer.release(node);
        }
    };
    if let Some(per_hour) = silent_budget {
        if !app.background_budget.try_take(node, per_hour) {
            release();
            return Ok(Published::OverBudget);
        }
    }
    if let Some(unregistered) = &target.unregistered {
        if !app
            .token_budget
            .try_take(&unregistered.budget, app.registration_free_per_hour)
        {
            release();
            tracing::debug!(app = %target.push_app.name, "registration-free token over its hourly budget");
            return Ok(Published::OverBudget);
        }
    }

    // 4. Push.
    let pushed = push(app, &target, node, kind, encrypted, None).await;
    if pushed.is_err() {
        release();
    }
    pushed.map(|()| Published::Pushed(kind))
}

/// Send one wake-up of `kind` to `target`, the wake-up for `node`, and handle what the push service says: a
/// dead token removes the registration (or, registration-free, is remembered dead), anything that may heal
/// is a `wait`. Shared by publishes and knocks ([`super::knock`]), so both follow the same rules.
pub(super) async fn push(
    app: &App,
    target: &Target,
    node: &str,
    kind: WakeKind,
    encrypted: Option<push::Encrypted<'_>>,
    knock: Option<&str>,
) -> Result<(), Refusal> {
    let token = match kind {
        WakeKind::Call => target.call_token.as_ref().unwrap_or(&target.token),
        _ => &target.token,
    };
    let wakeup = Wakeup {
        token: token.as_bytes(),
        node,
        kind,
        account: target.account.as_deref(),
        encrypted,
        knock,
    };
    let push_app = &target.push_app;
    let outcome =
        match tokio::time::timeout(app.publish_deadline, target.provider.wake(wakeup)).await {
            Ok(outcome) => outcome,
            Err(_) => PushOutcome::Unavailable {
                reason: "push provider missed the publish deadline".into(),
            },
        };
    match outcome {
        PushOutcome::Delivered => Ok(()),
        PushOutcome::DeadToken { reason } => {
            if kind == WakeKind::Call {
                // Only the call token is dead: the device still takes messages.
                if let Some(call_token) = &target.call_token {
                    if app.store.drop_call_token(node, call_token)? {
                        app.store.flush().await?;
                    }
                }
                tracing::info!(app = %push_app.name, %reason, "push service says the device's call token is gone; dropped it, the registration stays");
                return Err(Refused::TransientFailure.with(HandlerError::not_for_this_device(
                    "the device's call token is no longer valid: calls cannot be pushed to it until the app registers a new one",
                )));
            }
            let forgotten = match &target.unregistered {
                // Only this token is dead: a re-registration that raced us keeps its fresh token.
                None => {
                    if !app.store.remove_if_token(node, &target.token)? {
                        // Re-registered with a fresh token meanwhile: the node lives, the next publish uses it.
                        return Err(Refused::TransientFailure.with(HandlerError::internal(
                            "the device token changed; try again",
                        )));
                    }
                    "registration deleted"
                }
                Some(unregistered) => {
                    let until = unix_now() + app.dead_token_memory.as_secs();
                    app.store.remember_dead(&unregistered.route, until)?;
                    "token remembered as dead"
                }
            };
            app.store.flush().await?;
            tracing::info!(app = %push_app.name, %reason, "push service says the device is gone; {forgotten}");
            Err(Refused::DeadToken.with(HandlerError::item_not_found(
                "the device token is no longer valid",
            )))
        }
        PushOutcome::Throttled => {
            crate::log_limited!(THROTTLED, warn, app = %push_app.name, "push service is throttling knock");
            Err(
                Refused::TransientFailure.with(HandlerError::resource_constraint(
                    "the push service is throttling; try later",
                )),
            )
        }
        PushOutcome::Unavailable { reason } => {
            crate::log_limited!(UNAVAILABLE, warn, app = %push_app.name, %reason, "push failed; server told to wait");
            Err(Refused::TransientFailure.with(HandlerError::internal(
                "the push service is unavailable; try later",
            )))
        }
        PushOutcome::Misconfigured { reason } => {
            crate::log_limited!(MISCONFIGURED, error, app = %push_app.name, %reason, "push service rejected knock's credentials or request: fix the app's configuration");
            Err(Refused::TransientFailure.with(HandlerError::internal(
                "the push service is misconfigured; try later",
            )))
        }
    }
}

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// A registered node: only the registering user's server may publish, with the node's secret when it has
/// one (Tigase's dialect has none).
fn registered(
    app: &App,
    from: &Jid,
    request: &PublishRequest<'_>,
    registration: PublishTarget,
) -> Result<Target, Refusal> {
    let from_server = from.node().is_none()
        && from.resource().is_none()
        && from.domain().as_str() == &*registration.domain;
    let authorised = from_server
        && match (&registration.secret_tag, request.secret.as_deref()) {
            (Some(tag), Some(secret)) => secret_matches(tag, secret),
            (Some(_), None) => false,
            (None, _) => true,
        };
    if !authorised {
        return Err(Refused::Forbidden.with(HandlerError::forbidden("wrong secret or publisher")));
    }
    target_of(app, registration)
}

/// Where a registration's wake-ups go: its app's provider, if the app is still configured for the push
/// service the token belongs to.
pub(super) fn target_of(app: &App, registration: PublishTarget) -> Result<Target, Refusal> {
    let Some(push_app) = app.app(Some(&registration.app)) else {
        tracing::error!(app = %registration.app, "registration names an app that is no longer configured");
        return Err(Refused::TransientFailure.with(HandlerError::internal(
            "this node's app is not configured on the push service",
        )));
    };
    // An app reconfigured to another push service keeps its name: its old tokens must not go to the new one.
    if push_app.provider.kind() != registration.provider {
        tracing::error!(app = %registration.app, configured = %push_app.provider.kind(), registered = %registration.provider,
            "registration's token belongs to another push service than its app is now configured for");
        return Err(Refused::TransientFailure.with(HandlerError::internal(
            "this node's app is configured for another push service",
        )));
    }
    Ok(Target {
        provider: push_app.provider.clone(),
        push_app,
        token: registration.token,
        call_token: registration.call_token,
        account: registration.account,
        unregistered: None,
    })
}

/// Registration-free mode: the node is the device token and the push module names the app. Anyone may
/// publish (there is no registration to hold a secret), so the token's hourly budget bounds how often.
fn registration_free(app: &App, node: &str, module: &str) -> Result<Target, Refusal> {
    let unknown = |text: &str| Refused::UnknownNode.with(HandlerError::item_not_found(text));
    let Some(ModuleRoute {
        app: push_app,
        sandbox,
        provider,
    }) = app.app_for_module(module)
    else {
        return Err(unknown("no such node, and no app for this push module"));
    };
    let Some(provider) = provider else {
        return Err(unknown(
            "this push service has no sandbox endpoint for the push module's -sandbox variant",
        ));
    };
    let kind = provider.kind();
    let token = kind
        .parse_token(node)
        .map_err(|_| unknown("the node is not a device token of this push module's app"))?;
    let route = app
        .keys
        .token_route(&push_app.name, sandbox, kind.byte(), token.as_bytes());
    if app.store.is_dead(&route, unix_now())? {
        return Err(Refused::DeadToken.with(HandlerError::item_not_found(
            "the device token is no longer valid",
        )));
    }
    let budget = app.keys.token(kind.byte(), token.as_bytes());
    Ok(Target {
        push_app,
        provider,
        token,
        call_token: None,
        account: None,
        unregistered: Some(Unregistered { budget, route }),
    })
}

/// The kind of wake-up for a publish, and for a silent one in `auto`, the device's hourly budget it must
/// fit in.
pub(super) fn wake_kind(
    target: &Target,
    notification: &Notification<'_>,
) -> Result<(WakeKind, Option<u32>), Refusal> {
    if notification.encrypted.as_ref().is_some_and(|e| e.call) {
        if target.call_token.is_none() {
            // Not `cancel`: the registration is fine for messages, and a server drops it on `cancel`.
            return Err(
                Refused::TransientFailure.with(HandlerError::not_for_this_device(
                    "this device registered no call token (device-second-token): calls cannot be pushed to it",
                )),
            );
        }
        return Ok((WakeKind::Call, None));
    }
    Ok(match target.push_app.delivery {
        Delivery::Fixed(kind) => (kind, None),
        Delivery::Auto { .. } if notification.important => (WakeKind::Alert, None),
        Delivery::Auto {
            background_per_hour,
        } => (WakeKind::Background, Some(background_per_hour)),
    })
}
