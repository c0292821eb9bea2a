//! One connection's outbound queue, its exact byte accounting, and the writes themselves.
//!
//! Producers (the Python thread's `send`, publishes, the connection task's automatic replies)
//! push frames. Whoever flushes (the asyncio loop thread at the end of a dispatch batch, or the
//! connection's task) writes under the queue's lock, so frames go out whole and in order from any
//! thread. Writing on the loop thread saves a task wake-up per reply: the reply leaves in the
//! same thread that produced it, as in a single-threaded server.
//! `buffered` counts bytes accepted but not yet handed to the kernel: it grows on push and
//! shrinks by exactly what each write returned.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use bytes::Bytes;

use super::encode::{encode_head, OutFrame};
use crate::engine::net::Stream;
use crate::engine::platform::{prefetch, prefetch_all};
use crate::engine::pubsub::arena::ArenaRange;

/// Frames with payloads up to this size are copied into the queue's byte buffer as they are
/// queued, as uWS corks them: a queued small frame is then a `memcpy`, with no refcount to take
/// and drop per recipient, and a batch of them is one `send` with no gathering.
pub const INLINE_PAYLOAD: usize = 1024;
/// A flush that wrote at most this much was not part of a burst: the queue's allocations go
/// back to the allocator, but for one chunk's slot, so an idle connection holds one slot (what
/// its usual flush, one chunk, needs: no allocation and free per message; S3 with one message
/// outstanding spent 2.5% of its CPU in them).
const KEEP_BUFFERS_AFTER: usize = 256;
/// Most pieces one gathering write takes (Linux allows 1024).
const MAX_IOVECS: usize = 64;
/// First capacity of a connection's byte buffer.
const INLINE_START: usize = 512;
/// The most a byte buffer is sized for up front, from the previous burst.
const INLINE_HINT_MAX: usize = 64 * 1024;

/// A run of the outbound stream.
enum Chunk {
    /// Small frames, encoded back to back.
    Inline(Vec<u8>),
    /// A large frame, written from its shared payload.
    Frame(OutFrame),
    /// Published frames, encoded once for every subscriber.
    Shared(ArenaRange),
}

impl Chunk {
    /// The bytes to write, in order (a large frame's head and its shared payload apart).
    fn parts(&self) -> impl Iterator<Item = &[u8]> {
        let (first, second): (&[u8], &[u8]) = match self {
            Chunk::Inline(bytes) => (bytes, &[]),
            Chunk::Shared(range) => (range.bytes(), &[]),
            Chunk::Frame(frame) => (frame.head(), frame.payload()),
        };
        [first, second].into_iter().filter(|part| !part.is_empty())
    }

    fn len(&self) -> usize {
        match self {
            Chunk::Inline(bytes) => bytes.len(),
            Chunk::Frame(frame) => frame.wire_len(),
            Chunk::Shared(range) => range.len(),
        }
    }
}

#[derive(Default)]
struct Queue {
    /// A deque: a slow reader can have thousands of chunks queued, and each flush pops the
    /// written ones off the front.
    chunks: VecDeque<Chunk>,
    /// Bytes of `chunks[0]` already written.
    written: usize,
    /// How much the last burst wrote: the next byte buffer starts that large, so a steady
    /// stream of bursts allocates once per burst instead of growing each time.
    inline_hint: u32,
    /// No more frames are accepted: a close frame was queued or the connection ended.
    sealed: bool,
    /// The socket, while the connection is up; the connection task detaches it before closing.
    socket: Option<Arc<Stream>>,
    /// The connection is over (`seal`, not a close frame's push): once everything is written,
    /// the write side shuts (FIN).
    ending: bool,
    /// The write side is shut down: everything up to the seal is written.
    shut_down: bool,
}

impl Queue {
    /// The byte buffer at the end of the queue, for the next small frame.
    fn inline_tail(&mut self) -> &mut Vec<u8> {
        if !matches!(self.chunks.back(), Some(Chunk::Inline(_))) {
            let capacity = (self.inline_hint as usize).max(INLINE_START);
            self.chunks
                .push_back(Chunk::Inline(Vec::with_capacity(capacity)));
        }
        match self.chunks.back_mut() {
            Some(Chunk::Inline(bytes)) => bytes,
            _ => unreachable!("pushed above"),
        }
    }
}

