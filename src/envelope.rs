//! The signed device envelope of `docs/envelope.md`: parsing, canonical form, HMAC.
//!
//! Used by every signer and verifier in the project (plugin, CLI `sign`/`verify`, simulator,
//! downlink responses), so they cannot drift apart.

use crate::json::{self, Json, JsonError};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::ops::Range;

type HmacSha256 = Hmac<Sha256>;

/// Why a message was rejected, in the order the gateway checks. `as_str` is the name used in
/// logs and counters. The spec's seven checks, plus `rate_limited` (the device's token bucket
/// is empty: `plugin_opt_rate_limit`), checked before the timestamp so a flood costs no HMAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Malformed,
    RequiredFields,
    Identity,
    UnknownDevice,
    RateLimited,
    Timestamp,
    Replay,
    Signature,
}

impl Reason {
    /// Every reason, in check order.
    pub const ALL: [Reason; 8] = [
        Reason::Malformed,
        Reason::RequiredFields,
        Reason::Identity,
        Reason::UnknownDevice,
        Reason::RateLimited,
        Reason::Timestamp,
        Reason::Replay,
        Reason::Signature,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::RequiredFields => "required_fields",
            Reason::Identity => "identity",
            Reason::UnknownDevice => "unknown_device",
            Reason::RateLimited => "rate_limited",
            Reason::Timestamp => "timestamp",
            Reason::Replay => "replay",
            Reason::Signature => "signature",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejection: the reason plus a short human detail (never a secret or a whole payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection { reason, detail: detail.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.detail)
    }
}

/// The members every envelope must carry.
pub const REQUIRED: [&str; 5] = ["device_id", "timestamp", "message_id", "payload", "signature"];

/// Longest message_id, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// Longest device_id: the device id is the certificate's CN, which X.509 limits to 64.
pub const MAX_DEVICE_ID_CHARS: usize = 64;

/// `device_id` syntax: 1–64 of `A-Z a-z 0-9 _ . -`, not `.` or `..`.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_CHARS
        && id != "."
        && id != ".."
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `message_id` length: 1–[`MAX_ID_CHARS`] characters. Counting characters only when the
/// byte length could exceed the limit: ids are nearly always short ASCII.
pub fn valid_message_id(id: &str) -> bool {
    !id.is_empty() && (id.len() <= MAX_ID_CHARS || id.chars().count() <= MAX_ID_CHARS)
}

mod scan;
pub use scan::Scratch;

/// A parsed envelope whose members have the right types. Not yet authenticated.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The signed bytes (all members but `signature`, RFC 8785 canonical), then the decoded
    /// message id when its canonical text differs (it has escapes). A `String`: checked as
    /// UTF-8 once here, so the ids are slices, not re-checked at every use.
    buf: String,
    canon_len: usize,
    device: Range<usize>,
    message_id: Range<usize>,
    /// The payload's canonical text, inside the signed bytes.
    payload: Range<usize>,
    pub signature: [u8; 32],
    pub timestamp: i64,
}

impl Envelope {
    /// Hands this envelope's memory to `scratch` for the next [`Envelope::parse_with`].
    pub fn recycle(self, scratch: &mut Scratch) {
        scratch.recycle(self.buf.into_bytes());
    }

    /// Parses and type-checks an uplink envelope (checks 1 and 2 of the spec).
    pub fn parse(bytes: &[u8], max_bytes: usize) -> Result<Envelope, Rejection> {
        Envelope::parse_with(bytes, max_bytes, &mut Scratch::default())
    }

    /// [`Envelope::parse`] with reused working memory (the broker thread's path). A
    /// well-formed envelope (or one only missing a member) takes the single-pass reader;
    /// anything else, and every other rejection, the reference parser, so both say exactly the
    /// same (see `scan`).
    pub fn parse_with(
        bytes: &[u8],
        max_bytes: usize,
        scratch: &mut Scratch,
    ) -> Result<Envelope, Rejection> {
        if bytes.is_empty() {
            return Err(Rejection::new(Reason::Malformed, "empty payload"));
        }
        if bytes.len() > max_bytes {
            return Err(Rejection::new(
                Reason::Malformed,
                format!("{} bytes exceeds the {max_bytes}-byte limit", bytes.len()),
            ));
        }
        match scan::scan(bytes, scratch) {
            Some(Ok(s)) => match String::from_utf8(s.buf) {
                Ok(buf) => Ok(Envelope {
                    canon_len: buf.len(),
                    buf,
                    device: s.device,
                    message_id: s.message_id,
                    payload: s.payload,
                    signature: s.signature,
                    timestamp: s.timestamp,
                }),
                // Cannot happen (UTF-8 in, UTF-8 pieces out); the reference decides if it does.
                Err(_) => Ok(Envelope::from_reference(Reference::parse(bytes)?)),
            },
            Some(Err(missing)) => {
                Err(Rejection::new(Reason::RequiredFields, format!("missing {missing}")))
            }
            None => Ok(Envelope::from_reference(Reference::parse(bytes)?)),
        }
    }

