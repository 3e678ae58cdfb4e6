//! knock: an XMPP push App Server (XEP-0357). A user's server publishes "wake this node" to knock; knock
//! finds the device behind the node and sends a wake-up without message content through the device
//! vendor's push service.
//!
//! A tour, in the order a stanza meets the code:
//!
//! - [`link`]: the XEP-0114 component connection to the XMPP server, and only the socket: connects,
//!   authenticates, keeps the link alive with pings, reconnects with backoff, bounds the stanzas in flight,
//!   and drains them on shutdown. Hands each stanza's bytes up.
//! - [`stanza`]: bytes to a typed request. [`stanza::frame`] cuts the stream into stanzas without parsing
//!   them; a server's publish is read straight from its bytes ([`stanza::FastPublish`], lexed by the narrow
//!   [`stanza::xml`], or only compared with a [`stanza::shape`] already read); everything else goes through
//!   minidom and xmpp-parsers, with [`stanza::xep0050`] for the ad-hoc command element (and
//!   [`stanza::report`] for a listing's table) and [`stanza::knock`] for knock's own `<knock/>`.
//!   [`stanza::notification`] says what a publish's notification means for delivery (important or not, a
//!   client-encrypted payload to pass through), never what it says.
//! - [`router`]: turns each IQ into one [`router::Request`], hands it to its handler, and turns the answer
//!   into exactly one reply.
//! - [`handlers`]: one module per protocol or client dialect: [`handlers::disco`], [`handlers::commands`]
//!   (XEP-0050 registration, p2's dialect, and the table of every command), [`handlers::tigase`] (Siskin's
//!   `register-device`), [`handlers::selftest`] (a test push to each of a user's devices),
//!   [`handlers::enable`] (the `<enable/>` shorthand), [`handlers::publish`] (XEP-0357 publishes, to a
//!   registered node or, for Monal, registration-free; the kind of wake-up each gets), [`handlers::knock`]
//!   (knock tokens: a user's per-contact tokens, and the knocks of whoever holds one). Each maps its
//!   failures to a [`handlers::HandlerError`], one XMPP error each.
//! - [`store`]: the [`store::Store`] trait, the [`store::Registration`] it keeps and [`store::open`]; the
//!   sled engine with its in-memory publish index, tokens sealed at rest, a registration acknowledged only
//!   once durable, and the PostgreSQL engine for several instances. Knock tokens are kept as keyed hashes. [`store::secrets`] makes the keyed hashes stored instead of JIDs.
//! - [`push`]: the provider seam ([`push::Provider`], [`push::Wakeup`], [`push::PushOutcome`], tokens as
//!   opaque bytes) and its clients, APNs and FCM. Knows tokens and HTTP/2, not XMPP.
//!
//! Around them: [`app`] (the state handlers share, built once), [`config`] (the TOML file), [`limits`]
//! (per-node coalescing, registration flood caps, hourly budgets of silent, registration-free and knock
//! pushes), [`stats`] (counters, and log lines limited per interval), [`http`] (the optional `/metrics` and `/health` listener), [`admin`] (`keygen`, `stats`,
//! `export`, `import`, `delete` on a stopped knock's store), [`shutdown`] (graceful stop as a value).
//!
//! Data flows one way: link -> stanza -> router -> handler -> store / push -> reply. Handlers do not know
//! sockets, providers do not know XMPP, nothing above [`push`] knows a provider's token format, and nothing
//! above [`store`] knows sled.

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
