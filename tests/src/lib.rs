//! Support for integration tests, the demo and benchmarks: closed labs of network
//! namespaces, traffic endpoints inside them, the agent as a process, packet fixtures.
pub mod agent;
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
