//! How a [`Registration`] is laid out at rest, in every engine (sled's value, PostgreSQL's `record` column):
//! a small versioned binary record.
//!
//! A million registrations should fit a small VM's disk and page cache, so the record carries raw bytes, not
//! text: the three digests as 32 bytes each, the token as its provider's bytes, and the node not at all
//! (it is the key). The first byte names the format, so every earlier format is still read beside the
//! current one, and the index rebuild rewrites old records in the current one.
//!
//! Layout: `format | provider | device[32] | owner[32] | secret_hash[32] | len domain | len app | len token`,
//! where each `len x` is a two-byte big-endian length followed by that many bytes, and `provider` is
//! [`ProviderKind::byte`]. Format 3 holds the token as it is; format 4, written when a store key is
//! configured, holds it sealed (see [`crate::store::seal`]) and bound to the record's node.
//!
//! A registration of a client dialect that carries more (no secret, a call token, the account: Tigase's)
//! is written in format 5 (clear) or 6 (sealed): `format | provider | flags | device[32] | owner[32] |
//! [secret_hash[32]] | len domain | len app | len token | [len call_token] | [len account]`, where `flags`
//! says which of the bracketed fields are present ([`HAS_SECRET`], [`HAS_CALL_TOKEN`], [`HAS_ACCOUNT`]).
//! In format 6 the token, the call token and the account are each sealed, bound to the node and to which
//! field they are. The usual registration stays in format 3 or 4, a byte shorter.
//!
//! Earlier formats, all from the days when every token was an APNs token: 1 and 2 are 3 and 4 without the
//! provider byte; records written as JSON by knock 0.1 betas start with `{` and hold the token in hex.

use std::borrow::Cow;

use serde::Deserialize;

use crate::push::{ProviderKind, Token};
use crate::store::seal::StoreKey;
use crate::store::{Digest, Registration, StoreError};

/// An APNs token in the clear, no provider byte.
const FORMAT_1: u8 = 1;
/// An APNs token sealed under the store key, no provider byte.
const FORMAT_2: u8 = 2;
/// The token in the clear.
const FORMAT_3: u8 = 3;
/// The token sealed under the store key.
const FORMAT_4: u8 = 4;
/// An extended registration in the clear.
const FORMAT_5: u8 = 5;
/// An extended registration, its token, call token and account sealed.
const FORMAT_6: u8 = 6;

/// Format 5/6 flag: the record holds a secret hash.
const HAS_SECRET: u8 = 1;
/// Format 5/6 flag: the record holds a call token.
const HAS_CALL_TOKEN: u8 = 2;
/// Format 5/6 flag: the record holds the account.
const HAS_ACCOUNT: u8 = 4;

/// Which sealed field a sealed value is: each is bound to its node and its field, so none can be moved.
#[derive(Clone, Copy)]
enum Sealed {
    Token,
    CallToken,
    Account,
}

/// The part of a record a publish needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishFields<'a> {
    /// The push service the token belongs to.
    pub provider: ProviderKind,
    /// SHA-256 of the publish secret, if publishes need one.
    pub secret_hash: Option<Digest>,
    /// The registering user's server.
    pub domain: &'a str,
    /// The app the token belongs to.
    pub app: &'a str,
    /// The device token's bytes (opened, when the record holds it sealed).
    pub token: Cow<'a, [u8]>,
    /// The call token's bytes, if any (opened).
    pub call_token: Option<Cow<'a, [u8]>>,
    /// The account, if kept (opened).
    pub account: Option<Cow<'a, str>>,
}

impl PublishFields<'_> {
    /// Whether the registration carries anything beyond the usual (see [`Registration::is_extended`]).
    pub fn is_extended(&self) -> bool {
        self.secret_hash.is_none() || self.call_token.is_some() || self.account.is_some()
    }
}

