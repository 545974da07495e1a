//! Which backend the datapath gives a flow: the kernel's choice computed from the pinned
//! maps with the same hash and tables (`lb-user which`, and tests that hold the kernel to
//! it). A tracked flow follows its conntrack entry; a new one goes by affinity, then by its
//! frontend's algorithm: Maglev, source hash and round-robin are decided ahead, random and
//! least-connections ties are not (the prediction is then the set the kernel picks from).
use std::{fmt, net::SocketAddrV4, path::Path};

use aya::maps::{Array, HashMap, MapData};
use lb_common::{
    algorithm, client_hash,
    conntrack::{alive, units},
    flow_hash, in_prefix, map_names, service_flags,
    user::{addr_be, ip_from_be},
    AffinityKey, AffinityValue, Backend, Config, CtKey, CtValue, ServiceKey, ServiceValue, SlotKey, IPPROTO_TCP,
};

use super::{conntrack::coarse_now_ns, open_map, Error, Result};

/// A packet's flow: protocol, source, destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// What the datapath does with a new packet of the flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// To this backend.
    Backend(SocketAddrV4),
    /// To one of these (the kernel draws at random among them).
    AnyOf(Vec<SocketAddrV4>),
    /// Refused (no backend anywhere) or dropped (none on this node for a Local policy, or
    /// the source is outside the ranges).
    Refused,
    Dropped(&'static str),
    /// The destination is no frontend.
    NotAFrontend,
}

/// The prediction and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prediction {
    pub choice: Choice,
    /// How it was decided: "tracked flow", "affinity", or the algorithm's name.
    pub by: &'static str,
}

impl fmt::Display for Prediction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.choice {
            Choice::Backend(b) => write!(f, "{b} ({})", self.by),
            Choice::AnyOf(bs) => {
                let list: Vec<String> = bs.iter().map(|b| b.to_string()).collect();
                write!(f, "one of {} ({})", list.join(", "), self.by)
            }
            Choice::Refused => write!(f, "refused: no backend anywhere"),
            Choice::Dropped(why) => write!(f, "dropped: {why}"),
            Choice::NotAFrontend => write!(f, "not a frontend: passed untouched"),
        }
    }
}

fn typed<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(pin_dir: &Path, name: &'static str) -> Result<T> {
    T::try_from(open_map(pin_dir, name)?).map_err(|source| Error::Map { name, source })
}

/// The pinned maps a prediction reads.
pub struct Predictor {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: Array<MapData, Backend>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    config: Array<MapData, Config>,
    cursors: Array<MapData, u64>,
    live: Array<MapData, u64>,
    affinity: aya::maps::HashMap<MapData, AffinityKey, AffinityValue>,
}

