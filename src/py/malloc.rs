//! glibc's malloc thresholds, set once when the first server starts.
//!
//! Every large message is a few buffers of its size: the unmasked payload (a tokio worker's
//! arena; the extension's Rust blocks of 256 KiB and more come from glibc, `allocator.rs`), the
//! Python `bytes` or `str` handed to the handler (the loop thread's arena), and they are freed a
//! batch later. With glibc's defaults a batch's worth of them freed at the top of an arena is
//! trimmed (handed back to the kernel with `brk`/`madvise`) once past a few hundred KiB, and the
//! next batch writes every payload into freshly mapped pages, a page fault and a zeroed page per
//! 4 KiB: about two thirds of the loop thread's time with 1 MiB echoes
//! (benches/PROFILE.md, "Issue 12: large messages (S7)").
//!
//! glibc adapts by itself, but only upwards from what has been freed (the mmap threshold rises to
//! the size of a freed mapped block, up to 32 MiB, and the trim threshold to twice that), and any
//! `mallopt` or `MALLOC_*_` setting switches the adaptation off. brioche sets both to a state
//! glibc's own adaptation reaches once the process has freed one 4 MiB block, with a wider trim
//! margin: blocks below 4 MiB come from the arenas, and up to 32 MiB free at the top of an arena
//! stays mapped for the next batch instead of being returned and faulted in again. Blocks of
//! 4 MiB and more stay mappings of their own, returned when freed, so a few clients sending
//! messages of the maximum size (16 MiB by default) do not leave the arenas holding that much.
//!
//! What the host application sees: up to 32 MiB per arena of freed memory stays resident after a
//! burst instead of being returned, and allocations of 128 KiB-4 MiB are reused from the heap
//! instead of each being a fresh mapping. An application that sets malloc's thresholds itself,
//! through the environment (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`,
//! `MALLOC_TOP_PAD_`, `MALLOC_MMAP_MAX_`, or `glibc.malloc.*` in `GLIBC_TUNABLES`), keeps its
//! settings: brioche then changes nothing. Other C libraries (musl) are left alone.

/// Blocks below this come from the arenas; glibc's default starts at 128 KiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 4 << 20;
/// Free memory at the top of an arena kept for reuse. S7's 1 MiB echo (40 messages in flight)
/// frees about 40 MiB a round; 16 MiB kept about 70% of the gain that 32 MiB gives.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 32 << 20;

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
        // SAFETY: mallopt only changes the allocator's parameters, under the main arena's lock.
        // glibc calls it MT-Unsafe all the same: a `free` of a mapped chunk on a thread running
        // without the GIL at this moment may overwrite the thresholds (its own dynamic
        // adjustment, unlocked), which loses the tuning, not memory; called once, with the GIL.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    });
}
