//! Log lines that a stranger can cause, at a bounded rate. A flood of
//! cancel requests with made-up keys, or of connections that never finish
//! their handshake, must not fill the disk or hide the lines that matter:
//! the first such event in each interval is logged, the others are
//! counted and their number is told with the next line.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One kind of event, logged at most once per `every`.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event is to be logged, `n` being how many of
    /// its kind were not since the last one logged; `None` to stay quiet.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(t) if now.saturating_duration_since(t) < self.every => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_rest_counted() {
        let t = Throttle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(t.admit(t0), Some(0));
        let quiet = (1..=1000)
            .filter(|i| t.admit(t0 + Duration::from_micros(*i)).is_some())
            .count();
        assert_eq!(quiet, 0);
        assert_eq!(t.admit(t0 + Duration::from_millis(1500)), Some(1000));
        assert_eq!(t.admit(t0 + Duration::from_millis(1600)), None);
        assert_eq!(t.admit(t0 + Duration::from_millis(2600)), Some(1));
    }
}
