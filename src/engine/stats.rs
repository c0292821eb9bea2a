//! Counters a server keeps for `srv.stats()`.
//!
//! Counting must cost the hot path next to nothing: each thread that counts gets a shard of its
//! own (a cache line per shard), which it updates with a plain load and store instead of a locked
//! read-modify-write, and nobody else writes. `stats()` adds the shards up. Threads past the
//! first `EXCLUSIVE_SHARDS` share the last shard, atomically. The counters are updated once
//! per send, and once per publish for all its recipients together (`Shared::publish`), though
//! what they count is per recipient.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use rustc_hash::FxHashMap;

/// What is counted. The names are the keys of `srv.stats()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    ConnectionsOpened,
    ConnectionsClosed,
    MessagesIn,
    BytesIn,
    MessagesOut,
    BytesOut,
    Publishes,
    Deliveries,
    SendsBackpressured,
    SendsDropped,
    HandshakesRejected,
    RequestsRejected,
    /// HTTP connections dropped because the client read none of a response for
    /// `handshake_timeout`.
    ResponsesStalled,
    /// Publishes handed to Redis for the other processes.
    RedisPublished,
    /// Publishes the other processes never got: Redis was down, the broker's queue was full,
    /// or the write to Redis failed.
    RedisPublishesLost,
    /// Messages from other processes received through Redis (and fanned out here).
    RedisReceived,
    /// Messages from other processes that Redis delivered and this process dropped: 64 MiB of
    /// them already waited for the fan-out (`broker/`).
    RedisReceivedLost,
    /// TLS connections that sent something but never finished their handshake: not TLS, a
    /// handshake rustls refused, or one not done within `handshake_timeout`.
    TlsHandshakesFailed,
    /// Times a connection stopped reading because incoming messages held more than
    /// `max_incoming_bytes` (`ws/budget.rs`).
    ReadsPaused,
}

impl Counter {
    pub const ALL: [Counter; 19] = [
        Counter::ConnectionsOpened,
        Counter::ConnectionsClosed,
        Counter::MessagesIn,
        Counter::BytesIn,
        Counter::MessagesOut,
        Counter::BytesOut,
        Counter::Publishes,
        Counter::Deliveries,
        Counter::SendsBackpressured,
        Counter::SendsDropped,
        Counter::HandshakesRejected,
        Counter::RequestsRejected,
        Counter::ResponsesStalled,
        Counter::RedisPublished,
        Counter::RedisPublishesLost,
        Counter::RedisReceived,
        Counter::RedisReceivedLost,
        Counter::TlsHandshakesFailed,
        Counter::ReadsPaused,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::ConnectionsOpened => "connections_opened",
            Counter::ConnectionsClosed => "connections_closed",
            Counter::MessagesIn => "messages_in",
            Counter::BytesIn => "bytes_in",
            Counter::MessagesOut => "messages_out",
            Counter::BytesOut => "bytes_out",
            Counter::Publishes => "publishes",
            Counter::Deliveries => "deliveries",
            Counter::SendsBackpressured => "sends_backpressured",
            Counter::SendsDropped => "sends_dropped",
            Counter::HandshakesRejected => "handshakes_rejected",
            Counter::RequestsRejected => "requests_rejected",
            Counter::ResponsesStalled => "responses_stalled",
            Counter::RedisPublished => "redis_published",
            Counter::RedisPublishesLost => "redis_publishes_lost",
            Counter::RedisReceived => "redis_received",
            Counter::RedisReceivedLost => "redis_received_lost",
            Counter::TlsHandshakesFailed => "tls_handshakes_failed",
            Counter::ReadsPaused => "reads_paused",
        }
    }
}

const COUNTERS: usize = Counter::ALL.len();
/// Threads with a shard of their own: the tokio workers, the loop thread and a few more.
const EXCLUSIVE_SHARDS: usize = 31;

#[derive(Default)]
#[repr(align(128))]
struct Shard([AtomicU64; COUNTERS]);

thread_local! {
    /// This thread's shard index, the same in every server; `usize::MAX` until first used.
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn shard_index() -> usize {
    SHARD.with(|shard| {
        let index = shard.get();
        if index != usize::MAX {
            return index;
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let index = NEXT.fetch_add(1, Ordering::Relaxed).min(EXCLUSIVE_SHARDS);
        shard.set(index);
        index
    })
}

pub(crate) struct Stats {
    shards: Box<[Shard]>,
    /// Connections closed, by the code `on_close` got. Once per connection: a lock is fine.
    closes: Mutex<FxHashMap<u16, u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            shards: (0..=EXCLUSIVE_SHARDS).map(|_| Shard::default()).collect(),
            closes: Mutex::new(FxHashMap::default()),
        }
    }
}

impl Stats {
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        self.add_all([(counter, n)]);
    }

    /// Several counters with one look-up of the thread's shard: a send or a read counts two or
    /// three, and in the extension the thread-local is a call (`__tls_get_addr`) each time.
    #[inline]
    pub(crate) fn add_all<const N: usize>(&self, counts: [(Counter, u64); N]) {
        let index = shard_index();
        let shard = &self.shards[index].0;
        for (counter, n) in counts {
            let cell = &shard[counter as usize];
            if index < EXCLUSIVE_SHARDS {
                // Only this thread writes this shard: no locked instruction needed.
                cell.store(cell.load(Ordering::Relaxed) + n, Ordering::Relaxed);
            } else {
                cell.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn closed(&self, code: u16) {
        self.add(Counter::ConnectionsClosed, 1);
        *self.closes.lock().entry(code).or_default() += 1;
    }

    pub(crate) fn get(&self, counter: Counter) -> u64 {
        self.shards
            .iter()
            .map(|shard| shard.0[counter as usize].load(Ordering::Relaxed))
            .sum()
    }

    /// `(code, count)` for every close code seen, in code order.
    pub(crate) fn closes_by_code(&self) -> Vec<(u16, u64)> {
        let mut closes: Vec<_> = self.closes.lock().iter().map(|(&c, &n)| (c, n)).collect();
        closes.sort_unstable();
        closes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up() {
        let stats = std::sync::Arc::new(Stats::default());
        let threads: Vec<_> = (0..40)
            .map(|_| {
                let stats = stats.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        stats.add(Counter::MessagesIn, 1);
                        stats.add(Counter::BytesIn, 3);
                        stats.add_all([(Counter::MessagesOut, 1), (Counter::BytesOut, 5)]);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(stats.get(Counter::MessagesIn), 40_000);
        assert_eq!(stats.get(Counter::BytesIn), 120_000);
        assert_eq!(stats.get(Counter::MessagesOut), 40_000);
        assert_eq!(stats.get(Counter::BytesOut), 200_000);
        stats.closed(1000);
        stats.closed(1006);
        stats.closed(1000);
        assert_eq!(stats.closes_by_code(), vec![(1000, 2), (1006, 1)]);
        assert_eq!(stats.get(Counter::ConnectionsClosed), 3);
    }
}
