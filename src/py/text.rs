//! The `str` of a large text message handed on still masked (`Event::MaskedText`), made in one
//! pass: unmasked straight into the new object, with the check for ASCII in the same pass.
//!
//! CPython's decoder needs its bytes unmasked, so it would be a pass of its own after the
//! worker's unmasking and UTF-8 check, two more, over a payload large enough to have left the
//! cache in between (benches/PROFILE.md, S7). The decoder itself makes an ASCII `str` with
//! `PyUnicode_New` and fills it before anyone sees it; so does this. `PyUnicode_New` is not in
//! the limited API the abi3 extension is built against, though every CPython exports it, with
//! the same signature since 3.3: it is looked up by name once, and where the characters of a new
//! ASCII `str` are is what `PyUnicode_AsUTF8AndSize` (limited API since 3.10) answers, since an
//! ASCII `str`'s UTF-8 is its characters. Both are proved once, on a probe, before either is
//! trusted; without them the bytes are unmasked into a buffer of their own and decoded.
//!
//! Text that is not all ASCII is decoded from the unmasked bytes the first pass left in the
//! ASCII object (dropped after): CPython's UTF-8 decoder is strict, and what it refuses is not
//! UTF-8, which the caller refuses with 1007.

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use pyo3::exceptions::{PySystemError, PyUnicodeDecodeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::engine::MaskedBytes;

type UnicodeNew = unsafe extern "C" fn(ffi::Py_ssize_t, ffi::Py_UCS4) -> *mut ffi::PyObject;

/// The text `data` holds, unmasked, as a `str`; `Ok(None)` when it is not valid UTF-8.
pub(crate) fn py_text<'py>(
    py: Python<'py>,
    data: &MaskedBytes,
) -> PyResult<Option<Bound<'py, PyString>>> {
    let len = data.len();
    if let Some(new) = unicode_new(py) {
        // SAFETY: `new` is CPython's `PyUnicode_New`, proved on a probe (`unicode_new`): an
        // ASCII `str` of `len` characters, unseen by anyone else until this returns it, whose
        // `len` bytes of characters `chars` points to.
        unsafe {
            let ascii = Bound::from_owned_ptr_or_err(py, new(len as ffi::Py_ssize_t, 127))?;
            let chars = ascii_chars(&ascii, len)?;
            let out = std::slice::from_raw_parts_mut(chars.cast::<MaybeUninit<u8>>(), len);
            if data.copy_to_ascii(out) {
                return Ok(Some(ascii.cast_into_unchecked()));
            }
            // Not ASCII: `copy_to_ascii` wrote all of `out`, the text unmasked, for the
            // decoder; `ascii` is dropped after, unseen.
            return decode(py, std::slice::from_raw_parts(chars, len));
        }
    }
    let mut plain = Vec::with_capacity(len);
    data.copy_to(&mut plain.spare_capacity_mut()[..len]);
    // SAFETY: `copy_to` wrote all `len` bytes.
    unsafe { plain.set_len(len) };
    decode(py, &plain)
}

/// `bytes` decoded as UTF-8; `Ok(None)` if they are not UTF-8.
fn decode<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Option<Bound<'py, PyString>>> {
    // SAFETY: `bytes` is valid for its length of reads; the result is a new reference or NULL
    // with an exception set.
    let decoded = unsafe {
        let ptr = ffi::PyUnicode_DecodeUTF8(
            bytes.as_ptr().cast(),
            bytes.len() as ffi::Py_ssize_t,
            c"strict".as_ptr(),
        );
        Bound::from_owned_ptr_or_err(py, ptr)
    };
    match decoded {
        // SAFETY: `PyUnicode_DecodeUTF8` makes a `str`.
        Ok(text) => Ok(Some(unsafe { text.cast_into_unchecked() })),
        Err(err) if err.is_instance_of::<PyUnicodeDecodeError>(py) => Ok(None),
        // A MemoryError: the caller keeps the event for later.
        Err(err) => Err(err),
    }
}

/// Where the `len` characters of `text`, a new ASCII `str`, are: its UTF-8, which for an ASCII
/// `str` is its characters themselves.
fn ascii_chars(text: &Bound<'_, PyAny>, len: usize) -> PyResult<*mut u8> {
    let mut size: ffi::Py_ssize_t = 0;
    // SAFETY: `text` is a `str`; `size` is written.
    let chars = unsafe { ffi::PyUnicode_AsUTF8AndSize(text.as_ptr(), &mut size) };
    if chars.is_null() {
        return Err(PyErr::fetch(text.py()));
    }
    if size as usize != len {
        // Not what the probe saw: no CPython gets here.
        return Err(PySystemError::new_err(
            "a new ASCII str's UTF-8 is not its characters",
        ));
    }
    Ok(chars.cast_mut().cast())
}

/// CPython's `PyUnicode_New`, once it has been seen to make an ASCII `str` whose characters are
/// where `ascii_chars` says: a probe written there must read back as the `str` it spells.
fn unicode_new(py: Python<'_>) -> Option<UnicodeNew> {
    static FOUND: OnceLock<Option<UnicodeNew>> = OnceLock::new();
    // Only a thread holding the GIL gets here, and the probe does not let go of it: no other
    // thread can be waiting on this lock while it holds the GIL.
    *FOUND.get_or_init(|| {
        // SAFETY: a look-up by name among the symbols the process has loaded.
        let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"PyUnicode_New".as_ptr()) };
        if symbol.is_null() {
            return None;
        }
        // SAFETY: CPython's `PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)`, in every version
        // from 3.3 on.
        let new = unsafe { std::mem::transmute::<*mut c_void, UnicodeNew>(symbol) };
        let probe = b"brioche!";
        // SAFETY: as in `py_text`, for the probe; what it makes is compared, not yet trusted.
        let made = unsafe {
            let text =
                Bound::from_owned_ptr_or_err(py, new(probe.len() as ffi::Py_ssize_t, 127)).ok()?;
            let chars = ascii_chars(&text, probe.len()).ok()?;
            std::ptr::copy_nonoverlapping(probe.as_ptr(), chars, probe.len());
            text
        };
        made.eq(PyString::new(py, "brioche!"))
            .unwrap_or(false)
            .then_some(new)
    })
}
