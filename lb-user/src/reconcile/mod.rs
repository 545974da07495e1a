//! The reconciler: the only writer of the service maps. It keeps a view of what the maps
//! hold and, given a desired state, writes the difference in an order that never lets a
//! packet see a half-updated Service:
//! 1. the frontend filter gains the bits of new frontends;
//! 2. per frontend: backends, then a changed backend set written whole under the other
//!    slot generation, source ranges it gains, then the service entry (naming the new
//!    generation: the swap), then the old generation's slots and ranges it lost;
//! 3. frontends no longer desired: entry first, then their slots and ranges;
//! 4. backend ids no frontend uses any more are freed (their generation moves on, so the
//!    flows that still name them know their backend is gone);
//! 5. the filter loses the bits of removed frontends.
//!
//! After a restart it adopts what the pinned maps hold (ids and generations included, so
//! tracked flows keep pointing at valid backends) and cleans up what an interrupted run
//! left: slots of a dead generation or past a count, ranges of no frontend.
use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{BuildHasher, RandomState},
};

use hashbrown::HashTable;

use ipnet::Ipv4Net;

use lb_common::{
    affinity_scope, algorithm, backend_flags, front_filter_bit, frontend_kind, service_flags, Backend, Config,
    FrontendMeta, ServiceKey, ServiceValue, SlotKey,
};

use crate::{
    datapath::maps::{Contents, MapStore, Range},
    model::{Algorithm, BackendAddr, Desired, Frontend, FrontendKey, FrontendKind, Protocol, WhenEmpty},
};

pub mod drift;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct FrontendState {
    svc_id: u32,
    /// The entry as written to LB_SERVICES; None until it has been.
    entry: Option<ServiceValue>,
    /// Backend ids of the live generation's slots, per set.
    slots: [Vec<u32>; 2],
    ranges: BTreeSet<Range>,
    /// Backend ids the frontend keeps alive without choosing them (draining endpoints).
    retained: Vec<u32>,
    /// What LB_FE_META holds for it.
    meta: Option<MetaDigest>,
}

/// A frontend's LB_FE_META entry as the reconciler remembers it: a hash of its bytes, not
/// its 152 bytes (one per frontend), enough to know whether the entry must be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MetaDigest(u64);

impl MetaDigest {
    fn of(meta: &FrontendMeta) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytemuck::bytes_of(meta).hash(&mut h);
        MetaDigest(h.finish())
    }
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

/// What [`Reconciler::repair`] found and wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repair {
    /// The differences found, frontend by frontend.
    pub drift: Vec<drift::Drift>,
    pub changes: Changes,
}

impl Repair {
    /// The frontends that differed.
    pub fn frontends(&self) -> usize {
        self.drift.iter().map(|d| &d.frontend).collect::<BTreeSet<_>>().len()
    }
}

/// Small integer ids, the lowest free one first, so that ids index arrays densely. Ids
/// start at 1: 0 means "none" in the maps.
#[derive(Debug, Default)]
struct Ids {
    /// Released ids below `next`.
    free: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl Ids {
    fn new(limit: u32) -> Self {
        Ids { free: BTreeSet::new(), next: 1, limit }
    }
    fn take(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.limit).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
    /// Marks ids found in use (adoption): the ones below them that nobody holds are free.
    fn adopt(&mut self, used: &BTreeSet<u32>) {
        self.next = used.last().map_or(1, |max| max + 1);
        self.free = (1..self.next).filter(|i| !used.contains(i)).collect();
    }
}

/// How big Maglev tables are: the first size of a fixed ladder of primes at least
/// `per_backend` times the backends, at most `max` (every node must use the same figures,
/// or the nodes' tables, and so their choices, differ).
#[derive(Clone, Copy, Debug)]
pub struct MaglevSize {
    pub per_backend: u32,
    pub max: u32,
}

impl Default for MaglevSize {
    fn default() -> Self {
        MaglevSize { per_backend: 100, max: 65_521 }
    }
}

#[derive(Debug)]
pub struct Reconciler {
    frontends: BTreeMap<ServiceKey, FrontendState>,
    /// Backend ids by identity (address, port, locality, owner; without `CHOSEN`, which
    /// changes with the sets while the id stays).
    backend_ids: BackendIndex,
    /// What the reconciler knows of each backend id, indexed by id (ids are small and dense).
    ids: Vec<IdState>,
    maglev: MaglevSize,
    backend_pool: Ids,
    svc_pool: Ids,
    /// Filter words as the map holds them.
    filter: BTreeMap<u32, u64>,
    /// Left over by an interrupted run, removed by the next apply; their frontend ids are
    /// not handed out until then.
    stale_slots: Vec<SlotKey>,
    stale_ranges: Vec<(u32, Range)>,
    stale_ids: BTreeSet<u32>,
    /// Names of frontends that have no entry (left by an interrupted removal).
    stale_metas: Vec<ServiceKey>,
    /// How many held frontends set each filter bit.
    bit_users: BTreeMap<u32, u32>,
    /// Frontends whose last write or removal failed: the next apply tries them again.
    failed: BTreeSet<FrontendKey>,
    /// Backend ids taken during this apply (freed at its end if no frontend kept them).
    taken: Vec<u32>,
    /// An apply stopped partway on a map error: this view of the maps, and the frontends
    /// that apply still had to write, are lost; the next apply starts over from the maps.
    interrupted: bool,
}

/// How many frontends use a backend id: in their slots, and kept for their flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Uses {
    chosen: u32,
    retained: u32,
}

