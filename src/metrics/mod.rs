//! Observability: what the gateway exposes about itself, without counting anything twice.
//!
//! The counts are kept once, by their owners on the broker thread (gateway verdicts, delivery
//! counts; see `Gateway::stats`). The broker thread copies them into a [`Snapshot`] at most every
//! [`SNAPSHOT_EVERY`] and hands it to the exporter thread ([`server`]), which serves
//! `/metrics`, `/healthz` and `/devices` from the latest snapshot and never touches the broker
//! API. The same snapshot is published on `$SYS/broker/secure-iot-gateway/...` from the broker
//! thread every `plugin_opt_sys_interval` seconds ([`sys_messages`]).
//!
//! This module is a leaf: it knows nothing of the gateway; reasons arrive as names.

pub mod histogram;
pub mod server;

use histogram::{Histogram, HistogramSnapshot, VALIDATION_BOUNDS};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often at most the broker thread builds a snapshot for the exporter.
pub const SNAPSHOT_EVERY: Duration = Duration::from_millis(250);
/// How often at most the per-device table is copied for `/devices`. Copying is O(registered
/// devices) on the broker thread, so it is done only when `/devices` is asked for.
pub const DEVICES_EVERY: Duration = Duration::from_secs(1);
/// One message in this many is timed for the validation histogram (two clock reads each).
pub const VALIDATION_SAMPLE: u32 = 16;
/// `$SYS` topic prefix, beside the broker's own.
pub const SYS_PREFIX: &str = "$SYS/broker/secure-iot-gateway";

