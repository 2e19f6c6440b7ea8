//! Replay protection: every accepted message id is remembered exactly as long as a message with
//! that id could still pass the timestamp check, and no longer.
//!
//! A message with timestamp `t` passes freshness while `now <= t + tolerance`, so its id is kept
//! until then (`expires_at = t + tolerance`). Each device has a hard cap (`replay_cache_size`);
//! a device at its cap is refused (`replay`, cache full) rather than having a live id forgotten,
//! so an id can never be accepted twice. With ids stamped near `now`, the cap allows a sustained
//! rate of `cap / tolerance` messages per second per device (1000 / 300 s ≈ 3.3 msg/s).
//!
//! An entry is a 16-byte digest of the id plus an 8-byte expiry, held once in a hash set and once
//! in a min-heap ordered by expiry (about 50 bytes with table overhead).

use crate::fasthash::{Map, Set};
use sha2::{Digest, Sha256};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Fixed-size stand-in for a message id (truncated SHA-256: stable across restarts).
pub type IdDigest = [u8; 16];

/// The digest of a message id.
pub fn digest(message_id: &str) -> IdDigest {
    let full = Sha256::digest(message_id.as_bytes());
    let mut d = [0u8; 16];
    d.copy_from_slice(&full[..16]);
    d
}

/// Outcome of [`ReplayCache::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayCheck {
    Fresh,
    Seen,
    CacheFull,
}

#[derive(Default)]
struct DeviceIds {
    live: Set<IdDigest>,
    by_expiry: BinaryHeap<Reverse<(i64, IdDigest)>>,
}

impl DeviceIds {
    fn prune(&mut self, now: i64) {
        while let Some(Reverse((exp, d))) = self.by_expiry.peek().copied() {
            if exp >= now {
                break;
            }
            self.by_expiry.pop();
            self.live.remove(&d);
        }
    }
}

/// Per-device sets of recently accepted message ids.
pub struct ReplayCache {
    cap: usize,
    devices: Map<Box<str>, DeviceIds>,
}

impl ReplayCache {
    pub fn new(cap_per_device: usize) -> Self {
        ReplayCache { cap: cap_per_device, devices: Map::default() }
    }

    /// Is `id` new for `device` at time `now`? Forgets ids whose window has closed first.
    pub fn check(&mut self, device: &str, id: &IdDigest, now: i64) -> ReplayCheck {
        let Some(ids) = self.devices.get_mut(device) else {
            return if self.cap == 0 { ReplayCheck::CacheFull } else { ReplayCheck::Fresh };
        };
        ids.prune(now);
        if ids.live.contains(id) {
            ReplayCheck::Seen
        } else if ids.live.len() >= self.cap {
            ReplayCheck::CacheFull
        } else {
            ReplayCheck::Fresh
        }
    }

    /// Remembers `id` for `device` until `expires_at` (inclusive).
    pub fn record(&mut self, device: &str, id: IdDigest, expires_at: i64) {
        let ids = match self.devices.get_mut(device) {
            Some(ids) => ids,
            None => self.devices.entry(device.into()).or_default(),
        };
        if ids.live.insert(id) {
            ids.by_expiry.push(Reverse((expires_at, id)));
        }
    }

    /// Drops every expired id and every device left with none (run periodically, off the
    /// per-message path).
    pub fn prune_all(&mut self, now: i64) {
        self.devices.retain(|_, ids| {
            ids.prune(now);
            !ids.live.is_empty()
        });
    }

    /// Number of ids remembered across all devices.
    pub fn len(&self) -> usize {
        self.devices.values().map(|d| d.live.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_id_within_window_is_seen() {
        let mut c = ReplayCache::new(10);
        let d = digest("m1");
        assert_eq!(c.check("dev", &d, 1000), ReplayCheck::Fresh);
        c.record("dev", d, 1300);
        assert_eq!(c.check("dev", &d, 1000), ReplayCheck::Seen);
        assert_eq!(c.check("dev", &d, 1300), ReplayCheck::Seen, "still live at its expiry second");
    }

    #[test]
    fn same_id_after_window_is_fresh_again() {
        let mut c = ReplayCache::new(10);
        let d = digest("m1");
        c.record("dev", d, 1300);
        assert_eq!(c.check("dev", &d, 1301), ReplayCheck::Fresh);
        assert!(c.is_empty());
    }

    #[test]
    fn ids_are_per_device() {
        let mut c = ReplayCache::new(10);
        let d = digest("m1");
        c.record("a", d, 1300);
        assert_eq!(c.check("b", &d, 1000), ReplayCheck::Fresh);
    }

    #[test]
    fn device_at_cap_is_refused_not_forgotten() {
        let mut c = ReplayCache::new(3);
        for i in 0..3 {
            c.record("dev", digest(&format!("m{i}")), 1300);
        }
        assert_eq!(c.check("dev", &digest("new"), 1000), ReplayCheck::CacheFull);
        // The old ids are all still refused as replays.
        assert_eq!(c.check("dev", &digest("m0"), 1000), ReplayCheck::Seen);
        // Once they expire there is room again.
        assert_eq!(c.check("dev", &digest("new"), 1301), ReplayCheck::Fresh);
    }

    #[test]
    fn expiry_order_is_by_time_not_insertion() {
        let mut c = ReplayCache::new(10);
        c.record("dev", digest("late"), 2000);
        c.record("dev", digest("early"), 1000);
        assert_eq!(c.check("dev", &digest("early"), 1500), ReplayCheck::Fresh);
        assert_eq!(c.check("dev", &digest("late"), 1500), ReplayCheck::Seen);
    }

    #[test]
    fn prune_all_drops_empty_devices() {
        let mut c = ReplayCache::new(10);
        c.record("a", digest("x"), 10);
        c.record("b", digest("y"), 100);
        c.prune_all(50);
        assert_eq!(c.len(), 1);
        assert_eq!(c.devices.len(), 1);
    }
}
