//! The map ABI shared by the kernel programs (`lb-ebpf`) and the agent (`lb-user`), plus
//! pure helpers both sides use. `no_std`, integers and fixed arrays only, explicit padding.
//!
//! Byte order: every address and port stored in a map is in network byte order, and the
//! field names say so (`addr_be`, `port_be`). Everything else (counts, ids, flags,
//! timestamps) is host order.
#![no_std]

#[cfg(feature = "user")]
extern crate alloc;

pub mod checksum;
pub mod conntrack;
pub mod counters;
pub mod icmp;
pub mod reset;
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
    pub const CT_STATE: &str = "LB_CT_STATE";
    pub const SRC_RANGES: &str = "LB_SRC_RANGES";
    pub const CONFIG: &str = "LB_CONFIG";
    pub const COUNTERS: &str = "LB_COUNTERS";
    pub const FRONT_BITS: &str = "LB_FRONT_BITS";
    pub const FRAGMENTS: &str = "LB_FRAGMENTS";
    pub const RATE_LIMIT: &str = "LB_RATE_LIMIT";
    pub const REAP_QUEUE: &str = "LB_REAP_QUEUE";
    /// Per frontend (by svc_id) traffic, per CPU.
    pub const FRONTEND_STATS: &str = "LB_FE_STATS";
    /// Per backend (by backend id) traffic and new flows, per CPU.
    pub const BACKEND_STATS: &str = "LB_BE_STATS";
    /// Per backend: flows open now (started and not yet closed), shared by all CPUs.
    pub const BACKEND_LIVE: &str = "LB_BE_LIVE";
    /// Round-robin cursors, by frontend id.
    pub const RR_CURSORS: &str = "LB_RR_CURSORS";
    /// Session affinity: the backend each client of a Service port keeps.
    pub const AFFINITY: &str = "LB_AFFINITY";
    /// What each frontend is (its Service, port name and kind), for people and tools; the
    /// datapath does not read it (bpffs holds no plain files, so this is a map).
    pub const FRONTEND_META: &str = "LB_FE_META";
    /// The agent's own report: its syncs, their latency and errors (read by `lb-user status`).
    pub const AGENT: &str = "LB_AGENT";
    /// Socket-level load balancing: how the cgroup hooks run (host namespace cookie, mode).
    pub const SOCK_CONFIG: &str = "LB_SOCK_CONFIG";
    /// Connected sockets the hooks translated, by socket cookie: their Service address (for
    /// getpeername and recvfrom) and their backend (an open flow until the socket closes).
    pub const SOCK_CONN: &str = "LB_SOCK_CONN";
    /// Unconnected UDP sockets: the backend each keeps per frontend, and the frontend each
    /// backend's datagrams are shown from (an LRU).
    pub const SOCK_UDP: &str = "LB_SOCK_UDP";
    /// LB_CONNTRACK's preallocated kind, as the object defines it: used by no program; the
    /// agent creates it at the configured size and pins it as [`CONNTRACK`] when asked for
    /// a preallocated table (`--conntrack-memory preallocated`). Not in [`ALL`].
    pub const CT_PREALLOC: &str = "LB_CT_PREALLOC";
    /// Every map the agent pins; all survive an agent restart.
    pub const ALL: [&str; 22] = [
        SERVICES,
        SLOTS,
        BACKENDS,
        CONNTRACK,
        CT_STATE,
        SRC_RANGES,
        CONFIG,
        COUNTERS,
        FRONT_BITS,
        FRAGMENTS,
        RATE_LIMIT,
        REAP_QUEUE,
        FRONTEND_STATS,
        BACKEND_STATS,
        BACKEND_LIVE,
        RR_CURSORS,
        AFFINITY,
        FRONTEND_META,
        AGENT,
        SOCK_CONFIG,
        SOCK_CONN,
        SOCK_UDP,
    ];
}

