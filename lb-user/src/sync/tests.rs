use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::json;

use super::*;
use crate::datapath::maps::MemoryMaps;

fn service(name: &str, ip: &str, node_port: Option<i32>) -> Object {
    let mut port = json!({"name": "http", "port": 80});
    if let Some(p) = node_port {
        port["nodePort"] = json!(p);
    }
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": if node_port.is_some() { "NodePort" } else { "ClusterIP" }, "clusterIP": ip, "ports": [port]},
    }))
    .unwrap();
    Object::Service(svc)
}

fn slice(service: &str, ips: &[&str]) -> Object {
    let endpoints: Vec<_> = ips.iter().map(|ip| json!({"addresses": [ip], "nodeName": "node2"})).collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap();
    Object::Slice(slice)
}

fn node(address: &str) -> Object {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "node1"},
        "status": {"addresses": [{"type": "InternalIP", "address": address}]},
    }))
    .unwrap();
    Object::Node(node)
}

fn new_sync() -> Sync {
    let flags = NodeFlags {
        name: "node1".into(),
        addresses: vec![],
        zone: None,
        local_detect: Some(LocalDetect::ClusterCidr("10.244.0.0/16".parse().unwrap())),
    };
    let kinds = [ObjectKind::Service, ObjectKind::Slice, ObjectKind::Node];
    Sync::new(flags, Options::default(), kinds, Box::new(|_, _| Config::default()), HealthState::default())
}

/// The three complete lists a cluster source starts with.
fn list_all(sync: &mut Sync, services: Vec<Object>, slices: Vec<Object>, address: &str) {
    let now = Instant::now();
    sync.take_list(ObjectKind::Service, services, now);
    sync.take_list(ObjectKind::Slice, slices, now);
    sync.take_list(ObjectKind::Node, vec![node(address)], now);
}

/// Frontends the maps hold, as `address:port`.
fn frontends(store: &MemoryMaps) -> Vec<String> {
    store
        .contents
        .services
        .keys()
        .map(|k| format!("{}:{}", lb_common::user::ip_from_be(k.addr_be), u16::from_be(k.port_be)))
        .collect()
}

#[test]
fn a_burst_is_synced_once_quiet_and_never_later_than_the_bound() {
    let mut c = Coalescer::default();
    assert_eq!(c.deadline(), None);
    let t0 = TokioInstant::now();
    c.note(t0);
    assert_eq!(c.deadline(), Some(t0 + QUIET));
    // Changes keep coming, each within the quiet time of the last.
    let mut t = t0;
    while t < t0 + MAX_DELAY * 2 {
        t += QUIET / 2;
        c.note(t);
    }
    assert_eq!(c.deadline(), Some(t0 + MAX_DELAY), "bounded by the burst's first change");
    c.clear();
    assert_eq!(c.deadline(), None);
}

#[test]
fn after_a_restart_nothing_is_deleted_until_every_kind_is_listed_then_only_what_is_gone() {
    let mut store = MemoryMaps::default();
    let mut sync = new_sync();
    let mut reconciler = Reconciler::adopt(&store).unwrap();
    list_all(
        &mut sync,
        vec![service("a", "10.96.0.1", None), service("b", "10.96.0.2", None)],
        vec![slice("a", &["10.244.1.1"]), slice("b", &["10.244.1.2"])],
        "192.168.0.1",
    );
    assert!(sync.step(&mut reconciler, &mut store).wrote);
    assert_eq!(frontends(&store), ["10.96.0.1:80", "10.96.0.2:80"]);

    // Restarted: adopt the maps; the Services come in while the slices are not listed yet.
    let mut sync = new_sync();
    let mut reconciler = Reconciler::adopt(&store).unwrap();
    let held = store.contents.clone();
    let (writes, deletes) = (store.writes, store.deletes);
    sync.take_list(ObjectKind::Service, vec![service("a", "10.96.0.1", None)], Instant::now());
    let step = sync.step(&mut reconciler, &mut store);
    assert!(!step.wrote);
    assert_eq!((store.writes, store.deletes), (writes, deletes), "no write before the lists are complete");
    assert!(sync.problems()[0].contains("until the source has listed every object once"), "{:?}", sync.problems());
    sync.take_list(ObjectKind::Slice, vec![slice("a", &["10.244.1.1"])], Instant::now());
    sync.take_list(ObjectKind::Node, vec![node("192.168.0.1")], Instant::now());
    assert!(sync.step(&mut reconciler, &mut store).wrote);
    // b is gone; a was kept as it was (same id, same slots).
    assert_eq!(frontends(&store), ["10.96.0.1:80"]);
    let key = *held.services.keys().next().unwrap();
    assert_eq!(store.contents.services[&key], held.services[&key]);
}

