//! Drift: where the service maps differ from what the model wants. Compared by meaning
//! (addresses, flags, the order of a set's backends, names), never by ids or generations,
//! which are the reconciler's to choose. `lb-user services` shows it; the agent checks its own
//! maps with it and writes back what differs ([`Reconciler::repair`](super::Reconciler::repair)).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use ipnet::Ipv4Net;
use lb_common::{
    algorithm, backend_flags, service_flags,
    user::{addr_be, frontend_kind_name, ip_from_be, text_of},
    Backend, FrontendMeta, ServiceKey,
};
use serde::Serialize;

use super::{frontend_meta, owner_of, positions, range_of, service_key, service_value, MaglevSize, Range};
use crate::{
    datapath::maps::Contents,
    model::{BackendAddr, Desired, Frontend},
};

/// One difference between the model and the maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// The frontend, `ADDRESS:PORT/PROTOCOL`.
    pub frontend: String,
    /// What differs: `entry`, `flags`, `algorithm`, `affinity_timeout_s`, `scope`,
    /// `count[SET]`, `slots[SET]`, `backend`, `retained`, `source_ranges`, `filter`, `name`
    /// (SET 0 is the frontend's backends, 1 the short-circuit set).
    pub field: String,
    /// What the model wants there.
    pub want: String,
    /// What the maps hold.
    pub have: String,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: want {}, have {}", self.frontend, self.field, self.want, self.have)
    }
}

/// Every difference between `desired` (the model for this node, with the agent's Maglev
/// sizing) and what the service maps hold, frontend by frontend in address order, then the
/// frontends the maps hold that the model does not want.
pub fn drift(desired: &Desired, maps: &Contents, maglev: MaglevSize) -> Vec<Drift> {
    let mut out = Vec::new();
    let mut wanted = BTreeSet::new();
    // Looked up for every backend of every frontend: indexed once (the agent checks often).
    let mut entries = BTreeMap::new();
    for e in maps.backends.values() {
        entries.entry(identity(e)).or_insert(e);
    }
    for (fkey, f) in &desired.frontends {
        let key = service_key(fkey);
        wanted.insert(key);
        frontend_drift(key, f, maps, &entries, maglev, &mut out);
    }
    for (key, v) in maps.services.iter().filter(|(k, _)| !wanted.contains(*k)) {
        let named = maps.metas.get(key).map(|m| format!(", {}", describe_meta(m))).unwrap_or_default();
        out.push(Drift::new(key, "entry", "absent", format!("present (frontend id {}{named})", v.svc_id)));
    }
    out
}

impl Drift {
    fn new(key: &ServiceKey, field: impl Into<String>, want: impl Into<String>, have: impl Into<String>) -> Self {
        Drift { frontend: key.to_string(), field: field.into(), want: want.into(), have: have.into() }
    }
}

/// What names an endpoint of a Service port in LB_BACKENDS, whatever its generation and
/// `CHOSEN`: address, port, locality, owner.
type Identity = (u32, u16, bool, u64);

fn identity(e: &Backend) -> Identity {
    (e.addr_be, e.port(), e.flags & backend_flags::LOCAL != 0, e.owner)
}

fn frontend_drift(
    key: ServiceKey,
    f: &Frontend,
    maps: &Contents,
    entries: &BTreeMap<Identity, &Backend>,
    maglev: MaglevSize,
    out: &mut Vec<Drift>,
) {
    let mut push = |field: String, want: String, have: String| out.push(Drift::new(&key, field, want, have));
    let Some(v) = maps.services.get(&key) else {
        push("entry".into(), "present".into(), "missing: clients get no translation".into());
        return;
    };
    let owner = owner_of(f, key.proto);
    let sets: [Vec<BackendAddr>; 2] = [&f.backends, &f.short_circuit_backends]
        .map(|b| positions(b, f.algorithm, maglev).into_iter().map(|i| b[i]).collect());
    let want = service_value(v.svc_id, v.gen, [sets[0].len() as u16, sets[1].len() as u16], f, owner, key);
    if want.flags != v.flags {
        push("flags".into(), flag_names(want.flags), flag_names(v.flags));
    }
    if want.algorithm != v.algorithm {
        push("algorithm".into(), algorithm_name(want.algorithm), algorithm_name(v.algorithm));
    }
    if want.affinity_timeout_s != v.affinity_timeout_s {
        push("affinity_timeout_s".into(), want.affinity_timeout_s.to_string(), v.affinity_timeout_s.to_string());
    }
    if want.scope != v.scope {
        push("scope".into(), format!("{:#010x}", want.scope), format!("{:#010x}", v.scope));
    }
    for set in 0..2u8 {
        let s = set as usize;
        if want.count[s] != v.count[s] {
            push(format!("count[{set}]"), want.count[s].to_string(), v.count[s].to_string());
        }
        let held = maps.set_ids(v, set);
        let wrong: Vec<(usize, String)> = sets[s]
            .iter()
            .zip(&held)
            .enumerate()
            .filter(|(_, (b, id))| !id.and_then(|id| maps.backends.get(&id)).is_some_and(|e| same(e, b, owner)))
            .map(|(p, (_, id))| (p, describe_slot(maps, *id, owner)))
            .collect();
        if let Some((position, holds)) = wrong.first() {
            let compared = sets[s].len().min(held.len());
            push(
                format!("slots[{set}]"),
                describe_set(&sets[s]),
                format!("{} of {compared} positions differ; position {position} holds {holds}", wrong.len()),
            );
        }
    }
    let entry_of = |b: &BackendAddr| entries.get(&(addr_be(b.addr), b.port, b.local, owner)).copied();
    let chosen: BTreeSet<&BackendAddr> = sets.iter().flatten().collect();
    for b in chosen {
        if entry_of(b).is_some_and(|e| e.flags & backend_flags::CHOSEN == 0) {
            push(
                "backend".into(),
                format!("{}:{} chosen", b.addr, b.port),
                "not chosen: session affinity sends no new flow to it".into(),
            );
        }
    }
    for r in &f.retained {
        match entry_of(r) {
            None => push(
                "retained".into(),
                format!("{}:{} kept for its flows", r.addr, r.port),
                "no entry: its flows are cut".into(),
            ),
            Some(e) if e.flags & backend_flags::CHOSEN != 0 => push(
                "retained".into(),
                format!("{}:{} not chosen", r.addr, r.port),
                "chosen: session affinity may send new flows to it".into(),
            ),
            Some(_) => {}
        }
    }
    let want_ranges: BTreeSet<Range> = f.source_ranges.prefixes().iter().map(range_of).collect();
    let have_ranges = maps.ranges.get(&v.svc_id).cloned().unwrap_or_default();
    if want_ranges != have_ranges {
        push("source_ranges".into(), describe_ranges(&want_ranges), describe_ranges(&have_ranges));
    }
    if !maps.filter_has(&key) {
        push("filter".into(), "bit set".into(), "clear: its packets pass untranslated".into());
    }
    let want_meta = frontend_meta(f);
    match maps.metas.get(&key) {
        Some(m) if *m == want_meta => {}
        Some(m) => push("name".into(), describe_meta(&want_meta), describe_meta(m)),
        None => push("name".into(), describe_meta(&want_meta), "none".into()),
    }
}

