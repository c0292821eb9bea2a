//! glibc's malloc thresholds, set once when the first server starts.
//!
//! Every large message is a few buffers of its size: the unmasked payload (a tokio worker's
//! arena), the Python `bytes` or `str` handed to the handler (the loop thread's arena), and they
//! are freed a batch later. With glibc's defaults a batch's worth of them freed at the top of an
//! arena is trimmed (handed back to the kernel with `brk`/`madvise`) as soon as it passes
//! 128 KiB, and blocks of 128 KiB or more are `mmap`ped until the first one is freed: the next
//! batch then writes every payload into freshly mapped pages, a page fault and a zeroed page per
//! 4 KiB. That was about a third of the server's time with 64 KiB and 1 MiB echoes
//! (benches/PROFILE.md, issue 12).
//!
//! glibc adapts by itself, but only upwards from what has been freed, and any `mallopt` or
//! `MALLOC_*_` setting switches the adaptation off. brioche sets the two thresholds to where
//! glibc's own adaptation ends (`DEFAULT_MMAP_THRESHOLD_MAX`, 32 MiB on 64-bit, and twice that
//! for trimming): blocks up to 32 MiB come from the arenas, and up to 64 MiB free at the top of
//! an arena stays mapped for the next batch instead of being returned and faulted in again.
//! What the host application sees: a process that once had a burst of large allocations keeps
//! up to 64 MiB per arena of freed memory resident instead of returning it (as it would after
//! glibc's adaptation), and allocations of 128 KiB-32 MiB are reused from the heap instead of
//! each being a fresh mapping. An application that sets malloc's thresholds itself, through the
//! environment (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TOP_PAD_`,
//! `MALLOC_MMAP_MAX_`, or `glibc.malloc.*` in `GLIBC_TUNABLES`), keeps its settings: brioche then
//! changes nothing. Other C libraries (musl) are left alone.

/// The largest mmap threshold glibc's dynamic adjustment reaches on 64-bit systems.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// glibc sets the trim threshold to twice the mmap threshold when it adjusts it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 64 << 20;

/// Whether the environment already sets malloc's thresholds.
fn set_by_environment(var: impl Fn(&str) -> Option<String>) -> bool {
    [
        "MALLOC_TRIM_THRESHOLD_",
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TOP_PAD_",
        "MALLOC_MMAP_MAX_",
    ]
    .iter()
    .any(|name| var(name).is_some())
        || var("GLIBC_TUNABLES").is_some_and(|t| t.contains("glibc.malloc."))
}

/// Set the thresholds (once per process), unless the environment sets them.
pub(crate) fn tune_for_large_messages() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if set_by_environment(|name| std::env::var(name).ok()) {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes the allocator's parameters; it is thread-safe.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    });
}
