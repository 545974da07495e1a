//! Needs root and BPF: builds a lab, loads the real programs into a node namespace with the
//! CLI, sends real packets, and reads the counter map that saw them. Fails, never skips,
//! without root.
use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::Command,
};

use lb_common::map_names;
use lb_tests::{
    agent::lb_user_bin,
    counter,
    lab::{Lab, Spec},
    traffic::udp_ask,
    Pins,
};

fn lb_user(args: &[&str]) -> String {
    let out = Command::new(lb_user_bin().unwrap()).args(args).output().unwrap();
    assert!(out.status.success(), "lb-user {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Loads the programs into the lab's node with the CLI; unloaded when the Pins drop.
fn load(lab: &Lab) -> Pins {
    let node = &lab.nodes[0];
    let pins = Pins::new(&node.ns.name);
    lb_user(&["--netns", &node.ns.name, "load", "--pin-dir", &pins.0.display().to_string(), "--iface", "eth0"]);
    pins
}

#[test]
fn loaded_programs_count_real_packets_and_unload_cleanly() {
    lb_tests::require_root();
    let lab = Lab::build("lbt", &Spec { pods_per_node: vec![0], clients: 1, ..Spec::default() }).unwrap();
    let node = &lab.nodes[0];
    let pins = load(&lab);
    // Loading again replaces the attachment instead of stacking a second one.
    let _same_pins = load(&lab);
    let pin_dir = pins.0.display().to_string();
    let xdp = node.ns.exec("ip", &["-d", "link", "show", "eth0"]).unwrap();
    assert_eq!(xdp.matches("prog/xdp").count(), 1, "{xdp}");

    let before = counter(&pins.0, "pass_not_service");
    // UDP to a port nobody serves: the node answers port unreachable, which the client
    // sees as an error; what matters is that the packets crossed the XDP program.
    for _ in 0..5 {
        let _ = udp_ask(&lab.clients[0].ns.name, "0.0.0.0:0".parse().unwrap(), SocketAddrV4::new(node.addr, 9));
    }
    let after = counter(&pins.0, "pass_not_service");
    assert!(after >= before + 5, "XDP counted {} non-service IPv4 packets, expected at least 5", after - before);
    assert!(counter(&pins.0, "pass_not_ipv4") > 0, "ARP from the client was counted as not IPv4");

    let text = lb_user(&["counters", "--pin-dir", &pin_dir]);
    assert!(text.contains("pass_not_service"), "{text}");

    lb_user(&["unload", "--pin-dir", &pin_dir]);
    assert!(!pins.0.exists());
    let link = node.ns.exec("ip", &["-d", "link", "show", "eth0"]).unwrap();
    assert!(!link.contains("prog/xdp"), "unload detached XDP: {link}");
}

#[test]
fn pinned_maps_print_named_fields_with_bpftool() {
    lb_tests::require_root();
    let lab = Lab::build("lbt", &Spec { pods_per_node: vec![0], ..Spec::default() }).unwrap();
    let pins = load(&lab);
    let pin_dir = pins.0.display().to_string();
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned", &format!("{pin_dir}/maps/{}", map_names::CONFIG)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    for field in ["\"node_addr_be\"", "\"snat_port_min\"", "\"local_prefix_len\"", "\"ct_admit_limit\""] {
        assert!(text.contains(field), "bpftool shows {field}: {text}");
    }
    // Every pinned map carries BTF for its key and value types.
    for name in map_names::ALL {
        let out = Command::new("bpftool")
            .args(["map", "show", "pinned", &format!("{pin_dir}/maps/{name}")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(name) && text.contains("btf_id"), "{name} has BTF: {text}");
    }
}

#[test]
fn a_pinned_map_of_another_layout_is_refused_not_adopted() {
    lb_tests::require_root();
    let ns = lb_tests::lab::Netns::new("lbt", "layout").unwrap();
    let pins = Pins::new(&ns.name);
    let maps = pins.0.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    // As an older build might have left it: LB_SERVICES with a 4-byte key.
    let path = maps.join(map_names::SERVICES);
    let created = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&path)
        .args(["type", "hash", "key", "4", "value", "20", "entries", "65536", "name", map_names::SERVICES])
        .status()
        .unwrap();
    assert!(created.success());
    // `lo` of the test's own namespace: nothing is attached in the machine's (the shape
    // check refuses first anyway).
    let out = Command::new(lb_user_bin().unwrap())
        .args(["--netns", &ns.name, "load", "--pin-dir"])
        .arg(&pins.0)
        .args(["--iface", "lo"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}: key size is 4, this agent (its build or its options) expects 8", path.display())),
        "the error names the map and the field: {stderr}"
    );
}

/// Runs `lb-user unload --pin-dir DIR`, expecting a refusal: its error text.
fn refused_unload(dir: &Path) -> String {
    let out = Command::new(lb_user_bin().unwrap()).args(["unload", "--pin-dir"]).arg(dir).output().unwrap();
    assert!(!out.status.success(), "unload of {} was refused", dir.display());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A directory the test owns, removed (whatever it holds) on drop.
struct OwnedDir(PathBuf);

impl Drop for OwnedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn unload_refuses_a_directory_that_is_not_on_bpffs() {
    lb_tests::require_root();
    let dir = OwnedDir(std::env::temp_dir().join(format!("lbt-not-bpffs-{}", std::process::id())));
    std::fs::create_dir_all(dir.0.join("maps")).unwrap();
    std::fs::write(dir.0.join("maps").join(map_names::SERVICES), "not a pin").unwrap();
    let stderr = refused_unload(&dir.0);
    assert!(
        stderr.contains(&format!("--pin-dir {} is not on a bpf filesystem", dir.0.display())),
        "the error names the directory: {stderr}"
    );
    assert!(dir.0.join("maps").join(map_names::SERVICES).exists(), "nothing was removed");
}

#[test]
fn unload_refuses_a_pin_directory_holding_a_foreign_pin_and_removes_nothing() {
    lb_tests::require_root();
    lb_user::datapath::ensure_bpffs().unwrap();
    let dir = OwnedDir(PathBuf::from(format!("/sys/fs/bpf/lbt-foreign-{}", std::process::id())));
    let maps = dir.0.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let pin_map = |name: &str| {
        let created = Command::new("bpftool")
            .args(["map", "create"])
            .arg(maps.join(name))
            .args(["type", "array", "key", "4", "value", "4", "entries", "1", "name", "lbt_map"])
            .status()
            .unwrap();
        assert!(created.success(), "bpftool map create {name}");
    };
    // One of ours and one that is not.
    pin_map(map_names::CONFIG);
    pin_map("SOMEONE_ELSES");
    let stderr = refused_unload(&dir.0);
    let foreign = maps.join("SOMEONE_ELSES");
    assert!(
        stderr.contains(&format!("{}: not a pin of lb-user", foreign.display())),
        "the error names the foreign pin: {stderr}"
    );
    assert!(maps.join(map_names::CONFIG).exists() && foreign.exists(), "nothing was removed");
    // Without the stranger, the directory is ours and goes (`uninstall` is the same command,
    // under the name the DaemonSet's removal notes use).
    std::fs::remove_file(&foreign).unwrap();
    lb_user(&["uninstall", "--pin-dir", &dir.0.display().to_string()]);
    assert!(!dir.0.exists(), "unload removed our pins and the directory");
}

#[test]
fn a_panicking_test_leaves_no_namespace_behind() {
    lb_tests::require_root();
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::build("lbt", &Spec { pods_per_node: vec![1], clients: 1, ..Spec::default() }).unwrap();
        names.lock().unwrap().extend([
            lab.segment.name.clone(),
            lab.nodes[0].ns.name.clone(),
            lab.nodes[0].pods[0].ns.name.clone(),
            lab.clients[0].ns.name.clone(),
        ]);
        panic!("a test failing halfway");
    });
    assert!(result.is_err());
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 4);
    for name in names {
        assert!(!listed.contains(&name), "{name} was left behind");
    }
}
