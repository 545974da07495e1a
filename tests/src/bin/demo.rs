//! The live demo: a lab of two nodes (three backend pods) and an external client, the
//! agent on each node serving `examples/`, and real traffic through a ClusterIP, a
//! NodePort whose backends are on the other node, an externalTrafficPolicy=Local
//! LoadBalancer IP and a Service without endpoints; what the datapath counted, and its
//! /metrics; then the same lab in cluster mode, the agents watching an API server (the
//! in-memory fake) while Services are created, scaled and deleted through it, and the API
//! server goes down. Everything is removed at the end.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Instant,
};

use anyhow::{Context, Result};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use lb_tests::{
    api_cluster::{answers, endpoint_slice, service, wait_for_backends, ApiCluster, Endpoint},
    cluster::{pod_name, Cluster, Manifests},
    lab::{pod_addr, Spec},
    traffic::{parse_answer, tcp_ask, udp_ask},
};

fn main() -> Result<()> {
    lb_tests::require_root();
    let manifests = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("examples"));
    println!("== building the lab: client -- bridge -- node1 (pod-a), node2 (pod-b, pod-c),");
    println!("   an echo backend in every pod, the agent on each node serving {}", manifests.display());
    let spec = Spec { pods_per_node: vec![1, 2], clients: 1, ..Spec::default() };
    let cluster = Cluster::start("lbd", &spec, Manifests::existing(&manifests), &[])?;
    let (lab, agents) = (&cluster.lab, &cluster.agents);
    for (i, p) in lab.nodes.iter().flat_map(|n| n.pods.iter()).enumerate() {
        println!("   {} {} echoes TCP+UDP on 8080 with the peer address it saw", pod_name(i), p.addr);
    }
    let client = &lab.clients[0];
    let node1 = &lab.nodes[0];
    let pod_a = &node1.pods[0];

    let show = |what: &str, answer: std::io::Result<String>| match answer {
        Ok(a) => match parse_answer(&a) {
            Some((backend, seen)) => {
                println!("   {what:<58} -> {backend}, which saw the client as {seen}")
            }
            None => println!("   {what:<58} -> unexpected answer {a:?}"),
        },
        Err(e) => println!("   {what:<58} -> {e}"),
    };

    println!("== ClusterIP 10.96.0.10:80 from pod-a (east-west, tc): the backend sees the pod's address");
    for _ in 0..4 {
        show("pod-a -> 10.96.0.10:80/TCP", tcp_ask(&pod_a.ns.name, "10.96.0.10:80".parse()?));
    }
    println!("== NodePort 192.168.50.10:30080 (ETP Cluster, backends on node2) from the client: SNAT to node1");
    for _ in 0..3 {
        show("client -> node1:30080/TCP", tcp_ask(&client.ns.name, SocketAddrV4::new(node1.addr, 30080)));
    }
    show(
        "client -> node1:30080/UDP",
        udp_ask(&client.ns.name, "0.0.0.0:0".parse()?, SocketAddrV4::new(node1.addr, 30080)),
    );
    println!("== LoadBalancer 192.168.60.14:80 (ETP Local, routed to node1): the client's address is kept");
    for _ in 0..2 {
        show("client -> 192.168.60.14:80/TCP", tcp_ask(&client.ns.name, "192.168.60.14:80".parse()?));
    }
    println!("== Service without endpoints (10.96.0.18): refused at once, not a timeout");
    let started = Instant::now();
    let refused = tcp_ask(&pod_a.ns.name, "10.96.0.18:80".parse()?);
    println!("   pod-a -> 10.96.0.18:80/TCP -> {:?} after {:?}", refused.map_err(|e| e.kind()), started.elapsed());
    println!("== healthCheckNodePort 32014 of the ETP Local Service, asked from the client");
    for node in &lab.nodes {
        let answer =
            health(&client.ns.name, node.addr, 32014).with_context(|| format!("health check on {}", node.name))?;
        println!("   {}:32014 -> {answer}", node.name);
    }
    println!("== what node1's datapath counted");
    let counters = std::process::Command::new(lb_tests::agent::lb_user_bin()?)
        .args(["counters", "--pin-dir"])
        .arg(&agents[0].pin_dir)
        .output()?;
    for line in String::from_utf8_lossy(&counters.stdout).lines().filter(|l| !l.contains(" 0 packets")) {
        println!("   {line}");
    }
    println!("== node1's /metrics (127.0.0.1:10249 in its namespace): Services and backends that carried traffic");
    let scraped = lb_tests::metrics::scrape(&node1.ns.name);
    let shown = ["kube_xdp_lb_service_packets_total{", "kube_xdp_lb_backend_new_flows_total{"];
    for line in scraped.text.lines().filter(|l| shown.iter().any(|s| l.starts_with(s)) && !l.ends_with(" 0")) {
        println!("   {line}");
    }
    println!("== cleaning up (agents stopped, pins and namespaces removed)");
    drop(cluster);
    cluster_mode(&spec)
}

