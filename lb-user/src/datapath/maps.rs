//! The service maps as pinned by the datapath, behind the [`MapStore`] the reconciler writes
//! through.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, PerCpuValues,
};
use lb_common::{
    map_names, Backend, BackendStats, Config, FrontendMeta, FrontendStats, ServiceKey, ServiceValue, SlotKey,
    SourceRange,
};

use crate::datapath::{self, batch, open_map};

/// A source range of one frontend: (address in network order, prefix length).
pub type Range = (u32, u8);

/// Access to the service maps. [`PinnedMaps`] is the datapath's; the reconciler's tests use
/// a fake that records the order of writes.
pub trait MapStore {
    type Error: std::error::Error + Send + Sync + 'static;
    /// How many frontend ids and backend ids the maps have room for.
    fn id_limits(&self) -> (u32, u32);
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Self::Error>;
    fn slots(&self) -> Result<Vec<(SlotKey, u32)>, Self::Error>;
    /// Backend entries in use (non-zero address), by id.
    fn backends(&self) -> Result<Vec<(u32, Backend)>, Self::Error>;
    /// The generation of every backend id whose entry is free (address 0) but was used.
    fn backend_gens(&self) -> Result<Vec<(u32, u32)>, Self::Error>;
    fn source_ranges(&self) -> Result<Vec<(u32, Range)>, Self::Error>;
    /// Non-zero words of the frontend filter.
    fn filter_words(&self) -> Result<Vec<(u32, u64)>, Self::Error>;
    /// Writes a backend entry (a free one is all zero but for its generation).
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), Self::Error>;
    fn put_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), Self::Error>;
    fn del_slot(&mut self, key: SlotKey) -> Result<(), Self::Error>;
    fn put_source_range(&mut self, svc_id: u32, range: Range) -> Result<(), Self::Error>;
    fn del_source_range(&mut self, svc_id: u32, range: Range) -> Result<(), Self::Error>;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), Self::Error>;
    fn del_service(&mut self, key: ServiceKey) -> Result<(), Self::Error>;
    fn put_filter_word(&mut self, index: u32, word: u64) -> Result<(), Self::Error>;
    fn put_config(&mut self, config: Config) -> Result<(), Self::Error>;
    /// What each frontend is (its Service, port name and kind), for people and tools.
    fn frontend_metas(&self) -> Result<Vec<(ServiceKey, FrontendMeta)>, Self::Error>;
    fn put_frontend_meta(&mut self, key: ServiceKey, meta: FrontendMeta) -> Result<(), Self::Error>;
    fn del_frontend_meta(&mut self, key: ServiceKey) -> Result<(), Self::Error>;
    /// Zeroes the traffic counters of a frontend id given to a new frontend, so they count
    /// its traffic only.
    fn clear_frontend_stats(&mut self, svc_id: u32) -> Result<(), Self::Error>;
    /// Zeroes the traffic counters of a backend id given to a new endpoint.
    fn clear_backend_stats(&mut self, id: u32) -> Result<(), Self::Error>;
}

pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: Array<MapData, Backend>,
    ranges: LpmTrie<MapData, SourceRange, u32>,
    filter: Array<MapData, u64>,
    config: Array<MapData, Config>,
    metas: HashMap<MapData, ServiceKey, FrontendMeta>,
    frontend_stats: PerCpuArray<MapData, FrontendStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    /// The frontend counters' size: frontend ids index them.
    frontend_limit: u32,
    /// Possible CPUs: the number of values of a per-CPU entry.
    cpus: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Open(#[from] datapath::Error),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {name}: {source}")]
    Batch {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("counting the possible CPUs ({0}): {1}")]
    Cpus(&'static str, #[source] std::io::Error),
}

fn typed<T: TryFrom<aya::maps::Map, Error = MapError>>(pin_dir: &Path, name: &'static str) -> Result<T, Error> {
    T::try_from(open_map(pin_dir, name)?).map_err(|source| Error::Map { name, source })
}

impl PinnedMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, Error> {
        Ok(PinnedMaps {
            services: typed(pin_dir, map_names::SERVICES)?,
            slots: typed(pin_dir, map_names::SLOTS)?,
            backends: typed(pin_dir, map_names::BACKENDS)?,
            ranges: typed(pin_dir, map_names::SRC_RANGES)?,
            filter: typed(pin_dir, map_names::FRONT_BITS)?,
            config: typed(pin_dir, map_names::CONFIG)?,
            metas: typed(pin_dir, map_names::FRONTEND_META)?,
            frontend_stats: typed(pin_dir, map_names::FRONTEND_STATS)?,
            backend_stats: typed(pin_dir, map_names::BACKEND_STATS)?,
            cpus: aya::util::nr_cpus().map_err(|(what, e)| Error::Cpus(what, e))?,
            frontend_limit: {
                let name = map_names::FRONTEND_STATS;
                let path = pin_dir.join("maps").join(name);
                MapData::from_pin(path)
                    .and_then(|m| m.info())
                    .map_err(|source| Error::Map { name, source })?
                    .max_entries()
            },
        })
    }

    fn all_backends(&self) -> Result<Vec<(u32, Backend)>, Error> {
        batch::read_all(IterableMap::map(&self.backends))
            .map_err(|source| Error::Batch { name: map_names::BACKENDS, source })
    }
}

