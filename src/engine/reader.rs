//! A WebSocket connection's task: it reads and validates frames with tungstenite, turns messages
//! into events, enforces the idle timeout and the close handshake, and owns the connection's end.
//!
//! tungstenite parses and validates (masking, fragmentation, UTF-8, control frames, close codes)
//! but never writes to the socket: its automatic replies (pongs) land in `SocketIo::poll_write`,
//! which queues them on the connection's outbound queue, so exactly one writer (`writer.rs`)
//! ever touches the socket's write half.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::conn::{Conn, ReadyState};
use super::events::Event;
use super::frame::{OutFrame, OP_CLOSE, OP_PING};
use super::limit::MessageSizeGuard;
use super::writer;

/// How long the loop has to send the close frame for a protocol error before the reader does.
const CLOSE_AFTER_HANDLERS: Duration = Duration::from_secs(1);
/// How long the writer may keep flushing after the connection ended before it is cut off.
const FLUSH_AFTER_CLOSE: Duration = Duration::from_secs(5);
/// tungstenite's default read buffer is 128 KiB per connection; most messages are small, and the
/// buffer grows on demand for large frames.
const READ_BUFFER: usize = 4 * 1024;
/// Queued bytes past which automatic pongs are dropped when there is no backpressure limit.
const DEFAULT_REPLY_LIMIT: usize = 16 * 1024 * 1024;

/// The read half as tungstenite sees it: reads come from the socket, writes go to the queue.
struct SocketIo {
    read: OwnedReadHalf,
    conn: Arc<Conn>,
    /// When the last byte arrived: the idle timer compares against it instead of being reset
    /// (a timer operation) on every read.
    last_read: Instant,
    size_guard: MessageSizeGuard,
    /// The size guard refused a message: the read error that follows means 1009.
    too_big: bool,
    /// Automatic replies are dropped while this much is queued (see `poll_write`).
    reply_limit: usize,
}

impl AsyncRead for SocketIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.read).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last_read = Instant::now();
            let this = &mut *self;
            if !this.size_guard.scan(&buf.filled()[before..]) {
                this.too_big = true;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "message too big",
                )));
            }
        }
        polled
    }
}

