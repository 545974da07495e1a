//! The agent and its CLI: sources -> model -> reconciler -> maps.
pub mod agent;
pub mod conntrack;
pub mod datapath;
pub mod health;
pub mod maps;
pub mod model;
pub mod netns;
pub mod reconciler;
pub mod show;
pub mod source;
