//! Views for people: the CLI renders desired state and what the maps hold.
pub mod render;
pub mod show;