impl PublishFields<'_> {
    /// The fields of a registration in hand.
    pub fn of(registration: &Registration) -> PublishFields<'_> {
        PublishFields {
            provider: registration.provider,
            secret_hash: registration.secret_hash,
            domain: &registration.domain,
            app: &registration.app,
            token: Cow::Borrowed(registration.token.as_bytes()),
            call_token: registration
                .call_token
                .as_ref()
                .map(|t| Cow::Borrowed(t.as_bytes())),
            account: registration.account.as_deref().map(Cow::Borrowed),
        }
    }
}

/// A registration as knock 0.1 betas wrote it, as JSON: only APNs then, the token in hex.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    node: String,
    device: String,
    owner: String,
    domain: String,
    app: String,
    token: String,
    secret_hash: String,
}

impl JsonRecord {
    fn registration(self) -> Result<Registration, StoreError> {
        let digest = |what: &str, text: &str| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(text, &mut out)
                .map_err(|_| StoreError::Corrupt(format!("{what} is not 64 hex digits")))?;
            Ok::<_, StoreError>(out)
        };
        let token =
            hex::decode(&self.token).map_err(|_| StoreError::Corrupt("token is not hex".into()))?;
        Ok(Registration {
            device: digest("device", &self.device)?,
            owner: digest("owner", &self.owner)?,
            secret_hash: Some(digest("secret_hash", &self.secret_hash)?),
            call_token: None,
            account: None,
            node: self.node,
            domain: self.domain,
            app: self.app,
            provider: ProviderKind::Apns,
            token: Token::from_bytes(token),
        })
    }
}

/// A binary record, borrowed: the digests, then the publish fields with the token as stored.
struct Parsed<'a> {
    format: u8,
    device: Digest,
    owner: Digest,
    /// The account's bytes as stored (sealed in format 6); [`Codec::parse_open`] makes it `fields.account`.
    account: Option<&'a [u8]>,
    fields: PublishFields<'a>,
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(why.to_string());
    let short = || corrupt("short record");
    let (&format, rest) = bytes.split_first().ok_or_else(|| corrupt("empty record"))?;
    let mut r = Reader { rest };
    let provider = match format {
        FORMAT_1 | FORMAT_2 => ProviderKind::Apns,
        FORMAT_3..=FORMAT_6 => {
            let byte = r.take(1).ok_or_else(short)?[0];
            ProviderKind::from_byte(byte)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown push provider {byte}")))?
        }
        other => {
            return Err(StoreError::Corrupt(format!(
                "unknown record format {other}"
            )))
        }
    };
    let flags = match format {
        FORMAT_5 | FORMAT_6 => {
            let flags = r.take(1).ok_or_else(short)?[0];
            if flags & !(HAS_SECRET | HAS_CALL_TOKEN | HAS_ACCOUNT) != 0 {
                return Err(corrupt("unknown record flags"));
            }
            flags
        }
        _ => HAS_SECRET,
    };
    let device = r.digest().ok_or_else(short)?;
    let owner = r.digest().ok_or_else(short)?;
    let secret_hash = match flags & HAS_SECRET {
        0 => None,
        _ => Some(r.digest().ok_or_else(short)?),
    };
    let domain = r.text().ok_or_else(|| corrupt("bad domain"))?;
    let app = r.text().ok_or_else(|| corrupt("bad app"))?;
    let token = r.bytes().ok_or_else(|| corrupt("bad token"))?;
    let call_token = match flags & HAS_CALL_TOKEN {
        0 => None,
        _ => Some(r.bytes().ok_or_else(|| corrupt("bad call token"))?),
    };
    // Sealed, the account is bytes until opened; in the clear it must be text already.
    let account = match flags & HAS_ACCOUNT {
        0 => None,
        _ => Some(r.bytes().ok_or_else(|| corrupt("bad account"))?),
    };
    if !r.rest.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(Parsed {
        format,
        device,
        owner,
        account,
        fields: PublishFields {
            provider,
            secret_hash,
            domain,
            app,
            token: Cow::Borrowed(token),
            call_token: call_token.map(Cow::Borrowed),
            account: None,
        },
    })
}

