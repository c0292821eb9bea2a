//! Rust-to-Python events: one queue per server, drained by the asyncio loop in batches.
//!
//! Tokio threads push and never wait for the GIL. The wake-up fd is written once until the loop
//! clears it, as it takes the queue, so a burst of N events costs one syscall and one loop
//! wake-up.
//!
//! On a tokio worker the write is deferred, to the moment the worker runs out of work
//! (`on_thread_park`) or has queued `MAX_DEFERRED_EVENTS`: waking the loop thread in the middle of
//! a poll cycle let it preempt the worker (on a shared core) after the first event of a burst,
//! so every batch held one event and paid one context switch.

use std::borrow::Cow;
use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue};
use hyper::Response;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::wake::Wakeup;
use crate::engine::mask::MaskedBytes;
use crate::engine::net::Remote;

pub type Body = Full<Bytes>;

/// The handler's answer to one request.
pub enum Reply {
    Respond(Response<Body>),
    /// Switch to WebSocket, adding these headers to the 101 response.
    Upgrade(Vec<(HeaderName, HeaderValue)>),
}

/// A request waiting for the Python handler's answer.
pub struct HttpRequest {
    /// The id the WebSocket gets if this request is upgraded.
    pub id: u64,
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub remote: Remote,
    /// A valid WebSocket handshake on a server that accepts WebSockets.
    pub is_websocket: bool,
    pub reply: oneshot::Sender<Reply>,
}

/// `C` is the connection handle an open WebSocket is handed over as (`ws::Event` names it):
/// a parameter so that the bridge, below `ws/` in the engine's layers, needs nothing from it.
pub enum Event<C> {
    Open(C),
    Text(u64, Utf8Bytes),
    /// A large text message in one frame, still masked and its UTF-8 not checked yet: the copy
    /// that hands it on unmasks and checks it, and invalid UTF-8 refuses the connection's
    /// stream with 1007 from there (`Conn::refuse_text`), the events behind it dropped.
    MaskedText(u64, MaskedBytes),
    /// Possibly still masked (`MaskedBytes`): unmasked by the copy that hands it to Python.
    Binary(u64, MaskedBytes),
    /// A congested connection has written everything it had queued.
    Drain(u64),
    /// A ping from the client (already answered), pushed only while Python has an `on_ping`.
    Ping(u64, Bytes),
    /// A pong from the client, pushed only while Python has an `on_pong`.
    Pong(u64, Bytes),
    /// The client broke the protocol: close with this code once earlier events are handled.
    Fail(u64, u16, &'static str),
    /// The client's close frame came behind events not yet handled: answer it with its code
    /// and reason once they are (as `Fail`), so that what their handlers send goes first, as
    /// uWS runs a message's handler before it reads the close behind it.
    PeerClose(u64, u16, String),
    Close(u64, u16, String),
    Request(Box<HttpRequest>),
    /// A request was accepted for upgrade but the connection never opened.
    UpgradeFailed(u64),
    /// The server stopped: its listener is closed and every connection has ended.
    Stopped,
    /// After `Server::end_links`: the links to other processes (Redis, sibling workers) have
    /// sent what the connections published and ended.
    LinksEnded,
    /// A line for Python's `logging`.
    Log(Box<LogRecord>),
}

/// What the engine logs (`Event::Log`), each kind limited on its own (`ws/report.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum LogKind {
    /// A WebSocket handshake refused before the handler (400, 426, 503).
    HandshakeRejected,
    /// An HTTP request refused by the engine (408, 413, 431, malformed).
    RequestRejected,
    /// An HTTP connection dropped because the client read none of a response in time.
    ResponseStalled,
    /// A connection closed for breaking the protocol or a limit (1002, 1007, 1008, 1009).
    ClientRefused,
    IdleTimeout,
    /// Sends dropped because a connection's queue passed `backpressure_limit`.
    BackpressureDrop,
    /// A connection closed by `close_on_backpressure_limit`.
    BackpressureClose,
    /// The Redis link of `pubsub_redis` was lost or could not be made: once per outage.
    RedisDown,
    /// The Redis link is back and resubscribed.
    RedisUp,
    /// Publishes lost because the queue to Redis is full: once until it has emptied.
    RedisBacklog,
    /// Messages from Redis lost because the queue to the fan-out is full: once until it has
    /// emptied.
    RedisInboundBacklog,
    /// Publishes a sibling worker misses (`ws/relay.rs`): once per stall of that sibling.
    RelayDrop,
    /// A publish too large for Redis to deliver (`pubsub::remote::MAX_MESSAGE`).
    RedisTooBig,
    /// A TLS connection that sent something but did not complete its handshake.
    TlsHandshakeFailed,
    /// A channel Redis refused (`NOPERM`: an ACL without it) while the link stays up: once per
    /// channel until Redis takes it again.
    RedisRefused,
    /// The client did not answer the server's close frame within the close timeout: the
    /// connection ends as the idle timeout ends one, and is logged as it is.
    CloseTimeout,
    /// A connection stopped reading because incoming messages held more than
    /// `max_incoming_bytes`: the first such pause in a minute.
    ReadsPaused,
    /// A listener could not accept (out of file descriptors or memory): once per outage.
    AcceptFailed,
    /// A listener accepts again after `AcceptFailed`.
    AcceptResumed,
}