/// Program names as they appear in the object file and under [`PIN_DIR`].
pub mod program_names {
    /// North-south, on node uplinks.
    pub const XDP_UPLINK: &str = "lb_xdp_uplink";
    /// tc ingress on node uplinks: translates what XDP could not (partial checksums) and
    /// forwards what XDP translated but could not transmit.
    pub const TC_UPLINK: &str = "lb_tc_uplink";
    /// East-west, tc ingress on pod-facing and tunnel devices.
    pub const TC_POD: &str = "lb_tc_pod";
    /// tc egress on uplinks, pod-facing and tunnel devices: the source-side rewrite of
    /// flows whose destination side was rewritten on the way in (netfilter mode).
    pub const TC_EGRESS: &str = "lb_tc_egress";
    /// Attached nowhere; the agent runs it (BPF_PROG_TEST_RUN) to remove conntrack entries.
    pub const CT_REAP: &str = "lb_ct_reap";
    /// Passes everything: the benchmarks' floor, and the lab's veth peers.
    pub const XDP_PASS: &str = "lb_xdp_pass";
    /// Benchmark wrapper: restores a template frame, tail-calls the program under test.
    pub const BENCH_RESTORE: &str = "lb_bench_restore";
    /// cgroup connect4: a socket connecting to a frontend is connected to a backend instead.
    pub const SOCK_CONNECT4: &str = "lb_sock_connect4";
    /// cgroup connect6: the same for an IPv6 socket connecting to an IPv4-mapped frontend.
    pub const SOCK_CONNECT6: &str = "lb_sock_connect6";
    /// cgroup sendmsg4: an unconnected UDP datagram to a frontend is sent to a backend.
    pub const SOCK_SENDMSG4: &str = "lb_sock_sendmsg4";
    /// cgroup recvmsg4: a UDP datagram from a backend is shown as from its frontend.
    pub const SOCK_RECVMSG4: &str = "lb_sock_recvmsg4";
    /// cgroup recvmsg6: the same for IPv6 sockets (IPv4-mapped addresses).
    pub const SOCK_RECVMSG6: &str = "lb_sock_recvmsg6";
    /// cgroup getpeername4: a connected socket's peer is shown as the frontend.
    pub const SOCK_GETPEERNAME4: &str = "lb_sock_getpeername4";
    /// cgroup getpeername6: the same for IPv6 sockets (IPv4-mapped addresses).
    pub const SOCK_GETPEERNAME6: &str = "lb_sock_getpeername6";
    /// cgroup sock_release: a closing socket leaves its backend's open flows.
    pub const SOCK_RELEASE: &str = "lb_sock_release";
    /// The socket hooks, as (program, link name under `links/`).
    pub const SOCKET_HOOKS: [(&str, &str); 8] = [
        (SOCK_CONNECT4, "sock-connect4"),
        (SOCK_CONNECT6, "sock-connect6"),
        (SOCK_SENDMSG4, "sock-sendmsg4"),
        (SOCK_RECVMSG4, "sock-recvmsg4"),
        (SOCK_RECVMSG6, "sock-recvmsg6"),
        (SOCK_GETPEERNAME4, "sock-getpeername4"),
        (SOCK_GETPEERNAME6, "sock-getpeername6"),
        (SOCK_RELEASE, "sock-release"),
    ];
    /// Every program the agent loads and pins.
    pub const PINNED: [&str; 13] = [
        XDP_UPLINK,
        TC_UPLINK,
        TC_POD,
        TC_EGRESS,
        CT_REAP,
        SOCK_CONNECT4,
        SOCK_CONNECT6,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_RECVMSG6,
        SOCK_GETPEERNAME4,
        SOCK_GETPEERNAME6,
        SOCK_RELEASE,
    ];
}

/// XDP metadata in front of a packet that XDP leaves to the uplink's tc program, which
/// does what `tag` says.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpMeta {
    pub mark: u32,
    pub tag: u32,
}

/// `XdpMeta::tag`: translated; forward it with bpf_redirect_neigh (fast mode, or an ICMP
/// error), which never meets the stack's martian check.
pub const XDP_META_REDIRECT: u32 = 0x4c42_4657;
/// `XdpMeta::tag`: translated on the destination side; set `mark` (the hand-over to tc
/// egress) and let the stack route it (netfilter mode).
pub const XDP_META_MARK: u32 = 0x4c42_4d4b;
/// `XdpMeta::tag`: XDP could not rewrite the packet (its checksum may be partial): tc
/// translates it.
pub const XDP_META_PARTIAL: u32 = 0x4c42_5043;

/// Capacities of the maps the agent does not size at load time.
pub const MAX_SERVICES: u32 = 131_072;
pub const MAX_BACKEND_SLOTS: u32 = 1_048_576;
/// Default capacities of what the agent sizes at load time (`datapath::Capacity`): frontend
/// ids (and their per-CPU counters), backend ids (the backend table, per-CPU counters and
/// live-flow counts).
pub const DEFAULT_FRONTENDS: u32 = 32_768;
pub const DEFAULT_BACKENDS: u32 = 32_768;
pub const MAX_SOURCE_RANGES: u32 = 16_384;
pub const MAX_FRAGMENTS: u32 = 8_192;
pub const MAX_RATE_LIMITED: u32 = 16_384;
/// Clients with session affinity remembered (an LRU: the least recently used go first).
pub const MAX_AFFINITY: u32 = 262_144;
/// Connected sockets the socket hooks track at once (LB_SOCK_CONN); a socket connecting
/// while it is full is translated but neither tracked nor counted as an open flow.
pub const MAX_SOCK_CONNS: u32 = 262_144;
/// Entries of LB_SOCK_UDP (an LRU): two per unconnected UDP socket and frontend it sends to.
pub const MAX_SOCK_UDP: u32 = 131_072;
/// What the reaper program removes of the flows whose keys are queued.
pub mod reap_mode {
    /// Dead ones: expired, or a half without its peer.
    pub const DEAD: u32 = 0;
    /// All of them, whatever their state (the agent asks to drop them).
    pub const ALL: u32 = 1;
}

