//! Strict JSON parsing and RFC 8785 (JCS) canonical serialization.
//!
//! Why not `serde_json::Value`: it silently keeps the last of two duplicate members, so a signer
//! and a verifier could read two different messages from the same bytes. [`parse_strict`]
//! rejects duplicates at any depth and bounds nesting, and [`write_canonical`] produces exactly
//! the bytes that are signed.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::cell::Cell;
use std::fmt;

/// Deepest nesting accepted (the envelope object itself is level 1).
pub const MAX_DEPTH: usize = 64;

/// Largest integer magnitude RFC 8785 can write exactly: it prints numbers as IEEE doubles, and
/// I-JSON (RFC 7493 §2.2) bounds integers to ±(2^53 − 1).
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Longest piece of the input (member name, number) quoted back in an error: details are logged
/// per message, so they must stay short whatever the sender wrote.
const QUOTE_MAX: usize = 40;

/// A JSON value that keeps object members in wire order (duplicates already refused).
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// The member `name` of an object, if this is an object that has it.
    pub fn get(&self, name: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == name).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Converts a `serde_json::Value` (which cannot hold duplicates) into a `Json`.
    pub fn from_value(v: serde_json::Value) -> Json {
        match v {
            serde_json::Value::Null => Json::Null,
            serde_json::Value::Bool(b) => Json::Bool(b),
            serde_json::Value::Number(n) => Json::Number(n),
            serde_json::Value::String(s) => Json::String(s),
            serde_json::Value::Array(a) => {
                Json::Array(a.into_iter().map(Json::from_value).collect())
            }
            serde_json::Value::Object(o) => {
                Json::Object(o.into_iter().map(|(k, v)| (k, Json::from_value(v))).collect())
            }
        }
    }
}

/// Why bytes are not acceptable strict JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Syntax error, invalid UTF-8, trailing data, lone surrogate...
    Syntax(String),
    /// The same member name twice in one object.
    DuplicateMember(String),
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A number RFC 8785 cannot write back exactly: an integer beyond ±[`MAX_SAFE_INTEGER`] or a
    /// value that overflows a double. Holds the number as written (shortened).
    Number(NumberProblem, String),
}

/// What is wrong with a number (see [`JsonError::Number`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberProblem {
    /// An integer beyond ±(2^53 − 1) that RFC 8785 would write as an integer: written as one
    /// (`9007199254740992`), or as a double whose value is one below 1e21 (`1e20`, `2e16`).
    UnsafeInteger,
    /// Larger in magnitude than the largest finite double (e.g. `1e400`).
    Overflow,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::Syntax(s) => write!(f, "invalid JSON: {s}"),
            JsonError::DuplicateMember(k) => write!(f, "duplicate member {:?}", shorten(k)),
            JsonError::TooDeep => write!(f, "nested deeper than {MAX_DEPTH} levels"),
            JsonError::Number(NumberProblem::UnsafeInteger, n) => {
                write!(f, "number {n} is an integer beyond ±(2^53-1), which RFC 8785 cannot represent exactly")
            }
            JsonError::Number(NumberProblem::Overflow, n) => {
                write!(f, "number {n} overflows a double (RFC 8785 cannot represent it)")
            }
        }
    }
}

// serde_json's own nesting limit is 128; ours must trip first so that depth errors are always
// ours (typed), never serde_json's.
const _: () = assert!(MAX_DEPTH < 128);

/// `s` cut to [`QUOTE_MAX`] characters, marked with `...` when cut.
fn shorten(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(QUOTE_MAX) {
        None => s.into(),
        Some((at, _)) => format!("{}...", &s[..at]).into(),
    }
}

/// Parses `bytes` as one strict JSON value: UTF-8, no duplicate members, at most
/// [`MAX_DEPTH`] levels of arrays/objects, only numbers RFC 8785 represents exactly.
pub fn parse_strict(bytes: &[u8]) -> Result<Json, JsonError> {
    check_numbers(bytes)?;
    // The visitor reports our own refusals here, typed; serde_json only carries them out as an
    // opaque error, so nothing depends on its message text.
    let refused = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Seed { depth: 0, refused: &refused }.deserialize(&mut de);
    let value = value.and_then(|v| de.end().map(|()| v));
    value.map_err(|e| refused.take().unwrap_or_else(|| JsonError::Syntax(e.to_string())))
}

