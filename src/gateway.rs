//! The gateway's broker-thread logic, free of FFI: identity, topic ACL, the seven checks, the
//! outbox hand-off and the signed downlink. The shim in `plugin/` turns broker events into calls
//! here and implements [`Host`] with the broker API.
//!
//! Validation runs in the ACL WRITE hook: it is the one hook that sees both ordinary publishes
//! and will messages (wills skip `MOSQ_EVT_MESSAGE`), it runs before the message is stored,
//! retained or delivered, and `MOSQ_ERR_ACL_DENIED` there drops the message exactly as it does
//! from `MOSQ_EVT_MESSAGE` (v5 publishers get 0x87).

use crate::config::Config;
use crate::envelope::{self, Envelope, Reason, Rejection};
use crate::forward::{Done, Forwarder};
use crate::json::{self, Json};
use crate::registry::{Registry, Severity};
use crate::replay::{self, ReplayCache, ReplayCheck};
use crate::store::{AppendError, QueuedMessage, Store, Syncer};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Log levels the host understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Notice,
    Warning,
    Error,
}

/// What the core needs from the broker; called only on the broker thread.
pub trait Host {
    fn log(&mut self, level: Level, msg: &str);
    /// Publishes `payload` on `topic` (QoS 1, not retained). false if the broker refused.
    fn publish(&mut self, topic: &str, payload: &[u8]) -> bool;
}

/// A host that drops everything (used before the broker is running).
struct NullHost;
impl Host for NullHost {
    fn log(&mut self, _: Level, _: &str) {}
    fn publish(&mut self, _: &str, _: &[u8]) -> bool {
        false
    }
}

/// Who a client is, as far as this plugin is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity<'a> {
    /// A client whose verified certificate CN is its username: a device, registered or not.
    Device(&'a str),
    /// A certificate holder named in `service_identities`.
    Service(&'a str),
    /// No certificate-backed identity (plain listener, or a TLS listener without
    /// `use_identity_as_username`). The broker's own acl_file decides for it.
    None,
}

/// Classifies a client from its username and its certificate's first CN (None: no certificate).
pub fn identity<'a>(
    cfg: &Config,
    username: Option<&'a [u8]>,
    cert_cn: Option<&[u8]>,
) -> Identity<'a> {
    match (username, cert_cn) {
        (Some(u), Some(cn)) if u == cn => match std::str::from_utf8(u) {
            Ok(s) if cfg.is_service(s) => Identity::Service(s),
            Ok(s) => Identity::Device(s),
            // A certificate holder whose CN is not text is still a device: one that can match
            // no topic, so it can do nothing.
            Err(_) => Identity::Device(""),
        },
        _ => Identity::None,
    }
}

/// The plugin's answer to an ACL question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// Not ours to decide: the broker's acl_file (or the next plugin) decides.
    Defer,
}

/// The kinds of ACL question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Subscribe,
    Unsubscribe,
}

/// ACL READ / SUBSCRIBE / UNSUBSCRIBE: devices get exactly their own response topic; everyone
/// else is left to the broker's acl_file. Needs only the configuration, so it is safe to call
/// re-entrantly (a broker log line sent to a topic triggers READ checks while we are logging).
pub fn acl_verdict(cfg: &Config, who: Identity<'_>, access: Access, topic: &[u8]) -> Verdict {
    let Identity::Device(dev) = who else { return Verdict::Defer };
    if access == Access::Unsubscribe {
        return Verdict::Allow;
    }
    let own = !dev.is_empty()
        && std::str::from_utf8(topic).is_ok_and(|t| cfg.response_topic.is_topic_of(t, dev));
    if own {
        Verdict::Allow
    } else {
        Verdict::Deny
    }
}

/// Counters, by reason.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub accepted: u64,
    pub rejected: [u64; 7],
    pub outbox_full: u64,
    pub internal_errors: u64,
    pub acl_denied: u64,
    pub delivered: u64,
    pub dead_lettered: u64,
    pub responses: u64,
}