#[derive(Default)]
pub(crate) struct Outbound {
    queue: Mutex<Queue>,
    buffered: AtomicUsize,
    /// The kernel refused bytes, or the queue passed the high-water mark: sends report
    /// `Backpressured` until everything is written.
    congested: AtomicBool,
    /// The kernel refused bytes at the last write: the connection task waits for writability,
    /// and another write before then would only be refused too.
    refused: AtomicBool,
    /// A send was dropped over the backpressure limit since the queue was last congestion-free:
    /// the drop is logged once per such episode, not once per message.
    dropping: AtomicBool,
    /// Bumped (wrapping) at each write the kernel took bytes of: its client reads, however
    /// slowly. The connection task compares it with what it last saw, for its automatic replies
    /// (`writes`) and for a client that reads nothing (`write_progress`). Only written under the
    /// queue's lock, so a load and a store, not a locked add.
    writes: AtomicU32,
    corked: AtomicU32,
    /// Where the socket and the first queued chunk are, for `prefetch_targets` to read without
    /// the lock. Hints only: stale or dangling, they cost a wasted prefetch, nothing more.
    socket_at: AtomicPtr<Stream>,
    front_at: AtomicPtr<Chunk>,
}

/// What [`Outbound::push`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    Refused,
    Queued,
    /// Queued into an empty, uncorked queue: a flush is due.
    First,
}

/// What [`Outbound::flush`] left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Everything queued is written.
    Done,
    /// Frames wait for `uncork`.
    Corked,
    /// The kernel's buffer is full: the rest waits for writability.
    Blocked,
    /// The socket is gone (closed or terminated): nothing will be written.
    Detached,
}

impl Outbound {
    pub(crate) fn attach(&self, socket: Arc<Stream>) {
        self.socket_at
            .store(Arc::as_ptr(&socket).cast_mut(), Ordering::Relaxed);
        self.queue.lock().socket = Some(socket);
    }

    /// Prefetch the queue's own lines (its lock, its fields and the hints).
    pub(crate) fn prefetch(&self) {
        prefetch_all(self);
    }

    /// Prefetch what a flush reads behind the queue's lines: the socket and the first chunk.
    /// Best after `prefetch` has had time to bring those lines in.
    pub(crate) fn prefetch_targets(&self) {
        prefetch(self.socket_at.load(Ordering::Relaxed));
        prefetch(self.front_at.load(Ordering::Relaxed));
    }

    /// Keep `front_at` current; called under the lock after the chunks change.
    fn note_front(&self, q: &Queue) {
        let front = q
            .chunks
            .front()
            .map_or(std::ptr::null(), |c| c as *const Chunk);
        self.front_at.store(front.cast_mut(), Ordering::Relaxed);
    }

    /// Stop writing from any thread; the caller (the connection task) closes the socket.
    /// Nothing will write what is still queued: it is freed now, not when the application lets
    /// go of its `WebSocket`, and counted out of `buffered`, so `buffered_amount` reads 0 once
    /// the connection has ended (as Bun's `bufferedAmount` does) and a loop waiting for it to
    /// drain ends.
    pub(crate) fn detach(&self) -> Option<Arc<Stream>> {
        self.socket_at
            .store(std::ptr::null_mut(), Ordering::Relaxed);
        let (socket, chunks) = {
            let mut q = self.queue.lock();
            q.written = 0;
            self.buffered.store(0, Ordering::Relaxed);
            let chunks = std::mem::take(&mut q.chunks);
            self.note_front(&q);
            (q.socket.take(), chunks)
        };
        // Freed outside the lock: up to a backpressure limit's worth of chunks.
        drop(chunks);
        socket
    }

    /// Queue `frame` (a refcount for a large one, a copy for a small one). With `seal`,
    /// nothing is accepted after it.
    pub(crate) fn push(&self, frame: &OutFrame, seal: bool) -> Pushed {
        if frame.payload().len() <= INLINE_PAYLOAD {
            return self.push_with(frame.wire_len(), seal, |q| {
                let bytes = q.inline_tail();
                bytes.extend_from_slice(frame.head());
                bytes.extend_from_slice(frame.payload());
            });
        }
        self.push_with(frame.wire_len(), seal, |q| {
            q.chunks.push_back(Chunk::Frame(frame.clone()))
        })
    }

    /// Queue a final frame with `opcode` and `payload`, copying the payload.
    pub(crate) fn push_payload(&self, opcode: u8, payload: &[u8], seal: bool) -> Pushed {
        if payload.len() > INLINE_PAYLOAD {
            let frame = OutFrame::new(opcode, Bytes::copy_from_slice(payload));
            return self.push(&frame, seal);
        }
        let (head, head_len) = encode_head(opcode, payload.len());
        self.push_with(head_len + payload.len(), seal, |q| {
            let bytes = q.inline_tail();
            bytes.extend_from_slice(&head[..head_len]);
            bytes.extend_from_slice(payload);
        })
    }

