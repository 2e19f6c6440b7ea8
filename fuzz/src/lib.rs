//! The fuzz targets' bodies, one `pub fn(&[u8])` each. The libFuzzer binaries in
//! `fuzz_targets/` call them; `tests/fuzz_regressions.rs` includes this file and replays every
//! input under `fuzz/regressions/<target>/` through the same function on stable, so a committed
//! input checks exactly what the fuzzer checked. Each function panics when a property breaks.

use secure_iot_gateway::config::{Config, TopicPattern, MAX_PAYLOAD_LIMIT};
use secure_iot_gateway::delivery::outbox::{AppendError, Store};
use secure_iot_gateway::envelope::{self, Envelope, Reason, MAX_ID_CHARS};
use secure_iot_gateway::http::{read_response, Response};
use secure_iot_gateway::json::{self, Json, JsonError};
use std::io::{self, Read};

/// Envelope parser and verifier (checks 1-2 and the HMAC) on arbitrary bytes.
pub fn envelope(data: &[u8]) {
    const KEY: &[u8] = b"fuzz-secret-0123456789";
    // The single-pass reader (and its straight path for the shape signers send) says exactly
    // what the reference parser says: the same rejection, or the same envelope.
    match (Envelope::parse(data, 65536), Envelope::parse_reference(data, 65536)) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.signed_bytes(), b.signed_bytes());
            assert_eq!(a.payload_bytes(), b.payload_bytes());
            assert_eq!((a.device_id(), a.message_id()), (b.device_id(), b.message_id()));
            assert_eq!((a.timestamp, a.signature), (b.timestamp, b.signature));
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("the reader says {a:?}, the reference {b:?}"),
    }
    let env = match Envelope::parse(data, 65536) {
        Ok(env) => env,
        Err(r) => {
            // Parsing alone can only fail checks 1 and 2, and the detail is logged per message:
            // it must stay short whatever the sender wrote.
            assert!(matches!(r.reason, Reason::Malformed | Reason::RequiredFields), "{r:?}");
            assert!(!r.detail.is_empty() && r.detail.len() <= 200, "detail: {:?}", r.detail);
            return;
        }
    };
    assert!(envelope::valid_device_id(env.device_id()), "{:?}", env.device_id());
    let mid = env.message_id();
    assert!(!mid.is_empty() && mid.chars().count() <= MAX_ID_CHARS);

    // The signed bytes are strict JSON again, and canonicalising them changes nothing.
    let canonical = env.canonical();
    let again = json::parse_strict(&canonical).expect("the canonical form parses");
    assert_eq!(canonical, canonical_of(&again), "canonical form is not a fixed point");
    json::parse_strict(&env.canonical_payload()).expect("the canonical payload parses");

    // The verifier says yes exactly when the signature is the HMAC of the canonical form.
    let want = envelope::hmac(KEY, &canonical);
    assert_eq!(envelope::verify(KEY, &canonical, &env.signature), want == env.signature);

    // Signer and verifier agree: the same members signed by `sign_members` parse back to the
    // same canonical bytes and verify (and only with the right key).
    let Json::Object(members) = again else { panic!("an envelope is an object") };
    let text = envelope::sign_members(KEY, &members);
    let back = Envelope::parse(text.as_bytes(), usize::MAX).expect("a signed envelope parses");
    assert_eq!(back.canonical(), canonical);
    assert_eq!(back.timestamp, env.timestamp);
    assert!(envelope::verify(KEY, &back.canonical(), &back.signature));
    assert!(!envelope::verify(b"another-key", &back.canonical(), &back.signature));
}

fn canonical_of(v: &Json) -> Vec<u8> {
    let mut out = Vec::new();
    json::write_canonical(v, &mut out);
    out
}

/// Strict parser and RFC 8785 writer against serde_json's reading (the reference for what the
/// bytes mean) and ryu's shortest float printing (via serde_json's serializer).
pub fn canonical(data: &[u8]) {
    let strict = json::parse_strict(data);
    let reference = serde_json::from_slice::<serde_json::Value>(data);
    let v = match (strict, reference) {
        (Ok(v), Ok(r)) => {
            same_as_reference(&v, &r);
            v
        }
        (Ok(_), Err(e)) => panic!("strict parser accepted what serde_json refuses: {e}"),
        // Stricter on purpose: duplicates, depth, numbers RFC 8785 cannot represent.
        (Err(JsonError::Syntax(s)), Ok(_)) => panic!("syntax error {s:?} on valid JSON"),
        (Err(_), _) => return,
    };
    let c1 = canonical_of(&v);
    let v2 = json::parse_strict(&c1).expect("the canonical form parses");
    let c2 = canonical_of(&v2);
    assert_eq!(c1, c2, "canonical form is not a fixed point");
    same_value(&v, &v2);
    members_sorted(&v2);
    minimal_escapes(&c1);
}

