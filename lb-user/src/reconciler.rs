//! The reconciler: the only writer of the service maps. It keeps a view of what the maps
//! hold and, given a desired state, writes the difference in an order that never lets a
//! packet see a half-updated Service: backends, then slots, then the service entry with
//! its new count, then removals. After a restart it adopts what the pinned maps hold
//! (ids included, so tracked flows keep pointing at valid backends).
use std::collections::{BTreeMap, BTreeSet};

use lb_common::{service_flags, Backend, Config, ServiceKey, ServiceValue, SlotKey};

use crate::model::{Cidr, Desired, Frontend, FrontendKey};

/// A source range of one frontend: (address in network order, prefix length).
pub type Range = (u32, u8);

/// Access to the service maps. The datapath implementation is in `maps`; tests use a fake
/// that records the order of writes.
pub trait MapStore {
    type Error: std::error::Error + Send + Sync + 'static;
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Self::Error>;
    fn slots(&self) -> Result<Vec<(SlotKey, u32)>, Self::Error>;
    fn backends(&self) -> Result<Vec<(u32, Backend)>, Self::Error>;
    fn source_ranges(&self) -> Result<Vec<(u32, Range)>, Self::Error>;
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), Self::Error>;
    fn del_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    fn put_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), Self::Error>;
    fn del_slot(&mut self, key: SlotKey) -> Result<(), Self::Error>;
    fn put_source_range(&mut self, svc_id: u32, range: Range) -> Result<(), Self::Error>;
    fn del_source_range(&mut self, svc_id: u32, range: Range) -> Result<(), Self::Error>;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), Self::Error>;
    fn del_service(&mut self, key: ServiceKey) -> Result<(), Self::Error>;
    fn put_config(&mut self, config: Config) -> Result<(), Self::Error>;
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct FrontendState {
    value: ServiceValue,
    slots: Vec<u32>,
    ranges: BTreeSet<Range>,
}

/// What one `apply` changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub services_written: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
}

#[derive(Debug, Default)]
pub struct Reconciler {
    frontends: BTreeMap<ServiceKey, FrontendState>,
    backend_ids: BTreeMap<Backend, u32>,
    next_svc_id: u32,
    next_backend_id: u32,
}

impl Reconciler {
    /// Starts from what the maps hold now (empty maps give an empty view).
    pub fn adopt<S: MapStore>(store: &S) -> Result<Self, S::Error> {
        let mut r = Reconciler { next_svc_id: 1, next_backend_id: 1, ..Default::default() };
        let mut slots_by_svc: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
        for (k, id) in store.slots()? {
            slots_by_svc.entry(k.svc_id).or_default().insert(k.slot, id);
        }
        let mut ranges_by_svc: BTreeMap<u32, BTreeSet<Range>> = BTreeMap::new();
        for (svc_id, range) in store.source_ranges()? {
            ranges_by_svc.entry(svc_id).or_default().insert(range);
        }
        for (key, value) in store.services()? {
            let slots = slots_by_svc.remove(&value.svc_id).unwrap_or_default();
            // Slots past the count are leftovers of an interrupted shrink: keep them in
            // the view so the next apply removes them.
            let slots = (0..=slots.keys().max().copied().unwrap_or(0).max(value.backend_count))
                .map_while(|i| slots.get(&i).copied())
                .collect();
            let ranges = ranges_by_svc.remove(&value.svc_id).unwrap_or_default();
            r.next_svc_id = r.next_svc_id.max(value.svc_id + 1);
            r.frontends.insert(key, FrontendState { value, slots, ranges });
        }
        for (id, backend) in store.backends()? {
            r.next_backend_id = r.next_backend_id.max(id + 1);
            r.backend_ids.insert(backend, id);
        }
        Ok(r)
    }

