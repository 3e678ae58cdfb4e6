//! Push backends: how a wake-up leaves knock. Knows device tokens and HTTP, nothing about XMPP.
//!
//! A [`Backend`] takes a [`Wakeup`] and answers a [`PushOutcome`]; the publish handler turns outcomes into XMPP
//! replies. APNs is the first backend; [`DryRun`] logs instead of sending, for staging and benchmarks.

pub mod apns;

use futures::future::BoxFuture;

pub use apns::ApnsClient;

/// One wake-up to send: where to, and which node it is for. Carries no message content by construction.
#[derive(Debug, Clone, Copy)]
pub struct Wakeup<'a> {
    /// The device token (lowercase hex for APNs).
    pub token: &'a str,
    /// The pubsub node, which the app may use to tell its accounts apart.
    pub node: &'a str,
}

/// What became of a wake-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// The push service accepted it.
    Delivered,
    /// The token will never work again (uninstalled app, wrong environment): the registration must go.
    DeadToken {
        /// The service's reason, e.g. `Unregistered`.
        reason: String,
    },
    /// The service asked us to slow down, and kept doing so through our retries.
    Throttled,
    /// The service failed or could not be reached in time; worth trying again later.
    Unavailable {
        /// What went wrong, for the log.
        reason: String,
    },
    /// The service rejected our credentials or request shape: the admin must fix the configuration.
    Misconfigured {
        /// The service's reason, e.g. `InvalidProviderToken`.
        reason: String,
    },
}

/// A push service.
pub trait Backend: Send + Sync + 'static {
    /// Send one wake-up. Must return within the backend's own deadline; never panics.
    fn wake<'a>(&'a self, wakeup: Wakeup<'a>) -> BoxFuture<'a, PushOutcome>;
}

/// A backend that only logs, at debug level and without the token.
#[derive(Debug, Default, Clone)]
pub struct DryRun {
    /// The app's name, for the log line.
    pub app: String,
}

impl Backend for DryRun {
    fn wake<'a>(&'a self, _wakeup: Wakeup<'a>) -> BoxFuture<'a, PushOutcome> {
        tracing::debug!(app = %self.app, "dry run: wake-up not sent");
        Box::pin(std::future::ready(PushOutcome::Delivered))
    }
}
