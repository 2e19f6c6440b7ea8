//! The plugin's durable state: the outbox of accepted messages and the ids the replay check must
//! remember across restarts, as a segmented append-only log written only by the broker thread;
//! dead letters as JSON lines beside it.
//!
//! Why a log and not SQLite: the append is on the per-message path of the broker thread. A SQLite
//! WAL commit per message measured 24 µs (two tables) and ~6 µs (one table) on this machine, and
//! under sustained load its WAL never resets, so it grows without bound. A record here is one
//! `write()` (about 1–2 µs; BENCHMARKS.md), and disk space is reclaimed by deleting whole segments.
//!
//! Layout of the directory (`plugin_opt_spool_path`):
//! - `seg-<first id>.log`: records `[u32 len][u32 crc32(body)][body]`, body = `ACCEPT` (id,
//!   expiry, device, message id, payload) or `SETTLE` (ids now delivered or dead-lettered);
//! - `dead_letters.jsonl`: one JSON object per final failure (status, backend body, payload).
//!
//! Durability: a record is written (not fsynced) before the callback returns, i.e. before the
//! broker acknowledges the publish, so it survives `kill -9` and crashes of the broker (the data
//! is in the kernel). The syncer thread `fdatasync`s every [`SYNC_INTERVAL`], so a power loss can
//! lose about the last second. A torn record at the end of the last segment (crash mid-write) is
//! detected by its CRC and cut off at start-up.
//!
//! Space: a segment is deleted once every message in it is settled and every id in it has left
//! its replay window, oldest first. A message still pending keeps its segment (and the newer ones)
//! on disk; `spool_max_bytes` counts the bytes of pending messages.

use crate::replay::{self, IdDigest};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// A new segment is started past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Bytes counted against `spool_max_bytes` besides the payload, per queued message.
const ROW_OVERHEAD: u64 = 64;
/// Largest record accepted when reading back (guards against a corrupt length).
const MAX_RECORD: u32 = 64 << 20;

/// Ids are issued from 1 upwards, one per message: none gets near this in practice (2^62 at a
/// million a second is 146,000 years), so a larger one read back is damage that passed the CRC
/// (or a crafted file). Ignoring it keeps `next_id + 1` from overflowing (found by fuzzing) and
/// ids positive as `i64`; `append` never issues one.
const MAX_ID: u64 = 1 << 62;

const ACCEPT: u8 = 1;
const SETTLE: u8 = 2;
const DELIVERED: u8 = 1;
const DEAD: u8 = 2;

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
    /// `forward::device_hash` of the device: which lane it goes to, without reading the record.
    device_hash: u64,
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

/// The broker thread's handle on the outbox.
pub struct Store {
    dir: PathBuf,
    /// Segments by their first id.
    segments: BTreeMap<u64, SegMeta>,
    current: File,
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
    dead_letters: u64,
    sync: Arc<SyncShared>,
    /// What recovery found worth telling the operator.
    pub warnings: Vec<String>,
    /// Held for the store's lifetime: one writer per directory.
    _lock: File,
}

/// What the syncer needs to find the files to flush.
#[derive(Default)]
struct SyncShared {
    files: Mutex<Vec<PathBuf>>,
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("seg-{first:016}.log"))
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u16).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Frames `body` (already in `buf` after 8 reserved bytes) with its length and CRC.
fn frame(buf: &mut [u8]) {
    let body_len = (buf.len() - 8) as u32;
    let crc = crc32fast::hash(&buf[8..]);
    buf[0..4].copy_from_slice(&body_len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.at..self.at + n)?;
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
    fn string(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

fn decode_accept(body: &[u8]) -> Option<Accept> {
    let mut c = Cursor { b: body, at: 1 };
    let id = c.u64().filter(|id| *id <= MAX_ID)?;
    let expires_at = c.u64()? as i64;
    let forwarded = c.u8()? == 1;
    let device = c.string()?;
    let message_id = c.string()?;
    let n = c.u32()? as usize;
    let payload = c.take(n)?.to_vec();
    Some(Accept { id, expires_at, forwarded, device, message_id, payload })
}

/// One segment read back: (offset, body) of each valid record, where valid data ends, file length.
type SegmentScan = (Vec<(u64, Vec<u8>)>, u64, u64);

/// Reads the records of one segment, stopping at the first torn or corrupt one.
fn read_segment(path: &Path) -> io::Result<SegmentScan> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut records = Vec::new();
    let mut at = 0usize;
    while at + 8 <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap_or_default());
        let end = at + 8 + len as usize;
        if len == 0
            || len > MAX_RECORD
            || end > data.len()
            || crc32fast::hash(&data[at + 8..end]) != crc
        {
            break;
        }
        records.push((at as u64, data[at + 8..end].to_vec()));
        at = end;
    }
    Ok((records, at as u64, data.len() as u64))
}

