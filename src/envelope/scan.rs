//! The envelope's fast path: one walk over the bytes that checks strict JSON (the rules of
//! `json::parse_strict`: UTF-8, no duplicate members, depth, numbers RFC 8785 represents) and
//! writes the RFC 8785 canonical form as it goes, with no tree and no allocation but the
//! envelope's own buffer.
//!
//! It only ever says "this is a well-formed envelope, here are its bytes", "well-formed, but
//! this required member is missing" (the reference's reason and detail), or "not for me"
//! (`None`): every other error, and the rare shapes it leaves alone (long floats, `\u`
//! surrogates, escaped ids), go to the reference parser, so rejections and their details are
//! always the reference's. `tests` holds the differential test against it.

use crate::envelope::{valid_device_id, valid_message_id};
use crate::json::{self, MAX_DEPTH, MAX_SAFE_INTEGER};
use std::cmp::Ordering;
use std::ops::Range;

/// Reused working memory (the validator keeps one, so a message allocates none of it).
#[derive(Default)]
pub struct Scratch {
    /// The top level's members, canonical, in wire order (`"name":value`, no commas).
    top: Vec<u8>,
    /// Decoded member names of the objects open at the moment.
    keys: Vec<u8>,
    /// Members of the objects open at the moment.
    members: Vec<Member>,
    /// Object bodies being put in canonical order; decoded escaped strings.
    tmp: Vec<u8>,
    dec: Vec<u8>,
    /// The top level's members.
    kinds: Vec<TopMember>,
    order: Vec<usize>,
    /// A finished envelope's buffer handed back ([`Scratch::recycle`]): the next one's.
    spare: Vec<u8>,
}

impl Scratch {
    /// Takes back the buffer of an envelope that is no longer needed, so that the next
    /// envelope is built in it instead of a new allocation.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.spare = buf;
    }
}

/// A top-level member: name in `keys`, value in `top`, its kind, and which envelope member it
/// is (looked up once).
struct TopMember {
    key: Range<usize>,
    value: Range<usize>,
    kind: Kind,
    field: Option<Field>,
}

#[derive(Clone)]
struct Member {
    key: Range<usize>,
    span: Range<usize>,
}

/// What a value was, for the envelope's type checks.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Str,
    Int(i64),
    Other,
}

/// A well-formed envelope, found by [`scan`]; the ranges index `buf`.
pub struct Scanned {
    /// `{...}` canonical without `signature`.
    pub buf: Vec<u8>,
    pub device: Range<usize>,
    pub message_id: Range<usize>,
    pub payload: Range<usize>,
    pub signature: [u8; 32],
    pub timestamp: i64,
}

/// Some(Ok): a well-formed envelope. Some(Err(name)): well-formed JSON whose members have the
/// right types, but the required member `name` is missing. None: the reference decides.
pub fn scan(bytes: &[u8], s: &mut Scratch) -> Option<Result<Scanned, &'static str>> {
    // Valid JSON is UTF-8 throughout (outside strings only ASCII is allowed), so one check of
    // the whole input covers every string.
    std::str::from_utf8(bytes).ok()?;
    if let Some(e) = exact(bytes, s) {
        return Some(Ok(e));
    }
    // After `exact`, which may have stopped halfway through the payload: the walk starts clean.
    s.top.clear();
    s.keys.clear();
    s.members.clear();
    s.kinds.clear();
    let mut p = Parser { b: bytes, i: 0 };
    p.ws();
    if p.peek()? != b'{' {
        return None;
    }
    p.i += 1;
    // The top level is parsed like any object, into `top`, then reassembled without the
    // signature; its members' kinds are kept for the type checks.
    let Scratch { top, keys, members, tmp, dec, kinds, order, spare } = s;
    let mut st = State { keys, members, tmp, dec };
    p.ws();
    if p.peek()? == b'}' {
        return None; // no members: required_fields, the reference says which
    }
    // Signers send canonical order (RFC 8785 sorts members): then no sort is needed.
    let mut sorted = true;
    loop {
        p.ws();
        let (key, span_start) = p.member_name(&mut st, 0, &mut sorted, top)?;
        let (kind, value_start) = {
            let v = top.len();
            (p.value(&mut st, 1, top)?, v)
        };
        st.members.push(Member { key: key.clone(), span: span_start..top.len() });
        let which = field(&st.keys[key.clone()]);
        kinds.push(TopMember { key, value: value_start..top.len(), kind, field: which });
        p.ws();
        match p.next()? {
            b',' => {}
            b'}' => break,
            _ => return None,
        }
    }
    p.ws();
    if p.i != bytes.len() {
        return None;
    }

    let keys = &*st.keys;
    let inner = |v: &Range<usize>| std::str::from_utf8(&top[v.start + 1..v.end - 1]).ok();
    // The reference's type checks (a wrong type is malformed), on the canonical text: it equals
    // the decoded text for ids without characters that need escaping; the others (never valid
    // device ids or signatures) are left to the reference, as is any failing check (its detail).
    let (mut device, mut mid, mut timestamp, mut signature, mut payload) =
        (None, None, None, None, false);
    for TopMember { value: v, kind, field, .. } in kinds.iter() {
        let ok = match (field, kind) {
            (Some(Field::DeviceId), Kind::Str) => {
                device = inner(v).filter(|d| valid_device_id(d));
                device.is_some()
            }
            (Some(Field::Timestamp), Kind::Int(t)) => {
                timestamp = Some(*t);
                true
            }
            (Some(Field::MessageId), Kind::Str) => {
                mid = inner(v).filter(|m| {
                    // A byte loop: ids are short, and `str::contains` sets up a searcher.
                    !m.bytes().any(|b| b == b'\\') && valid_message_id(m)
                });
                mid.is_some()
            }
            (Some(Field::Signature), Kind::Str) => {
                signature = crate::envelope::decode_hex::<32>(&top[v.start + 1..v.end - 1]);
                signature.is_some()
            }
            (Some(Field::DeviceId | Field::Timestamp | Field::MessageId | Field::Signature), _) => {
                false
            }
            (Some(Field::Payload), _) => {
                payload = true;
                true
            }
            _ => true,
        };
        if !ok {
            return None;
        }
    }
    // Then presence (required_fields), named as the reference names it.
    let present =
        [device.is_some(), timestamp.is_some(), mid.is_some(), payload, signature.is_some()];
    if let Some(at) = present.iter().position(|p| !p) {
        return Some(Err(crate::envelope::REQUIRED[at]));
    }
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else { return None };

    order.clear();
    order.extend(0..kinds.len());
    if !sorted {
        order.sort_by(|&a, &b| key_cmp(&keys[kinds[a].key.clone()], &keys[kinds[b].key.clone()]));
    }
    let mut buf = std::mem::take(spare);
    buf.clear();
    buf.reserve(top.len() + kinds.len());
    let (mut device_r, mut mid_r, mut payload_r) = (0..0, 0..0, 0..0);
    buf.push(b'{');
    for &m in order.iter() {
        let TopMember { value: v, field, .. } = &kinds[m];
        if *field == Some(Field::Signature) {
            continue;
        }
        if buf.len() > 1 {
            buf.push(b',');
        }
        let span = &st.members[m].span;
        let at = buf.len() + (v.start - span.start);
        buf.extend_from_slice(&top[span.clone()]);
        let r = at..at + v.len();
        match field {
            Some(Field::DeviceId) => device_r = r.start + 1..r.end - 1,
            Some(Field::MessageId) => mid_r = r.start + 1..r.end - 1,
            Some(Field::Payload) => payload_r = r,
            _ => {}
        }
    }
    buf.push(b'}');
    Some(Ok(Scanned {
        buf,
        device: device_r,
        message_id: mid_r,
        payload: payload_r,
        signature,
        timestamp,
    }))
}

