//! IPv4 fragments: later fragments carry no ports, so each hook remembers how it
//! translated a datagram's first fragment, keyed by (source, destination, protocol, IP id)
//! as it saw them, and gives the later ones the same addresses.
use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_coarse_ns};
use lb_common::{counters, FragKey, FragValue};

use crate::{
    maps::{count, LB_FRAGMENTS},
    packet::Parsed,
};

/// Fragments of one datagram arrive within this; an older entry is a datagram whose IP id
/// has come round again.
const FRESH_NS: u64 = 2_000_000_000;

#[inline(always)]
fn key(p: &Parsed, hook: u8) -> FragKey {
    FragKey {
        src_addr_be: p.key.src_addr_be,
        dst_addr_be: p.key.dst_addr_be,
        id_be: p.ip_id_be,
        proto: p.key.proto,
        hook,
    }
}

/// Remembers the addresses (and egress hand-over) the first fragment got at `hook`.
#[inline(always)]
pub fn remember(p: &Parsed, hook: u8, src_addr_be: u32, dst_addr_be: u32, egress: u16) {
    // SAFETY: plain helper call.
    let created_ns = unsafe { bpf_ktime_get_coarse_ns() };
    let key = key(p, hook);
    let value = FragValue { created_ns, src_addr_be, dst_addr_be, key, egress, _pad: [0; 2] };
    let _ = LB_FRAGMENTS.insert(key, value, BPF_ANY as u64);
}

/// How the first fragment of this later fragment's datagram was translated at `hook`.
#[inline(always)]
pub fn first_of(p: &Parsed, hook: u8) -> Option<FragValue> {
    let key = key(p, hook);
    // SAFETY: a copy of plain integers.
    let v = *unsafe { LB_FRAGMENTS.get(key) }?;
    if v.key != key {
        // An LRU element reused for another datagram while it was read: not this one's.
        count(counters::ENTRY_REUSED, 0);
        return None;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    (now.saturating_sub(v.created_ns) < FRESH_NS).then_some(v)
}
