//! Where Kubernetes objects come from: manifest files on disk (standalone mode). Every
//! source hands the model the same typed objects.
use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};

pub mod manifests;
pub mod watch;

/// The model's input objects, as a source holds them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub endpoints: Vec<Endpoints>,
    /// Nodes; the agent reads its own node's facts from the one named like it.
    pub nodes: Vec<Node>,
}
