//! A cluster in a box: a lab whose nodes each run the agent in cluster mode against one
//! fake API server (lb_tests::fake_api) reachable inside the lab, on the last client's
//! address (that client hosts the control plane; the others send traffic). The test
//! process reaches the same server on a loopback listener of its own, with kube-rs.
//! Drops in order: agents (stopped, pins removed), backends, the API server, the lab.
use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::{core::v1::Node as NodeObject, core::v1::Service, discovery::v1::EndpointSlice};
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::{
    agent::Agent,
    cluster::{pod_name, BACKEND_PORT},
    fake_api::{kube_client, Config, FakeApiServer, Faults},
    lab::{in_netns, Lab, Spec},
    traffic::{parse_answer, Echo, TIMEOUT},
};

/// The API server's port on its lab address.
pub const API_PORT: u16 = 6443;

pub struct ApiCluster {
    pub agents: Vec<Agent>,
    pub backends: Vec<Echo>,
    pub api: FakeApiServer,
    /// The test's client (over the loopback listener).
    pub client: kube::Client,
    /// The loopback listener's URL (for kubectl on this machine).
    pub local_url: String,
    /// The URL the agents use, inside the lab.
    pub api_url: String,
    pub lab: Lab,
    runtime: tokio::runtime::Runtime,
}

/// The zone of node `i` in a fresh cluster: zone-a, zone-b, ...
pub fn zone(i: usize) -> String {
    format!("zone-{}", (b'a' + i as u8) as char)
}

/// Node `i`'s object as a kubelet registers it: InternalIP, pod CIDR, zone label.
pub fn node_object(name: &str, i: usize, addresses: &[Ipv4Addr], zone: &str) -> NodeObject {
    let addresses: Vec<_> = addresses.iter().map(|a| json!({"type": "InternalIP", "address": a.to_string()})).collect();
    let cidr = format!("10.244.{}.0/24", i + 1);
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": addresses},
    }))
    .expect("a valid Node")
}

/// A Service with TCP and UDP on `port` (-> the backends' port), NodePort `node_port`.
pub fn service(name: &str, cluster_ip: Ipv4Addr, port: u16, node_port: u16) -> Service {
    let ports: Vec<_> = ["TCP", "UDP"]
        .iter()
        .map(|proto| {
            json!({"name": proto.to_lowercase(), "protocol": proto, "port": port,
                   "targetPort": BACKEND_PORT, "nodePort": node_port})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "NodePort", "clusterIP": cluster_ip.to_string(), "ports": ports},
    }))
    .expect("a valid Service")
}

/// An endpoint of a slice: its address, node and (optional) zone hint.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint<'a> {
    pub addr: Ipv4Addr,
    pub node: &'a str,
    pub zone_hint: Option<&'a str>,
}

/// The EndpointSlice `NAME-1` of Service `service` with these ready endpoints.
pub fn endpoint_slice(service: &str, endpoints: &[Endpoint]) -> EndpointSlice {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|e| {
            let mut endpoint =
                json!({"addresses": [e.addr.to_string()], "nodeName": e.node, "conditions": {"ready": true}});
            if let Some(zone) = e.zone_hint {
                endpoint["hints"] = json!({"forZones": [{"name": zone}]});
            }
            endpoint
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-1"), "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "protocol": "TCP", "port": BACKEND_PORT}, {"name": "udp", "protocol": "UDP", "port": BACKEND_PORT}],
        "endpoints": endpoints,
    }))
    .expect("a valid EndpointSlice")
}

impl ApiCluster {
    /// Builds the lab (one client more than `spec` asks, for the control plane), starts
    /// the API server with a Node object per node, an echo backend in every pod, and the
    /// agent on every node in cluster mode (`agent_args` added); waits until each is ready.
    pub fn start(prefix: &str, spec: &Spec, agent_args: &[&str]) -> Result<ApiCluster> {
        let mut cluster = ApiCluster::without_agents(prefix, spec)?;
        for node in &cluster.lab.nodes {
            cluster.agents.push(Agent::start_cluster(node, &cluster.api_url, agent_args)?);
        }
        Ok(cluster)
    }

