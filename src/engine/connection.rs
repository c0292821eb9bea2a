//! A WebSocket connection's one task: it reads and parses the client's frames, turns messages
//! into events, writes what the loop thread left queued, runs the idle timer and the close
//! handshake, and owns the socket until the connection ends.
//!
//! One task, not a reader and a writer: a reply or a drain then costs no second task wake-up,
//! and an idle connection is one small future (benches/PROFILE.md, S2 and S4).

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};

use super::conn::{Conn, ReadyState};
use super::events::Event;
use super::frame::{OutFrame, OP_CLOSE, OP_PING, OP_PONG};
use super::inbound::{Incoming, MessageReader, Violation};
use super::outbound::Flushed;

/// How long the loop has to send the close frame for a protocol error before the task does.
const CLOSE_AFTER_HANDLERS: Duration = Duration::from_secs(1);
/// How long queued frames may keep flushing after the connection ended before it is cut off.
const FLUSH_AFTER_CLOSE: Duration = Duration::from_secs(5);
/// Queued bytes past which automatic pongs are dropped when there is no backpressure limit.
const DEFAULT_REPLY_LIMIT: usize = 16 * 1024 * 1024;
/// The worker thread's read buffer. Sockets are read into it and parsed in place.
const READ_BUFFER: usize = 64 * 1024;
/// Reads per wake-up before other connections get their turn.
const READS_PER_WAKE: usize = 16;

thread_local! {
    /// One read buffer per worker thread instead of one per connection: an idle connection
    /// holds no read buffer at all (uWS does the same with its loop's receive buffer).
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BUFFER].into_boxed_slice());
}

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

/// `already_read` is what hyper read past the request head: the start of the WebSocket stream.
pub async fn run(conn: Arc<Conn>, stream: TcpStream, already_read: Vec<u8>) {
    let stream = Arc::new(stream);
    conn.out.attach(stream.clone());
    let mut reader = MessageReader::new(conn.shared.config.ws.max_payload_length);

    conn.set_state(ReadyState::Open);
    conn.shared.events.push(Event::Open(conn.clone()));
    if conn.shared.closing_all.load(Ordering::Acquire) {
        conn.close(1001, "server shutting down");
    }

    let mut ended = None;
    if !already_read.is_empty() {
        ended = feed(&conn, &mut reader, &already_read);
    }
    drop(already_read);
    let ending = match ended {
        Some(ending) => ending,
        None => serve(&conn, &stream, &mut reader).await,
    };
    drop(reader);

    if ending.close_after_handlers {
        // Bounded: a loop that is stuck (or a handler that never returns) does not keep a
        // broken connection half-open.
        let deadline = Instant::now() + CLOSE_AFTER_HANDLERS;
        if !write_until(&conn, &stream, deadline, |c| {
            c.ready_state() != ReadyState::Open
        })
        .await
        {
            conn.close(ending.code, &ending.reason);
        }
    }
    let ending = match conn.ending.lock().take() {
        Some((code, reason)) => Ending::abrupt(code, &reason),
        None => ending,
    };

    conn.finish();
    conn.out.seal();
    if ending.abrupt {
        conn.terminated.store(true, Ordering::Release);
    }
    // Unregistered before `on_close` can run, so `pending_websockets` there no longer counts it;
    // `stop()` still waits for this task (and so for the flush below) through the tracker.
    conn.shared.unregister(conn.id);
    conn.shared
        .events
        .push(Event::Close(conn.id, ending.code, ending.reason));
    if !ending.abrupt {
        let deadline = Instant::now() + FLUSH_AFTER_CLOSE;
        write_until(&conn, &stream, deadline, |c| c.out.is_empty()).await;
    }
    // No other thread writes once detached, so this is the last reference: the socket closes.
    drop(conn.out.detach());
    drop(stream);
}

