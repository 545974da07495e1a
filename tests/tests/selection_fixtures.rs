//! Needs root and BPF. Backend selection (issue 11) with BPF_PROG_TEST_RUN: for every
//! algorithm, the kernel's choice for many new flows agrees with the userspace predictor
//! (`lb-user which`), and each algorithm spreads flows as it should; session affinity keeps
//! a client on its backend until the entry goes stale or the backend stops being chosen.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::IPPROTO_TCP;
use lb_tests::{
    fixture::*,
    packet::{Frame, SYN},
};
use lb_user::datapath::predict::{Choice, Flow, Predictor};

const BACKENDS: [Ipv4Addr; 5] = [
    Ipv4Addr::new(10, 244, 1, 30),
    Ipv4Addr::new(10, 244, 1, 31),
    Ipv4Addr::new(10, 244, 1, 32),
    Ipv4Addr::new(10, 244, 1, 33),
    Ipv4Addr::new(10, 244, 1, 34),
];

/// A NodePort Service (`node_port`) with the five local backends, its algorithm and extra
/// spec given.
fn service(name: &str, algorithm: &str, node_port: u16, extra_spec: &str) -> String {
    let eps: Vec<String> = BACKENDS.iter().map(|ip| format!("{{addresses: [\"{ip}\"], nodeName: node1}}")).collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, annotations: {{lb.kube-xdp.io/algorithm: {algorithm}}}}}\nspec: {{type: NodePort, clusterIP: 10.96.5.{}{extra_spec}, ports: [{{port: 80, nodePort: {node_port}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
        node_port - 31000,
        eps.join(", ")
    )
}

fn manifests() -> String {
    MANIFESTS.to_string()
        + &local_slices()
        + &service("alg-random", "random", 31001, "")
        + &service("alg-rr", "round-robin", 31002, "")
        + &service("alg-maglev", "maglev", 31003, "")
        + &service("alg-sh", "source-hash", 31004, "")
        + &service("alg-lc", "least-conn", 31005, "")
        + &service(
            "alg-affinity",
            "random",
            31006,
            ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}",
        )
}

/// The backend the kernel chose for the flow the SYN from `client` to node:`port` started.
fn kernel_choice(fx: &mut Fixture, client: SocketAddrV4, port: u16) -> SocketAddrV4 {
    let front = SocketAddrV4::new(NODE, port);
    fx.xdp(&Frame::tcp(client, front, SYN).bytes());
    let entry = fx.conntrack(client, front, IPPROTO_TCP).expect("a flow started");
    let b = fx.backend(entry.backend_id).expect("its backend");
    SocketAddrV4::new(b.ip(), b.port())
}

/// Runs `flows` new flows to node:`port` from distinct clients (addresses and ports), each
/// predicted first; returns how many each backend got.
fn run(
    fx: &mut Fixture,
    port: u16,
    flows: u16,
    agree: impl Fn(&Choice, SocketAddrV4) -> bool,
) -> BTreeMap<SocketAddrV4, u32> {
    let predictor = Predictor::open(&fx.pin_dir).unwrap();
    let mut got = BTreeMap::new();
    for i in 0..flows {
        let client = SocketAddrV4::new(Ipv4Addr::new(192, 168, 51, (i % 200) as u8 + 1), 10000 + i);
        let predicted = predictor.predict(Flow { proto: IPPROTO_TCP, src: client, dst: SocketAddrV4::new(NODE, port) });
        let chosen = kernel_choice(fx, client, port);
        assert!(
            agree(&predicted.choice, chosen),
            "flow {i} from {client}: kernel chose {chosen}, predicted {predicted}"
        );
        *got.entry(chosen).or_default() += 1;
    }
    got
}

fn exactly(choice: &Choice, chosen: SocketAddrV4) -> bool {
    *choice == Choice::Backend(chosen)
}

fn one_of(choice: &Choice, chosen: SocketAddrV4) -> bool {
    matches!(choice, Choice::AnyOf(set) if set.contains(&chosen))
}

#[test]
fn the_kernel_chooses_as_the_predictor_says_for_every_algorithm() {
    with_fixture(Setup::fast((40000, 60000)), |fx| {
        fx.apply(&manifests());
        let random = run(fx, 31001, 300, one_of);
        assert_eq!(random.len(), 5, "random reaches every backend: {random:?}");
        let rr = run(fx, 31002, 300, exactly);
        assert!(rr.values().all(|n| *n == 60), "round-robin: 300 flows, 60 each: {rr:?}");
        let maglev = run(fx, 31003, 300, exactly);
        assert_eq!(maglev.len(), 5, "{maglev:?}");
        let sh = run(fx, 31004, 300, exactly);
        assert_eq!(sh.len(), 5, "{sh:?}");
        // Source hash: the same client address, whatever its port, gets the same backend.
        let a = kernel_choice(fx, SocketAddrV4::new(Ipv4Addr::new(192, 168, 52, 7), 1111), 31004);
        let b = kernel_choice(fx, SocketAddrV4::new(Ipv4Addr::new(192, 168, 52, 7), 2222), 31004);
        assert_eq!(a, b);
        // Least-conn: each new flow (none closes) goes to a backend with the fewest, so
        // counts never differ by more than one.
        let lc = run(fx, 31005, 300, one_of);
        assert!(lc.values().all(|n| *n == 60), "least-conn levels the open flows: {lc:?}");
    });
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend_until_it_goes_stale() {
    with_fixture(Setup::fast((40000, 60000)), |fx| {
        fx.apply(&manifests());
        let client = |port| SocketAddrV4::new(Ipv4Addr::new(192, 168, 53, 9), port);
        let first = kernel_choice(fx, client(20000), 31006);
        for port in 20001..20030 {
            assert_eq!(kernel_choice(fx, client(port), 31006), first, "the same client keeps its backend");
        }
        let predictor = Predictor::open(&fx.pin_dir).unwrap();
        let p = predictor.predict(Flow { proto: IPPROTO_TCP, src: client(20100), dst: SocketAddrV4::new(NODE, 31006) });
        assert_eq!((p.choice, p.by), (Choice::Backend(first), "affinity"));
        // Other clients spread.
        let others: std::collections::BTreeSet<SocketAddrV4> = (1..60)
            .map(|i| kernel_choice(fx, SocketAddrV4::new(Ipv4Addr::new(192, 168, 54, i), 20000), 31006))
            .collect();
        assert!(others.len() > 1, "other clients get other backends: {others:?}");
        // Stale (older than the 5 s timeout): a new choice, which may be any backend.
        fx.age_affinity(6);
        let p = Predictor::open(&fx.pin_dir).unwrap().predict(Flow {
            proto: IPPROTO_TCP,
            src: client(20200),
            dst: SocketAddrV4::new(NODE, 31006),
        });
        assert_eq!(p.by, "random", "the stale entry no longer decides");
        // A backend no longer chosen (terminating) invalidates the affinity at once.
        let chosen = kernel_choice(fx, client(20300), 31006);
        let terminating = manifests().replace(
            &format!("{{addresses: [\"{}\"], nodeName: node1}}", chosen.ip()),
            &format!("{{addresses: [\"{}\"], nodeName: node1, conditions: {{ready: false, serving: true, terminating: true}}}}", chosen.ip()),
        );
        fx.apply(&terminating);
        for port in 20301..20320 {
            assert_ne!(kernel_choice(fx, client(port), 31006), chosen, "new flows avoid the terminating backend");
        }
    });
}

/// The LRU's affinity entry for `client`: (key, value).
fn affinity_of(fx: &Fixture, client: Ipv4Addr) -> (lb_common::AffinityKey, lb_common::AffinityValue) {
    let map = lb_user::datapath::open_map(&fx.pin_dir, lb_common::map_names::AFFINITY).unwrap();
    let affinity: aya::maps::HashMap<_, lb_common::AffinityKey, lb_common::AffinityValue> = map.try_into().unwrap();
    let client_be = lb_common::user::addr_be(client);
    affinity.iter().map(Result::unwrap).find(|(k, _)| k.client_addr_be == client_be).expect("an affinity entry")
}

fn plant_affinity(fx: &Fixture, key: lb_common::AffinityKey, value: lb_common::AffinityValue) {
    let map = lb_user::datapath::open_map(&fx.pin_dir, lb_common::map_names::AFFINITY).unwrap();
    let mut affinity: aya::maps::HashMap<_, lb_common::AffinityKey, lb_common::AffinityValue> = map.try_into().unwrap();
    affinity.insert(key, value, 0).unwrap();
}

/// LB_AFFINITY is an LRU: the kernel reuses its elements for other clients at once, while a
/// program may still read one. An entry read as another client's is not kept (counted
/// `entry_reused`), and an entry naming another Service's backend (a torn or reused read)
/// never sends a flow there: the choice stays within the Service's own backends.
#[test]
fn affinity_never_keeps_another_clients_entry_or_another_services_backend() {
    with_fixture(Setup::fast((40000, 60000)), |fx| {
        fx.apply(&manifests());
        let ip = Ipv4Addr::new(192, 168, 55, 9);
        let client = |port| SocketAddrV4::new(ip, port);
        kernel_choice(fx, client(21000), 31006);
        let (key, value) = affinity_of(fx, ip);
        assert_eq!(value.key, key, "an entry names its key");

        // Another Service's backend (np-local's, 10.244.1.10:8080), named by the client's entry.
        let other = SocketAddrV4::new(CLIENT, 21999);
        fx.xdp(&Frame::tcp(other, SocketAddrV4::new(NODE, 30081), SYN).bytes());
        let foreign = fx.conntrack(other, SocketAddrV4::new(NODE, 30081), IPPROTO_TCP).unwrap();
        let foreign_value =
            lb_common::AffinityValue { backend_id: foreign.backend_id, backend_gen: foreign.backend_gen, ..value };
        plant_affinity(fx, key, foreign_value);
        let predicted = Predictor::open(&fx.pin_dir).unwrap().predict(Flow {
            proto: IPPROTO_TCP,
            src: client(21001),
            dst: SocketAddrV4::new(NODE, 31006),
        });
        assert_eq!(predicted.by, "random", "the predictor does not keep it either");
        let chosen = kernel_choice(fx, client(21001), 31006);
        assert!(BACKENDS.contains(chosen.ip()), "{chosen} is one of the Service's own backends");

        // An entry holding another client's key, as a reused element would: not kept.
        let (key, value) = affinity_of(fx, ip);
        let stranger = lb_common::AffinityKey { client_addr_be: lb_common::user::addr_be(CLIENT2), ..key };
        plant_affinity(fx, key, lb_common::AffinityValue { key: stranger, ..value });
        let before = fx.counters()["entry_reused"];
        let chosen = kernel_choice(fx, client(21002), 31006);
        assert!(BACKENDS.contains(chosen.ip()));
        assert_eq!(fx.counters()["entry_reused"], before + 1);
        // And the client's own entry is written again: it keeps its backend from now on.
        let (key, value) = affinity_of(fx, ip);
        assert_eq!(value.key, key);
        let kept = fx.backend(value.backend_id).unwrap();
        assert_eq!(kernel_choice(fx, client(21003), 31006), SocketAddrV4::new(kept.ip(), kept.port()));
    });
}

/// A slot read from a reused element, or an id the agent gave away meanwhile, can name
/// another Service port's backend: a new flow is never sent there. It is dropped (the
/// client's retransmission chooses again) and counted, and it leaves no conntrack entry.
#[test]
fn a_slot_naming_another_services_backend_sends_no_flow_there() {
    with_fixture(Setup::fast((40000, 60000)), |fx| {
        fx.apply(&manifests());
        // np-local's backend (10.244.1.10:8080), known by a flow to it.
        let other = SocketAddrV4::new(CLIENT, 21999);
        fx.xdp(&Frame::tcp(other, SocketAddrV4::new(NODE, 30081), SYN).bytes());
        let foreign = fx.conntrack(other, SocketAddrV4::new(NODE, 30081), IPPROTO_TCP).unwrap().backend_id;
        // Every slot of alg-rr (node:31002) names it.
        let services: aya::maps::HashMap<_, lb_common::ServiceKey, lb_common::ServiceValue> =
            lb_user::datapath::open_map(&fx.pin_dir, lb_common::map_names::SERVICES).unwrap().try_into().unwrap();
        let key = lb_common::ServiceKey {
            addr_be: lb_common::user::addr_be(NODE),
            port_be: 31002u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        let svc_id = services.get(&key, 0).unwrap().svc_id;
        let mut slots: aya::maps::HashMap<_, lb_common::SlotKey, u32> =
            lb_user::datapath::open_map(&fx.pin_dir, lb_common::map_names::SLOTS).unwrap().try_into().unwrap();
        let mine: Vec<lb_common::SlotKey> = slots.keys().map(Result::unwrap).filter(|k| k.svc_id == svc_id).collect();
        assert_eq!(mine.len(), BACKENDS.len());
        for k in mine {
            slots.insert(k, foreign, 0).unwrap();
        }
        let before = fx.counters();
        let client = SocketAddrV4::new(Ipv4Addr::new(192, 168, 55, 10), 21000);
        let (action, _, _) = fx.xdp(&Frame::tcp(client, SocketAddrV4::new(NODE, 31002), SYN).bytes());
        assert_eq!(action, XDP_DROP);
        let after = fx.counters();
        assert_eq!(after["drop_stale_service"], before["drop_stale_service"] + 1);
        assert_eq!(after["entry_reused"], before["entry_reused"] + 1);
        assert_eq!(after["new_flow"], before["new_flow"]);
        assert!(fx.conntrack(client, SocketAddrV4::new(NODE, 31002), IPPROTO_TCP).is_none());
    });
}
