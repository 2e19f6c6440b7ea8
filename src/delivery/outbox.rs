//! The plugin's durable state: the outbox of accepted messages and the ids the replay check must
//! remember across restarts, as a segmented append-only log written only by the broker thread;
//! dead letters as JSON lines beside it.
//!
//! Why a log and not SQLite: the append is on the per-message path of the broker thread. A SQLite
//! WAL commit per message measured 24 µs (two tables) and ~6 µs (one table) on this machine, and
//! under sustained load its WAL never resets, so it grows without bound. A record here is a copy
//! into a shared mapping of the current segment (no system call; [`super::mapped`]), or one
//! `write()` where the file system cannot be trusted with mapped writes (about 1–2 µs, and ~4 µs
//! of broker thread per message in `make bench`; BENCHMARKS.md), and disk space is reclaimed by
//! deleting whole segments.
//!
//! Layout of the directory (`plugin_opt_spool_path`):
//! - `seg-<first id, 16 digits>.log`: a 32-byte header (magic, first id, the store's key, CRC),
//!   then records `[u32 len][u32 crc32(key ‖ body)][body]`, body = `ACCEPT` (id, expiry, device,
//!   message id, payload) or `SETTLE` (ids now delivered or dead-lettered);
//! - `outbox.key`: a copy of the random key every segment header holds (either copy suffices);
//! - `dead_letters.jsonl`: one JSON object per final failure (status, backend body, payload).
//!
//! Durability: a record is written (not fsynced) before the callback returns, i.e. before the
//! broker acknowledges the publish, so it survives `kill -9` and crashes of the broker (the data
//! is in the kernel's page cache, whether copied through the mapping or written). The syncer
//! thread `fdatasync`s every [`SYNC_INTERVAL`] (which writes back mapped pages too), so a power
//! loss can lose about the last second. A mapped segment grows a window at a time: its zero-filled
//! tail is space not yet written, skipped by recovery (no record starts with a zero byte) and
//! trimmed at a clean stop; a damaged region that ends in zeros is reported up to its last
//! non-zero byte.
//!
//! Recovery: a damaged record (flipped bits, a zeroed page, a torn write) loses that record only.
//! The scan resynchronises on the next offset where a whole record validates (exact shape and
//! keyed checksum), so every valid record after the damage, and its replay id, is kept; each
//! damaged region is reported as a [`RecoveryWarning`]. The checksum is keyed so that bytes a
//! device chose (a message id may hold any bytes) cannot pass for a record during that scan. New
//! records never follow garbage: a damaged tail of the newest segment is cut, and a newest
//! segment damaged in the middle is closed and a new one started. Segments of the earlier format
//! (no header, plain CRC-32) are still read, so an upgrade loses nothing, and never appended to;
//! the forged-record protection does not extend to them.
//!
//! Space: a segment is deleted once every message in it is settled and every id in it has left
//! its replay window, oldest first. A message still pending keeps its segment (and the newer ones)
//! on disk; `spool_max_bytes` counts the bytes of pending messages.

use super::mapped;
use crate::background::Background;
use crate::replay::{self, IdDigest};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// A new segment is started past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Bytes counted against `spool_max_bytes` besides the payload, per queued message.
const ROW_OVERHEAD: u64 = 64;
/// Largest record accepted when reading back (guards against a corrupt length).
const MAX_RECORD: u32 = 64 << 20;

/// Ids are issued from 1 upwards, one per message: none gets near this in practice (2^62 at a
/// million a second is 146,000 years), so a larger one read back is damage that passed the
/// checksum (or a crafted file). Not taking it keeps `next_id + 1` from overflowing (found by
/// fuzzing) and ids positive as `i64`; `append` never issues one.
const MAX_ID: u64 = 1 << 62;

const ACCEPT: u8 = 1;
const SETTLE: u8 = 2;
const DELIVERED: u8 = 1;
const DEAD: u8 = 2;
/// Not forwarded: another node of the cluster claimed the id first.
const CLAIMED_ELSEWHERE: u8 = 3;

/// A queued message as the forwarder needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub id: i64,
    pub device_id: String,
    pub message_id: String,
    pub payload: Vec<u8>,
}

fn spool_cost(device: &str, message_id: &str, payload_len: usize) -> u64 {
    (device.len() + message_id.len() + payload_len) as u64 + ROW_OVERHEAD
}

/// The backend's final answer to one message (produced by a worker, settled here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub message: QueuedMessage,
    pub status: u16,
    /// At most the first 64 KiB of the backend's body.
    pub body: Vec<u8>,
    /// The backend's body was longer than what is kept.
    pub body_truncated: bool,
    /// true: 2xx. false: a final 3xx or 4xx, to be dead-lettered.
    pub delivered: bool,
    pub attempts: u32,
    /// When the backend's answer arrived (to measure the response path).
    pub answered_at: std::time::Instant,
    /// Not sent: another node of the cluster claimed this id first (`status` is 0, `delivered`
    /// false, and it is not a dead letter).
    pub claimed_elsewhere: Option<crate::cluster::ClaimedElsewhere>,
}

impl Done {
    /// A final answer the backend gave (2xx delivered, anything else dead-lettered).
    pub fn dead_lettered(&self) -> bool {
        !self.delivered && self.claimed_elsewhere.is_none()
    }
}

/// Why an accepted message could not be stored.
#[derive(Debug)]
pub enum AppendError {
    /// The outbox is at `spool_max_bytes`.
    Full {
        queued_bytes: u64,
        max: u64,
    },
    Io(io::Error),
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendError::Full { queued_bytes, max } => {
                write!(f, "outbox full ({queued_bytes} of {max} bytes queued)")
            }
            AppendError::Io(e) => write!(f, "outbox write failed: {e}"),
        }
    }
}

/// Where a pending message's record is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    cost: u64,
    /// Unix time it was appended (for a message recovered at start: the start), for the
    /// oldest-pending-age metric.
    at: i64,
}

#[derive(Debug, Default, Clone)]
struct SegMeta {
    pending: u64,
    max_expiry: i64,
    bytes: u64,
}

/// One decoded ACCEPT record.
struct Accept {
    id: u64,
    expires_at: i64,
    forwarded: bool,
    device: String,
    message_id: String,
    payload: Vec<u8>,
}

/// What a damaged region of the outbox looked like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DamageKind {
    /// The segment's header is missing, short or does not check out (e.g. a crash while the
    /// segment was being created). The records after it are checked with the store's key.
    SegmentHeader,
    /// Bytes that are not a valid record, with valid records after them.
    Corrupt,
    /// A run of zero bytes (a page the file system never wrote), with valid records after it.
    Zeroed,
    /// Invalid bytes up to the end of the segment: a record torn by a crash, or lost pages.
    TornTail,
    /// A file in the outbox directory named like a segment that this store never writes
    /// (odd name, not a regular file); left untouched and not read.
    IgnoredFile,
}

impl std::fmt::Display for DamageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DamageKind::SegmentHeader => "damaged segment header",
            DamageKind::Corrupt => "corrupt records",
            DamageKind::Zeroed => "zero-filled bytes",
            DamageKind::TornTail => "torn or corrupt end of segment",
            DamageKind::IgnoredFile => "not an outbox segment",
        })
    }
}

/// One damaged region found when the outbox was opened; `Display` is the line to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryWarning {
    pub file: PathBuf,
    /// Where the damaged bytes start in `file`.
    pub offset: u64,
    /// How many bytes were skipped (for `IgnoredFile`: the file's size).
    pub skipped: u64,
    pub kind: DamageKind,
    /// The bytes were removed from the end of the file (only ever the newest segment's tail,
    /// so that new records never follow garbage).
    pub cut: bool,
}

impl std::fmt::Display for RecoveryWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == DamageKind::IgnoredFile {
            return write!(
                f,
                "outbox: ignored {} ({}, {} bytes, left untouched)",
                self.file.display(),
                self.kind,
                self.skipped
            );
        }
        write!(
            f,
            "outbox: {}: skipped {} bytes at offset {} ({}){}; every valid record around them was kept",
            self.file.display(),
            self.skipped,
            self.offset,
            self.kind,
            if self.cut { ", cut from the end of the file" } else { "" }
        )
    }
}

