//! knock: an XMPP push App Server (XEP-0357) that wakes iOS apps through APNs.
pub mod config;
pub mod push;
pub mod secrets;
pub mod store;
pub mod xep0050;
