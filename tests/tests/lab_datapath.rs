//! Needs root and BPF. End to end through a lab: two nodes (pod-a on node1; pod-b, pod-c on
//! node2), external clients, the agent on each node, real TCP and UDP. Backends answer
//! with their name and the peer address they saw, so each test checks the backend chosen
//! and the address translation, and the datapath counters.
use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_common::counters;
use lb_tests::{
    cluster::{Cluster, Manifests},
    lab::{in_netns, Spec},
    traffic::{parse_answer, tcp_ask, tcp_burst, udp_ask, Load},
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);

/// A Service with TCP and UDP on `port` (-> 8080) and an EndpointSlice of `backends`.
fn service(name: &str, spec: &str, port: u16, node_port: Option<u16>, backends: &[Ipv4Addr]) -> String {
    let np = |proto: &str| {
        node_port
            .map(|p| format!(", nodePort: {p}"))
            .map(|s| {
                format!("{{name: {}, protocol: {proto}, port: {port}, targetPort: 8080{s}}}", proto.to_lowercase())
            })
            .unwrap_or_else(|| {
                format!("{{name: {}, protocol: {proto}, port: {port}, targetPort: 8080}}", proto.to_lowercase())
            })
    };
    let endpoints: Vec<String> = backends
        .iter()
        .map(|ip| format!("- {{addresses: [\"{ip}\"], nodeName: node{}}}", if *ip == POD_A { 1 } else { 2 }))
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  {spec}\n  ports: [{}, {}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: tcp, protocol: TCP, port: 8080}}, {{name: udp, protocol: UDP, port: 8080}}]\nendpoints:{}\n",
        np("TCP"),
        np("UDP"),
        if endpoints.is_empty() { " []".to_string() } else { format!("\n{}", endpoints.join("\n")) }
    )
}

