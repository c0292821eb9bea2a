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

use std::sync::Arc;

use super::batch::{self, FanOut};
use super::conn::{high_water_mark, Conn, ReadyState, SendStatus};
use crate::engine::pubsub::arena::ArenaRange;
use crate::engine::pubsub::topics::TopicRef;
use crate::engine::stats::Counter;

/// What a run's first publish found among its subscribers, just after queuing its frame.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Found {
    /// A subscriber was not open (the publish was dropped for it).
    pub(crate) closed: bool,
    /// A subscriber was congested.
    pub(crate) congested: bool,
    /// The most bytes any subscriber had queued.
    pub(crate) max_buffered: usize,
}

impl Found {
    /// Take one subscriber into account, as the first publish left it.
    pub(crate) fn add(&mut self, conn: &Conn) {
        self.closed |= conn.ready_state() != ReadyState::Open;
        self.congested |= conn.out.is_congested();
        self.max_buffered = self.max_buffered.max(conn.out.buffered());
    }
}

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

    /// Add one publish of `range` to the run; its status, as if queued to each now.
    pub(crate) fn defer(&mut self, range: ArenaRange, payload_len: usize) -> SendStatus {
        let before = self.found.max_buffered + self.bytes;
        self.bytes += range.len();
        self.frames.push((range, payload_len));
        let limit = self.backpressure_limit;
        if self.found.closed || (limit > 0 && before > limit) {
            SendStatus::Dropped
        } else if self.found.congested || before >= high_water_mark(limit) {
            SendStatus::Backpressured
        } else {
            SendStatus::Sent(payload_len)
        }
    }

    /// Queue the deferred frames to every subscriber, and count them as the publishes would have.
    pub(crate) fn deliver(self) {
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
        let hwm = high_water_mark(self.backpressure_limit);
        let mut below = 0u64;
        // Per frame, for the subscribers that got the run frame by frame.
        let mut queued = vec![0u64; self.frames.len()];
        let mut backpressured = vec![0u64; self.frames.len()];
        let mut dropped = vec![0u64; self.frames.len()];
        let mut shared = None;
        self.topic.for_each(|_, conn| {
            shared.get_or_insert_with(|| conn.shared.clone());
            let open = conn.ready_state() == ReadyState::Open;
            if open && !conn.out.is_congested() && conn.out.buffered() + self.bytes < hwm {
                // No frame of the run can reach the high-water mark, so each would be Sent.
                for range in &whole {
                    conn.send_shared(range, 0);
                }
                below += 1;
                return;
            }
            for (k, (range, payload_len)) in self.frames.iter().enumerate() {
                match conn.send_shared(range, *payload_len) {
                    SendStatus::Sent(_) => queued[k] += 1,
                    SendStatus::Backpressured => backpressured[k] += 1,
                    SendStatus::Dropped => dropped[k] += 1,
                }
            }
        });
        let Some(shared) = shared else { return };
        let (mut delivered, mut bytes) = (0u64, 0u64);
        for (k, (_, payload_len)) in self.frames.iter().enumerate() {
            let to = below + queued[k] + backpressured[k];
            delivered += to;
            bytes += to * *payload_len as u64;
        }
        batch::count_deliveries(delivered as usize);
        shared.stats.add_all([
            (Counter::Deliveries, delivered),
            (Counter::MessagesOut, delivered),
            (Counter::BytesOut, bytes),
            (Counter::SendsBackpressured, backpressured.iter().sum()),
            (Counter::SendsDropped, dropped.iter().sum()),
        ]);
    }
}
