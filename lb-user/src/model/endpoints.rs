//! Endpoints as kube-proxy's EndpointSliceCache reads them (pkg/proxy/endpointslicecache.go):
//! slices belong to the Service named by their `kubernetes.io/service-name` label; only
//! slices of the node's family (addressType IPv4) count; only `addresses[0]` of an endpoint
//! is used; unset `ready` and `serving` mean true and unset `terminating` false; an
//! address:port seen twice is one endpoint.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{EndpointAddress, Endpoints},
    discovery::v1::{Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice},
};
use kube::ResourceExt;

use super::{Ctx, ModelError, Protocol, ServiceRef, SERVICE_NAME_LABEL};
use crate::source::Objects;

/// One endpoint of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Its nodeName is this node's name.
    pub local: bool,
    /// Its hints; None when it has none. Endpoints are most of what the agent holds, so an
    /// endpoint without hints costs one pointer, and a slice's endpoints with the same
    /// hints share them.
    pub hints: Option<Arc<Hints>>,
}

/// An endpoint's topology hints, each list sorted and without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hints {
    /// `hints.forZones` names.
    pub zones: Vec<String>,
    /// `hints.forNodes` names (trafficDistribution PreferSameNode).
    pub nodes: Vec<String>,
}

impl Hints {
    pub(super) fn of(names: impl Iterator<Item = String>) -> Vec<String> {
        let mut names: Vec<String> = names.collect::<BTreeSet<_>>().into_iter().collect();
        names.shrink_to_fit();
        names
    }
}

impl Endpoint {
    /// Its `hints.forZones` names (sorted).
    pub fn zone_hints(&self) -> &[String] {
        self.hints.as_deref().map_or(&[], |h| &h.zones)
    }

    /// Its `hints.forNodes` names (sorted).
    pub fn node_hints(&self) -> &[String] {
        self.hints.as_deref().map_or(&[], |h| &h.nodes)
    }

    /// Which of two copies of one address:port is kept. kube-proxy lets a non-terminating
    /// copy replace a terminating one (an IP reused by a new pod while the old one
    /// terminates) and otherwise keeps whichever it saw last; here the rest of the order is
    /// fixed too (ready, serving, then every other field), so the outcome never depends on
    /// the order the slices arrived in.
    fn preference(&self) -> (bool, bool, bool, &Self) {
        (!self.terminating, self.ready, self.serving, self)
    }
}

/// An EndpointSlice, read once: its ports and its usable endpoints (port not yet set).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Slice {
    ports: Vec<SlicePort>,
    endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct SlicePort {
    name: String,
    protocol: String,
    /// None when the slice gives no usable port number (reported once, when read).
    port: Option<u16>,
}

/// The node each endpoint address of a slice runs on, as it names it: what per-backend
/// metrics are labelled with. Addresses without a nodeName are left out.
pub(super) fn slice_nodes(slice: &EndpointSlice) -> Vec<(Ipv4Addr, String)> {
    slice
        .endpoints
        .iter()
        .filter_map(|ep| {
            let addr = ep.addresses.first().and_then(|a| a.parse::<Ipv4Addr>().ok())?;
            Some((addr, ep.node_name.clone()?))
        })
        .collect()
}

/// The same for a legacy Endpoints object (ready and not ready addresses).
pub(super) fn legacy_nodes(ep: &Endpoints) -> Vec<(Ipv4Addr, String)> {
    ep.subsets
        .iter()
        .flatten()
        .flat_map(|s| s.addresses.iter().flatten().chain(s.not_ready_addresses.iter().flatten()))
        .filter_map(|a| Some((a.ip.parse::<Ipv4Addr>().ok()?, a.node_name.clone()?)))
        .collect()
}

