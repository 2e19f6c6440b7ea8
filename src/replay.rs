//! Replay protection: every accepted message id is remembered exactly as long as a message with
//! that id could still pass the timestamp check, and no longer.
//!
//! A message with timestamp `t` passes freshness while `now <= t + tolerance`, so its id is kept
//! until then (`expires_at = t + tolerance`). Each device has a hard cap (`replay_cache_size`);
//! a device at its cap is refused (`replay`, cache full) rather than having a live id forgotten,
//! so an id can never be accepted twice. With ids stamped near `now`, the cap allows a sustained
//! rate of `cap / tolerance` messages per second per device (1000 / 300 s ≈ 3.3 msg/s).
//!
//! An entry is a 16-byte digest of the id plus an 8-byte expiry, held once in a hash map and in a
//! queue ordered by expiry (again for each later expiry the id is recorded with; the older queue
//! entries are only popped): 60–85 bytes with table overhead (BENCHMARKS.md).
//!
//! Forgetting is bounded work, never a stall: the broker thread runs [`ReplayCache::check`] for
//! every message, and ids expire in bursts (a burst of messages stamped in the same second
//! expires in the same second). Forgetting 60,000 ids of one second at once took the broker
//! thread 65 ms, which every message behind it waited (`make bench` saw such spikes after a
//! few rounds: BENCHMARKS.md). So an id whose window has closed counts as forgotten whether or
//! not it has been removed yet (each entry keeps its expiry), a check removes at most
//! [`PRUNE_PER_CHECK`] of its device's expired ids, and [`ReplayCache::prune_some`] removes the
//! rest a bounded batch at a time from the tick.

use crate::fasthash::{Keyed, Map};
use indexmap::IndexMap;
use sha2::{Digest, Sha256};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::hash::BuildHasher;

/// Fixed-size stand-in for a message id (truncated SHA-256: stable across restarts).
pub type IdDigest = [u8; 16];

/// Expired ids a check removes from its device (more than the one id a message adds, so a
/// device that keeps sending works off its own backlog).
pub const PRUNE_PER_CHECK: usize = 4;
/// A device at its cap removes expired ids until it is below the cap again, popping at most this
/// many queue entries per check. More are needed only when the device holds far more ids than its
/// cap (read back at start-up after the cap was lowered) or many renewed ids' older entries; a
/// check past this budget refuses the message as "cache full" while the rest is worked off.
const PRUNE_AT_CAP: usize = 1024;

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

/// Ids past which a device's map is split in [`SHARDS`].
const SHARD_AT: usize = 4096;
const SHARDS: usize = 256;

/// Id → the last second it is refused as a replay. One map while small; split in [`SHARDS`]
/// maps once a device has [`SHARD_AT`] ids, because a hash map grows by rehashing all of it at
/// once: 18 ms of broker thread at ~900,000 ids (one device at thousands of messages a second
/// with a large `replay_cache_size`). Split, one growth rehashes 1/256 of the ids.
enum IdMap {
    One(Map<IdDigest, i64>),
    Many { shards: Box<[Map<IdDigest, i64>]>, len: usize, pick: Keyed },
}

impl Default for IdMap {
    fn default() -> Self {
        IdMap::One(Map::default())
    }
}

impl IdMap {
    /// Which shard holds `id`: bits of a keyed hash that the maps themselves do not use (they
    /// take the low bits for the slot and the top 7 for the tag), so that neither a shard's
    /// slots nor its tags all look alike; keyed, so that a device cannot choose message ids
    /// that all land in one shard.
    fn shard(pick: &Keyed, id: &IdDigest) -> usize {
        (pick.hash_one(id) >> 32) as usize % SHARDS
    }

    fn get(&self, id: &IdDigest) -> Option<&i64> {
        match self {
            IdMap::One(m) => m.get(id),
            IdMap::Many { shards, pick, .. } => shards[Self::shard(pick, id)].get(id),
        }
    }

