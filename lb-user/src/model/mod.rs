//! The model: a pure function from Kubernetes objects and facts about this node to the
//! frontends and backend sets this node's datapath must serve. No I/O, no BPF: the same
//! objects always give the same [`Desired`] state. The Service contract is kube-proxy's;
//! where this model departs from it, a comment says so and why.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::ResourceExt;

use crate::source::Objects;

pub mod conntrack;
mod endpoints;
mod incremental;
pub mod node;
pub mod topology;

pub use conntrack::{flow_cleanups, FlowCleanup};
pub use endpoints::Endpoint;
pub use incremental::{EndpointNodes, Incremental, Update};
pub use node::{LocalDetect, NodeFlags, NodeInfo};
pub use topology::{categorize_endpoints, Categorized, ServicePortInfo};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// kube-proxy's default sessionAffinity ClientIP timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

/// The annotation that chooses a Service's backend selection algorithm.
pub const ALGORITHM_ANNOTATION: &str = "lb.kube-xdp.io/algorithm";

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Like kube-proxy's --nodeport-addresses: NodePorts open only on node addresses in
    /// these prefixes; empty means every node address.
    pub nodeport_addresses: Vec<Ipv4Net>,
    /// For Services without the algorithm annotation.
    pub default_algorithm: Algorithm,
    /// NodePorts also on 127.0.0.1, for the node's own processes, as kube-proxy's
    /// iptables mode opens them (route_localnet) when `nodeport_addresses` is empty or
    /// covers 127.0.0.1. Only the socket hooks serve them, so only with socket-level load
    /// balancing on.
    pub localhost_node_ports: bool,
}

/// How a new flow chooses its backend (established flows follow conntrack).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    /// At random, as kube-proxy's iptables and nftables modes.
    #[default]
    Random,
    /// IPVS `rr`: in turn, from a cursor all CPUs share.
    RoundRobin,
    /// Consistent hashing over the client's address and port (the same backend from every
    /// node; removing one of N backends moves about 1/N of the clients).
    Maglev,
    /// IPVS `sh`: Maglev over the client's address only.
    SourceHash,
    /// IPVS `lc`: the fewest open flows on this node, ties at random. With equal weights
    /// IPVS's `sed` and `nq` choose the same way and are accepted as its names.
    LeastConn,
}