fn range_key(svc_id: u32, (addr_be, prefix_len): Range) -> Key<SourceRange> {
    Key::new(32 + prefix_len as u32, SourceRange { svc_id_be: svc_id.to_be(), addr_be })
}

fn at(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Deleting what is already gone is fine: the goal state holds.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        r => r,
    }
}

impl MapStore for PinnedMaps {
    type Error = Error;

    fn id_limits(&self) -> (u32, u32) {
        (self.frontend_limit, self.backends.len())
    }
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Error> {
        batch::read_all(IterableMap::map(&self.services))
            .map_err(|source| Error::Batch { name: map_names::SERVICES, source })
    }
    fn slots(&self) -> Result<Vec<(SlotKey, u32)>, Error> {
        batch::read_all(IterableMap::map(&self.slots)).map_err(|source| Error::Batch { name: map_names::SLOTS, source })
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, Error> {
        Ok(self.all_backends()?.into_iter().filter(|(_, b)| b.addr_be != 0).collect())
    }
    fn backend_gens(&self) -> Result<Vec<(u32, u32)>, Error> {
        Ok(self
            .all_backends()?
            .into_iter()
            .filter(|(_, b)| b.addr_be == 0 && b.gen != 0)
            .map(|(i, b)| (i, b.gen))
            .collect())
    }
    fn source_ranges(&self) -> Result<Vec<(u32, Range)>, Error> {
        let keys: Vec<Key<SourceRange>> =
            self.ranges.keys().collect::<Result<_, _>>().map_err(at(map_names::SRC_RANGES))?;
        Ok(keys
            .into_iter()
            .map(|k| {
                let data = k.data();
                (u32::from_be(data.svc_id_be), (data.addr_be, (k.prefix_len() - 32) as u8))
            })
            .collect())
    }
    fn filter_words(&self) -> Result<Vec<(u32, u64)>, Error> {
        let words: Vec<(u32, u64)> = batch::read_all(IterableMap::map(&self.filter))
            .map_err(|source| Error::Batch { name: map_names::FRONT_BITS, source })?;
        Ok(words.into_iter().filter(|(_, w)| *w != 0).collect())
    }
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), Error> {
        self.backends.set(id, backend, 0).map_err(at(map_names::BACKENDS))
    }
    fn put_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), Error> {
        self.slots.insert(key, backend_id, 0).map_err(at(map_names::SLOTS))
    }
    fn del_slot(&mut self, key: SlotKey) -> Result<(), Error> {
        absent_ok(self.slots.remove(&key)).map_err(at(map_names::SLOTS))
    }
    fn put_source_range(&mut self, svc_id: u32, range: Range) -> Result<(), Error> {
        self.ranges.insert(&range_key(svc_id, range), 1, 0).map_err(at(map_names::SRC_RANGES))
    }
    fn del_source_range(&mut self, svc_id: u32, range: Range) -> Result<(), Error> {
        absent_ok(self.ranges.remove(&range_key(svc_id, range))).map_err(at(map_names::SRC_RANGES))
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), Error> {
        // Every entry written carries its checksum (the reconciler's already do).
        self.services.insert(key, value.sealed(), 0).map_err(at(map_names::SERVICES))
    }
    fn del_service(&mut self, key: ServiceKey) -> Result<(), Error> {
        absent_ok(self.services.remove(&key)).map_err(at(map_names::SERVICES))
    }
    fn put_filter_word(&mut self, index: u32, word: u64) -> Result<(), Error> {
        self.filter.set(index, word, 0).map_err(at(map_names::FRONT_BITS))
    }
    fn put_config(&mut self, config: Config) -> Result<(), Error> {
        self.config.set(0, config, 0).map_err(at(map_names::CONFIG))
    }
    fn frontend_metas(&self) -> Result<Vec<(ServiceKey, FrontendMeta)>, Error> {
        batch::read_all(IterableMap::map(&self.metas))
            .map_err(|source| Error::Batch { name: map_names::FRONTEND_META, source })
    }
    fn put_frontend_meta(&mut self, key: ServiceKey, meta: FrontendMeta) -> Result<(), Error> {
        self.metas.insert(key, meta, 0).map_err(at(map_names::FRONTEND_META))
    }
    fn del_frontend_meta(&mut self, key: ServiceKey) -> Result<(), Error> {
        absent_ok(self.metas.remove(&key)).map_err(at(map_names::FRONTEND_META))
    }
    fn clear_frontend_stats(&mut self, svc_id: u32) -> Result<(), Error> {
        let zero = zeroes(self.cpus).map_err(|source| Error::Batch { name: map_names::FRONTEND_STATS, source })?;
        self.frontend_stats.set(svc_id, zero, 0).map_err(at(map_names::FRONTEND_STATS))
    }
    fn clear_backend_stats(&mut self, id: u32) -> Result<(), Error> {
        let zero = zeroes(self.cpus).map_err(|source| Error::Batch { name: map_names::BACKEND_STATS, source })?;
        self.backend_stats.set(id, zero, 0).map_err(at(map_names::BACKEND_STATS))
    }
}

