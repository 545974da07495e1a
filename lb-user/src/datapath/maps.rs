//! The service maps as pinned by the datapath, behind the reconciler's [`MapStore`].
use std::path::Path;

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, MapData, MapError,
};
use lb_common::{map_names, Backend, Config, ServiceKey, ServiceValue, SlotKey, SourceRange};

use crate::datapath::{self, open_map};

/// A source range of one frontend: (address in network order, prefix length).
pub type Range = (u32, u8);

/// Access to the service maps. [`PinnedMaps`] is the datapath's; the reconciler's tests
/// use a fake that records the order of writes.
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

pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    ranges: LpmTrie<MapData, SourceRange, u32>,
    config: Array<MapData, Config>,
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
            config: typed(pin_dir, map_names::CONFIG)?,
        })
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

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Error> {
        self.services.iter().collect::<Result<_, _>>().map_err(at(map_names::SERVICES))
    }
    fn slots(&self) -> Result<Vec<(SlotKey, u32)>, Error> {
        self.slots.iter().collect::<Result<_, _>>().map_err(at(map_names::SLOTS))
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, Error> {
        self.backends.iter().collect::<Result<_, _>>().map_err(at(map_names::BACKENDS))
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
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), Error> {
        self.backends.insert(id, backend, 0).map_err(at(map_names::BACKENDS))
    }
    fn del_backend(&mut self, id: u32) -> Result<(), Error> {
        absent_ok(self.backends.remove(&id)).map_err(at(map_names::BACKENDS))
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
        self.services.insert(key, value, 0).map_err(at(map_names::SERVICES))
    }
    fn del_service(&mut self, key: ServiceKey) -> Result<(), Error> {
        absent_ok(self.services.remove(&key)).map_err(at(map_names::SERVICES))
    }
    fn put_config(&mut self, config: Config) -> Result<(), Error> {
        self.config.set(0, config, 0).map_err(at(map_names::CONFIG))
    }
}
