//! `brioche.WebSocket`: the Python face of one connection. Every method is synchronous and only
//! touches the connection's queue and atomics, so it is safe and cheap to call from the loop.

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::pyclass::{PyTraverseError, PyVisit};
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyInt, PyMemoryView, PyString, PyType};

use super::errors::value_error;
use super::shared::shared_payload;
use super::status;
use crate::engine::{
    is_valid_close_code, Conn, ReadyState, SendStatus, INLINE_PAYLOAD, OP_BINARY, OP_TEXT,
};

/// A server-side WebSocket connection.
#[pyclass(frozen, weakref, module = "brioche", name = "WebSocket")]
pub struct PyWebSocket {
    pub(crate) conn: Arc<Conn>,
    /// Assignable (`ws.data = ...`), as in Bun: a strong reference, owned here. Read and
    /// replaced only through the getter and setter, which run attached to the interpreter: the
    /// GIL orders them, and nothing between the load and the incref (or the swap) can let
    /// another thread in. Not a lock: its two atomic read-modify-writes were 2.9% of S1's CPU,
    /// `ws.data` being read once per message by handlers that branch on it.
    data: AtomicPtr<ffi::PyObject>,
    /// The `contextvars.Context` every handler of this connection runs in: a copy of the one
    /// `upgrade` was called in, so what the HTTP handler set reaches the socket's handlers.
    pub(crate) context: Py<PyAny>,
    subprotocol: Option<String>,
    /// The dispatcher's `hook(ws)`, called when the application closes or terminates this socket
    /// while it is open (see `app_closed`).
    close_hook: Option<Py<PyAny>>,
}

impl PyWebSocket {
    pub fn new(
        conn: Arc<Conn>,
        data: Py<PyAny>,
        context: Py<PyAny>,
        subprotocol: Option<String>,
        close_hook: Option<Py<PyAny>>,
    ) -> Self {
        Self {
            conn,
            data: AtomicPtr::new(data.into_ptr()),
            context,
            subprotocol,
            close_hook,
        }
    }

    /// The application closed (or terminated) this socket, which was open: the dispatcher
    /// hands its handlers none of the messages still to come, as uWS emits none once closing
    /// (a handler that rejects a client in `on_open` must not see what it sent meanwhile).
    fn app_closed(slf: &Bound<'_, Self>, was_open: bool) -> PyResult<()> {
        match &slf.get().close_hook {
            Some(hook) if was_open => hook.call1(slf.py(), (slf,)).map(drop),
            _ => Ok(()),
        }
    }
}

impl Drop for PyWebSocket {
    fn drop(&mut self) {
        let data = *self.data.get_mut();
        // A deallocation runs attached, so `attach` only checks that it is.
        Python::attach(|py| {
            // SAFETY: the field's strong reference, released once: nothing reads it after
            // `drop`.
            drop(unsafe { Bound::from_owned_ptr(py, data) });
        });
    }
}

/// `brioche.ReadyState`'s members by value, looked up once.
static READY_STATES: PyOnceLock<Vec<Py<PyAny>>> = PyOnceLock::new();

fn ready_state_member(py: Python<'_>, state: u8) -> PyResult<Py<PyAny>> {
    let members = READY_STATES.get_or_try_init(py, || {
        let enum_type = py.import("brioche._enums")?.getattr("ReadyState")?;
        (0u8..4)
            .map(|value| enum_type.call1((value,)).map(Bound::unbind))
            .collect::<PyResult<Vec<_>>>()
    })?;
    Ok(members[usize::from(state)].clone_ref(py))
}

/// Borrow the bytes of `bytes`, `bytearray`, `memoryview` or any buffer, copying only when the
/// object could change under us.
pub fn with_bytes<R>(obj: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(f(b.as_bytes()));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(f(&b.to_vec()));
    }
    // Any other buffer (memoryview, array, mmap): copied out by `memoryview(obj).tobytes()`.
    // pyo3's `PyBuffer` is not available: the buffer protocol joined the limited API (abi3) in
    // 3.11. Same one copy as `PyBuffer::to_vec`, plus a memoryview (unless `obj` is one) and a
    // bytes object; bytes and bytearray, the common cases, do not come here. Unlike `PyBuffer<u8>`
    // it takes buffers of any item format (an `array('i')` is sent as its raw bytes).
    let view = match obj.cast::<PyMemoryView>() {
        Ok(view) => view.clone(),
        Err(_) => PyMemoryView::from(obj)?,
    };
    let copy = view.call_method0(intern!(obj.py(), "tobytes"))?;
    Ok(f(copy.cast::<PyBytes>()?.as_bytes()))
}

