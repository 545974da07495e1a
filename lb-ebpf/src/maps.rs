//! The maps, named as in `lb_common::map_names` (the static's name is the map's name).
use aya_ebpf::{
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    counters::{self, Counter},
    Backend, Config, CtKey, CtValue, ServiceKey, ServiceValue, SlotKey, SourceRange, MAX_BACKENDS, MAX_BACKEND_SLOTS,
    MAX_CONNTRACK, MAX_SERVICES, MAX_SOURCE_RANGES,
};

#[btf_map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

#[btf_map]
pub static LB_SLOTS: HashMap<SlotKey, u32, { MAX_BACKEND_SLOTS as usize }> = HashMap::new();

#[btf_map]
pub static LB_BACKENDS: HashMap<u32, Backend, { MAX_BACKENDS as usize }> = HashMap::new();

#[btf_map]
pub static LB_CONNTRACK: LruHashMap<CtKey, CtValue, { MAX_CONNTRACK as usize }> = LruHashMap::new();

#[btf_map]
pub static LB_SRC_RANGES: LpmTrie<SourceRange, u32, { MAX_SOURCE_RANGES as usize }> = LpmTrie::new();

#[btf_map]
pub static LB_CONFIG: Array<Config, 1> = Array::new();

/// Where each CPU continues its walk through the SNAT port range.
#[btf_map]
pub static LB_SNAT_CURSOR: PerCpuArray<u32, 1> = PerCpuArray::new();

#[btf_map]
pub static LB_COUNTERS: PerCpuArray<Counter, { counters::COUNT as usize }> = PerCpuArray::new();

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

#[inline(always)]
pub fn source_allowed(svc_id: u32, src_addr_be: u32) -> bool {
    let key = Key::new(64, SourceRange { svc_id_be: svc_id.to_be(), addr_be: src_addr_be });
    LB_SRC_RANGES.get(&key).is_some()
}
