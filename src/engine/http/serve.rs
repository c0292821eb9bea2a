//! HTTP/1.1 with hyper: every request goes to the Python handler through the event queue, and a
//! handshake the handler accepts becomes a WebSocket connection.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, SEC_WEBSOCKET_ACCEPT,
    SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_VERSION, TRANSFER_ENCODING, UPGRADE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

use super::handshake::{self, Handshake};
use super::header_text;
use crate::engine::bridge::events::{Body, HttpRequest, LogKind, Reply};
use crate::engine::net::{linger, Remote, Stream, TlsSocket};
use crate::engine::stats::Counter;
use crate::engine::ws::budget::IncomingBudget;
use crate::engine::ws::conn::{Conn, ReadyState};
use crate::engine::ws::shared::Shared;
use crate::engine::ws::task;
use crate::engine::ws::Event;

/// An invalid status or header from the handler.
#[derive(Debug)]
pub struct InvalidResponse(pub String);

pub fn parse_headers(
    headers: &[(String, String)],
) -> Result<Vec<(HeaderName, HeaderValue)>, InvalidResponse> {
    headers
        .iter()
        .map(|(name, value)| {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| InvalidResponse(format!("invalid header name {name:?}")))?;
            let value = header_text::encode(value).ok_or_else(|| {
                InvalidResponse(format!(
                    "invalid value for header {name}: characters above U+00FF and ASCII \
                     control characters other than tab cannot be sent"
                ))
            })?;
            Ok((name, value))
        })
        .collect()
}

/// The handler's response to a request of `method`, checked.
pub fn build_response(
    status: u16,
    headers: &[(String, String)],
    body: Bytes,
    method: &str,
) -> Result<Response<Body>, InvalidResponse> {
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(|s| !s.is_informational())
        .ok_or_else(|| InvalidResponse(format!("invalid status {status}")))?;
    if method == "CONNECT" && status.is_success() {
        // hyper sends a 2xx to CONNECT without its body and hands the connection over as a
        // tunnel, which nobody here takes: the client would read "tunnel open", then EOF.
        return Err(InvalidResponse(
            "a 2xx answer to CONNECT opens a tunnel, which this server cannot serve".into(),
        ));
    }
    let body_len = body.len();
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let map = response.headers_mut();
    for (name, value) in parse_headers(headers)? {
        map.append(name, value);
    }
    check_framing(status, map, body_len, method == "HEAD")?;
    Ok(response)
}