// One per backend id: a flag rather than an Option keeps it at 40 bytes, not 48.
#[derive(Clone, Copy, Debug, Default)]
struct IdState {
    /// The backend it names (without `CHOSEN`, generation 0), while `held`.
    backend: Backend,
    held: bool,
    /// The generation it carries now (used and freed ids alike).
    gen: u32,
    /// Its entry carries `backend_flags::CHOSEN`.
    chosen: bool,
    uses: Uses,
}

impl IdState {
    /// The backend it names; None while free.
    fn key(&self) -> Option<Backend> {
        self.held.then_some(self.backend)
    }
}

/// Backend ids, a bit each: a first sync touches every id, and a bit is a thirty-second of
/// the room a list of them takes.
#[derive(Debug, Default)]
struct IdSet(Vec<u64>);

impl IdSet {
    fn insert(&mut self, id: u32) {
        let word = id as usize / 64;
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << (id % 64);
    }

    /// The ids, in increasing order.
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().flat_map(|(word, bits)| {
            (0..64u32).filter(move |bit| bits >> bit & 1 != 0).map(move |bit| word as u32 * 64 + bit)
        })
    }
}

impl Extend<u32> for IdSet {
    fn extend<I: IntoIterator<Item = u32>>(&mut self, ids: I) {
        for id in ids {
            self.insert(id);
        }
    }
}

impl FromIterator<u32> for IdSet {
    fn from_iter<I: IntoIterator<Item = u32>>(ids: I) -> Self {
        let mut set = IdSet::default();
        set.extend(ids);
        set
    }
}

/// Backend ids by the backend each names, looked up in the id table: the index holds only
/// ids (a fifth of the room of a map holding the backends again; at 100k endpoints the
/// difference is 4 MB).
#[derive(Debug, Default)]
struct BackendIndex {
    table: HashTable<u32>,
    hasher: RandomState,
}

impl BackendIndex {
    fn get(&self, ids: &[IdState], key: &Backend) -> Option<u32> {
        self.table.find(self.hasher.hash_one(key), |id| ids[*id as usize].key().as_ref() == Some(key)).copied()
    }

    /// Adds `id`, which must already name its backend in `ids`.
    fn insert(&mut self, ids: &[IdState], id: u32) {
        let hash_of = |id: &u32| self.hasher.hash_one(ids[*id as usize].backend);
        self.table.insert_unique(hash_of(&id), id, hash_of);
    }

    /// Removes `id`, which must still name its backend in `ids`.
    fn remove(&mut self, ids: &[IdState], id: u32) {
        let hash = self.hasher.hash_one(ids[id as usize].backend);
        if let Ok(entry) = self.table.find_entry(hash, |held| *held == id) {
            entry.remove();
        }
    }
}

/// The backend ids a frontend chooses and those it keeps only for their flows, each once.
fn ids_of(state: &FrontendState) -> (BTreeSet<u32>, BTreeSet<u32>) {
    (state.slots.iter().flatten().copied().collect(), state.retained.iter().copied().collect())
}

fn filter_bit(key: &ServiceKey) -> u32 {
    front_filter_bit(key.addr_be, key.port_be)
}

