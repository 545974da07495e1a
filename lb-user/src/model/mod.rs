//! The model: a pure function from Kubernetes objects and facts about this node to the
//! frontends and backend sets this node's datapath must serve. No I/O, no BPF: the same
//! objects always give the same [`Desired`] state.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    str::FromStr,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Service, ServicePort},
    discovery::v1::{Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice},
};
use kube::ResourceExt;

use crate::source::Objects;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// kube-proxy's default sessionAffinity ClientIP timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

/// An IPv4 prefix such as `10.244.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix_len == 0 { 0 } else { u32::MAX << (32 - self.prefix_len as u32) };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr.trim().parse().map_err(|_| format!("{s:?} is not an IPv4 CIDR"))?;
        let prefix_len: u8 = len
            .trim()
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("{s:?} has an invalid prefix length"))?;
        Ok(Cidr { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Facts about the node the model computes for.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    pub zone: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub cluster_cidr: Cidr,
    /// Like kube-proxy's --nodeport-addresses: NodePorts open only on node addresses in
    /// these prefixes; empty means every node address.
    pub nodeport_addresses: Vec<Cidr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }
    fn api_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.api_name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendKind {
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIp
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The endpoint runs on this node.
    pub local: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ServiceRef,
    pub port_name: String,
    pub kind: FrontendKind,
    /// Sorted, without duplicates.
    pub backends: Vec<BackendAddr>,
    /// externalTrafficPolicy=Local on an external frontend: local backends only, no
    /// SNAT, and an empty set drops rather than refuses.
    pub external_local: bool,
    /// externalTrafficPolicy=Local only: the cluster set, for traffic from this node's own
    /// pods (kube-proxy's short-circuit); empty otherwise.
    pub short_circuit: Vec<BackendAddr>,
    /// An empty `backends` drops silently instead of refusing: a Local traffic policy with
    /// endpoints elsewhere (a load balancer's health check steers clients away).
    pub drop_when_empty: bool,
    /// Endpoints still in the slices but chosen by no set (terminating, not ready): their
    /// established flows carry on, only new flows avoid them. Sorted.
    pub retained: Vec<BackendAddr>,
    /// loadBalancerSourceRanges (LoadBalancer ingress frontends only); empty = any.
    pub source_ranges: Vec<Cidr>,
    /// sessionAffinity=ClientIP timeout.
    pub affinity_timeout_s: Option<u32>,
}

/// A healthCheckNodePort this node serves for an externalTrafficPolicy=Local Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceRef,
    pub node_port: u16,
    pub local_endpoints: usize,
}

/// An object the model could not use in full, with the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {problem}")]
pub struct ModelError {
    /// `Service ns/name` or `EndpointSlice ns/name`.
    pub object: String,
    pub field: String,
    pub problem: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    pub health_checks: Vec<HealthCheck>,
    pub errors: Vec<ModelError>,
}

/// One endpoint address:port of a Service port, with its conditions.
#[derive(Clone, Debug)]
struct Endpoint {
    addr: Ipv4Addr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<String>,
    /// `hints.forZones`, when the endpoint has hints.
    zone_hints: Option<Vec<String>>,
}

struct Ctx<'a> {
    node: &'a NodeInfo,
    opts: &'a Options,
    errors: Vec<ModelError>,
}

impl Ctx<'_> {
    fn error(&mut self, object: impl fmt::Display, field: impl Into<String>, problem: impl Into<String>) {
        self.errors.push(ModelError { object: object.to_string(), field: field.into(), problem: problem.into() });
    }
}

