//! The incremental model against a full recompute: after any sequence of changes, its
//! desired state is the one `desired_state_after` computes from the same objects and the
//! previous state.
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::{model::desired_state_after, source::Objects};

/// The objects as the API holds them, for the full recompute.
#[derive(Default)]
struct Api {
    services: BTreeMap<usize, Service>,
    slices: BTreeMap<usize, EndpointSlice>,
    endpoints: BTreeMap<usize, Endpoints>,
}

impl Api {
    fn objects(&self) -> Objects {
        Objects {
            services: self.services.values().cloned().collect(),
            slices: self.slices.values().cloned().collect(),
            endpoints: self.endpoints.values().cloned().collect(),
            nodes: vec![],
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Service {
        name: usize,
        ip: u8,
        kind: usize,
        local: bool,
        created: Option<u8>,
        ports: Vec<usize>,
        node_port: u8,
    },
    DeleteService(usize),
    Slice {
        name: usize,
        owner: Option<usize>,
        endpoints: Vec<(u8, bool, bool)>,
        ports: Vec<usize>,
    },
    DeleteSlice(usize),
    Endpoints {
        name: usize,
        ips: Vec<u8>,
    },
    DeleteEndpoints(usize),
    /// A relist of the slices holding only those with an even index.
    RelistSlices,
    /// The node's facts change (another address set).
    Node(bool),
    Sync,
}

const PORTS: [(&str, i32, &str); 2] = [("a", 80, "TCP"), ("b", 53, "UDP")];

fn service(
    name: usize,
    ip: u8,
    kind: usize,
    local: bool,
    created: Option<u8>,
    ports: &[usize],
    node_port: u8,
) -> Service {
    let kind = ["ClusterIP", "NodePort", "LoadBalancer"][kind];
    let ports: Vec<_> = ports
        .iter()
        .map(|p| {
            let (n, port, proto) = PORTS[*p];
            json!({"name": n, "port": port, "protocol": proto, "nodePort": 30000 + i32::from(node_port) + *p as i32})
        })
        .collect();
    let mut metadata = json!({"name": format!("s{name}"), "namespace": "ns"});
    if let Some(t) = created {
        metadata["creationTimestamp"] = json!(format!("2026-01-01T00:00:0{t}Z"));
    }
    serde_json::from_value(json!({
        "metadata": metadata,
        "spec": {
            "type": kind,
            "clusterIP": format!("10.96.0.{ip}"),
            "ports": ports,
            "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
            "healthCheckNodePort": 32000 + name,
        },
        "status": {"loadBalancer": {"ingress": [{"ip": format!("192.0.2.{ip}")}]}},
    }))
    .unwrap()
}

fn slice(name: usize, owner: Option<usize>, endpoints: &[(u8, bool, bool)], ports: &[usize]) -> EndpointSlice {
    let mut metadata = json!({"name": format!("sl{name}"), "namespace": "ns"});
    if let Some(o) = owner {
        metadata["labels"] = json!({"kubernetes.io/service-name": format!("s{o}")});
    }
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|(ip, ready, here)| {
            json!({"addresses": [format!("10.244.0.{ip}")], "conditions": {"ready": ready},
                   "nodeName": if *here { "node1" } else { "node2" }})
        })
        .collect();
    let ports: Vec<_> = ports
        .iter()
        .map(|p| {
            let (n, port, proto) = PORTS[*p];
            json!({"name": n, "port": port + 8000, "protocol": proto})
        })
        .collect();
    serde_json::from_value(json!({"metadata": metadata, "addressType": "IPv4", "endpoints": endpoints, "ports": ports}))
        .unwrap()
}

fn legacy(name: usize, ips: &[u8]) -> Endpoints {
    let addresses: Vec<_> = ips.iter().map(|ip| json!({"ip": format!("10.245.0.{ip}")})).collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("s{name}"), "namespace": "ns"},
        "subsets": [{"addresses": addresses, "ports": [{"name": "a", "port": 9000, "protocol": "TCP"}]}],
    }))
    .unwrap()
}

fn node(variant: bool) -> NodeInfo {
    let addresses: Vec<Ipv4Addr> = if variant {
        vec!["192.168.0.1".parse().unwrap()]
    } else {
        vec!["192.168.0.2".parse().unwrap(), "192.168.0.1".parse().unwrap()]
    };
    NodeInfo { name: "node1".into(), addresses, zone: None }
}

fn op() -> impl Strategy<Value = Op> {
    let ports = proptest::sample::subsequence(vec![0usize, 1], 0..=2);
    prop_oneof![
        4 => (0..4usize, 1..4u8, 0..3usize, any::<bool>(), proptest::option::of(0..3u8), ports.clone(), 0..2u8)
            .prop_map(|(name, ip, kind, local, created, ports, node_port)| Op::Service { name, ip, kind, local, created, ports, node_port }),
        1 => (0..4usize).prop_map(Op::DeleteService),
        4 => (0..5usize, proptest::option::of(0..4usize), proptest::collection::vec((1..5u8, any::<bool>(), any::<bool>()), 0..4), ports)
            .prop_map(|(name, owner, endpoints, ports)| Op::Slice { name, owner, endpoints, ports }),
        1 => (0..5usize).prop_map(Op::DeleteSlice),
        1 => (0..4usize, proptest::collection::vec(1..4u8, 0..3)).prop_map(|(name, ips)| Op::Endpoints { name, ips }),
        1 => (0..4usize).prop_map(Op::DeleteEndpoints),
        1 => Just(Op::RelistSlices),
        1 => any::<bool>().prop_map(Op::Node),
        3 => Just(Op::Sync),
    ]
}

