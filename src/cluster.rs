//! Cluster mode: replay state and device sessions shared between nodes through Redis.
//!
//! The broker thread never talks to Redis. It hands what it learns to this module through a
//! mutex-guarded queue ([`Cluster::announce_id`], [`Cluster::announce_session`]: a push, no
//! I/O) and takes what the other nodes said with [`Cluster::take_incoming`] from its tick.
//! Two threads do the talking:
//! - the publisher batches accepted ids and session starts and PUBLISHes them (`iotgw:ids`,
//!   `iotgw:sessions`), so every other node adds the ids to its own replay memory within the
//!   replication delay (measured into [`ClusterStats::replication_delay`]);
//! - the subscriber receives the other nodes' batches (its own are skipped by node id).
//!
//! The guarantee that the backend never receives a cross-node replay does not rest on that
//! replication: before a worker POSTs a message it claims the id ([`Claimer::claim`], `SET key
//! value NX PX window`). The claim names the node and a digest of the content, so a second node
//! holding the same id learns whether it is a byte-identical copy (a device retransmitting
//! after reconnecting elsewhere: not forwarded, no alarm) or the same id with other content
//! (not forwarded, logged as an attack). A node re-claiming its own id (a retry, or after a
//! restart) proceeds. Without Redis no claim can be made and the worker waits: ingestion goes on
//! with the local replay memory, the outbox keeps everything, `/healthz` says why.
//!
//! Wire format (text, one PUBLISH per batch; device ids and node ids follow the device-id
//! grammar, so they never contain a space or a newline):
//! - `iotgw:ids`: `v1 <node>` then one line per id: `<device> <32 hex digest> <expires_at>
//!   <accepted_at_us>` (microseconds: the replication delay is a few milliseconds at most);
//! - `iotgw:sessions`: `v1 <node>` then one line per session: `<device> <started_at_ms>`.
//!
//! Whoever can write to this Redis can make ids look used (refusing a device's messages) and
//! close sessions: it must be reachable by the nodes only, with a password (`redis://:pw@…`) or
//! TLS (`rediss://`). It can never make a message be accepted: every check runs locally.

use crate::config::ClusterConfig;
use crate::envelope::{decode_hex, hex, valid_device_id};
use crate::host::{unix_now_us, Level, LogLine};
use crate::metrics::histogram::{Histogram, REPLICATION_BOUNDS};
use crate::replay::IdDigest;
use sha2::{Digest, Sha256};
use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

pub const IDS_CHANNEL: &str = "iotgw:ids";
pub const SESSIONS_CHANNEL: &str = "iotgw:sessions";
/// Prefix of the claim keys: `iotgw:claim:<device>:<32 hex digest of the message id>`.
pub const CLAIM_PREFIX: &str = "iotgw:claim:";

