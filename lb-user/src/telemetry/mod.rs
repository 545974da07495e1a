//! What the agent reports: health endpoints and healthCheckNodePort servers.
pub mod health;
