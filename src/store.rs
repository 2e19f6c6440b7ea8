//! The plugin's durable state: the outbox of accepted messages, the dead letters, and the ids
//! the replay check must remember across restarts. One SQLite file, WAL mode, written only by
//! the broker thread.
//!
//! Durability: each accepted message is committed (outbox row + seen id, one transaction) before
//! the callback returns, i.e. before the broker acknowledges the publish. With
//! `synchronous=NORMAL` in WAL mode a commit is a `write()` to the WAL without `fsync`: it
//! survives `kill -9` of the broker (the data is in the kernel), and a power loss can lose the
//! commits since the last checkpoint. The checkpointer thread runs a checkpoint (which fsyncs)
//! every [`CHECKPOINT_INTERVAL`], so that window is about one second. The broker thread never
//! runs a checkpoint itself (`wal_autocheckpoint=0`), so it never waits on `fsync`.

use crate::replay::IdDigest;
use rusqlite::{params, Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes counted against `spool_max_bytes` besides the payload, per queued message.
const ROW_OVERHEAD: u64 = 64;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    accepted_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    accepted_at INTEGER NOT NULL,
    status INTEGER NOT NULL,
    body BLOB NOT NULL,
    failed_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    device_id TEXT NOT NULL,
    digest BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (device_id, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_expiry ON seen (expires_at);
";

/// A queued message as the forwarder needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub id: i64,
    pub device_id: String,
    pub message_id: String,
    pub payload: Vec<u8>,
}

impl QueuedMessage {
    fn spool_bytes(&self) -> u64 {
        spool_cost(&self.device_id, &self.message_id, self.payload.len())
    }
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
    Db(rusqlite::Error),
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendError::Full { queued_bytes, max } => {
                write!(f, "outbox full ({queued_bytes} of {max} bytes queued)")
            }
            AppendError::Db(e) => write!(f, "outbox write failed: {e}"),
        }
    }
}

/// The broker thread's connection to the state file.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    queued_bytes: u64,
    max_bytes: u64,
}

impl Store {
    /// Opens (creating if needed) the state file.
    pub fn open(path: &Path, max_bytes: u64) -> rusqlite::Result<Store> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                // Let SQLite report the real problem if this fails.
                let _ = std::fs::create_dir_all(dir);
            }
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_millis(200))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "{}: journal_mode WAL refused (got {mode})",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=0;")?;
        conn.execute_batch(SCHEMA)?;
        let queued_bytes: i64 = conn.query_row(
            "SELECT COALESCE(SUM(length(device_id) + length(message_id) + length(payload) + ?1), 0) FROM outbox",
            [ROW_OVERHEAD as i64],
            |r| r.get(0),
        )?;
        Ok(Store { conn, path: path.to_owned(), queued_bytes: queued_bytes as u64, max_bytes })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes currently counted against the cap.
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

    /// Durably records an accepted message: its id for replay protection and, when `payload`
    /// is given, the message itself in the outbox. Returns the outbox row id.
    pub fn append(
        &mut self,
        device: &str,
        message_id: &str,
        digest: &IdDigest,
        expires_at: i64,
        payload: Option<&[u8]>,
        now: i64,
    ) -> Result<Option<i64>, AppendError> {
        if let Some(p) = payload {
            self.check_room(device, message_id, p.len())?;
        }
        let tx = self.conn.transaction().map_err(AppendError::Db)?;
        tx.prepare_cached(
            "INSERT OR REPLACE INTO seen (device_id, digest, expires_at) VALUES (?1, ?2, ?3)",
        )
        .and_then(|mut s| s.execute(params![device, &digest[..], expires_at]))
        .map_err(AppendError::Db)?;
        let id = match payload {
            Some(p) => {
                tx.prepare_cached("INSERT INTO outbox (device_id, message_id, payload, accepted_at) VALUES (?1, ?2, ?3, ?4)")
                    .and_then(|mut s| s.execute(params![device, message_id, p, now]))
                    .map_err(AppendError::Db)?;
                Some(tx.last_insert_rowid())
            }
            None => None,
        };
        tx.commit().map_err(AppendError::Db)?;
        if let Some(p) = payload {
            self.queued_bytes += spool_cost(device, message_id, p.len());
        }
        Ok(id)
    }

    /// Outbox rows with `id > after`, oldest first.
    pub fn pending_after(&self, after: i64, limit: usize) -> rusqlite::Result<Vec<QueuedMessage>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, device_id, message_id, payload FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], |r| {
            Ok(QueuedMessage {
                id: r.get(0)?,
                device_id: r.get(1)?,
                message_id: r.get(2)?,
                payload: r.get(3)?,
            })
        })?;
        rows.collect()
    }

    /// Number of messages waiting in the outbox.
    pub fn pending_count(&self) -> rusqlite::Result<i64> {
        self.conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
    }

    /// Removes delivered messages and moves final failures to the dead-letter table, in one
    /// transaction (one commit per batch, not per message).
    pub fn settle(
        &mut self,
        delivered: &[&QueuedMessage],
        dead: &[(&QueuedMessage, u16, &[u8])],
        now: i64,
    ) -> rusqlite::Result<()> {
        if delivered.is_empty() && dead.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        {
            let mut del = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
            for m in delivered {
                del.execute([m.id])?;
            }
            let mut dl = tx.prepare_cached(
                "INSERT OR REPLACE INTO dead_letter (id, device_id, message_id, payload, accepted_at, status, body, failed_at)
                 SELECT id, device_id, message_id, payload, accepted_at, ?2, ?3, ?4 FROM outbox WHERE id = ?1",
            )?;
            for (m, status, body) in dead {
                dl.execute(params![m.id, *status as i64, body, now])?;
                del.execute([m.id])?;
            }
        }
        tx.commit()?;
        let freed: u64 = delivered.iter().map(|m| m.spool_bytes()).sum::<u64>()
            + dead.iter().map(|(m, _, _)| m.spool_bytes()).sum::<u64>();
        self.queued_bytes = self.queued_bytes.saturating_sub(freed);
        Ok(())
    }

    /// Remembered ids still inside their window, for rebuilding the replay cache at start.
    pub fn live_seen(&self, now: i64) -> rusqlite::Result<Vec<(String, IdDigest, i64)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT device_id, digest, expires_at FROM seen WHERE expires_at >= ?1")?;
        let rows = stmt.query_map([now], |r| {
            let blob: Vec<u8> = r.get(1)?;
            let mut d = [0u8; 16];
            if blob.len() == 16 {
                d.copy_from_slice(&blob);
            }
            Ok((r.get(0)?, d, r.get(2)?))
        })?;
        rows.collect()
    }

    /// Forgets ids whose window has closed.
    pub fn prune_seen(&mut self, now: i64) -> rusqlite::Result<usize> {
        self.conn.prepare_cached("DELETE FROM seen WHERE expires_at < ?1")?.execute([now])
    }

    /// Number of dead letters.
    pub fn dead_letter_count(&self) -> rusqlite::Result<i64> {
        self.conn.query_row("SELECT COUNT(*) FROM dead_letter", [], |r| r.get(0))
    }
}

