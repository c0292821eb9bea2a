//! A WebSocket connection's one task: it reads and parses the client's frames, turns messages
//! into events, writes what the loop thread left queued, runs the idle timer and the close
//! handshake, and owns the socket until the connection ends.
//!
//! One task, not a reader and a writer: a reply or a drain costs no second task wake-up, and an
//! idle connection is one small allocation.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use smallvec::SmallVec;
use tokio::time::{sleep_until, Instant, Sleep};

use super::conn::{signal, Conn, ReadyState};
use super::decode::{Incoming, MessageReader};
use super::encode::OutFrame;
use super::outbound::Flushed;
use super::protocol::{Violation, OP_PING, OP_PONG};
use super::Event;
use crate::engine::bridge::events::LogKind;
use crate::engine::net::{with_read_buf, Stream, LINGER, LINGER_BYTES, READ_BUFFER};
use crate::engine::stats::Counter;

/// How long the loop has to send the close frame for a protocol error before the task does.
const CLOSE_AFTER_HANDLERS: Duration = Duration::from_secs(1);
/// How often a connection the budget keeps unread looks for its client's end (`peer_gone`).
const PEER_CHECK: Duration = Duration::from_secs(1);
/// How long queued frames may keep flushing after the connection ended before it is cut off.
const FLUSH_AFTER_CLOSE: Duration = Duration::from_secs(5);
/// Queued bytes past which automatic pongs are dropped when there is no backpressure limit.
const DEFAULT_REPLY_LIMIT: usize = 16 * 1024 * 1024;
/// A connection is backed up while its queue holds this much, or the kernel refused bytes
/// (congested): its client is not reading what it is sent.
const BACKED_UP: usize = 64 * 1024;
/// Automatic replies queued while backed up, before the rest are dropped until the client reads
/// again (the kernel takes any of its bytes): what a client that pings without reading can make
/// the server hold, about 64 KiB of pongs (it was up to a backpressure limit, 16 MiB by default,
/// for as long as it kept pinging). A client that reads, however slowly, has its pings
/// answered as long as its queue is under the backpressure limit, as uWS answers them.
const REPLIES_BACKED_UP: u8 = 16;
/// Full reads in a row before the task looks at its signals, queued writes and timer again. Not
/// a turn for other connections: the task then goes back to reading in the same poll. They get
/// the worker when this poll's cooperative budget runs out (tokio's 128 units, one per
/// readiness or timer poll) and `poll_read_ready` returns `Pending`.
const READS_PER_TURN: usize = 16;
/// A data frame with at least this much still to come is read straight into its message's
/// buffer (`MessageReader::direct_room`), not copied there out of the read buffer.
const DIRECT_MIN: usize = READ_BUFFER / 2;
/// The most one such read takes: one connection's large message does not hold the worker for
/// much longer than a full read buffer would. Below this when the incoming budget has less room
/// left, but never below `READ_BUFFER`, so a read takes the budget past its limit by no more
/// than before (`budget::PAUSE_FLOOR`).
const DIRECT_MAX: usize = 1024 * 1024;

/// How the connection ended.
struct Ending {
    code: u16,
    reason: String,
    /// Cut the connection now instead of flushing what is queued.
    abrupt: bool,
    /// A protocol error: the loop closes with `code` once earlier events are handled.
    close_after_handlers: bool,
}

impl Ending {
    fn abrupt(code: u16, reason: &str) -> Self {
        Self {
            code,
            reason: reason.to_owned(),
            abrupt: true,
            close_after_handlers: false,
        }
    }

    fn graceful(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            abrupt: false,
            close_after_handlers: false,
        }
    }
}

/// Open the connection and return its task. `already_read` is what hyper read past the request
/// head: the start of the WebSocket stream. The setup runs here, not in the future, so the
/// future, most of an idle connection's memory, holds only what the connection's life needs.
pub(crate) fn run(
    conn: Arc<Conn>,
    stream: Stream,
    already_read: Vec<u8>,
) -> impl Future<Output = ()> {
    let stream = Arc::new(stream);
    conn.out.attach(stream.clone());
    conn.set_state(ReadyState::Open);
    // Counted before the event goes out, so `on_open` (and whatever it tells a client) never
    // comes before the count.
    conn.shared.stats.add(Counter::ConnectionsOpened, 1);
    let pushed_at = conn.shared.events.push(Event::Open(conn.clone()));
    // Pairs with the fence in `Server::stop`, which stores `closing_all` and then closes every
    // open connection: each side stores, fences, then reads what the other stored, so at
    // least one of them sees this connection open and closes it. Release and acquire alone
    // would let both read the old values (a store then a load of another atomic).
    fence(Ordering::SeqCst);
    if conn.shared.closing_all.load(Ordering::Acquire) {
        conn.close(1001, "server shutting down");
    }
    let mut task = Task::new(conn, stream, pushed_at);
    let first = if already_read.is_empty() {
        None
    } else {
        feed(
            &task.conn,
            &mut task.rx,
            &mut task.replies,
            Input::Bytes(&already_read),
        )
    };
    async move {
        let timer = sleep_until(task.next_idle_check());
        tokio::pin!(timer);
        task.arm_message_deadline(timer.as_mut());
        if let Some(ending) = first {
            task.end_reading(ending, timer.as_mut());
        }
        std::future::poll_fn(|cx| task.poll(cx, timer.as_mut())).await;
        // No other thread writes once detached, so this is the last reference: the socket closes.
        drop(task.conn.out.detach());
    }
}