/// `v` (ours) means what serde_json read from the same bytes.
fn same_as_reference(v: &Json, r: &serde_json::Value) {
    use serde_json::Value as V;
    match (v, r) {
        (Json::Null, V::Null) => {}
        (Json::Bool(a), V::Bool(b)) => assert_eq!(a, b),
        (Json::Number(a), V::Number(b)) => {
            let (x, y) = (a.as_f64().expect("finite"), b.as_f64().expect("finite"));
            assert_eq!(x.to_bits(), y.to_bits(), "{a} vs {b}");
            number_text(a);
        }
        (Json::String(a), V::String(b)) => assert_eq!(a, b),
        (Json::Array(a), V::Array(b)) => {
            assert_eq!(a.len(), b.len());
            a.iter().zip(b).for_each(|(x, y)| same_as_reference(x, y));
        }
        (Json::Object(a), V::Object(b)) => {
            assert_eq!(a.len(), b.len());
            for (k, x) in a {
                same_as_reference(x, b.get(k).expect("same members"));
            }
        }
        _ => panic!("different kinds: {v:?} vs {r:?}"),
    }
}

/// Our number text is ECMAScript's: the same shortest digits as ryu, no `.0`, no `+` exponent
/// below 1e21, and it reads back (with Rust's own float parser) as the same double.
fn number_text(n: &serde_json::Number) {
    let ours = String::from_utf8(canonical_of(&Json::Number(n.clone()))).expect("ASCII");
    let f = n.as_f64().expect("finite");
    let back: f64 = ours.parse().expect("a number");
    assert!(back == f, "{ours} reads back as {back}, not {f}");
    let ryu = serde_json::to_string(&f).expect("finite");
    assert_eq!(decimal(&ours), decimal(&ryu), "{ours} vs ryu {ryu}");
    let es_grammar = {
        let (mant, exp) = ours.split_once('e').unwrap_or((&ours, ""));
        let mant = mant.strip_prefix('-').unwrap_or(mant);
        let int_ok = mant.split('.').next().is_some_and(|i| i == "0" || !i.starts_with('0'));
        let frac_ok = mant.split_once('.').is_none_or(|(_, d)| !d.is_empty() && !d.ends_with('0'));
        let exp_ok = exp.is_empty() || (exp.starts_with(['+', '-']) && !exp[1..].starts_with('0'));
        int_ok && frac_ok && exp_ok && ours != "-0"
    };
    assert!(es_grammar, "{ours} is not in ECMAScript's form");
    if f == f.trunc() && f.abs() < 1e21 {
        assert!(!ours.contains(['.', 'e']), "integer {f} printed as {ours}");
    }
}

/// A decimal number text as (negative, significant digits, exponent of the first digit).
fn decimal(s: &str) -> (bool, String, i32) {
    let (neg, s) = s.strip_prefix('-').map_or((false, s), |r| (true, r));
    let (mant, exp) = s.split_once(['e', 'E']).unwrap_or((s, "0"));
    let exp: i32 = exp.trim_start_matches('+').parse().expect("exponent");
    let int_len = mant.split('.').next().unwrap_or("").len() as i32;
    let all: String = mant.chars().filter(|c| *c != '.').collect();
    let lead = all.len() - all.trim_start_matches('0').len();
    let digits = all.trim_matches('0').to_string();
    if digits.is_empty() {
        return (false, "0".into(), 0);
    }
    (neg, digits, exp + int_len - lead as i32)
}

/// Same value after a round trip through the canonical form (numbers as doubles).
fn same_value(a: &Json, b: &Json) {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => {
            assert!(x.as_f64() == y.as_f64(), "{x} became {y}");
        }
        (Json::Array(x), Json::Array(y)) => {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).for_each(|(p, q)| same_value(p, q));
        }
        (Json::Object(x), Json::Object(y)) => {
            assert_eq!(x.len(), y.len());
            for (k, p) in x {
                same_value(p, b.get(k).expect("same members"));
            }
        }
        _ => assert_eq!(a, b),
    }
}

