//! Token buckets for what the datapath sends on its own (ICMP port unreachable, TCP
//! resets) and logs, kept like the kernel's ICMP limits: a node-wide bucket (1000 per
//! second, burst 50: icmp_msgs_per_sec / icmp_msgs_burst) and one per destination (one per
//! second, burst 6: icmp_ratelimit and the inetpeer burst), so a flood of packets to a
//! Service without endpoints, or of stray ACKs, cannot turn the node into a reflector.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use lb_common::Bucket;

use crate::maps::LB_RATE_LIMIT;

const NODE_WIDE: u32 = 0;
/// The bucket of the datapath's own log lines (NAT exhaustion): one a second.
const LOG: u32 = u32::MAX;
const MILLI: u64 = 1000;

#[inline(always)]
fn take(key: u32, per_second: u64, burst: u64) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let Some(b) = LB_RATE_LIMIT.get_ptr_mut(key) else {
        let fresh = Bucket { last_ns: now, tokens: (burst - 1) * MILLI };
        // Losing an insert race to another CPU only gives one more token.
        let _ = LB_RATE_LIMIT.insert(key, fresh, BPF_NOEXIST as u64);
        return true;
    };
    // SAFETY: a live LRU entry; concurrent updates may lose a token or two, never more.
    unsafe {
        let elapsed = now.saturating_sub((*b).last_ns);
        let tokens = ((*b).tokens + elapsed * per_second / 1_000_000).min(burst * MILLI);
        (*b).last_ns = now;
        if tokens < MILLI {
            (*b).tokens = tokens;
            return false;
        }
        (*b).tokens = tokens - MILLI;
    }
    true
}

/// May the datapath send an answer to `dst_addr_be` now?
#[inline(never)]
pub fn answer_allowed(dst_addr_be: u32) -> bool {
    take(dst_addr_be, 1, 6) && take(NODE_WIDE, 1000, 50)
}

/// May the datapath log a rare event now?
#[inline(always)]
pub fn log_allowed() -> bool {
    take(LOG, 1, 1)
}
