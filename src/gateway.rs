//! The broker-thread router: it takes broker events from the shim, asks the [`Validator`]
//! about data-topic messages, hands accepted ones to [`Delivery`], and turns the backend's
//! answers into signed responses. It owns no rule of its own beyond topic routing: identities
//! and read access are in [`crate::acl`], the checks in [`crate::validate`], the outbox, lanes
//! and workers in [`crate::delivery`].
//!
//! Validation runs in the ACL WRITE hook: it is the one hook that sees both ordinary publishes
//! and will messages (wills skip `MOSQ_EVT_MESSAGE`), it runs before the message is stored,
//! retained or delivered, and `MOSQ_ERR_ACL_DENIED` there drops the message exactly as it does
//! from `MOSQ_EVT_MESSAGE` (v5 publishers get 0x87).

use crate::acl::{self, Access, Identity, Verdict};
use crate::cluster::{self, Cluster};
use crate::config::{Config, RegistrySource};
use crate::crl;
use crate::delivery::outbox::{AppendError, Done};
use crate::delivery::{self, Delivery};
use crate::envelope::{self, Reason};
use crate::host::{printable, unix_now, Host, Level, LogLine};
use crate::json;
use crate::loglimit::LogLimiter;
use crate::metrics::{self, Monitor, Snapshot};
use crate::registry::{Registry, RegistryError, Watcher};
use crate::validate::{Rejected, Validator};
use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a data-topic message was refused: one of the spec's checks, or an operational refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Check(Reason),
    /// The outbox is at `spool_max_bytes`.
    OutboxFull,
    /// The outbox could not be written.
    Internal,
}

impl Refusal {
    /// The name in log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Check(r) => r.as_str(),
            Refusal::OutboxFull | Refusal::Internal => "outbox",
        }
    }

    /// The refusals besides the checks. With [`Reason::ALL`], the one list every per-reason
    /// counter (metrics, `$SYS`) iterates, so a new reason appears there by itself.
    pub const OPERATIONAL: [Refusal; 2] = [Refusal::OutboxFull, Refusal::Internal];

    /// Every refusal: the checks in order, then the operational ones.
    pub fn all() -> impl Iterator<Item = Refusal> {
        Reason::ALL.into_iter().map(Refusal::Check).chain(Refusal::OPERATIONAL)
    }

    /// The `reason` label of the metrics (outbox refusals told apart, unlike in the log).
    pub fn metric_name(self) -> &'static str {
        match self {
            Refusal::Check(r) => r.as_str(),
            Refusal::OutboxFull => "outbox_full",
            Refusal::Internal => "outbox_error",
        }
    }
}

/// The live CRL and what the gateway learned about connected certificates.
struct CrlState {
    revoked: crl::Revoked,
    updates: std::sync::mpsc::Receiver<crl::Update>,
    _watcher: crl::Watcher,
    /// Certificate serial -> username, learned from ACL checks, so a newly revoked certificate
    /// can be disconnected at once. Bounded (see [`MAX_SERIALS`]).
    serials: std::collections::HashMap<Vec<u8>, Box<str>>,
}

/// Certificates remembered for disconnecting on a CRL change (beyond this, the oldest knowledge
/// is dropped: such a client is still refused at its next action).
const MAX_SERIALS: usize = 100_000;

/// A refusal with its detail and the message id (when parsed), for the log line.
struct Refused {
    refusal: Refusal,
    detail: String,
    message_id: Option<String>,
}

/// Why a publish outside the data topics was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// Only the gateway publishes on response topics.
    ResponseTopic,
    /// A device may publish only to its own data topic.
    NotOwnDataTopic,
}

/// What the gateway decided about one publish (or will): the verdict and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Validated and durably stored.
    Accepted,
    /// A data-topic message refused.
    Refused(Refusal),
    /// A publish elsewhere that the gateway's policy forbids.
    Denied(Denial),
    /// Not ours: the broker's acl_file decides.
    Deferred,
}

impl Outcome {
    pub fn verdict(self) -> Verdict {
        match self {
            Outcome::Accepted => Verdict::Allow,
            Outcome::Refused(_) | Outcome::Denied(_) => Verdict::Deny,
            Outcome::Deferred => Verdict::Defer,
        }
    }
}

