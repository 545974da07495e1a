use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_common::FrontendMeta;

use super::*;
use crate::{
    datapath::maps::Contents,
    model::{Algorithm, BackendAddr, FrontendKind, Protocol, ServiceRef, SourceRanges, WhenEmpty},
};

#[derive(Debug, thiserror::Error)]
#[error("map full")]
pub(crate) struct FakeError;

/// An in-memory store that records every write, in order.
#[derive(Default)]
pub(crate) struct Fake {
    services: BTreeMap<ServiceKey, ServiceValue>,
    slots: BTreeMap<SlotKey, u32>,
    backends: BTreeMap<u32, Backend>,
    ranges: BTreeSet<(u32, Range)>,
    filter: BTreeMap<u32, u64>,
    metas: BTreeMap<ServiceKey, FrontendMeta>,
    log: Vec<String>,
    /// put_service fails for this frontend, as with a full map.
    pub(crate) full_for: Option<ServiceKey>,
    /// After this many more put_backend calls, one fails.
    backend_write_failing_after: Option<usize>,
}

fn slot(k: &SlotKey) -> String {
    format!("{}/g{}s{}/{}", k.svc_id, k.gen(), k.set(), k.position())
}

impl MapStore for Fake {
    type Error = FakeError;
    fn id_limits(&self) -> (u32, u32) {
        (1000, 1000)
    }
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, FakeError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn slots(&self) -> Result<Vec<(SlotKey, u32)>, FakeError> {
        Ok(self.slots.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, FakeError> {
        Ok(self.backends.iter().filter(|(_, b)| b.addr_be != 0).map(|(k, v)| (*k, *v)).collect())
    }
    fn backend_gens(&self) -> Result<Vec<(u32, u32)>, FakeError> {
        Ok(self.backends.iter().filter(|(_, b)| b.addr_be == 0).map(|(k, v)| (*k, v.gen)).collect())
    }
    fn source_ranges(&self) -> Result<Vec<(u32, Range)>, FakeError> {
        Ok(self.ranges.iter().copied().collect())
    }
    fn filter_words(&self) -> Result<Vec<(u32, u64)>, FakeError> {
        Ok(self.filter.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_backend(&mut self, id: u32, b: Backend) -> Result<(), FakeError> {
        match self.backend_write_failing_after {
            Some(0) => {
                self.backend_write_failing_after = None;
                return Err(FakeError);
            }
            Some(n) => self.backend_write_failing_after = Some(n - 1),
            None => {}
        }
        if b.addr_be == 0 {
            self.log.push(format!("free backend {id} gen {}", b.gen));
        } else {
            self.log.push(format!("put backend {id} {}:{} gen {}", b.ip(), b.port(), b.gen));
        }
        self.backends.insert(id, b);
        Ok(())
    }
    fn put_slot(&mut self, k: SlotKey, id: u32) -> Result<(), FakeError> {
        self.log.push(format!("put slot {} = {id}", slot(&k)));
        self.slots.insert(k, id);
        Ok(())
    }
    fn del_slot(&mut self, k: SlotKey) -> Result<(), FakeError> {
        self.log.push(format!("del slot {}", slot(&k)));
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
        self.log.push(format!("put service {} gen {} count {:?}", v.svc_id, v.gen, v.count));
        self.services.insert(k, v);
        Ok(())
    }
    fn del_service(&mut self, k: ServiceKey) -> Result<(), FakeError> {
        self.log.push(format!("del service {}", self.services[&k].svc_id));
        self.services.remove(&k);
        Ok(())
    }
    fn put_filter_word(&mut self, index: u32, word: u64) -> Result<(), FakeError> {
        self.log.push(format!("filter {} bits", word.count_ones()));
        if word == 0 {
            self.filter.remove(&index);
        } else {
            self.filter.insert(index, word);
        }
        Ok(())
    }
    fn put_config(&mut self, _: Config) -> Result<(), FakeError> {
        Ok(())
    }
    fn frontend_metas(&self) -> Result<Vec<(ServiceKey, FrontendMeta)>, FakeError> {
        Ok(self.metas.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_frontend_meta(&mut self, k: ServiceKey, m: FrontendMeta) -> Result<(), FakeError> {
        self.log.push(format!("meta {k} = {}", drift::describe_meta(&m)));
        self.metas.insert(k, m);
        Ok(())
    }
    fn del_frontend_meta(&mut self, k: ServiceKey) -> Result<(), FakeError> {
        self.log.push(format!("meta {k} removed"));
        self.metas.remove(&k);
        Ok(())
    }
    fn clear_frontend_stats(&mut self, svc_id: u32) -> Result<(), FakeError> {
        self.log.push(format!("clear frontend stats {svc_id}"));
        Ok(())
    }
    fn clear_backend_stats(&mut self, id: u32) -> Result<(), FakeError> {
        self.log.push(format!("clear backend stats {id}"));
        Ok(())
    }
}

/// The log without the filter's, names' and counters' writes (their tests look at them on
/// their own).
fn writes(log: Vec<String>) -> Vec<String> {
    log.into_iter().filter(|l| !l.starts_with("filter") && !l.starts_with("meta") && !l.starts_with("clear")).collect()
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
        algorithm: Algorithm::Random,
        retained: vec![],
    }
}

fn desired(frontends: &[(u8, Frontend)]) -> Desired {
    let mut d = Desired::default();
    for (last, f) in frontends {
        d.frontends.insert(
            FrontendKey { addr: Ipv4Addr::new(10, 96, 0, *last), port: 80, protocol: Protocol::Tcp },
            f.clone().into(),
        );
    }
    d
}

fn apply(r: &mut Reconciler, store: &mut Fake, d: &Desired) -> Vec<String> {
    store.log.clear();
    let changes = r.apply(d, Config::default(), store).unwrap();
    assert!(changes.failures.is_empty(), "{:?}", changes.failures);
    writes(std::mem::take(&mut store.log))
}

#[test]
fn writes_backends_then_slots_then_the_service_entry() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    let log = apply(&mut r, &mut store, &desired(&[(1, frontend(&[(10, 8080), (11, 8080)]))]));
    assert_eq!(
        log,
        [
            "put backend 1 10.244.1.10:8080 gen 1",
            "put backend 2 10.244.1.11:8080 gen 1",
            "put slot 1/g0s0/0 = 1",
            "put slot 1/g0s0/1 = 2",
            "put service 1 gen 0 count [2, 0]"
        ]
    );
}

#[test]
fn a_changed_backend_set_is_written_whole_under_the_other_generation_then_swapped_in() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    apply(&mut r, &mut store, &desired(&[(1, frontend(&[(10, 8080), (11, 8080), (12, 8080)]))]));
    let log = apply(&mut r, &mut store, &desired(&[(1, frontend(&[(11, 8080), (13, 8080)]))]));
    // A packet sees generation 0 (old set, whole) until the entry names generation 1 (new
    // set, whole); then the old slots go, then the backends no one uses.
    assert_eq!(
        log,
        [
            "put backend 4 10.244.1.13:8080 gen 1",
            "put slot 1/g1s0/0 = 2",
            "put slot 1/g1s0/1 = 4",
            "put service 1 gen 1 count [2, 0]",
            "del slot 1/g0s0/2",
            "del slot 1/g0s0/1",
            "del slot 1/g0s0/0",
            "free backend 1 gen 2",
            "free backend 3 gen 2",
        ]
    );
}

#[test]
fn a_reused_backend_id_gets_a_new_generation() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    apply(&mut r, &mut store, &desired(&[(1, frontend(&[(10, 8080)]))]));
    apply(&mut r, &mut store, &desired(&[(1, frontend(&[]))]));
    let log = apply(&mut r, &mut store, &desired(&[(1, frontend(&[(20, 8080)]))]));
    // Flows that chose 10.244.1.10 remember (id 1, gen 1): id 1 now names another endpoint
    // at gen 3, so they know their backend is gone.
    assert_eq!(log[0], "put backend 1 10.244.1.20:8080 gen 3");
}

#[test]
fn retained_endpoints_keep_their_ids_without_slots() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    apply(&mut r, &mut store, &desired(&[(1, frontend(&[(10, 8080), (11, 8080)]))]));
    let mut draining = frontend(&[(11, 8080)]);
    draining.retained = frontend(&[(10, 8080)]).backends;
    let log = apply(&mut r, &mut store, &desired(&[(1, draining)]));
    assert!(!log.iter().any(|l| l.starts_with("free backend")), "the terminating backend keeps its flows: {log:?}");
    assert_eq!(store.backends[&1].ip(), Ipv4Addr::new(10, 244, 1, 10));
    let log = apply(&mut r, &mut store, &desired(&[(1, frontend(&[(11, 8080)]))]));
    assert_eq!(log, ["free backend 1 gen 2"], "gone from the slices: freed");
}

#[test]
fn the_short_circuit_set_goes_in_set_one() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    let mut etp = frontend(&[(10, 8080)]);
    etp.kind = FrontendKind::NodePort;
    etp.external_local = true;
    etp.short_circuit_backends = frontend(&[(10, 8080), (11, 8080)]).backends;
    let log = apply(&mut r, &mut store, &desired(&[(1, etp)]));
    assert_eq!(
        &log[2..],
        ["put slot 1/g0s0/0 = 1", "put slot 1/g0s1/0 = 1", "put slot 1/g0s1/1 = 2", "put service 1 gen 0 count [1, 2]"]
    );
    let v = store.services.values().next().unwrap();
    assert_eq!(v.flags, service_flags::EXTERNAL | service_flags::EXTERNAL_LOCAL);
}

