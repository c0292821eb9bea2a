//! What the engine tells Python's `logging`, few enough lines that a flood of bad clients
//! cannot flood the log.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::engine::bridge::events::{LogKind, LOG_KINDS};

/// Lines of one kind per second before the rest are only counted.
pub(crate) const LINES_PER_SECOND: u32 = 10;

/// At most `LINES_PER_SECOND` lines of each kind per second: a flood of bad clients costs a
/// counter increment each. How many were left out is said by the next line of that kind, or,
/// if none comes, by a line of its own a second after the line that filled the second
/// (`Admitted::fills_second`, `take_left_out`): a flood that then stops is not left uncounted.
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

/// A line the limiter let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Admitted {
    /// Lines of its kind left out before it.
    pub(crate) left_out: u32,
    /// It is the last its second allows: the next ones are only counted.
    pub(crate) fills_second: bool,
}

impl LogLimiter {
    /// `Some` if a line of `kind` may be logged now; `None` if it is one too many this second.
    pub(crate) fn admit(&self, kind: LogKind) -> Option<Admitted> {
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
        let lines = window.lines.fetch_add(1, Ordering::AcqRel);
        if lines < LINES_PER_SECOND {
            Some(Admitted {
                left_out: window.left_out.swap(0, Ordering::AcqRel),
                fills_second: lines + 1 == LINES_PER_SECOND,
            })
        } else {
            window.left_out.fetch_add(1, Ordering::AcqRel);
            None
        }
    }

    /// The lines of `kind` left out since the last one logged, now said by a line of their own.
    pub(crate) fn take_left_out(&self, kind: usize) -> u32 {
        self.kinds
            .get(kind)
            .map_or(0, |window| window.left_out.swap(0, Ordering::AcqRel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_admits_ten_a_second_and_reports_what_it_left_out() {
        let limiter = LogLimiter::default();
        let left_out = |admitted: Option<Admitted>| admitted.map(|a| a.left_out);
        let admitted: Vec<_> = (0..25)
            .map(|_| limiter.admit(LogKind::IdleTimeout))
            .collect();
        assert_eq!(
            admitted[..10]
                .iter()
                .map(|a| left_out(*a))
                .collect::<Vec<_>>(),
            [Some(0); 10]
        );
        assert_eq!(
            admitted[..10]
                .iter()
                .map(|a| a.unwrap().fills_second)
                .collect::<Vec<_>>(),
            [[false; 9].as_slice(), &[true]].concat(),
            "the tenth fills the second"
        );
        assert_eq!(admitted[10..], [None; 15]);
        // Another kind has its own allowance.
        assert_eq!(left_out(limiter.admit(LogKind::ClientRefused)), Some(0));
        // A second later the next line carries the count of those left out.
        limiter.kinds[LogKind::IdleTimeout as usize]
            .second
            .fetch_sub(1, Ordering::AcqRel);
        assert_eq!(left_out(limiter.admit(LogKind::IdleTimeout)), Some(15));
        assert_eq!(left_out(limiter.admit(LogKind::IdleTimeout)), Some(0));
    }

    #[test]
    fn what_was_left_out_is_taken_once() {
        let left_out = |admitted: Option<Admitted>| admitted.map(|a| a.left_out);
        let limiter = LogLimiter::default();
        for _ in 0..13 {
            limiter.admit(LogKind::ClientRefused);
        }
        assert_eq!(limiter.take_left_out(LogKind::ClientRefused as usize), 3);
        assert_eq!(limiter.take_left_out(LogKind::ClientRefused as usize), 0);
        assert_eq!(limiter.take_left_out(LOG_KINDS), 0, "no such kind");
        limiter.kinds[LogKind::ClientRefused as usize]
            .second
            .fetch_sub(1, Ordering::AcqRel);
        assert_eq!(
            left_out(limiter.admit(LogKind::ClientRefused)),
            Some(0),
            "not twice"
        );
    }
}
