//! Needs root and BPF. What operators read (issue 10): `lb-user stats --json` counts exactly
//! the packets, bytes and flows sent through each kind of frontend; `status --json` and
//! /metrics count each drop it can be made to see under its reason; `services --json` flags a
//! map entry changed behind the agent's back; bpftool prints every pinned map with named
//! fields; the CLI names a pin directory it cannot use. Real traffic through a lab of network
//! namespaces, the agent on every node serving manifests.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use lb_common::{map_names, user::addr_be, ServiceKey, ServiceValue, SlotKey, IPPROTO_TCP};
use lb_tests::{
    agent::lb_user_bin,
    cluster::{service, Cluster, Endpoint, Manifests},
    lab::{in_netns, Spec},
    metrics::scrape,
    packet::{Frame, SYN},
    traffic::{tcp_ask, udp_ask},
};
use serde_json::Value;

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);

/// Two nodes with a pod each (pod-a on node1, pod-b on node2), one client.
fn start(yaml: &str, agent_args: &[&str]) -> Cluster {
    lb_tests::require_root();
    let spec = Spec { pods_per_node: vec![1, 1], clients: 1, ..Spec::default() };
    Cluster::start("lbt", &spec, Manifests::inline(yaml).unwrap(), agent_args).unwrap()
}