/// The broker thread's handle on the outbox.
pub struct Store {
    dir: PathBuf,
    /// Segments by their first id.
    segments: BTreeMap<u64, SegMeta>,
    current: File,
    /// Where records are copied into `current` when it is mapped (see [`super::mapped`]).
    window: Option<mapped::Window>,
    /// Records go through a mapping (else one `write()` each).
    mapped: bool,
    current_id: u64,
    offset: u64,
    next_id: u64,
    pending: BTreeMap<u64, Loc>,
    queued_bytes: u64,
    max_bytes: u64,
    buf: Vec<u8>,
    /// Read handles on segments, for spilled messages (broker thread only).
    readers: BTreeMap<u64, File>,
    recovered_seen: Vec<(String, IdDigest, i64)>,
    recovered_pending: Vec<(i64, String)>,
    dead_letters: u64,
    sync: Arc<SyncShared>,
    /// Keys the record checksums of new segments (see [`checksum`]).
    key: u64,
    /// What recovery found worth telling the operator: one entry per damaged region.
    pub warnings: Vec<RecoveryWarning>,
    /// Held for the store's lifetime: one writer per directory.
    _lock: File,
}

/// What the syncer needs to find the files to flush.
#[derive(Default)]
struct SyncShared {
    files: Mutex<Vec<PathBuf>>,
    /// Completed passes over the files (each one fdatasyncs them).
    passes: std::sync::atomic::AtomicU64,
    /// A syncer thread is running: pruned segments are deleted by it, not by the broker thread.
    /// Unlinking a synced 64 MiB segment took ~50 ms on ext4 here (page cache and extents
    /// freed in the call): a stall of every client, ~5 minutes after each 64 MiB of traffic,
    /// that showed as a p99 of ~11 ms in `make bench`'s latency run.
    running: std::sync::atomic::AtomicBool,
    /// Segments pruned, for the syncer to delete at its next pass.
    doomed: Mutex<Vec<PathBuf>>,
    /// What deleting them failed with, reported by the next prune.
    failed: Mutex<Vec<io::Error>>,
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("seg-{first:016}.log"))
}

/// The segment id of a file name this store writes, and only of those (`seg-1.log` or
/// `seg-+1.log` would parse as 1 but name another file than [`seg_path`]).
fn seg_first(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let first: u64 = digits.parse().ok()?;
    (format!("seg-{first:016}.log") == name).then_some(first)
}

const SEG_MAGIC: &[u8; 8] = b"IOTGWSG1";
/// `[magic][u64 first id][u64 key][u32 0][u32 crc32 of the 28 bytes before]`.
const HEADER_LEN: u64 = 32;
const KEY_FILE: &str = "outbox.key";
const KEY_MAGIC: &[u8; 8] = b"IOTGWKY1";

fn segment_header(first: u64, key: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(SEG_MAGIC);
    h[8..16].copy_from_slice(&first.to_le_bytes());
    h[16..24].copy_from_slice(&key.to_le_bytes());
    let crc = crc32fast::hash(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The key in a segment header, if the header checks out.
fn header_key(data: &[u8]) -> Option<u64> {
    let h = data.get(0..HEADER_LEN as usize)?;
    let crc = u32::from_le_bytes(h[28..32].try_into().ok()?);
    (h[0..8] == SEG_MAGIC[..] && crc32fast::hash(&h[0..28]) == crc)
        .then(|| u64::from_le_bytes(h[16..24].try_into().unwrap_or_default()))
}

/// Record checksum: CRC-32 of the store's random key followed by the body. The key is why a
/// record-shaped byte string inside a message (a message id may hold any bytes) cannot pass
/// for a record when recovery scans through damaged bytes: its author cannot know the key.
fn checksum(key: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&key.to_le_bytes());
    h.update(body);
    h.finalize()
}

/// The checksum a record is checked with: keyed, or the plain CRC-32 of segments written before
/// segments had a header and a key (read so that an upgrade loses nothing; never written).
#[derive(Debug, Clone, Copy)]
enum Sum {
    Keyed(u64),
    Legacy,
}

impl Sum {
    fn of(self, body: &[u8]) -> u32 {
        match self {
            Sum::Keyed(k) => checksum(k, body),
            Sum::Legacy => crc32fast::hash(body),
        }
    }
}

fn random_key() -> io::Result<u64> {
    let mut b = [0u8; 8];
    openssl::rand::rand_bytes(&mut b).map_err(io::Error::other)?;
    Ok(u64::from_le_bytes(b))
}

/// Opens without following a symlink planted in the outbox directory.
fn open_nofollow(o: &mut OpenOptions, path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    o.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

fn read_key_file(dir: &Path) -> Option<u64> {
    let mut data = Vec::new();
    open_nofollow(OpenOptions::new().read(true), &dir.join(KEY_FILE))
        .ok()?
        .read_to_end(&mut data)
        .ok()?;
    let crc = u32::from_le_bytes(data.get(16..20)?.try_into().ok()?);
    (data.len() == 20 && data[0..8] == KEY_MAGIC[..] && crc32fast::hash(&data[0..16]) == crc)
        .then(|| u64::from_le_bytes(data[8..16].try_into().unwrap_or_default()))
}

/// Writes the key file (a copy of the key every segment header also holds) atomically.
fn write_key_file(dir: &Path, key: u64) -> io::Result<()> {
    let mut data = Vec::with_capacity(20);
    data.extend_from_slice(KEY_MAGIC);
    data.extend_from_slice(&key.to_le_bytes());
    data.extend_from_slice(&crc32fast::hash(&data).to_le_bytes());
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = open_nofollow(OpenOptions::new().write(true).create_new(true), &tmp)?;
    f.write_all(&data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(KEY_FILE))?;
    File::open(dir)?.sync_all()
}

/// Creates a new segment (never reusing an existing file) and writes its header.
fn create_segment(dir: &Path, first: u64, key: u64) -> io::Result<(File, PathBuf)> {
    let path = seg_path(dir, first);
    let mut f = open_nofollow(OpenOptions::new().read(true).write(true).create_new(true), &path)?;
    f.write_all(&segment_header(first, key))?;
    Ok((f, path))
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u16).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Frames `body` (already in `buf` after 8 reserved bytes) with its length and checksum.
fn frame(buf: &mut [u8], key: u64) {
    let body_len = (buf.len() - 8) as u32;
    let crc = checksum(key, &buf[8..]);
    buf[0..4].copy_from_slice(&body_len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

/// An ACCEPT body, borrowed; `None` unless the body has exactly that shape.
struct AcceptRef<'a> {
    id: u64,
    expires_at: i64,
    forwarded: bool,
    device: &'a str,
    message_id: &'a str,
    payload: &'a [u8],
}

fn parse_accept(body: &[u8]) -> Option<AcceptRef<'_>> {
    let mut c = Cursor { b: body, at: 0 };
    if c.u8()? != ACCEPT {
        return None;
    }
    let id = c.u64().filter(|id| *id <= MAX_ID)?;
    let expires_at = c.u64()? as i64;
    let forwarded = match c.u8()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let device = c.str()?;
    let message_id = c.str()?;
    let n = c.u32()? as usize;
    let payload = c.take(n)?;
    c.done().then_some(AcceptRef { id, expires_at, forwarded, device, message_id, payload })
}

fn decode_accept(body: &[u8]) -> Option<Accept> {
    let a = parse_accept(body)?;
    Some(Accept {
        id: a.id,
        expires_at: a.expires_at,
        forwarded: a.forwarded,
        device: a.device.to_owned(),
        message_id: a.message_id.to_owned(),
        payload: a.payload.to_vec(),
    })
}

/// The ids of a SETTLE body; `None` unless the body has exactly that shape.
fn parse_settle(body: &[u8]) -> Option<Vec<u64>> {
    let mut c = Cursor { b: body, at: 0 };
    if c.u8()? != SETTLE {
        return None;
    }
    let n = c.u32()? as usize;
    if body.len() != 5 + n.checked_mul(9)? {
        return None;
    }
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let id = c.u64().filter(|id| *id <= MAX_ID)?;
        if !matches!(c.u8()?, DELIVERED | DEAD | CLAIMED_ELSEWHERE) {
            return None;
        }
        ids.push(id);
    }
    Some(ids)
}

/// Smallest body of either kind (a SETTLE of one id); shorter lengths are never records.
const MIN_BODY: u32 = 14;

/// The end of a valid record starting at `at`, if there is one. The shape is checked before the
/// checksum so that scanning a damaged region costs little per byte.
fn record_at(data: &[u8], at: usize, sum: Sum) -> Option<usize> {
    let head = data.get(at..at.checked_add(8)?)?;
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?);
    if !(MIN_BODY..=MAX_RECORD).contains(&len) {
        return None;
    }
    let end = at + 8 + len as usize;
    let body = data.get(at + 8..end)?;
    let shaped = match body[0] {
        ACCEPT => parse_accept(body).is_some(),
        SETTLE => parse_settle(body).is_some(),
        _ => false,
    };
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    (shaped && sum.of(body) == crc).then_some(end)
}

