//! The PyO3-free core. Nothing here touches Python; `crate::py` wraps it.
//!
//! Its parts, top to bottom. Each uses only parts on lower lines, never one on its own line or
//! above (`layering_tests.rs` checks it), so there is no circle of imports:
//!
//! 1. `server.rs`: a listening server: binds, accepts, stops.
//! 2. `http/`: hyper serves each TCP connection (`serve.rs`); a request the handler upgrades
//!    (`handshake.rs` checks it, and picks the permessage-deflate offer to accept) becomes a
//!    connection of `ws/`.
//!    `runtime.rs`: the process-wide tokio runtime; its workers defer the bridge's wake-ups.
//!    `broker/`: topics shared with other processes through Redis (`pubsub_redis`): the task
//!    that owns a server's Redis link, publishes to it, subscribes while a topic has local
//!    subscribers, and fans messages from other processes out with `ws::shared`. It needs
//!    `ws/` for that fan-out, hence above it; what publishes and subscribes hand it is in
//!    `pubsub/remote.rs`, below `ws/`.
//! 3. `ws/`: WebSocket connections. A connection's handle (`conn.rs`: what Python acts on, from
//!    any thread) and its one task (`task.rs`: reads and parses with `decode.rs`, writes, times
//!    out; `deflate.rs` (de)compresses for permessage-deflate); its outbound queue (`outbound.rs`,
//!    frames from `encode.rs`); the loop thread's send
//!    batch (`batch.rs`); what a server's connections share (`shared.rs`: settings, event
//!    queue, topics, the open connections) and the server-wide cap on what clients make it hold
//!    (`budget.rs`); the topics sibling worker processes share (`relay.rs`).
//! 4. `bridge/`: the event queue from tokio to the asyncio loop and the fd that wakes the loop.
//!    It carries connections to Python but sits below `ws/`: `Event` is generic over the
//!    connection handle (`ws::Event` is the engine's).
//!    `pubsub/`: topics and their subscribers, the arenas a batch's publishes are encoded
//!    into, once for every subscriber, and the queues to the broker (`remote.rs`).
//!    `config.rs`: settings fixed when a server starts.
//!    `stats.rs`: the counters of `srv.stats()`, sharded per thread.
//! 5. `platform.rs`: what differs off Linux, and `BRIOCHE_PORTABLE=1` to run that path here.
//!    `mask.rs`: the client's masking, undone by a copy the bytes make anyway, and
//!    `MaskedBytes`, a binary message handed on still masked, to be unmasked that way.
//!    `net.rs`: a connection's socket, TCP, TLS or Unix (an enum), and who is on its other end.
//!    `tls.rs`: the certificate and key, read into a rustls config that `reload` can swap.

// Much of what the parts offer the crate is for `py/`, which a build without the `python`
// feature (`cargo test`, benches/rust_server) leaves out: unused there, not dead. The builds
// with it (`make lint`: clippy with `abi3`, `-D warnings`) still see what nothing uses.
#![cfg_attr(not(feature = "python"), allow(dead_code))]

pub(crate) mod bridge;
pub(crate) mod broker;
pub(crate) mod config;
pub(crate) mod http;
pub(crate) mod mask;
pub(crate) mod net;
pub(crate) mod platform;
pub(crate) mod pubsub;
pub(crate) mod runtime;
pub(crate) mod server;
pub(crate) mod stats;
pub(crate) mod tls;
pub(crate) mod ws;

/// Read the engine's environment (`BRIOCHE_PORTABLE`, `BRIOCHE_WORKER_THREADS`) and start its
/// runtime, now: `py/` calls it with the GIL held, which Python's `os.environ` writes hold too
/// (glibc's `getenv` must not run beside a `setenv`); the runtime's threads read nothing later.
pub fn init_from_env() {
    platform::portable();
    runtime::runtime();
}

// What the engine offers outside itself: benches/rust_server (which links it as a library)
// uses these paths, and `crate::py` too, with `Server::shared()` (crate-visible: the loop
// thread's side of the bridge). Everything else is `pub(crate)` at most.
pub use bridge::events::{HttpRequest, LogKind, LogRecord, Reply};
pub use config::{DeflateConfig, RedisConfig, RelayPaths, ServerConfig, WsLimits, MAX_TIMEOUT};
pub use http::serve::{build_response, parse_headers, InvalidResponse};
pub use mask::MaskedBytes;
pub use net::{Peer, Remote};
pub use server::{Address, Listen, Server};
pub use stats::Counter;
pub use tls::{TlsConfigError, TlsFiles};
pub use ws::batch::{begin_send_batch, end_send_batch};
pub use ws::conn::{Conn, ReadyState, SendStatus};
pub use ws::encode::OutFrame;
pub use ws::outbound::INLINE_PAYLOAD;
pub use ws::protocol::{is_valid_close_code, OP_BINARY, OP_TEXT};
pub use ws::Event;

#[cfg(test)]
mod end_to_end_tests;
#[cfg(test)]
mod layering_tests;
