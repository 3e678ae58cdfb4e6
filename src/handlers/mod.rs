//! One handler per protocol: [`disco`], [`commands`] (XEP-0050 registration), [`enable`] (the XEP-0357
//! `<enable/>` shorthand), [`publish`] and [`knock`] (knock tokens: their commands, and knocks). Handlers take typed requests and the [`App`] and
//! return a typed payload or a [`HandlerError`]; they know nothing of sockets.
//!
//! This file holds what they share: the error type, which maps 1:1 onto an XMPP stanza error, bounded
//! data-form reading, and the input rules for device ids and apps. Token rules are each provider's own
//! ([`crate::push::ProviderKind::parse_token`]).

pub mod commands;
pub mod disco;
pub mod enable;
pub mod knock;
pub mod publish;
pub mod selftest;
pub mod tigase;

use std::collections::HashMap;
use std::sync::Arc;

use xmpp_parsers::data_forms::DataForm;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use crate::app::{App, PushApp};
use crate::limits::{Refused, Scope};
use crate::push::{ProviderKind, Token};
use crate::store::{Registration, StoreError};

/// A request knock refuses, with the XMPP error it becomes. The text is for humans and never carries a
/// token, secret or JID.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerError {
    /// The error type: tells the server whether to retry (`wait`) or give up.
    pub kind: ErrorType,
    /// The RFC 6120 condition.
    pub condition: DefinedCondition,
    /// A human-readable explanation.
    pub text: String,
}

impl HandlerError {
    fn new(kind: ErrorType, condition: DefinedCondition, text: impl Into<String>) -> Self {
        HandlerError {
            kind,
            condition,
            text: text.into(),
        }
    }
    /// modify / bad-request.
    pub fn bad_request(text: impl Into<String>) -> Self {
        Self::new(ErrorType::Modify, DefinedCondition::BadRequest, text)
    }
    /// auth / forbidden.
    pub fn forbidden(text: impl Into<String>) -> Self {
        Self::new(ErrorType::Auth, DefinedCondition::Forbidden, text)
    }
    /// cancel / item-not-found.
    pub fn item_not_found(text: impl Into<String>) -> Self {
        Self::new(ErrorType::Cancel, DefinedCondition::ItemNotFound, text)
    }
    /// cancel / conflict.
    pub fn conflict(text: impl Into<String>) -> Self {
        Self::new(ErrorType::Cancel, DefinedCondition::Conflict, text)
    }
    /// cancel / service-unavailable: knock does not do that.
    pub fn service_unavailable(text: impl Into<String>) -> Self {
        Self::new(
            ErrorType::Cancel,
            DefinedCondition::ServiceUnavailable,
            text,
        )
    }
    /// cancel / not-allowed: this service does not take the request from this sender, by policy.
    pub fn not_allowed(text: impl Into<String>) -> Self {
        Self::new(ErrorType::Cancel, DefinedCondition::NotAllowed, text)
    }
    /// modify / policy-violation: over a limit of this service's that waiting does not lift (the caller
    /// must first undo something, e.g. revoke tokens).
    pub fn policy_violation(text: impl Into<String>) -> Self {
        Self::new(ErrorType::Modify, DefinedCondition::PolicyViolation, text)
    }
    /// wait / resource-constraint: try again later.
    pub fn resource_constraint(text: impl Into<String>) -> Self {
        Self::new(ErrorType::Wait, DefinedCondition::ResourceConstraint, text)
    }
    /// wait / feature-not-implemented: this registration cannot take this kind of push (a call, from a
    /// device that gave no call token). Not `cancel`: the registration serves everything else, and a
    /// server drops a registration on `cancel`.
    pub fn not_for_this_device(text: impl Into<String>) -> Self {
        Self::new(
            ErrorType::Wait,
            DefinedCondition::FeatureNotImplemented,
            text,
        )
    }
    /// wait / not-acceptable: this one push cannot be delivered as it is (a payload over the app's size);
    /// the registration stays.
    pub fn undeliverable(text: impl Into<String>) -> Self {
        Self::new(ErrorType::Wait, DefinedCondition::NotAcceptable, text)
    }
    /// wait / internal-server-error: knock or its push service failed; nothing was lost, try again later.
    pub fn internal(text: impl Into<String>) -> Self {
        Self::new(ErrorType::Wait, DefinedCondition::InternalServerError, text)
    }

