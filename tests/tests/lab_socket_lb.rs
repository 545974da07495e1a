//! Needs root and BPF. Socket-level load balancing (issue 12) end to end: the agent on each
//! node attaches the socket hooks to a cgroup the test creates for that node (never the
//! machine's root cgroup); clients are processes of their own (lab-client) that move into
//! that cgroup and into a node's or a pod's namespace before opening any socket. Two nodes:
//! pod-a on node1; pod-b and pod-c on node2. Backends answer with their name and the peer
//! address they saw, so each test checks the backend chosen, what the application was
//! shown (getpeername, recvfrom) and what the datapath counted.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_common::{counters, ServiceKey, IPPROTO_TCP};
use lb_tests::{
    backend_live, backend_stats,
    cgroup::Cgroup,
    client::{self, Held, Outcome},
    cluster::{Cluster, Manifests, BACKEND_PORT},
    frontend_stats,
    lab::Spec,
    traffic::{parse_answer, tcp_ask},
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
/// Round robin over all three pods: every run reaches both nodes.
const WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 5, 1), 80);
const WEB_NODE_PORT: u16 = 30180;
/// No endpoints anywhere.
const NOTHING: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 5, 2), 80);
/// internalTrafficPolicy Local, its only endpoint on node2.
const ITP_LOCAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 5, 3), 80);
/// Least connections over pod-b and pod-c.
const FEWEST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 5, 4), 80);
/// Its endpoints are what a test says (`moving`).
const MOVING: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 5, 5), 80);
/// sessionAffinity ClientIP over all three pods.
const STICKY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 5, 6), 80);
/// A NodePort Service with externalTrafficPolicy Local, its only endpoint on node2.
const ETP_LOCAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 5, 7), 80);
/// A NodePort Service's nodePort: WEB_NODE_PORT for web, the next ones by ClusterIP.
fn node_port(frontend: SocketAddrV4) -> u16 {
    WEB_NODE_PORT + u16::from(frontend.ip().octets()[3]) - 1
}
/// What a client process may take before it is killed.
const LIMIT: Duration = Duration::from_secs(30);

/// A Service with TCP and UDP on `frontend`'s port (-> 8080) and a slice of `backends`.
fn service(name: &str, frontend: SocketAddrV4, extra: &str, annotations: &str, backends: &[Ipv4Addr]) -> String {
    let ports = |np: &str| {
        format!(
            "[{{name: tcp, protocol: TCP, port: {p}, targetPort: {BACKEND_PORT}{np}}}, {{name: udp, protocol: UDP, port: {p}, targetPort: {BACKEND_PORT}{np}}}]",
            p = frontend.port()
        )
    };
    let node_port =
        if extra.contains("NodePort") { format!(", nodePort: {}", node_port(frontend)) } else { String::new() };
    let endpoints: Vec<String> = backends
        .iter()
        .map(|ip| format!("{{addresses: [\"{ip}\"], nodeName: node{}}}", if *ip == POD_A { 1 } else { 2 }))
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, annotations: {{{annotations}}}}}\nspec: {{clusterIP: {}{extra}, ports: {}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: tcp, protocol: TCP, port: {BACKEND_PORT}}}, {{name: udp, protocol: UDP, port: {BACKEND_PORT}}}]\nendpoints: [{}]\n",
        frontend.ip(),
        ports(&node_port),
        endpoints.join(", ")
    )
}

fn manifests(moving: &[Ipv4Addr]) -> String {
    let rr = "lb.kube-xdp.io/algorithm: round-robin";
    [
        service("web", WEB, ", type: NodePort", rr, &[POD_A, POD_B, POD_C]),
        service("nothing", NOTHING, "", "", &[]),
        service("itp-local", ITP_LOCAL, ", internalTrafficPolicy: Local", "", &[POD_B]),
        service("fewest", FEWEST, "", "lb.kube-xdp.io/algorithm: least-conn", &[POD_B, POD_C]),
        service("moving", MOVING, "", "", moving),
        service("sticky", STICKY, ", sessionAffinity: ClientIP", "", &[POD_A, POD_B, POD_C]),
        service("etp-local", ETP_LOCAL, ", type: NodePort, externalTrafficPolicy: Local", "", &[POD_B]),
    ]
    .concat()
}

