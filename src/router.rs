//! The stanza router: one IQ in, at most one reply out, and never an IQ left unanswered.
//!
//! [`handle_frame`] takes an IQ request as the link read it. A publish in the shape servers send is read
//! straight from the bytes ([`FastPublish`]) and goes to the publish handler; everything else is parsed in
//! full and goes through [`handle`]: [`Request::parse`] turns the payload into the one enum of everything
//! knock understands, [`dispatch`] hands each variant to its handler, and the typed answer or
//! [`HandlerError`] becomes the reply IQ. Adding a protocol means one variant, one parse arm, one dispatch
//! arm.

use minidom::Element;
use xmpp_parsers::disco::{DiscoInfoQuery, DiscoItemsQuery};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::jid::Jid;
use xmpp_parsers::ns;
use xmpp_parsers::ping::Ping;
use xmpp_parsers::pubsub::PubSub;
use xmpp_parsers::push::{Disable, Enable};

use crate::app::App;
use crate::handlers::publish::PublishRequest;
use crate::handlers::{commands, disco, enable, knock, publish, HandlerError};
use crate::stanza::frame::Frame;
use crate::stanza::knock::Knock;
use crate::stanza::notification::Notification;
use crate::stanza::xep0050::{self, Command};
use crate::stanza::{self, FastPublish};
use crate::stats::Stats;

