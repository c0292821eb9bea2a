//! The PyO3-free core. Nothing here touches Python; `crate::py` wraps it.

pub mod bridge;
pub mod config;
pub mod http;
pub mod pubsub;
pub mod runtime;
pub mod server;
pub mod ws;

pub use bridge::events::EventQueue;
pub use config::{ServerConfig, WsLimits};
pub use server::Server;
pub use ws::conn::{Conn, ReadyState, SendStatus};
pub use ws::Event;

#[cfg(test)]
mod end_to_end_tests;
