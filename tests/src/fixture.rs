//! A scripted datapath for BPF_PROG_TEST_RUN (fixtures and benchmarks): the programs
//! loaded (attached nowhere) and their maps written the way the agent writes them
//! (manifests -> model -> reconciler -> pinned maps), inside a namespace whose uplink has a
//! fixed MAC, static neighbours and routes, so FIB lookups are deterministic.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use aya::{
    maps::HashMap,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_common::{map_names, program_names, user::addr_be, CtKey, CtValue, XdpMeta};
use lb_user::{
    datapath::{self, maps::PinnedMaps, Datapath},
    model,
    reconcile::Reconciler,
    source::{self, manifests},
};

use crate::lab::Netns;

pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
pub const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
pub const CLIENT2: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 101);
pub const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
pub const OTHER_LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 20);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);

/// This node's pods (routed to veth0): their packets come in at tc on their device.
pub fn is_local_pod(addr: Ipv4Addr) -> bool {
    addr.octets()[..3] == [10, 244, 1]
}
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: np-remote}
spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{name: t, port: 80, nodePort: 30080}, {name: u, protocol: UDP, port: 80, nodePort: 30080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-remote, labels: {kubernetes.io/service-name: np-remote}}
addressType: IPv4
ports: [{name: t, port: 8080}, {name: u, protocol: UDP, port: 8080}]
endpoints: [{addresses: [10.244.2.10], nodeName: node2}]
---
apiVersion: v1
kind: Service
metadata: {name: np-local}
spec: {type: NodePort, clusterIP: 10.96.0.2, ports: [{port: 80, nodePort: 30081}]}
---
apiVersion: v1
kind: Service
metadata: {name: etp-local}
spec: {type: NodePort, clusterIP: 10.96.0.3, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30082}]}
---
apiVersion: v1
kind: Service
metadata: {name: etp-none}
spec: {type: NodePort, clusterIP: 10.96.0.4, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30083}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: etp-none, labels: {kubernetes.io/service-name: etp-none}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.2.10], nodeName: node2}]
---
apiVersion: v1
kind: Service
metadata: {name: cip}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec: {type: NodePort, clusterIP: 10.96.0.99, ports: [{name: t, port: 80, nodePort: 30099}, {name: u, protocol: UDP, port: 53, nodePort: 30099}]}
---
apiVersion: v1
kind: Service
metadata: {name: ranged}
spec: {type: LoadBalancer, clusterIP: 10.96.0.6, loadBalancerSourceRanges: [192.168.50.101/32], ports: [{port: 80, nodePort: 30086}]}
status: {loadBalancer: {ingress: [{ip: 192.168.60.6}]}}
"#;

/// Local single-backend slices for np-local, etp-local, cip and ranged.
pub fn local_slices() -> String {
    ["np-local", "etp-local", "cip", "ranged"]
        .iter()
        .map(|s| format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {s}, labels: {{kubernetes.io/service-name: {s}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [10.244.1.10], nodeName: node1}}]\n"))
        .collect()
}

/// The namespace: eth0 192.168.50.10/24 (MAC NODE_MAC) with static neighbours for the
/// client and node2, which routes 10.244.2.0/24; veth0 toward the local pods.
fn fixture_netns() -> Netns {
    let ns = Netns::new("lbt", "fixtures").unwrap();
    for args in [
        &["link", "add", "eth0", "type", "veth", "peer", "name", "wire0"][..],
        &["link", "add", "veth0", "type", "veth", "peer", "name", "pod0"],
        &["link", "set", "eth0", "address", "02:00:00:00:00:02"],
        &["addr", "add", "192.168.50.10/24", "dev", "eth0"],
        &["addr", "add", "10.244.1.1/32", "dev", "veth0"],
        &["link", "set", "eth0", "up"],
        &["link", "set", "wire0", "up"],
        &["link", "set", "veth0", "up"],
        &["link", "set", "pod0", "up"],
        &["route", "add", "10.244.1.0/24", "dev", "veth0"],
        &["route", "add", "10.244.2.0/24", "via", "192.168.50.11"],
        &["neigh", "add", "192.168.50.11", "lladdr", "02:00:00:00:00:0b", "dev", "eth0", "nud", "permanent"],
        &["neigh", "add", "192.168.50.100", "lladdr", "02:00:00:00:00:01", "dev", "eth0", "nud", "permanent"],
        &["neigh", "add", "192.168.50.101", "lladdr", "02:00:00:00:00:01", "dev", "eth0", "nud", "permanent"],
    ] {
        ns.ip(args).unwrap();
    }
    // bpf_fib_lookup answers only for devices that forward.
    ns.sysctl("net.ipv4.ip_forward=1").unwrap();
    ns
}