/// Every object (as parsed from the canonical bytes, in wire order) has its members in
/// strictly increasing UTF-16 order (RFC 8785 §3.2.3).
fn members_sorted(v: &Json) {
    match v {
        Json::Array(items) => items.iter().for_each(members_sorted),
        Json::Object(m) => {
            for w in m.windows(2) {
                assert!(
                    w[0].0.encode_utf16().lt(w[1].0.encode_utf16()),
                    "{:?}",
                    (&w[0].0, &w[1].0)
                );
            }
            m.iter().for_each(|(_, x)| members_sorted(x));
        }
        _ => {}
    }
}

/// Strings in `c` use only RFC 8785's escapes: the two-character forms for `"`, `\`, and
/// b f n r t; `\u00xx` lowercase for the other controls; no raw control byte; nothing else.
fn minimal_escapes(c: &[u8]) {
    let mut in_str = false;
    let mut i = 0;
    while i < c.len() {
        let b = c[i];
        if !in_str {
            assert!(!b.is_ascii_whitespace(), "whitespace at {i}");
            in_str = b == b'"';
        } else if b == b'"' {
            in_str = false;
        } else if b == b'\\' {
            let e = c[i + 1];
            assert!(b"\"\\bfnrtu".contains(&e), "escape \\{} at {i}", e as char);
            if e == b'u' {
                let hex = &c[i + 2..i + 6];
                let cp = u8::from_str_radix(std::str::from_utf8(&hex[2..]).expect("hex"), 16);
                assert!(hex.starts_with(b"00") && hex[2] <= b'1', "\\u{:?}", hex);
                assert!(!hex.iter().any(u8::is_ascii_uppercase), "uppercase hex {hex:?}");
                assert!(
                    !matches!(cp, Ok(8 | 9 | 0x0a | 0x0c | 0x0d)),
                    "long form for a short escape"
                );
                i += 4;
            }
            i += 1;
        } else {
            assert!(b >= 0x20, "raw control byte {b:#x}");
        }
        i += 1;
    }
}

/// A reader that hands out at most `step` bytes per call, like a slow socket.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// The answers read one after the other from `data`: a second one when the first kept the
/// connection (pipelining: it starts with the bytes the first one read past its end).
fn read_all(data: &[u8], step: usize) -> Vec<io::Result<(Response, bool)>> {
    let mut src = Trickle { data, step };
    let mut buf = Vec::new();
    let first = read_response(&mut src, &mut buf);
    let again = matches!(first, Ok((_, true)));
    let mut out = vec![first];
    if again {
        out.push(read_response(&mut src, &mut buf));
    }
    out
}

/// HTTP response parser on arbitrary bytes: never panics, keeps at most 64 KiB of body, and
/// reads the same answers (the first, and the next one on a kept connection) whether the bytes
/// arrive at once or a few at a time.
pub fn http_response(data: &[u8]) {
    let Some((&seed, bytes)) = data.split_first() else { return };
    let whole = read_all(bytes, usize::MAX);
    let pieces = read_all(bytes, 1 + seed as usize % 7);
    assert_eq!(
        whole.len(),
        pieces.len(),
        "the read size changed how many answers: {whole:?} vs {pieces:?}"
    );
    for (w, p) in whole.iter().zip(&pieces) {
        match (w, p) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "the read size changed the answer"),
            (Err(_), Err(_)) => {}
            _ => panic!("the read size changed the outcome: {w:?} vs {p:?}"),
        }
        if let Ok((r, _)) = w {
            assert!(r.body.len() <= 64 * 1024, "kept {} body bytes", r.body.len());
        }
    }
}

