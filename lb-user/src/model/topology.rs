//! Which endpoints a Service port sends traffic to from this node, exactly as kube-proxy's
//! `CategorizeEndpoints` (pkg/proxy/topology.go) decides.
use std::collections::BTreeMap;

use super::{endpoints::Endpoint, NodeInfo};

/// What categorising needs to know about a Service port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// internalTrafficPolicy: Local.
    pub internal_policy_local: bool,
    /// externalTrafficPolicy: Local on a Service of an externally accessible kind
    /// (NodePort, LoadBalancer, or with externalIPs): kube-proxy's ExternalPolicyLocal.
    pub external_policy_local: bool,
    /// This port has a nodePort, a LoadBalancer ingress IP or an externalIP of this node's
    /// family: traffic can reach it other than through the ClusterIP.
    pub externally_accessible: bool,
}

impl ServicePortInfo {
    /// Some traffic uses Cluster policy: the ClusterIP unless internalTrafficPolicy is
    /// Local, and any external frontend (even under externalTrafficPolicy Local, whose
    /// traffic from this node's pods and the node itself is short-circuited to the cluster set).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible
    }

    /// Some traffic uses Local policy.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.external_policy_local && self.externally_accessible)
    }
}

/// The endpoint sets of a Service port on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Categorized<'a> {
    /// Ready endpoints after topology hints, or if there are none anywhere, every serving
    /// and terminating endpoint (no hints). None when no traffic uses Cluster policy.
    pub cluster: Option<Vec<&'a Endpoint>>,
    /// This node's ready endpoints, or if there are none, its serving and terminating ones
    /// (never hints). None when no traffic uses Local policy.
    pub local: Option<Vec<&'a Endpoint>>,
    /// The union of the two: every endpoint this node may send to.
    pub all: Vec<&'a Endpoint>,
    /// Some endpoint anywhere in the cluster is usable (ready, or serving and terminating),
    /// even if none is reachable from this node: traffic that finds no backend here is
    /// dropped rather than refused.
    pub has_any: bool,
}

/// kube-proxy's topology modes: which hints narrow the cluster set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    Any,
    SameZone,
    SameNode,
}

/// Sorts a Service port's endpoints into its cluster, local and reachable sets. Sets come
/// out in the order of `endpoints`.
pub fn categorize_endpoints<'a>(endpoints: &'a [Endpoint], svc: &ServicePortInfo, node: &NodeInfo) -> Categorized<'a> {
    let zone = node.zone.as_deref().unwrap_or("");
    let mut topology = Topology::Any;
    let mut has_any = false;
    let mut cluster = None;
    if svc.uses_cluster_endpoints() {
        topology = topology_from_hints(endpoints, &node.name, zone);
        let mut set: Vec<&Endpoint> =
            endpoints.iter().filter(|e| e.ready && available(e, topology, &node.name, zone)).collect();
        // No ready endpoint for the chosen topology means none anywhere (topology is only
        // chosen when one exists): fall back to the terminating ones, hints ignored.
        if set.is_empty() {
            set = endpoints.iter().filter(|e| e.serving && e.terminating).collect();
        }
        has_any = !set.is_empty();
        cluster = Some(set);
    }
    if !svc.uses_local_endpoints() {
        let all = cluster.clone().unwrap_or_default();
        return Categorized { cluster, local: None, all, has_any };
    }
    let usable = |e: &&Endpoint| e.ready || (e.serving && e.terminating);
    has_any |= endpoints.iter().any(|e| usable(&e));
    let local_ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.local && e.ready).collect();
    let serving_terminating = local_ready.is_empty();
    let local = if serving_terminating {
        endpoints.iter().filter(|e| e.local && e.serving && e.terminating).collect()
    } else {
        local_ready
    };
    let all = match &cluster {
        None => local.clone(),
        // Every ready endpoint is in the cluster set, so it holds the ready local ones.
        Some(c) if topology == Topology::Any && !serving_terminating => c.clone(),
        Some(c) => {
            let merged: BTreeMap<(std::net::Ipv4Addr, u16), &Endpoint> =
                c.iter().chain(local.iter()).map(|e| ((e.addr, e.port), *e)).collect();
            endpoints.iter().filter(|e| merged.contains_key(&(e.addr, e.port))).collect()
        }
    };
    Categorized { cluster, local: Some(local), all, has_any }
}

/// Node hints win when every ready endpoint has one and one names this node; else zone
/// hints when every ready endpoint has one and one names this node's zone; else none.
fn topology_from_hints(endpoints: &[Endpoint], node: &str, zone: &str) -> Topology {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Topology::Any;
    }
    let all_have = |hints: fn(&Endpoint) -> &[String], name: &str| {
        ready.iter().all(|e| !hints(e).is_empty()) && ready.iter().any(|e| names(hints(e), name))
    };
    if all_have(Endpoint::node_hints, node) {
        Topology::SameNode
    } else if all_have(Endpoint::zone_hints, zone) {
        Topology::SameZone
    } else {
        Topology::Any
    }
}

fn available(e: &Endpoint, topology: Topology, node: &str, zone: &str) -> bool {
    match topology {
        Topology::Any => true,
        Topology::SameZone => names(e.zone_hints(), zone),
        Topology::SameNode => names(e.node_hints(), node),
    }
}

/// Whether sorted hint names include `name`.
fn names(hints: &[String], name: &str) -> bool {
    hints.binary_search_by(|h| h.as_str().cmp(name)).is_ok()
}

#[cfg(test)]
mod tests;
