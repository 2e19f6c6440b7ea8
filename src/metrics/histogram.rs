//! A fixed-bucket histogram of durations: one relaxed atomic add per bucket and two for sum and
//! count, so a worker or the broker thread can record into it without a lock, and the broker
//! thread can copy it into a [`super::Snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) for backend requests: 1 ms to 10 s.
pub const BACKEND_BOUNDS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds (seconds) for the cluster's replication delay: 100 µs to 1 s.
pub const REPLICATION_BOUNDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0];
/// Upper bounds (seconds) for the broker-thread check of one message: 1 µs to 10 ms.
pub const VALIDATION_BOUNDS: &[f64] =
    &[0.000_001, 0.000_002_5, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.001, 0.01];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Bounds as nanoseconds, so an observation is compared as an integer.
    bounds_ns: Vec<u64>,
    /// Non-cumulative counts, one per bound plus the overflow (+Inf) bucket.
    buckets: Vec<AtomicU64>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// A copy of a histogram's counts, cumulative as Prometheus wants them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations at or below it), ascending.
    pub cumulative: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            bounds_ns: bounds.iter().map(|b| (b * 1e9).round() as u64).collect(),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self.bounds_ns.iter().position(|b| ns <= *b).unwrap_or(self.bounds_ns.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let cumulative = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(b, n)| {
                acc += n.load(Ordering::Relaxed);
                (*b, acc)
            })
            .collect();
        let overflow = self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            cumulative,
            // Count from the buckets, so `+Inf` always equals `_count` even mid-update.
            count: acc + overflow,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(1000)); // exactly on the first bound
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1)); // overflow
        let s = h.snapshot();
        assert_eq!(s.cumulative, vec![(0.001, 1), (0.01, 2)]);
        assert_eq!(s.count, 3);
        assert!((s.sum_seconds - 1.006).abs() < 1e-9, "{}", s.sum_seconds);
    }
}