/// The desired state of this node's datapath.
pub fn desired_state(objects: &Objects, node: &NodeInfo, opts: &Options) -> Desired {
    let mut ctx = Ctx { node, opts, errors: Vec::new() };
    let slices = slices_by_service(objects);
    let mut services: Vec<&Service> = objects.services.iter().collect();
    services.sort_by_key(|s| service_ref(s));
    let mut desired = Desired::default();
    for svc in services {
        let sref = service_ref(svc);
        let svc_slices = slices.get(&sref).map(Vec::as_slice).unwrap_or(&[]);
        add_service(&mut ctx, svc, &sref, svc_slices, &mut desired);
    }
    desired.errors = ctx.errors;
    desired
}

fn service_ref(svc: &Service) -> ServiceRef {
    ServiceRef { namespace: svc.namespace().unwrap_or_else(|| "default".into()), name: svc.name_any() }
}

/// EndpointSlices grouped by the Service named in their label; legacy Endpoints are used,
/// converted, only for Services that have no EndpointSlice.
fn slices_by_service(objects: &Objects) -> BTreeMap<ServiceRef, Vec<EndpointSlice>> {
    let mut map: BTreeMap<ServiceRef, Vec<EndpointSlice>> = BTreeMap::new();
    for slice in &objects.slices {
        let Some(name) = slice.labels().get(SERVICE_NAME_LABEL) else {
            continue;
        };
        let sref = ServiceRef { namespace: slice.namespace().unwrap_or_else(|| "default".into()), name: name.clone() };
        map.entry(sref).or_default().push(slice.clone());
    }
    for ep in &objects.endpoints {
        let sref = ServiceRef { namespace: ep.namespace().unwrap_or_else(|| "default".into()), name: ep.name_any() };
        map.entry(sref).or_insert_with(|| endpoints_to_slices(ep));
    }
    map
}