enum Phase {
    /// Reading, writing, timing out.
    Open,
    /// The client broke the protocol: the loop has until the timer to send the close frame
    /// after the handlers of earlier messages (`ending` is used if it does not).
    HandOver(Ending),
    /// The connection has ended: writing what is queued until the timer.
    Flushing,
    /// Written out, and the write side shut (FIN after the close frame): what the client still
    /// sends is read and thrown away (bytes so far) until it closes its side too, within
    /// `LINGER` and `LINGER_BYTES`. Closing a socket with unread bytes in the kernel sends a
    /// RST instead, and a client's TCP stack that gets the RST drops what it had not yet handed
    /// to the client: the close frame and its code.
    Lingering(usize),
    Done,
}

/// The connection's state. One plain struct polled by hand rather than an `async` block with a
/// `select!`: the future of every branch would be stored in it, and at 10,000 idle connections
/// that was over a kilobyte each.
struct Task {
    conn: Arc<Conn>,
    stream: Arc<Stream>,
    rx: Receiver,
    phase: Phase,
    /// When the client last showed it is there: bytes read from it, or its socket turning
    /// writable again after the kernel refused bytes (its TCP stack took part of a backlog,
    /// behind which a ping may wait: uWS resets its idle timer on every write that drains
    /// backpressure). A backlog the kernels' buffers hold whole is not seen this way.
    last_heard: Instant,
    pinged_at: Option<Instant>,
    close_deadline: Option<Instant>,
    /// The kernel refused bytes: wait for writability before flushing again.
    write_blocked: bool,
    /// Not reading because Python is behind or asked so (`Conn::reading_paused`).
    paused: bool,
    /// Not reading because the server-wide budget is spent (`budget.rs`).
    budget_paused: bool,
    /// The client ended its stream while the budget kept it unread: read what is left, budget
    /// or not (`watches_for_peer_end`).
    peer_ended: bool,
    /// `Event::Close` was pushed: the loop will deliver `on_close`.
    reported: bool,
    /// What its automatic replies have seen of a backed-up queue (`BACKED_UP`).
    replies: Replies,
    /// Since when the queue has held bytes the kernel took none of, as last seen by the
    /// timer, and the queue's mark then (`Outbound::write_progress`).
    unwritten_since: Option<Instant>,
    unwritten_mark: u32,
}

/// The read side: the parser, and what the frame or message being received costs.
struct Receiver {
    reader: MessageReader,
    /// Bytes of the incomplete frame or message counted in the server's budget.
    charged: usize,
    /// When the frame or message being received began to arrive; `None` between messages.
    since: Option<Instant>,
    /// The drain the last events this connection queued wait for (`EventQueue::handled_since`).
    pushed_at: u32,
    /// The budget's wake-up generation this task is registered in (its low 32 bits: beside
    /// `pushed_at` they take the room one `u64` did); `u32::MAX`: none. Every wake-up wakes
    /// the tasks registered, which then register again, so none is still registered when
    /// the count comes round.
    budget_generation: u32,
}

impl Receiver {
    /// What `charged` counts as waiting to be inflated (`IncomingBudget::adjust_awaiting`):
    /// all of it while the reader waits to inflate its message. Only `feed` and `abandon`
    /// change that, so the task reads it before and after them rather than keeping it.
    fn awaiting(&self) -> usize {
        if self.reader.awaiting_inflation() {
            self.charged
        } else {
            0
        }
    }
}

/// Every way out of a task releases the connection, a panic included (tokio catches it and
/// drops the future): a task that ends without having reported the end closes the socket,
/// unregisters the connection and delivers `on_close(1011)`, instead of leaving the descriptor
/// attached, `pending_websockets` counting it and `on_close` never called.
impl Drop for Task {
    fn drop(&mut self) {
        // Held until now, its queue flushed or given up (`Shared::unregister`).
        self.conn.shared.release_slot();
        self.release_budget();
        if self.reported {
            return;
        }
        let conn = &self.conn;
        conn.finish();
        conn.out.seal();
        conn.terminated.store(true, Ordering::Release);
        drop(conn.out.detach());
        self.report_end(1011, "internal error".to_owned());
    }
}

impl Task {
    fn new(conn: Arc<Conn>, stream: Arc<Stream>, pushed_at: u32) -> Self {
        let mut reader = MessageReader::new(conn.shared.config.ws.max_payload_length);
        if let Some(deflate) = &conn.deflate {
            reader.inflate_with(&deflate.params);
        }
        Self {
            conn,
            stream,
            rx: Receiver {
                reader,
                charged: 0,
                since: None,
                pushed_at,
                budget_generation: u32::MAX,
            },
            replies: Replies::default(),
            unwritten_since: None,
            unwritten_mark: 0,
            phase: Phase::Open,
            last_heard: Instant::now(),
            pinged_at: None,
            close_deadline: None,
            write_blocked: false,
            paused: false,
            budget_paused: false,
            peer_ended: false,
            reported: false,
        }
    }

    /// When the frame or message being received must have arrived whole.
    fn message_due(&self) -> Option<Instant> {
        let timeout = self.conn.shared.config.ws.message_timeout;
        match self.rx.since {
            Some(since) if !timeout.is_zero() => Some(since + timeout),
            _ => None,
        }
    }

    /// Bring the timer forward to the message deadline, if that comes first.
    fn arm_message_deadline(&self, mut timer: Pin<&mut Sleep>) {
        if let Some(due) = self.message_due() {
            if due < timer.deadline() {
                timer.as_mut().reset(due);
            }
        }
    }