/// Refuses the numbers RFC 8785 cannot write back exactly, judged on their text: serde_json
/// hands integers beyond u64 to the visitor as doubles (so `2^64` and `1.8e19` look alike there)
/// and reports `1e400` only as a generic syntax error. One linear pass over the bytes; on valid
/// JSON every token it sees outside a string is a number. On invalid JSON it may name a number
/// problem where the syntax error comes first: the input is malformed either way.
fn check_numbers(bytes: &[u8]) -> Result<(), JsonError> {
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                check_number(&bytes[start..i])?;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

fn check_number(token: &[u8]) -> Result<(), JsonError> {
    // Only ASCII digits, signs, '.', 'e' reach here.
    let text = std::str::from_utf8(token).unwrap_or_default();
    let problem = if token.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        // A syntax error (say `1.e5`) is left to the parser.
        match text.parse::<f64>() {
            Ok(f) if f.is_infinite() => Some(NumberProblem::Overflow),
            // RFC 8785 writes integral values below 1e21 as integers (1e20 is
            // "100000000000000000000"): beyond 2^53 - 1 its output would be refused when read
            // back, so such a value is refused however it is spelled.
            Ok(f) if f.trunc() == f && f.abs() > MAX_SAFE_INTEGER as f64 && f.abs() < 1e21 => {
                Some(NumberProblem::UnsafeInteger)
            }
            _ => None,
        }
    } else {
        let digits = text.strip_prefix('-').unwrap_or(text);
        // 2^53 - 1 has 16 digits; JSON allows no leading zeros.
        let unsafe_int =
            digits.len() > 16 || digits.parse::<u64>().is_ok_and(|n| n > MAX_SAFE_INTEGER);
        unsafe_int.then_some(NumberProblem::UnsafeInteger)
    };
    match problem {
        Some(p) => Err(JsonError::Number(p, shorten(text).into_owned())),
        None => Ok(()),
    }
}

struct Seed<'r> {
    depth: usize,
    refused: &'r Cell<Option<JsonError>>,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Json;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        d.deserialize_any(JsonVisitor { depth: self.depth, refused: self.refused })
    }
}

struct JsonVisitor<'r> {
    depth: usize,
    refused: &'r Cell<Option<JsonError>>,
}

impl JsonVisitor<'_> {
    /// Records why we refuse and returns the error that makes serde_json stop.
    fn refuse<E: de::Error>(&self, why: JsonError) -> E {
        let e = E::custom(&why);
        self.refused.set(Some(why));
        e
    }

    fn enter<E: de::Error>(&self) -> Result<usize, E> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(self.refuse(JsonError::TooDeep));
        }
        Ok(depth)
    }
}

