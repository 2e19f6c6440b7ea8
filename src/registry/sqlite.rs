//! The SQLite registry file.
//!
//! The broker thread never touches SQLite after start-up. [`Registry::open`] loads every enabled
//! device into memory (at init, before any client is served); from then on a watcher thread owns
//! the only connection. It polls `PRAGMA data_version` (which changes whenever another connection
//! commits) and hands a fresh [`Snapshot`] to the broker thread, which installs it in
//! [`Registry::apply_updates`] (from the tick). So a lookup is a hash-map probe, a miss costs no
//! I/O, and a registry locked by another process (`BEGIN EXCLUSIVE`) only delays the watcher.
//!
//! Bounds, stated here because they are the contract:
//! - a disabled or removed device is refused within one poll ([`POLL_INTERVAL`]) plus the time to
//!   load the table, plus at most one broker tick (the watcher wakes the broker loop);
//! - a device added a moment ago: its messages are refused as `unknown_device` until the watcher
//!   has seen the commit. A miss makes the watcher look at once (at most every
//!   [`NUDGE_MIN_INTERVAL`]), so a device whose first message arrived before its row was loaded is
//!   accepted from a message a few milliseconds later. (The previous design looked a miss up on
//!   the broker thread and accepted the very first message, at the price of blocking the broker
//!   for up to the busy timeout while another process held the registry locked.)
//!
//! Faults: a file that cannot be read or parsed (missing, replaced by something that is not a
//! database, no `devices` table, I/O errors, a lock held for longer than [`LOCKED_TOO_LONG`])
//! turns [`Registry::health`] stale (see the parent module); a lock released in time is no fault.

use super::{row, Fields, Registry, RegistryError, Shared, Snapshot, Update, Watcher};
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The original schema; every database with it works.
pub const BASE_SCHEMA: &str = "CREATE TABLE devices (device_id TEXT PRIMARY KEY, shared_secret TEXT NOT NULL, created_at INTEGER NOT NULL);";

/// Optional columns the CLI adds, with their SQL type and default.
pub const OPTIONAL_COLUMNS: [(&str, &str); 3] = [
    ("enabled", "INTEGER NOT NULL DEFAULT 1"),
    ("previous_secret", "TEXT"),
    ("previous_secret_expires_at", "INTEGER"),
];

/// How often the watcher looks for registry changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// After a miss the watcher looks at once, but not more often than this, so a flood of unknown
/// ids costs the broker thread one atomic flag and the watcher at most one cheap poll per period.
pub const NUDGE_MIN_INTERVAL: Duration = Duration::from_millis(20);

/// How long the watcher waits for another connection's lock before retrying at the next poll.
/// Bounded so that stopping the watcher never waits long.
const WATCHER_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// At start-up the registry is loaded on the broker thread before any client is served; a CLI
/// write in progress must not make the broker refuse to start.
const OPEN_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A lock held by another connection for longer than this is reported like an unreadable file:
/// whatever that connection is doing, changes are not reaching the broker.
pub const LOCKED_TOO_LONG: Duration = Duration::from_secs(30);

fn is_busy(e: &RegistryError) -> bool {
    matches!(
        e,
        RegistryError::Sqlite(rusqlite::Error::SqliteFailure(f, _))
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Opens the registry read-only.
fn open_readonly(path: &Path, busy: Duration) -> Result<Connection, RegistryError> {
    // SQLite reports a missing file as a generic "unable to open"; say what it is.
    if std::fs::symlink_metadata(path).is_err() {
        return Err(RegistryError::Missing);
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy)?;
    Ok(conn)
}

fn select_sql(conn: &Connection) -> Result<String, RegistryError> {
    let mut cols = Vec::new();
    let mut stmt = conn.prepare("PRAGMA table_info(devices)")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        cols.push(r.get::<_, String>(1)?);
    }
    if cols.is_empty() {
        return Err(RegistryError::NoDevicesTable);
    }
    let has = |c: &str| cols.iter().any(|x| x == c);
    let enabled = if has("enabled") { "enabled" } else { "1" };
    let (prev, until) = if has("previous_secret") && has("previous_secret_expires_at") {
        ("previous_secret", "previous_secret_expires_at")
    } else {
        ("NULL", "NULL")
    };
    Ok(format!(
        "SELECT device_id, shared_secret, {prev}, {until} FROM devices WHERE {enabled} != 0"
    ))
}

impl Fields for rusqlite::Row<'_> {
    fn id(&self) -> Option<String> {
        self.get(0).ok()
    }
    fn secret(&self) -> Option<String> {
        self.get(1).ok()
    }
    fn previous(&self) -> Option<Option<String>> {
        self.get(2).ok()
    }
    fn until(&self) -> Option<Option<i64>> {
        self.get(3).ok()
    }
}