impl Algorithm {
    /// The annotation's and the option's value (or an IPVS scheduler's name).
    pub fn parse(s: &str) -> Result<Algorithm, String> {
        Ok(match s {
            "random" => Algorithm::Random,
            "round-robin" | "rr" => Algorithm::RoundRobin,
            "maglev" => Algorithm::Maglev,
            "source-hash" | "sh" => Algorithm::SourceHash,
            "least-conn" | "lc" | "sed" | "nq" => Algorithm::LeastConn,
            "dh" => {
                return Err("\"dh\" (destination hashing) would send every client of a Service to one backend; \
                            use maglev or source-hash"
                    .into())
            }
            other => {
                return Err(format!(
                    "{other:?} is not random, round-robin (rr), maglev, source-hash (sh) or least-conn (lc, sed, nq)"
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::RoundRobin => "round-robin",
            Algorithm::Maglev => "maglev",
            Algorithm::SourceHash => "source-hash",
            Algorithm::LeastConn => "least-conn",
        }
    }

    /// Its slots are a Maglev table rather than a list of the backends.
    pub fn uses_maglev_table(self) -> bool {
        matches!(self, Algorithm::Maglev | Algorithm::SourceHash)
    }
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

/// A Service's namespace and name. Shared text: the model keeps each Service's name in
/// several indexes and in each of its frontends, so a copy costs only a count.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
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

impl From<&Endpoint> for BackendAddr {
    fn from(e: &Endpoint) -> Self {
        BackendAddr { addr: e.addr, port: e.port, local: e.local }
    }
}

/// What a packet for a frontend meets when the backend set it would use is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenEmpty {
    /// The Service has no usable endpoint anywhere (none ready, none serving and
    /// terminating): refuse (TCP RST, ICMP port unreachable), so clients fail at once
    /// instead of timing out. kube-proxy REJECTs, before any source-range filter.
    Refuse,
    /// The Service has usable endpoints, only none for this frontend's policy on this node
    /// (internalTrafficPolicy Local on the ClusterIP, externalTrafficPolicy Local on an
    /// external frontend): drop silently, as kube-proxy does; a load balancer's health
    /// check, not a refusal, is what steers clients away from this node.
    Drop,
}

/// Which sources may use a frontend (loadBalancerSourceRanges, on LoadBalancer ingress
/// frontends only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceRanges {
    /// Any source: no ranges are set, or this is not a LoadBalancer ingress frontend.
    Any,
    /// Only sources in these prefixes (never empty); others are dropped.
    Only(Vec<Ipv4Net>),
    /// Ranges are set but none is a usable IPv4 range: every source is dropped. kube-proxy
    /// would leave the Service open to all; this model fails closed.
    Closed,
}

impl SourceRanges {
    /// Sources are filtered (Only or Closed).
    pub fn restricts(&self) -> bool {
        *self != SourceRanges::Any
    }

    /// The prefixes let in (none for Any and Closed).
    pub fn prefixes(&self) -> &[Ipv4Net] {
        match self {
            SourceRanges::Only(p) => p,
            SourceRanges::Any | SourceRanges::Closed => &[],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ServiceRef,
    pub port_name: String,
    pub kind: FrontendKind,
    /// The backends for this frontend's traffic policy, sorted, without duplicates: the
    /// cluster set, or the local set for the ClusterIP under internalTrafficPolicy Local
    /// and for external frontends under externalTrafficPolicy Local (then: for sources
    /// outside this node; see `short_circuit_backends`).
    pub backends: Vec<BackendAddr>,
    /// The cluster set, for external frontends under externalTrafficPolicy Local (empty on
    /// every other frontend): traffic to them from this node's pods or from the node itself
    /// goes here rather than to `backends`, as kube-proxy short-circuits it; it never left
    /// the cluster, so the policy that keeps outside clients' addresses does not apply.
    pub short_circuit_backends: Vec<BackendAddr>,
    /// What an empty `backends` means: refuse or drop.
    pub when_empty: WhenEmpty,
    /// externalTrafficPolicy Local on an external frontend: no SNAT, the client address is kept.
    pub external_local: bool,
    pub source_ranges: SourceRanges,
    /// sessionAffinity=ClientIP timeout.
    pub affinity_timeout_s: Option<u32>,
    /// On UDP frontends, every serving endpoint of this Service port, whatever the
    /// policies and topology chose, sorted: what UDP conntrack cleanup compares
    /// ([`flow_cleanups`]). Empty on others: their flows need no cleanup, and the agent keeps
    /// every frontend of every Service.
    pub serving: Vec<SocketAddrV4>,
    pub algorithm: Algorithm,
    /// Endpoints still in the slices that no set chose (terminating, not ready), sorted:
    /// their established flows carry on, only new flows avoid them. An endpoint gone from
    /// the slices is gone for its flows too.
    pub retained: Vec<BackendAddr>,
}

/// Service ports with a Local traffic policy and endpoints, none of them on this node for
/// that policy: traffic by that policy is dropped here. kube-proxy's
/// `sync_proxy_rules_no_local_endpoints_total`, by its `traffic_policy` label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    /// internalTrafficPolicy Local: the ClusterIP.
    pub internal: usize,
    /// externalTrafficPolicy Local: the NodePorts, LoadBalancer and external IPs.
    pub external: usize,
}

impl Desired {
    /// The Service ports whose Local policy leaves them no endpoint on this node (each
    /// counted once, however many frontends it has).
    pub fn no_local_endpoints(&self) -> NoLocalEndpoints {
        let mut internal = BTreeSet::new();
        let mut external = BTreeSet::new();
        for f in self.frontends.values() {
            if !f.backends.is_empty() || f.when_empty != WhenEmpty::Drop {
                continue;
            }
            let port = (&f.service, f.port_name.as_str());
            if f.external_local {
                external.insert(port);
            } else if f.kind == FrontendKind::ClusterIp {
                internal.insert(port);
            }
        }
        NoLocalEndpoints { internal: internal.len(), external: external.len() }
    }
}

/// A healthCheckNodePort this node serves for an externalTrafficPolicy=Local Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceRef,
    pub node_port: u16,
    /// Distinct IPs of this node's ready endpoints, over all the Service's ports.
    pub local_endpoints: usize,
}

/// An object the model could not use in full, with the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {problem}")]
pub struct ModelError {
    /// `Service ns/name`, `EndpointSlice ns/name` or `Node name`.
    pub object: String,
    pub field: String,
    pub problem: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Shared with the claims they were settled from (frontends are most of what the model
    /// holds).
    pub frontends: BTreeMap<FrontendKey, Arc<Frontend>>,
    pub health_checks: Vec<HealthCheck>,
    pub errors: Vec<ModelError>,
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

/// A frontend some Service port wants, before conflicts are settled.
struct Claim {
    key: FrontendKey,
    frontend: Arc<Frontend>,
    field: String,
    created: Option<Time>,
}

/// The desired state of this node's datapath, starting from nothing.
pub fn desired_state(objects: &Objects, node: &NodeInfo, opts: &Options) -> Desired {
    desired_state_after(&Desired::default(), objects, node, opts)
}

/// The desired state that follows `previous`: where two Services claim one frontend, the
/// one `previous` gave it to keeps it, so a newcomer never takes a frontend that is serving.
pub fn desired_state_after(previous: &Desired, objects: &Objects, node: &NodeInfo, opts: &Options) -> Desired {
    let mut ctx = Ctx { node, opts, errors: Vec::new() };
    let slices = endpoints::slices_by_service(&mut ctx, objects);
    let mut services: Vec<(ServiceRef, &Service)> = objects.services.iter().map(|s| (service_ref(s), s)).collect();
    services.sort_by(|a, b| a.0.cmp(&b.0));
    let mut desired = Desired::default();
    let mut claims = Vec::new();
    for (sref, svc) in services {
        let svc_slices = slices.get(&sref).map(Vec::as_slice).unwrap_or(&[]);
        add_service(&mut ctx, svc, &sref, svc_slices, &mut claims, &mut desired.health_checks);
    }
    settle_claims(&mut ctx, previous, claims, &mut desired);
    desired.errors = ctx.errors;
    desired
}

fn service_ref(svc: &Service) -> ServiceRef {
    ServiceRef { namespace: svc.namespace().as_deref().unwrap_or("default").into(), name: svc.name_any().into() }
}

/// One owner per frontend. The API server keeps NodePorts and IPs unique; manifests do not,
/// so: the owner in `previous` keeps it, else the Service created first
/// (metadata.creationTimestamp; one without comes after those with), then namespace/name.
/// Every other claimant is told who owns it.
fn settle_claims(ctx: &mut Ctx, previous: &Desired, claims: Vec<Claim>, desired: &mut Desired) {
    let mut by_key: BTreeMap<FrontendKey, Vec<&Claim>> = BTreeMap::new();
    for c in &claims {
        by_key.entry(c.key).or_default().push(c);
    }
    for (key, claims) in by_key {
        let incumbent = previous.frontends.get(&key).map(|f| &f.service);
        if let Some(winner) = settle_key(&mut ctx.errors, key, incumbent, claims) {
            desired.frontends.insert(key, winner.frontend.clone());
        }
    }
}

/// The claim that gets frontend `key` among `claims` (in Service order, each Service's in
/// the order it declares them), as [`settle_claims`] rules; the others' errors go to `errors`.
fn settle_key<'c>(
    errors: &mut Vec<ModelError>,
    key: FrontendKey,
    incumbent: Option<&ServiceRef>,
    mut claims: Vec<&'c Claim>,
) -> Option<&'c Claim> {
    // Stable: a Service's own claims stay in the order it declares them.
    claims.sort_by(|a, b| {
        let rank = |c: &Claim| (incumbent != Some(&c.frontend.service), c.created.is_none(), c.created.clone());
        rank(a).cmp(&rank(b)).then_with(|| a.frontend.service.cmp(&b.frontend.service))
    });
    let mut claims = claims.into_iter();
    let winner = claims.next()?;
    for loser in claims {
        let problem = if loser.frontend.service == winner.frontend.service {
            format!("frontend {key} is declared twice")
        } else {
            format!("frontend {key} already belongs to Service {}", winner.frontend.service)
        };
        errors.push(ModelError {
            object: format!("Service {}", loser.frontend.service),
            field: loser.field.clone(),
            problem,
        });
    }
    Some(winner)
}

/// Everything a Service's ports share.
#[derive(Clone, Debug, PartialEq)]
struct ServiceFacts {
    object: String,
    internal_local: bool,
    external_local: bool,
    cluster_ip: Ipv4Addr,
    external_ips: Vec<(usize, Ipv4Addr)>,
    lb_ips: Vec<(usize, Ipv4Addr)>,
    /// As given: without the LoadBalancer IPs a range holding the node's address adds
    /// ([`node_source_ranges`]).
    source_ranges: SourceRanges,
    affinity_timeout_s: Option<u32>,
    algorithm: Algorithm,
}

/// One usable port of a Service.
#[derive(Clone, Debug, PartialEq)]
struct PortFacts {
    /// Its index in spec.ports.
    index: usize,
    name: String,
    protocol: Protocol,
    port: u16,
    node_port: Option<u16>,
}

/// A Service's facts, its usable ports and its creation time.
type Facts = (ServiceFacts, Vec<PortFacts>, Option<Time>);

/// What the model reads from a Service, read once: everything that depends on neither its
/// endpoints nor this node's facts, and the errors reading it gave.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ServiceDigest {
    // Boxed: the index keeps a digest per Service in a B-tree, whose nodes hold room for
    // eleven; a pointer there rather than the facts leaves less room empty.
    facts: Option<Box<Facts>>,
    /// A healthCheckNodePort to serve (LoadBalancer, externalTrafficPolicy Local).
    health_check_node_port: Option<u16>,
    errors: Vec<ModelError>,
}

/// Reads a Service as the model uses it. `ctx.node` is not read.
fn digest_service(ctx: &mut Ctx, svc: &Service, sref: &ServiceRef) -> ServiceDigest {
    let before = ctx.errors.len();
    let (facts, health_check_node_port) = match read_service(ctx, svc, sref) {
        Some((facts, ports, created, check)) => (Some(Box::new((facts, ports, created))), check),
        None => (None, None),
    };
    ServiceDigest { facts, health_check_node_port, errors: ctx.errors.split_off(before) }
}

type ReadService = (ServiceFacts, Vec<PortFacts>, Option<Time>, Option<u16>);

fn read_service(ctx: &mut Ctx, svc: &Service, sref: &ServiceRef) -> Option<ReadService> {
    let object = format!("Service {sref}");
    let labels = svc.labels();
    if labels.contains_key(SERVICE_PROXY_NAME_LABEL) || labels.contains_key(HEADLESS_LABEL) {
        return None;
    }
    let Some(spec) = svc.spec.as_ref() else {
        ctx.error(&object, "spec", "missing");
        return None;
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return None;
    }
    if !matches!(svc_type, "ClusterIP" | "NodePort" | "LoadBalancer") {
        ctx.error(&object, "spec.type", format!("unknown type {svc_type:?}"));
        return None;
    }
    // Headless, or no ClusterIP of this node's family: kube-proxy serves nothing of it,
    // NodePorts included.
    let cluster_ip = cluster_ip(ctx, &object, spec)?;
    let external_ips = ipv4_list(ctx, &object, "spec.externalIPs", spec.external_ips.as_deref().unwrap_or_default());
    let lb_ips = if svc_type == "LoadBalancer" { load_balancer_ips(ctx, &object, svc) } else { Vec::new() };
    // kube-proxy's ExternalPolicyLocal: only a Service that traffic can reach from outside
    // (by its type, or its externalIPs) has an external policy.
    let externally_accessible_kind =
        svc_type != "ClusterIP" || !spec.external_ips.as_deref().unwrap_or_default().is_empty();
    let external_local = policy(ctx, &object, "spec.externalTrafficPolicy", spec.external_traffic_policy.as_deref())
        && externally_accessible_kind;
    let facts = ServiceFacts {
        internal_local: policy(ctx, &object, "spec.internalTrafficPolicy", spec.internal_traffic_policy.as_deref()),
        external_local,
        cluster_ip,
        source_ranges: source_ranges(ctx, &object, spec),
        external_ips,
        lb_ips,
        affinity_timeout_s: affinity(ctx, &object, spec),
        algorithm: algorithm(ctx, &object, svc),
        object,
    };
    let mut ports = Vec::new();
    for (index, sp) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{index}]");
        let Some((protocol, port)) = port_of(ctx, &facts.object, &field, sp) else {
            continue;
        };
        let node_port = node_port_of(ctx, &facts.object, &field, svc_type, spec.allocate_load_balancer_node_ports, sp);
        ports.push(PortFacts { index, name: sp.name.clone().unwrap_or_default(), protocol, port, node_port });
    }
    // Kept for the Service's life: no room to spare.
    ports.shrink_to_fit();
    // kube-proxy's NeedsHealthCheck: LoadBalancer Services with external policy Local.
    let mut check = None;
    if svc_type == "LoadBalancer" && facts.external_local {
        match spec.health_check_node_port {
            Some(p) if (1..=65535).contains(&p) => check = Some(p as u16),
            Some(p) => ctx.error(&facts.object, "spec.healthCheckNodePort", format!("{p} is out of range 1-65535")),
            None => ctx.error(
                &facts.object,
                "spec.healthCheckNodePort",
                "missing for externalTrafficPolicy=Local (the API server allocates it; manifests must give it)",
            ),
        }
    }
    Some((facts, ports, svc.metadata.creation_timestamp.clone(), check))
}

