//! The worker pool that POSTs accepted messages to the HTTP backend, one thread per lane.
//!
//! The delivery owner (`super`) decides which lane a message goes to; a lane is served by one
//! worker, so a device's messages are sent in order. A worker POSTs its message until the
//! backend gives a final answer: 2xx delivered, other 4xx (but 429) dead-lettered. 5xx, 429,
//! timeouts and refused connections are retried with capped exponential backoff and full jitter,
//! for as long as it takes; the lane waits meanwhile, which keeps per-device order.
//!
//! Workers never call the broker: they push a [`Done`] onto the results queue and call the
//! `wake` hook so the broker thread drains it promptly.

use super::outbox::{Done, QueuedMessage};
use crate::cluster::{Claim, Claimer, Cluster};
use crate::config::BackendConfig;
use crate::host::{Level, LogLine};
use crate::metrics::histogram::{Histogram, BACKEND_BOUNDS};
use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Messages all lanes together hold in memory (the rest wait in the outbox), split evenly,
/// but never fewer than [`MIN_LANE_CAPACITY`] per lane. Why this many: the broker refills the
/// lanes from its tick, and in a backlog drain with no other traffic a tick can be up to 100 ms
/// away (Mosquitto's idle loop timeout; a wake-up signal that lands while the broker is busy does
/// not shorten it). A lane must hold more than 100 ms of work, or the drain stalls: at 512 a lane
/// drained at ~5k msg/s on this machine, a fraction of the steady rate. 16384 small messages
/// are a few MiB.
pub const LANES_CAPACITY: usize = 16_384;
/// See [`LANES_CAPACITY`].
pub const MIN_LANE_CAPACITY: usize = 512;

/// The capacity of each lane with `workers` lanes.
pub fn lane_capacity(workers: usize) -> usize {
    (LANES_CAPACITY / workers.max(1)).max(MIN_LANE_CAPACITY)
}
/// A worker that delivered a message less than [`POLL_LINGER`] ago looks for the next ones this
/// often instead of waiting to be woken (see `Worker::run`): at most this much is added to a
/// message's way to the backend while messages arrive faster than one per [`POLL_LINGER`], and
/// what arrived meanwhile goes out as one pipelined batch. 0.5 ms rather than 0.2 ms: batches of
/// ~3.5 instead of ~1.4 at 7,000 msg/s, 0.6 worker wake-ups per message instead of 1.0 at QoS 1
/// (`make bench`, BENCHMARKS.md).
const POLL_EVERY: Duration = Duration::from_micros(500);
/// See [`POLL_EVERY`]. Below one message per this long (2,000 msg/s per lane) every message
/// wakes its worker at once.
const POLL_LINGER: Duration = Duration::from_micros(500);
/// Largest backend response body kept for the downlink.
pub const MAX_RESPONSE_BODY: u64 = 64 * 1024;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Longest wait between two attempts to claim an id while Redis does not answer.
const CLAIM_RETRY_MAX: Duration = Duration::from_secs(1);
/// Longest Retry-After honoured (a larger value is clamped, never ignored).
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// Counters only the workers can keep (the broker thread sees final answers, not attempts).
#[derive(Debug)]
pub struct WorkerStats {
    pub attempts: AtomicU64,
    pub retries: AtomicU64,
    /// Duration of every POST attempt, successful or not.
    pub request_duration: Histogram,
}

impl Default for WorkerStats {
    fn default() -> Self {
        WorkerStats {
            attempts: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            request_duration: Histogram::new(BACKEND_BOUNDS),
        }
    }
}

/// Why a backend could not be set up (at start-up, so the broker refuses to start).
#[derive(Debug)]
pub enum BackendError {
    CaFile(PathBuf, std::io::Error),
    NoCertificate(PathBuf),
    BadUrl(String),
    Thread(std::io::Error),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::CaFile(p, e) => write!(f, "{}: {e}", p.display()),
            BackendError::NoCertificate(p) => {
                write!(f, "{}: no PEM certificate found", p.display())
            }
            BackendError::BadUrl(why) => write!(f, "{why}"),
            BackendError::Thread(e) => write!(f, "cannot start worker thread: {e}"),
        }
    }
}