/// Why the gateway could not start; each names the option at fault.
#[derive(Debug)]
pub enum StartError {
    Registry(RegistrySource, RegistryError),
    Watcher(std::io::Error),
    Delivery(delivery::StartError),
    ServiceIsDevice(String),
    Crl(crl::CrlError),
    /// `plugin_opt_metrics_listen`: cannot listen there (taken, not a local address) or cannot
    /// start the exporter thread.
    Metrics(SocketAddr, std::io::Error),
    /// `plugin_opt_cluster_url`.
    Cluster(String, cluster::StartError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Registry(src, e) => {
                let key = match src {
                    RegistrySource::Sqlite(_) => "db_path",
                    RegistrySource::Postgres(_) => "registry_url",
                };
                write!(
                    f,
                    "plugin_opt_{key} {:?}: cannot open the device registry: {e}",
                    src.to_string()
                )
            }
            StartError::Watcher(e) => write!(f, "cannot start the registry watcher: {e}"),
            StartError::Delivery(e) => e.fmt(f),
            StartError::Crl(e) => write!(f, "plugin_opt_crl_file: {e}"),
            StartError::ServiceIsDevice(s) => write!(
                f,
                "plugin_opt_service_identities {s:?}: also a registered device; a name must be one or the other"
            ),
            StartError::Metrics(a, e) => {
                write!(f, "plugin_opt_metrics_listen \"{a}\": cannot serve metrics there: {e}")
            }
            StartError::Cluster(url, e) => write!(f, "plugin_opt_cluster_url {url:?}: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// The gateway's verdict counts (delivery keeps its own, see [`delivery::Counts`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Verdicts {
    accepted: u64,
    rejected: [u64; Reason::ALL.len()],
    outbox_full: u64,
    internal_errors: u64,
    acl_denied: u64,
    responses: u64,
}

/// A snapshot of every counter, by reason.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub accepted: u64,
    pub rejected: [u64; Reason::ALL.len()],
    pub outbox_full: u64,
    pub internal_errors: u64,
    pub acl_denied: u64,
    pub delivered: u64,
    pub dead_lettered: u64,
    pub retries: u64,
    pub bodies_truncated: u64,
    pub responses: u64,
}

impl Stats {
    /// The count of one refusal.
    pub fn refused(&self, r: Refusal) -> u64 {
        match r {
            Refusal::Check(r) => self.rejected[r.index()],
            Refusal::OutboxFull => self.outbox_full,
            Refusal::Internal => self.internal_errors,
        }
    }

