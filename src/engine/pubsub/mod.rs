//! Topics and publishing.

pub(crate) mod arena;
pub mod topics;