/// A UDP NodePort whose backend (pod-b) has nothing listening on the target port.
const CLOSED: &str = "---
apiVersion: v1
kind: Service
metadata: {name: closed}
spec: {type: NodePort, clusterIP: 10.96.1.8, ports: [{protocol: UDP, port: 80, targetPort: 9999, nodePort: 30088}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: closed-1, labels: {kubernetes.io/service-name: closed}}
addressType: IPv4
ports: [{protocol: UDP, port: 9999}]
endpoints: [{addresses: [10.244.2.10], nodeName: node2}]
";

fn manifests() -> String {
    [
        service("remote", "clusterIP: 10.96.1.1", 80, None, &[POD_B, POD_C]),
        service("self", "clusterIP: 10.96.1.2", 80, None, &[POD_A]),
        service("np", "type: NodePort\n  clusterIP: 10.96.1.3", 80, Some(30080), &[POD_B, POD_C]),
        service(
            "local-remote",
            "type: LoadBalancer\n  clusterIP: 10.96.1.4\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32004",
            80,
            Some(30084),
            &[POD_B, POD_C],
        ),
        service(
            "local-here",
            "type: LoadBalancer\n  clusterIP: 10.96.1.5\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32005",
            80,
            Some(30085),
            &[POD_A],
        ),
        service(
            "ranged",
            "type: LoadBalancer\n  clusterIP: 10.96.1.6\n  loadBalancerSourceRanges: [192.168.50.101/32]",
            80,
            Some(30086),
            &[POD_A, POD_B],
        ),
        service("empty", "type: NodePort\n  clusterIP: 10.96.1.7", 80, Some(30087), &[]),
        service("itp-local", "clusterIP: 10.96.1.9\n  internalTrafficPolicy: Local", 80, None, &[POD_A, POD_B, POD_C]),
        CLOSED.to_string(),
    ]
    .concat()
}

/// LoadBalancer ingress IPs, as a cloud controller would have written them.
fn with_lb_status(yaml: &str) -> String {
    let mut out = String::new();
    for doc in yaml.split("---\n").filter(|d| !d.trim().is_empty()) {
        out.push_str("---\n");
        out.push_str(doc);
        for (name, ip) in [("local-remote", "192.168.60.4"), ("local-here", "192.168.60.5"), ("ranged", "192.168.60.6")]
        {
            if doc.contains("kind: Service\n") && doc.contains(&format!("metadata: {{name: {name}}}\nspec")) {
                out.push_str(&format!("status: {{loadBalancer: {{ingress: [{{ip: {ip}}}]}}}}\n"));
            }
        }
    }
    out
}

fn start(clients: usize) -> Cluster {
    start_with(clients, &[])
}

fn start_with(clients: usize, agent_args: &[&str]) -> Cluster {
    start_spec(Spec { pods_per_node: vec![1, 2], clients, ..Spec::default() }, agent_args)
}

fn start_spec(spec: Spec, agent_args: &[&str]) -> Cluster {
    lb_tests::require_root();
    let yaml = with_lb_status(&manifests());
    let c = Cluster::start("lbt", &spec, Manifests::inline(&yaml).unwrap(), agent_args).unwrap();
    for agent in &c.agents {
        assert!(!agent.log_text().contains("WARN"), "the test manifests are valid:\n{}", agent.log_text());
    }
    c
}

fn answer(a: std::io::Result<String>) -> (String, SocketAddrV4) {
    let a = a.expect("an answer");
    parse_answer(&a).unwrap_or_else(|| panic!("unexpected answer {a:?}"))
}

#[test]
fn nodeport_with_cluster_policy_snats_to_the_node_and_replies_come_back() {
    let c = start(1);
    nodeport_snat_round_trips(&c);
    let agent = &c.agents[0];
    assert!(agent.counter(counters::EGRESS_REWRITTEN) >= 50, "node1 rewrote the source side at tc egress");
    assert_eq!(agent.counter(counters::XDP_TX), 0, "netfilter mode: the stack forwards, XDP never transmits");
}

#[test]
fn fast_forwarding_sends_nodeport_traffic_back_out_with_xdp_tx() {
    // Complete checksums, as a physical NIC receives them: XDP rewrites and transmits.
    let spec = Spec { pods_per_node: vec![1, 2], clients: 1, complete_checksums: true, ..Spec::default() };
    let c = start_spec(spec, &["--forwarding", "fast"]);
    nodeport_snat_round_trips(&c);
    let agent = &c.agents[0];
    assert!(agent.counter(counters::XDP_TX) > 0, "node1 sent translated packets with XDP_TX");
    assert_eq!(agent.counter(counters::XDP_TO_TC), 0, "XDP rewrote every packet itself");
    assert_eq!(agent.counter(counters::EGRESS_REWRITTEN), 0, "nothing is left for tc egress");
}

#[test]
fn fast_forwarding_with_partial_checksums_leaves_the_rewrite_to_tc() {
    // A veth uplink's peer hands over partial checksums (kind clusters): XDP cannot tell
    // them from complete ones by their bytes, so it hands such packets to tc, whose
    // checksum helpers follow the skb's state.
    let c = start_with(1, &["--forwarding", "fast"]);
    nodeport_snat_round_trips(&c);
    let agent = &c.agents[0];
    assert!(agent.counter(counters::XDP_TO_TC) >= 25, "XDP left the partial-checksum packets to tc");
}

/// NodePort 30080 on node1, backends on node2 only: TCP and UDP from a client reach both
/// backends through SNAT, and the answers come back.
fn nodeport_snat_round_trips(c: &Cluster) {
    let client = &c.lab.clients[0].ns.name;
    let node1 = &c.lab.nodes[0];
    let mut seen_backends = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (backend, peer) = answer(tcp_ask(client, c.node_port(0, 30080)));
        assert!(backend == "pod-b" || backend == "pod-c", "{backend}");
        assert_eq!(*peer.ip(), node1.addr, "the remote backend sees node1's address (SNAT)");
        seen_backends.insert(backend);
    }
    assert_eq!(seen_backends.len(), 2, "random choice reached both backends in 20 tries");
    for _ in 0..5 {
        let (backend, peer) = answer(udp_ask(client, "0.0.0.0:0".parse().unwrap(), c.node_port(0, 30080)));
        assert!(backend == "pod-b" || backend == "pod-c", "{backend}");
        assert_eq!(*peer.ip(), node1.addr);
    }
    let agent = &c.agents[0];
    assert!(agent.counter(counters::NEW_FLOW) >= 25);
    assert!(agent.counter(counters::REPLY) >= 25, "replies were reverse-translated on node1");
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_drops_without_local_backends() {
    let c = start(1);
    let client = &c.lab.clients[0];
    let (backend, peer) = answer(tcp_ask(&client.ns.name, "192.168.60.5:80".parse().unwrap()));
    assert_eq!((backend.as_str(), *peer.ip()), ("pod-a", client.addr), "LB IP routed to node1, local backend, no SNAT");
    let (backend, peer) =
        answer(udp_ask(&client.ns.name, "0.0.0.0:0".parse().unwrap(), "192.168.60.5:80".parse().unwrap()));
    assert_eq!((backend.as_str(), *peer.ip()), ("pod-a", client.addr));
    for _ in 0..4 {
        let (backend, peer) = answer(tcp_ask(&client.ns.name, c.node_port(1, 30084)));
        assert!(backend == "pod-b" || backend == "pod-c");
        assert_eq!(*peer.ip(), client.addr, "node2's local backends see the client");
    }
    // node1 has no local backend for local-remote: dropped, not forwarded or refused.
    let started = Instant::now();
    let err = tcp_ask(&client.ns.name, c.node_port(0, 30084)).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock), "{err:?}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(c.agents[0].counter(counters::DROP_NO_LOCAL_BACKEND) >= 1);
    // Health checks steer the cloud LB: node1 has none of local-remote's endpoints.
    assert_eq!(health(&client.ns.name, c.node_port(0, 32004)), ("503 Service Unavailable".into(), r#"{"localEndpoints":0,"service":{"name":"local-remote","namespace":"default"},"serviceProxyHealthy":true}"#.into()));
    assert_eq!(
        health(&client.ns.name, c.node_port(1, 32004)).1,
        r#"{"localEndpoints":2,"service":{"name":"local-remote","namespace":"default"},"serviceProxyHealthy":true}"#
    );
    assert_eq!(health(&client.ns.name, c.node_port(0, 32005)).0, "200 OK");
}

fn health(ns: &str, dst: SocketAddrV4) -> (String, String) {
    let raw = in_netns(ns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&dst.into(), Duration::from_secs(3)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"GET /any/path HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    let status = raw.lines().next().unwrap_or("").trim_start_matches("HTTP/1.1 ").to_string();
    (status, raw.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

#[test]
fn cluster_ip_from_pods_keeps_the_pod_address_and_hairpin_works() {
    let c = start(0);
    let pod_a = &c.lab.nodes[0].pods[0].ns.name;
    let pod_b = &c.lab.nodes[1].pods[0].ns.name;
    for _ in 0..6 {
        let (backend, peer) = answer(tcp_ask(pod_a, "10.96.1.1:80".parse().unwrap()));
        assert!(backend == "pod-b" || backend == "pod-c");
        assert_eq!(*peer.ip(), POD_A, "east-west ClusterIP traffic is not SNATed");
    }
    let (backend, peer) = answer(udp_ask(pod_a, "0.0.0.0:0".parse().unwrap(), "10.96.1.1:80".parse().unwrap()));
    assert!(backend == "pod-b" || backend == "pod-c");
    assert_eq!(*peer.ip(), POD_A);
    // From node2 to the backend on node1.
    let (backend, peer) = answer(tcp_ask(pod_b, "10.96.1.2:80".parse().unwrap()));
    assert_eq!((backend.as_str(), *peer.ip()), ("pod-a", POD_B));
    // Hairpin: pod-a reaching itself through its Service is SNATed to node1.
    let (backend, peer) = answer(tcp_ask(pod_a, "10.96.1.2:80".parse().unwrap()));
    assert_eq!((backend.as_str(), *peer.ip()), ("pod-a", c.lab.nodes[0].addr));
    let (backend, peer) = answer(udp_ask(pod_a, "0.0.0.0:0".parse().unwrap(), "10.96.1.2:80".parse().unwrap()));
    assert_eq!((backend.as_str(), *peer.ip()), ("pod-a", c.lab.nodes[0].addr));
}

#[test]
fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node() {
    let c = start(0);
    let pod_b = &c.lab.nodes[1].pods[0].ns.name;
    // Were the policy ignored, each request would reach pod-a (node1) with chance 1/3:
    // 24 requests all missing it would be a 1-in-16 000 accident.
    for _ in 0..24 {
        match answer(tcp_ask(pod_b, "10.96.1.9:80".parse().unwrap())) {
            (b, peer) if b == "pod-c" => assert_eq!(*peer.ip(), POD_B),
            // pod-b reaching itself: hairpin, SNATed to its node.
            (b, peer) if b == "pod-b" => assert_eq!(*peer.ip(), c.lab.nodes[1].addr),
            (b, _) => panic!("{b} is not on node2"),
        }
    }
}

#[test]
fn services_without_endpoints_refuse_at_once() {
    let c = start(1);
    let pod_a = &c.lab.nodes[0].pods[0].ns.name;
    let client = &c.lab.clients[0].ns.name;
    let cases = [
        (pod_a.clone(), "10.96.1.7:80".parse().unwrap(), "ClusterIP from a pod (tc)"),
        (client.clone(), c.node_port(0, 30087), "NodePort from outside (XDP)"),
    ];
    for (ns, dst, what) in cases {
        let started = Instant::now();
        let err = tcp_ask(&ns, dst).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{what}: TCP");
        assert!(started.elapsed() < Duration::from_secs(1), "{what}: refused in {:?}", started.elapsed());
        let err = udp_ask(&ns, "0.0.0.0:0".parse().unwrap(), dst).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{what}: UDP gets port unreachable");
    }
    assert!(c.agents[0].counter(counters::REFUSED_NO_BACKEND) >= 4);
}

#[test]
fn icmp_errors_from_backends_reach_the_client_for_its_own_flow() {
    let c = start(1);
    let client = &c.lab.clients[0].ns.name;
    // pod-b answers port unreachable to node1's SNAT address; node1 translates it back,
    // so the client's connected socket sees the refusal for its own 5-tuple.
    let err = udp_ask(client, "0.0.0.0:0".parse().unwrap(), c.node_port(0, 30088)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err:?}");
    assert!(c.agents[0].counter(counters::ICMP_ERROR_TRANSLATED) >= 1);
}

#[test]
fn snat_port_exhaustion_is_counted_and_logged_by_the_agent() {
    // One SNAT port: one flow per backend at a time (closed flows keep it for a while).
    let c = start_with(1, &["--snat-ports", "40000-40000"]);
    let client = &c.lab.clients[0].ns.name;
    let failed = (0..4).any(|_| tcp_ask(client, c.node_port(0, 30080)).is_err());
    assert!(failed, "at most two flows fit in one port toward two backends");
    assert!(c.agents[0].counter(counters::DROP_NAT_EXHAUSTED) >= 1);
    c.agents[0].wait_for_log("no free SNAT port toward 10.244.2.1").unwrap();
    c.agents[0].wait_for_log(" in 40000-40000").unwrap();
}

#[test]
fn load_balancer_source_ranges_drop_other_sources() {
    let c = start(2);
    let (outside, inside) = (&c.lab.clients[0], &c.lab.clients[1]);
    assert_eq!(inside.addr, Ipv4Addr::new(192, 168, 50, 101));
    for _ in 0..4 {
        // pod-a is local to node1 (no SNAT), pod-b is on node2 (SNAT to node1).
        match answer(tcp_ask(&inside.ns.name, "192.168.60.6:80".parse().unwrap())) {
            (b, peer) if b == "pod-a" => assert_eq!(*peer.ip(), inside.addr),
            (b, peer) if b == "pod-b" => assert_eq!(*peer.ip(), c.lab.nodes[0].addr),
            (b, _) => panic!("{b} is not a backend of ranged"),
        }
    }
    let err = tcp_ask(&outside.ns.name, "192.168.60.6:80".parse().unwrap()).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock), "{err:?}");
    assert!(c.agents[0].counter(counters::DROP_SOURCE_RANGE) >= 1);
    // The range applies to the LB IP only; the NodePort stays open to everyone.
    answer(tcp_ask(&outside.ns.name, c.node_port(0, 30086)));
}

#[test]
fn thousands_of_short_connections_through_one_nodeport_without_nat_collisions() {
    let c = start(1);
    let client = &c.lab.clients[0];
    let retrans_before = syn_retransmits(&client.ns.name);
    let total = 4000;
    let answers = tcp_burst(&client.ns.name, c.node_port(0, 30080), total, 500);
    let failures: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(failures.is_empty(), "{} of {total} failed, first: {:?}", failures.len(), failures.first());
    let mut per_backend: std::collections::BTreeMap<String, Vec<u16>> = Default::default();
    for a in &answers {
        let (backend, peer) = parse_answer(a.as_ref().unwrap()).unwrap();
        assert_eq!(*peer.ip(), c.lab.nodes[0].addr);
        per_backend.entry(backend).or_default().push(peer.port());
    }
    for (backend, ports) in &per_backend {
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{backend}: a SNAT port was reused toward the same backend");
    }
    assert_eq!(syn_retransmits(&client.ns.name) - retrans_before, 0, "no SYN waited on a backend's TIME_WAIT");
}

fn syn_retransmits(ns: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nstat", "-az", "TcpExtTCPSynRetrans"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("TcpExtTCPSynRetrans"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_agent_restart_drops_nothing_and_keeps_every_flow_on_its_backend() {
    let mut c = start(1);
    let client = c.lab.clients[0].ns.name.clone();
    let (dst, from) = (c.node_port(0, 30080), "0.0.0.0:45000".parse().unwrap());
    let before = answer(udp_ask(&client, from, dst));
    // One request every 20 ms on the same 5-tuple, all through the restart.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asker = {
        let (client, stop) = (client.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                answers.push(udp_ask(&client, from, dst).map(|a| parse_answer(&a)));
                std::thread::sleep(Duration::from_millis(20));
            }
            answers
        })
    };
    let link = c.agents[0].pin_dir.join("links/xdp-eth0");
    let link_id = || {
        let out = std::process::Command::new("bpftool").args(["link", "show", "pinned"]).arg(&link).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split(':').next().unwrap_or_default().trim().to_string()
    };
    let link_before = link_id();
    std::thread::sleep(Duration::from_millis(200));
    c.agents[0].restart().unwrap();
    assert_eq!(link_id(), link_before, "the new program went into the same XDP link (no detach)");
    assert!(!link_before.is_empty());
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = asker.join().unwrap();
    assert!(answers.len() >= 10, "{} requests", answers.len());
    for a in &answers {
        let a = a.as_ref().expect("every request during the restart is answered");
        assert_eq!(a.as_ref(), Some(&before), "same backend and SNAT port: conntrack and ids were adopted");
    }
    assert!(c.agents[0].log_text().matches("agent started").count() == 2);
}