/// Writes records, and reads every format: seals tokens when it has a store key.
#[derive(Clone, Debug, Default)]
pub struct Codec {
    key: Option<StoreKey>,
}

impl Codec {
    /// A codec that seals tokens under `key`, or keeps them in the clear without one.
    pub fn new(key: Option<StoreKey>) -> Codec {
        Codec { key }
    }

    /// The store key tokens are sealed under, if any.
    pub fn key(&self) -> Option<&StoreKey> {
        self.key.as_ref()
    }

    /// What a sealed value is bound to: its record's node, and which field it is. (The token's context is
    /// the one format 4 has always used.)
    fn context(field: Sealed, node: &[u8]) -> Vec<u8> {
        let label: &[u8] = match field {
            Sealed::Token => b"knock token v2\0",
            Sealed::CallToken => b"knock call token v1\0",
            Sealed::Account => b"knock account v1\0",
        };
        [label, node].concat()
    }

    /// Encode the registration stored under its node (the node is the key, not part of the record).
    ///
    /// Fails only for values no handler lets through: a field over 64 KiB.
    pub fn encode(&self, registration: &Registration) -> Result<Vec<u8>, StoreError> {
        let node = registration.node.as_bytes();
        let seal = |field: Sealed, bytes: &'_ [u8]| -> Vec<u8> {
            match &self.key {
                Some(key) => key.seal(&Self::context(field, node), bytes),
                None => bytes.to_vec(),
            }
        };
        let extended = registration.is_extended();
        let format = match (extended, self.key.is_some()) {
            (false, false) => FORMAT_3,
            (false, true) => FORMAT_4,
            (true, false) => FORMAT_5,
            (true, true) => FORMAT_6,
        };
        let token = seal(Sealed::Token, registration.token.as_bytes());
        let call_token = registration
            .call_token
            .as_ref()
            .map(|t| seal(Sealed::CallToken, t.as_bytes()));
        let account = registration
            .account
            .as_ref()
            .map(|a| seal(Sealed::Account, a.as_bytes()));
        let mut out = Vec::with_capacity(
            3 + 96 + 10 + registration.domain.len() + registration.app.len() + token.len(),
        );
        out.push(format);
        out.push(registration.provider.byte());
        if extended {
            let flag = |present: bool, flag: u8| if present { flag } else { 0 };
            out.push(
                flag(registration.secret_hash.is_some(), HAS_SECRET)
                    | flag(call_token.is_some(), HAS_CALL_TOKEN)
                    | flag(account.is_some(), HAS_ACCOUNT),
            );
        }
        out.extend_from_slice(&registration.device);
        out.extend_from_slice(&registration.owner);
        if let Some(hash) = &registration.secret_hash {
            out.extend_from_slice(hash);
        }
        let fields = [
            ("domain", Some(registration.domain.as_bytes())),
            ("app", Some(registration.app.as_bytes())),
            ("token", Some(&token[..])),
            ("call token", call_token.as_deref()),
            ("account", account.as_deref()),
        ];
        for (what, bytes) in fields {
            let Some(bytes) = bytes else { continue };
            let len = u16::try_from(bytes.len())
                .map_err(|_| StoreError::Invalid(format!("{what} is longer than 64 KiB")))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }

    /// Whether `bytes` is in the format this codec writes (an older one is rewritten by the index rebuild).
    pub fn is_current(&self, bytes: &[u8]) -> bool {
        let current: &[u8] = if self.key.is_some() {
            &[FORMAT_4, FORMAT_6]
        } else {
            &[FORMAT_3, FORMAT_5]
        };
        bytes.first().is_some_and(|format| current.contains(format))
    }