/// The envelope as signers send it: the five members in canonical order and nothing else, no
/// whitespace around them, ids without escapes (the payload may be any JSON value). Each
/// member name is then a fixed run of bytes compared in one go, the signed bytes are written
/// straight to the envelope's buffer, and none of the general walk's bookkeeping is done
/// (names kept for the duplicate and order checks, the top level reassembled): about half of
/// the reader's instructions per message (`scripts/accept_cost.sh validate`: ~4,000 of ~8,250).
/// Anything else, None: [`scan`]'s general walk decides, so both always agree (`tests`, and
/// the `envelope` fuzz target against the reference).
fn exact(bytes: &[u8], s: &mut Scratch) -> Option<Scanned> {
    /// A string member's unescaped text at the start of `rest`, and what follows its quote.
    fn plain_string(rest: &[u8]) -> Option<(&[u8], &[u8])> {
        let n = find_stop(rest)?;
        (rest[n] == b'"').then(|| (&rest[..n], &rest[n + 1..]))
    }
    let rest = bytes.strip_prefix(b"{\"device_id\":\"")?;
    let (device, rest) = plain_string(rest)?;
    // The device id's syntax is ASCII, so its text is also its UTF-8 and needs no escape.
    if !valid_device_id(std::str::from_utf8(device).ok()?) {
        return None;
    }
    let rest = rest.strip_prefix(b",\"message_id\":\"")?;
    let (mid, rest) = plain_string(rest)?;
    // The whole input is UTF-8 (checked by the caller), so this slice of it is too.
    if !valid_message_id(std::str::from_utf8(mid).ok()?) {
        return None;
    }
    let rest = rest.strip_prefix(b",\"payload\":")?;

    let Scratch { keys, members, tmp, dec, spare, .. } = s;
    keys.clear();
    members.clear();
    let mut buf = std::mem::take(spare);
    buf.clear();
    buf.reserve(bytes.len());
    buf.extend_from_slice(b"{\"device_id\":\"");
    let device_at = buf.len()..buf.len() + device.len();
    buf.extend_from_slice(device);
    buf.extend_from_slice(b"\",\"message_id\":\"");
    let message_id = buf.len()..buf.len() + mid.len();
    buf.extend_from_slice(mid);
    buf.extend_from_slice(b"\",\"payload\":");
    let payload_start = buf.len();
    let mut p = Parser { b: bytes, i: bytes.len() - rest.len() };
    let mut st = State { keys, members, tmp, dec };
    let parsed = p.value(&mut st, 1, &mut buf);
    let payload = payload_start..buf.len();
    let tail = parsed.and_then(|_| {
        let rest = bytes[p.i..].strip_prefix(b",\"signature\":\"")?;
        let (sig, rest) = plain_string(rest)?;
        let signature = crate::envelope::decode_hex::<32>(sig)?;
        let rest = rest.strip_prefix(b",\"timestamp\":")?;
        p.i = bytes.len() - rest.len();
        buf.extend_from_slice(b",\"timestamp\":");
        let Kind::Int(timestamp) = p.number(&mut buf)? else { return None };
        (bytes.get(p.i..) == Some(b"}")).then_some((signature, timestamp))
    });
    let Some((signature, timestamp)) = tail else {
        *spare = buf;
        return None;
    };
    buf.push(b'}');
    Some(Scanned { buf, device: device_at, message_id, payload, signature, timestamp })
}

/// The envelope's own members.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Field {
    DeviceId,
    Timestamp,
    MessageId,
    Payload,
    Signature,
}

/// Which envelope member `name` is. Fixed-size arrays compare inline; slice patterns call
/// `memcmp` once per arm (three of the names have nine bytes), for every member of every
/// message.
fn field(name: &[u8]) -> Option<Field> {
    if let Ok(n) = <&[u8; 9]>::try_from(name) {
        return match n {
            b"device_id" => Some(Field::DeviceId),
            b"timestamp" => Some(Field::Timestamp),
            b"signature" => Some(Field::Signature),
            _ => None,
        };
    }
    match name {
        b"message_id" => Some(Field::MessageId),
        b"payload" => Some(Field::Payload),
        _ => None,
    }
}

