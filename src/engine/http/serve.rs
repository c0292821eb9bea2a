//! HTTP/1.1 with hyper: every request goes to the Python handler through the event queue, and a
//! handshake the handler accepts becomes a WebSocket connection.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderName, HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_EXTENSIONS,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

use super::handshake::{self, Handshake};
use crate::engine::bridge::events::{Body, HttpRequest, LogKind, Reply};
use crate::engine::net::{linger, Remote, Stream, TlsSocket};
use crate::engine::stats::Counter;
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
            let value = HeaderValue::from_str(value)
                .map_err(|_| InvalidResponse(format!("invalid value for header {name}")))?;
            Ok((name, value))
        })
        .collect()
}

pub fn build_response(
    status: u16,
    headers: &[(String, String)],
    body: Bytes,
) -> Result<Response<Body>, InvalidResponse> {
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(|s| !s.is_informational())
        .ok_or_else(|| InvalidResponse(format!("invalid status {status}")))?;
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let map = response.headers_mut();
    for (name, value) in parse_headers(headers)? {
        map.append(name, value);
    }
    Ok(response)
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

/// When the request being read must have fully arrived, head and body (`handshake_timeout`).
/// Shared by a connection's IO (which enforces it) and its requests' handling (which stops the
/// clock while the Python handler works, and starts it again for the next request).
struct RequestClock {
    limit: Duration,
    /// `None` while a request's handler runs: only the client's sending is timed.
    deadline: Mutex<Option<Instant>>,
    /// A request was under way when the deadline passed (and got its 408).
    expired_mid_request: AtomicBool,
}

impl RequestClock {
    fn start(&self) {
        *self.deadline.lock() = Some(Instant::now() + self.limit);
    }

    fn stop(&self) {
        *self.deadline.lock() = None;
    }
}

/// The connection's socket as hyper sees it, with the request deadline: a client that has not
/// sent its whole request in time gets `408 Request Timeout` and the connection is closed (one
/// that sent nothing since the last response is closed without one, as an idle keep-alive).
/// hyper's own header timeout ends the connection without a response and does not cover bodies.
struct TimedIo {
    /// `None` once taken: by the upgrade, or by `Drop` to hand back for a lingering close.
    io: Option<TokioIo<Stream>>,
    clock: Arc<RequestClock>,
    timer: Option<Pin<Box<Sleep>>>,
    /// Bytes read since the clock last started: a request is under way.
    read_since_start: bool,
    timed_out: bool,
    /// The client closed its side: closing ours cannot reset anything it still sends.
    saw_eof: bool,
    /// Where the socket goes when hyper drops it before the client closed its side (a refused
    /// request, a timeout): `serve_connection` closes it with `net::linger`.
    give_back: Option<oneshot::Sender<Stream>>,
}

const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

impl TimedIo {
    fn stream(&mut self) -> &mut Stream {
        self.io
            .as_mut()
            .expect("taken only by the upgrade and Drop")
            .inner_mut()
    }

    /// Whether the deadline has passed; arms the timer (and so a wake-up) when it has not.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = *self.clock.deadline.lock() else {
            self.read_since_start = false;
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
        Pin::new(self.stream()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.timed_out {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        Pin::new(self.stream()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io
            .as_ref()
            .is_some_and(|io| io.inner().is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_shutdown(cx)
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
        .timer(TokioTimer::new())
        // hyper's floor for its read buffer is 8 KiB.
        .max_buf_size(shared.config.max_header_size.max(8192));
    let (give_back, mut given_back) = oneshot::channel();
    let io = TimedIo {
        io: Some(TokioIo::new(stream)),
        clock: clock.clone(),
        timer: None,
        read_since_start: false,
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
                connection.await
            }
        }
        // The connection, and with it the socket unless upgraded, is dropped here.
    };
    // try_recv, not await: an upgraded socket is elsewhere by now, and its sender with it.
    if let Ok(stream) = given_back.try_recv() {
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
    let handshake = async {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await.ok()? == 0 {
            return None;
        }
        // Every TLS connection opens with a handshake record (content type 22).
        if first[0] != 0x16 {
            if first[0].is_ascii_uppercase() {
                refuse_plain_http(tcp, shared, remote).await;
            }
            return None;
        }
        let tls = TlsAcceptor::from(config).accept(tcp).await.ok()?;
        let (tcp, session) = tls.into_inner();
        Some(Stream::Tls(Box::new(TlsSocket::new(tcp, session))))
    };
    tokio::select! {
        accepted = tokio::time::timeout_at(deadline, handshake) => accepted.ok().flatten(),
        _ = shared.shutdown.cancelled() => None,
    }
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

async fn handle(
    req: Request<Incoming>,
    remote: Remote,
    shared: Arc<Shared>,
    clock: Arc<RequestClock>,
) -> Result<Response<Body>, Infallible> {
    let response = read_and_answer(req, remote, &shared, &clock).await;
    // The next request on this connection has the whole limit again.
    clock.start();
    response
}

async fn read_and_answer(
    mut req: Request<Incoming>,
    remote: Remote,
    shared: &Arc<Shared>,
    clock: &RequestClock,
) -> Result<Response<Body>, Infallible> {
    let mut websocket_key = None;
    if shared.config.websockets_enabled {
        match handshake::classify(&req) {
            Handshake::NotWebSocket => {}
            Handshake::Invalid(status, why) => {
                reject_handshake(shared, remote, status, why);
                let mut response = plain(status, why);
                if status == StatusCode::UPGRADE_REQUIRED {
                    response
                        .headers_mut()
                        .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
                }
                return Ok(response);
            }
            Handshake::Valid(key) => {
                if !shared.reserve_slot() {
                    reject_handshake(
                        shared,
                        remote,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "max_connections reached",
                    );
                    return Ok(plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Too many connections",
                    ));
                }
                websocket_key = Some(key);
            }
        }
    }
    // A reserved slot passes to the connection on upgrade; any other outcome gives it back.
    let slot = SlotGuard {
        shared,
        held: websocket_key.is_some(),
    };
    let on_upgrade: Option<OnUpgrade> =
        websocket_key.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let deflate = match (&websocket_key, &shared.config.ws.deflate) {
        (Some(_), Some(config)) => handshake::negotiate_deflate(req.headers(), config),
        _ => None,
    };
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, shared.config.max_request_body_size)
        .collect()
        .await
    {
        Ok(collected) => {
            // All of it arrived: the handler's time is not the client's.
            clock.stop();
            collected.to_bytes()
        }
        Err(err) if err.is::<LengthLimitError>() => {
            let status = StatusCode::PAYLOAD_TOO_LARGE;
            reject_request(shared, remote, status, "body over max_request_body_size");
            return Ok(plain(status, "Payload Too Large"));
        }
        Err(_) => {
            // A body cut short by the request deadline is counted once, as a 408, below.
            if !clock.expired_mid_request.load(Ordering::Relaxed) {
                reject_request(shared, remote, StatusCode::BAD_REQUEST, "malformed body");
            }
            return Ok(plain(StatusCode::BAD_REQUEST, "Bad Request"));
        }
    };

    let id = shared.next_id();
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let (reply, answer) = oneshot::channel();
    shared.events.push(Event::Request(Box::new(HttpRequest {
        id,
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or("").to_owned(),
        headers,
        body,
        remote,
        is_websocket: on_upgrade.is_some(),
        reply,
    })));

    match answer.await {
        Ok(Reply::Respond(response)) => Ok(response),
        Ok(Reply::Upgrade(extra)) => match (on_upgrade, websocket_key) {
            (Some(on_upgrade), Some(key)) => {
                slot.hand_over();
                let (params, extensions) = deflate.unzip();
                let conn = shared.register(id, remote.peer(), params);
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
            _ => Ok(plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal Server Error",
            )),
        },
        // The handler's side was dropped without an answer (the server is going away).
        Err(_) => Ok(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable",
        )),
    }
}

/// A `max_connections` slot held while a handshake waits for the handler.
struct SlotGuard<'a> {
    shared: &'a Shared,
    held: bool,
}

impl SlotGuard<'_> {
    /// The connection now owns the slot; `Shared::unregister` gives it back.
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
            let tracker = conn.shared.tracker.clone();
            tracker.spawn(task::run(conn, stream, read_buf));
        }
        None => {
            conn.set_state(ReadyState::Closed);
            conn.shared.unregister(conn.id);
            conn.shared.events.push(Event::UpgradeFailed(conn.id));
        }
    }
}
