//! The model kept up to date change by change: the objects indexed by the Service they
//! belong to, each Service's claims kept from its last computation, and only the Services
//! whose objects changed computed again. Its [`Desired`] is the one [`desired_state_after`]
//! would compute from the same objects and the previous state (the property tests check
//! it); a Node whose facts change recomputes everything.
//!
//! EndpointSlices, most of what a cluster holds, are kept as read (their usable endpoints
//! and ports), not as API objects: a tenth of the memory. Reading marks endpoints local by
//! this node's name, which is fixed for the index's life.
//!
//! [`desired_state_after`]: super::desired_state_after
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Node},
    discovery::v1::EndpointSlice,
};
use kube::ResourceExt;

use super::{
    add_digest, digest_service, endpoints, service_ref, settle_key, Claim, Ctx, Desired, FrontendKey, HealthCheck,
    ModelError, NodeInfo, Options, ServiceDigest, ServiceRef,
};
use crate::source::{Change, Object, ObjectKind};

/// An object's namespace (the API's default when a manifest leaves it out) and name.
type ObjectName = (Arc<str>, Arc<str>);

fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectName {
    (meta.namespace.as_deref().unwrap_or("default").into(), meta.name.as_deref().unwrap_or_default().into())
}

/// Text that many entries of the index name (namespaces, Service names, node names), held
/// once. What only the set still holds is dropped each time the set doubles, so churn
/// (nodes replaced, namespaces deleted) does not grow it.
#[derive(Default)]
struct Texts {
    held: BTreeSet<Arc<str>>,
    /// The set's size after its last pruning.
    pruned_to: usize,
}

impl Texts {
    fn get(&mut self, text: &str) -> Arc<str> {
        if let Some(held) = self.held.get(text) {
            return held.clone();
        }
        if self.held.len() >= 2 * self.pruned_to.max(64) {
            self.held.retain(|t| Arc::strong_count(t) > 1);
            self.pruned_to = self.held.len();
        }
        let text: Arc<str> = text.into();
        self.held.insert(text.clone());
        text
    }

    fn service(&mut self, sref: &ServiceRef) -> ServiceRef {
        ServiceRef { namespace: self.get(&sref.namespace), name: self.get(&sref.name) }
    }
}

/// An EndpointSlice as read: its Service (or the error of having none), what it serves
/// (None: another address family) and the errors reading it gave.
#[derive(Debug, PartialEq)]
struct StoredSlice {
    // Boxed: rare, and large beside a name.
    owner: Result<ServiceRef, Box<ModelError>>,
    read: Option<endpoints::Slice>,
    errors: Vec<ModelError>,
    /// The node each endpoint address names, sorted by address; shared with the metrics'
    /// labels, and each name shared by every endpoint on its node.
    nodes: SliceNodes,
}

type SliceNodes = Arc<[(Ipv4Addr, Arc<str>)]>;

/// The node each endpoint address of one Service runs on, as its slices (or, for a Service
/// without slices, its legacy Endpoints) name it: what per-backend metrics are labelled
/// with. Held as the slices hold it, not copied: one per endpoint is a lot at 100k.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointNodes(Vec<SliceNodes>);