#[derive(Debug, thiserror::Error)]
enum WriteError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Map(E),
    #[error("no free {0} id (all {1} in use)")]
    Exhausted(&'static str, u32),
}

impl Reconciler {
    /// Starts from what the maps hold now (empty maps give an empty view).
    pub fn adopt<S: MapStore>(store: &S) -> Result<Self, S::Error> {
        let mut r = Reconciler {
            frontends: BTreeMap::new(),
            backend_ids: BackendIndex::default(),
            ids: Vec::new(),
            maglev: MaglevSize::default(),
            backend_pool: Ids::new(store.id_limits().1),
            svc_pool: Ids::new(store.id_limits().0),
            filter: store.filter_words()?.into_iter().collect(),
            stale_slots: Vec::new(),
            stale_ranges: Vec::new(),
            stale_ids: BTreeSet::new(),
            stale_metas: Vec::new(),
            bit_users: BTreeMap::new(),
            failed: BTreeSet::new(),
            taken: Vec::new(),
            interrupted: false,
        };
        for (id, gen) in store.backend_gens()? {
            r.id_mut(id).gen = gen;
        }
        for (id, backend) in store.backends()? {
            let key = Backend { gen: 0, flags: backend.flags & !backend_flags::CHOSEN, ..backend };
            let state = r.id_mut(id);
            state.gen = backend.gen;
            state.chosen = backend.flags & backend_flags::CHOSEN != 0;
            (state.backend, state.held) = (key, true);
            r.backend_ids.insert(&r.ids, id);
        }
        let mut slots: BTreeMap<SlotKey, u32> = store.slots()?.into_iter().collect();
        let mut ranges: BTreeMap<u32, BTreeSet<Range>> = BTreeMap::new();
        for (svc_id, range) in store.source_ranges()? {
            ranges.entry(svc_id).or_default().insert(range);
        }
        let mut metas: BTreeMap<ServiceKey, FrontendMeta> = store.frontend_metas()?.into_iter().collect();
        for (key, value) in store.services()? {
            let meta = metas.remove(&key).map(|m| MetaDigest::of(&m));
            let mut state = FrontendState { svc_id: value.svc_id, entry: Some(value), meta, ..Default::default() };
            for set in 0..2u8 {
                for position in 0..value.count[set as usize] as u32 {
                    match slots.remove(&SlotKey::new(value.svc_id, value.gen, set, position)) {
                        Some(id) => state.slots[set as usize].push(id),
                        // A hole: the entry cannot be trusted; the next apply rewrites it.
                        None => state.entry = None,
                    }
                }
            }
            state.ranges = ranges.remove(&value.svc_id).unwrap_or_default();
            r.frontends.insert(key, state);
        }
        r.stale_slots = slots.into_keys().collect();
        r.stale_metas = metas.into_keys().collect();
        r.stale_ranges = ranges.into_iter().flat_map(|(svc, rs)| rs.into_iter().map(move |r| (svc, r))).collect();
        let live: BTreeSet<u32> = r.frontends.values().map(|f| f.svc_id).collect();
        r.stale_ids = r.stale_slots.iter().map(|k| k.svc_id).chain(r.stale_ranges.iter().map(|(id, _)| *id)).collect();
        r.stale_ids.retain(|id| !live.contains(id));
        r.svc_pool.adopt(&live.union(&r.stale_ids).copied().collect());
        for (key, ids) in r.frontends.iter().map(|(k, f)| (*k, ids_of(f))).collect::<Vec<_>>() {
            r.recount(&key, None, Some(&ids), &mut IdSet::default());
        }
        r.backend_pool.adopt(&r.held_ids().collect());
        Ok(r)
    }

    /// Sizes Maglev tables from now on.
    pub fn set_maglev_size(&mut self, size: MaglevSize) {
        self.maglev = size;
    }

    /// Makes the maps hold `desired`. A frontend whose writes fail is reported in
    /// [`Changes::failures`] and the others are still written; an error is returned only when
    /// the node-wide config or the frontend filter cannot be written.
    pub fn apply<S: MapStore>(
        &mut self,
        desired: &Desired,
        config: Config,
        store: &mut S,
    ) -> Result<Changes, S::Error> {
        self.apply_changes(desired, None, config, store)
    }