/// The cluster with the socket hooks in `mode`, each node's attached to a cgroup of its
/// own. Drops the agents (unloading their pins) before the cgroups.
struct SocketLab {
    cluster: Cluster,
    cgroups: Vec<Cgroup>,
}

impl SocketLab {
    fn start(mode: &str) -> SocketLab {
        lb_tests::require_root();
        let cgroups: Vec<Cgroup> =
            (1..=2).map(|i| Cgroup::new("lbt", &format!("node{i}")).expect("a cgroup v2 directory")).collect();
        let paths: Vec<String> = cgroups.iter().map(|c| c.path.display().to_string()).collect();
        let spec = Spec { pods_per_node: vec![1, 2], clients: 0, ..Spec::default() };
        let cluster = Cluster::start_each("lbt", &spec, Manifests::inline(&manifests(&[POD_B])).unwrap(), |i| {
            ["--socket-lb", mode, "--cgroup-root", &paths[i]].map(String::from).to_vec()
        })
        .unwrap();
        for agent in &cluster.agents {
            assert!(!agent.log_text().contains("WARN"), "the test manifests are valid:\n{}", agent.log_text());
            assert!(agent.log_text().contains("socket hooks attached"), "{}", agent.log_text());
        }
        SocketLab { cluster, cgroups }
    }

    /// Namespace of node `i` (0-based).
    fn node(&self, i: usize) -> &str {
        &self.cluster.lab.nodes[i].ns.name
    }

    /// Namespace of pod-a, on node1.
    fn pod_a(&self) -> &str {
        &self.cluster.lab.nodes[0].pods[0].ns.name
    }

    /// lab-client in `ns` inside node `i`'s cgroup.
    fn run(&self, ns: &str, i: usize, args: &[&str]) -> Vec<Outcome> {
        client::run(ns, Some(&self.cgroups[i].path), args, LIMIT).unwrap()
    }

    /// A datapath counter of node `i`.
    fn counter(&self, i: usize, index: u32) -> u64 {
        self.cluster.agents[i].counter(index)
    }

    /// The per-packet counters of both nodes: what tc and XDP translated.
    fn packet_path(&self) -> [u64; 6] {
        let c = |i, index| self.counter(i, index);
        [
            c(0, counters::NEW_FLOW),
            c(0, counters::ESTABLISHED),
            c(0, counters::REPLY),
            c(1, counters::NEW_FLOW),
            c(1, counters::ESTABLISHED),
            c(1, counters::REPLY),
        ]
    }
}

/// (backend name, the address it saw) of a successful request.
fn answered(o: &Outcome) -> (String, SocketAddrV4) {
    parse_answer(o.answer()).unwrap_or_else(|| panic!("unexpected answer {o:?}"))
}

fn peer(o: &Outcome) -> Option<SocketAddrV4> {
    match o {
        Outcome::Ok { peer, .. } => *peer,
        Outcome::Err { .. } => panic!("request failed: {o:?}"),
    }
}

fn from(o: &Outcome) -> Option<SocketAddrV4> {
    match o {
        Outcome::Ok { from, .. } => *from,
        Outcome::Err { .. } => panic!("request failed: {o:?}"),
    }
}

/// A failure with `errno`, at once (no packet waited for).
fn failed_at_once(o: &Outcome, errno: i32, what: &str) {
    match o {
        Outcome::Err { errno: e, ms } => {
            assert_eq!(*e, errno, "{what}: {}", std::io::Error::from_raw_os_error(*e));
            assert!(*ms < 100, "{what}: failed after {ms} ms, not at once");
        }
        Outcome::Ok { .. } => panic!("{what}: succeeded: {o:?}"),
    }
}