/// A per-CPU entry of zeroes.
fn zeroes<T: aya::Pod + Default>(cpus: usize) -> std::io::Result<PerCpuValues<T>> {
    PerCpuValues::try_from(vec![T::default(); cpus])
}

/// Everything the service maps hold, read at once: what views show and drift checks compare.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub slots: BTreeMap<SlotKey, u32>,
    /// Backend entries in use (non-zero address), by id.
    pub backends: BTreeMap<u32, Backend>,
    /// Source ranges by frontend id.
    pub ranges: BTreeMap<u32, BTreeSet<Range>>,
    /// Non-zero words of the frontend filter.
    pub filter: BTreeMap<u32, u64>,
    pub metas: BTreeMap<ServiceKey, FrontendMeta>,
}

impl Contents {
    pub fn read<S: MapStore>(store: &S) -> Result<Self, S::Error> {
        let mut ranges: BTreeMap<u32, BTreeSet<Range>> = BTreeMap::new();
        for (svc_id, range) in store.source_ranges()? {
            ranges.entry(svc_id).or_default().insert(range);
        }
        Ok(Contents {
            services: store.services()?.into_iter().collect(),
            slots: store.slots()?.into_iter().collect(),
            backends: store.backends()?.into_iter().collect(),
            ranges,
            filter: store.filter_words()?.into_iter().collect(),
            metas: store.frontend_metas()?.into_iter().collect(),
        })
    }

    /// The backend id in each position of a frontend's live set (`None`: no slot there).
    pub fn set_ids(&self, v: &ServiceValue, set: u8) -> Vec<Option<u32>> {
        (0..v.count[set as usize] as u32)
            .map(|position| self.slots.get(&SlotKey::new(v.svc_id, v.gen, set, position)).copied())
            .collect()
    }

    /// Is the frontend's bit set in the filter (else the datapath passes its packets by)?
    pub fn filter_has(&self, key: &ServiceKey) -> bool {
        let bit = lb_common::front_filter_bit(key.addr_be, key.port_be);
        self.filter.get(&(bit / 64)).is_some_and(|w| w >> (bit % 64) & 1 == 1)
    }
}