    /// As [`apply`](Self::apply), for a desired state that differs from the last one applied
    /// only in the frontends `changed` names (None: in any): only those are written or
    /// removed, with the backends and filter bits they use or release. Frontends that failed
    /// before are tried again too.
    pub fn apply_changes<S: MapStore>(
        &mut self,
        desired: &Desired,
        changed: Option<&BTreeSet<FrontendKey>>,
        config: Config,
        store: &mut S,
    ) -> Result<Changes, S::Error> {
        let mut changed = changed;
        if self.interrupted {
            self.readopt(store)?;
            changed = None;
        }
        let result = store.put_config(config).and_then(|()| self.write_desired(desired, changed, store));
        self.interrupted = result.is_err();
        result
    }

    /// Starts over from what the maps hold, keeping the settings.
    fn readopt<S: MapStore>(&mut self, store: &mut S) -> Result<(), S::Error> {
        let maglev = self.maglev;
        *self = Reconciler::adopt(store)?;
        self.maglev = maglev;
        Ok(())
    }

    /// Compares the service maps with `desired` (what was last applied) and, where they
    /// differ (an operator's edit, a lost write), adopts what the maps hold and writes
    /// `desired` over it: only what differs is written, in the usual order. None when the
    /// maps hold `desired`.
    pub fn repair<S: MapStore>(&mut self, desired: &Desired, store: &mut S) -> Result<Option<Repair>, S::Error> {
        let drift = drift::drift(desired, &Contents::read(store)?, self.maglev);
        if drift.is_empty() {
            return Ok(None);
        }
        self.readopt(store)?;
        let changes = self.write_desired(desired, None, store);
        self.interrupted = changes.is_err();
        Ok(Some(Repair { drift, changes: changes? }))
    }

    /// Everything `apply_changes` writes but the node-wide config.
    fn write_desired<S: MapStore>(
        &mut self,
        desired: &Desired,
        changed: Option<&BTreeSet<FrontendKey>>,
        store: &mut S,
    ) -> Result<Changes, S::Error> {
        let mut changes = Changes::default();
        // Leftovers first: no entry reaches them, and their ids may be reused below.
        for key in std::mem::take(&mut self.stale_slots) {
            if let Err(e) = store.del_slot(key) {
                self.stale_slots.push(key);
                changes.failures.push(format!("removing a leftover slot of frontend id {}: {e}", key.svc_id));
            }
        }
        for (svc_id, range) in std::mem::take(&mut self.stale_ranges) {
            if let Err(e) = store.del_source_range(svc_id, range) {
                self.stale_ranges.push((svc_id, range));
                changes.failures.push(format!("removing a leftover source range of frontend id {svc_id}: {e}"));
            }
        }
        for key in std::mem::take(&mut self.stale_metas) {
            if let Err(e) = store.del_frontend_meta(key) {
                self.stale_metas.push(key);
                changes.failures.push(format!("removing the leftover name of frontend {key}: {e}"));
            }
        }
        self.release_cleaned_ids();
        // The frontends to write (desired) and to remove (held, no longer desired).
        let mut work: BTreeSet<FrontendKey> = std::mem::take(&mut self.failed);
        match changed {
            Some(keys) => work.extend(keys.iter().copied()),
            None => {
                work.extend(desired.frontends.keys().copied());
                work.extend(self.frontends.keys().map(frontend_key));
            }
        }
        let mut touched_ids: IdSet = match changed {
            Some(_) => IdSet::default(),
            None => self.held_ids().collect(),
        };
        let mut touched_words: BTreeSet<u32> = match changed {
            Some(_) => BTreeSet::new(),
            None => self.filter.keys().copied().collect(),
        };
        let adding = filter_of(work.iter().filter(|k| desired.frontends.contains_key(k)).map(filter_key));
        self.add_filter_bits(store, &adding)?;
        // Writes before removals: a removed frontend's id is not handed to another at once.
        let (writes, removals): (Vec<FrontendKey>, Vec<FrontendKey>) =
            work.into_iter().partition(|k| desired.frontends.contains_key(k));
        for fkey in writes.iter().chain(&removals) {
            let key = service_key(fkey);
            touched_words.insert(filter_bit(&key) / 64);
            let before = self.frontends.get(&key).map(ids_of);
            let result = match desired.frontends.get(fkey) {
                Some(frontend) => self
                    .write_frontend(key, frontend, store, &mut changes)
                    .map_err(|e| format!("Service {}: frontend {fkey}: {e}", frontend.service)),
                None if self.frontends.contains_key(&key) => match self.remove_frontend(key, store) {
                    Ok(()) => {
                        changes.services_removed += 1;
                        Ok(())
                    }
                    Err(e) => Err(format!("frontend {fkey}: removing: {e}")),
                },
                None => Ok(()),
            };
            let after = self.frontends.get(&key).map(ids_of);
            self.recount(&key, before.as_ref(), after.as_ref(), &mut touched_ids);
            if let Err(e) = result {
                changes.failures.push(e);
                self.failed.insert(*fkey);
            }
        }
        touched_ids.extend(self.taken.drain(..));
        self.mark_chosen(store, &touched_ids)?;
        self.free_unused_backends(store, &touched_ids, &mut changes)?;
        // Bits of frontends still held (a failed removal) stay set.
        self.clear_filter_bits(store, &touched_words)?;
        Ok(changes)
    }