#[test]
fn an_unchanged_state_writes_nothing() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    let d = desired(&[(1, frontend(&[(10, 8080)]))]);
    apply(&mut r, &mut store, &d);
    store.log.clear();
    r.apply(&d, Config::default(), &mut store).unwrap();
    assert!(store.log.is_empty(), "{:?}", store.log);
}

#[test]
fn the_frontend_filter_gains_bits_before_entries_and_loses_them_after() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    store.log.clear();
    r.apply(&desired(&[(1, frontend(&[(10, 8080)]))]), Config::default(), &mut store).unwrap();
    assert_eq!(store.log.first().map(String::as_str), Some("filter 1 bits"), "{:?}", store.log);
    let key = service_key(desired(&[(1, frontend(&[]))]).frontends.keys().next().unwrap());
    let bit = lb_common::front_filter_bit(key.addr_be, key.port_be);
    assert_eq!(store.filter[&(bit / 64)] >> (bit % 64) & 1, 1);
    store.log.clear();
    r.apply(&Desired::default(), Config::default(), &mut store).unwrap();
    assert_eq!(store.log.last().map(String::as_str), Some("filter 0 bits"), "{:?}", store.log);
    assert!(store.filter.is_empty());
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
    assert_eq!(log, ["del service 1", "del slot 1/g0s0/0", "del range 1 /16"]);
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
    let log = apply(&mut second, &mut store, &desired(&[(1, frontend(&[(10, 8080)])), (3, frontend(&[(12, 8080)]))]));
    assert_eq!(
        log,
        [
            "put backend 3 10.244.1.12:8080 gen 1",
            "put slot 3/g0s0/0 = 3",
            "put service 3 gen 0 count [1, 0]",
            "del service 2",
            "del slot 2/g0s0/0",
            "free backend 2 gen 2"
        ]
    );
}

