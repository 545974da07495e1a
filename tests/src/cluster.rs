//! A running lab cluster: the lab, an echo backend in every pod (TCP+UDP on 8080, named
//! pod-a, pod-b, ... in node order), and the agent on every node serving a manifest dir.
//! Drops in order: agents (stopped, pins removed), backends, manifests, namespaces.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::Result;

use crate::{
    agent::Agent,
    lab::{Lab, Spec},
    traffic::Echo,
};

pub const BACKEND_PORT: u16 = 8080;

/// A directory of manifests: the caller's, or a temporary one removed on drop.
pub struct Manifests {
    pub path: PathBuf,
    temporary: bool,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Manifests {
    pub fn existing(path: &Path) -> Self {
        Manifests { path: path.to_path_buf(), temporary: false }
    }

    /// A temporary directory holding `services.yaml` with this text.
    pub fn inline(yaml: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "lb-manifests-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path)?;
        let m = Manifests { path, temporary: true };
        m.replace(yaml)?;
        Ok(m)
    }

    /// Replaces the manifest text (atomically, as `kubectl apply` would swap an object).
    pub fn replace(&self, yaml: &str) -> Result<()> {
        let tmp = self.path.join(".services.yaml.tmp");
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, self.path.join("services.yaml"))?;
        Ok(())
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        if self.temporary {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

pub struct Cluster {
    pub agents: Vec<Agent>,
    pub backends: Vec<Echo>,
    pub manifests: Manifests,
    pub lab: Lab,
}

/// pod-a, pod-b, ...
pub fn pod_name(index: usize) -> String {
    format!("pod-{}", (b'a' + index as u8) as char)
}

impl Cluster {
    /// Builds the lab and starts everything; `agent_args` are added to every agent's.
    pub fn start(prefix: &str, spec: &Spec, manifests: Manifests, agent_args: &[&str]) -> Result<Cluster> {
        Cluster::start_each(prefix, spec, manifests, |_| agent_args.iter().map(|a| a.to_string()).collect())
    }

    /// The same, with each node's agent arguments from `agent_args(node index)`.
    pub fn start_each(
        prefix: &str,
        spec: &Spec,
        manifests: Manifests,
        agent_args: impl Fn(usize) -> Vec<String>,
    ) -> Result<Cluster> {
        let lab = Lab::build(prefix, spec)?;
        let mut backends = Vec::new();
        for (i, pod) in lab.nodes.iter().flat_map(|n| n.pods.iter()).enumerate() {
            backends.push(Echo::start(&pod.ns.name, &pod_name(i), pod.addr, BACKEND_PORT)?);
        }
        let mut agents = Vec::new();
        for (i, node) in lab.nodes.iter().enumerate() {
            let args = agent_args(i);
            agents.push(Agent::start(node, &manifests.path, &args.iter().map(String::as_str).collect::<Vec<_>>())?);
        }
        Ok(Cluster { agents, backends, manifests, lab })
    }

    /// Replaces the manifests and waits until every agent has synced them.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let before: Vec<usize> = self.agents.iter().map(Agent::syncs).collect();
        self.manifests.replace(yaml)?;
        for (agent, n) in self.agents.iter().zip(before) {
            agent.wait_for_syncs(n + 1)?;
        }
        Ok(())
    }

    pub fn node_port(&self, node: usize, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.lab.nodes[node].addr, port)
    }
}

/// An endpoint of a slice: ready, terminating (still serving its connections), or stopped
/// (terminating and no longer serving, still listed).
#[derive(Clone, Copy, Debug)]
pub struct Endpoint<'a> {
    pub addr: Ipv4Addr,
    pub node: &'a str,
    /// The slice's `conditions`, as YAML, or "" for none (ready).
    conditions: &'static str,
}

impl<'a> Endpoint<'a> {
    pub fn ready(addr: Ipv4Addr, node: &'a str) -> Self {
        Endpoint { addr, node, conditions: "" }
    }
    pub fn terminating(addr: Ipv4Addr, node: &'a str) -> Self {
        Endpoint { addr, node, conditions: ", conditions: {ready: false, serving: true, terminating: true}" }
    }
    pub fn stopped(addr: Ipv4Addr, node: &'a str) -> Self {
        Endpoint { addr, node, conditions: ", conditions: {ready: false, serving: false, terminating: true}" }
    }
}

/// A Service with TCP and UDP on `port` (-> the backends' port, nodePort `node_port`) and
/// a slice of `endpoints`. `spec` and `meta` add to the Service's spec and metadata; a
/// `lb_ip` goes in its status, as a cloud controller writes it.
pub fn service(
    name: &str,
    meta: &str,
    spec: &str,
    port: u16,
    node_port: u16,
    endpoints: &[Endpoint],
    lb_ip: Option<&str>,
) -> String {
    let status = lb_ip.map(|ip| format!("status: {{loadBalancer: {{ingress: [{{ip: {ip}}}]}}}}\n")).unwrap_or_default();
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{addresses: [\"{}\"], nodeName: {}{}}}", e.addr, e.node, e.conditions))
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}{meta}}}\nspec: {{{spec}, ports: [{{name: tcp, protocol: TCP, port: {port}, targetPort: {BACKEND_PORT}, nodePort: {node_port}}}, {{name: udp, protocol: UDP, port: {port}, targetPort: {BACKEND_PORT}, nodePort: {node_port}}}]}}\n{status}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: tcp, protocol: TCP, port: {BACKEND_PORT}}}, {{name: udp, protocol: UDP, port: {BACKEND_PORT}}}]\nendpoints: [{}]\n",
        eps.join(", ")
    )
}
