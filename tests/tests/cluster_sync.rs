//! The agent's cluster source and sync against the fake API server, writing to service maps
//! held in memory (no root, no datapath): the first list programs everything, an endpoint
//! change is written with its latency, a 410 relist writes and deletes nothing, an API
//! outage keeps the maps as they are until changes made after it are applied, and a Node
//! deleted gracefully fails /healthz.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use lb_tests::fake_api::{kube_client, Config, FakeApiServer};
use lb_user::{
    datapath::maps::MemoryMaps,
    model::{NodeFlags, Options},
    reconcile::Reconciler,
    source::{cluster::ApiServer, ObjectKind},
    sync::{Feed, Step, Sync},
    telemetry::health::HealthState,
};
use serde_json::json;

/// The sync as the agent runs it, over maps in memory.
struct Agent {
    feed: Feed,
    sync: Sync,
    reconciler: Reconciler,
    maps: MemoryMaps,
    steps: Vec<Step>,
    health: HealthState,
}

impl Agent {
    async fn start(url: &str) -> Agent {
        let health = HealthState::default();
        let flags = NodeFlags { name: "node1".into(), addresses: vec![], zone: None, local_detect: None };
        let kinds = [ObjectKind::Service, ObjectKind::Slice, ObjectKind::Node];
        let sync =
            Sync::new(flags, Options::default(), kinds, Box::new(|_, _| lb_common::Config::default()), health.clone());
        let feed = Feed::cluster(&ApiServer::Url(url.into()), "node1").await.expect("a client for the fake server");
        let maps = MemoryMaps::default();
        let reconciler = Reconciler::adopt(&maps).unwrap();
        Agent { feed, sync, reconciler, maps, steps: Vec::new(), health }
    }

    /// Runs the sync until `done` holds (checked after each sync and every 20 ms), failing
    /// after `limit`.
    async fn run_until(&mut self, what: &str, limit: Duration, done: impl Fn(&Agent) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !done(self) {
            tokio::select! {
                due = self.feed.next(&mut self.sync) => {
                    if due {
                        let step = self.sync.step(&mut self.reconciler, &mut self.maps);
                        self.feed.after_sync(self.sync.needs_retry());
                        self.steps.push(step);
                    }
                }
                // A relist of unchanged objects leads to no sync: look again now and then.
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
                () = tokio::time::sleep_until(deadline) => {
                    panic!("{what}: not within {limit:?}; maps hold {:?}; problems {:?}", self.frontends(), self.sync.problems())
                }
            }
        }
    }

    /// Runs the sync for `period`, whatever happens.
    async fn run_for(&mut self, period: Duration) {
        let end = Instant::now() + period;
        self.run_until("a while", period + Duration::from_secs(1), move |_| Instant::now() >= end).await;
    }

    /// The frontends the maps hold, as `address:port`, with their backend count, sorted.
    fn frontends(&self) -> Vec<String> {
        let c = &self.maps.contents;
        let mut out: Vec<String> = c
            .services
            .iter()
            .map(|(k, v)| {
                let addr = lb_common::user::ip_from_be(k.addr_be);
                format!("{addr}:{} x{}", u16::from_be(k.port_be), v.count[0])
            })
            .collect();
        out.sort();
        out
    }
}

fn node(address: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "a"}},
        "spec": {"podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": address}]},
    }))
    .unwrap()
}

fn service(name: &str, ip: &str, node_port: Option<u16>, labels: serde_json::Value) -> Service {
    let mut port = json!({"name": "http", "port": 80, "protocol": "TCP"});
    if let Some(p) = node_port {
        port["nodePort"] = json!(p);
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"type": if node_port.is_some() { "NodePort" } else { "ClusterIP" }, "clusterIP": ip, "ports": [port]},
    }))
    .unwrap()
}

