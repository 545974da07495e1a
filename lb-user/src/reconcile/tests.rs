use std::{collections::BTreeMap, net::Ipv4Addr};

use super::*;
use crate::model::{BackendAddr, FrontendKind, Protocol, ServiceRef, SourceRanges, WhenEmpty};

#[derive(Debug, thiserror::Error)]
#[error("map full")]
struct FakeError;

/// An in-memory store that records every write, in order.
#[derive(Default)]
struct Fake {
    services: BTreeMap<ServiceKey, ServiceValue>,
    slots: BTreeMap<SlotKey, u32>,
    backends: BTreeMap<u32, Backend>,
    ranges: BTreeSet<(u32, Range)>,
    log: Vec<String>,
    /// put_service fails for this frontend, as with a full map.
    full_for: Option<ServiceKey>,
}

impl MapStore for Fake {
    type Error = FakeError;
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, FakeError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn slots(&self) -> Result<Vec<(SlotKey, u32)>, FakeError> {
        Ok(self.slots.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, FakeError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn source_ranges(&self) -> Result<Vec<(u32, Range)>, FakeError> {
        Ok(self.ranges.iter().copied().collect())
    }
    fn put_backend(&mut self, id: u32, b: Backend) -> Result<(), FakeError> {
        self.log.push(format!("put backend {id} {}:{}", b.ip(), b.port()));
        self.backends.insert(id, b);
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<(), FakeError> {
        self.log.push(format!("del backend {id}"));
        self.backends.remove(&id);
        Ok(())
    }
    fn put_slot(&mut self, k: SlotKey, id: u32) -> Result<(), FakeError> {
        self.log.push(format!("put slot {}/{} = {id}", k.svc_id, k.slot));
        self.slots.insert(k, id);
        Ok(())
    }
    fn del_slot(&mut self, k: SlotKey) -> Result<(), FakeError> {
        self.log.push(format!("del slot {}/{}", k.svc_id, k.slot));
        self.slots.remove(&k);
        Ok(())
    }
    fn put_source_range(&mut self, svc: u32, r: Range) -> Result<(), FakeError> {
        self.log.push(format!("put range {svc} /{}", r.1));
        self.ranges.insert((svc, r));
        Ok(())
    }
    fn del_source_range(&mut self, svc: u32, r: Range) -> Result<(), FakeError> {
        self.log.push(format!("del range {svc} /{}", r.1));
        self.ranges.remove(&(svc, r));
        Ok(())
    }
    fn put_service(&mut self, k: ServiceKey, v: ServiceValue) -> Result<(), FakeError> {
        if self.full_for == Some(k) {
            return Err(FakeError);
        }
        self.log.push(format!("put service {} count {}", v.svc_id, v.backend_count));
        self.services.insert(k, v);
        Ok(())
    }
    fn del_service(&mut self, k: ServiceKey) -> Result<(), FakeError> {
        self.log.push(format!("del service {}", self.services[&k].svc_id));
        self.services.remove(&k);
        Ok(())
    }
    fn put_config(&mut self, _: Config) -> Result<(), FakeError> {
        Ok(())
    }
}

fn frontend(backends: &[(u8, u16)]) -> Frontend {
    Frontend {
        service: ServiceRef { namespace: "default".into(), name: "web".into() },
        port_name: String::new(),
        kind: FrontendKind::ClusterIp,
        backends: backends
            .iter()
            .map(|(last, port)| BackendAddr { addr: Ipv4Addr::new(10, 244, 1, *last), port: *port, local: false })
            .collect(),
        short_circuit_backends: vec![],
        when_empty: WhenEmpty::Refuse,
        external_local: false,
        source_ranges: SourceRanges::Any,
        affinity_timeout_s: None,
        serving: vec![],
    }
}

fn desired(frontends: &[(u8, Frontend)]) -> Desired {
    let mut d = Desired::default();
    for (last, f) in frontends {
        d.frontends.insert(
            FrontendKey { addr: Ipv4Addr::new(10, 96, 0, *last), port: 80, protocol: Protocol::Tcp },
            f.clone(),
        );
    }
    d
}

fn apply(r: &mut Reconciler, store: &mut Fake, d: &Desired) -> Vec<String> {
    store.log.clear();
    r.apply(d, Config::default(), store).unwrap();
    std::mem::take(&mut store.log)
}

#[test]
fn writes_backends_then_slots_then_the_service_entry() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    let log = apply(&mut r, &mut store, &desired(&[(1, frontend(&[(10, 8080), (11, 8080)]))]));
    assert_eq!(
        log,
        [
            "put backend 1 10.244.1.10:8080",
            "put backend 2 10.244.1.11:8080",
            "put slot 1/0 = 1",
            "put slot 1/1 = 2",
            "put service 1 count 2"
        ]
    );
}

#[test]
fn shrinking_lowers_the_count_before_removing_slots_and_backends() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    apply(&mut r, &mut store, &desired(&[(1, frontend(&[(10, 8080), (11, 8080), (12, 8080)]))]));
    let log = apply(&mut r, &mut store, &desired(&[(1, frontend(&[(11, 8080)]))]));
    // Leftover slots go from the top down, so the view stays a prefix if a deletion fails.
    assert_eq!(
        log,
        ["put slot 1/0 = 2", "put service 1 count 1", "del slot 1/2", "del slot 1/1", "del backend 1", "del backend 3"]
    );
}

#[test]
fn an_unchanged_state_writes_nothing() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    let d = desired(&[(1, frontend(&[(10, 8080)]))]);
    apply(&mut r, &mut store, &d);
    assert!(apply(&mut r, &mut store, &d).is_empty());
}

