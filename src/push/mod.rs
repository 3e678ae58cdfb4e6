//! The push seam: how a wake-up leaves knock. Knows device tokens and HTTP, nothing about XMPP.
//!
//! Everything above this module speaks only what is defined here: a [`ProviderKind`] names a push service,
//! a [`Token`] is the device token as opaque bytes (each service checks and compacts its own tokens in
//! [`ProviderKind::parse_token`]), a [`Wakeup`] says what to send, and a [`Provider`] sends it and answers a
//! [`PushOutcome`]. The publish handler turns outcomes into XMPP replies.
//!
//! Adding a push service is one file here (its client and its token rules), one [`ProviderKind`] variant,
//! one configuration table and one registration command entry. [`DryRun`] logs instead of sending, for
//! staging and benchmarks.

pub mod apns;
pub mod fcm;
pub mod http;

use std::fmt;

use futures::future::BoxFuture;

pub use apns::ApnsClient;

/// A push service. Stored with every registration as one byte ([`ProviderKind::byte`]), so a token is
/// never handed to a service it does not belong to, whatever becomes of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// Apple Push Notification service.
    Apns,
    /// Firebase Cloud Messaging (HTTP v1), Google's push service for Android.
    Fcm,
}

impl ProviderKind {
    /// Every provider knock speaks.
    pub const ALL: &'static [ProviderKind] = &[ProviderKind::Apns, ProviderKind::Fcm];

    /// The name used in configuration (`provider = "apns"`), logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Apns => "apns",
            ProviderKind::Fcm => "fcm",
        }
    }

    /// The provider with this configuration name.
    pub fn from_name(name: &str) -> Option<ProviderKind> {
        Self::ALL.iter().copied().find(|p| p.name() == name)
    }

    /// The byte stored for this provider. Never reuse or renumber one: stored records keep it for life.
    pub fn byte(self) -> u8 {
        match self {
            ProviderKind::Apns => 1,
            ProviderKind::Fcm => 2,
        }
    }

    /// The provider a stored byte names.
    pub fn from_byte(byte: u8) -> Option<ProviderKind> {
        Self::ALL.iter().copied().find(|p| p.byte() == byte)
    }

    /// What a registration form calls this provider's token.
    pub fn token_label(self) -> &'static str {
        match self {
            ProviderKind::Apns => "APNs device token (hex)",
            ProviderKind::Fcm => "FCM registration token",
        }
    }

    /// What a p2-dialect registration's pushes must carry as `account`, for the device `device_id` of
    /// `bare_jid`: for FCM, [`p2_hash`], which the Conversations family compares to tell which of its
    /// accounts to wake; for APNs nothing (p2's iOS clients read the node).
    pub fn p2_account(self, bare_jid: &str, device_id: &str) -> Option<String> {
        match self {
            ProviderKind::Apns => None,
            ProviderKind::Fcm => Some(p2_hash(bare_jid, device_id)),
        }
    }

    /// Check a device token as a client sent it, and turn it into the bytes knock stores and hands back in
    /// [`Wakeup::token`]. The error is for the client and never repeats the token.
    pub fn parse_token(self, text: &str) -> Result<Token, TokenError> {
        match self {
            ProviderKind::Apns => apns::parse_token(text),
            ProviderKind::Fcm => fcm::parse_token(text),
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// p2's identity of a device under a JID (its `combineAndHash`): lowercase hex SHA-1 of the JID, a NUL and
/// the device id. The Conversations family compares a push's `account` with exactly this, made from its
/// account's bare JID and its `ANDROID_ID`; p2 names a device's group-chat registration (`channel`) the
/// same way, from the room's JID. A name for the device, not a secret: it is sent to the push service.
pub fn p2_hash(jid: &str, device_id: &str) -> String {
    use sha1::{Digest, Sha1};
    let mut hash = Sha1::new();
    hash.update(jid.as_bytes());
    hash.update([0]);
    hash.update(device_id.as_bytes());
    http::lower_hex(&hash.finalize())
}

/// A device token as its provider stores it: opaque bytes to everything but that provider. Its `Debug`
/// shows only the length, so a token never reaches a log by accident.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Token(Box<[u8]>);

impl Token {
    /// A token from the bytes its provider made (or a store kept).
    pub fn from_bytes(bytes: impl Into<Box<[u8]>>) -> Token {
        Token(bytes.into())
    }

    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({} bytes)", self.0.len())
    }
}

/// Why a client's token was refused: what the provider expects, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub &'static str);

/// How a wake-up should show on the device. The publish handler decides per wake-up; each provider
/// renders it its own way (APNs: push type, topic and priority).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WakeKind {
    /// A silent wake-up: the app runs briefly in the background (APNs `content-available`, priority 5).
    /// Rationed by the device's platform (Apple: two or three an hour), so it may never arrive.
    #[default]
    Background,
    /// A visible notification with a fixed, content-free title, which an app's notification extension may
    /// replace after fetching (APNs `alert` with `mutable-content`, priority 10).
    Alert,
    /// An incoming call, for the device's call token: delivered at once or not at all (APNs: a PushKit
    /// `voip` push to the app's `.voip` topic, expiration 0).
    Call,
}