fn sorted(errors: &[ModelError]) -> Vec<String> {
    let mut out: Vec<String> = errors.iter().map(ToString::to_string).collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_a_full_recompute(ops in proptest::collection::vec(op(), 1..40)) {
        let opts = Options::default();
        let mut inc = Incremental::new("node1", Options::default());
        let mut api = Api::default();
        let mut full = Desired::default();
        let mut variant = false;
        for op in ops.into_iter().chain([Op::Sync]) {
            match op {
                Op::Service { name, ip, kind, local, created, ports, node_port } => {
                    let svc = service(name, ip, kind, local, created, &ports, node_port);
                    api.services.insert(name, svc.clone());
                    inc.change(Change::Applied(Object::Service(svc)));
                }
                Op::DeleteService(name) => {
                    api.services.remove(&name);
                    inc.change(Change::Deleted(Object::Service(service(name, 1, 0, false, None, &[], 0))));
                }
                Op::Slice { name, owner, endpoints, ports } => {
                    let s = slice(name, owner, &endpoints, &ports);
                    api.slices.insert(name, s.clone());
                    inc.change(Change::Applied(Object::Slice(s)));
                }
                Op::DeleteSlice(name) => {
                    api.slices.remove(&name);
                    inc.change(Change::Deleted(Object::Slice(slice(name, None, &[], &[]))));
                }
                Op::Endpoints { name, ips } => {
                    api.endpoints.insert(name, legacy(name, &ips));
                    inc.change(Change::Applied(Object::Endpoints(legacy(name, &ips))));
                }
                Op::DeleteEndpoints(name) => {
                    api.endpoints.remove(&name);
                    inc.change(Change::Deleted(Object::Endpoints(legacy(name, &[]))));
                }
                Op::RelistSlices => {
                    api.slices.retain(|name, _| name % 2 == 0);
                    inc.change(Change::ListStarted(ObjectKind::Slice));
                    for s in api.slices.values() {
                        inc.change(Change::Listed(Object::Slice(s.clone())));
                    }
                    inc.change(Change::ListDone(ObjectKind::Slice));
                }
                Op::Node(v) => variant = v,
                Op::Sync => {
                    let before = inc.desired().clone();
                    let changed = inc.update(&node(variant)).keys();
                    full = desired_state_after(&full, &api.objects(), &node(variant), &opts);
                    let got = inc.desired();
                    prop_assert_eq!(&got.frontends, &full.frontends);
                    prop_assert_eq!(&got.health_checks, &full.health_checks);
                    prop_assert_eq!(sorted(&got.errors), sorted(&full.errors));
                    // The changed set names exactly the frontends that moved.
                    let keys: BTreeSet<FrontendKey> = before.frontends.keys().chain(got.frontends.keys()).copied().collect();
                    let moved: BTreeSet<FrontendKey> =
                        keys.into_iter().filter(|k| before.frontends.get(k) != got.frontends.get(k)).collect();
                    prop_assert_eq!(changed, moved);
                }
            }
        }
    }
}

/// A list of `objects` of one kind, as a watcher delivers it.
fn list(inc: &mut Incremental, kind: ObjectKind, objects: &[Object]) -> usize {
    let mut changed = inc.change(Change::ListStarted(kind));
    for o in objects {
        changed += inc.change(Change::Listed(o.clone()));
    }
    changed + inc.change(Change::ListDone(kind))
}

#[test]
fn a_relist_changes_only_what_changed() {
    let mut inc = Incremental::new("node1", Options::default());
    let services = [0, 1].map(|i| Object::Service(service(i, i as u8 + 1, 1, false, None, &[0, 1], i as u8)));
    assert_eq!(list(&mut inc, ObjectKind::Service, &services), 2);
    list(&mut inc, ObjectKind::Slice, &[Object::Slice(slice(0, Some(0), &[(1, true, true)], &[0]))]);
    assert!(!inc.update(&node(false)).changed.is_empty());
    assert_eq!(list(&mut inc, ObjectKind::Service, &services), 0, "the same list again");
    assert!(!inc.has_changes());
    assert!(inc.update(&node(false)).changed.is_empty());
    // s1 is gone from the next list: only its frontends go.
    assert_eq!(list(&mut inc, ObjectKind::Service, &services[..1]), 1);
    let changed = inc.update(&node(false)).keys();
    assert!(!changed.is_empty());
    assert!(changed.iter().all(|k| !inc.desired().frontends.contains_key(k)), "only removals: {changed:?}");
}

