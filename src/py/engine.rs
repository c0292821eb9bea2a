//! `Engine`: one running server as Python sees it, and the loop side of the event bridge.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};
use rustc_hash::FxHashMap;

use super::request::PendingRequest;
use super::shared::release_sent;
use super::status;
use super::text::py_text;
use super::websocket::{str_or_bytes_error, topic_arg, with_bytes, PyWebSocket};
use super::{
    EVENT_BYTES, EVENT_BYTES_RUN, EVENT_CLOSE, EVENT_DRAIN, EVENT_FAIL, EVENT_LINKS_ENDED,
    EVENT_LOG, EVENT_OPEN, EVENT_PING, EVENT_PONG, EVENT_REQUEST, EVENT_STOPPED, EVENT_TEXT,
    EVENT_TEXT_RUN,
};
use crate::engine::{
    begin_send_batch, end_send_batch, Address, DeflateConfig, Event, Listen, LogKind, LogRecord,
    MaskedBytes, OutFrame, RedisConfig, RelayPaths, Server, ServerConfig, TlsFiles, WsLimits,
    MAX_TIMEOUT, OP_BINARY, OP_TEXT,
};

#[pyclass(frozen, module = "brioche", name = "Engine")]
pub struct PyEngine {
    server: Server,
    /// Open sockets by id. Only the loop thread touches it (with the GIL), so Python objects are
    /// created and dropped under the GIL and never by a tokio thread.
    sockets: Mutex<FxHashMap<u64, Py<PyWebSocket>>>,
    /// What `upgrade` was given, held until the socket opens (or fails to).
    pending_data: Mutex<FxHashMap<u64, Upgraded>>,
    /// Events taken from the queue but not yet handed to Python: `drain` hands out at most
    /// `max_events` per call. Its buffer is reused so draining does not allocate.
    batch: Mutex<VecDeque<Event>>,
    /// How many events the last `drain` took: a run of messages is one item of its list but
    /// counts here (and against `max_events`) once per message.
    drained: AtomicUsize,
    /// What each socket calls when the application closes or terminates it while open (see
    /// `PyWebSocket::app_closed`), given by `set_close_hook`; sockets opened before have none.
    close_hook: OnceLock<Py<PyAny>>,
}

/// The `data`, `contextvars.Context` and subprotocol a socket gets when it opens.
pub struct Upgraded {
    pub data: Py<PyAny>,
    pub context: Py<PyAny>,
    pub subprotocol: Option<String>,
}

impl PyEngine {
    pub fn set_pending_data(&self, id: u64, upgraded: Upgraded) {
        self.pending_data.lock().insert(id, upgraded);
    }

    pub fn take_pending_data(&self, id: u64) -> Option<Upgraded> {
        self.pending_data.lock().remove(&id)
    }

