//! Published frames of one dispatch batch, encoded once, back to back, for every subscriber.
//!
//! uWS builds each topic's messages of a loop iteration into one buffer that every subscriber
//! writes as is; this is the same idea. A topic's frames of a batch are appended to one arena,
//! and a subscriber's queue holds a range of it. Consecutive publishes to a topic extend that
//! range instead of adding a frame, so queuing a publish for a subscriber copies nothing, and
//! the whole batch leaves in one `send` of bytes shared by all.
//!
//! An arena is append-only and never reallocates: bytes below the writer's length are never
//! written again, so flushes on other threads may read ranges that were queued (the queue's lock
//! orders the write before the read) while the publishing thread appends beyond them.
//!
//! That rests on one rule, which the types enforce: an arena's bytes are read only through an
//! [`ArenaRange`], and only [`ArenaWriter::append`] makes one, over bytes it has written. A
//! range can shrink from the front or grow over the range that follows it in the same arena
//! (written too), never over anything else.

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

pub(crate) struct Arena {
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
}

/// Bytes of an arena that its writer has written: what a subscriber's queue holds of a publish.
#[derive(Clone)]
pub(crate) struct ArenaRange {
    arena: Arc<Arena>,
    start: usize,
    end: usize,
}

impl ArenaRange {
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: only `ArenaWriter::append` creates a range, over bytes it wrote and within the
        // arena's capacity; `advance` and `extend` keep it inside written bytes; written bytes
        // are never written again.
        unsafe { std::slice::from_raw_parts(self.arena.ptr.as_ptr().add(self.start), self.len()) }
    }

    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    /// Forget the first `n` bytes (already written to the socket).
    pub(crate) fn advance(&mut self, n: usize) {
        assert!(n <= self.len(), "advance past the end of an arena range");
        self.start += n;
    }

    /// Grow over `next` when it directly follows this range in the same arena.
    pub(crate) fn extend(&mut self, next: &ArenaRange) -> bool {
        if Arc::ptr_eq(&self.arena, &next.arena) && self.end == next.start {
            self.end = next.end;
            true
        } else {
            false
        }
    }

    /// How many ranges (and writers) hold this range's arena.
    #[cfg(test)]
    pub(crate) fn arena_holders(&self) -> usize {
        Arc::strong_count(&self.arena)
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
pub(crate) struct ArenaWriter {
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
    /// Append `parts` as one run, and return it.
    pub(crate) fn append(&mut self, parts: &[&[u8]]) -> ArenaRange {
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
        ArenaRange {
            arena: self.arena.clone(),
            start,
            end: self.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_contiguous_until_an_arena_fills_and_stay_readable_after() {
        let mut writer = ArenaWriter::default();
        let mut a = writer.append(&[b"ab", b"c"]);
        let b = writer.append(&[b"de"]);
        assert_eq!((a.bytes(), b.bytes()), (&b"abc"[..], &b"de"[..]));
        assert!(a.extend(&b), "consecutive runs of one arena join");
        assert_eq!(a.bytes(), b"abcde");
        let big = vec![7u8; START];
        let c = writer.append(&[&big]);
        assert!(!a.clone().extend(&c), "a full arena is replaced, not grown");
        assert_eq!(c.bytes(), &big[..]);
        drop(writer);
        a.advance(2);
        assert_eq!(a.bytes(), b"cde", "ranges keep their arena alive");
    }

    #[test]
    fn a_range_joins_only_the_run_that_follows_it() {
        let mut writer = ArenaWriter::default();
        let first = writer.append(&[b"ab"]);
        let second = writer.append(&[b"cd"]);
        let third = writer.append(&[b"ef"]);
        assert!(!first.clone().extend(&third), "a gap is never covered");
        assert!(!second.clone().extend(&first), "nor what comes before");
        let other = ArenaWriter::default().append(&[b"gh"]);
        assert!(!third.clone().extend(&other), "nor another arena");
    }

    #[test]
    #[should_panic(expected = "advance past the end")]
    fn a_range_cannot_advance_past_its_end() {
        ArenaWriter::default().append(&[b"ab"]).advance(3);
    }
}
