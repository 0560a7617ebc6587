//! What all sessions' inspection may use together: the bytes of long
//! statements held in memory while they are judged, and the threads that
//! read long statement text with PostgreSQL's parser.
//!
//! A session that would go past the byte budget has that one statement
//! refused (SQLSTATE 53000); a session whose long statement waits for a
//! parser thread waits alone, its worker keeps running everyone else.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Semaphore;

/// Bytes of held statements across all sessions, beyond each session's
/// ordinary 16 KiB buffer.
pub const HOLD_BUDGET: usize = 256 * 1024 * 1024;

/// Statement text up to this length is parsed where it arrives (well
/// under a millisecond); longer text is parsed on a blocking thread.
pub const INLINE_PARSE_LIMIT: usize = 64 * 1024;

/// Long texts parsed at once; the others wait their turn.
pub const PARSER_THREADS: usize = 2;

/// Shared by every session of the process.
#[derive(Debug)]
pub struct Limits {
    pub hold: HoldBudget,
    pub parsers: Arc<Semaphore>,
    /// Long texts parsed off the event loop (for metrics and tests).
    pub off_loop_parses: AtomicU64,
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(HOLD_BUDGET)
    }
}

impl Limits {
    pub fn new(hold_bytes: usize) -> Self {
        Self {
            hold: HoldBudget::new(hold_bytes),
            parsers: Arc::new(Semaphore::new(PARSER_THREADS)),
            off_loop_parses: AtomicU64::new(0),
        }
    }
}

/// A byte budget taken and given back by the sessions' gates.
#[derive(Debug)]
pub struct HoldBudget {
    limit: usize,
    used: AtomicUsize,
    /// Statements refused because the budget was spent.
    pub refused: AtomicU64,
}

impl HoldBudget {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Takes `n` bytes if they are free.
    pub fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    /// Gives back bytes taken with [`HoldBudget::try_take`].
    pub fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_never_goes_past_its_limit() {
        let b = HoldBudget::new(100);
        assert!(b.try_take(60));
        assert!(!b.try_take(41));
        assert!(b.try_take(40));
        assert_eq!(b.used(), 100);
        b.give(60);
        assert!(b.try_take(50));
        assert!(!b.try_take(usize::MAX));
        assert_eq!(b.used(), 90);
    }
}