#[test]
fn after_a_restart_with_changed_services_no_frontend_inherits_another_ones_ranges_or_id() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    let mut lb = frontend(&[(10, 8080)]);
    lb.kind = FrontendKind::LoadBalancer;
    lb.source_ranges = SourceRanges::Only(vec!["192.168.0.0/16".parse().unwrap()]);
    apply(&mut r, &mut store, &desired(&[(1, lb)]));
    // As if the agent died after removing frontend 1's entry but before its range: the range
    // of id 1 is left behind.
    let key = *store.services.keys().next().unwrap();
    store.services.remove(&key);
    let mut restarted = Reconciler::adopt(&store).unwrap();
    apply(&mut restarted, &mut store, &desired(&[(2, frontend(&[(11, 8080)]))]));
    let v = store.services.values().next().unwrap();
    assert_eq!(v.svc_id, 1, "the id is free again and reused");
    assert_eq!(v.flags & service_flags::SOURCE_RANGES, 0);
    assert!(store.ranges.is_empty(), "the new frontend does not inherit the old one's ranges: {:?}", store.ranges);
    assert_eq!(store.slots.len(), 1);
}

#[test]
fn adoption_cleans_up_slots_of_a_dead_generation() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    apply(&mut r, &mut store, &desired(&[(1, frontend(&[(10, 8080), (11, 8080)]))]));
    // As if an agent died after the swap to generation 1 but before removing generation 0.
    store.slots.insert(SlotKey::new(1, 1, 0, 0), 2);
    store.services.values_mut().for_each(|v| *v = ServiceValue { gen: 1, count: [1, 0], ..*v }.sealed());
    let mut r = Reconciler::adopt(&store).unwrap();
    let log = apply(&mut r, &mut store, &desired(&[(1, frontend(&[(11, 8080)]))]));
    assert_eq!(log, ["del slot 1/g0s0/0", "del slot 1/g0s0/1", "free backend 1 gen 2"]);
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
    assert_eq!(log, ["put service 1 gen 0 count [0, 0]"]);
}

