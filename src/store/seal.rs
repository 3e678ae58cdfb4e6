//! Encryption at rest: the store key, and how device tokens and the instance key are sealed with it.
//!
//! A device token locates a phone, and the instance key is what turns a guessed JID into the hashes the store
//! keeps. With a store key configured, both are sealed with XChaCha20-Poly1305 (random 192-bit nonces, so no
//! nonce bookkeeping survives a crash wrongly), bound by the associated data to what they belong to: a token
//! to its node, so sealed tokens cannot be swapped between records. The key lives in its own file, which
//! `knock keygen` writes; a copy of the database without that file reveals no token and cannot test JIDs.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Length of a sealed value's overhead: the nonce in front, the tag behind.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// What the key file starts with, so a wrong file (a TLS key, an APNs key) is refused by name.
const KEY_FILE_PREFIX: &str = "knock-store-key-v1:";

/// Why a store key could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read or created.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a knock store key.
    #[error("{path}: not a knock store key (expected one line \"{KEY_FILE_PREFIX}<64 hex digits>\", as `knock keygen` writes)")]
    Format {
        /// The key file.
        path: String,
    },
    /// `keygen` would overwrite a key, and with it every token sealed under it.
    #[error("{path} already exists; a new key cannot read what the old one sealed, so knock will not overwrite it")]
    Exists {
        /// The key file.
        path: String,
    },
}

/// The 256-bit key that seals tokens and the instance key.
#[derive(Clone)]
pub struct StoreKey {
    key: [u8; 32],
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

impl StoreKey {
    /// A fresh random key.
    pub fn generate() -> StoreKey {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        StoreKey { key }
    }

    /// A key from its 32 bytes (tests, and keys kept elsewhere).
    pub fn from_bytes(key: [u8; 32]) -> StoreKey {
        StoreKey { key }
    }

    /// Read a key file written by [`StoreKey::write_new`].
    pub fn load(path: &Path) -> Result<StoreKey, KeyFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
            path: shown.clone(),
            source,
        })?;
        let format = || KeyFileError::Format {
            path: shown.clone(),
        };
        let hex_key = text
            .trim()
            .strip_prefix(KEY_FILE_PREFIX)
            .ok_or_else(format)?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(hex_key, &mut key).map_err(|_| format())?;
        Ok(StoreKey { key })
    }

    /// Write this key to a new file readable by its owner only; never overwrites.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyFileError> {
        let shown = path.display().to_string();
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyFileError::Exists {
                    path: shown.clone(),
                }
            } else {
                KeyFileError::Io {
                    path: shown.clone(),
                    source,
                }
            }
        })?;
        writeln!(file, "{KEY_FILE_PREFIX}{}", hex::encode(self.key))
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyFileError::Io {
                path: shown,
                source,
            })
    }

    /// Identifies the key without revealing it: stored beside what it sealed, so a store opened with the
    /// wrong key, or with none, says so at once instead of failing on every record.
    pub fn check_value(&self) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC accepts a key of any length");
        mac.update(b"knock store key check v1");
        mac.finalize().into_bytes().into()
    }

    /// Seal `plain`, bound to `context`: `nonce | ciphertext | tag`.
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = XChaCha20Poly1305::new(&self.key.into())
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plain,
                    aad: context,
                },
            )
            .expect("XChaCha20-Poly1305 seals any message under 256 GiB");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Open what [`StoreKey::seal`] sealed under the same `context`; `None` if it was sealed under another
    /// key or context, or altered.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < SEAL_OVERHEAD {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        XChaCha20Poly1305::new(&self.key.into())
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: body,
                    aad: context,
                },
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let key = StoreKey::generate();
        let sealed = key.seal(b"node-a", b"token bytes");
        assert_eq!(sealed.len(), 11 + SEAL_OVERHEAD);
        assert_eq!(
            key.open(b"node-a", &sealed).as_deref(),
            Some(&b"token bytes"[..])
        );
        assert_eq!(key.open(b"node-b", &sealed), None, "bound to its context");
        assert_eq!(StoreKey::generate().open(b"node-a", &sealed), None);
        let mut altered = sealed.clone();
        altered[30] ^= 1;
        assert_eq!(key.open(b"node-a", &altered), None);
        assert_eq!(key.open(b"node-a", &sealed[..10]), None);
        assert_ne!(
            key.seal(b"node-a", b"token bytes"),
            sealed,
            "fresh nonce each time"
        );
    }

    #[test]
    fn key_files_round_trip_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.key");
        let key = StoreKey::generate();
        key.write_new(&path).expect("write");
        let again = StoreKey::load(&path).expect("load");
        assert_eq!(again.check_value(), key.check_value());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "key file is readable by others: {mode:o}");
        }
        assert!(matches!(
            StoreKey::generate().write_new(&path),
            Err(KeyFileError::Exists { .. })
        ));
        assert_eq!(
            StoreKey::load(&path).expect("load").check_value(),
            key.check_value()
        );
        let wrong = dir.path().join("wrong.key");
        std::fs::write(&wrong, "-----BEGIN PRIVATE KEY-----\n").expect("write");
        let err = StoreKey::load(&wrong).expect_err("not a key");
        assert!(err.to_string().contains("not a knock store key"), "{err}");
        assert!(format!("{key:?}").contains(".."), "Debug hides the key");
    }
}
