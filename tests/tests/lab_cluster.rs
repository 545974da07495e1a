//! Needs root and BPF. A cluster in a box: two nodes (pod-a on node1; pod-b, pod-c on
//! node2) each run the agent in cluster mode against one fake API server inside the lab.
//! Every change goes through the API with kube-rs, and after each one real TCP and UDP
//! traffic on every node (ClusterIP from a pod there, NodePort from a client) must reach
//! exactly the backends the API says.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use lb_tests::{
    api_cluster::{
        answers, endpoint_slice, maps_snapshot, node_object, service, wait_for_backends, zone, ApiCluster, Endpoint,
    },
    lab::{node_addr, pod_addr, Spec},
};
use serde_json::json;

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 5, 1);
const NODE_PORT: u16 = 30500;
/// How long a change may take to reach every node's datapath here (a busy machine);
/// the product's target is milliseconds, measured by the control-plane benchmark.
const CONVERGE: Duration = Duration::from_secs(15);

fn spec() -> Spec {
    Spec { pods_per_node: vec![1, 2], clients: 1, ..Spec::default() }
}

fn pod_a() -> Endpoint<'static> {
    Endpoint { addr: pod_addr(0, 0), node: "node1", zone_hint: None }
}
fn pod_b() -> Endpoint<'static> {
    Endpoint { addr: pod_addr(1, 0), node: "node2", zone_hint: None }
}
fn pod_c() -> Endpoint<'static> {
    Endpoint { addr: pod_addr(1, 1), node: "node2", zone_hint: None }
}

/// Every node: ClusterIP from its first pod, and NodePort on its address from the client.
fn check_every_node(c: &ApiCluster, port: u16, expected: &[&str]) {
    let client = &c.traffic_clients()[0].ns.name;
    for (i, node) in c.lab.nodes.iter().enumerate() {
        let from_pod = &node.pods[0].ns.name;
        wait_for_backends(from_pod, SocketAddrV4::new(CLUSTER_IP, port), expected, CONVERGE)
            .unwrap_or_else(|e| panic!("ClusterIP on node{}: {e}", i + 1));
        wait_for_backends(client, SocketAddrV4::new(node_addr(i), NODE_PORT), expected, CONVERGE)
            .unwrap_or_else(|e| panic!("NodePort on node{}: {e}", i + 1));
    }
}

fn set_slice(c: &ApiCluster, endpoints: &[Endpoint]) {
    let slice = endpoint_slice("web", endpoints);
    c.block_on(c.slices().patch("web-1", &PatchParams::default(), &Patch::Merge(&slice))).unwrap();
}