    pub fn summary(&self) -> String {
        let mut s = format!("accepted={}", self.accepted);
        for r in Reason::ALL {
            s.push_str(&format!(" {}={}", r.as_str(), self.rejected[r.index()]));
        }
        s.push_str(&format!(
            " outbox_full={} internal={} acl_denied={} delivered={} dead_lettered={} retries={} bodies_truncated={} responses={}",
            self.outbox_full,
            self.internal_errors,
            self.acl_denied,
            self.delivered,
            self.dead_lettered,
            self.retries,
            self.bodies_truncated,
            self.responses
        ));
        s
    }
}

const PRUNE_INTERVAL: Duration = Duration::from_secs(10);
/// How often, and how much, the tick forgets expired replay ids (those of devices that stopped
/// sending; a device that sends forgets its own): at most 256 queue entries or devices a time, so
/// that no message waits long behind it (a burst of 60,000 took 65 ms, ~1 µs each); up to 10,000
/// ids a second while busy, 2,560 while idle (ticks every 100 ms).
const FORGET_EVERY: Duration = Duration::from_millis(25);
const FORGET_BUDGET: usize = 256;
const STATS_INTERVAL: Duration = Duration::from_secs(60);
const LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// All per-instance state, owned by the broker thread.
pub struct Gateway {
    cfg: Config,
    validator: Validator,
    delivery: Delivery,
    watcher: Watcher,
    verdicts: Verdicts,
    rejection_log: LogLimiter,
    /// Usernames to disconnect at the next tick (revoked devices that are or may be connected).
    /// Kicking waits for the tick: inside a packet's own callback it would pull the connection
    /// out from under the broker while it is still handling that packet.
    to_kick: Vec<(Box<str>, &'static str)>,
    /// Devices removed or disabled while this broker runs: refused and also disconnected when
    /// they act again. (A device merely not found yet, e.g. added a moment ago, is only refused:
    /// the registry watcher is looking for it.)
    revoked: std::collections::HashSet<Box<str>>,
    /// Service identities that a registry change made into devices too. Such a name is denied
    /// everything until the conflict is resolved (fail closed: it could be either).
    service_conflicts: Vec<String>,
    crl: Option<CrlState>,
    last_log_flush: Instant,
    logged: Stats,
    /// Per-device counts, snapshots for the exporter, `$SYS`.
    monitor: Monitor,
    last_prune: Instant,
    last_forget: Instant,
    last_stats: Instant,
    /// Message ids for the responses.
    uuids: envelope::Uuids,
    /// Cluster mode: ids and sessions shared with the other nodes, claims before forwarding.
    cluster: Option<Cluster>,
    /// Cluster mode: when this node last saw a session of each device start (unix ms), to tell
    /// whether another node's session is newer. Registered devices only.
    sessions: std::collections::HashMap<Box<str>, i64>,
    /// Sessions closed because the device started a newer one on another node.
    sessions_closed: u64,
}

const CRL_REVOKED: &str = "its certificate is revoked by plugin_opt_crl_file";

/// Queues `username`'s connections to be closed at the next tick (once, whatever the reason).
fn queue_kick(to_kick: &mut Vec<(Box<str>, &'static str)>, username: &str, why: &'static str) {
    if !to_kick.iter().any(|(k, _)| &**k == username) {
        to_kick.push((username.into(), why));
    }
}

fn log_all(host: &mut dyn Host, lines: Vec<LogLine>) {
    for l in lines {
        host.log(l.level, &format!("secure-iot-gateway: {}", l.text));
    }
}

impl Gateway {
    /// Opens the registry and the outbox (logging what its recovery found), rebuilds the replay
    /// memory, and (if a backend is configured) starts the workers.
    pub fn start(
        cfg: Config,
        wake: Arc<dyn Fn() + Send + Sync>,
        host: &mut dyn Host,
    ) -> Result<Gateway, StartError> {
        // Bound first, so a bad or taken address refuses the start before anything runs.
        let listener = match cfg.metrics_listen {
            Some(a) => Some((a, TcpListener::bind(a).map_err(|e| StartError::Metrics(a, e))?)),
            None => None,
        };
        let registry = match &cfg.registry {
            RegistrySource::Sqlite(path) => Registry::open(path),
            // Never fails for being unreachable: starts empty and stale, see open_postgres.
            RegistrySource::Postgres(url) => Registry::open_postgres(url),
        }
        .map_err(|e| StartError::Registry(cfg.registry.clone(), e))?;
        // Started before delivery: every worker gets a claimer. It does not connect here, so a
        // node starts (and says so) while Redis is down.
        let cluster = match &cfg.cluster {
            Some(c) => Some(
                Cluster::start(
                    c,
                    Duration::from_secs(2 * cfg.timestamp_tolerance.max(1) as u64),
                    wake.clone(),
                )
                .map_err(|e| StartError::Cluster(crate::config::redact_url(&c.url), e))?,
            ),
            None => None,
        };
        let (delivery, recovered) =
            Delivery::start(&cfg, wake.clone(), cluster.as_ref()).map_err(StartError::Delivery)?;
        for w in &recovered.warnings {
            host.log(Level::Warning, &format!("secure-iot-gateway: outbox recovery: {w}"));
        }
        let mut validator = Validator::new(&cfg, registry, recovered.seen);
        // At once, not at the first tick: a registry unreachable at start is said loudly.
        log_all(host, validator.registry().take_logs());
        // A name both a device and a service would get the service's acl_file rights with a
        // device's certificate: refuse to start, naming it.
        if let Some(s) = cfg.service_identities.iter().find(|s| validator.is_enabled(s)) {
            return Err(StartError::ServiceIsDevice(s.clone()));
        }
        let watcher = validator.registry().watch(wake.clone()).map_err(StartError::Watcher)?;
        let crl = match &cfg.crl_file {
            Some(path) => {
                let revoked = crl::load(path).map_err(StartError::Crl)?;
                let (watcher, updates) =
                    crl::Watcher::start(path.clone()).map_err(StartError::Watcher)?;
                Some(CrlState { revoked, updates, _watcher: watcher, serials: Default::default() })
            }
            None => None,
        };
        let exporter = match listener {
            Some((a, l)) => Some(
                metrics::server::Exporter::start(l, cfg.spool_path.clone())
                    .map_err(|e| StartError::Metrics(a, e))?,
            ),
            None => None,
        };
        let mut monitor = Monitor::new(exporter, cfg.sys_interval);
        for d in &recovered.pending_devices {
            monitor.devices.recovered_pending(d);
        }
        let now = Instant::now();
        Ok(Gateway {
            cfg,
            validator,
            delivery,
            watcher,
            verdicts: Verdicts::default(),
            rejection_log: LogLimiter::default(),
            to_kick: Vec::new(),
            revoked: Default::default(),
            service_conflicts: Vec::new(),
            crl,
            last_log_flush: now,
            logged: Stats::default(),
            monitor,
            last_prune: now,
            last_forget: now,
            uuids: envelope::Uuids::default(),
            last_stats: now,
            cluster,
            sessions: Default::default(),
            sessions_closed: 0,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Every counter, from the owners that keep them.
    pub fn stats(&self) -> Stats {
        let v = &self.verdicts;
        let d = self.delivery.counts();
        let mut rejected = v.rejected;
        // Accepted here, then not forwarded because another node had claimed the id: the spec's
        // replay, caught across nodes (counted once, by delivery).
        rejected[Reason::Replay.index()] += d.claimed_same + d.claimed_different;
        Stats {
            accepted: v.accepted,
            rejected,
            outbox_full: v.outbox_full,
            internal_errors: v.internal_errors,
            acl_denied: v.acl_denied,
            delivered: d.delivered,
            dead_lettered: d.dead_lettered,
            retries: d.retries,
            bodies_truncated: d.bodies_truncated,
            responses: v.responses,
        }
    }

    /// One line describing the running instance, for the start-up log.
    pub fn describe(&self) -> String {
        format!(
            "{} devices in registry {}, data topic {}, tolerance {} s, replay cap {} per device (about {:.1} msg/s per device), {} ids remembered, outbox {} ({} pending, {}), backend {}",
            self.validator.devices(),
            self.cfg.registry,
            self.cfg.data_topic,
            self.cfg.timestamp_tolerance,
            self.cfg.replay_cache_size,
            self.cfg.replay_cache_size as f64 / self.cfg.timestamp_tolerance as f64,
            self.validator.replay_ids(),
            self.cfg.spool_path.display(),
            self.delivery.pending(),
            self.delivery.write_mode(),
            match &self.cfg.backend {
                Some(b) => format!("{} with {} workers", b.url_template, b.workers),
                None => "none (validation only)".into(),
            }
        ) + &match &self.cfg.cluster {
            Some(c) => format!(
                ", cluster node {} via {}",
                c.node_id,
                crate::config::redact_url(&c.url)
            ),
            None => String::new(),
        }
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
    ) -> Outcome {
        let topic_str = std::str::from_utf8(topic).ok();
        if let Some((t, dev)) = topic_str.and_then(|t| Some((t, self.cfg.data_topic.device_of(t)?)))
        {
            let timer = self.monitor.start_timer();
            let result = self.accept(who, dev, payload, now);
            self.monitor.stop_timer(timer);
            return match result {
                Ok(()) => {
                    self.verdicts.accepted += 1;
                    self.monitor.devices.accepted(dev, now, self.delivery.forwarding());
                    Outcome::Accepted
                }
                Err(Refused { refusal, detail, message_id }) => {
                    if refusal == Refusal::Check(Reason::UnknownDevice) {
                        // A revoked device is closed, not just refused.
                        self.kick_if_revoked(who);
                    }
                    match refusal {
                        Refusal::Check(r) => self.verdicts.rejected[r.index()] += 1,
                        Refusal::OutboxFull => self.verdicts.outbox_full += 1,
                        Refusal::Internal => self.verdicts.internal_errors += 1,
                    }
                    self.monitor_refusal(who, refusal, &detail, now);
                    if !self.rejection_log.admit(who.name(), refusal.as_str(), Instant::now()) {
                        return Outcome::Refused(refusal);
                    }
                    host.log(
                        if matches!(refusal, Refusal::Check(_)) { Level::Notice } else { Level::Error },
                        &format!(
                            "secure-iot-gateway: rejected reason={} identity={} topic={} message_id={}: {detail}",
                            refusal.as_str(),
                            printable(who.name()),
                            printable(t),
                            message_id.as_deref().map_or("-".into(), printable),
                        ),
                    );
                    Outcome::Refused(refusal)
                }
            };
        }
        let on_response = topic_str.is_some_and(|t| self.cfg.response_topic.device_of(t).is_some());
        let confined = match who {
            Identity::Device(_) | Identity::Invalid => true,
            Identity::Service(s) => self.service_conflicts.iter().any(|c| c == s),
            Identity::None => false,
        };
        if !on_response && !confined {
            return Outcome::Deferred;
        }
        let denial = if on_response { Denial::ResponseTopic } else { Denial::NotOwnDataTopic };
        self.verdicts.acl_denied += 1;
        if !self.rejection_log.admit(who.name(), "acl", Instant::now()) {
            return Outcome::Denied(denial);
        }
        host.log(
            Level::Notice,
            &format!(
                "secure-iot-gateway: denied publish identity={} topic={}: {}",
                printable(who.name()),
                printable(&String::from_utf8_lossy(topic)),
                match denial {
                    Denial::ResponseTopic => "only the gateway publishes responses",
                    Denial::NotOwnDataTopic => "a device may publish only to its own data topic",
                }
            ),
        );
        Outcome::Denied(denial)
    }

    /// ACL READ / SUBSCRIBE / UNSUBSCRIBE: the configuration's policy, and a device must also be
    /// enabled in the registry: a revoked device that subscribes is refused and closed.
    pub fn on_access(&mut self, who: Identity<'_>, access: Access, topic: &[u8]) -> Verdict {
        if let Identity::Service(s) = who {
            if self.service_conflicts.iter().any(|c| c == s) {
                return Verdict::Deny;
            }
        }
        let v = acl::acl_verdict(&self.cfg, who, access, topic);
        if let (Verdict::Allow, Identity::Device(d)) = (v, who) {
            if access != Access::Unsubscribe && !self.validator.is_enabled(d) {
                self.kick_if_revoked(who);
                return Verdict::Deny;
            }
        }
        v
    }

    /// After a registry change: a service identity that is now also a registered device is
    /// denied everything (and its connections closed) until the conflict is resolved.
    fn check_service_conflicts(&mut self, host: &mut dyn Host) {
        let now: Vec<String> = self
            .cfg
            .service_identities
            .iter()
            .filter(|s| self.validator.registry().contains(s))
            .cloned()
            .collect();
        for s in now.iter().filter(|s| !self.service_conflicts.contains(s)) {
            host.log(
                Level::Error,
                &format!("secure-iot-gateway: service identity {s:?} is now also a registered device: denied everything until one of them is removed"),
            );
            queue_kick(&mut self.to_kick, s, "a service identity that is also a device");
        }
        self.service_conflicts = now;
    }

    /// A client has connected (Mosquitto 2.1's CONNECT event; 2.0 has none). A device revoked while
    /// running, a certificate the CRL revokes or an identity outside the grammar is queued to be
    /// closed at the next tick; true if so.
    pub fn on_connect(&mut self, who: Identity<'_>, username: &str, serial: Option<&[u8]>) -> bool {
        if serial.is_some_and(|s| self.cert_revoked(username, s)) {
            return true;
        }
        match who {
            Identity::Device(d) if self.revoked.contains(d) => {
                self.kick(who);
                true
            }
            Identity::Invalid => {
                queue_kick(
                    &mut self.to_kick,
                    username,
                    "its identity is outside the device-id grammar",
                );
                true
            }
            _ => false,
        }
    }

    /// Checks a client's certificate serial against the CRL (remembering who holds it). A
    /// revoked certificate is refused whatever it asks, and its connection closed.
    pub fn cert_revoked(&mut self, username: &str, serial: &[u8]) -> bool {
        let Some(c) = &mut self.crl else { return false };
        if !c.serials.contains_key(serial) {
            if c.serials.len() >= MAX_SERIALS {
                c.serials.clear();
            }
            c.serials.insert(serial.to_vec(), username.into());
        }
        if !c.revoked.contains(serial) {
            return false;
        }
        queue_kick(&mut self.to_kick, username, CRL_REVOKED);
        true
    }

    /// Installs a changed CRL (or says why it was not) and disconnects the clients it revokes.
    fn apply_crl_updates(&mut self, host: &mut dyn Host) {
        let Some(c) = &mut self.crl else { return };
        while let Ok(update) = c.updates.try_recv() {
            match update {
                Ok(revoked) => {
                    host.log(
                        Level::Notice,
                        &format!("secure-iot-gateway: CRL reloaded: {} revoked certificate(s)", revoked.len()),
                    );
                    c.revoked = revoked;
                    for (serial, user) in &c.serials {
                        if c.revoked.contains(serial) {
                            queue_kick(&mut self.to_kick, user, CRL_REVOKED);
                        }
                    }
                }
                Err(e) => host.log(
                    Level::Warning,
                    &format!("secure-iot-gateway: plugin_opt_crl_file changed but cannot be used, keeping the previous CRL: {e}"),
                ),
            }
        }
    }

    /// Queues a device's connections to be closed if the registry revoked it while running.
    fn kick_if_revoked(&mut self, who: Identity<'_>) {
        if let Identity::Device(d) = who {
            if self.revoked.contains(d) {
                self.kick(who);
            }
        }
    }

    /// Queues a device's connections to be closed at the next tick.
    fn kick(&mut self, who: Identity<'_>) {
        if let Identity::Device(d) = who {
            if !d.is_empty() {
                queue_kick(&mut self.to_kick, d, "not enabled in the registry");
            }
        }
    }

    /// Per-device and health bookkeeping of a refusal. Registered publishers only (a memory
    /// lookup, no SQL), so a flood of unknown certificate names grows nothing.
    fn monitor_refusal(&mut self, who: Identity<'_>, refusal: Refusal, detail: &str, now: i64) {
        if let Identity::Device(d) = who {
            if self.validator.registry().contains(d) {
                self.monitor.devices.rejected(d, refusal.metric_name(), now);
            }
        }
        if refusal == Refusal::Internal {
            self.monitor.last_append_error = Some((now, detail.to_string()));
        }
    }

    /// The checks, then the durable hand-off; the id is remembered only once it is stored.
    fn accept(
        &mut self,
        who: Identity<'_>,
        topic_device: &str,
        payload: &[u8],
        now: i64,
    ) -> Result<(), Refused> {
        let a = self.validator.check(who, topic_device, payload, now).map_err(
            |Rejected { rejection, message_id }| Refused {
                refusal: Refusal::Check(rejection.reason),
                detail: rejection.detail,
                message_id,
            },
        )?;
        let forward = self.delivery.forwarding().then(|| a.envelope.canonical_payload());
        self.delivery.accept(a.device(), a.message_id(), a.expires_at, forward).map_err(|e| {
            let (refusal, detail) = match e {
                AppendError::Full { .. } => (Refusal::OutboxFull, e.to_string()),
                AppendError::Io(_) => (Refusal::Internal, format!("internal: {e}")),
            };
            Refused { refusal, detail, message_id: Some(a.message_id().to_string()) }
        })?;
        self.validator.commit(&a);
        if let Some(c) = &self.cluster {
            c.announce_id(a.device(), a.digest(), a.expires_at);
        }
        self.validator.recycle(a);
        Ok(())
    }

    /// Periodic work on the broker thread: registry snapshots, the backend's answers and the
    /// responses to devices, pruning, stats.
    pub fn on_tick(&mut self, host: &mut dyn Host, now: i64) {
        self.apply_crl_updates(host);
        let revoked = self.validator.apply_registry_updates();
        log_all(host, self.validator.registry().take_logs());
        if let Some(revoked) = revoked {
            self.monitor.registry_changed();
            self.check_service_conflicts(host);
            // Back in the registry: no longer revoked.
            let validator = &mut self.validator;
            self.revoked.retain(|d| !validator.is_enabled(d));
            let registry = self.validator.registry();
            self.sessions.retain(|d, _| registry.contains(d));
            for d in revoked {
                self.kick(Identity::Device(&d));
                self.revoked.insert(d);
            }
        }
        self.apply_cluster_news(host, now);
        for (d, why) in std::mem::take(&mut self.to_kick) {
            if self.rejection_log.admit(&d, "revoked", Instant::now()) {
                host.log(
                    Level::Notice,
                    &format!(
                        "secure-iot-gateway: closing the connection of identity={}: {why}",
                        printable(&d)
                    ),
                );
            }
            host.kick(&d);
        }
        let polled = self.delivery.poll(now);
        log_all(host, polled.logs);
        for d in &polled.answers {
            self.monitor.devices.settled(&d.message.device_id);
            if d.claimed_elsewhere.is_some() {
                // Another node forwards it and answers the device (counted by delivery).
                continue;
            }
            self.respond(host, d, now);
        }
        if self.last_log_flush.elapsed() >= LOG_FLUSH_INTERVAL {
            self.last_log_flush = Instant::now();
            for line in self.rejection_log.flush(self.last_log_flush) {
                host.log(Level::Notice, &format!("secure-iot-gateway: {line}"));
            }
        }
        self.report(host, now);
        if self.last_forget.elapsed() >= FORGET_EVERY {
            self.last_forget = Instant::now();
            self.validator.forget_expired(now, FORGET_BUDGET);
        }
        if self.last_prune.elapsed() >= PRUNE_INTERVAL {
            self.last_prune = Instant::now();
            log_all(host, self.delivery.housekeeping(now).into_iter().collect());
        }
        if self.last_stats.elapsed() >= STATS_INTERVAL {
            self.last_stats = Instant::now();
            self.log_stats(host);
        }
    }

    /// Is there work for the next tick that no thread has asked for (closing a connection that a
    /// callback found revoked)? Ticks nobody asked for are skipped otherwise (`plugin::wake`).
    pub fn wants_tick(&self) -> bool {
        !self.to_kick.is_empty()
    }

    /// A client's connection was seen for the first time (2.1: at CONNECT; 2.0: at its first
    /// publish or subscribe). In cluster mode, tells the other nodes so they close any older
    /// session of the same device.
    pub fn on_session(&mut self, who: Identity<'_>, now_ms: i64) {
        let (Some(c), Identity::Device(d)) = (&self.cluster, who) else { return };
        if !self.validator.registry().contains(d) {
            return;
        }
        c.announce_session(d, now_ms);
        match self.sessions.get_mut(d) {
            Some(t) => *t = now_ms,
            None => {
                self.sessions.insert(d.into(), now_ms);
            }
        }
    }

    /// Installs what the other nodes said: ids they accepted (into the replay memory) and
    /// sessions they saw start (closing any older one here).
    fn apply_cluster_news(&mut self, host: &mut dyn Host, now: i64) {
        let Some(c) = &self.cluster else { return };
        log_all(host, c.take_logs());
        let news = c.take_incoming();
        for id in news.ids {
            self.validator.remember_remote(&id.device, id.digest, id.expires_at, now);
        }
        let node = c.node();
        for s in news.sessions {
            // Ours is newer (the device came back here since): theirs is the one to close, which
            // that node does when our announcement reaches it. Ties go to the larger node id.
            // Only a session this node knows is closed: kicking by name on every announcement
            // would cost the broker a pass over its clients for each device connecting anywhere.
            // (On 2.0 a session is known from its first action, see on_session.)
            let Some(ours) = self.sessions.get(&s.device).copied() else { continue };
            if (ours, node) > (s.started_ms, &*s.node) {
                continue;
            }
            self.sessions.remove(&s.device);
            self.sessions_closed += 1;
            queue_kick(
                &mut self.to_kick,
                &s.device,
                "the device started a newer session on another node",
            );
        }
    }

    /// Hands a snapshot to the exporter (at most every 250 ms) and publishes `$SYS` (every
    /// `sys_interval`); nothing when neither is due.
    fn report(&mut self, host: &mut dyn Host, now: i64) {
        let (to_exporter, to_sys) = (self.monitor.snapshot_due(), self.monitor.sys_due());
        if !to_exporter && !to_sys {
            return;
        }
        let s = self.snapshot(now);
        if to_sys {
            for (topic, value) in metrics::sys_messages(&s) {
                // $SYS values are best effort, like the broker's own: a refusal is not logged
                // every interval.
                let _ = host.publish(&topic, value.as_bytes());
            }
            self.monitor.sys_done();
        }
        if to_exporter {
            self.monitor.publish(s);
        }
    }

    /// Every count and gauge, for the exporter and `$SYS`.
    pub fn snapshot(&mut self, now: i64) -> Snapshot {
        let st = self.stats();
        let registry: &crate::registry::Registry = self.validator.registry();
        let registry_devices = registry.len() as u64;
        let (devices, devices_at) = self.monitor.device_rows(registry.ids());
        Snapshot {
            taken: Instant::now(),
            unix: now,
            accepted: st.accepted,
            rejected: Refusal::all().map(|r| (r.metric_name(), st.refused(r))).collect(),
            acl_denied: st.acl_denied,
            delivered: st.delivered,
            retries: st.retries,
            dead_letters: st.dead_lettered,
            responses: st.responses,
            forwarding: self.delivery.forwarding(),
            pending_messages: self.delivery.pending() as u64,
            pending_bytes: self.delivery.pending_bytes(),
            oldest_pending_age: self
                .delivery
                .oldest_pending_at()
                .map_or(0, |t| u64::try_from(now - t).unwrap_or(0)),
            registry_devices,
            registry_stale: match registry.health() {
                crate::registry::Health::Current => None,
                crate::registry::Health::Stale { error, since } => Some((
                    since.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64),
                    error.to_string(),
                )),
            },
            replay_ids: self.validator.replay_ids() as u64,
            tracked_devices: self.monitor.devices.len() as u64,
            backend_durations: self.delivery.request_durations(),
            validation_durations: self.monitor.validation_durations(),
            last_append_error: self.monitor.last_append_error.clone(),
            spool_path: self.cfg.spool_path.display().to_string(),
            devices,
            devices_at,
            cluster: self.cluster.as_ref().map(|c| {
                let st = c.stats();
                let n =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                let counts = self.delivery.counts();
                metrics::ClusterView {
                    node: c.node().to_string(),
                    redis_down: match c.link() {
                        cluster::Link::Up => None,
                        cluster::Link::Down { since, error } => Some((
                            since
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs() as i64),
                            error,
                        )),
                    },
                    ids_published: n(&st.ids_published),
                    ids_received: n(&st.ids_received),
                    ids_dropped: n(&st.ids_dropped),
                    malformed_received: n(&st.malformed_received),
                    sessions_published: n(&st.sessions_published),
                    sessions_received: n(&st.sessions_received),
                    sessions_closed: self.sessions_closed,
                    claims: n(&st.claims),
                    claim_errors: n(&st.claim_errors),
                    node_id_conflicts: n(&st.node_id_conflicts),
                    replays_same: counts.claimed_same,
                    replays_different: counts.claimed_different,
                    replication_delay: st.replication_delay.snapshot(),
                }
            }),
        }
    }

    /// Logs the counters if they changed since the last time.
    pub fn log_stats(&mut self, host: &mut dyn Host) {
        let now = self.stats();
        if now != self.logged {
            host.log(Level::Notice, &format!("secure-iot-gateway: stats {}", now.summary()));
            self.logged = now;
        }
    }

    /// Publishes the signed downlink for one backend answer.
    fn respond(&mut self, host: &mut dyn Host, d: &Done, now: i64) {
        let device = &d.message.device_id;
        let keys = match self.validator.registry().get(device) {
            Ok(k) => k,
            Err(_) => {
                host.log(
                    Level::Notice,
                    &format!(
                        "secure-iot-gateway: no response for device={}: no longer in the registry",
                        printable(device)
                    ),
                );
                return;
            }
        };
        let text = downlink(
            &keys.secret,
            device,
            &d.message.message_id,
            &mut self.uuids,
            d.status,
            &d.body,
            now,
        );
        let topic = self.cfg.response_topic.topic_for(device);
        if host.publish(&topic, text.as_bytes()) {
            self.verdicts.responses += 1;
        } else {
            host.log(
                Level::Warning,
                &format!("secure-iot-gateway: broker refused the response on {topic}"),
            );
        }
    }

    /// Stops the workers and background threads (joins them all). Answers that arrived while
    /// stopping are settled, but get no response (the broker API must not publish from cleanup).
    pub fn shutdown(&mut self, host: &mut dyn Host) {
        log_all(host, self.delivery.shutdown(unix_now()).logs);
        // After the workers: they hold claimers, which need no thread, but stop in this order.
        if let Some(c) = &mut self.cluster {
            c.stop();
            log_all(host, c.take_logs());
        }
        self.watcher.stop();
        self.monitor.stop();
        self.log_stats(host);
    }
}

/// The signed response to a device: `payload` is the backend's body (its canonical form if it is
/// strict JSON, else the text), `in_reply_to` the device's message id, with a fresh message id.
#[allow(clippy::too_many_arguments)]
pub fn downlink(
    key: &envelope::Key,
    device: &str,
    in_reply_to: &str,
    ids: &mut envelope::Uuids,
    status: u16,
    body: &[u8],
    now: i64,
) -> String {
    downlink_with_id(key, device, in_reply_to, &ids.next_id(), status, body, now)
}

/// [`downlink`] with a given message id. Writes the canonical text once, in RFC 8785 member
/// order, signs it, and puts the signature in its place (between `payload` and `status`):
/// the same text as `envelope::sign_members` without building and sorting a tree twice
/// (a test checks both agree).
fn downlink_with_id(
    key: &envelope::Key,
    device: &str,
    in_reply_to: &str,
    message_id: &str,
    status: u16,
    body: &[u8],
    now: i64,
) -> String {
    use std::io::Write;
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(br#"{"device_id":"#);
    json::write_string(device, &mut out);
    out.extend_from_slice(br#","in_reply_to":"#);
    json::write_string(in_reply_to, &mut out);
    out.extend_from_slice(br#","message_id":"#);
    json::write_string(message_id, &mut out);
    out.extend_from_slice(br#","payload":"#);
    match json::parse_strict(body) {
        Ok(v) => json::write_canonical(&v, &mut out),
        Err(_) => json::write_string(&String::from_utf8_lossy(body), &mut out),
    }
    // The members after the signature, signed as if they followed `payload` directly.
    let mut tail = [0u8; 64];
    let tail_len = {
        let mut w = &mut tail[..];
        // At most 49 bytes (u16, i64 at their widest): a shortened, signed tail is never sent.
        write!(w, r#","status":{status},"timestamp":{now}}}"#).expect("64 bytes hold the tail");
        64 - w.len()
    };
    let tail = &tail[..tail_len];
    let sig = key.sign_parts(&[&out, tail]);
    out.extend_from_slice(br#","signature":""#);
    envelope::write_hex(&sig, &mut out);
    out.push(b'"');
    out.extend_from_slice(tail);
    String::from_utf8(out).expect("canonical JSON is UTF-8")
}

#[cfg(test)]
mod tests;