/// RFC 8785 §3.2.3 member order: by UTF-16 code units. UTF-8 byte order is code point order,
/// which differs only between U+E000..U+FFFF and the supplementary planes, so ASCII names
/// (nearly all) compare as bytes.
fn key_cmp(a: &[u8], b: &[u8]) -> Ordering {
    if a.is_ascii() && b.is_ascii() {
        return a.cmp(b);
    }
    let (a, b) = (std::str::from_utf8(a), std::str::from_utf8(b));
    a.unwrap_or_default().encode_utf16().cmp(b.unwrap_or_default().encode_utf16())
}

/// Is this unsigned decimal (a JSON number with a fraction) already what RFC 8785 prints for its
/// value? True for `d.ddd` with no exponent, a last digit that is not 0, at most 15 significant
/// digits and a value of at least 1e-6 (ECMAScript switches to `1e-7` below): any decimal of
/// at most 15 significant digits is the shortest text that reads back as its double (IEEE
/// doubles carry 15 decimal digits exactly, so no other such decimal maps to the same double),
/// and ECMAScript prints it without exponent in that range. Such a value is never integral, so
/// the integer limit does not apply. Saves reading and printing the double (most telemetry).
fn already_canonical(number: &[u8]) -> bool {
    let Some(point) = number.iter().position(|c| *c == b'.') else { return false };
    let (int, frac) = (&number[..point], &number[point + 1..]);
    if frac.is_empty() || !frac.iter().all(u8::is_ascii_digit) || frac.last() == Some(&b'0') {
        return false;
    }
    let significant = if int == b"0" {
        let zeros = frac.iter().take_while(|c| **c == b'0').count();
        if zeros > 5 {
            return false;
        }
        frac.len() - zeros
    } else {
        int.len() + frac.len()
    };
    significant <= 15
}

/// Where the first `"`, `\\` or control character of `s` is: the end of a string's plain run.
fn find_stop(s: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // Eight bytes at a time, skipping words without any (the classic "has a zero byte" and
    // "has a byte below n" tests: no false negatives; a flagged word is searched bytewise).
    let mut i = 0;
    while let Some(w) = s.get(i..i + 8) {
        let x = u64::from_le_bytes(w.try_into().unwrap_or_default());
        let (q, b) = (x ^ (LO * u64::from(b'"')), x ^ (LO * u64::from(b'\\')));
        let hit = (q.wrapping_sub(LO) & !q)
            | (b.wrapping_sub(LO) & !b)
            | (x.wrapping_sub(LO * 0x20) & !x);
        if hit & HI != 0 {
            break;
        }
        i += 8;
    }
    s[i..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20).map(|n| i + n)
}