impl std::error::Error for BackendError {}

/// What workers share with the broker thread.
struct Shared {
    results: Mutex<Vec<Done>>,
    logs: Mutex<Vec<LogLine>>,
    stopping: AtomicBool,
    /// Wakes workers sleeping in a backoff so shutdown is prompt.
    sleep_lock: Mutex<()>,
    sleep_cv: Condvar,
    stats: WorkerStats,
}

/// The worker pool: one bounded queue (lane) and one thread per worker.
pub struct Pool {
    lanes: Vec<SyncSender<QueuedMessage>>,
    /// Messages sitting in each lane (so the broker thread never reads the outbox for nothing).
    depth: Vec<Arc<AtomicUsize>>,
    /// Messages each lane holds ([`lane_capacity`]).
    capacity: usize,
    handles: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// The backend URL for `device`: the template with `{device_id}` percent-encoded.
pub fn url_for(template: &str, device: &str) -> String {
    let mut enc = String::with_capacity(device.len());
    for b in device.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    template.replace("{device_id}", &enc)
}

/// Builds the HTTP agent: keep-alive pool, bounded timeouts, statuses as data (not errors),
/// system trust store or the configured CA.
pub fn agent(cfg: &BackendConfig) -> Result<ureq::Agent, BackendError> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let roots = match &cfg.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| BackendError::CaFile(path.clone(), e))?;
            let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(BackendError::NoCertificate(path.clone()));
            }
            RootCerts::new_with_certs(&certs)
        }
        None => RootCerts::PlatformVerifier,
    };
    let tls = TlsConfig::builder().provider(TlsProvider::NativeTls).root_certs(roots).build();
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(cfg.http_timeout))
        .http_status_as_error(false)
        .max_idle_connections_per_host(4)
        .tls_config(tls)
        .user_agent("secure-iot-gateway/0.1")
        .build();
    Ok(config.into())
}

/// What one attempt produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// 2xx or a final 4xx.
    Final { status: u16, body: Vec<u8>, truncated: bool },
    /// Try again, after at least this long if the backend said so.
    Retry { why: String, after: Option<Duration> },
}

/// Classifies a status the spec's way: (final?, delivered?). 3xx is final and not delivered
/// (dead-lettered, logged with its status): the gateway never follows a redirect, which could
/// send device data to another host, and asking again would get the same answer forever.
pub fn classify(status: u16) -> (bool, bool) {
    match status {
        200..=299 => (true, true),
        300..=399 => (true, false),
        429 => (false, false),
        400..=499 => (true, false),
        _ => (false, false),
    }
}

/// Parses a Retry-After header given in seconds (the HTTP-date form is treated as absent).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(|s| Duration::from_secs(s).min(RETRY_AFTER_MAX))
}

fn outcome(status: u16, retry_after: Option<&str>, body: Vec<u8>, truncated: bool) -> Attempt {
    match classify(status) {
        (true, _) => Attempt::Final { status, body, truncated },
        (false, _) => Attempt::Retry {
            why: format!("HTTP {status}"),
            after: retry_after.and_then(parse_retry_after),
        },
    }
}

/// One worker's connection to the backend: the small built-in client for `http://` (the hot
/// path: one write per request, or per pipelined batch), ureq for `https://` (TLS, trust store).
pub enum Backend {
    Plain { client: crate::http::Client, path: String },
    Tls { agent: ureq::Agent, url: String },
}