impl AsyncWrite for SocketIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // tungstenite writes only automatic pongs. A client that pings without reading must not
        // grow the queue without bound: past the limit they are dropped, as RFC 6455 5.5.3
        // allows (only the latest ping needs an answer). A sealed queue (close sent, or ending)
        // refuses them anyway.
        if self.conn.out.buffered() <= self.reply_limit {
            self.conn
                .out
                .push(OutFrame::raw(Bytes::copy_from_slice(buf)), false);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// How the read loop ended.
struct Ending {
    code: u16,
    reason: String,
    /// Cut the connection now instead of letting the writer flush what is queued.
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
/// It is copied, not kept: it is a view of hyper's 8 KiB read buffer, which would otherwise stay
/// allocated for the life of the connection.
pub async fn run(conn: Arc<Conn>, stream: TcpStream, already_read: Vec<u8>) {
    let (read, write) = stream.into_split();
    let writer = tokio::spawn(writer::run(conn.clone(), write));
    let limits = &conn.shared.config.ws;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(limits.max_payload_length))
        .max_frame_size(Some(limits.max_payload_length));
    let io = SocketIo {
        read,
        conn: conn.clone(),
        last_read: Instant::now(),
        size_guard: MessageSizeGuard::new(limits.max_payload_length),
        too_big: false,
        reply_limit: match limits.backpressure_limit {
            0 => DEFAULT_REPLY_LIMIT,
            limit => limit,
        },
    };
    let ws =
        WebSocketStream::from_partially_read(io, already_read, Role::Server, Some(config)).await;

    conn.set_state(ReadyState::Open);
    conn.shared.events.push(Event::Open(conn.clone()));
    if conn.shared.closing_all.load(Ordering::Acquire) {
        conn.close(1001, "server shutting down");
    }

    let ending = read_loop(&conn, ws).await;
    if ending.close_after_handlers {
        // Bounded: a loop that is stuck (or a handler that never returns) does not keep a
        // broken connection half-open.
        let handed_over = tokio::time::timeout(CLOSE_AFTER_HANDLERS, async {
            while conn.ready_state() == ReadyState::Open {
                conn.lifecycle.notified().await;
            }
        });
        if handed_over.await.is_err() {
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
        conn.out.wake_writer.notify_one();
    }
    // Unregistered before `on_close` can run, so `pending_websockets` there no longer counts it;
    // `stop()` still waits for this task (and so for the flush below) through the tracker.
    conn.shared.unregister(conn.id);
    conn.shared
        .events
        .push(Event::Close(conn.id, ending.code, ending.reason));

    let mut writer = writer;
    if tokio::time::timeout(FLUSH_AFTER_CLOSE, &mut writer)
        .await
        .is_err()
    {
        conn.terminated.store(true, Ordering::Release);
        conn.out.wake_writer.notify_one();
        let _ = writer.await;
    }
}

async fn read_loop(conn: &Arc<Conn>, mut ws: WebSocketStream<SocketIo>) -> Ending {
    let limits = &conn.shared.config.ws;
    let idle = limits.idle_timeout;
    // With pings, a silent client is pinged at 3/4 of the timeout and has the rest to answer.
    let ping_after = if limits.send_pings {
        idle * 3 / 4
    } else {
        idle
    };
    let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
    let mut pinged_at: Option<Instant> = None;
    let mut close_deadline: Option<Instant> = None;
    // One timer for the connection's life. Messages only update `last_read`; the timer is
    // re-armed when it fires (or the state changes), never per message.
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
            _ = conn.resume_reading.notified(), if paused => {
                // Time spent not reading is not the client's silence.
                ws.get_mut().last_read = Instant::now();
            }
            _ = &mut timer => {
                let now = Instant::now();
                if close_deadline.is_some_and(|d| now >= d) {
                    return Ending::abrupt(1006, "");
                }
                let last_read = ws.get_ref().last_read;
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
                    conn.out.push(OutFrame::new(OP_PING, Bytes::new()), false);
                    pinged_at = Some(now);
                    now + (idle - ping_after)
                } else {
                    last_read + ping_after
                };
                timer.as_mut().reset(close_deadline.map_or(next, |d| d.min(next)));
            }
            message = ws.next(), if !paused => match message {
                Some(Ok(Message::Text(text))) => {
                    conn.message_queued(text.len());
                    conn.shared.events.push(Event::Text(conn.id, text));
                }
                Some(Ok(Message::Binary(data))) => {
                    conn.message_queued(data.len());
                    conn.shared.events.push(Event::Binary(conn.id, data));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = match frame {
                        Some(f) => (u16::from(f.code), f.reason.to_string()),
                        None => (1005, String::new()),
                    };
                    if conn.ready_state() == ReadyState::Open {
                        // The client started the handshake: echo its code (tungstenite has
                        // already replaced a code that is not allowed on the wire by 1002).
                        conn.set_state(ReadyState::Closing);
                        let reply = if code == 1005 {
                            OutFrame::new(OP_CLOSE, Bytes::new())
                        } else {
                            OutFrame::close(code, "")
                        };
                        conn.out.push(reply, true);
                    }
                    return Ending::graceful(code, reason);
                }
                Some(Err(_)) if ws.get_ref().too_big => {
                    return fail(conn, WsError::Capacity(CapacityError::MessageTooLong { size: 0, max_size: 0 }));
                }
                Some(Err(err)) => return fail(conn, err),
                None => return Ending::abrupt(1006, ""),
            },
        }
    }
}

/// Map a read error to the close code RFC 6455 asks for, and send it if the socket is still up.
fn fail(conn: &Conn, err: WsError) -> Ending {
    let (code, reason) = match err {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => (1009, "message too big"),
        WsError::Capacity(_) => (1009, "message too big"),
        WsError::Utf8(_) => (1007, "invalid UTF-8"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            return Ending::abrupt(1006, "")
        }
        WsError::Protocol(ProtocolError::InvalidCloseSequence) => (1002, "protocol error"),
        WsError::Protocol(_) => (1002, "protocol error"),
        _ => return Ending::abrupt(1006, ""),
    };
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
    }
    Ending::graceful(code, reason)
}
