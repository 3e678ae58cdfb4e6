//! Knock tokens (ChatSecure Push's "Level 1"; `xep/knock-registration.md` §19): a user hands a contact a
//! token of their own, and the contact, holding it, can wake the user's device through knock, whatever
//! the user's server supports. The push names the token's opaque id, so the app knows which contact knocked;
//! knock never learns who that is.
//!
//! Two halves. The owner's four ad-hoc commands ([`COMMANDS`]): create a token bound to one of their
//! registrations, list their tokens, revoke one or all, rotate one (a new token; the old one keeps working
//! for a grace period). Then the knock itself ([`knock`]): an IQ from anyone, answered `result`,
//! `item-not-found` (unknown, revoked and expired tokens are indistinguishable) or `wait` (the token's
//! hourly rate is used up, or the push service failed). The wake-up goes out by the same rules as a
//! publish's ([`super::publish::push`]): a knock counts as important, so `auto` delivery shows it.
//!
//! The store keeps a keyed hash of each token and never who holds it; nothing here logs the knocker.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use xmpp_parsers::data_forms::{DataForm, DataFormType, Field, FieldType, Option_};
use xmpp_parsers::jid::Jid;

use super::commands::{form_stage, CommandInfo};
use super::publish::{self, unix_now, Refused};
use super::{capped, form_values, optional, HandlerError};
use crate::app::App;
use crate::stanza::knock::Knock;
use crate::stanza::notification::Notification;
use crate::stanza::report::Report;
use crate::stanza::xep0050::{Command, Note, NoteType, Status};
use crate::stats::Stats;
use crate::store::secrets::random_id;
use crate::store::{Digest, KnockToken, StoreError};

/// Create a knock token.
pub const CREATE: &str = "knock-token-create";
/// List the caller's knock tokens.
pub const LIST: &str = "knock-token-list";
/// Revoke one knock token, or all of the caller's.
pub const REVOKE: &str = "knock-token-revoke";
/// Replace a knock token by a new one; the old one works for a grace period.
pub const ROTATE: &str = "knock-token-rotate";

/// What a knock-token command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`CREATE`].
    Create,
    /// [`LIST`].
    List,
    /// [`REVOKE`].
    Revoke,
    /// [`ROTATE`].
    Rotate,
}

/// A token's lifetime when the owner names none, and the longest allowed: tokens travel to contacts and
/// may leak, so none lives for ever.
const DEFAULT_DAYS: u32 = 90;
const MAX_DAYS: u32 = 365;
/// The shortest lifetime `expiry-seconds` may ask for.
const MIN_SECONDS: u32 = 10;
/// Knocks an hour when the owner names no rate, and the most allowed: a knock shows on the owner's phone.
const DEFAULT_PER_HOUR: u32 = 6;
const MAX_PER_HOUR: u32 = 60;
/// How long a rotated token keeps working when the owner names no grace period, and the longest allowed.
const DEFAULT_GRACE_HOURS: u32 = 72;
const MAX_GRACE_HOURS: u32 = 14 * 24;

/// Run a knock-token command for `from` (its owner: the bare JID).
pub async fn execute(
    app: &App,
    from: &Jid,
    request: &Command,
    info: &CommandInfo,
    op: Op,
    form: Option<&DataForm>,
) -> Result<Command, HandlerError> {
    let owner = app.keys.owner(from.to_bare().as_str());
    let now = unix_now();
    // Expired tokens are dropped whenever their owner looks, so a listing shows only what works.
    let tokens = live_tokens(app, &owner, now)?;
    let Some(form) = form else {
        return match op {
            Op::List => Ok(list(request, &tokens, now)),
            _ => Ok(ask_for_form(app, &owner, request, info, op, &tokens)?),
        };
    };
    let values = form_values(form)?;
    let caller = Caller {
        from,
        owner: &owner,
        tokens: &tokens,
        now,
    };
    match op {
        Op::List => Ok(list(request, &tokens, now)),
        Op::Create => create(app, &caller, request, &values).await,
        Op::Revoke => revoke(app, &caller, request, &values).await,
        Op::Rotate => rotate(app, &caller, request, &values).await,
    }
}

