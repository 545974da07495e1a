//! Closed topologies of network namespaces. Nothing is connected to the root namespace and
//! no namespace has a route out of the lab. Every namespace is named uniquely (pid +
//! counter) and deleted by a Drop guard, which also removes the veths inside it.
//!
//! Addressing: the L2 segment is 192.168.50.0/24 (node i at .10+i, client c at .100+c);
//! node i routes pods 10.244.(i+1).0/24, pod j of node i is 10.244.(i+1).(10+j) behind the
//! node's device `veth<j>`; LoadBalancer and external IPs live in 192.168.60.0/24, which
//! clients route via node 0 (as a cloud LB or BGP would).
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{links::FdLink, xdp::XdpLinkId, Xdp, XdpMode},
    Ebpf,
};
use lb_common::program_names;

pub const SEGMENT_PREFIX: u8 = 24;
pub const LB_POOL: &str = "192.168.60.0/24";
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Runs a command, failing with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace owned by the current test; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    keep: bool,
}

impl Netns {
    /// A new namespace named `<prefix>-<pid>-<n>-<role>`.
    pub fn new(prefix: &str, role: &str) -> Result<Self> {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        // Only the tests' own: a lab kept by `lab up` outlives its process on purpose.
        if prefix == "lbt" {
            SWEPT.call_once(|| remove_stale(prefix));
        }
        let name = format!("{prefix}-{}-{}-{role}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name, keep: false };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a program inside the namespace (`ip netns exec`; not for anything that pins
    /// BPF objects, since it remounts /sys).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn sysctl(&self, key_value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", key_value]).map(drop)
    }

    /// NAPI on receive, which a veth needs to take frames sent to it with XDP_TX. With
    /// `complete_checksums`, also checksums completed on transmit, as a wire carries them;
    /// otherwise the veth keeps its default, handing partial checksums (CHECKSUM_PARTIAL) to
    /// its peer as pods and veth uplinks (kind clusters) do.
    pub fn as_wire(&self, dev: &str, complete_checksums: bool) -> Result<()> {
        let tx = if complete_checksums { "off" } else { "on" };
        self.exec("ethtool", &["-K", dev, "tx", tx, "gro", "on"]).map(drop)
    }

    /// Keep the namespace after drop (for `lab up`).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.keep {
            let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        }
    }
}

/// Runs `f` on a thread inside the namespace; sockets it opens live there.
pub fn in_netns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        lb_user::netns::enter(&ns).unwrap_or_else(|e| panic!("{e}"));
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// What to build.
#[derive(Clone, Debug, Default)]
pub struct Spec {
    /// Pods on each node; the number of entries is the number of nodes.
    pub pods_per_node: Vec<usize>,
    pub clients: usize,
    /// Turn transmit checksum offload off on every veth (by default the devices keep
    /// theirs, and packets carry partial checksums as real pods' do).
    pub complete_checksums: bool,
    /// Pod networks reach each other through a VXLAN overlay (`vxlan0` on each node, as
    /// flannel's vxlan backend sets it up) instead of routes via the nodes' addresses.
    pub overlay: bool,
}

#[derive(Debug)]
pub struct Pod {
    pub ns: Netns,
    pub addr: Ipv4Addr,
    /// The pod-facing device on its node.
    pub host_device: String,
}

#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub addr: Ipv4Addr,
    pub uplink: &'static str,
    pub pods: Vec<Pod>,
}

#[derive(Debug)]
pub struct Client {
    pub ns: Netns,
    pub addr: Ipv4Addr,
}

/// A built lab. Fields drop in declaration order: pods and nodes, clients, the segment.
pub struct Lab {
    pub nodes: Vec<Node>,
    pub clients: Vec<Client>,
    wire_xdp: Option<WireXdp>,
    pub segment: Netns,
    complete_checksums: bool,
}

/// The pass-through XDP program on the segment's ports (see `lb_xdp_pass`).
struct WireXdp {
    ebpf: Ebpf,
    links: Vec<(String, XdpLinkId)>,
}

/// Where a kept lab pins its segment ports' XDP links (`lab up`; `lab down` removes them).
pub fn wire_pin_dir(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{prefix}-lab-wire"))
}

pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 50, 10 + i as u8)
}

pub fn pod_addr(node: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node as u8 + 1, 10 + pod as u8)
}