    /// Queue `range`; extends the last queued range when this one follows it.
    ///
    /// A congested queue gets a copy instead: a range keeps its whole arena alive, and a slow
    /// reader must not keep a batch's arena (much larger than its share) for as long as it
    /// does not read. See also `unshare`.
    pub(crate) fn push_shared(&self, range: &ArenaRange) -> Pushed {
        let congested = self.is_congested();
        self.push_with(range.len(), false, |q| {
            if congested {
                q.inline_tail().extend_from_slice(range.bytes());
                return;
            }
            if let Some(Chunk::Shared(last)) = q.chunks.back_mut() {
                if last.extend(range) {
                    return;
                }
            }
            q.chunks.push_back(Chunk::Shared(range.clone()));
        })
    }

    fn push_with(&self, len: usize, seal: bool, append: impl FnOnce(&mut Queue)) -> Pushed {
        let mut q = self.queue.lock();
        if q.sealed {
            return Pushed::Refused;
        }
        q.sealed = seal;
        // Counted under the lock so a flush never subtracts bytes it was not told about.
        self.add_buffered(len as isize);
        let first = q.chunks.is_empty();
        if q.chunks.capacity() == 0 {
            // One slot, not the four a first push makes: it stays when the queue empties.
            q.chunks.reserve_exact(1);
        }
        append(&mut q);
        // Every time: a push that grows the deque moves its front too.
        self.note_front(&q);
        if first && (self.corked.load(Ordering::Acquire) == 0 || seal) {
            Pushed::First
        } else {
            Pushed::Queued
        }
    }

    /// Refuse every later frame: the connection is over, and its write side shuts once what is
    /// queued is written.
    pub(crate) fn seal(&self) {
        let mut q = self.queue.lock();
        q.sealed = true;
        q.ending = true;
    }

    /// Whether later frames are refused: after `seal`, or a push that sealed (a close frame).
    pub(crate) fn is_sealed(&self) -> bool {
        self.queue.lock().sealed
    }

    /// Write what is queued until it is all written or the kernel refuses more. Never blocks
    /// beyond the queue's lock, which is held only by another flush or a push.
    pub(crate) fn flush(&self) -> io::Result<Flushed> {
        self.flush_with(false)
    }

    /// `flush`, also while a `cork` holds the queue: what a burst over the backpressure limit
    /// writes, as uWS writes a cork buffer that overflows. Frames queued after it wait for the
    /// `uncork` again.
    pub(crate) fn flush_overflowing(&self) -> io::Result<Flushed> {
        self.flush_with(true)
    }

    fn flush_with(&self, through_cork: bool) -> io::Result<Flushed> {
        let mut guard = self.queue.lock();
        let flushed = self.flush_locked(&mut guard, through_cork);
        self.note_front(&guard);
        flushed
    }

