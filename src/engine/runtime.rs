//! The process-wide tokio runtime every server runs on.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

/// Worker threads: `$BRIOCHE_WORKER_THREADS`, else one per CPU this process may run on.
fn worker_threads() -> usize {
    std::env::var("BRIOCHE_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

pub(crate) fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        Builder::new_multi_thread()
            .worker_threads(worker_threads())
            .thread_name("brioche-worker")
            // Wake the asyncio loop once per poll cycle, not per first event (bridge/events.rs).
            .on_thread_start(|| {
                crate::engine::bridge::events::defer_wakes_on_this_thread();
                yield_to_the_loop_on_wake_up();
            })
            .on_thread_park(crate::engine::bridge::events::flush_deferred_wakes)
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime")
    })
}

/// Make this (worker) thread SCHED_BATCH: same share of the CPU, but its wake-ups do not preempt
/// the thread that is running. When the workers share a core with the asyncio loop (one CPU, or
/// `taskset`), a socket turning readable then no longer interrupts a batch of handlers; the
/// worker runs when the loop waits, and reads everything that arrived meanwhile in one go.
/// Linux only: other systems have no such policy (`platform.rs`).
fn yield_to_the_loop_on_wake_up() {
    #[cfg(target_os = "linux")]
    if !crate::engine::platform::portable() {
        // SAFETY: plain syscall on the calling thread with a valid parameter struct.
        // Unprivileged threads may always switch to SCHED_BATCH; if it fails the thread just
        // stays SCHED_OTHER.
        unsafe {
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
        }
    }
}