#[test]
fn a_relist_of_unchanged_objects_writes_and_deletes_nothing() {
    let mut store = MemoryMaps::default();
    let mut sync = new_sync();
    let mut reconciler = Reconciler::adopt(&store).unwrap();
    let services = || vec![service("a", "10.96.0.1", Some(30080))];
    let slices = || vec![slice("a", &["10.244.1.1", "10.244.1.2"])];
    list_all(&mut sync, services(), slices(), "192.168.0.1");
    sync.step(&mut reconciler, &mut store);
    let (contents, writes, deletes) = (store.contents.clone(), store.writes, store.deletes);
    // A 410 Gone: the watcher lists again and finds the same objects.
    assert!(!sync.take_list(ObjectKind::Service, services(), Instant::now()));
    assert!(!sync.take_list(ObjectKind::Slice, slices(), Instant::now()));
    sync.step(&mut reconciler, &mut store);
    assert_eq!((store.writes, store.deletes), (writes, deletes));
    assert_eq!(store.contents, contents);
}

#[test]
fn an_endpoint_change_is_written_with_its_latency_and_a_node_change_moves_node_ports() {
    let mut store = MemoryMaps::default();
    let mut sync = new_sync();
    let mut reconciler = Reconciler::adopt(&store).unwrap();
    let services = (0..50).map(|i| service(&format!("s{i}"), &format!("10.96.1.{i}"), None)).collect();
    list_all(&mut sync, services, vec![], "192.168.0.1");
    sync.take(Change::Applied(service("np", "10.96.0.9", Some(30080))), Instant::now());
    let step = sync.step(&mut reconciler, &mut store);
    assert!(step.latencies.is_empty(), "the first sync writes the starting state: no change, no latency");
    let (writes, deletes) = (store.writes, store.deletes);

    let arrived = Instant::now();
    assert!(sync.take(Change::Applied(slice("s7", &["10.244.1.7"])), arrived));
    let step = sync.step(&mut reconciler, &mut store);
    assert_eq!(step.latencies.len(), 1);
    assert!(step.latencies[0] <= arrived.elapsed());
    // One backend, one slot, the service entry moved to the new generation; nothing else.
    assert_eq!(store.writes - writes, 3, "only s7's frontend is written");
    assert_eq!(store.deletes, deletes);

    assert!(frontends(&store).contains(&"192.168.0.1:30080".to_string()));
    sync.take(Change::Applied(node("192.168.0.2")), Instant::now());
    sync.step(&mut reconciler, &mut store);
    let now = frontends(&store);
    assert!(
        now.contains(&"192.168.0.2:30080".to_string()) && !now.contains(&"192.168.0.1:30080".to_string()),
        "{now:?}"
    );
}

#[test]
fn without_this_nodes_node_object_nothing_is_written_and_the_sync_retries() {
    let mut store = MemoryMaps::default();
    let mut sync = new_sync();
    let mut reconciler = Reconciler::adopt(&store).unwrap();
    sync.take_list(ObjectKind::Service, vec![service("a", "10.96.0.1", None)], Instant::now());
    sync.take_list(ObjectKind::Slice, vec![], Instant::now());
    sync.take_list(ObjectKind::Node, vec![], Instant::now());
    let step = sync.step(&mut reconciler, &mut store);
    assert!(!step.wrote && step.failed && sync.needs_retry());
    assert_eq!(store.writes, 0);
    assert!(
        sync.problems()[0].starts_with("Node node1: status.addresses: no Node object of this name"),
        "{:?}",
        sync.problems()
    );
}

#[test]
fn a_change_whose_write_failed_has_its_latency_when_a_retry_writes_it() {
    let mut store = crate::reconcile::tests::Fake::default();
    let mut sync = new_sync();
    let mut reconciler = Reconciler::adopt(&store).unwrap();
    list_all(&mut sync, vec![service("a", "10.96.0.1", None)], vec![], "192.168.0.1");
    assert!(sync.step(&mut reconciler, &mut store).wrote);
    let arrived = Instant::now();
    store.full_for = Some(lb_common::ServiceKey::new("10.96.0.2".parse().unwrap(), 80, lb_common::IPPROTO_TCP));
    assert!(sync.take(Change::Applied(service("b", "10.96.0.2", None)), arrived));
    let step = sync.step(&mut reconciler, &mut store);
    assert!(step.failed && sync.needs_retry());
    assert!(step.latencies.is_empty(), "not programmed yet: {:?}", step.latencies);
    store.full_for = None;
    std::thread::sleep(Duration::from_millis(20));
    let step = sync.step(&mut reconciler, &mut store);
    assert!(!step.failed);
    assert_eq!(step.latencies.len(), 1);
    assert!(step.latencies[0] >= Duration::from_millis(20) && step.latencies[0] <= arrived.elapsed());
}
