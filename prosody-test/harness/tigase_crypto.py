"""Reading what mod_cloud_notify_encrypted encrypts: the Tigase push encryption (`tigase:push:encrypt:0`,
algorithm `aes-128-gcm`), as Siskin's notification extension would decrypt it.

The client gives its server a 16-byte key in `<encrypt xmlns='tigase:push:encrypt:0' alg='aes-128-gcm'>`;
the server puts `<encrypted iv='BASE64(12 bytes)'>BASE64(ciphertext || 16-byte tag)</encrypted>` in the
publish, and knock copies `iv` and `encrypted` into the APNs payload untouched.

The tag is NOT verified, on purpose: on Prosody 0.12 (no util.crypto) the module encrypts with luaossl, which
does not expose the GCM tag, so it appends 16 zero bytes instead of the real tag (its own FIXME: "Siskin does
not validate the tag anyway"). A GCM decryptor that checks the tag would refuse every such payload. So this
decrypts the way GCM itself does for a 96-bit IV, without the authentication step: AES-CTR over the
ciphertext, starting from the counter block iv || 00000002 (block 1, iv || 00000001, is reserved for the tag).
What it proves is that the bytes are the JSON the server encrypted with the client's key; `tag_is_zero` says
whether the tag was the placeholder (Prosody 0.12) or a real one (Prosody 13), which tests can report.

`python3 tigase_crypto.py` runs the self-check against two captured publishes (see SELF_CHECK).
"""

import base64
import json

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TAG_LEN = 16


def decrypt(key: bytes, iv_b64: str, data_b64: str) -> tuple[bytes, bool]:
    """(plaintext, tag_is_zero) of an `<encrypted>` payload; the tag is not checked (see the module doc)."""
    if len(key) != 16:
        raise ValueError(f"aes-128-gcm needs a 16-byte key, got {len(key)}")
    iv = base64.b64decode(iv_b64, validate=True)
    data = base64.b64decode(data_b64, validate=True)
    if len(iv) != 12:
        raise ValueError(f"expected a 12-byte IV, got {len(iv)}")
    if len(data) < TAG_LEN:
        raise ValueError(f"payload of {len(data)} bytes is shorter than a GCM tag")
    ciphertext, tag = data[:-TAG_LEN], data[-TAG_LEN:]
    ctr = Cipher(algorithms.AES(key), modes.CTR(iv + (2).to_bytes(4, "big"))).decryptor()
    return ctr.update(ciphertext) + ctr.finalize(), tag == bytes(TAG_LEN)


def decrypt_json(key: bytes, iv_b64: str, data_b64: str) -> dict:
    plain, _ = decrypt(key, iv_b64, data_b64)
    return json.loads(plain)


# Two publishes captured from Prosody 0.12.3 + mod_cloud_notify + trixie's mod_cloud_notify_encrypted (with the
# one-name luaossl fix) and _priority_tag, after an <enable/> whose <encrypt> key was the bytes 0..15
# (/work/shared/reference/publish-prosody-encrypted*.xml on the machine that made them): (iv, encrypted,
# expected plaintext).
SELF_CHECK_KEY = bytes(range(16))
SELF_CHECK = [
    ("tyNBXvy5//xf9ckN",
     "aqJJaTjr4P7IpKEiZWi0lE5G5Fqg7uX9SInPaBNu+IOdwH5q8a5UujHuoWwNoy3h58AoU+3hLfMx4k0sDr653ap0nx/aNSF6fx67eNLYVDETAAAAAAAAAAAAAAAAAAAAAA==",
     b'{"unread":1,"message":"hello secret body","type":"chat","sender":"bob@localhost"}'),
    ("Ug8KJMBE/qdUdshT",
     "tOJiO8lWg110v4H/hjjC6mgc5jZtD8NzseLkCl1Z5uT0+HPx0sJ9FO/f22w4UB9sjemvrZkJdK1tuoiq7Mc3WMEjQqCARogS2wPe/37dPJFk5cuRrJnKsKOwfX6FKpa4AAAAAAAAAAAAAAAAAAAAAA==",
     None),  # a call: {"sid":"call1","type":"call","media":["audio"],"unread":1,"sender":"bob@localhost/<resource>"}
]


def self_check():
    """Decrypts the captures; raises AssertionError if this module does not read them as the server wrote them."""
    chat_iv, chat_data, chat_plain = SELF_CHECK[0]
    plain, zero_tag = decrypt(SELF_CHECK_KEY, chat_iv, chat_data)
    assert plain == chat_plain, plain
    assert zero_tag, "the captured tag is the 16 zero bytes of the luaossl fallback"
    call_iv, call_data, _ = SELF_CHECK[1]
    call = decrypt_json(SELF_CHECK_KEY, call_iv, call_data)
    assert {k: call[k] for k in ("sid", "type", "media", "unread")} == \
        {"sid": "call1", "type": "call", "media": ["audio"], "unread": 1}, call
    assert call["sender"].startswith("bob@localhost/"), call
    # a real GCM encryption (Prosody 13's util.crypto) reads the same, with a real tag
    iv = bytes(range(100, 112))
    sealed = AESGCM(SELF_CHECK_KEY).encrypt(iv, chat_plain, None)
    plain, zero_tag = decrypt(SELF_CHECK_KEY, base64.b64encode(iv).decode(), base64.b64encode(sealed).decode())
    assert plain == chat_plain and not zero_tag, (plain, zero_tag)
    # a wrong key gives bytes, not the JSON: the check above means something
    try:
        wrong = decrypt_json(bytes(16), chat_iv, chat_data)
    except ValueError:
        wrong = None
    assert wrong is None or wrong.get("message") != "hello secret body"


if __name__ == "__main__":
    self_check()
    print("tigase_crypto: both captured payloads decrypt as expected")