/// Rewrites the CRC of every `[u32 len][u32 crc][body]` frame in `seg` to match its body, so
/// the fuzzer reaches the record decoder instead of stopping at checksums it cannot guess.
fn fix_crcs(seg: &mut [u8]) {
    let mut at = 0;
    while at + 8 <= seg.len() {
        let len = u32::from_le_bytes(seg[at..at + 4].try_into().expect("4 bytes")) as usize;
        let end = (at + 8).saturating_add(len).min(seg.len());
        let crc = crc32(&seg[at + 8..end]);
        seg[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

/// CRC-32 (IEEE), bitwise: the fuzz crate should not depend on the store's own choice of crate.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Outbox recovery from a segment of arbitrary bytes, through the public API only. First byte:
/// bit 0 fixes up CRCs (see [`fix_crcs`]). Properties: opening never panics on damaged data and
/// fails only by refusing an outbox it cannot verify at all; every message it reports pending can
/// be read back; a message appended after recovery
/// survives a reopen with everything recovered before it; recovery is idempotent.
pub fn store_recovery(data: &[u8]) {
    let Some((&mode, seg)) = data.split_first() else { return };
    let mut seg = seg.to_vec();
    if mode & 1 == 1 {
        fix_crcs(&mut seg);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("seg-0000000000000001.log"), &seg).expect("write segment");
    let mut store = match Store::open(dir.path(), 1 << 30) {
        Ok(s) => s,
        // Refusing an outbox whose records cannot be verified at all (no key file and every
        // segment header damaged) is the designed, fail-closed answer: nothing is dropped.
        Err(e) if e.kind() == io::ErrorKind::InvalidData => return,
        Err(e) => panic!("recovery of a damaged outbox: {e}"),
    };
    let recovered = store.take_recovered_pending();
    for (id, _) in &recovered {
        let m = store.read(*id).expect("readable").expect("a pending message is there");
        assert_eq!(m.id, *id);
    }
    // Refused only when damage planted an id near the top of the id space (store.rs MAX_ID):
    // an id the next start could not read back must not be acknowledged.
    let new = match store.append("fuzz_dev", "fuzz-mid", i64::MAX, Some(b"{\"n\":1}")) {
        Ok(id) => Some(id),
        Err(AppendError::Io(e)) if e.kind() == io::ErrorKind::InvalidData => None,
        Err(e) => panic!("append after recovery: {e}"),
    };
    drop(store);
    let mut again = Store::open(dir.path(), 1 << 30).expect("reopen");
    let index: Vec<i64> = again.take_recovered_pending().into_iter().map(|(id, _)| id).collect();
    for (id, _) in &recovered {
        assert!(index.contains(id), "message {id} lost by the reopen: {index:?}");
    }
    let Some(new) = new else { return };
    assert!(index.contains(&new), "message {new} appended after recovery lost: {index:?}");
    let m = again.read(new).expect("readable").expect("pending");
    assert_eq!((m.device_id.as_str(), m.payload.as_slice()), ("fuzz_dev", &b"{\"n\":1}"[..]));
}

/// `Config::from_opts` on arbitrary options: one `key value` pair per line. Never panics; a
/// configuration it accepts satisfies its documented bounds; a refusal names its option.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let pairs: Vec<(&str, &str)> = text
        .lines()
        .map(|l| l.split_once(' ').unwrap_or((l, "")))
        // Reads the named file: a fuzzer naming /dev/zero would hang the run, not find a bug.
        .filter(|(k, _)| *k != "backend_ca_file")
        .collect();
    let cfg = match Config::from_opts(pairs.iter().copied()) {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(e.to_string().starts_with("plugin_opt_"), "{e}");
            return;
        }
    };
    assert!((1..=604_800).contains(&cfg.timestamp_tolerance));
    assert!((64..=MAX_PAYLOAD_LIMIT).contains(&cfg.max_payload_bytes));
    assert!(cfg.replay_cache_size >= 1);
    assert_ne!(cfg.data_topic, cfg.response_topic);
    for s in &cfg.service_identities {
        assert!(!s.is_empty() && !s.contains('\0') && s.trim() == s, "{s:?}");
    }
    if let Some(b) = &cfg.backend {
        assert!((1..=256).contains(&b.workers));
        assert!(b.url_template.starts_with("http://") || b.url_template.starts_with("https://"));
    }
    for p in [&cfg.data_topic, &cfg.response_topic] {
        assert_eq!(TopicPattern::parse(&p.to_string()).as_ref(), Some(p), "{p}");
        let t = p.topic_for("sensor_001");
        assert_eq!(p.device_of(&t), Some("sensor_001"), "{p}");
        assert!(p.is_topic_of(&t, "sensor_001"));
        assert!(!p.is_topic_of(&t, "sensor_002"));
    }
}
