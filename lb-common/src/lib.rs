//! The map ABI shared by the kernel programs (`lb-ebpf`) and the agent (`lb-user`), plus
//! pure helpers both sides use. `no_std`, integers and fixed arrays only, explicit padding.
//!
//! Byte order: every address and port stored in a map is in network byte order, and the
//! field names say so (`addr_be`, `port_be`). Everything else (counts, ids, flags,
//! timestamps) is host order.
#![no_std]

pub mod checksum;
pub mod conntrack;
pub mod counters;
pub mod icmp;
#[cfg(feature = "user")]
pub mod user;

/// Directory under bpffs where the agent pins programs and maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/kube-xdp-lb";

/// Map names, defined once: lb-ebpf's map statics are named exactly so, and the loader pins and
/// opens maps by them. At most 15 characters, or the kernel truncates them.
pub mod map_names {
    pub const SERVICES: &str = "LB_SERVICES";
    pub const SLOTS: &str = "LB_SLOTS";
    pub const BACKENDS: &str = "LB_BACKENDS";
    pub const CONNTRACK: &str = "LB_CONNTRACK";
    pub const SRC_RANGES: &str = "LB_SRC_RANGES";
    pub const CONFIG: &str = "LB_CONFIG";
    pub const COUNTERS: &str = "LB_COUNTERS";
    pub const SNAT_CURSOR: &str = "LB_SNAT_CURSOR";
    /// Every map the agent pins; all survive an agent restart.
    pub const ALL: [&str; 8] = [SERVICES, SLOTS, BACKENDS, CONNTRACK, SRC_RANGES, CONFIG, COUNTERS, SNAT_CURSOR];
}

/// Program names as they appear in the object file and under [`PIN_DIR`].
pub mod program_names {
    /// North-south, on node uplinks.
    pub const XDP_UPLINK: &str = "lb_xdp_uplink";
    /// East-west, tc ingress on pod-facing devices.
    pub const TC_POD: &str = "lb_tc_pod";
    /// Passes everything: the benchmarks' floor, and the lab's veth peers.
    pub const XDP_PASS: &str = "lb_xdp_pass";
    /// Benchmark wrapper: restores a template frame, tail-calls the program under test.
    pub const BENCH_RESTORE: &str = "lb_bench_restore";
    /// tc ingress on node uplinks: forwards what XDP translated but could not transmit.
    pub const TC_UPLINK: &str = "lb_tc_uplink";
}

/// XDP metadata in front of a packet that XDP translated but could not send itself (the
/// route leaves by another device, or the neighbour is not resolved yet): the uplink's tc
/// program forwards it with bpf_redirect_neigh. The stack must not route it, since its
/// source may now be the node's own address, which input routing drops as martian.
pub const XDP_META_FORWARD: u32 = 0x4c42_4657;

pub const MAX_SERVICES: u32 = 65_536;
pub const MAX_BACKEND_SLOTS: u32 = 262_144;
pub const MAX_BACKENDS: u32 = 65_536;
pub const MAX_CONNTRACK: u32 = 262_144;
pub const MAX_SOURCE_RANGES: u32 = 16_384;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A frontend: one address:port:protocol that the datapath translates.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `ServiceValue::flags`
pub mod service_flags {
    /// NodePort, LoadBalancer ingress IP or externalIP (as opposed to a ClusterIP).
    pub const EXTERNAL: u32 = 1 << 0;
    /// externalTrafficPolicy=Local: backends are this node's only, never SNAT, and an
    /// empty set drops instead of refusing (the cloud LB's health check steers away).
    pub const EXTERNAL_LOCAL: u32 = 1 << 1;
    /// loadBalancerSourceRanges apply: only sources in LB_SRC_RANGES for this svc_id.
    pub const SOURCE_RANGES: u32 = 1 << 2;
}

/// `ServiceValue::algorithm`
pub mod algorithm {
    pub const RANDOM: u8 = 0;
}

/// What a frontend translates to. Backends of the frontend are the slots
/// `(svc_id, 0..backend_count)` in LB_SLOTS.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable id of this frontend, allocated by the agent; keys its slots and source ranges.
    pub svc_id: u32,
    pub backend_count: u32,
    pub flags: u32,
    /// sessionAffinity=ClientIP timeout; 0 = no affinity.
    pub affinity_timeout_s: u32,
    pub algorithm: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub svc_id: u32,
    pub slot: u32,
}

/// `Backend::flags`
pub mod backend_flags {
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 0;
}

/// One endpoint address:port, keyed by a backend id in LB_BACKENDS.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub flags: u8,
    pub _pad: u8,
}

