//! The agent and its CLI: sources -> model -> reconciler -> maps.
pub mod model;
pub mod source;
