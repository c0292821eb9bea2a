//! The loop thread's send batch: while it dispatches a batch of events, what its handlers send
//! is written when the batch ends, once per connection, from the loop thread itself.
//!
//! Replies go out before fan-out: the connections a handler sent to directly are written first,
//! then those a publish reached. A batch's publishes can reach hundreds of connections, whose
//! writes take milliseconds; a reply written after them comes back as the client's next request
//! only once the next batch has begun, and waits for the one after (S8's subscribe requests:
//! two batches per answer instead of one). Each connection is still written once, with all of
//! its queue in order, so no connection's messages change order.

use std::cell::RefCell;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::conn::Conn;
use super::encode::OutFrame;
use super::shared::Shared;
use crate::engine::platform::{visit_ahead, Prefetch};
use crate::engine::pubsub::arena::{ArenaRange, ArenaWriter};

/// What one dispatch batch of the loop thread has sent.
#[derive(Default)]
struct SendBatch {
    /// Connections first sent to by a handler directly: flushed first when the batch ends.
    replies: Vec<Arc<Conn>>,
    /// Connections first reached by a publish: flushed after the replies.
    fan_out: Vec<Arc<Conn>>,
    /// Set while a publish queues its frame to the topic's subscribers.
    publishing: bool,
    /// The servers that began a run of publishes in this batch (`publish_run.rs`): delivered
    /// before the batch's writes.
    runs: Vec<Arc<Shared>>,
    /// Each topic's published frames of this batch, encoded once (`pubsub/arena.rs`).
    arenas: FxHashMap<Box<str>, ArenaWriter>,
    /// Publish deliveries queued in this batch, over all its publishes.
    deliveries: usize,
}

/// What a send batch wrote: the connections, and the publish deliveries among their frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchWritten {
    pub connections: usize,
    pub deliveries: usize,
}

thread_local! {
    /// `Some` while this thread (the asyncio loop) dispatches a batch of events: connections sent
    /// to are flushed once, on this thread, when the batch ends, so a batch of replies is one
    /// write per connection and needs no tokio task to wake.
    static SEND_BATCH: RefCell<Option<SendBatch>> = const { RefCell::new(None) };
}

/// Defer flushes on this thread until [`end_send_batch`].
pub fn begin_send_batch() {
    let _ = end_send_batch();
    SEND_BATCH.with(|b| *b.borrow_mut() = Some(SendBatch::default()));
}

/// Flush every connection sent to since [`begin_send_batch`], and stop deferring; returns what
/// that was (the loop holds its next batch after a fan-out of several messages per connection).
pub fn end_send_batch() -> BatchWritten {
    // The batch's runs are delivered while it is still open, so their recipients are flushed
    // below with the rest.
    let runs = SEND_BATCH.with(|b| {
        b.borrow_mut()
            .as_mut()
            .map(|batch| std::mem::take(&mut batch.runs))
    });
    for shared in runs.into_iter().flatten() {
        shared.settle_publishes();
    }
    let Some(batch) = SEND_BATCH.with(|b| b.borrow_mut().take()) else {
        return BatchWritten::default();
    };
    let written = BatchWritten {
        connections: batch.replies.len() + batch.fan_out.len(),
        deliveries: batch.deliveries,
    };
    // Each connection's lines are cold after the kernel's work for the one before (three cache
    // misses made most of `Conn::flush`'s own time), so they are asked for ahead.
    visit_ahead(
        batch.replies.into_iter().chain(batch.fan_out),
        |conn| conn.prefetch(),
        |conn| conn.out.prefetch_targets(),
        |conn| conn.flush_or_hand_over(),
    );
    written
}

/// Count `n` publish deliveries into the current batch; nothing outside one.
pub(crate) fn count_deliveries(n: usize) {
    SEND_BATCH.with(|b| {
        if let Some(batch) = b.borrow_mut().as_mut() {
            batch.deliveries += n;
        }
    });
}

/// Have `conn` flushed when the current batch ends; false outside a batch.
pub(crate) fn flush_at_end(conn: &Arc<Conn>) -> bool {
    SEND_BATCH.with(|b| match b.borrow_mut().as_mut() {
        Some(batch) => {
            if batch.publishing {
                batch.fan_out.push(conn.clone());
            } else {
                batch.replies.push(conn.clone());
            }
            true
        }
        None => false,
    })
}

/// While alive, the connections a publish is the first to send to are flushed after the batch's
/// replies. Dropped at the end of the publish, or as it unwinds.
pub(crate) struct FanOut(());

impl FanOut {
    pub(crate) fn begin() -> FanOut {
        set_publishing(true);
        FanOut(())
    }
}

impl Drop for FanOut {
    fn drop(&mut self) {
        set_publishing(false);
    }
}

fn set_publishing(publishing: bool) {
    SEND_BATCH.with(|b| {
        if let Some(batch) = b.borrow_mut().as_mut() {
            batch.publishing = publishing;
        }
    });
}

/// Have `shared`'s run delivered before this batch's writes; nothing outside a batch.
pub(crate) fn run_started(shared: Arc<Shared>) {
    SEND_BATCH.with(|b| {
        if let Some(batch) = b.borrow_mut().as_mut() {
            if !batch.runs.iter().any(|s| Arc::ptr_eq(s, &shared)) {
                batch.runs.push(shared);
            }
        }
    });
}

/// Append `frame` to `topic`'s arena of the current batch and return its range there. `None`
/// outside a batch.
pub(crate) fn append_to_batch(topic: &str, frame: &OutFrame) -> Option<ArenaRange> {
    SEND_BATCH.with(|b| {
        let mut batch = b.borrow_mut();
        let batch = batch.as_mut()?;
        let writer = match batch.arenas.get_mut(topic) {
            Some(writer) => writer,
            None => batch.arenas.entry(topic.into()).or_default(),
        };
        Some(writer.append(&[frame.head(), frame.payload()]))
    })
}
