//! Choosing a backend for a new flow (established flows follow conntrack): session affinity
//! first, then the frontend's algorithm over the slots of the set the flow uses.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::BPF_ANY,
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_loop},
};
use lb_common::{
    affinity_scope, algorithm, backend_flags, client_hash, counters, flow_hash, AffinityKey, AffinityValue, CtKey,
    ServiceValue, SlotKey,
};

use crate::{
    atomic,
    maps::{backend, count, LB_AFFINITY, LB_BE_LIVE, LB_RR_CURSORS, LB_SLOTS},
};

/// The backend id for a new flow `k` of `svc` in slot set `set`, or 0 when its slots are
/// not there (the agent broke its write order). `svc.count[set]` is not 0. The flow's
/// source is its client (session affinity, the hashes): a packet's source address and port,
/// or for a socket its namespace's `netns_client` and its cookie.
#[inline(never)]
pub fn choose(k: &CtKey, svc: &ServiceValue, set: u32) -> u32 {
    let affinity = AffinityKey { scope: svc.scope, client_addr_be: k.src_addr_be };
    if svc.affinity_timeout_s != 0 {
        let kept = kept_backend(&affinity, svc.affinity_timeout_s);
        if kept != 0 {
            return kept;
        }
    }
    // max(1): no division by zero, whose panic path the verifier would refuse (callers
    // never choose from an empty set).
    let slots = (svc.count[(set & 1) as usize] as u32).max(1);
    let slot = match svc.algorithm {
        algorithm::ROUND_ROBIN => match LB_RR_CURSORS.get_ptr_mut(svc.svc_id) {
            // SAFETY: an array value, changed only atomically.
            Some(cursor) => (unsafe { atomic::fetch_add(cursor, 1) } % slots as u64) as u32,
            None => 0,
        },
        algorithm::MAGLEV => flow_hash(k.src_addr_be, k.src_port_be, k.dst_port_be, k.proto) % slots,
        algorithm::SOURCE_HASH => client_hash(k.src_addr_be) % slots,
        algorithm::LEAST_CONN => return remember(&affinity, svc, least_conn(svc, set)),
        // SAFETY: plain helper call.
        _ => (unsafe { bpf_get_prandom_u32() }) % slots,
    };
    // SAFETY: a copy of a plain integer.
    let id = unsafe { LB_SLOTS.get(SlotKey::new(svc.svc_id, svc.gen, set as u8, slot)) }.copied().unwrap_or(0);
    remember(&affinity, svc, id)
}

/// The backend this client keeps, if it has one that is fresh and still chosen by its
/// Service port (a backend gone, or only kept for its old flows, invalidates it lazily).
#[inline(always)]
fn kept_backend(key: &AffinityKey, timeout_s: u32) -> u32 {
    let Some(p) = LB_AFFINITY.get_ptr(key) else { return 0 };
    // Field by field into registers (a copy on the stack would not fit the call chain's
    // budget); the backend is checked against its Service port below, so even a read torn
    // by reuse never names another Service's backend.
    // SAFETY: plain integers from a map value's memory (valid for the run).
    let (last_ns, backend_id, backend_gen, scope, client_addr_be) = unsafe {
        (
            read_volatile(addr_of!((*p).last_ns)),
            read_volatile(addr_of!((*p).backend_id)),
            read_volatile(addr_of!((*p).backend_gen)),
            read_volatile(addr_of!((*p).key.scope)),
            read_volatile(addr_of!((*p).key.client_addr_be)),
        )
    };
    if scope != key.scope || client_addr_be != key.client_addr_be {
        // An LRU element reused for another client while it was read.
        count(counters::ENTRY_REUSED, 0);
        return 0;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let fresh = now.saturating_sub(last_ns) <= timeout_s as u64 * 1_000_000_000;
    // Of this Service port (a torn copy never names another Service's backend), not
    // removed, and still chosen by it.
    let chosen = backend(backend_id).is_some_and(|b| {
        b.gen == backend_gen
            && b.addr_be != 0
            && b.flags & backend_flags::CHOSEN != 0
            && affinity_scope(b.owner) == key.scope
    });
    if fresh && chosen {
        backend_id
    } else {
        0
    }
}

/// Records the choice for session affinity (a new flow refreshes it, as kube-proxy's
/// `recent` match does); returns `id`.
#[inline(always)]
fn remember(key: &AffinityKey, svc: &ServiceValue, id: u32) -> u32 {
    if svc.affinity_timeout_s != 0 && id != 0 {
        if let Some(b) = backend(id) {
            // SAFETY: plain helper call.
            let last_ns = unsafe { bpf_ktime_get_coarse_ns() };
            let value = AffinityValue { last_ns, backend_id: id, backend_gen: b.gen, key: *key };
            let _ = LB_AFFINITY.insert(key, value, BPF_ANY as u64);
        }
    }
    id
}

struct LeastConn {
    svc_id: u32,
    gen: u8,
    set: u8,
    best: u32,
    fewest: u64,
    ties: u32,
}

/// The backend of the set with the fewest open flows on this node, ties broken at random
/// (reservoir sampling). One pass over the set, in a bpf_loop so the verifier checks the
/// body once.
#[inline(always)]
fn least_conn(svc: &ServiceValue, set: u32) -> u32 {
    let (svc_id, gen, set) = (svc.svc_id, svc.gen, set as u8);
    // Seeded with the first slot rather than with constants (fewest = u64::MAX): the
    // verifier checks the callback's first pass with the seed's values, and a branch that
    // pass finds impossible (open > fewest when fewest is the maximum) it may never explore
    // again, pruning later passes as equivalent, and then rewrites as dead code. With
    // constants, kernel 6.18 made every non-tie look like a tie.
    // SAFETY: a copy of a plain integer.
    let Some(first) = (unsafe { LB_SLOTS.get(SlotKey::new(svc_id, gen, set, 0)) }).copied() else { return 0 };
    let mut run = LeastConn { svc_id, gen, set, best: first, fewest: open_flows(first), ties: 1 };
    // SAFETY: the callback has the signature bpf_loop calls; `run` outlives the call.
    unsafe {
        bpf_loop(
            (svc.count[(set & 1) as usize] as u32).saturating_sub(1),
            visit as *mut c_void,
            &mut run as *mut LeastConn as *mut c_void,
            0,
        )
    };
    run.best
}

#[inline(always)]
fn open_flows(backend_id: u32) -> u64 {
    // An array value read whole (a racing count only makes the choice a hair stale).
    LB_BE_LIVE.get(backend_id).copied().unwrap_or(0)
}

/// Visits slot `after_first + 1` (the first seeded the run).
extern "C" fn visit(after_first: u32, run: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer least_conn passed.
    let run = unsafe { &mut *(run as *mut LeastConn) };
    let slot = after_first + 1;
    // SAFETY: a copy of a plain integer.
    let Some(id) = (unsafe { LB_SLOTS.get(SlotKey::new(run.svc_id, run.gen, run.set, slot)) }).copied() else {
        return 1;
    };
    let open = open_flows(id);
    if open < run.fewest {
        run.fewest = open;
        run.best = id;
        run.ties = 1;
    } else if open == run.fewest {
        run.ties += 1;
        // SAFETY: plain helper call.
        if unsafe { bpf_get_prandom_u32() } % run.ties.max(1) == 0 {
            run.best = id;
        }
    }
    0
}