/// The framing headers a handler may set. hyper sends a `content-length` as given, and one that
/// disagrees with the body sets the client's reading of every later response on the
/// connection out of step; a `transfer-encoding` makes hyper end the connection with no
/// response at all (the body is always sent whole, with its length).
fn check_framing(
    status: StatusCode,
    map: &HeaderMap,
    body_len: usize,
    head: bool,
) -> Result<(), InvalidResponse> {
    if map.contains_key(TRANSFER_ENCODING) {
        return Err(InvalidResponse(
            "a response may not set transfer-encoding: its body is sent whole, with its \
             content-length"
                .into(),
        ));
    }
    let mut lengths = map.get_all(CONTENT_LENGTH).iter();
    let Some(value) = lengths.next() else {
        return Ok(());
    };
    if lengths.next().is_some() {
        return Err(InvalidResponse("content-length set more than once".into()));
    }
    if status == StatusCode::NO_CONTENT {
        // RFC 9110 8.6: a 204 has no content, and says nothing of its length.
        return Err(InvalidResponse(
            "a 204 response has no content-length".into(),
        ));
    }
    let declared = value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| InvalidResponse(format!("invalid content-length {value:?}")))?;
    // The answer to a HEAD, and a 304, may give the length of a body they do not carry.
    let unsent = body_len == 0 && (head || status == StatusCode::NOT_MODIFIED);
    if declared != body_len as u64 && !unsent {
        return Err(InvalidResponse(format!(
            "content-length {declared} does not match the body's {body_len} bytes"
        )));
    }
    Ok(())
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `plain`, ending the connection after it, as hyper's own refusals do: for a request refused
/// before its body was read, what follows on the socket is the rest of that body.
fn refusal(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = plain(status, text);
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// When the request being read must have fully arrived, head and body (`handshake_timeout`).
/// Shared by a connection's IO (which enforces it) and its requests' handling (which stops the
/// clock while the Python handler works, and starts it again for the next request).
struct RequestClock {
    limit: Duration,
    /// `None` while a request's handler runs: only the client's sending is timed.
    deadline: Mutex<Option<Instant>>,
    /// A request was under way when the deadline passed (and got its 408).
    expired_mid_request: AtomicBool,
    /// A write waited the limit for the client to read, and the connection was dropped.
    response_stalled: AtomicBool,
    /// How many times a running clock stopped: each time, the request before is all in, and
    /// what was read for it no longer says a request is under way. (A stalled request that
    /// arrived pipelined with the one before, in its reads, is therefore closed without its
    /// 408: hyper does not say what it holds.)
    stops: AtomicU64,
    /// The answer is made: start at the next read, once hyper has written it and waits for the
    /// next request, so that a slow download does not spend the next request's time.
    start_on_read: AtomicBool,
    /// `stop(close_active_connections=True)`: a wait on the client (for its request, or for it
    /// to read the answer) ends now. A request with its handler is still answered.
    cut: AtomicBool,
}

impl RequestClock {
    fn start(&self) {
        *self.deadline.lock() = Some(Instant::now() + self.limit);
    }

    /// Stop timing the client: its request is all in, or already answered.
    fn stop(&self) {
        if self.deadline.lock().take().is_some() {
            self.stops.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The request is answered: stop, and start again for the next one at the next read.
    fn answered(&self) {
        self.stop();
        self.start_on_read.store(true, Ordering::Relaxed);
    }

    /// The server is stopping with its connections closed, and this one waits on its client
    /// (for a request, or the rest of one), not on a handler: the clock runs.
    fn cut_while_timing(&self) -> bool {
        self.cut.load(Ordering::Relaxed) && self.deadline.lock().is_some()
    }
}

/// The connection's socket as hyper sees it, with the request deadline: a client that has not
/// sent its whole request in time gets `408 Request Timeout` and the connection is closed (one
/// that sent nothing since the last response is closed without one, as an idle keep-alive).
/// (hyper's own header timeout, off, would end the connection without a response, and does not
/// cover bodies.)
struct TimedIo {
    /// `None` once taken: by the upgrade, or by `Drop` to hand back for a lingering close.
    io: Option<TokioIo<Stream>>,
    clock: Arc<RequestClock>,
    timer: Option<Pin<Box<Sleep>>>,
    /// Armed while a write waits for the client to read: one that reads none of a response for
    /// the request limit is dropped, or it could hold the connection and the response forever.
    write_stall: Option<Pin<Box<Sleep>>>,
    /// Bytes read since the clock last stopped: a request is under way.
    read_since_start: bool,
    /// The clock's `stops` when `read_since_start` was last cleared.
    stops_seen: u64,
    timed_out: bool,
    /// The client closed its side: closing ours cannot reset anything it still sends.
    saw_eof: bool,
    /// Where the socket goes when hyper drops it before the client closed its side (a refused
    /// request, a timeout): `serve_connection` closes it with `net::linger`.
    give_back: Option<oneshot::Sender<Stream>>,
}

const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// What a request under way gets when `stop(close_active_connections=True)` ends it: what the
/// loop answers a request whose handler it cancels.
const SHUTTING_DOWN: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
content-type: text/plain; charset=utf-8\r\ncontent-length: 19\r\n\r\nService Unavailable";

impl TimedIo {
    fn stream(&mut self) -> &mut Stream {
        self.io
            .as_mut()
            .expect("taken only by the upgrade and Drop")
            .inner_mut()
    }

    /// Whether the deadline has passed; arms the timer (and so a wake-up) when it has not.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.clock.start_on_read.swap(false, Ordering::Relaxed) {
            self.clock.start();
        }
        let stops = self.clock.stops.load(Ordering::Relaxed);
        if stops != self.stops_seen {
            self.stops_seen = stops;
            self.read_since_start = false;
        }
        let Some(deadline) = *self.clock.deadline.lock() else {
            return false;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// `written`, the result of a write or flush, with the stall timer: cleared by progress,
    /// armed by a wait, and an error once a wait has lasted the request limit.
    fn stalled<T>(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if written.is_ready() {
            self.write_stall = None;
            return written;
        }
        let limit = self.clock.limit;
        let stall = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stall.as_mut().poll(cx).is_ready() {
            self.timed_out = true;
            self.clock.response_stalled.store(true, Ordering::Relaxed);
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        if self.clock.cut.load(Ordering::Relaxed) {
            // Stopping with everything closed: not for a client that does not read.
            self.timed_out = true;
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        Poll::Pending
    }

    /// End the connection for `stop(close_active_connections=True)`, telling a client whose
    /// request is under way why (best effort, as the 408).
    fn cut(&mut self) -> io::Error {
        self.timed_out = true;
        if self.read_since_start {
            let _ = self.stream().try_write(SHUTTING_DOWN);
        }
        io::ErrorKind::ConnectionAborted.into()
    }

    fn time_out(&mut self) -> io::Error {
        if !self.timed_out {
            self.timed_out = true;
            if self.read_since_start {
                // Best effort: the client is slow, not necessarily gone, and a 408 tells it why.
                let _ = self.stream().try_write(REQUEST_TIMEOUT);
                self.clock
                    .expired_mid_request
                    .store(true, Ordering::Relaxed);
            }
        }
        io::ErrorKind::TimedOut.into()
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.timed_out || self.expired(cx) {
            return Poll::Ready(Err(self.time_out()));
        }
        if self.clock.cut_while_timing() {
            return Poll::Ready(Err(self.cut()));
        }
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let polled = Pin::new(self.stream()).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.read_since_start = true;
        } else if room && matches!(polled, Poll::Ready(Ok(()))) {
            self.saw_eof = true;
        }
        polled
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.timed_out {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        let written = Pin::new(self.stream()).poll_write(cx, buf);
        self.stalled(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.timed_out {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        let written = Pin::new(self.stream()).poll_write_vectored(cx, bufs);
        self.stalled(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io
            .as_ref()
            .is_some_and(|io| io.inner().is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Over TLS the records wait here.
        let flushed = Pin::new(self.stream()).poll_flush(cx);
        self.stalled(cx, flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Over TLS, `close_notify` may wait on the client too.
        let shut = Pin::new(self.stream()).poll_shutdown(cx);
        self.stalled(cx, shut)
    }
}

impl Drop for TimedIo {
    fn drop(&mut self) {
        if self.saw_eof {
            return;
        }
        if let (Some(io), Some(give_back)) = (self.io.take(), self.give_back.take()) {
            let _ = give_back.send(io.into_inner());
        }
    }
}

/// Serve one connection (TCP, TLS or Unix) until it closes, is upgraded, or the server stops.
pub(crate) async fn serve_connection(stream: Stream, remote: Remote, shared: Arc<Shared>) {
    if let Stream::Tcp(tcp) = &stream {
        // Small messages must not wait for Nagle; every write the writer makes is already a batch.
        let _ = tcp.set_nodelay(true);
    }
    let clock = Arc::new(RequestClock {
        limit: shared.config.header_read_timeout,
        deadline: Mutex::new(None),
        expired_mid_request: AtomicBool::new(false),
        response_stalled: AtomicBool::new(false),
        stops: AtomicU64::new(0),
        start_on_read: AtomicBool::new(false),
        cut: AtomicBool::new(false),
    });
    clock.start();
    let stream = match (&shared.tls, stream) {
        (Some(certs), Stream::Tcp(tcp)) => {
            // The handshake and the first request share `handshake_timeout`: a client that
            // stalls in either holds the connection no longer than one that stalls in the other.
            let deadline = clock.deadline.lock().expect("started above");
            match accept_tls(tcp, certs.current(), deadline, &shared, remote).await {
                Some(stream) => stream,
                None => return,
            }
        }
        (_, stream) => stream,
    };
    let service_shared = shared.clone();
    let service_clock = clock.clone();
    let service =
        service_fn(move |req| handle(req, remote, service_shared.clone(), service_clock.clone()));
    let mut builder = http1::Builder::new();
    builder
        // `TimedIo` is the one deadline for a request's head, and it answers 408. Given a timer,
        // hyper also ends any head still incomplete after 30 s, without a response: a
        // `handshake_timeout` past 30 s was cut short, silently. It has no other use for one.
        .header_read_timeout(None)
        // hyper's floor for its read buffer is 8 KiB.
        .max_buf_size(shared.config.max_header_size.max(8192))
        // A client may shut its sending side once its request is out and still read the
        // answer (RFC 9112 9.6); by default hyper ends the connection on that EOF.
        .half_close(true);
    let (give_back, mut given_back) = oneshot::channel();
    let io = TimedIo {
        io: Some(TokioIo::new(stream)),
        clock: clock.clone(),
        timer: None,
        write_stall: None,
        read_since_start: false,
        stops_seen: 0,
        timed_out: false,
        saw_eof: false,
        give_back: Some(give_back),
    };
    let served = {
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(connection);
        tokio::select! {
            served = connection.as_mut() => served,
            _ = shared.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                tokio::select! {
                    served = connection.as_mut() => served,
                    _ = shared.force_stop.cancelled() => {
                        // Polled again, hyper reads or writes again, and `TimedIo` ends a wait
                        // on the client: stop(True) does not wait on clients, only on handlers.
                        clock.cut.store(true, Ordering::Relaxed);
                        connection.await
                    }
                }
            }
        }
        // The connection, and with it the socket unless upgraded, is dropped here.
    };
    // try_recv, not await: an upgraded socket is elsewhere by now, and its sender with it.
    if let Ok(mut stream) = given_back.try_recv() {
        if matches!(&served, Err(err) if err.is_parse_version_h2()) {
            // hyper ends a connection that opens with HTTP/2's preface without a word: say why,
            // as the other refusals do. Bounded: the socket is fresh, the answer small.
            let answer = tokio::io::AsyncWriteExt::write_all(&mut stream, H2_PREFACE_ANSWER);
            let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
        }
        // hyper ended the connection before the client closed its side: typically a refusal
        // (431, 400, 408) sent while the client was still sending. Not while stopping: stop()
        // must not wait on clients.
        tokio::select! {
            () = linger(&stream) => {}
            () = shared.shutdown.cancelled() => {}
        }
    }
    if clock.expired_mid_request.load(Ordering::Relaxed) {
        reject_request(
            &shared,
            remote,
            StatusCode::REQUEST_TIMEOUT,
            "request too slow",
        );
    } else if clock.response_stalled.load(Ordering::Relaxed) {
        shared.stats.add(Counter::ResponsesStalled, 1);
        shared.log(
            LogKind::ResponseStalled,
            remote,
            0,
            "it read nothing of a response for handshake_timeout",
        );
    } else if let Err(err) = served {
        // hyper answered these itself (and closed the connection).
        if err.is_parse_too_large() {
            let (status, why) = if err.to_string().contains("uri") {
                (StatusCode::URI_TOO_LONG, "request line too long")
            } else {
                (
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request head too large",
                )
            };
            reject_request(&shared, remote, status, why);
        } else if err.is_parse_version_h2() {
            reject_request(
                &shared,
                remote,
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "an HTTP/2 connection preface: HTTP/1.1 only",
            );
        } else if err.is_parse() {
            reject_request(
                &shared,
                remote,
                StatusCode::BAD_REQUEST,
                "malformed request",
            );
        }
    }
}

/// The answer to a connection that opens with HTTP/2's preface (an h2c client with prior
/// knowledge): this server speaks HTTP/1.1 only.
const H2_PREFACE_ANSWER: &[u8] = b"HTTP/1.1 505 HTTP Version Not Supported\r\n\
    content-type: text/plain; charset=utf-8\r\ncontent-length: 22\r\nconnection: close\r\n\r\n\
    HTTP/1.1 only, no h2c\n";

/// The TLS handshake, by `deadline`. A client that speaks plain HTTP gets a plain 400 saying
/// why; one that fails or stalls in the handshake is dropped, having cost at most rustls's
/// bounded buffers (handshake messages over 64 KiB are refused) for at most the deadline.
async fn accept_tls(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    deadline: Instant,
    shared: &Shared,
    remote: Remote,
) -> Option<Stream> {
    // A client that connects and closes without a byte (a port check) is not counted.
    let mut sent_something = false;
    let handshake = async {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await.ok()? == 0 {
            return None;
        }
        sent_something = true;
        // Every TLS connection opens with a handshake record (content type 22); a client may
        // also give up at once with an alert (21), which rustls then names.
        if !(0x14..=0x17).contains(&first[0]) {
            if first[0].is_ascii_uppercase() {
                refuse_plain_http(tcp, shared, remote).await;
            } else {
                tls_failed(shared, remote, "not TLS");
            }
            return None;
        }
        let tls = match TlsAcceptor::from(config).accept(tcp).await {
            Ok(tls) => tls,
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                tls_failed(
                    shared,
                    remote,
                    "the client closed the connection mid-handshake",
                );
                return None;
            }
            Err(err) => {
                // rustls's reason: a client that refused the certificate ("received fatal
                // alert: UnknownCA", after a renewal gone wrong) is told from a scanner. Its
                // errors name rustls's own enums, never the peer's bytes; cut at 200 all the same.
                let mut why = format!("refused by the TLS layer ({err})");
                if why.len() > 200 {
                    let mut end = 199;
                    while !why.is_char_boundary(end) {
                        end -= 1;
                    }
                    why.truncate(end);
                    why.push('…');
                }
                tls_failed(shared, remote, why);
                return None;
            }
        };
        let (tcp, session) = tls.into_inner();
        Some(Stream::Tls(Box::new(TlsSocket::new(tcp, session))))
    };
    tokio::select! {
        accepted = tokio::time::timeout_at(deadline, handshake) => match accepted {
            Ok(stream) => stream,
            Err(_) => {
                if sent_something {
                    tls_failed(shared, remote, "not done within handshake_timeout");
                }
                None
            }
        },
        _ = shared.shutdown.cancelled() => None,
    }
}

/// Count and log a TLS handshake that failed: what a scanner or a broken client costs shows in
/// `stats()` and the log (rate-limited), not only as connections that vanish.
fn tls_failed(shared: &Shared, remote: Remote, why: impl Into<Cow<'static, str>>) {
    shared.stats.add(Counter::TlsHandshakesFailed, 1);
    shared.log(LogKind::TlsHandshakeFailed, remote, 0, why);
}

const PLAIN_HTTP_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
content-type: text/plain; charset=utf-8\r\ncontent-length: 50\r\n\r\n\
This port speaks HTTPS: the request was plain HTTP";

/// Answer a plain HTTP request on the TLS port, then close with `linger` (closing with its
/// request unread would reset the connection, losing the answer).
async fn refuse_plain_http(tcp: TcpStream, shared: &Shared, remote: Remote) {
    reject_request(
        shared,
        remote,
        StatusCode::BAD_REQUEST,
        "plain HTTP on the TLS port",
    );
    if tcp.writable().await.is_err() || tcp.try_write(PLAIN_HTTP_ON_TLS).is_err() {
        return;
    }
    linger(&Stream::Tcp(tcp)).await;
}

/// Count and log a request the engine answered with an error before any handler saw it.
fn reject_request(shared: &Shared, remote: Remote, status: StatusCode, why: &'static str) {
    shared.stats.add(Counter::RequestsRejected, 1);
    shared.log(LogKind::RequestRejected, remote, status.as_u16(), why);
}

/// Count and log a WebSocket handshake the engine refused before the handler saw it.
fn reject_handshake(shared: &Shared, remote: Remote, status: StatusCode, why: &'static str) {
    shared.stats.add(Counter::HandshakesRejected, 1);
    shared.log(LogKind::HandshakeRejected, remote, status.as_u16(), why);
}

/// The bytes of `req`'s head as its parsed parts spell it: the request line, each header as
/// `name: value` and its CRLF, and the blank line. hyper bounds its read buffer by
/// `max_header_size`, but checks it only while the head is still incomplete, and one read can
/// take it well past (a 114,000-byte head passed the default 64 KiB); this holds the limit to
/// the byte. Never more than the client sent, which may add optional whitespace.
fn head_size<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri
        .scheme_str()
        .map_or(0, |scheme| scheme.len() + "://".len())
        + uri
            .authority()
            .map_or(0, |authority| authority.as_str().len())
        + uri.path_and_query().map_or(0, |path| path.as_str().len());
    let line = req.method().as_str().len() + " ".len() + target + " HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + ": ".len() + value.len() + "\r\n".len())
        .sum();
    line + headers + "\r\n".len()
}

/// Why `req`'s `Host` makes it one a server must answer with 400 (RFC 9112 3.2): an HTTP/1.1
/// request without one, any request with two, or a value that is not `host[:port]` (it may be
/// empty, for a target without an authority). A WebSocket handshake needs one too (RFC 6455
/// 4.2.1), and it is HTTP/1.1.
fn host_problem<B>(req: &Request<B>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let Some(host) = hosts.next() else {
        return (req.version() == Version::HTTP_11).then_some("no Host header");
    };
    if hosts.next().is_some() {
        return Some("more than one Host header");
    }
    let valid = host.is_empty() || host.to_str().is_ok_and(host_value_ok);
    (!valid).then_some("invalid Host header")
}

/// A `Host` value: a host and an optional port of digits, no user. `Authority` also takes a
/// user ("u@host") and a port of any characters.
fn host_value_ok(host: &str) -> bool {
    if host.contains('@') {
        return false;
    }
    let Ok(authority) = host.parse::<hyper::http::uri::Authority>() else {
        return false;
    };
    if !ip_literal_ok(authority.host()) {
        return false;
    }
    match host.strip_prefix(authority.host()) {
        Some("") => true,
        Some(port) => port
            .strip_prefix(':')
            .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

/// A host in brackets is an IP literal (RFC 3986 3.2.2): an IPv6 address, or an IPvFuture
/// (`v1.x`). `Authority` takes anything between the brackets (`[zz]`).
fn ip_literal_ok(host: &str) -> bool {
    let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) else {
        return true;
    };
    if inner.parse::<std::net::Ipv6Addr>().is_ok() {
        return true;
    }
    let future = inner
        .strip_prefix(['v', 'V'])
        .and_then(|rest| rest.split_once('.'));
    future.is_some_and(|(version, address)| {
        !version.is_empty()
            && version.bytes().all(|b| b.is_ascii_hexdigit())
            && !address.is_empty()
            && address
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:".contains(&b))
    })
}

/// A request-target of a form its method may not use (RFC 9112 3.2): the authority form
/// (`host:port`) is CONNECT's alone, and CONNECT has only it; the asterisk form is OPTIONS's;
/// and no target carries a user (RFC 9110 4.2.4). Handed on, a route saw an empty path or
/// `*`, and a CONNECT sent to a path was taken for one.
fn target_problem<B>(req: &Request<B>) -> Option<&'static str> {
    let uri = req.uri();
    let authority_form = uri.scheme().is_none() && uri.authority().is_some();
    if authority_form != (req.method() == Method::CONNECT) {
        return Some("request target of a form its method does not take");
    }
    if uri.scheme().is_none() && uri.path() == "*" && req.method() != Method::OPTIONS {
        return Some("request target * on a method other than OPTIONS");
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Some("request target with a user");
    }
    if let Some(scheme) = uri.scheme_str() {
        // The absolute form (RFC 9112 3.2.2), whose authority stands for `Host`.
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return Some("request target of a scheme other than http or https");
        }
        if !uri.authority().is_some_and(|a| host_value_ok(a.as_str())) {
            return Some("request target with an invalid authority");
        }
    }
    None
}

/// The `Host` a handler is given: a target in the absolute form names the host itself, and the
/// server MUST use it and ignore the header (RFC 9112 3.2.2). Handed on as it came, a route
/// checking `Host` (a tenant, an allow-list) saw one host while a proxy had routed on another.
fn host_for_handler(uri: &hyper::Uri, method: &Method) -> Option<String> {
    match uri.authority() {
        Some(authority) if uri.scheme().is_some() && *method != Method::CONNECT => {
            Some(authority.as_str().to_owned())
        }
        _ => None,
    }
}

/// A transfer coding the server does not undo (501, RFC 9112 6.1: the handler would get a
/// body still encoded), or chunked applied twice (400). hyper refuses the other misuses. The
/// status, and why, for the log (the body is the status's own phrase).
fn coding_problem<B>(req: &Request<B>) -> Option<(StatusCode, &'static str)> {
    let mut chunked = 0;
    for value in req.headers().get_all(TRANSFER_ENCODING) {
        let Ok(value) = value.to_str() else {
            return Some((
                StatusCode::BAD_REQUEST,
                "Transfer-Encoding that is not text",
            ));
        };
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Some((
                    StatusCode::NOT_IMPLEMENTED,
                    "a transfer coding other than chunked",
                ));
            }
            chunked += 1;
        }
    }
    (chunked > 1).then_some((StatusCode::BAD_REQUEST, "chunked applied more than once"))
}

async fn handle(
    req: Request<Incoming>,
    remote: Remote,
    shared: Arc<Shared>,
    clock: Arc<RequestClock>,
) -> Result<Response<Body>, Infallible> {
    let _in_flight = RequestInFlight::new(&shared);
    let response = read_and_answer(req, remote, &shared, &clock).await;
    // Answered, maybe before its body was read (a refusal): either way this request's bytes
    // are done with, and must not earn the next wait a 408. The next request has the whole
    // limit again, from when hyper is ready to read it.
    clock.answered();
    response
}

async fn read_and_answer(
    mut req: Request<Incoming>,
    remote: Remote,
    shared: &Arc<Shared>,
    clock: &RequestClock,
) -> Result<Response<Body>, Infallible> {
    if head_size(&req) > shared.config.max_header_size {
        let status = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
        reject_request(shared, remote, status, "request head too large");
        return Ok(refusal(status, "Request Header Fields Too Large"));
    }
    if let Some(why) = host_problem(&req).or_else(|| target_problem(&req)) {
        reject_request(shared, remote, StatusCode::BAD_REQUEST, why);
        return Ok(refusal(StatusCode::BAD_REQUEST, "Bad Request"));
    }
    if let Some((status, why)) = coding_problem(&req) {
        reject_request(shared, remote, status, why);
        return Ok(refusal(
            status,
            status.canonical_reason().unwrap_or("Bad Request"),
        ));
    }
    // A body declared larger than the limit is refused now, not read first (nor invited by a
    // `100 Continue`, which hyper sends only once the body is read).
    if req.body().size_hint().lower() > shared.config.max_request_body_size as u64 {
        let status = StatusCode::PAYLOAD_TOO_LARGE;
        reject_request(shared, remote, status, "body over max_request_body_size");
        return Ok(refusal(status, "Payload Too Large"));
    }
    let mut websocket_key = None;
    let asks_for_websocket = handshake::asks_for_websocket(&req);
    if shared.config.websockets_enabled && asks_for_websocket {
        match handshake::classify(&req) {
            Handshake::Invalid(status, why) => {
                reject_handshake(shared, remote, status, why);
                let mut response = refusal(status, why);
                if status == StatusCode::UPGRADE_REQUIRED {
                    // RFC 6455 4.4 names the version; RFC 9110 15.5.22 and 7.8, the protocol.
                    let headers = response.headers_mut();
                    headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
                    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
                    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade, close"));
                }
                return Ok(response);
            }
            Handshake::Valid(key) => websocket_key = Some(key),
        }
    }
    let on_upgrade: Option<OnUpgrade> =
        websocket_key.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let deflate = match (&websocket_key, &shared.config.ws.deflate) {
        (Some(_), Some(config)) => handshake::negotiate_deflate(req.headers(), config),
        _ => None,
    };
    let (parts, body) = req.into_parts();
    // On `max_incoming_bytes` from its first byte until the handler has answered.
    let mut charge = Charge {
        budget: &shared.budget,
        bytes: 0,
    };
    let body = match read_body(body, shared.config.max_request_body_size, &mut charge).await {
        Ok(body) => {
            // All of it arrived: the handler's time is not the client's.
            clock.stop();
            body
        }
        Err(BodyError::TooLarge) => {
            let status = StatusCode::PAYLOAD_TOO_LARGE;
            reject_request(shared, remote, status, "body over max_request_body_size");
            return Ok(refusal(status, "Payload Too Large"));
        }
        Err(BodyError::OverBudget) => {
            let status = StatusCode::SERVICE_UNAVAILABLE;
            reject_request(shared, remote, status, "body over max_incoming_bytes");
            return Ok(refusal(status, "Service Unavailable"));
        }
        Err(BodyError::Broken) => {
            // A body cut short by the request deadline is counted once, as a 408, below; one
            // cut short by stop(True) is no fault of the client's.
            if !clock.expired_mid_request.load(Ordering::Relaxed)
                && !clock.cut.load(Ordering::Relaxed)
            {
                reject_request(shared, remote, StatusCode::BAD_REQUEST, "malformed body");
            }
            return Ok(refusal(StatusCode::BAD_REQUEST, "Bad Request"));
        }
    };
    // A handshake's slot is taken once its request has all arrived: taken before a body it
    // declared, a client that never sent the body held it for `handshake_timeout`, and a few
    // of them, reconnecting, kept every other client out (503).
    if websocket_key.is_some() && !shared.reserve_slot() {
        reject_handshake(
            shared,
            remote,
            StatusCode::SERVICE_UNAVAILABLE,
            "max_connections reached",
        );
        return Ok(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many connections",
        ));
    }
    // A reserved slot passes to the connection on upgrade; any other outcome gives it back.
    let slot = SlotGuard {
        shared,
        held: websocket_key.is_some(),
    };

    let id = shared.next_id();
    let target_host = host_for_handler(&parts.uri, &parts.method);
    let mut headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(name, value)| match &target_host {
            Some(host) if name == HOST => (name.as_str().to_owned(), host.clone()),
            _ => (name.as_str().to_owned(), header_text::decode(value)),
        })
        .collect();
    if let Some(host) = target_host {
        if !parts.headers.contains_key(HOST) {
            // HTTP/1.0 may leave `Host` out.
            headers.insert(0, (HOST.as_str().to_owned(), host));
        }
    }
    let (reply, answer) = oneshot::channel();
    shared.events.push(Event::Request(Box::new(HttpRequest {
        id,
        method: parts.method.as_str().to_owned(),
        // A CONNECT's target is its authority (`host:port`), its only form.
        path: match parts.uri.authority() {
            Some(authority) if parts.method == Method::CONNECT => authority.as_str().to_owned(),
            _ => parts.uri.path().to_owned(),
        },
        query: parts.uri.query().unwrap_or("").to_owned(),
        headers,
        body,
        remote,
        is_websocket: on_upgrade.is_some(),
        reply,
    })));

    match answer.await {
        Ok(Reply::Respond(mut response)) => {
            if asks_for_websocket {
                // A handshake the handler did not accept: see `asks_for_websocket`.
                let close = HeaderValue::from_static("close");
                response.headers_mut().insert(CONNECTION, close);
            }
            Ok(response)
        }
        Ok(Reply::Upgrade(extra)) => match (on_upgrade, websocket_key) {
            (Some(on_upgrade), Some(key)) => {
                slot.hand_over();
                let (params, extensions) = deflate.unzip();
                let conn = shared.connection(id, remote.peer(), params);
                shared.tracker.spawn(open_websocket(on_upgrade, conn));
                let mut response = Response::new(Full::default());
                *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                let headers = response.headers_mut();
                headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
                let accept = handshake::accept_key(key.as_bytes());
                headers.insert(
                    SEC_WEBSOCKET_ACCEPT,
                    HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
                );
                if let Some(extensions) = extensions {
                    headers.insert(SEC_WEBSOCKET_EXTENSIONS, extensions);
                }
                for (name, value) in extra {
                    headers.append(name, value);
                }
                Ok(response)
            }
            _ => Ok(refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal Server Error",
            )),
        },
        // The handler's side was dropped without an answer (the server is going away).
        Err(_) => Ok(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable",
        )),
    }
}