/// Everything knock answers.
#[derive(Debug)]
pub enum Request {
    /// XEP-0030 disco#info.
    DiscoInfo(DiscoInfoQuery),
    /// XEP-0030 disco#items.
    DiscoItems(DiscoItemsQuery),
    /// XEP-0199 ping.
    Ping,
    /// XEP-0050 command (registration).
    Command(Command),
    /// XEP-0357 `<enable/>` sent to knock (registration shorthand).
    Enable(Enable),
    /// XEP-0357 `<disable/>` sent to knock.
    Disable(Disable),
    /// XEP-0357 publish from a user's server.
    Publish(PublishRequest<'static>),
    /// A knock: anyone holding a knock token asks for its owner's device to be woken.
    Knock(Knock),
}

fn parse<T: TryFrom<Element>>(payload: Element, what: &str) -> Result<T, HandlerError> {
    T::try_from(payload).map_err(|_| HandlerError::bad_request(format!("malformed {what}")))
}

impl Request {
    /// Classify an IQ payload. Known namespaces with a bad shape are `bad-request`; anything else is
    /// `service-unavailable`, as RFC 6120 §8.4 asks for unsupported payloads.
    pub fn parse(is_get: bool, payload: Element) -> Result<Request, HandlerError> {
        let name = payload.name();
        let namespace = payload.ns();
        match (is_get, name, namespace.as_str()) {
            (true, "query", ns::DISCO_INFO) => {
                parse(payload, "disco#info query").map(Request::DiscoInfo)
            }
            (true, "query", ns::DISCO_ITEMS) => {
                parse(payload, "disco#items query").map(Request::DiscoItems)
            }
            (true, "ping", ns::PING) => parse::<Ping>(payload, "ping").map(|_| Request::Ping),
            (false, "command", xep0050::NS) => parse(payload, "command").map(Request::Command),
            (false, "enable", ns::PUSH) => parse(payload, "enable").map(Request::Enable),
            (false, "disable", ns::PUSH) => parse(payload, "disable").map(Request::Disable),
            (false, "knock", stanza::knock::NS) => parse(payload, "knock").map(Request::Knock),
            (false, "pubsub", ns::PUBSUB) => match parse::<PubSub>(payload, "publish")? {
                PubSub::Publish {
                    publish,
                    publish_options,
                } => PublishRequest::from_pubsub(publish, publish_options).map(Request::Publish),
                _ => Err(HandlerError::service_unavailable(
                    "only XEP-0357 publishes are supported",
                )),
            },
            _ => Err(HandlerError::service_unavailable(
                "not supported by this push service",
            )),
        }
    }
}

/// Run one request for `from`; `Ok(Some(payload))` or `Ok(None)` become a result.
pub async fn dispatch(
    app: &App,
    from: &Jid,
    request: Request,
) -> Result<Option<Element>, HandlerError> {
    Ok(match request {
        Request::DiscoInfo(query) => Some(disco::info(app, query)?.into()),
        Request::DiscoItems(query) => Some(disco::items(app, query)?.into()),
        Request::Ping => None,
        Request::Command(command) => {
            Some(commands::execute(app, from, command).await?.into_element())
        }
        Request::Enable(e) => {
            enable::enable(app, from, e).await?;
            None
        }
        Request::Disable(d) => {
            enable::disable(app, from, d).await?;
            None
        }
        Request::Publish(request) => {
            publish::publish(app, from, request).await?;
            None
        }
        // Who knocked is not passed on: knock neither needs nor keeps it.
        Request::Knock(request) => {
            knock::knock(app, request).await?;
            None
        }
    })
}

/// Answer one IQ request straight off the wire. Returns `None` only for what cannot be answered (no
/// sender or id); every other request gets exactly one reply, a malformed one a `bad-request`.
pub async fn handle_frame(app: &App, frame: Frame) -> Option<Iq> {
    if let Some(fast) = FastPublish::read(&frame) {
        // Addresses that do not parse as JIDs take the full path, which refuses them properly.
        if let (Ok(from), Ok(to)) = (
            fast.from.parse::<Jid>(),
            fast.to.as_deref().map(str::parse::<Jid>).transpose(),
        ) {
            let request = PublishRequest {
                node: fast.node,
                secret: fast.secret,
                push_module: fast.push_module,
                notification: Notification {
                    important: fast.important,
                    encrypted: None,
                },
            };
            let answer = publish::publish(app, &from, request).await.map(|_| None);
            return Some(reply(app, from, to, fast.id.into_owned(), answer));
        }
    }
    match stanza::parse_iq(&frame) {
        // Boxed: every stanza's future is moved into the link's set of work in flight at its full size,
        // and this path (everything but publishes) is the larger one by far. Publishes stay unboxed.
        Ok(iq) => Box::pin(handle(app, iq)).await,
        Err(error) => {
            tracing::debug!(%error, "malformed IQ");
            Stats::bump(&app.stats.bad_request);
            let envelope = stanza::envelope(&frame);
            let from = envelope.from?.parse().ok()?;
            let to = envelope.to.and_then(|to| to.parse().ok());
            let error = HandlerError::bad_request("malformed stanza");
            Some(reply(app, from, to, envelope.id?, Err(error)))
        }
    }
}

/// Answer one parsed IQ. Returns `None` for results and errors (which are answers themselves) and for IQs
/// without a sender, which cannot be answered; every other IQ gets exactly one reply.
pub async fn handle(app: &App, iq: Iq) -> Option<Iq> {
    let (from, to, id, is_get, payload) = match iq {
        Iq::Get {
            from,
            to,
            id,
            payload,
        } => (from, to, id, true, payload),
        Iq::Set {
            from,
            to,
            id,
            payload,
        } => (from, to, id, false, payload),
        Iq::Result { .. } | Iq::Error { .. } => return None,
    };
    let Some(from) = from else {
        tracing::debug!("IQ without a sender dropped");
        return None;
    };
    let answer = match Request::parse(is_get, payload) {
        Ok(request) => dispatch(app, &from, request).await,
        Err(e) => {
            Stats::bump(&app.stats.bad_request);
            Err(e)
        }
    };
    Some(reply(app, from, to, id, answer))
}

/// The reply to the IQ `id` from `from` to `to` (knock's own JID when absent).
fn reply(
    app: &App,
    from: Jid,
    to: Option<Jid>,
    id: String,
    answer: Result<Option<Element>, HandlerError>,
) -> Iq {
    let me = to.unwrap_or_else(|| app.jid.clone().into());
    match answer {
        Ok(payload) => Iq::Result {
            from: Some(me),
            to: Some(from),
            id,
            payload,
        },
        Err(error) => Iq::Error {
            error: error.to_stanza_error(Some(me.clone())),
            from: Some(me),
            to: Some(from),
            id,
            payload: None,
        },
    }
}
