//! brioche: a WebSocket server whose sockets live in a tokio runtime and whose handlers run on
//! an asyncio loop.
//!
//! `engine` is plain Rust (connections, queues, topics, the event queue) and is what `cargo test`
//! covers; `py` is the thin PyO3 layer, built only with the `python` feature (maturin turns it on).

pub mod engine;

#[cfg(feature = "python")]
mod py;