/// Our programs attached to `cgroup` (bpftool's lines), once they number `expected`, or
/// what there is after 5 s: a link whose last pin goes is released by the kernel a moment
/// later, not at once.
fn hooks_settling_at(cgroup: &Cgroup, expected: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let shown = lb_tests::lab::run("bpftool", &["cgroup", "show", &cgroup.path.display().to_string()]).unwrap();
        let ours: Vec<String> = shown.lines().filter(|l| l.contains("lb_sock")).map(String::from).collect();
        if ours.len() == expected || Instant::now() > deadline {
            return ours;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tcp_key(a: SocketAddrV4) -> ServiceKey {
    ServiceKey::new(*a.ip(), a.port(), IPPROTO_TCP)
}

fn endpoint(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, BACKEND_PORT)
}

#[test]
fn node_sockets_reach_a_cluster_ip_on_both_nodes_and_are_shown_the_service_address() {
    let lab = SocketLab::start("host-only");
    let node1 = &lab.cluster.lab.nodes[0];
    let pin = &lab.cluster.agents[0].pin_dir;
    let packets_before = lab.packet_path();
    let web_before = frontend_stats(pin, tcp_key(WEB));
    let new_flows_before: u64 = [POD_A, POD_B, POD_C].map(|p| backend_stats(pin, endpoint(p)).new_flows).iter().sum();

    let tcp = lab.run(lab.node(0), 0, &["tcp", &WEB.to_string(), "6"]);
    let mut seen = BTreeSet::new();
    for o in &tcp {
        assert_eq!(peer(o), Some(WEB), "getpeername shows the ClusterIP, not the backend");
        let (backend, saw) = answered(o);
        if backend != "pod-a" {
            assert_eq!(*saw.ip(), node1.addr, "a remote backend sees the node's own address (no SNAT needed)");
        }
        seen.insert(backend);
    }
    assert_eq!(seen, BTreeSet::from(["pod-a", "pod-b", "pod-c"].map(String::from)), "round robin over both nodes");

    let udp = lab.run(lab.node(0), 0, &["udp", &WEB.to_string(), "3"]);
    let mut seen = BTreeSet::new();
    for o in &udp {
        assert_eq!((peer(o), from(o)), (Some(WEB), Some(WEB)), "connected UDP: getpeername and recvfrom");
        seen.insert(answered(o).0);
    }
    assert_eq!(seen.len(), 3, "each connected socket took the next backend: {seen:?}");

    // Unconnected sockets: each keeps one backend for all its datagrams, and the answers
    // come from the ClusterIP.
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        let datagrams = lab.run(lab.node(0), 0, &["udp-unconnected", &WEB.to_string(), "4"]);
        let backends: BTreeSet<String> = datagrams.iter().map(|o| answered(o).0).collect();
        assert_eq!(backends.len(), 1, "one socket, one backend: {backends:?}");
        assert!(datagrams.iter().all(|o| from(o) == Some(WEB)), "recvfrom shows the ClusterIP: {datagrams:?}");
        seen.extend(backends);
    }
    assert_eq!(seen.len(), 3, "each new socket took the next backend: {seen:?}");

    assert_eq!(lab.packet_path(), packets_before, "translated at the socket: no packet hook translated anything");
    assert_eq!(lab.counter(0, counters::SOCK_CONNECT), 9, "6 TCP and 3 UDP connects");
    assert_eq!(lab.counter(0, counters::SOCK_SENDMSG), 12, "3 sockets x 4 datagrams");
    assert_eq!(lab.counter(0, counters::SOCK_REVERSED), 6 + 3 * 2 + 12, "getpeername x9, recvfrom x3 and x12");
    assert_eq!(
        frontend_stats(pin, tcp_key(WEB)).packets - web_before.packets,
        6,
        "the TCP frontend counted 6 connects"
    );
    let new_flows: u64 = [POD_A, POD_B, POD_C].map(|p| backend_stats(pin, endpoint(p)).new_flows).iter().sum();
    assert_eq!(new_flows - new_flows_before, 6 + 3 + 3, "new flows per backend: connects and first datagrams");

    // host-only: a pod's socket in the same cgroup is left to tc, which translates it per packet.
    let pod = lab.run(lab.pod_a(), 0, &["tcp", &WEB.to_string(), "3"]);
    for o in &pod {
        let (backend, saw) = answered(o);
        // pod-a reaching itself through tc is hairpin, SNATed to the node.
        let expected = if backend == "pod-a" { node1.addr } else { POD_A };
        assert_eq!((*saw.ip(), peer(o)), (expected, Some(WEB)), "translated per packet: {o:?}");
    }
    assert_eq!(lab.counter(0, counters::SOCK_PASSED), 3, "the hooks passed the pod's connects");
    assert_eq!(lab.counter(0, counters::NEW_FLOW) - packets_before[0], 3, "tc translated the pod's flows");
}