/// Runs lb-user with `args`; its stdout, or its stderr as the error.
fn lb_user(args: &[&str]) -> Result<String, String> {
    let out = Command::new(lb_user_bin().unwrap()).args(args).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `lb-user COMMAND --json --pin-dir DIR [extra]`, parsed.
fn json(command: &str, pin_dir: &Path, extra: &[&str]) -> Value {
    let dir = pin_dir.display().to_string();
    let mut args = vec![command, "--json", "--pin-dir", &dir];
    args.extend_from_slice(extra);
    let text = lb_user(&args).unwrap_or_else(|e| panic!("lb-user {args:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("lb-user {args:?} printed no JSON ({e}): {text}"))
}

/// The entry of `list` whose `key` is `value`.
fn find<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array().unwrap().iter().find(|e| e[key] == value).unwrap_or_else(|| panic!("no {key} {value} in {list:#}"))
}

/// (packets, bytes, new_flows) of a stats entry.
fn counts(e: &Value) -> (u64, u64, u64) {
    (e["packets"].as_u64().unwrap(), e["bytes"].as_u64().unwrap(), e["new_flows"].as_u64().unwrap())
}

/// A frame's size as the hooks count it: Ethernet (14) + IPv4 (20) + UDP (8) + payload.
fn udp_frame_len(payload: usize) -> u64 {
    (14 + 20 + 8 + payload) as u64
}

#[test]
fn stats_count_exactly_what_each_kind_of_frontend_carried() {
    // One Service per kind of frontend, so each backend's counts are its frontend's alone.
    let yaml = [
        service("cip", "", "clusterIP: 10.96.7.1", 80, 30300, &[Endpoint::ready(POD_B, "node2")], None),
        service("np", "", "type: NodePort, clusterIP: 10.96.7.2", 80, 30301, &[Endpoint::ready(POD_B, "node2")], None),
        service(
            "lb",
            "",
            "type: LoadBalancer, clusterIP: 10.96.7.3",
            80,
            30302,
            &[Endpoint::ready(POD_A, "node1")],
            Some("192.168.60.31"),
        ),
        service(
            "ext",
            "",
            "clusterIP: 10.96.7.4, externalIPs: [192.168.60.41]",
            80,
            30303,
            &[Endpoint::ready(POD_B, "node2")],
            None,
        ),
    ]
    .concat();
    let c = start(&yaml, &[]);
    let pod_a = &c.lab.nodes[0].pods[0].ns.name;
    let client = &c.lab.clients[0].ns.name;
    // (service, sender, frontend address, port, kind, backend): every case goes through node1.
    let cases = [
        ("cip", pod_a, Ipv4Addr::new(10, 96, 7, 1), 80, "ClusterIP", POD_B),
        ("np", client, c.lab.nodes[0].addr, 30301, "NodePort", POD_B),
        ("lb", client, Ipv4Addr::new(192, 168, 60, 31), 80, "LoadBalancer", POD_A),
        ("ext", client, Ipv4Addr::new(192, 168, 60, 41), 80, "ExternalIP", POD_B),
    ];
    const UDP_ASKS: u64 = 5;
    const TCP_CONNECTIONS: u64 = 3;
    let mut expected_udp_bytes = Vec::new();
    for (_, ns, addr, port, _, _) in &cases {
        let dst = SocketAddrV4::new(*addr, *port);
        let mut bytes = 0;
        for _ in 0..UDP_ASKS {
            // A new source port each time: a new flow, one request and one reply.
            let answer = udp_ask(ns, "0.0.0.0:0".parse().unwrap(), dst).unwrap();
            bytes += udp_frame_len(b"hello".len()) + udp_frame_len(answer.len());
        }
        expected_udp_bytes.push(bytes);
        for _ in 0..TCP_CONNECTIONS {
            tcp_ask(ns, dst).unwrap();
        }
    }
    let stats = json("stats", &c.agents[0].pin_dir, &[]);
    for ((name, _, addr, port, kind, backend), udp_bytes) in cases.iter().zip(expected_udp_bytes) {
        let udp = find(&stats["frontends"], "frontend", &format!("{addr}:{port}/UDP"));
        assert_eq!(udp["kind"], *kind);
        assert_eq!(udp["service"], serde_json::json!({"namespace": "default", "name": name, "port": "udp"}));
        assert_eq!(counts(udp), (2 * UDP_ASKS, udp_bytes, UDP_ASKS), "{name}: UDP frontend {udp:#}");
        // The Service port's backend saw the same (its only frontend carried it all).
        let of_port = |proto: &str| {
            stats["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["service"]["name"] == *name && b["protocol"] == proto)
                .unwrap_or_else(|| panic!("no {proto} backend of {name}: {stats:#}"))
                .clone()
        };
        let udp_backend = of_port("UDP");
        assert_eq!(udp_backend["backend"], format!("{backend}:8080"));
        assert_eq!(counts(&udp_backend), counts(udp), "{name}: UDP backend");
        let tcp = find(&stats["frontends"], "frontend", &format!("{addr}:{port}/TCP"));
        let (packets, _, flows) = counts(tcp);
        assert_eq!(flows, TCP_CONNECTIONS, "{name}: one new flow per connection");
        // A handshake, a request and an answer at least, each way through this node.
        assert!(packets >= 5 * TCP_CONNECTIONS, "{name}: {packets} TCP packets");
        assert_eq!(counts(&of_port("TCP")), counts(tcp), "{name}: TCP backend");
        assert_eq!(of_port("TCP")["live_flows"], 0, "{name}: every connection closed");
    }
    // Frontends nobody used count nothing: the LoadBalancer Service's NodePort.
    let idle = find(&stats["frontends"], "frontend", &format!("{}:30302/UDP", c.lab.nodes[0].addr));
    assert_eq!(counts(idle), (0, 0, 0));
    // The other node translated none of it.
    let node2 = json("stats", &c.agents[1].pin_dir, &[]);
    assert!(node2["frontends"].as_array().unwrap().iter().all(|f| counts(f) == (0, 0, 0)), "{node2:#}");
    // Sampled twice, the rates of an idle datapath are zero; the table form shows them.
    let sampled = json("stats", &c.agents[0].pin_dir, &["--interval", "0.2"]);
    let rates = &find(&sampled["frontends"], "frontend", "10.96.7.1:80/UDP")["rates"];
    assert_eq!(rates["packets_per_s"], 0.0, "{sampled:#}");
    let dir = c.agents[0].pin_dir.display().to_string();
    let table = lb_user(&["stats", "--pin-dir", &dir, "--watch", "--interval", "0.2", "--count", "2"]).unwrap();
    assert_eq!(table.matches("Frontends (rates over the last").count(), 1, "{table}");
    assert!(table.contains("default/cip:udp") && table.contains("10.96.7.1:80/UDP"), "{table}");
    // Without --count, --watch reads until Ctrl-C, then exits cleanly.
    let mut watch = Command::new(lb_user_bin().unwrap())
        .args(["stats", "--pin-dir", &dir, "--watch", "--interval", "0.2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(watch.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = watch.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!("stats --watch still runs 5 s after Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut watch.stdout.take().unwrap(), &mut text).unwrap();
    assert!(status.success(), "{status}: {text}");
    assert!(text.matches("Frontends (rates over the last").count() >= 1, "{text}");
}

/// Sends one IPv4 packet as given (source, checksums and all) from inside `ns`.
fn send_raw(ns: &str, packet: Vec<u8>, to: Ipv4Addr) {
    in_netns(ns, move || {
        // SAFETY: a raw socket we own and close below; IPPROTO_RAW implies IP_HDRINCL.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.octets()) },
            sin_zero: [0; 8],
        };
        // SAFETY: our buffer, a valid sockaddr_in.
        let sent = unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        let err = std::io::Error::last_os_error();
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(fd) };
        assert_eq!(sent, packet.len() as isize, "sendto: {err}");
    });
}

/// The counter `name` of `lb-user status --json`, and its kind.
fn counter(status: &Value, name: &str) -> (u64, String) {
    let c = find(&status["counters"], "name", name);
    (c["packets"].as_u64().unwrap(), c["kind"].as_str().unwrap().to_string())
}

#[test]
fn each_drop_is_counted_under_its_reason_and_bpftool_prints_every_map_by_field() {
    let yaml = [
        service("empty", "", "type: NodePort, clusterIP: 10.96.8.1", 80, 30401, &[], None),
        service(
            "elsewhere",
            "",
            "type: NodePort, clusterIP: 10.96.8.2, externalTrafficPolicy: Local",
            80,
            30402,
            &[Endpoint::ready(POD_B, "node2")],
            None,
        ),
        service(
            "ranged",
            "",
            "type: LoadBalancer, clusterIP: 10.96.8.3, loadBalancerSourceRanges: [192.168.50.200/32]",
            80,
            30403,
            &[Endpoint::ready(POD_A, "node1")],
            Some("192.168.60.33"),
        ),
        service(
            "remote",
            "",
            "type: NodePort, clusterIP: 10.96.8.4",
            80,
            30404,
            &[Endpoint::ready(POD_B, "node2")],
            None,
        ),
    ]
    .concat();
    // One SNAT port: a second flow toward the same backend finds none.
    let c = start(&yaml, &["--snat-ports", "40000-40000"]);
    let client = &c.lab.clients[0];
    let pins = &c.agents[0].pin_dir;
    let node = c.lab.nodes[0].addr;
    let any: SocketAddrV4 = "0.0.0.0:0".parse().unwrap();
    // (counter, its kind, what provokes it once)
    type Provoke<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, &str, Provoke)> = vec![
        (
            "refused_no_backend",
            "answer",
            Box::new(|| assert!(udp_ask(&client.ns.name, any, SocketAddrV4::new(node, 30401)).is_err())),
        ),
        (
            "drop_no_local_backend",
            "drop",
            Box::new(|| assert!(udp_ask(&client.ns.name, any, SocketAddrV4::new(node, 30402)).is_err())),
        ),
        (
            "drop_source_range",
            "drop",
            Box::new(|| assert!(udp_ask(&client.ns.name, any, "192.168.60.33:80".parse().unwrap()).is_err())),
        ),
        (
            "drop_malformed",
            "drop",
            Box::new(|| {
                // A TCP header cut to its first 8 bytes, to a frontend.
                let frame = Frame::tcp(SocketAddrV4::new(client.addr, 5555), SocketAddrV4::new(node, 30404), SYN);
                let mut packet = frame.bytes()[14..14 + 20 + 8].to_vec();
                packet[2..4].copy_from_slice(&28u16.to_be_bytes());
                send_raw(&client.ns.name, packet, node);
            }),
        ),
        (
            "drop_nat_exhausted",
            "drop",
            Box::new(|| assert!(udp_ask(&client.ns.name, any, SocketAddrV4::new(node, 30404)).is_err())),
        ),
    ];
    // The first flow to the remote backend takes the only SNAT port (and keeps it).
    udp_ask(&client.ns.name, any, SocketAddrV4::new(node, 30404)).unwrap();
    let node_ns = &c.lab.nodes[0].ns.name;
    for (name, kind, provoke) in &cases {
        let before = json("status", pins, &[]);
        let scraped_before = scrape(node_ns);
        provoke();
        // The malformed packet is on its way when sendto returns: wait (bounded) for it.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut after = json("status", pins, &[]);
        while counter(&after, name).0 == counter(&before, name).0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            after = json("status", pins, &[]);
        }
        assert_eq!(counter(&after, name), (counter(&before, name).0 + 1, kind.to_string()), "{name}");
        // /metrics counts it under the same reason and kind.
        let labels = [("kind", *kind), ("reason", *name)];
        let moved = scrape(node_ns).get("kube_xdp_lb_packets_total", &labels)
            - scraped_before.get("kube_xdp_lb_packets_total", &labels);
        assert_eq!(moved, 1.0, "/metrics: {name}");
        // Nothing else was dropped for it.
        for other in after["counters"].as_array().unwrap() {
            let other_name = other["name"].as_str().unwrap();
            if other["kind"] == "drop" && other_name != *name {
                assert_eq!(counter(&after, other_name), counter(&before, other_name), "{name} counted as {other_name}");
            }
        }
    }
    // In the node's namespace, where its devices are.
    let status = json("status", pins, &["--netns", &c.lab.nodes[0].ns.name]);
    assert_eq!(status["nat"]["busiest"], format!("{POD_B}:8080/UDP"), "{:#}", status["nat"]);
    assert_eq!((status["nat"]["busiest_ports"].as_u64(), status["nat"]["ports"].as_u64()), (Some(1), Some(1)));
    let agent = &status["agent"];
    assert_eq!(
        (agent["running"].as_bool(), agent["syncs"].as_u64(), agent["sync_errors"].as_u64()),
        (Some(true), Some(1), Some(0)),
        "{agent:#}"
    );
    let xdp = find(&status["attachments"], "hook", "xdp");
    assert_eq!(
        (xdp["interface"].as_str(), xdp["current"].as_bool(), xdp["device_present"].as_bool()),
        (Some("eth0"), Some(true), Some(true))
    );

    // Every pinned map prints with named fields (BTF): the maps this traffic filled show their
    // fields, the others at least decoded values rather than raw bytes.
    let fields = [
        (map_names::SERVICES, "\"svc_id\""),
        (map_names::SLOTS, "\"index\""),
        (map_names::BACKENDS, "\"owner\""),
        (map_names::CONNTRACK, "\"nat_src_addr_be\""),
        (map_names::CT_STATE, "\"snat_cursor\""),
        (map_names::SRC_RANGES, "\"svc_id_be\""),
        (map_names::CONFIG, "\"snat_port_max\""),
        (map_names::COUNTERS, "\"packets\""),
        (map_names::RATE_LIMIT, "\"tokens\""),
        (map_names::REAP_QUEUE, "\"dst_port_be\""),
        (map_names::FRONTEND_STATS, "\"new_flows\""),
        (map_names::BACKEND_STATS, "\"new_flows\""),
        (map_names::FRONTEND_META, "\"port_name\""),
        (map_names::AGENT, "\"last_sync_duration_ns\""),
    ];
    for name in map_names::ALL {
        let out =
            Command::new("bpftool").args(["map", "dump", "pinned"]).arg(pins.join("maps").join(name)).output().unwrap();
        assert!(out.status.success(), "bpftool {name}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        match fields.iter().find(|(n, _)| *n == name) {
            Some((_, field)) => assert!(text.contains(field), "{name} shows {field}: {text:.2000}"),
            // Without BTF bpftool prints hex bytes ("key: 00 00 ..."); with it, JSON values.
            None => assert!(text.starts_with('[') && !text.contains("key:"), "{name}: {text:.2000}"),
        }
    }
}

