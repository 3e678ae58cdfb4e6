//! XEP-0357 publishes: the user's server says "wake this node"; knock checks and pushes.
//!
//! The reply tells the server what to do with the registration: Prosody counts non-`wait` errors and drops
//! it after 16, ejabberd drops it at the first; both keep it on `wait`. So a dead token or unknown node is a
//! `cancel`, while anything that may heal (APNs down, throttled, our own misconfiguration) is a `wait`.
//! The notification's content (sender, body, counts) is never read, logged or forwarded.

use std::borrow::Cow;
use std::time::Duration;

use xmpp_parsers::jid::Jid;
use xmpp_parsers::pubsub::pubsub::{Publish, PublishOptions};

use super::{form_values, HandlerError};
use crate::app::App;
use crate::push::{PushOutcome, Wakeup};
use crate::stats::log_limit::LogLimit;
use crate::stats::Stats;
use crate::store::secrets::secret_matches;

/// Failures that repeat on every publish while they last are logged once per interval (see
/// [`crate::stats::log_limit`]); `held` in the line says how many more it stands for.
static THROTTLED: LogLimit = LogLimit::new(Duration::from_secs(10));
static UNAVAILABLE: LogLimit = LogLimit::new(Duration::from_secs(10));
static MISCONFIGURED: LogLimit = LogLimit::new(Duration::from_secs(10));

/// What knock did with an accepted publish (both are answered `result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// A wake-up went out.
    Pushed,
    /// A wake-up went out less than one interval ago; this one was folded into it.
    Coalesced,
}

/// What a publish asks for, however it was read (straight from the bytes, or through xmpp-parsers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest<'a> {
    /// The pubsub node to wake.
    pub node: Cow<'a, str>,
    /// The `secret` field of the publish-options, if any.
    pub secret: Option<Cow<'a, str>>,
}

impl PublishRequest<'static> {
    /// Check the shape of a parsed publish: one item, as XEP-0357 §7 has it, and publish-options within the
    /// form limits.
    pub fn from_pubsub(
        publish: Publish,
        options: Option<PublishOptions>,
    ) -> Result<PublishRequest<'static>, HandlerError> {
        if publish.items.is_empty() {
            return Err(HandlerError::bad_request("publish has no item"));
        }
        let secret = options
            .as_ref()
            .and_then(|o| o.form.as_ref())
            .map(form_values)
            .transpose()?
            .and_then(|values| values.get("secret").map(|s| Cow::Owned(s.to_string())));
        Ok(PublishRequest {
            node: Cow::Owned(publish.node.0),
            secret,
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
    let counter = match &result {
        Ok(Published::Pushed) => &app.stats.pushed,
        Ok(Published::Coalesced) => &app.stats.coalesced,
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
enum Refused {
    UnknownNode,
    Forbidden,
    DeadToken,
    /// The push or the store failed; the server is told to wait.
    TransientFailure,
}

/// A refused publish: why, and the reply.
struct Refusal {
    why: Refused,
    error: HandlerError,
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

async fn check_and_push(
    app: &App,
    from: &Jid,
    request: PublishRequest<'_>,
) -> Result<Published, Refusal> {
    // 1. The shape was checked when the request was read.
    let node = &*request.node;

    // 2. The node must exist. This comes before the secret check so that a server publishing to a
    //    deleted node always learns to drop it.
    let Some(registration) = app.store.publish_target(node)? else {
        return Err(Refused::UnknownNode.with(HandlerError::item_not_found("no such node")));
    };

    // 3. Only the registering user's server may publish, and only with the node's secret.
    let from_server = from.node().is_none()
        && from.resource().is_none()
        && from.domain().as_str() == &*registration.domain;
    match request.secret.as_deref() {
        Some(secret) if from_server && secret_matches(&registration.secret_tag, secret) => {}
        _ => {
            return Err(
                Refused::Forbidden.with(HandlerError::forbidden("wrong secret or publisher"))
            )
        }
    }

    // 4. Coalesce bursts.
    if !app.coalescer.try_acquire(node) {
        return Ok(Published::Coalesced);
    }

    // 5. Push.
    let Some(push_app) = app.app(Some(&registration.app)) else {
        app.coalescer.release(node);
        tracing::error!(app = %registration.app, "registration names an app that is no longer configured");
        return Err(Refused::TransientFailure.with(HandlerError::internal(
            "this node's app is not configured on the push service",
        )));
    };
    // An app reconfigured to another push service keeps its name: its old tokens must not go to the new one.
    if push_app.provider.kind() != registration.provider {
        app.coalescer.release(node);
        tracing::error!(app = %registration.app, configured = %push_app.provider.kind(), registered = %registration.provider,
            "registration's token belongs to another push service than its app is now configured for");
        return Err(Refused::TransientFailure.with(HandlerError::internal(
            "this node's app is configured for another push service",
        )));
    }
    let wakeup = Wakeup {
        token: registration.token.as_bytes(),
        node,
        kind: push_app.wake_kind,
    };
    let outcome =
        match tokio::time::timeout(app.publish_deadline, push_app.provider.wake(wakeup)).await {
            Ok(outcome) => outcome,
            Err(_) => PushOutcome::Unavailable {
                reason: "push provider missed the publish deadline".into(),
            },
        };
    match outcome {
        PushOutcome::Delivered => Ok(Published::Pushed),
        PushOutcome::DeadToken { reason } => {
            // Only this token is dead: a re-registration that raced us keeps its fresh token.
            app.coalescer.release(node);
            if !app.store.remove_if_token(node, &registration.token)? {
                // Re-registered with a fresh token meanwhile: the node lives, the next publish uses the new token.
                return Err(Refused::TransientFailure.with(HandlerError::internal(
                    "the device token changed; try again",
                )));
            }
            app.store.flush().await?;
            tracing::info!(app = %push_app.name, %reason, "push service says the device is gone; registration deleted");
            Err(Refused::DeadToken.with(HandlerError::item_not_found(
                "the device token is no longer valid",
            )))
        }
        PushOutcome::Throttled => {
            app.coalescer.release(node);
            crate::log_limited!(THROTTLED, warn, app = %push_app.name, "push service is throttling knock");
            Err(
                Refused::TransientFailure.with(HandlerError::resource_constraint(
                    "the push service is throttling; try later",
                )),
            )
        }
        PushOutcome::Unavailable { reason } => {
            app.coalescer.release(node);
            crate::log_limited!(UNAVAILABLE, warn, app = %push_app.name, %reason, "push failed; server told to wait");
            Err(Refused::TransientFailure.with(HandlerError::internal(
                "the push service is unavailable; try later",
            )))
        }
        PushOutcome::Misconfigured { reason } => {
            app.coalescer.release(node);
            crate::log_limited!(MISCONFIGURED, error, app = %push_app.name, %reason, "push service rejected knock's credentials or request: fix the app's configuration");
            Err(Refused::TransientFailure.with(HandlerError::internal(
                "the push service is misconfigured; try later",
            )))
        }
    }
}