impl Backend {
    pub fn new(cfg: &BackendConfig) -> Result<Backend, BackendError> {
        let t = &cfg.url_template;
        if let Some(rest) = t.strip_prefix("http://") {
            let split = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, path) = rest.split_at(split);
            let uri: ureq::http::Uri = format!("http://{authority}/")
                .parse()
                .map_err(|e| BackendError::BadUrl(format!("{t}: {e}")))?;
            let host = uri.host().ok_or_else(|| BackendError::BadUrl(format!("{t}: no host")))?;
            let path = if path.is_empty() {
                "/".to_string()
            } else if path.starts_with('?') {
                format!("/{path}")
            } else {
                path.to_string()
            };
            Ok(Backend::Plain {
                client: crate::http::Client::new(host, uri.port_u16(), cfg.http_timeout),
                path,
            })
        } else {
            Ok(Backend::Tls { agent: agent(cfg)?, url: t.clone() })
        }
    }

    /// POSTs `batch` back to back (HTTP/1.1 pipelining) to a plain `http://` backend; the
    /// attempts of the first messages, in order, each with how long its answer took. Fewer than
    /// the batch: the rest got no answer (the connection failed or `stop` said so; the error is
    /// the last attempt). An `https://` backend (ureq) makes one attempt, for the first message
    /// only (its workers get batches of one).
    pub fn attempt_all(
        &mut self,
        batch: &[QueuedMessage],
        stop: &dyn Fn() -> bool,
    ) -> Vec<(Attempt, Duration)> {
        let Backend::Plain { client, path } = self else {
            let started = Instant::now();
            let first = batch.first().map(|m| self.attempt(m));
            return first.map(|a| (a, started.elapsed())).into_iter().collect();
        };
        let paths: Vec<String> = batch.iter().map(|m| url_for(path, &m.device_id)).collect();
        // The client makes every header value safe itself.
        let headers: Vec<[(&str, &str); 3]> = batch
            .iter()
            .map(|m| {
                [
                    ("Content-Type", "application/json"),
                    ("X-Device-Id", m.device_id.as_str()),
                    ("X-Message-Id", m.message_id.as_str()),
                ]
            })
            .collect();
        let reqs: Vec<crate::http::Request<'_>> = batch
            .iter()
            .zip(&paths)
            .zip(&headers)
            .map(|((m, path), headers)| crate::http::Request { path, headers, body: &m.payload })
            .collect();
        let mut answers = Vec::with_capacity(batch.len());
        let started = Instant::now();
        let failed = client.post_all(&reqs, &mut answers, stop).err();
        let mut attempts: Vec<(Attempt, Duration)> = answers
            .into_iter()
            .map(|(r, took)| {
                (outcome(r.status, r.retry_after.as_deref(), r.body, r.truncated), took)
            })
            .collect();
        if let Some(e) = failed {
            attempts.push((Attempt::Retry { why: e.to_string(), after: None }, started.elapsed()));
        }
        attempts
    }

    /// POSTs one message once.
    pub fn attempt(&mut self, m: &QueuedMessage) -> Attempt {
        match self {
            Backend::Plain { .. } => {
                let mut attempts = self.attempt_all(std::slice::from_ref(m), &|| false);
                attempts.pop().expect("one message, one attempt").0
            }
            Backend::Tls { agent, url } => {
                let mid = crate::http::header_value(&m.message_id);
                let res = agent
                    .post(url_for(url, &m.device_id))
                    .header("Content-Type", "application/json")
                    .header("X-Device-Id", &m.device_id)
                    .header("X-Message-Id", mid.as_ref())
                    .send(&m.payload[..]);
                match res {
                    Ok(mut resp) => {
                        let status = resp.status().as_u16();
                        let retry_after = resp
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let mut body = Vec::new();
                        // One byte more than kept tells whether there was more.
                        let _ = resp
                            .body_mut()
                            .as_reader()
                            .take(MAX_RESPONSE_BODY + 1)
                            .read_to_end(&mut body);
                        let truncated = body.len() as u64 > MAX_RESPONSE_BODY;
                        body.truncate(MAX_RESPONSE_BODY as usize);
                        outcome(status, retry_after.as_deref(), body, truncated)
                    }
                    Err(e) => Attempt::Retry { why: e.to_string(), after: None },
                }
            }
        }
    }
}

