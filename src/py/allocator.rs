//! The extension's Rust allocator: mimalloc for blocks under 256 KiB, glibc's malloc for the rest.
//!
//! Only what this extension allocates in Rust goes through it (buffers, queues, tasks, hyper's
//! request state); CPython's objects and the host application keep their allocator, and no
//! `malloc` is replaced.
//!
//! Why mimalloc: glibc's malloc and free were 6.6% of the server's CPU in a run of handshakes
//! (S9: hyper's 8 KiB buffers, tokio's 128-byte-aligned task cells through `posix_memalign`, the
//! request's strings). `benches/ab.py`, interleaved with the glibc-only build: handshakes 1.02-
//! 1.06× with this split (1.17× with mimalloc for every block); the other cells moved within
//! this machine's noise either way.
//!
//! Why not for every block: the one slow reader among 1,000 subscribers (S10) then raised the
//! server's peak RSS by up to 1.9 MiB over the run where all read, more than the 1 MiB
//! backpressure limit that bounds what the slow reader may hold (glibc alone: 0.0-0.9 MiB).
//! With blocks up to 64, 128 or 255 KiB from mimalloc and the rest from glibc it was at most
//! 0.0, 0.3 and 0.4 MiB in three runs each: what mimalloc kept resident is among the blocks
//! of 256 KiB and more, in S10 the pub/sub arenas at their largest (`engine/pubsub/arena.rs`).
//! Those, and large messages' buffers, stay with glibc and the thresholds `malloc.rs` sets; at
//! that size one call's cost is small beside the bytes it holds.
//!
//! One setting differs from mimalloc's defaults: arenas are committed as they are used, not
//! all at once (`arena_eager_commit` 0). With mimalloc's default on Linux, idle connections
//! (S4) measured 1.8-2.0 KiB each against 1.45 with glibc: the memory of the handshakes, freed,
//! stayed resident. Set before the first allocation, from the library's constructor, because
//! an arena keeps the setting it was reserved with. A `MIMALLOC_ARENA_EAGER_COMMIT` in the
//! environment wins, as every other `MIMALLOC_*` option does.

use std::alloc::{GlobalAlloc, Layout, System};

use mimalloc::MiMalloc;

/// Blocks of this size and more come from glibc's malloc.
const LARGE: usize = 256 * 1024;

/// mimalloc below [`LARGE`], the system allocator from it. A block's layout, which `dealloc`
/// and `realloc` are given as it was allocated, says which allocator owns it.
struct SplitBySize;

#[inline(always)]
fn small(size: usize) -> bool {
    size < LARGE
}

// SAFETY: each block is allocated and freed by the same allocator, chosen by the size of its
// layout, which the caller passes unchanged to `dealloc` and `realloc`; a `realloc` across the
// boundary allocates from the other allocator, copies and frees, as `GlobalAlloc`'s own default
// does.
unsafe impl GlobalAlloc for SplitBySize {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if small(layout.size()) {
            MiMalloc.alloc(layout)
        } else {
            System.alloc(layout)
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if small(layout.size()) {
            MiMalloc.alloc_zeroed(layout)
        } else {
            System.alloc_zeroed(layout)
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if small(layout.size()) {
            MiMalloc.dealloc(ptr, layout)
        } else {
            System.dealloc(ptr, layout)
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match (small(layout.size()), small(new_size)) {
            (true, true) => MiMalloc.realloc(ptr, layout, new_size),
            (false, false) => System.realloc(ptr, layout, new_size),
            _ => {
                // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, does
                // not overflow `isize` (`GlobalAlloc::realloc`'s contract).
                let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                let new_ptr = self.alloc(new_layout);
                if !new_ptr.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new_ptr, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new_ptr
            }
        }
    }
}

#[global_allocator]
static GLOBAL: SplitBySize = SplitBySize;

/// `mi_option_arena_eager_commit` in mimalloc.h's `mi_option_e` (the same in v2 and v3).
#[cfg(target_os = "linux")]
const MI_OPTION_ARENA_EAGER_COMMIT: libc::c_int = 4;

#[cfg(target_os = "linux")]
extern "C" {
    fn mi_option_set(option: libc::c_int, value: libc::c_long);
}

/// Runs when the extension is loaded, before any of its code allocates.
#[cfg(target_os = "linux")]
extern "C" fn commit_arenas_on_demand() {
    // getenv, not std::env: reading the environment through std allocates, and the first
    // allocation reserves the first arena.
    // SAFETY: NUL-terminated literals; getenv only reads the environment, and mi_option_set only
    // stores the value (mimalloc initialises its options on first use, whatever the order).
    unsafe {
        let set_by_user = !libc::getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null()
            || !libc::getenv(c"MIMALLOC_EAGER_REGION_COMMIT".as_ptr()).is_null();
        if !set_by_user {
            mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        }
    }
}

#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static COMMIT_ARENAS_ON_DEMAND: extern "C" fn() = commit_arenas_on_demand;