/// How a fixture's datapath is configured.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub snat_ports: (u16, u16),
    /// `lb_common::mode::*`
    pub mode: u32,
    pub conntrack_entries: u32,
    pub conntrack_memory: datapath::ConntrackMemory,
    /// New flows are refused at this many entries.
    pub admit_limit: u32,
    /// Frontend and backend ids the maps have room for.
    pub frontends: u32,
    pub backends: u32,
}

impl Setup {
    /// Fast mode (every rewrite in one hook, XDP_TX where it can), SNAT ports from `snat_ports`.
    pub fn fast(snat_ports: (u16, u16)) -> Setup {
        let entries = lb_common::DEFAULT_CONNTRACK_ENTRIES;
        Setup {
            snat_ports,
            mode: lb_common::mode::FAST,
            conntrack_entries: entries,
            conntrack_memory: datapath::ConntrackMemory::OnDemand,
            admit_limit: entries,
            frontends: lb_common::DEFAULT_FRONTENDS,
            backends: lb_common::DEFAULT_BACKENDS,
        }
    }
    /// Netfilter mode: the destination side on the way in, the source side at tc egress.
    pub fn netfilter(snat_ports: (u16, u16)) -> Setup {
        Setup { mode: lb_common::mode::NETFILTER, ..Setup::fast(snat_ports) }
    }
}

/// Runs `f` on a fixture loaded as `setup` says, in a fixture namespace made for it;
/// namespace and pins are removed afterwards, also when `f` panics.
pub fn with_fixture<R: Send + 'static>(setup: Setup, f: impl FnOnce(&mut Fixture) -> R + Send + 'static) -> R {
    with_fixtures(vec![setup], move |fixtures| f(&mut fixtures[0]))
}

/// Runs `f` on one fixture per setup, side by side in one fixture namespace, each with
/// its own programs, maps and pins (so a benchmark can interleave cases that need
/// differently filled maps); namespace and pins are removed afterwards, also when `f` panics.
pub fn with_fixtures<R: Send + 'static>(setups: Vec<Setup>, f: impl FnOnce(&mut [Fixture]) -> R + Send + 'static) -> R {
    crate::require_root();
    let ns = fixture_netns();
    let pins: Vec<crate::Pins> = (0..setups.len()).map(|i| crate::Pins::new(&format!("{}-{i}", ns.name))).collect();
    let pin_dirs: Vec<std::path::PathBuf> = pins.iter().map(|p| p.0.clone()).collect();
    crate::lab::in_netns(&ns.name, move || {
        let mut fixtures: Vec<Fixture> =
            pin_dirs.iter().zip(setups).map(|(pin_dir, setup)| Fixture::load(pin_dir, setup)).collect();
        f(&mut fixtures)
    })
}

pub struct Fixture {
    pub dp: Datapath,
    pub pin_dir: std::path::PathBuf,
    pub eth0: u32,
    pub setup: Setup,
    reconciler: Reconciler,
    store: PinnedMaps,
    config: lb_common::Config,
}