/// The ceiling of the backoff before retry number `n` (1-based): doubling from
/// [`BACKOFF_START`], capped at [`BACKOFF_MAX`].
fn backoff_ceiling(n: u32) -> Duration {
    BACKOFF_START.saturating_mul(1u32 << n.min(16).saturating_sub(1)).min(BACKOFF_MAX)
}

/// Backoff before retry number `n` (1-based): full jitter over an exponential ceiling.
pub fn backoff(n: u32) -> Duration {
    let ceiling = backoff_ceiling(n);
    let mut r = [0u8; 8];
    let _ = openssl::rand::rand_bytes(&mut r);
    let frac = u64::from_le_bytes(r) as f64 / u64::MAX as f64;
    // Never less than a tenth of the ceiling, so a storm of retries cannot spin.
    ceiling.mul_f64(0.1 + 0.9 * frac)
}

impl Pool {
    /// Starts `cfg.workers` threads. `wake` is called after each result is queued.
    /// In cluster mode each worker claims an id in Redis before POSTing it.
    pub fn start(
        cfg: &BackendConfig,
        wake: Arc<dyn Fn() + Send + Sync>,
        cluster: Option<&Cluster>,
    ) -> Result<Pool, BackendError> {
        // Fails here (at init) on an unreadable CA file or a bad URL; worker 0 then uses it.
        let mut first = Some(Backend::new(cfg)?);
        let shared = Arc::new(Shared {
            results: Mutex::new(Vec::new()),
            logs: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            sleep_lock: Mutex::new(()),
            sleep_cv: Condvar::new(),
            stats: WorkerStats::default(),
        });
        let mut pool = Pool {
            lanes: Vec::new(),
            depth: Vec::new(),
            capacity: lane_capacity(cfg.workers),
            handles: Vec::new(),
            shared: shared.clone(),
        };
        for i in 0..cfg.workers {
            let (tx, rx) = std::sync::mpsc::sync_channel(pool.capacity);
            let d = Arc::new(AtomicUsize::new(0));
            let backend = match first.take() {
                Some(b) => b,
                None => Backend::new(cfg)?,
            };
            // ureq (https) sends one request at a time.
            let pipelines = cluster.is_none() && matches!(backend, Backend::Plain { .. });
            let worker = Worker {
                rx,
                depth: d.clone(),
                backend,
                shared: shared.clone(),
                wake: wake.clone(),
                claimer: cluster.map(Cluster::claimer),
                pipeline: if pipelines { cfg.pipeline.max(1) } else { 1 },
            };
            // On an error here `pool` is dropped, which stops the workers already started.
            let h = std::thread::Builder::new()
                .name(format!("iotgw-fwd-{i}"))
                .spawn(move || worker.run())
                .map_err(BackendError::Thread)?;
            pool.lanes.push(tx);
            pool.depth.push(d);
            pool.handles.push(h);
        }
        Ok(pool)
    }

    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Hands a message to `lane` without blocking; gives it back if the lane is full.
    pub fn try_dispatch(&self, lane: usize, m: QueuedMessage) -> Result<(), QueuedMessage> {
        match self.lanes[lane].try_send(m) {
            Ok(()) => {
                self.depth[lane].fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => Err(m),
        }
    }

    /// Free places in one lane.
    pub fn lane_free(&self, lane: usize) -> usize {
        self.depth.get(lane).map_or(0, |d| self.capacity.saturating_sub(d.load(Ordering::Relaxed)))
    }

    /// Takes the finished results (broker thread).
    pub fn take_results(&self) -> Vec<Done> {
        std::mem::take(&mut *self.shared.results.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Takes the queued log lines (broker thread).
    pub fn take_logs(&self) -> Vec<LogLine> {
        std::mem::take(&mut *self.shared.logs.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn stats(&self) -> &WorkerStats {
        &self.shared.stats
    }

    /// Stops every worker and joins it. An in-flight request ends within the HTTP timeout;
    /// undelivered messages simply stay in the outbox. Idempotent.
    pub fn shutdown(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.sleep_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.sleep_cv.notify_all();
        }
        self.lanes.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A message's final answer from the backend: 2xx is delivered, anything else dead-lettered.
fn answered(
    message: QueuedMessage,
    status: u16,
    body: Vec<u8>,
    body_truncated: bool,
    attempts: u32,
    answered_at: Instant,
) -> Done {
    let delivered = (200..300).contains(&status);
    Done {
        message,
        status,
        body,
        body_truncated,
        delivered,
        attempts,
        answered_at,
        claimed_elsewhere: None,
    }
}

struct Worker {
    rx: Receiver<QueuedMessage>,
    depth: Arc<AtomicUsize>,
    backend: Backend,
    shared: Arc<Shared>,
    wake: Arc<dyn Fn() + Send + Sync>,
    claimer: Option<Claimer>,
    /// Most messages sent back to back (see [`Backend::attempt_all`]); 1 for `https://` and in
    /// cluster mode, where each message is claimed in Redis just before its POST.
    pipeline: usize,
}

impl Worker {
    fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    fn log(&self, level: Level, text: String) {
        self.shared.logs.lock().unwrap_or_else(|p| p.into_inner()).push(LogLine { level, text });
    }

    /// Sleeps up to `d`; returns false if shutdown began.
    fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut g = self.shared.sleep_lock.lock().unwrap_or_else(|p| p.into_inner());
        while !self.stopping() {
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            g = self
                .shared
                .sleep_cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        false
    }

    fn run(mut self) {
        let mut last = Instant::now().checked_sub(POLL_LINGER).unwrap_or_else(Instant::now);
        while !self.stopping() {
            // While messages stream in, look for the next one every POLL_EVERY instead of waiting
            // to be woken: a waiting receiver costs the sender (the broker thread) a futex wake
            // per message, an interrupt to the idle CPU in a VM (~4.5 µs of the broker thread per
            // message in `perf`, BENCHMARKS.md). After a quiet POLL_LINGER the worker waits to be
            // woken again, so a message after a quiet spell goes out at once.
            let got = match self.rx.try_recv() {
                Ok(m) => Ok(m),
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) if last.elapsed() < POLL_LINGER => {
                    std::thread::sleep(POLL_EVERY);
                    continue;
                }
                Err(TryRecvError::Empty) => self.rx.recv_timeout(Duration::from_millis(200)),
            };
            let m = match got {
                Ok(m) => {
                    self.depth.fetch_sub(1, Ordering::Relaxed);
                    m
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            // What else is waiting goes out with it, up to `pipeline`; never waited for.
            let mut batch = vec![m];
            while batch.len() < self.pipeline {
                match self.rx.try_recv() {
                    Ok(m) => {
                        self.depth.fetch_sub(1, Ordering::Relaxed);
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
            // A panic in one job must not silently shrink the pool.
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.deliver_all(batch)));
            if outcome.is_err() {
                self.log(
                    Level::Warning,
                    "forwarder worker caught a panic; its messages stay in the outbox".into(),
                );
            }
            last = Instant::now();
        }
    }

    /// Claims the id (cluster mode) until Redis answers. Some(elsewhere) when another node holds
    /// it; None to go on and POST; Err(()) when shutting down.
    fn claim(&mut self, m: &QueuedMessage) -> Result<Option<crate::cluster::ClaimedElsewhere>, ()> {
        let mut failures = 0u32;
        loop {
            if self.stopping() {
                return Err(());
            }
            let Some(c) = self.claimer.as_mut() else { return Ok(None) };
            match c.claim(&m.device_id, &m.message_id, &m.payload) {
                Ok(Claim::Ours) => return Ok(None),
                Ok(Claim::Elsewhere(e)) => return Ok(Some(e)),
                Err(e) => {
                    // Never POST without the claim: the message waits in its lane (and the
                    // outbox). The outage itself is logged once by the cluster module.
                    failures += 1;
                    // Capped low: Redis is back within a second or two of an outage ending,
                    // unlike a backend that may be down for hours.
                    let wait = backoff(failures).min(CLAIM_RETRY_MAX);
                    if failures == 1 || failures.is_multiple_of(50) {
                        self.log(
                            Level::Warning,
                            format!(
                                "cannot claim device {} message {} in Redis ({e}): not forwarded until the claim is made; retrying in {} ms",
                                m.device_id,
                                m.message_id,
                                wait.as_millis()
                            ),
                        );
                    }
                    if !self.sleep(wait) {
                        return Err(());
                    }
                }
            }
        }
    }

    /// Delivers `batch`, in order: the first attempts go out together, then every message
    /// whose attempt asks for a retry, and every one left unanswered, is delivered on its own,
    /// in order. Only the first of them waits its backoff (or `Retry-After`): once it got
    /// through, the backend is taking messages again, so the next ones are tried at once.
    fn deliver_all(&mut self, mut batch: Vec<QueuedMessage>) {
        // Batches of one in cluster mode (see `pipeline`): claimed, then sent, one at a time.
        if let [_] = batch[..] {
            let m = batch.pop().expect("one message");
            self.deliver(m, None, 0);
            return;
        }
        if self.stopping() {
            return;
        }
        let stopping = &self.shared.stopping;
        let attempts = self.backend.attempt_all(&batch, &|| stopping.load(Ordering::SeqCst));
        // The answered ones and the one that failed; the unanswered rest count when retried.
        self.shared.stats.attempts.fetch_add(attempts.len() as u64, Ordering::Relaxed);
        let answered_at = Instant::now();
        let mut again = Vec::new();
        let mut done = Vec::new();
        let rest = batch.split_off(attempts.len().min(batch.len()));
        for (m, (attempt, took)) in batch.into_iter().zip(attempts) {
            self.shared.stats.request_duration.observe(took);
            match attempt {
                Attempt::Final { status, body, truncated } => {
                    done.push(answered(m, status, body, truncated, 1, answered_at))
                }
                retry => again.push((m, Some(retry))),
            }
        }
        again.extend(rest.into_iter().map(|m| (m, None)));
        if !done.is_empty() {
            self.shared.results.lock().unwrap_or_else(|p| p.into_inner()).append(&mut done);
            (self.wake)();
        }
        for (k, (m, tried)) in again.into_iter().enumerate() {
            match tried {
                Some(t) if k == 0 => self.deliver(m, Some(t), 0),
                Some(_) => {
                    // Refused too, but not waited for (see above): counted, then tried afresh.
                    self.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                    self.deliver(m, None, 1);
                }
                // Sent but never answered: tried afresh, not counted as a failure of its own.
                None => self.deliver(m, None, 0),
            }
        }
    }

    /// Delivers one message, retrying until it gets a final answer (or shutdown); `tried` is
    /// an attempt already made (it asked for a retry), `earlier` attempts made before that.
    fn deliver(&mut self, mut m: QueuedMessage, mut tried: Option<Attempt>, earlier: u32) {
        let mut n = earlier + u32::from(tried.is_some());
        loop {
            if self.stopping() {
                return;
            }
            let attempt = match tried.take() {
                Some(attempt) => attempt,
                None => {
                    // Claimed before every attempt: a long backend outage may outlast the claim.
                    let Ok(elsewhere) = self.claim(&m) else { return };
                    if let Some(e) = elsewhere {
                        let done = Done {
                            message: m,
                            status: 0,
                            body: Vec::new(),
                            body_truncated: false,
                            delivered: false,
                            attempts: n,
                            answered_at: Instant::now(),
                            claimed_elsewhere: Some(e),
                        };
                        self.shared.results.lock().unwrap_or_else(|p| p.into_inner()).push(done);
                        (self.wake)();
                        return;
                    }
                    n += 1;
                    self.shared.stats.attempts.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    let attempt = self.backend.attempt(&m);
                    self.shared.stats.request_duration.observe(started.elapsed());
                    attempt
                }
            };
            match self.after(m, n, attempt) {
                Some(again) => m = again,
                None => return,
            }
        }
    }

    /// Acts on attempt number `n` of `m`: a final answer is queued for the tick (None); a retry
    /// is counted, logged (the first and every tenth) and waited for, then `m` comes back
    /// (None if shutdown began meanwhile).
    fn after(&mut self, m: QueuedMessage, n: u32, attempt: Attempt) -> Option<QueuedMessage> {
        match attempt {
            Attempt::Final { status, body, truncated } => {
                let done = answered(m, status, body, truncated, n, Instant::now());
                self.shared.results.lock().unwrap_or_else(|p| p.into_inner()).push(done);
                (self.wake)();
                None
            }
            Attempt::Retry { why, after } => {
                self.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                let wait = after.unwrap_or_else(|| backoff(n));
                // Log the first failure and then every tenth, to keep an outage readable.
                if n == 1 || n.is_multiple_of(10) {
                    self.log(
                        Level::Warning,
                        format!(
                            "backend delivery failed for device {} message {} (attempt {n}: {why}); retrying in {} ms",
                            m.device_id,
                            m.message_id,
                            wait.as_millis()
                        ),
                    );
                }
                self.sleep(wait).then_some(m)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_hold_more_than_a_100_ms_tick_of_work_within_a_fixed_memory_budget() {
        // The default 4 workers: 4096 per lane, over 100 ms of a single device's steady rate.
        assert_eq!(lane_capacity(4), 4096);
        assert_eq!(lane_capacity(1), LANES_CAPACITY);
        // Many workers share the budget, never below the floor.
        assert_eq!(lane_capacity(256), MIN_LANE_CAPACITY);
        assert_eq!(lane_capacity(0), LANES_CAPACITY);
    }

    #[test]
    fn status_classes_follow_the_spec() {
        assert_eq!(classify(200), (true, true));
        assert_eq!(classify(204), (true, true));
        assert_eq!(classify(301), (true, false));
        assert_eq!(classify(307), (true, false));
        assert_eq!(classify(400), (true, false));
        assert_eq!(classify(404), (true, false));
        assert_eq!(classify(429), (false, false));
        assert_eq!(classify(500), (false, false));
        assert_eq!(classify(503), (false, false));
    }

    #[test]
    fn url_template_percent_encodes_the_device() {
        assert_eq!(
            url_for("http://h/device/{device_id}/data", "s.1_a-b"),
            "http://h/device/s.1_a-b/data"
        );
        assert_eq!(url_for("http://h/{device_id}", "a b/c"), "http://h/a%20b%2Fc");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitters_below_its_ceiling() {
        let ceilings: Vec<u64> = (1..=12).map(|n| backoff_ceiling(n).as_millis() as u64).collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
        );
        assert_eq!(backoff_ceiling(u32::MAX), BACKOFF_MAX);
        for n in 1..40 {
            let (b, c) = (backoff(n), backoff_ceiling(n));
            assert!(b <= c && b >= c / 10, "{n}: {b:?} outside [{:?}, {c:?}]", c / 10);
        }
        // Jittered: 50 draws at the cap are not all the same.
        let draws: std::collections::HashSet<Duration> = (0..50).map(|_| backoff(30)).collect();
        assert!(draws.len() > 1);
    }

    #[test]
    fn retry_after_seconds_are_honoured_and_clamped() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("99999"), Some(RETRY_AFTER_MAX));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