#[test]
fn names_go_in_before_the_entry_and_out_after_it() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    let mut np = frontend(&[(10, 8080)]);
    np.kind = FrontendKind::NodePort;
    np.port_name = "http".into();
    r.apply(&desired(&[(1, np.clone())]), Config::default(), &mut store).unwrap();
    let at = |log: &[String], prefix: &str| log.iter().position(|l| l.starts_with(prefix)).unwrap();
    assert!(at(&store.log, "meta 10.96.0.1:80/TCP = default/web port http (NodePort)") < at(&store.log, "put service"));
    // A restarted agent finds the names and writes none again.
    let mut restarted = Reconciler::adopt(&store).unwrap();
    store.log.clear();
    restarted.apply(&desired(&[(1, np)]), Config::default(), &mut store).unwrap();
    assert!(store.log.is_empty(), "{:?}", store.log);
    restarted.apply(&Desired::default(), Config::default(), &mut store).unwrap();
    assert!(at(&store.log, "del service") < at(&store.log, "meta 10.96.0.1:80/TCP removed"));
    assert!(store.metas.is_empty());
}

#[test]
fn ids_given_to_a_new_frontend_or_endpoint_count_from_zero() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    r.apply(&desired(&[(1, frontend(&[(10, 8080)]))]), Config::default(), &mut store).unwrap();
    let at =
        |log: &[String], line: &str| log.iter().position(|l| l == line).unwrap_or_else(|| panic!("{line}: {log:?}"));
    assert!(at(&store.log, "clear frontend stats 1") < at(&store.log, "put service 1 gen 0 count [1, 0]"));
    // A backend id never used before counts from zero already: no write for it.
    assert!(!store.log.iter().any(|l| l.starts_with("clear backend")), "{:?}", store.log);
    // The same frontend and endpoint again: their counters go on.
    store.log.clear();
    r.apply(&desired(&[(1, frontend(&[(10, 8080), (11, 8080)]))]), Config::default(), &mut store).unwrap();
    assert!(!store.log.iter().any(|l| l.starts_with("clear")), "{:?}", store.log);
    // Backend id 1 freed, then given to another endpoint: its counters start again.
    r.apply(&desired(&[(1, frontend(&[(11, 8080)]))]), Config::default(), &mut store).unwrap();
    store.log.clear();
    r.apply(&desired(&[(1, frontend(&[(11, 8080), (12, 8080)]))]), Config::default(), &mut store).unwrap();
    assert!(at(&store.log, "clear backend stats 1") < at(&store.log, "put backend 1 10.244.1.12:8080 gen 3"));
}