    /// The stanza error sent on the wire.
    pub fn to_stanza_error(&self, by: Option<xmpp_parsers::jid::Jid>) -> StanzaError {
        let mut error =
            StanzaError::new(self.kind.clone(), self.condition.clone(), "en", &self.text);
        error.by = by;
        error
    }
}

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => HandlerError::conflict("this node belongs to another device"),
            StoreError::Invalid(why) => HandlerError::bad_request(why),
            other => {
                tracing::error!(error = %other, "store failure");
                HandlerError::internal("the registration store failed; try again later")
            }
        }
    }
}

pub use crate::stanza::{MAX_FIELD_LEN, MAX_FORM_FIELDS};

/// The single-valued fields of a submitted form, by `var`, with limits applied.
pub fn form_values(form: &DataForm) -> Result<HashMap<&str, &str>, HandlerError> {
    if form.fields.len() > MAX_FORM_FIELDS {
        return Err(HandlerError::bad_request(format!(
            "too many form fields (at most {MAX_FORM_FIELDS})"
        )));
    }
    let mut values = HashMap::with_capacity(form.fields.len());
    for field in &form.fields {
        let Some(var) = field.var.as_deref() else {
            continue;
        };
        if field.values.len() > 1 {
            return Err(HandlerError::bad_request(format!(
                "field {var:?} has several values"
            )));
        }
        let value = field.values.first().map(String::as_str).unwrap_or("");
        if value.len() > MAX_FIELD_LEN {
            return Err(HandlerError::bad_request(format!(
                "field {var:?} is longer than {MAX_FIELD_LEN} bytes"
            )));
        }
        if values.insert(var, value).is_some() {
            return Err(HandlerError::bad_request(format!(
                "field {var:?} appears twice"
            )));
        }
    }
    Ok(values)
}

/// A required, non-empty field.
pub fn required<'a>(values: &HashMap<&str, &'a str>, var: &str) -> Result<&'a str, HandlerError> {
    match values.get(var) {
        Some(v) if !v.trim().is_empty() => Ok(v.trim()),
        _ => Err(HandlerError::bad_request(format!("missing field {var:?}"))),
    }
}

/// An optional field; empty counts as absent.
pub fn optional<'a>(values: &HashMap<&str, &'a str>, var: &str) -> Option<&'a str> {
    values.get(var).map(|v| v.trim()).filter(|v| !v.is_empty())
}

/// A device token as the app's provider takes it (checked and compacted by the provider's own rules).
pub fn device_token(push_app: &PushApp, text: &str) -> Result<Token, HandlerError> {
    push_app
        .provider
        .kind()
        .parse_token(text)
        .map_err(|e| HandlerError::bad_request(e.to_string()))
}

/// Check a client's device id: 1 to 256 bytes of UTF-8, no control characters.
pub fn device_id(id: &str) -> Result<&str, HandlerError> {
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err(HandlerError::bad_request(
            "device-id must be 1 to 256 bytes without control characters",
        ));
    }
    Ok(id)
}

/// The app a registration names, or the default app: the first configured, or with `provider` (a
/// command that names its push service), the first of that service's apps.
pub fn push_app(
    app: &App,
    name: Option<&str>,
    provider: Option<ProviderKind>,
) -> Result<Arc<PushApp>, HandlerError> {
    let unknown =
        || HandlerError::bad_request("unknown app: ask the service's admin for the app name");
    let Some(kind) = provider else {
        return app.app(name).ok_or_else(unknown);
    };
    let apps = app.apps();
    let mut of_kind = apps.iter().filter(|a| a.provider.kind() == kind);
    match name {
        None => of_kind.next().cloned().ok_or_else(|| {
            HandlerError::service_unavailable(format!("this push service has no {kind} app"))
        }),
        Some(name) => match of_kind.find(|a| a.name == name) {
            Some(found) => Ok(found.clone()),
            None if apps.iter().any(|a| a.name == name) => Err(HandlerError::bad_request(format!(
                "app {name:?} does not take {kind} tokens"
            ))),
            None => Err(unknown()),
        },
    }
}

