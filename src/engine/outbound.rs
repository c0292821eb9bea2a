//! One connection's outbound queue, its exact byte accounting, and the writes themselves.
//!
//! Producers (the Python thread's `send`, publishes, the connection task's automatic replies)
//! push frames. Whoever flushes (the asyncio loop thread at the end of a dispatch batch, or the
//! connection's task) writes under the queue's lock, so frames go out whole and in order from any
//! thread. Writing on the loop thread saves a task wake-up per reply: the reply leaves in the
//! same thread that produced it, as in a single-threaded server (benches/PROFILE.md, S2).
//! `buffered` counts bytes accepted but not yet handed to the kernel: it grows on push and
//! shrinks by exactly what each write returned.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::TcpStream;

use super::frame::OutFrame;

/// Frames with payloads up to this size are copied into one buffer and written with one
/// `write`: a vectored write of many small slices costs the kernel more than the copy.
const COALESCE_PAYLOAD: usize = 1024;
/// At most this much is copied for one write.
const COALESCE_BYTES: usize = 64 * 1024;

#[derive(Default)]
struct Queue {
    frames: Vec<OutFrame>,
    /// Bytes of `frames[0]` already written.
    written: usize,
    /// No more frames are accepted: a close frame was queued or the connection ended.
    sealed: bool,
    /// The socket, while the connection is up; the connection task detaches it before closing.
    socket: Option<Arc<TcpStream>>,
    /// The write side is shut down: everything up to the seal is written.
    shut_down: bool,
}

#[derive(Default)]
pub struct Outbound {
    queue: Mutex<Queue>,
    buffered: AtomicUsize,
    /// The kernel refused bytes, or the queue passed the high-water mark: sends report
    /// `Backpressured` until everything is written.
    congested: AtomicBool,
    corked: AtomicU32,
}

/// What [`Outbound::push`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    Refused,
    Queued,
    /// Queued into an empty, uncorked queue: a flush is due.
    First,
}

/// What [`Outbound::flush`] left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued is written.
    Done,
    /// Frames wait for `uncork`.
    Corked,
    /// The kernel's buffer is full: the rest waits for writability.
    Blocked,
    /// The socket is gone (closed or terminated): nothing will be written.
    Detached,
}

thread_local! {
    /// Scratch space for coalescing small frames; one per thread that flushes.
    static COALESCED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Outbound {
    pub fn attach(&self, socket: Arc<TcpStream>) {
        self.queue.lock().socket = Some(socket);
    }

    /// Stop writing from any thread; the caller (the connection task) closes the socket.
    pub fn detach(&self) -> Option<Arc<TcpStream>> {
        self.queue.lock().socket.take()
    }

    /// Queue `frame`. With `seal`, nothing is accepted after it.
    pub fn push(&self, frame: OutFrame, seal: bool) -> Pushed {
        let len = frame.wire_len();
        let mut q = self.queue.lock();
        if q.sealed {
            return Pushed::Refused;
        }
        q.sealed = seal;
        // Counted under the lock so a flush never subtracts bytes it was not told about.
        self.buffered.fetch_add(len, Ordering::Relaxed);
        let first = q.frames.is_empty();
        q.frames.push(frame);
        if first && (self.corked.load(Ordering::Acquire) == 0 || seal) {
            Pushed::First
        } else {
            Pushed::Queued
        }
    }

    /// Refuse every later frame.
    pub fn seal(&self) {
        self.queue.lock().sealed = true;
    }

    /// Write what is queued until it is all written or the kernel refuses more. Never blocks
    /// beyond the queue's lock, which is held only by another flush or a push.
    pub fn flush(&self) -> io::Result<Flushed> {
        let mut guard = self.queue.lock();
        let Queue {
            frames,
            written,
            sealed,
            socket,
            shut_down,
        } = &mut *guard;
        let Some(socket) = socket.as_deref() else {
            return Ok(Flushed::Detached);
        };
        let fin_due = *sealed && !*shut_down;
        if frames.is_empty() && !fin_due {
            return Ok(Flushed::Done);
        }
        if self.corked.load(Ordering::Acquire) > 0 && !*sealed {
            return Ok(Flushed::Corked);
        }
        while !frames.is_empty() {
            match write_some(socket, frames, *written) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.buffered.fetch_sub(n, Ordering::Relaxed);
                    *written = advance(frames, *written + n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.congested.store(true, Ordering::Relaxed);
                    return Ok(Flushed::Blocked);
                }
                Err(e) => return Err(e),
            }
        }
        // An idle connection keeps no queue allocation (benches S4); a busy one pays one
        // allocation per flush, small next to the write.
        *frames = Vec::new();
        if *sealed && !*shut_down {
            // The close frame (or the last frame before the end) is out: send FIN right away,
            // so a client waiting for the end of the stream sees it without waiting for its own
            // close frame to come back. The read side stays open for that frame.
            *shut_down = true;
            // SAFETY: the descriptor is open while `socket` is borrowed. A failure only means
            // the peer is already gone.
            unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) };
        }
        Ok(Flushed::Done)
    }

    pub fn is_empty(&self) -> bool {
        self.queue.lock().frames.is_empty()
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

    /// True when the last cork is released and frames are waiting.
    pub fn uncork(&self) -> bool {
        self.corked.fetch_sub(1, Ordering::AcqRel) == 1 && !self.is_empty()
    }
}

