//! The device registry: a SQLite file (`sqlite.rs`) or a shared PostgreSQL table ([`pg`]).
//!
//! Both sources hand the broker thread whole [`Snapshot`]s from a thread of their own; the
//! broker thread installs them in [`Registry::apply_updates`] and never does registry I/O (the
//! SQLite file is read once at init; PostgreSQL never on the broker thread, see [`pg`]).
//!
//! Faults are never silent. A registry that cannot be read (for SQLite an unreadable or missing
//! file, a lock held too long; for PostgreSQL a refused or broken connection, a missing table)
//! turns [`Registry::health`] to [`Health::Stale`] and logs one error line; becoming readable
//! again logs one recovery line. Meanwhile the last good snapshot stays in use: a typo in a file
//! mode must not lock out the whole fleet, and a cluster of brokers keeps serving from memory
//! when the shared registry is down. The price, which the error line states, is that a disable
//! or remove made meanwhile is not seen until the registry is readable again.
//!
//! A row whose secret is shorter than [`MIN_SECRET_BYTES`] (the CLI refuses such secrets; a row
//! written by other tools may still hold one) or whose columns do not have the schema's types is
//! not a usable device: its messages are refused as `unknown_device`, and each snapshot logs one
//! line per such device. A previous secret that is too short is ignored (the current one works).
//!
//! The original schema (`device_id`, `shared_secret`, `created_at`) works unchanged; the optional
//! columns `enabled`, `previous_secret` and `previous_secret_expires_at` are added by the CLI's
//! migration (never by the plugin) and used when present.

pub mod pg;
mod sqlite;

pub use sqlite::{
    create, load_all, migrate, BASE_SCHEMA, LOCKED_TOO_LONG, NUDGE_MIN_INTERVAL, OPTIONAL_COLUMNS,
    POLL_INTERVAL,
};

use crate::envelope::Key;
use crate::host::{Level, LogLine};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// The shortest secret the plugin accepts for HMAC, in bytes (the CLI's minimum too).
pub const MIN_SECRET_BYTES: usize = 16;

/// At most this many per-device problem lines per snapshot; the rest are summed up in one line.
const MAX_PROBLEM_LINES: usize = 20;

/// Why the registry cannot be read or parsed.
#[derive(Debug)]
pub enum RegistryError {
    /// There is no file at the path (or it vanished).
    Missing,
    /// SQLite could not open, read or query it (permissions, not a database, corruption, I/O).
    Sqlite(rusqlite::Error),
    /// The database has no `devices` table.
    NoDevicesTable,
    /// Another connection has held the database locked for this long.
    Locked(Duration),
    /// PostgreSQL refused the connection or a query, or the connection broke.
    Postgres(postgres::Error),
    /// PostgreSQL gave no first snapshot within this long at start.
    NoAnswer(Duration),
    /// The registry thread could not be started.
    Thread(std::io::Error),
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::Missing => f.write_str("no such file"),
            RegistryError::Sqlite(e) => write!(f, "{e}"),
            RegistryError::NoDevicesTable => f.write_str("no table named devices"),
            // The source chain names the cause ("connection refused"); the top error alone
            // often only says "error connecting to server".
            RegistryError::Postgres(e) => match std::error::Error::source(e) {
                Some(cause) => write!(f, "{e}: {cause}"),
                None => write!(f, "{e}"),
            },
            RegistryError::NoAnswer(d) => {
                write!(f, "no answer within {} s", d.as_secs_f32())
            }
            RegistryError::Thread(e) => write!(f, "cannot start the registry thread: {e}"),
            RegistryError::Locked(d) => {
                write!(f, "locked by another connection for {} s", d.as_secs())
            }
        }
    }
}

impl std::error::Error for RegistryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RegistryError::Sqlite(e) => Some(e),
            RegistryError::Postgres(e) => Some(e),
            RegistryError::Thread(e) => Some(e),
            _ => None,
        }
    }
}

impl From<postgres::Error> for RegistryError {
    fn from(e: postgres::Error) -> Self {
        RegistryError::Postgres(e)
    }
}

impl From<rusqlite::Error> for RegistryError {
    fn from(e: rusqlite::Error) -> Self {
        RegistryError::Sqlite(e)
    }
}

/// A device's key material, as the verifier needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKeys {
    pub secret: Key,
    /// The secret before the last rotation and the Unix second after which it stops working.
    pub previous: Option<(Key, i64)>,
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
    pub fn secrets_at(&self, now: i64) -> impl Iterator<Item = &Key> {
        let prev = self.previous.as_ref().filter(|(_, until)| now <= *until).map(|(s, _)| s);
        std::iter::once(&self.secret).chain(prev)
    }
}

pub type Devices = crate::fasthash::Map<Box<str>, DeviceKeys>;

