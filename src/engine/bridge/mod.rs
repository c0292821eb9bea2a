//! From the tokio threads to the asyncio loop: events queue up here, and the loop is woken
//! once per batch of them.

pub(crate) mod events;
pub(crate) mod wake;