    /// What the reference parser alone reads from `bytes` (never the single-pass reader), laid
    /// out as [`Envelope::parse`] lays it out: the fuzz target compares the two on every input.
    #[doc(hidden)]
    pub fn parse_reference(bytes: &[u8], max_bytes: usize) -> Result<Envelope, Rejection> {
        if bytes.is_empty() || bytes.len() > max_bytes {
            // The same size checks, and so the same rejections, as `parse_with`.
            return Envelope::parse_with(bytes, max_bytes, &mut Scratch::default());
        }
        Ok(Envelope::from_reference(Reference::parse(bytes)?))
    }

    /// The reference's members laid out as the single-pass reader lays them out.
    fn from_reference(r: Reference) -> Envelope {
        let mut sorted: Vec<&(String, Json)> = r.members.iter().collect();
        sorted.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
        let mut buf = Vec::with_capacity(256);
        let (mut device, mut message_id, mut payload) = (0..0, 0..0, 0..0);
        buf.push(b'{');
        for (i, (k, v)) in sorted.into_iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            json::write_string(k, &mut buf);
            buf.push(b':');
            let at = buf.len();
            json::write_canonical(v, &mut buf);
            match k.as_str() {
                "device_id" => device = at + 1..buf.len() - 1,
                "message_id" => message_id = at + 1..buf.len() - 1,
                "payload" => payload = at..buf.len(),
                _ => {}
            }
        }
        buf.push(b'}');
        let canon_len = buf.len();
        let mid = r.str_member("message_id");
        if buf[message_id.clone()] != *mid.as_bytes() {
            message_id = buf.len()..buf.len() + mid.len();
            buf.extend_from_slice(mid.as_bytes());
        }
        // json's writers emit UTF-8 only; were that ever broken, the envelope is empty (its
        // identity then fails) rather than a panic.
        let Ok(buf) = String::from_utf8(buf) else {
            let none = 0..0;
            return Envelope {
                buf: String::new(),
                canon_len: 0,
                device: none.clone(),
                message_id: none.clone(),
                payload: none,
                signature: r.signature,
                timestamp: r.timestamp,
            };
        };
        Envelope {
            buf,
            canon_len,
            device,
            message_id,
            payload,
            signature: r.signature,
            timestamp: r.timestamp,
        }
    }

    fn text(&self, r: &Range<usize>) -> &str {
        // Ranges are at string boundaries; `get` keeps a wrong one from panicking.
        self.buf.get(r.clone()).unwrap_or_default()
    }

    pub fn device_id(&self) -> &str {
        self.text(&self.device)
    }

    pub fn message_id(&self) -> &str {
        self.text(&self.message_id)
    }

    /// The signed bytes: the envelope without `signature`, RFC 8785 canonical.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.buf.as_bytes()[..self.canon_len]
    }

    /// The payload's canonical text: what the backend receives.
    pub fn payload_bytes(&self) -> &[u8] {
        &self.buf.as_bytes()[self.payload.clone()]
    }

    /// Appends the signed bytes.
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.signed_bytes());
    }

    /// The canonical bytes as a fresh vector.
    pub fn canonical(&self) -> Vec<u8> {
        self.signed_bytes().to_vec()
    }

    /// The payload re-serialized canonically: what the backend receives.
    pub fn canonical_payload(&self) -> Vec<u8> {
        self.payload_bytes().to_vec()
    }
}