/// One registered device as `/devices` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub device_id: String,
    /// Unix time of the last message from it (accepted or rejected); None: not since start.
    pub last_seen: Option<i64>,
    pub accepted: u64,
    /// Non-zero rejection counts by reason name.
    pub rejected: Vec<(&'static str, u64)>,
    /// Last rejection: reason name and unix time.
    pub last_rejection: Option<(&'static str, i64)>,
    /// Its messages waiting in the outbox for the backend.
    pub pending: u64,
}

/// Per-device counts on the broker thread. Only registered devices get an entry (the gateway
/// asks the registry's memory first), so a flood of random certificate names costs nothing.
#[derive(Debug, Default)]
pub struct DeviceTable {
    map: crate::fasthash::Map<Box<str>, Counts>,
    dirty: bool,
    /// Off without an exporter: nothing reads the table then, so nothing is counted.
    off: bool,
}

#[derive(Debug, Default, Clone)]
struct Counts {
    last_seen: Option<i64>,
    accepted: u64,
    rejected: Vec<(&'static str, u64)>,
    last_rejection: Option<(&'static str, i64)>,
    pending: u64,
}

impl DeviceTable {
    /// Applies `f` to the device's counts, creating them on its first message: one hash lookup
    /// per message (a device's name is allocated once).
    #[inline]
    fn update(&mut self, device: &str, f: impl FnOnce(&mut Counts)) {
        self.dirty = true;
        match self.map.get_mut(device) {
            Some(c) => f(c),
            None => {
                let mut c = Counts::default();
                f(&mut c);
                self.map.insert(device.into(), c);
            }
        }
    }

    /// A message from a registered device was accepted (`forwarded`: it now waits in the outbox).
    #[inline]
    pub fn accepted(&mut self, device: &str, now: i64, forwarded: bool) {
        if self.off {
            return;
        }
        self.update(device, |c| {
            c.last_seen = Some(now);
            c.accepted += 1;
            c.pending += u64::from(forwarded);
        });
    }

    /// A message from a registered device was refused for `reason`.
    pub fn rejected(&mut self, device: &str, reason: &'static str, now: i64) {
        if self.off {
            return;
        }
        self.update(device, |c| {
            c.last_seen = Some(now);
            c.last_rejection = Some((reason, now));
            match c.rejected.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => c.rejected.push((reason, 1)),
            }
        });
    }

    /// A message of `device` recovered pending from the last run.
    pub fn recovered_pending(&mut self, device: &str) {
        if self.off {
            return;
        }
        self.update(device, |c| c.pending += 1);
    }

    /// The backend gave a final answer for one of its messages.
    pub fn settled(&mut self, device: &str) {
        if let Some(c) = self.map.get_mut(device) {
            c.pending = c.pending.saturating_sub(1);
            self.dirty = true;
        }
    }

    /// Devices with an entry (at most the registered ones).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether anything changed since the last [`DeviceTable::rows`].
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// One row per registered device (sorted by id), seen or not.
    pub fn rows<'a>(&mut self, registered: impl Iterator<Item = &'a str>) -> Vec<DeviceRow> {
        self.dirty = false;
        let mut rows: Vec<DeviceRow> = registered
            .map(|id| {
                let c = self.map.get(id).cloned().unwrap_or_default();
                DeviceRow {
                    device_id: id.to_string(),
                    last_seen: c.last_seen,
                    accepted: c.accepted,
                    rejected: c.rejected,
                    last_rejection: c.last_rejection,
                    pending: c.pending,
                }
            })
            .collect();
        rows.sort_unstable_by(|a, b| a.device_id.cmp(&b.device_id));
        rows
    }
}

/// Everything the exporter and `$SYS` show, copied on the broker thread.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub taken: Instant,
    pub unix: i64,
    pub accepted: u64,
    /// Every refusal reason, in order, with its count (zeros included: one series each).
    pub rejected: Vec<(&'static str, u64)>,
    pub acl_denied: u64,
    pub delivered: u64,
    pub retries: u64,
    pub dead_letters: u64,
    pub responses: u64,
    pub forwarding: bool,
    pub pending_messages: u64,
    pub pending_bytes: u64,
    /// Seconds since the oldest pending message was accepted (0 when none is pending).
    pub oldest_pending_age: u64,
    pub registry_devices: u64,
    /// Why the registry cannot be read, and since when (unix s): the last good snapshot is in
    /// use and changes are not seen. None while it is current.
    pub registry_stale: Option<(i64, String)>,
    pub replay_ids: u64,
    /// Entries in the per-device table (bounded by the registered devices).
    pub tracked_devices: u64,
    pub backend_durations: HistogramSnapshot,
    pub validation_durations: HistogramSnapshot,
    /// The last failed outbox append on the broker thread: unix time and error.
    pub last_append_error: Option<(i64, String)>,
    pub spool_path: String,
    pub devices: Arc<Vec<DeviceRow>>,
    /// When `devices` was last known current (None: never built).
    pub devices_at: Option<Instant>,
    /// Cluster mode only.
    pub cluster: Option<ClusterView>,
}

/// Cluster mode's counts and Redis link, copied on the broker thread.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub node: String,
    /// Redis unreachable since (unix s) and why; None while reachable.
    pub redis_down: Option<(i64, String)>,
    pub ids_published: u64,
    pub ids_received: u64,
    pub ids_dropped: u64,
    pub malformed_received: u64,
    pub sessions_published: u64,
    pub sessions_received: u64,
    /// Local sessions closed because the device started a newer one on another node.
    pub sessions_closed: u64,
    pub claims: u64,
    pub claim_errors: u64,
    /// Batches from another node using this node's `node_id`.
    pub node_id_conflicts: u64,
    /// Not forwarded, claimed by another node first: same bytes / different content.
    pub replays_same: u64,
    pub replays_different: u64,
    pub replication_delay: HistogramSnapshot,
}

/// The broker-thread half: per-device counts, the sampled validation timer, and when to
/// snapshot and publish.
pub struct Monitor {
    exporter: Option<server::Exporter>,
    sys_interval: Option<Duration>,
    pub devices: DeviceTable,
    validation: Histogram,
    sample: u32,
    last_snapshot: Option<Instant>,
    /// When the rows were last made current (rebuilt, or found unchanged).
    last_devices: Option<Instant>,
    /// When the rows were last rebuilt.
    devices_built: Option<Instant>,
    rows: Arc<Vec<DeviceRow>>,
    /// The registry changed since the rows were last built.
    registry_changed: bool,
    last_sys: Instant,
    /// The last outbox append error (unix time, text), for `/healthz`.
    pub last_append_error: Option<(i64, String)>,
}

