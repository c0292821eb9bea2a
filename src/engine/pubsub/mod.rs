//! Topics and publishing.

pub(crate) mod arena;
pub(crate) mod topics;