/// The IPv4 slices of every Service, by Service. Legacy Endpoints are used, converted as the
/// EndpointSlice mirroring controller does, only for Services that have no EndpointSlice.
pub(super) fn slices_by_service(ctx: &mut Ctx, objects: &Objects) -> BTreeMap<ServiceRef, Vec<Slice>> {
    let key =
        |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| (meta.namespace.clone(), meta.name.clone());
    // In name order, so that errors come out in the same order whatever the input order.
    let mut slices: Vec<&EndpointSlice> = objects.slices.iter().collect();
    slices.sort_by_key(|s| key(&s.metadata));
    let mut legacy: Vec<&Endpoints> = objects.endpoints.iter().collect();
    legacy.sort_by_key(|e| key(&e.metadata));
    let mut by_service: BTreeMap<ServiceRef, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        match owner_of_slice(slice) {
            Ok(sref) => by_service.entry(sref).or_default().push(slice),
            Err(e) => ctx.errors.push(e),
        }
    }
    let mirrored: Vec<(ServiceRef, &Endpoints)> =
        legacy.into_iter().map(|ep| (legacy_ref(ep), ep)).filter(|(sref, _)| !by_service.contains_key(sref)).collect();
    let mut out: BTreeMap<ServiceRef, Vec<Slice>> = BTreeMap::new();
    for (sref, slices) in by_service {
        let read = service_slices(ctx, &sref, &slices, None);
        out.insert(sref, read);
    }
    for (sref, ep) in mirrored {
        let read = service_slices(ctx, &sref, &[], Some(ep));
        out.insert(sref, read);
    }
    out
}

/// The Service a legacy Endpoints object is for (its own namespace and name).
pub(super) fn legacy_ref(ep: &Endpoints) -> ServiceRef {
    ServiceRef { namespace: ep.namespace().as_deref().unwrap_or("default").into(), name: ep.name_any().into() }
}

/// The Service a slice belongs to, by its `kubernetes.io/service-name` label; without one,
/// the error saying so.
pub(super) fn owner_of_slice(slice: &EndpointSlice) -> Result<ServiceRef, ModelError> {
    let namespace = slice.namespace().unwrap_or_else(|| "default".into());
    match slice.labels().get(SERVICE_NAME_LABEL).filter(|n| !n.is_empty()) {
        Some(name) => Ok(ServiceRef { namespace: namespace.into(), name: name.as_str().into() }),
        None => Err(ModelError {
            object: format!("EndpointSlice {namespace}/{}", slice.name_any()),
            field: "metadata.labels".into(),
            problem: format!("no {SERVICE_NAME_LABEL} label, so it belongs to no Service"),
        }),
    }
}

/// One Service's slices, read: `labelled` (its slices, in name order), or when there are
/// none, its legacy Endpoints converted as the mirroring controller does.
pub(super) fn service_slices(
    ctx: &mut Ctx,
    sref: &ServiceRef,
    labelled: &[&EndpointSlice],
    legacy: Option<&Endpoints>,
) -> Vec<Slice> {
    if labelled.is_empty() {
        let Some(ep) = legacy else { return Vec::new() };
        let object = format!("Endpoints {sref}");
        return mirror(ep).iter().filter_map(|s| read_slice(ctx, &object, s)).collect();
    }
    labelled
        .iter()
        .filter_map(|s| {
            let object = format!("EndpointSlice {}/{}", sref.namespace, s.name_any());
            read_slice(ctx, &object, s)
        })
        .collect()
}

/// A legacy Endpoints object as EndpointSlices, one per subset, the way the EndpointSlice
/// mirroring controller writes them: `addresses` ready, `notReadyAddresses` not ready, no
/// other condition set.
fn mirror(ep: &Endpoints) -> Vec<EndpointSlice> {
    let mut out = Vec::new();
    for subset in ep.subsets.iter().flatten() {
        let ports = subset.ports.iter().flatten().map(|p| EndpointPort {
            name: p.name.clone(),
            port: Some(p.port),
            protocol: p.protocol.clone(),
            app_protocol: p.app_protocol.clone(),
        });
        let to_endpoint = |ready: bool| {
            move |a: &EndpointAddress| SliceEndpoint {
                addresses: vec![a.ip.clone()],
                conditions: Some(EndpointConditions { ready: Some(ready), ..Default::default() }),
                node_name: a.node_name.clone(),
                ..Default::default()
            }
        };
        let endpoints = subset
            .addresses
            .iter()
            .flatten()
            .map(to_endpoint(true))
            .chain(subset.not_ready_addresses.iter().flatten().map(to_endpoint(false)))
            .collect();
        out.push(EndpointSlice {
            address_type: "IPv4".into(),
            endpoints,
            metadata: ep.metadata.clone(),
            ports: Some(ports.collect()),
        });
    }
    out
}