impl Fixture {
    /// Loads and scripts the datapath.
    fn load(pin_dir: &Path, setup: Setup) -> Fixture {
        let capacity = datapath::Capacity {
            conntrack_entries: setup.conntrack_entries,
            conntrack_memory: setup.conntrack_memory,
            frontends: setup.frontends,
            backends: setup.backends,
        };
        let dp = Datapath::load(pin_dir, capacity).unwrap();
        let store = PinnedMaps::open(pin_dir).unwrap();
        let cluster = addr_be(Ipv4Addr::new(10, 244, 0, 0));
        let config = lb_common::Config {
            node_addr_be: addr_be(NODE),
            local_addr_be: cluster,
            local_prefix_len: 16,
            pods_addr_be: cluster,
            pods_prefix_len: 16,
            mode: setup.mode,
            ct_admit_limit: setup.admit_limit,
            mark_shift: 0,
            snat_port_min: setup.snat_ports.0,
            snat_port_max: setup.snat_ports.1,
            _pad: 0,
        };
        let reconciler = Reconciler::adopt(&store).unwrap();
        let eth0 = ifindex("eth0");
        let mut fx = Fixture { dp, pin_dir: pin_dir.to_path_buf(), eth0, setup, reconciler, store, config };
        fx.apply(&(MANIFESTS.to_string() + &local_slices()));
        fx
    }

    /// Programs the maps for these manifests (replacing what they held), as the agent would.
    pub fn apply(&mut self, yaml: &str) {
        let mut objects = source::Objects::default();
        let mut report = manifests::Report::default();
        manifests::parse_into(Path::new("fixtures.yaml"), yaml, &mut objects, &mut report);
        assert!(report.errors.is_empty(), "{report}");
        let node = model::NodeInfo { name: "node1".into(), addresses: vec![NODE], zone: None };
        let desired = model::desired_state(&objects, &node, &model::Options::default());
        assert!(desired.errors.is_empty(), "{:?}", desired.errors);
        let changes = self.reconciler.apply(&desired, self.config, &mut self.store).unwrap();
        assert!(changes.failures.is_empty(), "{:?}", changes.failures);
    }

    /// Open flows of a backend (LB_BE_LIVE).
    pub fn backend_live(&self, id: u32) -> u64 {
        let map = datapath::open_map(&self.pin_dir, map_names::BACKEND_LIVE).unwrap();
        let live: aya::maps::Array<_, u64> = map.try_into().unwrap();
        live.get(&id, 0).unwrap()
    }