/// Reads every enabled row.
pub fn load_all(conn: &Connection) -> Result<Snapshot, RegistryError> {
    let sql = select_sql(conn)?;
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query([])?;
    let mut snap = Snapshot::default();
    while let Some(r) = rows.next()? {
        snap.add(row(r));
    }
    snap.ignored_previous.sort();
    Ok(snap)
}

/// The connection's change counter: it moves whenever another connection commits.
fn data_version(conn: &Connection) -> Result<i64, RegistryError> {
    Ok(conn.query_row("PRAGMA data_version", [], |r| r.get(0))?)
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The watcher's timing; tests shorten or stretch it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    poll: Duration,
    nudge_min: Duration,
    locked_too_long: Duration,
}

pub(super) const TIMING: Timing =
    Timing { poll: POLL_INTERVAL, nudge_min: NUDGE_MIN_INTERVAL, locked_too_long: LOCKED_TOO_LONG };

/// A connection and what was true of it when the snapshot in use was loaded.
pub(super) struct Opened {
    conn: Connection,
    version: i64,
    ident: Option<(u64, u64)>,
}

/// The watcher thread's state.
struct Poller {
    path: PathBuf,
    conn: Option<Connection>,
    /// The data_version of `conn` when its content was last sent (or loaded at start).
    version: Option<i64>,
    ident: Option<(u64, u64)>,
    /// Whether the last thing sent was a failure (so a failure is sent once per change of state).
    broken: bool,
    busy_since: Option<Instant>,
    timing: Timing,
}

impl Poller {
    /// One look at the file. Ok(Some) when there is a new snapshot to send.
    fn poll(&mut self) -> Result<Option<Snapshot>, RegistryError> {
        // A replaced file (new inode) needs a new connection: the old one reads the old file.
        let now_ident = file_id(&self.path);
        if now_ident.is_none() {
            self.conn = None;
            self.version = None;
            self.ident = None;
            return Err(RegistryError::Missing);
        }
        if now_ident != self.ident {
            self.ident = now_ident;
            self.conn = None;
            self.version = None;
        }
        if self.conn.is_none() {
            self.conn = Some(open_readonly(&self.path, WATCHER_BUSY_TIMEOUT)?);
        }
        let Some(conn) = &self.conn else { return Ok(None) };
        let v = data_version(conn)?;
        if self.version == Some(v) && !self.broken {
            return Ok(None);
        }
        let snap = load_all(conn)?;
        self.version = Some(v);
        Ok(Some(snap))
    }

    /// Polls and turns the outcome into at most one update.
    fn step(&mut self) -> Option<Update> {
        match self.poll() {
            Ok(found) => {
                self.busy_since = None;
                let snap = found?;
                self.broken = false;
                Some(Update::Snapshot(snap))
            }
            Err(e) if is_busy(&e) => {
                // Someone is writing; nothing committed is being missed. Only a lock held for a
                // long time is a fault.
                let since = *self.busy_since.get_or_insert_with(Instant::now);
                let held = since.elapsed();
                if held < self.timing.locked_too_long {
                    return None;
                }
                self.fail(RegistryError::Locked(held))
            }
            Err(e) => {
                self.busy_since = None;
                // Start over with a fresh connection next time.
                self.conn = None;
                self.version = None;
                self.fail(e)
            }
        }
    }

    fn fail(&mut self, e: RegistryError) -> Option<Update> {
        if self.broken {
            return None;
        }
        self.broken = true;
        Some(Update::Broken(e))
    }
}

