//! Where Kubernetes objects come from: manifest files on disk (standalone mode) or the
//! API server (cluster mode). Every source hands the model the same typed objects.
use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub mod cluster;
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

/// The kinds of objects the model reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Service,
    Slice,
    Endpoints,
    Node,
}

/// One object of any kind the model reads.
// Unboxed: each object moves once, from the source into the model's index.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Service),
    Slice(EndpointSlice),
    Endpoints(Endpoints),
    Node(Node),
}

impl Object {
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::Slice(o) => &o.metadata,
            Object::Endpoints(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
        }
    }

    pub fn kind(&self) -> ObjectKind {
        match self {
            Object::Service(_) => ObjectKind::Service,
            Object::Slice(_) => ObjectKind::Slice,
            Object::Endpoints(_) => ObjectKind::Endpoints,
            Object::Node(_) => ObjectKind::Node,
        }
    }
}

/// What a source saw happen.
// Unboxed: each object moves once, from the source into the model's index.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Added or modified.
    Applied(Object),
    Deleted(Object),
    /// A complete list of one kind begins (the first list, a relist after a watch was
    /// lost): what it does not name by its end is gone.
    ListStarted(ObjectKind),
    /// An object of the list under way.
    Listed(Object),
    /// The list of this kind is complete.
    ListDone(ObjectKind),
}