/// Store a registration and wait until it is durable; only then may it be acknowledged.
/// Every registration, by command or shorthand, comes through here, so the domain policy and the flood caps
/// are checked here.
pub async fn save(app: &App, registration: &Registration) -> Result<(), HandlerError> {
    let result = store_registration(app, registration).await;
    if let Err(e) = &result {
        if e.kind == ErrorType::Wait && e.condition == DefinedCondition::InternalServerError {
            crate::stats::Stats::bump(&app.stats.registration_failed);
        }
    }
    result
}

async fn store_registration(app: &App, registration: &Registration) -> Result<(), HandlerError> {
    // 1. Policy first: a domain taken off the list is refused even for what it registered before.
    if !app.allowed_domains.is_empty() && !app.allowed_domains.contains(&registration.domain) {
        crate::stats::Stats::bump(&app.stats.registration_not_allowed);
        return Err(HandlerError::not_allowed(
            "this push service only registers users of its own domains",
        ));
    }
    // 2. The same device re-sending what is stored (apps do, on every start) writes nothing, so it costs no
    //    write and no cap token. It may equal a record whose flush is still running, so it waits for one too.
    if app.store.get(&registration.node)?.as_ref() == Some(registration) {
        app.store.flush().await?;
        crate::stats::Stats::bump(&app.stats.registration_unchanged);
        return Ok(());
    }
    // 3. The flood caps, for everything that would write.
    if let Err(refused) = app
        .registration_limit
        .try_acquire(&registration.owner, &registration.domain)
    {
        crate::stats::Stats::bump(&app.stats.registration_capped);
        // Debug only: a flood must not turn into one log line per attempt.
        tracing::debug!(scope = ?refused.scope, "registration over the flood cap");
        return Err(capped(refused, "registrations"));
    }
    // 4. Acknowledged only once durable.
    app.store.put(registration)?;
    app.store.flush().await?;
    crate::stats::Stats::bump(&app.stats.registered);
    Ok(())
}

/// The reply to a write over a flood cap (`what`: registrations, knock tokens): `wait`, with roughly when
/// to come back.
fn capped(refused: Refused, what: &str) -> HandlerError {
    let whose = match refused.scope {
        Scope::User => "this account",
        Scope::Domain => "this account's server",
    };
    let minutes = refused.retry_after.as_secs().div_ceil(60).max(1);
    HandlerError::resource_constraint(format!(
        "too many {what} from {whose}; try again in about {minutes} min"
    ))
}

/// Remove a registration durably.
pub async fn delete(app: &App, node: &str) -> Result<(), HandlerError> {
    app.store.remove(node)?;
    app.store.flush().await?;
    crate::stats::Stats::bump(&app.stats.unregistered);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use xmpp_parsers::data_forms::{DataFormType, Field, FieldType};

    fn form(fields: Vec<(&str, Vec<&str>)>) -> DataForm {
        DataForm {
            type_: DataFormType::Submit,
            title: None,
            instructions: None,
            fields: fields
                .into_iter()
                .map(|(var, values)| {
                    let mut f = Field::new(var, FieldType::TextSingle);
                    f.values = values.into_iter().map(String::from).collect();
                    f
                })
                .collect(),
        }
    }

    #[test]
    fn form_limits_are_enforced() {
        assert!(form_values(&form(vec![("a", vec!["1"]), ("a", vec!["2"])])).is_err());
        assert!(form_values(&form(vec![("a", vec!["1", "2"])])).is_err());
        let long = "x".repeat(MAX_FIELD_LEN + 1);
        assert!(form_values(&form(vec![("a", vec![long.as_str()])])).is_err());
        let many: Vec<String> = (0..=MAX_FORM_FIELDS).map(|i| format!("f{i}")).collect();
        assert!(form_values(&form(many.iter().map(|v| (v.as_str(), vec![])).collect())).is_err());
        let ok = form(vec![("token", vec![" ab "]), ("empty", vec![])]);
        let values = form_values(&ok).expect("ok");
        assert_eq!(required(&values, "token"), Ok("ab"));
        assert!(required(&values, "empty").is_err());
        assert_eq!(optional(&values, "empty"), None);
    }

    #[test]
    fn device_ids_are_bounded() {
        assert!(device_id("phone-1").is_ok());
        assert!(device_id("").is_err());
        assert!(device_id("a\nb").is_err());
        assert!(device_id(&"d".repeat(257)).is_err());
    }
}
