//! HTTP/1.1 and the WebSocket handshake.

pub(crate) mod handshake;
pub(crate) mod serve;