impl Monitor {
    /// `exporter`: the running HTTP thread, if `metrics_listen` is set; `sys_interval` 0 = off.
    pub fn new(exporter: Option<server::Exporter>, sys_interval: u64) -> Monitor {
        let devices = DeviceTable { off: exporter.is_none(), ..DeviceTable::default() };
        Monitor {
            exporter,
            sys_interval: (sys_interval > 0).then(|| Duration::from_secs(sys_interval)),
            devices,
            validation: Histogram::new(VALIDATION_BOUNDS),
            sample: 0,
            last_snapshot: None,
            last_devices: None,
            devices_built: None,
            rows: Arc::new(Vec::new()),
            registry_changed: false,
            last_sys: Instant::now(),
            last_append_error: None,
        }
    }

    /// Starts timing this message if it is the sampled one in [`VALIDATION_SAMPLE`].
    #[inline]
    pub fn start_timer(&mut self) -> Option<Instant> {
        self.sample = self.sample.wrapping_add(1);
        self.sample.is_multiple_of(VALIDATION_SAMPLE).then(Instant::now)
    }

    #[inline]
    pub fn stop_timer(&self, started: Option<Instant>) {
        if let Some(t) = started {
            self.validation.observe(t.elapsed());
        }
    }

    pub fn validation_durations(&self) -> HistogramSnapshot {
        self.validation.snapshot()
    }

    /// Whether the exporter wants a fresh snapshot now.
    pub fn snapshot_due(&self) -> bool {
        self.exporter.is_some() && self.last_snapshot.is_none_or(|t| t.elapsed() >= SNAPSHOT_EVERY)
    }

    /// Whether `$SYS` is due.
    pub fn sys_due(&self) -> bool {
        self.sys_interval.is_some_and(|i| self.last_sys.elapsed() >= i)
    }

    /// Notes that a new registry snapshot was installed (devices added or removed).
    pub fn registry_changed(&mut self) {
        self.registry_changed = true;
    }

    /// The per-device rows and when they were last current. They are rebuilt only when the
    /// exporter was asked for `/devices`, at most every [`DEVICES_EVERY`], and only if
    /// something changed: the copy is O(registered devices) on the broker thread.
    pub fn device_rows<'a>(
        &mut self,
        registered: impl Iterator<Item = &'a str>,
    ) -> (Arc<Vec<DeviceRow>>, Option<Instant>) {
        let Some(e) = &self.exporter else { return (self.rows.clone(), None) };
        if e.take_devices_request() {
            let due = self.last_devices.is_none_or(|t| t.elapsed() >= DEVICES_EVERY);
            if !due {
                // Answered by a later tick; the exporter waits for it.
                e.request_devices();
            } else {
                if self.devices_built.is_none() || self.devices.dirty() || self.registry_changed {
                    self.rows = Arc::new(self.devices.rows(registered));
                    self.devices_built = Some(Instant::now());
                    self.registry_changed = false;
                }
                // Unchanged rows are as current as rebuilt ones.
                self.last_devices = Some(Instant::now());
            }
        }
        (self.rows.clone(), self.last_devices)
    }

    /// Hands a snapshot to the exporter.
    pub fn publish(&mut self, s: Snapshot) {
        self.last_snapshot = Some(Instant::now());
        if let Some(e) = &self.exporter {
            e.publish(s);
        }
    }

    /// Marks `$SYS` as published now.
    pub fn sys_done(&mut self) {
        self.last_sys = Instant::now();
    }

    /// Stops and joins the exporter thread.
    pub fn stop(&mut self) {
        if let Some(e) = &mut self.exporter {
            e.stop();
        }
    }
}

