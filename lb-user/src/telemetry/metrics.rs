//! `/metrics`: what the datapath counted, read from the pinned maps at each scrape (never
//! zeroed, so counters run on across agent restarts and upgrades), and the agent's own sync
//! and drift-repair metrics, under kube-proxy's names (pkg/proxy/metrics) where kube-proxy
//! has one. docs/METRICS.md lists every metric.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{atomic::AtomicU64, Arc, Mutex, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use lb_common::{affinity_scope, user::protocol_name};
use prometheus_client::{
    collector::Collector,
    encoding::{text::encode_registry, DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, linear_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    datapath,
    model::ServiceRef,
    telemetry::{
        status::{SyncReport, Usage},
        views::{self, Snapshot, Traffic},
    },
};

/// kube-proxy's default `--metrics-bind-address`.
pub const DEFAULT_BIND_ADDRESS: &str = "127.0.0.1:10249";

/// Prometheus's text format, as kube-proxy serves it.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Views(#[from] views::Error),
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
}

/// The node each endpoint of a Service runs on (as the model's index reads them), by Service.
pub type EndpointNodes = BTreeMap<ServiceRef, crate::model::EndpointNodes>;

/// The agent's own metrics. Clones share them: the agent records, the server reads.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    sync_duration: Histogram,
    programming_latency: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    last_queued: Gauge<f64, AtomicU64>,
    no_local_endpoints: Family<Vec<(String, String)>, Gauge>,
    sync_errors: Counter,
    drift_checks: Counter,
    drift_repairs: Counter,
    nodes: Arc<RwLock<EndpointNodes>>,
    service_sums: Arc<Mutex<ServiceSums>>,
    /// Whether /metrics serves the per-endpoint families.
    endpoint_series: bool,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        // kube-proxy's buckets: 1 ms doubling to 16 s for a sync; for network programming
        // 0, 0.25 s, 0.5 s, every second to 59 s, every 5 s to 115 s, every 30 s to 5 min.
        let programming = std::iter::once(0.0)
            .chain(linear_buckets(0.25, 0.25, 2))
            .chain(linear_buckets(1.0, 1.0, 59))
            .chain(linear_buckets(60.0, 5.0, 12))
            .chain(linear_buckets(120.0, 30.0, 7));
        // Both policies' series from the start, as kube-proxy's.
        let no_local_endpoints: Family<Vec<(String, String)>, Gauge> = Family::default();
        for policy in ["internal", "external"] {
            no_local_endpoints.get_or_create(&traffic_policy(policy)).set(0);
        }
        AgentMetrics {
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            programming_latency: Histogram::new(programming),
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            no_local_endpoints,
            sync_errors: Counter::default(),
            drift_checks: Counter::default(),
            drift_repairs: Counter::default(),
            nodes: Arc::default(),
            service_sums: Arc::default(),
            endpoint_series: true,
        }
    }
}

impl AgentMetrics {
    /// These metrics, serving the per-endpoint families or not.
    pub fn with_endpoint_series(self, serve: bool) -> Self {
        AgentMetrics { endpoint_series: serve, ..self }
    }

    /// Records a sync, by the rule `StatusWriter::synced` follows: a read that found nothing
    /// new to write, and failed at nothing, is no sync.
    pub fn synced(&self, report: &SyncReport<'_>) {
        if let Some(at) = report.last_queued {
            self.last_queued.set(unix_seconds(at));
        }
        if let Some(n) = report.no_local_endpoints {
            for (policy, services) in [("internal", n.internal), ("external", n.external)] {
                self.no_local_endpoints.get_or_create(&traffic_policy(policy)).set(services as i64);
            }
        }
        if !report.wrote && !report.failed {
            return;
        }
        self.sync_duration.observe(report.took.as_secs_f64());
        for latency in &report.latencies {
            self.programming_latency.observe(latency.as_secs_f64());
        }
        if report.failed {
            self.sync_errors.inc();
        } else {
            self.last_sync.set(unix_seconds(SystemTime::now()));
        }
    }

    /// Records a drift check that found `repaired` frontends differing and re-applied them.
    pub fn drift_checked(&self, repaired: usize) {
        self.drift_checks.inc();
        self.drift_repairs.inc_by(repaired as u64);
    }

    /// The endpoints' nodes of these Services (computed again), for the `node` label of
    /// backend metrics.
    pub fn update_endpoint_nodes(&self, services: Vec<(ServiceRef, crate::model::EndpointNodes)>) {
        if services.is_empty() {
            return;
        }
        let mut nodes = self.nodes.write().expect("not poisoned");
        for (service, addresses) in services {
            if addresses.is_empty() {
                nodes.remove(&service);
            } else {
                nodes.insert(service, addresses);
            }
        }
    }

