//! Publish/subscribe: who is subscribed to a topic, and the arenas a batch's publishes are
//! encoded into once for all subscribers.

pub(crate) mod arena;
pub(crate) mod topics;