/// Why a registered, enabled row is not a usable device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// The secret has fewer than [`MIN_SECRET_BYTES`] bytes.
    ShortSecret { bytes: usize },
    /// A column does not hold the type the schema gives it (e.g. a BLOB secret).
    BadColumn { column: &'static str },
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::ShortSecret { bytes } => write!(
                f,
                "its secret is shorter than {MIN_SECRET_BYTES} bytes ({bytes}); set a new one with `iotgw device rotate-secret`"
            ),
            Unusable::BadColumn { column } => {
                write!(f, "its {column} column does not hold the schema's type")
            }
        }
    }
}

/// Why a lookup found no usable device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss<'a> {
    /// No enabled row with that id in the snapshot in use.
    NotFound,
    /// An enabled row that cannot be used.
    Unusable(&'a Unusable),
}

impl std::fmt::Display for Miss<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Miss::NotFound => f.write_str("no enabled device with that id"),
            Miss::Unusable(u) => write!(f, "device not usable: {u}"),
        }
    }
}

/// Everything one read of the table produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub devices: Devices,
    pub unusable: HashMap<Box<str>, Unusable>,
    /// Devices whose previous secret was ignored because it is too short.
    pub ignored_previous: Vec<Box<str>>,
    /// Rows without a text `device_id`: there is no identity to refuse them by.
    pub rows_without_id: usize,
}

/// Is the snapshot in use the registry's current content?
#[derive(Debug)]
pub enum Health {
    /// The last poll read the file (or found it unchanged); PostgreSQL: connected and listening.
    Current,
    /// The registry cannot be read since `since`; the last good snapshot (if any) is in use.
    Stale { error: RegistryError, since: SystemTime },
}

impl Health {
    pub fn is_current(&self) -> bool {
        matches!(self, Health::Current)
    }
}

/// What one row of the table is to the plugin.
enum Row {
    /// No text `device_id`: nothing to refuse it by.
    NoId,
    /// A usable device; `ignored_previous` when a too-short previous secret was dropped.
    Usable {
        id: String,
        keys: DeviceKeys,
        ignored_previous: bool,
    },
    Unusable {
        id: String,
        why: Unusable,
    },
}

/// The four selected columns of one row (`device_id`, `shared_secret`, `previous_secret`,
/// `previous_secret_expires_at`), from either database. Each getter is None when the column does
/// not hold the schema's type, so both sources share one reading of a row ([`row`]).
trait Fields {
    fn id(&self) -> Option<String>;
    fn secret(&self) -> Option<String>;
    fn previous(&self) -> Option<Option<String>>;
    fn until(&self) -> Option<Option<i64>>;
}

fn row(r: &impl Fields) -> Row {
    let Some(id) = r.id() else { return Row::NoId };
    let bad = |id, column| Row::Unusable { id, why: Unusable::BadColumn { column } };
    let Some(secret) = r.secret() else { return bad(id, "shared_secret") };
    let Some(prev) = r.previous() else { return bad(id, "previous_secret") };
    let Some(until) = r.until() else {
        return bad(id, "previous_secret_expires_at");
    };
    if secret.len() < MIN_SECRET_BYTES {
        return Row::Unusable { id, why: Unusable::ShortSecret { bytes: secret.len() } };
    }
    let mut ignored_previous = false;
    let previous = match (prev, until) {
        (Some(p), Some(_)) if p.len() < MIN_SECRET_BYTES => {
            ignored_previous = true;
            None
        }
        (Some(p), Some(u)) => Some((Key::new(p.into_bytes().into_boxed_slice()), u)),
        _ => None,
    };
    let keys = DeviceKeys { secret: Key::new(secret.into_bytes().into_boxed_slice()), previous };
    Row::Usable { id, keys, ignored_previous }
}

impl Snapshot {
    /// Adds one row as [`row`] read it (callers sort `ignored_previous` when done).
    fn add(&mut self, r: Row) {
        match r {
            Row::NoId => self.rows_without_id += 1,
            Row::Usable { id, keys, ignored_previous } => {
                let id = id.into_boxed_str();
                if ignored_previous {
                    self.ignored_previous.push(id.clone());
                }
                self.devices.insert(id, keys);
            }
            Row::Unusable { id, why } => {
                self.unusable.insert(id.into_boxed_str(), why);
            }
        }
    }

    /// Forgets everything about `id` (before its rows are read again).
    fn forget(&mut self, id: &str) {
        self.devices.remove(id);
        self.unusable.remove(id);
        self.ignored_previous.retain(|x| &**x != id);
    }
}

/// What the watcher hands to the broker thread.
enum Update {
    Snapshot(Snapshot),
    Broken(RegistryError),
}