impl Predictor {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Predictor {
            services: typed(pin_dir, map_names::SERVICES)?,
            slots: typed(pin_dir, map_names::SLOTS)?,
            backends: typed(pin_dir, map_names::BACKENDS)?,
            conntrack: typed(pin_dir, map_names::CONNTRACK)?,
            config: typed(pin_dir, map_names::CONFIG)?,
            cursors: typed(pin_dir, map_names::RR_CURSORS)?,
            live: typed(pin_dir, map_names::BACKEND_LIVE)?,
            affinity: typed(pin_dir, map_names::AFFINITY)?,
        })
    }

    /// What the datapath does with the flow's next packet (a SYN, for TCP).
    pub fn predict(&self, flow: Flow) -> Prediction {
        let key = CtKey {
            src_addr_be: addr_be(*flow.src.ip()),
            dst_addr_be: addr_be(*flow.dst.ip()),
            src_port_be: flow.src.port().to_be(),
            dst_port_be: flow.dst.port().to_be(),
            proto: flow.proto,
            _pad: [0; 3],
        };
        let now = units(coarse_now_ns());
        if let Ok(v) = self.conntrack.get(&key, 0) {
            if alive(flow.proto, v.state, v.stamp, now) {
                if let Some(b) = self.backend(v.backend_id).filter(|b| b.gen == v.backend_gen) {
                    return Prediction { choice: Choice::Backend(socket(&b)), by: "tracked flow" };
                }
            }
        }
        let front = ServiceKey { addr_be: key.dst_addr_be, port_be: key.dst_port_be, proto: key.proto, _pad: 0 };
        let Ok(svc) = self.services.get(&front, 0) else {
            return Prediction { choice: Choice::NotAFrontend, by: "no frontend" };
        };
        let cfg = self.config.get(&0, 0).unwrap_or_default();
        let local = in_prefix(key.src_addr_be, cfg.local_addr_be, cfg.local_prefix_len);
        let short_circuit = svc.flags & service_flags::EXTERNAL_LOCAL != 0 && local;
        let set = short_circuit as u8;
        let slots = svc.count[set as usize] as u32;
        if slots == 0 {
            let choice = if svc.flags & service_flags::DROP_WHEN_EMPTY != 0 && !short_circuit {
                Choice::Dropped("no backend on this node for a Local traffic policy")
            } else {
                Choice::Refused
            };
            return Prediction { choice, by: "no backend" };
        }
        if svc.affinity_timeout_s != 0 {
            let akey = AffinityKey { scope: svc.scope, client_addr_be: key.src_addr_be };
            if let Ok(a) = self.affinity.get(&akey, 0) {
                let fresh = coarse_now_ns().saturating_sub(a.last_ns) <= svc.affinity_timeout_s as u64 * 1_000_000_000;
                // As the kernel checks it: the entry names its key, and its backend is still
                // chosen by this Service port.
                let chosen = self.backend(a.backend_id).filter(|b| {
                    a.key == akey
                        && b.gen == a.backend_gen
                        && b.flags & lb_common::backend_flags::CHOSEN != 0
                        && lb_common::affinity_scope(b.owner) == svc.scope
                });
                if let (true, Some(b)) = (fresh, chosen) {
                    return Prediction { choice: Choice::Backend(socket(&b)), by: "affinity" };
                }
            }
        }
        let at = |slot: u32| -> Option<SocketAddrV4> {
            let id = self.slots.get(&SlotKey::new(svc.svc_id, svc.gen, set, slot), 0).ok()?;
            self.backend(id).map(|b| socket(&b))
        };
        let decided = |slot: u32, by| Prediction { choice: at(slot).map_or(Choice::Refused, Choice::Backend), by };
        match svc.algorithm {
            algorithm::MAGLEV => {
                decided(flow_hash(key.src_addr_be, key.src_port_be, key.dst_port_be, key.proto) % slots, "maglev")
            }
            algorithm::SOURCE_HASH => decided(client_hash(key.src_addr_be) % slots, "source-hash"),
            algorithm::ROUND_ROBIN => {
                let cursor = self.cursors.get(&svc.svc_id, 0).unwrap_or(0);
                decided((cursor % slots as u64) as u32, "round-robin")
            }
            algorithm::LEAST_CONN => {
                let open: Vec<(u64, SocketAddrV4)> = (0..slots)
                    .filter_map(|slot| {
                        let id = self.slots.get(&SlotKey::new(svc.svc_id, svc.gen, set, slot), 0).ok()?;
                        Some((self.live.get(&id, 0).unwrap_or(0), socket(&self.backend(id)?)))
                    })
                    .collect();
                let fewest = open.iter().map(|(n, _)| *n).min().unwrap_or(0);
                let ties = open.into_iter().filter(|(n, _)| *n == fewest).map(|(_, b)| b).collect();
                Prediction { choice: Choice::AnyOf(ties), by: "least-conn" }
            }
            _ => Prediction { choice: Choice::AnyOf((0..slots).filter_map(at).collect()), by: "random" },
        }
    }

    fn backend(&self, id: u32) -> Option<Backend> {
        self.backends.get(&id, 0).ok().filter(|b| b.addr_be != 0)
    }
}

fn socket(b: &Backend) -> SocketAddrV4 {
    SocketAddrV4::new(ip_from_be(b.addr_be), u16::from_be(b.port_be))
}

/// `tcp` or `udp`, for the CLI.
pub fn parse_proto(s: &str) -> std::result::Result<u8, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(IPPROTO_TCP),
        "udp" => Ok(lb_common::IPPROTO_UDP),
        other => Err(format!("{other:?} is not tcp or udp")),
    }
}