impl Stats {
    pub fn summary(&self) -> String {
        let mut s = format!("accepted={}", self.accepted);
        for r in Reason::ALL {
            s.push_str(&format!(" {}={}", r.as_str(), self.rejected[r.index()]));
        }
        s.push_str(&format!(
            " outbox_full={} internal={} acl_denied={} delivered={} dead_lettered={} responses={}",
            self.outbox_full,
            self.internal_errors,
            self.acl_denied,
            self.delivered,
            self.dead_lettered,
            self.responses
        ));
        s
    }
}

const PRUNE_INTERVAL: Duration = Duration::from_secs(10);
const STATS_INTERVAL: Duration = Duration::from_secs(60);

/// All per-instance state, owned by the broker thread.
pub struct Gateway {
    cfg: Config,
    registry: Registry,
    replay: ReplayCache,
    store: Store,
    forwarder: Option<Forwarder>,
    /// Per lane, the ids of accepted messages waiting on disk because the lane was full, oldest
    /// first. While a lane has any, its new messages queue behind them (per-device order).
    spilled: Vec<VecDeque<i64>>,
    stats: Stats,
    logged_stats: Stats,
    last_prune: Instant,
    last_stats: Instant,
    canon_buf: Vec<u8>,
    background: Vec<Box<dyn Stoppable>>,
}

/// A background thread the gateway owns and joins on shutdown.
pub trait Stoppable {
    fn stop(&mut self);
}
impl Stoppable for crate::registry::Watcher {
    fn stop(&mut self) {
        crate::registry::Watcher::stop(self)
    }
}
impl Stoppable for Syncer {
    fn stop(&mut self) {
        Syncer::stop(self)
    }
}

/// Current Unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Makes attacker-controlled text safe for one log line.
fn printable(s: &str) -> String {
    let cut: String = s.chars().take(128).collect();
    let q = format!("{cut:?}");
    q[1..q.len() - 1].to_string()
}

