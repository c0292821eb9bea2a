//! Large payloads sent from the Python object itself, without a copy.
//!
//! `ws.send(data)` with a `bytes` (or a `str`) over the engine's inline size hands the engine a
//! `Bytes` whose owner is a reference to that object: the frame is written from the object's own
//! buffer, which CPython never changes once the object exists. Copying it instead cost a
//! `malloc`, a `memcpy` and a `free` of the payload's size per message, and with glibc's default
//! trimming the copy wrote into freshly mapped pages (benches/PROFILE.md, "Issue 12: large
//! messages (S7)").
//!
//! The last owner of the `Bytes` may be dropped on any thread: the loop thread after its batch's
//! writes (with the GIL released), or a connection task that finished a congested write or
//! dropped its queue. A Python reference must not be released without the GIL (the build sets
//! `pyo3_disable_reference_pool`, so PyO3 would abort), so dropping only queues the object here,
//! and the loop thread releases the queue with the GIL at the end of every batch and at every
//! `drain()` (`release_sent`). A drop that finds the queue empty wakes the loop of the payload's
//! server, unless that loop is within a batch (whose end releases it): frames sent from another
//! thread, or from a task resumed between batches, are written by connection tasks, and on a
//! server that got no events their objects waited for the next one (100 sends of 200 KB from a
//! thread to a client that only read kept all 100). An object therefore lives until the batch
//! after its frame was written, at the latest: bounded by what was sent, as the copy was.

use std::ptr::NonNull;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::engine::ws::shared::Shared;

/// Objects whose frames are written (or dropped), to be released with the GIL.
static RELEASED: Mutex<Vec<ObjectPtr>> = Mutex::new(Vec::new());

struct ObjectPtr(NonNull<ffi::PyObject>);

// SAFETY: only moved between threads, never dereferenced off the GIL: `release_sent` releases it
// with the GIL held.
unsafe impl Send for ObjectPtr {}

/// A strong reference to an immutable Python object and the bytes it holds.
struct PyPayload {
    object: ObjectPtr,
    data: *const u8,
    len: usize,
    /// The sending server, whose loop is woken to release `object` if nothing else would soon.
    server: Arc<Shared>,
}

// SAFETY: the bytes are immutable while the reference is held (a `bytes` buffer, or a `str`'s
// UTF-8 form, which CPython keeps with the object until it is freed), so any thread may read
// them; the reference itself is released only with the GIL (see `Drop`).
unsafe impl Send for PyPayload {}
unsafe impl Sync for PyPayload {}

impl AsRef<[u8]> for PyPayload {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `data..data + len` is inside the object, alive while `object` is held.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

impl Drop for PyPayload {
    fn drop(&mut self) {
        let was_empty = {
            let mut released = RELEASED.lock();
            released.push(ObjectPtr(self.object.0));
            released.len() == 1
        };
        if was_empty {
            self.server.events.wake_unless_in_batch();
        }
    }
}

/// The bytes `data` of `object`, shared: `data` must be the buffer of an immutable object
/// (`bytes`, or the UTF-8 form of a `str`) that stays put while `object` is referenced.
pub(crate) fn shared_payload(
    object: &Bound<'_, PyAny>,
    data: &[u8],
    server: &Arc<Shared>,
) -> Bytes {
    let pointer = object.clone().into_ptr();
    let payload = PyPayload {
        // SAFETY: `into_ptr` of a live object is never null.
        object: ObjectPtr(unsafe { NonNull::new_unchecked(pointer) }),
        data: data.as_ptr(),
        len: data.len(),
        server: server.clone(),
    };
    Bytes::from_owner(payload)
}

/// Release the objects whose frames were written since the last call.
pub(crate) fn release_sent(_py: Python<'_>) {
    let released = {
        let mut released = RELEASED.lock();
        if released.is_empty() {
            return;
        }
        std::mem::take(&mut *released)
    };
    // Outside the lock: a finaliser may send, and so queue more.
    for object in released {
        // SAFETY: a strong reference taken in `shared_payload`, released once, with the GIL.
        unsafe { ffi::Py_DecRef(object.0.as_ptr()) };
    }
}