impl Watcher {
    fn start(
        path: PathBuf,
        opened: Option<Opened>,
        timing: Timing,
        shared: Arc<Shared>,
        tx: Sender<Update>,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Watcher> {
        let s = shared.clone();
        let handle =
            std::thread::Builder::new().name("iotgw-registry".into()).spawn(move || {
                let (conn, version, ident) = match opened {
                    Some(o) => {
                        let _ = o.conn.busy_timeout(WATCHER_BUSY_TIMEOUT);
                        (Some(o.conn), Some(o.version), o.ident)
                    }
                    None => (None, None, None),
                };
                let mut p =
                    Poller { path, conn, version, ident, broken: false, busy_since: None, timing };
                let mut last_poll = Instant::now();
                loop {
                    std::thread::park_timeout(timing.poll.saturating_sub(last_poll.elapsed()));
                    if s.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let nudged = s.nudged.load(Ordering::Acquire);
                    if !nudged && last_poll.elapsed() < timing.poll {
                        continue; // spurious wake-up
                    }
                    if nudged {
                        let since = last_poll.elapsed();
                        if since < timing.nudge_min {
                            std::thread::park_timeout(timing.nudge_min - since);
                            if s.stop.load(Ordering::Acquire) {
                                break;
                            }
                        }
                    }
                    // Cleared before polling: a miss during the poll asks for another one.
                    s.nudged.store(false, Ordering::Release);
                    last_poll = Instant::now();
                    if let Some(u) = p.step() {
                        if tx.send(u).is_err() {
                            break;
                        }
                        wake();
                    }
                }
            })?;
        Ok(Watcher { shared, handle: Some(handle) })
    }
}

/// Creates the registry with the original schema plus our optional columns (CLI and tests).
pub fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(BASE_SCHEMA)?;
    migrate(conn)
}

/// Adds any optional column that is missing. Idempotent; the CLI runs it, never the plugin.
pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("PRAGMA table_info(devices)")?;
    let cols: Vec<String> =
        stmt.query_map([], |r| r.get::<_, String>(1))?.collect::<Result<_, _>>()?;
    for (name, ty) in OPTIONAL_COLUMNS {
        if !cols.iter().any(|c| c == name) {
            conn.execute_batch(&format!("ALTER TABLE devices ADD COLUMN {name} {ty}"))?;
        }
    }
    Ok(())
}