impl Lab {
    pub fn build(prefix: &str, spec: &Spec) -> Result<Lab> {
        let segment = Netns::new(prefix, "seg")?;
        segment.ip(&["link", "add", "br0", "type", "bridge"])?;
        segment.ip(&["link", "set", "br0", "up"])?;
        let mut lab = Lab {
            nodes: Vec::new(),
            clients: Vec::new(),
            wire_xdp: None,
            segment,
            complete_checksums: spec.complete_checksums,
        };
        let n = spec.pods_per_node.len();
        for (i, pods) in spec.pods_per_node.iter().enumerate() {
            let node = lab.add_node(prefix, i, n, spec.overlay)?;
            lab.nodes.push(node);
            for j in 0..*pods {
                let pod = lab.add_pod(prefix, i, j)?;
                lab.nodes[i].pods.push(pod);
            }
        }
        for c in 0..spec.clients {
            let client = lab.add_client(prefix, c)?;
            lab.clients.push(client);
        }
        let ports: Vec<String> =
            (0..n).map(|i| format!("n{i}")).chain((0..spec.clients).map(|c| format!("c{c}"))).collect();
        lab.wire_xdp = Some(attach_wire_xdp(&lab.segment.name, ports)?);
        Ok(lab)
    }

    /// A veth from `ns` (named `dev`) to a port of the segment's bridge.
    fn plug(&self, ns: &Netns, dev: &str, port: &str) -> Result<()> {
        ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", port, "netns", &self.segment.name])?;
        self.segment.ip(&["link", "set", port, "master", "br0", "up"])?;
        self.segment.as_wire(port, self.complete_checksums)?;
        ns.as_wire(dev, self.complete_checksums)?;
        ns.ip(&["link", "set", dev, "up"])?;
        Ok(())
    }

