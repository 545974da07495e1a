//! Views of the pinned maps for people and tools (`lb-user services`, `stats`, `ct`), read
//! straight from the pins so they work while the agent is down. Their field names are the
//! CLI's `--json` output and stay stable (docs/CLI.md).
//!
//! Backend ids belong to a Service port (its ClusterIP, NodePorts and other frontends share
//! them), so a backend's traffic is its Service port's, whichever frontend carried it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::MapData;
use lb_common::{
    affinity_scope, backend_flags,
    conntrack::{age, phase, phase_name, timeout, units, UNIT_SHIFT},
    ct_flags, map_names, service_flags,
    user::{frontend_kind_name, ip_from_be, protocol_name, text_of},
    BackendStats, CtKey, CtValue, FrontendMeta, FrontendStats, ServiceKey, ServiceValue,
};
use serde::Serialize;

use crate::{
    datapath::{
        self, batch,
        conntrack::{coarse_now_ns, peer_of},
        maps::{Contents, PinnedMaps},
    },
    reconcile::drift::{algorithm_name, flag_names, Drift},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
    #[error(transparent)]
    Maps(#[from] datapath::maps::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Packets and bytes (both ways: requests and replies) and the flows started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Per second, between two readings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    pub packets_per_s: f64,
    pub bytes_per_s: f64,
    pub new_flows_per_s: f64,
}

impl Traffic {
    fn rates(&self, before: &Traffic, seconds: f64) -> Rates {
        let per_s = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds;
        Rates {
            packets_per_s: per_s(self.packets, before.packets),
            bytes_per_s: per_s(self.bytes, before.bytes),
            new_flows_per_s: per_s(self.new_flows, before.new_flows),
        }
    }
}

/// The Service port a frontend serves, as the agent recorded it (LB_FE_META).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
    /// The Service port's name ("" when the port has none).
    pub port: String,
}

impl ServiceName {
    fn of(m: &FrontendMeta) -> Self {
        ServiceName { namespace: text_of(&m.namespace), name: text_of(&m.name), port: text_of(&m.port_name) }
    }
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// Everything the views read, at one moment.
pub struct Snapshot {
    pub maps: Contents,
    /// By frontend id.
    pub frontend_traffic: BTreeMap<u32, Traffic>,
    /// By backend id, for the ids in use.
    pub backend_traffic: BTreeMap<u32, Traffic>,
    pub live_flows: BTreeMap<u32, u64>,
    pub taken: Instant,
    pub taken_unix_ms: u64,
}

impl Snapshot {
    pub fn read(pin_dir: &Path) -> Result<Self> {
        datapath::check_pin_dir(pin_dir)?;
        let maps = Contents::read(&PinnedMaps::open(pin_dir)?)?;
        // The counters of every id in a few system calls (not one per id: 100k backends).
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| datapath::maps::Error::Cpus(what, e))?;
        let read_err =
            |name: &'static str| move |source| datapath::Error::Io { path: pin_dir.join("maps").join(name), source };
        let pinned = |name: &'static str| {
            MapData::from_pin(pin_dir.join("maps").join(name)).map_err(|source| datapath::Error::Map { name, source })
        };
        let sum = |per_cpu: &mut dyn Iterator<Item = (u64, u64, u64)>| {
            per_cpu.fold(Traffic::default(), |t, (packets, bytes, new_flows)| Traffic {
                packets: t.packets + packets,
                bytes: t.bytes + bytes,
                new_flows: t.new_flows + new_flows,
            })
        };
        let frontends: BTreeSet<u32> = maps.services.values().map(|v| v.svc_id).collect();
        let mut frontend_traffic = BTreeMap::new();
        let name = map_names::FRONTEND_STATS;
        batch::for_each_per_cpu(&pinned(name)?, cpus, |id: &u32, per_cpu: &[FrontendStats]| {
            if frontends.contains(id) {
                frontend_traffic.insert(*id, sum(&mut per_cpu.iter().map(|c| (c.packets, c.bytes, c.new_flows))));
            }
        })
        .map_err(read_err(name))?;
        let (mut backend_traffic, mut live_flows) = (BTreeMap::new(), BTreeMap::new());
        let name = map_names::BACKEND_STATS;
        batch::for_each_per_cpu(&pinned(name)?, cpus, |id: &u32, per_cpu: &[BackendStats]| {
            if maps.backends.contains_key(id) {
                backend_traffic.insert(*id, sum(&mut per_cpu.iter().map(|c| (c.packets, c.bytes, c.new_flows))));
            }
        })
        .map_err(read_err(name))?;
        let name = map_names::BACKEND_LIVE;
        batch::for_each(&pinned(name)?, |id: &u32, live: &u64| {
            if maps.backends.contains_key(id) {
                live_flows.insert(*id, *live);
            }
        })
        .map_err(read_err(name))?;
        Ok(Snapshot {
            maps,
            frontend_traffic,
            backend_traffic,
            live_flows,
            taken: Instant::now(),
            taken_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        })
    }

    pub(crate) fn name_of(&self, key: &ServiceKey) -> Option<ServiceName> {
        self.maps.metas.get(key).map(ServiceName::of)
    }

    pub(crate) fn kind_of(&self, key: &ServiceKey, v: &ServiceValue) -> &'static str {
        self.maps
            .metas
            .get(key)
            .and_then(|m| frontend_kind_name(m.kind))
            .unwrap_or(if v.flags & service_flags::EXTERNAL != 0 { "external" } else { "ClusterIP" })
    }

    /// The Service port (and protocol) of each backend scope (`affinity_scope` of a backend's
    /// owner): that of the first named frontend sharing it. Built once per view, so a
    /// backend's costs a lookup, not a pass over every frontend.
    pub(crate) fn services_by_scope(&self) -> BTreeMap<u32, (ServiceName, u8)> {
        let mut out = BTreeMap::new();
        for (key, v) in &self.maps.services {
            if let Some(name) = self.name_of(key) {
                out.entry(v.scope).or_insert((name, key.proto));
            }
        }
        out
    }
}

