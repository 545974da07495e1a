//! tc ingress programs. On pod-facing devices (east-west): the full datapath; packets here
//! are skbs that may carry CHECKSUM_PARTIAL from the pod's stack, so checksums are updated
//! with the kernel's helpers, which handle every skb checksum state. On uplinks: forwarding
//! of what XDP translated but could not transmit.
//!
//! Translated packets leave with bpf_redirect_neigh rather than through the stack's input
//! routing, which would drop them as martians whenever the new source is the node's own
//! address (SNAT, hairpin, NodePort replies).
use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_tail},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{counters, icmp, IPPROTO_TCP, XDP_META_FORWARD};

use crate::{
    flow::{decide, tracked_rewrite, Replies, Rewrite, Verdict},
    maps::count,
    packet::{parse, Parsed, IP_CHECK_OFF, IP_DST_OFF, IP_OFF, IP_SRC_OFF, L4_OFF, TCP_CHECK_OFF, UDP_CHECK_OFF},
};

#[classifier]
pub fn lb_tc_uplink(ctx: TcContext) -> i32 {
    if handed_over_by_xdp(&ctx) {
        forward(&ctx)
    } else {
        TC_ACT_OK
    }
}

#[inline(always)]
fn handed_over_by_xdp(ctx: &TcContext) -> bool {
    // SAFETY: reading a field of the valid context.
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    meta + size_of::<u32>() <= ctx.data()
        // SAFETY: bounds checked against data just above.
        && unsafe { (meta as *const u32).read_unaligned() } == XDP_META_FORWARD
}