/// A store holding what the reconciler wrote for `d`, and the drift check over it.
fn programmed(d: &Desired) -> (Fake, impl Fn(&Fake) -> Vec<drift::Drift> + '_) {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    r.apply(d, Config::default(), &mut store).unwrap();
    (store, move |s: &Fake| drift::drift(d, &Contents::read(s).unwrap(), MaglevSize::default()))
}

fn fields(drifts: &[drift::Drift]) -> Vec<(&str, &str)> {
    drifts.iter().map(|d| (d.frontend.as_str(), d.field.as_str())).collect()
}

#[test]
fn maps_as_the_reconciler_wrote_them_have_no_drift() {
    let mut maglev = frontend(&[(10, 8080), (11, 8080), (12, 8080)]);
    maglev.algorithm = Algorithm::Maglev;
    let mut etp = frontend(&[(10, 8080)]);
    etp.kind = FrontendKind::LoadBalancer;
    etp.external_local = true;
    etp.short_circuit_backends = frontend(&[(10, 8080), (11, 8080)]).backends;
    etp.source_ranges = SourceRanges::Only(vec!["192.168.0.0/16".parse().unwrap()]);
    etp.affinity_timeout_s = Some(60);
    let mut draining = frontend(&[(11, 8080)]);
    draining.retained = frontend(&[(13, 8080)]).backends;
    let d = desired(&[(1, maglev), (2, etp), (3, draining), (4, frontend(&[]))]);
    let (store, check) = programmed(&d);
    assert_eq!(check(&store), []);
}

#[test]
fn a_slot_pointed_at_another_backend_is_drift() {
    let mut other = frontend(&[(12, 8080)]);
    other.service.name = "other".into();
    let d = desired(&[(1, frontend(&[(10, 8080), (11, 8080)])), (2, other)]);
    let (mut store, check) = programmed(&d);
    // Frontend 1's second slot now names frontend 2's backend (id 3).
    let slot = SlotKey::new(1, 0, 0, 1);
    assert_eq!(store.slots.insert(slot, 3), Some(2));
    let found = check(&store);
    assert_eq!(fields(&found), [("10.96.0.1:80/TCP", "slots[0]")]);
    assert_eq!(found[0].want, "10.244.1.10:8080, 10.244.1.11:8080");
    assert_eq!(
        found[0].have,
        "1 of 2 positions differ; position 1 holds 10.244.1.12:8080 (id 3, of another Service port)"
    );
    // A hole in the set is drift too.
    store.slots.remove(&slot);
    assert_eq!(check(&store)[0].have, "1 of 2 positions differ; position 1 holds no slot");
}

#[test]
fn entries_missing_extra_or_changed_are_drift() {
    let d = desired(&[(1, frontend(&[(10, 8080)])), (2, frontend(&[(11, 8080)]))]);
    let (mut store, check) = programmed(&d);
    let keys: Vec<ServiceKey> = store.services.keys().copied().collect();
    store.services.remove(&keys[1]);
    let extra = ServiceKey::new(Ipv4Addr::new(10, 96, 9, 9), 53, lb_common::IPPROTO_UDP);
    store.services.insert(extra, ServiceValue { svc_id: 9, ..Default::default() });
    let v = store.services.get_mut(&keys[0]).unwrap();
    v.flags |= service_flags::DROP_WHEN_EMPTY;
    v.algorithm = lb_common::algorithm::MAGLEV;
    let found = check(&store);
    assert_eq!(
        fields(&found),
        [
            ("10.96.0.1:80/TCP", "flags"),
            ("10.96.0.1:80/TCP", "algorithm"),
            ("10.96.0.2:80/TCP", "entry"),
            ("10.96.9.9:53/UDP", "entry")
        ]
    );
    assert_eq!((found[0].want.as_str(), found[0].have.as_str()), ("none", "drop-when-empty"));
    assert_eq!((found[1].want.as_str(), found[1].have.as_str()), ("random", "maglev"));
    assert_eq!(found[3].have, "present (frontend id 9)");
}