/// Service maps held in memory: what the sync writes when it runs without a datapath (the
/// control-plane tests and benchmarks), with a count of the writes.
#[derive(Clone, Debug, Default)]
pub struct MemoryMaps {
    pub contents: Contents,
    /// Generations of backend ids whose entries are free.
    pub free_gens: BTreeMap<u32, u32>,
    pub config: Option<Config>,
    /// Entries written (config included) and deleted, since creation.
    pub writes: u64,
    pub deletes: u64,
}

impl MapStore for MemoryMaps {
    type Error = std::convert::Infallible;
    fn id_limits(&self) -> (u32, u32) {
        // Room for the largest maps the agent can load.
        (lb_common::MAX_SERVICES, lb_common::MAX_BACKEND_SLOTS)
    }
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Self::Error> {
        Ok(self.contents.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn slots(&self) -> Result<Vec<(SlotKey, u32)>, Self::Error> {
        Ok(self.contents.slots.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, Self::Error> {
        Ok(self.contents.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backend_gens(&self) -> Result<Vec<(u32, u32)>, Self::Error> {
        Ok(self.free_gens.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn source_ranges(&self) -> Result<Vec<(u32, Range)>, Self::Error> {
        Ok(self.contents.ranges.iter().flat_map(|(id, rs)| rs.iter().map(move |r| (*id, *r))).collect())
    }
    fn filter_words(&self) -> Result<Vec<(u32, u64)>, Self::Error> {
        Ok(self.contents.filter.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), Self::Error> {
        self.writes += 1;
        if backend.addr_be == 0 {
            self.contents.backends.remove(&id);
            self.free_gens.insert(id, backend.gen);
        } else {
            self.free_gens.remove(&id);
            self.contents.backends.insert(id, backend);
        }
        Ok(())
    }
    fn put_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), Self::Error> {
        self.writes += 1;
        self.contents.slots.insert(key, backend_id);
        Ok(())
    }
    fn del_slot(&mut self, key: SlotKey) -> Result<(), Self::Error> {
        self.deletes += 1;
        self.contents.slots.remove(&key);
        Ok(())
    }
    fn put_source_range(&mut self, svc_id: u32, range: Range) -> Result<(), Self::Error> {
        self.writes += 1;
        self.contents.ranges.entry(svc_id).or_default().insert(range);
        Ok(())
    }
    fn del_source_range(&mut self, svc_id: u32, range: Range) -> Result<(), Self::Error> {
        self.deletes += 1;
        if let Some(rs) = self.contents.ranges.get_mut(&svc_id) {
            rs.remove(&range);
            if rs.is_empty() {
                self.contents.ranges.remove(&svc_id);
            }
        }
        Ok(())
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), Self::Error> {
        self.writes += 1;
        self.contents.services.insert(key, value);
        Ok(())
    }
    fn del_service(&mut self, key: ServiceKey) -> Result<(), Self::Error> {
        self.deletes += 1;
        self.contents.services.remove(&key);
        Ok(())
    }
    fn put_filter_word(&mut self, index: u32, word: u64) -> Result<(), Self::Error> {
        self.writes += 1;
        if word == 0 {
            self.contents.filter.remove(&index);
        } else {
            self.contents.filter.insert(index, word);
        }
        Ok(())
    }
    fn put_config(&mut self, config: Config) -> Result<(), Self::Error> {
        if self.config != Some(config) {
            self.writes += 1;
            self.config = Some(config);
        }
        Ok(())
    }
    fn frontend_metas(&self) -> Result<Vec<(ServiceKey, FrontendMeta)>, Self::Error> {
        Ok(self.contents.metas.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_frontend_meta(&mut self, key: ServiceKey, meta: FrontendMeta) -> Result<(), Self::Error> {
        self.writes += 1;
        self.contents.metas.insert(key, meta);
        Ok(())
    }
    fn del_frontend_meta(&mut self, key: ServiceKey) -> Result<(), Self::Error> {
        self.deletes += 1;
        self.contents.metas.remove(&key);
        Ok(())
    }
    fn clear_frontend_stats(&mut self, _: u32) -> Result<(), Self::Error> {
        Ok(())
    }
    fn clear_backend_stats(&mut self, _: u32) -> Result<(), Self::Error> {
        Ok(())
    }
}