impl Registry {
    /// Opens `path` read-only and loads every device. Fails if the file is missing, unreadable
    /// or has no `devices` table. Runs on the broker thread, at init only.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        // The file's identity before opening it: if it is replaced in between, the watcher sees a
        // different identity at its first poll and reloads.
        let ident = file_id(path);
        let conn = open_readonly(path, OPEN_BUSY_TIMEOUT)?;
        // Read before loading: a commit in between makes the watcher's first poll reload.
        let version = data_version(&conn)?;
        let snap = load_all(&conn)?;
        let mut r = Registry::empty(path.to_owned(), path.display().to_string());
        r.conn = Some(Opened { conn, version, ident });
        r.install(snap);
        Ok(r)
    }

    pub(super) fn watch_with(
        &mut self,
        timing: Timing,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Watcher> {
        let (tx, rx) = std::sync::mpsc::channel();
        let conn = self.conn.take();
        let w = Watcher::start(self.path.clone(), conn, timing, self.shared.clone(), tx, wake)?;
        self.watcher = w.handle.as_ref().map(|h| h.thread().clone());
        self.updates = Some(rx);
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Health, Miss, Unusable, MAX_PROBLEM_LINES};
    use super::*;
    use crate::host::{Level, LogLine};

    const S1: &str = "supersecretkey123";

    fn base_db(dir: &Path) -> PathBuf {
        let p = dir.join("devices.db");
        let c = Connection::open(&p).unwrap();
        c.execute_batch(BASE_SCHEMA).unwrap();
        c.execute("INSERT INTO devices VALUES ('sensor_001', ?1, 0)", [S1]).unwrap();
        p
    }

    fn no_wake() -> Arc<dyn Fn() + Send + Sync> {
        Arc::new(|| {})
    }

    /// Fast polls, so the tests are short; a long lock is "too long" after 1 s.
    const FAST: Timing = Timing {
        poll: Duration::from_millis(20),
        nudge_min: Duration::from_millis(5),
        locked_too_long: Duration::from_secs(1),
    };

    /// Applies updates until `done` holds (bounded).
    fn until(r: &mut Registry, what: &str, mut done: impl FnMut(&Registry) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            r.apply_updates();
            if done(r) {
                return;
            }
            assert!(Instant::now() < deadline, "not within 5 s: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn severities(logs: &[LogLine], sev: Level) -> Vec<&str> {
        logs.iter().filter(|l| l.level == sev).map(|l| l.text.as_str()).collect()
    }

    #[test]
    fn original_schema_works_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let r = Registry::open(&p).unwrap();
        assert_eq!(r.len(), 1);
        let k = r.get("sensor_001").unwrap();
        assert_eq!(&*k.secret, S1.as_bytes());
        assert!(k.previous.is_none());
        assert_eq!(r.get("nope").unwrap_err(), Miss::NotFound);
        assert!(r.health().is_current());
    }

    #[test]
    fn missing_table_or_file_fails_to_open_with_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = Registry::open(&dir.path().join("absent.db")).err().unwrap();
        assert!(matches!(e, RegistryError::Missing), "{e:?}");
        let p = dir.path().join("empty.db");
        Connection::open(&p).unwrap().execute_batch("CREATE TABLE x(a)").unwrap();
        let e = Registry::open(&p).err().unwrap();
        assert!(matches!(e, RegistryError::NoDevicesTable), "{e:?}");
        let p = dir.path().join("junk.db");
        std::fs::write(&p, b"not a database, not at all, just some bytes here").unwrap();
        let e = Registry::open(&p).err().unwrap();
        assert!(matches!(e, RegistryError::Sqlite(_)), "{e:?}");
    }

    #[test]
    fn disabled_device_is_not_loaded_and_previous_secret_has_a_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let c = Connection::open(&p).unwrap();
        migrate(&c).unwrap();
        migrate(&c).unwrap(); // idempotent
        c.execute("INSERT INTO devices (device_id, shared_secret, created_at, enabled) VALUES ('off','0123456789abcdef',0,0)", []).unwrap();
        c.execute("UPDATE devices SET previous_secret='old-secret-0123456', previous_secret_expires_at=100 WHERE device_id='sensor_001'", []).unwrap();
        let r = Registry::open(&p).unwrap();
        assert_eq!(r.get("off").unwrap_err(), Miss::NotFound);
        let k = r.get("sensor_001").unwrap().clone();
        assert_eq!(k.secrets_at(100).count(), 2);
        assert_eq!(k.secrets_at(101).count(), 1);
    }

    /// Issue 8 finding 6: the plugin accepted empty and 5-byte secrets for HMAC.
    #[test]
    fn short_secrets_make_a_device_unusable_and_are_logged_once_per_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let c = Connection::open(&p).unwrap();
        migrate(&c).unwrap();
        for (id, secret) in [("empty", ""), ("five", "abcde"), ("fifteen", "0123456789abcde")] {
            c.execute(
                "INSERT INTO devices (device_id, shared_secret, created_at) VALUES (?1, ?2, 0)",
                [id, secret],
            )
            .unwrap();
        }
        c.execute("INSERT INTO devices (device_id, shared_secret, created_at) VALUES ('sixteen', '0123456789abcdef', 0)", []).unwrap();
        // A BLOB secret is not the schema's TEXT: unusable, not a crash and not a failed load.
        c.execute("INSERT INTO devices (device_id, shared_secret, created_at) VALUES ('blob', x'00112233445566778899aabbccddeeff00', 0)", []).unwrap();
        // A short previous secret is dropped; the current one still works.
        c.execute("UPDATE devices SET previous_secret='tiny', previous_secret_expires_at=9999999999 WHERE device_id='sensor_001'", []).unwrap();
        let mut r = Registry::open(&p).unwrap();
        for (id, bytes) in [("empty", 0), ("five", 5), ("fifteen", 15)] {
            assert_eq!(
                r.get(id).unwrap_err(),
                Miss::Unusable(&Unusable::ShortSecret { bytes }),
                "{id}"
            );
        }
        assert_eq!(
            r.get("blob").unwrap_err(),
            Miss::Unusable(&Unusable::BadColumn { column: "shared_secret" })
        );
        assert_eq!(&*r.get("sixteen").unwrap().secret, b"0123456789abcdef");
        assert_eq!(r.get("sensor_001").unwrap().secrets_at(0).count(), 1);
        assert_eq!(r.len(), 2);
        let logs = r.take_logs();
        let warn = severities(&logs, Level::Warning);
        assert_eq!(warn.len(), 5, "{logs:?}");
        assert!(warn.contains(&"device five is not usable: its secret is shorter than 16 bytes (5); set a new one with `iotgw device rotate-secret`"), "{warn:?}");
        assert!(warn.iter().any(|l| l.starts_with("device sensor_001: previous secret ignored")));
        // Logged once per snapshot: looking the devices up again logs nothing.
        for _ in 0..3 {
            assert!(r.get("five").is_err());
        }
        r.apply_updates();
        assert!(r.take_logs().is_empty());
        // A new snapshot logs them again, once.
        let _w = r.watch_with(FAST, no_wake()).unwrap();
        c.execute(
            "UPDATE devices SET shared_secret='now-long-enough-16' WHERE device_id='five'",
            [],
        )
        .unwrap();
        until(&mut r, "the fixed secret applies", |r| r.get("five").is_ok());
        let logs = r.take_logs();
        assert_eq!(severities(&logs, Level::Warning).len(), 4, "{logs:?}");
    }

    #[test]
    fn problem_lines_are_capped_per_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let c = Connection::open(&p).unwrap();
        for i in 0..100 {
            c.execute("INSERT INTO devices VALUES (?1, 'short', 0)", [format!("d{i:03}")]).unwrap();
        }
        let mut r = Registry::open(&p).unwrap();
        let logs = r.take_logs();
        assert_eq!(logs.len(), MAX_PROBLEM_LINES + 1, "{logs:?}");
        assert!(logs.last().unwrap().text.starts_with("80 more devices are not usable"));
        assert!(r.get("d099").is_err());
    }

    /// Issue 8 finding 3: a miss used to query SQLite on the broker thread and wait up to the
    /// busy timeout (50 ms) while another process held the registry locked.
    #[test]
    fn lookups_never_wait_for_a_locked_registry() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let mut r = Registry::open(&p).unwrap();
        let _w = r.watch_with(FAST, no_wake()).unwrap();
        let lock = Connection::open(&p).unwrap();
        lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let t = Instant::now();
        for i in 0..200 {
            assert_eq!(r.get(&format!("unknown_{i}")).unwrap_err(), Miss::NotFound);
            assert!(r.get("sensor_001").is_ok());
            r.apply_updates();
        }
        let took = t.elapsed();
        lock.execute_batch("ROLLBACK").unwrap();
        // 200 misses at 50 ms each took 10 s before; a hash probe takes microseconds.
        assert!(took < Duration::from_millis(100), "200 misses took {took:?}");
        // A lock that is released in time is not a fault: no log line, still current.
        assert!(r.health().is_current());
        assert!(r.take_logs().is_empty());
    }

    #[test]
    fn a_lock_held_too_long_is_reported_and_its_release_logs_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let mut r = Registry::open(&p).unwrap();
        let _w = r.watch_with(FAST, no_wake()).unwrap();
        let lock = Connection::open(&p).unwrap();
        lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
        until(&mut r, "the long lock is reported", |r| !r.health().is_current());
        assert!(matches!(r.health(), Health::Stale { error: RegistryError::Locked(_), .. }));
        assert!(r.get("sensor_001").is_ok(), "the last good snapshot stays in use");
        lock.execute_batch("ROLLBACK").unwrap();
        until(&mut r, "recovery", |r| r.health().is_current());
        let logs = r.take_logs();
        assert_eq!(severities(&logs, Level::Error).len(), 1, "{logs:?}");
        assert!(severities(&logs, Level::Error)[0].contains("locked by another connection"));
        assert_eq!(severities(&logs, Level::Notice).len(), 1, "{logs:?}");
    }

    #[test]
    fn a_miss_makes_the_watcher_look_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let mut r = Registry::open(&p).unwrap();
        // Polls so rare that only a nudge can explain a quick snapshot.
        let slow = Timing { poll: Duration::from_secs(3600), ..FAST };
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w2 = woken.clone();
        let _w = r
            .watch_with(
                slow,
                Arc::new(move || {
                    w2.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
        Connection::open(&p)
            .unwrap()
            .execute("INSERT INTO devices VALUES ('new_one','0123456789abcdef',0)", [])
            .unwrap();
        let added = Instant::now();
        // The first message of a device added a moment ago is refused...
        assert_eq!(r.get("new_one").unwrap_err(), Miss::NotFound);
        // ...and a later one a few milliseconds on is accepted.
        until(&mut r, "the nudged watcher delivers the new device", |r| r.get("new_one").is_ok());
        assert!(added.elapsed() < Duration::from_secs(2), "{:?}", added.elapsed());
        assert!(woken.load(Ordering::SeqCst) >= 1, "the broker loop was not woken");
    }

    /// The watcher's empty `if` (issue 7): the state loaded at start was sent again at the first
    /// poll. Now the first poll compares with the version read at load time.
    #[test]
    fn watcher_sends_nothing_until_the_database_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let mut r = Registry::open(&p).unwrap();
        let mut w = r.watch_with(FAST, no_wake()).unwrap();
        std::thread::sleep(FAST.poll * 10);
        assert!(!r.apply_updates(), "a snapshot of an unchanged database was sent");
        Connection::open(&p).unwrap().execute("DELETE FROM devices", []).unwrap();
        until(&mut r, "the change arrives", |r| r.is_empty());
        assert!(r.cached("sensor_001").is_none());
        w.stop();
    }

    /// Issue 8 finding 4: a registry replaced by an unreadable file made disable a silent no-op.
    #[test]
    fn unreadable_registry_is_stale_and_logged_once_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let mut r = Registry::open(&p).unwrap();
        let _w = r.watch_with(FAST, no_wake()).unwrap();
        let tmp = dir.path().join("junk");
        std::fs::write(&tmp, b"this is not an SQLite database at all, only bytes").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        until(&mut r, "stale", |r| !r.health().is_current());
        assert!(matches!(r.health(), Health::Stale { error: RegistryError::Sqlite(_), .. }));
        // Many polls later: still one line; the last good snapshot still answers.
        std::thread::sleep(FAST.poll * 10);
        r.apply_updates();
        assert!(r.get("sensor_001").is_ok());
        let logs = r.take_logs();
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_eq!(logs[0].level, Level::Error);
        assert!(logs[0].text.starts_with("registry unreadable: "), "{}", logs[0].text);
        assert!(logs[0].text.contains("NOT seen"), "{}", logs[0].text);
        // Gone altogether: the same state, no new line.
        std::fs::remove_file(&p).unwrap();
        std::thread::sleep(FAST.poll * 5);
        r.apply_updates();
        assert!(r.take_logs().is_empty());
        // Readable again, with the device disabled: one recovery line, and it applies.
        let good = dir.path().join("good.db");
        let c = Connection::open(&good).unwrap();
        create(&c).unwrap();
        c.execute("INSERT INTO devices (device_id, shared_secret, created_at, enabled) VALUES ('sensor_001', ?1, 0, 0)", [S1]).unwrap();
        drop(c);
        std::fs::rename(&good, &p).unwrap();
        until(&mut r, "recovered", |r| r.health().is_current());
        assert_eq!(r.get("sensor_001").unwrap_err(), Miss::NotFound);
        let logs = r.take_logs();
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_eq!(logs[0].level, Level::Notice);
        assert!(logs[0].text.starts_with("registry readable again"), "{}", logs[0].text);
    }

    #[test]
    fn missing_file_is_reported_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let mut r = Registry::open(&p).unwrap();
        let _w = r.watch_with(FAST, no_wake()).unwrap();
        std::fs::rename(&p, dir.path().join("elsewhere.db")).unwrap();
        until(&mut r, "stale", |r| !r.health().is_current());
        assert!(matches!(r.health(), Health::Stale { error: RegistryError::Missing, .. }));
        std::fs::rename(dir.path().join("elsewhere.db"), &p).unwrap();
        until(&mut r, "recovered", |r| r.health().is_current());
        assert!(r.get("sensor_001").is_ok());
    }

    /// Issue 8 finding 6, second part: after the file was replaced, misses were looked up in the
    /// replaced file through the broker thread's old connection, so a device disabled in the new
    /// file came back with its old secret (logged as `signature`, or accepted with the old secret).
    #[test]
    fn a_replaced_file_is_followed_and_the_old_one_is_never_consulted() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let mut r = Registry::open(&p).unwrap();
        let _w = r.watch_with(FAST, no_wake()).unwrap();
        let new = dir.path().join("new.db");
        Connection::open(&p).unwrap().execute("VACUUM INTO ?1", [new.to_str().unwrap()]).unwrap();
        let c = Connection::open(&new).unwrap();
        migrate(&c).unwrap();
        c.execute_batch("UPDATE devices SET shared_secret = 'rotated-secret-0123', enabled = 0; INSERT INTO devices (device_id, shared_secret, created_at) VALUES ('marker', '0123456789abcdef', 0);").unwrap();
        drop(c);
        std::fs::rename(&new, &p).unwrap();
        until(&mut r, "the new file is in use", |r| r.get("marker").is_ok());
        assert_eq!(r.get("sensor_001").unwrap_err(), Miss::NotFound);
        assert!(r.take_logs().is_empty());
    }
}
