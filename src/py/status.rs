//! `MessageSent`, `MessageBackpressured`, `MessageDropped`: what a send reports.
//!
//! The two payload-free statuses are singletons created once, so reporting them costs a
//! refcount increment instead of an allocation.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;

use crate::engine::SendStatus;

/// The message was queued and the socket is not congested.
#[pyclass(frozen, eq, hash, module = "brioche", name = "MessageSent")]
#[derive(PartialEq, Eq, Hash)]
pub struct MessageSent {
    /// Payload bytes accepted (the UTF-8 length for text).
    #[pyo3(get)]
    bytes_sent: usize,
}

#[pymethods]
impl MessageSent {
    #[new]
    fn new(bytes_sent: i64) -> PyResult<Self> {
        match usize::try_from(bytes_sent) {
            Ok(bytes_sent) => Ok(Self { bytes_sent }),
            Err(_) => Err(pyo3::exceptions::PyValueError::new_err(format!(
                "bytes_sent must be >= 0, not {bytes_sent}"
            ))),
        }
    }

    #[classattr]
    fn __match_args__() -> (&'static str,) {
        ("bytes_sent",)
    }

    fn __repr__(&self) -> String {
        format!("MessageSent(bytes_sent={})", self.bytes_sent)
    }

    /// Pickle (and `copy`) make it again from its size, as the payload-free statuses, which
    /// take no argument, pickle without this.
    fn __getnewargs__(&self) -> (usize,) {
        (self.bytes_sent,)
    }
}

/// A status without a payload: a frozen, comparable class with an empty `__match_args__`,
/// true or false as `$delivered` says.
macro_rules! unit_status {
    ($(#[$doc:meta])* $name:ident, $delivered:literal) => {
        $(#[$doc])*
        #[pyclass(frozen, eq, hash, module = "brioche")]
        #[derive(PartialEq, Eq, Hash)]
        pub struct $name;

        #[pymethods]
        impl $name {
            #[new]
            fn new() -> Self {
                Self
            }

            #[classattr]
            fn __match_args__(py: Python<'_>) -> Py<PyTuple> {
                PyTuple::empty(py).unbind()
            }

            fn __repr__(&self) -> &'static str {
                concat!(stringify!($name), "()")
            }

            /// False for `MessageDropped` alone: `if not ws.send(m)` finds the drops, as
            /// `if (!ws.send(m))` does in Bun, whose `send` returns 0 for them (and -1,
            /// true, when backpressured).
            fn __bool__(&self) -> bool {
                $delivered
            }
        }
    };
}

unit_status!(
    /// The message was queued, but the socket is congested: slow down until `on_drain`.
    MessageBackpressured,
    true
);
unit_status!(
    /// The message was discarded: the socket is not open, or is over its backpressure limit. For a
    /// publish: no subscriber of this process got it, or at least one dropped it (the others got
    /// it); other processes' subscribers (workers, Redis) are not counted.
    MessageDropped,
    false
);

/// `MessageSent` for the payload sizes most messages have, created once: statuses are frozen,
/// so one shared instance per size saves an allocation on nearly every send.
const CACHED_SIZES: usize = 1024;
static SENT: PyOnceLock<Vec<Py<MessageSent>>> = PyOnceLock::new();
static BACKPRESSURED: PyOnceLock<Py<MessageBackpressured>> = PyOnceLock::new();
static DROPPED: PyOnceLock<Py<MessageDropped>> = PyOnceLock::new();

pub fn to_py(py: Python<'_>, status: SendStatus) -> PyResult<Py<PyAny>> {
    Ok(match status {
        SendStatus::Sent(n) if n <= CACHED_SIZES => SENT.get_or_try_init(py, || {
            (0..=CACHED_SIZES)
                .map(|bytes_sent| Py::new(py, MessageSent { bytes_sent }))
                .collect()
        })?[n]
            .clone_ref(py)
            .into_any(),
        SendStatus::Sent(n) => Py::new(py, MessageSent { bytes_sent: n })?.into_any(),
        SendStatus::Backpressured => BACKPRESSURED
            .get_or_try_init(py, || Py::new(py, MessageBackpressured))?
            .clone_ref(py)
            .into_any(),
        SendStatus::Dropped => DROPPED
            .get_or_try_init(py, || Py::new(py, MessageDropped))?
            .clone_ref(py)
            .into_any(),
    })
}
