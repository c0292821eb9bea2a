//! WebSocket connections.

pub mod batch;
pub(crate) mod budget;
pub mod conn;
pub mod decode;
pub mod encode;
pub mod outbound;
pub mod protocol;
pub mod shared;
pub mod task;

/// What a server's tasks hand to the asyncio loop: an opened connection comes as its `Conn`.
pub type Event = crate::engine::bridge::events::Event<std::sync::Arc<conn::Conn>>;
