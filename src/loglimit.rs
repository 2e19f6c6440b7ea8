//! Rate-limited rejection logging. A flood of bad messages must not fill the disk (250k forged
//! messages once wrote 41.5 MB of log in 3 s) while the counters still count every one.
//!
//! Per identity, the first [`FULL_LINES`] rejections of a [`WINDOW`] are logged in full (enough
//! to see what a misconfigured device sends); the rest of that window are only counted, and
//! one summary line with the count is logged when the window ends. Memory is bounded: at most
//! [`MAX_IDENTITIES`] identities are tracked; rejections from further identities in the same
//! window share one summary.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a burst window lasts.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Rejections per identity and window logged in full.
pub const FULL_LINES: u32 = 10;
/// Identities tracked at once.
pub const MAX_IDENTITIES: usize = 4096;

#[derive(Debug)]
struct Burst {
    started: Instant,
    logged: u32,
    suppressed: u64,
    last_reason: &'static str,
}

#[derive(Debug, Default)]
pub struct LogLimiter {
    bursts: HashMap<Box<str>, Burst>,
    /// Rejections not logged because too many identities were tracked, since `overflow_since`.
    overflow: u64,
    overflow_since: Option<Instant>,
}

impl LogLimiter {
    /// Should this rejection of `who` be logged in full? Counts it either way.
    pub fn admit(&mut self, who: &str, reason: &'static str, now: Instant) -> bool {
        if let Some(b) = self.bursts.get_mut(who) {
            if now.saturating_duration_since(b.started) < WINDOW {
                if b.logged < FULL_LINES {
                    b.logged += 1;
                    return true;
                }
                b.suppressed += 1;
                b.last_reason = reason;
                return false;
            }
            // The window ended but was not flushed yet: its summary comes at the next flush;
            // this rejection opens no new window until then (it is counted in the summary).
            b.suppressed += 1;
            b.last_reason = reason;
            return false;
        }
        if self.bursts.len() >= MAX_IDENTITIES {
            self.overflow += 1;
            self.overflow_since.get_or_insert(now);
            return false;
        }
        self.bursts.insert(
            who.into(),
            Burst { started: now, logged: 1, suppressed: 0, last_reason: reason },
        );
        true
    }

    /// Summary lines for the windows that ended by `now` (and forgets them).
    pub fn flush(&mut self, now: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        self.bursts.retain(|who, b| {
            let took = now.saturating_duration_since(b.started);
            if took < WINDOW {
                return true;
            }
            if b.suppressed > 0 {
                lines.push(format!(
                    "rejected {} more message(s) from identity={who} in {:.0} s without logging each (last reason={}); the counters have them all",
                    b.suppressed,
                    took.as_secs_f64(),
                    b.last_reason
                ));
            }
            false
        });
        if let Some(since) = self.overflow_since {
            if now.saturating_duration_since(since) >= WINDOW {
                lines.push(format!(
                    "rejected {} more message(s) from more than {MAX_IDENTITIES} identities without logging each; the counters have them all",
                    self.overflow
                ));
                self.overflow = 0;
                self.overflow_since = None;
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_the_first_lines_then_one_summary_per_window() {
        let mut l = LogLimiter::default();
        let t0 = Instant::now();
        let logged = (0..100_000).filter(|_| l.admit("sensor_001", "signature", t0)).count();
        assert_eq!(logged, FULL_LINES as usize);
        // Another identity is unaffected.
        assert!(l.admit("sensor_002", "replay", t0));
        assert!(l.flush(t0 + WINDOW / 2).is_empty(), "no summary before the window ends");
        let lines = l.flush(t0 + WINDOW);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("rejected 99990 more"), "{}", lines[0]);
        assert!(lines[0].contains("identity=sensor_001"), "{}", lines[0]);
        // The next window starts afresh.
        assert!(l.admit("sensor_001", "signature", t0 + WINDOW));
        // A quiet identity gets no summary at all.
        assert!(l.flush(t0 + WINDOW * 3).is_empty());
    }

    #[test]
    fn many_identities_are_bounded_and_summarised_together() {
        let mut l = LogLimiter::default();
        let t0 = Instant::now();
        for i in 0..MAX_IDENTITIES {
            assert!(l.admit(&format!("d{i}"), "unknown_device", t0));
        }
        assert!(!l.admit("one-too-many", "unknown_device", t0));
        assert!(!l.admit("and-another", "unknown_device", t0));
        assert_eq!(l.bursts.len(), MAX_IDENTITIES);
        let lines = l.flush(t0 + WINDOW);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("rejected 2 more"), "{}", lines[0]);
        assert!(l.bursts.is_empty());
    }
}