pub(crate) const LOG_KINDS: usize = 19;

/// One line for the `brioche` loggers. Plain values: the loop formats it, and only if the
/// logger is enabled for its level.
#[derive(Debug)]
pub struct LogRecord {
    pub kind: LogKind,
    /// The client's address and port (`Remote`'s or `Peer`'s `Display`); for the Redis kinds,
    /// the Redis server's address; for `RelayDrop`, the sibling's pid; for the accept kinds,
    /// the listener's address.
    pub peer: String,
    /// The HTTP status or the close code.
    pub code: u16,
    /// Borrowed but for the Redis kinds, which carry what Redis answered.
    pub reason: Cow<'static, str>,
    /// Lines of this kind left out (over the rate limit) since the last one.
    pub left_out: u32,
    /// The last line of its kind this second allows: the loop asks for the count of those
    /// left out after it a second later (`Engine.take_left_out`).
    pub fills_second: bool,
}

impl<C> Event<C> {
    /// The payload bytes of a message event: what it holds of the server's incoming budget.
    pub fn message_len(&self) -> usize {
        match self {
            Event::Text(_, text) => text.len(),
            Event::Binary(_, data) | Event::MaskedText(_, data) => data.len(),
            Event::Ping(_, data) | Event::Pong(_, data) => data.len(),
            _ => 0,
        }
    }
}

/// Events a worker may queue before it wakes the loops it owes a wake-up, parked or not.
const MAX_DEFERRED_EVENTS: usize = 64;

#[derive(Default)]
struct DeferredWakes {
    /// Each wake-up this worker owes, with its `Wakeup::drains` at the worker's last push
    /// (`None`: owed whether or not the loop has drained since, `wake_unless_in_batch`).
    wakeups: Vec<(Arc<Wakeup>, Option<u32>)>,
    events: usize,
}

impl DeferredWakes {
    /// Owe `wakeup` for what was just queued (`pushed_at`: its `drains` read in the push).
    fn owe(&mut self, wakeup: &Arc<Wakeup>, pushed_at: Option<u32>) {
        match self
            .wakeups
            .iter_mut()
            .find(|(w, _)| Arc::ptr_eq(w, wakeup))
        {
            Some((_, owed)) => *owed = owed.and(pushed_at),
            None => self.wakeups.push((wakeup.clone(), pushed_at)),
        }
    }

    fn flush(&mut self) {
        for (wakeup, pushed_at) in self.wakeups.drain(..) {
            // Not once the loop has taken what this worker queued (another worker's wake-up
            // woke it): that wake-up would find an empty queue.
            if pushed_at.is_none_or(|at| wakeup.drains.load(Ordering::Relaxed) == at) {
                wakeup.wake();
            }
        }
        self.events = 0;
    }
}

