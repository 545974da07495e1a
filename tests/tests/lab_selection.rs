//! Needs root and BPF. Backend selection on the wire (issue 11): Maglev agrees across nodes,
//! session affinity holds a client until it goes stale, least-conn fills the emptiest
//! backend while long-lived connections stay open, and a rolling update under load loses
//! nothing. Real TCP and UDP through a lab of two nodes with two pods each, the agent on
//! every node serving manifests.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::lb_user_bin,
    cluster::{pod_name, service, Cluster, Endpoint, Manifests},
    lab::Spec,
    traffic::{echo_round_trip, parse_answer, tcp_ask, tcp_ask_from, tcp_hold, udp_ask, Load},
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const POD_D: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);

/// The four pods, ready.
fn all_pods() -> Vec<Endpoint<'static>> {
    vec![
        Endpoint::ready(POD_A, "node1"),
        Endpoint::ready(POD_B, "node1"),
        Endpoint::ready(POD_C, "node2"),
        Endpoint::ready(POD_D, "node2"),
    ]
}

fn algorithm(name: &str) -> String {
    format!(", annotations: {{lb.kube-xdp.io/algorithm: {name}}}")
}

/// Two nodes, two pods each (pod-a, pod-b on node1; pod-c, pod-d on node2), one client.
fn start(yaml: &str) -> Cluster {
    lb_tests::require_root();
    let spec = Spec { pods_per_node: vec![2, 2], clients: 1, ..Spec::default() };
    Cluster::start("lbt", &spec, Manifests::inline(yaml).unwrap(), &[]).unwrap()
}

/// The backend that answered.
fn who(answer: &str) -> String {
    parse_answer(answer).unwrap_or_else(|| panic!("not a backend's answer: {answer:?}")).0
}