/// One segment read back.
struct Scan {
    /// (offset, end) of each valid record.
    records: Vec<(usize, usize)>,
    /// (start, end) of each damaged region.
    damage: Vec<(usize, usize)>,
    header_ok: bool,
    /// A segment of the format without header and key: read, never appended to.
    legacy: bool,
    /// Where the last valid record (or the valid header, or 0) ends.
    valid_end: usize,
    /// Where the bytes end that were ever written: the zero-filled tail after this is space
    /// reserved for records to come (a mapped segment grows a window at a time), not damage.
    limit: usize,
}

/// Reads a segment's records, skipping damaged bytes: after a bad record it resynchronises on
/// the next offset where a whole record (shape and keyed checksum) validates.
fn scan(data: &[u8], store_key: u64) -> Scan {
    if let Some(k) = header_key(data) {
        return scan_with(data, Sum::Keyed(k), HEADER_LEN as usize, true);
    }
    // No valid header: a segment of ours whose header is damaged, or one written before
    // segments had headers. Whichever reading finds more records is the right one.
    let keyed = scan_with(data, Sum::Keyed(store_key), 0, false);
    let legacy = scan_with(data, Sum::Legacy, 0, false);
    if legacy.records.len() > keyed.records.len() {
        legacy
    } else {
        keyed
    }
}

fn scan_with(data: &[u8], sum: Sum, start: usize, header_ok: bool) -> Scan {
    let legacy = matches!(sum, Sum::Legacy);
    // No record starts with a zero byte (its length is at least MIN_BODY), so the zero tail
    // holds none; a record before it may still end in zeros, so records are read whole.
    let limit = data.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    let mut s = Scan {
        records: Vec::new(),
        damage: Vec::new(),
        header_ok,
        legacy,
        valid_end: start,
        limit,
    };
    let mut at = start;
    // A missing header is damage, except in the old format, which has none.
    let mut bad_from = (!header_ok && !legacy).then_some(0usize);
    while at < limit {
        match record_at(data, at, sum) {
            Some(end) => {
                if let Some(from) = bad_from.take() {
                    if from < at {
                        s.damage.push((from, at));
                    }
                }
                s.records.push((at, end));
                at = end;
                s.valid_end = end;
            }
            None => {
                bad_from.get_or_insert(at);
                at += 1;
            }
        }
    }
    if let Some(from) = bad_from {
        if from < limit {
            s.damage.push((from, limit));
        } else if from == 0 && !header_ok && !legacy {
            // Nothing (or nothing but zeros) where a header must be: damage, not reserved space.
            s.damage.push((0, data.len()));
        }
    }
    s
}

fn damage_warnings(path: &Path, data: &[u8], s: &Scan, cut: bool) -> Vec<RecoveryWarning> {
    s.damage
        .iter()
        .map(|&(from, to)| {
            let kind = if from == 0 && !s.header_ok && !s.legacy {
                DamageKind::SegmentHeader
            } else if to >= s.limit {
                DamageKind::TornTail
            } else if data[from..to].iter().all(|b| *b == 0) {
                DamageKind::Zeroed
            } else {
                DamageKind::Corrupt
            };
            RecoveryWarning {
                file: path.to_owned(),
                offset: from as u64,
                skipped: (to - from) as u64,
                kind,
                cut: cut && from >= s.valid_end,
            }
        })
        .collect()
}

fn read_all(path: &Path) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    open_nofollow(OpenOptions::new().read(true), path)?.read_to_end(&mut data)?;
    Ok(data)
}

/// The segments of an outbox directory, oldest first, and the files named like segments that
/// are not ours (reported, never read or written).
/// (first id, path) of each segment, and what was ignored.
type Listing = (Vec<(u64, PathBuf)>, Vec<RecoveryWarning>);

fn list_segments(dir: &Path) -> io::Result<Listing> {
    let mut segs = Vec::new();
    let mut ignored = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let Ok(name) = e.file_name().into_string() else { continue };
        if !name.starts_with("seg-") {
            continue;
        }
        // DirEntry::file_type does not follow symlinks.
        let regular = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        match seg_first(&name) {
            Some(first) if regular => segs.push((first, e.path())),
            _ => ignored.push(RecoveryWarning {
                file: e.path(),
                offset: 0,
                skipped: std::fs::symlink_metadata(e.path()).map(|m| m.len()).unwrap_or(0),
                kind: DamageKind::IgnoredFile,
                cut: false,
            }),
        }
    }
    segs.sort_unstable();
    ignored.sort_by(|a, b| a.file.cmp(&b.file));
    Ok((segs, ignored))
}

/// The store's key: from the key file, else from the first segment header that checks out.
/// `Ok(None)` when there is none and no segment could hold a record; an error when records may
/// exist but nothing can verify them (refusing beats silently dropping them).
fn find_key(dir: &Path, segs: &[(u64, PathBuf)]) -> io::Result<Option<u64>> {
    if let Some(k) = read_key_file(dir) {
        return Ok(Some(k));
    }
    let mut unverifiable = false;
    for (_, path) in segs {
        let mut head = Vec::with_capacity(HEADER_LEN as usize);
        open_nofollow(OpenOptions::new().read(true), path)?
            .take(HEADER_LEN)
            .read_to_end(&mut head)?;
        if let Some(k) = header_key(&head) {
            return Ok(Some(k));
        }
        // Big enough for records, and not a segment of the old format (which needs no key).
        unverifiable |= std::fs::metadata(path)?.len() > HEADER_LEN
            && scan_with(&read_all(path)?, Sum::Legacy, 0, false).records.is_empty();
    }
    if unverifiable {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: {KEY_FILE} and every segment header are damaged, so no record can be \
                 verified; refusing to start rather than drop them (move the directory aside to \
                 start with an empty outbox)",
                dir.display()
            ),
        ));
    }
    Ok(None)
}

/// Where a recorded message is, for tests and operators checking a recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSpan {
    pub file: PathBuf,
    pub offset: u64,
    pub len: u64,
    /// The message id of an ACCEPT record; `None` for a SETTLE record.
    pub message_id: Option<String>,
}

/// A read-only look at an outbox directory: every valid record and every damaged region, as
/// [`Store::open`] would find them, without changing anything (no cut, no new segment).
#[derive(Debug, Clone, Default)]
pub struct Survey {
    pub records: Vec<RecordSpan>,
    pub warnings: Vec<RecoveryWarning>,
}

pub fn survey(dir: &Path) -> io::Result<Survey> {
    let (segs, ignored) = list_segments(dir)?;
    let Some(key) = find_key(dir, &segs)? else {
        return Ok(Survey { records: Vec::new(), warnings: ignored });
    };
    let mut out = Survey::default();
    for (_, path) in &segs {
        let data = read_all(path)?;
        let s = scan(&data, key);
        out.warnings.extend(damage_warnings(path, &data, &s, false));
        for &(at, end) in &s.records {
            out.records.push(RecordSpan {
                file: path.clone(),
                offset: at as u64,
                len: (end - at) as u64,
                message_id: parse_accept(&data[at + 8..end]).map(|a| a.message_id.to_owned()),
            });
        }
    }
    out.warnings.extend(ignored);
    Ok(out)
}

impl Store {
    /// Opens (creating if needed) the outbox directory and recovers its state. Damaged bytes are
    /// skipped, never a reason to drop the valid records after them; each damaged region is one
    /// entry of [`Store::warnings`].
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Store> {
        std::fs::create_dir_all(dir)?;
        Store::open_with(dir, max_bytes, mapped::supported(dir))
    }