    /// `event` as the tuple `drain` hands to Python (`None` for events Python does not see).
    ///
    /// The `sockets` lock is held only to look sockets up, never while a Python object is made
    /// or dropped (which may run a finaliser that calls back in). On an error the event comes
    /// back untouched, to be retried, except a request, whose reply is then dropped (the client
    /// gets a 503).
    fn event_to_py<'py>(
        &self,
        engine: &Bound<'py, Self>,
        event: Event,
        ws: Option<Py<PyWebSocket>>,
    ) -> Result<Option<Bound<'py, PyAny>>, (PyErr, Option<Event>)> {
        let py = engine.py();
        if let Event::Request(request) = event {
            let pending = PendingRequest::new(*request, engine.clone().unbind());
            return Py::new(py, pending)
                .and_then(|pending| (EVENT_REQUEST, pending).into_pyobject(py))
                .map(|item| Some(item.into_any()))
                .map_err(|err| (err, None));
        }
        match self.borrowed_event_to_py(py, &event, ws) {
            Ok(item) => Ok(item),
            Err(err) => Err((err, Some(event))),
        }
    }

    /// The socket of each of `events` (`None` for an event with no open socket), pushed onto
    /// `out`, all under one lock. It stops after an event that changes `sockets` once it is
    /// made (an open or a close): the events after it must be looked up again.
    fn look_up_sockets<'a>(
        &self,
        py: Python<'_>,
        events: impl Iterator<Item = &'a Event>,
        out: &mut Vec<Option<Py<PyWebSocket>>>,
    ) {
        let sockets = self.sockets.lock();
        for event in events {
            let (id, changes_sockets) = match event {
                Event::Text(id, _)
                | Event::MaskedText(id, _)
                | Event::Binary(id, _)
                | Event::Drain(id)
                | Event::Ping(id, _)
                | Event::Pong(id, _)
                | Event::Fail(id, ..)
                | Event::PeerClose(id, ..) => (Some(id), false),
                Event::Close(id, ..) => (Some(id), true),
                Event::Open(_) => (None, true),
                Event::Request(_)
                | Event::UpgradeFailed(_)
                | Event::Stopped
                | Event::LinksEnded
                | Event::Log(_) => (None, false),
            };
            // A reference count taken, no object made: nothing here can call back into us.
            out.push(id.and_then(|id| sockets.get(id)).map(|ws| ws.clone_ref(py)));
            if changes_sockets {
                break;
            }
        }
    }

    /// `first` and the messages of the same kind from the same connection right behind it in
    /// `batch` (at most `left` of them), as one `(EVENT_*_RUN, ws, [message, ...], context)`:
    /// Python then enters the connection's context once for the run and calls the handler in a
    /// loop of its own, instead of unpacking one tuple per message. `None` when no message of
    /// the run follows `first` (it is made as a lone event). The followers stay in `batch`;
    /// `Ok((item, n))`: the caller takes the first `n` of them off.
    fn message_run<'py>(
        &self,
        py: Python<'py>,
        first: &Event,
        ws: &Py<PyWebSocket>,
        batch: &VecDeque<Event>,
        left: usize,
    ) -> PyResult<Option<(Bound<'py, PyAny>, usize)>> {
        let same = |event: &&Event| match (first, event) {
            (Event::Text(a, _), Event::Text(b, _)) | (Event::Binary(a, _), Event::Binary(b, _)) => {
                a == b
            }
            _ => false,
        };
        let followers = batch.iter().take(left).take_while(same).count();
        if followers == 0 {
            return Ok(None);
        }
        let run = std::iter::once(first).chain(batch.iter().take(followers));
        let (kind, messages) = match first {
            Event::Text(..) => (
                EVENT_TEXT_RUN,
                PyList::new(
                    py,
                    run.map(|event| match event {
                        Event::Text(_, text) => PyString::new(py, text.as_str()).into_any(),
                        _ => unreachable!("a run is of one kind"),
                    }),
                )?,
            ),
            Event::Binary(..) => {
                let messages = run
                    .map(|event| match event {
                        Event::Binary(_, data) => py_bytes(py, data),
                        _ => unreachable!("a run is of one kind"),
                    })
                    .collect::<PyResult<Vec<_>>>()?;
                (EVENT_BYTES_RUN, PyList::new(py, messages)?)
            }
            _ => return Ok(None),
        };
        let socket = ws.get();
        let context = socket.context.clone_ref(py);
        let item = (kind, ws.clone_ref(py), messages, context).into_pyobject(py)?;
        let bytes = first.message_len()
            + batch
                .iter()
                .take(followers)
                .map(Event::message_len)
                .sum::<usize>();
        socket.conn.messages_taken(1 + followers, bytes);
        Ok(Some((item.into_any(), followers)))
    }

    /// `ws` is the socket of `event`, from `look_up_sockets`.
    fn borrowed_event_to_py<'py>(
        &self,
        py: Python<'py>,
        event: &Event,
        ws: Option<Py<PyWebSocket>>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let item = match event {
            Event::Open(conn) => {
                let id = conn.id;
                let upgraded = self.pending_data.lock().get(&id).map(|up| {
                    (
                        up.data.clone_ref(py),
                        up.context.clone_ref(py),
                        up.subprotocol.clone(),
                    )
                });
                let (data, context, subprotocol) = match upgraded {
                    Some(upgraded) => upgraded,
                    None => (py.None(), new_context(py)?, None),
                };
                let close_hook = self.close_hook.get().map(|hook| hook.clone_ref(py));
                let ws = Py::new(
                    py,
                    PyWebSocket::new(conn.clone(), data, context, subprotocol, close_hook),
                )?;
                let item = (EVENT_OPEN, ws.clone_ref(py)).into_pyobject(py)?;
                let pending = self.take_pending_data(id);
                let replaced = self.sockets.lock().insert(id, ws);
                drop((pending, replaced));
                item.into_any()
            }
            Event::Text(_, text) => {
                let Some(ws) = ws else {
                    return Ok(None);
                };
                let text_obj = PyString::new(py, text.as_str());
                let context = ws.get().context.clone_ref(py);
                let item = (EVENT_TEXT, ws.clone_ref(py), text_obj, context).into_pyobject(py)?;
                ws.get().conn.message_taken(text.len());
                item.into_any()
            }
            Event::MaskedText(_, data) => {
                let Some(ws) = ws else {
                    return Ok(None);
                };
                let conn = &ws.get().conn;
                let Some(text_obj) = py_text(py, data)? else {
                    // Dropped, and the stream refused with 1007 by the connection's task, which
                    // hands the close over as `Event::Fail`: after the handlers of the messages
                    // before this one, as if the task had found it.
                    conn.message_taken(data.len());
                    conn.refuse_text();
                    return Ok(None);
                };
                let context = ws.get().context.clone_ref(py);
                let item = (EVENT_TEXT, ws.clone_ref(py), text_obj, context).into_pyobject(py)?;
                conn.message_taken(data.len());
                item.into_any()
            }
            Event::Binary(_, data) => {
                let Some(ws) = ws else {
                    return Ok(None);
                };
                let bytes = py_bytes(py, data)?;
                let context = ws.get().context.clone_ref(py);
                let item = (EVENT_BYTES, ws.clone_ref(py), bytes, context).into_pyobject(py)?;
                ws.get().conn.message_taken(data.len());
                item.into_any()
            }
            Event::Drain(_) => match ws {
                Some(ws) => (EVENT_DRAIN, ws).into_pyobject(py)?.into_any(),
                None => return Ok(None),
            },
            Event::Ping(_, payload) | Event::Pong(_, payload) => match ws {
                Some(ws) => {
                    let kind = if matches!(event, Event::Ping(..)) {
                        EVENT_PING
                    } else {
                        EVENT_PONG
                    };
                    let conn = ws.get().conn.clone();
                    let item = (kind, ws, PyBytes::new(py, payload)).into_pyobject(py)?;
                    conn.message_taken(payload.len());
                    item.into_any()
                }
                None => return Ok(None),
            },
            // Answered with `close(code, reason)`, in order; the client's close frame as a
            // violation is.
            Event::Fail(_, code, reason) => return fail_item(py, ws, *code, reason),
            Event::PeerClose(_, code, reason) => return fail_item(py, ws, *code, reason),
            Event::Close(id, code, reason) => match ws {
                Some(ws) => {
                    let item = (EVENT_CLOSE, ws, *code, reason.as_str()).into_pyobject(py)?;
                    // Forgotten only once Python has it, so on_close is never lost.
                    let removed = self.sockets.lock().remove(id);
                    drop(removed);
                    item.into_any()
                }
                None => return Ok(None),
            },
            Event::UpgradeFailed(id) => {
                let pending = self.take_pending_data(*id);
                drop(pending);
                return Ok(None);
            }
            Event::Stopped => (EVENT_STOPPED,).into_pyobject(py)?.into_any(),
            Event::LinksEnded => (EVENT_LINKS_ENDED,).into_pyobject(py)?.into_any(),
            Event::Log(record) => log_record(py, record)?,
            Event::Request(_) => unreachable!("taken by event_to_py"),
        };
        Ok(Some(item))
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (
        addresses, port, *, max_request_body_size, max_payload_length, backpressure_limit,
        close_on_backpressure_limit, idle_timeout, publish_to_self, send_pings, websockets_enabled,
        handshake_timeout, max_request_header_size, max_connections, message_timeout,
        max_incoming_bytes, reuse_port=false, relay_path=None, relay_peers=Vec::new(), unix=None,
        unix_mode=None, fd=None,
        redis_url=None, redis_sharded=false, redis_namespace=String::from("brioche:"), tls_cert=None, tls_key=None,
        per_message_deflate=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        addresses: Vec<String>,
        port: u16,
        max_request_body_size: usize,
        max_payload_length: usize,
        backpressure_limit: usize,
        close_on_backpressure_limit: bool,
        idle_timeout: u64,
        publish_to_self: bool,
        send_pings: bool,
        websockets_enabled: bool,
        handshake_timeout: f64,
        max_request_header_size: usize,
        max_connections: usize,
        message_timeout: f64,
        max_incoming_bytes: usize,
        reuse_port: bool,
        relay_path: Option<std::path::PathBuf>,
        relay_peers: Vec<std::path::PathBuf>,
        unix: Option<std::path::PathBuf>,
        unix_mode: Option<u32>,
        fd: Option<i32>,
        redis_url: Option<String>,
        redis_sharded: bool,
        redis_namespace: String,
        tls_cert: Option<std::path::PathBuf>,
        tls_key: Option<std::path::PathBuf>,
        per_message_deflate: Option<(bool, bool, u8, u8)>,
    ) -> PyResult<Self> {
        // The Python configs refuse these first, by their setters' names; this keeps the bound
        // for any caller of the engine.
        let out_of_range = |name: &str| {
            PyValueError::new_err(format!(
                "{name} must be a number of seconds from 0 to {}",
                MAX_TIMEOUT.as_secs()
            ))
        };
        let seconds = |name: &str, value: f64| {
            std::time::Duration::try_from_secs_f64(value)
                .ok()
                .filter(|duration| *duration <= MAX_TIMEOUT)
                .ok_or_else(|| out_of_range(name))
        };
        let idle_timeout = Some(std::time::Duration::from_secs(idle_timeout))
            .filter(|duration| *duration <= MAX_TIMEOUT)
            .ok_or_else(|| out_of_range("idle_timeout"))?;
        // The addresses are IP literals by now: `serve()` resolved the hostname off the loop.
        let listen = match (fd, unix) {
            (Some(fd), _) => Listen::Fd(fd),
            (None, Some(path)) => Listen::Unix {
                path,
                mode: unix_mode,
            },
            (None, None) => {
                let ips = addresses
                    .iter()
                    .map(|address| {
                        address.parse().map_err(|_| {
                            PyValueError::new_err(format!("{address:?} is not an IP address"))
                        })
                    })
                    .collect::<PyResult<_>>()?;
                Listen::Tcp(ips, port)
            }
        };
        let redis = match redis_url {
            Some(url) => {
                let redis = RedisConfig {
                    url,
                    sharded: redis_sharded,
                    namespace: redis_namespace,
                };
                redis.check().map_err(PyValueError::new_err)?;
                Some(redis)
            }
            None => None,
        };
        let config = ServerConfig {
            redis,
            max_request_body_size,
            websockets_enabled,
            ws: WsLimits {
                max_payload_length,
                backpressure_limit,
                close_on_backpressure_limit,
                idle_timeout,
                publish_to_self,
                send_pings,
                message_timeout: seconds("message_timeout", message_timeout)?,
                deflate: per_message_deflate.map(|(snct, cnct, server_bits, client_bits)| {
                    DeflateConfig {
                        server_no_context_takeover: snct,
                        client_no_context_takeover: cnct,
                        server_max_window_bits: server_bits.clamp(9, 15),
                        client_max_window_bits: client_bits.clamp(9, 15),
                    }
                }),
            },
            header_read_timeout: seconds("handshake_timeout", handshake_timeout)?,
            max_header_size: max_request_header_size,
            max_connections,
            max_incoming_bytes,
            reuse_port,
            relay: relay_path.map(|listen| RelayPaths {
                listen,
                peers: relay_peers,
            }),
            tls: tls_cert
                .zip(tls_key)
                .map(|(cert, key)| TlsFiles { cert, key }),
            ..ServerConfig::default()
        };
        super::malloc::tune_for_large_messages();
        // The engine's environment variables are read here, with the GIL: Python's `os.environ`
        // writes hold it, and glibc's `getenv` must not run beside a `setenv` (it may walk an
        // array being reallocated). The runtime's threads read nothing once started.
        crate::engine::init_from_env();
        // Binding touches no Python object: other Python threads may run meanwhile.
        let server = py
            .detach(|| Server::start_on(config, listen))
            .map_err(super::errors::os_error)?;
        Ok(Self {
            server,
            sockets: Mutex::new(FxHashMap::default()),
            pending_data: Mutex::new(FxHashMap::default()),
            batch: Mutex::new(VecDeque::with_capacity(256)),
            drained: AtomicUsize::new(0),
            close_hook: OnceLock::new(),
        })
    }

    /// Read the TLS certificate and key files again, for the connections to come.
    fn reload_tls(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.server.reload_tls())
            .map_err(super::errors::os_error)
    }

    /// The port listened on; 0 on a Unix socket.
    #[getter]
    fn port(&self) -> u16 {
        self.server.local_addr().map_or(0, |addr| addr.port())
    }

    /// The first IP address listened on; `None` on a Unix socket.
    #[getter]
    fn host(&self) -> Option<String> {
        self.server.local_addr().map(|addr| addr.ip().to_string())
    }

    /// The Unix socket's path; `None` on TCP.
    #[getter]
    fn unix_path(&self) -> Option<std::ffi::OsString> {
        self.server
            .addresses()
            .iter()
            .find_map(|bound| match bound {
                Address::Unix(path) => Some(path.clone().into_os_string()),
                Address::Tcp(_) => None,
            })
    }

    /// `(receiving, sending)`: how many sibling workers' publishes reach this server, and how
    /// many siblings its publishes reach; `None` without a relay.
    #[getter]
    fn relay_links(&self) -> Option<(usize, usize)> {
        let relay = self.server.shared().relay.as_ref()?;
        Some((relay.receiving(), relay.sending()))
    }

    #[getter]
    fn pending_websockets(&self) -> usize {
        self.server.shared().open_websockets()
    }

    #[getter]
    fn pending_requests(&self) -> usize {
        self.server.shared().pending_requests()
    }

    /// The server's counters (see `Server.stats` for the keys).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let shared = self.server.shared();
        let (counters, closes) = shared.stats();
        let stats = PyDict::new(py);
        for (name, value) in counters {
            stats.set_item(name, value)?;
        }
        let by_code = PyDict::new(py);
        for (code, count) in closes {
            by_code.set_item(code, count)?;
        }
        stats.set_item("closes_by_code", by_code)?;
        stats.set_item("open_connections", shared.open_websockets())?;
        stats.set_item("incoming_bytes", shared.incoming_bytes())?;
        stats.set_item("redis_connected", u8::from(shared.redis_connected()))?;
        let relay_lost = shared.relay.as_ref().map_or(0, |relay| relay.dropped());
        stats.set_item("relay_publishes_lost", relay_lost)?;
        Ok(stats)
    }

    /// Bytes held in incomplete messages and in messages not yet handed to Python: what
    /// `max_incoming_bytes` caps.
    #[getter]
    fn incoming_bytes(&self) -> usize {
        self.server.shared().incoming_bytes()
    }

    /// How many events (messages, opens, closes...) the last `drain()` took, for sizing the
    /// next: its list holds fewer items when it has runs of messages.
    #[getter]
    fn drained(&self) -> usize {
        self.drained.load(Ordering::Relaxed)
    }

    /// The descriptor the loop watches: readable when events are waiting.
    fn fileno(&self) -> i32 {
        self.server.shared().events.fd()
    }

    /// Take up to `max_events` waiting events as `(kind, ...)` tuples, building the Python
    /// objects here, on the loop thread, and start a send batch: what the handlers send is
    /// written, one write per connection, at `end_batch()`. A connection's messages of one
    /// kind that come back to back are one tuple (`EVENT_TEXT_RUN`, `EVENT_BYTES_RUN`).
    ///
    /// Events past `max_events` stay here, with no Python object made for them yet, and the
    /// wake-up fd is set again: the loop runs its other callbacks and timers before it calls
    /// back for the rest, so a flood of events cannot starve it.
    fn drain<'py>(slf: &Bound<'py, Self>, max_events: usize) -> PyResult<Bound<'py, PyList>> {
        let py = slf.py();
        let this = slf.get();
        let events = &this.server.shared().events;
        events.set_in_batch(true);
        release_sent(py);
        begin_send_batch();
        let mut batch = std::mem::take(&mut *this.batch.lock());
        if batch.is_empty() {
            // The usual case: swap the queue's buffer out whole (`VecDeque::from` a `Vec` and
            // back again move no elements when it is empty).
            let mut taken = Vec::from(batch);
            events.drain_into(&mut taken);
            batch = VecDeque::from(taken);
        } else {
            let mut taken = Vec::new();
            events.drain_into(&mut taken);
            batch.extend(taken);
        }
        let mut left = batch.len().min(max_events.max(1));
        let wanted = left;
        let mut items = Vec::with_capacity(left);
        // The sockets of the next events, taken under one lock for as many as possible rather
        // than one lock per event; consumed from the front, hence reversed.
        let mut sockets = Vec::with_capacity(left);
        let mut failed = None;
        // Bytes of messages now in Python's hands (or of sockets gone): off the server's budget.
        let mut taken = 0;
        while left > 0 {
            if sockets.is_empty() {
                this.look_up_sockets(py, batch.iter().take(left), &mut sockets);
                sockets.reverse();
            }
            let Some(event) = batch.pop_front() else {
                break;
            };
            left -= 1;
            let len = event.message_len();
            let ws = sockets.pop().flatten();
            if let Some(socket) = &ws {
                if refused_message(socket, &event) {
                    taken += len;
                    continue;
                }
                match this.message_run(py, &event, socket, &batch, left) {
                    Ok(Some((item, followers))) => {
                        taken += len;
                        for follower in batch.drain(..followers) {
                            taken += follower.message_len();
                            // Their sockets, if looked up yet, are `socket` again.
                            drop(sockets.pop());
                        }
                        left -= followers;
                        items.push(item);
                        continue;
                    }
                    Ok(None) => {}
                    Err(err) => {
                        batch.push_front(event);
                        failed = Some(err);
                        break;
                    }
                }
            }
            match this.event_to_py(slf, event, ws) {
                Ok(Some(item)) => {
                    taken += len;
                    items.push(item)
                }
                Ok(None) => taken += len,
                Err((err, event)) => {
                    // Most likely a MemoryError: keep the event for the next call instead of
                    // losing it, and hand Python what was made so far.
                    if let Some(event) = event {
                        batch.push_front(event);
                    }
                    failed = Some(err);
                    break;
                }
            }
        }
        this.server.shared().incoming_taken(taken);
        this.drained.store(wanted - left, Ordering::Relaxed);
        if !batch.is_empty() {
            events.wake();
        }
        *this.batch.lock() = batch;
        if let Some(err) = failed {
            if items.is_empty() {
                return Err(err);
            }
            err.write_unraisable(py, Some(slf.as_any()));
        }
        PyList::new(py, items)
    }

    /// Write everything sent since `drain()`; returns how many connections were written to and
    /// how many publish deliveries they carried.
    fn end_batch(&self, py: Python<'_>) -> (usize, usize) {
        // Socket writes only: other Python threads may run meanwhile.
        let written = py.detach(end_send_batch);
        let events = &self.server.shared().events;
        // Not while events taken are kept for the next call: a client's close behind one of
        // them (an `Open` kept over, say) is then answered in order, after it.
        if self.batch.lock().is_empty() {
            events.all_drained_handled();
        }
        // The objects large frames were sent from, now written; one queued after this finds
        // the loop out of its batch, and wakes it.
        events.set_in_batch(false);
        release_sent(py);
        (written.connections, written.deliveries)
    }

    /// Stop listening; see `Server.stop`.
    fn stop(&self, py: Python<'_>, close_active_connections: bool) {
        self.server.stop(close_active_connections);
        release_sent(py);
    }

    /// Once stopped and every event handled: end the links to other processes (Redis, sibling
    /// workers) after what is queued for them is sent; `EVENT_LINKS_ENDED` follows. False when
    /// the server has none (no event follows).
    fn end_links(&self) -> bool {
        self.server.end_links()
    }

    /// Send `message` (text for `str`, binary otherwise) to every subscriber of `topic`;
    /// `compress` as `WebSocket.publish`'s.
    #[pyo3(signature = (topic, message, compress = false))]
    fn publish(
        &self,
        py: Python<'_>,
        topic: &Bound<'_, PyAny>,
        message: &Bound<'_, PyAny>,
        compress: bool,
    ) -> PyResult<Py<PyAny>> {
        let topic = topic_arg("publish", topic)?;
        let shared = self.server.shared();
        let sent = if let Ok(text) = message.cast::<PyString>() {
            let text = text.to_str()?;
            let frame = OutFrame::new(OP_TEXT, bytes::Bytes::copy_from_slice(text.as_bytes()));
            shared.publish_with(topic, frame, text.len(), None, compress)
        } else {
            with_bytes(message, |data| {
                let frame = OutFrame::new(OP_BINARY, bytes::Bytes::copy_from_slice(data));
                shared.publish_with(topic, frame, data.len(), None, compress)
            })
            .map_err(|e| str_or_bytes_error(e, "publish", message))?
        };
        status::to_py(py, sent)
    }

    /// `hook(ws)` is called when the application closes or terminates an open socket (once set,
    /// for the sockets that open after); a second call is a `RuntimeError`.
    fn set_close_hook(&self, hook: Py<PyAny>) -> PyResult<()> {
        self.close_hook
            .set(hook)
            .map_err(|_| PyRuntimeError::new_err("the close hook is set once"))
    }

    /// Whether clients' pings and pongs are handed to the loop (`on_ping`, `on_pong` are set).
    fn set_control_events(&self, pings: bool, pongs: bool) {
        self.server.shared().set_control_events(pings, pongs);
    }

    /// Log lines of kind `kind` (a number a log event gave) left out since the last one logged:
    /// the loop reports them a second after the line that filled its second, in case no
    /// line of that kind comes after them to carry the count.
    fn take_left_out(&self, kind: usize) -> u32 {
        self.server.shared().take_left_out(kind)
    }

    fn subscriber_count(&self, topic: &Bound<'_, PyAny>) -> PyResult<usize> {
        let topic = topic_arg("subscriber_count", topic)?;
        Ok(self.server.shared().subscriber_count(topic))
    }
}