#[test]
fn an_agent_that_cannot_read_its_manifests_at_start_keeps_the_adopted_services() {
    let mut c = start(1);
    let client = c.lab.clients[0].ns.name.clone();
    answer(tcp_ask(&client, c.node_port(0, 30080)));
    let away = c.manifests.path.with_extension("away");
    std::fs::rename(&c.manifests.path, &away).unwrap();
    c.agents[0].respawn().unwrap();
    c.agents[0].wait_for_log("keeping the datapath as adopted until the source has listed every object once").unwrap();
    let (backend, _) = answer(tcp_ask(&client, c.node_port(0, 30080)));
    assert!(backend == "pod-b" || backend == "pod-c", "the NodePort is still served");
    let synced = c.agents[0].syncs();
    std::fs::rename(&away, &c.manifests.path).unwrap();
    c.agents[0].wait_for_syncs(synced + 1).unwrap();
    answer(tcp_ask(&client, c.node_port(0, 30080)));
}

#[test]
fn agent_follows_manifest_changes_and_new_pod_devices() {
    let mut c = start(0);
    let pod_a = c.lab.nodes[0].pods[0].ns.name.clone();
    // A backend removed from the slice stops receiving new flows.
    let yaml = with_lb_status(&manifests().replace(
        &service("remote", "clusterIP: 10.96.1.1", 80, None, &[POD_B, POD_C]),
        &service("remote", "clusterIP: 10.96.1.1", 80, None, &[POD_C]),
    ));
    c.apply(&yaml).unwrap();
    for _ in 0..6 {
        assert_eq!(
            answer(tcp_ask(&pod_a, "10.96.1.1:80".parse().unwrap())).0,
            "pod-c",
            "agent log:\n{}",
            c.agents[0].log_text()
        );
    }
    // A pod created while the agent runs gets the pod-side program (netlink link event).
    let new_pod = c.lab.add_pod_to("lbt", 0).unwrap();
    let (ns, device) = (new_pod.ns.name.clone(), new_pod.host_device.clone());
    c.agents[0].wait_for_log(&format!("attached pod-side program device={device}")).unwrap();
    let (backend, peer) = answer(tcp_ask(&ns, "10.96.1.1:80".parse().unwrap()));
    assert_eq!((backend.as_str(), *peer.ip()), ("pod-c", Ipv4Addr::new(10, 244, 1, 11)));
    // The pod goes away: its link's pin goes with it.
    let pin = c.agents[0].pin_dir.join(format!("links/tc-{device}"));
    assert!(pin.exists());
    drop(c.lab.nodes[0].pods.pop());
    c.agents[0].wait_for_log(&format!("device gone; unpinned its pod-side link device={device}")).unwrap();
    assert!(!pin.exists());
}