#[test]
fn ipv6_sockets_to_ipv4_mapped_service_addresses_are_served_too() {
    let lab = SocketLab::start("all");
    let before = lab.packet_path();
    for (who, ns) in [("node1", lab.node(0)), ("pod-a", lab.pod_a())] {
        let tcp = lab.run(ns, 0, &["tcp6", &WEB.to_string(), "3"]);
        let backends: BTreeSet<String> = tcp.iter().map(|o| answered(o).0).collect();
        assert_eq!(backends.len(), 3, "{who}: round robin over both nodes: {backends:?}");
        assert!(tcp.iter().all(|o| peer(o) == Some(WEB)), "{who}: getpeername shows ::ffff:{WEB}: {tcp:?}");
        let udp = lab.run(ns, 0, &["udp6", &WEB.to_string(), "1"]);
        assert_eq!((peer(&udp[0]), from(&udp[0])), (Some(WEB), Some(WEB)), "{who}: connected UDP");
        let unconnected = lab.run(ns, 0, &["udp6-unconnected", &WEB.to_string(), "2"]);
        assert!(unconnected.iter().all(|o| from(o) == Some(WEB)), "{who}: unconnected UDP: {unconnected:?}");
    }
    assert_eq!(lab.packet_path(), before, "all translated at the socket");
    assert_eq!(lab.counter(0, counters::SOCK_CONNECT), 2 * (3 + 1));
    assert_eq!(lab.counter(0, counters::SOCK_SENDMSG), 2 * 2, "IPv6 sockets' IPv4 sends meet sendmsg4");
}

#[test]
fn a_service_without_endpoints_refuses_at_connect_and_a_local_policy_without_local_ones_is_unreachable() {
    let lab = SocketLab::start("host-only");
    let nothing = NOTHING.to_string();
    for mode in ["tcp", "udp", "udp-unconnected"] {
        let out = lab.run(lab.node(0), 0, &[mode, &nothing, "1"]);
        failed_at_once(&out[0], libc::ECONNREFUSED, &format!("{mode} to a Service without endpoints"));
    }
    assert_eq!(lab.counter(0, counters::SOCK_REFUSED), 3);
    // internalTrafficPolicy Local, endpoints only on node2: kube-proxy drops node1's
    // traffic; a socket learns at once that there is no way.
    let out = lab.run(lab.node(0), 0, &["tcp", &ITP_LOCAL.to_string(), "1"]);
    failed_at_once(&out[0], libc::EHOSTUNREACH, "ITP Local without a local endpoint");
    assert_eq!(lab.counter(0, counters::SOCK_UNREACHABLE), 1);
    // node2 has the endpoint.
    let out = lab.run(lab.node(1), 1, &["tcp", &ITP_LOCAL.to_string(), "1"]);
    assert_eq!(answered(&out[0]).0, "pod-b");
}