    /// Everything /metrics serves: these metrics and the datapath's `reading`.
    fn registry(&self, reading: Reading) -> Registry {
        let mut r = Registry::default();
        // kube-proxy labels these by IP family; this datapath serves IPv4.
        let kube_proxy = r.sub_registry_with_label(("ip_family".into(), "IPv4".into()));
        kube_proxy.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time one sync of the maps with the source took, from reading the source to the last map write",
            self.sync_duration.clone(),
        );
        kube_proxy.register(
            "kubeproxy_network_programming_duration_seconds",
            "Time from a change of the Services or endpoints (its arrival at the agent) to the map write serving it",
            self.programming_latency.clone(),
        );
        kube_proxy.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time the maps were synced with the source without error (Unix seconds)",
            self.last_sync.clone(),
        );
        kube_proxy.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a change of the Services, endpoints or Node arrived (Unix seconds)",
            self.last_queued.clone(),
        );
        kube_proxy.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Service ports with a Local traffic policy and endpoints, none of them on this node",
            self.no_local_endpoints.clone(),
        );
        r.register("kube_xdp_lb_sync_errors", "Syncs that failed in part or whole (retried)", self.sync_errors.clone());
        r.register(
            "kube_xdp_lb_drift_checks",
            "Comparisons of the service maps with what the agent last applied",
            self.drift_checks.clone(),
        );
        r.register(
            "kube_xdp_lb_drift_repairs",
            "Frontends found differing from what the agent applied (changed behind its back) and written again",
            self.drift_repairs.clone(),
        );
        r.register_collector(Box::new(DatapathCollector(reading)));
        r
    }

    /// The exposition in pieces: OpenMetrics when asked for, else Prometheus's text format.
    pub fn exposition(&self, mut reading: Reading, open_metrics: bool) -> Exposition {
        let endpoints = std::mem::take(&mut reading.endpoints);
        let mut head = String::new();
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut head, &self.registry(reading));
        let head = if open_metrics { head } else { prometheus_text(&head) };
        // Without the per-endpoint families: as if they were all written already.
        let family = if self.endpoint_series { 0 } else { ENDPOINT_FAMILIES.len() };
        Exposition { head: Some(head), endpoints, family, at: 0, open_metrics, ended: false }
    }

    /// The exposition whole.
    pub fn render(&self, reading: Reading, open_metrics: bool) -> String {
        self.exposition(reading, open_metrics).collect()
    }

    /// Reads the pins under `pin_dir`, for an exposition with these metrics.
    pub fn scrape(&self, pin_dir: &Path, open_metrics: bool) -> Result<Exposition, Error> {
        let snapshot = Snapshot::read(pin_dir)?;
        let usage = Usage::read(pin_dir)?;
        let mut reading = Reading::of(&snapshot, usage, &self.nodes.read().expect("not poisoned"));
        if !self.endpoint_series {
            reading.endpoints = EndpointRows::default();
        }
        self.service_sums.lock().expect("not poisoned").keep_rising(&mut reading);
        Ok(self.exposition(reading, open_metrics))
    }
}