/// Keys one run of the reaper program handles.
pub const REAP_BATCH: u32 = 256;
/// Default conntrack capacity in entries (two per flow): 524 288 flows.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 1_048_576;
/// Frontend filter size in bits (a power of two): the datapath looks at one bit to know a
/// packet cannot be for a frontend.
pub const FRONT_FILTER_BITS: u32 = 1 << 20;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A frontend: one address:port:protocol that the datapath translates.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// externalTrafficPolicy=Local: set 0 holds this node's backends (never SNAT) for
    /// traffic from outside; set 1 the cluster set for traffic from this node's own pods
    /// (kube-proxy's short-circuit).
    pub const EXTERNAL_LOCAL: u32 = 1 << 1;
    /// loadBalancerSourceRanges apply: only sources in LB_SRC_RANGES for this svc_id.
    pub const SOURCE_RANGES: u32 = 1 << 2;
    /// An empty backend set drops silently instead of refusing (ETP or ITP Local with
    /// endpoints elsewhere, so that load balancers' health checks decide).
    pub const DROP_WHEN_EMPTY: u32 = 1 << 3;
    /// A NodePort on the loopback address: served to the node's own sockets by the socket
    /// hooks only. The packet path ignores it (a packet addressed to loopback that arrives
    /// on a device is a martian, and must not reach a backend).
    pub const LOOPBACK: u32 = 1 << 4;
}

/// `ServiceValue::algorithm`: how a new flow chooses among a set's slots.
pub mod algorithm {
    /// A slot at random, as kube-proxy's iptables and nftables modes.
    pub const RANDOM: u8 = 0;
    /// The next slot of a cursor shared by all CPUs (IPVS `rr`).
    pub const ROUND_ROBIN: u8 = 1;
    /// The slots are a Maglev table of prime size; the slot is `flow_hash % size`, the same
    /// on every node (consistent hashing).
    pub const MAGLEV: u8 = 2;
    /// Maglev over the client address only (IPVS `sh`).
    pub const SOURCE_HASH: u8 = 3;
    /// The backend with the fewest open flows on this node, ties broken at random (IPVS `lc`).
    pub const LEAST_CONN: u8 = 4;
}

/// What a frontend translates to. Its backends are the slots
/// `SlotKey::new(svc_id, gen, set, 0..count[set])` in LB_SLOTS. A new backend set is
/// written under the other generation and takes effect when this entry, naming that
/// generation, replaces the old one: a packet sees the old set or the new, never a mix.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Small id of this frontend, allocated by the agent (reused after removal): keys its
    /// slots and source ranges and indexes its counters.
    pub svc_id: u32,
    pub flags: u32,
    /// sessionAffinity=ClientIP timeout; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// Slots in set 0 (the backends for the frontend's traffic) and set 1 (the cluster set
    /// of an externalTrafficPolicy=Local frontend, for short-circuited traffic).
    pub count: [u16; 2],
    /// Which generation of slots is live (0 or 1).
    pub gen: u8,
    pub algorithm: u8,
    /// A checksum of the other fields ([`ServiceValue::sealed`]): the kernel may rewrite a
    /// replaced element for another entry while a program copies it, and a copy mixing two
    /// entries fails it. 0: written without one (by an agent before checksums), not checked.
    pub check: u16,
    /// sessionAffinity's scope: the same for every frontend of one Service port (ClusterIP,
    /// NodePorts, ...), so a client keeps its backend whichever it uses. Also what a chosen
    /// backend must belong to (`affinity_scope(Backend::owner)`): a slot, affinity or socket
    /// entry read from an element the kernel reused for another Service's never sends a
    /// flow to another Service's backend.
    pub scope: u32,
    /// The frontend this entry is stored under: the datapath copies the entry and checks
    /// this, as the kernel may reuse a replaced element for another frontend while a
    /// program still reads it.
    pub key: ServiceKey,
}