/// A legacy Endpoints object as EndpointSlices: one per subset, addresses ready,
/// notReadyAddresses not ready.
fn endpoints_to_slices(ep: &Endpoints) -> Vec<EndpointSlice> {
    let mut out = Vec::new();
    for subset in ep.subsets.iter().flatten() {
        let ports = subset.ports.iter().flatten().map(|p| EndpointPort {
            name: p.name.clone(),
            port: Some(p.port),
            protocol: p.protocol.clone(),
            app_protocol: p.app_protocol.clone(),
        });
        let to_endpoint = |ready: bool| {
            move |a: &k8s_openapi::api::core::v1::EndpointAddress| SliceEndpoint {
                addresses: vec![a.ip.clone()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(ready),
                    terminating: Some(false),
                }),
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
        let mut meta = ep.metadata.clone();
        meta.name = Some(format!("{}-endpoints", ep.name_any()));
        out.push(EndpointSlice {
            address_type: "IPv4".into(),
            endpoints,
            metadata: meta,
            ports: Some(ports.collect()),
        });
    }
    out
}

fn add_service(ctx: &mut Ctx, svc: &Service, sref: &ServiceRef, slices: &[EndpointSlice], desired: &mut Desired) {
    let object = format!("Service {sref}");
    let labels = svc.labels();
    if labels.contains_key(SERVICE_PROXY_NAME_LABEL) || labels.contains_key(HEADLESS_LABEL) {
        return;
    }
    let Some(spec) = svc.spec.as_ref() else {
        return;
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" || spec.cluster_ip.as_deref() == Some("None") {
        return;
    }
    if !matches!(svc_type, "ClusterIP" | "NodePort" | "LoadBalancer") {
        ctx.error(&object, "spec.type", format!("unknown type {svc_type:?}"));
        return;
    }
    let external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            ctx.error(
                &object,
                "spec.externalTrafficPolicy",
                format!("{other:?} is not Cluster or Local; using Cluster"),
            );
            false
        }
    };
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            ctx.error(
                &object,
                "spec.internalTrafficPolicy",
                format!("{other:?} is not Cluster or Local; using Cluster"),
            );
            false
        }
    };
    let affinity_timeout_s = affinity(ctx, &object, spec);
    let cluster_ips = ipv4_list(
        ctx,
        &object,
        "spec.clusterIPs",
        spec.cluster_ips.clone().or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip])),
    );
    let external_ips = ipv4_list(ctx, &object, "spec.externalIPs", spec.external_ips.clone());
    let lb_ips = if svc_type == "LoadBalancer" { load_balancer_ips(ctx, &object, svc) } else { Vec::new() };
    let mut source_ranges = Vec::new();
    for (i, r) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
        // IPv6 ranges belong to the other family.
        if r.contains(':') {
            continue;
        }
        // A bad range is left out, which only narrows who is let in: fail closed.
        match r.parse::<Cidr>() {
            Ok(c) => source_ranges.push(c),
            Err(e) => ctx.error(&object, format!("spec.loadBalancerSourceRanges[{i}]"), e),
        }
    }
    let node_addresses: Vec<Ipv4Addr> = ctx
        .node
        .addresses
        .iter()
        .copied()
        .filter(|a| {
            ctx.opts.nodeport_addresses.is_empty() || ctx.opts.nodeport_addresses.iter().any(|c| c.contains(*a))
        })
        .collect();

    let mut local_ready = BTreeSet::new();
    for (i, sp) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let Some((protocol, port)) = port_of(ctx, &object, &field, sp) else {
            continue;
        };
        let port_name = sp.name.clone().unwrap_or_default();
        let endpoints = endpoints_for(ctx, slices, &port_name, protocol);
        local_ready.extend(endpoints.iter().filter(|e| e.ready && is_local(ctx, e)).map(|e| e.addr));
        let cluster_set = with_topology(ctx, select(&endpoints, |_| true))
            .into_iter()
            .map(|e| backend(ctx, e))
            .collect::<BTreeSet<_>>();
        let local_set =
            select(&endpoints, |e| is_local(ctx, e)).into_iter().map(|e| backend(ctx, e)).collect::<BTreeSet<_>>();
        let chosen: BTreeSet<BackendAddr> = cluster_set.union(&local_set).copied().collect();
        let retained: Vec<BackendAddr> =
            endpoints.iter().map(|e| backend(ctx, e)).filter(|b| !chosen.contains(b)).collect();
        let anywhere = endpoints.iter().any(|e| e.ready || e.serving && e.terminating);
        let mut add = |kind: FrontendKind, addr: Ipv4Addr, port: u16, field: &str, ctx: &mut Ctx| {
            let local = if kind.is_external() { external_local } else { internal_local };
            let backends: Vec<BackendAddr> = if local { &local_set } else { &cluster_set }.iter().copied().collect();
            let short_circuit =
                if kind.is_external() && external_local { cluster_set.iter().copied().collect() } else { Vec::new() };
            let frontend = Frontend {
                service: sref.clone(),
                port_name: port_name.clone(),
                kind,
                drop_when_empty: local && backends.is_empty() && anywhere,
                backends,
                short_circuit,
                retained: retained.clone(),
                external_local: kind.is_external() && external_local,
                source_ranges: if kind == FrontendKind::LoadBalancer { source_ranges.clone() } else { Vec::new() },
                affinity_timeout_s,
            };
            let key = FrontendKey { addr, port, protocol };
            match desired.frontends.get(&key) {
                Some(owner) if owner.service != *sref => {
                    ctx.error(&object, field, format!("frontend {key} already belongs to Service {}", owner.service))
                }
                Some(_) => ctx.error(&object, field, format!("frontend {key} is declared twice")),
                None => {
                    desired.frontends.insert(key, frontend);
                }
            }
        };
        for ip in &cluster_ips {
            add(FrontendKind::ClusterIp, *ip, port, &format!("{field}.port"), ctx);
        }
        for ip in &external_ips {
            add(FrontendKind::ExternalIp, *ip, port, "spec.externalIPs", ctx);
        }
        for ip in &lb_ips {
            add(FrontendKind::LoadBalancer, *ip, port, "status.loadBalancer.ingress", ctx);
        }
        if let Some(node_port) =
            node_port_of(ctx, &object, &field, svc_type, spec.allocate_load_balancer_node_ports, sp)
        {
            for addr in &node_addresses {
                add(FrontendKind::NodePort, *addr, node_port, &format!("{field}.nodePort"), ctx);
            }
        }
    }
    if external_local && svc_type == "LoadBalancer" {
        match spec.health_check_node_port {
            Some(p) if (1..=65535).contains(&p) => desired.health_checks.push(HealthCheck {
                service: sref.clone(),
                node_port: p as u16,
                local_endpoints: local_ready.len(),
            }),
            Some(p) => ctx.error(&object, "spec.healthCheckNodePort", format!("{p} is out of range 1-65535")),
            None => ctx.error(
                &object,
                "spec.healthCheckNodePort",
                "missing for externalTrafficPolicy=Local (the API server allocates it; manifests must give it)",
            ),
        }
    }
}