fn add_service(
    ctx: &mut Ctx,
    svc: &Service,
    sref: &ServiceRef,
    slices: &[endpoints::Slice],
    claims: &mut Vec<Claim>,
    health_checks: &mut Vec<HealthCheck>,
) {
    let digest = digest_service(ctx, svc, sref);
    add_digest(ctx, &digest, sref, slices, claims, health_checks);
}

/// A read Service's claims and health check, with its endpoints and this node's facts;
/// its reading errors go to `ctx` too.
fn add_digest(
    ctx: &mut Ctx,
    digest: &ServiceDigest,
    sref: &ServiceRef,
    slices: &[endpoints::Slice],
    claims: &mut Vec<Claim>,
    health_checks: &mut Vec<HealthCheck>,
) {
    ctx.errors.extend(digest.errors.iter().cloned());
    let Some((facts, ports, created)) = digest.facts.as_deref() else { return };
    let facts =
        ServiceFacts { source_ranges: node_source_ranges(ctx, &facts.source_ranges, &facts.lb_ips), ..facts.clone() };
    for port in ports {
        add_port(ctx, &facts, sref, slices, port, created, claims);
    }
    if let Some(node_port) = digest.health_check_node_port {
        health_checks.push(HealthCheck {
            service: sref.clone(),
            node_port,
            local_endpoints: endpoints::local_ready_ips(slices),
        });
    }
}