    /// Whether the server-wide budget asks this connection to stop reading. A paused task is
    /// registered to be woken when the budget frees up.
    fn budget_pauses(&mut self) -> bool {
        let budget = &self.conn.shared.budget;
        // A compressed message waiting to be inflated holds little, but would hold up to
        // `max_payload` once inflated: it waits for room whatever the floor, room that the
        // messages waiting as it does (its own included) do not take.
        let to_inflate = self.rx.reader.awaiting_inflation();
        let waits = if to_inflate {
            budget.inflate_room().is_none()
        } else {
            budget.pauses(self.rx.charged + self.conn.inflight_bytes())
        };
        if !waits {
            return false;
        }
        if self.rx.budget_generation == budget.generation() as u32 {
            return true;
        }
        match budget.wait(&self.conn, to_inflate) {
            Some(generation) => {
                self.rx.budget_generation = generation as u32;
                true
            }
            None => false,
        }
    }

    /// A pause for the budget is counted, and the first in a minute logged: a server that
    /// stops reading its large messages says so (and which limit made it).
    #[cold]
    fn note_budget_pause(&self) {
        let shared = &self.conn.shared;
        shared.stats.add(Counter::ReadsPaused, 1);
        if shared.budget.pause_to_log() {
            let limit = shared.budget.limit();
            shared.log(
                LogKind::ReadsPaused,
                self.conn.remote,
                0,
                format!(
                    "the server holds more than max_incoming_bytes ({limit} bytes) of incoming \
                     messages and request bodies"
                ),
            );
        }
    }

    fn release_budget(&mut self) {
        let budget = &self.conn.shared.budget;
        budget.adjust_awaiting(self.rx.awaiting(), 0);
        budget.release(self.rx.charged);
        self.rx.charged = 0;
    }

    /// Whether the client has read none of what is queued for it for `idle`, however much it
    /// sends: such a client holds its queue (up to `backpressure_limit` and a message) for as
    /// long as it keeps sending, pings included, since only the idle timeout ended it, and
    /// that counts what it sends. Checked by the timer, which runs at least every `ping_after`
    /// while the client sends, and sooner when a check is due. Not while the server does not
    /// read the client (Python's pause, the budget's): a client blocked in its own send cannot
    /// read either, and that is the server's doing.
    fn reads_nothing(&mut self, now: Instant, idle: Duration) -> bool {
        if self.paused || self.budget_paused {
            self.unwritten_since = None;
            return false;
        }
        let Some(mark) = self.conn.out.write_progress() else {
            self.unwritten_since = None;
            return false;
        };
        match self.unwritten_since {
            Some(since) if mark == self.unwritten_mark => {
                if now < since + idle {
                    return false;
                }
                // Writability is reported only once a third of the socket's buffer is free: a
                // client reading slowly may have made room no write has been offered yet.
                // Offered now, whatever the kernel takes counts as reading.
                if self.conn.flush().is_err() {
                    return false; // the socket failed: the next turn ends the connection
                }
                match self.conn.out.write_progress() {
                    Some(now_mark) if now_mark == mark => true,
                    _ => {
                        self.unwritten_since = None;
                        false
                    }
                }
            }
            _ => {
                self.unwritten_since = Some(now);
                self.unwritten_mark = mark;
                false
            }
        }
    }

    fn idle_timeout(&self) -> Ending {
        let conn = &self.conn;
        conn.shared
            .log(LogKind::IdleTimeout, conn.remote, 1006, "idle timeout");
        Ending::abrupt(1006, "idle timeout")
    }

    /// The message took longer than `message_timeout`: drop it and close with 1008.
    fn message_timed_out(&mut self) -> Ending {
        self.refuse_now(1008, "message timeout")
    }

    /// Stop reading, drop what is partly read, and refuse the stream with `code`.
    fn refuse_now(&mut self, code: u16, reason: &'static str) -> Ending {
        // Released before the reader forgets whether its message waited to be inflated.
        self.release_budget();
        self.rx.reader.abandon();
        self.rx.since = None;
        refuse(&self.conn, code, reason)
    }

    /// With pings, a silent client is pinged at 3/4 of the timeout and has the rest to answer.
    fn ping_after(&self) -> Duration {
        let limits = &self.conn.shared.config.ws;
        if limits.send_pings {
            limits.idle_timeout * 3 / 4
        } else {
            limits.idle_timeout
        }
    }