#[test]
fn an_endpoint_change_recomputes_only_its_service() {
    let mut inc = Incremental::new("node1", Options::default());
    for i in 0..3 {
        inc.change(Change::Applied(Object::Service(service(i, i as u8 + 1, 0, false, None, &[0], 0))));
        inc.change(Change::Applied(Object::Slice(slice(i, Some(i), &[(1, true, true)], &[0]))));
    }
    inc.update(&node(false));
    inc.change(Change::Applied(Object::Slice(slice(1, Some(1), &[(1, true, true), (2, true, false)], &[0]))));
    assert_eq!(inc.dirty.iter().map(|r| &*r.name).collect::<Vec<_>>(), ["s1"]);
    let changed = inc.update(&node(false)).keys();
    assert_eq!(changed.into_iter().map(|k| k.to_string()).collect::<Vec<_>>(), ["10.96.0.2:80/TCP"]);
}

#[test]
fn endpoint_nodes_come_from_slices_and_from_legacy_endpoints_where_there_are_no_slices() {
    let yaml = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ["10.244.1.10"], nodeName: node1}
- {addresses: ["10.244.2.10"]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: legacy, namespace: shop}
subsets:
- addresses: [{ip: 10.244.3.10, nodeName: node3}]
  notReadyAddresses: [{ip: 10.244.3.11, nodeName: node4}]
  ports: [{port: 8080}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: web, namespace: shop}
subsets:
- addresses: [{ip: 10.244.1.10, nodeName: elsewhere}]
  ports: [{port: 8080}]
"#;
    let mut inc = Incremental::new("node1", Options::default());
    let mut report = crate::source::manifests::Report::default();
    let mut objects = Objects::default();
    crate::source::manifests::parse_into(std::path::Path::new("t.yaml"), yaml, &mut objects, &mut report);
    list(&mut inc, ObjectKind::Slice, &objects.slices.into_iter().map(Object::Slice).collect::<Vec<_>>());
    list(&mut inc, ObjectKind::Endpoints, &objects.endpoints.into_iter().map(Object::Endpoints).collect::<Vec<_>>());
    let nodes = inc.update(&node(false)).endpoint_nodes;
    let flat = nodes.into_iter().flat_map(|(s, n)| {
        n.iter().map(|(addr, node)| (s.name.to_string(), addr.to_string(), node.to_string())).collect::<Vec<_>>()
    });
    assert_eq!(
        flat.collect::<Vec<_>>(),
        [
            ("legacy".into(), "10.244.3.10".into(), "node3".into()),
            ("legacy".into(), "10.244.3.11".into(), "node4".into()),
            ("web".into(), "10.244.1.10".into(), "node1".into()),
        ] as [(String, String, String); 3],
        "an endpoint without nodeName is left out; web's slices outrank its Endpoints"
    );
}

#[test]
fn a_node_heartbeat_changes_nothing_an_address_does() {
    let mut inc = Incremental::new("node1", Options::default());
    let node = |address: &str, heartbeat: &str| -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "node1", "resourceVersion": heartbeat},
            "status": {"addresses": [{"type": "InternalIP", "address": address}],
                       "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat}]},
        }))
        .unwrap()
    };
    assert_eq!(inc.change(Change::Applied(Object::Node(node("192.168.0.1", "2026-01-01T00:00:00Z")))), 1);
    assert_eq!(inc.change(Change::Applied(Object::Node(node("192.168.0.1", "2026-01-01T00:00:10Z")))), 0);
    assert_eq!(inc.change(Change::Applied(Object::Node(node("192.168.0.2", "2026-01-01T00:00:20Z")))), 1);
    assert!(inc.has_changes());
}

#[test]
fn names_are_held_once_and_names_nothing_uses_are_let_go() {
    let mut inc = Incremental::new("node1", Options::default());
    let on_node = |i: usize| -> EndpointSlice {
        let mut s = slice(1, Some(1), &[(10, true, false)], &[0]);
        s.endpoints[0].node_name = Some(format!("node-{i}"));
        s
    };
    // Two slices of one Service on one node: one copy of each name.
    inc.change(Change::Applied(Object::Slice(on_node(0))));
    let mut other = on_node(0);
    other.metadata.name = Some("sl1-b".into());
    inc.change(Change::Applied(Object::Slice(other)));
    let a = &inc.slices[&("ns".into(), "sl1".into())];
    let b = &inc.slices[&("ns".into(), "sl1-b".into())];
    assert!(Arc::ptr_eq(&a.nodes[0].1, &b.nodes[0].1), "one node name");
    let (Ok(owner_a), Ok(owner_b)) = (&a.owner, &b.owner) else { panic!("both are labelled") };
    assert!(Arc::ptr_eq(&owner_a.namespace, &owner_b.namespace) && Arc::ptr_eq(&owner_a.name, &owner_b.name));
    // Nodes replaced one after another (an autoscaled pool): the names held stay few.
    for i in 1..10_000 {
        inc.change(Change::Applied(Object::Slice(on_node(i))));
    }
    let held = inc.texts.held.len();
    assert!(held < 200, "{held} names held for 3 in use");
    assert!(inc.texts.held.contains("node-9999") && inc.texts.held.contains("node-0"), "names in use stay");
}
