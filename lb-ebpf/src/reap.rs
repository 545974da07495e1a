//! The reaper: attached nowhere, run by the agent with BPF_PROG_TEST_RUN over keys it put
//! in LB_REAP_QUEUE. Removing entries from the kernel side keeps the one rule that makes
//! conntrack safe: an entry goes only by a compare-and-swap of its stamp, so the agent's
//! sweep and the datapath never both free a half (or its NAT port), and never remove a
//! flow that a packet refreshed after the agent looked.
//!
//! Input frame (at least 16 bytes): at offset 8 the number of queued keys (u32) and the
//! mode (u32); the program writes back how many flows it removed in the mode's place.
use aya_ebpf::{bindings::xdp_action, cty::c_void, helpers::bpf_loop, macros::xdp, programs::XdpContext};
use lb_common::{
    conntrack::{alive, nonce},
    reap_mode, REAP_BATCH,
};

use crate::{
    ct,
    maps::{LB_CONNTRACK, LB_REAP_QUEUE},
    packet::ptr_at,
};

#[xdp]
pub fn lb_ct_reap(ctx: XdpContext) -> u32 {
    let Some(args) = ptr_at::<[u32; 2]>(ctx.data(), ctx.data_end(), 8) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: bounds checked by ptr_at.
    let [queued, mode] = unsafe { args.read_unaligned() };
    let mut run = Run { mode, now: ct::now(), removed: 0 };
    // bpf_loop: the verifier checks the body once, not once per key.
    // SAFETY: the callback has the signature bpf_loop calls; `run` outlives the call.
    unsafe {
        bpf_loop(queued.min(REAP_BATCH), reap_one as *mut c_void, &mut run as *mut Run as *mut c_void, 0);
        args.write_unaligned([queued, run.removed]);
    }
    xdp_action::XDP_PASS
}

struct Run {
    mode: u32,
    now: u32,
    removed: u32,
}

extern "C" fn reap_one(index: u32, run: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer lb_ct_reap passed.
    let run = unsafe { &mut *(run as *mut Run) };
    let Some(key) = LB_REAP_QUEUE.get(index).copied() else { return 1 };
    let Some(v) = LB_CONNTRACK.get_ptr_mut(&key) else { return 0 };
    let seen = ct::load_stamp(v);
    if !ct::holds(v, &key) {
        // Reused for another flow since the lookup: not the entry the agent asked about.
        return 0;
    }
    let dead = !alive(key.proto, ct::load_state(v), seen, run.now) || !peer_holds(&key, v, seen);
    if (run.mode == reap_mode::ALL || dead) && ct::reap(&key, v, seen) {
        run.removed += 1;
    }
    0
}

#[inline(always)]
fn peer_holds(key: &lb_common::CtKey, v: *mut lb_common::CtValue, seen: u64) -> bool {
    LB_CONNTRACK.get_ptr_mut(ct::peer_key(v, key.proto)).is_some_and(|p| nonce(ct::load_stamp(p)) == nonce(seen))
}
