//! The server-wide cap on what clients can make the server hold: bytes of messages still
//! arriving and of messages waiting for Python (`max_incoming_bytes`).
//!
//! Each connection is capped on its own (`max_payload_length`, the in-flight caps), but a
//! thousand clients each dripping a large message stay under every one of those while together
//! holding gigabytes. Past the budget, connections holding at least [`PAUSE_FLOOR`] stop reading
//! (the kernel's buffers and then TCP flow control hold the rest, outside our memory) until the
//! total falls back under it; a paused connection's message deadline keeps running, so a
//! client that never finishes is closed with 1008 as it would be without the budget.
//! Connections holding less keep reading, so small messages (a chat, a heartbeat) still flow
//! while the big ones wait.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::conn::{signal, Conn};

/// Connections holding less than this keep reading when the budget is exceeded. One read
/// (64 KiB) may take a connection past it: the budget can be overrun by at most about twice
/// this per connection, against a whole message's size without the floor.
pub(crate) const PAUSE_FLOOR: usize = 64 * 1024;

/// At most one log line this often says that a connection stopped reading for the budget:
/// under sustained pressure connections pause and resume many times a second, and
/// `stats()["reads_paused"]` counts them all.
const PAUSE_LINE_EVERY: Duration = Duration::from_secs(60);

pub(crate) struct IncomingBudget {
    /// `usize::MAX` when there is no limit.
    limit: usize,
    held: AtomicUsize,
    /// The part of `held` that compressed messages hold which have all arrived and wait for
    /// room to be inflated. It does not count against their inflation (`inflate_room`): were
    /// those bytes alone over the limit, they would wait for ever for a release that only
    /// their inflation brings (24 clients with 59 KB each under a 1 MiB budget held their
    /// connections, dead ones included, until the server stopped).
    awaiting: AtomicUsize,
    /// Connections paused by the budget, resumed all at once when it frees up (each re-checks).
    waiting: Mutex<Vec<Weak<Conn>>>,
    any_waiting: AtomicBool,
    /// Bumped at each wake-up: a connection whose registration predates it registers again.
    generation: AtomicU64,
    started: Instant,
    /// When a pause was last logged: milliseconds since `started`, plus one; 0 before the first.
    pause_logged: AtomicU64,
}

