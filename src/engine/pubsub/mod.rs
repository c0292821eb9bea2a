//! Publish/subscribe: who is subscribed to a topic, and the arenas a batch's publishes are
//! encoded into once for all subscribers, and what publishes and subscribes hand to the broker
//! that shares topics with other processes (`remote.rs`).

pub(crate) mod arena;
pub(crate) mod remote;
pub(crate) mod topics;