#[test]
fn backend_flags_retained_endpoints_ranges_filter_and_names_are_checked() {
    let mut lb = frontend(&[(10, 8080)]);
    lb.kind = FrontendKind::LoadBalancer;
    lb.source_ranges = SourceRanges::Only(vec!["192.168.0.0/16".parse().unwrap()]);
    lb.retained = frontend(&[(11, 8080)]).backends;
    let d = desired(&[(1, lb)]);
    let (mut store, check) = programmed(&d);
    let key = *store.services.keys().next().unwrap();
    store.backends.get_mut(&1).unwrap().flags &= !backend_flags::CHOSEN;
    store.backends.get_mut(&2).unwrap().flags |= backend_flags::CHOSEN;
    store.ranges.clear();
    store.filter.clear();
    store.metas.insert(key, FrontendMeta::new("default", "other", "", lb_common::frontend_kind::CLUSTER_IP));
    let found = check(&store);
    assert_eq!(
        fields(&found).into_iter().map(|(_, f)| f).collect::<Vec<_>>(),
        ["backend", "retained", "source_ranges", "filter", "name"]
    );
    assert_eq!(found[2].want, "192.168.0.0/16");
    assert_eq!(
        (found[4].want.as_str(), found[4].have.as_str()),
        ("default/web (LoadBalancer)", "default/other (ClusterIP)")
    );
    // A retained endpoint whose entry is gone has its flows cut.
    store.backends.remove(&2);
    assert!(check(&store).iter().any(|d| d.field == "retained" && d.have == "no entry: its flows are cut"));
}

#[test]
fn a_maglev_table_built_for_other_backends_is_drift() {
    let mut mg = frontend(&[(10, 8080), (11, 8080)]);
    mg.algorithm = Algorithm::Maglev;
    let d = desired(&[(1, mg.clone())]);
    let (store, _) = programmed(&d);
    // The model now wants a third backend: the table (and its size) must change.
    mg.backends = frontend(&[(10, 8080), (11, 8080), (12, 8080)]).backends;
    let wants_more = desired(&[(1, mg)]);
    let found = drift::drift(&wants_more, &Contents::read(&store).unwrap(), MaglevSize::default());
    assert_eq!(fields(&found).into_iter().map(|(_, f)| f).collect::<Vec<_>>(), ["count[0]", "slots[0]"]);
    assert!(
        found[1].want.starts_with("509 positions over 10.244.1.10:8080, 10.244.1.11:8080, 10.244.1.12:8080"),
        "{}",
        found[1].want
    );
}

#[test]
fn drift_serializes_with_its_documented_field_names() {
    let d = drift::Drift {
        frontend: "10.96.0.1:80/TCP".into(),
        field: "filter".into(),
        want: "a".into(),
        have: "b".into(),
    };
    assert_eq!(
        serde_json::to_value(&d).unwrap(),
        serde_json::json!({"frontend": "10.96.0.1:80/TCP", "field": "filter", "want": "a", "have": "b"})
    );
}

#[test]
fn a_loopback_node_port_is_flagged_for_the_socket_hooks_alone() {
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    let mut np = frontend(&[(10, 8080)]);
    np.kind = FrontendKind::NodePort;
    let mut d = Desired::default();
    for addr in [Ipv4Addr::LOCALHOST, Ipv4Addr::new(192, 168, 50, 10)] {
        d.frontends.insert(FrontendKey { addr, port: 30080, protocol: Protocol::Tcp }, np.clone().into());
    }
    apply(&mut r, &mut store, &d);
    let flags = |ip| store.services[&ServiceKey::new(ip, 30080, lb_common::IPPROTO_TCP)].flags;
    assert_eq!(flags(Ipv4Addr::LOCALHOST), service_flags::EXTERNAL | service_flags::LOOPBACK);
    assert_eq!(flags(Ipv4Addr::new(192, 168, 50, 10)), service_flags::EXTERNAL);
}