    /// [`Store::open`], choosing whether records are written through a mapping.
    fn open_with(dir: &Path, max_bytes: u64, mapped: bool) -> io::Result<Store> {
        // Two writers (a second broker, or a second plugin instance) would interleave records.
        let lock = open_nofollow(
            OpenOptions::new().create(true).truncate(false).write(true),
            &dir.join("lock"),
        )?;
        if lock.try_lock().is_err() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another broker or plugin instance", dir.display()),
            ));
        }
        let (segs, ignored) = list_segments(dir)?;
        let key = match find_key(dir, &segs)? {
            Some(k) => k,
            None => random_key()?,
        };
        if read_key_file(dir) != Some(key) {
            write_key_file(dir, key)?;
        }
        let mut segments = BTreeMap::new();
        let mut accepts: BTreeMap<u64, (u64, u64, Accept)> = BTreeMap::new();
        let mut settled = std::collections::HashSet::new();
        let mut warnings = Vec::new();
        // Ids are never reused: a surviving SETTLE naming a lost record's id must not settle a
        // new message that would get the same id.
        let mut max_id = 0u64;
        // The newest segment: (first, its scan, its length), to decide where appends go.
        let mut last: Option<(u64, Scan, usize)> = None;
        for (i, (first, path)) in segs.iter().enumerate() {
            let data = read_all(path)?;
            let s = scan(&data, key);
            let is_last = i + 1 == segs.len();
            // Only the newest segment's tail is cut; older segments are never written again.
            let tail_only = !s.legacy && s.damage.iter().all(|(from, _)| *from >= s.valid_end);
            warnings.extend(damage_warnings(path, &data, &s, is_last && tail_only));
            let mut meta = SegMeta { bytes: data.len() as u64, ..Default::default() };
            for &(at, end) in &s.records {
                let body = &data[at + 8..end];
                if let Some(a) = decode_accept(body) {
                    max_id = max_id.max(a.id);
                    meta.max_expiry = meta.max_expiry.max(a.expires_at);
                    accepts.insert(a.id, (*first, at as u64, a));
                } else if let Some(ids) = parse_settle(body) {
                    max_id = ids.iter().fold(max_id, |m, id| m.max(*id));
                    settled.extend(ids);
                }
            }
            segments.insert(*first, meta);
            if is_last {
                last = Some((*first, s, data.len()));
            }
        }
        warnings.extend(ignored);
        // A newest segment whose records were all lost still names the first id it may hold.
        let next_id = (max_id + 1).max(segs.last().map_or(1, |(f, _)| *f));
        let mut pending = BTreeMap::new();
        let mut queued_bytes = 0;
        let mut recovered_seen = Vec::with_capacity(accepts.len());
        let mut recovered_pending = Vec::new();
        let opened_at = crate::host::unix_now();
        for (id, (seg, offset, a)) in accepts {
            recovered_seen.push((a.device.clone(), replay::digest(&a.message_id), a.expires_at));
            if a.forwarded && !settled.contains(&id) {
                let cost = spool_cost(&a.device, &a.message_id, a.payload.len());
                queued_bytes += cost;
                pending.insert(id, Loc { segment: seg, offset, cost, at: opened_at });
                recovered_pending.push((id as i64, a.device.clone()));
                if let Some(m) = segments.get_mut(&seg) {
                    m.pending += 1;
                }
            }
        }
        let dead_letters = std::fs::read(dir.join("dead_letters.jsonl"))
            .map(|d| d.iter().filter(|b| **b == b'\n').count() as u64)
            .unwrap_or(0);
        // Where new records go. They must never follow garbage, or a later recovery could read
        // the garbage and the new record as something else: a damaged tail of the newest segment
        // is cut (nothing valid follows it); a segment damaged in the middle, or of the old
        // format, is left as it is and a new segment is started.
        let (current, current_id, offset, path) = match last {
            Some((first, s, len))
                if !s.legacy && s.damage.iter().all(|(from, _)| *from >= s.valid_end) =>
            {
                let path = seg_path(dir, first);
                let f = open_nofollow(OpenOptions::new().read(true).write(true), &path)?;
                if len > s.valid_end {
                    f.set_len(s.valid_end as u64)?;
                }
                if s.valid_end == 0 {
                    // Nothing valid, not even the header (a crash while creating it).
                    f.write_all_at(&segment_header(first, key), 0)?;
                }
                let offset = (s.valid_end as u64).max(HEADER_LEN);
                if let Some(m) = segments.get_mut(&first) {
                    m.bytes = offset;
                }
                (f, first, offset, path)
            }
            other => {
                let first = next_id.max(other.map_or(0, |(f, _, _)| f + 1));
                let (f, path) = create_segment(dir, first, key)?;
                segments.insert(first, SegMeta { bytes: HEADER_LEN, ..Default::default() });
                (f, first, HEADER_LEN, path)
            }
        };
        let sync = Arc::new(SyncShared::default());
        sync.files.lock().unwrap_or_else(|p| p.into_inner()).push(path);
        Ok(Store {
            dir: dir.to_owned(),
            segments,
            current,
            window: None,
            mapped,
            current_id,
            offset,
            next_id,
            pending,
            queued_bytes,
            max_bytes,
            buf: Vec::with_capacity(1024),
            readers: BTreeMap::new(),
            recovered_seen,
            recovered_pending,
            dead_letters,
            sync,
            key,
            warnings,
            _lock: lock,
        })
    }

    /// Bytes of pending messages, counted against the cap.
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    /// Would a message of this size fit under the cap?
    pub fn check_room(
        &self,
        device: &str,
        message_id: &str,
        payload_len: usize,
    ) -> Result<(), AppendError> {
        let need = spool_cost(device, message_id, payload_len);
        if self.queued_bytes + need > self.max_bytes {
            return Err(AppendError::Full { queued_bytes: self.queued_bytes, max: self.max_bytes });
        }
        Ok(())
    }

    /// How records reach the disk, for the start-up line.
    pub fn write_mode(&self) -> &'static str {
        if self.mapped {
            "mapped segment (no system call per record)"
        } else {
            "one write() per record"
        }
    }

    /// Writes the record in `self.buf` at the end of the current segment: copied into its
    /// mapping, or, unmapped (or when the mapping cannot be moved), one `write()`, a partial one
    /// undone. Either way the bytes are in the kernel when this returns.
    fn write_record(&mut self) -> io::Result<u64> {
        frame(&mut self.buf, self.key);
        let at = self.offset;
        let copied = self.mapped
            && mapped::Window::write(&mut self.window, &self.current, at, &self.buf).is_ok();
        if !copied {
            if let Err(e) = self.current.write_all_at(&self.buf, at) {
                // Leave no half record behind (the next start would cut it anyway). No window
                // is left either, so no mapping reaches past the new end.
                self.window = None;
                let _ = self.current.set_len(at);
                return Err(e);
            }
        }
        self.offset += self.buf.len() as u64;
        if let Some(m) = self.segments.get_mut(&self.current_id) {
            m.bytes = self.offset;
        }
        Ok(at)
    }

    fn rotate_if_full(&mut self) -> io::Result<()> {
        if self.offset < SEGMENT_BYTES {
            return Ok(());
        }
        // Names sort like ids and a segment file is never reused.
        let first = self.next_id.max(self.current_id + 1);
        let (f, path) = create_segment(&self.dir, first, self.key)?;
        self.trim();
        self.current = f;
        self.current_id = first;
        self.offset = HEADER_LEN;
        self.segments.insert(first, SegMeta { bytes: HEADER_LEN, ..Default::default() });
        self.sync.files.lock().unwrap_or_else(|p| p.into_inner()).push(path);
        Ok(())
    }

    /// Durably records an accepted message: its id for replay protection (until `expires_at`)
    /// and, when `payload` is given, the message itself, pending delivery. Returns its id.
    pub fn append(
        &mut self,
        device: &str,
        message_id: &str,
        expires_at: i64,
        payload: Option<&[u8]>,
    ) -> Result<i64, AppendError> {
        if let Some(p) = payload {
            self.check_room(device, message_id, p.len())?;
        }
        if self.next_id > MAX_ID {
            // Only reachable from a damaged or crafted outbox; an id past MAX_ID would not be
            // read back at the next start, so the message would be lost after its PUBACK.
            return Err(AppendError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "outbox message ids exhausted (the outbox holds an id near 2^62: damaged data)",
            )));
        }
        self.rotate_if_full().map_err(AppendError::Io)?;
        let id = self.next_id;
        let body = payload.unwrap_or(&[]);
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; 8]);
        self.buf.push(ACCEPT);
        self.buf.extend_from_slice(&id.to_le_bytes());
        self.buf.extend_from_slice(&expires_at.to_le_bytes());
        self.buf.push(payload.is_some() as u8);
        put_str(&mut self.buf, device);
        put_str(&mut self.buf, message_id);
        self.buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(body);
        let offset = self.write_record().map_err(AppendError::Io)?;
        self.next_id += 1;
        let seg = self.current_id;
        if let Some(m) = self.segments.get_mut(&seg) {
            m.max_expiry = m.max_expiry.max(expires_at);
            if payload.is_some() {
                m.pending += 1;
            }
        }
        if let Some(p) = payload {
            let cost = spool_cost(device, message_id, p.len());
            self.queued_bytes += cost;
            let at = crate::host::unix_now();
            self.pending.insert(id, Loc { segment: seg, offset, cost, at });
        }
        Ok(id as i64)
    }

    /// Reads one pending message back from disk (None if it is no longer pending).
    pub fn read(&mut self, id: i64) -> io::Result<Option<QueuedMessage>> {
        let Some(loc) = self.pending.get(&(id as u64)) else { return Ok(None) };
        let f = match self.readers.entry(loc.segment) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(File::open(seg_path(&self.dir, loc.segment))?)
            }
        };
        let mut head = [0u8; 8];
        f.read_exact_at(&mut head, loc.offset)?;
        let len = u32::from_le_bytes(head[0..4].try_into().unwrap_or_default());
        let mut body = vec![0u8; len as usize];
        f.read_exact_at(&mut body, loc.offset + 8)?;
        let a = decode_accept(&body).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("bad record for message {id}"))
        })?;
        Ok(Some(QueuedMessage {
            id: a.id as i64,
            device_id: a.device,
            message_id: a.message_id,
            payload: a.payload,
        }))
    }

    /// Pending messages with `id > after`, oldest first (payloads read back from disk).
    #[cfg(test)]
    fn pending_after(&mut self, after: i64, limit: usize) -> io::Result<Vec<QueuedMessage>> {
        let ids: Vec<u64> = self
            .pending
            .range((after.max(0) as u64 + 1)..)
            .take(limit)
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.read(id as i64)?);
        }
        Ok(out)
    }

    /// Hands over (once) the messages left pending by the last run as (id, device), oldest
    /// first: enough to queue them per lane without reading them back.
    pub fn take_recovered_pending(&mut self) -> Vec<(i64, String)> {
        std::mem::take(&mut self.recovered_pending)
    }

    /// When the oldest pending message was appended (ids grow with time, so it is the first).
    pub fn oldest_pending_at(&self) -> Option<i64> {
        self.pending.first_key_value().map(|(_, l)| l.at)
    }

    /// Number of messages waiting for delivery.
    pub fn pending_count(&self) -> io::Result<i64> {
        Ok(self.pending.len() as i64)
    }

    /// Records the backend's final answers: delivered messages and final failures (one record
    /// for the whole batch); final failures are also appended to `dead_letters.jsonl` with the
    /// backend's status and body. Answers for messages no longer pending are ignored.
    pub fn settle(&mut self, answers: &[Done], now: i64) -> io::Result<()> {
        let ids: Vec<(u64, u8)> = answers
            .iter()
            .map(|d| {
                let state = match (d.delivered, &d.claimed_elsewhere) {
                    (true, _) => DELIVERED,
                    (false, Some(_)) => CLAIMED_ELSEWHERE,
                    (false, None) => DEAD,
                };
                (d.message.id as u64, state)
            })
            .filter(|(id, _)| self.pending.contains_key(id))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        if answers.iter().any(Done::dead_lettered) {
            let mut lines = String::new();
            for Done { message: m, status, body, .. } in
                answers.iter().filter(|d| d.dead_lettered())
            {
                let v = serde_json::json!({
                    "id": m.id,
                    "device_id": m.device_id,
                    "message_id": m.message_id,
                    "status": status,
                    "body": String::from_utf8_lossy(body),
                    "payload": String::from_utf8_lossy(&m.payload),
                    "failed_at": now,
                });
                lines.push_str(&v.to_string());
                lines.push('\n');
            }
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("dead_letters.jsonl"))?
                .write_all(lines.as_bytes())?;
            self.dead_letters += answers.iter().filter(|d| d.dead_lettered()).count() as u64;
        }
        self.rotate_if_full()?;
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; 8]);
        self.buf.push(SETTLE);
        self.buf.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        for (id, state) in &ids {
            self.buf.extend_from_slice(&id.to_le_bytes());
            self.buf.push(*state);
        }
        self.write_record()?;
        for (id, _) in ids {
            if let Some(loc) = self.pending.remove(&id) {
                self.queued_bytes = self.queued_bytes.saturating_sub(loc.cost);
                if let Some(m) = self.segments.get_mut(&loc.segment) {
                    m.pending = m.pending.saturating_sub(1);
                }
            }
        }
        Ok(())
    }

    /// Hands over (once) the ids still inside their window when the store was opened, for
    /// rebuilding the replay cache.
    pub fn take_live_seen(&mut self, now: i64) -> Vec<(String, IdDigest, i64)> {
        let mut all = std::mem::take(&mut self.recovered_seen);
        all.retain(|(_, _, exp)| *exp >= now);
        all
    }

    /// Deletes segments, oldest first, whose messages are all settled and whose ids have all
    /// left the replay window. Returns how many were deleted.
    pub fn prune(&mut self, now: i64) -> io::Result<usize> {
        let mut gone = Vec::new();
        for (first, m) in &self.segments {
            if *first == self.current_id || m.pending > 0 || m.max_expiry >= now {
                break;
            }
            gone.push(*first);
        }
        for first in &gone {
            self.segments.remove(first);
            self.readers.remove(first);
            let path = seg_path(&self.dir, *first);
            self.sync.files.lock().unwrap_or_else(|p| p.into_inner()).retain(|p| *p != path);
            if self.sync.running.load(Ordering::Acquire) {
                self.sync.doomed.lock().unwrap_or_else(|p| p.into_inner()).push(path);
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        // A segment the syncer could not delete is still settled and expired: recovery reads
        // it as such, and it is deleted after the next start.
        if let Some(e) = self.sync.failed.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Err(e);
        }
        Ok(gone.len())
    }

    /// Number of dead letters recorded.
    pub fn dead_letter_count(&self) -> io::Result<i64> {
        Ok(self.dead_letters as i64)
    }

    /// Bytes of segments on disk.
    #[cfg(test)]
    fn disk_bytes(&self) -> u64 {
        self.segments.values().map(|m| m.bytes).sum()
    }

    /// Unmaps the current segment and cuts its reserved zero tail (a tidy file; recovery would
    /// skip the zeros anyway).
    fn trim(&mut self) {
        self.window = None;
        if self.mapped {
            let _ = self.current.set_len(self.offset);
        }
    }

    /// Starts the thread that fdatasyncs the log every [`SYNC_INTERVAL`].
    pub fn start_syncer(&self) -> io::Result<Syncer> {
        Syncer::start(self.sync.clone(), self.dir.clone())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.trim();
    }
}