/// A request counted in `pending_requests` until answered, or dropped with its connection.
struct RequestInFlight<'a>(&'a Shared);

impl<'a> RequestInFlight<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.pending_requests.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for RequestInFlight<'_> {
    fn drop(&mut self) {
        self.0.pending_requests.fetch_sub(1, Ordering::SeqCst);
    }
}

enum BodyError {
    TooLarge,
    /// Taking it would take the server past `max_incoming_bytes`.
    OverBudget,
    /// Cut short, or not valid HTTP framing.
    Broken,
}

/// A request body, whole, in one buffer, charged to the incoming budget as it arrives.
///
/// Copied frame by frame rather than collected: hyper hands a chunked body over chunk by
/// chunk, each a slice of its read buffer, and a list of them kept each buffer alive plus a
/// list entry per chunk; a 1 MB body sent in 1-byte chunks held about 37 MiB that way.
async fn read_body(
    body: Incoming,
    limit: usize,
    charge: &mut Charge<'_>,
) -> Result<Bytes, BodyError> {
    // What Content-Length declares, up to 64 KiB: more is reserved only as it arrives, so a
    // client that declares a large body and sends none makes the server hold nothing.
    let declared = body.size_hint().lower().min(64 * 1024) as usize;
    let mut body = Limited::new(body, limit);
    let mut whole = BytesMut::with_capacity(declared.min(limit));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| {
            if err.is::<LengthLimitError>() {
                BodyError::TooLarge
            } else {
                BodyError::Broken
            }
        })?;
        if let Ok(data) = frame.into_data() {
            if !charge.add(data.len()) {
                return Err(BodyError::OverBudget);
            }
            whole.extend_from_slice(&data);
        }
    }
    Ok(whole.freeze())
}

