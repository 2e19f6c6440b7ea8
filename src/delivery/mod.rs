//! Delivery: everything between "accepted" and "settled", owned in one place. The outbox
//! record, the lane of a device, spilling to disk when a lane is full and refilling it,
//! settling the workers' answers, and the delivery counts.
//!
//! The broker thread calls [`Delivery::accept`] for every accepted message (one outbox append,
//! then a non-blocking hand-off to the device's lane or, when that lane is full or already has
//! a backlog, a spill to disk), and [`Delivery::poll`] when woken (answers settled in the
//! outbox, freed lanes refilled). Workers (`workers`) only POST what they are given.

// The one unsafe module outside the FFI shim: mapping a file (see its module comment).
#[allow(unsafe_code)]
mod mapped;
pub mod outbox;
pub mod workers;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::host::{printable, Level, LogLine};
use crate::metrics::histogram::{Histogram, HistogramSnapshot, BACKEND_BOUNDS};
use crate::replay::IdDigest;
use outbox::{AppendError, Done, QueuedMessage, Store, Syncer};
use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use workers::{BackendError, Pool};

/// Why delivery could not start; each names the option at fault.
#[derive(Debug)]
pub enum StartError {
    Outbox(PathBuf, io::Error),
    Syncer(io::Error),
    Backend(String, BackendError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Outbox(p, e) => write!(
                f,
                "plugin_opt_spool_path {:?}: cannot open the outbox: {e}",
                p.display().to_string()
            ),
            StartError::Syncer(e) => write!(f, "cannot start the outbox syncer: {e}"),
            StartError::Backend(url, e) => write!(f, "plugin_opt_backend_url {url:?}: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// What the outbox held when delivery started, for the rest of the gateway.
pub struct Recovered {
    /// Ids accepted before the restart that are still inside their replay window.
    pub seen: Vec<(String, IdDigest, i64)>,
    /// What recovery found damaged (and any backlog record that could not be read back), one
    /// line each, for the start-up log.
    pub warnings: Vec<String>,
    /// The device of each message left pending by the last run (for per-device counts).
    pub pending_devices: Vec<String>,
}

/// Delivery counts, kept by the broker thread (which sees every answer) except the retries,
/// which only the workers see.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub delivered: u64,
    pub dead_lettered: u64,
    pub retries: u64,
    /// Answers whose body was longer than the 64 KiB passed on in the response.
    pub bodies_truncated: u64,
    /// Not forwarded because another node claimed the id first: a byte-identical copy, or the
    /// same id with other content.
    pub claimed_same: u64,
    pub claimed_different: u64,
}

/// What a poll produced: lines for the log, and the backend's answers for the responses.
#[derive(Debug, Default)]
pub struct Polled {
    pub logs: Vec<LogLine>,
    pub answers: Vec<Done>,
}

/// The forwarding half (absent with `backend_url none`).
struct Forward {
    pool: Pool,
    /// Per lane, the ids of accepted messages waiting on disk because the lane was full, oldest
    /// first. While a lane has any, its new messages queue behind them (per-device order).
    spilled: Vec<VecDeque<i64>>,
}

impl Forward {
    /// The lane of a device: the one place it is computed. SipHash with fixed keys, so the
    /// same in every run.
    fn lane(&self, device: &str) -> usize {
        let mut h = DefaultHasher::new();
        device.hash(&mut h);
        (h.finish() % self.spilled.len() as u64) as usize
    }
}

pub struct Delivery {
    outbox: Store,
    syncer: Syncer,
    forward: Option<Forward>,
    delivered: u64,
    dead_lettered: u64,
    bodies_truncated: u64,
    claimed_same: u64,
    claimed_different: u64,
}

impl Delivery {
    /// Opens the outbox (recovering it), starts its syncer and, with a backend, the workers;
    /// the backlog of the last run is handed to the workers first, in its original order.
    pub fn start(
        cfg: &Config,
        wake: Arc<dyn Fn() + Send + Sync>,
        cluster: Option<&Cluster>,
    ) -> Result<(Delivery, Recovered), StartError> {
        let mut outbox = Store::open(&cfg.spool_path, cfg.spool_max_bytes)
            .map_err(|e| StartError::Outbox(cfg.spool_path.clone(), e))?;
        let mut recovered = Recovered {
            seen: outbox.take_live_seen(crate::host::unix_now()),
            warnings: std::mem::take(&mut outbox.warnings).iter().map(|w| w.to_string()).collect(),
            pending_devices: Vec::new(),
        };
        let syncer = outbox.start_syncer().map_err(StartError::Syncer)?;
        let backlog = outbox.take_recovered_pending();
        let forward = match &cfg.backend {
            Some(b) => {
                let pool = Pool::start(b, wake, cluster)
                    .map_err(|e| StartError::Backend(b.url_template.clone(), e))?;
                let mut f = Forward { spilled: vec![VecDeque::new(); pool.lanes()], pool };
                for (id, device) in backlog {
                    let lane = f.lane(&device);
                    f.spilled[lane].push_back(id);
                    recovered.pending_devices.push(device);
                }
                Some(f)
            }
            None => None,
        };
        let mut d = Delivery {
            outbox,
            syncer,
            forward,
            delivered: 0,
            dead_lettered: 0,
            bodies_truncated: 0,
            claimed_same: 0,
            claimed_different: 0,
        };
        let mut logs = Vec::new();
        d.refill(&mut logs);
        recovered.warnings.extend(logs.into_iter().map(|l| l.text));
        Ok((d, recovered))
    }

    /// Whether accepted messages are forwarded (false: validation only).
    pub fn forwarding(&self) -> bool {
        self.forward.is_some()
    }

    /// Durably records an accepted message (`payload`: what the backend receives; None when
    /// not forwarding) and queues it for its device's lane. Once this returns Ok the message
    /// survives `kill -9`.
    pub fn accept(
        &mut self,
        device: &str,
        message_id: &str,
        expires_at: i64,
        payload: Option<Vec<u8>>,
    ) -> Result<(), AppendError> {
        let id = self.outbox.append(device, message_id, expires_at, payload.as_deref())?;
        if let (Some(payload), Some(f)) = (payload, &mut self.forward) {
            let lane = f.lane(device);
            if !f.spilled[lane].is_empty() {
                f.spilled[lane].push_back(id);
            } else {
                let m = QueuedMessage {
                    id,
                    device_id: device.to_string(),
                    message_id: message_id.to_string(),
                    payload,
                };
                if f.pool.try_dispatch(lane, m).is_err() {
                    f.spilled[lane].push_back(id);
                }
            }
        }
        Ok(())
    }

    /// Settles the workers' answers in the outbox, counts them, and refills freed lanes.
    pub fn poll(&mut self, now: i64) -> Polled {
        let mut polled = self.settle(now);
        self.refill(&mut polled.logs);
        polled
    }

    fn settle(&mut self, now: i64) -> Polled {
        let Some(f) = &self.forward else { return Polled::default() };
        let mut logs = f.pool.take_logs();
        let answers = f.pool.take_results();
        if answers.is_empty() {
            return Polled { logs, answers };
        }
        if let Err(e) = self.outbox.settle(&answers, now) {
            // The records stay pending; they are delivered again after a restart (at least once).
            logs.push(LogLine {
                level: Level::Error,
                text: format!("cannot update the outbox: {e}"),
            });
        }
        for d in &answers {
            if d.body_truncated {
                self.bodies_truncated += 1;
            }
            if let Some(e) = &d.claimed_elsewhere {
                // A byte-identical copy is what a device retransmits after reconnecting through
                // another node: no alarm. Other content under the same id is one.
                let (level, what) = if e.same_content {
                    self.claimed_same += 1;
                    (
                        Level::Notice,
                        "the same content (a replay or a retransmission through another node)",
                    )
                } else {
                    self.claimed_different += 1;
                    (
                        Level::Warning,
                        "DIFFERENT content (a replay with altered data, or a device reusing ids)",
                    )
                };
                logs.push(LogLine {
                    level,
                    text: format!(
                        "not forwarded: device={} message_id={} was already accepted by node {} with {what}",
                        printable(&d.message.device_id),
                        printable(&d.message.message_id),
                        printable(&e.node)
                    ),
                });
            } else if d.delivered {
                self.delivered += 1;
            } else {
                self.dead_lettered += 1;
                logs.push(LogLine {
                    level: Level::Warning,
                    text: format!(
                        "dead-lettered device={} message_id={} status={} after {} attempt(s)",
                        printable(&d.message.device_id),
                        printable(&d.message.message_id),
                        d.status,
                        d.attempts
                    ),
                });
            }
        }
        Polled { logs, answers }
    }

    /// Hands spilled messages to their lanes, oldest first, as the lanes free up. Each spilled
    /// message is read from disk exactly once; a full lane never holds up the others.
    fn refill(&mut self, logs: &mut Vec<LogLine>) {
        let Some(f) = &mut self.forward else { return };
        for (lane, queue) in f.spilled.iter_mut().enumerate() {
            let mut room = f.pool.lane_free(lane);
            while room > 0 {
                let Some(&id) = queue.front() else { break };
                match self.outbox.read(id) {
                    Ok(Some(m)) => {
                        if f.pool.try_dispatch(lane, m).is_err() {
                            break;
                        }
                        room -= 1;
                    }
                    // Settled meanwhile (e.g. delivered before a restart): nothing to send.
                    Ok(None) => {}
                    Err(e) => {
                        logs.push(LogLine {
                            level: Level::Error,
                            text: format!("cannot read message {id} from the outbox: {e}"),
                        });
                        break;
                    }
                }
                queue.pop_front();
            }
        }
    }

    /// Deletes outbox segments nobody needs any more.
    pub fn housekeeping(&mut self, now: i64) -> Option<LogLine> {
        self.outbox.prune(now).err().map(|e| LogLine {
            level: Level::Warning,
            text: format!("deleting settled outbox segments failed: {e}"),
        })
    }

    pub fn counts(&self) -> Counts {
        Counts {
            delivered: self.delivered,
            dead_lettered: self.dead_lettered,
            bodies_truncated: self.bodies_truncated,
            claimed_same: self.claimed_same,
            claimed_different: self.claimed_different,
            retries: self
                .forward
                .as_ref()
                .map_or(0, |f| f.pool.stats().retries.load(Ordering::Relaxed)),
        }
    }

    /// How the outbox writes its records (for the start-up line).
    pub fn write_mode(&self) -> &'static str {
        self.outbox.write_mode()
    }

    /// Messages waiting for delivery.
    pub fn pending(&self) -> usize {
        self.outbox.pending_count().unwrap_or(0) as usize
    }

    /// Bytes of pending messages, as counted against `spool_max_bytes`.
    pub fn pending_bytes(&self) -> u64 {
        self.outbox.queued_bytes()
    }

    /// Unix time the oldest pending message was stored (None: nothing pending).
    pub fn oldest_pending_at(&self) -> Option<i64> {
        self.outbox.oldest_pending_at()
    }

    /// The workers' request durations (empty without a backend).
    pub fn request_durations(&self) -> HistogramSnapshot {
        match &self.forward {
            Some(f) => f.pool.stats().request_duration.snapshot(),
            None => Histogram::new(BACKEND_BOUNDS).snapshot(),
        }
    }

    /// Stops the workers and the syncer (joins them all) and settles the answers that arrived
    /// meanwhile. Undelivered messages stay in the outbox for the next start.
    pub fn shutdown(&mut self, now: i64) -> Polled {
        if let Some(f) = &mut self.forward {
            f.pool.shutdown();
        }
        let polled = self.settle(now);
        self.syncer.stop();
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward_with(lanes: usize) -> Forward {
        let cfg = crate::config::BackendConfig {
            url_template: "http://127.0.0.1:9/{device_id}".into(),
            ca_file: None,
            workers: lanes,
            http_timeout: std::time::Duration::from_millis(100),
            pipeline: 1,
        };
        let pool = Pool::start(&cfg, Arc::new(|| {}), None).unwrap();
        Forward { spilled: vec![VecDeque::new(); lanes], pool }
    }

    #[test]
    fn lanes_are_stable_spread_and_in_range() {
        let f = forward_with(4);
        let devices: Vec<String> = (0..64).map(|i| format!("sensor_{i:03}")).collect();
        let lanes: Vec<usize> = devices.iter().map(|d| f.lane(d)).collect();
        assert!(lanes.iter().all(|l| *l < 4));
        // Stable: a fresh pool of the same size puts every device in the same lane.
        let g = forward_with(4);
        assert_eq!(lanes, devices.iter().map(|d| g.lane(d)).collect::<Vec<_>>());
        // Spread: 64 devices use every one of 4 lanes (a constant function would fail this).
        let used: std::collections::HashSet<usize> = lanes.iter().copied().collect();
        assert_eq!(used.len(), 4, "{lanes:?}");
    }
}