/// Runs WAL checkpoints (and their fsync) off the broker thread.
pub struct Checkpointer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub fn start(path: &Path) -> std::io::Result<Checkpointer> {
        let path = path.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle =
            std::thread::Builder::new().name("iotgw-checkpoint".into()).spawn(move || {
                let conn = Connection::open_with_flags(
                    &path,
                    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                );
                let Ok(conn) = conn else { return };
                let _ = conn.busy_timeout(Duration::from_millis(100));
                loop {
                    std::thread::park_timeout(CHECKPOINT_INTERVAL);
                    // PASSIVE never blocks the writer; a final one runs on shutdown.
                    let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                }
            })?;
        Ok(Checkpointer { stop, handle: Some(handle) })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::digest;

    #[test]
    fn append_then_reopen_keeps_messages_and_seen_ids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("outbox.db");
        {
            let mut s = Store::open(&p, 1 << 20).unwrap();
            let id = s.append("d1", "m1", &digest("m1"), 1300, Some(b"{}"), 1000).unwrap();
            assert_eq!(id, Some(1));
            s.append("d1", "m2", &digest("m2"), 900, None, 1000).unwrap();
        }
        let s = Store::open(&p, 1 << 20).unwrap();
        let pending = s.pending_after(0, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].message_id, "m1");
        assert_eq!(s.queued_bytes(), (2 + 2 + 2 + ROW_OVERHEAD as usize) as u64);
        let live = s.live_seen(1000).unwrap();
        assert_eq!(live, vec![("d1".to_string(), digest("m1"), 1300)]);
    }

    #[test]
    fn cap_refuses_new_messages_and_keeps_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("o.db"), 200).unwrap();
        s.append("d", "m1", &digest("m1"), 10, Some(&[b'x'; 100]), 0).unwrap();
        let e = s.append("d", "m2", &digest("m2"), 10, Some(&[b'x'; 100]), 0).unwrap_err();
        assert!(matches!(e, AppendError::Full { .. }), "{e}");
        assert_eq!(s.pending_count().unwrap(), 1);
        // A refused message is not remembered as seen either.
        assert_eq!(s.live_seen(0).unwrap().len(), 1);
    }

    #[test]
    fn settle_deletes_delivered_and_dead_letters_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("o.db"), 1 << 20).unwrap();
        for m in ["a", "b", "c"] {
            s.append("d", m, &digest(m), 10, Some(b"1"), 0).unwrap();
        }
        let rows = s.pending_after(0, 10).unwrap();
        s.settle(&[&rows[0]], &[(&rows[1], 400, b"bad".as_slice())], 5).unwrap();
        let left = s.pending_after(0, 10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].message_id, "c");
        assert_eq!(s.dead_letter_count().unwrap(), 1);
        assert_eq!(s.queued_bytes(), rows[2].spool_bytes());
        assert_eq!(s.pending_after(rows[1].id, 10).unwrap().len(), 1);
    }

    #[test]
    fn prune_seen_forgets_closed_windows() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("o.db"), 1 << 20).unwrap();
        s.append("d", "old", &digest("old"), 10, None, 0).unwrap();
        s.append("d", "new", &digest("new"), 100, None, 0).unwrap();
        assert_eq!(s.prune_seen(50).unwrap(), 1);
        assert_eq!(s.live_seen(0).unwrap().len(), 1);
    }
}