/// Who runs a command, and what they hold.
struct Caller<'a> {
    from: &'a Jid,
    /// Their keyed hash.
    owner: &'a Digest,
    /// Their live tokens.
    tokens: &'a [(Digest, KnockToken)],
    /// The time the command runs at.
    now: u64,
}

/// A submitted form's values by field ([`form_values`]).
type Values<'a> = std::collections::HashMap<&'a str, &'a str>;

/// `knock-token-create`: a new token for one of the caller's registrations.
async fn create(
    app: &App,
    caller: &Caller<'_>,
    request: &Command,
    values: &Values<'_>,
) -> Result<Command, HandlerError> {
    let owner = caller.owner;
    let node = match optional(values, "node") {
        Some(node) => node.to_owned(),
        None => only_registration(app, owner)?,
    };
    let lifetime = lifetime(values)?;
    let per_hour = number(values, "per-hour", DEFAULT_PER_HOUR, 1..=MAX_PER_HOUR)?;
    if !app.store.nodes_of(owner)?.contains(&node) {
        return Err(HandlerError::item_not_found(
            "node is not one of your registrations",
        ));
    }
    let made = mint(app, caller, caller.tokens.len(), node, lifetime, per_hour).await?;
    Ok(created(request, &made, None))
}

/// `knock-token-revoke`: one token by id, or all of the caller's.
async fn revoke(
    app: &App,
    caller: &Caller<'_>,
    request: &Command,
    values: &Values<'_>,
) -> Result<Command, HandlerError> {
    let tokens = caller.tokens;
    let all = matches!(optional(values, "all"), Some("1" | "true"));
    let chosen: Vec<&(Digest, KnockToken)> = if all {
        tokens.iter().collect()
    } else {
        let id = token_id(values)?;
        let chosen: Vec<_> = tokens.iter().filter(|(_, t)| t.id == id).collect();
        if chosen.is_empty() {
            return Err(HandlerError::item_not_found("no such knock token"));
        }
        chosen
    };
    for (hash, _) in &chosen {
        app.store.remove_knock_token(hash)?;
        Stats::bump(&app.stats.knocks.revoked);
    }
    app.store.flush().await?;
    tracing::debug!(count = chosen.len(), "knock tokens revoked");
    let mut reply = Command::reply(request, Status::Completed, None, random_id);
    reply.notes.push(Note {
        type_: Some(NoteType::Info),
        text: format!("Revoked {} knock token(s).", chosen.len()),
    });
    Ok(reply)
}

/// `knock-token-rotate`: a new token and id for the same contact; the old one works for the grace period.
async fn rotate(
    app: &App,
    caller: &Caller<'_>,
    request: &Command,
    values: &Values<'_>,
) -> Result<Command, HandlerError> {
    let &Caller { tokens, now, .. } = caller;
    let id = token_id(values)?;
    let Some((old_hash, old)) = tokens.iter().find(|(_, t)| t.id == id) else {
        return Err(HandlerError::item_not_found("no such knock token"));
    };
    if old.grace_until.is_some() {
        return Err(HandlerError::bad_request(
            "this knock token was rotated already: rotate its successor",
        ));
    }
    let grace = number(
        values,
        "grace-hours",
        DEFAULT_GRACE_HOURS,
        0..=MAX_GRACE_HOURS,
    )?;
    let lifetime = lifetime(values)?;
    let per_hour = number(values, "per-hour", old.per_hour, 1..=MAX_PER_HOUR)?;
    // The successor first: if it cannot be made, the old token stays as it was. Without a grace
    // period the old one makes room for it.
    let held = tokens.len() - usize::from(grace == 0);
    let made = mint(app, caller, held, old.node.clone(), lifetime, per_hour).await?;
    let until = (now + u64::from(grace) * 3_600).min(old.expires);
    let retired = async {
        if grace == 0 {
            app.store.remove_knock_token(old_hash)?;
        } else {
            let graced = KnockToken {
                grace_until: Some(until),
                ..old.clone()
            };
            app.store.put_knock_token(old_hash, &graced)?;
        }
        app.store.flush().await
    };
    if let Err(e) = retired.await {
        // The caller is told it failed, so the successor, never shown, must not stay behind.
        if app.store.remove_knock_token(&made.hash).is_ok() {
            let _ = app.store.flush().await;
        }
        return Err(match e {
            // The registration went meanwhile, and both tokens with it.
            StoreError::Invalid(_) => HandlerError::item_not_found("no such knock token"),
            e => e.into(),
        });
    }
    Ok(created(request, &made, Some((old, until))))
}

