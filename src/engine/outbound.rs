//! One connection's outbound queue and its exact byte accounting.
//!
//! Producers (the Python thread's `send`, publishes, the reader's automatic replies) push frames;
//! the connection's single writer takes the whole queue at once and writes it with one vectored
//! write. `buffered` counts bytes accepted but not yet handed to the kernel: it grows on push and
//! shrinks by exactly what each write returned.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::frame::OutFrame;

#[derive(Default)]
struct Queue {
    frames: Vec<OutFrame>,
    /// No more frames are accepted: a close frame was queued or the connection ended.
    sealed: bool,
}

#[derive(Default)]
pub struct Outbound {
    queue: Mutex<Queue>,
    buffered: AtomicUsize,
    /// The writer could not hand everything to the kernel and is waiting for writability.
    congested: AtomicBool,
    corked: AtomicU32,
    pub(crate) wake_writer: Arc<Notify>,
}

thread_local! {
    /// `Some` while this thread (the asyncio loop) dispatches a batch of events: writers are
    /// woken once at the end of the batch instead of as each handler sends, so a tokio worker
    /// sharing the core does not preempt the loop mid-batch (see benches/PROFILE.md).
    static DEFERRED_WRITERS: RefCell<Option<Vec<Arc<Notify>>>> = const { RefCell::new(None) };
}

fn wake_writer(notify: &Arc<Notify>) {
    let deferred = DEFERRED_WRITERS.with(|d| match d.borrow_mut().as_mut() {
        Some(writers) => {
            writers.push(notify.clone());
            true
        }
        None => false,
    });
    if !deferred {
        notify.notify_one();
    }
}

/// Defer writer wake-ups on this thread until [`end_send_batch`].
pub fn begin_send_batch() {
    end_send_batch();
    DEFERRED_WRITERS.with(|d| *d.borrow_mut() = Some(Vec::new()));
}

/// Wake every writer that was sent to since [`begin_send_batch`], and stop deferring.
pub fn end_send_batch() {
    let writers = DEFERRED_WRITERS.with(|d| d.borrow_mut().take());
    for notify in writers.into_iter().flatten() {
        notify.notify_one();
    }
}

/// What [`Outbound::take`] found.
pub enum Taken {
    Frames,
    Empty,
    /// Empty, and nothing more will come.
    Finished,
}

impl Outbound {
    /// Queue `frame`; false if the queue is sealed. With `seal`, nothing is accepted after it.
    pub fn push(&self, frame: OutFrame, seal: bool) -> bool {
        let len = frame.wire_len();
        let was_empty = {
            let mut q = self.queue.lock();
            if q.sealed {
                return false;
            }
            q.sealed = seal;
            // Counted under the lock so the writer never subtracts bytes it was not told about.
            self.buffered.fetch_add(len, Ordering::Relaxed);
            let was_empty = q.frames.is_empty();
            q.frames.push(frame);
            was_empty
        };
        // Only the first frame of a batch wakes the writer; it takes the whole queue anyway.
        if (was_empty || seal) && self.corked.load(Ordering::Acquire) == 0 {
            wake_writer(&self.wake_writer);
        }
        true
    }

    /// Refuse every later frame, and wake the writer so it can finish.
    pub fn seal(&self) {
        self.queue.lock().sealed = true;
        self.wake_writer.notify_one();
    }

    /// Swap the queued frames into `batch` (which must be empty). Nothing is taken while corked.
    pub fn take(&self, batch: &mut Vec<OutFrame>) -> Taken {
        let mut q = self.queue.lock();
        if q.frames.is_empty() {
            return if q.sealed {
                Taken::Finished
            } else {
                Taken::Empty
            };
        }
        if self.corked.load(Ordering::Acquire) > 0 && !q.sealed {
            return Taken::Empty;
        }
        std::mem::swap(&mut q.frames, batch);
        Taken::Frames
    }

    pub fn is_empty(&self) -> bool {
        self.queue.lock().frames.is_empty()
    }

    /// The writer handed `n` bytes to the kernel.
    pub fn wrote(&self, n: usize) {
        self.buffered.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    pub fn is_congested(&self) -> bool {
        self.congested.load(Ordering::Relaxed)
    }

    pub fn set_congested(&self) {
        self.congested.store(true, Ordering::Relaxed);
    }

    /// Clear congestion once everything is written; true if it was congested (drain is due).
    pub fn clear_congested(&self) -> bool {
        self.congested.swap(false, Ordering::Relaxed)
    }

    pub fn cork(&self) {
        self.corked.fetch_add(1, Ordering::AcqRel);
    }

    pub fn uncork(&self) {
        if self.corked.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake_writer.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::frame::{OutFrame, OP_TEXT};
    use bytes::Bytes;

    fn text(s: &'static str) -> OutFrame {
        OutFrame::new(OP_TEXT, Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn buffered_counts_wire_bytes_until_written() {
        let out = Outbound::default();
        assert!(out.push(text("hello"), false)); // 2 + 5
        assert!(out.push(text("hi"), false)); // 2 + 2
        assert_eq!(out.buffered(), 11);
        let mut batch = Vec::new();
        assert!(matches!(out.take(&mut batch), Taken::Frames));
        assert_eq!(batch.len(), 2);
        assert_eq!(out.buffered(), 11, "taken is not yet written");
        out.wrote(7);
        assert_eq!(out.buffered(), 4);
        out.wrote(4);
        assert_eq!(out.buffered(), 0);
    }

    #[test]
    fn sealing_rejects_later_frames_but_keeps_queued_ones() {
        let out = Outbound::default();
        assert!(out.push(text("a"), false));
        assert!(out.push(OutFrame::close(1000, ""), true));
        assert!(!out.push(text("late"), false));
        let mut batch = Vec::new();
        assert!(matches!(out.take(&mut batch), Taken::Frames));
        assert_eq!(batch.len(), 2);
        batch.clear();
        assert!(matches!(out.take(&mut batch), Taken::Finished));
    }

    #[test]
    fn cork_holds_frames_until_uncorked() {
        let out = Outbound::default();
        out.cork();
        out.push(text("a"), false);
        out.push(text("b"), false);
        let mut batch = Vec::new();
        assert!(matches!(out.take(&mut batch), Taken::Empty));
        out.uncork();
        assert!(matches!(out.take(&mut batch), Taken::Frames));
        assert_eq!(batch.len(), 2);
    }

    #[test]
    fn a_send_batch_wakes_each_writer_once_at_its_end() {
        let out = Outbound::default();
        begin_send_batch();
        out.push(text("a"), false);
        let waiter = out.wake_writer.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let woken = |rt: &tokio::runtime::Runtime| {
            rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_millis(50), waiter.notified())
                    .await
                    .is_ok()
            })
        };
        assert!(!woken(&rt), "deferred during the batch");
        end_send_batch();
        assert!(woken(&rt), "woken when the batch ends");
    }

    #[test]
    fn congestion_clears_once() {
        let out = Outbound::default();
        assert!(!out.clear_congested());
        out.set_congested();
        assert!(out.is_congested());
        assert!(out.clear_congested());
        assert!(!out.clear_congested());
    }
}