impl ServiceValue {
    /// The checksum of every field but `check` (never 0).
    #[inline(always)]
    pub fn checksum(&self) -> u16 {
        let words = [
            self.svc_id,
            self.flags,
            self.affinity_timeout_s,
            self.count[0] as u32 | (self.count[1] as u32) << 16,
            self.gen as u32 | (self.algorithm as u32) << 8,
            self.scope,
            self.key.addr_be,
            self.key.port_be as u32 | (self.key.proto as u32) << 16,
        ];
        // FNV-1a over words, folded to 16 bits.
        let mut h: u32 = 0x811c_9dc5;
        let mut i = 0;
        while i < words.len() {
            h = (h ^ words[i]).wrapping_mul(0x0100_0193);
            i += 1;
        }
        match (h ^ h >> 16) as u16 {
            0 => 0xffff,
            folded => folded,
        }
    }

    /// This entry with its checksum: what the agent writes.
    pub fn sealed(self) -> Self {
        ServiceValue { check: self.checksum(), ..self }
    }

    /// A copy is whole: its checksum holds, or it was written without one.
    #[inline(always)]
    pub fn intact(&self) -> bool {
        self.check == 0 || self.check == self.checksum()
    }
}

/// A slot of LB_SLOTS: `index` packs the generation (bit 31), the set (bit 30) and the
/// position (bits 0-29).
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub svc_id: u32,
    pub index: u32,
}

impl SlotKey {
    #[inline(always)]
    pub const fn new(svc_id: u32, gen: u8, set: u8, position: u32) -> SlotKey {
        SlotKey { svc_id, index: ((gen as u32 & 1) << 31) | ((set as u32 & 1) << 30) | (position & 0x3fff_ffff) }
    }
    pub const fn gen(&self) -> u8 {
        (self.index >> 31) as u8
    }
    pub const fn set(&self) -> u8 {
        ((self.index >> 30) & 1) as u8
    }
    pub const fn position(&self) -> u32 {
        self.index & 0x3fff_ffff
    }
}

/// `Backend::flags`
pub mod backend_flags {
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 0;
    /// Some set of its Service port chooses it for new flows (not merely kept for the flows
    /// it has, as a terminating endpoint is): session affinity may send new flows to it.
    pub const CHOSEN: u8 = 1 << 1;
}

/// One endpoint address:port of one Service port, at its id's index in the LB_BACKENDS
/// array. `gen` changes whenever the id is given to another endpoint or freed (then the
/// entry is all zero but for `gen`), so a flow that remembers (id, gen) knows when its
/// backend is gone; ids are not shared between Service ports, so an endpoint leaving one
/// Service is gone for that Service's flows even while another Service still uses it.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub flags: u8,
    pub _pad: u8,
    pub gen: u32,
    pub _pad2: u32,
    /// A stable hash of the Service port the id belongs to: the agent adopts ids by it after
    /// a restart, and the datapath checks a backend it picked belongs to the Service
    /// (`ServiceValue::scope`), so a reused slot, affinity or socket entry cannot hand it
    /// another Service's backend.
    pub owner: u64,
}

/// A flow as seen on the wire in one direction. Each translated flow has two entries
/// (halves): the original direction (client -> frontend) and the reply direction
/// (backend -> client, or -> the SNAT address and port).
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    #[inline(always)]
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
    /// This half is the reply direction.
    pub const REPLY: u8 = 1 << 0;
    /// The flow's source was rewritten (SNAT): the reply half's key holds the NAT port.
    pub const SNAT: u8 = 1 << 1;
    /// The flow was started by traffic from this node's pods to an externalTrafficPolicy=Local
    /// frontend and uses its cluster set.
    pub const SHORT_CIRCUIT: u8 = 1 << 3;
}

/// One half of a flow: the rewrite for packets matching its key, and the flow's shared
/// state. Both halves carry the same `stamp` nonce; see [`conntrack`] for the protocol that
/// keeps them one flow.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `conntrack::stamp(nonce, time)`: the flow's nonce (high 32 bits, never 0 while live)
    /// and the coarse time of its last refresh. Changed only by compare-and-swap. A half is
    /// inserted with nonce 0 and given its nonce only once the whole value is in place, so
    /// a reader that finds a nonce also finds the key and rewrite that go with it.
    pub stamp: u64,
    /// The key this half is stored under. The kernel reuses a removed element for another
    /// key at once (see conntrack's docs), while a reader on another CPU may still hold it:
    /// a reader checks this against the key it looked up, and the nonce again after it
    /// has read what it needs, and treats a mismatch as no entry.
    pub key: CtKey,
    pub nat_src_addr_be: u32,
    pub nat_dst_addr_be: u32,
    pub nat_src_port_be: u16,
    pub nat_dst_port_be: u16,
    pub backend_id: u32,
    /// The backend's generation when the flow chose it.
    pub backend_gen: u32,
    /// The frontend's id (counters; the Service a flow whose backend is gone chooses from).
    pub svc_id: u32,
    /// `conntrack::bits`, changed only by atomic or/and.
    pub state: u32,
    pub flags: u8,
    pub _pad: u8,
    /// The path MTU toward where this half's packets go (0: not looked up yet).
    pub hop_mtu: u16,
    /// Where this half's packets leave (fast mode): ifindex and Ethernet addresses.
    pub hop_ifindex: u32,
    pub hop_dmac: [u8; 6],
    pub hop_smac: [u8; 6],
    /// The nonce of the flow that cached `hop_*` (written after them): the cache counts only
    /// while it equals the stamp's nonce, so a hop written through a reused element never
    /// serves the flow that now holds it. 0: nothing cached.
    pub hop_nonce: u32,
    pub _pad2: u32,
}