fn slice(service: &str, addresses: &[&str]) -> EndpointSlice {
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}, "nodeName": "node2"}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_source_programs_follows_relists_and_survives_an_outage() {
    let server = FakeApiServer::bind("127.0.0.1:0".parse().unwrap(), Config::default()).unwrap();
    let faults = server.faults();
    let client = kube_client(&server.url());
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let nodes: Api<Node> = Api::all(client.clone());
    let pp = PostParams::default();
    nodes.create(&pp, &node("192.168.0.1")).await.unwrap();
    services.create(&pp, &service("web", "10.96.0.10", Some(30080), json!({}))).await.unwrap();
    services.create(&pp, &service("db", "10.96.0.11", None, json!({}))).await.unwrap();
    // Another proxy's Service: kube-proxy's label selector leaves it out.
    let other = json!({"service.kubernetes.io/service-proxy-name": "someone-else"});
    services.create(&pp, &service("other", "10.96.0.12", None, other)).await.unwrap();
    slices.create(&pp, &slice("web", &["10.244.2.1", "10.244.2.2"])).await.unwrap();
    slices.create(&pp, &slice("db", &["10.244.2.3"])).await.unwrap();

    let mut agent = Agent::start(&server.url()).await;
    let first = ["10.96.0.10:80 x2", "10.96.0.11:80 x1", "192.168.0.1:30080 x2"];
    agent.run_until("the first list is programmed", Duration::from_secs(10), |a| a.frontends() == first).await;
    assert!(agent.sync.problems().is_empty(), "{:?}", agent.sync.problems());

    // An endpoint change: written alone, with the time it took.
    let (writes, deletes) = (agent.maps.writes, agent.maps.deletes);
    let steps = agent.steps.len();
    let patch = json!({"endpoints": [{"addresses": ["10.244.2.1"], "nodeName": "node2"},
                                     {"addresses": ["10.244.2.2"], "nodeName": "node2"},
                                     {"addresses": ["10.244.2.4"], "nodeName": "node2"}]});
    slices.patch("web-1", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let changed = ["10.96.0.10:80 x3", "10.96.0.11:80 x1", "192.168.0.1:30080 x3"];
    agent.run_until("the endpoint change is applied", Duration::from_secs(10), |a| a.frontends() == changed).await;
    let latencies: Vec<Duration> = agent.steps[steps..].iter().flat_map(|s| s.latencies.iter().copied()).collect();
    assert_eq!(latencies.len(), 1, "one object changed");
    assert!(latencies[0] < Duration::from_secs(1), "{latencies:?}");
    // One new backend, the slots of both frontends under the other generation, their entries;
    // the old generation's slots removed.
    assert_eq!((agent.maps.writes - writes, agent.maps.deletes - deletes), (1 + 3 + 3 + 2, 4));

    // A 410 on every watch: the watchers list again; nothing is written or deleted.
    agent.run_until("every watch is open", Duration::from_secs(10), |_| faults.open_watches() == 3).await;
    let (contents, writes, deletes) = (agent.maps.contents.clone(), agent.maps.writes, agent.maps.deletes);
    let lists = faults.lists_served();
    faults.compact();
    assert_eq!(faults.expire_watches(), 3);
    agent.run_until("the relists", Duration::from_secs(20), |_| faults.lists_served() >= lists + 3).await;
    agent.run_for(Duration::from_millis(300)).await;
    assert_eq!((agent.maps.writes, agent.maps.deletes), (writes, deletes), "a relist rewrites nothing");
    assert_eq!(agent.maps.contents, contents);

    // An outage: the maps keep their state; changes made after it are applied.
    faults.outage(Duration::from_secs(3)).await;
    agent.run_for(Duration::from_secs(2)).await;
    assert_eq!(agent.maps.contents, contents, "nothing changes while the API server is away");
    assert_eq!(agent.maps.deletes, deletes);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = loop {
        match services.create(&pp, &service("late", "10.96.0.13", None, json!({}))).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(after.metadata.name.as_deref(), Some("late"));
    let moved = json!({"status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}});
    nodes.patch_status("node1", &PatchParams::default(), &Patch::Merge(&moved)).await.unwrap();
    let end = ["10.96.0.10:80 x3", "10.96.0.11:80 x1", "10.96.0.13:80 x0", "192.168.0.2:30080 x3"];
    agent.run_until("the changes after the outage", Duration::from_secs(30), |a| a.frontends() == end).await;
    let node_port = |c: &lb_user::datapath::maps::Contents, addr: Ipv4Addr| {
        c.services.keys().any(|k| lb_common::user::ip_from_be(k.addr_be) == addr)
    };
    assert!(!node_port(&agent.maps.contents, "192.168.0.1".parse().unwrap()), "the old node address is gone");
}

/// `GET path` from a health server at `address`: its status and body.
async fn get(address: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1;
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deleted_gracefully_fails_healthz_and_keeps_serving() {
    let server = FakeApiServer::bind("127.0.0.1:0".parse().unwrap(), Config::default()).unwrap();
    let client = kube_client(&server.url());
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let nodes: Api<Node> = Api::all(client.clone());
    let pp = PostParams::default();
    // A finalizer holds the Node once deleted, as a cloud controller's or a drain tool's would.
    let mut held = node("192.168.0.1");
    held.metadata.finalizers = Some(vec!["example.com/drain".into()]);
    nodes.create(&pp, &held).await.unwrap();
    services.create(&pp, &service("web", "10.96.0.10", Some(30080), json!({}))).await.unwrap();
    slices.create(&pp, &slice("web", &["10.244.2.1"])).await.unwrap();

    let mut agent = Agent::start(&server.url()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let _server = lb_user::telemetry::health::serve(listener, agent.health.clone());
    let serving = ["10.96.0.10:80 x1", "192.168.0.1:30080 x1"];
    agent.run_until("the first list is programmed", Duration::from_secs(10), |a| a.frontends() == serving).await;
    let (status, body) = get(address, "/healthz").await;
    assert_eq!((status, &body["nodeEligible"]), (200, &json!(true)), "{body}");

    // Deleted: marked with a deletionTimestamp while its finalizer holds it. /healthz fails
    // (load balancers drain the node); the datapath serves on.
    nodes.delete("node1", &DeleteParams::default()).await.unwrap();
    let marked = nodes.get("node1").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some(), "the fake API server marks it");
    let contents = agent.maps.contents.clone();
    let body = healthz_becomes(&mut agent, address, 503).await;
    assert_eq!(body["nodeEligible"], json!(false), "{body}");
    assert_eq!(get(address, "/livez").await.0, 200, "the agent itself is fine");
    agent.run_for(Duration::from_millis(300)).await;
    assert_eq!(agent.maps.contents, contents, "a node being deleted keeps serving");

    // The finalizer removed: the Node is gone, judged by its last state (as kube-proxy).
    nodes
        .patch("node1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}})))
        .await
        .unwrap();
    agent.run_for(Duration::from_millis(500)).await;
    assert!(nodes.get_opt("node1").await.unwrap().is_none(), "gone once its last finalizer is");
    let (status, body) = get(address, "/healthz").await;
    assert_eq!((status, &body["nodeEligible"]), (503, &json!(false)), "{body}");

    // A Node of that name again (the node rejoined): eligible.
    nodes.create(&pp, &node("192.168.0.1")).await.unwrap();
    let body = healthz_becomes(&mut agent, address, 200).await;
    assert_eq!(body["nodeEligible"], json!(true), "{body}");
}

/// Runs the sync until /healthz answers `status` (within 10 s); returns its body.
async fn healthz_becomes(agent: &mut Agent, address: std::net::SocketAddr, status: u16) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        agent.run_for(Duration::from_millis(100)).await;
        let (now, body) = get(address, "/healthz").await;
        if now == status {
            return body;
        }
        assert!(Instant::now() < deadline, "/healthz stayed {now}, not {status}: {body}");
    }
}
