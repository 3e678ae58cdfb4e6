//! Random identifiers and keyed hashes: how knock names nodes and devices without storing who they belong to.
//!
//! Nodes are 128 random bits. Device and owner identities are HMAC-SHA-256 of the JID under the store's
//! instance key, so the registration records alone do not say which JID registered what. Publish secrets
//! for command registrations are derived from the node under that key, so a re-registration can hand the
//! same secret back while the records keep only its hash. The instance key lives in the store too, sealed
//! under the store key (`[store] key_file`, kept outside the database), so a copy of the database alone
//! cannot test guessed JIDs against the hashes; a store created in the clear (`plaintext_tokens`) keeps it
//! in the clear and offers no such protection.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::store::{secret_tag, Digest, SecretTag};

/// 128 bits from the OS RNG, URL-safe base64 without padding (22 characters).
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256 of a publish secret: what the store keeps.
pub fn secret_hash(secret: &str) -> Digest {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `presented` is the secret behind `tag`, in constant time.
pub fn secret_matches(tag: &SecretTag, presented: &str) -> bool {
    secret_tag(&secret_hash(presented)).ct_eq(tag).into()
}

/// Keyed hashes under the store's instance key.
#[derive(Clone)]
pub struct Keyring {
    /// The store's 32-byte instance key.
    key: [u8; 32],
}

impl Keyring {
    /// A keyring over the given instance key.
    pub fn new(key: [u8; 32]) -> Keyring {
        Keyring { key }
    }

    fn mac(&self, parts: &[&[u8]]) -> Digest {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC accepts a key of any length");
        for part in parts {
            // Length-prefix each part so ("ab","c") and ("a","bc") never collide.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// The identity of one device of one user for one app.
    pub fn device(&self, bare_jid: &str, device_id: &str, app: &str) -> Digest {
        self.mac(&[
            b"device",
            bare_jid.as_bytes(),
            device_id.as_bytes(),
            app.as_bytes(),
        ])
    }

    /// The identity of one device's registration for one group chat (p2's `muc`, by its channel id), apart
    /// from the device's own.
    pub fn device_channel(
        &self,
        bare_jid: &str,
        device_id: &str,
        channel: &str,
        app: &str,
    ) -> Digest {
        self.mac(&[
            b"device-channel",
            bare_jid.as_bytes(),
            device_id.as_bytes(),
            channel.as_bytes(),
            app.as_bytes(),
        ])
    }

    /// The identity of one device of one user for one app, where the dialect names devices by their token
    /// (Tigase's), so a re-registration with the same token finds its node again.
    pub fn device_by_token(&self, bare_jid: &str, token: &[u8], app: &str) -> Digest {
        self.mac(&[b"device-token", bare_jid.as_bytes(), token, app.as_bytes()])
    }

    /// The identity of a user, to check who may disable a node.
    pub fn owner(&self, bare_jid: &str) -> Digest {
        self.mac(&[b"owner", bare_jid.as_bytes()])
    }

    /// The identity of a device token (registration-free mode's rate limit), so the limiter does not keep
    /// the token itself.
    pub fn token(&self, provider: u8, token: &[u8]) -> Digest {
        self.mac(&[b"token", &[provider], token])
    }

    /// The identity of a device token as one app and environment push to it (registration-free mode's
    /// dead-token memory). A token is dead only where the push service said so: a production token sent
    /// to the sandbox, or to another app's topic, is refused there and nowhere else, so a stranger cannot
    /// get a working token remembered dead by publishing it under the wrong push module.
    pub fn token_route(&self, app: &str, sandbox: bool, provider: u8, token: &[u8]) -> Digest {
        self.mac(&[
            b"token-route",
            app.as_bytes(),
            &[u8::from(sandbox), provider],
            token,
        ])
    }

    /// The identity of a knock token: the store's key for it, so the store never holds the token itself
    /// and a copy of the database cannot be used to knock.
    pub fn knock_token(&self, token: &[u8]) -> Digest {
        self.mac(&[b"knock-token", token])
    }

    /// The publish secret knock hands out for a node (256 bits, URL-safe base64).
    pub fn node_secret(&self, node: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(&[b"secret", node.as_bytes()]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_128_bit_url_safe_and_distinct() {
        let a = random_id();
        assert_eq!(a.len(), 22);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(a, random_id());
    }

    #[test]
    fn secrets_match_only_themselves() {
        let h = secret_tag(&secret_hash("correct horse"));
        assert!(secret_matches(&h, "correct horse"));
        assert!(!secret_matches(&h, "correct horsE"));
        assert!(!secret_matches(&h, ""));
    }

    #[test]
    fn keyed_hashes_depend_on_key_and_every_part() {
        let k = Keyring::new([7; 32]);
        let other = Keyring::new([8; 32]);
        assert_ne!(k.device("a@x", "d", "app"), other.device("a@x", "d", "app"));
        assert_ne!(k.device("a@x", "d", "app"), k.device("a@x", "d", "app2"));
        assert_ne!(k.device("a@x", "dapp", ""), k.device("a@x", "d", "app"));
        assert_eq!(k.node_secret("n"), k.node_secret("n"));
        assert!(k.node_secret("n").len() >= 22);
        assert_ne!(k.node_secret("n"), k.node_secret("m"));
    }
}