impl Store {
    /// Opens (creating if needed) the outbox directory and recovers its state.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Store> {
        std::fs::create_dir_all(dir)?;
        // Two writers (a second broker, or a second plugin instance) would interleave records.
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock"))?;
        if lock.try_lock().is_err() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another broker or plugin instance", dir.display()),
            ));
        }
        let mut firsts: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        firsts.sort_unstable();
        let mut segments = BTreeMap::new();
        let mut accepts: BTreeMap<u64, (u64, u64, Accept)> = BTreeMap::new();
        let mut settled: Vec<u64> = Vec::new();
        let mut warnings = Vec::new();
        let mut next_id = 1u64;
        let mut last_valid_end = 0u64;
        for (i, first) in firsts.iter().enumerate() {
            let path = seg_path(dir, *first);
            let (records, valid_end, len) = read_segment(&path)?;
            if valid_end < len {
                if i + 1 == firsts.len() {
                    // A torn write at the very end: the crash happened mid-record; cut it off.
                    OpenOptions::new().write(true).open(&path)?.set_len(valid_end)?;
                    warnings.push(format!(
                        "{}: cut {} bytes of an incomplete last record",
                        path.display(),
                        len - valid_end
                    ));
                } else {
                    warnings.push(format!("{}: corrupt data after byte {valid_end}; the rest of this segment is ignored", path.display()));
                }
            }
            let mut meta = SegMeta { bytes: valid_end, ..Default::default() };
            // The segment's name is the id of its first record, readable or not; a later
            // rotation must not reuse the name.
            if *first <= MAX_ID {
                next_id = next_id.max(first + 1);
            }
            for (offset, body) in records {
                match body.first() {
                    Some(&ACCEPT) => {
                        if let Some(a) = decode_accept(&body) {
                            next_id = next_id.max(a.id + 1);
                            meta.max_expiry = meta.max_expiry.max(a.expires_at);
                            accepts.insert(a.id, (*first, offset, a));
                        }
                    }
                    Some(&SETTLE) => {
                        let mut c = Cursor { b: &body, at: 1 };
                        let n = c.u32().unwrap_or(0);
                        for _ in 0..n {
                            match (c.u64(), c.u8()) {
                                (Some(id), Some(_state)) => {
                                    // An id settled here must never be handed out again, even
                                    // when its ACCEPT record is lost: the next start would take
                                    // the new message as settled (found by fuzzing).
                                    if id <= MAX_ID {
                                        next_id = next_id.max(id + 1);
                                        settled.push(id);
                                    }
                                }
                                _ => break,
                            }
                        }
                    }
                    _ => {}
                }
            }
            segments.insert(*first, meta);
            last_valid_end = valid_end;
        }
        let settled: std::collections::HashSet<u64> = settled.into_iter().collect();
        let mut pending = BTreeMap::new();
        let mut queued_bytes = 0;
        let mut recovered_seen = Vec::with_capacity(accepts.len());
        for (id, (seg, offset, a)) in accepts {
            recovered_seen.push((a.device.clone(), replay::digest(&a.message_id), a.expires_at));
            if a.forwarded && !settled.contains(&id) {
                let cost = spool_cost(&a.device, &a.message_id, a.payload.len());
                queued_bytes += cost;
                pending.insert(
                    id,
                    Loc {
                        segment: seg,
                        offset,
                        cost,
                        device_hash: crate::forward::device_hash(&a.device),
                    },
                );
                if let Some(m) = segments.get_mut(&seg) {
                    m.pending += 1;
                }
            }
        }
        let dead_letters = std::fs::read(dir.join("dead_letters.jsonl"))
            .map(|d| d.iter().filter(|b| **b == b'\n').count() as u64)
            .unwrap_or(0);
        // Continue the last segment, or start the first.
        let (current_id, offset) = match segments.keys().next_back() {
            Some(first) => (*first, last_valid_end),
            None => {
                segments.insert(next_id, SegMeta::default());
                (next_id, 0)
            }
        };
        let path = seg_path(dir, current_id);
        let mut current =
            OpenOptions::new().create(true).read(true).write(true).truncate(false).open(&path)?;
        current.seek(SeekFrom::Start(offset))?;
        let sync = Arc::new(SyncShared::default());
        sync.files.lock().unwrap_or_else(|p| p.into_inner()).push(path);
        Ok(Store {
            dir: dir.to_owned(),
            segments,
            current,
            current_id,
            offset,
            next_id,
            pending,
            queued_bytes,
            max_bytes,
            buf: Vec::with_capacity(1024),
            readers: BTreeMap::new(),
            recovered_seen,
            dead_letters,
            sync,
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

    /// Writes the record in `self.buf` as one `write()`; undoes a partial write.
    fn write_record(&mut self) -> io::Result<u64> {
        frame(&mut self.buf);
        let at = self.offset;
        if let Err(e) = self.current.write_all(&self.buf) {
            // Leave no half record behind (the next start would cut it anyway).
            let _ = self.current.set_len(at);
            let _ = self.current.seek(SeekFrom::Start(at));
            return Err(e);
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
        let first = self.next_id;
        let path = seg_path(&self.dir, first);
        let f =
            OpenOptions::new().create(true).read(true).write(true).truncate(false).open(&path)?;
        self.current = f;
        self.current_id = first;
        self.offset = 0;
        self.segments.insert(first, SegMeta::default());
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
            self.pending.insert(
                id,
                Loc {
                    segment: seg,
                    offset,
                    cost,
                    device_hash: crate::forward::device_hash(device),
                },
            );
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

    /// Every pending message as (id, device hash), oldest first: enough to queue them per lane.
    pub fn pending_index(&self) -> Vec<(i64, u64)> {
        self.pending.iter().map(|(id, l)| (*id as i64, l.device_hash)).collect()
    }

    /// Number of messages waiting for delivery.
    pub fn pending_count(&self) -> io::Result<i64> {
        Ok(self.pending.len() as i64)
    }

    /// Records delivered messages and final failures (one record for the whole batch); final
    /// failures are also appended to `dead_letters.jsonl` with the backend's status and body.
    pub fn settle(
        &mut self,
        delivered: &[&QueuedMessage],
        dead: &[(&QueuedMessage, u16, &[u8])],
        now: i64,
    ) -> io::Result<()> {
        let ids: Vec<(u64, u8)> = delivered
            .iter()
            .map(|m| (m.id as u64, DELIVERED))
            .chain(dead.iter().map(|(m, _, _)| (m.id as u64, DEAD)))
            .filter(|(id, _)| self.pending.contains_key(id))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        if !dead.is_empty() {
            let mut lines = String::new();
            for (m, status, body) in dead {
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
            self.dead_letters += dead.len() as u64;
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
            std::fs::remove_file(&path)?;
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

    /// Starts the thread that fdatasyncs the log every [`SYNC_INTERVAL`].
    pub fn start_syncer(&self) -> io::Result<Syncer> {
        Syncer::start(self.sync.clone(), self.dir.clone())
    }
}

/// fdatasyncs the outbox off the broker thread.
pub struct Syncer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Syncer {
    fn start(shared: Arc<SyncShared>, dir: PathBuf) -> io::Result<Syncer> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new().name("iotgw-sync".into()).spawn(move || {
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
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
            }
        })?;
        Ok(Syncer { stop, handle: Some(handle) })
    }

    /// Runs a last sync and joins the thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
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
            s.settle(&[&rows[0]], &[(&rows[1], 400, b"bad".as_slice())], 5).unwrap();
            assert_eq!(s.queued_bytes(), spool_cost("d", "c", 1));
            // Settling twice changes nothing.
            s.settle(&[&rows[0]], &[], 6).unwrap();
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
        let p = s.pending_after(0, 10).unwrap();
        assert_eq!(p.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), ["whole"]);
        // Appending continues cleanly after the cut, with a fresh id.
        assert_eq!(s.append("d", "next", 10, Some(b"3")).unwrap(), 2);
        drop(s);
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        assert!(s.warnings.is_empty());
        assert_eq!(s.pending_count().unwrap(), 2);
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
        assert_eq!(s.prune(1000).unwrap(), 0, "pending messages keep their segment");
        let all = s.pending_after(0, usize::MAX).unwrap();
        let refs: Vec<&QueuedMessage> = all.iter().collect();
        s.settle(&refs, &[], 0).unwrap();
        assert_eq!(s.prune(50).unwrap(), 0, "ids still inside their window keep their segment");
        let before = s.disk_bytes();
        assert!(s.prune(1000).unwrap() >= 1);
        assert!(s.disk_bytes() < before);
        drop(s);
        let s = Store::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(s.pending_count().unwrap(), 0);
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
    fn syncer_starts_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), 1 << 20).unwrap();
        let mut y = s.start_syncer().unwrap();
        s.append("d", "m", 10, Some(b"1")).unwrap();
        y.stop();
    }
}