/// The `$SYS` topics and their values (decimal text, as the broker's own `$SYS` values).
pub fn sys_messages(s: &Snapshot) -> Vec<(String, String)> {
    let mut out = vec![(format!("{SYS_PREFIX}/messages/accepted"), s.accepted.to_string())];
    for (reason, n) in &s.rejected {
        out.push((format!("{SYS_PREFIX}/messages/rejected/{reason}"), n.to_string()));
    }
    for (topic, v) in [
        ("messages/acl_denied", s.acl_denied),
        ("forward/delivered", s.delivered),
        ("forward/retries", s.retries),
        ("forward/dead_letters", s.dead_letters),
        ("responses/published", s.responses),
        ("outbox/pending", s.pending_messages),
        ("outbox/pending_bytes", s.pending_bytes),
        ("outbox/oldest_pending_age", s.oldest_pending_age),
        ("registry/devices", s.registry_devices),
        ("replay/ids", s.replay_ids),
    ] {
        out.push((format!("{SYS_PREFIX}/{topic}"), v.to_string()));
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn single(out: &mut String, name: &str, kind: &str, help: &str, v: u64) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {v}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &HistogramSnapshot) {
    family(out, name, "histogram", help);
    for (le, n) in &h.cumulative {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

/// The Prometheus text exposition format (version 0.0.4) of a snapshot.
pub fn render_prometheus(s: &Snapshot) -> String {
    let mut o = String::with_capacity(4096);
    single(
        &mut o,
        "iotgw_messages_accepted_total",
        "counter",
        "Data-topic messages validated and durably stored.",
        s.accepted,
    );
    family(
        &mut o,
        "iotgw_messages_rejected_total",
        "counter",
        "Data-topic messages refused, by reason (the spec's checks, then outbox refusals).",
    );
    for (reason, n) in &s.rejected {
        let _ = writeln!(o, "iotgw_messages_rejected_total{{reason=\"{reason}\"}} {n}");
    }
    single(
        &mut o,
        "iotgw_acl_denied_total",
        "counter",
        "Publishes outside the data topics denied by the gateway's policy.",
        s.acl_denied,
    );
    single(
        &mut o,
        "iotgw_forward_delivered_total",
        "counter",
        "Messages the backend accepted (2xx).",
        s.delivered,
    );
    single(
        &mut o,
        "iotgw_forward_retries_total",
        "counter",
        "Backend attempts that will be retried (5xx, 429, timeouts, connection errors).",
        s.retries,
    );
    single(
        &mut o,
        "iotgw_forward_dead_letters_total",
        "counter",
        "Messages the backend refused for good (4xx), written to dead_letters.jsonl.",
        s.dead_letters,
    );
    single(
        &mut o,
        "iotgw_responses_published_total",
        "counter",
        "Signed responses published to devices.",
        s.responses,
    );
    single(
        &mut o,
        "iotgw_outbox_pending_messages",
        "gauge",
        "Accepted messages waiting for the backend.",
        s.pending_messages,
    );
    single(
        &mut o,
        "iotgw_outbox_pending_bytes",
        "gauge",
        "Bytes of pending messages, as counted against spool_max_bytes.",
        s.pending_bytes,
    );
    single(
        &mut o,
        "iotgw_outbox_oldest_pending_age_seconds",
        "gauge",
        "Age of the oldest pending message (0 when none; counted from the restart for messages recovered at start).",
        s.oldest_pending_age,
    );
    single(
        &mut o,
        "iotgw_registry_devices",
        "gauge",
        "Devices in the in-memory registry.",
        s.registry_devices,
    );
    single(
        &mut o,
        "iotgw_registry_stale",
        "gauge",
        "1 while the registry file cannot be read (the last good snapshot is in use), else 0.",
        u64::from(s.registry_stale.is_some()),
    );
    single(
        &mut o,
        "iotgw_replay_ids",
        "gauge",
        "Message ids remembered for the replay check.",
        s.replay_ids,
    );
    single(
        &mut o,
        "iotgw_devices_tracked",
        "gauge",
        "Registered devices with per-device counts for /devices (unregistered names get none).",
        s.tracked_devices,
    );
    histogram(
        &mut o,
        "iotgw_backend_request_duration_seconds",
        "One POST attempt to the backend, as the worker timed it.",
        &s.backend_durations,
    );
    histogram(
        &mut o,
        "iotgw_validation_duration_seconds",
        "Broker-thread time for one data-topic message (checks and outbox append); 1 message in 16 is timed.",
        &s.validation_durations,
    );
    if let Some(c) = &s.cluster {
        render_cluster(&mut o, c);
    }
    o
}

fn render_cluster(o: &mut String, c: &ClusterView) {
    single(
        o,
        "iotgw_cluster_redis_up",
        "gauge",
        "1 while Redis answers (ids shared, claims made), 0 while it does not (forwarding waits).",
        u64::from(c.redis_down.is_none()),
    );
    for (name, help, v) in [
        (
            "iotgw_cluster_ids_published_total",
            "Accepted ids published to the other nodes.",
            c.ids_published,
        ),
        (
            "iotgw_cluster_ids_received_total",
            "Ids accepted by other nodes, received.",
            c.ids_received,
        ),
        (
            "iotgw_cluster_ids_dropped_total",
            "Ids not shared because a queue was full (Redis down for long).",
            c.ids_dropped,
        ),
        (
            "iotgw_cluster_malformed_received_total",
            "Lines from the cluster channels that could not be parsed.",
            c.malformed_received,
        ),
        (
            "iotgw_cluster_sessions_published_total",
            "Session starts announced to the other nodes.",
            c.sessions_published,
        ),
        (
            "iotgw_cluster_sessions_received_total",
            "Session starts other nodes announced, received.",
            c.sessions_received,
        ),
        (
            "iotgw_cluster_sessions_closed_total",
            "Sessions closed here because the device started a newer one on another node.",
            c.sessions_closed,
        ),
        (
            "iotgw_cluster_claims_total",
            "Ids claimed in Redis before forwarding (answered claims).",
            c.claims,
        ),
        (
            "iotgw_cluster_claim_errors_total",
            "Claims Redis could not answer (the message waits).",
            c.claim_errors,
        ),
        (
            "iotgw_cluster_node_id_conflicts_total",
            "Batches from another node using this node's node_id (must be unique).",
            c.node_id_conflicts,
        ),
    ] {
        single(o, name, "counter", help, v);
    }
    family(
        o,
        "iotgw_cluster_replays_total",
        "counter",
        "Accepted here but not forwarded: another node had claimed the id (content same: a retransmission; different: an attack).",
    );
    let _ = writeln!(o, "iotgw_cluster_replays_total{{content=\"same\"}} {}", c.replays_same);
    let _ =
        writeln!(o, "iotgw_cluster_replays_total{{content=\"different\"}} {}", c.replays_different);
    histogram(
        o,
        "iotgw_cluster_replication_delay_seconds",
        "From an id's acceptance on another node to its arrival here.",
        &c.replication_delay,
    );
}

/// `/devices` as JSON.
pub fn render_devices(s: &Snapshot) -> String {
    let devices: Vec<serde_json::Value> = s
        .devices
        .iter()
        .map(|d| {
            let rejected: serde_json::Map<String, serde_json::Value> =
                d.rejected.iter().map(|(r, n)| (r.to_string(), (*n).into())).collect();
            serde_json::json!({
                "device_id": d.device_id,
                "last_seen": d.last_seen,
                "accepted": d.accepted,
                "rejected": rejected,
                "last_rejection": d.last_rejection.map(|(r, at)| serde_json::json!({"reason": r, "at": at})),
                "pending": d.pending,
            })
        })
        .collect();
    // The rows may be older than the snapshot (a request that timed out waiting for them).
    let age = s.devices_at.map_or(0, |t| s.taken.saturating_duration_since(t).as_secs() as i64);
    let mut text =
        serde_json::json!({ "generated_at": s.unix - age, "devices": devices }).to_string();
    text.push('\n');
    text
}

/// A failed append this recent makes `/healthz` unhealthy.
pub const APPEND_ERROR_WINDOW_S: i64 = 60;
/// A snapshot this old means the broker thread is not ticking.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// `/healthz`: status and one line saying why. `probe`: the exporter's last attempt to create a
/// file in the outbox directory. Unhealthy on any fault, this node's or a shared one (the
/// registry, Redis): what monitoring wants.
pub fn health(snap: Option<&Snapshot>, probe: &Result<(), String>) -> (u16, String) {
    let (code, why) = readiness(snap, probe);
    if code != 200 {
        return (code, why);
    }
    let Some(s) = snap else { return (code, why) };
    if let Some((since, e)) = &s.registry_stale {
        return (
            503,
            format!(
                "registry unreadable for {} s ({e}): serving the last good snapshot, changes are not seen",
                s.unix - since
            ),
        );
    }
    if let Some((since, e)) = s.cluster.as_ref().and_then(|c| c.redis_down.as_ref()) {
        return (
            503,
            format!(
                "cluster: Redis unreachable for {} s ({e}): accepting with local replay memory, forwarding waits",
                s.unix - since
            ),
        );
    }
    (code, why)
}

/// `/readyz`: may this node take device connections? Unready only for faults of this node (not
/// ticking, outbox not writable, appends failing), never for a shared dependency being down
/// (the registry, Redis): that fault is every node's, and a load balancer that took every node
/// out would turn a degraded cluster into a dead one. Such faults show in the 200 line.
pub fn readiness(snap: Option<&Snapshot>, probe: &Result<(), String>) -> (u16, String) {
    let Some(s) = snap else {
        return (503, "starting: no snapshot from the broker thread yet".into());
    };
    let age = s.taken.elapsed();
    if age > STALE_AFTER {
        return (503, format!("broker thread has not reported for {} s", age.as_secs()));
    }
    if let Err(e) = probe {
        return (503, format!("outbox directory {} is not writable: {e}", s.spool_path));
    }
    if let Some((at, e)) = &s.last_append_error {
        if s.unix - at <= APPEND_ERROR_WINDOW_S {
            return (503, format!("outbox append failed {} s ago: {e}", s.unix - at));
        }
    }
    let mut degraded = String::new();
    if s.registry_stale.is_some() {
        degraded.push_str("; degraded: registry unreadable, serving the last good snapshot");
    }
    if s.cluster.as_ref().is_some_and(|c| c.redis_down.is_some()) {
        degraded.push_str("; degraded: Redis unreachable, forwarding waits");
    }
    (
        200,
        format!(
            "ok: registry loaded ({} devices), outbox writable ({} pending){degraded}",
            s.registry_devices, s.pending_messages
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn snapshot() -> Snapshot {
        Snapshot {
            taken: Instant::now(),
            unix: 1000,
            accepted: 3,
            rejected: vec![("malformed", 0), ("signature", 2)],
            acl_denied: 0,
            delivered: 1,
            retries: 0,
            dead_letters: 0,
            responses: 1,
            forwarding: true,
            pending_messages: 2,
            pending_bytes: 300,
            oldest_pending_age: 5,
            registry_devices: 3,
            registry_stale: None,
            replay_ids: 3,
            tracked_devices: 0,
            backend_durations: Histogram::new(histogram::BACKEND_BOUNDS).snapshot(),
            cluster: None,
            validation_durations: Histogram::new(VALIDATION_BOUNDS).snapshot(),
            last_append_error: None,
            spool_path: "/x".into(),
            devices: Arc::new(Vec::new()),
            devices_at: None,
        }
    }

    #[test]
    fn every_family_has_help_and_type_and_samples_follow_their_family() {
        let text = render_prometheus(&snapshot());
        let mut family = None::<String>;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                family = Some(name);
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert_eq!(rest.split(' ').next(), family.as_deref(), "TYPE after its HELP");
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                let f = family.as_deref().expect("sample before any family");
                assert!(
                    name == f
                        || [("_bucket"), ("_sum"), ("_count")]
                            .iter()
                            .any(|s| name == format!("{f}{s}")),
                    "{name} outside its family {f}"
                );
            }
        }
        assert!(text.contains("iotgw_messages_rejected_total{reason=\"signature\"} 2\n"));
        assert!(text.contains("iotgw_messages_rejected_total{reason=\"malformed\"} 0\n"));
    }

    #[test]
    fn devices_json_has_every_field() {
        let mut s = snapshot();
        let mut t = DeviceTable::default();
        t.accepted("a", 10, true);
        t.rejected("a", "signature", 11);
        t.rejected("b", "replay", 12);
        t.settled("a");
        s.devices = Arc::new(t.rows(["b", "a", "c"].into_iter()));
        let v: serde_json::Value = serde_json::from_str(&render_devices(&s)).unwrap();
        assert_eq!(
            v["devices"][0],
            serde_json::json!({"device_id": "a", "last_seen": 11, "accepted": 1,
                "rejected": {"signature": 1}, "last_rejection": {"reason": "signature", "at": 11},
                "pending": 0})
        );
        assert_eq!(v["devices"][1]["rejected"], serde_json::json!({"replay": 1}));
        assert_eq!(v["devices"][2]["last_seen"], serde_json::Value::Null, "registered, never seen");
    }

    #[test]
    fn health_names_what_is_wrong() {
        let s = snapshot();
        assert_eq!(health(Some(&s), &Ok(())).0, 200);
        assert_eq!(health(None, &Ok(())).0, 503);
        let (code, why) = health(Some(&s), &Err("Operation not permitted".into()));
        assert_eq!(code, 503);
        assert!(why.contains("/x is not writable: Operation not permitted"), "{why}");
        let mut e = s.clone();
        e.last_append_error = Some((990, "disk full".into()));
        assert_eq!(health(Some(&e), &Ok(())).0, 503);
        e.last_append_error = Some((900, "disk full".into()));
        assert_eq!(health(Some(&e), &Ok(())).0, 200, "an old append error no longer counts");
        let mut r = s.clone();
        r.registry_stale = Some((970, "file is not a database".into()));
        let (code, why) = health(Some(&r), &Ok(()));
        assert_eq!(code, 503);
        assert!(why.contains("registry unreadable for 30 s (file is not a database)"), "{why}");
        assert!(render_prometheus(&r).contains("\niotgw_registry_stale 1\n"));
        assert!(render_prometheus(&s).contains("\niotgw_registry_stale 0\n"));
    }

    #[test]
    fn readiness_fails_only_for_faults_of_this_node() {
        let s = snapshot();
        assert_eq!(readiness(Some(&s), &Ok(())).0, 200);
        // This node's faults: not ready (a load balancer sends devices elsewhere).
        assert_eq!(readiness(None, &Ok(())).0, 503);
        assert_eq!(readiness(Some(&s), &Err("EPERM".into())).0, 503);
        let mut e = s.clone();
        e.last_append_error = Some((990, "disk full".into()));
        assert_eq!(readiness(Some(&e), &Ok(())).0, 503);
        // Shared dependencies down: every node alike, so still ready, and the line says so;
        // /healthz fails for monitoring.
        let mut r = s.clone();
        r.registry_stale = Some((970, "connection refused".into()));
        r.cluster = Some(ClusterView {
            redis_down: Some((990, "connection refused".into())),
            ..ClusterView::default()
        });
        let (code, why) = readiness(Some(&r), &Ok(()));
        assert_eq!(code, 200);
        assert!(why.contains("degraded: registry unreadable"), "{why}");
        assert!(why.contains("degraded: Redis unreachable"), "{why}");
        let (code, why) = health(Some(&r), &Ok(()));
        assert_eq!(code, 503, "{why}");
        r.registry_stale = None;
        let (code, why) = health(Some(&r), &Ok(()));
        assert_eq!(code, 503);
        assert!(why.contains("Redis unreachable for 10 s"), "{why}");
        let text = render_prometheus(&r);
        assert!(text.contains("\niotgw_cluster_redis_up 0\n"), "{text}");
        assert!(text.contains("iotgw_cluster_replays_total{content=\"different\"} 0\n"));
        // Single-node mode has no cluster series at all.
        assert!(!render_prometheus(&s).contains("iotgw_cluster_"));
    }
}