    fn next_idle_check(&self) -> Instant {
        if self.conn.shared.config.ws.idle_timeout.is_zero() {
            far_future()
        } else {
            Instant::now() + self.ping_after()
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<()> {
        // Each turn polls every source the phase waits on, so each has registered this task's
        // waker by the time a turn with no progress returns Pending.
        loop {
            let signals = self.conn.take_signals(cx);
            if signals & signal::PANIC != 0 {
                panic!("connection {}: panic injected by a test", self.conn.id);
            }
            let step = match self.phase {
                Phase::Open => match self.turn_open(cx, signals, timer.as_mut()) {
                    Step::Done(ending) => {
                        self.end_reading(ending, timer.as_mut());
                        Step::Progress
                    }
                    Step::Progress => Step::Progress,
                    Step::Idle => Step::Idle,
                },
                Phase::HandOver(_) => self.turn_hand_over(cx, signals, timer.as_mut()),
                Phase::Flushing => self.turn_flushing(cx, signals, timer.as_mut()),
                Phase::Lingering(_) => self.turn_lingering(cx, timer.as_mut()),
                Phase::Done => return Poll::Ready(()),
            };
            if matches!(step, Step::Idle) {
                return Poll::Pending;
            }
        }
    }

    fn turn_open(
        &mut self,
        cx: &mut Context<'_>,
        signals: u8,
        mut timer: Pin<&mut Sleep>,
    ) -> Step<Ending> {
        if self.conn.terminated.load(Ordering::Acquire) {
            return Step::Done(Ending::abrupt(1006, ""));
        }
        if signals & signal::REFUSE_TEXT != 0 {
            let violation = Violation::InvalidUtf8;
            return Step::Done(self.refuse_now(violation.close_code(), violation.reason()));
        }
        if signals & signal::STATE != 0
            && self.close_deadline.is_none()
            && self.conn.ready_state() == ReadyState::Closing
        {
            let deadline = Instant::now() + self.conn.shared.config.close_timeout;
            self.close_deadline = Some(deadline);
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }
        }
        let mut step = match self.poll_write(cx, signals) {
            Step::Done(()) => return Step::Done(Ending::abrupt(1006, "")),
            Step::Progress => Step::Progress,
            Step::Idle => Step::Idle,
        };
        if timer.as_mut().poll(cx).is_ready() {
            if let Some(ending) = self.on_timer(timer.as_mut()) {
                return Step::Done(ending);
            }
            // Re-armed: the next turn polls it again, which registers it.
            step = Step::Progress;
        }
        let paused = self.conn.reading_paused();
        let budget_paused = !paused && !self.peer_ended && self.budget_pauses();
        if budget_paused && !self.budget_paused && !self.paused {
            // It was reading: a connection that goes from the application's pause to the
            // budget's read nothing in between.
            self.note_budget_pause();
        }
        if (self.paused || self.budget_paused) && !(paused || budget_paused) {
            // Time spent not reading is not the client's silence.
            self.last_heard = Instant::now();
        }
        self.paused = paused;
        self.budget_paused = budget_paused;
        if paused || budget_paused {
            if self.watches_for_peer_end() {
                let check = Instant::now() + PEER_CHECK;
                if check < timer.deadline() {
                    timer.as_mut().reset(check);
                    // The next turn polls the timer, which registers it.
                    return Step::Progress;
                }
            }
            return step;
        }
        if self.rx.reader.stalled() {
            // Frames that arrived while the loop was behind: parse them before reading more.
            let ended = feed(
                &self.conn,
                &mut self.rx,
                &mut self.replies,
                Input::Bytes(&[]),
            );
            self.arm_message_deadline(timer);
            return match ended {
                Some(ending) => Step::Done(ending),
                None => Step::Progress,
            };
        }
        // Plaintext a TLS session already decrypted is read first: the socket will not turn
        // readable for it.
        let ready = if self.stream.has_buffered_input() {
            Poll::Ready(Ok(()))
        } else {
            self.stream.poll_read_ready(cx)
        };
        match ready {
            Poll::Ready(Ok(())) => {
                match read(&self.conn, &self.stream, &mut self.rx, &mut self.replies) {
                    Read::Some => {
                        self.last_heard = Instant::now();
                        self.arm_message_deadline(timer);
                        Step::Progress
                    }
                    Read::Nothing => Step::Progress,
                    Read::Ended(ending) => Step::Done(ending),
                }
            }
            Poll::Ready(Err(_)) => Step::Done(Ending::abrupt(1006, "")),
            Poll::Pending => step,
        }
    }

    /// The idle timer (or the close deadline) fired: ping, give up, or re-arm.
    fn on_timer(&mut self, timer: Pin<&mut Sleep>) -> Option<Ending> {
        let (idle, send_pings) = {
            let limits = &self.conn.shared.config.ws;
            (limits.idle_timeout, limits.send_pings)
        };
        let ping_after = self.ping_after();
        let now = Instant::now();
        // Python pauses reading without waking the task (nothing to do until it resumes), so
        // the flag the last turn saw may be stale: a client silent because everything it sent
        // was already read must not be timed out while Python is the one behind.
        self.paused = self.conn.reading_paused();
        if self.close_deadline.is_some_and(|d| now >= d) {
            // Said, as the idle timeout is: otherwise the only trace of a client that never
            // answers (or a proxy that swallows the frame) was a 1006 in `closes_by_code`.
            self.conn.shared.log(
                LogKind::CloseTimeout,
                self.conn.remote,
                1006,
                "no answer to the close frame within the close timeout",
            );
            return Some(Ending::abrupt(1006, ""));
        }
        if self.watches_for_peer_end() && self.stream.peer_gone() {
            // Read the rest, budget or not: what the kernel holds is all the client will ever
            // send (bounded by its receive buffer), messages it sent whole are handled, and the
            // end of the stream ends the connection as it always does (1006 mid-message).
            self.peer_ended = true;
            self.budget_paused = false;
        }
        if self.message_due().is_some_and(|due| now >= due) {
            if !self.paused && !self.rx.reader.awaiting_inflation() {
                return Some(self.message_timed_out());
            }
            // Python is behind (or asked to pause), or the message has all arrived and waits
            // for the budget to inflate it: the client is not the one taking long. A pause by
            // the budget for a message still arriving does not count: the client is among
            // those holding most.
            self.rx.since = Some(now);
        }
        if self.pinged_at.is_some_and(|at| self.last_heard > at) {
            self.pinged_at = None;
        }
        if !idle.is_zero() && self.reads_nothing(now, idle) {
            let conn = &self.conn;
            conn.shared.log(
                LogKind::IdleTimeout,
                conn.remote,
                1006,
                "it read none of what was queued for it within the idle timeout",
            );
            // A reason of its own: the application can tell it from a silent client.
            return Some(Ending::abrupt(1006, "client not reading"));
        }
        let next = if idle.is_zero() {
            far_future()
        } else if self.paused || self.budget_paused {
            now + ping_after
        } else if let Some(at) = self.pinged_at {
            let give_up = at + (idle - ping_after);
            if now >= give_up {
                return Some(self.idle_timeout());
            }
            give_up
        } else if now >= self.last_heard + ping_after {
            if !send_pings {
                return Some(self.idle_timeout());
            }
            queue_reply(
                &self.conn,
                OutFrame::new(OP_PING, Bytes::new()),
                &mut self.replies,
            );
            self.pinged_at = Some(now);
            now + (idle - ping_after)
        } else {
            self.last_heard + ping_after
        };
        let next = self.close_deadline.map_or(next, |d| d.min(next));
        let next = self
            .unwritten_since
            .map_or(next, |since| next.min(since + idle));
        let next = if self.watches_for_peer_end() {
            next.min(now + PEER_CHECK)
        } else {
            next
        };
        timer.reset(self.message_due().map_or(next, |due| due.min(next)));
        None
    }

    /// Whether this connection looks for its client's end while it is not read: when the
    /// server-wide budget keeps it unread (Python's pause has Python to end it), and unless a
    /// message that has all arrived waits there to be inflated (delivered once the budget
    /// frees up, whether or not its client is still there). A client that left with part of a
    /// message sent held its share of the budget until its message deadline, for ever with
    /// `message_timeout(0)`, and slowed every other client meanwhile. Only an end that has
    /// reached the server is seen: a FIN queued behind more than the receive window the
    /// unread connection advertises waits for its message deadline, as before.
    fn watches_for_peer_end(&self) -> bool {
        self.budget_paused && !self.rx.reader.awaiting_inflation()
    }

    /// The read side is over: hand the close over to the loop, or finish.
    fn end_reading(&mut self, ending: Ending, mut timer: Pin<&mut Sleep>) {
        if ending.close_after_handlers {
            // Bounded: a loop that is stuck (or a handler that never returns) does not keep a
            // broken connection half-open.
            timer.as_mut().reset(Instant::now() + CLOSE_AFTER_HANDLERS);
            self.phase = Phase::HandOver(ending);
        } else {
            self.finish(ending, timer);
        }
    }

    fn turn_hand_over(
        &mut self,
        cx: &mut Context<'_>,
        signals: u8,
        mut timer: Pin<&mut Sleep>,
    ) -> Step<()> {
        self.hand_over_after_refusal();
        let timed_out = timer.as_mut().poll(cx).is_ready();
        // `Conn::close` moves the state on before it queues its close frame, and finishing seals
        // the queue: finish once that frame is in (the close signals the task then), or it is
        // refused and the client gets no close frame; at the latest when the timer fires.
        if self.conn.terminated.load(Ordering::Acquire)
            || (self.conn.ready_state() != ReadyState::Open
                && (self.conn.out.is_sealed() || timed_out))
        {
            let Phase::HandOver(ending) = std::mem::replace(&mut self.phase, Phase::Done) else {
                unreachable!("called in the hand-over phase");
            };
            let ending = Ending {
                close_after_handlers: false,
                ..ending
            };
            self.finish(ending, timer);
            return Step::Progress;
        }
        if timed_out {
            if let Phase::HandOver(ending) = &self.phase {
                self.conn.answer_close(ending.code, &ending.reason);
            }
            return Step::Progress;
        }
        match self.poll_write(cx, signals) {
            Step::Done(()) => {
                // The socket failed: nothing more can be written to it.
                self.conn.end_abruptly(1006, "");
                Step::Progress
            }
            other => other,
        }
    }

    /// The loop refused a large text (`Conn::refused_text_close`) that came before what the
    /// hand-over is for: the connection ends with the refusal's code, logged as a refusal the
    /// task finds itself is. Read on every turn, not only on `signal::REFUSE_TEXT`: the loop's
    /// close that follows the refusal can be seen in the same turn as, or before, the signal.
    fn hand_over_after_refusal(&mut self) {
        let Phase::HandOver(ending) = &mut self.phase else {
            unreachable!("called in the hand-over phase");
        };
        if let Some((code, reason)) = self.conn.refused_text_close() {
            if (ending.code, ending.reason.as_str()) != (code, reason) {
                self.conn
                    .shared
                    .log(LogKind::ClientRefused, self.conn.remote, code, reason);
                ending.code = code;
                ending.reason = reason.to_owned();
            }
        }
    }

    /// Deliver `on_close`: the connection is unregistered first, so `pending_websockets` there
    /// no longer counts it (`stop()` still waits for this task, and its flush, through the
    /// tracker), and counted closed first, as it is counted opened before `on_open`.
    fn report_end(&mut self, code: u16, reason: String) {
        let conn = &self.conn;
        conn.shared.unregister(conn.id);
        conn.shared.stats.closed(code);
        conn.shared.events.push(Event::Close(conn.id, code, reason));
        self.reported = true;
    }

    /// Report the end to Python, then flush what is queued (unless the end is abrupt).
    fn finish(&mut self, ending: Ending, mut timer: Pin<&mut Sleep>) {
        self.release_budget();
        self.rx.reader.abandon();
        let conn = &self.conn;
        let ending = match conn.finish() {
            Some((code, reason)) => Ending::abrupt(code, &reason),
            None => ending,
        };
        conn.out.seal();
        if ending.abrupt {
            conn.terminated.store(true, Ordering::Release);
        }
        self.report_end(ending.code, ending.reason);
        if ending.abrupt {
            self.phase = Phase::Done;
        } else {
            timer.as_mut().reset(Instant::now() + FLUSH_AFTER_CLOSE);
            self.conn.mark(signal::FLUSH);
            self.phase = Phase::Flushing;
        }
    }

    fn turn_flushing(
        &mut self,
        cx: &mut Context<'_>,
        signals: u8,
        mut timer: Pin<&mut Sleep>,
    ) -> Step<()> {
        if self.conn.terminated.load(Ordering::Acquire) || timer.as_mut().poll(cx).is_ready() {
            self.phase = Phase::Done;
            return Step::Progress;
        }
        match self.poll_write(cx, signals) {
            Step::Done(()) => self.phase = Phase::Done,
            Step::Progress if !self.write_blocked && self.conn.out.is_empty() => {
                timer.as_mut().reset(Instant::now() + LINGER);
                self.phase = Phase::Lingering(0);
            }
            Step::Progress => {}
            Step::Idle => return Step::Idle,
        }
        Step::Progress
    }

    fn turn_lingering(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Step<()> {
        if self.conn.terminated.load(Ordering::Acquire) || timer.as_mut().poll(cx).is_ready() {
            self.phase = Phase::Done;
            return Step::Progress;
        }
        match self.stream.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => {
                self.phase = Phase::Done;
                return Step::Progress;
            }
            Poll::Pending => return Step::Idle,
        }
        let Phase::Lingering(discarded) = &mut self.phase else {
            unreachable!("called in the lingering phase");
        };
        let over = with_read_buf(|buf| match self.stream.read(buf) {
            Ok(0) => true,
            Ok(n) => {
                *discarded += n;
                *discarded >= LINGER_BYTES
            }
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        });
        if over {
            self.phase = Phase::Done;
        }
        Step::Progress
    }

    /// Flush when asked to or when the socket turned writable. `Done` means the socket failed.
    fn poll_write(&mut self, cx: &mut Context<'_>, signals: u8) -> Step<()> {
        if self.write_blocked {
            match self.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {
                    self.write_blocked = false;
                    // Room the kernel refused is free again: the client's side took bytes
                    // (`last_heard`).
                    self.last_heard = Instant::now();
                }
                Poll::Ready(Err(_)) => return Step::Done(()),
                Poll::Pending => return Step::Idle,
            }
        } else if signals & signal::FLUSH == 0 {
            return Step::Idle;
        }
        match self.conn.flush() {
            Ok(flushed) => {
                self.write_blocked = flushed == Flushed::Blocked;
                Step::Progress
            }
            Err(_) => Step::Done(()),
        }
    }
}