fn affinity(ctx: &mut Ctx, object: &str, spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Option<u32> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => Some(t as u32),
                Some(t) => {
                    ctx.error(
                        object,
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is out of range 1-{MAX_AFFINITY_TIMEOUT_S}; using {DEFAULT_AFFINITY_TIMEOUT_S}"),
                    );
                    Some(DEFAULT_AFFINITY_TIMEOUT_S)
                }
            }
        }
        Some(other) => {
            ctx.error(object, "spec.sessionAffinity", format!("{other:?} is not None or ClientIP; using None"));
            None
        }
    }
}

/// IPv4 addresses of a list field; IPv6 entries are the other family's and are skipped.
fn ipv4_list(ctx: &mut Ctx, object: &str, field: &str, list: Option<Vec<String>>) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for (i, s) in list.into_iter().flatten().enumerate() {
        if s.is_empty() || s == "None" || s.contains(':') {
            continue;
        }
        match s.parse() {
            Ok(ip) => out.push(ip),
            Err(_) => ctx.error(object, format!("{field}[{i}]"), format!("{s:?} is not an IP address")),
        }
    }
    out
}

fn load_balancer_ips(ctx: &mut Ctx, object: &str, svc: &Service) -> Vec<Ipv4Addr> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for (i, ing) in ingress.iter().enumerate() {
        // ipMode Proxy: the cloud LB proxies to the nodes itself, as kube-proxy assumes.
        if ing.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        if let Some(ip) = &ing.ip {
            out.extend(ipv4_list(ctx, object, &format!("status.loadBalancer.ingress[{i}].ip"), Some(vec![ip.clone()])));
        }
    }
    out
}

fn port_of(ctx: &mut Ctx, object: &str, field: &str, sp: &ServicePort) -> Option<(Protocol, u16)> {
    let protocol = match sp.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => {
            ctx.error(
                object,
                format!("{field}.protocol"),
                "SCTP is not supported by this datapath (the kernel lacks it); port skipped",
            );
            return None;
        }
        other => {
            ctx.error(object, format!("{field}.protocol"), format!("unknown protocol {other:?}; port skipped"));
            return None;
        }
    };
    if !(1..=65535).contains(&sp.port) {
        ctx.error(object, format!("{field}.port"), format!("{} is out of range 1-65535", sp.port));
        return None;
    }
    Some((protocol, sp.port as u16))
}

fn node_port_of(
    ctx: &mut Ctx,
    object: &str,
    field: &str,
    svc_type: &str,
    allocate: Option<bool>,
    sp: &ServicePort,
) -> Option<u16> {
    if svc_type == "ClusterIP" {
        return None;
    }
    match sp.node_port {
        Some(p) if (1..=65535).contains(&p) => Some(p as u16),
        Some(p) => {
            ctx.error(object, format!("{field}.nodePort"), format!("{p} is out of range 1-65535"));
            None
        }
        None if svc_type == "LoadBalancer" && allocate == Some(false) => None,
        None => {
            ctx.error(
                object,
                format!("{field}.nodePort"),
                "missing (the API server allocates it; manifests must give it)",
            );
            None
        }
    }
}