fn add_port(
    ctx: &mut Ctx,
    facts: &ServiceFacts,
    sref: &ServiceRef,
    slices: &[endpoints::Slice],
    port: &PortFacts,
    created: &Option<Time>,
    claims: &mut Vec<Claim>,
) {
    let field = format!("spec.ports[{}]", port.index);
    let PortFacts { protocol, node_port, .. } = *port;
    let port_name = port.name.clone();
    let port = port.port;
    let endpoints = endpoints::for_port(slices, &port_name, protocol);
    let info = ServicePortInfo {
        internal_policy_local: facts.internal_local,
        external_policy_local: facts.external_local,
        externally_accessible: node_port.is_some() || !facts.lb_ips.is_empty() || !facts.external_ips.is_empty(),
    };
    let sets = categorize_endpoints(&endpoints, &info, ctx.node);
    let to_backends = |set: &Option<Vec<&Endpoint>>| -> Vec<BackendAddr> {
        set.iter().flatten().map(|e| BackendAddr::from(*e)).collect::<BTreeSet<_>>().into_iter().collect()
    };
    let (cluster, local) = (to_backends(&sets.cluster), to_backends(&sets.local));
    let serving: Vec<SocketAddrV4> = match protocol {
        Protocol::Udp => endpoints.iter().filter(|e| e.serving).map(|e| SocketAddrV4::new(e.addr, e.port)).collect(),
        _ => Vec::new(),
    };
    let when_empty = if sets.has_any { WhenEmpty::Drop } else { WhenEmpty::Refuse };
    let chosen: BTreeSet<BackendAddr> = cluster.iter().chain(local.iter()).copied().collect();
    let retained: Vec<BackendAddr> = endpoints
        .iter()
        .map(BackendAddr::from)
        .filter(|b| !chosen.contains(b))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut claim = |kind: FrontendKind, addr: Ipv4Addr, port: u16, field: String| {
        let external = kind.is_external();
        let local_policy = if external { facts.external_local } else { facts.internal_local };
        let frontend = Frontend {
            service: sref.clone(),
            port_name: port_name.clone(),
            kind,
            backends: if local_policy { local.clone() } else { cluster.clone() },
            short_circuit_backends: if external && facts.external_local { cluster.clone() } else { Vec::new() },
            when_empty,
            external_local: external && facts.external_local,
            source_ranges: if kind == FrontendKind::LoadBalancer {
                facts.source_ranges.clone()
            } else {
                SourceRanges::Any
            },
            affinity_timeout_s: facts.affinity_timeout_s,
            serving: serving.clone(),
            algorithm: facts.algorithm,
            retained: retained.clone(),
        };
        claims.push(Claim {
            key: FrontendKey { addr, port, protocol },
            frontend: Arc::new(frontend),
            field,
            created: created.clone(),
        });
    };
    claim(FrontendKind::ClusterIp, facts.cluster_ip, port, format!("{field}.port"));
    for (j, ip) in &facts.external_ips {
        claim(FrontendKind::ExternalIp, *ip, port, format!("spec.externalIPs[{j}]"));
    }
    for (j, ip) in &facts.lb_ips {
        claim(FrontendKind::LoadBalancer, *ip, port, format!("status.loadBalancer.ingress[{j}].ip"));
    }
    if let Some(node_port) = node_port {
        let addresses: BTreeSet<Ipv4Addr> = ctx
            .node
            .addresses
            .iter()
            .copied()
            .filter(|a| {
                ctx.opts.nodeport_addresses.is_empty() || ctx.opts.nodeport_addresses.iter().any(|c| c.contains(a))
            })
            .collect();
        for addr in addresses {
            claim(FrontendKind::NodePort, addr, node_port, format!("{field}.nodePort"));
        }
        let loopback = Ipv4Addr::LOCALHOST;
        if ctx.opts.localhost_node_ports
            && (ctx.opts.nodeport_addresses.is_empty()
                || ctx.opts.nodeport_addresses.iter().any(|c| c.contains(&loopback)))
        {
            claim(FrontendKind::NodePort, loopback, node_port, format!("{field}.nodePort"));
        }
    }
}