/// Sends a translated packet where the FIB says, resolving the neighbour if needed, after
/// the TTL decrement a router owes. Without a route the stack gets it.
#[inline(always)]
fn forward(ctx: &TcContext) -> i32 {
    let Ok(ip) = ctx.load::<[u8; 20]>(IP_OFF) else {
        return TC_ACT_OK;
    };
    let ttl = ip[8];
    if ttl <= 1 {
        return TC_ACT_OK;
    }
    // SAFETY: an all-zero bpf_fib_lookup is a valid input.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = ip[9];
    fib.__bindgen_anon_1.tot_len = u16::from_be_bytes([ip[2], ip[3]]);
    // SAFETY: reading a field of the valid context.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    // SAFETY: fib is a valid, sized bpf_fib_lookup on our stack; the context is valid.
    let rc = unsafe { fib_lookup(ctx.skb.skb as *mut _, &mut fib, size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return TC_ACT_OK;
    }
    let old = u16::from_ne_bytes([ttl, ip[9]]);
    let new = u16::from_ne_bytes([ttl - 1, ip[9]]);
    if ctx.l3_csum_replace(IP_CHECK_OFF, old as u64, new as u64, 2).is_err()
        || ctx.store(IP_OFF + 8, &(ttl - 1), 0).is_err()
    {
        return TC_ACT_SHOT;
    }
    // SAFETY: plain helper call; NULL params make it look the next hop up itself.
    unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

const AF_INET: u8 = 2;

/// What must be linear for the parse: Ethernet + IPv4 + TCP header, or the ICMP error
/// window (the longer).
const PULL_LEN: u32 = (IP_OFF + icmp::ERROR_WINDOW) as u32;

#[classifier]
pub fn lb_tc_pod(ctx: TcContext) -> i32 {
    match try_lb_tc_pod(&ctx) {
        Ok(action) => action,
        Err(()) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn try_lb_tc_pod(ctx: &TcContext) -> Result<i32, ()> {
    if ctx.data_end() - ctx.data() < PULL_LEN as usize {
        // Best effort: short packets (e.g. ARP) legitimately stay short.
        let _ = ctx.pull_data(PULL_LEN.min(ctx.len()));
    }
    let p = match parse(ctx.data(), ctx.data_end()) {
        Ok(p) => p,
        Err(not) => {
            if not.icmp {
                if let Some(action) = translate_icmp_error(ctx) {
                    return Ok(action);
                }
            }
            count(not.counter, ctx.len() as u64);
            return Ok(if not.drop { TC_ACT_SHOT } else { TC_ACT_OK });
        }
    };
    match decide(ctx, &p, Replies::Anywhere) {
        Verdict::Pass(c) => {
            count(c, p.frame_len);
            Ok(TC_ACT_OK)
        }
        Verdict::Drop(c) => {
            count(c, p.frame_len);
            Ok(TC_ACT_SHOT)
        }
        Verdict::Refuse => {
            count(counters::REFUSED_NO_BACKEND, p.frame_len);
            refuse(ctx)
        }
        Verdict::Translate(rw, c) => {
            count(c, p.frame_len);
            rewrite(ctx, &p, &rw).map_err(|_| ())?;
            Ok(forward(ctx))
        }
    }
}

#[inline(always)]
fn rewrite(ctx: &TcContext, p: &Parsed, rw: &Rewrite) -> Result<(), i64> {
    let k = &p.key;
    let (l4_check, mangled) = if k.proto == IPPROTO_TCP {
        (TCP_CHECK_OFF, 0)
    } else {
        // UDP: leave a zero ("no checksum") alone, send a computed zero as 0xffff.
        (UDP_CHECK_OFF, BPF_F_MARK_MANGLED_0 as u64)
    };
    let addrs = [(IP_SRC_OFF, k.src_addr_be, rw.src_addr_be), (IP_DST_OFF, k.dst_addr_be, rw.dst_addr_be)];
    for (off, old, new) in addrs {
        if old != new {
            ctx.l4_csum_replace(l4_check, old as u64, new as u64, BPF_F_PSEUDO_HDR as u64 | 4 | mangled)?;
            ctx.l3_csum_replace(IP_CHECK_OFF, old as u64, new as u64, 4)?;
            ctx.store(off, &new, 0)?;
        }
    }
    let ports = [(L4_OFF, k.src_port_be, rw.src_port_be), (L4_OFF + 2, k.dst_port_be, rw.dst_port_be)];
    for (off, old, new) in ports {
        if old != new {
            ctx.l4_csum_replace(l4_check, old as u64, new as u64, 2 | mangled)?;
            ctx.store(off, &new, 0)?;
        }
    }
    Ok(())
}

/// An ICMP error from a pod about a tracked flow, translated for the other end of the flow.
// A BPF-to-BPF call of its own: inlined, this cold path's buffers would share the
// entry point's 512-byte stack frame with the hot path's.
#[inline(never)]
fn translate_icmp_error(ctx: &TcContext) -> Option<i32> {
    let mut w: [u8; icmp::ERROR_WINDOW] = ctx.load(IP_OFF).ok()?;
    let rw = tracked_rewrite(&icmp::error_flow(&w)?)?;
    icmp::translate_error(&mut w, rw.src_addr_be, rw.src_port_be, rw.dst_addr_be, rw.dst_port_be);
    // The window's own checksums are updated; the skb's checksum state follows the bytes.
    ctx.store(IP_OFF, &w, BPF_F_RECOMPUTE_CSUM as u64).ok()?;
    count(counters::ICMP_ERROR_TRANSLATED, ctx.len() as u64);
    Some(forward(ctx))
}

/// Answers ICMP port unreachable to the pod: room for the new IPv4 + ICMP headers is made
/// right after the Ethernet header, which leaves the pod's packet where ICMP quotes it.
// A call of its own, so its locals do not add to the hot path's frame.
#[inline(never)]
fn refuse(ctx: &TcContext) -> Result<i32, ()> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    ctx.adjust_room(icmp::GROW as i32, BPF_ADJ_ROOM_MAC, 0).map_err(|_| ())?;
    // SAFETY: plain helper call on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, icmp::ANSWER_LEN as u32, 0) } != 0 {
        return Err(());
    }
    let mut frame: [u8; icmp::ANSWER_LEN] = ctx.load(0).map_err(|_| ())?;
    icmp::write_port_unreachable(&mut frame, macs);
    ctx.store(0, &frame, 0).map_err(|_| ())?;
    // SAFETY: reading the skb's ifindex field; the context pointer is valid.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Out of the device it came in on: to the pod.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