/// A token just made: what its owner must keep (the token is shown once and never again).
struct Minted {
    token: String,
    /// Its keyed hash, the store's key.
    hash: Digest,
    record: KnockToken,
}

/// Make, store and durably save a new token for `node`, within the owner's allowance and the creation caps
/// (a token is a write like a registration: per owner, as many an hour as they may hold; per domain, as
/// many as registrations).
async fn mint(
    app: &App,
    caller: &Caller<'_>,
    held: usize,
    node: String,
    lifetime: u64,
    per_hour: u32,
) -> Result<Minted, HandlerError> {
    let &Caller {
        from, owner, now, ..
    } = caller;
    let expires = now + lifetime;
    let most = app.knock_tokens_per_user as usize;
    if held >= most {
        return Err(HandlerError::policy_violation(format!(
            "you hold {held} knock tokens, the most this service allows: revoke some first"
        )));
    }
    if let Err(refused) = app
        .knock_token_limit
        .try_acquire(owner, from.domain().as_str())
    {
        Stats::bump(&app.stats.knocks.capped);
        return Err(capped(refused, "new knock tokens"));
    }
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let mut id = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut id);
    let record = KnockToken {
        id,
        node,
        owner: *owner,
        expires,
        per_hour,
        grace_until: None,
        uses: 0,
    };
    let hash = app.keys.knock_token(&secret);
    let gone = || HandlerError::item_not_found("node is not one of your registrations");
    app.store
        .put_knock_token(&hash, &record)
        .map_err(|e| match e {
            // Unregistered since the caller's list was read.
            StoreError::Invalid(_) => gone(),
            e => e.into(),
        })?;
    // The registration may have gone meanwhile (unregistered through another knock sharing the database):
    // then the store did not take the token (its flush may say so as a conflict), and it is not handed out.
    let flushed = app.store.flush().await;
    if app.store.knock_token(&hash)?.is_none() {
        return Err(gone());
    }
    flushed?;
    Stats::bump(&app.stats.knocks.created);
    tracing::debug!("knock token created");
    Ok(Minted {
        token: URL_SAFE_NO_PAD.encode(secret),
        hash,
        record,
    })
}

/// Answer a knock: wake the owner of the token, or say why not. Who knocked is not an argument: knock
/// neither needs nor keeps it.
pub async fn knock(app: &App, request: Knock) -> Result<(), HandlerError> {
    if app.knock_tokens_per_user == 0 {
        return Err(HandlerError::service_unavailable(
            "this push service does not take knocks",
        ));
    }
    let result = wake(app, &request.token).await;
    // Neither the token nor the knocker: only what became of it.
    tracing::debug!(
        outcome = result.as_ref().map_or_else(Refusal::name, |()| "pushed"),
        "knock answered"
    );
    Stats::bump(match &result {
        Ok(()) => &app.stats.knocks.pushed,
        Err(Refusal::Unknown) => &app.stats.knocks.unknown,
        Err(Refusal::Limited) => &app.stats.knocks.limited,
        Err(Refusal::Failed(_)) => &app.stats.knocks.failed,
    });
    result.map_err(|refusal| match refusal {
        // One answer for unknown, revoked, expired and dead: a knocker learns nothing of which.
        Refusal::Unknown => HandlerError::item_not_found("no such knock token"),
        Refusal::Limited => HandlerError::resource_constraint(
            "this knock token has had its knocks for this hour; try later",
        ),
        Refusal::Failed(error) => error,
    })
}

