//! `PendingRequest`: one HTTP request waiting for the Python handler's answer.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::sync::oneshot;

use super::engine::{PyEngine, Upgraded};
use crate::engine::{build_response, parse_headers, HttpRequest, Remote, Reply};

#[pyclass(frozen, module = "brioche", name = "PendingRequest")]
pub struct PendingRequest {
    id: u64,
    #[pyo3(get)]
    method: String,
    #[pyo3(get)]
    path: String,
    #[pyo3(get)]
    query: String,
    #[pyo3(get)]
    headers: Vec<(String, String)>,
    body: Bytes,
    remote: Remote,
    #[pyo3(get)]
    is_websocket: bool,
    reply: Mutex<Option<oneshot::Sender<Reply>>>,
    upgraded: AtomicBool,
    engine: Py<PyEngine>,
}

impl PendingRequest {
    pub fn new(request: HttpRequest, engine: Py<PyEngine>) -> Self {
        Self {
            id: request.id,
            method: request.method,
            path: request.path,
            query: request.query,
            headers: request.headers,
            body: request.body,
            remote: request.remote,
            is_websocket: request.is_websocket,
            reply: Mutex::new(Some(request.reply)),
            upgraded: AtomicBool::new(false),
            engine,
        }
    }
}

#[pymethods]
impl PendingRequest {
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.body)
    }

    #[getter]
    fn remote_address(&self) -> String {
        self.remote.peer().address()
    }

    /// The client as the core's log lines name it (`127.0.0.1:41234`, `[::1]:41234`, or a Unix
    /// socket's client), for the lines Python writes about the same request.
    #[getter]
    fn client(&self) -> String {
        self.remote.to_string()
    }

    /// The client's TCP port; 0 over a Unix socket.
    #[getter]
    fn remote_port(&self) -> u16 {
        match self.remote {
            Remote::Tcp(addr) => addr.port(),
            Remote::Unix => 0,
        }
    }

    /// Whether `upgrade` succeeded.
    #[getter]
    fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// Answer with an HTTP response. A second answer is ignored.
    fn respond(&self, status: u16, headers: Vec<(String, String)>, body: &[u8]) -> PyResult<()> {
        let response =
            build_response(status, &headers, Bytes::copy_from_slice(body), &self.method)?;
        if let Some(reply) = self.reply.lock().take() {
            // The client may be gone; then there is nobody to answer.
            let _ = reply.send(Reply::Respond(response));
        }
        Ok(())
    }

    /// Answer with `101 Switching Protocols`; `data` becomes the socket's `ws.data` and
    /// `context` the `contextvars.Context` its handlers run in.
    /// False when this is not a WebSocket handshake, it was already answered, or the client left.
    /// `subprotocol` is what `ws.subprotocol` reports; the caller puts it in `headers`.
    #[pyo3(signature = (headers, data, context, subprotocol = None))]
    fn upgrade(
        &self,
        headers: Vec<(String, String)>,
        data: Py<PyAny>,
        context: Py<PyAny>,
        subprotocol: Option<String>,
    ) -> PyResult<bool> {
        if !self.is_websocket {
            return Ok(false);
        }
        let headers = parse_headers(&headers)?;
        let Some(reply) = self.reply.lock().take() else {
            return Ok(false);
        };
        let engine = self.engine.get();
        engine.set_pending_data(
            self.id,
            Upgraded {
                data,
                context,
                subprotocol,
            },
        );
        if reply.send(Reply::Upgrade(headers)).is_err() {
            drop(engine.take_pending_data(self.id));
            return Ok(false);
        }
        self.upgraded.store(true, Ordering::Relaxed);
        Ok(true)
    }

    fn __repr__(&self) -> String {
        format!("<PendingRequest {} {}>", self.method, self.path)
    }
}