/// State shared by the broker thread and the watcher.
struct Shared {
    /// Set by a miss, cleared by the watcher when it polls.
    nudged: AtomicBool,
    stop: AtomicBool,
    /// How a thread started before [`Registry::watch`] (PostgreSQL's) wakes the broker loop.
    wake: OnceLock<Arc<dyn Fn() + Send + Sync>>,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            nudged: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake: OnceLock::new(),
        })
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn wake(&self) {
        if let Some(w) = self.wake.get() {
            w();
        }
    }
}

/// The broker thread's view of the registry: the snapshot in use and its health.
pub struct Registry {
    path: PathBuf,
    /// The source as logs name it (a PostgreSQL URL without its password).
    name: String,
    snap: Snapshot,
    health: Health,
    loaded_at: SystemTime,
    logs: Vec<LogLine>,
    /// The connection used at start-up, until the watcher takes it over.
    conn: Option<sqlite::Opened>,
    updates: Option<Receiver<Update>>,
    shared: Arc<Shared>,
    watcher: Option<std::thread::Thread>,
    /// PostgreSQL's thread, running since open, until [`Registry::watch`] hands it out.
    started: Option<Watcher>,
}

impl Registry {
    fn empty(path: PathBuf, name: String) -> Registry {
        Registry {
            path,
            name,
            snap: Snapshot::default(),
            health: Health::Current,
            loaded_at: SystemTime::now(),
            logs: Vec::new(),
            conn: None,
            updates: None,
            shared: Shared::new(),
            watcher: None,
            started: None,
        }
    }

    /// The registry in PostgreSQL at `url`. Starts the thread that owns the connection and waits
    /// (at most [`pg::FIRST_LOAD_TIMEOUT`]) for its first snapshot; the calling (broker) thread
    /// never talks to PostgreSQL. Unreachable at start is not a failure: the registry starts
    /// empty and [`Health::Stale`] (every device refused as unknown, one error line) and catches
    /// up when PostgreSQL answers, so a broker restart during a database outage still delivers
    /// what its outbox holds. Fails only if the thread cannot be started.
    pub fn open_postgres(url: &str) -> Result<Registry, RegistryError> {
        Self::open_postgres_with(url, pg::TIMING)
    }

    fn open_postgres_with(url: &str, timing: pg::Timing) -> Result<Registry, RegistryError> {
        let name = crate::config::redact_url(url);
        let mut r = Registry::empty(PathBuf::new(), name);
        let (tx, rx) = std::sync::mpsc::channel();
        let w = pg::start(url.to_owned(), timing, r.shared.clone(), tx)
            .map_err(RegistryError::Thread)?;
        let first = match rx.recv_timeout(timing.first_load) {
            Ok(u) => u,
            Err(_) => Update::Broken(RegistryError::NoAnswer(timing.first_load)),
        };
        match first {
            Update::Snapshot(s) => r.install(s),
            Update::Broken(e) => {
                r.log(
                    Level::Error,
                    format!(
                        "registry unreachable at start: {}: {e}; every device is refused as unknown until it answers (healthz 503); retrying",
                        r.name
                    ),
                );
                r.health = Health::Stale { error: e, since: SystemTime::now() };
            }
        }
        r.updates = Some(rx);
        r.started = Some(w);
        Ok(r)
    }

    /// Number of usable devices in memory.
    pub fn len(&self) -> usize {
        self.snap.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.snap.devices.is_empty()
    }