impl Refusal {
    /// The outcome's name, as the metrics label it.
    fn name(&self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown",
            Refusal::Limited => "limited",
            Refusal::Failed(_) => "failed",
        }
    }
}

/// Why a knock did not wake anyone.
enum Refusal {
    /// No live token by that value (or its registration is gone).
    Unknown,
    /// Over the token's hourly rate.
    Limited,
    /// The push service or the store failed: `wait`.
    Failed(HandlerError),
}

async fn wake(app: &App, token: &str) -> Result<(), Refusal> {
    // 1. A token is 256 bits in URL-safe base64; anything else cannot be one.
    let secret = decode_token(token).ok_or(Refusal::Unknown)?;
    let hash = app.keys.knock_token(&secret);
    let failed = |e: crate::store::StoreError| Refusal::Failed(e.into());
    // 2. A live token: known, not expired, not past its grace period.
    let now = unix_now();
    let Some(record) = app.store.knock_token(&hash).map_err(failed)? else {
        return Err(Refusal::Unknown);
    };
    if !record.is_live(now) {
        // Gone for good: forget it now rather than at the owner's next look.
        app.store.remove_knock_token(&hash).map_err(failed)?;
        return Err(Refusal::Unknown);
    }
    // 3. Its hourly rate, by id: a rotated token and its successor have their own.
    if !app.knock_budget.try_take(&record.id, record.per_hour) {
        return Err(Refusal::Limited);
    }
    // 4. The registration it wakes, pushed by the same rules as a publish the server marked important.
    let Some(registration) = app.store.publish_target(&record.node).map_err(failed)? else {
        return Err(Refusal::Unknown);
    };
    let refused = |r: publish::Refusal| match r.why {
        Refused::DeadToken | Refused::UnknownNode => Refusal::Unknown,
        Refused::Forbidden | Refused::TransientFailure => Refusal::Failed(r.error),
    };
    let target = publish::target_of(app, registration).map_err(refused)?;
    let important = Notification {
        important: true,
        encrypted: None,
    };
    let (kind, _) = publish::wake_kind(&target, &important).map_err(refused)?;
    let id = record.id_text();
    publish::push(app, &target, &record.node, kind, None, Some(&id))
        .await
        .map_err(refused)?;
    // Counted once pushed; batched with the next write (a count lost to a crash is no harm).
    if let Err(error) = app.store.count_knock_use(&hash) {
        tracing::debug!(%error, "knock use not counted");
    }
    Ok(())
}

/// The 32 bytes behind a token as handed out, if it is one.
fn decode_token(token: &str) -> Option<[u8; 32]> {
    if token.len() != 43 {
        return None;
    }
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
}

impl KnockToken {
    /// Whether the token still wakes its owner at `now`.
    fn is_live(&self, now: u64) -> bool {
        now < self.expires && self.grace_until.is_none_or(|until| now < until)
    }
}

/// The owner's live tokens, oldest expiry first; dead ones are removed on the way.
fn live_tokens(
    app: &App,
    owner: &Digest,
    now: u64,
) -> Result<Vec<(Digest, KnockToken)>, HandlerError> {
    let (mut live, dead): (Vec<_>, Vec<_>) = app
        .store
        .knock_tokens_of(owner)?
        .into_iter()
        .partition(|(_, token)| token.is_live(now));
    for (hash, _) in &dead {
        app.store.remove_knock_token(hash)?;
    }
    live.sort_by_key(|(_, t)| (t.expires, t.id));
    Ok(live)
}

/// The caller's registration when they have exactly one (so a client need not name it).
fn only_registration(app: &App, owner: &Digest) -> Result<String, HandlerError> {
    let mut nodes = app.store.nodes_of(owner)?;
    match nodes.len() {
        1 => Ok(nodes.remove(0)),
        0 => Err(HandlerError::item_not_found(
            "you have no registration to bind a knock token to: register a device first",
        )),
        _ => Err(HandlerError::bad_request(
            "you have several registrations: name one in the node field",
        )),
    }
}

