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
    /// New flows are refused at this many entries.
    pub admit_limit: u32,
}

impl Setup {
    /// Fast mode (every rewrite in one hook, XDP_TX where it can), SNAT ports from `snat_ports`.
    pub fn fast(snat_ports: (u16, u16)) -> Setup {
        let entries = lb_common::DEFAULT_CONNTRACK_ENTRIES;
        Setup { snat_ports, mode: lb_common::mode::FAST, conntrack_entries: entries, admit_limit: entries }
    }
    /// Netfilter mode: the destination side on the way in, the source side at tc egress.
    pub fn netfilter(snat_ports: (u16, u16)) -> Setup {
        Setup { mode: lb_common::mode::NETFILTER, ..Setup::fast(snat_ports) }
    }
}

/// Runs `f` on a fixture loaded as `setup` says, in a fixture namespace made for it;
/// namespace and pins are removed afterwards, also when `f` panics.
pub fn with_fixture<R: Send + 'static>(setup: Setup, f: impl FnOnce(&mut Fixture) -> R + Send + 'static) -> R {
    crate::require_root();
    let ns = fixture_netns();
    let pins = crate::Pins::new(&ns.name);
    let pin_dir = pins.0.clone();
    crate::lab::in_netns(&ns.name, move || f(&mut Fixture::load(&pin_dir, setup)))
}

pub struct Fixture {
    pub dp: Datapath,
    pub pin_dir: std::path::PathBuf,
    pub eth0: u32,
    setup: Setup,
}

impl Fixture {
    /// Loads the datapath and scripts it with [`MANIFESTS`] and [`local_slices`].
    fn load(pin_dir: &Path, setup: Setup) -> Fixture {
        let capacity = datapath::Capacity { conntrack_entries: setup.conntrack_entries };
        let dp = Datapath::load(pin_dir, capacity).unwrap();
        let eth0 = ifindex("eth0");
        let mut fixture = Fixture { dp, pin_dir: pin_dir.to_path_buf(), eth0, setup };
        fixture.apply(&(MANIFESTS.to_string() + &local_slices()));
        fixture
    }

    /// Makes the maps say what `manifests` say, as the agent does (model, then reconciler
    /// adopting the pinned maps): Services and backends that go are removed, flows stay.
    pub fn apply(&mut self, manifests: &str) {
        let mut objects = source::Objects::default();
        let mut report = manifests::Report::default();
        manifests::parse_into(Path::new("fixtures.yaml"), manifests, &mut objects, &mut report);
        assert!(report.errors.is_empty(), "{report}");
        let node = model::NodeInfo { name: "node1".into(), addresses: vec![NODE], zone: None };
        let options = model::Options::default();
        let desired = model::desired_state(&objects, &node, &options);
        assert!(desired.errors.is_empty(), "{:?}", desired.errors);
        let mut store = PinnedMaps::open(&self.pin_dir).unwrap();
        let cluster = addr_be(Ipv4Addr::new(10, 244, 0, 0));
        let config = lb_common::Config {
            node_addr_be: addr_be(NODE),
            local_addr_be: cluster,
            local_prefix_len: 16,
            pods_addr_be: cluster,
            pods_prefix_len: 16,
            mode: self.setup.mode,
            ct_admit_limit: self.setup.admit_limit,
            mark_shift: 0,
            snat_port_min: self.setup.snat_ports.0,
            snat_port_max: self.setup.snat_ports.1,
            _pad: 0,
        };
        let changes = Reconciler::adopt(&store).unwrap().apply(&desired, config, &mut store).unwrap();
        assert!(changes.failures.is_empty(), "{:?}", changes.failures);
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
        // Metadata, if any, comes out in front of the frame.
        let meta_len = std::mem::size_of::<XdpMeta>();
        let meta = (out.len() >= frame.len() + meta_len && r.return_value == XDP_PASS)
            .then(|| bytemuck_meta(&out[..meta_len]))
            .filter(|m| {
                [lb_common::XDP_META_REDIRECT, lb_common::XDP_META_MARK, lb_common::XDP_META_PARTIAL].contains(&m.tag)
            });
        if meta.is_some() {
            out.drain(..meta_len);
        }
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
        let map = datapath::open_map(&self.pin_dir, map_names::CONNTRACK).unwrap();
        let ct: HashMap<_, CtKey, CtValue> = map.try_into().unwrap();
        let key = CtKey {
            src_addr_be: addr_be(*src.ip()),
            dst_addr_be: addr_be(*dst.ip()),
            src_port_be: src.port().to_be(),
            dst_port_be: dst.port().to_be(),
            proto,
            _pad: [0; 3],
        };
        ct.get(&key, 0).ok()
    }
}

fn bytemuck_meta(bytes: &[u8]) -> XdpMeta {
    XdpMeta {
        mark: u32::from_ne_bytes(bytes[0..4].try_into().unwrap()),
        tag: u32::from_ne_bytes(bytes[4..8].try_into().unwrap()),
    }
}

pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}
