//! The validator: the spec's checks in order (well-formed, fields, identity, registered,
//! timestamp, replay, signature) against the registry and the replay memory. It does no I/O
//! but a registry miss, and it never records anything by itself: the gateway calls
//! [`Validator::commit`] once the message is durably stored, so a message the outbox refused
//! does not burn its id.

use crate::acl::Identity;
use crate::config::{Config, RateLimit};
use crate::envelope::{Envelope, Reason, Rejection, Scratch};
use crate::host::printable;
use crate::registry::Registry;
use crate::replay::{self, IdDigest, ReplayCache, ReplayCheck};
use std::time::Instant;

/// One device's token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-device token buckets. Only registered devices get one (the check runs after the
/// registry lookup), so memory is bounded by the registry, not by what clients claim.
struct RateLimiter {
    limit: RateLimit,
    buckets: crate::fasthash::Map<Box<str>, Bucket>,
}

impl RateLimiter {
    /// Takes one token from `device`'s bucket; false when it is empty.
    fn take(&mut self, device: &str, now: Instant) -> bool {
        let burst = f64::from(self.limit.burst);
        let b = match self.buckets.get_mut(device) {
            Some(b) => b,
            None => self.buckets.entry(device.into()).or_insert(Bucket { tokens: burst, at: now }),
        };
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.limit.per_second;
        b.tokens = (b.tokens + refill).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A message that passed every check, not yet recorded.
#[derive(Debug)]
pub struct Accepted {
    pub envelope: Envelope,
    digest: IdDigest,
    /// When its id leaves the replay window (timestamp + tolerance).
    pub expires_at: i64,
}

impl Accepted {
    /// The digest of the message id (what the replay memory and the cluster share).
    pub fn digest(&self) -> IdDigest {
        self.digest
    }

    pub fn device(&self) -> &str {
        self.envelope.device_id()
    }
    pub fn message_id(&self) -> &str {
        self.envelope.message_id()
    }
}

/// A message that failed a check: the reason with its detail, and the message id when the
/// envelope got far enough to have one (for the log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub rejection: Rejection,
    pub message_id: Option<String>,
}

/// Registry + replay memory + the limits of the configuration.
pub struct Validator {
    registry: Registry,
    replay: ReplayCache,
    tolerance: i64,
    max_payload: usize,
    replay_cap: usize,
    rate: Option<RateLimiter>,
    /// The envelope reader's working memory, reused for every message.
    scratch: Scratch,
}

impl Validator {
    /// `seen`: ids accepted before a restart that are still inside their window.
    pub fn new(
        cfg: &Config,
        registry: Registry,
        seen: impl IntoIterator<Item = (String, IdDigest, i64)>,
    ) -> Validator {
        let mut replay = ReplayCache::new(cfg.replay_cache_size);
        for (device, digest, expires) in seen {
            replay.record(&device, digest, expires);
        }
        Validator {
            registry,
            replay,
            tolerance: cfg.timestamp_tolerance,
            max_payload: cfg.max_payload_bytes,
            replay_cap: cfg.replay_cache_size,
            rate: cfg.rate_limit.map(|limit| RateLimiter { limit, buckets: Default::default() }),
            scratch: Scratch::default(),
        }
    }

