//! HTTP/1.1 (hyper) up to the WebSocket upgrade: every request goes to the Python handler.

pub(crate) mod handshake;
pub(crate) mod header_text;
pub(crate) mod serve;