impl IncomingBudget {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit: if limit == 0 { usize::MAX } else { limit },
            held: AtomicUsize::new(0),
            awaiting: AtomicUsize::new(0),
            waiting: Mutex::new(Vec::new()),
            any_waiting: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            started: Instant::now(),
            pause_logged: AtomicU64::new(0),
        }
    }

    /// The limit, in bytes (`usize::MAX` without one).
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Whether a connection that just stopped reading for the budget should be logged: the
    /// first pause, then the first a minute after the last one logged.
    pub(crate) fn pause_to_log(&self) -> bool {
        self.pause_to_log_at(self.started.elapsed())
    }

    fn pause_to_log_at(&self, since_start: Duration) -> bool {
        let now = since_start.as_millis() as u64 + 1;
        let last = self.pause_logged.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < PAUSE_LINE_EVERY.as_millis() as u64 {
            return false;
        }
        self.pause_logged
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether connections holding at least `holding` bytes should stop reading.
    pub(crate) fn pauses(&self, holding: usize) -> bool {
        holding >= PAUSE_FLOOR && self.held.load(Ordering::SeqCst) > self.limit
    }

    /// What may be inflated before the budget is exceeded, not counting the messages waiting
    /// to be inflated; `None` once it is. `Some(0)` (held exactly at the limit) still lets one
    /// message be inflated: as `wait` does, the limit itself is not over it, so a connection
    /// waiting to inflate is not paused then either.
    pub(crate) fn inflate_room(&self) -> Option<usize> {
        let held = self
            .held
            .load(Ordering::SeqCst)
            .saturating_sub(self.awaiting.load(Ordering::SeqCst));
        (held <= self.limit).then(|| self.limit - held)
    }

    /// Move a holder's bytes waiting to be inflated from `before` to `after` (both within
    /// what it holds).
    pub(crate) fn adjust_awaiting(&self, before: usize, after: usize) {
        if after > before {
            self.awaiting.fetch_add(after - before, Ordering::SeqCst);
            // Bytes that counted against inflation no longer do: a waiter may go on now.
            if self.any_waiting.load(Ordering::SeqCst) && self.inflate_room().is_some() {
                self.wake_all();
            }
        } else if before > after {
            self.awaiting.fetch_sub(before - after, Ordering::SeqCst);
        }
    }

    /// How much more may be held before the budget is exceeded (`usize::MAX` without one).
    pub(crate) fn headroom(&self) -> usize {
        self.limit.saturating_sub(self.held.load(Ordering::Relaxed))
    }

    /// Move a holder's count from `before` to `after` bytes.
    pub(crate) fn adjust(&self, before: usize, after: usize) {
        if after > before {
            self.held.fetch_add(after - before, Ordering::Relaxed);
        } else if before > after {
            self.release(before - after);
        }
    }

    pub(crate) fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        // SeqCst with `wait`'s store and load: either the waiter sees the lower total or this
        // sees the waiter, so no paused connection is forgotten. Saturating: a release of more
        // than is held is a bug of the accounting, and a total wrapped past 0 would pause every
        // large message's connection for good (reading nothing, answering bodies with 503) where
        // one too low only lets the budget be overrun by the difference.
        let before = self
            .held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                Some(held.saturating_sub(bytes))
            })
            .unwrap_or_else(|held| held);
        let now = before.saturating_sub(bytes);
        if self.any_waiting.load(Ordering::SeqCst)
            && (now <= self.limit || self.inflate_room().is_some())
        {
            self.wake_all();
        }
    }

    /// The generation a connection's registration is valid for.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Register `conn` to be resumed when the budget frees up (for a message waiting to be
    /// inflated, `to_inflate`: when `inflate_room` has some). Returns the generation it is
    /// registered in, or `None` when the budget freed up meanwhile and it may go on at once.
    pub(crate) fn wait(&self, conn: &Arc<Conn>, to_inflate: bool) -> Option<u64> {
        let generation = {
            let mut waiting = self.waiting.lock();
            waiting.push(Arc::downgrade(conn));
            self.any_waiting.store(true, Ordering::SeqCst);
            self.generation.load(Ordering::Acquire)
        };
        let freed = if to_inflate {
            self.inflate_room().is_some()
        } else {
            self.held.load(Ordering::SeqCst) <= self.limit
        };
        (!freed).then_some(generation)
    }

    fn wake_all(&self) {
        let waiting = {
            let mut waiting = self.waiting.lock();
            self.any_waiting.store(false, Ordering::SeqCst);
            self.generation.fetch_add(1, Ordering::AcqRel);
            std::mem::take(&mut *waiting)
        };
        for conn in waiting.iter().filter_map(Weak::upgrade) {
            conn.signal(signal::RESUME);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_holders_past_the_floor_pause_and_only_past_the_limit() {
        let budget = IncomingBudget::new(1 << 20);
        budget.adjust(0, 1 << 20);
        assert!(!budget.pauses(PAUSE_FLOOR), "at the limit, not past it");
        budget.adjust(0, 1);
        assert!(budget.pauses(PAUSE_FLOOR));
        assert!(!budget.pauses(PAUSE_FLOOR - 1));
        budget.release(1);
        assert!(!budget.pauses(usize::MAX));
        assert_eq!(budget.held(), 1 << 20);
    }

    #[test]
    fn bytes_waiting_to_be_inflated_count_against_reading_but_not_inflation() {
        let budget = IncomingBudget::new(1000);
        budget.adjust(0, 1500);
        budget.adjust_awaiting(0, 1400);
        assert!(budget.pauses(PAUSE_FLOOR), "they are held all the same");
        assert_eq!(budget.inflate_room(), Some(900));
        budget.adjust_awaiting(1400, 0);
        assert_eq!(budget.inflate_room(), None);
    }

    #[test]
    fn a_release_of_more_than_is_held_leaves_none_held() {
        let budget = IncomingBudget::new(1 << 20);
        budget.adjust(0, 100);
        budget.release(103);
        assert_eq!(budget.held(), 0);
        budget.adjust(0, PAUSE_FLOOR);
        assert!(!budget.pauses(PAUSE_FLOOR), "not wrapped past the limit");
    }

    #[test]
    fn a_pause_is_logged_at_most_once_a_minute() {
        let budget = IncomingBudget::new(1 << 20);
        let at = Duration::from_secs;
        assert!(budget.pause_to_log_at(at(0)), "the first");
        assert!(!budget.pause_to_log_at(at(1)));
        assert!(!budget.pause_to_log_at(at(59)));
        assert!(budget.pause_to_log_at(at(60)), "a minute later");
        assert!(!budget.pause_to_log_at(at(119)));
        assert!(budget.pause_to_log_at(at(300)));
    }

    #[test]
    fn no_limit_never_pauses() {
        let budget = IncomingBudget::new(0);
        budget.adjust(0, usize::MAX / 2);
        assert!(!budget.pauses(usize::MAX / 2));
    }
}