#[test]
fn repair_writes_back_what_was_changed_behind_the_reconcilers_back_and_only_that() {
    let mut other = frontend(&[(12, 8080)]);
    other.service.name = "other".into();
    let d = desired(&[(1, frontend(&[(10, 8080), (11, 8080)])), (2, other)]);
    let mut store = Fake::default();
    let mut r = Reconciler::adopt(&store).unwrap();
    apply(&mut r, &mut store, &d);
    assert_eq!(r.repair(&d, &mut store).unwrap(), None, "nothing changed: nothing to repair");
    assert!(store.log.is_empty(), "a check writes nothing: {:?}", store.log);
    let as_written = (store.services.clone(), store.backends.clone(), store.metas.clone());
    // Behind its back: frontend 1's second slot names frontend 2's backend, frontend 2's
    // entry says maglev, and frontend 1's name is gone.
    store.slots.insert(SlotKey::new(1, 0, 0, 1), 3);
    let key2 = ServiceKey::new(Ipv4Addr::new(10, 96, 0, 2), 80, lb_common::IPPROTO_TCP);
    store.services.get_mut(&key2).unwrap().algorithm = lb_common::algorithm::MAGLEV;
    store.metas.remove(&ServiceKey::new(Ipv4Addr::new(10, 96, 0, 1), 80, lb_common::IPPROTO_TCP));
    let repair = r.repair(&d, &mut store).unwrap().expect("drift found");
    assert_eq!(
        fields(&repair.drift),
        [("10.96.0.1:80/TCP", "slots[0]"), ("10.96.0.1:80/TCP", "name"), ("10.96.0.2:80/TCP", "algorithm")]
    );
    assert_eq!(repair.frontends(), 2);
    assert!(repair.changes.failures.is_empty(), "{:?}", repair.changes.failures);
    // Frontend 1's set goes in whole under the other generation; frontend 2 only gets its
    // entry again; no backend was added or freed.
    assert_eq!(
        writes(std::mem::take(&mut store.log)),
        [
            "put slot 1/g1s0/0 = 1",
            "put slot 1/g1s0/1 = 2",
            "put service 1 gen 1 count [2, 0]",
            "del slot 1/g0s0/1",
            "del slot 1/g0s0/0",
            "put service 2 gen 0 count [1, 0]"
        ]
    );
    assert_eq!(drift::drift(&d, &Contents::read(&store).unwrap(), MaglevSize::default()), []);
    assert_eq!(store.backends, as_written.1);
    assert_eq!(store.metas, as_written.2);
    assert_eq!(store.services[&key2], as_written.0[&key2]);
    // The reconciler's view follows: the next apply of the same state writes nothing.
    assert_eq!(apply(&mut r, &mut store, &d), Vec::<String>::new());
}

/// What a store holds, for comparing two stores.
fn contents(s: &Fake) -> impl PartialEq + std::fmt::Debug {
    (s.services.clone(), s.slots.clone(), s.backends.clone(), s.ranges.clone(), s.filter.clone(), s.metas.clone())
}

mod incremental {
    use proptest::prelude::*;

    use super::*;

