//! HTTP/1.1 and the WebSocket handshake.

pub mod handshake;
pub mod serve;