    /// Whether the snapshot in use is the file's current content, for logs, metrics and healthz.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The keys of `id` if it is a usable enabled device. Memory only: never touches SQLite.
    pub fn get(&self, id: &str) -> Result<&DeviceKeys, Miss<'_>> {
        if let Some(k) = self.snap.devices.get(id) {
            return Ok(k);
        }
        if let Some(why) = self.snap.unusable.get(id) {
            return Err(Miss::Unusable(why));
        }
        // Perhaps added a moment ago: have the watcher look now rather than at its next poll.
        // One flag swap per miss; the watcher is unparked only when the flag was clear.
        // (PostgreSQL's thread is never nudged: NOTIFY pushes every change, see `pg`.)
        if let Some(w) = &self.watcher {
            if !self.shared.nudged.swap(true, Ordering::AcqRel) {
                w.unpark();
            }
        }
        Err(Miss::NotFound)
    }

    /// Starts the watcher thread, which takes over the connection. `wake` is called after each
    /// update so the broker loop installs it without waiting for its idle tick.
    pub fn watch(&mut self, wake: Arc<dyn Fn() + Send + Sync>) -> std::io::Result<Watcher> {
        if let Some(w) = self.started.take() {
            // PostgreSQL's thread runs since open; from now on it wakes the broker loop too.
            let _ = self.shared.wake.set(wake.clone());
            wake(); // whatever it sent before is installed now, not at the idle tick
            return Ok(w);
        }
        self.watch_with(sqlite::TIMING, wake)
    }

    /// Installs the newest snapshot and any change of health, if some arrived; queues the log
    /// lines they call for. Cheap when nothing did. Returns whether a snapshot was installed.
    pub fn apply_updates(&mut self) -> bool {
        self.apply_updates_diff().is_some()
    }

    /// As [`Self::apply_updates`], returning the devices of the snapshot it replaced (to see
    /// which were removed or disabled), or None when nothing was installed.
    pub fn apply_updates_diff(&mut self) -> Option<Devices> {
        let rx = self.updates.as_ref()?;
        let pending: Vec<Update> = rx.try_iter().collect();
        // Health changes are logged in order, so a short outage between two ticks is still seen;
        // of the snapshots only the newest is installed.
        let mut newest = None;
        for u in pending {
            match u {
                Update::Broken(e) => self.mark_broken(e),
                Update::Snapshot(s) => {
                    self.mark_current(s.devices.len());
                    newest = Some(s);
                }
            }
        }
        let s = newest?;
        let old = std::mem::take(&mut self.snap.devices);
        self.install(s);
        Some(old)
    }

    /// The ids of the usable enabled devices in the in-memory snapshot. (No SQL.)
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.snap.devices.keys().map(|k| &**k)
    }

    /// Is `id` a usable enabled device of the in-memory snapshot? (No SQL.)
    pub fn contains(&self, id: &str) -> bool {
        self.snap.devices.contains_key(id)
    }

    /// The log lines queued since the last call, oldest first.
    pub fn take_logs(&mut self) -> Vec<LogLine> {
        std::mem::take(&mut self.logs)
    }

    fn log(&mut self, level: Level, text: String) {
        self.logs.push(LogLine { level, text });
    }

    fn mark_current(&mut self, devices: usize) {
        if let Health::Stale { since, .. } = &self.health {
            let for_s = since.elapsed().map_or(0, |d| d.as_secs());
            self.log(
                Level::Notice,
                format!(
                    "registry readable again after {for_s} s: {}, {devices} devices",
                    self.name
                ),
            );
            self.health = Health::Current;
        }
    }

    fn mark_broken(&mut self, error: RegistryError) {
        if self.health.is_current() {
            let age = self.loaded_at.elapsed().map_or(0, |d| d.as_secs());
            self.log(
                Level::Error,
                format!(
                    "registry unreadable: {}: {error}; still using the last good snapshot ({} devices, read {age} s ago): devices added, disabled or removed from now on are NOT seen until the registry is readable again",
                    self.name,
                    self.snap.devices.len()
                ),
            );
            self.health = Health::Stale { error, since: SystemTime::now() };
        }
    }

    /// Makes `snap` the snapshot in use and logs what is wrong in it, once per device.
    fn install(&mut self, snap: Snapshot) {
        let mut lines = Vec::new();
        let mut unusable: Vec<(&Box<str>, &Unusable)> = snap.unusable.iter().collect();
        unusable.sort_by(|a, b| a.0.cmp(b.0));
        for (id, why) in unusable.iter().take(MAX_PROBLEM_LINES) {
            // Ids come from the registry, not from clients, but a log line stays one line.
            lines.push(format!("device {} is not usable: {why}", id.escape_debug()));
        }
        if unusable.len() > MAX_PROBLEM_LINES {
            lines.push(format!(
                "{} more devices are not usable (secret too short or a column of the wrong type)",
                unusable.len() - MAX_PROBLEM_LINES
            ));
        }
        for id in snap.ignored_previous.iter().take(MAX_PROBLEM_LINES) {
            lines.push(format!(
                "device {}: previous secret ignored, it is shorter than {MIN_SECRET_BYTES} bytes",
                id.escape_debug()
            ));
        }
        if snap.ignored_previous.len() > MAX_PROBLEM_LINES {
            lines.push(format!(
                "{} more devices have a previous secret shorter than {MIN_SECRET_BYTES} bytes, ignored",
                snap.ignored_previous.len() - MAX_PROBLEM_LINES
            ));
        }
        if snap.rows_without_id > 0 {
            lines.push(format!(
                "{} registry rows have no text device_id and are ignored",
                snap.rows_without_id
            ));
        }
        for text in lines {
            self.log(Level::Warning, text);
        }
        self.snap = snap;
        self.loaded_at = SystemTime::now();
    }

    /// Keys already in memory.
    #[cfg(test)]
    fn cached(&self, id: &str) -> Option<&DeviceKeys> {
        self.snap.devices.get(id)
    }
}

/// Background poller of the registry file.
pub struct Watcher {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Stops and joins the thread.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
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
