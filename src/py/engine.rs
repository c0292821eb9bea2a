//! `Engine`: one running server as Python sees it, and the loop side of the event bridge.

use std::collections::VecDeque;

use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};
use rustc_hash::FxHashMap;

use super::request::PendingRequest;
use super::status;
use super::websocket::{with_bytes, PyWebSocket};
use super::{
    EVENT_BYTES, EVENT_CLOSE, EVENT_DRAIN, EVENT_FAIL, EVENT_OPEN, EVENT_REQUEST, EVENT_STOPPED,
    EVENT_TEXT,
};
use crate::engine::conn;
use crate::engine::frame::{OutFrame, OP_BINARY, OP_TEXT};
use crate::engine::{Event, Server, ServerConfig, WsLimits};

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
}

/// The `data` and `contextvars.Context` a socket gets when it opens.
pub struct Upgraded {
    pub data: Py<PyAny>,
    pub context: Py<PyAny>,
}

impl PyEngine {
    pub fn set_pending_data(&self, id: u64, upgraded: Upgraded) {
        self.pending_data.lock().insert(id, upgraded);
    }

    pub fn take_pending_data(&self, id: u64) -> Option<Upgraded> {
        self.pending_data.lock().remove(&id)
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (
        hostname, port, *, max_request_body_size, max_payload_length, backpressure_limit,
        close_on_backpressure_limit, idle_timeout, publish_to_self, send_pings, websockets_enabled,
        handshake_timeout, max_request_header_size, max_connections
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        hostname: String,
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
    ) -> PyResult<Self> {
        let config = ServerConfig {
            host: hostname,
            port,
            max_request_body_size,
            websockets_enabled,
            ws: WsLimits {
                max_payload_length,
                backpressure_limit,
                close_on_backpressure_limit,
                idle_timeout: std::time::Duration::from_secs(idle_timeout),
                publish_to_self,
                send_pings,
            },
            header_read_timeout: std::time::Duration::try_from_secs_f64(handshake_timeout)
                .map_err(|_| {
                    PyValueError::new_err("handshake_timeout must be a positive number of seconds")
                })?,
            max_header_size: max_request_header_size,
            max_connections,
            ..ServerConfig::default()
        };
        let server = Server::start(config).map_err(super::errors::os_error)?;
        Ok(Self {
            server,
            sockets: Mutex::new(FxHashMap::default()),
            pending_data: Mutex::new(FxHashMap::default()),
            batch: Mutex::new(VecDeque::with_capacity(256)),
        })
    }

    #[getter]
    fn port(&self) -> u16 {
        self.server.local_addr().port()
    }

    #[getter]
    fn pending_websockets(&self) -> usize {
        self.server.shared().open_websockets()
    }

    /// The descriptor the loop watches: readable when events are waiting.
    fn fileno(&self) -> i32 {
        self.server.shared().events.fd()
    }

    /// Take up to `max_events` waiting events as `(kind, ...)` tuples, building the Python
    /// objects here, on the loop thread, and start a send batch: what the handlers send is
    /// written, one write per connection, at `end_batch()`.
    ///
    /// Events past `max_events` stay here, with no Python object made for them yet, and the
    /// wake-up fd is set again: the loop runs its other callbacks and timers before it calls
    /// back for the rest, so a flood of events cannot starve it.
    fn drain<'py>(slf: &Bound<'py, Self>, max_events: usize) -> PyResult<Bound<'py, PyList>> {
        let py = slf.py();
        let this = slf.get();
        conn::begin_send_batch();
        let events = &this.server.shared().events;
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
        let count = batch.len().min(max_events.max(1));
        let out = PyList::empty(py);
        let mut sockets = this.sockets.lock();
        for event in batch.drain(..count) {
            match event {
                Event::Open(conn) => {
                    let id = conn.id;
                    let Upgraded { data, context } = match this.take_pending_data(id) {
                        Some(upgraded) => upgraded,
                        None => Upgraded {
                            data: py.None(),
                            context: new_context(py)?,
                        },
                    };
                    let ws = Py::new(py, PyWebSocket::new(conn, data, context))?;
                    sockets.insert(id, ws.clone_ref(py));
                    out.append((EVENT_OPEN, ws))?;
                }
                Event::Text(id, text) => {
                    if let Some(ws) = sockets.get(&id) {
                        ws.get().conn.message_taken(text.len());
                        out.append((
                            EVENT_TEXT,
                            ws.clone_ref(py),
                            PyString::new(py, text.as_str()),
                        ))?;
                    }
                }
                Event::Binary(id, data) => {
                    if let Some(ws) = sockets.get(&id) {
                        ws.get().conn.message_taken(data.len());
                        out.append((EVENT_BYTES, ws.clone_ref(py), PyBytes::new(py, &data)))?;
                    }
                }
                Event::Drain(id) => {
                    if let Some(ws) = sockets.get(&id) {
                        out.append((EVENT_DRAIN, ws.clone_ref(py)))?;
                    }
                }
                Event::Fail(id, code, reason) => {
                    if let Some(ws) = sockets.get(&id) {
                        out.append((EVENT_FAIL, ws.clone_ref(py), code, reason))?;
                    }
                }
                Event::Close(id, code, reason) => {
                    if let Some(ws) = sockets.remove(&id) {
                        out.append((EVENT_CLOSE, ws, code, reason))?;
                    }
                }
                Event::Request(request) => {
                    let pending = Py::new(py, PendingRequest::new(*request, slf.clone().unbind()))?;
                    out.append((EVENT_REQUEST, pending))?;
                }
                Event::UpgradeFailed(id) => drop(this.take_pending_data(id)),
                Event::Stopped => out.append((EVENT_STOPPED,))?,
            }
        }
        drop(sockets);
        if !batch.is_empty() {
            events.wake();
        }
        *this.batch.lock() = batch;
        Ok(out)
    }

    /// Write everything sent since `drain()`.
    fn end_batch(&self) {
        conn::end_send_batch();
    }

    /// Stop listening; see `Server.stop`.
    fn stop(&self, close_active_connections: bool) {
        self.server.stop(close_active_connections);
    }

    /// Send `message` (text for `str`, binary otherwise) to every subscriber of `topic`.
    fn publish(
        &self,
        py: Python<'_>,
        topic: &str,
        message: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        if topic.is_empty() {
            return Err(PyValueError::new_err(
                "a topic name must be a non-empty string",
            ));
        }
        let shared = self.server.shared();
        let sent = if let Ok(text) = message.cast::<PyString>() {
            let text = text.to_str()?;
            let frame = OutFrame::new(OP_TEXT, bytes::Bytes::copy_from_slice(text.as_bytes()));
            shared.publish(topic, frame, text.len(), None)
        } else {
            with_bytes(message, |data| {
                let frame = OutFrame::new(OP_BINARY, bytes::Bytes::copy_from_slice(data));
                shared.publish(topic, frame, data.len(), None)
            })?
        };
        status::to_py(py, sent)
    }

    fn subscriber_count(&self, topic: &str) -> usize {
        self.server.shared().topics.subscriber_count(topic)
    }
}

/// An empty `contextvars.Context`, for a socket opened without `upgrade` giving one.
fn new_context(py: Python<'_>) -> PyResult<Py<PyAny>> {
    Ok(py
        .import("contextvars")?
        .getattr("Context")?
        .call0()?
        .unbind())
}

impl Drop for PyEngine {
    fn drop(&mut self) {
        // Nobody can handle this server's events any more: stop it rather than leak its sockets.
        self.server.stop(true);
    }
}