/// A token id as a command names it: 16 hex digits.
fn token_id(values: &Values<'_>) -> Result<[u8; 8], HandlerError> {
    let text =
        optional(values, "id").ok_or_else(|| HandlerError::bad_request("missing field \"id\""))?;
    KnockToken::parse_id(text)
        .ok_or_else(|| HandlerError::bad_request("id must be a knock token's id: 16 hex digits"))
}

/// How long a new token lives, in seconds: `expiry-days` for people, or `expiry-seconds` for a client that
/// wants a short-lived token (a contact for the afternoon); not both.
fn lifetime(values: &Values<'_>) -> Result<u64, HandlerError> {
    let days = number(values, "expiry-days", DEFAULT_DAYS, 1..=MAX_DAYS)?;
    match optional(values, "expiry-seconds") {
        None => Ok(u64::from(days) * 86_400),
        Some(_) if optional(values, "expiry-days").is_some() => Err(HandlerError::bad_request(
            "give expiry-days or expiry-seconds, not both",
        )),
        Some(_) => Ok(u64::from(number(
            values,
            "expiry-seconds",
            0,
            MIN_SECONDS..=MAX_DAYS * 86_400,
        )?)),
    }
}

/// An optional whole number within `range`; `default` when absent.
fn number(
    values: &Values<'_>,
    var: &str,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, HandlerError> {
    let Some(text) = optional(values, var) else {
        return Ok(default);
    };
    text.parse::<u32>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            HandlerError::bad_request(format!(
                "{var} must be a whole number from {} to {}",
                range.start(),
                range.end()
            ))
        })
}

/// The reply to a create or a rotate: the token, shown this once, and what it is bound to.
fn created(request: &Command, made: &Minted, replaced: Option<(&KnockToken, u64)>) -> Command {
    let record = &made.record;
    let mut fields = vec![
        Field::new("token", FieldType::TextPrivate).with_value(&made.token),
        Field::text_single("id", &record.id_text()),
        Field::text_single("node", &record.node),
        Field::text_single("expires", &xep0082(record.expires)),
        Field::text_single("per-hour", &record.per_hour.to_string()),
    ];
    if let Some((old, until)) = replaced {
        fields.push(Field::text_single("replaces", &old.id_text()));
        fields.push(Field::text_single("replaced-until", &xep0082(until)));
    }
    let form = DataForm {
        type_: DataFormType::Result_,
        title: None,
        instructions: None,
        fields,
    };
    Command::reply(request, Status::Completed, Some(form), random_id)
}

/// The caller's tokens as a table: id, registration, expiry, rate, uses, and until when a rotated one
/// still works.
fn list(request: &Command, tokens: &[(Digest, KnockToken)], now: u64) -> Command {
    let column = |var: &str, label: &str| {
        let mut field = Field::new(var, FieldType::TextSingle);
        field.label = Some(label.into());
        field
    };
    let columns = vec![
        column("id", "Id"),
        column("node", "Registration"),
        column("expires", "Expires"),
        column("per-hour", "Knocks an hour"),
        column("uses", "Knocks so far"),
        column("replaced-until", "Rotated: works until"),
    ];
    let rows = tokens
        .iter()
        .filter(|(_, t)| t.is_live(now))
        .map(|(_, t)| {
            vec![
                Field::text_single("id", &t.id_text()),
                Field::text_single("node", &t.node),
                Field::text_single("expires", &xep0082(t.expires)),
                Field::text_single("per-hour", &t.per_hour.to_string()),
                Field::text_single("uses", &t.uses.to_string()),
                Field::text_single(
                    "replaced-until",
                    &t.grace_until.map(xep0082).unwrap_or_default(),
                ),
            ]
        })
        .collect();
    let mut reply = Command::reply(request, Status::Completed, None, random_id);
    reply.report = Some(Report::new("Your knock tokens", columns, rows));
    reply
}