/// The Service's ClusterIP of this node's family (IPv4), as kube-proxy's
/// GetClusterIPByFamily picks it; None (with an error when the field is bad) when there is none.
fn cluster_ip(ctx: &mut Ctx, object: &str, spec: &ServiceSpec) -> Option<Ipv4Addr> {
    let headless = |ip: &str| ip == "None";
    if spec.cluster_ip.as_deref().is_some_and(headless) || spec.cluster_ips.iter().flatten().any(|ip| headless(ip)) {
        return None;
    }
    let (field, ips) = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ("spec.clusterIPs", ips.clone()),
        (_, Some(ip)) if !ip.is_empty() => ("spec.clusterIP", vec![ip.clone()]),
        _ => {
            ctx.error(object, "spec.clusterIP", "missing (the API server allocates it; manifests must give it)");
            return None;
        }
    };
    let field = |i: usize| if field == "spec.clusterIP" { field.to_string() } else { format!("{field}[{i}]") };
    for (i, ip) in ips.iter().enumerate() {
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => return Some(v4),
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => ctx.error(object, field(i), format!("{ip:?} is not an IP address")),
        }
    }
    None
}

fn policy(ctx: &mut Ctx, object: &str, field: &str, value: Option<&str>) -> bool {
    match value {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            ctx.error(object, field, format!("{other:?} is not Cluster or Local; using Cluster"));
            false
        }
    }
}