    /// A backend's traffic, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> lb_common::BackendStats {
        let map = datapath::open_map(&self.pin_dir, map_names::BACKEND_STATS).unwrap();
        let stats: aya::maps::PerCpuArray<_, lb_common::BackendStats> = map.try_into().unwrap();
        stats.get(&id, 0).unwrap().iter().fold(lb_common::BackendStats::default(), |t, c| lb_common::BackendStats {
            packets: t.packets + c.packets,
            bytes: t.bytes + c.bytes,
            new_flows: t.new_flows + c.new_flows,
        })
    }

    /// A frontend's traffic (by its id), summed over CPUs: (packets, bytes).
    pub fn frontend_stats(&self, svc_id: u32) -> (u64, u64) {
        let map = datapath::open_map(&self.pin_dir, map_names::FRONTEND_STATS).unwrap();
        let stats: aya::maps::PerCpuArray<_, lb_common::FrontendStats> = map.try_into().unwrap();
        stats.get(&svc_id, 0).unwrap().iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes))
    }

    /// Every conntrack entry.
    pub fn ct_entries(&self) -> Vec<(CtKey, CtValue)> {
        lb_user::datapath::conntrack::Conntrack::open(&self.pin_dir).unwrap().entries().unwrap()
    }

    /// Conntrack entries as the datapath counts them (what admission control reads).
    pub fn ct_counted(&self) -> u64 {
        lb_user::datapath::conntrack::Conntrack::open(&self.pin_dir).unwrap().counted_entries().unwrap()
    }

    /// Runs the agent's sweep once; (flows removed, entries read).
    pub fn sweep(&self) -> (usize, usize) {
        let s = lb_user::datapath::conntrack::Conntrack::open(&self.pin_dir).unwrap().sweep().unwrap();
        (s.removed, s.entries)
    }

    /// Makes a flow look idle for `secs` more seconds: both halves' stamps move back, as if
    /// that much time had passed since their last refresh.
    pub fn age(&self, src: SocketAddrV4, dst: SocketAddrV4, proto: u8, secs: u64) {
        let key = ct_key(src, dst, proto);
        let map = datapath::open_map(&self.pin_dir, map_names::CONNTRACK).unwrap();
        let mut ct: HashMap<_, CtKey, CtValue> = map.try_into().unwrap();
        let v = ct.get(&key, 0).unwrap_or_else(|_| panic!("no conntrack entry {key}"));
        let peer = lb_user::datapath::conntrack::peer_of(&key, &v);
        let back = lb_common::conntrack::secs(secs);
        for k in [key, peer] {
            if let Ok(mut half) = ct.get(&k, 0) {
                let t = lb_common::conntrack::time(half.stamp).wrapping_sub(back);
                half.stamp = lb_common::conntrack::stamp(lb_common::conntrack::nonce(half.stamp), t);
                ct.insert(k, half, 0).unwrap();
            }
        }
    }

    /// Makes every session-affinity entry `secs` seconds older.
    pub fn age_affinity(&self, secs: u64) {
        let map = datapath::open_map(&self.pin_dir, map_names::AFFINITY).unwrap();
        let mut affinity: HashMap<_, lb_common::AffinityKey, lb_common::AffinityValue> = map.try_into().unwrap();
        let entries: Vec<_> = affinity.iter().map(Result::unwrap).collect();
        for (k, mut v) in entries {
            v.last_ns -= secs * 1_000_000_000;
            affinity.insert(k, v, 0).unwrap();
        }
    }

    /// Removes one half of a flow behind the datapath's back (as a bug or a lost entry
    /// would), keeping the entry count honest.
    pub fn lose_half(&self, src: SocketAddrV4, dst: SocketAddrV4, proto: u8) {
        let map = datapath::open_map(&self.pin_dir, map_names::CONNTRACK).unwrap();
        let mut ct: HashMap<_, CtKey, CtValue> = map.try_into().unwrap();
        ct.remove(&ct_key(src, dst, proto)).unwrap();
        let map = datapath::open_map(&self.pin_dir, map_names::CT_STATE).unwrap();
        let mut state: aya::maps::Array<_, lb_common::CtState> = map.try_into().unwrap();
        let mut s = state.get(&0, 0).unwrap();
        s.entries -= 1;
        state.set(0, s, 0).unwrap();
    }

    /// Inserts a flow's reply half holding a NAT port, as if a flow held it (for filling
    /// the port range): (backend -> node:port), fresh, with a peer that does not exist, so
    /// it counts as taken until the sweep finds it orphaned.
    pub fn hold_nat_port(&self, backend: SocketAddrV4, port: u16, proto: u8) {
        let map = datapath::open_map(&self.pin_dir, map_names::CONNTRACK).unwrap();
        let mut ct: HashMap<_, CtKey, CtValue> = map.try_into().unwrap();
        let now = lb_common::conntrack::units(lb_user::datapath::conntrack::coarse_now_ns());
        let key = ct_key(backend, SocketAddrV4::new(NODE, port), proto);
        let value = CtValue {
            stamp: lb_common::conntrack::stamp(0x5eed, now),
            key,
            nat_src_addr_be: addr_be(Ipv4Addr::new(203, 0, 113, 1)),
            nat_dst_addr_be: addr_be(Ipv4Addr::new(203, 0, 113, 2)),
            flags: lb_common::ct_flags::REPLY | lb_common::ct_flags::SNAT,
            ..CtValue::default()
        };
        ct.insert(key, value, 0).unwrap();
    }

    /// Runs the tc egress program on a frame carrying `mark`: (action, frame out, mark after).
    pub fn tc_egress(&mut self, frame: &[u8], mark: u32) -> (u32, Vec<u8>, u32) {
        let program: &mut SchedClassifier =
            self.dp.ebpf_mut().program_mut(program_names::TC_EGRESS).unwrap().try_into().unwrap();
        // struct __sk_buff: len, pkt_type, mark (offset 8), ...; the kernel takes mark from it.
        let mut ctx_in = [0u8; 192];
        ctx_in[8..12].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; 192];
        let mut out = vec![0u8; frame.len() + 256];
        let r = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::new()
            })
            .unwrap();
        out.truncate(r.data_size_out as usize);
        (r.return_value, out, u32::from_ne_bytes(ctx_out[8..12].try_into().unwrap()))
    }

    /// Runs the XDP program as if the frame came in on eth0: (action, frame out, what it left
    /// for the uplink's tc program).
    pub fn xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>, Option<XdpMeta>) {
        let program: &mut Xdp = self.dp.ebpf_mut().program_mut(program_names::XDP_UPLINK).unwrap().try_into().unwrap();
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.eth0.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let r = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("test run of {frame:02x?}: {e}"));
        out.truncate(r.data_size_out as usize);
        let meta = split_meta(&mut out, frame.len(), r.return_value);
        (r.return_value, out, meta)
    }

    pub fn tc_pod(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program: &mut SchedClassifier =
            self.dp.ebpf_mut().program_mut(program_names::TC_POD).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let r = program
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::new() })
            .unwrap();
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        datapath::read_counters(&self.pin_dir).unwrap().into_iter().map(|(label, c)| (label, c.packets)).collect()
    }

    /// A backend by the id the reconciler gave it (what conntrack entries point at).
    pub fn backend(&self, id: u32) -> Option<lb_common::Backend> {
        let map = datapath::open_map(&self.pin_dir, map_names::BACKENDS).unwrap();
        let backends: aya::maps::Array<_, lb_common::Backend> = map.try_into().unwrap();
        backends.get(&id, 0).ok().filter(|b| b.addr_be != 0)
    }

    /// The conntrack entry of a flow as seen on the wire.
    pub fn conntrack(&self, src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Option<CtValue> {
        self.half(&ct_key(src, dst, proto))
    }

    /// The conntrack entry (half of a flow) under `key`.
    pub fn half(&self, key: &CtKey) -> Option<CtValue> {
        let map = datapath::open_map(&self.pin_dir, map_names::CONNTRACK).unwrap();
        let ct: HashMap<_, CtKey, CtValue> = map.try_into().unwrap();
        ct.get(key, 0).ok()
    }
}

/// The conntrack key of packets `src -> dst`.
pub fn ct_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> CtKey {
    CtKey {
        src_addr_be: addr_be(*src.ip()),
        dst_addr_be: addr_be(*dst.ip()),
        src_port_be: src.port().to_be(),
        dst_port_be: dst.port().to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// Takes the hand-over metadata off the front of a test run's output, if the XDP program
/// left one for tc (an XDP_PASS whose output is longer than the `frame_len` bytes it got).
pub fn split_meta(out: &mut Vec<u8>, frame_len: usize, action: u32) -> Option<XdpMeta> {
    let meta_len = std::mem::size_of::<XdpMeta>();
    let meta = (out.len() >= frame_len + meta_len && action == XDP_PASS)
        .then(|| XdpMeta {
            mark: u32::from_ne_bytes(out[0..4].try_into().unwrap()),
            tag: u32::from_ne_bytes(out[4..8].try_into().unwrap()),
        })
        .filter(|m| {
            [lb_common::XDP_META_REDIRECT, lb_common::XDP_META_MARK, lb_common::XDP_META_PARTIAL].contains(&m.tag)
        });
    if meta.is_some() {
        out.drain(..meta_len);
    }
    meta
}

pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}