    /// Follows one frontend's change in the use counts of its backend ids and filter bit;
    /// the ids whose counts moved join `touched`.
    fn recount(
        &mut self,
        key: &ServiceKey,
        before: Option<&(BTreeSet<u32>, BTreeSet<u32>)>,
        after: Option<&(BTreeSet<u32>, BTreeSet<u32>)>,
        touched: &mut IdSet,
    ) {
        if before == after {
            return;
        }
        match (before.is_some(), after.is_some()) {
            (false, true) => self.count(key, 1),
            (true, false) => self.count(key, -1),
            _ => {}
        }
        for (ids, step) in [(before, -1i64), (after, 1)] {
            let Some((chosen, retained)) = ids else { continue };
            for (set, is_chosen) in [(chosen, true), (retained, false)] {
                for id in set {
                    touched.insert(*id);
                    let uses = &mut self.id_mut(*id).uses;
                    let n = if is_chosen { &mut uses.chosen } else { &mut uses.retained };
                    *n = (i64::from(*n) + step) as u32;
                }
            }
        }
    }

    /// The state of backend id `id`, growing the table to hold it.
    fn id_mut(&mut self, id: u32) -> &mut IdState {
        let index = id as usize;
        if self.ids.len() <= index {
            // By an eighth at a time, not doubled: the table is among the agent's largest.
            let more = (index + 1 - self.ids.len()).max(self.ids.len() / 8);
            self.ids.reserve_exact(more);
            self.ids.resize(index + 1, IdState::default());
        }
        &mut self.ids[index]
    }