    /// Makes the maps hold `desired`.
    pub fn apply<S: MapStore>(
        &mut self,
        desired: &Desired,
        config: Config,
        store: &mut S,
    ) -> Result<Changes, S::Error> {
        let mut changes = Changes::default();
        store.put_config(config)?;
        let mut keep = BTreeSet::new();
        for (fkey, frontend) in &desired.frontends {
            let key = service_key(fkey);
            keep.insert(key);
            self.write_frontend(key, frontend, store, &mut changes)?;
        }
        let gone: Vec<ServiceKey> = self.frontends.keys().filter(|k| !keep.contains(k)).copied().collect();
        for key in gone {
            let state = self.frontends.remove(&key).expect("listed above");
            // The entry first: from then on no packet reaches its slots.
            store.del_service(key)?;
            for slot in 0..state.slots.len() as u32 {
                store.del_slot(SlotKey { svc_id: state.value.svc_id, slot })?;
            }
            for range in state.ranges {
                store.del_source_range(state.value.svc_id, range)?;
            }
            changes.services_removed += 1;
        }
        let used: BTreeSet<u32> = self.frontends.values().flat_map(|f| f.slots.iter().copied()).collect();
        let unused: Vec<Backend> =
            self.backend_ids.iter().filter(|(_, id)| !used.contains(id)).map(|(b, _)| *b).collect();
        for backend in unused {
            let id = self.backend_ids.remove(&backend).expect("listed above");
            store.del_backend(id)?;
            changes.backends_removed += 1;
        }
        Ok(changes)
    }

    fn write_frontend<S: MapStore>(
        &mut self,
        key: ServiceKey,
        frontend: &Frontend,
        store: &mut S,
        changes: &mut Changes,
    ) -> Result<(), S::Error> {
        let mut ids = Vec::with_capacity(frontend.backends.len());
        for b in &frontend.backends {
            let backend = Backend::new(b.addr, b.port, b.local);
            let id = match self.backend_ids.get(&backend) {
                Some(id) => *id,
                None => {
                    let id = self.next_backend_id;
                    self.next_backend_id += 1;
                    store.put_backend(id, backend)?;
                    self.backend_ids.insert(backend, id);
                    changes.backends_added += 1;
                    id
                }
            };
            ids.push(id);
        }
        let old = self.frontends.get(&key).cloned();
        let svc_id = match &old {
            Some(s) => s.value.svc_id,
            None => {
                self.next_svc_id += 1;
                self.next_svc_id - 1
            }
        };
        let old = old.unwrap_or_default();
        for (slot, id) in ids.iter().enumerate() {
            if old.slots.get(slot) != Some(id) {
                store.put_slot(SlotKey { svc_id, slot: slot as u32 }, *id)?;
            }
        }
        let ranges: BTreeSet<Range> = frontend.source_ranges.iter().map(range_of).collect();
        for r in ranges.difference(&old.ranges) {
            store.put_source_range(svc_id, *r)?;
        }
        let value = service_value(svc_id, ids.len() as u32, frontend);
        if old.value != value {
            store.put_service(key, value)?;
            changes.services_written += 1;
        }
        for slot in ids.len()..old.slots.len() {
            store.del_slot(SlotKey { svc_id, slot: slot as u32 })?;
        }
        for r in old.ranges.difference(&ranges) {
            store.del_source_range(svc_id, *r)?;
        }
        self.frontends.insert(key, FrontendState { value, slots: ids, ranges });
        Ok(())
    }
}

pub fn service_key(k: &FrontendKey) -> ServiceKey {
    ServiceKey::new(k.addr, k.port, k.protocol.number())
}

fn range_of(c: &Cidr) -> Range {
    (lb_common::user::addr_be(c.addr), c.prefix_len)
}

fn service_value(svc_id: u32, backend_count: u32, f: &Frontend) -> ServiceValue {
    let mut flags = 0;
    if f.kind.is_external() {
        flags |= service_flags::EXTERNAL;
    }
    if f.external_local {
        flags |= service_flags::EXTERNAL_LOCAL;
    }
    if !f.source_ranges.is_empty() {
        flags |= service_flags::SOURCE_RANGES;
    }
    ServiceValue {
        svc_id,
        backend_count,
        flags,
        affinity_timeout_s: f.affinity_timeout_s.unwrap_or(0),
        algorithm: lb_common::algorithm::RANDOM,
        _pad: [0; 3],
    }
}

#[cfg(test)]
mod tests;