    /// A binary record's publish fields, its token opened; `None` for a JSON record (read it with
    /// [`Codec::decode`]).
    pub fn publish_fields<'a>(
        &self,
        node: &[u8],
        bytes: &'a [u8],
    ) -> Result<Option<PublishFields<'a>>, StoreError> {
        match bytes.first() {
            Some(b'{') => Ok(None),
            _ => self.parse_open(node, bytes).map(|p| Some(p.fields)),
        }
    }

    /// Parse a binary record and open what it holds sealed.
    fn parse_open<'a>(&self, node: &[u8], bytes: &'a [u8]) -> Result<Parsed<'a>, StoreError> {
        let mut parsed = parse(bytes)?;
        let sealed = match parsed.format {
            FORMAT_1 | FORMAT_3 | FORMAT_5 => false,
            FORMAT_2 | FORMAT_4 | FORMAT_6 => true,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unknown record format {other}"
                )))
            }
        };
        if sealed {
            let key = self.key.as_ref().ok_or_else(|| {
                StoreError::Corrupt("the token is sealed and no store key is configured".into())
            })?;
            let open = |field: Sealed, sealed: &[u8]| {
                key.open(&Self::context(field, node), sealed)
                    .ok_or_else(|| {
                        StoreError::Corrupt("a sealed field does not open with this key".into())
                    })
            };
            parsed.fields.token = Cow::Owned(open(Sealed::Token, &parsed.fields.token)?);
            if let Some(call_token) = &parsed.fields.call_token {
                parsed.fields.call_token = Some(Cow::Owned(open(Sealed::CallToken, call_token)?));
            }
            if let Some(account) = parsed.account {
                let text = String::from_utf8(open(Sealed::Account, account)?)
                    .map_err(|_| StoreError::Corrupt("bad account".into()))?;
                parsed.fields.account = Some(Cow::Owned(text));
            }
        } else if let Some(account) = parsed.account {
            let text = std::str::from_utf8(account)
                .map_err(|_| StoreError::Corrupt("bad account".into()))?;
            parsed.fields.account = Some(Cow::Borrowed(text));
        }
        Ok(parsed)
    }

    /// The owner of the record stored under `node`, read without opening anything sealed.
    pub fn owner(&self, node: &[u8], bytes: &[u8]) -> Result<Digest, StoreError> {
        match bytes.first() {
            Some(b'{') => Ok(self.decode(node, bytes)?.owner),
            _ => Ok(parse(bytes)?.owner),
        }
    }

    /// Decode the record stored under `node`.
    pub fn decode(&self, node: &[u8], bytes: &[u8]) -> Result<Registration, StoreError> {
        let corrupt = |why: &str| StoreError::Corrupt(why.to_string());
        let node_text = std::str::from_utf8(node).map_err(|_| corrupt("node is not UTF-8"))?;
        if bytes.first() == Some(&b'{') {
            let registration = serde_json::from_slice::<JsonRecord>(bytes)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?
                .registration()?;
            if registration.node != node_text {
                return Err(corrupt("record names another node"));
            }
            return Ok(registration);
        }
        let Parsed {
            device,
            owner,
            fields,
            ..
        } = self.parse_open(node, bytes)?;
        Ok(Registration {
            node: node_text.to_string(),
            device,
            owner,
            domain: fields.domain.to_string(),
            app: fields.app.to_string(),
            provider: fields.provider,
            token: Token::from_bytes(fields.token.into_owned()),
            secret_hash: fields.secret_hash,
            call_token: fields.call_token.map(|t| Token::from_bytes(t.into_owned())),
            account: fields.account.map(Cow::into_owned),
        })
    }
}

