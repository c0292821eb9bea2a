//! The one place engine errors become Python exceptions.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::PyErr;

use crate::engine::InvalidResponse;

create_exception!(
    brioche,
    BriocheError,
    PyException,
    "Root of the exceptions brioche raises."
);

impl From<InvalidResponse> for PyErr {
    #[cold]
    #[inline(never)]
    fn from(err: InvalidResponse) -> PyErr {
        PyValueError::new_err(err.0)
    }
}

#[cold]
#[inline(never)]
pub fn value_error(message: String) -> PyErr {
    PyValueError::new_err(message)
}

/// `OSError(errno, strerror)`, so Python code can test `exc.errno` (brioche.BindError wraps it).
#[cold]
#[inline(never)]
pub fn os_error(err: std::io::Error) -> PyErr {
    if let Some(tls) = crate::engine::TlsConfigError::of(&err) {
        return BriocheError::new_err(tls.to_string());
    }
    match err.raw_os_error() {
        Some(errno) => PyOSError::new_err((errno, err.to_string())),
        // The engine's own refusals (a socket handed in that cannot serve): misuse, not the OS.
        None if err.kind() == std::io::ErrorKind::InvalidInput => {
            PyValueError::new_err(err.to_string())
        }
        None => PyOSError::new_err(err.to_string()),
    }
}