    fn flush_locked(&self, guard: &mut Queue, through_cork: bool) -> io::Result<Flushed> {
        let Queue {
            chunks,
            written,
            inline_hint,
            sealed,
            socket,
            ending,
            shut_down,
        } = guard;
        let Some(socket) = socket.as_deref() else {
            return Ok(Flushed::Detached);
        };
        let fin_due = *ending && !*shut_down;
        if chunks.is_empty() && !fin_due {
            // TLS records of an earlier flush may still wait for writability.
            if socket.write_pending()? {
                return Ok(Flushed::Blocked);
            }
            self.refused.store(false, Ordering::Relaxed);
            return Ok(Flushed::Done);
        }
        if self.is_corked() && !*sealed && !through_cork {
            unshare(chunks);
            return Ok(Flushed::Corked);
        }
        let mut total = 0;
        let mut inline_total = 0;
        while !chunks.is_empty() {
            // Everything queued goes in one gathering write (up to MAX_IOVECS pieces): what a
            // handler or a cork queued back to back reaches the client as one segment, and a
            // queue of mixed chunks costs one syscall, not one per chunk.
            let result = {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut count = 0;
                let mut skip = *written;
                'gather: for chunk in chunks.iter() {
                    for part in chunk.parts() {
                        if skip >= part.len() {
                            skip -= part.len();
                            continue;
                        }
                        slices[count] = IoSlice::new(&part[skip..]);
                        skip = 0;
                        count += 1;
                        if count == MAX_IOVECS {
                            break 'gather;
                        }
                    }
                }
                match count {
                    1 => socket.try_write(&slices[0]),
                    _ => socket.try_write_vectored(&slices[..count]),
                }
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut n) => {
                    self.add_buffered(-(n as isize));
                    let writes = self.writes.load(Ordering::Relaxed);
                    self.writes.store(writes.wrapping_add(1), Ordering::Relaxed);
                    total += n;
                    while n > 0 {
                        let chunk = chunks.front().expect("the kernel took no more than queued");
                        let step = n.min(chunk.len() - *written);
                        if matches!(chunk, Chunk::Inline(_)) {
                            inline_total += step;
                        }
                        n -= step;
                        *written += step;
                        if *written == chunk.len() {
                            *written = 0;
                            chunks.pop_front();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.congested.store(true, Ordering::Relaxed);
                    self.refused.store(true, Ordering::Relaxed);
                    if let Some(Chunk::Shared(range)) = chunks.front_mut() {
                        // Keep only the unwritten part of a partly written range.
                        range.advance(*written);
                        *written = 0;
                    }
                    unshare(chunks);
                    return Ok(Flushed::Blocked);
                }
                Err(e) => return Err(e),
            }
        }
        if socket.write_pending()? {
            // TLS: the session took every byte but the socket not all its records yet.
            self.congested.store(true, Ordering::Relaxed);
            self.refused.store(true, Ordering::Relaxed);
            return Ok(Flushed::Blocked);
        }
        if total <= KEEP_BUFFERS_AFTER {
            if chunks.capacity() > 1 {
                *chunks = VecDeque::new();
            }
            *inline_hint = 0;
        } else {
            *inline_hint = inline_total.min(INLINE_HINT_MAX) as u32;
        }
        self.refused.store(false, Ordering::Relaxed);
        if *ending && !*shut_down {
            // The connection is over and its last frame is out: FIN at once, so a client
            // waiting for the end of the stream sees it. Not as soon as a close frame the server
            // started is out: the closing handshake is not over until the client's close frame
            // comes back (RFC 6455 7.1.1), and a proxy such as nginx ends both of its legs at
            // the server's FIN, so that frame never came and on_close reported 1006.
            *shut_down = true;
            socket.shutdown_write();
        }
        Ok(Flushed::Done)
    }

    /// A mark that changes each time the kernel takes bytes of the queue, while the kernel
    /// refuses what is queued; `None` otherwise: nothing queued, nothing tried yet (replies
    /// wait for the loop's batch to end, a loop a handler blocks included) or a `cork`
    /// holding it (the application's doing, not the client's).
    pub(crate) fn write_progress(&self) -> Option<u32> {
        let q = self.queue.lock();
        (!q.chunks.is_empty() && self.is_refused() && !self.is_corked()).then(|| self.writes())
    }

    /// The count of writes the kernel took bytes of (wrapping): changed since a caller last
    /// looked, its client read.
    pub(crate) fn writes(&self) -> u32 {
        self.writes.load(Ordering::Relaxed)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.lock().chunks.is_empty()
    }

    /// Change `buffered` by `delta`, with the queue's lock held. Every change is made under that
    /// lock, so a load and a store suffice where `fetch_add` would be a locked instruction: two
    /// per send on the loop thread's path, the push and its share of the write.
    fn add_buffered(&self, delta: isize) {
        debug_assert!(self.queue.is_locked());
        let buffered = self.buffered.load(Ordering::Relaxed);
        self.buffered
            .store(buffered.wrapping_add_signed(delta), Ordering::Relaxed);
    }

    pub(crate) fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    pub(crate) fn is_congested(&self) -> bool {
        self.congested.load(Ordering::Relaxed)
    }

    /// Whether a `cork` holds the queue's writes.
    pub(crate) fn is_corked(&self) -> bool {
        self.corked.load(Ordering::Acquire) > 0
    }

    /// Whether the kernel refused bytes at the last write (`refused`).
    pub(crate) fn is_refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    pub(crate) fn set_congested(&self) {
        self.congested.store(true, Ordering::Relaxed);
    }

    /// Clear congestion once everything is written; true if it was congested (drain is due).
    pub(crate) fn clear_congested(&self) -> bool {
        self.dropping.store(false, Ordering::Relaxed);
        self.congested.swap(false, Ordering::Relaxed)
    }