/// The entry is this endpoint of this Service port (whatever its generation and `CHOSEN`).
fn same(e: &Backend, b: &BackendAddr, owner: u64) -> bool {
    identity(e) == (addr_be(b.addr), b.port, b.local, owner)
}

fn describe_slot(maps: &Contents, id: Option<u32>, owner: u64) -> String {
    let Some(id) = id else { return "no slot".into() };
    let Some(e) = maps.backends.get(&id) else { return format!("backend id {id}, a free entry") };
    let mut out = format!("{}:{} (id {id}", e.ip(), e.port());
    if e.flags & backend_flags::LOCAL != 0 {
        out.push_str(", local");
    }
    if e.owner != owner {
        out.push_str(", of another Service port");
    }
    out.push(')');
    out
}

fn describe_set(set: &[BackendAddr]) -> String {
    let distinct: BTreeSet<String> =
        set.iter().map(|b| format!("{}:{}{}", b.addr, b.port, if b.local { " (local)" } else { "" })).collect();
    let list: Vec<String> = distinct.into_iter().collect();
    if list.len() == set.len() {
        list.join(", ")
    } else {
        format!("{} positions over {}", set.len(), list.join(", "))
    }
}

fn describe_ranges(ranges: &BTreeSet<Range>) -> String {
    if ranges.is_empty() {
        return "none".into();
    }
    let cidrs: Vec<String> = ranges
        .iter()
        .map(|(addr, len)| {
            Ipv4Net::new(ip_from_be(*addr), *len)
                .map_or_else(|_| format!("{}/{len}", ip_from_be(*addr)), |n| n.to_string())
        })
        .collect();
    cidrs.join(", ")
}

/// `namespace/name port NAME (Kind)`, as LB_FE_META records it.
pub fn describe_meta(m: &FrontendMeta) -> String {
    let port = text_of(&m.port_name);
    let port = if port.is_empty() { String::new() } else { format!(" port {port}") };
    let kind = frontend_kind_name(m.kind).map(|k| format!(" ({k})")).unwrap_or_default();
    format!("{}/{}{port}{kind}", text_of(&m.namespace), text_of(&m.name))
}

/// Service flags by name, `none` for none.
pub fn flag_names(flags: u32) -> String {
    let names = [
        (service_flags::EXTERNAL, "external"),
        (service_flags::EXTERNAL_LOCAL, "external-local"),
        (service_flags::SOURCE_RANGES, "source-ranges"),
        (service_flags::DROP_WHEN_EMPTY, "drop-when-empty"),
    ];
    let mut set: Vec<String> = names.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| n.to_string()).collect();
    let known = names.iter().fold(0, |all, (bit, _)| all | bit);
    if flags & !known != 0 {
        set.push(format!("{:#x}", flags & !known));
    }
    if set.is_empty() {
        "none".into()
    } else {
        set.join(",")
    }
}

/// An algorithm number by its name (as the annotation spells it).
pub fn algorithm_name(a: u8) -> String {
    match a {
        algorithm::RANDOM => "random".into(),
        algorithm::ROUND_ROBIN => "round-robin".into(),
        algorithm::MAGLEV => "maglev".into(),
        algorithm::SOURCE_HASH => "source-hash".into(),
        algorithm::LEAST_CONN => "least-conn".into(),
        other => format!("unknown ({other})"),
    }
}
