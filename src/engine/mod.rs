//! The PyO3-free core. Nothing here touches Python; `crate::py` wraps it.

pub(crate) mod bridge;
pub(crate) mod config;
pub(crate) mod http;
pub(crate) mod pubsub;
pub(crate) mod runtime;
pub(crate) mod server;
pub(crate) mod ws;

// What the engine offers outside itself: `crate::py` and benches/rust_server (which links it
// as a library) use these paths. Everything else is `pub(crate)` at most.
pub use bridge::events::{HttpRequest, Reply};
pub use config::{ServerConfig, WsLimits};
pub use http::serve::{build_response, parse_headers, InvalidResponse};
pub use server::Server;
pub use ws::batch::{begin_send_batch, end_send_batch};
pub use ws::conn::{Conn, ReadyState, SendStatus};
pub use ws::encode::OutFrame;
pub use ws::protocol::{is_valid_close_code, OP_BINARY, OP_TEXT};
pub use ws::Event;

#[cfg(test)]
mod end_to_end_tests;
