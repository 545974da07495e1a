//! The agent: loads and attaches the datapath, adopts the pinned maps, and keeps them equal
//! to the model of its source (manifest files in standalone mode, the API server in cluster
//! mode) through the shared [`Sync`]; attaches the pod-side program to every device
//! matching the patterns, including ones created later (netlink link events); serves
//! health (`/healthz`, `/livez`, `/readyz`), healthCheckNodePorts for
//! externalTrafficPolicy=Local Services and /metrics; repairs what changes in the maps
//! behind its back.
use std::{
    collections::BTreeSet,
    ffi::CStr,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use globset::GlobSet;
use lb_common::{user::addr_be, Config, SockConfig};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{
    datapath::{self, conntrack::Conntrack, maps::PinnedMaps, Datapath},
    model::{Desired, FlowCleanup, LocalDetect, NodeFlags, NodeInfo, Options},
    reconcile::Reconciler,
    source::{
        cluster::{self, ApiServer},
        ObjectKind,
    },
    sync::{Feed, Sync},
    telemetry::{
        health::{self, HealthServers, HealthState},
        metrics::{self, AgentMetrics},
        status::{StatusWriter, SyncReport},
    },
};

/// How often conntrack is swept: often enough that flows a flood left (unanswered SYNs
/// expire in 10 s) free their room soon after they expire...
const CONNTRACK_SWEEP: Duration = Duration::from_secs(2);
/// ...but a large table's sweeps (half a second each at a million entries) take at most a
/// tenth of a CPU: the next waits nine times the last one's time.
const SWEEP_PAUSE_FACTOR: u32 = 9;

/// How long the sweeper waits after a sweep that took `took`.
fn pause_after_sweep(took: Duration) -> Duration {
    CONNTRACK_SWEEP.max(took * SWEEP_PAUSE_FACTOR)
}

/// UDP flows to remove after a sync: each frontend with an endpoint that stopped serving
/// but keeps its id (see [`model::conntrack::flow_cleanups`]).
type UdpCleanup = Vec<(lb_common::ServiceKey, std::net::SocketAddrV4)>;

/// Sweeps conntrack on a thread of its own: reading a table of a million entries takes a
/// few hundred milliseconds, which the agent's event loop must not wait for. UDP cleanups
/// the sync asks for are done on the same thread, as soon as they arrive.
struct Sweeper {
    cleanups: Option<std::sync::mpsc::Sender<UdpCleanup>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sweeper {
    fn start(mut conntrack: Conntrack) -> Sweeper {
        use std::sync::mpsc::RecvTimeoutError;
        let (cleanups, requests) = std::sync::mpsc::channel::<UdpCleanup>();
        let thread = std::thread::spawn(move || {
            let mut next_sweep = std::time::Instant::now();
            loop {
                if std::time::Instant::now() >= next_sweep {
                    let began = std::time::Instant::now();
                    match conntrack.sweep() {
                        Ok(s) if s.removed > 0 => {
                            info!(
                                removed = s.removed,
                                entries = s.entries,
                                read_ms = s.read_ms,
                                reap_ms = s.reap_ms,
                                "conntrack swept"
                            )
                        }
                        Ok(_) => {}
                        Err(e) => warn!("sweeping conntrack: {e}"),
                    }
                    next_sweep = std::time::Instant::now() + pause_after_sweep(began.elapsed());
                }
                match requests.recv_timeout(next_sweep.saturating_duration_since(std::time::Instant::now())) {
                    Ok(to) => match conntrack.forget_udp_flows(&to) {
                        Ok(0) => {}
                        Ok(removed) => info!(removed, "UDP flows to endpoints that stopped serving removed"),
                        Err(e) => warn!("removing UDP flows to endpoints that stopped serving: {e}"),
                    },
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        });
        Sweeper { cleanups: Some(cleanups), thread: Some(thread) }
    }

    /// Asks for the UDP flows to endpoints that stopped serving to be removed.
    fn forget(&self, cleanups: Vec<FlowCleanup>) {
        let to: UdpCleanup = cleanups
            .into_iter()
            .filter_map(|c| match c {
                FlowCleanup::ToBackend { frontend, backend } => {
                    Some((crate::reconcile::service_key(&frontend), backend))
                }
                // Refused or dropped packets create no flow, and a frontend's removal frees
                // its backends' ids, which ends their flows in the datapath: nothing to do.
                FlowCleanup::ToFrontend { .. } => None,
            })
            .collect();
        if let (false, Some(tx)) = (to.is_empty(), &self.cleanups) {
            // The thread only ends when the sender is dropped, below.
            let _ = tx.send(to);
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.cleanups.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where the Services come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Manifest files (a file or a directory), read again when they change.
    Manifests(PathBuf),
    /// The API server.
    Cluster(ApiServer),
}

pub struct AgentConfig {
    pub pin_dir: PathBuf,
    pub source: Source,
    /// This node as the command line gives it; what it leaves out comes from the node's
    /// Node object (among the manifests, or watched on the API server).
    pub node: NodeFlags,
    /// Where `/healthz`, `/livez` and `/readyz` are served.
    pub healthz_bind: std::net::SocketAddr,
    pub options: Options,
    pub uplinks: Vec<String>,
    /// Pod-facing devices: the names these glob patterns (`lxc*`, `veth*`) match.
    pub pod_devices: GlobSet,
    pub snat_ports: (u16, u16),
    pub datapath: DatapathOptions,
    /// Socket-level load balancing; None: off (the hooks are detached).
    pub sockets: Option<SocketLb>,
    /// Where /metrics is served; None: nowhere.
    pub metrics_bind_address: Option<std::net::SocketAddr>,
    /// /metrics serves the per-endpoint series.
    pub metrics_endpoint_series: bool,
    /// How often the service maps are compared with what was last applied (and repaired).
    pub drift_check: Duration,
}

/// Where and for whom the socket hooks translate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketLb {
    /// `lb_common::sock_mode::HOST_ONLY` or `ALL`.
    pub mode: u32,
    /// The cgroup v2 directory they attach to.
    pub cgroup_root: PathBuf,
}

/// How the datapath runs, as the operator chose.
#[derive(Clone, Copy, Debug)]
pub struct DatapathOptions {
    pub capacity: datapath::Capacity,
    /// New flows are refused above this share of the conntrack capacity (percent).
    pub admit_percent: u32,
    /// `lb_common::mode::*`
    pub mode: u32,
    /// Where in skb->mark the netfilter mode's 16-bit hand-over to tc egress lives.
    pub mark_shift: u32,
    pub maglev: crate::reconcile::MaglevSize,
}

// Datapath and map errors carry aya's sizeable errors: boxed, so Result stays small.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Datapath(Box<datapath::Error>),
    #[error(transparent)]
    Maps(Box<crate::datapath::maps::Error>),
    #[error("attaching XDP to uplink {iface}: {source}")]
    Uplink {
        iface: String,
        #[source]
        source: Box<datapath::Error>,
    },
    #[error("waiting on netlink or the datapath log: {0}")]
    Poll(#[source] io::Error),
    #[error("serving /metrics on --metrics-bind-address {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14) for --socket-lb: {0}")]
    NetnsCookie(#[source] io::Error),
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
    #[error("serving health on --healthz-bind-address {addr}: {source}")]
    HealthBind {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl From<datapath::Error> for Error {
    fn from(e: datapath::Error) -> Self {
        Error::Datapath(Box::new(e))
    }
}

impl From<crate::datapath::maps::Error> for Error {
    fn from(e: crate::datapath::maps::Error) -> Self {
        Error::Maps(Box::new(e))
    }
}

fn datapath_config(node: &NodeInfo, local: LocalDetect, datapath: &DatapathOptions, snat_ports: (u16, u16)) -> Config {
    let pods = local.cidr();
    let entries = datapath.capacity.conntrack_entries as u64;
    Config {
        // node_info never returns a node without an address.
        node_addr_be: addr_be(node.addresses[0]),
        local_addr_be: addr_be(pods.network()),
        local_prefix_len: u32::from(pods.prefix_len()),
        pods_addr_be: addr_be(pods.network()),
        pods_prefix_len: u32::from(pods.prefix_len()),
        mode: datapath.mode,
        ct_admit_limit: (entries * datapath.admit_percent.min(100) as u64 / 100) as u32,
        mark_shift: datapath.mark_shift,
        snat_port_min: snat_ports.0,
        snat_port_max: snat_ports.1,
        _pad: 0,
    }
}

/// Runs until `shutdown` resolves. The datapath keeps running after the agent exits.
pub async fn run(cfg: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    // Bound first: a taken address is reported before the datapath is touched.
    let metrics = AgentMetrics::default().with_endpoint_series(cfg.metrics_endpoint_series);
    let _metrics_server = match cfg.metrics_bind_address {
        Some(addr) => Some(
            metrics::serve(addr, cfg.pin_dir.clone(), metrics.clone())
                .await
                .map_err(|source| Error::Metrics { addr, source })?,
        ),
        None => None,
    };
    let mut dp = Datapath::load(&cfg.pin_dir, cfg.datapath.capacity)?;
    for iface in &cfg.uplinks {
        dp.attach_uplink(iface).map_err(|source| Error::Uplink { iface: iface.clone(), source: Box::new(source) })?;
    }
    match &cfg.sockets {
        Some(sockets) => {
            let host_netns_cookie = datapath::sockets::netns_cookie().map_err(Error::NetnsCookie)?;
            dp.attach_sockets(&sockets.cgroup_root, SockConfig { host_netns_cookie, mode: sockets.mode, _pad: 0 })?;
            let mode = if sockets.mode == lb_common::sock_mode::HOST_ONLY { "host-only" } else { "all" };
            info!(cgroup = %sockets.cgroup_root.display(), mode, "socket hooks attached");
        }
        None => match dp.detach_sockets()? {
            0 => {}
            open => info!(open, "socket hooks detached but for sock_release, until the sockets they track close"),
        },
    }
    let logger = dp.take_logger()?;
    // SAFETY: the logger owns its ring buffer fd, which stays open as long as it lives.
    let mut kernel_log = unsafe { AsyncFd::register(logger) }.map_err(|e| Error::Poll(e.into()))?;
    let mut store = PinnedMaps::open(&cfg.pin_dir)?;
    let mut reconciler = Reconciler::adopt(&store)?;
    reconciler.set_maglev_size(cfg.datapath.maglev);
    let health_state = HealthState::default();
    let health_listener = tokio::net::TcpListener::bind(cfg.healthz_bind)
        .await
        .map_err(|source| Error::HealthBind { addr: cfg.healthz_bind, source })?;
    let health_server = health::serve(health_listener, health_state.clone());
    let (datapath_options, snat_ports) = (cfg.datapath, cfg.snat_ports);
    let required = match cfg.source {
        Source::Manifests(_) => vec![ObjectKind::Service, ObjectKind::Slice, ObjectKind::Endpoints, ObjectKind::Node],
        Source::Cluster(_) => vec![ObjectKind::Service, ObjectKind::Slice, ObjectKind::Node],
    };
    let mut sync = Sync::new(
        cfg.node.clone(),
        cfg.options.clone(),
        required,
        Box::new(move |node, local| datapath_config(node, local, &datapath_options, snat_ports)),
        health_state.clone(),
    );
    let mut source = match &cfg.source {
        Source::Manifests(path) => Feed::manifests(path),
        Source::Cluster(api) => Feed::cluster(api, &cfg.node.name).await?,
    };
    let mut health = HealthServers::new(health_state, std::net::Ipv4Addr::UNSPECIFIED.into());
    let mut attached = BTreeSet::new();
    let socket = link_events_socket().map_err(Error::Poll)?;
    // SAFETY: the OwnedFd moves into the AsyncFd and stays open for its whole life.
    let links = unsafe { AsyncFd::register(socket) }.map_err(|e| Error::Poll(e.into()))?;
    info!(pin_dir = %cfg.pin_dir.display(), uplinks = ?cfg.uplinks, healthz = %cfg.healthz_bind, "agent started");
    let sweeper = Sweeper::start(Conntrack::open(&cfg.pin_dir)?);
    let mut status = StatusWriter::start(&cfg.pin_dir)?;
    let mut drift_check = tokio::time::interval_at(tokio::time::Instant::now() + cfg.drift_check, cfg.drift_check);
    drift_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drift_probe: Option<DriftProbe> = None;
    tokio::pin!(shutdown);
    attach_pod_devices(&mut dp, &cfg, &mut attached);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            ready = kernel_log.readable_mut() => {
                if let Ok(mut guard) = ready {
                    // Clear first: anything arriving while we drain makes it ready again.
                    guard.clear_ready();
                    guard.get_inner_mut().flush();
                }
            }
            ready = links.readable() => {
                if let Ok(mut guard) = ready {
                    // Clear first: an event arriving while we drain makes it ready again.
                    guard.clear_ready();
                    drain(links.get_ref());
                }
                attach_pod_devices(&mut dp, &cfg, &mut attached);
            }
            due = source.next(&mut sync) => {
                if !due {
                    continue;
                }
                let started = std::time::Instant::now();
                let step = sync.step(&mut reconciler, &mut store);
                let report = SyncReport {
                    took: started.elapsed(),
                    wrote: step.wrote,
                    failed: step.failed,
                    frontends: sync.desired().frontends.len(),
                    problems: sync.problems(),
                    latencies: step.latencies,
                    last_queued: step.last_queued,
                    no_local_endpoints: step.no_local_endpoints,
                };
                status.synced(&report);
                metrics.synced(&report);
                metrics.update_endpoint_nodes(step.endpoint_nodes);
                sweeper.forget(step.flow_cleanups);
                source.after_sync(sync.needs_retry());
                if let Some(checks) = step.health_checks {
                    health.update(&checks).await;
                }
            }
            _ = drift_check.tick(), if drift_probe.is_none() => {
                // A sync due again would write anyway; only applied state is compared. The
                // comparison reads every service map (tens of milliseconds at 10k Services):
                // it runs beside the loop, which keeps serving changes meanwhile.
                if let Some(desired) = sync.applied() {
                    drift_probe = Some(spawn_drift_probe(&cfg.pin_dir, desired.clone(), cfg.datapath.maglev));
                }
            }
            probe = async { drift_probe.as_mut().expect("guarded").await }, if drift_probe.is_some() => {
                drift_probe = None;
                match probe {
                    Ok(Ok(0)) => metrics.drift_checked(0),
                    // Against the state as it was: check again, and repair, with what is
                    // applied now (a sync since may have written it already).
                    Ok(Ok(_)) => {
                        if let Some(desired) = sync.applied() {
                            repair_drift(&mut reconciler, desired, &mut store, &metrics);
                        }
                    }
                    Ok(Err(e)) => warn!("checking the maps for drift: {e}"),
                    Err(e) => warn!("checking the maps for drift: {e}"),
                }
            }
        }
    }
    health_server.abort();
    info!("agent stopping; the datapath keeps running from its pins");
    Ok(())
}

/// How many frontends differ from the desired state in the maps, found on a thread of its own.
type DriftProbe = tokio::task::JoinHandle<Result<usize, datapath::maps::Error>>;

fn spawn_drift_probe(pin_dir: &std::path::Path, desired: Desired, maglev: crate::reconcile::MaglevSize) -> DriftProbe {
    let pin_dir = pin_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let maps = datapath::maps::Contents::read(&PinnedMaps::open(&pin_dir)?)?;
        Ok(crate::reconcile::drift::drift(&desired, &maps, maglev).len())
    })
}

/// Writes back what changed in the service maps behind the agent's back (an operator's
/// bpftool edit, a lost write), logging and counting each frontend repaired.
fn repair_drift(reconciler: &mut Reconciler, desired: &Desired, store: &mut PinnedMaps, metrics: &AgentMetrics) {
    match reconciler.repair(desired, store) {
        Ok(None) => metrics.drift_checked(0),
        Ok(Some(repair)) => {
            for d in &repair.drift {
                warn!("the maps changed behind the agent's back; repairing {d}");
            }
            for failure in &repair.changes.failures {
                warn!("repairing drift: {failure}");
            }
            info!(frontends = repair.frontends(), written = repair.changes.services_written, "drift repaired");
            metrics.drift_checked(repair.frontends());
        }
        Err(e) => warn!("checking the maps for drift: {e}"),
    }
}

fn attach_pod_devices(dp: &mut Datapath, cfg: &AgentConfig, attached: &mut BTreeSet<String>) {
    let present: BTreeSet<String> = interface_names().into_iter().filter(|n| cfg.pod_devices.is_match(n)).collect();
    // A deleted device took its attachment with it; only the pin is left to remove.
    attached.retain(|n| present.contains(n));
    match dp.prune_pod_links(&present) {
        Ok(gone) => gone.iter().for_each(|d| info!(device = %d, "device gone; unpinned its pod-side link")),
        Err(e) => warn!("pruning links of deleted pod devices: {e}"),
    }
    for name in present {
        if attached.contains(&name) {
            continue;
        }
        match dp.attach_pod_device(&name) {
            Ok(()) => {
                info!(device = %name, "attached pod-side program");
                attached.insert(name);
            }
            Err(e) => warn!(device = %name, "attaching pod-side program: {e}"),
        }
    }
}

/// Interfaces of the current network namespace.
fn interface_names() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            out.push(CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// A netlink socket subscribed to link events; any message means "rescan devices".
fn link_events_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket/bind calls with a zeroed, filled-in sockaddr_nl.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        let rc = libc::bind(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 8192];
    // SAFETY: recv into a local buffer on a non-blocking socket.
    while unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) } > 0 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_sweep_waits_nine_times_as_long_and_a_quick_one_two_seconds() {
        assert_eq!(pause_after_sweep(Duration::from_millis(30)), CONNTRACK_SWEEP);
        assert_eq!(pause_after_sweep(Duration::from_millis(700)), Duration::from_millis(6300));
    }
}
