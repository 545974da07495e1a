//! Needs root and BPF. The Service contract on the wire (issue 8): refuse or drop as
//! kube-proxy does, externalTrafficPolicy=Local's short-circuit for this node's pods, source
//! ranges that fail closed, and NodePort conflicts settled by age. Real TCP and UDP through
//! a lab of network namespaces, the agent on every node serving manifests.
use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_common::counters;
use lb_tests::{
    cluster::{service, Cluster, Endpoint, Manifests},
    lab::Spec,
    traffic::{parse_answer, tcp_ask, udp_ask},
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);

fn start(yaml: &str) -> Cluster {
    lb_tests::require_root();
    let spec = Spec { pods_per_node: vec![1, 1], clients: 1, ..Spec::default() };
    Cluster::start("lbk", &spec, Manifests::inline(yaml).unwrap(), &[]).unwrap()
}

/// A refusal: TCP and UDP both refused, in well under a second.
fn refused(ns: &str, dst: SocketAddrV4, what: &str) {
    let started = Instant::now();
    assert_eq!(tcp_ask(ns, dst).unwrap_err().kind(), ErrorKind::ConnectionRefused, "{what}: TCP refused");
    assert!(started.elapsed() < Duration::from_secs(1), "{what}: refused in {:?}", started.elapsed());
    let err = udp_ask(ns, "0.0.0.0:0".parse().unwrap(), dst).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{what}: UDP refused");
}

/// A drop: no answer at all (the client times out).
fn dropped(ns: &str, dst: SocketAddrV4, what: &str) {
    let kind = tcp_ask(ns, dst).unwrap_err().kind();
    assert!(matches!(kind, ErrorKind::TimedOut | ErrorKind::WouldBlock), "{what}: TCP gets no answer ({kind:?})");
    let kind = udp_ask(ns, "0.0.0.0:0".parse().unwrap(), dst).unwrap_err().kind();
    assert!(matches!(kind, ErrorKind::TimedOut | ErrorKind::WouldBlock), "{what}: UDP gets no answer ({kind:?})");
}

#[test]
fn refuse_when_nothing_serves_anywhere_and_drop_when_only_the_local_policy_finds_nothing() {
    let yaml = [
        service(
            "nothing",
            "",
            "type: LoadBalancer, clusterIP: 10.96.4.1, externalIPs: [192.168.60.21]",
            80,
            30101,
            &[],
            Some("192.168.60.11"),
        ),
        service(
            "itp-elsewhere",
            "",
            "clusterIP: 10.96.4.2, internalTrafficPolicy: Local",
            80,
            30102,
            &[Endpoint::ready(POD_B, "node2")],
            None,
        ),
        service(
            "etp-elsewhere",
            "",
            "type: LoadBalancer, clusterIP: 10.96.4.3, externalTrafficPolicy: Local, healthCheckNodePort: 32103",
            80,
            30103,
            &[Endpoint::ready(POD_B, "node2")],
            Some("192.168.60.13"),
        ),
    ]
    .concat();
    let c = start(&yaml);
    let pod_a = &c.lab.nodes[0].pods[0].ns.name;
    let client = &c.lab.clients[0].ns.name;
    // No endpoint anywhere: every frontend refuses.
    refused(pod_a, SocketAddrV4::new(Ipv4Addr::new(10, 96, 4, 1), 80), "ClusterIP");
    refused(client, c.node_port(0, 30101), "NodePort");
    refused(client, "192.168.60.11:80".parse().unwrap(), "LoadBalancer IP");
    refused(client, "192.168.60.21:80".parse().unwrap(), "externalIP");
    // internalTrafficPolicy=Local with endpoints only elsewhere: the ClusterIP drops.
    dropped(pod_a, SocketAddrV4::new(Ipv4Addr::new(10, 96, 4, 2), 80), "ITP Local ClusterIP");
    // externalTrafficPolicy=Local with endpoints only elsewhere: the external frontends drop
    // (a cloud load balancer's health check decides), silently.
    dropped(client, c.node_port(0, 30103), "ETP Local NodePort");
    dropped(client, "192.168.60.13:80".parse().unwrap(), "ETP Local LoadBalancer IP");
    let agent = &c.agents[0];
    assert!(agent.counter(counters::REFUSED_NO_BACKEND) >= 8);
    assert!(agent.counter(counters::DROP_NO_LOCAL_BACKEND) >= 6);
}

