//! The loop thread's send batch: while it dispatches a batch of events, what its handlers send
//! is written when the batch ends, once per connection, from the loop thread itself.

use std::cell::RefCell;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::conn::Conn;
use super::encode::OutFrame;
use crate::engine::pubsub::arena::{ArenaRange, ArenaWriter};

/// What one dispatch batch of the loop thread has sent.
#[derive(Default)]
struct SendBatch {
    /// Connections to flush when the batch ends.
    conns: Vec<Arc<Conn>>,
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
    let Some(batch) = SEND_BATCH.with(|b| b.borrow_mut().take()) else {
        return BatchWritten::default();
    };
    let written = BatchWritten {
        connections: batch.conns.len(),
        deliveries: batch.deliveries,
    };
    for conn in batch.conns {
        conn.flush_or_hand_over();
    }
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
            batch.conns.push(conn.clone());
            true
        }
        None => false,
    })
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
