//! Support for integration tests, the demo and benchmarks: closed labs of network
//! namespaces, traffic endpoints inside them, the agent as a process, packet fixtures.
pub mod agent;
pub mod bench;
pub mod cluster;
pub mod fixture;
pub mod lab;
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