impl Gateway {
    /// Opens the registry and the state file, rebuilds the replay cache, and (if a backend is
    /// configured) starts the workers. Every failure is a message naming the option at fault.
    pub fn start(cfg: Config, wake: Arc<dyn Fn() + Send + Sync>) -> Result<Gateway, String> {
        let mut registry = Registry::open(&cfg.db_path).map_err(|e| {
            format!(
                "plugin_opt_db_path {:?}: cannot open the device registry: {e}",
                cfg.db_path.display().to_string()
            )
        })?;
        let mut store = Store::open(&cfg.spool_path, cfg.spool_max_bytes).map_err(|e| {
            format!(
                "plugin_opt_spool_path {:?}: cannot open the outbox: {e}",
                cfg.spool_path.display().to_string()
            )
        })?;
        let now = unix_now();
        let mut replay = ReplayCache::new(cfg.replay_cache_size);
        for (device, digest, expires) in store.take_live_seen(now) {
            replay.record(&device, digest, expires);
        }
        let mut background: Vec<Box<dyn Stoppable>> = Vec::new();
        let watcher = registry
            .watch(wake.clone())
            .map_err(|e| format!("cannot start the registry watcher: {e}"))?;
        background.push(Box::new(watcher));
        let syncer =
            store.start_syncer().map_err(|e| format!("cannot start the outbox syncer: {e}"))?;
        background.push(Box::new(syncer));
        let forwarder = match &cfg.backend {
            Some(b) => Some(
                Forwarder::start(b, wake)
                    .map_err(|e| format!("plugin_opt_backend_url {:?}: {e}", b.url_template))?,
            ),
            None => None,
        };
        let now_i = Instant::now();
        let lanes = forwarder.as_ref().map_or(0, Forwarder::lanes);
        let mut spilled = vec![VecDeque::new(); lanes];
        if lanes > 0 {
            // The backlog of the last run goes first, in its original order, lane by lane.
            for (id, hash) in store.pending_index() {
                spilled[(hash % lanes as u64) as usize].push_back(id);
            }
        }
        let mut gw = Gateway {
            spilled,
            cfg,
            registry,
            replay,
            store,
            forwarder,
            stats: Stats::default(),
            logged_stats: Stats::default(),
            last_prune: now_i,
            last_stats: now_i,
            canon_buf: Vec::with_capacity(1024),
            background,
        };
        // Hand the backlog left by the last run to the workers now, not at the first tick.
        let mut quiet = NullHost;
        gw.refill_lanes(&mut quiet);
        Ok(gw)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// What recovering the outbox found (torn or corrupt records), for the start-up log.
    pub fn recovery_warnings(&self) -> &[String] {
        &self.store.warnings
    }

    /// One line describing the running instance, for the start-up log.
    pub fn describe(&self) -> String {
        let pending = self.store.pending_count().unwrap_or(-1);
        format!(
            "{} devices in registry {}, data topic {}, tolerance {} s, replay cap {} per device (about {:.1} msg/s per device), {} ids remembered, outbox {} ({} pending), backend {}",
            self.registry.len(),
            self.cfg.db_path.display(),
            self.cfg.data_topic,
            self.cfg.timestamp_tolerance,
            self.cfg.replay_cache_size,
            self.cfg.replay_cache_size as f64 / self.cfg.timestamp_tolerance as f64,
            self.replay.len(),
            self.cfg.spool_path.display(),
            pending,
            match &self.cfg.backend {
                Some(b) => format!("{} with {} workers", b.url_template, b.workers),
                None => "none (validation only)".into(),
            }
        )
    }

    /// ACL WRITE: every publish and every will. Validates data-topic messages; refuses client
    /// publishes on response topics; confines devices to their own data topic.
    pub fn on_write(
        &mut self,
        host: &mut dyn Host,
        who: Identity<'_>,
        topic: &[u8],
        payload: &[u8],
        now: i64,
    ) -> Verdict {
        let topic_str = std::str::from_utf8(topic).ok();
        if let Some(dev) = topic_str.and_then(|t| self.cfg.data_topic.device_of(t)) {
            let topic = topic_str.unwrap_or_default();
            return match self.validate_and_accept(who, dev, payload, now) {
                Ok((device, message_id)) => {
                    self.stats.accepted += 1;
                    host.log(Level::Debug, &format!("secure-iot-gateway: accepted device={device} topic={topic} message_id={}", printable(&message_id)));
                    Verdict::Allow
                }
                Err((rej, message_id)) => {
                    let reason = match rej.kind {
                        Refusal::Check(r) => {
                            self.stats.rejected[r.index()] += 1;
                            r.as_str()
                        }
                        Refusal::OutboxFull => {
                            self.stats.outbox_full += 1;
                            "outbox"
                        }
                        Refusal::Internal => {
                            self.stats.internal_errors += 1;
                            "outbox"
                        }
                    };
                    let who_s = match who {
                        Identity::Device(d) | Identity::Service(d) => printable(d),
                        Identity::None => "-".into(),
                    };
                    host.log(
                        if matches!(rej.kind, Refusal::Check(_)) { Level::Notice } else { Level::Error },
                        &format!(
                            "secure-iot-gateway: rejected reason={} identity={who_s} topic={} message_id={}: {}",
                            reason,
                            printable(topic),
                            message_id.as_deref().map_or("-".into(), printable),
                            rej.detail
                        ),
                    );
                    Verdict::Deny
                }
            };
        }
        let on_response = topic_str.is_some_and(|t| self.cfg.response_topic.device_of(t).is_some());
        if on_response || matches!(who, Identity::Device(_)) {
            self.stats.acl_denied += 1;
            host.log(
                Level::Notice,
                &format!(
                    "secure-iot-gateway: denied publish identity={} topic={}: {}",
                    match who {
                        Identity::Device(d) | Identity::Service(d) => printable(d),
                        Identity::None => "-".into(),
                    },
                    printable(&String::from_utf8_lossy(topic)),
                    if on_response {
                        "only the gateway publishes responses"
                    } else {
                        "a device may publish only to its own data topic"
                    }
                ),
            );
            return Verdict::Deny;
        }
        Verdict::Defer
    }

    /// The seven checks, then the durable hand-off. Err carries the rejection (reason None:
    /// an operational refusal such as a full outbox) and the message id if one was parsed.
    #[allow(clippy::type_complexity)]
    fn validate_and_accept(
        &mut self,
        who: Identity<'_>,
        topic_device: &str,
        payload: &[u8],
        now: i64,
    ) -> Result<(String, String), (OpRejection, Option<String>)> {
        let env =
            Envelope::parse(payload, self.cfg.max_payload_bytes).map_err(|r| (r.into(), None))?;
        let mid = || Some(env.message_id().to_string());
        let device = env.device_id();
        let tls = match who {
            Identity::Device(d) => d,
            Identity::Service(s) => {
                return Err((
                    Rejection::new(
                        Reason::Identity,
                        format!("service identity {} cannot publish device data", printable(s)),
                    )
                    .into(),
                    mid(),
                ))
            }
            Identity::None => {
                return Err((
                    Rejection::new(Reason::Identity, "client has no TLS identity").into(),
                    mid(),
                ))
            }
        };
        if device != tls || device != topic_device {
            return Err((
                Rejection::new(
                    Reason::Identity,
                    format!(
                        "device_id {} vs TLS identity {} vs topic device {}",
                        printable(device),
                        printable(tls),
                        printable(topic_device)
                    ),
                )
                .into(),
                mid(),
            ));
        }
        let keys = match self.registry.get(device) {
            Ok(k) => k.clone(),
            Err(miss) => {
                return Err((Rejection::new(Reason::UnknownDevice, miss.to_string()).into(), mid()))
            }
        };
        let tol = self.cfg.timestamp_tolerance;
        if now.abs_diff(env.timestamp) > tol as u64 {
            return Err((
                Rejection::new(
                    Reason::Timestamp,
                    format!(
                        "timestamp {} is {} s from now (tolerance {tol} s)",
                        env.timestamp,
                        now.saturating_sub(env.timestamp)
                    ),
                )
                .into(),
                mid(),
            ));
        }
        let digest = replay::digest(env.message_id());
        match self.replay.check(device, &digest, now) {
            ReplayCheck::Fresh => {}
            ReplayCheck::Seen => {
                return Err((
                    Rejection::new(Reason::Replay, "message_id already accepted within the window")
                        .into(),
                    mid(),
                ))
            }
            ReplayCheck::CacheFull => {
                return Err((
                    Rejection::new(
                        Reason::Replay,
                        format!(
                            "replay cache full: {} ids inside the window for this device",
                            self.cfg.replay_cache_size
                        ),
                    )
                    .into(),
                    mid(),
                ))
            }
        }
        self.canon_buf.clear();
        env.write_canonical(&mut self.canon_buf);
        if !keys.secrets_at(now).any(|s| envelope::verify(s, &self.canon_buf, &env.signature)) {
            return Err((Rejection::new(Reason::Signature, "HMAC mismatch").into(), mid()));
        }
        // Authentic. Record it durably before the broker acknowledges it.
        let forward_payload = self.forwarder.as_ref().map(|_| env.canonical_payload());
        let expires_at = env.timestamp.saturating_add(tol);
        let row = self
            .store
            .append(device, env.message_id(), expires_at, forward_payload.as_deref())
            .map_err(|e| {
                let detail = e.to_string();
                let op = match e {
                    AppendError::Full { .. } => OpRejection { kind: Refusal::OutboxFull, detail },
                    AppendError::Io(_) => OpRejection {
                        kind: Refusal::Internal,
                        detail: format!("internal: {detail}"),
                    },
                };
                (op, mid())
            })?;
        self.replay.record(device, digest, expires_at);
        if let (Some(payload), Some(fwd)) = (forward_payload, &self.forwarder) {
            let lane = crate::forward::lane_of(device, fwd.lanes());
            if self.spilled[lane].is_empty() {
                let m = QueuedMessage {
                    id: row,
                    device_id: device.to_string(),
                    message_id: env.message_id().to_string(),
                    payload,
                };
                if fwd.try_dispatch(m).is_err() {
                    self.spilled[lane].push_back(row);
                }
            } else {
                self.spilled[lane].push_back(row);
            }
        }
        Ok((device.to_string(), env.message_id().to_string()))
    }

    /// Periodic work on the broker thread: registry snapshots, worker results and logs,
    /// responses to devices, paging the outbox, pruning, stats.
    pub fn on_tick(&mut self, host: &mut dyn Host, now: i64) {
        self.registry.apply_updates();
        for line in self.registry.take_logs() {
            let level = match line.severity {
                Severity::Notice => Level::Notice,
                Severity::Warning => Level::Warning,
                Severity::Error => Level::Error,
            };
            host.log(level, &format!("secure-iot-gateway: {}", line.text));
        }
        if self.forwarder.is_some() {
            self.settle_results(host, now, true);
            self.refill_lanes(host);
        }
        if self.last_prune.elapsed() >= PRUNE_INTERVAL {
            self.last_prune = Instant::now();
            self.replay.prune_all(now);
            if let Err(e) = self.store.prune(now) {
                host.log(
                    Level::Warning,
                    &format!("secure-iot-gateway: deleting settled outbox segments failed: {e}"),
                );
            }
        }
        if self.last_stats.elapsed() >= STATS_INTERVAL {
            self.last_stats = Instant::now();
            self.log_stats(host);
        }
    }

    /// Logs the counters if they changed since the last time.
    pub fn log_stats(&mut self, host: &mut dyn Host) {
        if let Some(f) = &self.forwarder {
            let s = f.stats();
            self.stats.delivered = s.delivered.load(std::sync::atomic::Ordering::Relaxed);
            self.stats.dead_lettered = s.dead_lettered.load(std::sync::atomic::Ordering::Relaxed);
        }
        if self.stats != self.logged_stats {
            host.log(Level::Notice, &format!("secure-iot-gateway: stats {}", self.stats.summary()));
            self.logged_stats = self.stats.clone();
        }
    }

    fn settle_results(&mut self, host: &mut dyn Host, now: i64, respond: bool) {
        let Some(fwd) = &self.forwarder else { return };
        for line in fwd.take_logs() {
            host.log(
                if line.warning { Level::Warning } else { Level::Info },
                &format!("secure-iot-gateway: {}", line.text),
            );
        }
        let results = fwd.take_results();
        if results.is_empty() {
            return;
        }
        let delivered: Vec<&QueuedMessage> =
            results.iter().filter(|d| d.delivered).map(|d| &d.message).collect();
        let dead: Vec<(&QueuedMessage, u16, &[u8])> = results
            .iter()
            .filter(|d| !d.delivered)
            .map(|d| (&d.message, d.status, &d.body[..]))
            .collect();
        if let Err(e) = self.store.settle(&delivered, &dead, now) {
            // The rows stay; they are delivered again after a restart (at least once).
            host.log(Level::Error, &format!("secure-iot-gateway: cannot update the outbox: {e}"));
        }
        for d in &results {
            if !d.delivered {
                host.log(
                    Level::Warning,
                    &format!(
                        "secure-iot-gateway: dead-lettered device={} message_id={} status={} after {} attempt(s)",
                        d.message.device_id,
                        printable(&d.message.message_id),
                        d.status,
                        d.attempts
                    ),
                );
            }
            if respond {
                self.respond(host, d, now);
            }
        }
    }

    /// Publishes the signed downlink for one backend answer.
    fn respond(&mut self, host: &mut dyn Host, d: &Done, now: i64) {
        let device = &d.message.device_id;
        let keys = match self.registry.get(device) {
            Ok(k) => k.clone(),
            Err(_) => {
                host.log(Level::Notice, &format!("secure-iot-gateway: no response for device={device}: no longer in the registry"));
                return;
            }
        };
        let text = downlink(&keys.secret, device, &d.message.message_id, d.status, &d.body, now);
        let topic = self.cfg.response_topic.topic_for(device);
        if host.publish(&topic, text.as_bytes()) {
            self.stats.responses += 1;
            host.log(
                Level::Debug,
                &format!(
                    "secure-iot-gateway: response device={device} in_reply_to={} status={} queued {} us after the backend answered",
                    printable(&d.message.message_id),
                    d.status,
                    d.answered_at.elapsed().as_micros()
                ),
            );
        } else {
            host.log(
                Level::Warning,
                &format!("secure-iot-gateway: broker refused the response on {topic}"),
            );
        }
    }

    /// Hands spilled messages to their lanes, oldest first, as the lanes free up. Each spilled
    /// message is read from disk exactly once; a full lane never holds up the others.
    fn refill_lanes(&mut self, host: &mut dyn Host) {
        let Some(fwd) = &self.forwarder else { return };
        for (lane, queue) in self.spilled.iter_mut().enumerate() {
            let mut room = fwd.lane_free(lane);
            while room > 0 {
                let Some(&id) = queue.front() else { break };
                match self.store.read(id) {
                    Ok(Some(m)) => {
                        if fwd.try_dispatch(m).is_err() {
                            break;
                        }
                        room -= 1;
                    }
                    // Settled meanwhile (e.g. delivered before a restart): nothing to send.
                    Ok(None) => {}
                    Err(e) => {
                        host.log(
                            Level::Error,
                            &format!(
                                "secure-iot-gateway: cannot read message {id} from the outbox: {e}"
                            ),
                        );
                        break;
                    }
                }
                queue.pop_front();
            }
        }
    }

    /// Stops the workers and background threads (joins them all). Undelivered messages stay
    /// in the outbox for the next start.
    pub fn shutdown(&mut self, host: &mut dyn Host) {
        if let Some(mut f) = self.forwarder.take() {
            f.shutdown();
            // Results that arrived while stopping are still settled (the broker API must not
            // publish from cleanup, so those devices get no response).
            self.forwarder = Some(f);
            self.settle_results(host, unix_now(), false);
            self.forwarder = None;
        }
        for b in &mut self.background {
            b.stop();
        }
        self.log_stats(host);
    }
}

/// Why a message was refused: one of the spec's checks, or an operational refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Check(Reason),
    /// The outbox is at `spool_max_bytes`.
    OutboxFull,
    /// The outbox could not be written.
    Internal,
}

/// A refusal and its human detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpRejection {
    pub kind: Refusal,
    pub detail: String,
}

impl From<Rejection> for OpRejection {
    fn from(r: Rejection) -> Self {
        OpRejection { kind: Refusal::Check(r.reason), detail: r.detail }
    }
}

/// The signed downlink envelope of the spec for a backend answer.
pub fn downlink(
    secret: &[u8],
    device: &str,
    in_reply_to: &str,
    status: u16,
    body: &[u8],
    now: i64,
) -> String {
    let payload = match json::parse_strict(body) {
        Ok(v) => v,
        Err(_) => Json::String(String::from_utf8_lossy(body).into_owned()),
    };
    let members = vec![
        ("device_id".to_string(), Json::String(device.to_string())),
        ("timestamp".to_string(), Json::Number(now.into())),
        ("message_id".to_string(), Json::String(envelope::uuid_v4())),
        ("in_reply_to".to_string(), Json::String(in_reply_to.to_string())),
        ("status".to_string(), Json::Number(status.into())),
        ("payload".to_string(), payload),
    ];
    envelope::sign_members(secret, &members)
}

#[cfg(test)]
mod tests;