struct State<'s> {
    keys: &'s mut Vec<u8>,
    members: &'s mut Vec<Member>,
    tmp: &'s mut Vec<u8>,
    dec: &'s mut Vec<u8>,
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    /// JSON whitespace: exactly these four.
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    /// `"name":` of a member of the object whose members start at `base`: the decoded name
    /// goes to `keys` (None if the object already has it), `"name":` canonical to `out`.
    /// `sorted` says whether the object's members so far are in canonical order, and is kept
    /// up to date. Returns the name's range in `keys` and where the member starts in `out`.
    fn member_name(
        &mut self,
        st: &mut State<'_>,
        base: usize,
        sorted: &mut bool,
        out: &mut Vec<u8>,
    ) -> Option<(Range<usize>, usize)> {
        if self.next()? != b'"' {
            return None;
        }
        let span_start = out.len();
        let ks = st.keys.len();
        let raw = self.string_body(st.dec)?;
        let raw_escaped = raw.is_none();
        match raw {
            Some(r) => st.keys.extend_from_slice(&self.b[r]),
            None => st.keys.extend_from_slice(st.dec),
        }
        let key = ks..st.keys.len();
        if let Some(prev) = st.members[base..].last() {
            *sorted &= key_cmp(&st.keys[prev.key.clone()], &st.keys[key.clone()]).is_lt();
        }
        // In canonical order (what signers send) each name is greater than all before it, so
        // equal to none: only out of order must a name be compared with every earlier one.
        if !*sorted
            && st.members[base..].iter().any(|m| st.keys[m.key.clone()] == st.keys[key.clone()])
        {
            return None;
        }
        // Without escapes the name holds no character canonical form escapes.
        out.push(b'"');
        out.extend_from_slice(&st.keys[key.clone()]);
        out.push(b'"');
        if raw_escaped {
            out.truncate(span_start);
            json::write_string_bytes(&st.keys[key.clone()], out);
        }
        self.ws();
        if self.next()? != b':' {
            return None;
        }
        out.push(b':');
        Some((key, span_start))
    }

    /// A string's body after its opening quote, up to and past the closing one. Returns the raw
    /// range when it has no escapes (then it is already its decoded UTF-8), else None with the
    /// decoded text in `dec`. Outer None: not a valid string.
    fn string_body(&mut self, dec: &mut Vec<u8>) -> Option<Option<Range<usize>>> {
        let start = self.i;
        let rest = &self.b[start..];
        let n = find_stop(rest)?;
        self.i += n;
        match rest[n] {
            b'"' => {
                self.i += 1;
                return Some(Some(start..start + n));
            }
            b'\\' => {}
            _ => return None,
        }
        dec.clear();
        dec.extend_from_slice(&self.b[start..self.i]);
        let mut run = self.i;
        loop {
            match *self.b.get(self.i)? {
                b'"' => {
                    dec.extend_from_slice(&self.b[run..self.i]);
                    self.i += 1;
                    return Some(None);
                }
                b'\\' => {
                    dec.extend_from_slice(&self.b[run..self.i]);
                    let c = *self.b.get(self.i + 1)?;
                    self.i += 2;
                    match c {
                        b'"' | b'\\' | b'/' => dec.push(c),
                        b'b' => dec.push(0x08),
                        b'f' => dec.push(0x0c),
                        b'n' => dec.push(b'\n'),
                        b'r' => dec.push(b'\r'),
                        b't' => dec.push(b'\t'),
                        b'u' => {
                            let hex = self.b.get(self.i..self.i + 4)?;
                            let mut v = 0u32;
                            for &h in hex {
                                v = v << 4 | (h as char).to_digit(16)?;
                            }
                            self.i += 4;
                            // Surrogates (pairs and the lone ones the reference refuses) are
                            // left to it.
                            let ch = char::from_u32(v)?;
                            let mut utf8 = [0u8; 4];
                            dec.extend_from_slice(ch.encode_utf8(&mut utf8).as_bytes());
                        }
                        _ => return None,
                    }
                    run = self.i;
                }
                0x00..=0x1f => return None,
                _ => self.i += 1,
            }
        }
    }

    /// One value at nesting `depth` (of its container), canonical to `out`.
    fn value(&mut self, st: &mut State<'_>, depth: usize, out: &mut Vec<u8>) -> Option<Kind> {
        self.ws();
        match self.peek()? {
            b'{' => {
                self.i += 1;
                self.object(st, depth + 1, out)?;
                Some(Kind::Other)
            }
            b'[' => {
                self.i += 1;
                self.array(st, depth + 1, out)?;
                Some(Kind::Other)
            }
            b'"' => {
                self.i += 1;
                match self.string_body(st.dec)? {
                    Some(r) => {
                        // No escapes: no character that canonical form escapes either.
                        out.push(b'"');
                        out.extend_from_slice(&self.b[r]);
                        out.push(b'"');
                    }
                    None => json::write_string_bytes(st.dec, out),
                }
                Some(Kind::Str)
            }
            b'-' | b'0'..=b'9' => self.number(out),
            b't' => self.literal(b"true", out),
            b'f' => self.literal(b"false", out),
            b'n' => self.literal(b"null", out),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8], out: &mut Vec<u8>) -> Option<Kind> {
        if !self.b[self.i..].starts_with(word) {
            return None;
        }
        self.i += word.len();
        out.extend_from_slice(word);
        Some(Kind::Other)
    }

    fn array(&mut self, st: &mut State<'_>, depth: usize, out: &mut Vec<u8>) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        out.push(b'[');
        self.ws();
        if self.peek()? == b']' {
            self.i += 1;
            out.push(b']');
            return Some(());
        }
        loop {
            self.value(st, depth, out)?;
            self.ws();
            match self.next()? {
                b',' => out.push(b','),
                b']' => break,
                _ => return None,
            }
        }
        out.push(b']');
        Some(())
    }

    fn object(&mut self, st: &mut State<'_>, depth: usize, out: &mut Vec<u8>) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        out.push(b'{');
        let body = out.len();
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            out.push(b'}');
            return Some(());
        }
        let (base, keys_base) = (st.members.len(), st.keys.len());
        let mut sorted = true;
        loop {
            self.ws();
            let (key, start) = self.member_name(st, base, &mut sorted, out)?;
            self.value(st, depth, out)?;
            st.members.push(Member { key, span: start..out.len() });
            self.ws();
            match self.next()? {
                b',' => out.push(b','),
                b'}' => break,
                _ => return None,
            }
        }
        if !sorted {
            // Rewrite the body in canonical member order.
            st.tmp.clear();
            st.tmp.extend_from_slice(&out[body..]);
            out.truncate(body);
            let ms = &mut st.members[base..];
            let keys = &*st.keys;
            ms.sort_by(|a, b| key_cmp(&keys[a.key.clone()], &keys[b.key.clone()]));
            for (n, m) in ms.iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&st.tmp[m.span.start - body..m.span.end - body]);
            }
        }
        out.push(b'}');
        st.members.truncate(base);
        st.keys.truncate(keys_base);
        Some(())
    }

    /// A number token, checked as `json::check_number` and the reference's reading do, written
    /// as `json::write_number` writes it.
    fn number(&mut self, out: &mut Vec<u8>) -> Option<Kind> {
        let start = self.i;
        let neg = self.peek() == Some(b'-');
        if neg {
            self.i += 1;
        }
        let int_start = self.i;
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let int_end = self.i;
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.i += 1;
            float = true;
            self.digits1()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            float = true;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digits1()?;
        }
        let token = &self.b[start..self.i];
        if !float {
            let digits = &self.b[int_start..int_end];
            // 2^53 - 1 has 16 digits.
            if digits.len() > 16 {
                return None;
            }
            let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if n > MAX_SAFE_INTEGER {
                return None;
            }
            if neg && n == 0 {
                // `-0` is read as the double -0.0: canonical `0`, and not an integer.
                out.push(b'0');
                return Some(Kind::Other);
            }
            out.extend_from_slice(token);
            return Some(Kind::Int(if neg { -(n as i64) } else { n as i64 }));
        }
        if already_canonical(&self.b[int_start..self.i]) {
            out.extend_from_slice(token);
            return Some(Kind::Other);
        }
        // Long spellings are left to the reference.
        if token.len() > 32 {
            return None;
        }
        let f: f64 = std::str::from_utf8(token).ok()?.parse().ok()?;
        if f.is_infinite()
            || (f.trunc() == f && f.abs() > MAX_SAFE_INTEGER as f64 && f.abs() < 1e21)
        {
            return None;
        }
        json::write_es_number(f, out);
        Some(Kind::Other)
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn digits1(&mut self) -> Option<()> {
        if !self.peek()?.is_ascii_digit() {
            return None;
        }
        self.digits();
        Some(())
    }
}

#[cfg(test)]
mod tests {
    //! Differential test: the envelope the broker thread reads (single pass, reference on
    //! anything else) against the reference parser alone, on the spec vectors, the fuzz corpus
    //! and generated and mutated envelopes: the same rejection (reason and detail) or the same
    //! signed bytes, payload, ids, timestamp and signature.

