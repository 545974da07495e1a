//! The agent in standalone mode: loads and attaches the datapath, adopts the pinned maps,
//! and keeps them equal to the model of the manifests; attaches the pod-side program to
//! every device matching the pattern, including ones created later (netlink link events);
//! serves healthCheckNodePorts for externalTrafficPolicy=Local Services.
use std::{
    collections::BTreeSet,
    ffi::CStr,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use lb_common::{user::addr_be, Config};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{
    datapath::{self, conntrack::Conntrack, maps::PinnedMaps, Datapath},
    model::{self, Desired, NodeInfo, Options},
    reconcile::Reconciler,
    source::manifests::{fingerprint, ManifestCache},
    telemetry::health::HealthServers,
};

/// How often conntrack is swept: often enough that flows a flood left (unanswered SYNs
/// expire in 10 s) free their room soon after they expire.
const CONNTRACK_SWEEP: Duration = Duration::from_secs(2);

/// Sweeps conntrack on a thread of its own: reading a table of a million entries takes a
/// few hundred milliseconds, which the agent's event loop must not wait for.
struct Sweeper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sweeper {
    fn start(mut conntrack: Conntrack) -> Sweeper {
        use std::sync::atomic::Ordering::Relaxed;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Relaxed) {
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
                let deadline = std::time::Instant::now() + CONNTRACK_SWEEP;
                while !stopped.load(Relaxed) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Sweeper { stop, thread: Some(thread) }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct AgentConfig {
    pub pin_dir: PathBuf,
    pub manifests: PathBuf,
    pub node: NodeInfo,
    pub options: Options,
    pub uplinks: Vec<String>,
    /// Glob-like patterns (`lxc*`, `veth*`) naming pod-facing devices.
    pub pod_device_patterns: Vec<String>,
    pub snat_ports: (u16, u16),
    /// How often the manifests are checked for changes.
    pub poll: Duration,
    pub datapath: DatapathOptions,
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
    #[error("node has no IPv4 address for SNAT (give --node-address)")]
    NoNodeAddress,
    #[error("waiting on netlink or the datapath log: {0}")]
    Poll(#[source] io::Error),
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

impl AgentConfig {
    fn datapath_config(&self) -> Result<Config, Error> {
        let node_addr = *self.node.addresses.first().ok_or(Error::NoNodeAddress)?;
        let local = self.options.cluster_cidr;
        let entries = self.datapath.capacity.conntrack_entries as u64;
        Ok(Config {
            node_addr_be: addr_be(node_addr),
            local_addr_be: addr_be(local.addr),
            local_prefix_len: local.prefix_len as u32,
            pods_addr_be: addr_be(local.addr),
            pods_prefix_len: local.prefix_len as u32,
            mode: self.datapath.mode,
            ct_admit_limit: (entries * self.datapath.admit_percent.min(100) as u64 / 100) as u32,
            mark_shift: self.datapath.mark_shift,
            snat_port_min: self.snat_ports.0,
            snat_port_max: self.snat_ports.1,
            _pad: 0,
        })
    }
}

/// Runs until `shutdown` resolves. The datapath keeps running after the agent exits.
pub async fn run(cfg: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    let datapath_config = cfg.datapath_config()?;
    let mut dp = Datapath::load(&cfg.pin_dir, cfg.datapath.capacity)?;
    for iface in &cfg.uplinks {
        dp.attach_uplink(iface).map_err(|source| Error::Uplink { iface: iface.clone(), source: Box::new(source) })?;
    }
    let logger = dp.take_logger()?;
    // SAFETY: the logger owns its ring buffer fd, which stays open as long as it lives.
    let mut kernel_log = unsafe { AsyncFd::register(logger) }.map_err(|e| Error::Poll(e.into()))?;
    let mut store = PinnedMaps::open(&cfg.pin_dir)?;
    let mut reconciler = Reconciler::adopt(&store)?;
    let mut manifests = ManifestCache::default();
    let mut health = HealthServers::default();
    let mut attached = BTreeSet::new();
    let socket = link_events_socket().map_err(Error::Poll)?;
    // SAFETY: the OwnedFd moves into the AsyncFd and stays open for its whole life.
    let links = unsafe { AsyncFd::register(socket) }.map_err(|e| Error::Poll(e.into()))?;
    let mut seen = None;
    let mut synced_once = false;
    let mut last_errors = Vec::new();
    info!(pin_dir = %cfg.pin_dir.display(), uplinks = ?cfg.uplinks, "agent started");
    let _sweeper = Sweeper::start(Conntrack::open(&cfg.pin_dir)?);
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(cfg.poll);
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
            _ = tick.tick() => {
                let now = fingerprint(&cfg.manifests);
                if seen.as_ref() == Some(&now) {
                    continue;
                }
                seen = Some(now);
                let (objects, report) = manifests.read(&cfg.manifests);
                let desired = model::desired_state(&objects, &cfg.node, &cfg.options);
                let mut errors = problems(&report, &desired);
                if report.incomplete && !synced_once {
                    // Adopted state stays whole until the source has been read once.
                    errors.push("keeping the datapath as adopted until the manifests can be read".into());
                    seen = None;
                } else {
                    match reconciler.apply(&desired, datapath_config, &mut store) {
                        Ok(c) => {
                            synced_once = true;
                            // Frontends that failed are retried on the next tick.
                            if !c.failures.is_empty() {
                                seen = None;
                            }
                            info!(frontends = desired.frontends.len(), written = c.services_written, removed = c.services_removed, backends_added = c.backends_added, backends_removed = c.backends_removed, failed = c.failures.len(), "maps synced");
                            errors.extend(c.failures);
                        }
                        Err(e) => {
                            errors.push(format!("writing the datapath config: {e}"));
                            seen = None;
                        }
                    }
                }
                if errors != last_errors {
                    for e in &errors {
                        warn!("{e}");
                    }
                    last_errors = errors;
                }
                if synced_once {
                    health.update(&desired.health_checks).await;
                }
            }
        }
    }
    info!("agent stopping; the datapath keeps running from its pins");
    Ok(())
}

fn problems(report: &crate::source::manifests::Report, desired: &Desired) -> Vec<String> {
    report.errors.iter().map(|e| e.to_string()).chain(desired.errors.iter().map(|e| e.to_string())).collect()
}

fn attach_pod_devices(dp: &mut Datapath, cfg: &AgentConfig, attached: &mut BTreeSet<String>) {
    let present: BTreeSet<String> =
        interface_names().into_iter().filter(|n| cfg.pod_device_patterns.iter().any(|p| glob_match(p, n))).collect();
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

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob_match(rest, &tail[i..]))
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
    use super::glob_match;

    #[test]
    fn device_patterns() {
        assert!(glob_match("lxc*", "lxc12ab"));
        assert!(glob_match("veth*", "veth"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("cali*x", "cali123x"));
        assert!(!glob_match("cali*x", "cali123y"));
        assert!(glob_match("eth0", "eth0"));
    }
}
