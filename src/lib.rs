//! knock: an XMPP push App Server (XEP-0357) that wakes iOS apps through APNs.
pub mod app;
pub mod config;
pub mod handlers;
pub mod link;
pub mod push;
pub mod rate_limit;
pub mod router;
pub mod secrets;
pub mod shutdown;
pub mod stats;
pub mod store;
pub mod xep0050;
