//! The agent and its CLI. Folders follow the data flow, and arrows point down it:
//! `source` (objects) -> `model` (desired state) -> `reconcile` (ordered writes) ->
//! `datapath` (load, attach, pins, maps); `telemetry` serves what the datapath and the agent
//! report; `cli` renders views; `sync` feeds a source's changes through the model to the
//! reconciler, for both sources; `agent` wires them together.
pub mod agent;
pub mod cli;
pub mod datapath;
pub mod model;
pub mod netns;
pub mod reconcile;
pub mod source;
pub mod sync;
pub mod telemetry;
