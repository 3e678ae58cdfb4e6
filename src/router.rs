//! The stanza router: one IQ in, at most one reply out, and never an IQ left unanswered.
//!
//! [`Request::parse`] turns an IQ payload into the one enum of everything knock understands; [`handle`]
//! hands each variant to its handler and turns the typed answer or [`HandlerError`] into the reply IQ.
//! Adding a protocol means one variant, one parse arm, one dispatch arm.

use minidom::Element;
use xmpp_parsers::disco::{DiscoInfoQuery, DiscoItemsQuery};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::jid::Jid;
use xmpp_parsers::ns;
use xmpp_parsers::ping::Ping;
use xmpp_parsers::pubsub::PubSub;
use xmpp_parsers::push::{Disable, Enable};

use crate::app::App;
use crate::handlers::{commands, disco, enable, publish, HandlerError};
use crate::stats::Stats;
use crate::xep0050::{self, Command};

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
    Publish(
        xmpp_parsers::pubsub::pubsub::Publish,
        Option<xmpp_parsers::pubsub::pubsub::PublishOptions>,
    ),
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
            (false, "pubsub", ns::PUBSUB) => match parse::<PubSub>(payload, "publish")? {
                PubSub::Publish {
                    publish,
                    publish_options,
                } => Ok(Request::Publish(publish, publish_options)),
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
        Request::DiscoInfo(query) => Some(disco::info(query)?.into()),
        Request::DiscoItems(query) => Some(disco::items(app, query)?.into()),
        Request::Ping => None,
        Request::Command(command) => Some(commands::execute(app, from, command).await?.into()),
        Request::Enable(e) => {
            enable::enable(app, from, e).await?;
            None
        }
        Request::Disable(d) => {
            enable::disable(app, from, d).await?;
            None
        }
        Request::Publish(p, options) => {
            publish::publish(app, from, p, options).await?;
            None
        }
    })
}

/// Answer one IQ. Returns `None` for results and errors (which are answers themselves) and for IQs without
/// a sender, which cannot be answered; every other IQ gets exactly one reply.
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
    let me = to.unwrap_or_else(|| app.jid.clone().into());
    Some(match answer {
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
    })
}