    /// A desired state over a small pool of frontends, services and backends, so that
    /// sequences share, move and drop backends.
    fn desired_state() -> impl Strategy<Value = Desired> {
        let one = (
            0..3u8,
            proptest::collection::vec((1..6u8, any::<bool>()), 0..4),
            proptest::collection::vec(1..6u8, 0..2),
            any::<bool>(),
        );
        proptest::collection::btree_map(1..6u8, one, 0..5).prop_map(|frontends| {
            let mut d = Desired::default();
            for (last, (svc, backends, retained, maglev)) in frontends {
                let mut f = frontend(&[]);
                f.service.name = format!("svc{svc}").into();
                let addr = |b: u8, local: bool| BackendAddr { addr: Ipv4Addr::new(10, 244, 1, b), port: 8080, local };
                f.backends = backends.iter().map(|(b, l)| addr(*b, *l)).collect::<BTreeSet<_>>().into_iter().collect();
                f.retained =
                    retained.iter().map(|b| addr(*b + 10, false)).collect::<BTreeSet<_>>().into_iter().collect();
                f.algorithm = if maglev { Algorithm::Maglev } else { Algorithm::Random };
                d.frontends.insert(
                    FrontendKey { addr: Ipv4Addr::new(10, 96, 0, last), port: 80, protocol: Protocol::Tcp },
                    f.into(),
                );
            }
            d
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Writing only the frontends that changed leaves the maps as a full apply does.
        #[test]
        fn applying_only_the_changes_equals_a_full_apply(states in proptest::collection::vec(desired_state(), 1..8)) {
            let (mut full_store, mut inc_store) = (Fake::default(), Fake::default());
            let mut full = Reconciler::adopt(&full_store).unwrap();
            let mut inc = Reconciler::adopt(&inc_store).unwrap();
            let mut previous = Desired::default();
            for (i, d) in states.iter().enumerate() {
                full.apply(d, Config::default(), &mut full_store).unwrap();
                let keys: BTreeSet<FrontendKey> = previous.frontends.keys().chain(d.frontends.keys()).copied().collect();
                let changed: BTreeSet<FrontendKey> =
                    keys.into_iter().filter(|k| previous.frontends.get(k) != d.frontends.get(k)).collect();
                // The first apply after adoption is a full one, as the sync makes it.
                let only = (i > 0).then_some(&changed);
                inc.apply_changes(d, only, Config::default(), &mut inc_store).unwrap();
                prop_assert_eq!(contents(&inc_store), contents(&full_store), "after state {}", i);
                previous = d.clone();
            }
        }
    }

    /// An apply stopped by a map error loses its view of the maps and what it still had to
    /// write; the next one, even with nothing new to write (as the sync retries it), starts
    /// over from the maps and leaves them as a full apply does.
    #[test]
    fn an_apply_stopped_by_a_map_error_is_completed_by_the_next() {
        let one = |backends: &[u8]| {
            let mut d = Desired::default();
            let mut f = frontend(&[]);
            f.backends = backends
                .iter()
                .map(|b| BackendAddr { addr: Ipv4Addr::new(10, 244, 1, *b), port: 8080, local: false })
                .collect();
            d.frontends
                .insert(FrontendKey { addr: Ipv4Addr::new(10, 96, 0, 1), port: 80, protocol: Protocol::Tcp }, f.into());
            d
        };
        let (before, after) = (one(&[1, 2]), one(&[1, 3]));
        // The same two applies without a failure.
        let mut expected = Fake::default();
        let mut undisturbed = Reconciler::adopt(&expected).unwrap();
        undisturbed.apply(&before, Config::default(), &mut expected).unwrap();
        undisturbed.apply(&after, Config::default(), &mut expected).unwrap();
        let changed: BTreeSet<FrontendKey> = after.frontends.keys().copied().collect();
        let mut stopped = 0;
        // Each backend write of the change in turn fails: the new endpoint's, the flags of
        // the chosen ones, the removed one's release.
        for failing_after in 0..6 {
            let mut store = Fake::default();
            let mut r = Reconciler::adopt(&store).unwrap();
            r.apply_changes(&before, None, Config::default(), &mut store).unwrap();
            store.backend_write_failing_after = Some(failing_after);
            stopped += usize::from(r.apply_changes(&after, Some(&changed), Config::default(), &mut store).is_err());
            r.apply_changes(&after, Some(&BTreeSet::new()), Config::default(), &mut store).unwrap();
            assert_eq!(contents(&store), contents(&expected), "a failure after {failing_after} backend writes");
        }
        assert!(stopped > 0, "some failure stopped an apply partway");
    }
}