#[test]
fn removed_service_entry_goes_before_its_slots_and_ranges() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    let mut lb = frontend(&[(10, 8080)]);
    lb.kind = FrontendKind::LoadBalancer;
    lb.source_ranges = SourceRanges::Only(vec!["192.168.0.0/16".parse().unwrap()]);
    apply(&mut r, &mut store, &desired(&[(1, lb), (2, frontend(&[(10, 8080)]))]));
    assert_eq!(store.services.values().next().unwrap().flags, service_flags::EXTERNAL | service_flags::SOURCE_RANGES);
    let log = apply(&mut r, &mut store, &desired(&[(2, frontend(&[(10, 8080)]))]));
    assert_eq!(log, ["del service 1", "del slot 1/0", "del range 1 /16"]);
    assert!(store.ranges.is_empty());
}

#[test]
fn a_restarted_reconciler_adopts_ids_and_only_removes_what_is_no_longer_desired() {
    let mut store = Fake::default();
    let mut first = Reconciler::adopt(&store).unwrap();
    apply(&mut first, &mut store, &desired(&[(1, frontend(&[(10, 8080)])), (2, frontend(&[(11, 8080)]))]));
    let (services, backends) = (store.services.clone(), store.backends.clone());
    // Restart: a fresh reconciler over the same maps, same desired state: no writes.
    let mut second = Reconciler::adopt(&store).unwrap();
    let d = desired(&[(1, frontend(&[(10, 8080)])), (2, frontend(&[(11, 8080)]))]);
    assert!(apply(&mut second, &mut store, &d).is_empty());
    assert_eq!((store.services.clone(), store.backends.clone()), (services, backends));
    // New ids continue after the adopted ones.
    let log = apply(&mut second, &mut store, &desired(&[(1, frontend(&[(10, 8080)])), (3, frontend(&[(12, 8080)]))]));
    assert_eq!(
        log,
        [
            "put backend 3 10.244.1.12:8080",
            "put slot 3/0 = 3",
            "put service 3 count 1",
            "del service 2",
            "del slot 2/0",
            "del backend 2"
        ]
    );
}

#[test]
fn adoption_cleans_up_slots_left_past_the_count() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    apply(&mut r, &mut store, &desired(&[(1, frontend(&[(10, 8080), (11, 8080)]))]));
    // As if an agent died between "put service count 1" and "del slot 1/1".
    store.services.values_mut().for_each(|v| v.backend_count = 1);
    let mut r = Reconciler::adopt(&store).unwrap();
    let log = apply(&mut r, &mut store, &desired(&[(1, frontend(&[(10, 8080)]))]));
    assert_eq!(log, ["del slot 1/1", "del backend 2"]);
}

#[test]
fn a_frontend_that_cannot_be_written_is_reported_and_the_others_are_written() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    let d = desired(&[(1, frontend(&[(10, 8080)])), (2, frontend(&[(11, 8080)]))]);
    store.full_for = Some(service_key(d.frontends.keys().next().unwrap()));
    let changes = r.apply(&d, Config::default(), &mut store).unwrap();
    assert_eq!(changes.failures, ["Service default/web: frontend 10.96.0.1:80/TCP: map full"]);
    assert_eq!(store.services.len(), 1, "the other frontend is served");
    assert_eq!(store.slots.len(), 2, "the failed frontend's slot is written, its entry is not");
    // Once the map has room, the next apply finishes the job.
    store.full_for = None;
    let changes = r.apply(&d, Config::default(), &mut store).unwrap();
    assert!(changes.failures.is_empty());
    assert_eq!((store.services.len(), store.slots.len(), store.backends.len()), (2, 2, 2));
}

#[test]
fn a_frontend_without_backends_gets_its_entry_so_clients_are_refused() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    let log = apply(&mut r, &mut store, &desired(&[(1, frontend(&[]))]));
    assert_eq!(log, ["put service 1 count 0"]);
}