    /// The backend ids that name a backend.
    fn held_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.ids.iter().enumerate().filter(|(_, s)| s.held).map(|(id, _)| id as u32)
    }

    /// Counts a held frontend's filter bit in or out.
    fn count(&mut self, key: &ServiceKey, step: i64) {
        let bit = filter_bit(key);
        let users = self.bit_users.entry(bit).or_default();
        *users = (i64::from(*users) + step) as u32;
        if *users == 0 {
            self.bit_users.remove(&bit);
        }
    }

    /// Frontend ids held only by leftovers that are now gone become free again.
    fn release_cleaned_ids(&mut self) {
        let left: BTreeSet<u32> =
            self.stale_slots.iter().map(|k| k.svc_id).chain(self.stale_ranges.iter().map(|(id, _)| *id)).collect();
        for id in std::mem::take(&mut self.stale_ids) {
            if left.contains(&id) {
                self.stale_ids.insert(id);
            } else {
                self.svc_pool.release(id);
            }
        }
    }

    /// ORs `bits` into the filter, writing the words that change.
    fn add_filter_bits<S: MapStore>(&mut self, store: &mut S, bits: &BTreeMap<u32, u64>) -> Result<(), S::Error> {
        for (index, wanted) in bits {
            let held = self.filter.get(index).copied().unwrap_or(0);
            if held | wanted != held {
                store.put_filter_word(*index, held | wanted)?;
                self.filter.insert(*index, held | wanted);
            }
        }
        Ok(())
    }

    /// Makes these filter words hold exactly the bits of the frontends held.
    fn clear_filter_bits<S: MapStore>(&mut self, store: &mut S, words: &BTreeSet<u32>) -> Result<(), S::Error> {
        for index in words {
            let wanted =
                self.bit_users.range(index * 64..(index + 1) * 64).fold(0u64, |word, (bit, _)| word | 1 << (bit % 64));
            let held = self.filter.get(index).copied().unwrap_or(0);
            if wanted != held {
                store.put_filter_word(*index, wanted)?;
                if wanted == 0 {
                    self.filter.remove(index);
                } else {
                    self.filter.insert(*index, wanted);
                }
            }
        }
        Ok(())
    }

    /// Sets `CHOSEN` on the backends among `ids` that some set chooses and clears it on
    /// the others (kept only for their flows), keeping ids and generations.
    fn mark_chosen<S: MapStore>(&mut self, store: &mut S, ids: &IdSet) -> Result<(), S::Error> {
        for id in ids.iter() {
            let Some(state) = self.ids.get(id as usize).copied() else { continue };
            let Some(key) = state.key() else { continue };
            // Ids no frontend uses any more are freed next: no need to touch them.
            if state.uses == Uses::default() {
                continue;
            }
            let chosen = state.uses.chosen > 0;
            if chosen == state.chosen {
                continue;
            }
            let flags = key.flags | if chosen { backend_flags::CHOSEN } else { 0 };
            store.put_backend(id, Backend { gen: state.gen, flags, ..key })?;
            self.id_mut(id).chosen = chosen;
        }
        Ok(())
    }

    /// Frees the backend ids among `ids` that no frontend uses.
    fn free_unused_backends<S: MapStore>(
        &mut self,
        store: &mut S,
        ids: &IdSet,
        changes: &mut Changes,
    ) -> Result<(), S::Error> {
        let mut unused: Vec<(Backend, u32)> = ids
            .iter()
            .filter_map(|id| self.ids.get(id as usize).map(|s| (id, *s)))
            .filter(|(_, s)| s.uses == Uses::default())
            .filter_map(|(id, s)| Some((s.key()?, id)))
            .collect();
        unused.sort();
        for (_, id) in unused {
            let gen = self.ids[id as usize].gen.wrapping_add(1);
            store.put_backend(id, Backend { gen, ..Backend::default() })?;
            self.backend_ids.remove(&self.ids, id);
            *self.id_mut(id) = IdState { gen, ..IdState::default() };
            self.backend_pool.release(id);
            changes.backends_removed += 1;
        }
        Ok(())
    }

    fn backend_id<S: MapStore>(
        &mut self,
        owner: u64,
        b: &BackendAddr,
        chosen: bool,
        store: &mut S,
        changes: &mut Changes,
    ) -> Result<u32, WriteError<S::Error>> {
        let key = Backend::new(b.addr, b.port, b.local, owner);
        if let Some(id) = self.backend_ids.get(&self.ids, &key) {
            return Ok(id);
        }
        let id = self.backend_pool.take().ok_or(WriteError::Exhausted("backend", self.backend_pool.limit - 1))?;
        // Its counters count this endpoint's traffic from zero, not a former holder's. An id
        // of generation 0 never had a holder: its counters are zero already (one write
        // fewer per backend of a first sync).
        let used_before = self.ids.get(id as usize).is_some_and(|s| s.gen != 0);
        if used_before {
            if let Err(e) = store.clear_backend_stats(id) {
                self.backend_pool.release(id);
                return Err(WriteError::Map(e));
            }
        }
        // CHOSEN comes with the first write when the sets already choose it: affinity may
        // send new flows to it from then on.
        // A reused id gets a new generation: flows of its last endpoint must not follow it.
        let gen = self.ids.get(id as usize).map_or(0, |s| s.gen).wrapping_add(1).max(1);
        let flags = key.flags | if chosen { backend_flags::CHOSEN } else { 0 };
        if let Err(e) = store.put_backend(id, Backend { gen, flags, ..key }) {
            self.backend_pool.release(id);
            return Err(WriteError::Map(e));
        }
        *self.id_mut(id) = IdState { backend: key, held: true, gen, chosen, uses: Uses::default() };
        self.backend_ids.insert(&self.ids, id);
        self.taken.push(id);
        changes.backends_added += 1;
        Ok(id)
    }

    fn remove_frontend<S: MapStore>(&mut self, key: ServiceKey, store: &mut S) -> Result<(), S::Error> {
        let state = self.frontends[&key].clone();
        // The entry first: from then on no packet reaches its slots.
        store.del_service(key)?;
        let gen = state.entry.map_or(0, |e| e.gen);
        for (set, ids) in state.slots.iter().enumerate() {
            for position in 0..ids.len() as u32 {
                store.del_slot(SlotKey::new(state.svc_id, gen, set as u8, position))?;
            }
        }
        for range in &state.ranges {
            store.del_source_range(state.svc_id, *range)?;
        }
        if state.meta.is_some() {
            store.del_frontend_meta(key)?;
        }
        self.frontends.remove(&key);
        self.svc_pool.release(state.svc_id);
        Ok(())
    }

    /// Writes one frontend. The view follows each successful write, so after a failure it
    /// still says what the maps hold and the next apply resumes where this one stopped.
    fn write_frontend<S: MapStore>(
        &mut self,
        key: ServiceKey,
        frontend: &Frontend,
        store: &mut S,
        changes: &mut Changes,
    ) -> Result<(), WriteError<S::Error>> {
        let owner = owner_of(frontend, key.proto);
        let mut sets: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        for (set, backends) in [&frontend.backends, &frontend.short_circuit_backends].into_iter().enumerate() {
            let mut ids = Vec::with_capacity(backends.len());
            for b in backends {
                ids.push(self.backend_id(owner, b, true, store, changes)?);
            }
            sets[set] = positions(backends, frontend.algorithm, self.maglev).into_iter().map(|i| ids[i]).collect();
        }
        let mut retained = Vec::new();
        for b in &frontend.retained {
            retained.push(self.backend_id(owner, b, false, store, changes)?);
        }
        if !self.frontends.contains_key(&key) {
            let svc_id = self.svc_pool.take().ok_or(WriteError::Exhausted("frontend", self.svc_pool.limit - 1))?;
            // Its counters count this frontend's traffic from zero, not a former holder's.
            if let Err(e) = store.clear_frontend_stats(svc_id) {
                self.svc_pool.release(svc_id);
                return Err(WriteError::Map(e));
            }
            self.frontends.insert(key, FrontendState { svc_id, ..Default::default() });
        }
        let state = self.frontends.get_mut(&key).expect("inserted above");
        state.retained = retained;
        let svc_id = state.svc_id;
        let old_gen = state.entry.map(|e| e.gen);
        let new_gen = match old_gen {
            Some(g) if state.slots != sets => 1 - g,
            Some(g) => g,
            None => 0,
        };
        if old_gen != Some(new_gen) || state.entry.is_none() {
            for (set, ids) in sets.iter().enumerate() {
                for (position, id) in ids.iter().enumerate() {
                    store
                        .put_slot(SlotKey::new(svc_id, new_gen, set as u8, position as u32), *id)
                        .map_err(WriteError::Map)?;
                }
            }
        }
        let ranges: BTreeSet<Range> = frontend.source_ranges.prefixes().iter().map(range_of).collect();
        for r in ranges.difference(&state.ranges.clone()) {
            store.put_source_range(svc_id, *r).map_err(WriteError::Map)?;
            state.ranges.insert(*r);
        }
        // The name goes first: no entry is served without it.
        let meta = frontend_meta(frontend);
        if state.meta != Some(MetaDigest::of(&meta)) {
            store.put_frontend_meta(key, meta).map_err(WriteError::Map)?;
            state.meta = Some(MetaDigest::of(&meta));
        }
        let value = service_value(svc_id, new_gen, [sets[0].len() as u16, sets[1].len() as u16], frontend, owner, key);
        if state.entry != Some(value) {
            store.put_service(key, value).map_err(WriteError::Map)?;
            changes.services_written += 1;
        }
        let old_slots = std::mem::replace(&mut state.slots, sets);
        state.entry = Some(value);
        if let Some(g) = old_gen.filter(|g| *g != new_gen) {
            for (set, ids) in old_slots.iter().enumerate() {
                for position in (0..ids.len() as u32).rev() {
                    store.del_slot(SlotKey::new(svc_id, g, set as u8, position)).map_err(WriteError::Map)?;
                }
            }
        }
        for r in state.ranges.clone().difference(&ranges) {
            store.del_source_range(svc_id, *r).map_err(WriteError::Map)?;
            state.ranges.remove(r);
        }
        Ok(())
    }
}