/// The reference parser: a strict JSON tree (`json::parse_strict`), then the type and presence
/// checks on its members. It decides every rejection and the shapes the single-pass reader
/// leaves alone; the differential test holds the two to the same answers.
#[derive(Debug, Clone)]
pub(crate) struct Reference {
    /// All members except `signature`, in wire order.
    pub(crate) members: Vec<(String, Json)>,
    pub(crate) signature: [u8; 32],
    pub(crate) timestamp: i64,
}

impl Reference {
    pub(crate) fn parse(bytes: &[u8]) -> Result<Reference, Rejection> {
        let root = json::parse_strict(bytes).map_err(|e| {
            let detail = match e {
                JsonError::Syntax(_) => "not valid UTF-8 JSON".to_string(),
                other => other.to_string(),
            };
            Rejection::new(Reason::Malformed, detail)
        })?;
        let Json::Object(mut members) = root else {
            return Err(Rejection::new(Reason::Malformed, "not a JSON object"));
        };

        // Types first (a wrong type is malformed), then presence (required_fields).
        let mut timestamp = None;
        for (name, value) in &members {
            match (name.as_str(), value) {
                ("device_id", Json::String(s)) if valid_device_id(s) => {}
                ("device_id", _) => {
                    return Err(Rejection::new(
                        Reason::Malformed,
                        "device_id must be 1-64 of A-Z a-z 0-9 _ . -",
                    ))
                }
                ("timestamp", Json::Number(n)) if n.as_i64().is_some() => timestamp = n.as_i64(),
                ("timestamp", _) => {
                    return Err(Rejection::new(Reason::Malformed, "timestamp must be an integer"))
                }
                ("message_id", Json::String(s)) if valid_message_id(s) => {}
                ("message_id", _) => {
                    return Err(Rejection::new(
                        Reason::Malformed,
                        "message_id must be a string of 1-128 characters",
                    ))
                }
                ("signature", Json::String(s))
                    if s.len() == 64 && decode_hex::<32>(s.as_bytes()).is_some() => {}
                ("signature", _) => {
                    return Err(Rejection::new(
                        Reason::Malformed,
                        "signature must be 64 hex digits",
                    ))
                }
                _ => {}
            }
        }
        if let Some(missing) = REQUIRED.iter().find(|r| !members.iter().any(|(k, _)| k == *r)) {
            return Err(Rejection::new(Reason::RequiredFields, format!("missing {missing}")));
        }
        let sig_pos = members.iter().position(|(k, _)| k == "signature").unwrap_or_default();
        let (_, sig) = members.remove(sig_pos);
        let signature = match sig {
            Json::String(s) => decode_hex::<32>(s.as_bytes()).unwrap_or_default(),
            _ => [0; 32],
        };
        Ok(Reference { members, signature, timestamp: timestamp.unwrap_or_default() })
    }

    pub(crate) fn str_member(&self, name: &str) -> &str {
        match self.members.iter().find(|(k, _)| k == name) {
            Some((_, Json::String(s))) => s,
            _ => "",
        }
    }

    /// The signed bytes, written from the tree.
    #[cfg(test)]
    pub(crate) fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        json::write_object(self.members.iter().map(|(k, v)| (k.as_str(), v)), &mut out);
        out
    }

    #[cfg(test)]
    pub(crate) fn canonical_payload(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let p = self.members.iter().find(|(k, _)| k == "payload").map_or(&Json::Null, |(_, v)| v);
        json::write_canonical(p, &mut out);
        out
    }
}