/// fdatasyncs the outbox off the broker thread (a last pass when stopped).
pub struct Syncer(Background);

impl Syncer {
    fn start(shared: Arc<SyncShared>, dir: PathBuf) -> io::Result<Syncer> {
        let ours = shared.clone();
        let thread = Background::spawn("iotgw-sync", move |stop| {
            let mut synced_dir_for = 0usize;
            loop {
                std::thread::park_timeout(SYNC_INTERVAL);
                let files = shared.files.lock().unwrap_or_else(|p| p.into_inner()).clone();
                // New segment files need their directory entry synced too.
                if files.len() != synced_dir_for {
                    if let Ok(d) = File::open(&dir) {
                        let _ = d.sync_all();
                    }
                    synced_dir_for = files.len();
                }
                // Only the newest two can have unsynced data; older ones were synced before.
                for p in files.iter().rev().take(2) {
                    if let Ok(f) = File::open(p) {
                        let _ = f.sync_data();
                    }
                }
                let doomed =
                    std::mem::take(&mut *shared.doomed.lock().unwrap_or_else(|p| p.into_inner()));
                for p in doomed {
                    match std::fs::remove_file(&p) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            shared.failed.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                        }
                        _ => {}
                    }
                }
                shared.passes.fetch_add(1, Ordering::Relaxed);
                if stop.is_set() {
                    // From now on the store deletes for itself.
                    shared.running.store(false, Ordering::Release);
                    break;
                }
            }
        })?;
        // Cleared by the thread's last pass, after which the store deletes for itself.
        ours.running.store(true, Ordering::Release);
        Ok(Syncer(thread))
    }

    /// Runs a last sync and joins the thread.
    pub fn stop(&mut self) {
        self.0.stop();
    }
}