/// A client of a Service port with session affinity (LB_AFFINITY key).
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub scope: u32,
    pub client_addr_be: u32,
}

/// The backend a client keeps, while it lasts and the entry is fresh.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// bpf_ktime_get_coarse_ns() of the client's last new flow.
    pub last_ns: u64,
    pub backend_id: u32,
    pub backend_gen: u32,
    /// The key it is stored under: LB_AFFINITY is an LRU, whose elements the kernel reuses
    /// for other clients at once; the datapath copies the entry and checks this.
    pub key: AffinityKey,
}

/// `SockConfig::mode`: which sockets the socket hooks translate.
pub mod sock_mode {
    /// None (the hooks are detached; also what an unwritten entry says).
    pub const OFF: u32 = 0;
    /// Sockets of the node's own network namespace (host-network processes) only; pods'
    /// traffic is translated per packet at tc, where a mesh sees the Service address.
    pub const HOST_ONLY: u32 = 1;
    /// Sockets of every network namespace of the processes in the cgroup.
    pub const ALL: u32 = 2;
}

/// How the socket hooks run, the single entry of LB_SOCK_CONFIG (written by the agent
/// before it attaches them).
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConfig {
    /// The network namespace cookie of the node's own namespace (where the agent runs).
    pub host_netns_cookie: u64,
    /// `sock_mode::*`
    pub mode: u32,
    pub _pad: u32,
}

/// A connected socket the hooks translated (LB_SOCK_CONN value, keyed by socket cookie).
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConn {
    /// The socket it is stored under: the hooks copy the entry and check this, as the
    /// kernel may reuse a replaced or removed element for another socket at once.
    pub cookie: u64,
    pub frontend_addr_be: u32,
    pub backend_addr_be: u32,
    pub frontend_port_be: u16,
    pub backend_port_be: u16,
    /// Counted in LB_BE_LIVE until the socket closes.
    pub backend_id: u32,
    /// The backend's generation when the socket chose it: a socket connecting again to the
    /// same frontend keeps its backend while the generation holds.
    pub backend_gen: u32,
    pub svc_id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
    pub _pad2: u32,
}

/// `SockUdpKey::dir`
pub mod sock_dir {
    /// Keyed by the frontend: the backend an unconnected socket's datagrams go to.
    pub const FORWARD: u8 = 0;
    /// Keyed by the backend: the frontend its datagrams are shown from.
    pub const REVERSE: u8 = 1;
}

/// An unconnected UDP socket and an address it exchanges datagrams with (LB_SOCK_UDP key).
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockUdpKey {
    pub cookie: u64,
    pub addr_be: u32,
    pub port_be: u16,
    /// `sock_dir::*`
    pub dir: u8,
    pub _pad: u8,
}

/// The other end of a [`SockUdpKey`]: the backend (FORWARD) or the frontend (REVERSE).
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockUdpValue {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub backend_gen: u32,
    /// The key it is stored under (an LRU's elements are reused for other keys at once):
    /// the hooks copy the entry and check this.
    pub key: SockUdpKey,
}

/// The client address backend selection uses for sockets of a network namespace (session
/// affinity's key, the hashes' input): 0.x.y.z from the namespace's cookie. No packet comes
/// from 0.0.0.0/8, so the affinity of sockets never mixes with a packet client's. A socket
/// has no source address yet when it connects; its namespace is the client.
#[inline(always)]
pub fn netns_client(netns_cookie: u64) -> u32 {
    ((fmix64(netns_cookie) >> 40) as u32).to_be()
}