/// The agents in cluster mode: every change goes through the API server.
fn cluster_mode(spec: &Spec) -> Result<()> {
    const WEB: &str = "10.96.7.1:80";
    println!("== cluster mode: the same lab, the agents watching a Kubernetes API server (the in-memory fake)");
    let c = ApiCluster::start("lbd", spec, &[])?;
    println!(
        "   API server at {} inside the lab; each agent runs with --api-server {} --node-name NODE",
        c.api_url, c.api_url
    );
    let pod_a_ns = c.lab.nodes[0].pods[0].ns.name.clone();
    let client = c.traffic_clients()[0].ns.name.clone();
    let web: SocketAddrV4 = WEB.parse()?;
    let node2_port = SocketAddrV4::new(c.lab.nodes[1].addr, 30700);
    let endpoint = |node: usize, pod: usize| Endpoint {
        addr: pod_addr(node, pod),
        node: if node == 0 { "node1" } else { "node2" },
        zone_hint: None,
    };
    let converge = std::time::Duration::from_secs(15);
    // Waits until the traffic shows the change (the benchmark times the programming itself).
    let converged = |what: &str, expected: &[&str]| -> Result<()> {
        wait_for_backends(&pod_a_ns, web, expected, converge)?;
        println!("   {what:<58} -> answered by {expected:?} and no other");
        Ok(())
    };

    println!("== create Service web ({WEB}, NodePort 30700) and its EndpointSlice (pod-a) through the API");
    let pp = PostParams::default();
    c.block_on(c.services().create(&pp, &service("web", *web.ip(), 80, 30700)))?;
    c.block_on(c.slices().create(&pp, &endpoint_slice("web", &[endpoint(0, 0)])))?;
    converged("pod-a -> 10.96.7.1:80 (TCP and UDP)", &["pod-a"])?;
    println!("   kubectl sees what the agents program:");
    for (kind, columns) in [
        ("svc", "NAME:.metadata.name,CLUSTER-IP:.spec.clusterIP,PORTS:.spec.ports[*].port,NODEPORTS:.spec.ports[*].nodePort"),
        ("endpointslices", "NAME:.metadata.name,SERVICE:.metadata.labels.kubernetes\\.io/service-name,ENDPOINTS:.endpoints[*].addresses[0]"),
    ] {
        let kubectl = std::process::Command::new("kubectl")
            .args(["--server", &c.local_url, "get", kind, "-o", &format!("custom-columns={columns}")])
            .output();
        match kubectl {
            Ok(out) => String::from_utf8_lossy(&out.stdout).lines().for_each(|l| println!("     {l}")),
            Err(e) => println!("     (kubectl not run: {e})"),
        }
    }
    println!("== scale web to pod-a, pod-b, pod-c");
    let all = [endpoint(0, 0), endpoint(1, 0), endpoint(1, 1)];
    c.block_on(c.slices().patch("web-1", &PatchParams::default(), &Patch::Merge(&endpoint_slice("web", &all))))?;
    converged("pod-a -> 10.96.7.1:80 (TCP and UDP)", &["pod-a", "pod-b", "pod-c"])?;
    let spread = answers(&client, node2_port, 12);
    println!("   client -> node2:30700, 12 TCP and 12 UDP requests: {spread:?}");
    println!("== the API server is down for 3 s: the datapath keeps the last state");
    let down = Instant::now();
    c.block_on(c.faults().outage(std::time::Duration::from_secs(3)));
    let during = answers(&client, node2_port, 3);
    println!("   client -> node2:30700 while it is down ({:?} in): {during:?}", down.elapsed());
    while down.elapsed() < std::time::Duration::from_secs(3) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!("== back: delete web through the API");
    c.block_on(c.slices().delete("web-1", &DeleteParams::default()))?;
    c.block_on(c.services().delete("web", &DeleteParams::default()))?;
    let started = Instant::now();
    wait_for_backends(&pod_a_ns, web, &[], std::time::Duration::from_secs(60))?;
    println!("   pod-a -> 10.96.7.1:80 refused again, {:?} after the delete (the agents' watches came back after the outage)", started.elapsed());
    println!("== cleaning up");
    Ok(())
}

fn health(ns: &str, addr: Ipv4Addr, port: u16) -> Result<String> {
    let dst = SocketAddrV4::new(addr, port);
    let raw = lb_tests::lab::in_netns(ns, move || -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&dst.into(), lb_tests::traffic::TIMEOUT)?;
        s.set_read_timeout(Some(lb_tests::traffic::TIMEOUT))?;
        // An HTTP/1.1 server keeps the connection open unless asked not to.
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?;
    let status = raw.lines().next().unwrap_or("").trim().to_string();
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok(format!("{status} {body}"))
}