/// The owner of a frontend's backend ids: its Service port, hashed stably (FNV-1a), so the
/// frontends of one Service port (ClusterIP, NodePorts, ...) share ids, other Services'
/// frontends do not, and a restarted agent finds its ids again.
fn owner_of(f: &Frontend, proto: u8) -> u64 {
    let name = format!("{}/{}/{}/{proto}", f.service.namespace, f.service.name, f.port_name);
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

pub fn service_key(k: &FrontendKey) -> ServiceKey {
    ServiceKey::new(k.addr, k.port, k.protocol.number())
}

/// The model's name for a frontend the maps hold.
fn frontend_key(k: &ServiceKey) -> FrontendKey {
    let protocol = if k.proto == lb_common::IPPROTO_UDP { Protocol::Udp } else { Protocol::Tcp };
    FrontendKey { addr: lb_common::user::ip_from_be(k.addr_be), port: u16::from_be(k.port_be), protocol }
}

fn filter_key(k: &FrontendKey) -> (u32, u16) {
    (lb_common::user::addr_be(k.addr), k.port.to_be())
}

/// The frontend filter words that frontends at these (address, port) set.
fn filter_of(frontends: impl Iterator<Item = (u32, u16)>) -> BTreeMap<u32, u64> {
    let mut words = BTreeMap::new();
    for (addr_be, port_be) in frontends {
        let bit = front_filter_bit(addr_be, port_be);
        *words.entry(bit / 64).or_insert(0u64) |= 1 << (bit % 64);
    }
    words
}

fn range_of(c: &Ipv4Net) -> Range {
    (lb_common::user::addr_be(c.network()), c.prefix_len())
}

/// A set's slots: for each position, the index of its backend in `backends` (a Maglev table
/// for the algorithms that use one, else each backend once, in order).
fn positions(backends: &[BackendAddr], algorithm: Algorithm, maglev: MaglevSize) -> Vec<usize> {
    if algorithm.uses_maglev_table() && !backends.is_empty() {
        let names: Vec<String> = backends.iter().map(|b| format!("{}:{}", b.addr, b.port)).collect();
        let size = maglev::table_size(names.len(), maglev.per_backend, maglev.max);
        maglev::table(&names, size)
    } else {
        (0..backends.len()).collect()
    }
}

fn service_value(svc_id: u32, gen: u8, count: [u16; 2], f: &Frontend, owner: u64, key: ServiceKey) -> ServiceValue {
    let mut flags = 0;
    if lb_common::user::ip_from_be(key.addr_be).is_loopback() {
        flags |= service_flags::LOOPBACK;
    }
    if f.kind.is_external() {
        flags |= service_flags::EXTERNAL;
    }
    if f.external_local {
        flags |= service_flags::EXTERNAL_LOCAL;
    }
    if f.source_ranges.restricts() {
        flags |= service_flags::SOURCE_RANGES;
    }
    if f.when_empty == WhenEmpty::Drop {
        flags |= service_flags::DROP_WHEN_EMPTY;
    }
    ServiceValue {
        svc_id,
        flags,
        affinity_timeout_s: f.affinity_timeout_s.unwrap_or(0),
        count,
        gen,
        algorithm: match f.algorithm {
            Algorithm::Random => algorithm::RANDOM,
            Algorithm::RoundRobin => algorithm::ROUND_ROBIN,
            Algorithm::Maglev => algorithm::MAGLEV,
            Algorithm::SourceHash => algorithm::SOURCE_HASH,
            Algorithm::LeastConn => algorithm::LEAST_CONN,
        },
        check: 0,
        scope: affinity_scope(owner),
        key,
    }
    .sealed()
}

/// What LB_FE_META holds for a frontend.
pub fn frontend_meta(f: &Frontend) -> FrontendMeta {
    let kind = match f.kind {
        FrontendKind::ClusterIp => frontend_kind::CLUSTER_IP,
        FrontendKind::NodePort => frontend_kind::NODE_PORT,
        FrontendKind::LoadBalancer => frontend_kind::LOAD_BALANCER,
        FrontendKind::ExternalIp => frontend_kind::EXTERNAL_IP,
    };
    FrontendMeta::new(&f.service.namespace, &f.service.name, &f.port_name, kind)
}

mod maglev;

#[cfg(test)]
pub(crate) mod tests;