/// The form for a command executed without one, so a generic ad-hoc client can run it.
fn ask_for_form(
    app: &App,
    owner: &Digest,
    request: &Command,
    info: &CommandInfo,
    op: Op,
    tokens: &[(Digest, KnockToken)],
) -> Result<Command, HandlerError> {
    let text = |var: &str, label: &str, value: Option<String>| {
        let mut field = Field::new(var, FieldType::TextSingle);
        field.label = Some(label.into());
        field.values = value.into_iter().collect();
        field
    };
    let choice = |var: &str, label: &str, values: Vec<String>| {
        let mut field = Field::new(var, FieldType::ListSingle);
        field.label = Some(label.into());
        field.required = true;
        field.values = values.first().cloned().into_iter().collect();
        field.options = values
            .into_iter()
            .map(|value| Option_ { label: None, value })
            .collect();
        field
    };
    let ids = || tokens.iter().map(|(_, t)| t.id_text()).collect();
    let days = format!("Days until it expires (1 to {MAX_DAYS})");
    let rate = format!("Knocks an hour (1 to {MAX_PER_HOUR})");
    let (instructions, fields) = match op {
        Op::Create => (
            "A knock token lets the one contact you give it to wake this device through this service, \
             even when your server sends no push. Keep the token secret between you two; the reply shows \
             it once.",
            vec![
                choice("node", "Registration", app.store.nodes_of(owner)?),
                text("expiry-days", &days, Some(DEFAULT_DAYS.to_string())),
                text("per-hour", &rate, Some(DEFAULT_PER_HOUR.to_string())),
            ],
        ),
        Op::Revoke => {
            let mut all = Field::new("all", FieldType::Boolean);
            all.label = Some("Revoke all of my knock tokens".into());
            let mut id = choice("id", "Token", ids());
            id.required = false;
            (
                "A revoked token stops working at once.",
                vec![id, all],
            )
        }
        Op::Rotate => (
            "Rotating gives a new token (and id) to hand to the same contact; the old one keeps working \
             for the grace period.",
            vec![
                choice("id", "Token", ids()),
                text(
                    "grace-hours",
                    &format!("Hours the old token keeps working (0 to {MAX_GRACE_HOURS})"),
                    Some(DEFAULT_GRACE_HOURS.to_string()),
                ),
                text("expiry-days", &days, Some(DEFAULT_DAYS.to_string())),
            ],
        ),
        Op::List => unreachable!("a listing needs no form"),
    };
    Ok(form_stage(request, info, instructions.to_owned(), fields))
}

/// A time as XEP-0082 writes it (UTC, to the second): `2026-12-04T11:49:51Z`.
fn xep0082(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil-from-days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_xep_0082_has_them() {
        assert_eq!(xep0082(0), "1970-01-01T00:00:00Z");
        assert_eq!(xep0082(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(xep0082(1_796_384_991), "2026-12-04T11:49:51Z");
    }

    #[test]
    fn only_a_256_bit_url_safe_token_decodes() {
        let token = URL_SAFE_NO_PAD.encode([7u8; 32]);
        assert_eq!(decode_token(&token), Some([7u8; 32]));
        assert_eq!(decode_token(&token[..42]), None);
        assert_eq!(decode_token(&format!("{}=", &token[..42])), None);
        assert_eq!(decode_token(&"+".repeat(43)), None);
    }

    #[test]
    fn a_token_lives_until_its_expiry_or_grace() {
        let token = KnockToken {
            id: [0; 8],
            node: "n".into(),
            owner: [0; 32],
            expires: 100,
            per_hour: 1,
            grace_until: None,
            uses: 0,
        };
        assert!(token.is_live(99));
        assert!(!token.is_live(100));
        let rotated = KnockToken {
            grace_until: Some(50),
            ..token
        };
        assert!(rotated.is_live(49));
        assert!(!rotated.is_live(50));
    }
}