/// A payload the client encrypted for itself with a key knock never sees (Tigase's
/// `tigase:push:encrypt:0`): handed to the device exactly as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encrypted<'a> {
    /// The ciphertext, base64, as the user's server sent it.
    pub data: &'a str,
    /// Its initialisation vector, base64, as sent.
    pub iv: &'a str,
}

/// One wake-up to send. Carries no message content by construction: at most a payload encrypted by the
/// client for itself, which knock cannot read.
#[derive(Debug, Clone, Copy)]
pub struct Wakeup<'a> {
    /// The device token, as [`ProviderKind::parse_token`] made it.
    pub token: &'a [u8],
    /// The pubsub node, which tells the app which registration (account) fired.
    pub node: &'a str,
    /// Silent, visible, or a call.
    pub kind: WakeKind,
    /// The account the wake-up is for, as the app must be told it in the push: the bare JID for Tigase's
    /// dialect, [`p2_hash`] of JID and device for p2's FCM one (Conversations); `None` for every other app.
    pub account: Option<&'a str>,
    /// The client's own encrypted payload, passed through.
    pub encrypted: Option<Encrypted<'a>>,
    /// For a knock (a contact holding one of the owner's knock tokens asked for this wake-up): the token's
    /// opaque id, 16 hex digits, which the app maps to the contact it gave that token to. Never the token,
    /// never a JID.
    pub knock: Option<&'a str>,
}

impl<'a> Wakeup<'a> {
    /// A bare wake-up: no account named, nothing passed through.
    pub fn new(token: &'a [u8], node: &'a str, kind: WakeKind) -> Wakeup<'a> {
        Wakeup {
            token,
            node,
            kind,
            account: None,
            encrypted: None,
            knock: None,
        }
    }
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

/// A configured push service client: one per app.
pub trait Provider: Send + Sync + 'static {
    /// Which service this is, so registrations for it are checked by its token rules and a publish never
    /// sends one service's token to another.
    fn kind(&self) -> ProviderKind;

    /// Send one wake-up. Must return within the provider's own deadline; never panics.
    fn wake<'a>(&'a self, wakeup: Wakeup<'a>) -> BoxFuture<'a, PushOutcome>;
}

/// A provider that only logs, at debug level and without the token. Registrations for it are still checked
/// by the real service's token rules.
#[derive(Debug, Clone)]
pub struct DryRun {
    /// The service it stands in for.
    pub kind: ProviderKind,
    /// The app's name, for the log line.
    pub app: String,
}

impl Provider for DryRun {
    fn kind(&self) -> ProviderKind {
        self.kind
    }

    fn wake<'a>(&'a self, wakeup: Wakeup<'a>) -> BoxFuture<'a, PushOutcome> {
        tracing::debug!(app = %self.app, kind = ?wakeup.kind, "dry run: wake-up not sent");
        Box::pin(std::future::ready(PushOutcome::Delivered))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_and_bytes_round_trip() {
        for &p in ProviderKind::ALL {
            assert_eq!(ProviderKind::from_name(p.name()), Some(p));
            assert_eq!(ProviderKind::from_byte(p.byte()), Some(p));
        }
        assert_eq!(ProviderKind::from_byte(0), None);
        assert_eq!(ProviderKind::from_name("gcm"), None);
    }

    #[test]
    fn p2_hash_is_what_conversations_compares() {
        // sha1("test@example.com\0" + "92afd7a91cdba9a0"), as Conversations' CryptoHelper computes it.
        assert_eq!(
            p2_hash("test@example.com", "92afd7a91cdba9a0"),
            "532e27275c60cde28baeaa88e6815a366c8996de"
        );
    }

    #[test]
    fn a_token_debugs_as_its_length_only() {
        let token = Token::from_bytes(vec![0xab; 32]);
        assert_eq!(format!("{token:?}"), "Token(32 bytes)");
    }
}