/// What one turn of a phase did.
enum Step<T> {
    Progress,
    /// Nothing to do until a waker fires.
    Idle,
    Done(T),
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

enum Read {
    Some,
    Nothing,
    Ended(Ending),
}

/// Read and parse what the socket has, into this worker's buffer.
fn read(conn: &Arc<Conn>, stream: &Stream, rx: &mut Receiver, replies: &mut Replies) -> Read {
    with_read_buf(|buf| {
        let mut got = Read::Nothing;
        for _ in 0..READS_PER_TURN {
            let max = conn.shared.budget.headroom().clamp(READ_BUFFER, DIRECT_MAX);
            let (result, direct) = match rx.reader.direct_room(DIRECT_MIN, max) {
                Some(room) => {
                    let len = room.len();
                    match stream.read_uninit(room) {
                        Some(result) => (result, Some(len)),
                        None => (stream.read(buf), None),
                    }
                }
                None => (stream.read(buf), None),
            };
            match result {
                Ok(0) => {
                    stream.answer_end_of_stream();
                    return Read::Ended(Ending::abrupt(1006, ""));
                }
                Ok(n) => {
                    got = Read::Some;
                    let input = match direct {
                        Some(_) => Input::Direct(n),
                        None => Input::Bytes(&buf[..n]),
                    };
                    if let Some(ending) = feed(conn, rx, replies, input) {
                        return Read::Ended(ending);
                    }
                    if n < direct.unwrap_or(buf.len())
                        || rx.reader.stalled()
                        || conn.reading_paused()
                        || conn
                            .shared
                            .budget
                            .pauses(rx.charged + conn.inflight_bytes())
                    {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Read::Ended(Ending::abrupt(1006, "")),
            }
        }
        got
    })
}

/// What a read brought.
enum Input<'a> {
    /// Bytes in the read buffer.
    Bytes(&'a [u8]),
    /// This many bytes read straight into the room `MessageReader::direct_room` gave.
    Direct(usize),
}

/// Hand the messages a read completed to the loop; `Some` when the read side is over.
fn feed(
    conn: &Arc<Conn>,
    rx: &mut Receiver,
    replies: &mut Replies,
    input: Input<'_>,
) -> Option<Ending> {
    let mut closed: Option<Ending> = None;
    // Data messages and their bytes (for the counters), added up once per read rather than
    // per message.
    let mut messages = 0u64;
    let mut data_bytes = 0u64;
    // The read's messages, queued for the loop together once it is parsed (`push_all`).
    let mut handed = Handed::default();
    let pushed_at = rx.pushed_at;
    let was_awaiting = rx.awaiting();
    // Once the application has closed the socket (from any thread), its messages are read,
    // for the client's close frame behind them, but handed to no handler (`Conn::close_by_app`;
    // the dispatcher drops those already queued).
    let mut deliver = |message| match message {
        // Parsing stops at the message that reaches the in-flight caps; the rest waits.
        Incoming::Text(text) => {
            messages += 1;
            data_bytes += text.len() as u64;
            !conn.hands_up_messages()
                || hand_over(conn, text.len(), Event::Text(conn.id, text), &mut handed)
        }
        // Counted as read, like the messages read after it, if its UTF-8 then proves invalid.
        Incoming::MaskedText(data) => {
            messages += 1;
            data_bytes += data.len() as u64;
            !conn.hands_up_messages()
                || hand_over(
                    conn,
                    data.len(),
                    Event::MaskedText(conn.id, data),
                    &mut handed,
                )
        }
        Incoming::Binary(data) => {
            messages += 1;
            data_bytes += data.len() as u64;
            !conn.hands_up_messages()
                || hand_over(conn, data.len(), Event::Binary(conn.id, data), &mut handed)
        }
        // Handed to Python, a ping or pong is a message in flight like any other: a client
        // pinging faster than its handler runs meets the same caps (and the budget).
        Incoming::Ping(payload) => {
            let go_on = !conn.shared.ping_events.load(Ordering::Relaxed)
                || !conn.hands_up_messages()
                || hand_over(
                    conn,
                    payload.len(),
                    Event::Ping(conn.id, payload.clone()),
                    &mut handed,
                );
            queue_reply(conn, OutFrame::new(OP_PONG, payload), replies);
            go_on
        }
        Incoming::Pong(payload) => {
            !conn.shared.pong_events.load(Ordering::Relaxed)
                || !conn.hands_up_messages()
                || hand_over(
                    conn,
                    payload.len(),
                    Event::Pong(conn.id, payload),
                    &mut handed,
                )
        }
        Incoming::Close(frame) => {
            let (code, reason) = frame.unwrap_or((1005, String::new()));
            // `handled_since` before the in-flight count: a batch seen handled makes visible
            // what its handlers counted in flight (a message parked, a handler suspended),
            // which a count read first could have missed, and a text it refused
            // (`refuse_text`), whose signal this turn has not taken yet: that text came first,
            // so the loop answers this close with its 1007 (`Conn::refused_text_close`).
            if conn.ready_state() == ReadyState::Open
                && (!handed.events.is_empty()
                    || !conn.shared.events.handled_since(pushed_at)
                    || conn.has_messages_in_flight()
                    || conn.text_refused())
            {
                // Handlers of what came before it (`on_open` too) have not all run, or one is
                // suspended: the loop answers it once they have (`Event::PeerClose`), so that
                // their replies go first, as uWS's do (it runs each message's handler before
                // it reads on). Bounded as a violation's close is (`CLOSE_AFTER_HANDLERS`).
                closed = Some(Ending {
                    code,
                    reason,
                    abrupt: false,
                    close_after_handlers: true,
                });
                return true;
            }
            // Publishes the loop has already reported as queued go out before the reply.
            conn.shared.settle_publishes();
            // The client started the handshake: echo its code and reason, as Bun and
            // `websockets` do, unless the loop's `close` started it first (its close frame is
            // the answer then).
            if conn.begin_closing(&OutFrame::close_answer(code, &reason)) {
                conn.mark(signal::FLUSH);
            }
            closed = Some(Ending::graceful(code, reason));
            true
        }
    };
    rx.reader
        .set_inflate_room(|| conn.shared.budget.inflate_room());
    let parsed = match input {
        Input::Bytes(data) => rx.reader.feed(data, &mut deliver),
        Input::Direct(n) => rx.reader.direct_received(n, &mut deliver),
    };
    // Before anything else this read queues (a violation's `Event::Fail`), and before the
    // connection's `Event::Close`, which its task pushes once this returns.
    handed.pass_on(conn);
    if let Some(at) = handed.pushed_at {
        rx.pushed_at = at;
    }
    if let Some(ending) = closed.as_ref().filter(|e| e.close_after_handlers) {
        let close = Event::PeerClose(conn.id, ending.code, ending.reason.clone());
        rx.pushed_at = conn.shared.events.push(close);
    }
    // What is left partly read, once per read: the budget is one counter shared by every
    // thread. (The messages handed over were charged as they were passed on.)
    let held = rx.reader.buffered();
    conn.shared.budget.adjust(rx.charged, held);
    rx.charged = held;
    conn.shared
        .budget
        .adjust_awaiting(was_awaiting, rx.awaiting());
    if messages > 0 {
        conn.shared.stats.add_all([
            (Counter::MessagesIn, messages),
            (Counter::BytesIn, data_bytes),
        ]);
    }
    // A message completed: the deadline of the one that started after it (if any) runs anew.
    if !rx.reader.receiving() {
        rx.since = None;
    } else if rx.since.is_none() || messages > 0 {
        // A control frame in the middle of a message does not restart its clock.
        rx.since = Some(Instant::now());
    }
    match parsed {
        Ok(()) => closed,
        Err(violation) => Some(refuse(conn, violation.close_code(), violation.reason())),
    }
}

/// A read's messages on their way to the loop, passed on together once the read is parsed:
/// one lock of the event queue, and one update of the connection's in-flight counts, per read
/// rather than per message (S1's reads carry 16 messages; per message, the lock and the two
/// atomic adds were 4-5% of its CPU).
#[derive(Default)]
struct Handed {
    /// Inline up to a typical read's worth.
    events: SmallVec<[Event; 16]>,
    /// Their number and payload bytes, not yet in the connection's in-flight counts.
    messages: usize,
    bytes: usize,
    /// What the last `push_all` returned.
    pushed_at: Option<u32>,
}

/// Messages a read passes on as soon as this many wait: a read full of tiny messages neither
/// holds them all back nor grows `Handed` without bound.
const HANDED_MAX: usize = 64;

impl Handed {
    fn pass_on(&mut self, conn: &Conn) {
        if self.events.is_empty() {
            return;
        }
        // Counted, and charged to the budget, before the loop can take them.
        conn.messages_queued(self.messages, self.bytes);
        (self.messages, self.bytes) = (0, 0);
        self.pushed_at = Some(conn.shared.events.push_all(self.events.drain(..)));
    }
}

/// Gather a message of `len` bytes for the loop; false when the in-flight caps, counting it,
/// now stop parsing.
fn hand_over(conn: &Conn, len: usize, event: Event, handed: &mut Handed) -> bool {
    handed.events.push(event);
    handed.messages += 1;
    handed.bytes += len;
    if handed.events.len() >= HANDED_MAX {
        handed.pass_on(conn);
    }
    !conn.reading_paused_with(handed.messages, handed.bytes)
}

/// What the automatic replies of a backed-up connection have seen (`queue_reply`). Packed: five
/// bytes fit in the task's padding, where eight took it past 384 bytes.
#[derive(Default)]
#[repr(C, packed)]
struct Replies {
    /// Replies queued since the connection was last not backed up.
    backed_up: u8,
    /// `Outbound::writes` at the last reply.
    writes_seen: u32,
}

/// An automatic reply (pong, keep-alive ping). A client that pings but never reads must not grow
/// the queue: once it is backed up, only [`REPLIES_BACKED_UP`] more replies are queued until it
/// reads again, and never past the backpressure limit; the others are dropped, as RFC 6455
/// 5.5.3 allows (a pong need not answer every ping). A sealed queue refuses them anyway.
fn queue_reply(conn: &Conn, frame: OutFrame, replies: &mut Replies) {
    // Read since the last reply: a client that reads slowly while the application keeps its
    // queue full is backed up for good, and lost every pong after its 16th (the newest ping
    // unanswered, which RFC 6455 5.5.3 does not allow).
    let writes = conn.out.writes();
    let read_since = replies.writes_seen != writes;
    replies.writes_seen = writes;
    if read_since || conn.out.buffered() < BACKED_UP && !conn.out.is_congested() {
        replies.backed_up = 0;
    } else if replies.backed_up >= REPLIES_BACKED_UP {
        return;
    } else {
        replies.backed_up += 1;
    }
    let limit = match conn.shared.config.ws.backpressure_limit {
        0 => DEFAULT_REPLY_LIMIT,
        limit => limit,
    };
    if conn.out.buffered() <= limit {
        conn.out.push(&frame, false);
        conn.mark(signal::FLUSH);
    }
}

/// Refuse the client's stream with `code`: the one RFC 6455 asks for a violation, or 1008.
fn refuse(conn: &Conn, code: u16, reason: &'static str) -> Ending {
    conn.shared
        .log(LogKind::ClientRefused, conn.remote, code, reason);
    if conn.ready_state() == ReadyState::Open {
        // The messages that arrived before the violation are still waiting for their handlers,
        // whose replies must go out before the close frame: the loop sends it, in order.
        conn.shared.events.push(Event::Fail(conn.id, code, reason));
        return Ending {
            code,
            reason: reason.to_owned(),
            abrupt: false,
            close_after_handlers: true,
        };
    }
    // Closing: the close frame `begin_closing` queued sealed the queue, and is the last the
    // client gets; closed: nothing more is written.
    Ending::graceful(code, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::ServerConfig;
    use crate::engine::ws::shared::Shared;

    /// Messages are on the budget before the loop can see them, so that the loop's release of
    /// what it takes can never bring the budget below zero. Charged after the push (as it was),
    /// the loop could take a read's messages first: the total wrapped round, pausing every
    /// connection holding 64 KiB with nothing to resume them (and overflowed in debug builds).
    #[test]
    fn messages_are_on_the_budget_when_the_loop_can_take_them() {
        let shared = Arc::new(Shared::new(ServerConfig::default(), None).unwrap());
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let conn = shared.connection(7, crate::engine::net::Peer::Ip(ip, 40000), None);
        let mut handed = Handed::default();
        for text in ["hello", "brioche"] {
            let text_bytes = tokio_tungstenite::tungstenite::Utf8Bytes::from_static(text);
            let event = Event::Text(conn.id, text_bytes);
            assert!(hand_over(&conn, text.len(), event, &mut handed));
        }
        assert_eq!(shared.incoming_bytes(), 0);
        handed.pass_on(&conn);
        let mut events = Vec::new();
        shared.events.drain_into(&mut events);
        assert_eq!(events.len(), 2);
        assert_eq!(shared.incoming_bytes(), 12);
        shared.incoming_taken(12);
        assert_eq!(shared.incoming_bytes(), 0);
    }

    fn size_of_future<F: Future>(_: &F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle connection carries its task and its `Conn`: they are most of its memory.
    #[test]
    fn an_idle_connection_stays_small() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (stream, client) = listener.accept().await.unwrap();
            let shared = Arc::new(Shared::new(ServerConfig::default(), None).unwrap());
            let conn = shared.connection(
                1,
                crate::engine::net::Peer::Ip(client.ip(), client.port()),
                None,
            );
            shared.register(&conn);
            let task = run(conn.clone(), Stream::Tcp(stream), Vec::new());
            // Each carries one pointer for permessage-deflate (8 bytes), `None` unless negotiated.
            // The `Conn` also carries two prefetch hints (16 bytes, `Outbound::prefetch_targets`),
            // its client's IP and port (`Peer`, 20 bytes) and its queue's write count (8 with
            // its padding). In its `Arc` it takes 248 bytes, in mimalloc's 256-byte size class:
            // 9 more would cost 64 more a connection. The task (24 bytes for the queue's watch,
            // `Task::reads_nothing`) stays in the same size of tokio's task cell: idle
            // connections measured the same, 1.34 KiB each, before and after both.
            assert!(size_of_future(&task) <= 384, "{}", size_of_future(&task));
            assert!(
                std::mem::size_of::<Conn>() <= 232,
                "{}",
                std::mem::size_of::<Conn>()
            );
            // The queue's events hold the `Conn`, which holds `Shared`: a cycle until the loop
            // drains them. Dropped here as the loop would, so valgrind sees no leak.
            drop(task);
            let mut events = Vec::new();
            shared.events.drain_into(&mut events);
            assert!(matches!(events.last(), Some(Event::Close(1, 1011, _))));
        });
    }
}
