//! One screen of health (`lb-user status`), read from the pins so it works while the agent is
//! down: the agent's own report of its syncs (LB_AGENT, which it writes through
//! [`StatusWriter`]: bpffs holds no plain files), where the programs are attached, how full
//! the maps are, NAT port use and what the datapath counted.
use std::{
    collections::BTreeMap,
    ffi::CString,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::{
    maps::{lpm_trie::LpmTrie, Array, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        ProgramInfo,
    },
    Pod,
};
use lb_common::{
    counters, ct_flags, map_names, mode, program_names,
    user::{fixed_text, ip_from_be, protocol_name, text_of},
    AffinityKey, AffinityValue, AgentStatus, Backend, Bucket, Config, CtKey, CtState, CtValue, FragKey, FragValue,
    FrontendMeta, ServiceKey, ServiceValue, SlotKey, SourceRange,
};
use serde::Serialize;
use tracing::warn;

use crate::datapath::{self, batch, open_map, Error, Result};

/// What one sync of the agent did, for [`StatusWriter::synced`].
pub struct SyncReport<'a> {
    /// From reading the source to the last map write.
    pub took: Duration,
    /// The maps were written.
    pub wrote: bool,
    /// Something failed and will be retried.
    pub failed: bool,
    /// Frontends the model wants.
    pub frontends: usize,
    /// Every problem the agent reported for this sync.
    pub problems: &'a [String],
    /// Per object change this sync wrote: the time from its arrival to the map write.
    pub latencies: Vec<std::time::Duration>,
    /// When a change last arrived.
    pub last_queued: Option<std::time::SystemTime>,
    /// The Service ports whose Local policy finds no endpoint here, when the maps were written.
    pub no_local_endpoints: Option<crate::model::NoLocalEndpoints>,
}

/// The agent's side: its report in LB_AGENT, counted from its start.
pub struct StatusWriter {
    map: Array<MapData, AgentStatus>,
    status: AgentStatus,
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl StatusWriter {
    /// Records the agent's start (its pid, the time; no sync yet).
    pub fn start(pin_dir: &Path) -> Result<Self> {
        let name = map_names::AGENT;
        let mut map: Array<MapData, AgentStatus> =
            open_map(pin_dir, name)?.try_into().map_err(|source| Error::Map { name, source })?;
        let status = AgentStatus {
            pid: std::process::id(),
            started_unix_ns: unix_ns(SystemTime::now()),
            ..bytemuck::Zeroable::zeroed()
        };
        map.set(0, status, 0).map_err(|source| Error::Map { name, source })?;
        Ok(StatusWriter { map, status })
    }

    /// Records a sync; one that neither wrote nor failed (nothing changed) is not one.
    pub fn synced(&mut self, report: &SyncReport<'_>) {
        if !report.wrote && !report.failed {
            return;
        }
        let s = &mut self.status;
        s.syncs += report.wrote as u64;
        s.sync_errors += report.failed as u64;
        s.last_sync_unix_ns = unix_ns(SystemTime::now());
        s.last_sync_duration_ns = report.took.as_nanos() as u64;
        s.frontends = report.frontends as u32;
        s.problems = report.problems.len() as u32;
        s.last_problem = fixed_text(report.problems.first().map_or("", String::as_str));
        if let Err(e) = self.map.set(0, *s, 0) {
            warn!("recording the sync in {}: {e}", map_names::AGENT);
        }
    }
}

/// The agent, as its last report says.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentView {
    pub pid: u32,
    /// A process with this pid runs now (in this PID namespace).
    pub running: bool,
    pub started_unix_ms: u64,
    pub syncs: u64,
    pub sync_errors: u64,
    /// null before the first sync.
    pub last_sync_unix_ms: Option<u64>,
    pub last_sync_duration_ms: f64,
    pub frontends: u32,
    pub problems: u32,
    pub last_problem: Option<String>,
}

/// Node-wide settings, from LB_CONFIG.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DatapathView {
    /// `netfilter` or `fast`.
    pub forwarding: &'static str,
    pub node_address: String,
    /// Sources counted as this node's pods (kube-proxy's detect-local).
    pub local_pods: String,
    pub snat_ports: String,
    pub conntrack_admit_limit: u32,
}

/// One attachment of a program.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Attachment {
    pub interface: String,
    /// `xdp`, `tc ingress` or `tc egress`.
    pub hook: &'static str,
    pub program: &'static str,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
    /// The attached program is the one pinned now (false after a load that did not
    /// re-attach here).
    pub current: bool,
    /// The interface exists (in this network namespace).
    pub device_present: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProgramView {
    pub name: &'static str,
    pub id: Option<u32>,
    pub loaded_unix_ms: Option<u64>,
}