/// The hash new flows are placed by (Maglev, source hash), the same in the kernel and in
/// userspace (`lb-user which` predicts the kernel's choice with it). Over the client's
/// address and port and the frontend's port and protocol, not the frontend's address: a
/// client reaching the NodePort of any node (or a LoadBalancer IP any node receives) lands
/// on the same backend. murmur3's 64-bit finaliser mixes the bits.
#[inline(always)]
pub fn flow_hash(client_addr_be: u32, client_port_be: u16, frontend_port_be: u16, proto: u8) -> u32 {
    let key = (u32::from_be(client_addr_be) as u64) << 32
        | (u16::from_be(client_port_be) as u64) << 16
        | u16::from_be(frontend_port_be) as u64;
    (fmix64(key ^ (proto as u64) << 56) >> 32) as u32
}

/// The source-hash placement: the client's address alone.
#[inline(always)]
pub fn client_hash(client_addr_be: u32) -> u32 {
    (fmix64(u32::from_be(client_addr_be) as u64) >> 32) as u32
}

#[inline(always)]
const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// Traffic of one frontend on one CPU (LB_FE_STATS): packets and bytes both ways (requests
/// and replies), and the flows it started.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Traffic of one backend on one CPU (LB_BE_STATS).
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// `FrontendMeta::kind`: what made the frontend (0: not recorded).
pub mod frontend_kind {
    pub const CLUSTER_IP: u8 = 1;
    pub const NODE_PORT: u8 = 2;
    pub const LOAD_BALANCER: u8 = 3;
    pub const EXTERNAL_IP: u8 = 4;
}

/// Bytes of `FrontendMeta`'s text fields: Kubernetes namespaces and Service names have at
/// most 63 characters and port names 15, so each fits with a NUL to spare.
pub const META_NAME_LEN: usize = 64;
pub const META_PORT_LEN: usize = 16;

/// What a frontend is, keyed like LB_SERVICES (LB_FE_META): the agent writes it with the
/// service entry. Text is UTF-8, NUL-padded; longer text is cut at a character boundary.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendMeta {
    pub namespace: [u8; META_NAME_LEN],
    pub name: [u8; META_NAME_LEN],
    /// The Service port's name (empty for an unnamed port).
    pub port_name: [u8; META_PORT_LEN],
    /// `frontend_kind::*`
    pub kind: u8,
    pub _pad: [u8; 7],
}

/// Bytes of `AgentStatus::last_problem`.
pub const AGENT_PROBLEM_LEN: usize = 192;

/// The agent's report of its syncs, the single entry of LB_AGENT. Written by the agent at
/// start (counts from zero) and after every sync; the datapath does not read it.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentStatus {
    /// The agent's process id (0: no agent has run on these pins).
    pub pid: u32,
    /// Problems the last sync reported (objects not usable in full, writes that failed).
    pub problems: u32,
    /// Wall-clock time the agent started, nanoseconds since the Unix epoch.
    pub started_unix_ns: u64,
    /// Syncs that wrote the maps since the agent started.
    pub syncs: u64,
    /// Syncs that failed in part or in whole since the agent started (each is retried).
    pub sync_errors: u64,
    /// Wall-clock end of the last sync, nanoseconds since the Unix epoch (0: none yet).
    pub last_sync_unix_ns: u64,
    /// How long the last sync took (reading the source, the model, the map writes).
    pub last_sync_duration_ns: u64,
    /// Frontends the maps held after the last sync.
    pub frontends: u32,
    pub _pad: u32,
    /// The first problem of the last sync (UTF-8, NUL-padded, cut short if longer).
    pub last_problem: [u8; AGENT_PROBLEM_LEN],
}

/// Session affinity's scope for a Service port's stable owner hash (`Backend::owner`): the
/// same 32 bits on each of its frontends, so a client keeps its backend whichever it uses.
#[inline(always)]
pub const fn affinity_scope(owner: u64) -> u32 {
    (owner ^ owner >> 32) as u32
}

/// Conntrack accounting, the single entry of LB_CT_STATE, changed with atomic adds.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtState {
    /// Entries (halves) in LB_CONNTRACK.
    pub entries: u64,
    /// Where the next SNAT port search starts: a shared cursor, so ports rotate through
    /// the whole range and CPUs never walk the same ports.
    pub snat_cursor: u64,
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

/// `Config::mode`
pub mod mode {
    /// Translated packets go through the node's stack, so its netfilter forward hook
    /// (where netfilter-based CNIs enforce NetworkPolicy) sees them: the destination side
    /// is rewritten on the way in, the source side on the way out (tc egress), as
    /// kube-proxy's PREROUTING DNAT and POSTROUTING SNAT do.
    pub const NETFILTER: u32 = 0;
    /// Translated packets leave straight from XDP (XDP_TX) or tc (bpf_redirect_neigh),
    /// bypassing the node's netfilter forward hook and routing.
    pub const FAST: u32 = 1;
}

