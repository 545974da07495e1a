//! East-west: tc ingress on pod-facing devices. Packets here are skbs that may carry
//! CHECKSUM_PARTIAL from the pod's stack, so checksums are updated with the kernel's
//! helpers, which handle every skb checksum state; the stack then routes the packet.
use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK,
        TC_ACT_SHOT,
    },
    helpers::{bpf_redirect, bpf_skb_change_tail},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{counters, icmp, IPPROTO_TCP};

use crate::{
    flow::{decide, Rewrite, Verdict},
    maps::count,
    packet::{
        parse, Parsed, IP_CHECK_OFF, IP_DST_OFF, IP_OFF, IP_SRC_OFF, L4_OFF, TCP_CHECK_OFF,
        UDP_CHECK_OFF,
    },
};

/// Ethernet + IPv4 + TCP header: what must be linear for the parse.
const PULL_LEN: u32 = (L4_OFF + 20) as u32;

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
            count(not.counter, ctx.len() as u64);
            return Ok(if not.drop { TC_ACT_SHOT } else { TC_ACT_OK });
        }
    };
    match decide(&p) {
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
            Ok(TC_ACT_OK)
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
    let addrs = [
        (IP_SRC_OFF, k.src_addr_be, rw.src_addr_be),
        (IP_DST_OFF, k.dst_addr_be, rw.dst_addr_be),
    ];
    for (off, old, new) in addrs {
        if old != new {
            ctx.l4_csum_replace(
                l4_check,
                old as u64,
                new as u64,
                BPF_F_PSEUDO_HDR as u64 | 4 | mangled,
            )?;
            ctx.l3_csum_replace(IP_CHECK_OFF, old as u64, new as u64, 4)?;
            ctx.store(off, &new, 0)?;
        }
    }
    let ports = [
        (L4_OFF, k.src_port_be, rw.src_port_be),
        (L4_OFF + 2, k.dst_port_be, rw.dst_port_be),
    ];
    for (off, old, new) in ports {
        if old != new {
            ctx.l4_csum_replace(l4_check, old as u64, new as u64, 2 | mangled)?;
            ctx.store(off, &new, 0)?;
        }
    }
    Ok(())
}

/// Answers ICMP port unreachable to the pod: room for the new IPv4 + ICMP headers is made
/// right after the Ethernet header, which leaves the pod's packet where ICMP quotes it.
#[inline(always)]
fn refuse(ctx: &TcContext) -> Result<i32, ()> {
    let eth: [u8; icmp::ETH_LEN] = ctx.load(0).map_err(|_| ())?;
    let quote: [u8; icmp::QUOTE_LEN] = ctx.load(IP_OFF).map_err(|_| ())?;
    let headers = icmp::port_unreachable_headers(&eth, &quote);
    ctx.adjust_room(icmp::GROW as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;
    // SAFETY: plain helper call on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, icmp::ANSWER_LEN as u32, 0) } != 0 {
        return Err(());
    }
    ctx.store(0, &headers, 0).map_err(|_| ())?;
    // SAFETY: reading the skb's ifindex field; the context pointer is valid.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Out of the device it came in on: to the pod.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
