//! Needs root and BPF. Connection tracking and forwarding end to end (issue 7): the node's
//! netfilter forward hook sees translated traffic, a VXLAN overlay, path MTU discovery
//! through the translation, and a SYN flood that does not break established connections.
//! Real TCP and UDP through a lab of network namespaces, the agent on every node.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_common::counters;
use lb_tests::{
    cluster::{Cluster, Manifests, BACKEND_PORT},
    lab::Spec,
    traffic::{self, bulk_get, bulk_put, parse_answer, tcp_ask, udp_ask, Bulk},
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 1);
const BULK_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 2);
const BULK_PORT: u16 = 9000;

/// A Service (`spec` adds to `clusterIP`) with the given (name, protocol, port, target,
/// nodePort) ports and an EndpointSlice of (address, node) endpoints.
fn service(
    name: &str,
    spec: &str,
    ports: &[(&str, &str, u16, u16, Option<u16>)],
    endpoints: &[(Ipv4Addr, &str)],
) -> String {
    let svc_ports: Vec<String> = ports
        .iter()
        .map(|(n, p, port, target, np)| {
            let np = np.map(|np| format!(", nodePort: {np}")).unwrap_or_default();
            format!("{{name: {n}, protocol: {p}, port: {port}, targetPort: {target}{np}}}")
        })
        .collect();
    let slice_ports: Vec<String> =
        ports.iter().map(|(n, p, _, target, _)| format!("{{name: {n}, protocol: {p}, port: {target}}}")).collect();
    let eps: Vec<String> =
        endpoints.iter().map(|(ip, node)| format!("{{addresses: [\"{ip}\"], nodeName: {node}}}")).collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{{spec}, ports: [{}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{}]\nendpoints: [{}]\n",
        svc_ports.join(", "),
        slice_ports.join(", "),
        eps.join(", ")
    )
}

fn manifests() -> String {
    let echo = [("tcp", "TCP", 80, BACKEND_PORT, Some(30080)), ("udp", "UDP", 80, BACKEND_PORT, Some(30080))];
    let bulk = [("bulk", "TCP", BULK_PORT, BULK_PORT, Some(30090))];
    [
        service(
            "echo",
            &format!("type: NodePort, clusterIP: {CLUSTER_IP}"),
            &echo,
            &[(POD_B, "node2"), (POD_C, "node2")],
        ),
        service("bulk", &format!("type: NodePort, clusterIP: {BULK_IP}"), &bulk, &[(POD_B, "node2")]),
    ]
    .concat()
}

fn start(spec: Spec, agent_args: &[&str]) -> Cluster {
    lb_tests::require_root();
    Cluster::start("lbc", &spec, Manifests::inline(&manifests()).unwrap(), agent_args).unwrap()
}

fn two_nodes(clients: usize) -> Spec {
    Spec { pods_per_node: vec![1, 2], clients, ..Spec::default() }
}

/// Drops, in `node`'s netfilter forward hook, what comes from these sources: the way a
/// netfilter-based CNI enforces NetworkPolicy.
fn forward_hook_drops(c: &Cluster, node: usize, sources: &[Ipv4Addr]) {
    let ns = &c.lab.nodes[node].ns;
    ns.exec("nft", &["add", "table", "inet", "lbtest"]).unwrap();
    ns.exec(
        "nft",
        &["add", "chain", "inet", "lbtest", "netpol", "{ type filter hook forward priority 0; policy accept; }"],
    )
    .unwrap();
    let list: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
    let set = format!("{{ {} }}", list.join(", "));
    ns.exec("nft", &["add", "rule", "inet", "lbtest", "netpol", "ip", "saddr", &set, "drop"]).unwrap();
}

#[test]
fn the_forward_hook_sees_translated_traffic_and_can_drop_it() {
    let c = start(two_nodes(2), &[]);
    let (client1, client2) = (&c.lab.clients[0], &c.lab.clients[1]);
    let pod_a = &c.lab.nodes[0].pods[0].ns.name;
    forward_hook_drops(&c, 0, &[client1.addr, POD_A]);
    let front = c.node_port(0, 30080);
    assert!(tcp_ask(&client1.ns.name, front).is_err(), "NodePort: the rule on node1 blocks client1");
    assert!(udp_ask(&client1.ns.name, "0.0.0.0:0".parse().unwrap(), front).is_err());
    assert!(tcp_ask(&client2.ns.name, front).is_ok(), "client2 is not blocked");
    let cip = SocketAddrV4::new(CLUSTER_IP, 80);
    assert!(tcp_ask(pod_a, cip).is_err(), "ClusterIP: the rule blocks pod-a's connections to the other node");
    assert!(udp_ask(pod_a, "0.0.0.0:0".parse().unwrap(), cip).is_err());
}

#[test]
fn fast_forwarding_bypasses_the_forward_hook_as_its_help_says() {
    let c = start(Spec { complete_checksums: true, ..two_nodes(1) }, &["--forwarding", "fast"]);
    let client1 = &c.lab.clients[0];
    forward_hook_drops(&c, 0, &[client1.addr]);
    let (backend, _) = parse_answer(&tcp_ask(&client1.ns.name, c.node_port(0, 30080)).unwrap()).unwrap();
    assert!(backend == "pod-b" || backend == "pod-c", "the rule never saw the packets");
}

