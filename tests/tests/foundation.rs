//! Needs root and BPF: builds a lab, loads the real programs into a node namespace with the
//! CLI, sends real packets, and reads the counter map that saw them. Fails, never skips,
//! without root.
use std::{net::SocketAddrV4, process::Command};

use aya::maps::PerCpuArray;
use lb_common::{counters, map_names};
use lb_tests::{
    agent::lb_user_bin,
    lab::{Lab, Spec},
    traffic::udp_ask,
};

fn lb_user(args: &[&str]) -> String {
    let out = Command::new(lb_user_bin().unwrap())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lb-user {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn counter(pin_dir: &str, index: u32) -> u64 {
    let map =
        lb_user::datapath::open_map(std::path::Path::new(pin_dir), map_names::COUNTERS).unwrap();
    let counters: PerCpuArray<_, counters::Counter> = PerCpuArray::try_from(map).unwrap();
    counters
        .get(&index, 0)
        .unwrap()
        .iter()
        .map(|c| c.packets)
        .sum()
}

#[test]
fn loaded_programs_count_real_packets_and_unload_cleanly() {
    lb_tests::require_root();
    let lab = Lab::build(
        "lbt",
        &Spec {
            pods_per_node: vec![0],
            clients: 1,
        },
    )
    .unwrap();
    let node = &lab.nodes[0];
    let pin_dir = format!("/sys/fs/bpf/{}", node.ns.name);
    lb_user(&[
        "--netns",
        &node.ns.name,
        "load",
        "--pin-dir",
        &pin_dir,
        "--iface",
        "eth0",
    ]);
    // Loading again replaces the attachment instead of stacking a second one.
    lb_user(&[
        "--netns",
        &node.ns.name,
        "load",
        "--pin-dir",
        &pin_dir,
        "--iface",
        "eth0",
    ]);
    let xdp = node.ns.exec("ip", &["-d", "link", "show", "eth0"]).unwrap();
    assert_eq!(xdp.matches("prog/xdp").count(), 1, "{xdp}");

    let before = counter(&pin_dir, counters::PASS_NOT_SERVICE);
    // UDP to a port nobody serves: the node answers port unreachable, which the client
    // sees as an error; what matters is that the packets crossed the XDP program.
    for _ in 0..5 {
        let _ = udp_ask(
            &lab.clients[0].ns.name,
            "0.0.0.0:0".parse().unwrap(),
            SocketAddrV4::new(node.addr, 9),
        );
    }
    let after = counter(&pin_dir, counters::PASS_NOT_SERVICE);
    assert!(
        after >= before + 5,
        "XDP counted {} non-service IPv4 packets, expected at least 5",
        after - before
    );
    assert!(
        counter(&pin_dir, counters::PASS_NOT_IPV4) > 0,
        "ARP from the client was counted as not IPv4"
    );

    let text = lb_user(&["counters", "--pin-dir", &pin_dir]);
    assert!(text.contains("pass_not_service"), "{text}");

    lb_user(&["unload", "--pin-dir", &pin_dir]);
    assert!(!std::path::Path::new(&pin_dir).exists());
    let link = node.ns.exec("ip", &["-d", "link", "show", "eth0"]).unwrap();
    assert!(!link.contains("prog/xdp"), "unload detached XDP: {link}");
}

#[test]
fn pinned_maps_print_named_fields_with_bpftool() {
    lb_tests::require_root();
    let lab = Lab::build(
        "lbt",
        &Spec {
            pods_per_node: vec![0],
            clients: 0,
        },
    )
    .unwrap();
    let node = &lab.nodes[0];
    let pin_dir = format!("/sys/fs/bpf/{}", node.ns.name);
    lb_user(&[
        "--netns",
        &node.ns.name,
        "load",
        "--pin-dir",
        &pin_dir,
        "--iface",
        "eth0",
    ]);
    let out = Command::new("bpftool")
        .args([
            "map",
            "dump",
            "pinned",
            &format!("{pin_dir}/maps/{}", map_names::CONFIG),
        ])
        .output()
        .unwrap();
    lb_user(&["unload", "--pin-dir", &pin_dir]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for field in [
        "\"node_addr_be\"",
        "\"snat_port_min\"",
        "\"cluster_cidr_prefix_len\"",
    ] {
        assert!(text.contains(field), "bpftool shows {field}: {text}");
    }
}
