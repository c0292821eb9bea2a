//! WebSocket connections: framing (RFC 6455), each connection's task and handle, and the
//! queues its replies leave through.

pub(crate) mod batch;
pub(crate) mod budget;
pub(crate) mod conn;
pub(crate) mod decode;
pub(crate) mod deflate;
pub(crate) mod encode;
pub(crate) mod outbound;
pub(crate) mod protocol;
pub(crate) mod publish_run;
pub(crate) mod raw_inflate;
pub(crate) mod relay;
pub(crate) mod report;
pub(crate) mod shared;
pub(crate) mod task;

/// What a server's tasks hand to the asyncio loop: an opened connection comes as its `Conn`.
pub type Event = crate::engine::bridge::events::Event<std::sync::Arc<conn::Conn>>;