/// Send `text`: a large one from the `str` object itself (see `shared.rs`), a small one copied.
fn send_text(conn: &Arc<Conn>, text: &Bound<'_, PyString>) -> PyResult<SendStatus> {
    let utf8 = text.to_str()?;
    if utf8.len() <= INLINE_PAYLOAD {
        return Ok(conn.send_text(utf8));
    }
    Ok(conn.send_owned(
        OP_TEXT,
        shared_payload(text.as_any(), utf8.as_bytes(), &conn.shared),
    ))
}

/// The error of `function` (`send`, `publish`, `ping`, `pong`) for a message that is neither
/// `str` nor bytes-like, in place of `memoryview`'s `TypeError`, which names neither; any other
/// error (a released `memoryview`) as it is.
#[cold]
pub(super) fn str_or_bytes_error(
    error: PyErr,
    function: &str,
    message: &Bound<'_, PyAny>,
) -> PyErr {
    wrong_type(error, function, "a str or a bytes-like object", message)
}

/// The same for `send_bytes` and `publish_bytes` (given a `str` most likely, which `send` and
/// `publish` would take).
#[cold]
fn bytes_error(error: PyErr, function: &str, message: &Bound<'_, PyAny>) -> PyErr {
    wrong_type(error, function, "a bytes-like object", message)
}

fn wrong_type(error: PyErr, function: &str, takes: &str, message: &Bound<'_, PyAny>) -> PyErr {
    if !error.is_instance_of::<PyTypeError>(message.py()) {
        return error;
    }
    let got = type_name(message);
    PyTypeError::new_err(format!("{function}() takes {takes}, got {got}"))
}

/// The name of `obj`'s type, for an error message ("?" if even that fails).
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map_or("?".into(), |n| n.to_string())
}

fn publish_binary(
    conn: &Arc<Conn>,
    topic: &str,
    data: &Bound<'_, PyAny>,
    compress: bool,
) -> PyResult<SendStatus> {
    with_bytes(data, |b| {
        if compress {
            conn.publish_compressed(topic, OP_BINARY, b)
        } else {
            conn.publish_binary(topic, b)
        }
    })
}

/// Send binary `data`: compressed with `compress` (if negotiated); otherwise a large `bytes` from
/// the object itself (see `shared.rs`), anything else, or anything small, copied.
fn send_binary(conn: &Arc<Conn>, data: &Bound<'_, PyAny>, compress: bool) -> PyResult<SendStatus> {
    if compress {
        return with_bytes(data, |b| conn.send_binary_compressed(b));
    }
    if let Ok(bytes) = data.cast::<PyBytes>() {
        let payload = bytes.as_bytes();
        if payload.len() > INLINE_PAYLOAD {
            return Ok(conn.send_owned(OP_BINARY, shared_payload(data, payload, &conn.shared)));
        }
    }
    with_bytes(data, |b| conn.send_binary(b))
}

/// `topic` as a non-empty `str`, or the error that names the call: pyo3's own for a wrong type
/// said only "'int' object is not an instance of 'str'", not which call or argument.
pub(super) fn topic_arg<'a>(function: &str, topic: &'a Bound<'_, PyAny>) -> PyResult<&'a str> {
    let Ok(text) = topic.cast::<PyString>() else {
        let got = type_name(topic);
        return Err(PyTypeError::new_err(format!(
            "{function}() takes the topic as a str, got {got}"
        )));
    };
    let topic = text.to_str()?;
    if topic.is_empty() {
        return Err(value_error(
            "a topic name must be a non-empty string".into(),
        ));
    }
    Ok(topic)
}

/// Close codes an endpoint may send: the same set brioche accepts from a peer. Any Python int
/// is taken (`CloseCode` members too), so that one out of `u16`'s range is the same `ValueError`
/// as any other code that may not be sent, not an `OverflowError`; omitted (or None, as Bun's
/// `undefined`), 1000.
/// The code a close frame carries; `None` for none at all: 0, 1005 and 1006 (which no frame
/// may carry) send a close frame without a code, as Bun's `close` does, so a code `on_close`
/// got can be passed on as it is.
fn close_code(code: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u16>> {
    let Some(code) = code else {
        return Ok(Some(1000));
    };
    if code.is_instance_of::<PyBool>() || !code.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "a close code must be an int, got {}",
            type_name(code)
        )));
    }
    match code.extract::<u16>() {
        Ok(0 | 1005 | 1006) => Ok(None),
        Ok(code) if is_valid_close_code(code) => Ok(Some(code)),
        _ => Err(value_error(format!(
            "close code {code} may not be sent; use 1000-1003, 1007-1014 or 3000-4999 \
             (or 0, 1005 or 1006 for a close frame without a code)"
        ))),
    }
}

