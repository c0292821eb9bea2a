//! The PyO3 binding layer: thin wrappers that turn engine types into Python classes.

mod allocator;
mod engine;
mod errors;
mod malloc;
mod request;
mod shared;
mod status;
mod text;
mod websocket;

use pyo3::prelude::*;

pub use errors::BriocheError;

/// Event kinds in the tuples `Engine.drain()` returns; `brioche._server` dispatches on them.
/// A connection's events come first, below `EVENT_REQUEST`, and index its handler tuple.
pub const EVENT_OPEN: u8 = 0;
pub const EVENT_TEXT: u8 = 1;
pub const EVENT_BYTES: u8 = 2;
pub const EVENT_DRAIN: u8 = 3;
pub const EVENT_CLOSE: u8 = 4;
pub const EVENT_FAIL: u8 = 5;
pub const EVENT_PING: u8 = 6;
pub const EVENT_PONG: u8 = 7;
/// Several text (binary) messages in a row from one connection: `(kind, ws, [message, ...],
/// context)`, so that Python enters the connection's context once for all of them.
pub const EVENT_TEXT_RUN: u8 = 8;
pub const EVENT_BYTES_RUN: u8 = 9;
pub const EVENT_REQUEST: u8 = 10;
pub const EVENT_STOPPED: u8 = 11;
pub const EVENT_LOG: u8 = 12;
pub const EVENT_LINKS_ENDED: u8 = 13;

/// A random, time-ordered UUID (RFC 9562 version 7) as a string.
#[pyfunction]
fn random_uuid_v7() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Raise `ValueError` for a Redis URL the server could not connect with: the setter's check,
/// so that `workers(n)` does not start n processes each to fail on it.
#[pyfunction]
fn check_redis_url(url: String) -> PyResult<()> {
    let config = crate::engine::RedisConfig {
        url,
        sharded: false,
        namespace: String::new(),
    };
    config
        .check()
        .map_err(pyo3::exceptions::PyValueError::new_err)
}

/// `gil_used = true`: PyO3 0.30 declares free-threading support by default, and the bridge's
/// maps and batches are audited only for the GIL's one-thread-at-a-time guarantee.
#[pymodule(gil_used = true)]
fn _brioche(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("BriocheError", py.get_type::<BriocheError>())?;
    m.add_class::<status::MessageSent>()?;
    m.add_class::<status::MessageBackpressured>()?;
    m.add_class::<status::MessageDropped>()?;
    m.add_class::<websocket::PyWebSocket>()?;
    m.add_class::<request::PendingRequest>()?;
    m.add_class::<engine::PyEngine>()?;
    m.add_function(wrap_pyfunction!(random_uuid_v7, m)?)?;
    m.add_function(wrap_pyfunction!(check_redis_url, m)?)?;
    // Cargo.toml's version, which maturin also puts in the package metadata.
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("EVENT_OPEN", EVENT_OPEN)?;
    m.add("EVENT_TEXT", EVENT_TEXT)?;
    m.add("EVENT_BYTES", EVENT_BYTES)?;
    m.add("EVENT_DRAIN", EVENT_DRAIN)?;
    m.add("EVENT_CLOSE", EVENT_CLOSE)?;
    m.add("EVENT_FAIL", EVENT_FAIL)?;
    m.add("EVENT_PING", EVENT_PING)?;
    m.add("EVENT_PONG", EVENT_PONG)?;
    m.add("EVENT_TEXT_RUN", EVENT_TEXT_RUN)?;
    m.add("EVENT_BYTES_RUN", EVENT_BYTES_RUN)?;
    m.add("EVENT_REQUEST", EVENT_REQUEST)?;
    m.add("EVENT_STOPPED", EVENT_STOPPED)?;
    m.add("EVENT_LINKS_ENDED", EVENT_LINKS_ENDED)?;
    m.add("EVENT_LOG", EVENT_LOG)?;
    Ok(())
}
