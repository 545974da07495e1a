//! Needs root and BPF, and promtool (Debian's `prometheus` package, which `cargo xtask setup`
//! installs). The agent's /metrics (issue 10), scraped from inside the node's namespace the
//! way a Prometheus on the node would: per-Service and per-backend counters move by exactly
//! the traffic sent, a drop is counted under its reason, counters run on across an agent
//! restart (they are read from the pinned maps, never zeroed), kube-proxy's sync metrics
//! follow the syncs, `promtool check metrics` accepts the output, and a map entry changed
//! behind the agent's back is repaired and counted.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use lb_common::{map_names, ServiceKey, ServiceValue, SlotKey, IPPROTO_TCP};
use lb_tests::{
    agent::lb_user_bin,
    cluster::{service, Cluster, Endpoint, Manifests},
    lab::Spec,
    metrics::{promtool_accepts, scrape},
    traffic::{tcp_ask, udp_ask},
};
use serde_json::Value;

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);

/// Two nodes with a pod each (pod-a on node1, pod-b on node2), one client.
fn start(yaml: &str, agent_args: &[&str]) -> Cluster {
    lb_tests::require_root();
    let spec = Spec { pods_per_node: vec![1, 1], clients: 1, ..Spec::default() };
    Cluster::start("lbm", &spec, Manifests::inline(yaml).unwrap(), agent_args).unwrap()
}

/// A frame's size as the hooks count it: Ethernet (14) + IPv4 (20) + UDP (8) + payload.
fn udp_frame_len(payload: usize) -> u64 {
    (14 + 20 + 8 + payload) as u64
}