/// At most the 123 bytes a close frame has room for, cut at a character boundary, as Bun's
/// `close` cuts it: a reason made from an error message does not turn the close into an error.
fn close_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A close frame's payload is at most 125 bytes, two of them the code.
const MAX_CLOSE_REASON: usize = 123;

fn control_payload(function: &str, payload: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<u8>> {
    let bytes = match payload {
        None => Vec::new(),
        Some(p) => match p.cast::<PyString>() {
            Ok(s) => s.to_str()?.as_bytes().to_vec(),
            Err(_) => {
                with_bytes(p, <[u8]>::to_vec).map_err(|e| str_or_bytes_error(e, function, p))?
            }
        },
    };
    if bytes.len() > 125 {
        return Err(value_error(format!(
            "a ping or pong payload is at most 125 bytes, got {}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

#[pymethods]
impl PyWebSocket {
    /// What the cycle collector must see: `ws.data = ws`, `ws.data = {"ws": ws}` or a context
    /// variable set to `ws` in a handler (the connection's context holds it) make cycles that
    /// only the collector can free, and it frees them only if it sees these references.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // SAFETY: the collector runs on an attached thread (abi3 is for GIL builds), which is
        // also the only kind of thread that swaps `data`; the reference is borrowed for the
        // visit, its count untouched.
        let data = unsafe {
            let py = Python::assume_attached();
            Borrowed::from_ptr(py, self.data.load(Ordering::Acquire))
        };
        visit.call(data.as_unbound())?;
        if let Some(hook) = &self.close_hook {
            visit.call(hook)?;
        }
        visit.call(&self.context)
    }

    /// Break a cycle through `data` (`ws.data = ws`); one through the context is broken by the
    /// context's own clear.
    fn __clear__(&self, py: Python<'_>) {
        let old = self.data.swap(py.None().into_ptr(), Ordering::AcqRel);
        // SAFETY: the field's strong reference, swapped out under the GIL: released once.
        drop(unsafe { Bound::from_owned_ptr(py, old) });
    }

    /// The context passed to `server.upgrade`, or what was assigned since.
    #[getter]
    fn data(&self, py: Python<'_>) -> Py<PyAny> {
        // SAFETY: the field always holds a strong reference (set in `new`, swapped whole by the
        // setter), and the GIL this call holds keeps the setter from releasing it before the
        // incref that `from_borrowed_ptr` makes.
        unsafe { Bound::from_borrowed_ptr(py, self.data.load(Ordering::Acquire)) }.unbind()
    }

    #[setter]
    fn set_data(&self, py: Python<'_>, value: Py<PyAny>) {
        let old = self.data.swap(value.into_ptr(), Ordering::AcqRel);
        // SAFETY: `old` was the field's strong reference, now ours. Released after the swap:
        // its finaliser may read `ws.data`, and finds the new value.
        drop(unsafe { Bound::from_owned_ptr(py, old) });
    }

    /// The subprotocol chosen at the upgrade, `None` when none was.
    #[getter]
    fn subprotocol(&self) -> Option<&str> {
        self.subprotocol.as_deref()
    }

    /// The `contextvars.Context` this connection's handlers run in.
    #[getter]
    fn _context(&self, py: Python<'_>) -> Py<PyAny> {
        self.context.clone_ref(py)
    }

    /// `ReadyState.CONNECTING` (0), `OPEN` (1), `CLOSING` (2) or `CLOSED` (3).
    #[getter]
    fn ready_state(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        ready_state_member(py, self.conn.ready_state_now() as u8)
    }

    /// The client's IP address, or `""` over a Unix socket.
    #[getter]
    fn remote_address(&self) -> String {
        self.conn.remote.address()
    }

    /// Bytes accepted for this connection but not yet written to the kernel; 0 once it ended
    /// abruptly, or once its last frames after a close are written or given up.
    #[getter]
    fn buffered_amount(&self) -> usize {
        self.conn.buffered_amount()
    }

    /// The topics this socket is subscribed to, in the order subscribed (an unsubscribe
    /// moves the last into the place it leaves).
    #[getter]
    fn subscriptions(&self) -> Vec<String> {
        self.conn
            .subscriptions()
            .iter()
            .map(|t| t.to_string())
            .collect()
    }

    /// Queue a message: text for a `str`, binary for bytes-like, as Bun's `send`. With
    /// `compress`, compressed if the client negotiated permessage-deflate.
    #[pyo3(signature = (message, compress = false))]
    fn send(
        &self,
        py: Python<'_>,
        message: &Bound<'_, PyAny>,
        compress: bool,
    ) -> PyResult<Py<PyAny>> {
        // `str` first: the common case pays one type check, as the `&str` argument did.
        let conn = &self.conn;
        let sent = match message.cast::<PyString>() {
            Ok(text) if compress => conn.send_text_compressed(text.to_str()?),
            Ok(text) => send_text(conn, text)?,
            Err(_) => send_binary(conn, message, compress)
                .map_err(|e| str_or_bytes_error(e, "send", message))?,
        };
        status::to_py(py, sent)
    }

    /// Queue a binary message (compressed with `compress`, if negotiated).
    #[pyo3(signature = (message, compress = false))]
    fn send_bytes(
        &self,
        py: Python<'_>,
        message: &Bound<'_, PyAny>,
        compress: bool,
    ) -> PyResult<Py<PyAny>> {
        let sent = send_binary(&self.conn, message, compress)
            .map_err(|e| bytes_error(e, "send_bytes", message))?;
        status::to_py(py, sent)
    }

    /// Send text to every subscriber of `topic` (not this socket unless `publish_to_self`);
    /// with `compress`, compressed for those that negotiated permessage-deflate.
    #[pyo3(signature = (topic, message, compress = false))]
    fn publish(
        &self,
        py: Python<'_>,
        topic: &Bound<'_, PyAny>,
        message: &Bound<'_, PyAny>,
        compress: bool,
    ) -> PyResult<Py<PyAny>> {
        let topic = topic_arg("publish", topic)?;
        let sent = match message.cast::<PyString>() {
            Ok(text) if compress => {
                self.conn
                    .publish_compressed(topic, OP_TEXT, text.to_str()?.as_bytes())
            }
            Ok(text) => self.conn.publish_text(topic, text.to_str()?),
            // As `send` and `Server.publish` take either (and Bun's `publish`): bytes-like goes
            // out as a binary message, as with `publish_bytes`.
            Err(_) => publish_binary(&self.conn, topic, message, compress)
                .map_err(|e| str_or_bytes_error(e, "publish", message))?,
        };
        status::to_py(py, sent)
    }

    /// Send bytes to every subscriber of `topic` (not this socket unless `publish_to_self`).
    #[pyo3(signature = (topic, message, compress = false))]
    fn publish_bytes(
        &self,
        py: Python<'_>,
        topic: &Bound<'_, PyAny>,
        message: &Bound<'_, PyAny>,
        compress: bool,
    ) -> PyResult<Py<PyAny>> {
        let topic = topic_arg("publish_bytes", topic)?;
        let sent = publish_binary(&self.conn, topic, message, compress)
            .map_err(|e| bytes_error(e, "publish_bytes", message))?;
        status::to_py(py, sent)
    }

    /// Whether the client negotiated permessage-deflate (the 101 accepted its offer).
    #[getter]
    fn per_message_deflate(&self) -> bool {
        self.conn.deflate_negotiated()
    }

    /// Subscribe to `topic`; idempotent. False, a no-op, once the socket is closing or closed.
    fn subscribe(&self, topic: &Bound<'_, PyAny>) -> PyResult<bool> {
        let topic = topic_arg("subscribe", topic)?;
        Ok(self.conn.subscribe(topic))
    }

    /// Unsubscribe from `topic`; whether this socket was subscribed to it.
    fn unsubscribe(&self, topic: &Bound<'_, PyAny>) -> PyResult<bool> {
        let topic = topic_arg("unsubscribe", topic)?;
        Ok(self.conn.unsubscribe(topic))
    }

    /// Whether this socket is subscribed to `topic`.
    fn is_subscribed(&self, topic: &Bound<'_, PyAny>) -> PyResult<bool> {
        let topic = topic_arg("is_subscribed", topic)?;
        Ok(self.conn.is_subscribed(topic))
    }

    /// Run `callback(self)` and write everything it sends in one go (unless it passes
    /// `backpressure_limit`: then what is queued is written at once, as Bun's `cork` does);
    /// returns its result.
    fn cork(slf: &Bound<'_, Self>, callback: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let conn = &slf.get().conn;
        conn.cork();
        let result = callback.call1((slf,));
        conn.uncork();
        let result = result?;
        // An `async def` callback's body has not run: Bun's would have run up to its first
        // await, inside the cork. Sending nothing and returning a coroutine nobody awaits would
        // lose its sends silently.
        // `collections.abc.Coroutine`: Cython's and mypyc's coroutines too. Most callbacks
        // return None, which skips the ABC's check.
        static COROUTINE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        if !result.is_none()
            && result.is_instance(COROUTINE.import(slf.py(), "collections.abc", "Coroutine")?)?
        {
            result.call_method0(intern!(slf.py(), "close"))?;
            return Err(PyTypeError::new_err(
                "cork: the callback is a coroutine function, whose body would run after the cork \
                 (if at all); cork a plain function, and await outside it",
            ));
        }
        Ok(result.unbind())
    }

    /// Start the closing handshake; frames queued before it are still delivered. As Bun's: the
    /// reason is cut to 123 UTF-8 bytes, and 0, 1005 or 1006 send a frame without a code.
    #[pyo3(signature = (code = None, reason = ""), text_signature = "(self, code=None, reason='')")]
    fn close(slf: &Bound<'_, Self>, code: Option<&Bound<'_, PyAny>>, reason: &str) -> PyResult<()> {
        let conn = &slf.get().conn;
        let code = close_code(code)?;
        let was_open = conn.ready_state() == ReadyState::Open;
        conn.close_by_app();
        match code {
            Some(code) => conn.close(code, close_reason(reason)),
            None => conn.close_without_code(),
        }
        Self::app_closed(slf, was_open)
    }

    /// End the connection without a close frame (the client sees 1006); what was queued is
    /// written first, as far as the kernel takes it now.
    fn terminate(slf: &Bound<'_, Self>) -> PyResult<()> {
        let conn = &slf.get().conn;
        let was_open = conn.ready_state() == ReadyState::Open;
        conn.close_by_app();
        conn.terminate();
        Self::app_closed(slf, was_open)
    }

    /// Send a ping frame (payload at most 125 bytes).
    #[pyo3(signature = (payload = None))]
    fn ping(&self, py: Python<'_>, payload: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        let payload = control_payload("ping", payload)?;
        status::to_py(py, self.conn.ping(&payload))
    }

    /// Send a pong frame (payload at most 125 bytes).
    #[pyo3(signature = (payload = None))]
    fn pong(&self, py: Python<'_>, payload: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        let payload = control_payload("pong", payload)?;
        status::to_py(py, self.conn.pong(&payload))
    }

    /// Test hook: the connection's task panics on its next turn. Refused unless the environment
    /// has `BRIOCHE_TEST_HOOKS=1`, so no application can trip it by accident.
    fn _inject_panic(&self) -> PyResult<()> {
        if std::env::var_os("BRIOCHE_TEST_HOOKS").is_none_or(|v| v != "1") {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(
                "_inject_panic is a test hook: set BRIOCHE_TEST_HOOKS=1",
            ));
        }
        self.conn.inject_panic();
        Ok(())
    }

    /// A message of `size` bytes parked behind a suspended handler: still in flight, as it was
    /// before the loop took it, so the connection's caps stop its reading (1 MiB) and
    /// `max_incoming_bytes` counts it. Without it, an `async def` handler awaiting something
    /// let one client park up to 64 messages of `max_payload_length` (1 GiB by default).
    fn _hold_parked(&self, size: usize) {
        self.conn.messages_queued(1, size);
    }

    /// The parked message of `size` bytes is going to its handler: off the caps and the budget.
    fn _release_parked(&self, size: usize) {
        self.conn.messages_taken(1, size);
        self.conn.shared.incoming_taken(size);
    }

    /// A handler of this connection suspended: a close frame the client sends meanwhile is
    /// answered after what the handler sends (`_release_handler` when it ends).
    fn _hold_handler(&self) {
        self.conn.handler_suspended();
    }

    /// The suspended handler of `_hold_handler` ended.
    fn _release_handler(&self) {
        self.conn.handler_ended();
    }

    /// Stop (or resume) reading from the socket; used while a suspended handler has events parked.
    fn _pause_reading(&self, paused: bool) {
        self.conn.pause_reading(paused);
    }

    /// `WebSocket[T]` in annotations.
    #[classmethod]
    fn __class_getitem__(cls: &Bound<'_, PyType>, item: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let generic_alias = cls.py().import("types")?.getattr("GenericAlias")?;
        Ok(generic_alias.call1((cls, item))?.unbind())
    }

    fn __repr__(&self) -> String {
        format!(
            "<brioche.WebSocket #{} from {} state={}>",
            self.conn.id,
            self.conn.remote,
            self.conn.ready_state_now() as u8
        )
    }
}