/// A map's occupancy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Occupancy {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
    /// Where new entries stop being admitted, if lower than the capacity (conntrack).
    pub limit: Option<u64>,
}

/// SNAT source ports: a port is taken per destination (backend address, port, protocol).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NatView {
    pub range: String,
    /// Ports in the range: what each destination can have at once.
    pub ports: u32,
    /// Flows whose source is translated (each holds a port).
    pub snat_flows: u64,
    /// The destination with the most ports taken, and how many (null without SNAT flows).
    pub busiest: Option<String>,
    pub busiest_ports: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CounterView {
    pub name: &'static str,
    /// `translated`, `pass`, `drop`, `answer` (a refusal, a reset, ICMP sent back) or
    /// `event` (counted beside what happened to the packet).
    pub kind: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatusView {
    pub pin_dir: String,
    /// null when no agent has run with these pins (loaded with `lb-user load`).
    pub agent: Option<AgentView>,
    pub datapath: DatapathView,
    pub programs: Vec<ProgramView>,
    pub attachments: Vec<Attachment>,
    pub maps: Vec<Occupancy>,
    pub nat: NatView,
    pub counters: Vec<CounterView>,
}

/// What kind of count a counter is (see `lb_common::counters`).
pub fn counter_kind(index: u32) -> &'static str {
    use counters::*;
    match index {
        NEW_FLOW | ESTABLISHED | REPLY | ICMP_ERROR_TRANSLATED | FRAGMENT_TRANSLATED => "translated",
        PASS_NOT_SERVICE | PASS_NOT_IPV4 | PASS_IP_OPTIONS | PASS_FRAGMENT_UNMATCHED | PASS_L4_TRUNCATED => "pass",
        REFUSED_NO_BACKEND | RESET_NO_FLOW | RESET_BACKEND_GONE | FRAG_NEEDED_ANSWERED => "answer",
        DROP_NO_LOCAL_BACKEND
        | DROP_SOURCE_RANGE
        | DROP_MALFORMED
        | DROP_NAT_EXHAUSTED
        | DROP_CT_FULL
        | DROP_STALE_SERVICE
        | DROP_NO_FLOW
        | DROP_BACKEND_GONE
        | DROP_ANSWER_RATE_LIMITED
        | DROP_CT_RACE => "drop",
        _ => "event",
    }
}

fn map_data(pin_dir: &Path, name: &'static str) -> Result<MapData> {
    MapData::from_pin(pin_dir.join("maps").join(name)).map_err(|source| Error::Map { name, source })
}

/// Entries (batch read) and capacity of a pinned map.
fn occupancy<K: Pod, V: Pod>(pin_dir: &Path, name: &'static str, keep: impl Fn(&V) -> bool) -> Result<Occupancy> {
    let data = map_data(pin_dir, name)?;
    let capacity = data.info().map_err(|source| Error::Map { name, source })?.max_entries() as u64;
    let entries = batch::read_all::<K, V>(&data)
        .map_err(|source| Error::Io { path: pin_dir.join("maps").join(name), source })?
        .iter()
        .filter(|(_, v)| keep(v))
        .count() as u64;
    Ok(Occupancy { map: name, entries, capacity, limit: None })
}

fn single<V: Pod>(pin_dir: &Path, name: &'static str) -> Result<V> {
    let map: Array<MapData, V> = open_map(pin_dir, name)?.try_into().map_err(|source| Error::Map { name, source })?;
    map.get(&0, 0).map_err(|source| Error::Map { name, source })
}