/// One write of the frames' next bytes: small frames copied into one buffer, a large frame
/// written from its own payload without a copy.
fn write_some(socket: &TcpStream, frames: &[OutFrame], written: usize) -> io::Result<usize> {
    let first = &frames[0];
    if first.payload().len() > COALESCE_PAYLOAD {
        let head = first.head();
        let slices = if written < head.len() {
            [
                IoSlice::new(&head[written..]),
                IoSlice::new(first.payload()),
            ]
        } else {
            [
                IoSlice::new(&first.payload()[written - head.len()..]),
                IoSlice::new(&[]),
            ]
        };
        return socket.try_write_vectored(&slices);
    }
    COALESCED.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        buf.clear();
        let mut skip = written;
        for frame in frames {
            if frame.payload().len() > COALESCE_PAYLOAD
                || buf.len() + frame.wire_len() > COALESCE_BYTES
            {
                break;
            }
            let head = frame.head();
            if skip < head.len() {
                buf.extend_from_slice(&head[skip..]);
                buf.extend_from_slice(frame.payload());
            } else {
                buf.extend_from_slice(&frame.payload()[skip - head.len()..]);
            }
            skip = 0;
        }
        socket.try_write(&buf)
    })
}

/// Drop the frames that `written` bytes (counted from the first frame's start) completed;
/// returns how much of the new first frame is written.
fn advance(frames: &mut Vec<OutFrame>, mut written: usize) -> usize {
    let done = frames
        .iter()
        .take_while(|frame| {
            let complete = written >= frame.wire_len();
            if complete {
                written -= frame.wire_len();
            }
            complete
        })
        .count();
    frames.drain(..done);
    written
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
    fn buffered_counts_wire_bytes_and_the_first_push_asks_for_a_flush() {
        let out = Outbound::default();
        assert_eq!(out.push(text("hello"), false), Pushed::First); // 2 + 5
        assert_eq!(out.push(text("hi"), false), Pushed::Queued); // 2 + 2
        assert_eq!(out.buffered(), 11);
        assert_eq!(out.flush().unwrap(), Flushed::Detached, "no socket yet");
        assert_eq!(out.buffered(), 11);
    }

    #[test]
    fn sealing_rejects_later_frames() {
        let out = Outbound::default();
        assert_eq!(out.push(text("a"), false), Pushed::First);
        assert_eq!(out.push(OutFrame::close(1000, ""), true), Pushed::Queued);
        assert_eq!(out.push(text("late"), false), Pushed::Refused);
    }

    #[test]
    fn a_corked_queue_asks_for_a_flush_only_when_uncorked() {
        let out = Outbound::default();
        out.cork();
        assert_eq!(out.push(text("a"), false), Pushed::Queued);
        assert!(out.uncork());
        out.cork();
        out.cork();
        assert!(!out.uncork(), "still corked once");
    }

    #[test]
    fn advance_drops_completed_frames_and_keeps_the_offset() {
        let mut frames = vec![text("abc"), text("de"), text("f")]; // 5, 4, 3 bytes
        assert_eq!(advance(&mut frames, 7), 2);
        assert_eq!(frames.len(), 2);
        assert_eq!(advance(&mut frames, 4), 0);
        assert_eq!(frames.len(), 1);
        assert_eq!(advance(&mut frames, 3), 0);
        assert!(frames.is_empty());
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