/// The annotation's algorithm; a bad value is reported and the node's default used.
fn algorithm(ctx: &mut Ctx, object: &str, svc: &Service) -> Algorithm {
    let Some(value) = svc.metadata.annotations.as_ref().and_then(|a| a.get(ALGORITHM_ANNOTATION)) else {
        return ctx.opts.default_algorithm;
    };
    Algorithm::parse(value).unwrap_or_else(|problem| {
        let default = ctx.opts.default_algorithm.name();
        ctx.error(
            object,
            format!("metadata.annotations[{ALGORITHM_ANNOTATION}]"),
            format!("{problem}; using {default}"),
        );
        ctx.opts.default_algorithm
    })
}

fn affinity(ctx: &mut Ctx, object: &str, spec: &ServiceSpec) -> Option<u32> {
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

/// loadBalancerSourceRanges for the LoadBalancer ingress frontends. Like kube-proxy's
/// proxiers (iptables/proxier.go, the firewall chain's "allowFromNode"): when a range holds
/// the node's primary address, the LoadBalancer IPs themselves are let in too, because a
/// request from the node to its LB IP loops back with that IP as its source. Unlike
/// kube-proxy, ranges that leave no usable IPv4 range close the frontends rather than open them.
fn source_ranges(ctx: &mut Ctx, object: &str, spec: &ServiceSpec) -> SourceRanges {
    let given = spec.load_balancer_source_ranges.as_deref().unwrap_or_default();
    if given.is_empty() {
        return SourceRanges::Any;
    }
    let mut prefixes = Vec::new();
    let mut bad = Vec::new();
    for (i, r) in given.iter().enumerate() {
        // The API's validation lets whitespace around a range through; kube-proxy trims it.
        match r.trim().parse::<IpNet>() {
            Ok(IpNet::V4(net)) => prefixes.push(net.trunc()),
            // The other family's ranges filter the other family's LoadBalancer IPs.
            Ok(IpNet::V6(_)) => {}
            Err(_) => bad.push((i, r)),
        }
    }
    let closed = prefixes.is_empty();
    for (i, r) in bad {
        let consequence = if closed {
            "no valid IPv4 range is left, so the LoadBalancer IPs admit no one"
        } else {
            "left out, which only narrows who is let in"
        };
        ctx.error(object, format!("spec.loadBalancerSourceRanges[{i}]"), format!("{r:?} is not a CIDR; {consequence}"));
    }
    if closed {
        return SourceRanges::Closed;
    }
    prefixes.sort();
    prefixes.dedup();
    SourceRanges::Only(prefixes)
}

/// The ranges as this node applies them: with the LoadBalancer IPs when a range holds the
/// node's primary address (see [`source_ranges`]).
fn node_source_ranges(ctx: &Ctx, given: &SourceRanges, lb_ips: &[(usize, Ipv4Addr)]) -> SourceRanges {
    match given {
        SourceRanges::Only(prefixes)
            if ctx.node.addresses.first().is_some_and(|node| prefixes.iter().any(|p| p.contains(node))) =>
        {
            let mut prefixes = prefixes.clone();
            prefixes.extend(lb_ips.iter().map(|(_, ip)| Ipv4Net::from(*ip)));
            prefixes.sort();
            prefixes.dedup();
            SourceRanges::Only(prefixes)
        }
        other => other.clone(),
    }
}

/// IPv4 addresses of a list field, with their index; IPv6 entries are the other family's
/// and are skipped.
fn ipv4_list(ctx: &mut Ctx, object: &str, field: &str, list: &[String]) -> Vec<(usize, Ipv4Addr)> {
    let mut out = Vec::new();
    for (i, s) in list.iter().enumerate() {
        match s.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => out.push((i, ip)),
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => ctx.error(object, format!("{field}[{i}]"), format!("{s:?} is not an IP address")),
        }
    }
    out
}

fn load_balancer_ips(ctx: &mut Ctx, object: &str, svc: &Service) -> Vec<(usize, Ipv4Addr)> {
    let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_deref());
    let mut out = Vec::new();
    for (i, ing) in ingress.unwrap_or_default().iter().enumerate() {
        // ipMode Proxy: the cloud LB proxies to the nodes itself, as kube-proxy assumes.
        if ing.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        let Some(ip) = &ing.ip else { continue };
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => out.push((i, v4)),
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => ctx.error(
                object,
                format!("status.loadBalancer.ingress[{i}].ip"),
                format!("{ip:?} is not an IP address"),
            ),
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

#[cfg(test)]
mod tests;
