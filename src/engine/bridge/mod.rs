//! From tokio to the asyncio loop.

pub(crate) mod events;
pub(crate) mod wake;