    /// The same without starting the agents (a caller fills the API server first, or
    /// times the agents' start).
    pub fn without_agents(prefix: &str, spec: &Spec) -> Result<ApiCluster> {
        let spec = Spec { clients: spec.clients + 1, ..spec.clone() };
        let lab = Lab::build(prefix, &spec)?;
        let host = lab.clients.last().expect("the control plane's client");
        let (host_ns, host_addr) = (host.ns.name.clone(), host.addr);
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let _entered = runtime.enter();
        let mut api = FakeApiServer::new(Config { bookmark_interval: Duration::from_secs(1) });
        let bind_in_lab = move || {
            let ns = host_ns.clone();
            in_netns(&ns, move || std::net::TcpListener::bind((host_addr, API_PORT)))
        };
        let lab_listener = bind_in_lab().context("binding the API server inside the lab")?;
        api.serve(lab_listener, Arc::new(bind_in_lab))?;
        let local = std::net::TcpListener::bind("127.0.0.1:0")?;
        let local_addr = local.local_addr()?;
        api.serve(local, Arc::new(move || std::net::TcpListener::bind(local_addr)))?;
        let local_url = format!("http://{local_addr}");
        let client = kube_client(&local_url);
        let api_url = format!("http://{host_addr}:{API_PORT}");

        let nodes: Api<NodeObject> = Api::all(client.clone());
        for (i, node) in lab.nodes.iter().enumerate() {
            let object = node_object(&node.name, i, &[node.addr], &zone(i));
            runtime
                .block_on(nodes.create(&PostParams::default(), &object))
                .with_context(|| format!("creating Node {}", node.name))?;
        }
        let mut backends = Vec::new();
        for (i, pod) in lab.nodes.iter().flat_map(|n| n.pods.iter()).enumerate() {
            backends.push(Echo::start(&pod.ns.name, &pod_name(i), pod.addr, BACKEND_PORT)?);
        }
        Ok(ApiCluster { agents: Vec::new(), backends, api, client, local_url, api_url, lab, runtime })
    }

    pub fn faults(&self) -> Faults {
        self.api.faults()
    }

    /// Runs a kube-rs call (or any future) to completion.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    pub fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), "default")
    }

    pub fn slices(&self) -> Api<EndpointSlice> {
        Api::namespaced(self.client.clone(), "default")
    }

    pub fn nodes(&self) -> Api<NodeObject> {
        Api::all(self.client.clone())
    }

    /// The clients that send traffic (the last one hosts the API server).
    pub fn traffic_clients(&self) -> &[crate::lab::Client] {
        &self.lab.clients[..self.lab.clients.len() - 1]
    }
}

/// Which backends answer `samples` TCP and `samples` UDP requests from inside `ns` to
/// `dst`: a count per "tcp NAME" / "udp NAME", failures as "tcp error KIND".
pub fn answers(ns: &str, dst: SocketAddrV4, samples: usize) -> BTreeMap<String, usize> {
    in_netns(ns, move || {
        let mut seen = BTreeMap::new();
        for _ in 0..samples {
            for (proto, result) in [("tcp", tcp_once(dst)), ("udp", udp_once(dst))] {
                let key = match result.as_deref().map(parse_answer) {
                    Ok(Some((name, _))) => format!("{proto} {name}"),
                    Ok(None) => format!("{proto} garbled"),
                    Err(e) => format!("{proto} error {:?}", e.kind()),
                };
                *seen.entry(key).or_insert(0) += 1;
            }
        }
        seen
    })
}

fn tcp_once(dst: SocketAddrV4) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&dst.into(), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"hello\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn udp_once(dst: SocketAddrV4) -> io::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.connect(dst)?;
    s.send(b"hello")?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Waits until requests over TCP and UDP from `ns` to `dst` are answered by exactly the
/// backends `expected` (each seen, no other, no failure); with none expected, until both
/// protocols fail. Fails with the last answers after `limit`.
pub fn wait_for_backends(ns: &str, dst: SocketAddrV4, expected: &[&str], limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let samples = if expected.is_empty() { 1 } else { 8 * expected.len() };
    loop {
        let seen = answers(ns, dst, samples);
        let good = if expected.is_empty() {
            seen.keys().all(|k| k.contains(" error "))
        } else {
            let want: Vec<String> =
                ["tcp", "udp"].iter().flat_map(|p| expected.iter().map(move |name| format!("{p} {name}"))).collect();
            seen.keys().all(|k| want.contains(k)) && want.iter().all(|w| seen.contains_key(w))
        };
        if good {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{ns} -> {dst}: expected answers from {expected:?} within {limit:?}, got {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The frontends and backends the agent has programmed (LB_SERVICES and the LB_BACKENDS
/// entries in use), one line each, sorted: equal snapshots mean unchanged maps.
pub fn maps_snapshot(pin_dir: &Path) -> Vec<String> {
    use aya::maps::{Array, HashMap, MapData};
    use lb_common::{map_names, Backend, ServiceKey, ServiceValue};
    let services: HashMap<MapData, ServiceKey, ServiceValue> =
        lb_user::datapath::open_map(pin_dir, map_names::SERVICES).unwrap().try_into().unwrap();
    let mut lines: Vec<String> = services.iter().map(|entry| format!("{:?}", entry.unwrap())).collect();
    let backends: Array<MapData, Backend> =
        lb_user::datapath::open_map(pin_dir, map_names::BACKENDS).unwrap().try_into().unwrap();
    let unused = Backend::default();
    for i in 0..backends.len() {
        let backend = backends.get(&i, 0).unwrap();
        if backend != unused {
            lines.push(format!("backend {i}: {backend:?}"));
        }
    }
    lines.sort();
    lines
}