/// `(EVENT_LOG, logger name, level, format, args, left out, kind)`: the loop formats it only
/// if that logger is enabled for that level. `kind` is the kind's number when the line is the
/// last its second allows (the loop asks `take_left_out` for the rest a second later), else -1.
fn log_record<'py>(py: Python<'py>, record: &LogRecord) -> PyResult<Bound<'py, PyAny>> {
    const INFO: u8 = 20;
    const WARNING: u8 = 30;
    let (logger, level, format, args) = match record.kind {
        LogKind::HandshakeRejected => (
            "brioche.http",
            INFO,
            "refused a WebSocket handshake from %s: %d, %s",
            Args::PeerCodeReason,
        ),
        LogKind::RequestRejected => (
            "brioche.http",
            INFO,
            "refused a request from %s: %d, %s",
            Args::PeerCodeReason,
        ),
        LogKind::ResponseStalled => (
            "brioche.http",
            INFO,
            "dropped the connection from %s: %s",
            Args::PeerReason,
        ),
        LogKind::ClientRefused => (
            "brioche.ws",
            INFO,
            "closing the connection from %s with %d: %s",
            Args::PeerCodeReason,
        ),
        LogKind::IdleTimeout | LogKind::CloseTimeout => (
            "brioche.ws",
            INFO,
            "closed the connection from %s (%d): %s",
            Args::PeerCodeReason,
        ),
        LogKind::BackpressureDrop => (
            "brioche.ws",
            WARNING,
            "dropping messages to %s: %s; more drops are not logged until its queue drains",
            Args::PeerReason,
        ),
        // No close frame goes out (the queue is over its limit): `on_close` gets the code.
        LogKind::BackpressureClose => (
            "brioche.ws",
            WARNING,
            "dropped the connection to %s without a close frame (on_close gets %d): %s",
            Args::PeerCodeReason,
        ),
        LogKind::RedisDown => (
            "brioche.redis",
            WARNING,
            "Redis pub/sub at %s is down (%s): other processes miss what this one publishes, \
             and it misses theirs, until it is back; reconnecting",
            Args::PeerReason,
        ),
        LogKind::RedisRefused => (
            "brioche.redis",
            WARNING,
            "Redis pub/sub at %s refused the channel %s: other processes miss what this one \
             publishes to its topic, and it misses theirs; the other topics still cross",
            Args::PeerReason,
        ),
        LogKind::RedisUp => (
            "brioche.redis",
            INFO,
            "Redis pub/sub at %s is back (%s): what was published meanwhile did not cross \
             between processes",
            Args::PeerReason,
        ),
        LogKind::RelayDrop => (
            "brioche.relay",
            WARNING,
            "dropping publishes to the sibling worker %s (%s): its clients miss them",
            Args::PeerReason,
        ),
        LogKind::TlsHandshakeFailed => (
            "brioche.http",
            INFO,
            "TLS handshake from %s failed: %s",
            Args::PeerReason,
        ),
        LogKind::RedisTooBig => (
            "brioche.redis",
            WARNING,
            "a publish over 24 MiB was not sent to Redis: Redis would disconnect every \
             subscriber of its topic (client-output-buffer-limit pubsub); other processes miss \
             it",
            Args::Nothing,
        ),
        LogKind::RedisBacklog => (
            "brioche.redis",
            WARNING,
            "dropping publishes to Redis (%s): other processes miss them; more drops are not \
             logged until the queue to Redis empties",
            Args::Reason,
        ),
        LogKind::ReadsPaused => (
            "brioche.ws",
            WARNING,
            "stopped reading from %s: %s; connections holding 64 KiB or more, and compressed \
             messages to inflate, wait until it is back under the limit (messages handled, \
             bodies answered, connections ended); logged at most once a minute per server, \
             stats()[\"reads_paused\"] counts every pause",
            Args::PeerReason,
        ),
        LogKind::AcceptFailed => (
            "brioche.http",
            WARNING,
            "cannot accept connections on %s (%s): retrying every 10 ms; until then new \
             clients wait unanswered (raise LimitNOFILE / ulimit -n if it is out of file \
             descriptors)",
            Args::PeerReason,
        ),
        LogKind::AcceptResumed => (
            "brioche.http",
            INFO,
            "accepting connections on %s again, %s",
            Args::PeerReason,
        ),
        LogKind::RedisInboundBacklog => (
            "brioche.redis",
            WARNING,
            "dropping messages from Redis (%s): this process's subscribers miss them; more \
             drops are not logged until that queue empties",
            Args::Reason,
        ),
    };
    let peer = record.peer.as_str();
    let reason = record.reason.as_ref();
    let args = match args {
        Args::PeerCodeReason => (peer, record.code, reason).into_pyobject(py)?,
        Args::PeerReason => (peer, reason).into_pyobject(py)?,
        Args::Reason => (reason,).into_pyobject(py)?,
        Args::Nothing => ().into_pyobject(py)?,
    };
    // The kind's number if this line filled its second (`LogRecord::fills_second`), else -1.
    let filled = if record.fills_second {
        record.kind as i64
    } else {
        -1
    };
    let item = (
        EVENT_LOG,
        logger,
        level,
        format,
        args,
        record.left_out,
        filled,
    );
    Ok(item.into_pyobject(py)?.into_any())
}