    /// Runs the checks for a message from `who` on the data topic of `topic_device`.
    pub fn check(
        &mut self,
        who: Identity<'_>,
        topic_device: &str,
        payload: &[u8],
        now: i64,
    ) -> Result<Accepted, Rejected> {
        let env = Envelope::parse_with(payload, self.max_payload, &mut self.scratch)
            .map_err(|rejection| Rejected { rejection, message_id: None })?;
        let reject = |reason: Reason, detail: String| Rejected {
            rejection: Rejection::new(reason, detail),
            message_id: Some(env.message_id().to_string()),
        };
        let device = env.device_id();
        let tls = match who {
            Identity::Device(d) => d,
            Identity::Service(s) => {
                return Err(reject(
                    Reason::Identity,
                    format!("service identity {} cannot publish device data", printable(s)),
                ))
            }
            Identity::None => {
                return Err(reject(Reason::Identity, "client has no TLS identity".into()))
            }
            Identity::Invalid => {
                return Err(reject(
                    Reason::Identity,
                    "certificate identity is outside the device-id grammar".into(),
                ))
            }
        };
        if device != tls || device != topic_device {
            return Err(reject(
                Reason::Identity,
                format!(
                    "device_id {} vs TLS identity {} vs topic device {}",
                    printable(device),
                    printable(tls),
                    printable(topic_device)
                ),
            ));
        }
        let keys = match self.registry.get(device) {
            Ok(k) => k,
            Err(miss) => return Err(reject(Reason::UnknownDevice, miss.to_string())),
        };
        if let Some(rate) = &mut self.rate {
            if !rate.take(device, Instant::now()) {
                return Err(reject(
                    Reason::RateLimited,
                    format!(
                        "over {} messages per second (bursts of {})",
                        rate.limit.per_second, rate.limit.burst
                    ),
                ));
            }
        }
        let tol = self.tolerance;
        if now.abs_diff(env.timestamp) > tol as u64 {
            return Err(reject(
                Reason::Timestamp,
                format!(
                    "timestamp {} is {} s from now (tolerance {tol} s)",
                    env.timestamp,
                    now.saturating_sub(env.timestamp)
                ),
            ));
        }
        let digest = replay::digest(env.message_id());
        match self.replay.check(device, &digest, now) {
            ReplayCheck::Fresh => {}
            ReplayCheck::Seen => {
                return Err(reject(
                    Reason::Replay,
                    "message_id already accepted within the window".into(),
                ))
            }
            ReplayCheck::CacheFull => {
                return Err(reject(
                    Reason::Replay,
                    format!(
                        "replay cache full: {} ids inside the window for this device",
                        self.replay_cap
                    ),
                ))
            }
        }
        let signed = env.signed_bytes();
        if !keys.secrets_at(now).any(|k| k.verify(signed, &env.signature)) {
            return Err(reject(Reason::Signature, "HMAC mismatch".into()));
        }
        let expires_at = env.timestamp.saturating_add(tol);
        Ok(Accepted { envelope: env, digest, expires_at })
    }

    /// Takes back a handled message's memory for the next one (no allocation per message).
    pub fn recycle(&mut self, a: Accepted) {
        a.envelope.recycle(&mut self.scratch);
    }

    /// Remembers an accepted message's id; call once it is durably stored.
    pub fn commit(&mut self, a: &Accepted) {
        self.replay.record(a.device(), a.digest, a.expires_at);
    }

    /// Remembers an id another node of the cluster accepted, if `device` is registered here
    /// (so what other nodes send cannot grow memory beyond the registry) and the id expires
    /// within `max_expires_at` (a forged far-future expiry would block the id for good).
    /// A device at its replay cap takes no more (the claims still keep such an id from being
    /// forwarded twice).
    pub fn remember_remote(
        &mut self,
        device: &str,
        digest: IdDigest,
        expires_at: i64,
        now: i64,
    ) -> bool {
        let max_expires_at = now + 2 * self.tolerance;
        if !self.registry.contains(device) || expires_at > max_expires_at || expires_at < now {
            return false;
        }
        if self.replay.check(device, &digest, now) != ReplayCheck::Fresh {
            return false;
        }
        self.replay.record(device, digest, expires_at);
        true
    }

    /// Installs the newest registry snapshot, if one arrived, and returns the devices it revoked
    /// (removed or disabled since the previous snapshot); None when none arrived.
    pub fn apply_registry_updates(&mut self) -> Option<Vec<Box<str>>> {
        let before = self.registry.apply_updates_diff()?;
        let registry = &self.registry;
        if let Some(rate) = &mut self.rate {
            rate.buckets.retain(|d, _| registry.contains(d));
        }
        Some(before.into_keys().filter(|id| !registry.contains(id)).collect())
    }

    /// May `device` act (registered, enabled)? May look a device up that is not in memory.
    pub fn is_enabled(&mut self, device: &str) -> bool {
        self.registry.get(device).is_ok()
    }

    /// The registry (snapshots to apply, keys for signing responses).
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Forgets ids that left their window, a bounded share per tick (`budget`: see
    /// [`ReplayCache::prune_some`]).
    pub fn forget_expired(&mut self, now: i64, budget: usize) {
        self.replay.prune_some(now, budget);
    }

    /// Ids remembered.
    pub fn replay_ids(&self) -> usize {
        self.replay.len()
    }

    /// Devices in the registry snapshot.
    pub fn devices(&self) -> usize {
        self.registry.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let mut r = RateLimiter {
            limit: RateLimit { per_second: 10.0, burst: 3 },
            buckets: Default::default(),
        };
        let t0 = Instant::now();
        assert!((0..3).all(|_| r.take("a", t0)), "a full bucket serves the burst");
        assert!(!r.take("a", t0), "then it is empty");
        assert!(r.take("b", t0), "other devices have their own bucket");
        assert!(!r.take("a", t0 + Duration::from_millis(50)), "half a token is not enough");
        assert!(r.take("a", t0 + Duration::from_millis(100)), "one token after 1/rate");
        assert!(!r.take("a", t0 + Duration::from_millis(100)));
        // A long pause refills to the burst, never beyond it.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| r.take("a", later)));
        assert!(!r.take("a", later));
    }
}