/// Reads one slice; None for a slice of another address family. Bad fields are reported
/// once here, and only the endpoints or ports at fault are left out.
pub(super) fn read_slice(ctx: &mut Ctx, object: &str, slice: &EndpointSlice) -> Option<Slice> {
    if slice.address_type != "IPv4" {
        return None;
    }
    let mut out = Slice::default();
    let mut shared_hints: BTreeSet<Arc<Hints>> = BTreeSet::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let port = match p.port {
            Some(n) if (1..=65535).contains(&n) => Some(n as u16),
            other => {
                ctx.error(object, format!("ports[{i}].port"), format!("{other:?} is not a port in 1-65535"));
                None
            }
        };
        // The API server defaults a missing name to "" and a missing protocol to TCP.
        out.ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            port,
        });
    }
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let Some(first) = ep.addresses.first() else {
            ctx.error(object, format!("endpoints[{i}].addresses"), "empty");
            continue;
        };
        let Ok(addr) = first.parse::<Ipv4Addr>() else {
            ctx.error(object, format!("endpoints[{i}].addresses[0]"), format!("{first:?} is not an IPv4 address"));
            continue;
        };
        let c = ep.conditions.clone().unwrap_or_default();
        let hints = ep.hints.as_ref();
        let hints = Hints {
            zones: Hints::of(hints.and_then(|h| h.for_zones.as_ref()).into_iter().flatten().map(|z| z.name.clone())),
            nodes: Hints::of(hints.and_then(|h| h.for_nodes.as_ref()).into_iter().flatten().map(|n| n.name.clone())),
        };
        let hints = (hints != Hints::default()).then(|| match shared_hints.get(&hints) {
            Some(held) => held.clone(),
            None => {
                let hints = Arc::new(hints);
                shared_hints.insert(hints.clone());
                hints
            }
        });
        out.endpoints.push(Endpoint {
            addr,
            port: 0,
            ready: c.ready.unwrap_or(true),
            serving: c.serving.unwrap_or(true),
            terminating: c.terminating.unwrap_or(false),
            local: ep.node_name.as_deref() == Some(ctx.node.name.as_str()),
            hints,
        });
    }
    // The incremental model keeps slices as read: no room to spare.
    out.ports.shrink_to_fit();
    out.endpoints.shrink_to_fit();
    Some(out)
}

/// The endpoints of one Service port, sorted by address and port. Slice ports match by
/// (name, protocol), which also resolves named targetPorts.
pub(super) fn for_port(slices: &[Slice], port_name: &str, protocol: Protocol) -> Vec<Endpoint> {
    let mut by_addr: BTreeMap<(Ipv4Addr, u16), Endpoint> = BTreeMap::new();
    for slice in slices {
        for sp in slice.ports.iter().filter(|p| p.name == port_name && p.protocol == protocol.api_name()) {
            let Some(port) = sp.port else { continue };
            for e in &slice.endpoints {
                let new = Endpoint { port, ..e.clone() };
                match by_addr.get_mut(&(new.addr, port)) {
                    Some(old) if new.preference() > old.preference() => *old = new,
                    Some(_) => {}
                    None => {
                        by_addr.insert((new.addr, port), new);
                    }
                }
            }
        }
    }
    by_addr.into_values().collect()
}

/// Distinct IPs of this node's ready endpoints over every port of the slices: the count
/// kube-proxy's healthCheckNodePort server reports (EndpointsMap.LocalReadyEndpoints; a
/// terminating endpoint is not ready, so a node with only terminating ones fails the check).
pub(super) fn local_ready_ips(slices: &[Slice]) -> usize {
    slices
        .iter()
        .filter(|s| s.ports.iter().any(|p| p.port.is_some()))
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.local && e.ready)
        .map(|e| e.addr)
        .collect::<BTreeSet<_>>()
        .len()
}
