//! The reconciler: the only writer of the service maps. It keeps a view of what the maps
//! hold and, given a desired state, writes the difference in an order that never lets a
//! packet see a half-updated Service: backends, then slots, then the service entry with
//! its new count, then removals. After a restart it adopts what the pinned maps hold
//! (ids included, so tracked flows keep pointing at valid backends).
use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use lb_common::{service_flags, Backend, Config, ServiceKey, ServiceValue, SlotKey};

use crate::{
    datapath::maps::{MapStore, Range},
    model::{Desired, Frontend, FrontendKey},
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct FrontendState {
    svc_id: u32,
    /// The entry as written to LB_SERVICES; None until it has been.
    entry: Option<ServiceValue>,
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
    /// Frontends that could not be written or removed, each naming its Service; the others
    /// were. Applying again retries them.
    pub failures: Vec<String>,
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
            r.frontends.insert(key, FrontendState { svc_id: value.svc_id, entry: Some(value), slots, ranges });
        }
        for (id, backend) in store.backends()? {
            r.next_backend_id = r.next_backend_id.max(id + 1);
            r.backend_ids.insert(backend, id);
        }
        Ok(r)
    }

    /// Makes the maps hold `desired`. A frontend whose writes fail is reported in
    /// [`Changes::failures`] and the others are still written; an error is returned only when
    /// the node-wide config cannot be written.
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
            if let Err(e) = self.write_frontend(key, frontend, store, &mut changes) {
                changes.failures.push(format!("Service {}: frontend {fkey}: {e}", frontend.service));
            }
        }
        let gone: Vec<ServiceKey> = self.frontends.keys().filter(|k| !keep.contains(k)).copied().collect();
        for key in gone {
            if let Err(e) = self.remove_frontend(key, store) {
                let addr = lb_common::user::ip_from_be(key.addr_be);
                changes.failures.push(format!(
                    "frontend {addr}:{}/{}: removing: {e}",
                    u16::from_be(key.port_be),
                    key.proto
                ));
            } else {
                changes.services_removed += 1;
            }
        }
        let used: BTreeSet<u32> = self.frontends.values().flat_map(|f| f.slots.iter().copied()).collect();
        let unused: Vec<Backend> =
            self.backend_ids.iter().filter(|(_, id)| !used.contains(id)).map(|(b, _)| *b).collect();
        for backend in unused {
            let id = self.backend_ids[&backend];
            store.del_backend(id)?;
            self.backend_ids.remove(&backend);
            changes.backends_removed += 1;
        }
        Ok(changes)
    }

    fn remove_frontend<S: MapStore>(&mut self, key: ServiceKey, store: &mut S) -> Result<(), S::Error> {
        let state = &self.frontends[&key];
        // The entry first: from then on no packet reaches its slots.
        store.del_service(key)?;
        for slot in 0..state.slots.len() as u32 {
            store.del_slot(SlotKey { svc_id: state.svc_id, slot })?;
        }
        for range in &state.ranges {
            store.del_source_range(state.svc_id, *range)?;
        }
        self.frontends.remove(&key);
        Ok(())
    }

    /// Writes one frontend: backends, slots, source ranges, the entry, then removals. The
    /// view follows each successful write, so after a failure it still says what the maps
    /// hold and the next apply resumes where this one stopped.
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
                    store.put_backend(id, backend)?;
                    self.next_backend_id += 1;
                    self.backend_ids.insert(backend, id);
                    changes.backends_added += 1;
                    id
                }
            };
            ids.push(id);
        }
        let next_svc_id = &mut self.next_svc_id;
        let state = self.frontends.entry(key).or_insert_with(|| {
            *next_svc_id += 1;
            FrontendState { svc_id: *next_svc_id - 1, ..Default::default() }
        });
        let svc_id = state.svc_id;
        for (slot, id) in ids.iter().enumerate() {
            if state.slots.get(slot) != Some(id) {
                store.put_slot(SlotKey { svc_id, slot: slot as u32 }, *id)?;
                match state.slots.get_mut(slot) {
                    Some(held) => *held = *id,
                    None => state.slots.push(*id),
                }
            }
        }
        let ranges: BTreeSet<Range> = frontend.source_ranges.prefixes().iter().map(range_of).collect();
        for r in ranges.difference(&state.ranges.clone()) {
            store.put_source_range(svc_id, *r)?;
            state.ranges.insert(*r);
        }
        let value = service_value(svc_id, ids.len() as u32, frontend);
        if state.entry != Some(value) {
            store.put_service(key, value)?;
            state.entry = Some(value);
            changes.services_written += 1;
        }
        while state.slots.len() > ids.len() {
            store.del_slot(SlotKey { svc_id, slot: state.slots.len() as u32 - 1 })?;
            state.slots.pop();
        }
        for r in state.ranges.clone().difference(&ranges) {
            store.del_source_range(svc_id, *r)?;
            state.ranges.remove(r);
        }
        Ok(())
    }
}

pub fn service_key(k: &FrontendKey) -> ServiceKey {
    ServiceKey::new(k.addr, k.port, k.protocol.number())
}

fn range_of(c: &Ipv4Net) -> Range {
    (lb_common::user::addr_be(c.network()), c.prefix_len())
}

fn service_value(svc_id: u32, backend_count: u32, f: &Frontend) -> ServiceValue {
    let mut flags = 0;
    if f.kind.is_external() {
        flags |= service_flags::EXTERNAL;
    }
    if f.external_local {
        flags |= service_flags::EXTERNAL_LOCAL;
    }
    if f.source_ranges.restricts() {
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