/// Bytes on the incoming budget, given back when dropped: HTTP bodies are held by the server
/// as WebSocket messages are, and a thousand clients each sending most of a 1 MiB body held a
/// gigabyte past a 64 MiB budget before they were counted.
struct Charge<'a> {
    budget: &'a IncomingBudget,
    bytes: usize,
}

impl Charge<'_> {
    /// Charge `bytes` more; false, charging nothing, if the budget has no room for them.
    fn add(&mut self, bytes: usize) -> bool {
        if self.budget.headroom() < bytes {
            return false;
        }
        self.budget.adjust(0, bytes);
        self.bytes += bytes;
        true
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// A `max_connections` slot held while a handshake waits for the handler.
struct SlotGuard<'a> {
    shared: &'a Shared,
    held: bool,
}

impl SlotGuard<'_> {
    /// The connection now owns the slot: its task gives it back as it ends, or `open_websocket`
    /// if the 101 cannot be written.
    fn hand_over(mut self) {
        self.held = false;
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.held {
            self.shared.release_slot();
        }
    }
}

async fn open_websocket(on_upgrade: OnUpgrade, conn: Arc<Conn>) {
    let stream = match on_upgrade.await.map(|u| u.downcast::<TokioIo<TimedIo>>()) {
        // Copy the few bytes read past the head so hyper's read buffer is freed right here.
        Ok(Ok(parts)) => parts.io.into_inner().io.take().map(|io| {
            let read_buf = parts.read_buf.to_vec();
            (io.into_inner(), read_buf)
        }),
        _ => None,
    };
    match stream {
        // A task of its own, sized for the connection alone: this one, with the upgrade's
        // state in it, ends here.
        Some((stream, read_buf)) => {
            // Counted from here, where the 101 is written: a client gone before then (its write
            // failed) is never counted, not even between the handler's upgrade and the write.
            conn.shared.register(&conn);
            let tracker = conn.shared.tracker.clone();
            tracker.spawn(task::run(conn, stream, read_buf));
        }
        None => {
            conn.set_state(ReadyState::Closed);
            // No task, which would give its `max_connections` slot back as it ends.
            conn.shared.release_slot();
            conn.shared.events.push(Event::UpgradeFailed(conn.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(version: Version, hosts: &[&str]) -> Option<&'static str> {
        let mut req = Request::builder().uri("/").version(version);
        for value in hosts {
            req = req.header(HOST, *value);
        }
        host_problem(&req.body(()).unwrap())
    }

    #[test]
    fn a_request_without_one_valid_host_is_named() {
        for ok in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:3000",
            "[::1]:3000",
            "[2001:db8::7]",
            "[v1.fe80::a+en1]:80",
            "",
        ] {
            assert_eq!(host(Version::HTTP_11, &[ok]), None, "{ok:?}");
        }
        assert_eq!(host(Version::HTTP_10, &[]), None);
        assert_eq!(host(Version::HTTP_11, &[]), Some("no Host header"));
        assert_eq!(
            host(Version::HTTP_11, &["a", "a"]),
            Some("more than one Host header")
        );
        for bad in [
            "user@example.com",
            "exa mple.com",
            "example.com:port",
            "a/b",
            "[zz]",
            "[::1::2]:80",
            "[v.x]",
            "[vq.x]",
        ] {
            assert_eq!(
                host(Version::HTTP_11, &[bad]),
                Some("invalid Host header"),
                "{bad:?}"
            );
            assert_eq!(
                host(Version::HTTP_10, &[bad]),
                Some("invalid Host header"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_head_is_measured_as_sent_without_optional_whitespace() {
        let req = Request::builder()
            .method("GET")
            .uri("/chat?room=1")
            .header("host", "x")
            .header("x-a", "one")
            .header("x-a", "two")
            .body(())
            .unwrap();
        let sent = "GET /chat?room=1 HTTP/1.1\r\nhost: x\r\nx-a: one\r\nx-a: two\r\n\r\n";
        assert_eq!(head_size(&req), sent.len());
        let absolute = Request::builder()
            .method("OPTIONS")
            .uri("http://example.com:8080/a")
            .body(())
            .unwrap();
        assert_eq!(
            head_size(&absolute),
            "OPTIONS http://example.com:8080/a HTTP/1.1\r\n\r\n".len()
        );
    }
}