fn process_running(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid != 0
        && (unsafe { libc::kill(pid as i32, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

fn unix_ms(ns: u64) -> u64 {
    ns / 1_000_000
}

impl StatusView {
    /// Reads everything from the pins under `pin_dir`.
    pub fn read(pin_dir: &Path) -> Result<StatusView> {
        datapath::check_pin_dir(pin_dir)?;
        let a: AgentStatus = single(pin_dir, map_names::AGENT)?;
        let agent = (a.pid != 0).then(|| AgentView {
            pid: a.pid,
            running: process_running(a.pid),
            started_unix_ms: unix_ms(a.started_unix_ns),
            syncs: a.syncs,
            sync_errors: a.sync_errors,
            last_sync_unix_ms: (a.last_sync_unix_ns != 0).then(|| unix_ms(a.last_sync_unix_ns)),
            last_sync_duration_ms: a.last_sync_duration_ns as f64 / 1e6,
            frontends: a.frontends,
            problems: a.problems,
            last_problem: Some(text_of(&a.last_problem)).filter(|p| !p.is_empty()),
        });
        let cfg: Config = single(pin_dir, map_names::CONFIG)?;
        let datapath = DatapathView {
            forwarding: if cfg.mode == mode::FAST { "fast" } else { "netfilter" },
            node_address: ip_from_be(cfg.node_addr_be).to_string(),
            local_pods: format!("{}/{}", ip_from_be(cfg.local_addr_be), cfg.local_prefix_len),
            snat_ports: format!("{}-{}", cfg.snat_port_min, cfg.snat_port_max),
            conntrack_admit_limit: cfg.ct_admit_limit,
        };
        let programs = program_names::PINNED
            .iter()
            .map(|name| {
                let info = ProgramInfo::from_pin(pin_dir.join("progs").join(name)).ok();
                ProgramView {
                    name,
                    id: info.as_ref().map(ProgramInfo::id),
                    loaded_unix_ms: info.and_then(|i| i.loaded_at()).map(|t| unix_ns(t) / 1_000_000),
                }
            })
            .collect::<Vec<_>>();
        let attachments = attachments(pin_dir, &programs)?;
        let Usage { maps, nat, counters } = Usage::read(pin_dir)?;
        Ok(StatusView {
            pin_dir: pin_dir.display().to_string(),
            agent,
            datapath,
            programs,
            attachments,
            maps,
            nat,
            counters,
        })
    }
}

/// How full the maps are, NAT port use and what the datapath counted: the part of `status`
/// that /metrics serves too.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Usage {
    pub maps: Vec<Occupancy>,
    pub nat: NatView,
    pub counters: Vec<CounterView>,
}

impl Usage {
    /// Reads the maps under `pin_dir` (conntrack through, for the NAT ports).
    pub fn read(pin_dir: &Path) -> Result<Usage> {
        let cfg: Config = single(pin_dir, map_names::CONFIG)?;
        let ct = map_data(pin_dir, map_names::CONNTRACK)?;
        let ct_capacity = ct.info().map_err(|source| Error::Map { name: map_names::CONNTRACK, source })?.max_entries();
        let ct_state: CtState = single(pin_dir, map_names::CT_STATE)?;
        // Streamed: a scrape must not copy a table of a million entries (80 MB).
        let mut nat = NatPorts::default();
        batch::for_each(&ct, |k: &CtKey, v: &CtValue| nat.add(k, v))
            .map_err(|source| Error::Io { path: pin_dir.join("maps").join(map_names::CONNTRACK), source })?;
        let mut maps = vec![Occupancy {
            map: map_names::CONNTRACK,
            entries: ct_state.entries,
            capacity: ct_capacity as u64,
            limit: Some(cfg.ct_admit_limit as u64),
        }];
        maps.push(occupancy::<ServiceKey, ServiceValue>(pin_dir, map_names::SERVICES, |_| true)?);
        maps.push(occupancy::<SlotKey, u32>(pin_dir, map_names::SLOTS, |_| true)?);
        maps.push(occupancy::<u32, Backend>(pin_dir, map_names::BACKENDS, |b| b.addr_be != 0)?);
        maps.push(occupancy::<AffinityKey, AffinityValue>(pin_dir, map_names::AFFINITY, |_| true)?);
        maps.push(occupancy::<FragKey, FragValue>(pin_dir, map_names::FRAGMENTS, |_| true)?);
        maps.push(occupancy::<u32, Bucket>(pin_dir, map_names::RATE_LIMIT, |_| true)?);
        maps.push(occupancy::<ServiceKey, FrontendMeta>(pin_dir, map_names::FRONTEND_META, |_| true)?);
        let name = map_names::SRC_RANGES;
        let trie: LpmTrie<MapData, SourceRange, u32> =
            open_map(pin_dir, name)?.try_into().map_err(|source| Error::Map { name, source })?;
        let range_count =
            trie.keys().collect::<Result<Vec<_>, _>>().map_err(|source| Error::Map { name, source })?.len();
        let range_capacity =
            map_data(pin_dir, name)?.info().map_err(|source| Error::Map { name, source })?.max_entries();
        maps.push(Occupancy {
            map: map_names::SRC_RANGES,
            entries: range_count as u64,
            capacity: range_capacity as u64,
            limit: None,
        });
        let counters = datapath::read_counters(pin_dir)?
            .into_iter()
            .enumerate()
            .map(|(i, (name, c))| CounterView {
                name,
                kind: counter_kind(i as u32),
                packets: c.packets,
                bytes: c.bytes,
            })
            .collect();
        Ok(Usage { maps, nat: nat.view(&cfg), counters })
    }
}

/// NAT ports in use per destination (address, port, protocol), counted entry by entry.
#[derive(Default)]
struct NatPorts(BTreeMap<(u32, u16, u8), u64>);

impl NatPorts {
    /// Each reply half with SNAT holds one NAT port toward its destination.
    fn add(&mut self, k: &CtKey, v: &CtValue) {
        if v.flags & ct_flags::REPLY != 0 && v.flags & ct_flags::SNAT != 0 {
            *self.0.entry((k.src_addr_be, k.src_port_be, k.proto)).or_default() += 1;
        }
    }

    fn view(&self, cfg: &Config) -> NatView {
        let per_destination = &self.0;
        let busiest = per_destination.iter().max_by_key(|(_, n)| **n);
        NatView {
            range: format!("{}-{}", cfg.snat_port_min, cfg.snat_port_max),
            ports: (cfg.snat_port_max as u32 + 1).saturating_sub(cfg.snat_port_min as u32),
            snat_flows: per_destination.values().sum(),
            busiest: busiest.map(|((addr, port, proto), _)| {
                format!("{}:{}/{}", ip_from_be(*addr), u16::from_be(*port), protocol_name(*proto))
            }),
            busiest_ports: busiest.map_or(0, |(_, n)| *n),
        }
    }
}

/// The links pinned under `links/`, each with the program it runs.
fn attachments(pin_dir: &Path, programs: &[ProgramView]) -> Result<Vec<Attachment>> {
    let dir = pin_dir.join("links");
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|source| Error::Io { path: dir.clone(), source })?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        let Some((kind, interface)) = name.split_once('-') else { continue };
        let (hook, program) = match kind {
            "xdp" => ("xdp", program_names::XDP_UPLINK),
            "tcup" => ("tc ingress", program_names::TC_UPLINK),
            "tc" => ("tc ingress", program_names::TC_POD),
            "tceg" => ("tc egress", program_names::TC_EGRESS),
            _ => continue,
        };
        let info = PinnedLink::from_pin(dir.join(&name)).ok().and_then(|l| FdLink::from(l).info().ok());
        let pinned_id = programs.iter().find(|p| p.name == program).and_then(|p| p.id);
        let program_id = info.as_ref().map(|i| i.program_id());
        out.push(Attachment {
            interface: interface.to_string(),
            hook,
            program,
            link_id: info.as_ref().map(|i| i.id()),
            program_id,
            current: program_id.is_some() && program_id == pinned_id,
            device_present: CString::new(interface)
                // SAFETY: a valid C string.
                .is_ok_and(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_a_kind_and_drops_are_drops() {
        for (index, label) in counters::ALL {
            let kind = counter_kind(index);
            assert_eq!(label.starts_with("drop_"), kind == "drop", "{label} is {kind}");
            assert_eq!(label.starts_with("pass_"), kind == "pass", "{label} is {kind}");
        }
        assert_eq!(counter_kind(counters::REFUSED_NO_BACKEND), "answer");
        assert_eq!(counter_kind(counters::XDP_TO_TC), "event", "counted again where tc handles the packet");
    }

    #[test]
    fn nat_use_is_counted_per_destination() {
        let cfg = Config { snat_port_min: 40000, snat_port_max: 40009, ..Default::default() };
        let reply = |backend: u8, port: u16| {
            let k = CtKey {
                src_addr_be: lb_common::user::addr_be(std::net::Ipv4Addr::new(10, 244, 2, backend)),
                dst_addr_be: 1,
                src_port_be: 8080u16.to_be(),
                dst_port_be: port.to_be(),
                proto: lb_common::IPPROTO_TCP,
                _pad: [0; 3],
            };
            (k, CtValue { flags: ct_flags::REPLY | ct_flags::SNAT, ..Default::default() })
        };
        let forward = (CtKey { proto: 6, ..reply(1, 1).0 }, CtValue { flags: ct_flags::SNAT, ..Default::default() });
        let flows = [reply(1, 40000), reply(1, 40001), reply(2, 40000), forward];
        let mut nat = NatPorts::default();
        for (k, v) in &flows {
            nat.add(k, v);
        }
        let nat = nat.view(&cfg);
        assert_eq!(
            serde_json::to_value(&nat).unwrap(),
            serde_json::json!({
                "range": "40000-40009", "ports": 10, "snat_flows": 3,
                "busiest": "10.244.2.1:8080/TCP", "busiest_ports": 2
            })
        );
    }
}