/// Node-wide settings, the single entry of LB_CONFIG.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// This node's address, used as the SNAT source.
    pub node_addr_be: u32,
    /// Sources in this prefix are local pods (kube-proxy's detect-local): ClusterIP
    /// traffic from them keeps its source, and ETP=Local frontends short-circuit them.
    pub local_addr_be: u32,
    pub local_prefix_len: u32,
    /// Replies reach the uplink only for these destinations: the node's SNAT ports, or
    /// this prefix (where backends answer clients whose source was kept: pods here).
    pub pods_addr_be: u32,
    pub pods_prefix_len: u32,
    /// `mode::*`
    pub mode: u32,
    /// New flows are refused while LB_CONNTRACK holds this many entries or more.
    pub ct_admit_limit: u32,
    /// skb->mark bits carrying the netfilter mode's hand-over to tc egress: a 16-bit
    /// value shifted left by `mark_shift`.
    pub mark_shift: u32,
    /// SNAT source ports are taken from [snat_port_min, snat_port_max].
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub _pad: u32,
}

impl Config {
    #[inline(always)]
    pub fn fast(&self) -> bool {
        self.mode == mode::FAST
    }
}

/// A fragmented datagram, keyed as a hook sees it: (source, destination, protocol, IP id).
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    /// `frag_hook::*`
    pub hook: u8,
}

/// `FragKey::hook`: which hook's view of the datagram a key is.
pub mod frag_hook {
    pub const INGRESS: u8 = 0;
    pub const EGRESS: u8 = 1;
}

/// How the first fragment of a datagram was translated: later fragments get the same
/// addresses (they carry no ports) and, in netfilter mode, the same hand-over to egress.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragValue {
    pub created_ns: u64,
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    /// The key it is stored under: LB_FRAGMENTS is an LRU, whose elements the kernel reuses
    /// for other datagrams at once; the datapath copies the entry and checks this.
    pub key: FragKey,
    /// The egress mark payload (netfilter mode), as `flow::Translation::egress`.
    pub egress: u16,
    pub _pad: [u8; 2],
}

/// A token bucket of LB_RATE_LIMIT, for answers the datapath sends (ICMP port unreachable,
/// TCP resets), kept like the kernel's ICMP limits: one node-wide bucket (key 0) and one
/// per destination.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Bucket {
    pub last_ns: u64,
    pub tokens: u64,
}

/// Length of the frames the benchmark wrapper restores: Ethernet + IPv4 + TCP, no payload.
pub const BENCH_FRAME_LEN: usize = 54;

/// The benchmark wrapper's template (see lb-ebpf's bench.rs); not part of the datapath.
#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchFrame {
    pub bytes: [u8; BENCH_FRAME_LEN],
    pub _pad: [u8; 2],
    /// Non-zero: give every run a source address and port no earlier run used.
    pub new_flow_each_run: u32,
    /// Runs so far (the new-flow sequence number).
    pub runs: u32,
}

