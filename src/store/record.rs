//! How a [`Registration`] is laid out on disk: a small versioned binary record.
//!
//! A million registrations should fit a small VM's disk and page cache, so the record carries raw bytes, not
//! text: the three digests as 32 bytes each, the token as the bytes its hex spells, and the node not at all
//! (it is the key). The first byte names the format, so a later format (tokens encrypted at rest, say) can
//! be read beside this one. Records written as JSON by knock 0.1 betas start with `{` and are still read.
//!
//! Layout of format 1: `01 | device[32] | owner[32] | secret_hash[32] | len domain | len app | len token`,
//! where each `len x` is a two-byte big-endian length followed by that many bytes.

use super::{Digest, Registration, StoreError};

/// The format byte of the current layout.
const FORMAT_1: u8 = 1;

/// Encode a registration (its node is the key, not part of the record).
///
/// Fails only for values no handler lets through: a field over 64 KiB, or a token that is not hex.
pub fn encode(registration: &Registration) -> Result<Vec<u8>, StoreError> {
    let token = hex::decode(&registration.token)
        .map_err(|_| StoreError::Invalid("token is not hex".into()))?;
    let mut out = Vec::with_capacity(
        1 + 96 + 6 + registration.domain.len() + registration.app.len() + token.len(),
    );
    out.push(FORMAT_1);
    out.extend_from_slice(&registration.device);
    out.extend_from_slice(&registration.owner);
    out.extend_from_slice(&registration.secret_hash);
    for (what, bytes) in [
        ("domain", registration.domain.as_bytes()),
        ("app", registration.app.as_bytes()),
        ("token", token.as_slice()),
    ] {
        let len = u16::try_from(bytes.len())
            .map_err(|_| StoreError::Invalid(format!("{what} is longer than 64 KiB")))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(bytes);
    }
    Ok(out)
}

/// The part of a record a publish needs, borrowed from the record's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishFields<'a> {
    /// SHA-256 of the publish secret.
    pub secret_hash: Digest,
    /// The registering user's server.
    pub domain: &'a str,
    /// The app the token belongs to.
    pub app: &'a str,
    /// The device token's bytes.
    pub token: &'a [u8],
}

/// A format-1 record, borrowed: the digests, then the publish fields.
struct Parsed<'a> {
    device: Digest,
    owner: Digest,
    fields: PublishFields<'a>,
}

fn parse_v1(bytes: &[u8]) -> Result<Parsed<'_>, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(why.to_string());
    let mut r = Reader {
        rest: bytes.get(1..).unwrap_or_default(),
    };
    let device = r.digest().ok_or_else(|| corrupt("short record"))?;
    let owner = r.digest().ok_or_else(|| corrupt("short record"))?;
    let secret_hash = r.digest().ok_or_else(|| corrupt("short record"))?;
    let domain = r.text().ok_or_else(|| corrupt("bad domain"))?;
    let app = r.text().ok_or_else(|| corrupt("bad app"))?;
    let token = r.bytes().ok_or_else(|| corrupt("bad token"))?;
    if !r.rest.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(Parsed {
        device,
        owner,
        fields: PublishFields {
            secret_hash,
            domain,
            app,
            token,
        },
    })
}

/// The publish fields of a current-format record, without copying; `None` for a record of an earlier format
/// (read it with [`decode`]).
pub fn publish_fields(bytes: &[u8]) -> Result<Option<PublishFields<'_>>, StoreError> {
    match bytes.first() {
        Some(&FORMAT_1) => parse_v1(bytes).map(|p| Some(p.fields)),
        _ => Ok(None),
    }
}

/// Decode the record stored under `node`.
pub fn decode(node: &[u8], bytes: &[u8]) -> Result<Registration, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(why.to_string());
    let node = std::str::from_utf8(node).map_err(|_| corrupt("node is not UTF-8"))?;
    match bytes.first() {
        Some(&FORMAT_1) => {
            let Parsed {
                device,
                owner,
                fields,
            } = parse_v1(bytes)?;
            Ok(Registration {
                node: node.to_string(),
                device,
                owner,
                domain: fields.domain.to_string(),
                app: fields.app.to_string(),
                token: lower_hex(fields.token),
                secret_hash: fields.secret_hash,
            })
        }
        Some(b'{') => {
            let registration: Registration =
                serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if registration.node != node {
                return Err(corrupt("record names another node"));
            }
            Ok(registration)
        }
        Some(other) => Err(StoreError::Corrupt(format!(
            "unknown record format {other}"
        ))),
        None => Err(corrupt("empty record")),
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

/// Lowercase hex of `bytes`, by table: this runs on every publish (`hex::encode` goes char by char).
pub fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 15)]);
    }
    // Only ASCII digits were pushed.
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_and_whole() {
        assert_eq!(lower_hex(&[0x00, 0x9f, 0xa0, 0xff]), "009fa0ff");
        assert_eq!(lower_hex(&[]), "");
    }

    fn sample() -> Registration {
        Registration {
            node: "q9y2WRmdO2ggjbPoR91zYg".into(),
            device: [1; 32],
            owner: [2; 32],
            domain: "example.org".into(),
            app: "chat".into(),
            token: "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90".into(),
            secret_hash: [3; 32],
        }
    }

    #[test]
    fn round_trips_and_is_compact() {
        let r = sample();
        let bytes = encode(&r).expect("encodes");
        assert_eq!(bytes.len(), 1 + 96 + 6 + 11 + 4 + 32);
        assert_eq!(decode(r.node.as_bytes(), &bytes).expect("decodes"), r);
    }

    #[test]
    fn reads_the_json_records_of_earlier_versions() {
        let r = sample();
        let json = serde_json::to_vec(&r).expect("json");
        assert_eq!(decode(r.node.as_bytes(), &json).expect("decodes"), r);
        assert!(decode(b"another", &json).is_err());
    }

    #[test]
    fn damaged_records_are_corrupt_not_panics() {
        let bytes = encode(&sample()).expect("encodes");
        for cut in 0..bytes.len() {
            assert!(decode(b"n", &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(b"n", &longer).is_err());
        let mut unknown = bytes;
        unknown[0] = 9;
        assert!(matches!(
            decode(b"n", &unknown),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn refuses_what_it_cannot_hold() {
        let mut r = sample();
        r.token = "xyz".into();
        assert!(encode(&r).is_err());
        let mut r = sample();
        r.domain = "a".repeat(65536);
        assert!(encode(&r).is_err());
    }
}
