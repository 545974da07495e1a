//! What the agent reports: health endpoints and healthCheckNodePort servers, its own status,
//! and the views of the datapath's maps the CLI shows (and /metrics serves).
pub mod health;
pub mod metrics;
pub mod status;
pub mod views;
