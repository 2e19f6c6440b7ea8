//! The SQLite device registry.
//!
//! The plugin opens it read-only and keeps every enabled device in memory, so a known device costs
//! no SQL on the per-message path. A watcher thread polls `PRAGMA data_version` (which changes
//! whenever another connection commits) and sends a fresh snapshot to the broker thread, so a
//! disabled or removed device is refused within a second. A device that is not in memory is
//! looked up once by primary key, so a device added a moment ago is accepted on its first message.
//!
//! The original schema (`device_id`, `shared_secret`, `created_at`) works unchanged; the optional
//! columns `enabled`, `previous_secret` and `previous_secret_expires_at` are added by the CLI's
//! migration (never by the plugin) and used when present.

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

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

/// A device's key material, as the verifier needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKeys {
    pub secret: Box<[u8]>,
    /// The secret before the last rotation and the Unix second after which it stops working.
    pub previous: Option<(Box<[u8]>, i64)>,
}

impl std::fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets, even in debug output.
        f.debug_struct("DeviceKeys")
            .field("previous", &self.previous.as_ref().map(|p| p.1))
            .finish()
    }
}

impl DeviceKeys {
    /// The secrets valid at `now`: the current one, then the previous one during its grace period.
    pub fn secrets_at(&self, now: i64) -> impl Iterator<Item = &[u8]> {
        let prev = self.previous.as_ref().filter(|(_, until)| now <= *until).map(|(s, _)| &s[..]);
        std::iter::once(&self.secret[..]).chain(prev)
    }
}

pub type Devices = HashMap<Box<str>, DeviceKeys>;

/// Opens the registry read-only.
pub fn open_readonly(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_millis(50))?;
    Ok(conn)
}

fn select_sql(conn: &Connection) -> rusqlite::Result<String> {
    let mut cols = Vec::new();
    let mut stmt = conn.prepare("PRAGMA table_info(devices)")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        cols.push(r.get::<_, String>(1)?);
    }
    if cols.is_empty() {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some("no table named devices".into()),
        ));
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

fn row_keys(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, DeviceKeys)> {
    let id: String = r.get(0)?;
    let secret: String = r.get(1)?;
    let prev: Option<String> = r.get(2)?;
    let until: Option<i64> = r.get(3)?;
    let previous = match (prev, until) {
        (Some(p), Some(u)) => Some((p.into_bytes().into_boxed_slice(), u)),
        _ => None,
    };
    Ok((id, DeviceKeys { secret: secret.into_bytes().into_boxed_slice(), previous }))
}

/// Every enabled device.
pub fn load_all(conn: &Connection) -> rusqlite::Result<Devices> {
    let sql = select_sql(conn)?;
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map([], row_keys)?;
    let mut map = Devices::new();
    for row in rows {
        let (id, keys) = row?;
        map.insert(id.into_boxed_str(), keys);
    }
    Ok(map)
}

/// One enabled device by id.
pub fn load_one(conn: &Connection, id: &str) -> rusqlite::Result<Option<DeviceKeys>> {
    let sql = format!("{} AND device_id = ?1", select_sql(conn)?);
    conn.prepare_cached(&sql)?.query_row([id], row_keys).optional().map(|o| o.map(|(_, k)| k))
}

/// The broker thread's view of the registry: an in-memory map plus a connection for misses.
pub struct Registry {
    path: PathBuf,
    devices: Devices,
    conn: Connection,
    miss_sql: String,
    updates: Option<Receiver<Devices>>,
}

impl Registry {
    /// Opens `path` read-only and loads every device. Fails if the file is missing, unreadable
    /// or has no `devices` table.
    pub fn open(path: &Path) -> rusqlite::Result<Registry> {
        let conn = open_readonly(path)?;
        let devices = load_all(&conn)?;
        let miss_sql = format!("{} AND device_id = ?1", select_sql(&conn)?);
        Ok(Registry { path: path.to_owned(), devices, conn, miss_sql, updates: None })
    }

    /// Number of devices in memory.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Whether `id` is in memory (no SQL: cheap enough for every refused message).
    pub fn contains(&self, id: &str) -> bool {
        self.devices.contains_key(id)
    }

    /// The ids in memory.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.devices.keys().map(|k| &**k)
    }

    /// The keys of `id` if it is an enabled device. Memory first; on a miss, one indexed query.
    pub fn get(&mut self, id: &str) -> Result<Option<&DeviceKeys>, rusqlite::Error> {
        if !self.devices.contains_key(id) {
            let found =
                self.conn.prepare_cached(&self.miss_sql)?.query_row([id], row_keys).optional()?;
            match found {
                Some((id, keys)) => {
                    self.devices.insert(id.into_boxed_str(), keys);
                }
                None => return Ok(None),
            }
        }
        Ok(self.devices.get(id))
    }

    /// Keys already in memory (no SQL).
    #[cfg(test)]
    fn cached(&self, id: &str) -> Option<&DeviceKeys> {
        self.devices.get(id)
    }

    /// Starts the watcher thread that sends a new snapshot whenever the database changes.
    pub fn watch(&mut self) -> std::io::Result<Watcher> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.updates = Some(rx);
        Watcher::start(self.path.clone(), tx)
    }

    /// Installs the newest snapshot, if one arrived. Cheap when none did.
    pub fn apply_updates(&mut self) -> bool {
        let Some(rx) = &self.updates else { return false };
        let mut newest = None;
        while let Ok(snapshot) = rx.try_recv() {
            newest = Some(snapshot);
        }
        match newest {
            Some(s) => {
                self.devices = s;
                // Column set may have changed (CLI migration): rebuild the miss query.
                if let Ok(sql) = select_sql(&self.conn) {
                    self.miss_sql = format!("{sql} AND device_id = ?1");
                }
                true
            }
            None => false,
        }
    }
}

