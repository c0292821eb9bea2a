//! From tokio to the asyncio loop.

pub mod events;
pub mod wake;
