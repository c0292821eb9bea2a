//! What the engine tells Python's `logging`, few enough lines that a flood of bad clients
//! cannot flood the log.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::engine::bridge::events::{LogKind, LOG_KINDS};

/// Lines of one kind per second before the rest are only counted.
pub(crate) const LINES_PER_SECOND: u32 = 10;

/// At most `LINES_PER_SECOND` lines of each kind per second: a flood of bad clients costs a
/// counter increment each, and the next line of that kind says how many were left out.
pub(crate) struct LogLimiter {
    start: Instant,
    kinds: [KindWindow; LOG_KINDS],
}

#[derive(Default)]
struct KindWindow {
    /// The second (since `start`) the counts are for.
    second: AtomicU64,
    lines: AtomicU32,
    left_out: AtomicU32,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            kinds: Default::default(),
        }
    }
}

impl LogLimiter {
    /// `Some(n)` if a line of `kind` may be logged now, `n` being how many were left out
    /// before it; `None` if it is one too many this second.
    pub(crate) fn admit(&self, kind: LogKind) -> Option<u32> {
        let window = &self.kinds[kind as usize];
        let now = self.start.elapsed().as_secs();
        let second = window.second.load(Ordering::Acquire);
        if now != second
            && window
                .second
                .compare_exchange(second, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            window.lines.store(0, Ordering::Release);
        }
        if window.lines.fetch_add(1, Ordering::AcqRel) < LINES_PER_SECOND {
            Some(window.left_out.swap(0, Ordering::AcqRel))
        } else {
            window.left_out.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_admits_ten_a_second_and_reports_what_it_left_out() {
        let limiter = LogLimiter::default();
        let admitted: Vec<_> = (0..25)
            .map(|_| limiter.admit(LogKind::IdleTimeout))
            .collect();
        assert_eq!(admitted[..10], [Some(0); 10]);
        assert_eq!(admitted[10..], [None; 15]);
        // Another kind has its own allowance.
        assert_eq!(limiter.admit(LogKind::ClientRefused), Some(0));
        // A second later the next line carries the count of those left out.
        limiter.kinds[LogKind::IdleTimeout as usize]
            .second
            .fetch_sub(1, Ordering::AcqRel);
        assert_eq!(limiter.admit(LogKind::IdleTimeout), Some(15));
        assert_eq!(limiter.admit(LogKind::IdleTimeout), Some(0));
    }
}
