//! Facts about this node: from the command line, and what it leaves out from the node's own
//! `kind: Node` object (among the manifests, or watched on the API server). Nothing is guessed: a fact that neither gives is
//! an error naming what to add.
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;

use super::ModelError;

/// The node's zone label, which topology hints are matched against.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Facts about the node the model computes for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// NodePorts open on these (the first is the node's primary address).
    pub addresses: Vec<Ipv4Addr>,
    pub zone: Option<String>,
}

/// kube-proxy's detect-local modes: which sources are pods, whose ClusterIP traffic keeps
/// its source address (traffic from anywhere else is SNATed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalDetect {
    /// Every pod of the cluster (`--cluster-cidr`).
    ClusterCidr(Ipv4Net),
    /// This node's pods (`--node-pod-cidr`, or the Node's spec.podCIDRs).
    NodeCidr(Ipv4Net),
}

impl LocalDetect {
    pub fn cidr(&self) -> Ipv4Net {
        match self {
            LocalDetect::ClusterCidr(c) | LocalDetect::NodeCidr(c) => *c,
        }
    }
}

/// What the command line says about this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFlags {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    pub zone: Option<String>,
    pub local_detect: Option<LocalDetect>,
}

impl NodeFlags {
    /// The node's name, addresses and zone; addresses and zone not given come from its Node
    /// object (InternalIP addresses first, then ExternalIP, as the kubelet reports them).
    pub fn node_info(&self, nodes: &[Node]) -> Result<NodeInfo, ModelError> {
        self.node_info_from(self.find(nodes))
    }

    /// As [`node_info`](Self::node_info), from this node's Node object if there is one.
    pub fn node_info_from(&self, node: Option<&Node>) -> Result<NodeInfo, ModelError> {
        let addresses = if self.addresses.is_empty() {
            let from_node = node.map(node_addresses).unwrap_or_default();
            if from_node.is_empty() {
                return Err(self.missing(
                    node,
                    "status.addresses",
                    "no IPv4 InternalIP or ExternalIP",
                    "--node-address",
                ));
            }
            from_node
        } else {
            self.addresses.clone()
        };
        let zone = self.zone.clone().or_else(|| node.and_then(|n| n.labels().get(ZONE_LABEL).cloned()));
        Ok(NodeInfo { name: self.name.clone(), addresses, zone })
    }

    /// Which sources are pods: the flag, else the Node's first IPv4 spec.podCIDRs entry.
    pub fn local_detect(&self, nodes: &[Node]) -> Result<LocalDetect, ModelError> {
        self.local_detect_from(self.find(nodes))
    }

    /// As [`local_detect`](Self::local_detect), from this node's Node object if there is one.
    pub fn local_detect_from(&self, node: Option<&Node>) -> Result<LocalDetect, ModelError> {
        if let Some(l) = self.local_detect {
            return Ok(l);
        }
        let spec = node.and_then(|n| n.spec.as_ref());
        let cidrs =
            spec.and_then(|s| s.pod_cidrs.clone()).or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]));
        let mut bad = None;
        for (i, c) in cidrs.iter().flatten().enumerate() {
            match c.parse::<IpNet>() {
                Ok(IpNet::V4(net)) => return Ok(LocalDetect::NodeCidr(net.trunc())),
                Ok(IpNet::V6(_)) => {}
                Err(_) => bad = bad.or(Some((i, c.clone()))),
            }
        }
        let problem = match bad {
            Some((i, c)) => format!("[{i}] {c:?} is not a CIDR, and no other entry is an IPv4 one"),
            None => "no IPv4 pod CIDR".to_string(),
        };
        Err(self.missing(node, "spec.podCIDRs", &problem, "--cluster-cidr or --node-pod-cidr"))
    }

    fn find<'a>(&self, nodes: &'a [Node]) -> Option<&'a Node> {
        nodes.iter().find(|n| n.name_any() == self.name)
    }

    fn missing(&self, node: Option<&Node>, field: &str, problem: &str, flags: &str) -> ModelError {
        let problem = match node {
            Some(_) => format!("{problem}; give {flags}"),
            None => format!("no Node object of this name to read it from; give {flags}"),
        };
        ModelError { object: format!("Node {}", self.name), field: field.into(), problem }
    }
}

fn node_addresses(node: &Node) -> Vec<Ipv4Addr> {
    let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    let of_type = |t: &'static str| {
        listed.into_iter().flatten().filter(move |a| a.type_ == t).filter_map(|a| a.address.parse::<Ipv4Addr>().ok())
    };
    let mut out: Vec<Ipv4Addr> = Vec::new();
    for a in of_type("InternalIP").chain(of_type("ExternalIP")) {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}
