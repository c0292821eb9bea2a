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

pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        Builder::new_multi_thread()
            .worker_threads(worker_threads())
            .thread_name("brioche-worker")
            // Wake the asyncio loop once per poll cycle, not once per first event (events.rs).
            .on_thread_start(crate::engine::events::defer_wakes_on_this_thread)
            .on_thread_park(crate::engine::events::flush_deferred_wakes)
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime")
    })
}
