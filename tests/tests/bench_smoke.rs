//! Needs root and BPF. The end-to-end benchmark in its smoke mode (one short round, a table
//! of 20 000 conntrack entries): it builds its lab and cgroups, every row is measured and its
//! counters agree with the path it claims (the binary exits non-zero otherwise), and the sweep
//! removes exactly the flows planted expired. The figures are `cargo xtask bench`'s.
use std::process::Command;

#[test]
fn the_end_to_end_benchmark_measures_every_row_on_the_path_it_claims() {
    lb_tests::require_root();
    let out = Command::new(env!("CARGO_BIN_EXE_bench_e2e")).arg("--smoke").output().expect("running bench_e2e");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // Each measured row's proof, as the first call's counters showed it.
    let proof = |row: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("  {row}: ")))
            .unwrap_or_else(|| panic!("no measured row {row:?}:\n{text}"))
            .to_string()
    };
    for from in ["pod", "node"] {
        for exchange in ["TCP keep-alive", "TCP conn/request"] {
            let direct = proof(&format!("{from}, {exchange}: direct"));
            assert!(
                direct.starts_with("new_flow +0, established/reply/egress_rewritten +0, sock_connect +0"),
                "{direct}"
            );
            let socket = proof(&format!("{from}, {exchange}: ClusterIP, socket-LB on"));
            assert!(
                socket.starts_with("new_flow +0, established/reply/egress_rewritten +0, sock_connect +"),
                "{socket}"
            );
            assert!(!socket.contains("sock_connect +0"), "{socket}");
        }
    }
    for exchange in ["TCP keep-alive", "TCP conn/request", "UDP"] {
        let per_packet = proof(&format!("pod, {exchange}: ClusterIP, socket-LB off"));
        assert!(!per_packet.starts_with("new_flow +0") && per_packet.contains("sock_connect +0"), "{per_packet}");
    }
    assert!(text.contains("removed 2500 flows = the 2500 planted expired"), "{text}");
}