#[test]
fn local_pods_reaching_an_external_local_frontend_are_short_circuited_to_the_cluster_set() {
    let yaml = service(
        "etp-elsewhere",
        "",
        "type: NodePort, clusterIP: 10.96.4.3, externalTrafficPolicy: Local",
        80,
        30103,
        &[Endpoint::ready(POD_B, "node2")],
        None,
    );
    let c = start(&yaml);
    let pod_a = &c.lab.nodes[0].pods[0].ns.name;
    // From outside, node1 has no local endpoint: dropped.
    dropped(&c.lab.clients[0].ns.name, c.node_port(0, 30103), "from outside");
    // From node1's own pod: the cluster set (pod-b on node2), the pod's address kept.
    for _ in 0..3 {
        let (backend, peer) = parse_answer(&tcp_ask(pod_a, c.node_port(0, 30103)).unwrap()).unwrap();
        assert_eq!((backend.as_str(), *peer.ip()), ("pod-b", POD_A), "short-circuited, source kept");
        let (backend, peer) =
            parse_answer(&udp_ask(pod_a, "0.0.0.0:0".parse().unwrap(), c.node_port(0, 30103)).unwrap()).unwrap();
        assert_eq!((backend.as_str(), *peer.ip()), ("pod-b", POD_A));
    }
}

#[test]
fn a_service_whose_every_source_range_is_invalid_is_closed() {
    let yaml = [service(
        "closed",
        "",
        "type: LoadBalancer, clusterIP: 10.96.4.4, loadBalancerSourceRanges: [not-a-cidr]",
        80,
        30104,
        &[Endpoint::ready(POD_A, "node1")],
        Some("192.168.60.14"),
    )]
    .concat();
    let c = start(&yaml);
    let client = &c.lab.clients[0].ns.name;
    dropped(client, "192.168.60.14:80".parse().unwrap(), "the LoadBalancer IP of a closed Service");
    assert!(tcp_ask(client, c.node_port(0, 30104)).is_ok(), "source ranges never apply to NodePorts");
    assert!(c.agents[0].counter(counters::DROP_SOURCE_RANGE) >= 2);
    assert!(
        c.agents[0].log_text().contains("spec.loadBalancerSourceRanges[0]"),
        "the error names the field:\n{}",
        c.agents[0].log_text()
    );
}

#[test]
fn a_nodeport_claimed_twice_stays_with_the_service_created_first() {
    let claim = |older: &str, newer: &str| {
        [
            service(
                older,
                ", creationTimestamp: \"2024-01-01T00:00:00Z\"",
                "type: NodePort, clusterIP: 10.96.4.5",
                80,
                30105,
                &[Endpoint::ready(
                    if older == "alpha" { POD_A } else { POD_B },
                    if older == "alpha" { "node1" } else { "node2" },
                )],
                None,
            ),
            service(
                newer,
                ", creationTimestamp: \"2025-01-01T00:00:00Z\"",
                "type: NodePort, clusterIP: 10.96.4.6",
                80,
                30105,
                &[Endpoint::ready(
                    if newer == "alpha" { POD_A } else { POD_B },
                    if newer == "alpha" { "node1" } else { "node2" },
                )],
                None,
            ),
        ]
        .concat()
    };
    for (older, newer, backend) in [("alpha", "beta", "pod-a"), ("beta", "alpha", "pod-b")] {
        let c = start(&claim(older, newer));
        let client = &c.lab.clients[0].ns.name;
        for _ in 0..3 {
            let (answered, _) = parse_answer(&tcp_ask(client, c.node_port(0, 30105)).unwrap()).unwrap();
            assert_eq!(answered, backend, "{older}, created first, keeps the NodePort");
        }
        let log = c.agents[0].log_text();
        assert!(log.contains(&format!("Service default/{newer}")), "the loser is named:\n{log}");
    }
}

/// kube-proxy's UDP conntrack cleanup: an endpoint that stops serving but stays in its slice
/// keeps its backend id (established TCP carries on), yet its UDP flows must go at once so
/// the client's next datagram, from the same address and port, chooses again.
#[test]
fn udp_flows_to_an_endpoint_that_stops_serving_choose_again() {
    let with = |a: Endpoint, b: Endpoint| {
        service("udp-stop", "", "type: NodePort, clusterIP: 10.96.4.6", 80, 30106, &[a, b], None)
    };
    let c = start(&with(Endpoint::ready(POD_A, "node1"), Endpoint::ready(POD_B, "node2")));
    let client = &c.lab.clients[0].ns.name;
    let src: SocketAddrV4 = SocketAddrV4::new(c.lab.clients[0].addr, 40_106);
    let ask = || parse_answer(&udp_ask(client, src, c.node_port(0, 30106)).unwrap()).unwrap().0;
    let first = ask();
    assert_eq!(ask(), first, "one flow keeps its backend");
    let (stopped, other) = if first == "pod-a" {
        (Endpoint::stopped(POD_A, "node1"), Endpoint::ready(POD_B, "node2"))
    } else {
        (Endpoint::ready(POD_A, "node1"), Endpoint::stopped(POD_B, "node2"))
    };
    c.apply(&with(stopped, other)).unwrap();
    // The cleanup runs on the agent's conntrack thread right after the sync: allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut now = ask();
    while now == first && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = ask();
    }
    assert_ne!(now, first, "the flow to the stopped endpoint was removed and the datagram chose again");
    assert_eq!(ask(), now, "the new flow keeps its backend");
}