#[test]
fn services_flags_a_slot_changed_behind_the_agents_back() {
    let yaml = service(
        "web",
        "",
        "type: NodePort, clusterIP: 10.96.9.1",
        80,
        30501,
        &[Endpoint::ready(POD_A, "node1"), Endpoint::ready(POD_B, "node2")],
        None,
    );
    // The agent would repair the change (lab_metrics tests that); here the CLI must see it.
    let c = start(&yaml, &["--drift-check-interval", "3600"]);
    let pins = &c.agents[0].pin_dir;
    let manifests = c.manifests.path.display().to_string();
    let node_addr = c.lab.nodes[0].addr.to_string();
    let model = ["--manifests", manifests.as_str(), "--node-name", "node1", "--node-address", node_addr.as_str()];
    let view = json("services", pins, &model);
    assert_eq!(view["drift"], serde_json::json!([]), "the agent's maps hold the model: {view:#}");
    let tcp = find(&view["frontends"], "frontend", "10.96.9.1:80/TCP");
    assert_eq!(tcp["service"], serde_json::json!({"namespace": "default", "name": "web", "port": "tcp"}));
    let states: Vec<(&str, &str, bool)> = tcp["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["backend"].as_str().unwrap(), b["state"].as_str().unwrap(), b["local"].as_bool().unwrap()))
        .collect();
    assert_eq!(states, [("10.244.1.10:8080", "active", true), ("10.244.2.10:8080", "active", false)]);

    // Behind the agent's back: the ClusterIP's TCP slot 0 now names the UDP port's backend.
    let services: HashMap<MapData, ServiceKey, ServiceValue> =
        lb_user::datapath::open_map(pins, map_names::SERVICES).unwrap().try_into().unwrap();
    let key = ServiceKey {
        addr_be: addr_be(Ipv4Addr::new(10, 96, 9, 1)),
        port_be: 80u16.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    let v = services.get(&key, 0).unwrap();
    let mut slots: HashMap<MapData, SlotKey, u32> =
        lb_user::datapath::open_map(pins, map_names::SLOTS).unwrap().try_into().unwrap();
    let udp = find(&view["frontends"], "frontend", "10.96.9.1:80/UDP");
    let foreign = udp["backends"][0]["id"].as_u64().unwrap() as u32;
    slots.insert(SlotKey::new(v.svc_id, v.gen, 0, 0), foreign, 0).unwrap();

    let view = json("services", pins, &model);
    let drift = view["drift"].as_array().unwrap();
    assert_eq!(drift.len(), 1, "{drift:#?}");
    assert_eq!(
        (drift[0]["frontend"].as_str(), drift[0]["field"].as_str()),
        (Some("10.96.9.1:80/TCP"), Some("slots[0]"))
    );
    assert!(drift[0]["have"].as_str().unwrap().contains("of another Service port"), "{drift:#?}");
    assert_eq!(find(&view["frontends"], "frontend", "10.96.9.1:80/TCP")["drift"].as_array().unwrap().len(), 1);
    // The table says so too; without the manifests nothing is compared.
    let dir = pins.display().to_string();
    let mut args = vec!["services", "--pin-dir", dir.as_str()];
    args.extend_from_slice(&model);
    let table = lb_user(&args).unwrap();
    assert!(table.contains("1 differences from the model") && table.contains("slots[0]"), "{table}");
    assert_eq!(json("services", pins, &[])["drift"], Value::Null);
}

#[test]
fn commands_name_the_pin_directory_they_cannot_use() {
    lb_tests::require_root();
    lb_user::datapath::ensure_bpffs().unwrap();
    let missing = format!("/sys/fs/bpf/lbt-missing-{}", std::process::id());
    let empty = lb_tests::Pins::new(&format!("lbt-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty.0).unwrap();
    let empty_dir = empty.0.display().to_string();
    let not_bpf = std::env::temp_dir().display().to_string();
    let cases = [
        (missing.as_str(), format!("--pin-dir {missing}: no such directory")),
        (empty_dir.as_str(), format!("--pin-dir {empty_dir}: not a pin directory of lb-user (no maps/LB_SERVICES)")),
        (not_bpf.as_str(), format!("--pin-dir {not_bpf} is not on a bpf filesystem")),
    ];
    for (dir, message) in &cases {
        for command in [
            &["services"][..],
            &["stats"],
            &["ct"],
            &["status"],
            &["counters"],
            &["which", "tcp", "192.168.50.100:1000", "10.96.0.1:80"],
        ] {
            let mut args = vec![command[0], "--pin-dir", dir];
            args.extend_from_slice(&command[1..]);
            let err = lb_user(&args).expect_err("refused");
            assert!(err.contains(message.as_str()), "lb-user {args:?}: {err}");
        }
    }
}