#[test]
fn services_endpoints_and_nodes_follow_the_api_on_every_node() {
    lb_tests::require_root();
    let c = ApiCluster::start("lbt", &spec(), &[]).unwrap();
    let pp = PostParams::default();

    // Create.
    c.block_on(c.services().create(&pp, &service("web", CLUSTER_IP, 80, NODE_PORT))).unwrap();
    c.block_on(c.slices().create(&pp, &endpoint_slice("web", &[pod_a()]))).unwrap();
    check_every_node(&c, 80, &["pod-a"]);

    // Scale up, then update the Service's port, then scale down.
    set_slice(&c, &[pod_a(), pod_b(), pod_c()]);
    check_every_node(&c, 80, &["pod-a", "pod-b", "pod-c"]);
    let ports = json!({"spec": {"ports": [
        {"name": "tcp", "protocol": "TCP", "port": 8081, "targetPort": 8080, "nodePort": NODE_PORT},
        {"name": "udp", "protocol": "UDP", "port": 8081, "targetPort": 8080, "nodePort": NODE_PORT},
    ]}});
    c.block_on(c.services().patch("web", &PatchParams::default(), &Patch::Merge(&ports))).unwrap();
    check_every_node(&c, 8081, &["pod-a", "pod-b", "pod-c"]);
    let old_port = SocketAddrV4::new(CLUSTER_IP, 80);
    wait_for_backends(&c.lab.nodes[0].pods[0].ns.name, old_port, &[], CONVERGE).expect("the old port is gone");
    set_slice(&c, &[pod_c()]);
    check_every_node(&c, 8081, &["pod-c"]);

    // A new Node address opens the NodePort there.
    let new_addr = Ipv4Addr::new(192, 168, 50, 30);
    c.lab.nodes[1].ns.ip(&["addr", "add", &format!("{new_addr}/24"), "dev", "eth0"]).unwrap();
    let client = c.traffic_clients()[0].ns.name.clone();
    let at_new = SocketAddrV4::new(new_addr, NODE_PORT);
    let before = answers(&client, at_new, 1);
    assert!(
        before.keys().all(|k| k.contains(" error ")),
        "the NodePort answered on an address the Node does not have: {before:?}"
    );
    let node2 = node_object("node2", 1, &[node_addr(1), new_addr], &zone(1));
    c.block_on(c.nodes().patch_status(
        "node2",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": node2.status})),
    ))
    .unwrap();
    wait_for_backends(&client, at_new, &["pod-c"], CONVERGE).expect("the NodePort on the Node's new address");

    // Zones: with every endpoint hinted, each node uses the endpoints of its zone, and a
    // Node moving to another zone takes that zone's.
    let hinted = [
        Endpoint { zone_hint: Some("zone-a"), ..pod_a() },
        Endpoint { zone_hint: Some("zone-b"), ..pod_b() },
        Endpoint { zone_hint: Some("zone-b"), ..pod_c() },
    ];
    set_slice(&c, &hinted);
    let node1_pod = c.lab.nodes[0].pods[0].ns.name.clone();
    let node2_pod = c.lab.nodes[1].pods[0].ns.name.clone();
    let cluster_ip = SocketAddrV4::new(CLUSTER_IP, 8081);
    wait_for_backends(&node1_pod, cluster_ip, &["pod-a"], CONVERGE).expect("node1 (zone-a) keeps to zone-a");
    wait_for_backends(&node2_pod, cluster_ip, &["pod-b", "pod-c"], CONVERGE).expect("node2 (zone-b) keeps to zone-b");
    let relabel = json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "zone-b"}}});
    c.block_on(c.nodes().patch("node1", &PatchParams::default(), &Patch::Merge(&relabel))).unwrap();
    wait_for_backends(&node1_pod, cluster_ip, &["pod-b", "pod-c"], CONVERGE).expect("node1 moved to zone-b");
    wait_for_backends(&client, SocketAddrV4::new(node_addr(0), NODE_PORT), &["pod-b", "pod-c"], CONVERGE)
        .expect("node1's NodePort in zone-b");

    // The cluster autoscaler's taint on node1: its /healthz fails (load balancers drain it),
    // node2's does not, and traffic still flows; without the taint node1 is healthy again.
    let health_becomes = |node: usize, code: u16| {
        let deadline = Instant::now() + CONVERGE;
        while c.agents[node].health("/healthz") != Some(code) {
            assert!(Instant::now() < deadline, "node{}'s /healthz did not become {code}", node + 1);
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(c.agents[0].health("/healthz"), Some(200));
    let taint = |taints: serde_json::Value| Patch::Merge(json!({"spec": {"taints": taints}}));
    let to_be_deleted =
        json!([{"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]);
    c.block_on(c.nodes().patch("node1", &PatchParams::default(), &taint(to_be_deleted))).unwrap();
    health_becomes(0, 503);
    assert_eq!(c.agents[1].health("/healthz"), Some(200));
    wait_for_backends(&client, SocketAddrV4::new(node_addr(0), NODE_PORT), &["pod-b", "pod-c"], CONVERGE)
        .expect("a node being drained still serves");
    c.block_on(c.nodes().patch("node1", &PatchParams::default(), &taint(serde_json::Value::Null))).unwrap();
    health_becomes(0, 200);

    // Delete.
    c.block_on(c.slices().delete("web-1", &DeleteParams::default())).unwrap();
    c.block_on(c.services().delete("web", &DeleteParams::default())).unwrap();
    check_every_node(&c, 8081, &[]);
}

/// Traffic from the client to every node's NodePort in a loop until stopped; what did
/// not come from `allowed` backends (failures included) is recorded.
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    bad: Arc<Mutex<Vec<String>>>,
    rounds: Arc<Mutex<usize>>,
}

impl Load {
    fn start(c: &ApiCluster, allowed: &[&str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let rounds = Arc::new(Mutex::new(0));
        let client = c.traffic_clients()[0].ns.name.clone();
        let targets: Vec<SocketAddrV4> =
            (0..c.lab.nodes.len()).map(|i| SocketAddrV4::new(node_addr(i), NODE_PORT)).collect();
        let allowed: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
        let (stop_seen, bad_seen, rounds_seen) = (stop.clone(), bad.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            while !stop_seen.load(Ordering::Relaxed) {
                for dst in &targets {
                    for (answer, n) in answers(&client, *dst, 1) {
                        let backend = answer.split_once(' ').map_or("", |(_, b)| b);
                        if !allowed.iter().any(|a| a == backend) {
                            bad_seen.lock().unwrap().push(format!("{dst}: {answer} x{n}"));
                        }
                    }
                }
                *rounds_seen.lock().unwrap() += 1;
            }
        });
        Load { stop, thread: Some(thread), bad, rounds }
    }

    /// Stops; the bad answers and the rounds made.
    fn finish(mut self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let bad = self.bad.lock().unwrap().clone();
        let rounds = *self.rounds.lock().unwrap();
        (bad, rounds)
    }
}

#[test]
fn traffic_survives_an_api_outage_and_a_gone_watch_deletes_nothing() {
    lb_tests::require_root();
    let c = ApiCluster::start("lbt", &spec(), &[]).unwrap();
    let faults = c.faults();
    let pp = PostParams::default();
    c.block_on(c.services().create(&pp, &service("web", CLUSTER_IP, 80, NODE_PORT))).unwrap();
    c.block_on(c.slices().create(&pp, &endpoint_slice("web", &[pod_a(), pod_b()]))).unwrap();
    check_every_node(&c, 80, &["pod-a", "pod-b"]);

    // The API server is down for 10 s: traffic keeps flowing on the last known state.
    let outage = Duration::from_secs(10);
    let load = Load::start(&c, &["pod-a", "pod-b"]);
    let began = Instant::now();
    c.block_on(faults.outage(outage));
    while began.elapsed() < outage {
        std::thread::sleep(Duration::from_millis(200));
    }
    // /healthz says so honestly, yet fails no node: every node's datapath still serves.
    let (status, body) = c.agents[0].health_answer("/healthz").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"sourceLastError\""), "the watches' errors are reported: {body}");
    let (bad, rounds) = load.finish();
    assert!(bad.is_empty(), "traffic failed during the outage: {bad:?}");
    assert!(rounds >= 10, "only {rounds} rounds of traffic during the outage");

    // Changes made once it is back are applied (after the agents' watch backoff).
    set_slice(&c, &[pod_c()]);
    for (i, node) in c.lab.nodes.iter().enumerate() {
        wait_for_backends(
            &node.pods[0].ns.name,
            SocketAddrV4::new(CLUSTER_IP, 80),
            &["pod-c"],
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("node{} after the outage: {e}", i + 1));
    }
    check_every_node(&c, 80, &["pod-c"]);

    // Every watch is answered 410 Gone: the agents list again and converge on the same
    // state, deleting nothing meanwhile (maps unchanged, no failed request).
    let watches = faults.open_watches();
    assert!(watches >= c.agents.len(), "{watches} watches open for {} agents", c.agents.len());
    let before: Vec<Vec<String>> = c.agents.iter().map(|a| maps_snapshot(&a.pin_dir)).collect();
    let lists = faults.lists_served();
    let load = Load::start(&c, &["pod-c"]);
    assert_eq!(faults.expire_watches(), watches);
    let deadline = Instant::now() + Duration::from_secs(60);
    while faults.lists_served() < lists + watches as u64 || faults.open_watches() < watches {
        assert!(Instant::now() < deadline, "the agents did not list and watch again after the 410s");
        for (agent, before) in c.agents.iter().zip(&before) {
            assert_eq!(&maps_snapshot(&agent.pin_dir), before, "the maps changed while the agent relisted");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (bad, rounds) = load.finish();
    assert!(bad.is_empty(), "traffic failed while the agents relisted: {bad:?}");
    assert!(rounds > 0);
    for (agent, before) in c.agents.iter().zip(&before) {
        assert_eq!(&maps_snapshot(&agent.pin_dir), before, "the maps changed across the relist");
    }
    set_slice(&c, &[pod_a()]);
    check_every_node(&c, 80, &["pod-a"]);
}