/// A backend of a frontend, with its state in that frontend.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendView {
    /// `ADDRESS:PORT`
    pub backend: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub id: u32,
    /// The endpoint runs on this node.
    pub local: bool,
    /// `active` (new flows choose it), `short-circuit` (only this node's own traffic to an
    /// externalTrafficPolicy=Local frontend chooses it) or `retained` (no set chooses it: a
    /// terminating or unready endpoint kept for the flows it has).
    pub state: &'static str,
    /// Positions it holds in the frontend's set 0 and set 1 (Maglev tables give each
    /// backend many).
    pub slots: [u32; 2],
    /// Flows open to it now (its Service port's, over all its frontends).
    pub live_flows: u64,
    /// Its Service port's traffic to it, over all its frontends.
    pub traffic: Traffic,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontendView {
    /// `ADDRESS:PORT/PROTOCOL`
    pub frontend: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    /// `ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalIP` (as recorded), else `external`
    /// or `ClusterIP` from the entry's flags.
    pub kind: &'static str,
    /// null when the maps hold no name for it.
    pub service: Option<ServiceName>,
    pub id: u32,
    pub algorithm: String,
    /// sessionAffinity ClientIP timeout; null without affinity.
    pub affinity_timeout_s: Option<u32>,
    /// `external`, `external-local`, `source-ranges`, `drop-when-empty`.
    pub flags: Vec<String>,
    pub source_ranges: Vec<String>,
    /// What a new flow meets when its set is empty: `refuse` or `drop`.
    pub when_empty: &'static str,
    pub traffic: Traffic,
    pub backends: Vec<BackendView>,
    /// Differences from the model; null when not checked.
    pub drift: Option<Vec<Drift>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicesView {
    pub frontends: Vec<FrontendView>,
    /// Every difference from the model (including frontends the maps lack); null when not
    /// checked (no manifests given).
    pub drift: Option<Vec<Drift>>,
}

/// Every frontend the maps hold with its backends; `drift` (when checked) is spread over them.
pub fn services(snap: &Snapshot, drift: Option<Vec<Drift>>) -> ServicesView {
    let maps = &snap.maps;
    let frontends = maps
        .services
        .iter()
        .map(|(key, v)| {
            let mut slots: BTreeMap<u32, [u32; 2]> = BTreeMap::new();
            for set in 0..2u8 {
                for id in maps.set_ids(v, set).into_iter().flatten() {
                    slots.entry(id).or_default()[set as usize] += 1;
                }
            }
            let retained = maps.backends.iter().filter(|(id, b)| {
                affinity_scope(b.owner) == v.scope && b.flags & backend_flags::CHOSEN == 0 && !slots.contains_key(id)
            });
            let retained: Vec<(u32, [u32; 2])> = retained.map(|(id, _)| (*id, [0, 0])).collect();
            let mut backends: Vec<BackendView> = slots
                .into_iter()
                .chain(retained)
                .filter_map(|(id, slots)| {
                    let b = maps.backends.get(&id)?;
                    let state = match slots {
                        [0, 0] => "retained",
                        [0, _] => "short-circuit",
                        _ => "active",
                    };
                    Some(BackendView {
                        backend: format!("{}:{}", b.ip(), b.port()),
                        address: b.ip(),
                        port: b.port(),
                        id,
                        local: b.flags & backend_flags::LOCAL != 0,
                        state,
                        slots,
                        live_flows: snap.live_flows.get(&id).copied().unwrap_or(0),
                        traffic: snap.backend_traffic.get(&id).copied().unwrap_or_default(),
                    })
                })
                .collect();
            backends.sort_by_key(|b| (b.address, b.port));
            let frontend = key.to_string();
            let flags = flag_names(v.flags);
            FrontendView {
                drift: drift.as_ref().map(|all| all.iter().filter(|d| d.frontend == frontend).cloned().collect()),
                frontend,
                address: ip_from_be(key.addr_be),
                port: u16::from_be(key.port_be),
                protocol: protocol_name(key.proto).into_owned(),
                kind: snap.kind_of(key, v),
                service: snap.name_of(key),
                id: v.svc_id,
                algorithm: algorithm_name(v.algorithm),
                affinity_timeout_s: (v.affinity_timeout_s != 0).then_some(v.affinity_timeout_s),
                flags: if v.flags == 0 { Vec::new() } else { flags.split(',').map(String::from).collect() },
                source_ranges: maps
                    .ranges
                    .get(&v.svc_id)
                    .into_iter()
                    .flatten()
                    .map(|(addr, len)| format!("{}/{len}", ip_from_be(*addr)))
                    .collect(),
                when_empty: if v.flags & service_flags::DROP_WHEN_EMPTY != 0 { "drop" } else { "refuse" },
                traffic: snap.frontend_traffic.get(&v.svc_id).copied().unwrap_or_default(),
                backends,
            }
        })
        .collect();
    ServicesView { frontends, drift }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontendTraffic {
    /// `ADDRESS:PORT/PROTOCOL`
    pub frontend: String,
    pub kind: &'static str,
    pub service: Option<ServiceName>,
    pub id: u32,
    #[serde(flatten)]
    pub traffic: Traffic,
    /// null without an earlier reading to compare with.
    pub rates: Option<Rates>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendTraffic {
    /// `ADDRESS:PORT`
    pub backend: String,
    pub id: u32,
    pub local: bool,
    /// The Service port it serves (null when the maps hold no name for it).
    pub service: Option<ServiceName>,
    /// TCP or UDP (that of its Service port's frontends).
    pub protocol: Option<String>,
    pub live_flows: u64,
    #[serde(flatten)]
    pub traffic: Traffic,
    pub rates: Option<Rates>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatsView {
    pub time_unix_ms: u64,
    /// Seconds since the earlier reading the rates come from (null: no rates).
    pub interval_s: Option<f64>,
    pub frontends: Vec<FrontendTraffic>,
    pub backends: Vec<BackendTraffic>,
}

/// Traffic per frontend and per backend; with an earlier snapshot, rates since then (for the
/// frontends and backends that were there then, under the same id).
pub fn stats(now: &Snapshot, before: Option<&Snapshot>) -> StatsView {
    let seconds = before.map(|b| now.taken.duration_since(b.taken).as_secs_f64()).filter(|s| *s > 0.0);
    let mut frontends: Vec<FrontendTraffic> = now
        .maps
        .services
        .iter()
        .map(|(key, v)| {
            let traffic = now.frontend_traffic.get(&v.svc_id).copied().unwrap_or_default();
            let earlier = before
                .filter(|b| b.maps.services.get(key).is_some_and(|old| old.svc_id == v.svc_id))
                .and_then(|b| b.frontend_traffic.get(&v.svc_id));
            FrontendTraffic {
                frontend: key.to_string(),
                kind: now.kind_of(key, v),
                service: now.name_of(key),
                id: v.svc_id,
                traffic,
                rates: seconds.zip(earlier).map(|(s, e)| traffic.rates(e, s)),
            }
        })
        .collect();
    frontends.sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
    let by_scope = now.services_by_scope();
    let mut backends: Vec<BackendTraffic> = now
        .maps
        .backends
        .iter()
        .map(|(id, b)| {
            let traffic = now.backend_traffic.get(id).copied().unwrap_or_default();
            let earlier = before
                .filter(|old| old.maps.backends.get(id).is_some_and(|o| o.gen == b.gen))
                .and_then(|old| old.backend_traffic.get(id));
            let service = by_scope.get(&affinity_scope(b.owner)).cloned();
            BackendTraffic {
                backend: format!("{}:{}", b.ip(), b.port()),
                id: *id,
                local: b.flags & backend_flags::LOCAL != 0,
                protocol: service.as_ref().map(|(_, proto)| protocol_name(*proto).into_owned()),
                service: service.map(|(s, _)| s),
                live_flows: now.live_flows.get(id).copied().unwrap_or(0),
                traffic,
                rates: seconds.zip(earlier).map(|(s, e)| traffic.rates(e, s)),
            }
        })
        .collect();
    backends.sort_by(|a, b| (&a.service, &a.protocol, &a.backend).cmp(&(&b.service, &b.protocol, &b.backend)));
    StatsView { time_unix_ms: now.taken_unix_ms, interval_s: seconds, frontends, backends }
}

/// One direction of a flow as it appears on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Tuple {
    /// `ADDRESS:PORT`
    pub src: String,
    pub dst: String,
}

impl Tuple {
    fn of(k: &CtKey) -> Self {
        Tuple {
            src: format!("{}:{}", ip_from_be(k.src_addr_be), u16::from_be(k.src_port_be)),
            dst: format!("{}:{}", ip_from_be(k.dst_addr_be), u16::from_be(k.dst_port_be)),
        }
    }
}

/// A tracked flow (both halves of LB_CONNTRACK).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowView {
    pub protocol: String,
    /// As the client sends it: client -> frontend.
    pub original: Tuple,
    /// As the backend answers: backend -> client, or -> the node's NAT address and port.
    pub reply: Tuple,
    /// `syn-sent`, `unreplied`, `established`, `closing`, `closed` or `reset`.
    pub state: &'static str,
    /// Seconds since the flow was last refreshed.
    pub age_s: f64,
    /// Seconds until it expires unless refreshed.
    pub expires_in_s: f64,
    /// The source the backend sees when the node translated it (SNAT); null when kept.
    pub nat: Option<String>,
    /// `ADDRESS:PORT` the flow goes to.
    pub backend: String,
    pub backend_id: u32,
    /// The backend id still names the endpoint the flow chose (false: removed; the flow's
    /// next packet is reset, rechosen or dropped).
    pub backend_current: bool,
    pub frontend_id: u32,
    pub service: Option<ServiceName>,
    /// Only one half is in the table (the sweep removes such halves).
    pub orphan: bool,
}

/// Which flows to show.
#[derive(Clone, Debug, Default)]
pub struct FlowFilter {
    /// Only flows of this Service (namespace, name).
    pub service: Option<(String, String)>,
    /// Only flows to this backend address.
    pub backend: Option<Ipv4Addr>,
}

/// Every tracked flow, one row for its two halves, by original tuple.
pub fn flows(pin_dir: &Path, filter: &FlowFilter) -> Result<Vec<FlowView>> {
    datapath::check_pin_dir(pin_dir)?;
    let snap_maps = Contents::read(&PinnedMaps::open(pin_dir)?)?;
    let name = map_names::CONNTRACK;
    let data =
        MapData::from_pin(pin_dir.join("maps").join(name)).map_err(|source| datapath::Error::Map { name, source })?;
    let entries: Vec<(CtKey, CtValue)> = batch::read_all(&data)
        .map_err(|source| datapath::Error::Io { path: pin_dir.join("maps").join(name), source })?;
    let mut halves: BTreeMap<CtKey, [Option<(CtKey, CtValue)>; 2]> = BTreeMap::new();
    for (k, v) in entries {
        let reply = v.flags & ct_flags::REPLY != 0;
        let original = if reply { peer_of(&k, &v) } else { k };
        halves.entry(original).or_default()[reply as usize] = Some((k, v));
    }
    let by_id: BTreeMap<u32, &ServiceKey> = snap_maps.services.iter().map(|(k, v)| (v.svc_id, k)).collect();
    let now = units(coarse_now_ns());
    let seconds = |u: u32| (u as u64) as f64 * (1u64 << UNIT_SHIFT) as f64 / 1e9;
    let mut out = Vec::new();
    for (original, [fwd, rev]) in halves {
        let (k, v) = fwd.or(rev).expect("a flow has a half");
        let reply_key = match rev {
            Some((rk, _)) => rk,
            None => peer_of(&k, &v),
        };
        // The reply half's key: backend -> client, or -> the NAT address when SNATed.
        let backend_addr = ip_from_be(reply_key.src_addr_be);
        let backend = format!("{backend_addr}:{}", u16::from_be(reply_key.src_port_be));
        let nat = (v.flags & ct_flags::SNAT != 0)
            .then(|| format!("{}:{}", ip_from_be(reply_key.dst_addr_be), u16::from_be(reply_key.dst_port_be)));
        let service = by_id.get(&v.svc_id).and_then(|key| snap_maps.metas.get(*key)).map(ServiceName::of);
        if let Some((ns, name)) = &filter.service {
            if !service.as_ref().is_some_and(|s| &s.namespace == ns && &s.name == name) {
                continue;
            }
        }
        if filter.backend.is_some_and(|b| b != backend_addr) {
            continue;
        }
        let a = age(v.stamp, now);
        let limit = timeout(k.proto, phase(v.state));
        out.push(FlowView {
            protocol: protocol_name(k.proto).into_owned(),
            original: Tuple::of(&original),
            reply: Tuple::of(&reply_key),
            state: phase_name(k.proto, v.state),
            age_s: seconds(a),
            expires_in_s: seconds(limit.saturating_sub(a)),
            nat,
            backend,
            backend_id: v.backend_id,
            backend_current: snap_maps.backends.get(&v.backend_id).is_some_and(|b| b.gen == v.backend_gen),
            frontend_id: v.svc_id,
            service,
            orphan: fwd.is_none() || rev.is_none(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use lb_common::{backend_flags, frontend_kind, Backend, SlotKey, IPPROTO_UDP};
    use serde_json::json;

    use super::*;

    /// One NodePort frontend (id 3) of shop/web:dns over UDP: backend 1 active and local,
    /// backend 2 retained (not chosen), as the reconciler writes them.
    fn snapshot(packets: u64, at: Instant) -> Snapshot {
        let key = ServiceKey::new(Ipv4Addr::new(192, 168, 50, 10), 30053, IPPROTO_UDP);
        let owner = 0x1234_5678_9abc_def0;
        let mut maps = Contents::default();
        maps.services.insert(
            key,
            ServiceValue {
                svc_id: 3,
                flags: service_flags::EXTERNAL,
                count: [1, 0],
                scope: affinity_scope(owner),
                ..Default::default()
            },
        );
        maps.slots.insert(SlotKey::new(3, 0, 0, 0), 1);
        let mut active = Backend::new(Ipv4Addr::new(10, 244, 1, 10), 53, true, owner);
        active.flags |= backend_flags::CHOSEN;
        maps.backends.insert(1, Backend { gen: 1, ..active });
        maps.backends.insert(2, Backend { gen: 1, ..Backend::new(Ipv4Addr::new(10, 244, 2, 10), 53, false, owner) });
        maps.metas.insert(key, FrontendMeta::new("shop", "web", "dns", frontend_kind::NODE_PORT));
        let traffic = Traffic { packets, bytes: packets * 100, new_flows: packets / 2 };
        Snapshot {
            maps,
            frontend_traffic: BTreeMap::from([(3, traffic)]),
            backend_traffic: BTreeMap::from([(1, traffic), (2, Traffic::default())]),
            live_flows: BTreeMap::from([(1, 2), (2, 1)]),
            taken: at,
            taken_unix_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn services_json_has_the_documented_shape() {
        let view = services(&snapshot(10, Instant::now()), None);
        let web = json!({"namespace": "shop", "name": "web", "port": "dns"});
        assert_eq!(
            serde_json::to_value(&view).unwrap(),
            json!({
                "frontends": [{
                    "frontend": "192.168.50.10:30053/UDP",
                    "address": "192.168.50.10",
                    "port": 30053,
                    "protocol": "UDP",
                    "kind": "NodePort",
                    "service": web,
                    "id": 3,
                    "algorithm": "random",
                    "affinity_timeout_s": null,
                    "flags": ["external"],
                    "source_ranges": [],
                    "when_empty": "refuse",
                    "traffic": {"packets": 10, "bytes": 1000, "new_flows": 5},
                    "backends": [
                        {
                            "backend": "10.244.1.10:53", "address": "10.244.1.10", "port": 53, "id": 1,
                            "local": true, "state": "active", "slots": [1, 0], "live_flows": 2,
                            "traffic": {"packets": 10, "bytes": 1000, "new_flows": 5}
                        },
                        {
                            "backend": "10.244.2.10:53", "address": "10.244.2.10", "port": 53, "id": 2,
                            "local": false, "state": "retained", "slots": [0, 0], "live_flows": 1,
                            "traffic": {"packets": 0, "bytes": 0, "new_flows": 0}
                        }
                    ],
                    "drift": null
                }],
                "drift": null
            })
        );
        let checked = services(&snapshot(10, Instant::now()), Some(Vec::new()));
        assert_eq!(serde_json::to_value(&checked).unwrap()["frontends"][0]["drift"], json!([]));
    }

    #[test]
    fn stats_json_has_the_documented_shape_and_rates_over_the_interval() {
        let earlier = Instant::now();
        let before = snapshot(10, earlier);
        let now = snapshot(30, earlier + std::time::Duration::from_secs(2));
        let view = serde_json::to_value(stats(&now, Some(&before))).unwrap();
        let rates = json!({"packets_per_s": 10.0, "bytes_per_s": 1000.0, "new_flows_per_s": 5.0});
        assert_eq!(view["interval_s"], json!(2.0));
        assert_eq!(view["time_unix_ms"], json!(1_700_000_000_000u64));
        assert_eq!(
            view["frontends"],
            json!([{
                "frontend": "192.168.50.10:30053/UDP", "kind": "NodePort",
                "service": {"namespace": "shop", "name": "web", "port": "dns"}, "id": 3,
                "packets": 30, "bytes": 3000, "new_flows": 15, "rates": rates
            }])
        );
        assert_eq!(
            view["backends"][0],
            json!({
                "backend": "10.244.1.10:53", "id": 1, "local": true,
                "service": {"namespace": "shop", "name": "web", "port": "dns"}, "protocol": "UDP",
                "live_flows": 2, "packets": 30, "bytes": 3000, "new_flows": 15, "rates": rates
            })
        );
        // One reading: no rates.
        let once = serde_json::to_value(stats(&now, None)).unwrap();
        assert_eq!((once["interval_s"].clone(), once["frontends"][0]["rates"].clone()), (json!(null), json!(null)));
    }

    #[test]
    fn an_id_given_to_another_backend_between_readings_gets_no_rate() {
        let earlier = Instant::now();
        let mut before = snapshot(10, earlier);
        before.maps.backends.get_mut(&1).unwrap().gen = 7;
        let now = snapshot(30, earlier + std::time::Duration::from_secs(2));
        let view = stats(&now, Some(&before));
        assert!(view.frontends[0].rates.is_some());
        assert_eq!(view.backends.iter().find(|b| b.id == 1).unwrap().rates, None);
    }
}