/// Background poller of the registry file.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Watcher {
    fn start(path: PathBuf, tx: Sender<Devices>) -> std::io::Result<Watcher> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle =
            std::thread::Builder::new().name("iotgw-registry".into()).spawn(move || {
                let mut conn: Option<Connection> = None;
                let mut version: Option<i64> = None;
                let mut ident = file_id(&path);
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::park_timeout(POLL_INTERVAL);
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    // A replaced file (new inode) needs a new connection.
                    let now_ident = file_id(&path);
                    if now_ident != ident {
                        ident = now_ident;
                        conn = None;
                        version = None;
                    }
                    if conn.is_none() {
                        conn = open_readonly(&path).ok();
                    }
                    let Some(c) = &conn else { continue };
                    let v: Option<i64> = c.query_row("PRAGMA data_version", [], |r| r.get(0)).ok();
                    if v.is_none() {
                        conn = None;
                        continue;
                    }
                    if version.is_some() && v == version {
                        continue;
                    }
                    let first = version.is_none();
                    version = v;
                    if first && ident.is_some() {
                        // The plugin loaded this very state at init; only later changes matter. A
                        // reopen after replacement is not "first": it sends.
                    }
                    match load_all(c) {
                        Ok(devices) => {
                            if tx.send(devices).is_err() {
                                break;
                            }
                        }
                        Err(_) => {
                            conn = None;
                            version = None;
                        }
                    }
                }
            })?;
        Ok(Watcher { stop, handle: Some(handle) })
    }

    /// Stops and joins the thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn base_db(dir: &Path) -> PathBuf {
        let p = dir.join("devices.db");
        let c = Connection::open(&p).unwrap();
        c.execute_batch(BASE_SCHEMA).unwrap();
        c.execute("INSERT INTO devices VALUES ('sensor_001','supersecretkey123',0)", []).unwrap();
        p
    }

    #[test]
    fn original_schema_works_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let mut r = Registry::open(&p).unwrap();
        assert_eq!(r.len(), 1);
        let k = r.get("sensor_001").unwrap().unwrap();
        assert_eq!(&*k.secret, b"supersecretkey123");
        assert!(k.previous.is_none());
        assert!(r.get("nope").unwrap().is_none());
    }

    #[test]
    fn missing_table_or_file_fails_to_open() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Registry::open(&dir.path().join("absent.db")).is_err());
        let p = dir.path().join("empty.db");
        Connection::open(&p).unwrap().execute_batch("CREATE TABLE x(a)").unwrap();
        assert!(Registry::open(&p).is_err());
    }

    #[test]
    fn device_added_later_is_found_on_first_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let mut r = Registry::open(&p).unwrap();
        Connection::open(&p)
            .unwrap()
            .execute("INSERT INTO devices VALUES ('new_one','s',0)", [])
            .unwrap();
        assert!(r.get("new_one").unwrap().is_some());
    }

    #[test]
    fn disabled_device_is_not_loaded_and_previous_secret_has_a_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let c = Connection::open(&p).unwrap();
        migrate(&c).unwrap();
        migrate(&c).unwrap(); // idempotent
        c.execute("INSERT INTO devices (device_id, shared_secret, created_at, enabled) VALUES ('off','s',0,0)", []).unwrap();
        c.execute("UPDATE devices SET previous_secret='old', previous_secret_expires_at=100 WHERE device_id='sensor_001'", []).unwrap();
        let mut r = Registry::open(&p).unwrap();
        assert!(r.get("off").unwrap().is_none());
        let k = r.get("sensor_001").unwrap().unwrap().clone();
        assert_eq!(k.secrets_at(100).count(), 2);
        assert_eq!(k.secrets_at(101).count(), 1);
    }

    #[test]
    fn watcher_delivers_a_snapshot_after_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = base_db(dir.path());
        let mut r = Registry::open(&p).unwrap();
        let mut w = r.watch().unwrap();
        // Let the watcher record the initial version, then change the database.
        std::thread::sleep(POLL_INTERVAL * 2);
        while r.apply_updates() {}
        Connection::open(&p).unwrap().execute("DELETE FROM devices", []).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !r.apply_updates() || !r.is_empty() {
            assert!(std::time::Instant::now() < deadline, "no snapshot within 5 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(r.cached("sensor_001").is_none());
        w.stop();
    }
}