#[test]
fn node_ports_answer_the_node_on_its_own_address_and_on_loopback() {
    let lab = SocketLab::start("all");
    let node1 = lab.cluster.lab.nodes[0].addr;
    for frontend in [SocketAddrV4::new(node1, WEB_NODE_PORT), SocketAddrV4::new(Ipv4Addr::LOCALHOST, WEB_NODE_PORT)] {
        let tcp = lab.run(lab.node(0), 0, &["tcp", &frontend.to_string(), "3"]);
        let backends: BTreeSet<String> = tcp.iter().map(|o| answered(o).0).collect();
        assert_eq!(backends.len(), 3, "{frontend}: round robin over both nodes: {backends:?}");
        assert!(tcp.iter().all(|o| peer(o) == Some(frontend)), "{frontend}: getpeername: {tcp:?}");
        let udp = lab.run(lab.node(0), 0, &["udp", &frontend.to_string(), "1"]);
        assert_eq!((peer(&udp[0]), from(&udp[0])), (Some(frontend), Some(frontend)), "{frontend}/UDP");
    }
    // A pod's 127.0.0.1 is its own: nothing listens there, and nothing translates it.
    let loopback = SocketAddrV4::new(Ipv4Addr::LOCALHOST, WEB_NODE_PORT).to_string();
    let out = lab.run(lab.pod_a(), 0, &["tcp", &loopback, "1"]);
    failed_at_once(&out[0], libc::ECONNREFUSED, "a pod's own loopback");
    assert_eq!(lab.counter(0, counters::SOCK_REFUSED), 0, "refused by the pod's stack, not by the hooks");
}

/// kube-proxy short-circuits traffic from the node itself to an externalTrafficPolicy=Local
/// frontend to the cluster set: node1 has no local endpoint, yet its own sockets reach
/// node2's on node1's NodePort, on its address and on 127.0.0.1 (outside clients are
/// dropped there: lab_contract).
#[test]
fn the_nodes_own_sockets_reach_an_external_local_nodeport_through_the_cluster_set() {
    let lab = SocketLab::start("host-only");
    let node1 = lab.cluster.lab.nodes[0].addr;
    let port = node_port(ETP_LOCAL);
    for frontend in [SocketAddrV4::new(node1, port), SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)] {
        for mode in ["tcp", "udp"] {
            let out = lab.run(lab.node(0), 0, &[mode, &frontend.to_string(), "2"]);
            for o in &out {
                assert_eq!(answered(o).0, "pod-b", "{mode} to {frontend}: the cluster set, on node2");
                assert_eq!(peer(o), Some(frontend), "{mode} to {frontend}: shown the NodePort");
            }
        }
    }
    assert_eq!(lab.counter(0, counters::SOCK_UNREACHABLE), 0);
}

#[test]
fn pod_sockets_are_translated_once_at_connect_and_tc_rewrites_none_of_their_packets() {
    let lab = SocketLab::start("all");
    let before = lab.packet_path();
    let tcp = lab.run(lab.pod_a(), 0, &["tcp", &WEB.to_string(), "6"]);
    let mut seen = BTreeSet::new();
    for o in &tcp {
        let (backend, saw) = answered(o);
        assert_eq!((peer(o), *saw.ip()), (Some(WEB), POD_A), "the app sees the ClusterIP, the backend the pod");
        seen.insert(backend);
    }
    assert_eq!(seen.len(), 3, "both nodes' backends: {seen:?}");
    let udp = lab.run(lab.pod_a(), 0, &["udp", &WEB.to_string(), "3"]);
    assert!(udp.iter().all(|o| from(o) == Some(WEB) && answered(o).1.ip() == &POD_A), "{udp:?}");
    assert_eq!(lab.packet_path(), before, "neither node's tc or XDP translated a packet of these flows");
    assert_eq!(lab.counter(0, counters::SOCK_CONNECT), 9);

    // The same pod's socket outside the cgroup meets no hook: tc translates it per packet.
    let (backend, saw) = parse_answer(&tcp_ask(lab.pod_a(), WEB).unwrap()).unwrap();
    assert!(["pod-a", "pod-b", "pod-c"].contains(&backend.as_str()));
    // pod-a reaching itself through tc is hairpin (SNAT to the node); the others see the pod.
    assert!(*saw.ip() == POD_A || backend == "pod-a");
    assert_eq!(lab.counter(0, counters::NEW_FLOW), before[0] + 1, "tc translated the flow from outside the cgroup");
}

