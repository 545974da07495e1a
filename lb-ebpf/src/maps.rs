//! The maps, named as in `lb_common::map_names` (the static's name is the map's name), and
//! the one-line accessors the programs share.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    counters::{self, Counter},
    front_filter_bit, AffinityKey, AffinityValue, AgentStatus, Backend, BackendStats, Bucket, Config, CtKey, CtState,
    CtValue, FragKey, FragValue, FrontendMeta, FrontendStats, ServiceKey, ServiceValue, SlotKey, SockConfig, SockConn,
    SockUdpKey, SockUdpValue, SourceRange, DEFAULT_BACKENDS, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_FRONTENDS,
    FRONT_FILTER_BITS, MAX_AFFINITY, MAX_BACKEND_SLOTS, MAX_FRAGMENTS, MAX_RATE_LIMITED, MAX_SERVICES, MAX_SOCK_CONNS,
    MAX_SOCK_UDP, MAX_SOURCE_RANGES, REAP_BATCH,
};

#[btf_map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

#[btf_map]
pub static LB_SLOTS: HashMap<SlotKey, u32, { MAX_BACKEND_SLOTS as usize }> = HashMap::new();

/// Indexed by backend id. The agent sizes it (and the backend counters) at load.
#[btf_map]
pub static LB_BACKENDS: Array<Backend, { DEFAULT_BACKENDS as usize }> = Array::new();

/// Indexed by frontend id (svc_id); sized by the agent at load.
#[btf_map]
pub static LB_FE_STATS: PerCpuArray<FrontendStats, { DEFAULT_FRONTENDS as usize }> = PerCpuArray::new();

/// Indexed by backend id.
#[btf_map]
pub static LB_BE_STATS: PerCpuArray<BackendStats, { DEFAULT_BACKENDS as usize }> = PerCpuArray::new();

/// Indexed by backend id: open flows, changed atomically at flow start, close and removal
/// (never per packet).
#[btf_map]
pub static LB_BE_LIVE: Array<u64, { DEFAULT_BACKENDS as usize }> = Array::new();