/// What the agent programmed, as bpftool dumps it: every map the model decides (not the
/// ones traffic changes).
fn programmed_maps(pin_dir: &std::path::Path) -> Vec<String> {
    use lb_common::map_names::*;
    [SERVICES, SLOTS, BACKENDS, FRONTEND_META, SRC_RANGES, FRONT_BITS, CONFIG]
        .iter()
        .map(|name| {
            let pin = pin_dir.join("maps").join(name);
            let out =
                std::process::Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&pin).output().unwrap();
            assert!(out.status.success(), "bpftool map dump {name}: {}", String::from_utf8_lossy(&out.stderr));
            let mut entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            entries.sort_by_key(|e| e.to_string());
            format!("{name}: {}", serde_json::Value::Array(entries))
        })
        .collect()
}

#[test]
fn killing_the_agent_under_tcp_and_udp_load_fails_no_request_and_changes_no_map() {
    let mut c = start(1);
    let client = c.lab.clients[0].ns.name.clone();
    let before = programmed_maps(&c.agents[0].pin_dir);
    // About 200 requests a second: new TCP connections and UDP flows, to a NodePort whose
    // backends are on the other node (SNAT) and to an externalTrafficPolicy=Local one whose
    // backend is on this node.
    let loads = [
        Load::start(&client, c.node_port(0, 30080), 2, &[20_000], Duration::from_millis(15)),
        Load::start(&client, c.node_port(0, 30085), 2, &[40_000], Duration::from_millis(15)),
    ];
    for signal in [libc::SIGKILL, libc::SIGTERM] {
        std::thread::sleep(Duration::from_millis(500));
        c.agents[0].kill_and_restart(signal).unwrap();
        assert_eq!(programmed_maps(&c.agents[0].pin_dir), before, "maps after signal {signal}");
    }
    std::thread::sleep(Duration::from_millis(500));
    for load in loads {
        let outcomes = load.stop();
        let failed: Vec<_> = outcomes.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
        assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), outcomes.len());
        assert!(outcomes.len() > 100, "the load kept up: {} requests", outcomes.len());
    }
    assert_eq!(c.agents[0].log_text().matches("agent started").count(), 3);
}