/// At most this many ids per PUBLISH (about 100 bytes each).
const MAX_BATCH: usize = 2000;
/// Ids waiting to be published beyond this are dropped (Redis unreachable for long): the claims
/// still stop cross-node forwarding; only the early MQTT-level refusal on other nodes is lost.
const MAX_OUTGOING: usize = 200_000;
/// Batches received but not yet taken by the broker thread, beyond which new ones are dropped.
const MAX_INCOMING: usize = 200_000;
/// Ids the broker thread takes in per tick (about a millisecond of work).
const MAX_TAKE: usize = 4096;
/// A received batch larger than this is not parsed.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Network deadline for every Redis command (connect, claim, publish).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the subscriber looks at the stop flag while nothing arrives.
const SUBSCRIBER_POLL: Duration = Duration::from_millis(200);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// Why cluster mode could not start (at init: the broker refuses to start).
#[derive(Debug)]
pub enum StartError {
    /// `plugin_opt_cluster_url` is not a URL the Redis client accepts.
    Url(redis::RedisError),
    Thread(std::io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Url(e) => write!(f, "not a usable Redis URL: {e}"),
            StartError::Thread(e) => write!(f, "cannot start a cluster thread: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// An id accepted by another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteId {
    pub device: Box<str>,
    pub digest: IdDigest,
    pub expires_at: i64,
}

/// A session of a device that started on another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSession {
    pub node: Box<str>,
    pub device: Box<str>,
    pub started_ms: i64,
}

/// What the other nodes said since the last take.
#[derive(Debug, Default)]
pub struct Incoming {
    pub ids: Vec<RemoteId>,
    pub sessions: Vec<RemoteSession>,
}

#[derive(Default)]
struct Outgoing {
    /// (device, digest, expires_at, accepted at µs): formatted by the publisher, off the
    /// broker thread.
    ids: Vec<(Box<str>, IdDigest, i64, i64)>,
    sessions: Vec<(Box<str>, i64)>,
}

/// Counters kept by the cluster threads and the claimers (atomics: no lock on the broker thread).
#[derive(Debug)]
pub struct ClusterStats {
    pub ids_published: AtomicU64,
    pub ids_received: AtomicU64,
    pub ids_dropped: AtomicU64,
    pub sessions_published: AtomicU64,
    pub sessions_received: AtomicU64,
    pub malformed_received: AtomicU64,
    pub claims: AtomicU64,
    pub claim_errors: AtomicU64,
    /// Batches from another node using this node's id (a misconfiguration).
    pub node_id_conflicts: AtomicU64,
    /// From acceptance on one node to arrival on another (per received id).
    pub replication_delay: Histogram,
}

impl Default for ClusterStats {
    fn default() -> Self {
        ClusterStats {
            ids_published: AtomicU64::new(0),
            ids_received: AtomicU64::new(0),
            ids_dropped: AtomicU64::new(0),
            sessions_published: AtomicU64::new(0),
            sessions_received: AtomicU64::new(0),
            malformed_received: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            claim_errors: AtomicU64::new(0),
            node_id_conflicts: AtomicU64::new(0),
            replication_delay: Histogram::new(REPLICATION_BOUNDS),
        }
    }
}

/// Is Redis reachable, as the threads and claimers last saw it?
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Up,
    /// Unreachable since `since` (the error as the client reported it).
    Down {
        since: SystemTime,
        error: String,
    },
}

struct Shared {
    node: Box<str>,
    /// Random per start: tells this process's batches from another node's using the same id.
    instance: u64,
    conflict_logged: Mutex<Option<Instant>>,
    stop: AtomicBool,
    outgoing: Mutex<Outgoing>,
    outgoing_cv: Condvar,
    incoming: Mutex<Incoming>,
    /// Per thread/claimer kind: publisher, subscriber, claims. Down if any is down.
    links: Mutex<[Option<(SystemTime, String)>; 3]>,
    logs: Mutex<Vec<LogLine>>,
    stats: ClusterStats,
    wake: Arc<dyn Fn() + Send + Sync>,
}

#[derive(Clone, Copy)]
enum Role {
    Publisher = 0,
    Subscriber = 1,
    Claims = 2,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Publisher => "publishing accepted ids",
            Role::Subscriber => "receiving the other nodes' ids",
            Role::Claims => "claiming ids before forwarding",
        }
    }
}

impl Shared {
    fn new(node: &str, instance: u64, wake: Arc<dyn Fn() + Send + Sync>) -> Shared {
        Shared {
            node: node.into(),
            instance,
            conflict_logged: Mutex::new(None),
            stop: AtomicBool::new(false),
            outgoing: Mutex::new(Outgoing::default()),
            outgoing_cv: Condvar::new(),
            incoming: Mutex::new(Incoming::default()),
            links: Mutex::new([None, None, None]),
            logs: Mutex::new(Vec::new()),
            stats: ClusterStats::default(),
            wake,
        }
    }

    fn log(&self, level: Level, text: String) {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).push(LogLine { level, text });
    }

    /// Records a failure of `role`; logs it once per outage.
    fn down(&self, role: Role, e: &redis::RedisError) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if links[role as usize].is_none() {
            links[role as usize] = Some((SystemTime::now(), e.to_string()));
            drop(links);
            self.log(
                Level::Error,
                format!(
                    "cluster: Redis unreachable while {}: {e}; {}",
                    role.name(),
                    match role {
                        Role::Claims => "forwarding waits (the outbox keeps every message)",
                        _ => "replay ids are not shared meanwhile (claims still stop cross-node forwarding)",
                    }
                ),
            );
        }
    }

    fn up(&self, role: Role) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((since, _)) = links[role as usize].take() {
            drop(links);
            let secs = since.elapsed().map_or(0, |d| d.as_secs());
            self.log(
                Level::Notice,
                format!("cluster: Redis reachable again ({}) after {secs} s", role.name()),
            );
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// The broker thread's handle on cluster mode.
pub struct Cluster {
    shared: Arc<Shared>,
    client: redis::Client,
    window: Duration,
    threads: Vec<JoinHandle<()>>,
}

/// A random instance id (the OpenSSL CSPRNG; the time and pid if it fails, which is unique enough).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    match openssl::rand::rand_bytes(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => (unix_now_us() as u64) ^ (u64::from(std::process::id()) << 40),
    }
}