/// Not an LRU: nothing is evicted behind the flows' backs (see lb_common::conntrack). Not
/// preallocated by default (memory follows the flows); the agent sets the capacity and the
/// kind at load. Either kind reuses a removed element at once, so every reader checks the
/// key inside the value (docs/DATAPATH.md, "Elements the kernel reuses").
#[btf_map]
pub static LB_CONNTRACK: HashMap<
    CtKey,
    CtValue,
    { DEFAULT_CONNTRACK_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// LB_CONNTRACK's preallocated kind (`--conntrack-memory preallocated`): the same table,
/// read by no program. The agent creates it at its capacity and pins it as LB_CONNTRACK,
/// which the programs then use (aya sets a map's size at load, not its flags). One entry
/// here, so that a load that does not ask for it costs nothing.
#[btf_map]
pub static LB_CT_PREALLOC: HashMap<CtKey, CtValue, 1> = HashMap::new();

#[btf_map]
pub static LB_CT_STATE: Array<CtState, 1> = Array::new();

#[btf_map]
pub static LB_SRC_RANGES: LpmTrie<SourceRange, u32, { MAX_SOURCE_RANGES as usize }> = LpmTrie::new();

#[btf_map]
pub static LB_CONFIG: Array<Config, 1> = Array::new();

#[btf_map]
pub static LB_COUNTERS: PerCpuArray<Counter, { counters::COUNT as usize }> = PerCpuArray::new();

/// One bit per (address, port) hash: clear means no frontend has it.
#[btf_map]
pub static LB_FRONT_BITS: Array<u64, { (FRONT_FILTER_BITS / 64) as usize }> = Array::new();

#[btf_map]
pub static LB_FRAGMENTS: LruHashMap<FragKey, FragValue, { MAX_FRAGMENTS as usize }> = LruHashMap::new();

#[btf_map]
pub static LB_RATE_LIMIT: LruHashMap<u32, Bucket, { MAX_RATE_LIMITED as usize }> = LruHashMap::new();

/// Round-robin cursors, by frontend id (sized with the frontend counters).
#[btf_map]
pub static LB_RR_CURSORS: Array<u64, { DEFAULT_FRONTENDS as usize }> = Array::new();

#[btf_map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue, { MAX_AFFINITY as usize }> = LruHashMap::new();

/// What each frontend is (Service, port name, kind): written by the agent for people and
/// tools (`lb-user services`, bpftool), never read here. Not preallocated: it follows the
/// frontends in use.
#[btf_map]
pub static LB_FE_META: HashMap<ServiceKey, FrontendMeta, { MAX_SERVICES as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// The agent's report of its syncs (`lb-user status`), never read here.
#[btf_map]
pub static LB_AGENT: Array<AgentStatus, 1> = Array::new();
#[btf_map]
pub static LB_SOCK_CONFIG: Array<SockConfig, 1> = Array::new();

/// Connected sockets, by cookie. Not an LRU: an entry holds an open-flow count that only
/// the socket's release gives back. Not preallocated: memory follows the sockets.
#[btf_map]
pub static LB_SOCK_CONN: HashMap<u64, SockConn, { MAX_SOCK_CONNS as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

#[btf_map]
pub static LB_SOCK_UDP: LruHashMap<SockUdpKey, SockUdpValue, { MAX_SOCK_UDP as usize }> = LruHashMap::new();

/// Where a new flow's conntrack value is built (not pinned: nothing survives a packet).
#[btf_map]
pub static LB_SCRATCH: PerCpuArray<CtValue, 1> = PerCpuArray::new();

/// Where a new flow's copy of its frontend's entry is checked and read (not pinned).
#[btf_map]
pub static LB_SVC_SCRATCH: PerCpuArray<ServiceValue, 1> = PerCpuArray::new();

/// Where FIB lookups are built (`bpf_fib_lookup` is 64 bytes the call chain's stack
/// budget cannot spare). Bytes, so the map's BTF stays a plain array.
#[btf_map]
pub static LB_FIB_SCRATCH: PerCpuArray<[u64; 8], 1> = PerCpuArray::new();

/// Keys the agent asks the reaper program to look at.
#[btf_map]
pub static LB_REAP_QUEUE: Array<CtKey, { REAP_BATCH as usize }> = Array::new();

#[inline(always)]
pub fn count(index: u32, bytes: u64) {
    if let Some(c) = LB_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// A translated packet of frontend `svc_id` and backend `backend_id`, `new_flow` if it
/// started the flow: per-CPU counters, one array lookup each.
#[inline(always)]
pub fn count_traffic(svc_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = LB_FE_STATS.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
    if let Some(c) = LB_BE_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    LB_CONFIG.get(0)
}

#[inline(always)]
pub fn source_allowed(svc_id: u32, src_addr_be: u32) -> bool {
    let key = Key::new(64, SourceRange { svc_id_be: svc_id.to_be(), addr_be: src_addr_be });
    LB_SRC_RANGES.get(&key).is_some()
}

/// Might (address, port) be a frontend? False means certainly not.
#[inline(always)]
pub fn maybe_frontend(addr_be: u32, port_be: u16) -> bool {
    let bit = front_filter_bit(addr_be, port_be);
    LB_FRONT_BITS.get(bit / 64).is_some_and(|w| *w & (1u64 << (bit % 64)) != 0)
}

/// This CPU's FIB lookup parameters, all zero (every field the kernel reads is set or 0).
#[inline(always)]
pub fn fib_scratch() -> Option<&'static mut aya_ebpf::bindings::bpf_fib_lookup> {
    let p = LB_FIB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU, nothing else on this CPU runs while this program does; 64 bytes,
    // the size of bpf_fib_lookup, and 8-aligned.
    unsafe {
        *p = [0; 8];
        Some(&mut *(p as *mut aya_ebpf::bindings::bpf_fib_lookup))
    }
}

#[inline(always)]
pub fn backend(id: u32) -> Option<&'static Backend> {
    LB_BACKENDS.get(id)
}

/// The conntrack accounting entry (its fields change only by atomic operations).
#[inline(always)]
pub fn ct_state() -> Option<*mut CtState> {
    LB_CT_STATE.get_ptr_mut(0)
}