/// Which of a record's fields a line's format takes, in this order.
enum Args {
    PeerCodeReason,
    PeerReason,
    Reason,
    Nothing,
}

/// An empty `contextvars.Context`, for a socket opened without `upgrade` giving one.
fn new_context(py: Python<'_>) -> PyResult<Py<PyAny>> {
    Ok(py
        .import("contextvars")?
        .getattr("Context")?
        .call0()?
        .unbind())
}

/// `(EVENT_FAIL, ws, code, reason)`: the loop closes `ws` with them once its earlier handlers
/// have run. The violation or the client's close came after a large text this loop may have
/// refused since, whose 1007 then wins (`Conn::refused_text_close`).
fn fail_item<'py>(
    py: Python<'py>,
    ws: Option<Py<PyWebSocket>>,
    code: u16,
    reason: &str,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let Some(ws) = ws else {
        return Ok(None);
    };
    let (code, reason) = ws.get().conn.refused_text_close().unwrap_or((code, reason));
    Ok(Some(
        (EVENT_FAIL, ws, code, reason).into_pyobject(py)?.into_any(),
    ))
}

/// A message of a connection whose stream was refused on this thread (`Conn::refuse_text`),
/// which came after the invalid one: dropped unseen, as if the task had stopped reading there.
/// Counted as taken.
fn refused_message(ws: &Py<PyWebSocket>, event: &Event) -> bool {
    let conn = &ws.get().conn;
    let message = matches!(
        event,
        Event::Text(..)
            | Event::MaskedText(..)
            | Event::Binary(..)
            | Event::Ping(..)
            | Event::Pong(..)
    );
    if message && conn.text_refused() {
        conn.message_taken(event.message_len());
        return true;
    }
    false
}

/// A `bytes` of a binary message: a copy, which also unmasks it if it came still masked
/// (`MaskedBytes`), in the same pass.
fn py_bytes<'py>(py: Python<'py>, data: &MaskedBytes) -> PyResult<Bound<'py, PyBytes>> {
    if let Some(plain) = data.as_unmasked() {
        return Ok(PyBytes::new(py, plain));
    }
    let len = data.len();
    // SAFETY: a new `bytes` of `len` bytes whose contents CPython leaves for its maker to fill
    // before anyone else sees it (`PyBytes::new_with` does the same, but fills it with zeros
    // first: a pass of its own). `copy_to` writes every byte.
    unsafe {
        let ptr = ffi::PyBytes_FromStringAndSize(std::ptr::null(), len as ffi::Py_ssize_t);
        let bytes = Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked::<PyBytes>();
        let buffer = ffi::PyBytes_AsString(ptr).cast::<MaybeUninit<u8>>();
        data.copy_to(std::slice::from_raw_parts_mut(buffer, len));
        Ok(bytes)
    }
}