/// A read-only summary of an outbox directory (for tests and operators).
pub fn inspect(dir: &Path) -> io::Result<(i64, i64)> {
    let s = Store::open(dir, u64::MAX)?;
    Ok((s.pending_count()?, s.dead_letter_count()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::digest;

    fn answer(m: &QueuedMessage, status: u16, body: &[u8]) -> Done {
        Done {
            message: m.clone(),
            status,
            body: body.to_vec(),
            body_truncated: false,
            delivered: (200..300).contains(&status),
            attempts: 1,
            answered_at: std::time::Instant::now(),
            claimed_elsewhere: None,
        }
    }

    #[test]
    fn a_message_claimed_by_another_node_is_settled_without_a_dead_letter() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), 1 << 20).unwrap();
            for m in ["a", "b"] {
                s.append("d", m, 10, Some(b"1")).unwrap();
            }
            let rows = s.pending_after(0, 10).unwrap();
            let mut dup = answer(&rows[0], 0, b"");
            dup.claimed_elsewhere =
                Some(crate::cluster::ClaimedElsewhere { node: "b".into(), same_content: true });
            assert!(!dup.dead_lettered());
            // Control: the same answer without the claim is a dead letter.
            assert!(answer(&rows[0], 0, b"").dead_lettered());
            s.settle(&[dup], 5).unwrap();
        }
        // Settled for good (survives a reopen), and not written as a dead letter.
        let mut s = Store::open(dir.path(), 1 << 20).unwrap();
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        let left = s.pending_after(0, 10).unwrap();
        assert_eq!(left.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), ["b"]);
        assert_eq!(s.dead_letter_count().unwrap(), 0);
    }

    #[test]
    fn append_then_reopen_keeps_messages_and_seen_ids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("outbox");
        {
            let mut s = Store::open(&p, 1 << 20).unwrap();
            assert_eq!(s.append("d1", "m1", 1300, Some(b"{}")).unwrap(), 1);
            s.append("d1", "m2", 900, None).unwrap();
        }
        let mut s = Store::open(&p, 1 << 20).unwrap();
        let pending = s.pending_after(0, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].message_id.as_str(), pending[0].payload.as_slice()),
            ("m1", &b"{}"[..])
        );
        assert_eq!(s.queued_bytes(), (2 + 2 + 2 + ROW_OVERHEAD as usize) as u64);
        assert_eq!(s.take_live_seen(1000), vec![("d1".to_string(), digest("m1"), 1300)]);
        assert!(s.warnings.is_empty());
    }

    #[test]
    fn cap_refuses_new_messages_and_keeps_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), 200).unwrap();
        s.append("d", "m1", 10, Some(&[b'x'; 100])).unwrap();
        let e = s.append("d", "m2", 10, Some(&[b'x'; 100])).unwrap_err();
        assert!(matches!(e, AppendError::Full { .. }), "{e}");
        assert_eq!(s.pending_count().unwrap(), 1);
        drop(s);
        // A refused message is not remembered as seen either.
        assert_eq!(Store::open(dir.path(), 200).unwrap().take_live_seen(0).len(), 1);
    }

    #[test]
    fn settle_survives_reopen_and_dead_letters_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), 1 << 20).unwrap();
            for m in ["a", "b", "c"] {
                s.append("d", m, 10, Some(b"1")).unwrap();
            }
            let rows = s.pending_after(0, 10).unwrap();
            let a = answer(&rows[0], 200, b"");
            s.settle(&[a.clone(), answer(&rows[1], 400, b"bad")], 5).unwrap();
            assert_eq!(s.queued_bytes(), spool_cost("d", "c", 1));
            // Settling twice changes nothing.
            s.settle(&[a], 6).unwrap();
        }
        let mut s = Store::open(dir.path(), 1 << 20).unwrap();
        let left = s.pending_after(0, 10).unwrap();
        assert_eq!(left.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(s.dead_letter_count().unwrap(), 1);
        let dl = std::fs::read_to_string(dir.path().join("dead_letters.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(dl.trim()).unwrap();
        assert_eq!(
            (v["message_id"].as_str(), v["status"].as_u64(), v["body"].as_str()),
            (Some("b"), Some(400), Some("bad"))
        );
        // Delivered and dead messages are still remembered for replay until they expire.
        assert_eq!(s.take_live_seen(0).len(), 3);
    }

    #[test]
    fn torn_last_record_is_cut_and_earlier_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), 1 << 20).unwrap();
            s.append("d", "whole", 10, Some(b"1")).unwrap();
            s.append("d", "torn", 10, Some(b"2")).unwrap();
        }
        let seg = seg_path(dir.path(), 1);
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 3).unwrap();
        let mut s = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        let w = &s.warnings[0];
        assert_eq!((w.kind, w.cut, w.file.clone()), (DamageKind::TornTail, true, seg.clone()));
        // The torn record's bytes up to the last one that is not zero: the cut left its payload
        // length as `01 00`, and a zero tail reads as reserved space.
        assert_eq!(w.offset + w.skipped, len - 3 - 1);
        assert!(w
            .to_string()
            .contains(&format!("skipped {} bytes at offset {}", w.skipped, w.offset)));
        let p = s.pending_after(0, 10).unwrap();
        assert_eq!(p.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), ["whole"]);
        // Appending continues cleanly after the cut, in the same segment.
        assert_eq!(s.append("d", "next", 10, Some(b"3")).unwrap(), 2);
        drop(s);
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        assert_eq!(s.pending_count().unwrap(), 2);
        assert_eq!(s.segments.len(), 1);
    }

    /// What `kill -9` leaves of a live store: its files as the page cache holds them, copied
    /// while it is still open (no unmapping, no trim, no sync).
    fn killed_copy(from: &Path, to: &Path) {
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::write(to.join(e.file_name()), std::fs::read(e.path()).unwrap()).unwrap();
        }
    }

    #[test]
    fn a_mapped_store_killed_mid_segment_loses_nothing_and_its_zero_tail_is_not_damage() {
        let (live, copy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut s = Store::open(live.path(), u64::MAX).unwrap();
        assert!(s.mapped, "{}", s.write_mode());
        let ids: Vec<i64> = (0..300)
            .map(|i| s.append("dev", &format!("m{i}"), 1000, (i % 3 != 0).then_some(b"{}")))
            .collect::<Result<_, _>>()
            .unwrap();
        let m1 = s.read(ids[1]).unwrap().unwrap();
        s.settle(&[answer(&m1, 200, b"")], 0).unwrap();
        killed_copy(live.path(), copy.path());
        let seg = std::fs::read(seg_path(copy.path(), 1)).unwrap();
        assert_eq!(seg.len() as u64, HEADER_LEN + mapped::WINDOW, "a reserved zero tail");
        assert!(seg[s.offset as usize..].iter().all(|b| *b == 0));

        let mut r = Store::open(copy.path(), u64::MAX).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(r.pending_count().unwrap(), 199, "200 with a payload, one settled");
        assert_eq!(r.take_live_seen(0).len(), 300, "every id, with or without a payload");
        assert_eq!(r.read(ids[2]).unwrap().unwrap().payload, b"{}");
        // Appends go on right after the last record, and a clean stop trims the tail.
        let next = r.append("dev", "after", 1000, Some(b"1")).unwrap();
        assert_eq!(next, 301);
        let end = r.offset;
        drop(r);
        assert_eq!(std::fs::metadata(seg_path(copy.path(), 1)).unwrap().len(), end);
        let r = Store::open(copy.path(), u64::MAX).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        // The positive control for "no warning": garbage written inside the zero tail is
        // damage, reported and cut.
        drop(r);
        let f = OpenOptions::new().write(true).open(seg_path(copy.path(), 1)).unwrap();
        f.write_all_at(&[0u8; 100], end).unwrap();
        f.write_all_at(b"garbage", end + 40).unwrap();
        let r = Store::open(copy.path(), u64::MAX).unwrap();
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        let w = &r.warnings[0];
        assert_eq!((w.kind, w.offset, w.skipped, w.cut), (DamageKind::TornTail, end, 47, true));
        drop(s);
    }

    #[test]
    fn both_ways_of_writing_read_back_the_same_and_each_reads_the_others_segments() {
        for (first, second) in [(true, false), (false, true)] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = Store::open_with(dir.path(), u64::MAX, first).unwrap();
            assert_eq!(s.mapped, first);
            for i in 0..50 {
                s.append("dev", &format!("a{i}"), 1000, Some(format!("{i}").as_bytes())).unwrap();
            }
            let a2 = s.read(3).unwrap().unwrap();
            s.settle(&[answer(&a2, 200, b"")], 0).unwrap();
            drop(s);
            let mut s = Store::open_with(dir.path(), u64::MAX, second).unwrap();
            assert!(s.warnings.is_empty(), "{:?}", s.warnings);
            for i in 0..50 {
                s.append("dev", &format!("b{i}"), 1000, Some(b"x")).unwrap();
            }
            let end = s.offset;
            drop(s);
            assert_eq!(std::fs::metadata(seg_path(dir.path(), 1)).unwrap().len(), end);
            let mut s = Store::open(dir.path(), u64::MAX).unwrap();
            assert!(s.warnings.is_empty(), "{:?}", s.warnings);
            assert_eq!(s.pending_count().unwrap(), 99);
            assert_eq!(s.read(10).unwrap().unwrap().payload, b"9");
            assert_eq!(s.read(100).unwrap().unwrap().message_id, "b49");
            assert!(s.read(3).unwrap().is_none(), "settled");
        }
    }

    /// 40 pending messages `m00`..`m39` of `payload_len` bytes each; returns the store dir's
    /// record spans by message id.
    fn forty(dir: &Path, payload_len: usize) -> Vec<RecordSpan> {
        let mut s = Store::open(dir, u64::MAX).unwrap();
        for i in 0..40 {
            s.append("dev", &format!("m{i:02}"), 1000, Some(&vec![b'7'; payload_len])).unwrap();
        }
        drop(s);
        let v = survey(dir).unwrap();
        assert!(v.warnings.is_empty(), "{:?}", v.warnings);
        assert_eq!(v.records.len(), 40);
        v.records
    }

    fn pending_ids(s: &mut Store) -> Vec<String> {
        s.pending_after(0, usize::MAX).unwrap().into_iter().map(|m| m.message_id).collect()
    }

    fn patch(path: &Path, at: u64, bytes: &[u8]) {
        OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, at).unwrap();
    }

    fn seen_ids(s: &mut Store) -> Vec<IdDigest> {
        s.take_live_seen(0).into_iter().map(|(_, d, _)| d).collect()
    }

    #[test]
    fn a_flipped_byte_loses_only_its_record_and_new_appends_go_to_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let spans = forty(dir.path(), 20);
        let r20 = &spans[20];
        let before = std::fs::read(&r20.file).unwrap();
        // A byte inside record 20's body (its payload).
        let at = r20.offset + r20.len - 5;
        patch(&r20.file, at, &[before[at as usize] ^ 0x40]);
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        let want: Vec<String> = (0..40).filter(|i| *i != 20).map(|i| format!("m{i:02}")).collect();
        assert_eq!(pending_ids(&mut s), want);
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        let w = s.warnings[0].clone();
        assert_eq!(
            (w.file.clone(), w.offset, w.skipped, w.kind, w.cut),
            (r20.file.clone(), r20.offset, r20.len, DamageKind::Corrupt, false)
        );
        let seen = seen_ids(&mut s);
        for i in 21..40 {
            assert!(seen.contains(&digest(&format!("m{i:02}"))), "replay id m{i} forgotten");
        }
        // The damaged segment is left as it is; new records start a new segment.
        assert_eq!(s.append("dev", "after", 1000, Some(b"1")).unwrap(), 41);
        assert_eq!(std::fs::read(&r20.file).unwrap().len(), before.len());
        drop(s);
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(s.segments.len(), 2);
        assert_eq!(s.warnings, vec![w], "the same region, reported again, nothing new");
        assert_eq!(pending_ids(&mut s).last().map(String::as_str), Some("after"));
        assert_eq!(s.pending_count().unwrap(), 40);
    }

    #[test]
    fn a_zeroed_page_loses_only_the_records_it_touches() {
        let dir = tempfile::tempdir().unwrap();
        let spans = forty(dir.path(), 500);
        let file = spans[0].file.clone();
        patch(&file, 4096, &[0u8; 4096]);
        let touched = |r: &RecordSpan| r.offset < 8192 && r.offset + r.len > 4096;
        let want: Vec<String> =
            spans.iter().filter(|r| !touched(r)).map(|r| r.message_id.clone().unwrap()).collect();
        assert!(want.len() < 40 && want.len() > 25, "{}", want.len());
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(pending_ids(&mut s), want);
        let first_lost = spans.iter().find(|r| touched(r)).unwrap();
        let first_after = spans.iter().find(|r| r.offset >= 8192).unwrap();
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert_eq!(
            (s.warnings[0].offset, s.warnings[0].skipped),
            (first_lost.offset, first_after.offset - first_lost.offset)
        );
        assert_eq!(s.warnings[0].kind, DamageKind::Corrupt, "partly zero: {:?}", s.warnings);
    }

    #[test]
    fn a_zeroed_page_on_record_boundaries_is_reported_as_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let spans = forty(dir.path(), 20);
        let (a, b) = (&spans[3], &spans[9]);
        patch(&a.file, a.offset, &vec![0u8; (b.offset - a.offset) as usize]);
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(s.pending_count().unwrap(), 34);
        assert_eq!(s.warnings[0].kind, DamageKind::Zeroed);
        assert_eq!((s.warnings[0].offset, s.warnings[0].skipped), (a.offset, b.offset - a.offset));
        assert_eq!(pending_ids(&mut s)[3], "m09");
    }

    #[test]
    fn a_huge_length_field_does_not_hide_the_records_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let spans = forty(dir.path(), 20);
        for len in [u32::MAX, MAX_RECORD, 1 << 20] {
            patch(&spans[5].file, spans[5].offset, &len.to_le_bytes());
            let mut s = Store::open(dir.path(), u64::MAX).unwrap();
            assert_eq!(s.pending_count().unwrap(), 39, "len {len}");
            assert!(!pending_ids(&mut s).contains(&"m05".to_string()));
            assert_eq!(
                (s.warnings[0].offset, s.warnings[0].skipped),
                (spans[5].offset, spans[5].len)
            );
        }
    }

    #[test]
    fn a_damaged_or_truncated_segment_header_loses_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let spans = forty(dir.path(), 20);
        let seg = spans[0].file.clone();
        // A flipped byte in the header: the key file still verifies the records.
        patch(&seg, 3, b"X");
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(s.pending_count().unwrap(), 40);
        assert_eq!(s.warnings.len(), 1);
        let w = &s.warnings[0];
        assert_eq!((w.kind, w.offset, w.skipped), (DamageKind::SegmentHeader, 0, HEADER_LEN));
        s.append("dev", "new", 1000, Some(b"1")).unwrap();
        drop(s);
        // The key file gone too: a new segment's header holds the key.
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(s.pending_count().unwrap(), 41);
        assert!(read_key_file(dir.path()).is_some(), "the key file is written back");
        drop(s);
        // A crash while the next segment was being created: its header is cut short.
        let next = seg_path(dir.path(), 900);
        std::fs::write(&next, &SEG_MAGIC[..5]).unwrap();
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(s.pending_count().unwrap(), 41);
        let w = s.warnings.iter().find(|w| w.file == next).unwrap().clone();
        assert_eq!((w.kind, w.offset, w.skipped, w.cut), (DamageKind::SegmentHeader, 0, 5, true));
        // That segment is repaired and written to; ids keep growing past its name.
        assert_eq!(s.append("dev", "later", 1000, Some(b"1")).unwrap(), 900);
        drop(s);
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        assert!(s.warnings.iter().all(|w| w.file != next), "{:?}", s.warnings);
        assert_eq!(pending_ids(&mut s).last().map(String::as_str), Some("later"));
        assert_eq!(s.pending_count().unwrap(), 42);
    }

    #[test]
    fn records_that_nothing_can_verify_refuse_to_open_rather_than_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let spans = forty(dir.path(), 20);
        patch(&spans[0].file, 3, b"X");
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let e = Store::open(dir.path(), u64::MAX).err().expect("must refuse");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("no record can be verified"), "{e}");
        // Positive control: with the header intact the key is found there.
        patch(&spans[0].file, 3, &SEG_MAGIC[3..4]);
        assert_eq!(Store::open(dir.path(), u64::MAX).unwrap().pending_count().unwrap(), 40);
    }

    /// An ACCEPT record for `device` framed with `key` (or with a plain CRC-32, when `key` is
    /// None), as a device could write it into its message id (which must be UTF-8: the nonce in
    /// the forged message id is varied until the checksum bytes are), hoping recovery finds it
    /// while scanning through a damaged record.
    fn forged(device: &str, key: Option<u64>) -> String {
        for nonce in 0u32.. {
            let mut b = vec![0u8; 8];
            b.push(ACCEPT);
            b.extend_from_slice(&7777u64.to_le_bytes());
            // An expiry in 2025 whose bytes are all ASCII.
            b.extend_from_slice(&0x692D_7E7Fi64.to_le_bytes());
            b.push(1);
            put_str(&mut b, device);
            put_str(&mut b, &format!("forged{nonce}"));
            b.extend_from_slice(&2u32.to_le_bytes());
            b.extend_from_slice(b"{}");
            match key {
                Some(k) => frame(&mut b, k),
                None => {
                    frame(&mut b, 0);
                    let plain = crc32fast::hash(&b[8..]);
                    b[4..8].copy_from_slice(&plain.to_le_bytes());
                }
            }
            if let Ok(s) = String::from_utf8(b) {
                return s;
            }
        }
        unreachable!()
    }

    #[test]
    fn a_record_forged_inside_a_message_id_is_not_recovered() {
        for know_key in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = Store::open(dir.path(), u64::MAX).unwrap();
            s.append("dev", "m0", 1000, Some(b"1")).unwrap();
            // A plain CRC (all a device can compute), or the store's secret key: the positive
            // control, which shows that the scan does look inside the damaged record.
            let mid = forged("victim", know_key.then_some(s.key));
            let at = s.append("dev", &mid, 1000, Some(b"1")).unwrap();
            s.append("dev", "m2", 1000, Some(b"1")).unwrap();
            let loc = s.pending[&(at as u64)];
            drop(s);
            // Damage the carrier's checksum, so that recovery scans through its bytes.
            let seg = seg_path(dir.path(), 1);
            patch(&seg, loc.offset + 4, b"\xff\xff");
            let mut s = Store::open(dir.path(), u64::MAX).unwrap();
            let devices: Vec<String> =
                s.pending_after(0, usize::MAX).unwrap().into_iter().map(|m| m.device_id).collect();
            assert_eq!(devices.contains(&"victim".to_string()), know_key, "{devices:?}");
            assert_eq!(devices.iter().filter(|d| *d == "dev").count(), 2, "{devices:?}");
        }
    }

    #[test]
    fn segments_of_the_old_format_are_read_and_never_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        // The format before segment headers: records with a plain CRC-32, from offset 0.
        let mut file = Vec::new();
        let mut spans = Vec::new();
        for i in 0..10u64 {
            let mut b = vec![0u8; 8];
            b.push(ACCEPT);
            b.extend_from_slice(&(i + 1).to_le_bytes());
            b.extend_from_slice(&1000i64.to_le_bytes());
            b.push(1);
            put_str(&mut b, "dev");
            put_str(&mut b, &format!("old{i}"));
            b.extend_from_slice(&1u32.to_le_bytes());
            b.push(b'1');
            let crc = crc32fast::hash(&b[8..]);
            let len = (b.len() - 8) as u32;
            b[0..4].copy_from_slice(&len.to_le_bytes());
            b[4..8].copy_from_slice(&crc.to_le_bytes());
            spans.push((file.len(), b.len()));
            file.extend_from_slice(&b);
        }
        // A flipped byte in record 4 of the old segment, too.
        file[spans[4].0 + 12] ^= 1;
        let seg = seg_path(dir.path(), 1);
        std::fs::write(&seg, &file).unwrap();
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(s.pending_count().unwrap(), 9);
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert_eq!(
            (s.warnings[0].kind, s.warnings[0].offset, s.warnings[0].skipped),
            (DamageKind::Corrupt, spans[4].0 as u64, spans[4].1 as u64)
        );
        assert_eq!(s.append("dev", "new", 1000, Some(b"1")).unwrap(), 11);
        drop(s);
        assert_eq!(std::fs::read(&seg).unwrap(), file, "the old segment is never written");
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(s.pending_count().unwrap(), 10);
        assert_eq!(pending_ids(&mut s).last().map(String::as_str), Some("new"));
    }

    #[test]
    fn odd_files_and_empty_segments_are_reported_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        forty(dir.path(), 20);
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), b"outside").unwrap();
        let odd = [
            "seg-1.log",
            "seg-+0000000000000002.log",
            "seg-abc.log",
            "seg-0000000000000003.log.bak",
        ];
        for n in odd {
            std::fs::write(dir.path().join(n), b"junk").unwrap();
        }
        std::os::unix::fs::symlink(outside.path(), seg_path(dir.path(), 500)).unwrap();
        std::fs::create_dir(seg_path(dir.path(), 600)).unwrap();
        // An empty segment between two real ones is damage (no header) but loses nothing.
        File::create(seg_path(dir.path(), 0)).unwrap();
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(s.pending_count().unwrap(), 40);
        let ignored: Vec<String> = s
            .warnings
            .iter()
            .filter(|w| w.kind == DamageKind::IgnoredFile)
            .map(|w| w.file.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(ignored.len(), 6, "{:?}", s.warnings);
        let empty = s.warnings.iter().find(|w| w.file == seg_path(dir.path(), 0)).unwrap();
        assert_eq!((empty.kind, empty.skipped), (DamageKind::SegmentHeader, 0));
        s.append("dev", "new", 1000, Some(b"1")).unwrap();
        drop(s);
        assert_eq!(std::fs::read(outside.path()).unwrap(), b"outside");
        for n in odd {
            assert_eq!(std::fs::read(dir.path().join(n)).unwrap(), b"junk");
        }
        assert_eq!(Store::open(dir.path(), u64::MAX).unwrap().pending_count().unwrap(), 41);
    }

    #[test]
    fn a_settle_that_survives_its_lost_accepts_never_settles_a_new_message() {
        let dir = tempfile::tempdir().unwrap();
        let spans = forty(dir.path(), 20);
        {
            let mut s = Store::open(dir.path(), u64::MAX).unwrap();
            let last = s.read(40).unwrap().unwrap();
            s.settle(&[answer(&last, 200, b"")], 0).unwrap();
        }
        // Lose records 30..39 (ids 31..40); the SETTLE of id 40 after them survives.
        let (a, b) = (&spans[30], &spans[39]);
        patch(&a.file, a.offset, &vec![0xA5; (b.offset + b.len - a.offset) as usize]);
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(s.pending_count().unwrap(), 30);
        let id = s.append("dev", "fresh", 1000, Some(b"1")).unwrap();
        assert!(id > 40, "id {id} reused");
        drop(s);
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(pending_ids(&mut s).last().map(String::as_str), Some("fresh"));
    }

    #[test]
    fn settled_expired_segments_are_deleted_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        let big = vec![b'x'; 1 << 20];
        // Enough to fill more than one segment.
        let n = (SEGMENT_BYTES / (1 << 20)) + 8;
        for i in 0..n {
            s.append("d", &format!("m{i}"), 100, Some(&big)).unwrap();
        }
        assert!(s.segments.len() >= 2);
        for (first, m) in &s.segments {
            let len = std::fs::metadata(seg_path(dir.path(), *first)).unwrap().len();
            if *first == s.current_id {
                assert!(len >= m.bytes, "the current segment: its records and reserved space");
            } else {
                assert_eq!(len, m.bytes, "a finished segment is trimmed to its records");
            }
        }
        assert_eq!(s.prune(1000).unwrap(), 0, "pending messages keep their segment");
        let all = s.pending_after(0, usize::MAX).unwrap();
        let answers: Vec<Done> = all.iter().map(|m| answer(m, 200, b"")).collect();
        s.settle(&answers, 0).unwrap();
        assert_eq!(s.prune(50).unwrap(), 0, "ids still inside their window keep their segment");
        let before = s.disk_bytes();
        assert!(s.prune(1000).unwrap() >= 1);
        assert!(s.disk_bytes() < before);
        drop(s);
        let s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(s.pending_count().unwrap(), 0);
    }

    #[test]
    fn with_a_syncer_running_pruned_segments_are_deleted_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), u64::MAX).unwrap();
        let mut y = s.start_syncer().unwrap();
        let big = vec![b'x'; 1 << 20];
        for i in 0..(SEGMENT_BYTES / (1 << 20)) + 8 {
            s.append("d", &format!("m{i}"), 100, Some(&big)).unwrap();
        }
        let all = s.pending_after(0, usize::MAX).unwrap();
        let answers: Vec<Done> = all.iter().map(|m| answer(m, 200, b"")).collect();
        s.settle(&answers, 0).unwrap();
        let oldest = seg_path(dir.path(), *s.segments.keys().next().unwrap());
        assert!(s.prune(1000).unwrap() >= 1);
        // Gone from the store at once, from the disk at the syncer's next pass (not on the
        // broker thread, which calls prune).
        assert!(oldest.exists(), "deleted by the caller");
        // A deletion that fails is reported by the next prune (positive control for the
        // error path: a non-empty directory where a segment was expected).
        let stuck = dir.path().join("stuck");
        std::fs::create_dir(&stuck).unwrap();
        std::fs::write(stuck.join("f"), b"x").unwrap();
        s.sync.doomed.lock().unwrap().push(stuck);
        y.stop();
        assert!(!oldest.exists(), "the syncer's last pass deletes what was pruned");
        assert!(s.prune(1000).is_err(), "the failed deletion is reported");
        assert!(s.prune(1000).is_ok(), "once");
        // With no syncer running, prune deletes for itself.
        assert!(!s.sync.running.load(Ordering::SeqCst));
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path(), 1 << 20).unwrap();
        let e = Store::open(dir.path(), 1 << 20).err().expect("second open must fail");
        assert!(e.to_string().contains("in use"), "{e}");
        drop(first);
        assert!(Store::open(dir.path(), 1 << 20).is_ok());
    }

    #[test]
    fn syncer_runs_a_last_pass_when_stopped_and_is_joined() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), 1 << 20).unwrap();
        let mut y = s.start_syncer().unwrap();
        s.append("d", "m", 10, Some(b"1")).unwrap();
        // Stopped long before its first periodic pass (1 s): only the final pass can count.
        let before = s.sync.passes.load(Ordering::Relaxed);
        y.stop();
        assert_eq!(before, 0);
        assert_eq!(s.sync.passes.load(Ordering::Relaxed), 1, "stop() runs one last sync");
        assert!(y.0.is_joined(), "the thread was joined");
        // The syncer only ever syncs the files the store told it about.
        assert_eq!(s.sync.files.lock().unwrap().len(), 1);
    }
}