impl Cluster {
    /// Starts the publisher and subscriber threads. Parses the URL but does not connect: the
    /// broker starts even when Redis is down (and says so). `window`: how long a claim lasts,
    /// twice the timestamp tolerance (an id can pass the timestamp check for that long).
    pub fn start(
        cfg: &ClusterConfig,
        window: Duration,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Cluster, StartError> {
        let client = redis::Client::open(cfg.url.as_str()).map_err(StartError::Url)?;
        let shared = Arc::new(Shared::new(&cfg.node_id, random_u64(), wake));
        let mut c = Cluster { shared, client, window, threads: Vec::new() };
        let (s, cl) = (c.shared.clone(), c.client.clone());
        c.threads.push(
            std::thread::Builder::new()
                .name("iotgw-cluster-pub".into())
                .spawn(move || publisher(&s, &cl))
                .map_err(StartError::Thread)?,
        );
        let (s, cl) = (c.shared.clone(), c.client.clone());
        c.threads.push(
            std::thread::Builder::new()
                .name("iotgw-cluster-sub".into())
                .spawn(move || subscriber(&s, &cl))
                .map_err(StartError::Thread)?,
        );
        Ok(c)
    }

    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// An id this node accepted (broker thread: a push under a lock the publisher holds only to
    /// swap the queue out).
    pub fn announce_id(&self, device: &str, digest: IdDigest, expires_at: i64) {
        let mut out = self.shared.outgoing.lock().unwrap_or_else(|p| p.into_inner());
        if out.ids.len() >= MAX_OUTGOING {
            self.shared.stats.ids_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        out.ids.push((device.into(), digest, expires_at, unix_now_us()));
        if out.ids.len() == 1 {
            self.shared.outgoing_cv.notify_one();
        }
    }

    /// A session of `device` started on this node at `started_ms`.
    pub fn announce_session(&self, device: &str, started_ms: i64) {
        let mut out = self.shared.outgoing.lock().unwrap_or_else(|p| p.into_inner());
        if out.sessions.len() < MAX_OUTGOING {
            out.sessions.push((device.into(), started_ms));
            self.shared.outgoing_cv.notify_one();
        }
    }

    /// What the other nodes said since the last call, at most [`MAX_TAKE`] ids at a time so one
    /// tick does bounded work; if more are waiting, another tick is requested (broker thread).
    pub fn take_incoming(&self) -> Incoming {
        let mut inc = self.shared.incoming.lock().unwrap_or_else(|p| p.into_inner());
        if inc.ids.len() <= MAX_TAKE {
            return std::mem::take(&mut *inc);
        }
        let rest = inc.ids.split_off(MAX_TAKE);
        let taken = Incoming {
            ids: std::mem::replace(&mut inc.ids, rest),
            sessions: std::mem::take(&mut inc.sessions),
        };
        drop(inc);
        (self.shared.wake)();
        taken
    }

    /// Log lines queued by the threads and claimers.
    pub fn take_logs(&self) -> Vec<LogLine> {
        std::mem::take(&mut *self.shared.logs.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Redis as last seen: the oldest outage of any role, or Up.
    pub fn link(&self) -> Link {
        let links = self.shared.links.lock().unwrap_or_else(|p| p.into_inner());
        match links.iter().flatten().min_by_key(|(since, _)| *since) {
            Some((since, error)) => Link::Down { since: *since, error: error.clone() },
            None => Link::Up,
        }
    }

    pub fn stats(&self) -> &ClusterStats {
        &self.shared.stats
    }

    /// A claimer for one delivery worker (its own connection, made on first use).
    pub fn claimer(&self) -> Claimer {
        Claimer {
            shared: self.shared.clone(),
            client: self.client.clone(),
            conn: None,
            window_ms: self.window.as_millis().max(1) as u64,
        }
    }

    /// Stops and joins the threads (prompt: they wait at most [`SUBSCRIBER_POLL`] or a command
    /// timeout).
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _g = self.shared.outgoing.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.outgoing_cv.notify_all();
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sleeps `d` unless stopping; false if stopping. New announcements (which signal the same
/// condition variable) do not cut it short: during an outage the backoff holds.
fn pause(s: &Shared, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    let mut g = s.outgoing.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if s.stopping() {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        g = s.outgoing_cv.wait_timeout(g, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
    }
}

/// After a failure of `role`: records the outage, waits `backoff` and doubles it (capped).
/// False if stopping.
fn back_off(s: &Shared, role: Role, e: &redis::RedisError, backoff: &mut Duration) -> bool {
    s.down(role, e);
    let go_on = pause(s, *backoff);
    *backoff = (*backoff * 2).min(RECONNECT_MAX);
    go_on
}

fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let c = client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
    c.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    c.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    Ok(c)
}

fn publisher(s: &Shared, client: &redis::Client) {
    let mut conn: Option<redis::Connection> = None;
    let mut backoff = RECONNECT_MIN;
    // What could not be published yet (kept across a reconnect).
    let mut ids: Vec<(Box<str>, IdDigest, i64, i64)> = Vec::new();
    let mut sessions: Vec<(Box<str>, i64)> = Vec::new();
    loop {
        {
            let mut out = s.outgoing.lock().unwrap_or_else(|p| p.into_inner());
            while out.ids.is_empty()
                && out.sessions.is_empty()
                && !s.stopping()
                && ids.is_empty()
                && sessions.is_empty()
            {
                out = s.outgoing_cv.wait(out).unwrap_or_else(|p| p.into_inner());
            }
            if s.stopping() {
                return;
            }
        }
        // No waiting to fill a batch: what arrives while a PUBLISH is in flight makes the next
        // one, so batches grow with the rate by themselves and a lone id goes out at once. (A
        // fixed 2 ms wait put the replication delay's p50 at 2.5-5 ms on the benchmark.)
        {
            let mut out = s.outgoing.lock().unwrap_or_else(|p| p.into_inner());
            ids.append(&mut out.ids);
            sessions.append(&mut out.sessions);
        }
        if ids.len() > MAX_OUTGOING {
            let extra = ids.len() - MAX_OUTGOING;
            ids.drain(..extra);
            s.stats.ids_dropped.fetch_add(extra as u64, Ordering::Relaxed);
        }
        if conn.is_none() {
            match connect(client) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    if !back_off(s, Role::Publisher, &e, &mut backoff) {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match publish_all(s, c, &mut ids, &mut sessions) {
            Ok(()) => {
                s.up(Role::Publisher);
                backoff = RECONNECT_MIN;
            }
            Err(e) => {
                conn = None;
                if !back_off(s, Role::Publisher, &e, &mut backoff) {
                    return;
                }
            }
        }
    }
}

/// Publishes everything queued, in batches; what was published is removed from the queues.
fn publish_all(
    s: &Shared,
    c: &mut redis::Connection,
    ids: &mut Vec<(Box<str>, IdDigest, i64, i64)>,
    sessions: &mut Vec<(Box<str>, i64)>,
) -> redis::RedisResult<()> {
    if !sessions.is_empty() {
        let mut text = format!("v1 {} {}\n", s.node, s.instance);
        for (d, started) in sessions.iter() {
            let _ = writeln!(text, "{d} {started}");
        }
        redis::cmd("PUBLISH").arg(SESSIONS_CHANNEL).arg(&text).query::<i64>(c)?;
        s.stats.sessions_published.fetch_add(sessions.len() as u64, Ordering::Relaxed);
        sessions.clear();
    }
    while !ids.is_empty() {
        let n = ids.len().min(MAX_BATCH);
        let mut text = String::with_capacity(16 + n * 80);
        let _ = writeln!(text, "v1 {} {}", s.node, s.instance);
        for (d, digest, exp, at) in &ids[..n] {
            let _ = writeln!(text, "{d} {} {exp} {at}", hex(digest));
        }
        redis::cmd("PUBLISH").arg(IDS_CHANNEL).arg(&text).query::<i64>(c)?;
        s.stats.ids_published.fetch_add(n as u64, Ordering::Relaxed);
        ids.drain(..n);
    }
    Ok(())
}

fn subscriber(s: &Shared, client: &redis::Client) {
    let mut backoff = RECONNECT_MIN;
    while !s.stopping() {
        let mut conn = match connect(client) {
            Ok(c) => c,
            Err(e) => {
                if !back_off(s, Role::Subscriber, &e, &mut backoff) {
                    return;
                }
                continue;
            }
        };
        let mut ps = conn.as_pubsub();
        let ready = ps
            .subscribe(&[IDS_CHANNEL, SESSIONS_CHANNEL])
            .and_then(|()| ps.set_read_timeout(Some(SUBSCRIBER_POLL)));
        if let Err(e) = ready {
            if !back_off(s, Role::Subscriber, &e, &mut backoff) {
                return;
            }
            continue;
        }
        s.up(Role::Subscriber);
        backoff = RECONNECT_MIN;
        while !s.stopping() {
            match ps.get_message() {
                Ok(m) => receive(s, m.get_channel_name(), m.get_payload_bytes()),
                Err(e) if e.is_timeout() => {}
                Err(e) => {
                    s.down(Role::Subscriber, &e);
                    break;
                }
            }
        }
    }
}

/// Parses one batch from another node into the incoming queue. Malformed lines are counted and
/// skipped; our own batches are ignored.
fn receive(s: &Shared, channel: &str, payload: &[u8]) {
    let received_us = unix_now_us();
    if payload.len() > MAX_BATCH_BYTES {
        s.stats.malformed_received.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let Ok(text) = std::str::from_utf8(payload) else {
        s.stats.malformed_received.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut lines = text.lines();
    let header = lines.next().and_then(|h| h.strip_prefix("v1 ")).and_then(|h| h.split_once(' '));
    let (node, instance) = match header {
        Some((n, i)) if valid_device_id(n) && i.parse::<u64>().is_ok() => (n, i),
        _ => {
            s.stats.malformed_received.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if node == &*s.node {
        // Our own batch, back from Redis. Another instance with our name means two nodes share a
        // node_id: each would take the other's claims for its own (and forward twice) and skip
        // the other's ids as its own. Said loudly; nothing here can tell which one is right.
        if instance != s.instance.to_string() {
            s.stats.node_id_conflicts.fetch_add(1, Ordering::Relaxed);
            let mut last = s.conflict_logged.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                *last = Some(Instant::now());
                drop(last);
                s.log(
                    Level::Error,
                    format!(
                        "cluster: another node also calls itself {node} (plugin_opt_node_id must be unique): claims and replay sharing are wrong until one is renamed"
                    ),
                );
            }
        }
        return;
    }
    let mut got = Incoming::default();
    let mut bad = 0u64;
    for line in lines {
        let f: Vec<&str> = line.split(' ').collect();
        match (channel, f.as_slice()) {
            (IDS_CHANNEL, [d, h, exp, at]) if valid_device_id(d) => {
                match (decode_hex::<16>(h.as_bytes()), exp.parse::<i64>(), at.parse::<i64>()) {
                    (Some(digest), Ok(expires_at), Ok(at)) => {
                        s.stats.replication_delay.observe(Duration::from_micros(
                            received_us.saturating_sub(at).max(0) as u64,
                        ));
                        got.ids.push(RemoteId { device: (*d).into(), digest, expires_at });
                    }
                    _ => bad += 1,
                }
            }
            (SESSIONS_CHANNEL, [d, started]) if valid_device_id(d) => match started.parse() {
                Ok(started_ms) => got.sessions.push(RemoteSession {
                    node: node.into(),
                    device: (*d).into(),
                    started_ms,
                }),
                Err(_) => bad += 1,
            },
            _ => bad += 1,
        }
    }
    if bad > 0 {
        s.stats.malformed_received.fetch_add(bad, Ordering::Relaxed);
    }
    s.stats.ids_received.fetch_add(got.ids.len() as u64, Ordering::Relaxed);
    s.stats.sessions_received.fetch_add(got.sessions.len() as u64, Ordering::Relaxed);
    if got.ids.is_empty() && got.sessions.is_empty() {
        return;
    }
    {
        let mut inc = s.incoming.lock().unwrap_or_else(|p| p.into_inner());
        if inc.ids.len() + got.ids.len() > MAX_INCOMING {
            s.stats.ids_dropped.fetch_add(got.ids.len() as u64, Ordering::Relaxed);
            got.ids.clear();
        }
        inc.ids.append(&mut got.ids);
        inc.sessions.append(&mut got.sessions);
    }
    (s.wake)();
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node holds the claim (new, or its own from an earlier attempt): forward.
    Ours,
    /// Another node claimed this id first.
    Elsewhere(ClaimedElsewhere),
}

/// Another node forwards (or forwarded) this id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedElsewhere {
    pub node: String,
    /// The other node's message has the same bytes: a retransmission, no alarm. False: the same
    /// id with other content, an attack or a broken device.
    pub same_content: bool,
}

/// Claims ids before a worker POSTs them. One per worker thread.
pub struct Claimer {
    shared: Arc<Shared>,
    client: redis::Client,
    conn: Option<redis::Connection>,
    window_ms: u64,
}

/// The claim key of a message id.
pub fn claim_key(device: &str, message_id: &str) -> String {
    format!("{CLAIM_PREFIX}{device}:{}", hex(&crate::replay::digest(message_id)))
}

/// The claim value: the node and a digest of the content.
fn claim_value(node: &str, payload: &[u8]) -> String {
    format!("{node} {}", hex(&Sha256::digest(payload)[..16]))
}

impl Claimer {
    /// Claims `message_id` of `device` for this node, unless another node holds it.
    /// An error means Redis could not be asked: the caller must not forward (and retries).
    pub fn claim(
        &mut self,
        device: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<Claim, redis::RedisError> {
        let r = self.try_claim(device, message_id, payload);
        match &r {
            Ok(_) => {
                self.shared.stats.claims.fetch_add(1, Ordering::Relaxed);
                self.shared.up(Role::Claims);
            }
            Err(e) => {
                self.conn = None;
                self.shared.stats.claim_errors.fetch_add(1, Ordering::Relaxed);
                self.shared.down(Role::Claims, e);
            }
        }
        r
    }

    fn try_claim(
        &mut self,
        device: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<Claim, redis::RedisError> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.client)?);
        }
        let Some(c) = self.conn.as_mut() else { unreachable!("connected above") };
        let key = claim_key(device, message_id);
        let mine = claim_value(&self.shared.node, payload);
        // Two rounds at most: the other claim may expire between our SET and our GET.
        for _ in 0..2 {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&mine)
                .arg("NX")
                .arg("PX")
                .arg(self.window_ms)
                .query(c)?;
            if set.is_some() {
                return Ok(Claim::Ours);
            }
            let held: Option<String> = redis::cmd("GET").arg(&key).query(c)?;
            let Some(held) = held else { continue };
            if held == mine {
                return Ok(Claim::Ours);
            }
            let (node, content) = held.split_once(' ').unwrap_or((held.as_str(), ""));
            let same_content = mine.split_once(' ').is_some_and(|(_, m)| m == content);
            return Ok(Claim::Elsewhere(ClaimedElsewhere { node: node.to_string(), same_content }));
        }
        // Claimed and expired twice within two round trips: treat as held elsewhere would lose
        // the message; report it as a transient failure instead, so the worker retries.
        Err(redis::RedisError::from((redis::ErrorKind::TryAgain, "claim raced twice with expiry")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(node: &str) -> Shared {
        Shared::new(node, 7, Arc::new(|| {}))
    }

    #[test]
    fn batches_from_other_nodes_are_parsed_and_our_own_ignored() {
        let s = shared("a");
        let d = crate::replay::digest("m-1");
        let text = format!("v1 b 1\ndev-1 {} 1700000300 {}\n", hex(&d), unix_now_us());
        receive(&s, IDS_CHANNEL, text.as_bytes());
        let got = std::mem::take(&mut *s.incoming.lock().unwrap());
        assert_eq!(
            got.ids,
            vec![RemoteId { device: "dev-1".into(), digest: d, expires_at: 1700000300 }]
        );
        // Positive control above; the same batch from ourselves is skipped.
        receive(&s, IDS_CHANNEL, format!("v1 a 7\ndev-1 {} 1 1\n", hex(&d)).as_bytes());
        assert!(s.incoming.lock().unwrap().ids.is_empty());
        assert_eq!(s.stats.node_id_conflicts.load(Ordering::Relaxed), 0);
        // Our name with another instance: two nodes share a node_id, said once (then at most
        // every minute) and counted every time.
        for _ in 0..3 {
            receive(&s, IDS_CHANNEL, format!("v1 a 8\ndev-1 {} 1 1\n", hex(&d)).as_bytes());
        }
        assert!(s.incoming.lock().unwrap().ids.is_empty());
        assert_eq!(s.stats.node_id_conflicts.load(Ordering::Relaxed), 3);
        let logs = std::mem::take(&mut *s.logs.lock().unwrap());
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert!(logs[0].text.contains("also calls itself a"), "{logs:?}");
        receive(&s, SESSIONS_CHANNEL, b"v1 b 1\ndev-1 1234\n");
        let got = std::mem::take(&mut *s.incoming.lock().unwrap());
        assert_eq!(
            got.sessions,
            vec![RemoteSession { node: "b".into(), device: "dev-1".into(), started_ms: 1234 }]
        );
    }

    #[test]
    fn malformed_batches_are_counted_and_dropped() {
        let s = shared("a");
        let d = hex(&crate::replay::digest("m"));
        for bad in [
            "no header\n".to_string(),
            "v1 bad node 1\n".into(),
            "v1 b\n".into(),
            "v1 b x\n".into(),
            format!("v1 b 1\ndev/1 {d} 1 1\n"),
            "v1 b 1\ndev-1 zz 1 1\n".into(),
            format!("v1 b 1\ndev-1 {d} x 1\n"),
            format!("v1 b 1\ndev-1 {d} 1\n"),
        ] {
            receive(&s, IDS_CHANNEL, bad.as_bytes());
        }
        receive(&s, IDS_CHANNEL, &[0xff, 0xfe]);
        assert!(s.incoming.lock().unwrap().ids.is_empty());
        assert_eq!(s.stats.malformed_received.load(Ordering::Relaxed), 9);
        // Control: a good line in the same shape is taken.
        receive(&s, IDS_CHANNEL, format!("v1 b 1\ndev-1 {d} 1 1\n").as_bytes());
        assert_eq!(s.incoming.lock().unwrap().ids.len(), 1);
    }

    #[test]
    fn the_broker_thread_takes_a_bounded_share_per_tick_and_asks_for_another() {
        let woken = Arc::new(AtomicU64::new(0));
        let w = woken.clone();
        let mut s = shared("a");
        s.wake = Arc::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        });
        let c = Cluster {
            shared: Arc::new(s),
            client: redis::Client::open("redis://127.0.0.1:1/").unwrap(),
            window: Duration::from_secs(1),
            threads: Vec::new(),
        };
        let id = RemoteId { device: "d".into(), digest: [0; 16], expires_at: 1 };
        c.shared.incoming.lock().unwrap().ids = vec![id; MAX_TAKE + 10];
        assert_eq!(c.take_incoming().ids.len(), MAX_TAKE);
        assert_eq!(woken.load(Ordering::Relaxed), 1, "another tick requested");
        assert_eq!(c.take_incoming().ids.len(), 10);
        assert_eq!(woken.load(Ordering::Relaxed), 1, "nothing left: no extra tick");
    }

    #[test]
    fn claim_values_tell_a_copy_from_other_content() {
        assert_eq!(claim_value("a", b"x"), claim_value("a", b"x"));
        assert_ne!(claim_value("a", b"x"), claim_value("a", b"y"));
        assert_eq!(
            claim_key("dev-1", "m"),
            format!("iotgw:claim:dev-1:{}", hex(&crate::replay::digest("m")))
        );
        assert_eq!(decode_hex::<16>(hex(&[7u8; 16]).as_bytes()), Some([7u8; 16]));
        assert_eq!(decode_hex::<16>(b"0g000000000000000000000000000000"), None);
        // from_str_radix, used here before, took a sign: "+7" read as 7.
        assert_eq!(decode_hex::<16>(b"+7070707070707070707070707070707"), None);
    }

    fn node(redis: &testkit::Redis, id: &str) -> Cluster {
        let cfg = ClusterConfig { url: redis.url(), node_id: id.into() };
        Cluster::start(&cfg, Duration::from_secs(600), Arc::new(|| {})).unwrap()
    }

    /// Polls `f` until it gives Some, for at most 20 s (milliseconds when the machine is idle;
    /// the bound is for a loaded one).
    fn within<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let end = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(std::time::Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_first_node_to_claim_an_id_wins_and_the_others_learn_whether_it_is_a_copy() {
        let redis = testkit::Redis::start();
        let (a, b) = (node(&redis, "node-a"), node(&redis, "node-b"));
        let (mut ca, mut cb) = (a.claimer(), b.claimer());
        assert_eq!(ca.claim("dev-1", "m-1", b"{x}").unwrap(), Claim::Ours);
        // A retry (or a restart) of the node holding it goes on.
        assert_eq!(ca.claim("dev-1", "m-1", b"{x}").unwrap(), Claim::Ours);
        let held = |same_content| {
            Claim::Elsewhere(ClaimedElsewhere { node: "node-a".into(), same_content })
        };
        assert_eq!(cb.claim("dev-1", "m-1", b"{x}").unwrap(), held(true));
        assert_eq!(cb.claim("dev-1", "m-1", b"{y}").unwrap(), held(false));
        // Control: another id, or the same id of another device, is free.
        assert_eq!(cb.claim("dev-1", "m-2", b"{x}").unwrap(), Claim::Ours);
        assert_eq!(cb.claim("dev-2", "m-1", b"{x}").unwrap(), Claim::Ours);
        // The claim expires with the replay window.
        let ttl = redis.cmd(&["PTTL", &claim_key("dev-1", "m-1")]).int().unwrap();
        assert!((590_000..=600_000).contains(&ttl), "{ttl}");
        assert_eq!(a.stats().claims.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn without_redis_no_claim_is_made_and_the_outage_is_reported_once_then_recovered() {
        let mut redis = testkit::Redis::start();
        let a = node(&redis, "node-a");
        let mut c = a.claimer();
        assert_eq!(c.claim("dev-1", "m-1", b"x").unwrap(), Claim::Ours);
        assert_eq!(a.link(), Link::Up);
        redis.stop();
        assert!(c.claim("dev-1", "m-2", b"x").is_err());
        assert!(c.claim("dev-1", "m-3", b"x").is_err());
        assert!(matches!(a.link(), Link::Down { .. }), "{:?}", a.link());
        let logs = a.take_logs();
        let claims_down = logs.iter().filter(|l| l.text.contains("claiming ids")).count();
        assert_eq!(claims_down, 1, "{logs:?}");
        redis.start_again();
        assert_eq!(c.claim("dev-1", "m-2", b"x").unwrap(), Claim::Ours);
        // The subscriber reconnects too (it retries with a capped backoff).
        within("the link to come back", || (a.link() == Link::Up).then_some(()));
        assert_eq!(a.stats().claim_errors.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn accepted_ids_and_sessions_reach_the_other_nodes_and_not_the_sender() {
        let redis = testkit::Redis::start();
        let (a, b) = (node(&redis, "node-a"), node(&redis, "node-b"));
        // Both subscribed before anything is published (PUBLISH reaches current subscribers).
        within("both subscribers", || {
            let n = redis.cmd(&["PUBSUB", "NUMSUB", IDS_CHANNEL]).strings();
            (n.get(1).map(String::as_str) == Some("2")).then_some(())
        });
        let d = crate::replay::digest("m-1");
        a.announce_id("dev-1", d, 1_900_000_000);
        a.announce_session("dev-1", 42);
        let got = within("the id on node b", || {
            let inc = b.take_incoming();
            (!inc.ids.is_empty()).then_some(inc)
        });
        assert_eq!(
            got.ids,
            vec![RemoteId { device: "dev-1".into(), digest: d, expires_at: 1_900_000_000 }]
        );
        let sessions = if got.sessions.is_empty() {
            within("the session on node b", || {
                let s = b.take_incoming().sessions;
                (!s.is_empty()).then_some(s)
            })
        } else {
            got.sessions
        };
        assert_eq!(
            sessions,
            vec![RemoteSession { node: "node-a".into(), device: "dev-1".into(), started_ms: 42 }]
        );
        assert_eq!(b.stats().replication_delay.snapshot().count, 1);
        // The sender does not hear itself; b's own announcement reaches a (positive control).
        b.announce_id("dev-2", d, 1_900_000_000);
        let back = within("b's id on node a", || {
            let inc = a.take_incoming();
            (!inc.ids.is_empty()).then_some(inc)
        });
        assert_eq!(back.ids.len(), 1);
        assert_eq!(&*back.ids[0].device, "dev-2");
    }

    #[test]
    fn stopping_is_prompt_even_with_redis_down() {
        let mut redis = testkit::Redis::start();
        let mut a = node(&redis, "node-a");
        redis.stop();
        a.announce_id("dev-1", [0; 16], 1);
        std::thread::sleep(Duration::from_millis(300));
        let t = std::time::Instant::now();
        a.stop();
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
}