/// The open connection: read, write, time out. Returns when the read side is over.
async fn serve(conn: &Arc<Conn>, stream: &TcpStream, reader: &mut MessageReader) -> Ending {
    let limits = &conn.shared.config.ws;
    let idle = limits.idle_timeout;
    // With pings, a silent client is pinged at 3/4 of the timeout and has the rest to answer.
    let ping_after = if limits.send_pings {
        idle * 3 / 4
    } else {
        idle
    };
    let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
    let mut last_read = Instant::now();
    let mut pinged_at: Option<Instant> = None;
    let mut close_deadline: Option<Instant> = None;
    let mut write_blocked = false;
    // One timer for the connection's life. Reads only update `last_read`; the timer is re-armed
    // when it fires (or the state changes), never per message.
    let timer = sleep_until(if idle.is_zero() {
        far_future
    } else {
        Instant::now() + ping_after
    });
    tokio::pin!(timer);

    loop {
        if conn.terminated.load(Ordering::Acquire) {
            return Ending::abrupt(1006, "");
        }
        let paused = conn.reading_paused();
        if !paused && reader.stalled() {
            // Frames that arrived while the loop was behind: parse them before reading more.
            if let Some(ending) = feed(conn, reader, &[]) {
                return ending;
            }
            continue;
        }
        tokio::select! {
            biased;
            _ = conn.lifecycle.notified() => {
                if close_deadline.is_none() && conn.ready_state() == ReadyState::Closing {
                    let deadline = Instant::now() + conn.shared.config.close_timeout;
                    close_deadline = Some(deadline);
                    if deadline < timer.deadline() {
                        timer.as_mut().reset(deadline);
                    }
                }
            }
            _ = conn.out.wake_writer.notified(), if !write_blocked => {
                match conn.flush() {
                    Ok(flushed) => write_blocked = flushed == Flushed::Blocked,
                    Err(_) => return Ending::abrupt(1006, ""),
                }
            }
            ready = stream.writable(), if write_blocked => {
                if ready.is_err() {
                    return Ending::abrupt(1006, "");
                }
                match conn.flush() {
                    Ok(flushed) => write_blocked = flushed == Flushed::Blocked,
                    Err(_) => return Ending::abrupt(1006, ""),
                }
            }
            _ = conn.resume_reading.notified(), if paused => {
                // Time spent not reading is not the client's silence.
                last_read = Instant::now();
            }
            _ = &mut timer => {
                let now = Instant::now();
                if close_deadline.is_some_and(|d| now >= d) {
                    return Ending::abrupt(1006, "");
                }
                if pinged_at.is_some_and(|at| last_read > at) {
                    pinged_at = None;
                }
                let next = if idle.is_zero() {
                    far_future
                } else if paused {
                    now + ping_after
                } else if let Some(at) = pinged_at {
                    let give_up = at + (idle - ping_after);
                    if now >= give_up {
                        return Ending::abrupt(1006, "idle timeout");
                    }
                    give_up
                } else if now >= last_read + ping_after {
                    if !limits.send_pings {
                        return Ending::abrupt(1006, "idle timeout");
                    }
                    queue_reply(conn, OutFrame::new(OP_PING, Bytes::new()));
                    pinged_at = Some(now);
                    now + (idle - ping_after)
                } else {
                    last_read + ping_after
                };
                timer.as_mut().reset(close_deadline.map_or(next, |d| d.min(next)));
            }
            ready = stream.readable(), if !paused && !reader.stalled() => {
                if ready.is_err() {
                    return Ending::abrupt(1006, "");
                }
                match read(conn, stream, reader) {
                    Read::Some => last_read = Instant::now(),
                    Read::Nothing => {}
                    Read::Ended(ending) => return ending,
                }
            }
        }
    }
}

enum Read {
    Some,
    Nothing,
    Ended(Ending),
}

