//! knock: an XMPP push App Server (XEP-0357) that wakes iOS apps through APNs.
//!
//! A tour, in the order a stanza meets the code:
//!
//! - [`link`]: the XEP-0114 component connection to the XMPP server. Connects, authenticates, keeps the link
//!   alive with pings, reconnects with backoff, bounds the stanzas in flight, and drains them on shutdown.
//!   Knows sockets, not XEPs. [`link::connection`] speaks the stream; [`link::frame`] cuts it into
//!   stanzas without parsing them.
//! - [`stanza`]: how much each stanza needs parsing. A server's publish is read straight from its bytes
//!   ([`stanza::FastPublish`], with the lexing in [`xml`]); everything else goes through minidom and
//!   xmpp-parsers.
//! - [`router`]: turns each IQ into one [`router::Request`], hands it to its handler, and turns the answer
//!   into exactly one reply.
//! - [`handlers`]: one module per protocol — [`handlers::disco`], [`handlers::commands`] (XEP-0050
//!   registration), [`handlers::enable`] (the `<enable/>` shorthand), [`handlers::publish`] (XEP-0357
//!   publishes). Each maps its failures to a [`handlers::HandlerError`], one XMPP error condition each.
//! - [`store`]: the [`store::Store`] trait and its sled implementation, with the in-memory index publishes
//!   read and tokens sealed at rest; a registration is acknowledged only once it is durable.
//! - [`push`]: the [`push::Backend`] trait and the APNs client. Knows tokens and HTTP/2, not XMPP.
//! - Around them: [`app`] (the state handlers share), [`config`] (the TOML file), [`secrets`] (random nodes
//!   and keyed hashes, so no JID is stored), [`rate_limit`] (per-node coalescing), [`registration_limit`]
//!   (registration flood caps per user and per domain), [`stats`] (counts and states, for the log and
//!   the admin listener), [`log_limit`] (one line per interval for failures that repeat per publish),
//!   [`admin`] (the optional HTTP `/metrics` and `/health`), [`maintenance`]
//!   (`keygen`, `stats`, `export`, `import`, `delete` on a stopped knock's store), [`shutdown`]
//!   (graceful stop as a value), [`xep0050`] (the ad-hoc command element).
//!
//! Data flows one way: link -> router -> handler -> store / push -> reply.

pub mod admin;
pub mod app;
pub mod config;
pub mod handlers;
pub mod http;
pub mod limits;
pub mod link;
pub mod push;
pub mod router;
pub mod shutdown;
pub mod stanza;
pub mod stats;
pub mod store;