fn traffic_policy(policy: &str) -> Vec<(String, String)> {
    vec![("traffic_policy".into(), policy.into())]
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has samples `x_total`.
/// Prometheus's text format (what kube-proxy serves, and what `promtool check metrics`
/// reads) names a counter family by its samples, so only counters' HELP and TYPE lines
/// differ; the closing `# EOF` is OpenMetrics' alone.
fn prometheus_text(open_metrics: &str) -> String {
    let counters: BTreeSet<&str> =
        open_metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for line in open_metrics.lines() {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let (name, rest) = line.strip_prefix(prefix)?.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {rest}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// A label set, in the order it is printed.
type Labels = Vec<(&'static str, String)>;

/// What the datapath's maps hold at one scrape, grouped by label set.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    /// Per Service port and kind of frontend (a NodePort on several node addresses, or
    /// several LoadBalancer IPs, are summed).
    services: BTreeMap<Labels, Traffic>,
    /// The frontends summed into `services`: id, series, counts.
    members: Vec<(u32, u64, Traffic)>,
    /// Per Service port and endpoint: traffic and live flows.
    endpoints: EndpointRows,
    usage: Usage,
}

fn add(sum: &mut Traffic, t: &Traffic) {
    sum.packets += t.packets;
    sum.bytes += t.bytes;
    sum.new_flows += t.new_flows;
}

/// A label value as the text format needs it (prometheus-client writes values as given).
fn label(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

/// The `frontend` label: the Service field the frontend comes from.
fn frontend_label(kind: &str) -> &'static str {
    match kind {
        "ClusterIP" => "clusterIP",
        "NodePort" => "nodePort",
        "LoadBalancer" => "loadBalancer",
        "ExternalIP" => "externalIP",
        // A frontend the maps hold no name for (a datapath loaded without the agent).
        _ => "external",
    }
}

impl Reading {
    pub fn of(snap: &Snapshot, usage: Usage, nodes: &EndpointNodes) -> Reading {
        let mut services: BTreeMap<Labels, Traffic> = BTreeMap::new();
        let mut members = Vec::new();
        for (key, v) in &snap.maps.services {
            let name = snap.name_of(key).unwrap_or_default();
            let labels = vec![
                ("namespace", label(&name.namespace)),
                ("service", label(&name.name)),
                ("port", label(&name.port)),
                ("protocol", protocol_name(key.proto).into_owned()),
                ("frontend", frontend_label(snap.kind_of(key, v)).to_string()),
            ];
            let traffic = snap.frontend_traffic.get(&v.svc_id).copied().unwrap_or_default();
            members.push((v.svc_id, series_of(&labels), traffic));
            add(services.entry(labels).or_default(), &traffic);
        }
        // Each Service port's labels once, by its scope; an endpoint row names them by index.
        let mut ports: Vec<[String; 4]> = vec![Default::default()];
        let mut port_of: BTreeMap<u32, (u32, ServiceRef)> = BTreeMap::new();
        for (scope, (name, proto)) in snap.services_by_scope() {
            let sref = ServiceRef { namespace: name.namespace.as_str().into(), name: name.name.as_str().into() };
            port_of.insert(scope, (ports.len() as u32, sref));
            ports.push([
                label(&name.namespace),
                label(&name.name),
                label(&name.port),
                protocol_name(proto).into_owned(),
            ]);
        }
        // A list, sorted, rather than a map: one row per backend id, the least room.
        let mut rows: Vec<((u32, SocketAddrV4), EndpointRow)> = Vec::with_capacity(snap.maps.backends.len());
        for (id, b) in &snap.maps.backends {
            let (port, sref) = port_of.get(&affinity_scope(b.owner)).map_or((0, None), |(i, s)| (*i, Some(s)));
            let row = EndpointRow {
                traffic: snap.backend_traffic.get(id).copied().unwrap_or_default(),
                live: snap.live_flows.get(id).copied().unwrap_or(0),
                node: sref.and_then(|s| nodes.get(s)).and_then(|n| n.get(&b.ip())).cloned(),
            };
            rows.push(((port, SocketAddrV4::new(b.ip(), b.port())), row));
        }
        rows.sort_unstable_by_key(|(key, _)| *key);
        // Two ids for one endpoint of one Service port (rare: one going as another comes)
        // are one series.
        rows.dedup_by(|(key, row), (kept_key, kept)| {
            let same = key == kept_key;
            if same {
                add(&mut kept.traffic, &row.traffic);
                kept.live += row.live;
            }
            same
        });
        let endpoints = EndpointRows { ports, rows };
        Reading { services, members, endpoints, usage }
    }
}

/// A series' identity across scrapes: a hash of its labels.
fn series_of(labels: &Labels) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    labels.hash(&mut h);
    h.finish()
}

/// Keeps the Service series rising. A series sums the frontends of one kind (a NodePort on
/// each node address, each LoadBalancer IP); when one goes (an address changes) or its id
/// is given to another, its counts would leave a sum the others keep, and Prometheus would
/// read the drop as a reset and count the whole sum again. What such a frontend had counted
/// at the last scrape is added back for as long as its series is served.
#[derive(Debug, Default)]
struct ServiceSums {
    /// Each frontend id's counts at the last scrape, and its series.
    last: BTreeMap<u32, (u64, Traffic)>,
    /// By series: what frontends that left it had counted.
    gone: BTreeMap<u64, Traffic>,
}

impl ServiceSums {
    fn keep_rising(&mut self, reading: &mut Reading) {
        let now: BTreeMap<u32, (u64, Traffic)> =
            reading.members.iter().map(|(id, series, traffic)| (*id, (*series, *traffic))).collect();
        for (id, (series, before)) in std::mem::take(&mut self.last) {
            let carries_on = now.get(&id).is_some_and(|(s, t)| {
                *s == series
                    && t.packets >= before.packets
                    && t.bytes >= before.bytes
                    && t.new_flows >= before.new_flows
            });
            if !carries_on {
                add(self.gone.entry(series).or_default(), &before);
            }
        }
        // A series no longer served starts again from its members' counts if it returns.
        let served: BTreeSet<u64> = now.values().map(|(series, _)| *series).collect();
        self.gone.retain(|series, _| served.contains(series));
        self.last = now;
        for (labels, sum) in &mut reading.services {
            if let Some(gone) = self.gone.get(&series_of(labels)) {
                add(sum, gone);
            }
        }
    }
}

/// Per Service port and endpoint: traffic and live flows, a row each. Their labels are
/// written with each sample rather than held: at 100k endpoints they would be tens of MB.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointRows {
    /// Service ports' label values (namespace, service, port, protocol), escaped; index 0
    /// for endpoints of a Service port the maps hold no name for.
    ports: Vec<[String; 4]>,
    /// By Service port (index into `ports`) and endpoint.
    rows: Vec<((u32, SocketAddrV4), EndpointRow)>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct EndpointRow {
    traffic: Traffic,
    live: u64,
    node: Option<Arc<str>>,
}

/// The per-endpoint families: name, help, and whether a counter (else a gauge).
const ENDPOINT_FAMILIES: [(&str, &str, bool); 4] = [
    (
        "kube_xdp_lb_backend_packets",
        "Packets of flows to an endpoint of a Service port, both directions (requests and replies, whole frames), on the node that translated them.",
        true,
    ),
    (
        "kube_xdp_lb_backend_bytes",
        "Bytes of flows to an endpoint of a Service port, both directions (requests and replies, whole frames), on the node that translated them.",
        true,
    ),
    ("kube_xdp_lb_backend_new_flows", "Flows started to an endpoint of a Service port.", true),
    ("kube_xdp_lb_backend_live_flows", "Flows open to an endpoint of a Service port now.", false),
];

/// Endpoint samples per piece of the exposition.
const ROWS_PER_PIECE: usize = 4096;

/// A scrape's text in pieces: the registry's families (small) first, then the per-endpoint
/// families a few thousand samples at a time, so a scrape of 100k endpoints never holds its
/// whole text (tens of MB) nor a second copy of it; then OpenMetrics' `# EOF`.
pub struct Exposition {
    head: Option<String>,
    endpoints: EndpointRows,
    /// The endpoint family and row to write next.
    family: usize,
    at: usize,
    open_metrics: bool,
    ended: bool,
}

impl Iterator for Exposition {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        use std::fmt::Write;
        if let Some(head) = self.head.take() {
            return Some(head);
        }
        if let Some((name, help, counter)) = ENDPOINT_FAMILIES.get(self.family).copied() {
            let mut out = String::with_capacity(200 * ROWS_PER_PIECE);
            // Prometheus's text format names a counter family by its samples (`_total`),
            // OpenMetrics without it.
            let total = if counter { "_total" } else { "" };
            if self.at == 0 {
                let family = if self.open_metrics { name.to_string() } else { format!("{name}{total}") };
                let kind = if counter { "counter" } else { "gauge" };
                let _ = write!(out, "# HELP {family} {help}\n# TYPE {family} {kind}\n");
            }
            let rows = &self.endpoints.rows;
            let end = (self.at + ROWS_PER_PIECE).min(rows.len());
            for ((port, endpoint), row) in &rows[self.at..end] {
                let [namespace, service, port, protocol] = &self.endpoints.ports[*port as usize];
                let node = row.node.as_deref().map(label).unwrap_or_default();
                let value = match self.family {
                    0 => row.traffic.packets,
                    1 => row.traffic.bytes,
                    2 => row.traffic.new_flows,
                    _ => row.live,
                };
                let _ = writeln!(
                    out,
                    "{name}{total}{{namespace=\"{namespace}\",service=\"{service}\",port=\"{port}\",protocol=\"{protocol}\",endpoint=\"{endpoint}\",node=\"{node}\"}} {value}"
                );
            }
            if end == rows.len() {
                (self.family, self.at) = (self.family + 1, 0);
            } else {
                self.at = end;
            }
            return Some(out);
        }
        if self.open_metrics && !self.ended {
            self.ended = true;
            return Some("# EOF\n".into());
        }
        None
    }
}

#[derive(Debug)]
struct DatapathCollector(Reading);

fn counters<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (&'a Labels, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        ConstCounter::new(value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauges<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (&'a Labels, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// A gauge without labels.
fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let r = &self.0;
        let e = &mut encoder;
        let services = || r.services.iter();
        let both_ways = "both directions (requests and replies, whole frames), on the node that translated them";
        counters(
            e,
            "kube_xdp_lb_service_packets",
            &format!("Packets of a Service port's flows through its frontends of one kind, {both_ways}."),
            services().map(|(l, t)| (l, t.packets)),
        )?;
        counters(
            e,
            "kube_xdp_lb_service_bytes",
            &format!("Bytes of a Service port's flows through its frontends of one kind, {both_ways}."),
            services().map(|(l, t)| (l, t.bytes)),
        )?;
        counters(
            e,
            "kube_xdp_lb_service_new_flows",
            "Flows started through a Service port's frontends of one kind.",
            services().map(|(l, t)| (l, t.new_flows)),
        )?;
        // Socket operations are counted apart: they are no packets and carry no bytes.
        let (socket, packet): (Vec<_>, Vec<_>) = r.usage.counters.iter().partition(|c| c.name.starts_with("sock_"));
        let packet: Vec<(Labels, u64, u64)> = packet
            .iter()
            .map(|c| (vec![("kind", c.kind.to_string()), ("reason", c.name.to_string())], c.packets, c.bytes))
            .collect();
        let kinds = "kind: translated, pass, drop, answer (a refusal or reset sent back), event (counted beside the packet's fate)";
        counters(
            e,
            "kube_xdp_lb_packets",
            &format!("Packets the datapath handled, by what happened (reason: lb-common's counter names; {kinds})."),
            packet.iter().map(|(l, p, _)| (l, *p)),
        )?;
        counters(
            e,
            "kube_xdp_lb_bytes",
            &format!("Bytes of the packets the datapath handled, by what happened ({kinds})."),
            packet.iter().map(|(l, _, b)| (l, *b)),
        )?;
        let socket: Vec<(Labels, u64)> = socket
            .iter()
            .map(|c| (vec![("operation", c.name.trim_start_matches("sock_").to_string())], c.packets))
            .collect();
        counters(
            e,
            "kube_xdp_lb_socket_operations",
            "Socket-level load balancing: connects and sends translated, refused, left to the packet path, addresses shown reversed.",
            socket.iter().map(|(l, n)| (l, *n)),
        )?;
        let maps: Vec<(Labels, u64, u64)> =
            r.usage.maps.iter().map(|m| (vec![("map", m.map.to_string())], m.entries, m.capacity)).collect();
        gauges(e, "kube_xdp_lb_map_entries", "Entries a pinned map holds.", maps.iter().map(|(l, n, _)| (l, *n)))?;
        gauges(
            e,
            "kube_xdp_lb_map_capacity",
            "Entries a pinned map has room for.",
            maps.iter().map(|(l, _, c)| (l, *c)),
        )?;
        let limit = r.usage.maps.iter().find_map(|m| m.limit).unwrap_or(0);
        gauge(
            e,
            "kube_xdp_lb_conntrack_admit_limit",
            "Conntrack entries above which new flows are refused (counted as drop_ct_full).",
            limit,
        )?;
        let nat = &r.usage.nat;
        gauge(
            e,
            "kube_xdp_lb_nat_ports",
            "SNAT source ports in the range: what each destination (backend address, port, protocol) can hold at once.",
            u64::from(nat.ports),
        )?;
        gauge(
            e,
            "kube_xdp_lb_nat_ports_in_use",
            "SNAT source ports held by flows, over all destinations.",
            nat.snat_flows,
        )?;
        gauge(
            e,
            "kube_xdp_lb_nat_busiest_destination_ports",
            "SNAT source ports held toward the destination holding the most (its new flows fail at kube_xdp_lb_nat_ports).",
            nat.busiest_ports,
        )?;
        Ok(())
    }
}

