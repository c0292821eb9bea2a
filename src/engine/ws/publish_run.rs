//! A run of publishes to one topic within a dispatch batch, queued to each subscriber once.
//!
//! A publish visits every subscriber: its queue's lock, its byte count, a range of the topic's
//! arena. A batch that publishes 32 messages to 1,000 subscribers made 32,000 such visits
//! where one per subscriber would do, since the arena already holds the 32 frames back to back
//! (uWS publishes in O(1) and visits each subscriber once per loop iteration). So the first
//! publish of a run is queued as any publish is, and notes what it found among the subscribers;
//! the publishes to the same topic that follow it only append their frame to the arena. The run
//! is delivered, each subscriber getting all its frames as one range, before anything else
//! touches a connection or a subscription: any send, close, subscribe, unsubscribe,
//! `buffered_amount` or `stats()`, a publish to another topic or one that cannot be deferred
//! (excluding its sender, compressed, or too large for the arena), and the end of the batch.
//! Every connection therefore gets its frames in the order they were sent and published.
//!
//! A publish returns its status at once. That of a deferred publish comes from what the run's
//! first publish found: it is dropped if a subscriber was no longer open or would now exceed
//! the backpressure limit, backpressured if one was congested or would now reach the
//! high-water mark, as the same publish queued at once would report. A subscriber for which the
//! run crosses either line gets the run frame by frame through the same checks as ever.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::batch::{self, FanOut};
use super::conn::{high_water_mark, Conn, ReadyState, SendStatus};
use crate::engine::pubsub::arena::ArenaRange;
use crate::engine::pubsub::topics::TopicRef;
use crate::engine::stats::{Counter, Stats};

/// A server's run not yet delivered: at most one, begun and extended by the thread dispatching a
/// batch, delivered by whichever thread first needs it done.
#[derive(Default)]
pub(crate) struct PendingRun {
    /// Whether `run` may hold one: what every send checks, so one load.
    pending: AtomicBool,
    /// Held while a run is extended or delivered.
    run: Mutex<Option<PublishRun>>,
}

thread_local! {
    /// Set while this thread delivers a run: its own sends must not wait for it.
    static DELIVERING: Cell<bool> = const { Cell::new(false) };
}

impl PendingRun {
    /// Deliver the run, if there is one.
    pub(crate) fn settle(&self, stats: &Stats) {
        if !self.pending.load(Ordering::Acquire) || DELIVERING.get() {
            return;
        }
        let mut run = self.run.lock();
        if let Some(run) = run.take() {
            DELIVERING.set(true);
            let _done = Delivered;
            run.deliver(stats);
        }
        self.pending.store(false, Ordering::Release);
    }

    /// Add a publish of `range` to the run if it is `topic`'s, and return its status. Otherwise
    /// deliver the run there is, which must go first, and return `None`.
    pub(crate) fn defer(
        &self,
        stats: &Stats,
        topic: &TopicRef<Arc<Conn>>,
        range: &ArenaRange,
        payload_len: usize,
    ) -> Option<SendStatus> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        if let Some(run) = self.run.lock().as_mut() {
            if run.is_for(topic) {
                if let Some(status) = run.defer(range, payload_len) {
                    return Some(status);
                }
            }
        }
        self.settle(stats);
        None
    }

    /// Make `run` the server's run. Another thread's batch may have begun one meanwhile: then
    /// that stays, and this one, which has nothing deferred yet, is dropped.
    pub(crate) fn start(&self, run: PublishRun) {
        let mut slot = self.run.lock();
        if slot.is_none() {
            *slot = Some(run);
            self.pending.store(true, Ordering::Release);
        }
    }
}

/// Clears `DELIVERING` when a delivery ends, or unwinds.
struct Delivered;

impl Drop for Delivered {
    fn drop(&mut self) {
        DELIVERING.set(false);
    }
}

/// What a run's first publish found among its subscribers, just after queuing its frame.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Found {
    /// A subscriber was not open (the publish was dropped for it).
    closed: bool,
    /// A subscriber was congested.
    congested: bool,
    /// The most bytes any subscriber had queued.
    max_buffered: usize,
    /// The most bytes queued for a subscriber whose last write the kernel refused: what the
    /// limit drops for.
    max_refused: usize,
    /// The most bytes queued for any other: past the limit, its queue is written first.
    max_unrefused: usize,
}

