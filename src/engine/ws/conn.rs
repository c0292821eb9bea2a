//! One WebSocket connection's shared state: what Python's `WebSocket` methods act on.
//!
//! Everything here is synchronous and non-blocking (short, uncontended mutexes and non-blocking
//! writes at most): the Python thread calls it directly without releasing the GIL. The socket
//! belongs to the connection's task (`task.rs`); other threads only write to it, through
//! the outbound queue.

use std::collections::hash_map::RandomState;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Context;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use indexmap::IndexSet;
use parking_lot::Mutex;

use super::batch;
use super::deflate::{self, DeflateParams, Deflater};
use super::encode::OutFrame;
use super::outbound::{Flushed, Outbound, Pushed};
use super::protocol::{Violation, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RSV1};
use super::shared::Shared;
use super::Event;
use crate::engine::bridge::events::LogKind;
use crate::engine::net::Peer;
use crate::engine::platform::{prefetch, Prefetch};
use crate::engine::pubsub::arena::ArenaRange;
use crate::engine::pubsub::topics::Unsubscribed;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReadyState {
    Connecting = 0,
    Open = 1,
    Closing = 2,
    Closed = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendStatus {
    Sent(usize),
    Backpressured,
    Dropped,
}

impl SendStatus {
    /// Combine the outcomes of one publish (Bun's corrected rule,
    /// <https://github.com/oven-sh/bun/pull/32889>): dropped if anyone dropped it (or nobody got
    /// it), else backpressured if anyone is congested, else sent.
    pub(crate) fn merge(self, other: SendStatus) -> SendStatus {
        match (self, other) {
            (SendStatus::Dropped, _) | (_, SendStatus::Dropped) => SendStatus::Dropped,
            (SendStatus::Backpressured, _) | (_, SendStatus::Backpressured) => {
                SendStatus::Backpressured
            }
            (sent, _) => sent,
        }
    }
}

/// The topics a connection is subscribed to, in the order subscribed (an unsubscribe moves the
/// last into its place). A set, not a list: an unsubscribe scanned a list, so a socket
/// subscribed to 40,000 topics took 3.5 s of the loop to leave them one by one. Keyed by names
/// clients may choose, so with std's keyed hash; absent until the first subscribe, as most
/// connections never make one (8 bytes where an empty `Vec` took 24).
#[derive(Default)]
struct Subscriptions(Option<Box<IndexSet<Arc<str>, RandomState>>>);

impl Subscriptions {
    fn insert(&mut self, topic: Arc<str>) {
        self.0.get_or_insert_with(Default::default).insert(topic);
    }

    fn remove(&mut self, topic: &str) {
        if let Some(set) = &mut self.0 {
            set.swap_remove(topic);
        }
    }

    fn to_vec(&self) -> Vec<Arc<str>> {
        self.0.iter().flat_map(|set| set.iter().cloned()).collect()
    }

    fn take(&mut self) -> impl Iterator<Item = Arc<str>> {
        self.0.take().into_iter().flat_map(|set| set.into_iter())
    }
}

/// Queued bytes past which a socket reports `Backpressured` even before its writer has hit a
/// full kernel buffer: 256 KiB, or half the backpressure limit when that is smaller. At least
/// one byte: a send onto an empty queue is `Sent` whatever the limit, as Bun's first send is.
pub(crate) fn high_water_mark(backpressure_limit: usize) -> usize {
    const DEFAULT: usize = 256 * 1024;
    match backpressure_limit {
        0 => DEFAULT,
        limit => DEFAULT.min(limit / 2).max(1),
    }
}

/// Events waiting for Python beyond which the task stops reading from this socket.
pub(crate) const MAX_INFLIGHT_MESSAGES: usize = 128;
/// Bytes of messages waiting for Python beyond which the task stops reading.
pub(crate) const MAX_INFLIGHT_BYTES: usize = 1024 * 1024;

pub struct Conn {
    pub id: u64,
    pub remote: Peer,
    pub(crate) shared: Arc<Shared>,
    state: AtomicU8,
    pub(crate) out: Outbound,
    subscriptions: Mutex<Subscriptions>,
    /// Close code and reason to report to `on_close` when the server ends the connection itself.
    /// Boxed: set once at most, and every idle connection would carry its space otherwise.
    ending: Mutex<Option<Box<(u16, String)>>>,
    pub(crate) terminated: AtomicBool,
    /// What the connection task is asked to look at (`signal::*`), and how to wake it. Flags and
    /// one waker instead of a `Notify` each: the task stores no future per thing it waits for.
    signals: AtomicU8,
    task: AtomicWaker,
    inflight_messages: AtomicUsize,
    inflight_bytes: AtomicUsize,
    paused_by_app: AtomicBool,
    /// `refuse_text` was called: the messages queued behind the invalid one are dropped unseen.
    text_refused: AtomicBool,
    /// The application closed or terminated the socket (`close_by_app`): the task hands no
    /// handler its later messages.
    closed_by_app: AtomicBool,
    /// permessage-deflate, when negotiated. Boxed: most connections have none.
    pub(crate) deflate: Option<Box<ConnDeflate>>,
}

/// The lines a send or a flush of a connection touches first: its `Arc`'s counts (a send's
/// batch clones it, the batch's end drops it), its state and its queue. For a loop over many
/// connections, a visit or two ahead (`platform::visit_ahead`); `Outbound::prefetch_targets`
/// follows.
impl Prefetch for Arc<Conn> {
    fn prefetch(&self) {
        // The counts are the two words in front of the value in std's `ArcInner` today; were
        // that to change, this would fetch a line for nothing, no worse.
        prefetch(Arc::as_ptr(self).cast::<usize>().wrapping_sub(2));
        prefetch(&self.state);
        self.out.prefetch();
    }
}

/// A connection's side of permessage-deflate.
pub(crate) struct ConnDeflate {
    pub(crate) params: DeflateParams,
    /// Its own compressor, for context takeover only. Held while a message is compressed *and*
    /// queued, so the client sees messages in the order the window took them in.
    compressor: Mutex<Deflater>,
}

/// Reasons to wake a connection's task.
pub(crate) mod signal {
    /// `close` or `terminate` changed the state.
    pub const STATE: u8 = 1;
    /// Frames were queued for the task to write (or the loop thread hit a full kernel buffer).
    pub const FLUSH: u8 = 2;
    /// Python took messages or resumed reading: the read side may go on.
    pub const RESUME: u8 = 4;
    /// The loop found a large text message's UTF-8 invalid (`Conn::refuse_text`).
    pub const REFUSE_TEXT: u8 = 8;
    /// A test asks the task to panic (`ws._inject_panic`), to check what a bug there leaves.
    pub const PANIC: u8 = 128;
}

impl Conn {
    pub(crate) fn new(
        id: u64,
        remote: Peer,
        shared: Arc<Shared>,
        deflate: Option<DeflateParams>,
    ) -> Self {
        Self {
            id,
            remote,
            shared,
            state: AtomicU8::new(ReadyState::Connecting as u8),
            out: Outbound::default(),
            subscriptions: Mutex::new(Subscriptions::default()),
            ending: Mutex::new(None),
            terminated: AtomicBool::new(false),
            signals: AtomicU8::new(0),
            task: AtomicWaker::new(),
            inflight_messages: AtomicUsize::new(0),
            inflight_bytes: AtomicUsize::new(0),
            paused_by_app: AtomicBool::new(false),
            text_refused: AtomicBool::new(false),
            closed_by_app: AtomicBool::new(false),
            deflate: deflate.map(|params| {
                Box::new(ConnDeflate {
                    params,
                    compressor: Mutex::new(Deflater::new(
                        params.server_max_window_bits,
                        params.server_no_context_takeover,
                    )),
                })
            }),
        }
    }

    /// Ask the connection task to look at `what`, and wake it.
    pub(crate) fn signal(&self, what: u8) {
        self.signals.fetch_or(what, Ordering::AcqRel);
        self.task.wake();
    }

    /// Test hook: make the connection's task panic on its next turn.
    pub fn inject_panic(&self) {
        self.signal(signal::PANIC);
    }

    /// From the task itself: look at `what` on the next turn of its loop, without a wake-up.
    pub(crate) fn mark(&self, what: u8) {
        self.signals.fetch_or(what, Ordering::AcqRel);
    }

    /// The task takes its signals; later ones wake it through `cx`.
    pub(crate) fn take_signals(&self, cx: &Context<'_>) -> u8 {
        self.task.register(cx.waker());
        self.signals.swap(0, Ordering::AcqRel)
    }

    /// Bytes accepted for this connection but not yet written to the kernel.
    pub fn buffered_amount(&self) -> usize {
        self.shared.settle_publishes();
        self.out.buffered()
    }

    /// `ready_state` once the batch's deferred publishes are queued: one of them may have
    /// closed this connection (`close_on_backpressure_limit`). What the application reads.
    pub fn ready_state_now(&self) -> ReadyState {
        self.shared.settle_publishes();
        self.ready_state()
    }

    pub fn ready_state(&self) -> ReadyState {
        match self.state.load(Ordering::Acquire) {
            0 => ReadyState::Connecting,
            1 => ReadyState::Open,
            2 => ReadyState::Closing,
            _ => ReadyState::Closed,
        }
    }

    pub(crate) fn set_state(&self, state: ReadyState) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub(crate) fn transition(&self, from: ReadyState, to: ReadyState) -> bool {
        self.state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn send_text(self: &Arc<Self>, text: &str) -> SendStatus {
        self.counted(self.send_payload(OP_TEXT, text.as_bytes()), text.len())
    }

    pub fn send_binary(self: &Arc<Self>, data: &[u8]) -> SendStatus {
        self.counted(self.send_payload(OP_BINARY, data), data.len())
    }

    /// A message sent by the application is counted in `stats()`; pings and pongs are not
    /// counted, and publishes are counted elsewhere (one update for all their recipients).
    fn counted(&self, status: SendStatus, payload_len: usize) -> SendStatus {
        self.shared.count_send(status, payload_len);
        status
    }

    /// Send a final frame with `opcode` (text or binary) whose payload is already a `Bytes`: a
    /// large one is queued as it is, without a copy (the Python layer shares the `bytes` or
    /// `str` object itself this way).
    pub fn send_owned(self: &Arc<Self>, opcode: u8, payload: Bytes) -> SendStatus {
        let len = payload.len();
        let frame = OutFrame::new(opcode, payload);
        self.counted(self.send_with(len, |out| out.push(&frame, false)), len)
    }

    /// `send_text`, compressed if permessage-deflate was negotiated (Bun's `compress`).
    pub fn send_text_compressed(self: &Arc<Self>, text: &str) -> SendStatus {
        self.counted(self.send_compressed(OP_TEXT, text.as_bytes()), text.len())
    }

    /// `send_binary`, compressed if permessage-deflate was negotiated.
    pub fn send_binary_compressed(self: &Arc<Self>, data: &[u8]) -> SendStatus {
        self.counted(self.send_compressed(OP_BINARY, data), data.len())
    }

    /// Whether the client negotiated permessage-deflate.
    pub fn deflate_negotiated(&self) -> bool {
        self.deflate.is_some()
    }

    /// Compress and queue one data message. `Sent` reports `payload`'s length, as given; the
    /// queue (`buffered_amount`, the limits) counts the compressed frame.
    pub(crate) fn send_compressed(self: &Arc<Self>, opcode: u8, payload: &[u8]) -> SendStatus {
        let Some(deflate) = &self.deflate else {
            return self.send_payload(opcode, payload);
        };
        if deflate.params.stateless() {
            // Nothing carries over between messages: the thread's compressor serves every
            // such connection, and none holds one of its own.
            let bits = deflate.params.server_max_window_bits;
            return self.send_with(payload.len(), |out| {
                deflate::with_shared_deflater(bits, |deflater| {
                    push_compressed(out, deflater, opcode, payload)
                })
            });
        }
        self.send_with(payload.len(), |out| {
            push_compressed(out, &mut deflate.compressor.lock(), opcode, payload)
        })
    }

    pub fn ping(self: &Arc<Self>, payload: &[u8]) -> SendStatus {
        self.send_payload(OP_PING, payload)
    }

    pub fn pong(self: &Arc<Self>, payload: &[u8]) -> SendStatus {
        self.send_payload(OP_PONG, payload)
    }

    fn send_payload(self: &Arc<Self>, opcode: u8, payload: &[u8]) -> SendStatus {
        self.send_with(payload.len(), |out| {
            out.push_payload(opcode, payload, false)
        })
    }

    /// Send one already-encoded frame (a publish shares it between recipients).
    pub(crate) fn send_frame(self: &Arc<Self>, frame: &OutFrame, payload_len: usize) -> SendStatus {
        self.send_with(payload_len, |out| out.push(frame, false))
    }

    /// Send frames already encoded into a topic's arena (a publish within a batch).
    pub(crate) fn send_shared(
        self: &Arc<Self>,
        range: &ArenaRange,
        payload_len: usize,
    ) -> SendStatus {
        self.send_with(payload_len, |out| out.push_shared(range))
    }

    /// The backpressure rules of every send, publish recipient, ping and pong:
    /// not open: dropped; over the limit *before* this frame: dropped (and closed if so
    /// configured); otherwise queued, backpressured if the kernel's buffer is full.
    fn send_with(
        self: &Arc<Self>,
        payload_len: usize,
        push: impl FnOnce(&Outbound) -> Pushed,
    ) -> SendStatus {
        // The batch's deferred publishes were queued before this.
        self.shared.settle_publishes();
        if self.ready_state() != ReadyState::Open {
            return SendStatus::Dropped;
        }
        let limits = &self.shared.config.ws;
        let limit = limits.backpressure_limit;
        let mut buffered = self.out.buffered();
        if limit > 0 && buffered > limit && !self.out.is_refused() {
            // Within a batch or a `cork` nothing is written until it ends: a burst from one
            // handler (or a batch's publishes) may be over the limit with no byte yet offered to
            // the kernel, and dropping now would lose messages for a client that reads as fast
            // as it can (and end it, with `close_on_backpressure_limit`). Offer them first, as
            // uWS writes when its cork buffer overflows (Bun's `cork` included): only what the
            // kernel refuses counts. Not again while the kernel refuses: the connection's task
            // waits for writability. The queue's own flush, not `Conn::flush`: the socket stays
            // congested, and its one `on_drain` comes from the flush that empties it after this
            // batch.
            match self.out.flush_overflowing() {
                Ok(Flushed::Blocked) => self.signal(signal::FLUSH),
                Ok(_) => {}
                Err(_) => {
                    self.end_abruptly(1006, "");
                    return SendStatus::Dropped;
                }
            }
            buffered = self.out.buffered();
        }
        if limit > 0 && buffered > limit {
            if limits.close_on_backpressure_limit {
                // Not when the connection's task finished it first: `on_close` gets its code.
                if self.end_abruptly(1008, "backpressure limit exceeded") {
                    self.shared.log(
                        LogKind::BackpressureClose,
                        self.remote,
                        1008,
                        "backpressure limit exceeded",
                    );
                }
            } else if self.out.first_drop() {
                self.shared.log(
                    LogKind::BackpressureDrop,
                    self.remote,
                    0,
                    "backpressure limit exceeded",
                );
            }
            return SendStatus::Dropped;
        }
        // Writes wait for the end of the handler batch, so a burst from one handler can queue
        // far more than the kernel will take before a write ever sees EAGAIN. Past the
        // high-water mark the socket counts as congested at once (and `on_drain` follows when
        // the queue empties), so a sender that waits for Backpressured slows down before Dropped.
        let mut congested = self.out.is_congested();
        if !congested && buffered >= high_water_mark(limit) {
            self.out.set_congested();
            congested = true;
        }
        // A frame that takes the queue past the limit is offered to the kernel at once (as uWS
        // writes every send at once), so that its status says whether the kernel took it: the
        // next send is dropped if it did not. Left for the batch's end, such a frame was Sent
        // and the next one Dropped, with a limit below a message's size: the sender never saw
        // the Backpressured it slows down at.
        let write_through = limit > 0 && buffered + payload_len > limit && !self.out.is_refused();
        match push(&self.out) {
            Pushed::Refused => return SendStatus::Dropped,
            Pushed::First => self.schedule_flush(),
            Pushed::Queued => {}
        }
        if write_through {
            match self.out.flush_overflowing() {
                Ok(Flushed::Blocked) => {
                    self.signal(signal::FLUSH);
                    congested = true;
                }
                Ok(_) => {}
                Err(_) => {
                    self.end_abruptly(1006, "");
                    return SendStatus::Dropped;
                }
            }
        }
        if congested {
            SendStatus::Backpressured
        } else {
            SendStatus::Sent(payload_len)
        }
    }

    /// Flush on this thread at the end of the current send batch, or have the task do it now.
    fn schedule_flush(self: &Arc<Self>) {
        if !batch::flush_at_end(self) {
            self.signal(signal::FLUSH);
        }
    }

    /// Write what is queued from this thread; what the kernel will not take yet is left to the
    /// connection task, which waits for writability.
    pub(crate) fn flush_or_hand_over(&self) {
        match self.flush() {
            Ok(Flushed::Blocked) => self.signal(signal::FLUSH),
            Ok(_) => {}
            // The socket failed: nothing more can be written to it.
            Err(_) => {
                self.end_abruptly(1006, "");
            }
        }
    }

    /// Write what is queued; `on_drain` is due when a congested queue empties.
    pub(crate) fn flush(&self) -> io::Result<Flushed> {
        let flushed = self.out.flush()?;
        if flushed == Flushed::Done
            && self.out.is_congested()
            && self.out.clear_congested()
            // Not once closing, as Bun's `drain` is not: nothing more can be sent.
            && self.ready_state() == ReadyState::Open
        {
            self.shared.events.push(Event::Drain(self.id));
        }
        Ok(flushed)
    }

    /// Hold what is sent until the matching `uncork`, so it goes out in one write.
    pub fn cork(&self) {
        self.out.cork();
    }

    /// Release one `cork`; the frames it held go out.
    pub fn uncork(self: &Arc<Self>) {
        if self.out.uncork() {
            self.schedule_flush();
        }
    }

    /// The application closes or terminates the socket (before it calls `close` or
    /// `terminate`): as uWS emits no message once a socket is closing, the task reads the
    /// client's later messages, for its close frame behind them, but hands none to a handler,
    /// whichever thread closed it. The server's own closes (`stop`, a timeout, a limit) do
    /// not: a graceful stop still has every message read meanwhile handled.
    pub(crate) fn close_by_app(&self) {
        self.closed_by_app.store(true, Ordering::Release);
    }

    /// Whether a message the task reads now may still reach a handler (`close_by_app`).
    pub(crate) fn hands_up_messages(&self) -> bool {
        !self.closed_by_app.load(Ordering::Acquire)
    }

    /// Start the closing handshake. Frames queued before it are still written.
    pub fn close(&self, code: u16, reason: &str) {
        self.close_with(OutFrame::close(code, reason));
    }

    /// Start the closing handshake with a close frame that carries no code.
    pub fn close_without_code(&self) {
        self.close_with(OutFrame::new(OP_CLOSE, Bytes::new()));
    }

    /// Answer a client's close frame (`Event::PeerClose`): with its code and reason, or with no
    /// code if it carried none (`code` 1005).
    pub fn answer_close(&self, code: u16, reason: &str) {
        self.close_with(OutFrame::close_answer(code, reason));
    }

    fn close_with(&self, frame: OutFrame) {
        self.shared.settle_publishes();
        if self.begin_closing(&frame) {
            self.signal(signal::STATE | signal::FLUSH);
        }
    }

    /// Drop the connection now, without a close frame; `on_close` gets 1006. What is queued is
    /// written first as far as the kernel takes it now, as Bun's `terminate` flushes first:
    /// one write that does not wait, from this thread.
    pub fn terminate(&self) {
        if self.ready_state() != ReadyState::Closed {
            // The batch's deferred publishes to this connection are among what is queued.
            self.shared.settle_publishes();
            // Sealed first: the write then ignores a cork, and the FIN follows it once all of it is out.
            self.out.seal();
            let _ = self.out.flush();
        }
        self.end_abruptly(1006, "");
        // Out of its topics now, as `close` leaves them and Bun's `terminate` does, not when the
        // task ends: until then a publish counted it as a dropped delivery (`MessageDropped`
        // for the "kicked" announcement every other subscriber got) and `subscriber_count`
        // still counted it. Called from Python, with no topic's lock held; a subscribe after
        // this finds the socket closed.
        self.leave_topics(&mut self.subscriptions.lock());
    }

    /// Ended abruptly (`end_abruptly`): it may be in its topics still, until its task ends,
    /// but is no subscriber any more.
    pub(crate) fn is_terminated(&self) -> bool {
        self.terminated.load(Ordering::Relaxed)
    }

    /// Drop the connection now and report `code`/`reason` to `on_close`; false when it was
    /// closed (by its task's `finish`) or ended so before, and `on_close` gets that end's code.
    pub(crate) fn end_abruptly(&self, code: u16, reason: &str) -> bool {
        // What was published before counts as delivered, then is dropped with the queue.
        self.shared.settle_publishes();
        // The flag is raised and the code stored under one hold of the lock, which the task's
        // `finish` takes the code and closes the connection under: a task that saw the flag
        // never finds the code not yet in (it reported 1006 for a 1008 now and then), and one
        // finishing on its own (the client gone) is either seen closed here or gets the code.
        let mut ending = self.ending.lock();
        if self.ready_state() == ReadyState::Closed || self.terminated.swap(true, Ordering::AcqRel)
        {
            return false;
        }
        *ending = Some(Box::new((code, reason.to_owned())));
        drop(ending);
        // Closed at once, as Bun's readyState is after `terminate`: there is no closing
        // handshake to wait for. Not under the subscriptions' lock: a publish that finds this
        // connection over its limit gets here holding the topic's lock, which `finish` takes
        // under the subscriptions' lock. A subscribe that read the state before this store is
        // undone by `finish`, which drains the subscriptions under that lock after it.
        self.set_state(ReadyState::Closed);
        // Nothing more is written from any thread; the task still holds the socket and closes it.
        self.out.seal();
        drop(self.out.detach());
        self.signal(signal::STATE);
        true
    }

    /// Whether the socket is subscribed now (false once closing), as Bun's `subscribe` answers.
    pub fn subscribe(self: &Arc<Self>, topic: &str) -> bool {
        // The batch's deferred publishes go to the subscribers they were published to.
        self.shared.settle_publishes();
        let mut subs = self.subscriptions.lock();
        // Checked under the lock that `begin_closing` and `finish` take, so a closing or closed
        // socket is subscribed to nothing.
        if self.ready_state() != ReadyState::Open {
            return false;
        }
        let (name, added, first) = self.shared.topics.subscribe(topic, self.id, self.clone());
        if added {
            self.shared.subscribed(&name, first);
            subs.insert(name);
        }
        true
    }

    /// Whether the socket was subscribed, as Bun's `unsubscribe` answers.
    pub fn unsubscribe(&self, topic: &str) -> bool {
        self.shared.settle_publishes();
        let mut subs = self.subscriptions.lock();
        let outcome = self.shared.topics.unsubscribe(topic, self.id);
        if outcome == Unsubscribed::No {
            return false;
        }
        self.shared.unsubscribed(topic, outcome);
        subs.remove(topic);
        true
    }

    pub fn is_subscribed(&self, topic: &str) -> bool {
        self.shared.topics.is_subscribed(topic, self.id)
    }

    pub fn subscriptions(&self) -> Vec<Arc<str>> {
        self.subscriptions.lock().to_vec()
    }

    pub fn publish_text(&self, topic: &str, text: &str) -> SendStatus {
        let frame = OutFrame::new(OP_TEXT, Bytes::copy_from_slice(text.as_bytes()));
        self.shared
            .publish(topic, frame, text.len(), self.exclude_self())
    }

    pub fn publish_binary(&self, topic: &str, data: &[u8]) -> SendStatus {
        let frame = OutFrame::new(OP_BINARY, Bytes::copy_from_slice(data));
        self.shared
            .publish(topic, frame, data.len(), self.exclude_self())
    }

    /// `publish_text` or `publish_binary`, compressed for the subscribers that negotiated
    /// permessage-deflate.
    pub fn publish_compressed(&self, topic: &str, opcode: u8, payload: &[u8]) -> SendStatus {
        let frame = OutFrame::new(opcode, Bytes::copy_from_slice(payload));
        self.shared
            .publish_with(topic, frame, payload.len(), self.exclude_self(), true)
    }

    fn exclude_self(&self) -> Option<u64> {
        (!self.shared.config.ws.publish_to_self).then_some(self.id)
    }

    /// Open → Closing, and leave every topic, as uWS's `end()` frees the socket's subscriber:
    /// nothing more may be sent to it, and a publish that still found it would report it
    /// dropped, for as long as the client takes to answer (up to the close timeout). False if
    /// the socket was not open. `close`, the close frame, is queued (sealing the queue) in the
    /// same hold of the lock that the task's `begin_closing` and `finish` take: a task that
    /// finds the state moved as it reads the client's close frame waits there, and finishes
    /// (sealing the queue itself) only with this frame in. Queued after the lock, the frame
    /// was now and then refused, and the client got no close frame.
    pub(crate) fn begin_closing(&self, close: &OutFrame) -> bool {
        // Under the lock `subscribe` checks the state in, so no subscribe comes after this.
        let mut subs = self.subscriptions.lock();
        if !self.transition(ReadyState::Open, ReadyState::Closing) {
            return false;
        }
        self.out.push(close, true);
        self.leave_topics(&mut subs);
        true
    }

    /// Mark the connection closed and leave every topic. Called once, by the connection task,
    /// which reports the code and reason `end_abruptly` stored, if it did: taken as the state
    /// moves to closed, under the lock `end_abruptly` stores them under.
    pub(crate) fn finish(&self) -> Option<(u16, String)> {
        let mut subs = self.subscriptions.lock();
        let ended = {
            let mut ending = self.ending.lock();
            self.set_state(ReadyState::Closed);
            ending.take()
        };
        self.leave_topics(&mut subs);
        ended.map(|ended| *ended)
    }

    fn leave_topics(&self, subs: &mut Subscriptions) {
        for topic in subs.take() {
            let outcome = self.shared.topics.unsubscribe(&topic, self.id);
            self.shared.unsubscribed(&topic, outcome);
        }
    }

    // Read-side flow control: messages handed to the event queue but not yet taken by Python.

    /// `count` messages of `len` bytes in all are about to be queued (or parked behind a
    /// suspended handler): on the in-flight counts and the server's budget before the loop can
    /// take (and subtract) them, or the budget's total could go below zero and wrap.
    pub(crate) fn messages_queued(&self, count: usize, len: usize) {
        self.inflight_messages.fetch_add(count, Ordering::Relaxed);
        self.inflight_bytes.fetch_add(len, Ordering::Relaxed);
        self.shared.budget.adjust(0, len);
    }

    /// A handler of the connection suspended: in flight until it ends, as a message queued
    /// for it would be, so that a close frame read meanwhile waits for its replies.
    pub(crate) fn handler_suspended(&self) {
        self.inflight_messages.fetch_add(1, Ordering::Relaxed);
    }

    /// The suspended handler ended (`handler_suspended`).
    pub(crate) fn handler_ended(&self) {
        // Release, as `messages_taken`'s.
        let messages = release(&self.inflight_messages, 1, Ordering::Release);
        if messages >= MAX_INFLIGHT_MESSAGES {
            self.signal(signal::RESUME);
        }
    }

    /// Messages queued for the loop and not taken yet, parked behind a suspended handler, or
    /// suspended handlers.
    pub(crate) fn has_messages_in_flight(&self) -> bool {
        self.inflight_messages.load(Ordering::Acquire) > 0
    }

    /// Python took a message off the queue.
    pub fn message_taken(&self, len: usize) {
        self.messages_taken(1, len);
    }

    /// Python took `count` messages of `len` bytes in all off the queue (a run of them).
    pub fn messages_taken(&self, count: usize, len: usize) {
        // Release: a task that then reads none in flight sees the batch that took them begun
        // (`EventQueue::handled_since`).
        let messages = release(&self.inflight_messages, count, Ordering::Release);
        let bytes = release(&self.inflight_bytes, len, Ordering::Relaxed);
        // Only when the task may be waiting; it re-checks the caps itself.
        if messages >= MAX_INFLIGHT_MESSAGES || bytes >= MAX_INFLIGHT_BYTES {
            self.signal(signal::RESUME);
        }
    }

    /// A large text message handed on unchecked (`Event::MaskedText`) is not valid UTF-8: the
    /// connection's task refuses the stream with 1007, as it does for invalid text it checks
    /// itself, and the messages it queued behind that one are dropped unseen (`text_refused`).
    /// Called by whoever takes the connection's events, on that thread.
    pub fn refuse_text(&self) {
        self.text_refused.store(true, Ordering::Relaxed);
        self.signal(signal::REFUSE_TEXT);
    }

    /// Whether `refuse_text` was called: the connection's messages still queued came after the
    /// invalid one and are to be dropped, not handled (`message_taken` still counts them).
    pub fn text_refused(&self) -> bool {
        self.text_refused.load(Ordering::Relaxed)
    }

    /// Once `refuse_text` was called, the close the connection ends with, whatever the task
    /// read after the invalid text: the client's close frame or a violation behind it is handed
    /// over to the loop (`Event::PeerClose`, `Event::Fail`) while handlers of earlier messages
    /// have yet to run, and the loop refuses the text after the task has read on. The invalid
    /// text came first, so the loop answers with its 1007 and the task reports it.
    pub fn refused_text_close(&self) -> Option<(u16, &'static str)> {
        let refused = Violation::InvalidUtf8;
        self.text_refused()
            .then(|| (refused.close_code(), refused.reason()))
    }

    /// Python asks to stop (or resume) reading, e.g. while a suspended handler has events parked.
    pub fn pause_reading(&self, paused: bool) {
        self.paused_by_app.store(paused, Ordering::Relaxed);
        if !paused {
            self.signal(signal::RESUME);
        }
    }

    /// Bytes of this connection's messages waiting for Python.
    pub(crate) fn inflight_bytes(&self) -> usize {
        self.inflight_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn reading_paused(&self) -> bool {
        self.reading_paused_with(0, 0)
    }

    /// `reading_paused` once `count` messages of `len` bytes not counted yet are: what a read
    /// still gathering its messages asks. It may answer yes where the count, once made, is
    /// under the caps (Python took messages meanwhile): parsing then stops early, and the
    /// task's next turn finds reading not paused and parses on.
    pub(crate) fn reading_paused_with(&self, count: usize, len: usize) -> bool {
        self.paused_by_app.load(Ordering::Relaxed)
            || self
                .inflight_messages
                .load(Ordering::Relaxed)
                .saturating_add(count)
                >= MAX_INFLIGHT_MESSAGES
            || self
                .inflight_bytes
                .load(Ordering::Relaxed)
                .saturating_add(len)
                >= MAX_INFLIGHT_BYTES
    }
}

/// Take `n` off an in-flight count, never below 0; the count before. The releases come from
/// Python's dispatcher (`_release_parked`, `_release_handler`), whose pairing the engine cannot
/// check: one release too many wrapped the count to `usize::MAX`, and the connection never read
/// again (not even the client's close frame). Now it can only let that connection run past its
/// caps by the difference.
fn release(count: &AtomicUsize, n: usize, order: Ordering) -> usize {
    count
        .fetch_update(order, Ordering::Relaxed, |held| {
            Some(held.saturating_sub(n))
        })
        .unwrap_or_else(|held| held)
}

/// Payloads up to this size are compressed into the thread's scratch buffer and copied into the
/// queue; larger ones into a buffer of their own, queued without a copy.
const COMPRESS_IN_SCRATCH: usize = 64 * 1024;

thread_local! {
    static COMPRESSED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn push_compressed(out: &Outbound, deflater: &mut Deflater, opcode: u8, payload: &[u8]) -> Pushed {
    if payload.len() > COMPRESS_IN_SCRATCH {
        let mut compressed = Vec::new();
        deflater.compress(payload, &mut compressed);
        return out.push(
            &OutFrame::new(opcode | RSV1, Bytes::from(compressed)),
            false,
        );
    }
    COMPRESSED.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        deflater.compress(payload, &mut scratch);
        out.push_payload(opcode | RSV1, &scratch, false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_water_mark_is_256_kib_or_half_the_limit() {
        assert_eq!(high_water_mark(0), 256 * 1024);
        assert_eq!(high_water_mark(16 * 1024 * 1024), 256 * 1024);
        assert_eq!(high_water_mark(1000), 500);
        assert_eq!(high_water_mark(1), 1);
    }

    /// Race `other_side` (the loop, or a publish, on a thread of its own) against `this_side`
    /// (the connection's task, here) on a fresh open connection, `tries` times, the two threads
    /// released together for each; `check` gets what each side returned once both are done.
    fn race<R: Send + 'static, T>(
        tries: u64,
        other_side: impl Fn(&Conn) -> R + Send + 'static,
        mut this_side: impl FnMut(u64, &Arc<Conn>) -> T,
        mut check: impl FnMut(u64, &Shared, &Arc<Conn>, T, R),
    ) {
        use crate::engine::config::ServerConfig;
        use crate::engine::net::Peer;
        use std::sync::{mpsc, Barrier};

        let shared = Arc::new(Shared::new(ServerConfig::default(), None).unwrap());
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let start = Arc::new(Barrier::new(2));
        let (give, take) = mpsc::channel::<Arc<Conn>>();
        let (tell, told) = mpsc::channel::<R>();
        let other = {
            let start = start.clone();
            std::thread::spawn(move || {
                for conn in take {
                    start.wait();
                    tell.send(other_side(&conn)).unwrap();
                    start.wait();
                }
            })
        };
        for id in 0..tries {
            let conn = shared.connection(id, Peer::Ip(ip, 40000), None);
            conn.set_state(ReadyState::Open);
            give.send(conn.clone()).unwrap();
            start.wait();
            let here = this_side(id, &conn);
            start.wait();
            check(id, &shared, &conn, here, told.recv().unwrap());
        }
        drop(give);
        other.join().unwrap();
    }

    /// `terminate` (the loop, or a failed write) racing the task's `finish` (the client gone):
    /// whichever comes last, the connection ends `Closed`, and subscribes to nothing after.
    #[test]
    fn an_abrupt_end_racing_the_task_finishing_leaves_it_closed() {
        race(
            20_000,
            |conn| conn.terminate(),
            |_, conn| conn.finish(),
            |id, shared, conn, _, _| {
                assert_eq!(conn.ready_state(), ReadyState::Closed, "connection {id}");
                conn.subscribe("t");
                assert_eq!(shared.subscriber_count("t"), 0, "connection {id}");
            },
        );
    }

    /// `end_abruptly` (a publish over the backpressure limit, on the loop) racing the task's
    /// `finish`: the task reports the code `end_abruptly` stored (1008) exactly when
    /// `end_abruptly` says it ended the connection. On the odd tries the task finishes only once
    /// it sees the connection terminated, as when that wakes it: it found the flag before the
    /// code was in, and reported 1006. On the even ones it finishes on its own (the client
    /// gone): it took the code before the state was closed, and a 1008 stored in between was
    /// never reported.
    #[test]
    fn an_abrupt_end_racing_the_task_finishing_is_reported_once_with_its_code() {
        race(
            20_000,
            |conn| conn.end_abruptly(1008, "backpressure limit exceeded"),
            |id, conn| {
                if id % 2 == 1 {
                    while !conn.is_terminated() {
                        std::hint::spin_loop();
                    }
                }
                conn.finish()
            },
            |id, _, _, reported, ended| {
                let expected = ended.then(|| (1008, "backpressure limit exceeded".to_owned()));
                assert_eq!(reported, expected, "connection {id}");
            },
        );
    }

    /// The loop's `close` racing the task, which finishes (sealing the queue) once it sees the
    /// state moved, as when it reads the client's close frame then: the loop's close frame is
    /// in the queue by then. It was queued after the state moved, and a task that sealed the
    /// queue in between had it refused: the client, which had sent its close, got none back.
    #[test]
    fn a_close_racing_the_task_finishing_has_its_frame_queued() {
        let close_frame_len = OutFrame::close(1000, "").wire_len();
        race(
            50_000,
            |conn| conn.close(1000, ""),
            |_, conn| {
                while conn.ready_state() == ReadyState::Open {
                    std::hint::spin_loop();
                }
                conn.finish();
                conn.out.seal();
            },
            |id, _, conn, _, _| {
                assert_eq!(conn.out.buffered(), close_frame_len, "connection {id}");
            },
        );
    }

    #[test]
    fn publish_outcome_merges_by_severity() {
        use SendStatus::*;
        assert_eq!(Sent(3).merge(Sent(3)), Sent(3));
        assert_eq!(Sent(3).merge(Backpressured), Backpressured);
        assert_eq!(Backpressured.merge(Dropped), Dropped);
        assert_eq!(Dropped.merge(Sent(3)), Dropped);
    }
}