/// Does a new flow need its source rewritten to the node's address (SNAT)?
/// - hairpin (the backend is the client itself): always, or the backend would see a packet
///   from itself;
/// - NodePort / LB IP / externalIP: with externalTrafficPolicy=Cluster when the backend is on
///   another node, so the reply comes back through this node; never with Local, except for
///   short-circuited traffic from outside the local pods (the node itself);
/// - ClusterIP: when the source is not a local pod (as kube-proxy masquerades).
#[inline(always)]
pub fn needs_snat(service_flags: u32, backend_flags: u8, src_local: bool, hairpin: bool) -> bool {
    if hairpin {
        return true;
    }
    if service_flags & service_flags::EXTERNAL != 0 {
        service_flags & service_flags::EXTERNAL_LOCAL == 0 && backend_flags & backend_flags::LOCAL == 0
    } else {
        !src_local
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

/// The frontend filter's bit for a destination address and port: every frontend sets its
/// bit, so a clear bit means no frontend (a set one may be a collision).
#[inline(always)]
pub fn front_filter_bit(addr_be: u32, port_be: u16) -> u32 {
    let x = (addr_be as u64) << 16 | port_be as u64;
    // Fibonacci hashing: the top bits of a multiply spread nearby addresses and ports.
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FRONT_FILTER_BITS.trailing_zeros())) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn a_service_entry_mixed_with_another_fails_its_checksum() {
        let a = ServiceValue {
            svc_id: 7,
            flags: service_flags::EXTERNAL,
            count: [3, 0],
            gen: 1,
            scope: 0x1234,
            key: ServiceKey { addr_be: 0x0a60_0001, port_be: 80u16.to_be(), proto: 6, _pad: 0 },
            ..Default::default()
        }
        .sealed();
        assert!(a.intact() && a.check != 0);
        let b = ServiceValue { svc_id: 9, count: [5, 2], gen: 0, scope: 0x5678, ..a }.sealed();
        assert!(b.intact());
        // A copy taken while the element was rewritten from one to the other: any field of
        // one with the rest (and the checksum) of the other.
        let torn = [
            ServiceValue { svc_id: b.svc_id, ..a },
            ServiceValue { count: b.count, ..a },
            ServiceValue { gen: b.gen, ..a },
            ServiceValue { scope: b.scope, ..a },
            ServiceValue { check: b.check, ..a },
        ];
        for (i, t) in torn.iter().enumerate() {
            assert!(!t.intact(), "torn copy {i}: {t:?}");
        }
        assert!(ServiceValue { check: 0, ..b }.intact(), "an entry written without a checksum is not checked");
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 32);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 80);
        assert_eq!(size_of::<CtState>(), 16);
        assert_eq!(size_of::<SourceRange>(), 8);
        assert_eq!(size_of::<Config>(), 40);
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(size_of::<FragValue>(), 32);
        assert_eq!(size_of::<BenchFrame>(), 64);
        assert_eq!(size_of::<XdpMeta>(), 8);
        assert_eq!(size_of::<BackendStats>(), 24);
        assert_eq!(size_of::<FrontendStats>(), 24);
        assert_eq!(size_of::<FrontendMeta>(), 152);
        assert_eq!(size_of::<AgentStatus>(), 248);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 24);
        assert_eq!(size_of::<SockConfig>(), 16);
        assert_eq!(size_of::<SockConn>(), 40);
        assert_eq!(size_of::<SockUdpKey>(), 16);
        assert_eq!(size_of::<SockUdpValue>(), 32);
    }

    #[test]
    fn netns_clients_are_in_0_0_0_0_slash_8_and_differ() {
        let a = netns_client(1);
        assert_eq!(a.to_ne_bytes()[0], 0, "first octet 0");
        assert_ne!(a, netns_client(2));
        assert_ne!(a, 0);
    }

    #[test]
    fn map_names_fit_the_kernel() {
        // BPF_OBJ_NAME_LEN is 16 with the NUL: a longer name shows truncated in bpftool.
        for name in map_names::ALL {
            assert!(name.len() <= 15, "{name} is longer than 15 characters");
        }
    }

    #[test]
    fn slot_keys_pack_generation_set_and_position() {
        let k = SlotKey::new(7, 1, 1, 12345);
        assert_eq!((k.svc_id, k.gen(), k.set(), k.position()), (7, 1, 1, 12345));
        let k = SlotKey::new(7, 0, 1, 0);
        assert_eq!((k.gen(), k.set(), k.position()), (0, 1, 0));
        assert_ne!(SlotKey::new(1, 0, 0, 5), SlotKey::new(1, 1, 0, 5));
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
    fn front_filter_bits_stay_in_range_and_spread() {
        let mut seen = [false; 64];
        for i in 0..64u32 {
            let bit = front_filter_bit((0x0a60_0000 + i).to_be(), 80u16.to_be());
            assert!(bit < FRONT_FILTER_BITS);
            seen[(bit % 64) as usize] = true;
        }
        assert!(seen.iter().filter(|s| **s).count() > 30, "consecutive addresses spread over words");
    }

    #[test]
    fn flow_hashes_spread_and_ignore_the_frontend_address() {
        let h = |port: u16| flow_hash(0x0a00_0001u32.to_be(), port.to_be(), 80u16.to_be(), IPPROTO_TCP);
        let mut buckets = [0u32; 16];
        for port in 1024..(1024 + 16 * 1000) {
            buckets[(h(port) % 16) as usize] += 1;
        }
        assert!(buckets.iter().all(|b| (900..1100).contains(b)), "{buckets:?}");
        assert_ne!(h(1024), flow_hash(0x0a00_0001u32.to_be(), 1024u16.to_be(), 80u16.to_be(), IPPROTO_UDP));
        assert_ne!(client_hash(1u32.to_be()), client_hash(2u32.to_be()));
    }

    #[test]
    fn reversed_key_swaps_both_ends() {
        let k = CtKey { src_addr_be: 1, dst_addr_be: 2, src_port_be: 3, dst_port_be: 4, proto: 6, _pad: [0; 3] };
        let r = k.reversed();
        assert_eq!((r.src_addr_be, r.dst_addr_be, r.src_port_be, r.dst_port_be), (2, 1, 4, 3));
        assert_eq!(r.reversed(), k);
    }
}