impl Found {
    /// Take one subscriber into account, as the first publish left it.
    pub(crate) fn add(&mut self, conn: &Conn) {
        if conn.is_terminated() {
            // Ended by this publish (over its limit): the run's later publishes skip it.
            return;
        }
        self.closed |= conn.ready_state() != ReadyState::Open;
        self.congested |= conn.out.is_congested();
        let buffered = conn.out.buffered();
        self.max_buffered = self.max_buffered.max(buffered);
        if conn.out.is_refused() {
            self.max_refused = self.max_refused.max(buffered);
        } else {
            self.max_unrefused = self.max_unrefused.max(buffered);
        }
    }
}

/// Publishes to one topic after the first of a run: their frames, and what their statuses
/// come from.
pub(crate) struct PublishRun {
    topic: TopicRef<Arc<Conn>>,
    found: Found,
    backpressure_limit: usize,
    /// The deferred publishes: each frame's range of the arena and its payload length.
    frames: Vec<(ArenaRange, usize)>,
    /// Their bytes on the wire, in all.
    bytes: usize,
}

impl PublishRun {
    pub(crate) fn new(topic: TopicRef<Arc<Conn>>, found: Found, backpressure_limit: usize) -> Self {
        Self {
            topic,
            found,
            backpressure_limit,
            frames: Vec::new(),
            bytes: 0,
        }
    }

    pub(crate) fn is_for(&self, topic: &TopicRef<Arc<Conn>>) -> bool {
        self.topic.is(topic)
    }

    /// Add one publish of `range` to the run; its status, as if queued to each now. `None`,
    /// adding nothing, when a subscriber would be over the limit with its queue not yet offered
    /// to the kernel: queued at once, the publish would have the queue written first, which a
    /// run cannot foresee, so the run is delivered and the publish queued as any other.
    pub(crate) fn defer(&mut self, range: &ArenaRange, payload_len: usize) -> Option<SendStatus> {
        let before = self.found.max_buffered + self.bytes;
        let limit = self.backpressure_limit;
        let over = |buffered: usize| limit > 0 && buffered + self.bytes > limit;
        if over(self.found.max_unrefused) {
            return None;
        }
        let dropped = over(self.found.max_refused);
        self.bytes += range.len();
        self.frames.push((range.clone(), payload_len));
        Some(if self.found.closed || dropped {
            SendStatus::Dropped
        } else if self.found.congested || before >= high_water_mark(limit) {
            SendStatus::Backpressured
        } else {
            SendStatus::Sent(payload_len)
        })
    }

    /// Queue the deferred frames to every subscriber, and count them as the publishes would have.
    fn deliver(self, stats: &Stats) {
        if self.frames.is_empty() {
            return;
        }
        let _fan_out = FanOut::begin();
        // Consecutive frames in one arena, as one range: what a subscriber below the lines gets.
        let mut whole: Vec<ArenaRange> = Vec::with_capacity(1);
        for (range, _) in &self.frames {
            if !whole.last_mut().is_some_and(|last| last.extend(range)) {
                whole.push(range.clone());
            }
        }
        let payload: u64 = self.frames.iter().map(|(_, len)| *len as u64).sum();
        let hwm = high_water_mark(self.backpressure_limit);
        let (mut delivered, mut bytes, mut backpressured, mut dropped) = (0u64, 0u64, 0u64, 0u64);
        self.topic.for_each(|_, conn| {
            if conn.is_terminated() {
                // Not a recipient (as in `Shared::publish_local`), nor a dropped delivery.
                return;
            }
            let open = conn.ready_state() == ReadyState::Open;
            if open && !conn.out.is_congested() && conn.out.buffered() + self.bytes < hwm {
                // No frame of the run can reach the high-water mark, so each would be Sent.
                for range in &whole {
                    conn.send_shared(range, 0);
                }
                delivered += self.frames.len() as u64;
                bytes += payload;
                return;
            }
            for (range, payload_len) in &self.frames {
                match conn.send_shared(range, *payload_len) {
                    SendStatus::Dropped => {
                        dropped += 1;
                        continue;
                    }
                    SendStatus::Backpressured => backpressured += 1,
                    SendStatus::Sent(_) => {}
                }
                delivered += 1;
                bytes += *payload_len as u64;
            }
        });
        batch::count_deliveries(delivered as usize);
        stats.add_all([
            (Counter::Deliveries, delivered),
            (Counter::MessagesOut, delivered),
            (Counter::BytesOut, bytes),
            (Counter::SendsBackpressured, backpressured),
            (Counter::SendsDropped, dropped),
        ]);
    }
}