/// HMAC-SHA256 of `data` keyed by `secret`.
pub fn hmac(secret: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// A secret with HMAC's key schedule done once: the padded key's two blocks are hashed when the
/// registry is read, not for every message (two of the seven SHA-256 blocks of a ~240-byte
/// envelope). Compares by the secret; never printed.
#[derive(Clone)]
pub struct Key {
    secret: Box<[u8]>,
    /// Boxed: ~200 bytes of hash state, kept out of the registry's table.
    mac: Box<HmacSha256>,
}

impl Key {
    pub fn new(secret: Box<[u8]>) -> Key {
        let mac = HmacSha256::new_from_slice(&secret).expect("HMAC takes keys of any length");
        Key { secret, mac: Box::new(mac) }
    }

    /// As [`hmac`] with this key.
    pub fn sign(&self, data: &[u8]) -> [u8; 32] {
        self.sign_parts(&[data])
    }

    /// [`Key::sign`] of the concatenation of `parts`, without concatenating them.
    pub fn sign_parts(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = (*self.mac).clone();
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// As [`verify`] with this key.
    pub fn verify(&self, data: &[u8], signature: &[u8; 32]) -> bool {
        openssl::memcmp::eq(&self.sign(data), signature)
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.secret
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.secret == other.secret
    }
}

impl Eq for Key {}

/// Constant-time check of `signature` over `data`. OpenSSL's `CRYPTO_memcmp` is as constant-time
/// as `verify_slice` (subtle) and about ten times cheaper: subtle puts an optimisation barrier
/// around every byte (0.6 % of the broker thread in a `perf` profile of `make bench`).
pub fn verify(secret: &[u8], data: &[u8], signature: &[u8; 32]) -> bool {
    openssl::memcmp::eq(&hmac(secret, data), signature)
}

/// Signs `members` (without a signature) and returns the envelope text with `signature` added,
/// members in canonical order. Used by the CLI, the simulator and downlink responses.
pub fn sign_members(secret: &[u8], members: &[(String, Json)]) -> String {
    let mut canonical = Vec::with_capacity(256);
    json::write_object(members.iter().map(|(k, v)| (k.as_str(), v)), &mut canonical);
    let sig = Json::String(hex(&hmac(secret, &canonical)));
    let mut out = Vec::with_capacity(canonical.len() + 90);
    json::write_object(
        members.iter().map(|(k, v)| (k.as_str(), v)).chain(std::iter::once(("signature", &sig))),
        &mut out,
    );
    String::from_utf8(out).expect("canonical JSON is UTF-8")
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    write_hex(bytes, &mut out);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Lower-case hex of `bytes`, appended to `out`.
pub fn write_hex(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[(b >> 4) as usize]);
        out.push(HEX[(b & 0xf) as usize]);
    }
}

/// Hex (either case) of exactly `N` bytes; None for any other length or any other byte.
pub fn decode_hex<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    // Branch-free per digit; one check for the whole string at the end.
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let (hi, lo) = (HEX_DIGIT[pair[0] as usize], HEX_DIGIT[pair[1] as usize]);
        bad |= hi | lo;
        *o = hi << 4 | lo;
    }
    (bad & 0xf0 == 0).then_some(out)
}

/// The value of each hex digit (either case); 0xff for every other byte.
const HEX_DIGIT: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Fresh random UUID v4 strings (downlink message ids), from random bytes drawn 64 ids at a
/// time: a call into OpenSSL's generator costs ~1.6 µs whatever its size (locks, a fork check),
/// which was most of a response's cost on the broker thread; 1 KiB costs the same as 16 bytes.
/// It starts empty, so bytes are drawn at the first response, inside the broker's loop: after any
/// fork of Mosquitto's (it forks only to daemonise, before loading plugins), never before it.
pub struct Uuids {
    buf: [u8; 16 * 64],
    next: usize,
}

impl Default for Uuids {
    fn default() -> Self {
        Uuids { buf: [0; 16 * 64], next: 16 * 64 }
    }
}

impl Uuids {
    pub fn next_id(&mut self) -> String {
        if self.next == self.buf.len() {
            openssl::rand::rand_bytes(&mut self.buf).expect("the OS random source is available");
            self.next = 0;
        }
        let mut b = [0u8; 16];
        b.copy_from_slice(&self.buf[self.next..self.next + 16]);
        // Used once: the bytes are not left behind to be read again.
        self.buf[self.next..self.next + 16].fill(0);
        self.next += 16;
        uuid_v4_from(b)
    }
}

/// A random UUID v4 string (one-off ids, e.g. the CLI's; the broker thread uses [`Uuids`]).
pub fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    openssl::rand::rand_bytes(&mut b).expect("the OS random source is available");
    uuid_v4_from(b)
}

