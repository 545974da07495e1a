//! Support for integration tests, the demo and benchmarks: closed labs of network
//! namespaces, traffic endpoints inside them, the agent as a process, packet fixtures.
pub mod agent;
pub mod api_cluster;
pub mod bench;
pub mod cgroup;
pub mod client;
pub mod cluster;
pub mod fake_api;
pub mod fixture;
pub mod lab;
pub mod metrics;
pub mod packet;
pub mod traffic;

/// Tests that load BPF programs or build labs need root. They fail (never skip) without it.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF) to create network namespaces and load BPF programs; run it as root (CI does)");
}

/// A pin directory owned by a test: everything under it is detached and unpinned on drop,
/// also when the test panics.
pub struct Pins(pub std::path::PathBuf);

impl Pins {
    /// `/sys/fs/bpf/<name>`.
    pub fn new(name: &str) -> Pins {
        Pins(std::path::PathBuf::from(format!("/sys/fs/bpf/{name}")))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = lb_user::datapath::unload(&self.0);
    }
}

/// A datapath counter (`lb_common::counters` label), summed over CPUs.
pub fn counter(pin_dir: &std::path::Path, label: &str) -> u64 {
    let counters = lb_user::datapath::read_counters(pin_dir).expect("counters map");
    counters.iter().find(|(l, _)| *l == label).unwrap_or_else(|| panic!("no counter {label}")).1.packets
}

/// A frontend's traffic (LB_FE_STATS), summed over CPUs; a socket-level translation counts
/// as one packet of no bytes.
pub fn frontend_stats(pin_dir: &std::path::Path, frontend: lb_common::ServiceKey) -> lb_common::FrontendStats {
    use aya::maps::{HashMap, MapData, PerCpuArray};
    use lb_common::{map_names, FrontendStats, ServiceValue};
    let services: HashMap<MapData, lb_common::ServiceKey, ServiceValue> =
        lb_user::datapath::open_map(pin_dir, map_names::SERVICES).unwrap().try_into().unwrap();
    let id = services.get(&frontend, 0).expect("the frontend is in LB_SERVICES").svc_id;
    let stats: PerCpuArray<MapData, FrontendStats> =
        lb_user::datapath::open_map(pin_dir, map_names::FRONTEND_STATS).unwrap().try_into().unwrap();
    stats.get(&id, 0).unwrap().iter().fold(FrontendStats::default(), |t, c| FrontendStats {
        packets: t.packets + c.packets,
        bytes: t.bytes + c.bytes,
        new_flows: t.new_flows + c.new_flows,
    })
}

/// The ids LB_BACKENDS gives an endpoint (one per Service port using it).
fn backend_ids(pin_dir: &std::path::Path, endpoint: std::net::SocketAddrV4) -> Vec<u32> {
    use aya::maps::{Array, MapData};
    let backends: Array<MapData, lb_common::Backend> =
        lb_user::datapath::open_map(pin_dir, lb_common::map_names::BACKENDS).unwrap().try_into().unwrap();
    let want = lb_common::Backend::new(*endpoint.ip(), endpoint.port(), false, 0);
    (0..backends.len())
        .filter(|i| backends.get(i, 0).is_ok_and(|b| (b.addr_be, b.port_be) == (want.addr_be, want.port_be)))
        .collect()
}

/// An endpoint's traffic (LB_BE_STATS) over every Service port using it, summed over CPUs.
pub fn backend_stats(pin_dir: &std::path::Path, endpoint: std::net::SocketAddrV4) -> lb_common::BackendStats {
    use aya::maps::{MapData, PerCpuArray};
    let stats: PerCpuArray<MapData, lb_common::BackendStats> =
        lb_user::datapath::open_map(pin_dir, lb_common::map_names::BACKEND_STATS).unwrap().try_into().unwrap();
    let mut total = lb_common::BackendStats::default();
    for id in backend_ids(pin_dir, endpoint) {
        for c in stats.get(&id, 0).unwrap().iter() {
            total.packets += c.packets;
            total.bytes += c.bytes;
            total.new_flows += c.new_flows;
        }
    }
    total
}

/// An endpoint's open flows (LB_BE_LIVE) over every Service port using it.
pub fn backend_live(pin_dir: &std::path::Path, endpoint: std::net::SocketAddrV4) -> u64 {
    use aya::maps::{Array, MapData};
    let live: Array<MapData, u64> =
        lb_user::datapath::open_map(pin_dir, lb_common::map_names::BACKEND_LIVE).unwrap().try_into().unwrap();
    backend_ids(pin_dir, endpoint).iter().map(|id| live.get(id, 0).unwrap()).sum()
}