/// What `lb-user which` says on `node` for a TCP flow from `src` to `dst`.
fn which(c: &Cluster, node: usize, src: SocketAddrV4, dst: SocketAddrV4) -> String {
    let pin_dir = c.agents[node].pin_dir.display().to_string();
    let out = Command::new(lb_user_bin().unwrap())
        .args(["which", "--pin-dir", &pin_dir, "tcp", &src.to_string(), &dst.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "lb-user which: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The pod name of each backend address.
fn names() -> BTreeMap<SocketAddrV4, String> {
    [POD_A, POD_B, POD_C, POD_D].iter().enumerate().map(|(i, a)| (SocketAddrV4::new(*a, 8080), pod_name(i))).collect()
}

#[test]
fn two_nodes_choose_the_same_backend_for_the_same_flow_under_maglev() {
    let c = start(&service(
        "mg",
        &algorithm("maglev"),
        "type: NodePort, clusterIP: 10.96.6.1",
        80,
        30201,
        &all_pods(),
        None,
    ));
    let client = &c.lab.clients[0];
    let mut seen = BTreeSet::new();
    for port in 41000..41016 {
        let src = SocketAddrV4::new(client.addr, port);
        let via = |node| tcp_ask_from(&client.ns.name, src, c.node_port(node, 30201)).unwrap();
        let (one, two) = (who(&via(0)), who(&via(1)));
        assert_eq!(one, two, "the flow from {src} gets one backend through either node");
        let udp = |node| udp_ask(&client.ns.name, src, c.node_port(node, 30201)).unwrap();
        assert_eq!(who(&udp(0)), who(&udp(1)), "UDP from {src} too");
        // The operator's view agrees with both nodes' choice.
        let predicted = which(&c, 1, SocketAddrV4::new(client.addr, port + 100), c.node_port(1, 30201));
        assert_eq!(predicted, which(&c, 0, SocketAddrV4::new(client.addr, port + 100), c.node_port(0, 30201)));
        seen.insert(one);
    }
    assert!(seen.len() >= 2, "different flows spread over the backends: {seen:?}");
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend_until_it_goes_stale() {
    let spec = "type: NodePort, clusterIP: 10.96.6.2, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 3}}";
    let c = start(&service("af", "", spec, 80, 30202, &all_pods(), None));
    let client = &c.lab.clients[0];
    let front = c.node_port(0, 30202);
    let first = who(&tcp_ask(&client.ns.name, front).unwrap());
    for _ in 0..20 {
        assert_eq!(who(&tcp_ask(&client.ns.name, front).unwrap()), first, "the client keeps its backend");
    }
    let probe = SocketAddrV4::new(client.addr, 1);
    assert!(which(&c, 0, probe, front).ends_with("(affinity)"), "{}", which(&c, 0, probe, front));
    // Other clients (more addresses on the client's segment) get backends of their own.
    let mut backends = BTreeSet::from([first.clone()]);
    for i in 0..8u8 {
        let addr = Ipv4Addr::new(192, 168, 50, 150 + i);
        client.ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]).unwrap();
        let mine = who(&tcp_ask_from(&client.ns.name, SocketAddrV4::new(addr, 0), front).unwrap());
        for _ in 0..3 {
            let again = who(&tcp_ask_from(&client.ns.name, SocketAddrV4::new(addr, 0), front).unwrap());
            assert_eq!(again, mine, "{addr} keeps its backend");
        }
        backends.insert(mine);
    }
    assert!(backends.len() >= 2, "clients spread: {backends:?}");
    // Idle past the 3 s timeout: the entry no longer decides; the next connection chooses
    // afresh and is remembered again.
    std::thread::sleep(Duration::from_millis(3500));
    let stale = which(&c, 0, probe, front);
    assert!(stale.ends_with("(random)"), "stale affinity: {stale}");
    let chosen = who(&tcp_ask(&client.ns.name, front).unwrap());
    let kept = which(&c, 0, probe, front);
    assert!(
        kept.ends_with("(affinity)")
            && kept.starts_with(&names().iter().find(|(_, n)| **n == chosen).unwrap().0.to_string()),
        "{kept}"
    );
}

#[test]
fn least_conn_sends_new_connections_to_the_backend_with_the_fewest_open() {
    let c = start(&service(
        "lc",
        &algorithm("least-conn"),
        "type: NodePort, clusterIP: 10.96.6.3",
        80,
        30203,
        &all_pods(),
        None,
    ));
    let client = &c.lab.clients[0];
    let front = c.node_port(0, 30203);
    let hold = || {
        let (answer, conn) = tcp_hold(&client.ns.name, front).unwrap();
        (who(&answer), conn)
    };
    // Four connections held open: one on each backend.
    let mut held: Vec<(String, TcpStream)> = (0..4).map(|_| hold()).collect();
    let first_four: BTreeSet<&String> = held.iter().map(|(b, _)| b).collect();
    assert_eq!(first_four.len(), 4, "each new connection went to an empty backend: {first_four:?}");
    held.push(hold());
    for round in 0..3 {
        // Close one connection on a backend that has a single one: it becomes the emptiest.
        let loaded: BTreeMap<&String, usize> = held.iter().fold(BTreeMap::new(), |mut m, (b, _)| {
            *m.entry(b).or_default() += 1;
            m
        });
        let fewest = *loaded.values().min().unwrap();
        let emptied = held.iter().position(|(b, _)| loaded[b] == fewest).unwrap();
        let (backend, conn) = held.remove(emptied);
        drop(conn);
        // Wait (bounded) until this node has seen the connection close.
        let address = names().into_iter().find(|(_, n)| *n == backend).unwrap().0;
        let probe = SocketAddrV4::new(client.addr, 1);
        let deadline = Instant::now() + Duration::from_secs(3);
        while which(&c, 0, probe, front) != format!("one of {address} (least-conn)") {
            assert!(Instant::now() < deadline, "round {round}: the close never showed: {}", which(&c, 0, probe, front));
            std::thread::sleep(Duration::from_millis(50));
        }
        let (next, conn) = hold();
        assert_eq!(next, backend, "round {round}: the new connection goes to the emptiest backend");
        held.push((next, conn));
        // Every held connection still works.
        for (b, conn) in &mut held {
            echo_round_trip(conn, b"still there").unwrap_or_else(|e| panic!("connection to {b}: {e}"));
        }
    }
}

#[test]
fn a_rolling_update_under_load_fails_no_request_and_resets_no_connection() {
    let yaml =
        |endpoints: &[Endpoint]| service("ru", "", "type: NodePort, clusterIP: 10.96.6.4", 80, 30204, endpoints, None);
    let c = start(&yaml(&[Endpoint::ready(POD_A, "node1"), Endpoint::ready(POD_C, "node2")]));
    let client = &c.lab.clients[0];
    let front = c.node_port(0, 30204);
    // About 300 requests a second: four TCP loops and two UDP loops.
    let load = Load::start(&client.ns.name, front, 4, &[20000, 30000], Duration::from_millis(15));
    // Long-lived connections, on the old backends.
    let mut held: Vec<(String, TcpStream)> = (0..6)
        .map(|_| {
            let (answer, conn) = tcp_hold(&client.ns.name, front).unwrap();
            (who(&answer), conn)
        })
        .collect();
    let round_trips = |held: &mut Vec<(String, TcpStream)>| {
        for (b, conn) in held.iter_mut() {
            echo_round_trip(conn, b"ping").unwrap_or_else(|e| panic!("held connection to {b}: {e}"));
        }
    };
    // (old pod, its replacement): the replacement joins, the old one terminates while its
    // connections drain, then leaves the slice.
    let mut current = vec![Endpoint::ready(POD_A, "node1"), Endpoint::ready(POD_C, "node2")];
    let mut avoided_since: Vec<(String, Instant)> = Vec::new();
    for ((old, old_name), (new, node)) in [((POD_A, "pod-a"), (POD_B, "node1")), ((POD_C, "pod-c"), (POD_D, "node2"))] {
        std::thread::sleep(Duration::from_secs(3));
        current.retain(|e| e.addr != old);
        let draining = Endpoint::terminating(old, if old == POD_A { "node1" } else { "node2" });
        c.apply(&yaml(&[current.clone(), vec![draining, Endpoint::ready(new, node)]].concat())).unwrap();
        avoided_since.push((old_name.to_string(), Instant::now()));
        for _ in 0..6 {
            round_trips(&mut held);
            std::thread::sleep(Duration::from_millis(500));
        }
        // Drained: the old pod's connections close (its process exits), then it leaves.
        held.retain(|(b, _)| b != old_name);
        current.push(Endpoint::ready(new, node));
        c.apply(&yaml(&current)).unwrap();
    }
    std::thread::sleep(Duration::from_secs(3));
    let outcomes = load.stop();
    round_trips(&mut held);

    let failed: Vec<_> = outcomes.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), outcomes.len());
    assert!(outcomes.len() > 2000, "the load kept up: {} requests", outcomes.len());
    for (old, since) in &avoided_since {
        let late = outcomes.iter().filter(|(t, r)| t > since && r.as_ref().is_ok_and(|b| b == old)).count();
        assert_eq!(late, 0, "new connections reached {old} after its end reached the maps");
    }
    let by_backend: BTreeSet<&String> = outcomes.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
    assert_eq!(by_backend.len(), 4, "every pod served in turn: {by_backend:?}");
}