/// The UUID v4 text of 16 random bytes (version and variant bits set).
fn uuid_v4_from(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = Vec::with_capacity(36);
    for (i, group) in [&b[0..4], &b[4..6], &b[6..8], &b[8..10], &b[10..16]].into_iter().enumerate()
    {
        if i > 0 {
            out.push(b'-');
        }
        write_hex(group, &mut out);
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_syntax_edges() {
        assert!(valid_device_id("sensor_001"));
        assert!(valid_device_id("a.b-C_9"));
        assert!(valid_device_id(&"x".repeat(64)));
        assert!(!valid_device_id(&"x".repeat(65)));
        assert!(!valid_device_id(&"x".repeat(128)));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id("."));
        assert!(!valid_device_id(".."));
        assert!(!valid_device_id("a/b"));
        assert!(!valid_device_id("a+b"));
        assert!(!valid_device_id("dé"));
    }

    #[test]
    fn message_id_length_edges_count_characters_not_bytes() {
        assert!(valid_message_id("m"));
        assert!(valid_message_id(&"x".repeat(128)));
        assert!(valid_message_id(&"é".repeat(128)), "256 bytes, 128 characters");
        assert!(!valid_message_id(""));
        assert!(!valid_message_id(&"x".repeat(129)));
        assert!(!valid_message_id(&"é".repeat(129)));
    }

    fn env(s: &str) -> Result<Envelope, Rejection> {
        Envelope::parse(s.as_bytes(), 65536)
    }

    const SIG: &str =
        "\"signature\":\"00000000000000000000000000000000000000000000000000000000000000ff\"";

    #[test]
    fn wrong_types_are_malformed_before_missing_fields() {
        let r = env(r#"{"device_id":"d","timestamp":"1"}"#).unwrap_err();
        assert_eq!(r.reason, Reason::Malformed);
        let r =
            env(&format!(r#"{{"device_id":"d","timestamp":1,"message_id":"","payload":1,{SIG}}}"#));
        assert_eq!(r.unwrap_err().reason, Reason::Malformed);
        let r =
            env(r#"{"device_id":"d","timestamp":1,"message_id":"m","payload":1,"signature":"zz"}"#);
        assert_eq!(r.unwrap_err().reason, Reason::Malformed);
        let r = env(&format!(
            r#"{{"device_id":"a/b","timestamp":1,"message_id":"m","payload":1,{SIG}}}"#
        ));
        assert_eq!(r.unwrap_err().reason, Reason::Malformed);
    }

    #[test]
    fn each_missing_member_is_required_fields() {
        for missing in REQUIRED {
            let mut parts = vec![
                ("device_id", "\"d\"".to_string()),
                ("timestamp", "1".to_string()),
                ("message_id", "\"m\"".to_string()),
                ("payload", "{}".to_string()),
                ("signature", format!("\"{}\"", "0".repeat(64))),
            ];
            parts.retain(|(k, _)| *k != missing);
            let body: Vec<String> = parts.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            let r = env(&format!("{{{}}}", body.join(","))).unwrap_err();
            assert_eq!(r.reason, Reason::RequiredFields, "missing {missing}");
            assert!(r.detail.contains(missing));
        }
    }

    #[test]
    fn non_objects_empty_and_oversize_are_malformed() {
        for bad in ["", "[]", "42", "\"x\"", "null", "temperature=22.5"] {
            assert_eq!(env(bad).unwrap_err().reason, Reason::Malformed, "{bad:?}");
        }
        let big = format!("{{\"payload\":\"{}\"}}", "x".repeat(100));
        let r = Envelope::parse(big.as_bytes(), 50).unwrap_err();
        assert_eq!(r.reason, Reason::Malformed);
        assert!(r.detail.contains("limit"));
    }

    #[test]
    fn uppercase_hex_signature_is_accepted_as_the_same_bytes() {
        let a = decode_hex::<32>("Ab".repeat(32).as_bytes()).unwrap();
        let b = decode_hex::<32>("aB".repeat(32).as_bytes()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn every_byte_in_every_position_of_a_signature_decodes_as_hex_or_not_at_all() {
        for at in 0..64 {
            for c in 0u8..=255 {
                let mut s = vec![b'0'; 64];
                s[at] = c;
                let got = decode_hex::<32>(&s);
                let want = c.is_ascii_hexdigit().then(|| {
                    let mut w = [0u8; 32];
                    w[at / 2] = u8::from_str_radix(&(c as char).to_string(), 16).unwrap()
                        << if at % 2 == 0 { 4 } else { 0 };
                    w
                });
                assert_eq!(got, want, "{:?} at {at}", c as char);
            }
        }
        assert_eq!(decode_hex::<32>("0".repeat(63).as_bytes()), None);
        assert_eq!(
            decode_hex::<32>(format!("{}é", "0".repeat(62)).as_bytes()),
            None,
            "64 bytes, not hex"
        );
    }

    #[test]
    fn timestamp_beyond_i64_is_malformed() {
        let r = env(&format!(
            r#"{{"device_id":"d","timestamp":18446744073709551615,"message_id":"m","payload":1,{SIG}}}"#
        ));
        assert_eq!(r.unwrap_err().reason, Reason::Malformed);
    }

    #[test]
    fn sign_members_round_trips_through_parse_and_verify() {
        let members = vec![
            ("device_id".to_string(), Json::String("d1".into())),
            ("timestamp".to_string(), Json::Number(5.into())),
            ("message_id".to_string(), Json::String("m".into())),
            ("payload".to_string(), Json::Object(vec![])),
        ];
        let text = sign_members(b"k", &members);
        let e = env(&text).unwrap();
        assert!(verify(b"k", &e.canonical(), &e.signature));
        assert!(!verify(b"k2", &e.canonical(), &e.signature));
    }

    #[test]
    fn a_prepared_key_verifies_as_the_secret_does() {
        // Keys shorter than, equal to and longer than SHA-256's block (the last one is hashed
        // first), each used twice to show the prepared state is not consumed.
        for secret in [&b"0123456789abcdef"[..], &[7u8; 64][..], &[9u8; 100][..]] {
            let key = Key::new(secret.into());
            for data in [&b"{}"[..], &[b'x'; 300][..]] {
                let sig = hmac(secret, data);
                assert!(key.verify(data, &sig) && key.verify(data, &sig));
                let mut bad = sig;
                bad[31] ^= 1;
                assert!(!key.verify(data, &bad));
                assert!(!Key::new(b"another-secret-0123".as_slice().into()).verify(data, &sig));
            }
            assert_eq!(&*key, secret);
        }
    }

    /// An envelope whose payload is `{"n":<number>}`, signed by a signer that writes the number
    /// as given (what a device would send).
    fn signed_with_number(number: &str) -> String {
        let canonical = format!(
            r#"{{"device_id":"d1","message_id":"m","payload":{{"n":{number}}},"timestamp":5}}"#
        );
        let sig = hex(&hmac(b"k", canonical.as_bytes()));
        format!(
            r#"{{"device_id":"d1","timestamp":5,"message_id":"m","payload":{{"n":{number}}},"signature":"{sig}"}}"#
        )
    }

    #[test]
    fn numbers_rfc8785_cannot_represent_are_malformed_not_a_bad_signature() {
        // Positive controls: the largest exact integers and a large but finite double verify.
        for ok in ["9007199254740991", "-9007199254740991", "1.5e+300"] {
            let e = env(&signed_with_number(ok)).unwrap_or_else(|r| panic!("{ok}: {r}"));
            assert!(verify(b"k", &e.canonical(), &e.signature), "{ok}");
        }
        for (bad, says) in [
            ("9007199254740992", "beyond"),
            ("-9007199254740992", "beyond"),
            ("18446744073709551616", "beyond"),
            ("1e400", "overflows a double"),
            ("-1e400", "overflows a double"),
        ] {
            let r = env(&signed_with_number(bad)).unwrap_err();
            assert_eq!(r.reason, Reason::Malformed, "{bad}");
            assert!(r.detail.contains(says) && r.detail.contains(bad), "{bad}: {}", r.detail);
        }
    }

    #[test]
    fn uuids_are_version_4_and_all_different_across_refills() {
        let mut ids = Uuids::default();
        // 200 ids: three refills of the 64-id buffer.
        let all: std::collections::HashSet<String> = (0..200).map(|_| ids.next_id()).collect();
        assert_eq!(all.len(), 200);
        for u in &all {
            let b = u.as_bytes();
            assert_eq!(b.len(), 36, "{u}");
            assert!([8, 13, 18, 23].iter().all(|&i| b[i] == b'-'), "{u}");
            assert_eq!(b[14], b'4', "{u}");
            assert!(matches!(b[19], b'8' | b'9' | b'a' | b'b'), "{u}");
            assert!(u.bytes().filter(|&c| c != b'-').all(|c| c.is_ascii_hexdigit()), "{u}");
        }
        // Independent generators draw independent bytes.
        assert!(!all.contains(&Uuids::default().next_id()));
        assert!(!all.contains(&uuid_v4()));
        assert_eq!(uuid_v4().as_bytes()[14], b'4');
    }
}