    use super::*;
    use crate::envelope::{hex, hmac, Envelope, Reference};
    use std::path::Path;

    /// Which path answered, for the coverage figures.
    #[derive(Default, Debug, Clone, Copy)]
    struct Tally {
        fast: usize,
        /// Of `fast`, read by [`exact`].
        exact: usize,
        reference_ok: usize,
        rejected: usize,
        /// Rejected as missing a member by the single pass itself.
        missing: usize,
    }

    fn check(bytes: &[u8], scratch: &mut Scratch, tally: &mut Tally) {
        // Buffers are handed back as on the broker thread, so every comparison below also runs
        // in memory a previous envelope left behind.
        let exact_shape = std::str::from_utf8(bytes).is_ok()
            && exact(bytes, scratch).map(|s| scratch.recycle(s.buf)).is_some();
        tally.exact += usize::from(exact_shape);
        let scanned = scan(bytes, scratch).map(|r| r.map(|s| scratch.recycle(s.buf)).is_ok());
        let fast = scanned == Some(true);
        assert!(fast || !exact_shape, "the exact shape was read but the scan refused it");
        tally.missing += usize::from(scanned == Some(false));
        let ours = Envelope::parse_with(bytes, usize::MAX, scratch);
        let reference = if bytes.is_empty() {
            Err(crate::envelope::Rejection::new(
                crate::envelope::Reason::Malformed,
                "empty payload",
            ))
        } else {
            Reference::parse(bytes)
        };
        let text = String::from_utf8_lossy(bytes);
        match (&ours, &reference) {
            (Ok(e), Ok(r)) => {
                assert_eq!(e.signed_bytes(), &r.canonical()[..], "{text}");
                assert_eq!(e.payload_bytes(), &r.canonical_payload()[..], "{text}");
                assert_eq!(e.device_id(), r.str_member("device_id"), "{text}");
                assert_eq!(e.message_id(), r.str_member("message_id"), "{text}");
                assert_eq!(e.timestamp, r.timestamp, "{text}");
                assert_eq!(e.signature, r.signature, "{text}");
                if fast {
                    tally.fast += 1;
                } else {
                    tally.reference_ok += 1;
                }
            }
            (Err(a), Err(b)) => {
                assert!(!fast, "the single pass accepted what the reference refuses: {text}");
                assert_eq!(a, b, "{text}");
                tally.rejected += 1;
            }
            _ => panic!("{text}: ours {ours:?} vs reference {reference:?}"),
        }
        if let Ok(e) = ours {
            e.recycle(scratch);
        }
    }