/// The endpoints of one Service port: slice ports match by (name, protocol), which also
/// resolves named targetPorts; the same address:port from several slices counts once.
fn endpoints_for(ctx: &mut Ctx, slices: &[EndpointSlice], port_name: &str, protocol: Protocol) -> Vec<Endpoint> {
    let mut by_addr: BTreeMap<(Ipv4Addr, u16), Endpoint> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let object = format!("EndpointSlice {}/{}", slice.namespace().unwrap_or_default(), slice.name_any());
        let Some((pi, sp)) = slice.ports.iter().flatten().enumerate().find(|(_, p)| {
            p.name.as_deref().unwrap_or("") == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol.api_name()
        }) else {
            continue;
        };
        let port = match sp.port {
            Some(p) if (1..=65535).contains(&p) => p as u16,
            other => {
                ctx.error(&object, format!("ports[{pi}].port"), format!("{other:?} is not a port in 1-65535"));
                continue;
            }
        };
        for (ei, ep) in slice.endpoints.iter().enumerate() {
            let c = ep.conditions.clone().unwrap_or_default();
            let ready = c.ready.unwrap_or(true);
            let serving = c.serving.unwrap_or(ready);
            let terminating = c.terminating.unwrap_or(false);
            let zone_hints = ep
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect());
            for (ai, a) in ep.addresses.iter().enumerate() {
                let Ok(addr) = a.parse::<Ipv4Addr>() else {
                    ctx.error(
                        &object,
                        format!("endpoints[{ei}].addresses[{ai}]"),
                        format!("{a:?} is not an IPv4 address"),
                    );
                    continue;
                };
                let new = Endpoint {
                    addr,
                    port,
                    ready,
                    serving,
                    terminating,
                    node: ep.node_name.clone(),
                    zone_hints: zone_hints.clone(),
                };
                by_addr
                    .entry((addr, port))
                    .and_modify(|old| {
                        // Seen in two slices (e.g. while a slice is being replaced): the
                        // better conditions win.
                        if new.ready && !old.ready || new.serving && !old.serving {
                            *old = new.clone();
                        }
                    })
                    .or_insert(new);
            }
        }
    }
    by_addr.into_values().collect()
}

fn is_local(ctx: &Ctx, e: &Endpoint) -> bool {
    e.node.as_deref() == Some(ctx.node.name.as_str())
}

fn backend(ctx: &Ctx, e: &Endpoint) -> BackendAddr {
    BackendAddr { addr: e.addr, port: e.port, local: is_local(ctx, e) }
}

/// Ready endpoints in scope; if there are none, the serving and terminating ones, so that
/// connections drain to pods shutting down rather than fail.
fn select(endpoints: &[Endpoint], in_scope: impl Fn(&Endpoint) -> bool) -> Vec<&Endpoint> {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| in_scope(e) && e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints.iter().filter(|e| in_scope(e) && e.serving && e.terminating).collect()
}

/// Topology-aware hints: used when every selected endpoint has hints and some hint names
/// this node's zone; otherwise all are kept (as kube-proxy does).
fn with_topology<'a>(ctx: &Ctx, set: Vec<&'a Endpoint>) -> Vec<&'a Endpoint> {
    let Some(zone) = ctx.node.zone.as_deref() else {
        return set;
    };
    if set.is_empty() || set.iter().any(|e| e.zone_hints.is_none()) {
        return set;
    }
    let in_zone: Vec<&Endpoint> =
        set.iter().copied().filter(|e| e.zone_hints.as_ref().is_some_and(|z| z.iter().any(|z| z == zone))).collect();
    if in_zone.is_empty() {
        set
    } else {
        in_zone
    }
}

#[cfg(test)]
mod tests;
