//! The PyO3-free core. Nothing here touches Python; `crate::py` wraps it.

pub mod config;
pub mod conn;
pub mod events;
pub mod frame;
pub mod handshake;
pub mod http;
pub mod limit;
pub mod outbound;
pub mod pubsub;
pub mod reader;
pub mod runtime;
pub mod server;
pub mod wake;
pub mod writer;

pub use config::{ServerConfig, WsLimits};
pub use conn::{Conn, ReadyState, SendStatus};
pub use events::{Event, EventQueue};
pub use server::Server;

#[cfg(test)]
mod end_to_end_tests;
