//! The live demo: a lab of two nodes (three backend pods) and an external client, the
//! agent on each node serving `examples/`, and real traffic through a ClusterIP, a
//! NodePort whose backends are on the other node, an externalTrafficPolicy=Local
//! LoadBalancer IP and a Service without endpoints; what the datapath counted, and its
//! /metrics. Everything is removed at the end.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Instant,
};

use anyhow::{Context, Result};
use lb_tests::{
    cluster::{pod_name, Cluster, Manifests},
    lab::Spec,
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
    Ok(())
}

fn health(ns: &str, addr: Ipv4Addr, port: u16) -> Result<String> {
    let dst = SocketAddrV4::new(addr, port);
    let raw = lb_tests::lab::in_netns(ns, move || -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&dst.into(), lb_tests::traffic::TIMEOUT)?;
        s.set_read_timeout(Some(lb_tests::traffic::TIMEOUT))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?;
    let status = raw.lines().next().unwrap_or("").trim().to_string();
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok(format!("{status} {body}"))
}
