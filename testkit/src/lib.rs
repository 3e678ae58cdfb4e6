//! Test peers for knock that speak the real protocols, for tests and benchmarks only.
//!
//! - [`apns`]: a mock of Apple's APNs provider API (HTTP/2 over TLS, `/3/device/<token>`, ES256 JWT checked,
//!   Apple's status codes and reasons), with per-token behaviour that tests can switch.
//! - [`fcm`]: a mock of Google's FCM HTTP v1 API and its OAuth2 token endpoint (TLS, HTTP/2 or HTTP/1.1,
//!   RS256 service-account assertions, Google's error bodies), with per-token behaviour.
//! - [`server`]: the XMPP server side of an XEP-0114 component link, playing Prosody or ejabberd.
//! - [`silent`]: a TCP peer that accepts and never answers (a hung server).
//! - [`cli`]: what the `mock-apns` and `mock-fcm` binaries share.
//! - [`proxy`]: a TCP relay whose connections can be blackholed (a network path that silently dies).
//! - [`postgres`]: a throwaway PostgreSQL cluster (Debian's real server) on a loopback port, for the SQL store.

pub mod apns;
pub mod cli;
pub mod fcm;
pub mod postgres;
pub mod proxy;
pub mod server;
pub mod silent;
mod tls;