#[test]
fn session_affinity_keeps_each_network_namespace_on_one_backend() {
    let lab = SocketLab::start("all");
    for (who, ns) in [("node1", lab.node(0)), ("pod-a", lab.pod_a())] {
        let out = lab.run(ns, 0, &["tcp", &STICKY.to_string(), "6"]);
        let backends: BTreeSet<String> = out.iter().map(|o| answered(o).0).collect();
        assert_eq!(backends.len(), 1, "{who} keeps one backend: {backends:?}");
    }
    // A socket has no source address when it connects: its namespace is the client, as
    // 0.x.y.z, which no packet comes from, so these entries never mix with packet clients'.
    let affinity: aya::maps::HashMap<_, lb_common::AffinityKey, lb_common::AffinityValue> =
        lb_user::datapath::open_map(&lab.cluster.agents[0].pin_dir, lb_common::map_names::AFFINITY)
            .unwrap()
            .try_into()
            .unwrap();
    let clients: BTreeSet<Ipv4Addr> =
        affinity.keys().map(|k| lb_common::user::ip_from_be(k.unwrap().client_addr_be)).collect();
    assert_eq!(clients.len(), 2, "one client per namespace: {clients:?}");
    assert!(clients.iter().all(|c| c.octets()[0] == 0), "{clients:?}");
}

#[test]
fn a_backend_change_moves_only_new_connections() {
    let lab = SocketLab::start("all");
    let cgroup = &lab.cgroups[0].path;
    let (mut held, first) = Held::open(lab.node(0), cgroup, "hold", MOVING).unwrap();
    assert_eq!((answered(&first).0.as_str(), peer(&first)), ("pod-b", Some(MOVING)));
    let (mut datagrams, first) = Held::open(lab.node(0), cgroup, "hold-udp", MOVING).unwrap();
    assert_eq!((answered(&first).0.as_str(), from(&first)), ("pod-b", Some(MOVING)));
    lab.cluster.apply(&manifests(&[POD_C])).unwrap();
    // The kept connection was made to pod-b itself: the change does not touch it (as
    // kube-proxy leaves TCP conntrack entries alone).
    let again = held.again().unwrap();
    assert_eq!((answered(&again).0.as_str(), peer(&again)), ("pod-b", Some(MOVING)), "the kept connection stays");
    let fresh = lab.run(lab.node(0), 0, &["tcp", &MOVING.to_string(), "3"]);
    assert!(fresh.iter().all(|o| answered(o).0 == "pod-c"), "new connections go to pod-c: {fresh:?}");
    // An unconnected UDP socket's next datagram chooses again (as kube-proxy forgets the
    // UDP flows of a removed endpoint), still answered from the Service.
    let again = datagrams.again().unwrap();
    assert_eq!((answered(&again).0.as_str(), from(&again)), ("pod-c", Some(MOVING)), "the datagram moved");
    assert_eq!(lab.counter(0, counters::BACKEND_GONE_RECHOSEN), 1);
}