    fn add_node(&self, prefix: &str, i: usize, nodes: usize, overlay: bool) -> Result<Node> {
        let name = format!("node{}", i + 1);
        let ns = Netns::new(prefix, &name)?;
        self.plug(&ns, "eth0", &format!("n{i}"))?;
        let addr = node_addr(i);
        ns.ip(&["addr", "add", &format!("{addr}/{SEGMENT_PREFIX}"), "dev", "eth0"])?;
        for key in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
            ns.sysctl(key)?;
        }
        if overlay {
            add_vxlan(&ns, i, nodes)?;
        } else {
            for k in (0..nodes).filter(|k| *k != i) {
                ns.ip(&["route", "add", &format!("10.244.{}.0/24", k + 1), "via", &node_addr(k).to_string()])?;
            }
        }
        Ok(Node { name, ns, addr, uplink: "eth0", pods: Vec::new() })
    }

    /// Adds a pod to node `i` (also while an agent runs there).
    pub fn add_pod_to(&mut self, prefix: &str, i: usize) -> Result<&Pod> {
        let j = self.nodes[i].pods.len();
        let pod = self.add_pod(prefix, i, j)?;
        self.nodes[i].pods.push(pod);
        Ok(&self.nodes[i].pods[j])
    }

    fn add_pod(&self, prefix: &str, i: usize, j: usize) -> Result<Pod> {
        let node = &self.nodes[i];
        let ns = Netns::new(prefix, &format!("pod{}-{j}", i + 1))?;
        let host_device = format!("veth{j}");
        let addr = pod_addr(i, j);
        let gateway = format!("10.244.{}.1", i + 1);
        node.ns.ip(&["link", "add", &host_device, "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
        node.ns.as_wire(&host_device, self.complete_checksums)?;
        ns.as_wire("eth0", self.complete_checksums)?;
        node.ns.ip(&["addr", "add", &format!("{gateway}/32"), "dev", &host_device])?;
        node.ns.ip(&["link", "set", &host_device, "up"])?;
        node.ns.ip(&["route", "add", &format!("{addr}/32"), "dev", &host_device])?;
        ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", &gateway, "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", &gateway])?;
        Ok(Pod { ns, addr, host_device })
    }

    fn add_client(&self, prefix: &str, c: usize) -> Result<Client> {
        let ns = Netns::new(prefix, &format!("client{}", c + 1))?;
        self.plug(&ns, "eth0", &format!("c{c}"))?;
        let addr = Ipv4Addr::new(192, 168, 50, 100 + c as u8);
        ns.ip(&["addr", "add", &format!("{addr}/{SEGMENT_PREFIX}"), "dev", "eth0"])?;
        ns.ip(&["route", "add", LB_POOL, "via", &node_addr(0).to_string()])?;
        Ok(Client { ns, addr })
    }

    /// Keep every namespace, and the segment ports' XDP, after drop (`lab up`).
    pub fn keep(&mut self, prefix: &str) -> Result<()> {
        if let Some(mut wire) = self.wire_xdp.take() {
            let dir = wire_pin_dir(prefix);
            std::fs::create_dir_all(&dir)?;
            let program: &mut Xdp =
                wire.ebpf.program_mut(program_names::XDP_PASS).context("lb_xdp_pass")?.try_into()?;
            for (port, id) in wire.links {
                let link: FdLink = program.take_link(id)?.try_into()?;
                link.pin(dir.join(format!("{}-{port}", self.segment.name)))?;
            }
        }
        self.segment.keep();
        self.clients.iter_mut().for_each(|c| c.ns.keep());
        for node in &mut self.nodes {
            node.ns.keep();
            node.pods.iter_mut().for_each(|p| p.ns.keep());
        }
        Ok(())
    }
}

/// The overlay device of node `i`, as flannel's vxlan backend makes it: `vxlan0` with the
/// node's pod network's .0 address; for each other node a route to its pod network via
/// its .0 on the overlay, a permanent neighbour entry for that .0 (the other node's VTEP
/// MAC) and a forwarding entry sending that MAC to the other node's address.
fn add_vxlan(ns: &Netns, i: usize, nodes: usize) -> Result<()> {
    let vtep_mac = |k: usize| format!("02:00:00:00:1e:{:02x}", k + 1);
    let addr = node_addr(i).to_string();
    ns.ip(&[
        "link",
        "add",
        "vxlan0",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &addr,
        "dstport",
        "4789",
        "dev",
        "eth0",
        "nolearning",
    ])?;
    ns.ip(&["link", "set", "vxlan0", "address", &vtep_mac(i)])?;
    ns.ip(&["addr", "add", &format!("10.244.{}.0/32", i + 1), "dev", "vxlan0"])?;
    ns.ip(&["link", "set", "vxlan0", "up"])?;
    for k in (0..nodes).filter(|k| *k != i) {
        let gateway = format!("10.244.{}.0", k + 1);
        ns.ip(&["neigh", "add", &gateway, "lladdr", &vtep_mac(k), "dev", "vxlan0", "nud", "permanent"])?;
        run(
            "bridge",
            &["-n", &ns.name, "fdb", "add", &vtep_mac(k), "dev", "vxlan0", "dst", &node_addr(k).to_string()],
        )?;
        ns.ip(&["route", "add", &format!("10.244.{}.0/24", k + 1), "via", &gateway, "dev", "vxlan0", "onlink"])?;
    }
    Ok(())
}

fn attach_wire_xdp(segment: &str, ports: Vec<String>) -> Result<WireXdp> {
    in_netns(segment, move || {
        let mut ebpf = Ebpf::load(lb_user::datapath::EBPF_OBJECT)?;
        let program: &mut Xdp = ebpf.program_mut(program_names::XDP_PASS).context("lb_xdp_pass")?.try_into()?;
        program.load()?;
        let mut links = Vec::new();
        for port in ports {
            let id = program.attach(&port, XdpMode::default()).with_context(|| format!("XDP on {port}"))?;
            links.push((port, id));
        }
        Ok(WireXdp { ebpf, links })
    })
}

/// Removes what test processes killed before their cleanup (a timeout, a signal) left
/// behind: namespaces `<prefix>-<pid>-...` of a process gone, and the datapaths pinned
/// under the same names.
fn remove_stale(prefix: &str) {
    let Ok(list) = run("ip", &["netns", "list"]) else { return };
    let gone = |name: &str| {
        let pid = name.strip_prefix(&format!("{prefix}-")).and_then(|rest| rest.split('-').next());
        pid.and_then(|p| p.parse::<u32>().ok()).is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists())
    };
    let pinned = std::fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten();
    for name in pinned.filter_map(|e| e.file_name().into_string().ok()).filter(|n| gone(n)) {
        let _ = lb_user::datapath::unload(Path::new(&format!("/sys/fs/bpf/{name}")));
    }
    for name in list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| gone(n)) {
        let _ = run("ip", &["netns", "del", name]);
    }
}

/// Deletes every namespace whose name starts with `prefix-`, and the kept segment XDP
/// links (`lab down`).
pub fn delete_all(prefix: &str) -> Result<usize> {
    let _ = std::fs::remove_dir_all(wire_pin_dir(prefix));
    let list = run("ip", &["netns", "list"])?;
    let mut n = 0;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if name.starts_with(&format!("{prefix}-")) {
            run("ip", &["netns", "del", name])?;
            n += 1;
        }
    }
    Ok(n)
}