/// A cursor over a record's fields.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn digest(&mut self) -> Option<Digest> {
        self.take(32)?.try_into().ok()
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().ok()?);
        self.take(usize::from(len))
    }

    fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const TOKEN_HEX: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

    fn sample() -> Registration {
        Registration {
            node: "q9y2WRmdO2ggjbPoR91zYg".into(),
            device: [1; 32],
            owner: [2; 32],
            domain: "example.org".into(),
            app: "chat".into(),
            provider: ProviderKind::Apns,
            token: Token::from_bytes(hex::decode(TOKEN_HEX).expect("hex")),
            secret_hash: Some([3; 32]),
            call_token: None,
            account: None,
        }
    }

    /// A Tigase-dialect registration: no secret, a call token, the account.
    fn extended() -> Registration {
        Registration {
            secret_hash: None,
            call_token: Some(Token::from_bytes(vec![0xc4; 32])),
            account: Some("alice@example.org".into()),
            ..sample()
        }
    }

    #[test]
    fn extended_registrations_round_trip_sealed_and_hide_every_sealed_field() {
        let r = extended();
        for codec in [plain(), sealing()] {
            let bytes = codec.encode(&r).expect("encodes");
            assert_eq!(codec.decode(node(), &bytes).expect("decodes"), r);
            assert!(codec.is_current(&bytes));
            let fields = codec
                .publish_fields(node(), &bytes)
                .expect("reads")
                .expect("binary");
            assert_eq!(fields, PublishFields::of(&r));
        }
        let sealed = sealing().encode(&r).expect("encodes");
        assert_eq!(sealed[0], FORMAT_6);
        for secret in [&[0xc4; 8][..], b"alice@ex", &r.token.as_bytes()[..8]] {
            assert!(!sealed.windows(secret.len()).any(|w| w == secret));
        }
        // Only what is present is written: a secret but an account, say.
        let partial = Registration {
            secret_hash: Some([3; 32]),
            call_token: None,
            ..extended()
        };
        let bytes = plain().encode(&partial).expect("encodes");
        assert_eq!(bytes[0], FORMAT_5);
        assert_eq!(plain().decode(node(), &bytes).expect("decodes"), partial);
        // A sealed account moved to another node does not open.
        assert!(sealing().decode(b"another-node", &sealed).is_err());
        // Unknown flags are corruption, not guesses.
        let mut odd = plain().encode(&r).expect("encodes");
        odd[2] |= 0x80;
        assert!(matches!(
            plain().decode(node(), &odd),
            Err(StoreError::Corrupt(_))
        ));
    }

    fn plain() -> Codec {
        Codec::default()
    }

    fn sealing() -> Codec {
        Codec::new(Some(StoreKey::from_bytes([9; 32])))
    }

    fn node() -> &'static [u8] {
        b"q9y2WRmdO2ggjbPoR91zYg"
    }

    /// A record as knock wrote it before records named their provider (formats 1 and 2): the current
    /// encoding without the provider byte. Only APNs registrations existed then.
    pub(crate) fn legacy(codec: &Codec, registration: &Registration) -> Vec<u8> {
        assert_eq!(registration.provider, ProviderKind::Apns);
        let current = codec.encode(registration).expect("encodes");
        let format = match current[0] {
            FORMAT_3 => FORMAT_1,
            FORMAT_4 => FORMAT_2,
            other => panic!("format {other} is not current"),
        };
        [&[format][..], &current[2..]].concat()
    }

    #[test]
    fn round_trips_and_is_compact() {
        let r = sample();
        let bytes = plain().encode(&r).expect("encodes");
        assert_eq!(bytes.len(), 2 + 96 + 6 + 11 + 4 + 32);
        assert_eq!(bytes[1], ProviderKind::Apns.byte());
        assert_eq!(plain().decode(node(), &bytes).expect("decodes"), r);
        let sealed = sealing().encode(&r).expect("encodes");
        assert_eq!(
            sealed.len(),
            bytes.len() + crate::store::seal::SEAL_OVERHEAD
        );
        assert_eq!(sealing().decode(node(), &sealed).expect("decodes"), r);
        let fields = sealing()
            .publish_fields(node(), &sealed)
            .expect("reads")
            .expect("binary");
        assert_eq!(fields, PublishFields::of(&r));
    }

    #[test]
    fn a_sealed_record_hides_its_token_and_belongs_to_its_node() {
        let r = sample();
        let sealed = sealing().encode(&r).expect("encodes");
        let token = r.token.as_bytes();
        assert!(!sealed.windows(8).any(|w| token.windows(8).any(|t| t == w)));
        assert!(!sealed
            .windows(8)
            .any(|w| TOKEN_HEX.as_bytes().windows(8).any(|t| t == w)));
        // Moved under another node, or read with another key or none, it does not open.
        assert!(matches!(
            sealing().decode(b"another-node", &sealed),
            Err(StoreError::Corrupt(_))
        ));
        let other = Codec::new(Some(StoreKey::from_bytes([8; 32])));
        assert!(matches!(
            other.decode(node(), &sealed),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            plain().decode(node(), &sealed),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn every_codec_reads_clear_records_and_knows_which_to_rewrite() {
        let r = sample();
        let clear = plain().encode(&r).expect("encodes");
        let sealed = sealing().encode(&r).expect("encodes");
        assert_eq!(sealing().decode(node(), &clear).expect("decodes"), r);
        assert!(plain().is_current(&clear) && !plain().is_current(&sealed));
        assert!(sealing().is_current(&sealed) && !sealing().is_current(&clear));
    }

    #[test]
    fn reads_the_records_written_before_providers_as_apns_and_rewrites_them() {
        let r = sample();
        for codec in [plain(), sealing()] {
            let old = legacy(&codec, &r);
            assert_eq!(codec.decode(node(), &old).expect("decodes"), r);
            let fields = codec
                .publish_fields(node(), &old)
                .expect("reads")
                .expect("binary");
            assert_eq!(fields, PublishFields::of(&r));
            assert!(!codec.is_current(&old), "the rebuild rewrites it");
        }
        // A clear old record reads under a sealing codec too (sealed on rewrite).
        assert_eq!(
            sealing()
                .decode(node(), &legacy(&plain(), &r))
                .expect("decodes"),
            r
        );
    }

    #[test]
    fn reads_the_json_records_of_earlier_versions() {
        let r = sample();
        let json = serde_json::json!({
            "node": "q9y2WRmdO2ggjbPoR91zYg",
            "device": hex::encode([1u8; 32]),
            "owner": hex::encode([2u8; 32]),
            "domain": "example.org",
            "app": "chat",
            "token": TOKEN_HEX,
            "secret_hash": hex::encode([3u8; 32]),
        })
        .to_string()
        .into_bytes();
        for codec in [plain(), sealing()] {
            assert_eq!(codec.decode(node(), &json).expect("decodes"), r);
            assert!(codec.decode(b"another", &json).is_err());
            assert_eq!(codec.publish_fields(node(), &json).expect("ok"), None);
            assert!(!codec.is_current(&json));
        }
    }

    #[test]
    fn damaged_records_are_corrupt_not_panics() {
        for codec in [plain(), sealing()] {
            let bytes = codec.encode(&sample()).expect("encodes");
            for cut in 0..bytes.len() {
                assert!(codec.decode(node(), &bytes[..cut]).is_err(), "cut at {cut}");
                assert!(
                    codec.publish_fields(node(), &bytes[..cut]).is_err(),
                    "cut at {cut}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(codec.decode(node(), &longer).is_err());
            let mut provider = bytes.clone();
            provider[1] = 0;
            assert!(matches!(
                codec.decode(node(), &provider),
                Err(StoreError::Corrupt(_))
            ));
            let mut unknown = bytes;
            unknown[0] = 9;
            assert!(matches!(
                codec.decode(node(), &unknown),
                Err(StoreError::Corrupt(_))
            ));
        }
    }

    #[test]
    fn refuses_what_it_cannot_hold() {
        let mut r = sample();
        r.domain = "a".repeat(65536);
        assert!(plain().encode(&r).is_err());
        assert!(sealing().encode(&r).is_err());
    }
}
