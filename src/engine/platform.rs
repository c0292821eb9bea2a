//! What the engine does differently off Linux, and the switch that does it on Linux too.
//!
//! Linux gets an eventfd for the loop's wake-up and `SCHED_BATCH` workers; elsewhere a pipe and
//! the default scheduling. `BRIOCHE_PORTABLE=1` picks the portable path on Linux as well, so the
//! code every other platform runs is compiled and tested here (`make test-portable`).

use std::sync::OnceLock;

/// Whether to use only what every Unix tokio supports.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) fn portable() -> bool {
    static PORTABLE: OnceLock<bool> = OnceLock::new();
    *PORTABLE.get_or_init(|| {
        !cfg!(target_os = "linux")
            || std::env::var_os("BRIOCHE_PORTABLE").is_some_and(|v| !v.is_empty() && v != "0")
    })
}