#[test]
fn replies_arriving_on_a_vxlan_overlay_are_reverse_translated() {
    let spec = Spec { overlay: true, ..two_nodes(1) };
    let c = start(spec, &["--pod-devices", "vxlan*"]);
    let pod_a = &c.lab.nodes[0].pods[0].ns.name;
    let cip = SocketAddrV4::new(CLUSTER_IP, 80);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..16 {
        let (backend, peer) = parse_answer(&tcp_ask(pod_a, cip).unwrap()).unwrap();
        assert_eq!(*peer.ip(), POD_A, "the pod's address is kept across the overlay");
        seen.insert(backend);
        let (_, peer) = parse_answer(&udp_ask(pod_a, "0.0.0.0:0".parse().unwrap(), cip).unwrap()).unwrap();
        assert_eq!(*peer.ip(), POD_A);
    }
    assert_eq!(seen.len(), 2, "both backends on node2 reached: {seen:?}");
    let client = &c.lab.clients[0].ns.name;
    let (backend, peer) = parse_answer(&tcp_ask(client, c.node_port(0, 30080)).unwrap()).unwrap();
    assert!(backend == "pod-b" || backend == "pod-c");
    assert_eq!(*peer.ip(), c.lab.nodes[0].addr, "NodePort to the other node: SNAT to node1");
    assert!(c.agents[0].counter(counters::REPLY) >= 32, "node1 reverse-translated the overlay's replies");
}

#[test]
fn path_mtu_discovery_works_through_the_translation_both_ways() {
    const MB: usize = 1 << 20;
    // The overlay's 1450-byte MTU sits between pod-a's 1500 and pod-b's 1500: pod-a's full
    // segments to the ClusterIP must be answered "fragmentation needed" by node1, quoting
    // the packet as pod-a sent it (to the ClusterIP), or pod-a never learns.
    let c = start(Spec { overlay: true, ..two_nodes(1) }, &["--pod-devices", "vxlan*"]);
    let pod_b = &c.lab.nodes[1].pods[0];
    let _bulk = Bulk::start(&pod_b.ns.name, pod_b.addr, BULK_PORT).unwrap();
    let pod_a = &c.lab.nodes[0].pods[0].ns.name;
    assert_eq!(bulk_put(pod_a, SocketAddrV4::new(BULK_IP, BULK_PORT), MB).unwrap(), MB, "1 MB up, DF set");
    assert!(c.agents[0].counter(counters::FRAG_NEEDED_ANSWERED) > 0, "node1 answered for the overlay's MTU");
    // The other way: the backend's replies to a NodePort client leave node1 on a path
    // with a smaller MTU (a route locked at 1400): node1 answers the backend, quoting the
    // reply as the backend sent it (to node1's NAT port).
    let client = &c.lab.clients[0];
    let route = ["route", "replace", &format!("{}/32", client.addr), "dev", "eth0", "mtu", "lock", "1400"];
    c.lab.nodes[0].ns.ip(&route).unwrap();
    let before = c.agents[0].counter(counters::FRAG_NEEDED_ANSWERED);
    assert_eq!(bulk_get(&client.ns.name, c.node_port(0, 30090), MB).unwrap(), MB, "1 MB down through the NodePort");
    assert!(c.agents[0].counter(counters::FRAG_NEEDED_ANSWERED) > before, "node1 answered the backend");
}

#[test]
fn a_syn_flood_at_twice_the_capacity_leaves_established_connections_alone() {
    // 1024 flows of capacity (2048 entries), new flows admitted up to 90% of it.
    let c = start(two_nodes(2), &["--conntrack-flows", "1024"]);
    let pod_b = &c.lab.nodes[1].pods[0];
    let _bulk = Bulk::start(&pod_b.ns.name, pod_b.addr, BULK_PORT).unwrap();
    let (flooder, client) = (&c.lab.clients[0], &c.lab.clients[1]);
    let front = c.node_port(0, 30090);
    let mut held: Vec<_> = (0..20).map(|_| traffic::echo_connection(&client.ns.name, front).unwrap()).collect();
    for s in &mut held {
        traffic::echo_round_trip(s, b"before").unwrap();
    }
    let (ns, addr, target) = (flooder.ns.name.clone(), flooder.addr, c.node_port(0, 30080));
    let flood = std::thread::spawn(move || traffic::syn_flood(&ns, addr, target, 20000, 2 * 1024, 2000));
    // While the flood runs (about a second), and after it: every held connection works.
    for round in 0..6 {
        for s in &mut held {
            traffic::echo_round_trip(s, format!("round {round}").as_bytes()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    flood.join().unwrap().unwrap();
    for s in &mut held {
        traffic::echo_round_trip(s, b"after").unwrap();
    }
    let agent = &c.agents[0];
    assert!(agent.counter(counters::DROP_CT_FULL) > 0, "the flood met admission control");
    assert!(agent.counter(counters::NEW_FLOW) < 1024, "it never got more than the table's room");
}