    fn insert(&mut self, id: IdDigest, exp: i64) -> Option<i64> {
        if let IdMap::One(m) = self {
            if m.len() < SHARD_AT || m.contains_key(&id) {
                return m.insert(id, exp);
            }
            let pick = Keyed::default();
            let mut shards: Box<[Map<IdDigest, i64>]> =
                (0..SHARDS).map(|_| Map::default()).collect();
            let len = m.len();
            for (k, v) in m.drain() {
                shards[Self::shard(&pick, &k)].insert(k, v);
            }
            *self = IdMap::Many { shards, len, pick };
        }
        let IdMap::Many { shards, len, pick } = self else { unreachable!() };
        let old = shards[Self::shard(pick, &id)].insert(id, exp);
        *len += usize::from(old.is_none());
        old
    }

    fn remove(&mut self, id: &IdDigest) {
        match self {
            IdMap::One(m) => {
                m.remove(id);
            }
            IdMap::Many { shards, len, pick } => {
                *len -= usize::from(shards[Self::shard(pick, id)].remove(id).is_some());
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            IdMap::One(m) => m.len(),
            IdMap::Many { len, .. } => *len,
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Default)]
struct DeviceIds {
    live: IdMap,
    /// Every expiry recorded, in two queues: `in_order` takes each expiry no earlier than the
    /// last one it took (a device stamps its messages with its own clock, so nearly all of
    /// them), appended and popped at the ends; `by_expiry` is a min-heap for the rest. A heap
    /// push climbs through entries scattered across a large heap: 8 % of the whole accept path
    /// in `perf` (`accept_validate_only`), where an append writes next to the last one.
    /// An entry whose id was recorded again later (with a later expiry) is stale and only
    /// popped.
    in_order: VecDeque<(i64, IdDigest)>,
    by_expiry: BinaryHeap<Reverse<(i64, IdDigest)>>,
}

impl DeviceIds {
    /// The earliest expiry held, in either queue.
    fn earliest(&self) -> Option<i64> {
        match (self.in_order.front(), self.by_expiry.peek()) {
            (Some((a, _)), Some(Reverse((b, _)))) => Some(*a.min(b)),
            (Some((a, _)), None) => Some(*a),
            (None, Some(Reverse((b, _)))) => Some(*b),
            (None, None) => None,
        }
    }

    /// Removes and returns the entry with the earliest expiry (on a tie, the in-order one).
    fn pop_earliest(&mut self) -> Option<(i64, IdDigest)> {
        let first = self.earliest()?;
        if self.in_order.front().is_some_and(|(exp, _)| *exp == first) {
            self.in_order.pop_front()
        } else {
            self.by_expiry.pop().map(|Reverse(e)| e)
        }
    }

    fn push(&mut self, expires_at: i64, id: IdDigest) {
        if self.in_order.back().is_none_or(|(last, _)| *last <= expires_at) {
            self.in_order.push_back((expires_at, id));
        } else {
            self.by_expiry.push(Reverse((expires_at, id)));
        }
    }

    /// Entries in both queues (stale ones included).
    fn entries(&self) -> usize {
        self.in_order.len() + self.by_expiry.len()
    }

    /// Removes ids whose window closed before `now`, at most `budget` queue entries; returns how
    /// many ids left `live`.
    fn prune(&mut self, now: i64, budget: usize) -> usize {
        let mut removed = 0;
        for _ in 0..budget {
            if !self.has_expired(now) {
                break;
            }
            let Some((exp, d)) = self.pop_earliest() else { break };
            if self.live.get(&d) == Some(&exp) {
                self.live.remove(&d);
                removed += 1;
            }
        }
        removed
    }

    fn has_expired(&self, now: i64) -> bool {
        self.earliest().is_some_and(|exp| exp < now)
    }
}

/// Per-device sets of recently accepted message ids.
pub struct ReplayCache {
    cap: usize,
    /// Indexed, so that [`ReplayCache::prune_some`] can go round the devices a few at a time.
    devices: IndexMap<Box<str>, DeviceIds, Keyed>,
    /// Where the next [`ReplayCache::prune_some`] starts.
    cursor: usize,
    /// Entries in all `live` maps (kept here: the metrics read it every 250 ms).
    ids: usize,
}

impl ReplayCache {
    pub fn new(cap_per_device: usize) -> Self {
        ReplayCache { cap: cap_per_device, devices: IndexMap::default(), cursor: 0, ids: 0 }
    }

    /// Is `id` new for `device` at time `now`? An id whose window closed is new again.
    pub fn check(&mut self, device: &str, id: &IdDigest, now: i64) -> ReplayCheck {
        let Some(ids) = self.devices.get_mut(device) else {
            return if self.cap == 0 { ReplayCheck::CacheFull } else { ReplayCheck::Fresh };
        };
        self.ids -= ids.prune(now, PRUNE_PER_CHECK);
        match ids.live.get(id) {
            Some(exp) if *exp >= now => return ReplayCheck::Seen,
            // Recording it again replaces its entry: no room needed.
            Some(_) => return ReplayCheck::Fresh,
            None => {}
        }
        let mut budget = PRUNE_AT_CAP;
        while ids.live.len() >= self.cap && budget > 0 && ids.has_expired(now) {
            self.ids -= ids.prune(now, 1);
            budget -= 1;
        }
        if ids.live.len() >= self.cap {
            ReplayCheck::CacheFull
        } else {
            ReplayCheck::Fresh
        }
    }

    /// Remembers `id` for `device` until `expires_at` (inclusive); an id remembered already
    /// keeps the later of the two expiries.
    pub fn record(&mut self, device: &str, id: IdDigest, expires_at: i64) {
        let ids = match self.devices.get_mut(device) {
            Some(ids) => ids,
            None => self.devices.entry(device.into()).or_default(),
        };
        match ids.live.insert(id, expires_at) {
            None => self.ids += 1,
            Some(old) if old >= expires_at => {
                ids.live.insert(id, old);
                return;
            }
            Some(_) => {}
        }
        ids.push(expires_at, id);
    }

    /// Forgets expired ids, going round the devices from where the last call stopped, and drops
    /// devices left with none (the tick's share of forgetting: ids of devices that stopped
    /// sending, which no check removes). `budget` counts queue entries popped and devices visited
    /// with nothing to pop, so many devices with nothing to forget are not a long walk either.
    pub fn prune_some(&mut self, now: i64, budget: usize) {
        let mut left = budget;
        let mut visits = self.devices.len();
        while left > 0 && visits > 0 {
            if self.cursor >= self.devices.len() {
                self.cursor = 0;
            }
            let Some((_, ids)) = self.devices.get_index_mut(self.cursor) else { break };
            let before = ids.entries();
            self.ids -= ids.prune(now, left);
            let popped = before - ids.entries();
            left -= popped.max(1).min(left);
            let (empty, more) = (ids.live.is_empty(), ids.has_expired(now));
            if empty {
                // The last device moves here: it is visited next.
                self.devices.swap_remove_index(self.cursor);
            } else if !more {
                self.cursor += 1;
            }
            visits -= 1;
        }
    }

    /// Number of ids remembered across all devices (those expired but not yet removed included).
    pub fn len(&self) -> usize {
        self.ids
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
        let mut c = filled(3, 3, 1300);
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

    /// The count kept beside the maps is the maps' own count.
    fn counted(c: &ReplayCache) -> usize {
        let n = c
            .devices
            .values()
            .map(|d| match &d.live {
                IdMap::One(m) => m.len(),
                IdMap::Many { shards, len, .. } => {
                    let real = shards.iter().map(|s| s.len()).sum();
                    assert_eq!(*len, real, "a split map's count drifted from its shards");
                    real
                }
            })
            .sum();
        assert_eq!(c.len(), n, "the running count drifted from the maps");
        n
    }

    fn entries(c: &ReplayCache, device: &str) -> usize {
        c.devices.get(device).map_or(0, |d| d.entries())
    }

    /// A cache with cap `cap` whose device "dev" holds `n` ids `m0`, `m1`, … expiring at `exp`.
    fn filled(cap: usize, n: usize, exp: i64) -> ReplayCache {
        let mut c = ReplayCache::new(cap);
        for i in 0..n {
            c.record("dev", digest(&format!("m{i}")), exp);
        }
        c
    }

    #[test]
    fn expiries_out_of_order_are_popped_in_expiry_order_from_both_queues() {
        let mut d = DeviceIds::default();
        let exps = [1000, 1005, 990, 1010, 995, 1005, 1003, 1020, 1001];
        for (i, e) in exps.iter().enumerate() {
            d.push(*e, digest(&format!("m{i}")));
        }
        // Both queues are in use: the ones recorded earlier than their predecessor go to the heap.
        assert_eq!((d.in_order.len(), d.by_expiry.len()), (4, 5));
        let mut popped = Vec::new();
        while let Some((e, _)) = d.pop_earliest() {
            popped.push(e);
        }
        let mut sorted = exps.to_vec();
        sorted.sort();
        assert_eq!(popped, sorted);

        // Through the cache: an id stamped out of order is forgotten at its own expiry.
        let mut c = ReplayCache::new(10);
        for (i, e) in exps.iter().enumerate() {
            c.record("dev", digest(&format!("m{i}")), *e);
        }
        c.prune_some(1001, 100);
        assert_eq!(counted(&c), 6, "only 1000, 990 and 995 expire before 1001");
        assert_eq!(c.check("dev", &digest("m2"), 1001), ReplayCheck::Fresh);
        assert_eq!(c.check("dev", &digest("m8"), 1001), ReplayCheck::Seen);
        assert_eq!(c.check("dev", &digest("m6"), 1003), ReplayCheck::Seen);
        assert_eq!(c.check("dev", &digest("m6"), 1004), ReplayCheck::Fresh);
    }

    #[test]
    fn prune_some_drops_empty_devices() {
        let mut c = ReplayCache::new(10);
        c.record("a", digest("x"), 10);
        c.record("b", digest("y"), 100);
        c.prune_some(50, 100);
        assert_eq!(counted(&c), 1);
        assert_eq!(c.devices.len(), 1);
        assert!(c.devices.contains_key("b"));
    }

    #[test]
    fn a_burst_of_expired_ids_is_forgotten_a_bounded_share_per_check() {
        let mut c = filled(1_000_000, 10_000, 1000);
        c.record("dev", digest("live"), 2000);
        // Past the burst's expiry: one check removes only its share...
        assert_eq!(c.check("dev", &digest("new"), 1001), ReplayCheck::Fresh);
        assert_eq!(entries(&c, "dev"), 10_001 - PRUNE_PER_CHECK);
        // ...yet answers as if all were gone: an expired id is new again, a live one is not.
        assert_eq!(c.check("dev", &digest("m9999"), 1001), ReplayCheck::Fresh);
        assert_eq!(c.check("dev", &digest("live"), 1001), ReplayCheck::Seen);
        assert_eq!(entries(&c, "dev"), 10_001 - 3 * PRUNE_PER_CHECK);
        // Positive control: before the expiry the same old id is a replay.
        assert_eq!(c.check("dev", &digest("m9999"), 1000), ReplayCheck::Seen);
        counted(&c);
    }

    #[test]
    fn a_device_over_its_cap_makes_room_from_expired_ids_it_has_not_forgotten_yet() {
        // More ids than the cap: what a restart with a lowered `replay_cache_size` reads back.
        let mut c = filled(100, 150, 1000);
        assert_eq!(c.check("dev", &digest("new"), 1000), ReplayCheck::CacheFull);
        // All expire: the check forgets its share, then as many more as make room for one.
        assert_eq!(c.check("dev", &digest("new"), 1001), ReplayCheck::Fresh);
        assert_eq!(counted(&c), 99);
        // Positive control: live ids are never made room from.
        let mut d = filled(100, 150, 5000);
        assert_eq!(d.check("dev", &digest("new"), 1001), ReplayCheck::CacheFull);
        assert_eq!(counted(&d), 150);
        // Past the budget a check refuses (cache full) and leaves the rest to the next ones.
        let mut e = filled(10, PRUNE_AT_CAP + 500, 1000);
        assert_eq!(e.check("dev", &digest("new"), 1001), ReplayCheck::CacheFull);
        assert_eq!(counted(&e), 500 - PRUNE_PER_CHECK);
        assert_eq!(e.check("dev", &digest("new"), 1001), ReplayCheck::Fresh);
    }

    #[test]
    fn an_id_recorded_again_after_its_window_outlives_its_old_entry() {
        let mut c = ReplayCache::new(10);
        let d = digest("m1");
        for i in 0..PRUNE_PER_CHECK {
            c.record("dev", digest(&format!("filler{i}")), 900);
        }
        c.record("dev", d, 1000);
        // At 1001 the check forgets only the fillers; m1's old entry is still there, expired.
        assert_eq!(c.check("dev", &d, 1001), ReplayCheck::Fresh);
        c.record("dev", d, 1400);
        // Its old entry (1000) is popped now; the id must stay remembered until 1400.
        c.prune_some(1100, 100);
        assert_eq!(c.check("dev", &d, 1200), ReplayCheck::Seen);
        assert_eq!(c.check("dev", &d, 1401), ReplayCheck::Fresh);
        counted(&c);
    }

    #[test]
    fn an_id_recorded_twice_keeps_the_later_expiry() {
        let mut c = ReplayCache::new(10);
        let d = digest("m1");
        c.record("dev", d, 2000);
        c.record("dev", d, 1000);
        assert_eq!(c.check("dev", &d, 1500), ReplayCheck::Seen);
        assert_eq!(counted(&c), 1);
    }

    #[test]
    fn the_tick_forgets_a_bounded_batch_going_round_every_device() {
        let mut c = ReplayCache::new(1000);
        for dev in 0..50 {
            for i in 0..100 {
                c.record(&format!("d{dev}"), digest(&format!("{dev}-{i}")), 1000);
            }
        }
        c.record("keeper", digest("k"), 5000);
        let mut calls = 0;
        while c.len() > 1 {
            let before = c.len();
            c.prune_some(1001, 64);
            assert!(before - c.len() <= 64, "one call forgot {} ids", before - c.len());
            calls += 1;
            assert!(calls < 200, "prune_some stopped making progress");
        }
        assert!(calls >= 5000 / 64, "{calls} calls for 5,000 ids in batches of 64");
        assert_eq!(c.devices.len(), 1, "devices left with no ids are dropped");
        assert_eq!(c.check("keeper", &digest("k"), 1001), ReplayCheck::Seen);
        counted(&c);
    }

    #[test]
    fn a_device_with_many_ids_splits_its_map_and_still_answers_exactly() {
        let mut c = ReplayCache::new(1_000_000);
        let n = SHARD_AT * 3;
        for i in 0..n {
            let exp = if i % 2 == 0 { 1000 } else { 2000 };
            c.record("dev", digest(&format!("m{i}")), exp);
        }
        let ids = &c.devices["dev"].live;
        let IdMap::Many { shards, len, .. } = ids else { panic!("{n} ids are still one map") };
        assert_eq!(*len, n);
        assert_eq!(shards.iter().map(|s| s.len()).sum::<usize>(), n);
        let most = shards.iter().map(|s| s.len()).max().unwrap_or(0);
        assert!(most < 3 * n / SHARDS, "one shard holds {most} of {n} ids");
        for i in (0..n).step_by(97) {
            assert_eq!(c.check("dev", &digest(&format!("m{i}")), 1000), ReplayCheck::Seen);
        }
        // The even ones expire: forgotten by the tick, the odd ones still refused.
        while c.len() > n / 2 {
            c.prune_some(1001, 4096);
        }
        assert_eq!(counted(&c), n / 2);
        assert_eq!(c.check("dev", &digest("m2"), 1001), ReplayCheck::Fresh);
        assert_eq!(c.check("dev", &digest("m3"), 1001), ReplayCheck::Seen);
        c.record("dev", digest("m2"), 3000);
        assert_eq!(c.check("dev", &digest("m2"), 1500), ReplayCheck::Seen);
        assert_eq!(counted(&c), n / 2 + 1);
    }

    #[test]
    fn the_tick_makes_progress_on_the_smallest_budget() {
        let mut c = filled(1000, 10, 1000);
        c.record("b", digest("b"), 5000);
        for _ in 0..10 {
            c.prune_some(1001, 1);
        }
        assert_eq!(counted(&c), 1, "ten calls with budget 1 forget the ten expired ids");
        // Recording an id again with the same expiry adds no second queue entry.
        c.record("b", digest("b"), 5000);
        assert_eq!(entries(&c, "b"), 1);
    }
}
