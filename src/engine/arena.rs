//! Published frames of one dispatch batch, encoded once, back to back, for every subscriber.
//!
//! uWS builds each topic's messages of a loop iteration into one buffer that every subscriber
//! writes as is; this is the same idea. A topic's frames of a batch are appended to one arena,
//! and a subscriber's queue holds a range of it. Consecutive publishes to a topic extend that
//! range instead of adding a frame, so queuing a publish for a subscriber copies nothing, and
//! the whole batch leaves in one `send` of bytes shared by all (benches S3).
//!
//! An arena is append-only and never reallocates: bytes below the writer's length are never
//! written again, so flushes on other threads may read ranges that were queued (the queue's lock
//! orders the write before the read) while the publishing thread appends beyond them.

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

pub struct Arena {
    ptr: NonNull<u8>,
    capacity: usize,
}

// SAFETY: the bytes are written only through `ArenaWriter` (one owner) below its own length
// mark, and read only below lengths it handed out; see the module comment.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl Arena {
    fn new(capacity: usize) -> Arc<Self> {
        let layout = Layout::array::<u8>(capacity).expect("arena size");
        // SAFETY: `capacity` is never zero (see `ArenaWriter::append`).
        let ptr = NonNull::new(unsafe { alloc(layout) }).expect("out of memory");
        Arc::new(Self { ptr, capacity })
    }

    /// Bytes `start..end`, which an `ArenaWriter` returned from `append` (so fully written).
    pub fn slice(&self, start: usize, end: usize) -> &[u8] {
        assert!(start <= end && end <= self.capacity);
        // SAFETY: in bounds (checked), and written before the range was handed out; never
        // written again.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), end - start) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let layout = Layout::array::<u8>(self.capacity).expect("arena size");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// The only writer of an arena (held by the publishing thread for one batch).
pub struct ArenaWriter {
    arena: Arc<Arena>,
    len: usize,
}

/// An arena's first size: room for about a hundred small frames.
const START: usize = 4096;
/// The largest arena; beyond, a new one starts.
const MAX: usize = 256 * 1024;

impl Default for ArenaWriter {
    fn default() -> Self {
        Self {
            arena: Arena::new(START),
            len: 0,
        }
    }
}

impl ArenaWriter {
    /// Append `parts` as one run; the arena and the run's range in it.
    pub fn append(&mut self, parts: &[&[u8]]) -> (Arc<Arena>, usize, usize) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if self.arena.capacity - self.len < len {
            let capacity = (self.arena.capacity * 2).clamp(len.max(START), MAX.max(len));
            self.arena = Arena::new(capacity);
            self.len = 0;
        }
        let start = self.len;
        for part in parts {
            // SAFETY: in bounds (checked above); this range has not been handed out, so nobody
            // reads it while it is written.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    part.as_ptr(),
                    self.arena.ptr.as_ptr().add(self.len),
                    part.len(),
                );
            }
            self.len += part.len();
        }
        (self.arena.clone(), start, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_contiguous_until_an_arena_fills_and_stay_readable_after() {
        let mut writer = ArenaWriter::default();
        let (a, s1, e1) = writer.append(&[b"ab", b"c"]);
        let (b, s2, e2) = writer.append(&[b"de"]);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!((s1, e1, s2, e2), (0, 3, 3, 5));
        assert_eq!(a.slice(s1, e2), b"abcde");
        let big = vec![7u8; START];
        let (c, s3, e3) = writer.append(&[&big]);
        assert!(!Arc::ptr_eq(&a, &c), "a full arena is replaced, not grown");
        assert_eq!(c.slice(s3, e3), &big[..]);
        drop(writer);
        assert_eq!(a.slice(0, 5), b"abcde", "ranges keep their arena alive");
    }
}