/// The /metrics server, stopped on drop.
pub struct Server {
    task: JoinHandle<()>,
    /// Where it listens (the port chosen, for port 0).
    pub local_addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Scraper {
    pin_dir: Arc<PathBuf>,
    metrics: AgentMetrics,
    /// One scrape at a time: each reads the whole conntrack table (a quarter of a second at
    /// 750k entries) and the other maps, so overlapping scrapes wait rather than multiply it.
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

/// Serves /metrics on `addr`, reading the pins under `pin_dir` at each scrape.
pub async fn serve(addr: SocketAddr, pin_dir: PathBuf, metrics: AgentMetrics) -> std::io::Result<Server> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    info!(address = %local_addr, "serving /metrics");
    let app = Router::new().route("/metrics", get(scrape)).with_state(Scraper {
        pin_dir: Arc::new(pin_dir),
        metrics,
        one_at_a_time: Arc::default(),
    });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!("the /metrics server stopped: {e}");
        }
    });
    Ok(Server { task, local_addr })
}

async fn scrape(State(s): State<Scraper>, headers: HeaderMap) -> Response {
    let open_metrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    // Held until the last piece is sent.
    let turn = s.one_at_a_time.clone().lock_owned().await;
    // Reading conntrack through (for the NAT ports) takes a while: off the event loop.
    let scraped =
        tokio::task::spawn_blocking(move || s.metrics.scrape(&s.pin_dir, open_metrics).map_err(|e| e.to_string()))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
    match scraped {
        Ok(exposition) => {
            // Sent as it is written, piece by piece (see `Exposition`).
            let pieces = futures::stream::iter(exposition.map(move |piece| {
                let _turn = &turn;
                Ok::<_, std::convert::Infallible>(piece)
            }));
            let content_type = if open_metrics { OPENMETRICS_TEXT } else { PROMETHEUS_TEXT };
            ([(header::CONTENT_TYPE, content_type)], axum::body::Body::from_stream(pieces)).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("reading the datapath's maps: {e}\n")).into_response(),
    }
}