    #[test]
    fn a_recycled_envelope_buffer_is_reused_for_the_next_one() {
        let all = vectors();
        let mut s = Scratch::default();
        let valid: Vec<&Vec<u8>> =
            all.iter().filter(|v| Envelope::parse(v, usize::MAX).is_ok()).collect();
        // The larger first: the next fits in its buffer.
        let (big, small) = if valid[0].len() >= valid[1].len() {
            (valid[0], valid[1])
        } else {
            (valid[1], valid[0])
        };
        let a = Envelope::parse_with(big, usize::MAX, &mut s).unwrap();
        let at = a.signed_bytes().as_ptr();
        a.recycle(&mut s);
        let b = Envelope::parse_with(small, usize::MAX, &mut s).unwrap();
        assert_eq!(b.signed_bytes().as_ptr(), at, "built in the recycled buffer");
        assert_eq!(b.signed_bytes(), Envelope::parse(small, usize::MAX).unwrap().signed_bytes());
        // The control: without recycling, a new buffer.
        let c = Envelope::parse_with(big, usize::MAX, &mut s).unwrap();
        assert_ne!(c.signed_bytes().as_ptr(), b.signed_bytes().as_ptr());
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
            xs[self.below(xs.len())]
        }
        /// Mostly from `good`, one time in `one_in` from `bad`.
        fn mostly<'a>(&mut self, good: &[&'a str], bad: &[&'a str], one_in: usize) -> &'a str {
            if self.below(one_in) == 0 {
                self.pick(bad)
            } else {
                self.pick(good)
            }
        }
    }

    /// Numbers the reference reads (every spelling the single pass must write identically).
    const NUMBERS: &[&str] = &[
        "0",
        "-0",
        "1",
        "-1",
        "22.5",
        "-0.5",
        "100.0",
        "1e21",
        "1E-7",
        "0.000001",
        "-0.0",
        "1.5e300",
        "1.5e+300",
        "9007199254740991",
        "-9007199254740991",
        "1e-400",
        "2e53",
        "123456789012.0",
        "900719925474099.25",
        "184467407370551.625",
        "0.1",
        "5e-324",
        "1.7976931348623157e308",
        "0.30000000000000004",
        "123456789012345678901234.0",
        "4.35",
        "1013.25",
        "48.25",
        "12345678901234567890.123456789012345678901234567890",
        "0e99999999999",
        "1e-7",
        "-1.5E-10",
        "3.0e0",
        "1e+2",
        "0.5e1",
        "7e22",
        "-9.87654321e-5",
    ];
    /// Numbers it refuses.
    const BAD_NUMBERS: &[&str] = &[
        "9007199254740992",
        "-9007199254740992",
        "18446744073709551616",
        "1e400",
        "-1e400",
        "1e20",
        "2e308",
        "1.0E+999",
        "01",
        "1.",
        ".5",
        "+1",
        "-",
        "1e",
        "1e+",
        "1_0",
        "0x1",
    ];
    const STRINGS: &[&str] = &[
        r#""""#,
        r#""a""#,
        r#""sensor_001""#,
        r#""a\"b\\c\/d""#,
        r#""\u0001\u001f\b\f\n\r\t""#,
        r#""\u00e9\u2028""#,
        r#""\ud83d\ude00""#,
        "\"\u{e000}\"",
        "\"\u{1f600}\"",
        "\"caf\u{e9}\"",
        r#""\u0041""#,
        r#""\uD83D\uDE00""#,
        "\"\u{7f}\"",
        r#""\u0000""#,
    ];
    const BAD_STRINGS: &[&str] =
        &[r#""\ud800""#, r#""\udc00x""#, "\"tab\there\"", r#""\x""#, r#""\u12""#, "\"\u{1}\""];
    const NAMES: &[&str] = &[
        "a",
        "b",
        "z",
        "A",
        "temperature",
        "humidity",
        "seq",
        "",
        "\u{e000}",
        "\u{1f600}",
        "é",
        "a b",
        "k\\\"q",
        "\\u0061",
        "device_id",
        "payload",
        "\\ud83d\\ude00",
    ];

    /// A random decimal around the 15-significant-digit and 1e-6 edges of `already_canonical`.
    fn decimal(r: &mut Rng) -> String {
        let digits = |r: &mut Rng, n: usize| -> String {
            (0..n).map(|_| char::from(b'0' + r.below(10) as u8)).collect()
        };
        let sign = if r.below(4) == 0 { "-" } else { "" };
        let int = match r.below(3) {
            0 => "0".to_string(),
            _ => {
                let (lead, n) = (1 + r.below(9), r.below(17));
                format!("{lead}{}", digits(r, n))
            }
        };
        let (zeros, n) = (r.below(8), 1 + r.below(17));
        let frac = format!("{}{}", "0".repeat(zeros), digits(r, n));
        let exp =
            if r.below(6) == 0 { format!("e{}", r.below(30) as i32 - 15) } else { String::new() };
        format!("{sign}{int}.{frac}{exp}")
    }

    #[test]
    fn decimals_already_canonical_are_what_the_reference_prints() {
        let mut r = Rng(7);
        let mut copied = 0;
        for _ in 0..200_000 {
            let d = decimal(&mut r);
            let unsigned = d.strip_prefix('-').unwrap_or(&d);
            if !already_canonical(unsigned.as_bytes()) {
                continue;
            }
            copied += 1;
            let v = crate::json::parse_strict(d.as_bytes()).unwrap();
            let mut want = Vec::new();
            crate::json::write_canonical(&v, &mut want);
            assert_eq!(String::from_utf8(want).unwrap(), d);
        }
        assert!(copied > 20_000, "{copied}");
        for (d, ok) in [
            ("21.5", true),
            ("0.000001", true),
            ("0.0000001", false),
            ("123456789012.345", true),
            ("1234567890123.456", false),
            ("0.123456789012345", true),
            ("0.1234567890123456", false),
            ("100.0", false),
            ("1.50", false),
            ("1e5", false),
            ("1.5e5", false),
            ("15", false),
        ] {
            assert_eq!(already_canonical(d.as_bytes()), ok, "{d}");
        }
    }

    fn value(r: &mut Rng, depth: usize, out: &mut String) {
        let ws = |r: &mut Rng| [" ", "", "", "\n", "\t", "\r\n "][r.below(6)];
        match r.below(if depth > 3 { 4 } else { 7 }) {
            0 if r.below(2) == 0 => out.push_str(&decimal(r)),
            0 => out.push_str(r.mostly(NUMBERS, BAD_NUMBERS, 60)),
            1 => out.push_str(r.mostly(STRINGS, BAD_STRINGS, 60)),
            2 => out.push_str(r.mostly(&["true", "false", "null"], &["nul", "truex", "True"], 60)),
            3 => out.push_str(r.pick(&["[]", "{}", "[ ]", "{ }"])),
            4 | 5 => {
                out.push('{');
                let n = r.below(5);
                for i in 0..n {
                    if i > 0 {
                        out.push(',');
                    }
                    let w = ws(r);
                    out.push_str(w);
                    // Occasionally the same name twice in one object.
                    let name = if r.below(30) == 0 { "a" } else { r.pick(NAMES) };
                    out.push_str(&format!("\"{name}\":"));
                    out.push_str(ws(r));
                    value(r, depth + 1, out);
                }
                out.push('}');
            }
            _ => {
                out.push('[');
                for i in 0..r.below(4) {
                    if i > 0 {
                        out.push(',');
                    }
                    value(r, depth + 1, out);
                }
                out.push(']');
            }
        }
    }

    /// A (mostly) well-formed envelope: random payload, member order, spellings and whitespace,
    /// signed over the reference's canonical form when it has one (so valid ones verify).
    fn envelope(r: &mut Rng) -> Vec<u8> {
        let mut payload = String::new();
        value(r, 1, &mut payload);
        let device = r.mostly(
            &["\"sensor_001\"", "\"a.b-C_9\"", "\"sensor\\u005f001\""],
            &["\"a/b\"", "\".\"", "\"\"", "1", "\"s\u{e9}\"", "\"a\\u0000\""],
            12,
        );
        let ts = r.mostly(
            &["1704067200", "-5", "0", "9007199254740991"],
            &["-0", "1.0", "1e3", "\"1\"", "9007199254740992", "null"],
            12,
        );
        let mid = r.mostly(
            &[
                "\"550e8400-e29b-41d4-a716-446655440000\"",
                "\"m\"",
                "\"m\\n1\"",
                "\"\\u00e9t\u{e9}\"",
                "\"\\ud83d\\ude00\"",
                "\"\u{1f600}\"",
            ],
            &["\"\"", "7", "[]"],
            12,
        );
        let mut members = vec![
            ("device_id", device.to_string()),
            ("timestamp", ts.to_string()),
            ("message_id", mid.to_string()),
            ("payload", payload),
        ];
        if r.below(8) == 0 {
            members.push((r.pick(&["extra", "zz", "\u{e000}", "a"]), r.pick(STRINGS).to_string()));
        }
        if r.below(20) == 0 {
            members.remove(r.below(members.len()));
        }
        if r.below(30) == 0 {
            members.push(("device_id", "\"sensor_001\"".to_string()));
        }
        let unsigned: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        let text = format!("{{{}}}", unsigned.join(","));
        let sig = match Reference::parse(
            format!("{},\"signature\":\"{}\"}}", &text[..text.len() - 1], "0".repeat(64))
                .as_bytes(),
        ) {
            Ok(reference) => hex(&hmac(b"k", &reference.canonical())),
            Err(_) => "0".repeat(64),
        };
        let sig = match r.below(12) {
            0 => sig.to_uppercase(),
            1 => sig[..62].to_string(),
            2 => format!("{}zz", &sig[..62]),
            _ => sig,
        };
        let sig_member = if r.below(25) == 0 {
            "\"signature\":5".to_string()
        } else {
            format!("\"signature\":\"{sig}\"")
        };
        let mut all: Vec<String> = unsigned;
        if r.below(25) != 0 {
            all.insert(r.below(all.len() + 1), sig_member);
        }
        // Shuffle the wire order, or (half of them) keep the canonical order signers send
        // without whitespace, the shape the exact path takes, so that mutations hit it too.
        let canonical = r.below(2) == 0;
        if canonical {
            all.sort_by_key(|m| {
                m.split('"').nth(1).unwrap_or("").encode_utf16().collect::<Vec<_>>()
            });
        } else {
            for i in (1..all.len()).rev() {
                all.swap(i, r.below(i + 1));
            }
        }
        let sep = if canonical { "," } else { r.pick(&[",", ", ", " ,\n"]) };
        let lead = r.mostly(&["", " ", "\n"], &["\u{feff}", "x"], 30);
        let trail = r.mostly(&["", " ", "\n\t"], &[" x", "{}", ","], 30);
        let (lead, trail) = if canonical { ("", "") } else { (lead, trail) };
        format!("{lead}{{{}}}{trail}", all.join(sep)).into_bytes()
    }

    /// Small edits of a valid envelope: flipped, dropped, duplicated and inserted bytes.
    fn mutate(r: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
        const SPECIAL: &[u8] = b"{}[]\",:\\-+.eE0123456789 \n\tu\x00\x1f\x7f\xc3\xa9\xff";
        for _ in 0..1 + r.below(3) {
            if b.is_empty() {
                break;
            }
            let at = r.below(b.len());
            match r.below(5) {
                0 => b[at] ^= 1 << r.below(8),
                1 => {
                    b.remove(at);
                }
                2 => b.insert(at, SPECIAL[r.below(SPECIAL.len())]),
                3 => b[at] = SPECIAL[r.below(SPECIAL.len())],
                _ => b.truncate(at),
            }
        }
        b
    }

    fn vectors() -> Vec<Vec<u8>> {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vectors.json"),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        ["valid", "invalid"]
            .iter()
            .flat_map(|k| v[k].as_array().unwrap().clone())
            .map(|x| x["envelope"].as_str().unwrap().as_bytes().to_vec())
            .collect()
    }

    #[test]
    fn every_vector_reads_the_same_and_valid_ones_take_the_single_pass() {
        let mut s = Scratch::default();
        let mut t = Tally::default();
        let all = vectors();
        for v in &all {
            check(v, &mut s, &mut t);
        }
        // 7 valid vectors, each read by the single pass; 9 invalid ones rejected (the
        // wrong_secret and tampered ones parse: they fail later, at the HMAC).
        assert_eq!(t.fast + t.reference_ok + t.rejected, all.len());
        assert_eq!(t.reference_ok, 0, "{t:?}");
        assert!(t.fast >= 7, "{t:?}");
    }

    #[test]
    fn fuzz_corpus_reads_the_same() {
        let mut s = Scratch::default();
        let mut t = Tally::default();
        for dir in ["envelope", "canonical"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(dir);
            for f in std::fs::read_dir(&dir).unwrap() {
                check(&std::fs::read(f.unwrap().path()).unwrap(), &mut s, &mut t);
            }
        }
        assert!(t.fast + t.reference_ok + t.rejected > 800, "{t:?}");
    }

    #[test]
    fn generated_and_mutated_envelopes_read_the_same() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let mut s = Scratch::default();
        let mut t = Tally::default();
        let mut valid = Vec::new();
        for _ in 0..6000 {
            let e = envelope(&mut r);
            check(&e, &mut s, &mut t);
            if Reference::parse(&e).is_ok() {
                valid.push(e);
            }
        }
        for i in 0..6000 {
            let e = mutate(&mut r, valid[i % valid.len()].clone());
            check(&e, &mut s, &mut t);
        }
        eprintln!("generated and mutated: {t:?}");
        // Every path and the rejections are exercised, not just one of them.
        assert!(t.fast > 1000 && t.reference_ok > 100 && t.rejected > 3000, "{t:?}");
        assert!(t.exact > 400 && t.fast - t.exact > 500, "{t:?}");
        assert!(t.missing > 100, "{t:?}");
    }

    #[test]
    fn field_names_only_the_five_members_exactly() {
        for (name, f) in [
            ("device_id", Field::DeviceId),
            ("timestamp", Field::Timestamp),
            ("message_id", Field::MessageId),
            ("payload", Field::Payload),
            ("signature", Field::Signature),
        ] {
            assert_eq!(field(name.as_bytes()), Some(f));
            // Same length, one byte off; a prefix; an extension.
            let mut off = name.as_bytes().to_vec();
            off[4] ^= 0x20;
            assert_eq!(field(&off), None);
            assert_eq!(field(&name.as_bytes()[..name.len() - 1]), None);
            assert_eq!(field(format!("{name}_").as_bytes()), None);
        }
        assert_eq!(field(b""), None);
    }

    #[test]
    fn find_stop_finds_the_first_quote_backslash_or_control_anywhere() {
        for len in 0..40 {
            for at in 0..len {
                for stop in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                    // Bytes just around the stop values, and non-ASCII, elsewhere.
                    let mut s: Vec<u8> = (0..len)
                        .map(|i| [b'a', 0x20, b'#', b']', 0x7f, 0xc3, 0xff][i % 7])
                        .collect();
                    s[at] = stop;
                    assert_eq!(find_stop(&s), Some(at), "{s:?}");
                }
            }
            let clean: Vec<u8> =
                (0..len).map(|i| [b'a', 0x20, b'#', 0x21, 0x5d, 0x80][i % 6]).collect();
            assert_eq!(find_stop(&clean), None);
        }
    }

    #[test]
    fn the_exact_shape_and_its_near_misses_read_the_same() {
        let mut s = Scratch::default();
        let mut t = Tally::default();
        let sig = "00000000000000000000000000000000000000000000000000000000000000ff";
        let good = format!(
            r#"{{"device_id":"d-1","message_id":"m","payload":{{"b":1,"a":[2.50,"x"]}},"signature":"{sig}","timestamp":1}}"#
        );
        check(good.as_bytes(), &mut s, &mut t);
        assert_eq!((t.exact, t.rejected), (1, 0), "positive control: {t:?}");
        let payload = r#""payload":{"b":1,"a":[2.50,"x"]}"#;
        let near = [
            format!("{good} "),
            format!("{good}}}"),
            format!("{good}x"),
            format!(" {good}"),
            good.replacen(r#""timestamp":1"#, r#""timestamp":1.0"#, 1),
            good.replacen(r#""timestamp":1"#, r#""timestamp":-0"#, 1),
            good.replacen(r#""timestamp":1"#, r#""timestamp":01"#, 1),
            good.replacen(r#""timestamp":1"#, r#""timestamp":9007199254740992"#, 1),
            good.replacen(r#""timestamp":1"#, r#""timestamp":"1""#, 1),
            good.replacen(r#""device_id":"d-1""#, r#""device_id":"d/1""#, 1),
            good.replacen(r#""device_id":"d-1""#, r#""device_id":"..""#, 1),
            good.replacen(r#""device_id":"d-1""#, r#""device_id":"d\u002d1""#, 1),
            good.replacen(r#""message_id":"m""#, r#""message_id":"""#, 1),
            good.replacen(r#""message_id":"m""#, r#""message_id":"m\n""#, 1),
            good.replacen(
                r#""message_id":"m""#,
                &format!(r#""message_id":"{}""#, "é".repeat(129)),
                1,
            ),
            good.replacen(
                r#""message_id":"m""#,
                &format!(r#""message_id":"{}""#, "é".repeat(128)),
                1,
            ),
            good.replacen(sig, &sig[..62], 1),
            good.replacen(sig, &sig.to_uppercase().replace('0', "A"), 1),
            good.replacen(&format!(r#""signature":"{sig}""#), r#""signature":5"#, 1),
            good.replacen(r#","timestamp":1"#, r#","timestamp":1,"zz":0"#, 1),
            good.replacen(r#""payload":"#, r#""payload": "#, 1),
            good.replacen(payload, r#""payload":{"b":1,"b":2}"#, 1),
            good.replacen(payload, r#""payload":{"b":1,"a":[2.50,"x"] }"#, 1),
            good.replacen(payload, r#""payload":[1e400]"#, 1),
            good.replacen(payload, r#""payload":"\ud800""#, 1),
        ];
        for n in &near {
            check(n.as_bytes(), &mut s, &mut t);
        }
        // Whitespace before or in the payload, an upper-case signature and a long id of few
        // characters are still the exact shape; the rest are refused or read by the general walk.
        assert_eq!(t.exact, 5, "{t:?}");
        assert!(t.rejected >= 15, "{t:?}");
    }

    #[test]
    fn deep_nesting_and_key_order_edges_read_the_same() {
        let mut s = Scratch::default();
        let mut t = Tally::default();
        let head = r#"{"device_id":"d","timestamp":1,"message_id":"m","signature":"00000000000000000000000000000000000000000000000000000000000000ff","payload":"#;
        for depth in [62, 63, 64, 65, 200] {
            for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
                let p = format!("{}1{}", open.repeat(depth), close.repeat(depth));
                check(format!("{head}{p}}}").as_bytes(), &mut s, &mut t);
            }
        }
        for p in [
            "{\"\u{e000}\":1,\"\u{1f600}\":2,\"a\":3}",
            "{\"b\":{\"d\":1,\"c\":2},\"a\":[{\"z\":1,\"y\":{\"x\":1,\"w\":2}}]}",
            "{\"a\":1,\"\\u0061\":2}",
            "{\"k\\\"\":1,\"k\":2,\"k!\":3}",
        ] {
            check(format!("{head}{p}}}").as_bytes(), &mut s, &mut t);
        }
        assert!(t.fast >= 5 && t.rejected >= 3, "{t:?}");

        // Duplicates are compared for only once members are out of order: a name repeated in
        // order, or after the order broke (`b` repeated after `a`), is still refused, at the
        // top level and nested.
        let sig =
            "\"signature\":\"00000000000000000000000000000000000000000000000000000000000000ff\"";
        let base = r#""device_id":"d","message_id":"m","payload":"#;
        for (p, dup) in [
            (r#"{"a":1,"b":2,"c":3}"#, false),
            (r#"{"b":1,"a":2,"c":3}"#, false),
            (r#"{"a":1,"a":2}"#, true),
            (r#"{"a":1,"b":2,"b":3}"#, true),
            (r#"{"b":1,"a":2,"b":3}"#, true),
            (r#"{"b":1,"a":2,"c":3,"b":4}"#, true),
            (r#"{"x":{"b":1,"a":2,"b":3}}"#, true),
        ] {
            for extra in ["", r#","timestamp":2"#, r#","device_id":"e""#] {
                let top = format!("{{{base}{p},{sig},\"timestamp\":1{extra}}}");
                let before = t;
                check(top.as_bytes(), &mut s, &mut t);
                let refused = t.rejected > before.rejected;
                assert_eq!(refused, dup || !extra.is_empty(), "{top}");
                if !refused {
                    assert_eq!(t.fast, before.fast + 1, "{top} took the reference");
                }
            }
        }
    }
}