/// `lb-user COMMAND --json --pin-dir DIR [extra]`, parsed.
fn json(command: &str, pin_dir: &Path, extra: &[&str]) -> Value {
    let dir = pin_dir.display().to_string();
    let out =
        Command::new(lb_user_bin().unwrap()).args([command, "--json", "--pin-dir", &dir]).args(extra).output().unwrap();
    assert!(out.status.success(), "lb-user {command}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn metrics_count_exactly_the_traffic_and_drops_and_run_on_across_a_restart() {
    // One Service per kind of frontend, so each backend's counts are its frontend's alone.
    let np =
        |endpoints: &[Endpoint]| service("np", "", "type: NodePort, clusterIP: 10.96.20.2", 80, 30602, endpoints, None);
    let others = [
        service("cip", "", "clusterIP: 10.96.20.1", 80, 30601, &[Endpoint::ready(POD_B, "node2")], None),
        service(
            "lb",
            "",
            "type: LoadBalancer, clusterIP: 10.96.20.3",
            80,
            30603,
            &[Endpoint::ready(POD_A, "node1")],
            Some("192.168.60.53"),
        ),
        service(
            "ext",
            "",
            "clusterIP: 10.96.20.4, externalIPs: [192.168.60.44]",
            80,
            30604,
            &[Endpoint::ready(POD_B, "node2")],
            None,
        ),
        service(
            "ranged",
            "",
            "type: LoadBalancer, clusterIP: 10.96.20.5, loadBalancerSourceRanges: [192.168.50.200/32]",
            80,
            30605,
            &[Endpoint::ready(POD_A, "node1")],
            Some("192.168.60.55"),
        ),
    ]
    .concat();
    let mut c = start(&[np(&[Endpoint::ready(POD_B, "node2")]), others.clone()].concat(), &[]);
    let node_ns = c.lab.nodes[0].ns.name.clone();
    let pins = c.agents[0].pin_dir.clone();
    let pod_a = c.lab.nodes[0].pods[0].ns.name.clone();
    let client = c.lab.clients[0].ns.name.clone();
    let any: SocketAddrV4 = "0.0.0.0:0".parse().unwrap();
    let before = scrape(&node_ns);
    promtool_accepts(&before.text);

    // (service, sender, frontend, frontend label, backend, its node): all through node1.
    let cases = [
        ("cip", &pod_a, SocketAddrV4::new(Ipv4Addr::new(10, 96, 20, 1), 80), "clusterIP", POD_B, "node2"),
        ("np", &client, SocketAddrV4::new(c.lab.nodes[0].addr, 30602), "nodePort", POD_B, "node2"),
        ("lb", &client, "192.168.60.53:80".parse().unwrap(), "loadBalancer", POD_A, "node1"),
        ("ext", &client, "192.168.60.44:80".parse().unwrap(), "externalIP", POD_B, "node2"),
    ];
    const UDP_ASKS: u64 = 4;
    const TCP_CONNECTIONS: u64 = 3;
    let mut udp_bytes = Vec::new();
    for (_, ns, dst, ..) in &cases {
        let mut bytes = 0;
        for _ in 0..UDP_ASKS {
            // A new source port each time: a new flow, one request and one reply.
            let answer = udp_ask(ns, any, *dst).unwrap();
            bytes += udp_frame_len(b"hello".len()) + udp_frame_len(answer.len());
        }
        udp_bytes.push(bytes);
        for _ in 0..TCP_CONNECTIONS {
            tcp_ask(ns, *dst).unwrap();
        }
    }
    assert!(udp_ask(&client, any, "192.168.60.55:80".parse().unwrap()).is_err(), "the source is out of range");
    let after = scrape(&node_ns);
    promtool_accepts(&after.text);
    let stats = json("stats", &pins, &[]);

    let moved = |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    for ((name, _, dst, frontend, backend, node), udp_bytes) in cases.iter().zip(udp_bytes) {
        let endpoint = format!("{backend}:8080");
        for (port, protocol) in [("udp", "UDP"), ("tcp", "TCP")] {
            let service = [("namespace", "default"), ("service", name), ("port", port), ("protocol", protocol)];
            let of_frontend = [&service[..], &[("frontend", *frontend)]].concat();
            let of_backend = [&service[..], &[("endpoint", endpoint.as_str()), ("node", node)]].concat();
            let packets = moved("kube_xdp_lb_service_packets_total", &of_frontend);
            let bytes = moved("kube_xdp_lb_service_bytes_total", &of_frontend);
            let flows = moved("kube_xdp_lb_service_new_flows_total", &of_frontend);
            if protocol == "UDP" {
                assert_eq!(
                    (packets, bytes, flows),
                    ((2 * UDP_ASKS) as f64, udp_bytes as f64, UDP_ASKS as f64),
                    "{name}"
                );
                // UDP flows stay tracked until they expire; closed TCP connections do not.
                assert_eq!(after.get("kube_xdp_lb_backend_live_flows", &of_backend), UDP_ASKS as f64, "{name}");
            } else {
                // A handshake, a request and an answer at least, each way through this node.
                assert!(packets >= (5 * TCP_CONNECTIONS) as f64, "{name}: {packets} TCP packets");
                assert_eq!(flows, TCP_CONNECTIONS as f64, "{name}: one new flow per connection");
                assert_eq!(after.get("kube_xdp_lb_backend_live_flows", &of_backend), 0.0, "{name}");
            }
            // The Service port's backend carried the same: its only frontend carried it all.
            assert_eq!(moved("kube_xdp_lb_backend_packets_total", &of_backend), packets, "{name} {protocol}");
            assert_eq!(moved("kube_xdp_lb_backend_bytes_total", &of_backend), bytes, "{name} {protocol}");
            assert_eq!(moved("kube_xdp_lb_backend_new_flows_total", &of_backend), flows, "{name} {protocol}");
            // The same counts as `lb-user stats` reads from the same maps.
            let listed = stats["frontends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["frontend"] == format!("{dst}/{protocol}"))
                .unwrap_or_else(|| panic!("no {dst}/{protocol} in {stats:#}"));
            assert_eq!(
                after.get("kube_xdp_lb_service_packets_total", &of_frontend),
                listed["packets"].as_f64().unwrap()
            );
        }
    }
    // Frontends nobody used moved nothing: the LoadBalancer Service's NodePort.
    let lb_node_port = [("service", "lb"), ("protocol", "UDP"), ("frontend", "nodePort")];
    assert_eq!(moved("kube_xdp_lb_service_packets_total", &lb_node_port), 0.0);
    // Every drop counted under its reason, as `lb-user status` lists them: one out of range.
    let status = json("status", &pins, &[]);
    for counter in status["counters"].as_array().unwrap() {
        let (reason, kind) = (counter["name"].as_str().unwrap(), counter["kind"].as_str().unwrap());
        if kind != "drop" {
            continue;
        }
        let labels = [("kind", "drop"), ("reason", reason)];
        assert_eq!(after.get("kube_xdp_lb_packets_total", &labels), counter["packets"].as_f64().unwrap(), "{reason}");
        let expected = if reason == "drop_source_range" { 1.0 } else { 0.0 };
        assert_eq!(moved("kube_xdp_lb_packets_total", &labels), expected, "{reason}");
    }
    // NodePort and externalIP flows to node2's backend hold SNAT ports (the UDP ones still
    // live); conntrack holds both halves of every live flow.
    assert!(after.get("kube_xdp_lb_nat_ports_in_use", &[]) >= (2 * UDP_ASKS) as f64, "{}", after.text);
    assert!(after.get("kube_xdp_lb_nat_busiest_destination_ports", &[]) >= (2 * UDP_ASKS) as f64);
    assert_eq!(after.get("kube_xdp_lb_nat_ports", &[]), 32768.0);
    let conntrack = [("map", map_names::CONNTRACK)];
    assert!(after.get("kube_xdp_lb_map_entries", &conntrack) >= (2 * 4 * UDP_ASKS) as f64);
    assert_eq!(after.get("kube_xdp_lb_map_capacity", &conntrack), lb_common::DEFAULT_CONNTRACK_ENTRIES as f64);
    let services_map = [("map", map_names::SERVICES)];
    let frontends = json("services", &pins, &[])["frontends"].as_array().unwrap().len();
    assert_eq!(after.get("kube_xdp_lb_map_entries", &services_map), frontends as f64);
    // The first sync.
    assert_eq!(after.get("kubeproxy_sync_proxy_rules_duration_seconds_count", &[]), 1.0);
    assert!(after.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds", &[]) > 1.7e9);
    assert!(after.get("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", &[]) > 1.7e9);
    for policy in ["internal", "external"] {
        let labels = [("traffic_policy", policy)];
        assert_eq!(after.get("kubeproxy_sync_proxy_rules_no_local_endpoints_total", &labels), 0.0, "{policy}");
    }
    assert_eq!(after.get("kube_xdp_lb_sync_errors_total", &[]), 0.0);

    // A new agent process reads the same pinned counters, and they keep counting.
    let np_udp = [("service", "np"), ("protocol", "UDP"), ("frontend", "nodePort")];
    let np_backend = [("service", "np"), ("protocol", "UDP"), ("endpoint", "10.244.2.10:8080")];
    c.agents[0].restart().unwrap();
    let restarted = scrape(&node_ns);
    for name in ["kube_xdp_lb_service_packets_total", "kube_xdp_lb_service_bytes_total"] {
        assert_eq!(restarted.get(name, &np_udp), after.get(name, &np_udp), "{name}");
    }
    let backend_packets = "kube_xdp_lb_backend_packets_total";
    assert_eq!(restarted.get(backend_packets, &np_backend), after.get(backend_packets, &np_backend));
    udp_ask(&client, any, cases[1].2).unwrap();
    let more = scrape(&node_ns);
    let packets = "kube_xdp_lb_service_packets_total";
    assert_eq!(more.get(packets, &np_udp), after.get(packets, &np_udp) + 2.0);
    assert_eq!(more.get(backend_packets, &np_backend), after.get(backend_packets, &np_backend) + 2.0);

    // A change of the manifests: one more sync, and the time from the change to its write.
    c.apply(&[np(&[Endpoint::ready(POD_A, "node1"), Endpoint::ready(POD_B, "node2")]), others].concat()).unwrap();
    let changed = scrape(&node_ns);
    assert_eq!(changed.get("kubeproxy_sync_proxy_rules_duration_seconds_count", &[]), 2.0);
    assert_eq!(changed.get("kubeproxy_network_programming_duration_seconds_count", &[]), 1.0);
    let latency = changed.get("kubeproxy_network_programming_duration_seconds_sum", &[]);
    assert!(latency > 0.0 && latency < 5.0, "{latency} s");
    let new_backend = [("service", "np"), ("protocol", "UDP"), ("endpoint", "10.244.1.10:8080"), ("node", "node1")];
    assert_eq!(changed.get(backend_packets, &new_backend), 0.0);
    promtool_accepts(&changed.text);
}

#[test]
fn a_slot_changed_behind_the_agents_back_is_repaired_and_counted() {
    let yaml = service(
        "web",
        "",
        "type: NodePort, clusterIP: 10.96.21.1",
        80,
        30610,
        &[Endpoint::ready(POD_A, "node1"), Endpoint::ready(POD_B, "node2")],
        None,
    );
    let c = start(&yaml, &["--drift-check-interval", "1"]);
    let node_ns = c.lab.nodes[0].ns.name.clone();
    let pins = &c.agents[0].pin_dir;
    let manifests = c.manifests.path.display().to_string();
    let node_addr = c.lab.nodes[0].addr.to_string();
    let model = ["--manifests", manifests.as_str(), "--node-name", "node1", "--node-address", node_addr.as_str()];
    let view = json("services", pins, &model);
    assert_eq!(view["drift"], serde_json::json!([]), "{view:#}");
    let id_of = |frontend: &str| {
        let f = view["frontends"].as_array().unwrap().iter().find(|f| f["frontend"] == frontend).unwrap();
        f["backends"][0]["id"].as_u64().unwrap() as u32
    };
    let foreign = id_of("10.96.21.1:80/UDP");
    // The agent checks every second and has found nothing to repair.
    let deadline = Instant::now() + Duration::from_secs(10);
    while scrape(&node_ns).get("kube_xdp_lb_drift_checks_total", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "no drift check within 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(scrape(&node_ns).get("kube_xdp_lb_drift_repairs_total", &[]), 0.0);

    // Behind the agent's back: the ClusterIP's TCP slot 0 now names the UDP port's backend.
    let services_map: HashMap<MapData, ServiceKey, ServiceValue> =
        lb_user::datapath::open_map(pins, map_names::SERVICES).unwrap().try_into().unwrap();
    let key = ServiceKey::new(Ipv4Addr::new(10, 96, 21, 1), 80, IPPROTO_TCP);
    let v = services_map.get(&key, 0).unwrap();
    let mut slots: HashMap<MapData, SlotKey, u32> =
        lb_user::datapath::open_map(pins, map_names::SLOTS).unwrap().try_into().unwrap();
    slots.insert(SlotKey::new(v.svc_id, v.gen, 0, 0), foreign, 0).unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while scrape(&node_ns).get("kube_xdp_lb_drift_repairs_total", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "not repaired within 10 s:\n{}", c.agents[0].log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(json("services", pins, &model)["drift"], serde_json::json!([]), "the maps hold the model again");
    let repaired = services_map.get(&key, 0).unwrap();
    assert_ne!(repaired.gen, v.gen, "the set was written whole under the other generation");
    assert!(
        c.agents[0].log_text().contains("repairing 10.96.21.1:80/TCP: slots[0]"),
        "the repair is logged:\n{}",
        c.agents[0].log_text()
    );
    // Counted once: later checks find nothing more.
    std::thread::sleep(Duration::from_millis(2500));
    let later = scrape(&node_ns);
    assert_eq!(later.get("kube_xdp_lb_drift_repairs_total", &[]), 1.0);
    promtool_accepts(&later.text);
}
