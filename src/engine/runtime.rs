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
        builder(worker_threads())
            .build()
            .expect("cannot start the tokio runtime")
    })
}

fn builder(workers: usize) -> Builder {
    let mut builder = Builder::new_multi_thread();
    builder
        .worker_threads(workers)
        .thread_name("brioche-worker")
        // Wake the asyncio loop once per poll cycle, not per first event (bridge/events.rs).
        .on_thread_start(|| {
            crate::engine::bridge::events::defer_wakes_on_this_thread();
            yield_to_the_loop_on_wake_up();
        })
        .on_thread_park(crate::engine::bridge::events::flush_deferred_wakes)
        .enable_all();
    // Without the LIFO slot a worker runs the tasks it woke in the order it woke them. With it,
    // the last connection a poll of the sockets woke ran first, and the order of the worker's
    // visits shifted each cycle: the same polls, schedules and syscalls per message, but S2's
    // round trips cost 4-6% more CPU, the clearest part of it in the kernel's per-socket lookups
    // (ARCHITECTURE.md, Threads). The slot helps a task that wakes another to hand it a message;
    // the engine's connection tasks are woken by their sockets and by the loop thread. It needs
    // `--cfg tokio_unstable` (.cargo/config.toml); a build without it (RUSTFLAGS set in the
    // environment replaces that file's flags) keeps tokio's default.
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_worker_runs_the_tasks_it_woke_in_the_order_it_woke_them() {
        let rt = super::builder(1).build().unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let in_worker = {
            let order = order.clone();
            // Spawned from a task, so scheduled by the worker itself (where the LIFO slot is).
            rt.spawn(async move {
                (0..4)
                    .map(|i| {
                        let order = order.clone();
                        tokio::spawn(async move { order.lock().unwrap().push(i) })
                    })
                    .collect::<Vec<_>>()
            })
        };
        rt.block_on(async {
            for task in in_worker.await.unwrap() {
                task.await.unwrap();
            }
        });
        // With the LIFO slot: [3, 0, 1, 2].
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3]);
    }

    /// A worker that queued the first event after a drain, then runs on without parking (a
    /// fan-out's flushes, TLS handshakes), does not hold back the loop's wake-up for what
    /// another worker queues meanwhile: that one wakes the loop as it parks. Only the worker
    /// that found the queue empty owed it, and the loop slept until the busy one parked.
    #[test]
    fn a_busy_worker_does_not_hold_back_the_wake_up_for_another_worker_s_events() {
        use crate::engine::bridge::events::{Event, EventQueue};
        use crate::engine::bridge::wake::poll_readable;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::{Duration, Instant};

        let rt = super::builder(2).build().unwrap();
        let queue = Arc::new(EventQueue::<()>::new().unwrap());
        let pushed = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        {
            let (queue, pushed, done) = (queue.clone(), pushed.clone(), done.clone());
            // Busy for at most 10 s: long past the 5 s the test waits for the wake-up.
            rt.spawn(async move {
                queue.push(Event::Drain(1));
                pushed.store(true, Ordering::Release);
                let start = Instant::now();
                while !done.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(10) {
                    std::hint::spin_loop();
                }
            });
        }
        let start = Instant::now();
        while !pushed.load(Ordering::Acquire) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the first task never ran"
            );
            std::thread::yield_now();
        }
        assert!(
            !poll_readable(queue.fd(), 0),
            "woken before any worker parked"
        );
        {
            let queue = queue.clone();
            // The busy worker cannot take it: the other one runs it, and parks.
            rt.spawn(async move {
                queue.push(Event::Drain(2));
            });
        }
        let woken = poll_readable(queue.fd(), 5_000);
        done.store(true, Ordering::Release);
        assert!(woken, "the loop was not woken while a worker stayed busy");
        let mut events = Vec::new();
        queue.drain_into(&mut events);
        let ids: Vec<u64> = events
            .iter()
            .map(|event| match event {
                Event::Drain(id) => *id,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(ids, [1, 2]);
    }
}