/// Read and parse what the socket has, into this worker's buffer.
fn read(conn: &Arc<Conn>, stream: &TcpStream, reader: &mut MessageReader) -> Read {
    READ_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let mut got = Read::Nothing;
        for _ in 0..READS_PER_WAKE {
            match read_once(stream, &mut buf) {
                Ok(0) => return Read::Ended(Ending::abrupt(1006, "")),
                Ok(n) => {
                    got = Read::Some;
                    if let Some(ending) = feed(conn, reader, &buf[..n]) {
                        return Read::Ended(ending);
                    }
                    if n < buf.len() || reader.stalled() || conn.reading_paused() {
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

/// One `recv`. A short read means the socket is drained for now: tokio is told so (through
/// `WouldBlock` inside `try_io`), which saves the `recv` that would only return EAGAIN. tokio
/// keeps readiness that arrived in the meantime, so no wake-up is lost.
fn read_once(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    let result = stream.try_io(Interest::READABLE, || {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes, and the descriptor is open
        // for as long as `stream` is borrowed.
        let n = unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        got = n as usize;
        if got > 0 && got < buf.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(got)
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// Hand the messages in `data` to the loop; `Some` when the read side is over.
fn feed(conn: &Arc<Conn>, reader: &mut MessageReader, data: &[u8]) -> Option<Ending> {
    let mut closed: Option<Ending> = None;
    let parsed = reader.feed(data, &mut |message| match message {
        // Parsing stops at the message that reaches the in-flight caps; the rest waits.
        Incoming::Text(text) => {
            conn.message_queued(text.len());
            conn.shared.events.push(Event::Text(conn.id, text));
            !conn.reading_paused()
        }
        Incoming::Binary(data) => {
            conn.message_queued(data.len());
            conn.shared.events.push(Event::Binary(conn.id, data));
            !conn.reading_paused()
        }
        Incoming::Ping(payload) => {
            queue_reply(conn, OutFrame::new(OP_PONG, payload));
            true
        }
        Incoming::Pong => true,
        Incoming::Close(frame) => {
            let (code, reason) = frame.unwrap_or((1005, String::new()));
            if conn.ready_state() == ReadyState::Open {
                // The client started the handshake: echo its code.
                conn.set_state(ReadyState::Closing);
                let reply = if code == 1005 {
                    OutFrame::new(OP_CLOSE, Bytes::new())
                } else {
                    OutFrame::close(code, "")
                };
                conn.out.push(reply, true);
                conn.out.wake_writer.notify_one();
            }
            closed = Some(Ending::graceful(code, reason));
            true
        }
    });
    match parsed {
        Ok(()) => closed,
        Err(violation) => Some(fail(conn, violation)),
    }
}

/// An automatic reply (pong, keep-alive ping). A client that pings but never reads must not grow
/// the queue without bound: past the limit replies are dropped, as RFC 6455 5.5.3 allows (only
/// the latest ping needs an answer). A sealed queue refuses them anyway.
fn queue_reply(conn: &Conn, frame: OutFrame) {
    let limit = match conn.shared.config.ws.backpressure_limit {
        0 => DEFAULT_REPLY_LIMIT,
        limit => limit,
    };
    if conn.out.buffered() <= limit {
        conn.out.push(frame, false);
        conn.out.wake_writer.notify_one();
    }
}

/// Refuse the client's stream with the close code RFC 6455 asks for.
fn fail(conn: &Conn, violation: Violation) -> Ending {
    let (code, reason) = (violation.close_code(), violation.reason());
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
    if conn.ready_state() == ReadyState::Closing {
        conn.out.push(OutFrame::close(code, reason), true);
        conn.out.wake_writer.notify_one();
    }
    Ending::graceful(code, reason)
}

/// Keep writing what is queued until `done` holds; false if the deadline passed, the
/// connection was terminated or the socket failed first.
async fn write_until(
    conn: &Conn,
    stream: &TcpStream,
    deadline: Instant,
    done: impl Fn(&Conn) -> bool,
) -> bool {
    let expired = sleep_until(deadline);
    tokio::pin!(expired);
    let mut blocked = false;
    loop {
        if conn.terminated.load(Ordering::Acquire) {
            return false;
        }
        if !blocked {
            match conn.flush() {
                Ok(flushed) => blocked = flushed == Flushed::Blocked,
                Err(_) => return false,
            }
        }
        if done(conn) {
            return true;
        }
        tokio::select! {
            biased;
            _ = conn.lifecycle.notified() => {}
            _ = conn.out.wake_writer.notified(), if !blocked => {}
            ready = stream.writable(), if blocked => {
                if ready.is_err() {
                    return false;
                }
                blocked = false;
            }
            _ = &mut expired => return false,
        }
    }
}
