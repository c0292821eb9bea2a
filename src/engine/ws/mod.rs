//! WebSocket connections.

pub(crate) mod budget;
pub mod conn;
pub mod decode;
pub mod encode;
pub mod outbound;
pub mod task;