/// A flow as seen on the wire in one direction. Each translated flow has two entries:
/// the original direction (client -> frontend) and the reply direction
/// (backend -> client or SNAT address).
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    /// The key of the packets travelling the other way.
    pub const fn reversed(&self) -> CtKey {
        CtKey {
            src_addr_be: self.dst_addr_be,
            dst_addr_be: self.src_addr_be,
            src_port_be: self.dst_port_be,
            dst_port_be: self.src_port_be,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// `CtValue::flags`
pub mod ct_flags {
    /// This entry is for the reply direction.
    pub const REPLY: u8 = 1 << 0;
    /// The flow's source was rewritten (SNAT), so its NAT port is held by this entry.
    pub const SNAT: u8 = 1 << 1;
}

/// The rewrite to apply to a packet matching a CtKey: its addresses and ports become
/// these. Symmetric: the reply entry restores what the original entry changed.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    /// bpf_ktime_get_ns() of the last packet in either direction seen by this entry.
    pub last_seen_ns: u64,
    pub nat_src_addr_be: u32,
    pub nat_dst_addr_be: u32,
    pub nat_src_port_be: u16,
    pub nat_dst_port_be: u16,
    pub backend_id: u32,
    /// A `conntrack::State` as u8.
    pub state: u8,
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// Data of the LB_SRC_RANGES LPM trie key (the trie's key is `Key<SourceRange>`): the
/// prefix length counts the 32 bits of svc_id plus the prefix of the address, so one
/// trie holds every Service's ranges.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRange {
    pub svc_id_be: u32,
    pub addr_be: u32,
}

/// Node-wide settings, the single entry of LB_CONFIG.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// This node's address, used as the SNAT source.
    pub node_addr_be: u32,
    pub cluster_cidr_addr_be: u32,
    pub cluster_cidr_prefix_len: u32,
    /// SNAT source ports rotate through [snat_port_min, snat_port_max].
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}

/// Length of the frames the benchmark wrapper restores: Ethernet + IPv4 + TCP, no payload.
pub const BENCH_FRAME_LEN: usize = 54;

/// The benchmark wrapper's template (see lb-ebpf's bench.rs); not part of the datapath.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchFrame {
    pub bytes: [u8; BENCH_FRAME_LEN],
    /// Non-zero: bump the TCP source port before every run, so each run is a new flow.
    pub new_flow_each_run: u16,
}

/// Does a new flow need its source rewritten to the node's address (SNAT)?
/// - hairpin (the backend is the client itself): always, or the backend would see a packet
///   from itself;
/// - NodePort / LB IP / externalIP: with externalTrafficPolicy=Cluster when the backend is on
///   another node, so the reply comes back through this node; never with Local;
/// - ClusterIP: when the source is outside the cluster CIDR (as kube-proxy masquerades).
#[inline(always)]
pub fn needs_snat(service_flags: u32, backend_flags: u8, src_in_cluster: bool, hairpin: bool) -> bool {
    if hairpin {
        return true;
    }
    if service_flags & service_flags::EXTERNAL != 0 {
        service_flags & service_flags::EXTERNAL_LOCAL == 0 && backend_flags & backend_flags::LOCAL == 0
    } else {
        !src_in_cluster
    }
}

/// Is `addr_be` inside the prefix `net_be/len`? Prefix length 0 matches everything.
#[inline(always)]
pub fn in_prefix(addr_be: u32, net_be: u32, prefix_len: u32) -> bool {
    if prefix_len == 0 {
        return true;
    }
    let shift = 32 - prefix_len.min(32);
    (u32::from_be(addr_be) >> shift) == (u32::from_be(net_be) >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 20);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 32);
        assert_eq!(size_of::<SourceRange>(), 8);
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(size_of::<BenchFrame>(), 56);
    }

    #[test]
    fn map_names_fit_the_kernel() {
        // BPF_OBJ_NAME_LEN is 16 with the NUL: a longer name shows truncated in bpftool.
        for name in map_names::ALL {
            assert!(name.len() <= 15, "{name} is longer than 15 characters");
        }
    }

    #[test]
    fn prefix_matching() {
        let net = u32::from_be_bytes([10, 244, 0, 0]).to_be();
        assert!(in_prefix(u32::from_be_bytes([10, 244, 3, 7]).to_be(), net, 16));
        assert!(!in_prefix(u32::from_be_bytes([10, 245, 0, 1]).to_be(), net, 16));
        assert!(in_prefix(u32::from_be_bytes([1, 2, 3, 4]).to_be(), net, 0));
        assert!(in_prefix(net, net, 32));
        assert!(!in_prefix(net + 1u32.to_be(), net, 32));
    }

    #[test]
    fn snat_rules() {
        use service_flags::*;
        let local = backend_flags::LOCAL;
        assert!(needs_snat(EXTERNAL, 0, false, false), "ETP Cluster, remote backend");
        assert!(!needs_snat(EXTERNAL, local, false, false), "ETP Cluster, local backend");
        assert!(!needs_snat(EXTERNAL | EXTERNAL_LOCAL, local, false, false), "ETP Local");
        assert!(!needs_snat(0, 0, true, false), "ClusterIP from a pod");
        assert!(needs_snat(0, local, false, false), "ClusterIP from outside the cluster");
        assert!(needs_snat(0, local, true, true), "hairpin");
        assert!(needs_snat(EXTERNAL | EXTERNAL_LOCAL, local, true, true), "hairpin via ETP Local");
    }

    #[test]
    fn reversed_key_swaps_both_ends() {
        let k = CtKey { src_addr_be: 1, dst_addr_be: 2, src_port_be: 3, dst_port_be: 4, proto: 6, _pad: [0; 3] };
        let r = k.reversed();
        assert_eq!((r.src_addr_be, r.dst_addr_be, r.src_port_be, r.dst_port_be), (2, 1, 4, 3));
        assert_eq!(r.reversed(), k);
    }
}