/// `--metrics-bind-address` as kube-proxy reads it: IP:PORT, an IP alone (port 10249), or
/// "" for no server.
pub fn parse_bind_address(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(Some((ip, 10249).into()));
    }
    s.parse().map(Some).map_err(|_| format!("{s:?} is not IP:PORT, an IP, or \"\" (no metrics server)"))
}

#[cfg(test)]
mod tests {
    use std::{
        net::Ipv4Addr,
        time::{Duration, Instant},
    };

    use lb_common::{
        affinity_scope, backend_flags, frontend_kind, map_names, service_flags, Backend, FrontendMeta, ServiceKey,
        ServiceValue, SlotKey, IPPROTO_TCP,
    };

    use super::*;
    use crate::{
        datapath::maps::Contents,
        telemetry::status::{CounterView, NatView, Occupancy},
    };

    const WEB: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);

    /// shop/web port "http" over TCP: its ClusterIP (id 1), a NodePort on two node addresses
    /// (ids 2 and 3), one backend on node-a (id 1) with 2 live flows.
    fn reading() -> Reading {
        let owner = 0x1234_5678_9abc_def0;
        let mut maps = Contents::default();
        let frontends = [
            (Ipv4Addr::new(10, 96, 0, 10), 80, 1, frontend_kind::CLUSTER_IP, 0),
            (Ipv4Addr::new(192, 168, 50, 10), 30080, 2, frontend_kind::NODE_PORT, service_flags::EXTERNAL),
            (Ipv4Addr::new(192, 168, 50, 11), 30080, 3, frontend_kind::NODE_PORT, service_flags::EXTERNAL),
        ];
        let mut frontend_traffic = BTreeMap::new();
        for (addr, port, id, kind, flags) in frontends {
            let key = ServiceKey::new(addr, port, IPPROTO_TCP);
            let v =
                ServiceValue { svc_id: id, flags, count: [1, 0], scope: affinity_scope(owner), ..Default::default() };
            maps.services.insert(key, v);
            maps.slots.insert(SlotKey::new(id, 0, 0, 0), 1);
            maps.metas.insert(key, FrontendMeta::new("shop", "web", "http", kind));
            let packets = 10 * id as u64;
            frontend_traffic.insert(id, Traffic { packets, bytes: packets * 100, new_flows: id as u64 });
        }
        let mut backend = Backend::new(WEB, 8080, true, owner);
        backend.flags |= backend_flags::CHOSEN;
        maps.backends.insert(1, backend);
        let snap = Snapshot {
            maps,
            frontend_traffic,
            backend_traffic: BTreeMap::from([(1, Traffic { packets: 60, bytes: 6000, new_flows: 6 })]),
            live_flows: BTreeMap::from([(1, 2)]),
            taken: Instant::now(),
            taken_unix_ms: 0,
        };
        let counter = |name, kind, packets| CounterView { name, kind, packets, bytes: packets * 60 };
        let usage = Usage {
            maps: vec![
                Occupancy { map: map_names::CONNTRACK, entries: 4, capacity: 1000, limit: Some(900) },
                Occupancy { map: map_names::SERVICES, entries: 3, capacity: 65536, limit: None },
            ],
            nat: NatView {
                range: "40000-40009".into(),
                ports: 10,
                snat_flows: 3,
                busiest: Some("10.244.1.10:8080/TCP".into()),
                busiest_ports: 2,
            },
            counters: vec![
                counter("new_flow", "translated", 6),
                counter("drop_source_range", "drop", 2),
                counter("pass_not_service", "pass", 7),
                counter("sock_connect", "event", 4),
            ],
        };
        let nodes = EndpointNodes::from([(
            ServiceRef { namespace: "shop".into(), name: "web".into() },
            [(WEB, "node-a".into())].into_iter().collect::<crate::model::EndpointNodes>(),
        )]);
        Reading::of(&snap, usage, &nodes)
    }

    /// The samples of `text` (name and labels -> value) and its `# TYPE` lines.
    fn parse(text: &str) -> (BTreeMap<&str, &str>, BTreeMap<&str, &str>) {
        let mut samples = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').unwrap();
                types.insert(name, kind);
            } else if !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').unwrap();
                samples.insert(series, value);
            }
        }
        (samples, types)
    }

    #[test]
    fn service_backend_reason_and_occupancy_series_carry_their_labels_and_types() {
        let text = AgentMetrics::default().render(reading(), false);
        let (samples, types) = parse(&text);
        let svc = r#"namespace="shop",service="web",port="http",protocol="TCP""#;
        // The two NodePort frontends are one series: their sum.
        for (series, value) in [
            (format!("kube_xdp_lb_service_packets_total{{{svc},frontend=\"clusterIP\"}}"), "10"),
            (format!("kube_xdp_lb_service_packets_total{{{svc},frontend=\"nodePort\"}}"), "50"),
            (format!("kube_xdp_lb_service_bytes_total{{{svc},frontend=\"nodePort\"}}"), "5000"),
            (format!("kube_xdp_lb_service_new_flows_total{{{svc},frontend=\"nodePort\"}}"), "5"),
            (format!("kube_xdp_lb_backend_packets_total{{{svc},endpoint=\"10.244.1.10:8080\",node=\"node-a\"}}"), "60"),
            (format!("kube_xdp_lb_backend_bytes_total{{{svc},endpoint=\"10.244.1.10:8080\",node=\"node-a\"}}"), "6000"),
            (
                format!("kube_xdp_lb_backend_new_flows_total{{{svc},endpoint=\"10.244.1.10:8080\",node=\"node-a\"}}"),
                "6",
            ),
            (format!("kube_xdp_lb_backend_live_flows{{{svc},endpoint=\"10.244.1.10:8080\",node=\"node-a\"}}"), "2"),
            (r#"kube_xdp_lb_packets_total{kind="drop",reason="drop_source_range"}"#.into(), "2"),
            (r#"kube_xdp_lb_bytes_total{kind="drop",reason="drop_source_range"}"#.into(), "120"),
            (r#"kube_xdp_lb_packets_total{kind="pass",reason="pass_not_service"}"#.into(), "7"),
            (r#"kube_xdp_lb_socket_operations_total{operation="connect"}"#.into(), "4"),
            (r#"kube_xdp_lb_map_entries{map="LB_CONNTRACK"}"#.into(), "4"),
            (r#"kube_xdp_lb_map_capacity{map="LB_CONNTRACK"}"#.into(), "1000"),
            (r#"kube_xdp_lb_map_capacity{map="LB_SERVICES"}"#.into(), "65536"),
            ("kube_xdp_lb_conntrack_admit_limit".into(), "900"),
            ("kube_xdp_lb_nat_ports".into(), "10"),
            ("kube_xdp_lb_nat_ports_in_use".into(), "3"),
            ("kube_xdp_lb_nat_busiest_destination_ports".into(), "2"),
        ] {
            assert_eq!(samples.get(series.as_str()).copied(), Some(value), "{series} in:\n{text}");
        }
        assert!(!text.contains("reason=\"sock_connect\""), "socket operations are no packets");
        for (name, kind) in [
            ("kube_xdp_lb_service_packets_total", "counter"),
            ("kube_xdp_lb_backend_new_flows_total", "counter"),
            ("kube_xdp_lb_backend_live_flows", "gauge"),
            ("kube_xdp_lb_packets_total", "counter"),
            ("kube_xdp_lb_socket_operations_total", "counter"),
            ("kube_xdp_lb_map_entries", "gauge"),
            ("kube_xdp_lb_nat_busiest_destination_ports", "gauge"),
            ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
            ("kubeproxy_network_programming_duration_seconds", "histogram"),
            ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
            ("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "gauge"),
            ("kubeproxy_sync_proxy_rules_no_local_endpoints_total", "gauge"),
            ("kube_xdp_lb_sync_errors_total", "counter"),
            ("kube_xdp_lb_drift_repairs_total", "counter"),
        ] {
            assert_eq!(types.get(name).copied(), Some(kind), "# TYPE {name}");
        }
        // Every counter's HELP names it as its samples do (Prometheus's text format).
        assert!(text.contains("# HELP kube_xdp_lb_packets_total Packets"), "{text}");
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn syncs_feed_kube_proxys_histograms_and_drift_checks_count_repairs() {
        let metrics = AgentMetrics::default();
        let problems = Vec::new();
        let report = |wrote, failed, latencies: Vec<Duration>| SyncReport {
            took: Duration::from_millis(3),
            wrote,
            failed,
            frontends: 3,
            problems: &problems,
            latencies,
            last_queued: Some(SystemTime::now() - Duration::from_secs(5)),
            no_local_endpoints: Some(crate::model::NoLocalEndpoints { internal: 1, external: 2 }),
        };
        metrics.synced(&report(true, false, vec![Duration::from_millis(300), Duration::from_secs(2)]));
        metrics.synced(&report(false, false, vec![]));
        metrics.synced(&report(false, true, vec![]));
        metrics.drift_checked(0);
        metrics.drift_checked(2);
        let text = metrics.render(reading(), false);
        let (samples, _) = parse(&text);
        let at = |series: &str| samples.get(series).copied().unwrap_or_else(|| panic!("no {series}"));
        // A read that found nothing new is no sync; a failed one is.
        let v4 = r#"ip_family="IPv4""#;
        assert_eq!(at(&format!("kubeproxy_sync_proxy_rules_duration_seconds_count{{{v4}}}")), "2");
        assert_eq!(at(&format!(r#"kubeproxy_sync_proxy_rules_duration_seconds_bucket{{{v4},le="0.004"}}"#)), "2");
        assert_eq!(at(&format!(r#"kubeproxy_sync_proxy_rules_duration_seconds_bucket{{{v4},le="0.002"}}"#)), "0");
        let programming = "kubeproxy_network_programming_duration_seconds";
        assert_eq!(at(&format!("{programming}_count{{{v4}}}")), "2");
        assert_eq!(at(&format!(r#"{programming}_bucket{{{v4},le="0.25"}}"#)), "0");
        assert_eq!(at(&format!(r#"{programming}_bucket{{{v4},le="0.5"}}"#)), "1");
        assert_eq!(at(&format!(r#"{programming}_bucket{{{v4},le="2.0"}}"#)), "2");
        assert_eq!(at(&format!(r#"{programming}_bucket{{{v4},le="300.0"}}"#)), "2");
        assert_eq!(at("kube_xdp_lb_sync_errors_total"), "1");
        assert_eq!(at("kube_xdp_lb_drift_checks_total"), "2");
        assert_eq!(at("kube_xdp_lb_drift_repairs_total"), "2");
        let last: f64 = at(&format!("kubeproxy_sync_proxy_rules_last_timestamp_seconds{{{v4}}}")).parse().unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((now - 60.0..=now).contains(&last), "{last}");
        let queued: f64 =
            at(&format!("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{{{v4}}}")).parse().unwrap();
        assert!((now - 65.0..=now - 5.0).contains(&queued), "{queued}");
        let no_local = "kubeproxy_sync_proxy_rules_no_local_endpoints_total";
        assert_eq!(at(&format!(r#"{no_local}{{{v4},traffic_policy="internal"}}"#)), "1");
        assert_eq!(at(&format!(r#"{no_local}{{{v4},traffic_policy="external"}}"#)), "2");
    }

    #[test]
    fn a_summed_service_series_never_falls_when_a_frontend_leaves_it() {
        let labels = |kind: &str| -> Labels { vec![("service", "web".into()), ("frontend", kind.into())] };
        let (node_port, cluster_ip) = (labels("nodePort"), labels("clusterIP"));
        let traffic = |packets| Traffic { packets, bytes: 100 * packets, new_flows: packets / 10 };
        let scrape = |sums: &mut ServiceSums, members: &[(u32, &Labels, u64)]| {
            let mut r = reading();
            r.services.clear();
            r.members.clear();
            for (id, l, packets) in members {
                r.members.push((*id, series_of(l), traffic(*packets)));
                add(r.services.entry((*l).clone()).or_default(), &traffic(*packets));
            }
            sums.keep_rising(&mut r);
            r.services
        };
        let mut sums = ServiceSums::default();
        // Frontend ids 1 and 2 are one NodePort on two node addresses; 3 a ClusterIP.
        let first = scrape(&mut sums, &[(1, &node_port, 10), (2, &node_port, 5), (3, &cluster_ip, 7)]);
        assert_eq!((first[&node_port].packets, first[&cluster_ip].packets), (15, 7));
        // The second address goes: its 5 packets stay in the sum.
        assert_eq!(scrape(&mut sums, &[(1, &node_port, 12), (3, &cluster_ip, 8)])[&node_port].packets, 17);
        // Id 1 given to a new frontend of the same series (counters cleared): its 12 stay.
        assert_eq!(scrape(&mut sums, &[(1, &node_port, 1), (3, &cluster_ip, 9)])[&node_port].packets, 18);
        // Bytes and flows alike.
        let fourth = scrape(&mut sums, &[(1, &node_port, 2), (3, &cluster_ip, 9)]);
        assert_eq!(fourth[&node_port], Traffic { packets: 19, bytes: 1900, new_flows: 1 });
        assert_eq!(fourth[&cluster_ip].packets, 9, "the other series is untouched");
        // The NodePort gone altogether: no series; back later, it starts from its members.
        assert!(!scrape(&mut sums, &[(3, &cluster_ip, 9)]).contains_key(&node_port));
        assert_eq!(scrape(&mut sums, &[(4, &node_port, 3), (3, &cluster_ip, 9)])[&node_port].packets, 3);
    }

    #[test]
    fn endpoint_families_come_in_pieces_each_family_described_once() {
        let mut r = reading();
        let rows = 2 * ROWS_PER_PIECE + 5;
        r.endpoints = EndpointRows {
            ports: vec![Default::default(), ["shop".into(), "web".into(), "http".into(), "TCP".into()]],
            rows: (0..rows as u32)
                .map(|i| {
                    let endpoint = SocketAddrV4::new(std::net::Ipv4Addr::from(0x0af4_0000 + i), 8080);
                    let row = EndpointRow {
                        traffic: Traffic { packets: i.into(), ..Default::default() },
                        ..Default::default()
                    };
                    ((1, endpoint), row)
                })
                .collect(),
        };
        for open_metrics in [false, true] {
            let pieces: Vec<String> = AgentMetrics::default().exposition(r.clone(), open_metrics).collect();
            assert_eq!(pieces.len(), 1 + 4 * 3 + usize::from(open_metrics), "the head, 3 pieces a family, # EOF");
            let text = pieces.concat();
            let packets =
                if open_metrics { "kube_xdp_lb_backend_packets" } else { "kube_xdp_lb_backend_packets_total" };
            assert_eq!(text.matches(&format!("# TYPE {packets} counter\n")).count(), 1);
            assert_eq!(text.matches("# TYPE kube_xdp_lb_backend_live_flows gauge\n").count(), 1);
            let last = format!(
                r#"kube_xdp_lb_backend_packets_total{{namespace="shop",service="web",port="http",protocol="TCP",endpoint="{}:8080",node=""}} {}"#,
                std::net::Ipv4Addr::from(0x0af4_0000 + rows as u32 - 1),
                rows - 1
            );
            assert!(text.contains(&format!("\n{last}\n")), "{last}");
            assert_eq!(text.lines().filter(|l| l.starts_with("kube_xdp_lb_backend_packets_total{")).count(), rows);
            assert_eq!(text.ends_with("# EOF\n"), open_metrics);
        }
    }

    #[test]
    fn the_per_endpoint_series_can_be_left_out() {
        let served = AgentMetrics::default().render(reading(), false);
        assert!(served.contains("# TYPE kube_xdp_lb_backend_packets_total counter"), "{served}");
        let without = AgentMetrics::default().with_endpoint_series(false).render(reading(), false);
        assert!(!without.contains("kube_xdp_lb_backend_"), "{without}");
        assert!(without.contains("kube_xdp_lb_service_packets_total{"), "the per-Service series stay");
    }

    #[test]
    fn open_metrics_is_served_as_the_crate_writes_it() {
        let text = AgentMetrics::default().render(reading(), true);
        assert!(text.contains("# TYPE kube_xdp_lb_packets counter\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[tokio::test]
    async fn a_taken_address_is_refused_and_a_scrape_without_a_datapath_answers_500_naming_why() {
        let missing = std::env::temp_dir().join(format!("lb-metrics-no-pins-{}", std::process::id()));
        let server = serve("127.0.0.1:0".parse().unwrap(), missing.clone(), AgentMetrics::default()).await.unwrap();
        let taken = serve(server.local_addr, missing.clone(), AgentMetrics::default()).await.err().expect("refused");
        assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
        let mut conn = tokio::net::TcpStream::connect(server.local_addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut conn,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        let why = format!("reading the datapath's maps: --pin-dir {}: no such directory", missing.display());
        assert!(answer.contains(&why), "{answer}");
    }

    #[test]
    fn bind_addresses_are_read_as_kube_proxy_reads_them() {
        assert_eq!(parse_bind_address("0.0.0.0:9100"), Ok(Some("0.0.0.0:9100".parse().unwrap())));
        assert_eq!(parse_bind_address("192.168.50.10"), Ok(Some("192.168.50.10:10249".parse().unwrap())));
        assert_eq!(parse_bind_address("[::1]:10249"), Ok(Some("[::1]:10249".parse().unwrap())));
        assert_eq!(parse_bind_address(""), Ok(None));
        assert_eq!(
            parse_bind_address("localhost:10249"),
            Err(r#""localhost:10249" is not IP:PORT, an IP, or "" (no metrics server)"#.to_string())
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("a\nb"), r"a\nb");
    }

    /// Every string under `key` anywhere in `value`.
    fn strings_under<'a>(value: &'a serde_json::Value, key: &str, out: &mut Vec<&'a str>) {
        match value {
            serde_json::Value::Object(fields) => {
                for (k, v) in fields {
                    match v.as_str() {
                        Some(text) if k == key => out.push(text),
                        _ => strings_under(v, key, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| strings_under(v, key, out)),
            _ => {}
        }
    }

    #[test]
    fn every_metric_the_dashboard_queries_is_served() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../deploy/grafana/kube-xdp-lb.json")).expect("valid JSON");
        let mut queries = Vec::new();
        strings_under(&dashboard["panels"], "expr", &mut queries);
        let panels = queries.len();
        strings_under(&dashboard["templating"], "query", &mut queries);
        assert!(panels >= 15 && queries.len() > panels, "{} queries", queries.len());
        let text = AgentMetrics::default().render(reading(), false);
        let (samples, _) = parse(&text);
        let served: BTreeSet<&str> = samples.keys().map(|s| s.split('{').next().unwrap()).collect();
        let mut used = BTreeSet::new();
        for query in queries {
            let names = query
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|word| word.starts_with("kube_xdp_lb_") || word.starts_with("kubeproxy_"));
            for name in names {
                assert!(served.contains(name), "the dashboard queries {name}, which /metrics does not serve: {query}");
                used.insert(name);
            }
        }
        // Each part of the dashboard has its metrics.
        for name in [
            "kube_xdp_lb_service_packets_total",
            "kube_xdp_lb_backend_new_flows_total",
            "kube_xdp_lb_packets_total",
            "kube_xdp_lb_map_entries",
            "kubeproxy_network_programming_duration_seconds_bucket",
        ] {
            assert!(used.contains(name), "the dashboard shows no {name}");
        }
    }

    #[test]
    fn docs_metrics_md_describes_every_metric_and_reason() {
        let doc = include_str!("../../../docs/METRICS.md");
        let text = AgentMetrics::default().render(reading(), false);
        let (_, types) = parse(&text);
        for name in types.keys() {
            assert!(doc.contains(&format!("`{name}`")), "docs/METRICS.md does not describe {name}");
        }
        for (index, reason) in lb_common::counters::ALL {
            let listed = match reason.strip_prefix("sock_") {
                Some(operation) => format!("`{operation}`"),
                None => format!("| `{reason}` | {} |", crate::telemetry::status::counter_kind(index)),
            };
            assert!(doc.contains(&listed), "docs/METRICS.md does not explain {reason} as {listed}");
        }
    }
}