    /// A send is dropped over the limit: true if it is the first since the queue drained.
    pub(crate) fn first_drop(&self) -> bool {
        !self.dropping.swap(true, Ordering::Relaxed)
    }

    pub(crate) fn cork(&self) {
        self.corked.fetch_add(1, Ordering::AcqRel);
    }

    /// True when the last cork is released and a flush is owed: frames wait, or the queue is
    /// congested (a burst past the limit was written inside the cork, and whatever emptied
    /// the queue there left the flag, which only a flush clears, with its `on_drain`).
    pub(crate) fn uncork(&self) -> bool {
        self.corked.fetch_sub(1, Ordering::AcqRel) == 1 && (!self.is_empty() || self.is_congested())
    }
}

/// Replace the arena ranges of a queue that must wait (for writability, or for `uncork`) by
/// copies of their bytes, so the arenas are freed with their batch: what the queue holds is then
/// what `buffered_amount` counts, whatever the reader does.
fn unshare(chunks: &mut VecDeque<Chunk>) {
    for chunk in chunks.iter_mut() {
        if let Chunk::Shared(range) = chunk {
            *chunk = Chunk::Inline(range.bytes().to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ws::encode::OutFrame;
    use crate::engine::ws::protocol::OP_TEXT;
    use bytes::Bytes;

    fn text(s: &'static str) -> OutFrame {
        OutFrame::new(OP_TEXT, Bytes::from_static(s.as_bytes()))
    }

    /// A runtime, and both ends of a loopback TCP connection (ours for the queue).
    fn socket_pair() -> (
        tokio::runtime::Runtime,
        tokio::net::TcpStream,
        std::net::TcpStream,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (ours, theirs) = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().await.unwrap();
            (server, client)
        });
        (rt, ours, theirs)
    }

    #[test]
    fn buffered_counts_wire_bytes_and_the_first_push_asks_for_a_flush() {
        let out = Outbound::default();
        assert_eq!(out.push(&text("hello"), false), Pushed::First); // 2 + 5
        assert_eq!(out.push(&text("hi"), false), Pushed::Queued); // 2 + 2
        assert_eq!(out.buffered(), 11);
        assert_eq!(out.flush().unwrap(), Flushed::Detached, "no socket yet");
        assert_eq!(out.buffered(), 11);
    }

    #[test]
    fn sealing_rejects_later_frames() {
        let out = Outbound::default();
        assert_eq!(out.push(&text("a"), false), Pushed::First);
        assert_eq!(out.push(&OutFrame::close(1000, ""), true), Pushed::Queued);
        assert_eq!(out.push(&text("late"), false), Pushed::Refused);
    }

    #[test]
    fn a_corked_queue_asks_for_a_flush_only_when_uncorked() {
        let out = Outbound::default();
        out.cork();
        assert_eq!(out.push(&text("a"), false), Pushed::Queued);
        assert!(out.uncork());
        out.cork();
        out.cork();
        assert!(!out.uncork(), "still corked once");
        assert!(out.uncork());
        let out = Outbound::default();
        out.cork();
        out.set_congested();
        assert!(
            out.uncork(),
            "an empty but congested queue owes the flush that clears it"
        );
    }

    #[test]
    fn small_and_large_frames_go_out_in_order_and_an_idle_queue_keeps_one_slot() {
        use std::io::Read;
        let (rt, ours, mut theirs) = socket_pair();
        let _guard = rt.enter();
        let out = Outbound::default();
        out.attach(Arc::new(Stream::Tcp(ours)));
        let large = OutFrame::new(OP_TEXT, Bytes::from(vec![b'L'; 5000]));
        let mut expected = Vec::new();
        for frame in [
            text("a"),
            text("bc"),
            large.clone(),
            text("d"),
            large.clone(),
        ] {
            out.push(&frame, false);
            expected.extend_from_slice(frame.head());
            expected.extend_from_slice(frame.payload());
        }
        assert_eq!(out.push_payload(OP_TEXT, b"e", false), Pushed::Queued);
        expected.extend_from_slice(b"\x81\x01e");
        // The socket may not be known writable yet: flush until it is all out.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while out.buffered() > 0 && std::time::Instant::now() < deadline {
            rt.block_on(tokio::task::yield_now());
            out.flush().unwrap();
        }
        assert_eq!(out.buffered(), 0);
        let mut got = vec![0; expected.len()];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(got, expected);
        // A small flush after the burst gives the burst's buffers back...
        assert_eq!(out.push(&text("f"), false), Pushed::First);
        assert_eq!(out.flush().unwrap(), Flushed::Done);
        {
            let q = out.queue.lock();
            assert_eq!((q.chunks.capacity(), q.inline_hint), (0, 0));
        }
        // ...and the queue's next chunk gets one slot, which stays for the one after it.
        for frame in ["g", "h"] {
            assert_eq!(out.push(&text(frame), false), Pushed::First);
            assert_eq!(out.flush().unwrap(), Flushed::Done);
            assert_eq!(out.queue.lock().chunks.capacity(), 1);
        }
        let mut got = vec![0; 9];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(got, b"\x81\x01f\x81\x01g\x81\x01h");
    }

    #[test]
    fn a_queue_that_must_wait_holds_copies_not_arenas() {
        use crate::engine::pubsub::arena::ArenaWriter;
        let (rt, ours, _theirs) = socket_pair();
        let _guard = rt.enter();
        let mut writer = ArenaWriter::default();
        let range = writer.append(&[b"\x81\x02hi"]);
        drop(writer);
        let out = Outbound::default();
        out.attach(Arc::new(Stream::Tcp(ours)));
        out.cork();
        out.push_shared(&range);
        assert_eq!(range.arena_holders(), 2, "an open queue shares the range");
        assert_eq!(out.flush().unwrap(), Flushed::Corked);
        assert_eq!(range.arena_holders(), 1, "a waiting queue copies it out");
        out.set_congested();
        out.push_shared(&range);
        assert_eq!(range.arena_holders(), 1, "a congested queue gets a copy");
        let q = out.queue.lock();
        let bytes: Vec<u8> = q
            .chunks
            .iter()
            .flat_map(|c| match c {
                Chunk::Inline(b) => b.clone(),
                _ => panic!("only copies"),
            })
            .collect();
        assert_eq!(bytes, b"\x81\x02hi\x81\x02hi");
        assert_eq!(out.buffered(), 8);
    }

    #[test]
    fn an_overflowing_cork_is_written_and_what_follows_waits_for_the_uncork() {
        use std::io::Read;
        let (rt, ours, mut theirs) = socket_pair();
        let _guard = rt.enter();
        let out = Outbound::default();
        out.attach(Arc::new(Stream::Tcp(ours)));
        out.cork();
        assert_eq!(out.push(&text("one"), false), Pushed::Queued);
        assert_eq!(out.flush().unwrap(), Flushed::Corked);
        assert_eq!(out.flush_overflowing().unwrap(), Flushed::Done);
        assert_eq!(out.buffered(), 0);
        let mut got = [0u8; 5];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\x81\x03one");
        assert_eq!(
            out.push(&text("two"), false),
            Pushed::Queued,
            "still corked"
        );
        assert_eq!(out.flush().unwrap(), Flushed::Corked);
        assert!(out.uncork(), "the uncork owes the flush");
        assert_eq!(out.flush().unwrap(), Flushed::Done);
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\x81\x03two");
    }

    #[test]
    fn a_range_cut_by_a_full_socket_is_copied_out_and_arrives_whole() {
        use crate::engine::pubsub::arena::ArenaWriter;
        use std::io::Read;
        let (rt, ours, mut theirs) = socket_pair();
        let _guard = rt.enter();
        // A small send buffer, so that one write cannot take the whole range.
        socket2::SockRef::from(&ours)
            .set_send_buffer_size(4096)
            .unwrap();
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let range = ArenaWriter::default().append(&[&payload]);
        let out = Outbound::default();
        out.attach(Arc::new(Stream::Tcp(ours)));
        out.push_shared(&range);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut flushed = Flushed::Blocked;
        while out.buffered() == payload.len() && std::time::Instant::now() < deadline {
            rt.block_on(tokio::task::yield_now());
            flushed = out.flush().unwrap();
        }
        assert_eq!(flushed, Flushed::Blocked, "part written, the rest waits");
        assert!(out.buffered() < payload.len());
        assert_eq!(range.arena_holders(), 1, "the rest is a copy");
        let reader = std::thread::spawn(move || {
            let mut got = vec![0; 200_000];
            theirs.read_exact(&mut got).map(|()| got)
        });
        while out.buffered() > 0 && std::time::Instant::now() < deadline {
            rt.block_on(tokio::task::yield_now());
            out.flush().unwrap();
        }
        assert_eq!(out.buffered(), 0);
        assert!(
            reader.join().unwrap().unwrap() == payload,
            "every byte once, in order"
        );
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