impl EndpointNodes {
    /// The node `addr` runs on: as the last slice (in name order) that names it says.
    pub fn get(&self, addr: &Ipv4Addr) -> Option<&Arc<str>> {
        self.0.iter().rev().find_map(|nodes| {
            let at = nodes.binary_search_by_key(addr, |(a, _)| *a).ok()?;
            Some(&nodes[at].1)
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|nodes| nodes.is_empty())
    }

    /// Every address with its node, in slice order.
    pub fn iter(&self) -> impl Iterator<Item = &(Ipv4Addr, Arc<str>)> {
        self.0.iter().flat_map(|nodes| nodes.iter())
    }
}

impl FromIterator<(Ipv4Addr, Arc<str>)> for EndpointNodes {
    fn from_iter<I: IntoIterator<Item = (Ipv4Addr, Arc<str>)>>(pairs: I) -> Self {
        EndpointNodes(vec![slice_nodes(pairs.into_iter().collect())])
    }
}

/// Sorted by address for lookups; one node per address (the first named).
fn slice_nodes(mut pairs: Vec<(Ipv4Addr, Arc<str>)>) -> SliceNodes {
    pairs.sort_by_key(|(addr, _)| *addr);
    pairs.dedup_by_key(|(addr, _)| *addr);
    pairs.into()
}

/// What an [`Incremental::update`] changed.
#[derive(Debug, Default)]
pub struct Update {
    /// The frontends whose desired state changed, with what they were before (None: new).
    pub changed: BTreeMap<FrontendKey, Option<Arc<super::Frontend>>>,
    /// The endpoint nodes of each Service computed again.
    pub endpoint_nodes: Vec<(ServiceRef, EndpointNodes)>,
}

impl Update {
    /// The frontends whose desired state changed.
    pub fn keys(&self) -> BTreeSet<FrontendKey> {
        self.changed.keys().copied().collect()
    }
}

/// A small sorted set: most Services have one slice and most frontends one claimant, and
/// a B-tree set allocates room for eleven.
#[derive(Debug)]
struct SortedVec<T>(Vec<T>);

impl<T> Default for SortedVec<T> {
    fn default() -> Self {
        SortedVec(Vec::new())
    }
}

impl<T: Ord> SortedVec<T> {
    fn insert(&mut self, item: T) {
        if let Err(at) = self.0.binary_search(&item) {
            // Room for exactly one more: a Vec would make room for four.
            self.0.reserve_exact(1);
            self.0.insert(at, item);
        }
    }
    fn remove(&mut self, item: &T) {
        if let Ok(at) = self.0.binary_search(item) {
            self.0.remove(at);
        }
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

/// What one Service (or the slices and Endpoints named for it) gave, last computed.
#[derive(Default)]
struct Output {
    claims: Vec<Claim>,
    health_check: Option<HealthCheck>,
    errors: Vec<ModelError>,
}

pub struct Incremental {
    /// This node's name: endpoints with it as their nodeName are local.
    node_name: String,
    /// Services as read, with a hash of what was read them from (an update that changes
    /// nothing the model reads is no change).
    services: BTreeMap<ServiceRef, ServiceDigest>,
    /// Fixed for the index's life: Services are read with them.
    opts: Options,
    slices: BTreeMap<ObjectName, StoredSlice>,
    /// Slice names by the Service their label names.
    slices_of: BTreeMap<ServiceRef, SortedVec<ObjectName>>,
    /// Slices without a Service label.
    unlabelled: BTreeSet<ObjectName>,
    /// Lists under way: the names each has given so far.
    listing: BTreeMap<ObjectKind, BTreeSet<ObjectName>>,
    endpoints: BTreeMap<ServiceRef, Endpoints>,
    nodes: BTreeMap<String, Node>,
    /// Namespaces, Service names and node names, each held once.
    texts: Texts,
    /// Services whose objects changed since the last update.
    dirty: BTreeSet<ServiceRef>,
    /// A Node object changed since the last update.
    nodes_changed: bool,
    outputs: BTreeMap<ServiceRef, Output>,
    /// The Services whose output has errors.
    with_errors: BTreeSet<ServiceRef>,
    /// The Services claiming each frontend.
    claimants: BTreeMap<FrontendKey, SortedVec<ServiceRef>>,
    /// The errors of settling each contested frontend.
    settle_errors: BTreeMap<FrontendKey, Vec<ModelError>>,
    /// The node facts `outputs` were computed with.
    node: Option<NodeInfo>,
    desired: Desired,
}

impl Incremental {
    /// An empty index for the node `node_name`, with these options.
    pub fn new(node_name: &str, opts: Options) -> Self {
        Incremental {
            node_name: node_name.to_string(),
            services: BTreeMap::new(),
            opts,
            slices: BTreeMap::new(),
            slices_of: BTreeMap::new(),
            unlabelled: BTreeSet::new(),
            listing: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            nodes: BTreeMap::new(),
            texts: Texts::default(),
            dirty: BTreeSet::new(),
            nodes_changed: false,
            outputs: BTreeMap::new(),
            with_errors: BTreeSet::new(),
            claimants: BTreeMap::new(),
            settle_errors: BTreeMap::new(),
            node: None,
            desired: Desired::default(),
        }
    }

    /// The state made by the last [`update`](Self::update).
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// The Node object of this name.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Takes in what a source saw. Returns how many objects it changed.
    pub fn change(&mut self, change: Change) -> usize {
        match change {
            Change::Applied(o) => usize::from(self.apply(o)),
            Change::Deleted(o) => {
                let (kind, meta) = (o.kind(), o.meta());
                usize::from(self.delete(kind, meta.namespace.as_deref(), meta.name.as_deref().unwrap_or_default()))
            }
            Change::ListStarted(kind) => {
                self.listing.insert(kind, BTreeSet::new());
                0
            }
            Change::Listed(o) => {
                self.listing.entry(o.kind()).or_default().insert(object_name(o.meta()));
                usize::from(self.apply(o))
            }
            Change::ListDone(kind) => {
                let listed = self.listing.remove(&kind).unwrap_or_default();
                self.remove_unlisted(kind, &listed)
            }
        }
    }

    /// Something changed that the next update has not computed yet.
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty() || self.nodes_changed
    }

    /// An object was added or modified. Returns whether it differs from what was held.
    fn apply(&mut self, object: Object) -> bool {
        match object {
            Object::Service(svc) => {
                let sref = self.texts.service(&service_ref(&svc));
                let node = NodeInfo { name: self.node_name.clone(), addresses: Vec::new(), zone: None };
                let mut ctx = Ctx { node: &node, opts: &self.opts, errors: Vec::new() };
                // What the model reads of it: an update of anything else (a new
                // resourceVersion, a status condition) changes nothing.
                let digest = digest_service(&mut ctx, &svc, &sref);
                if self.services.get(&sref) == Some(&digest) {
                    return false;
                }
                self.dirty.insert(sref.clone());
                self.services.insert(sref, digest);
            }
            Object::Slice(slice) => {
                let (namespace, name) = object_name(&slice.metadata);
                let name = (self.texts.get(&namespace), name);
                let stored = self.read(&name, &slice);
                if self.slices.get(&name) == Some(&stored) {
                    return false;
                }
                self.forget_slice(&name);
                match &stored.owner {
                    Ok(sref) => {
                        self.slices_of.entry(sref.clone()).or_default().insert(name.clone());
                        self.dirty.insert(sref.clone());
                    }
                    Err(_) => {
                        self.unlabelled.insert(name.clone());
                    }
                }
                self.slices.insert(name, stored);
            }
            Object::Endpoints(ep) => {
                let sref = endpoints::legacy_ref(&ep);
                if self.endpoints.get(&sref) == Some(&ep) {
                    return false;
                }
                self.dirty.insert(sref.clone());
                self.endpoints.insert(sref, ep);
            }
            Object::Node(node) => {
                let node = slim_node(node);
                let name = node.name_any();
                if self.nodes.get(&name) == Some(&node) {
                    return false;
                }
                self.nodes_changed = true;
                self.nodes.insert(name, node);
            }
        }
        true
    }

    /// An object was deleted. Returns whether it was held.
    fn delete(&mut self, kind: ObjectKind, namespace: Option<&str>, name: &str) -> bool {
        let namespace: Arc<str> = namespace.unwrap_or("default").into();
        match kind {
            ObjectKind::Service => {
                let sref = ServiceRef { namespace: namespace.clone(), name: name.into() };
                let held = self.services.remove(&sref).is_some();
                if held {
                    self.dirty.insert(sref);
                }
                held
            }
            ObjectKind::Slice => self.forget_slice(&(namespace, name.into())),
            ObjectKind::Endpoints => {
                let sref = ServiceRef { namespace: namespace.clone(), name: name.into() };
                let held = self.endpoints.remove(&sref).is_some();
                if held {
                    self.dirty.insert(sref);
                }
                held
            }
            ObjectKind::Node => {
                let held = self.nodes.remove(name).is_some();
                self.nodes_changed |= held;
                held
            }
        }
    }

    /// A list of `kind` ended: what it did not name is gone (a relist after a lost watch
    /// changes only what truly changed). Returns how many objects were removed.
    fn remove_unlisted(&mut self, kind: ObjectKind, listed: &BTreeSet<ObjectName>) -> usize {
        let held: Vec<ObjectName> = match kind {
            ObjectKind::Service => self.services.keys().map(|r| (r.namespace.clone(), r.name.clone())).collect(),
            ObjectKind::Slice => self.slices.keys().cloned().collect(),
            ObjectKind::Endpoints => self.endpoints.keys().map(|r| (r.namespace.clone(), r.name.clone())).collect(),
            ObjectKind::Node => self.nodes.keys().map(|n| ("default".into(), n.as_str().into())).collect(),
        };
        let mut removed = 0;
        for (namespace, name) in held.into_iter().filter(|n| !listed.contains(n)) {
            let namespace = (kind != ObjectKind::Node).then_some(&*namespace);
            removed += usize::from(self.delete(kind, namespace, &name));
        }
        removed
    }

    /// Reads a slice as the model uses it.
    fn read(&mut self, name: &ObjectName, slice: &EndpointSlice) -> StoredSlice {
        let node = NodeInfo { name: self.node_name.clone(), addresses: Vec::new(), zone: None };
        let mut ctx = Ctx { node: &node, opts: &self.opts, errors: Vec::new() };
        let object = format!("EndpointSlice {}/{}", name.0, name.1);
        let read = endpoints::read_slice(&mut ctx, &object, slice);
        StoredSlice {
            owner: endpoints::owner_of_slice(slice).map(|o| self.texts.service(&o)).map_err(Box::new),
            read,
            errors: ctx.errors,
            nodes: slice_nodes(
                endpoints::slice_nodes(slice).into_iter().map(|(addr, node)| (addr, self.texts.get(&node))).collect(),
            ),
        }
    }

    fn forget_slice(&mut self, name: &ObjectName) -> bool {
        let Some(old) = self.slices.remove(name) else { return false };
        self.unlabelled.remove(name);
        if let Ok(sref) = old.owner {
            if let Some(names) = self.slices_of.get_mut(&sref) {
                names.remove(name);
                if names.is_empty() {
                    self.slices_of.remove(&sref);
                }
            }
            self.dirty.insert(sref);
        }
        true
    }

    /// Computes again what changed since the last update, for this node.
    pub fn update(&mut self, node: &NodeInfo) -> Update {
        debug_assert_eq!(node.name, self.node_name, "slices were read for another node");
        self.nodes_changed = false;
        if self.node.as_ref() != Some(node) {
            // Addresses, zone and name shape every Service's frontends and sets.
            self.node = Some(node.clone());
            self.dirty.extend(self.outputs.keys().cloned());
            self.dirty.extend(self.services.keys().cloned());
            self.dirty.extend(self.slices_of.keys().cloned());
            self.dirty.extend(self.endpoints.keys().cloned());
        }
        let mut touched: BTreeSet<FrontendKey> = BTreeSet::new();
        let mut health_changed = false;
        let mut update = Update { endpoint_nodes: Vec::with_capacity(self.dirty.len()), ..Update::default() };
        for sref in std::mem::take(&mut self.dirty) {
            update.endpoint_nodes.push((sref.clone(), self.endpoint_nodes(&sref)));
            self.with_errors.remove(&sref);
            if let Some(old) = self.outputs.remove(&sref) {
                health_changed |= old.health_check.is_some();
                for c in &old.claims {
                    touched.insert(c.key);
                    if let Some(refs) = self.claimants.get_mut(&c.key) {
                        refs.remove(&sref);
                        if refs.is_empty() {
                            self.claimants.remove(&c.key);
                        }
                    }
                }
            }
            let output = self.compute(&sref, node);
            health_changed |= output.health_check.is_some();
            for c in &output.claims {
                touched.insert(c.key);
                self.claimants.entry(c.key).or_default().insert(sref.clone());
            }
            if !output.errors.is_empty() {
                self.with_errors.insert(sref.clone());
            }
            if !output.claims.is_empty() || output.health_check.is_some() || !output.errors.is_empty() {
                self.outputs.insert(sref, output);
            }
        }
        for key in touched {
            let mut errors = Vec::new();
            let winner = match self.claimants.get(&key) {
                None => None,
                Some(refs) => {
                    let claims: Vec<&Claim> =
                        refs.iter().flat_map(|r| self.outputs[r].claims.iter().filter(|c| c.key == key)).collect();
                    let incumbent = self.desired.frontends.get(&key).map(|f| &f.service);
                    settle_key(&mut errors, key, incumbent, claims).map(|c| c.frontend.clone())
                }
            };
            if errors.is_empty() {
                self.settle_errors.remove(&key);
            } else {
                self.settle_errors.insert(key, errors);
            }
            let old = match winner {
                Some(f) => self.desired.frontends.insert(key, f),
                None => self.desired.frontends.remove(&key),
            };
            if old.as_ref() != self.desired.frontends.get(&key) {
                update.changed.insert(key, old);
            }
        }
        if health_changed {
            self.desired.health_checks = self.outputs.values().filter_map(|o| o.health_check.clone()).collect();
        }
        self.desired.errors = self
            .unlabelled
            .iter()
            .filter_map(|n| self.slices[n].owner.clone().err().map(|e| *e))
            .chain(self.with_errors.iter().flat_map(|r| self.outputs[r].errors.iter().cloned()))
            .chain(self.settle_errors.values().flatten().cloned())
            .collect();
        update
    }

    /// The node of each endpoint of a Service: its slices', or its legacy Endpoints' when it
    /// has no slices (as the model reads them).
    fn endpoint_nodes(&self, sref: &ServiceRef) -> EndpointNodes {
        match self.slices_of.get(sref) {
            Some(names) => EndpointNodes(names.iter().map(|n| self.slices[n].nodes.clone()).collect()),
            None => self
                .endpoints
                .get(sref)
                .map(endpoints::legacy_nodes)
                .unwrap_or_default()
                .into_iter()
                .map(|(addr, node)| (addr, node.into()))
                .collect(),
        }
    }

    fn compute(&self, sref: &ServiceRef, node: &NodeInfo) -> Output {
        let mut ctx = Ctx { node, opts: &self.opts, errors: Vec::new() };
        let labelled: Vec<&StoredSlice> =
            self.slices_of.get(sref).into_iter().flat_map(SortedVec::iter).map(|n| &self.slices[n]).collect();
        let slices = if labelled.is_empty() {
            endpoints::service_slices(&mut ctx, sref, &[], self.endpoints.get(sref))
        } else {
            for s in &labelled {
                ctx.errors.extend(s.errors.iter().cloned());
            }
            labelled.iter().filter_map(|s| s.read.clone()).collect()
        };
        let mut output = Output::default();
        if let Some(digest) = self.services.get(sref) {
            let mut checks = Vec::new();
            add_digest(&mut ctx, digest, sref, &slices, &mut output.claims, &mut checks);
            // Kept until the Service changes: no room to spare.
            output.claims.shrink_to_fit();
            output.health_check = checks.pop();
        }
        output.errors = ctx.errors;
        output
    }
}

/// What is read from a Node (its name, labels, deletion, pod CIDRs, taints, addresses):
/// the kubelet's heartbeats, which rewrite its status every few seconds, change nothing.
fn slim_node(node: Node) -> Node {
    let meta = node.metadata;
    Node {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: meta.name,
            labels: meta.labels,
            deletion_timestamp: meta.deletion_timestamp,
            ..Default::default()
        },
        spec: node.spec.map(|s| k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: s.pod_cidr,
            pod_cidrs: s.pod_cidrs,
            taints: s.taints,
            ..Default::default()
        }),
        status: node
            .status
            .map(|s| k8s_openapi::api::core::v1::NodeStatus { addresses: s.addresses, ..Default::default() }),
    }
}

#[cfg(test)]
mod tests;
