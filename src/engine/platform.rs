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

/// Ask the CPU to load the cache line at `at` ahead of its use. Only a hint: the pointer is not
/// dereferenced, so any address is sound, even a freed one. A fan-out or a batch's writes visit
/// connection after connection, each cold after the kernel's work for the one before.
#[inline(always)]
pub(crate) fn prefetch<T>(at: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` never faults and reads nothing the program can observe.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(at.cast());
    }
    // std's aarch64 prefetch intrinsic is unstable; `prfm` is the instruction it emits.
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `prfm` never faults, whatever the address, and reads nothing the program can
    // observe; it touches no stack and no flags.
    unsafe {
        std::arch::asm!(
            "prfm pldl1keep, [{at}]",
            at = in(reg) at,
            options(nostack, readonly, preserves_flags)
        );
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = at;
}

/// A value whose memory a loop over many of them asks for ahead of its visit (`visit_ahead`):
/// a batch's connections, a topic's subscribers.
pub(crate) trait Prefetch {
    fn prefetch(&self);
}

/// `prefetch` every cache line of `value` (it may straddle one more than its size fills).
#[inline(always)]
pub(crate) fn prefetch_all<T>(value: &T) {
    let start: *const u8 = (value as *const T).cast();
    let mut offset = 0;
    while offset < size_of::<T>() {
        prefetch(start.wrapping_add(offset));
        offset += 64;
    }
    prefetch(start.wrapping_add(size_of::<T>().saturating_sub(1)));
}

/// Call `f` for each of `items`, `near(item)` one item ahead of it and `far(item)` two ahead:
/// what `far` prefetches has a visit's time to arrive before `near` reads it to prefetch what
/// it points to, and that has another visit's time before `f`. The first two items get less
/// (`near` is never called for the first), so a loop over one or two gains little.
pub(crate) fn visit_ahead<T>(
    items: impl Iterator<Item = T>,
    far: impl Fn(&T),
    near: impl Fn(&T),
    mut f: impl FnMut(T),
) {
    // Fused: `next` is called again after the end.
    let mut items = items.fuse();
    let mut next = items.next();
    if let Some(item) = &next {
        far(item);
    }
    let mut after = items.next();
    if let Some(item) = &after {
        far(item);
    }
    while let Some(item) = next {
        if let Some(follower) = &after {
            near(follower);
        }
        next = after;
        after = items.next();
        if let Some(item) = &after {
            far(item);
        }
        f(item);
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::visit_ahead;

    #[test]
    fn visit_ahead_looks_two_and_one_items_ahead_of_each_visit() {
        for n in 0..6 {
            let log = RefCell::new(Vec::new());
            visit_ahead(
                0..n,
                |i| log.borrow_mut().push(format!("far {i}")),
                |i| log.borrow_mut().push(format!("near {i}")),
                |i| log.borrow_mut().push(format!("visit {i}")),
            );
            let log = log.into_inner();
            let visits: Vec<_> = log.iter().filter(|e| e.starts_with("visit")).collect();
            let expected: Vec<_> = (0..n).map(|i| format!("visit {i}")).collect();
            assert_eq!(visits, expected.iter().collect::<Vec<_>>(), "{log:?}");
            for i in 0..n {
                let at = |what: &str| log.iter().position(|e| *e == format!("{what} {i}"));
                let visit = at("visit").unwrap();
                // Nothing is done for an item after its visit.
                let last = log.iter().rposition(|e| e.ends_with(&format!(" {i}")));
                assert_eq!(Some(visit), last, "{log:?}");
                let far = at("far").unwrap();
                assert!(far < visit, "{log:?}");
                if i > 0 {
                    // Its `near` comes before the previous item's visit: a visit's time ahead.
                    let near = at("near").unwrap();
                    let previous = log.iter().position(|e| *e == format!("visit {}", i - 1));
                    assert!(far < near && near < previous.unwrap(), "{log:?}");
                }
                if i > 1 {
                    let earlier = log.iter().position(|e| *e == format!("visit {}", i - 2));
                    assert!(far < earlier.unwrap(), "{log:?}");
                }
            }
        }
    }
}
