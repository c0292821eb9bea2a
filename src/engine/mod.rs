//! The PyO3-free core. Nothing here touches Python; `crate::py` wraps it.

pub(crate) mod arena;
pub(crate) mod budget;
pub mod config;
pub mod conn;
pub mod connection;
pub mod events;
pub mod frame;
pub mod handshake;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod pubsub;
pub mod runtime;
pub mod server;
pub mod wake;

pub use config::{ServerConfig, WsLimits};
pub use conn::{Conn, ReadyState, SendStatus};
pub use events::{Event, EventQueue};
pub use server::Server;

#[cfg(test)]
mod end_to_end_tests;