impl<'de> Visitor<'de> for JsonVisitor<'_> {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
        Ok(Json::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
        Ok(Json::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
        Ok(Json::Number(n.into()))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Json, E> {
        serde_json::Number::from_f64(n)
            .map(Json::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, s: &str) -> Result<Json, E> {
        Ok(Json::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Json, E> {
        Ok(Json::String(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let depth = self.enter()?;
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(Seed { depth, refused: self.refused })? {
            items.push(v);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let depth = self.enter()?;
        let mut members: Vec<(String, Json)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            // Objects in envelopes are small; a linear scan beats hashing here.
            if members.iter().any(|(k, _)| *k == key) {
                return Err(self.refuse(JsonError::DuplicateMember(key)));
            }
            let value = map.next_value_seed(Seed { depth, refused: self.refused })?;
            members.push((key, value));
        }
        Ok(Json::Object(members))
    }
}

/// Appends the RFC 8785 canonical form of `v` to `out`.
pub fn write_canonical(v: &Json, out: &mut Vec<u8>) {
    match v {
        Json::Null => out.extend_from_slice(b"null"),
        Json::Bool(true) => out.extend_from_slice(b"true"),
        Json::Bool(false) => out.extend_from_slice(b"false"),
        Json::Number(n) => write_number(n, out),
        Json::String(s) => write_string(s, out),
        Json::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Json::Object(members) => write_object(members.iter().map(|(k, v)| (k.as_str(), v)), out),
    }
}

/// Writes an object from `(name, value)` pairs in canonical member order.
pub fn write_object<'a>(members: impl Iterator<Item = (&'a str, &'a Json)>, out: &mut Vec<u8>) {
    let mut sorted: Vec<(&str, &Json)> = members.collect();
    // RFC 8785 §3.2.3: sort by the UTF-16 code units of the names.
    sorted.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
    out.push(b'{');
    for (i, (k, v)) in sorted.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(k, out);
        out.push(b':');
        write_canonical(v, out);
    }
    out.push(b'}');
}

/// A JSON string with RFC 8785's minimal escaping; everything else stays raw UTF-8.
pub fn write_string(s: &str, out: &mut Vec<u8>) {
    write_string_bytes(s.as_bytes(), out)
}

/// [`write_string`] of text already known to be UTF-8 (the escaping looks at ASCII bytes only).
pub(crate) fn write_string_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    // Most strings (ids, hex, plain text) need no escape: one branch-free pass (it vectorises)
    // finds that, instead of a branch per byte.
    let plain = !bytes.iter().fold(false, |any, &b| any | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if plain {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Numbers as ECMAScript's `Number.prototype.toString` prints the IEEE double (RFC 8785 §3.2.2.3).
/// Written straight into `out` (this runs for every number of every message: no allocation).
fn write_number(n: &serde_json::Number, out: &mut Vec<u8>) {
    use std::io::Write;
    const EXACT: u64 = 1 << 53;
    if let Some(u) = n.as_u64() {
        if u <= EXACT {
            let _ = write!(out, "{u}");
            return;
        }
    } else if let Some(i) = n.as_i64() {
        if i.unsigned_abs() <= EXACT {
            let _ = write!(out, "{i}");
            return;
        }
    }
    write_es_number(n.as_f64().unwrap_or(0.0), out);
}

/// The shortest digits that read back as `f` (positive, finite), and the decimal exponent of the
/// first one, chosen as ECMAScript does (Number::toString, note 2: the closest, and the even one
/// of two equally close; V8 and Python's repr agree). ryu picks exactly these (it breaks exact
/// ties to even, where Rust's `{:e}` breaks them upward: 900719925474099.25 must print as
/// ...099.2; see the tests), without allocating: this runs for every non-integer number of
/// every message.
fn shortest_digits(f: f64) -> ([u8; 32], usize, i32) {
    let mut text = ryu::Buffer::new();
    let text = text.format_finite(f).as_bytes();
    // ryu writes `123.0`, `0.00123`, `1.5e300` or `1e-7`: read the digits back from any form.
    let (mantissa, exp) = match text.iter().position(|c| *c == b'e') {
        Some(e) => {
            let exp = std::str::from_utf8(&text[e + 1..]).ok().and_then(|x| x.parse().ok());
            (&text[..e], exp.unwrap_or(0))
        }
        None => (text, 0),
    };
    let point = mantissa.iter().position(|c| *c == b'.').unwrap_or(mantissa.len());
    let mut digits = [0u8; 32];
    let (mut len, mut leading_zeros) = (0, 0);
    for &c in mantissa.iter().filter(|c| **c != b'.') {
        if len == 0 && c == b'0' {
            leading_zeros += 1;
        } else {
            digits[len] = c;
            len += 1;
        }
    }
    while len > 1 && digits[len - 1] == b'0' {
        len -= 1;
    }
    (digits, len, exp + point as i32 - 1 - leading_zeros)
}

/// ECMAScript Number::toString(10) for a finite double.
pub fn es_number(f: f64) -> String {
    let mut out = Vec::new();
    write_es_number(f, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// [`es_number`], appended to `out`.
pub(crate) fn write_es_number(f: f64, out: &mut Vec<u8>) {
    use std::io::Write as _;
    if f == 0.0 {
        out.push(b'0');
        return;
    }
    // The shortest digits that round-trip, ties to even as ECMAScript prints them (see
    // `shortest_digits`: Rust's `{:e}` rounds ties up).
    let (digits, len, exp) = shortest_digits(f.abs());
    let digits = &digits[..len];
    let k = digits.len() as i32;
    let n = exp + 1;
    if f < 0.0 {
        out.push(b'-');
    }
    if k <= n && n <= 21 {
        out.extend_from_slice(digits);
        out.extend(std::iter::repeat_n(b'0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.extend_from_slice(&digits[..n as usize]);
        out.push(b'.');
        out.extend_from_slice(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', (-n) as usize));
        out.extend_from_slice(digits);
    } else {
        out.push(digits[0]);
        if k > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if n > 0 { b'+' } else { b'-' });
        let _ = write!(out, "{}", (n - 1).abs());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> String {
        let mut out = Vec::new();
        write_canonical(&parse_strict(s.as_bytes()).unwrap(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn duplicate_member_at_top_level_is_rejected() {
        assert_eq!(parse_strict(br#"{"a":1,"a":2}"#), Err(JsonError::DuplicateMember("a".into())));
    }

    #[test]
    fn duplicate_member_nested_is_rejected() {
        let e = parse_strict(br#"{"p":[{"x":{"k":1,"k":1}}]}"#).unwrap_err();
        assert_eq!(e, JsonError::DuplicateMember("k".into()));
    }

    #[test]
    fn refusals_are_typed_whatever_the_member_name_says() {
        // Names that look like serde_json's message suffix or our old text sentinels.
        for name in ["k at line 1 column 2", "\\u0000deep", "recursion limit exceeded", ""] {
            let text = format!(r#"{{"{name}":1,"{name}":2}}"#);
            let want = parse_strict(format!(r#""{name}""#).as_bytes()).unwrap();
            let Json::String(want) = want else { panic!() };
            assert_eq!(parse_strict(text.as_bytes()), Err(JsonError::DuplicateMember(want)));
        }
        // Positive control: the same names once each are fine.
        assert!(parse_strict(br#"{"k at line 1 column 2":1,"recursion limit exceeded":2}"#).is_ok());
    }

    #[test]
    fn depth_64_is_accepted_and_65_is_rejected() {
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(parse_strict(ok.as_bytes()).is_ok());
        let bad = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert_eq!(parse_strict(bad.as_bytes()), Err(JsonError::TooDeep));
    }

    #[test]
    fn ten_thousand_deep_nesting_is_rejected_without_overflow() {
        let bad = format!("{}{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
        assert_eq!(parse_strict(bad.as_bytes()), Err(JsonError::TooDeep));
    }

    #[test]
    fn invalid_utf8_and_trailing_data_are_syntax_errors() {
        assert!(matches!(parse_strict(b"\"\xff\""), Err(JsonError::Syntax(_))));
        assert!(matches!(parse_strict(b"{} {}"), Err(JsonError::Syntax(_))));
        assert!(matches!(parse_strict(b""), Err(JsonError::Syntax(_))));
        assert!(matches!(parse_strict(br#""\ud800""#), Err(JsonError::Syntax(_))));
    }

    #[test]
    fn integers_are_limited_to_plus_minus_2_53_minus_1() {
        // Positive controls: the edges themselves, and integer-valued numbers written as doubles.
        for ok in [
            "9007199254740991",
            "-9007199254740991",
            "[0,-0,1e21,-1e21,1.5e300,123456789012.0,2e53]",
        ] {
            assert!(parse_strict(ok.as_bytes()).is_ok(), "{ok}");
        }
        for bad in [
            "9007199254740992",
            "-9007199254740992",
            "18446744073709551616",
            "{\"a\":[1,{\"b\":123456789012345678901234567890}]}",
            // Doubles whose canonical form would be such an integer (found by fuzzing: the
            // canonical form of 1e20 did not parse back).
            "1e20",
            "-9007199254740992.0",
            "9007199254740993.5",
            "123456789012345678.0",
        ] {
            assert!(
                matches!(
                    parse_strict(bad.as_bytes()),
                    Err(JsonError::Number(NumberProblem::UnsafeInteger, _))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn numbers_overflowing_a_double_are_refused_by_name() {
        for ok in ["1.7976931348623157e308", "-1e308", "1e-400", "[\"1e400\"]"] {
            assert!(parse_strict(ok.as_bytes()).is_ok(), "{ok}");
        }
        for bad in ["1e400", "-1e400", "[1.0E+999]", "{\"x\\\"\":2e308}"] {
            let e = parse_strict(bad.as_bytes()).unwrap_err();
            assert!(matches!(e, JsonError::Number(NumberProblem::Overflow, _)), "{bad}: {e:?}");
            assert!(e.to_string().contains("overflows a double"), "{e}");
        }
    }

    #[test]
    fn error_details_quote_at_most_a_short_prefix() {
        let name = "k".repeat(10_000);
        let e = parse_strict(format!("{{\"{name}\":1,\"{name}\":2}}").as_bytes()).unwrap_err();
        assert!(matches!(e, JsonError::DuplicateMember(_)));
        assert!(e.to_string().len() < 100, "{e}");
        let e = parse_strict(format!("1{}", "0".repeat(10_000)).as_bytes()).unwrap_err();
        assert!(e.to_string().len() < 150, "{e}");
    }

    #[test]
    fn canonical_sorts_members_at_every_depth_and_strips_whitespace() {
        assert_eq!(
            canon(r#"{ "b": [ {"z":1, "y":2} ], "a": null }"#),
            r#"{"a":null,"b":[{"y":2,"z":1}]}"#
        );
    }

    #[test]
    fn canonical_sorts_by_utf16_code_units() {
        // By code point U+E000 < U+1F600, but U+1F600 is the surrogate pair D83D DE00 and D83D < E000.
        assert_eq!(canon("{\"\u{e000}\":1,\"\u{1f600}\":2}"), "{\"\u{1f600}\":2,\"\u{e000}\":1}");
    }

    #[test]
    fn canonical_escapes_only_what_rfc8785_requires() {
        assert_eq!(
            canon(r#""a\"b\\c\/d\u0001\u001f\b\f\n\r\t\u00e9\u2028""#),
            "\"a\\\"b\\\\c/d\\u0001\\u001f\\b\\f\\n\\r\\t\u{e9}\u{2028}\""
        );
    }

    #[test]
    fn every_ascii_byte_is_escaped_alone_and_among_plain_text_as_serde_json_does() {
        // serde_json escapes strings exactly as RFC 8785 asks; both paths of write_string (no
        // escape needed / some needed) must agree with it for every byte.
        for b in 0u8..0x80 {
            for s in [(b as char).to_string(), format!("sensor-{}-01", b as char)] {
                let mut out = Vec::new();
                write_string(&s, &mut out);
                assert_eq!(out, serde_json::to_vec(&s).unwrap(), "byte {b:#04x} in {s:?}");
            }
        }
        let mut out = Vec::new();
        write_string("", &mut out);
        assert_eq!(out, b"\"\"");
    }

    #[test]
    fn numbers_print_like_ecmascript() {
        let cases = [
            ("22.5", "22.5"),
            ("-0.5", "-0.5"),
            ("100.0", "100"),
            ("1e21", "1e+21"),
            ("1e-7", "1e-7"),
            ("0.000001", "0.000001"),
            ("-0.0", "0"),
            ("1.5e300", "1.5e+300"),
            // Written as a double: as an integer it is beyond 2^53 - 1 and refused (see below).
            ("123456789012345678901234.0", "1.2345678901234569e+23"),
            ("-42", "-42"),
            // Expectations above were checked against Node.js String(x).
            ("0.1", "0.1"),
            ("5e-324", "5e-324"),
        ];
        for (input, want) in cases {
            assert_eq!(canon(input), want, "input {input}");
        }
        // Exact ties between two shortest candidates go to the even one (checked with Node.js;
        // found by fuzzing: `{:e}` rounds them up).
        for (f, want) in [
            ("900719925474099.25", "900719925474099.2"),
            ("184467407370551.625", "184467407370551.62"),
            ("1844674407370955.25", "1844674407370955.2"),
            ("563333333338314.25", "563333333338314.2"),
            ("184467440737095.625", "184467440737095.62"),
            ("-900719925474099.25", "-900719925474099.2"),
            // Positive controls: not ties, the odd digit is the closest.
            ("900719925474099.125", "900719925474099.1"),
            ("184467407370551.875", "184467407370551.88"),
            ("0.3", "0.3"),
            ("5e-324", "5e-324"),
        ] {
            // Parsed from text: the exact values have more digits than clippy allows a literal.
            assert_eq!(es_number(f.parse().unwrap()), want, "{f}");
        }
        // Integral doubles from 2^53 to 1e21 print as integers; the parser refuses them (see
        // integers_are_limited_to_plus_minus_2_53_minus_1), the writer still prints them right.
        assert_eq!(es_number(1e20), "100000000000000000000");
        assert_eq!(es_number(9007199254740992.0), "9007199254740992");
    }
}
