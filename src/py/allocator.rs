//! The extension's Rust allocator: mimalloc, as pydantic-core and granian ship.
//!
//! Only what this extension allocates in Rust goes through it (buffers, queues, tasks, hyper's
//! request state); CPython's objects and the host application keep their allocator, and no
//! `malloc` is replaced. Measured against glibc's malloc with `benches/ab.py`, interleaved:
//! handshakes (S9) 1.17×, the 64 KiB echo (S7) 1.13×, the 1 MiB echo 0.96×, the rest even;
//! idle connections (S4) took 1.3-1.4 KiB each against 1.45.
//!
//! One setting differs from mimalloc's defaults: arenas are committed as they are used, not
//! all at once (`arena_eager_commit` 0). With mimalloc's default on Linux, S4 measured 1.8-2.0
//! KiB per idle connection (Bun's is 1.75): the memory of the handshakes, freed, stayed
//! resident. Set before the first allocation, from the library's constructor, because an arena
//! keeps the setting it was reserved with. A `MIMALLOC_ARENA_EAGER_COMMIT` in the environment
//! wins, as every other `MIMALLOC_*` option does.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