#[test]
fn open_sockets_count_for_least_conn_and_stop_counting_when_closed() {
    let lab = SocketLab::start("all");
    let pin = &lab.cluster.agents[0].pin_dir;
    let cgroup = &lab.cgroups[0].path;
    let (held, first) = Held::open(lab.node(0), cgroup, "hold", FEWEST).unwrap();
    let kept = answered(&first).0;
    let (kept_ip, other, other_ip) = if kept == "pod-b" { (POD_B, "pod-c", POD_C) } else { (POD_C, "pod-b", POD_B) };
    assert_eq!(backend_live(pin, endpoint(kept_ip)), 1, "the open socket is an open flow of {kept}");
    let sockets = || {
        let bin = lb_tests::agent::lb_user_bin().unwrap();
        lb_tests::lab::run(bin.to_str().unwrap(), &["sockets", "--pin-dir", pin.to_str().unwrap()]).unwrap()
    };
    let shown = sockets();
    assert!(shown.contains(&format!("TCP {FEWEST} -> {}", endpoint(kept_ip))), "`lb-user sockets` lists it:\n{shown}");
    // Each new connection closes before the next: the other backend has fewer open flows
    // every time.
    let fresh = lab.run(lab.node(0), 0, &["tcp", &FEWEST.to_string(), "4"]);
    assert!(fresh.iter().all(|o| answered(o).0 == other), "least-conn avoids {kept}: {fresh:?}");
    assert_eq!(backend_live(pin, endpoint(other_ip)), 0, "closed sockets left {other}'s open flows");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend_live(pin, endpoint(kept_ip)) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(backend_live(pin, endpoint(kept_ip)), 0, "the killed client's socket was counted down at release");
    assert_eq!(sockets(), "", "released sockets are no longer tracked");
}

#[test]
fn a_restart_keeps_the_hooks_attached_once_and_unload_detaches_them() {
    let mut lab = SocketLab::start("host-only");
    let hooks = lb_common::program_names::SOCKET_HOOKS.len();
    let attached = |lab: &SocketLab, expected| hooks_settling_at(&lab.cgroups[0], expected).len();
    assert_eq!(attached(&lab, hooks), hooks, "connect4/6, sendmsg4, recvmsg4/6, getpeername4/6 and sock_release");
    lab.cluster.agents[0].restart().unwrap();
    assert_eq!(attached(&lab, hooks), hooks, "the restarted agent replaced its hooks, not added to them");
    let out = lab.run(lab.node(0), 0, &["tcp", &WEB.to_string(), "1"]);
    assert_eq!(peer(&out[0]), Some(WEB));
    lb_user::datapath::unload(&lab.cluster.agents[0].pin_dir).unwrap();
    assert_eq!(attached(&lab, 0), 0, "unload detached them");
    // The ClusterIP is no address the node routes: untranslated, connect fails at once.
    let out = lab.run(lab.node(0), 0, &["tcp", &WEB.to_string(), "1"]);
    failed_at_once(&out[0], libc::ENETUNREACH, "after unload");
}

#[test]
fn turned_off_the_hooks_detach_but_release_stays_until_the_sockets_it_counts_close() {
    let mut lab = SocketLab::start("all");
    let pin = lab.cluster.agents[0].pin_dir.clone();
    let (held, first) = Held::open(lab.node(0), &lab.cgroups[0].path, "hold", FEWEST).unwrap();
    let kept = endpoint(if answered(&first).0 == "pod-b" { POD_B } else { POD_C });
    lab.cluster.agents[0].restart_setting("--socket-lb", "off").unwrap();
    let attached = hooks_settling_at(&lab.cgroups[0], 1);
    assert!(attached.len() == 1 && attached[0].contains("sock_release"), "{attached:?}");
    let out = lab.run(lab.node(0), 0, &["tcp", &WEB.to_string(), "1"]);
    failed_at_once(&out[0], libc::ENETUNREACH, "off: the ClusterIP is not translated");
    assert_eq!(backend_live(&pin, kept), 1);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend_live(&pin, kept) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(backend_live(&pin, kept), 0, "the release hook counted the held socket down");
    lab.cluster.agents[0].restart().unwrap();
    assert_eq!(
        hooks_settling_at(&lab.cgroups[0], 0),
        Vec::<String>::new(),
        "with nothing tracked, the next start removes it"
    );
}