thread_local! {
    /// `Some` on tokio workers (`engine/runtime.rs`): their wake-ups wait for the worker to park.
    static DEFERRED: RefCell<Option<DeferredWakes>> = const { RefCell::new(None) };
}

/// Make this thread defer its wake-ups until [`flush_deferred_wakes`] (the runtime's park hook).
pub(crate) fn defer_wakes_on_this_thread() {
    DEFERRED.with(|d| *d.borrow_mut() = Some(DeferredWakes::default()));
}

pub(crate) fn flush_deferred_wakes() {
    DEFERRED.with(|d| {
        if let Some(deferred) = d.borrow_mut().as_mut() {
            deferred.flush();
        }
    });
}

pub struct EventQueue<C> {
    events: Mutex<Vec<Event<C>>>,
    wakeup: Arc<Wakeup>,
    /// The loop is between `drain()` and the release at the end of its batch (`py/engine.rs`).
    in_batch: AtomicBool,
    /// The last drain whose events have all been handled: its batch, and any batch its
    /// consumer kept events over for, has ended (`all_drained_handled`).
    handled: AtomicU32,
}

impl<C> EventQueue<C> {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            events: Mutex::new(Vec::with_capacity(256)),
            wakeup: Arc::new(Wakeup::new()?),
            in_batch: AtomicBool::new(false),
            handled: AtomicU32::new(0),
        })
    }

    /// Queue `event`; returns the drain it waits for (`handled_since`).
    pub(crate) fn push(&self, event: Event<C>) -> u32 {
        let drains = {
            let mut events = self.events.lock();
            events.push(event);
            self.wakeup.drains.load(Ordering::Relaxed)
        };
        self.pushed(1, Some(drains));
        drains
    }

    /// Whether the events pushed when `push` or `push_all` returned `pushed_at` have all been
    /// handled: `all_drained_handled` was called after the drain that took them (the handlers
    /// of a batch's events have run, and what they sent is written, when the loop ends it; an
    /// event the loop's consumer kept for a later call holds the count back until it has been
    /// handled too).
    ///
    /// The count wraps (32 bits, so that a connection's task stays small): after two billion
    /// batches an idle connection's events may read as not handled yet, which only has its
    /// client's close answered by the loop, in order, rather than at once.
    pub(crate) fn handled_since(&self, pushed_at: u32) -> bool {
        // Signed: a count behind `pushed_at` (not handled yet) is negative.
        (self.handled.load(Ordering::SeqCst).wrapping_sub(pushed_at) as i32) > 0
    }

    /// Every event drained so far has been handled: the consumer (the one thread that drains)
    /// calls this when a batch ends with none kept over.
    pub(crate) fn all_drained_handled(&self) {
        self.handled
            .store(self.wakeup.drains.load(Ordering::Relaxed), Ordering::SeqCst);
    }

    /// Queue `batch` in order, as one push: a read's messages take the lock and the wake-up's
    /// bookkeeping once, not once per message (each was a lock and a thread-local look-up, 2.9%
    /// of S1's CPU when pushed one by one).
    /// Returns the drain they wait for (`handled_since`).
    pub(crate) fn push_all(&self, batch: impl IntoIterator<Item = Event<C>>) -> u32 {
        let (added, drains) = {
            let mut events = self.events.lock();
            let before = events.len();
            events.extend(batch);
            (
                events.len() - before,
                self.wakeup.drains.load(Ordering::Relaxed),
            )
        };
        if added > 0 {
            self.pushed(added, Some(drains));
        }
        drains
    }

    /// Wake the loop for `added` events just queued while the drains were `pushed_at` (`None`:
    /// a wake-up with no event), or owe it the wake-up (a tokio worker, `DeferredWakes::owe`).
    ///
    /// Every push wakes it, or owes it, not only one into an empty queue: the worker that found
    /// the queue empty may run on without parking for as long as its work lasts (a fan-out's
    /// flushes, TLS handshakes), and what the others queued behind its event waited for it.
    /// Whoever wakes it first writes the wake-up, once: the others find it set
    /// (`Wakeup::wake`), or (a worker, as it parks) their events taken.
    fn pushed(&self, added: usize, pushed_at: Option<u32>) {
        DEFERRED.with(|d| match d.borrow_mut().as_mut() {
            None => self.wakeup.wake(),
            Some(deferred) => {
                deferred.owe(&self.wakeup, pushed_at);
                deferred.events += added;
                if deferred.events >= MAX_DEFERRED_EVENTS {
                    deferred.flush();
                }
            }
        });
    }

    /// Move every queued event into `out` (which should be empty).
    ///
    /// The wake-up is cleared *before* taking the batch: an event pushed after the take then
    /// finds an empty queue and wakes the loop again, so no event waits for a wake-up that
    /// already happened.
    pub fn drain_into(&self, out: &mut Vec<Event<C>>) {
        self.wakeup.clear();
        let mut events = self.events.lock();
        // Under the lock the pushes read it in (`handled_since`).
        self.wakeup.drains.fetch_add(1, Ordering::Relaxed);
        std::mem::swap(&mut *events, out);
    }

    /// Make the loop call back although the queue may be empty: its consumer kept some of the
    /// events it took for the next call.
    pub fn wake(&self) {
        self.wakeup.wake();
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.wakeup.fd()
    }

    /// The loop begins a batch, or ends it: `false` comes before the batch's last release of
    /// the objects sent from (`py/shared.rs`), so that one queued after it wakes the loop.
    pub(crate) fn set_in_batch(&self, in_batch: bool) {
        self.in_batch.store(in_batch, Ordering::SeqCst);
    }

    /// Wake the loop although no event was queued, unless its batch's end will do what the
    /// wake-up is for (release what was sent from, `py/shared.rs`); deferred on a tokio worker
    /// as an event's wake-up is. Called by whoever queued that first, after queueing it.
    pub(crate) fn wake_unless_in_batch(&self) {
        if !self.in_batch.load(Ordering::SeqCst) {
            // As one event pushed, owed whatever drains come first: no event of its own says
            // when the loop has seen it.
            self.pushed(1, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: std::os::fd::RawFd) -> bool {
        crate::engine::bridge::wake::poll_readable(fd, 0)
    }

    /// Drain `q`, which holds only `Event::Drain`s: their ids, in queue order.
    fn drained_ids(q: &EventQueue<()>) -> Vec<u64> {
        let mut out = Vec::new();
        q.drain_into(&mut out);
        out.iter()
            .map(|e| match e {
                Event::Drain(id) => *id,
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn events_count_as_handled_once_a_batch_ends_with_every_drained_event_handled() {
        let q = EventQueue::<()>::new().unwrap();
        let first = q.push(Event::Drain(1));
        assert!(!q.handled_since(first), "not drained yet");
        let mut out = Vec::new();
        q.drain_into(&mut out);
        let second = q.push(Event::Drain(2));
        // Taken, but its batch has not ended (or kept an event over): not yet.
        assert!(!q.handled_since(first));
        q.all_drained_handled();
        assert!(q.handled_since(first));
        assert!(!q.handled_since(second), "pushed after that drain");
        q.drain_into(&mut out);
        q.all_drained_handled();
        assert!(q.handled_since(first) && q.handled_since(second));
        // Across the count's wrap.
        q.wakeup.drains.store(u32::MAX, Ordering::Relaxed);
        q.all_drained_handled();
        assert!(q.handled_since(u32::MAX - 1) && !q.handled_since(u32::MAX));
        q.drain_into(&mut out);
        q.drain_into(&mut out);
        q.all_drained_handled();
        assert!(q.handled_since(u32::MAX) && q.handled_since(0) && !q.handled_since(1));
    }

    #[test]
    fn deferred_wake_waits_for_the_flush_or_the_event_cap() {
        let q = EventQueue::<()>::new().unwrap();
        defer_wakes_on_this_thread();
        q.push(Event::Drain(1));
        assert!(!readable(q.fd()), "deferred until the worker parks");
        flush_deferred_wakes();
        assert!(readable(q.fd()));
        let mut out = Vec::new();
        q.drain_into(&mut out);
        assert!(!readable(q.fd()));
        for id in 0..MAX_DEFERRED_EVENTS as u64 {
            q.push(Event::Drain(id));
        }
        assert!(
            readable(q.fd()),
            "a worker that never parks still wakes the loop"
        );
        DEFERRED.with(|d| *d.borrow_mut() = None);
    }

    /// Queue `Event::Drain(id)` from a worker that owes the wake-up for it and never pays:
    /// one that found the queue empty and runs on without parking.
    fn owed_by_a_busy_worker(q: &EventQueue<()>, id: u64) {
        std::thread::scope(|s| {
            s.spawn(|| {
                defer_wakes_on_this_thread();
                q.push(Event::Drain(id));
            });
        });
    }

    /// A worker owes the wake-up for every event it queued, and pays it only for those still
    /// queued: once the loop has taken them (woken by another worker), it writes nothing, so
    /// the loop is not woken again for an empty queue. And the wake-up is written once until
    /// the loop clears it, however many times it is paid.
    #[test]
    fn a_worker_wakes_the_loop_only_for_events_still_queued_and_once_per_drain() {
        let q = EventQueue::<()>::new().unwrap();
        owed_by_a_busy_worker(&q, 0);
        assert!(!readable(q.fd()));
        defer_wakes_on_this_thread();
        q.push(Event::Drain(1));
        flush_deferred_wakes();
        assert!(
            readable(q.fd()),
            "owed for a push into a queue that was not empty"
        );
        assert_eq!(drained_ids(&q), vec![0, 1]);
        q.push(Event::Drain(2));
        assert_eq!(drained_ids(&q), vec![2], "taken before this worker parks");
        flush_deferred_wakes();
        assert!(!readable(q.fd()), "nothing left to wake the loop for");
        q.push(Event::Drain(3));
        q.wake_unless_in_batch();
        let _ = drained_ids(&q);
        flush_deferred_wakes();
        assert!(
            readable(q.fd()),
            "a wake-up with no event is owed after a drain too"
        );
        let _ = drained_ids(&q);
        for id in 0..3 {
            q.push(Event::Drain(id));
            flush_deferred_wakes();
        }
        assert_eq!(
            q.wakeup.take_writes(),
            1,
            "written once until the loop clears it"
        );
        DEFERRED.with(|d| *d.borrow_mut() = None);
    }

    /// A push off the workers (the loop's own: an `Event::Drain` from its flushes, a log line)
    /// wakes the loop at once, even into a queue whose wake-up a busy worker owes and has not
    /// paid: it woke the loop only into an empty queue, and waited for that worker to park.
    #[test]
    fn a_push_off_the_workers_wakes_the_loop_though_a_busy_worker_owes_it() {
        let q = EventQueue::<()>::new().unwrap();
        owed_by_a_busy_worker(&q, 0);
        assert!(!readable(q.fd()));
        q.push(Event::Drain(1));
        assert!(readable(q.fd()));
        assert_eq!(drained_ids(&q), vec![0, 1]);
    }

    #[test]
    fn push_all_queues_in_order_after_earlier_events_and_counts_each_toward_the_cap() {
        let q = EventQueue::<()>::new().unwrap();
        q.push(Event::Drain(0));
        q.push_all((1..4).map(Event::Drain));
        q.push_all(std::iter::empty());
        assert_eq!(drained_ids(&q), vec![0, 1, 2, 3]);
        defer_wakes_on_this_thread();
        q.push_all((0..MAX_DEFERRED_EVENTS as u64 - 1).map(Event::Drain));
        assert!(
            !readable(q.fd()),
            "under the cap: deferred until the worker parks"
        );
        q.push_all([Event::Drain(0)]);
        assert!(
            readable(q.fd()),
            "a batch counts every event toward the cap"
        );
        DEFERRED.with(|d| *d.borrow_mut() = None);
    }

    #[test]
    fn batches_keep_order_and_wake_once_per_batch() {
        let q = EventQueue::<()>::new().unwrap();
        for id in 0..3 {
            q.push(Event::Drain(id));
        }
        assert_eq!(drained_ids(&q), vec![0, 1, 2]);
        assert!(drained_ids(&q).is_empty());
    }
}
