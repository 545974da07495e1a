//! North-south: XDP on node uplinks. Rewrites in place with incremental checksums. In fast
//! mode it sends with XDP_TX when the next hop is back out of the uplink and hands anything
//! else it translated to the uplink's tc program (bpf_redirect_neigh); in netfilter mode it
//! rewrites the destination side and lets the stack route the packet, the tc program first
//! setting the mark that tells tc egress to rewrite the source side.
use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_xdp_adjust_head, bpf_xdp_adjust_meta, bpf_xdp_adjust_tail},
    macros::xdp,
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    checksum, counters, frag_hook, icmp, reset, Config, XdpMeta, IPPROTO_ICMP, IPPROTO_TCP, XDP_META_MARK,
    XDP_META_PARTIAL, XDP_META_REDIRECT,
};

use crate::{
    ct,
    flow::{action, decide, is_ours, screen, tracked, tracked_rewrite, Macs, Replies, Rewrite, Verdict},
    frag,
    maps::{config, count, count_traffic, fib_scratch},
    packet::{
        parse, ptr_at, read, Fragment, Parsed, IP_CHECK_OFF, IP_DST_OFF, IP_OFF, IP_SRC_OFF, L4_OFF, TCP_CHECK_OFF,
        UDP_CHECK_OFF,
    },
    ratelimit,
    tc::Unreachable,
};

const AF_INET: u8 = 2;

#[xdp]
pub fn lb_xdp_uplink(ctx: XdpContext) -> u32 {
    match try_lb_xdp_uplink(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

/// Passes everything. The floor benchmarks measure against, and what labs attach to the
/// far ends of veth uplinks: a veth only picks up frames sent to it with XDP_TX when it has
/// an XDP program of its own (a physical NIC needs nothing of the sort).
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn try_lb_xdp_uplink(ctx: &XdpContext) -> Result<u32, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let p = match parse(start, end, (end - start) as u64) {
        Ok(p) => p,
        Err(not) => {
            if not.icmp {
                if let Some(action) = translate_icmp_error(ctx) {
                    return Ok(action);
                }
            }
            count(not.counter, (end - start) as u64);
            return Ok(if not.drop { xdp_action::XDP_DROP } else { xdp_action::XDP_PASS });
        }
    };
    let Some(cfg) = config() else {
        return Ok(xdp_action::XDP_PASS);
    };
    if p.fragment == Fragment::Later {
        return Ok(later_fragment(ctx, &p, cfg));
    }
    let Some(maybe_front) = screen(&p.key, cfg, Replies::ToNatOrPods) else {
        count(counters::PASS_NOT_SERVICE, p.frame_len);
        return Ok(xdp_action::XDP_PASS);
    };
    let half = tracked(&p);
    // Only ours: anything else passes as it is, partial checksum or not.
    if p.fragment == Fragment::No && !p.truncated && looks_partial(ctx, &p) && is_ours(&p, maybe_front, half) {
        count(counters::XDP_TO_TC, p.frame_len);
        return Ok(hand_over(ctx, XDP_META_PARTIAL, 0));
    }
    let v = decide(ctx, &p, maybe_front, half);
    match v.action {
        action::TRANSLATE => Ok(translate(ctx, &p, &v, cfg)),
        action::REFUSE => Ok(answer_unreachable(ctx, &p, Unreachable::port())),
        action::RESET => Ok(answer_reset(ctx, &p, v.counter)),
        action::DROP => {
            count(v.counter, p.frame_len);
            Ok(xdp_action::XDP_DROP)
        }
        _ => {
            count(v.counter, p.frame_len);
            Ok(xdp_action::XDP_PASS)
        }
    }
}

/// The checksum offload heuristic: a packet from a local veth may carry a partial checksum
/// (CHECKSUM_PARTIAL), which an incremental update would corrupt and XDP cannot tell from a
/// complete one; tc can (the skb knows), so such packets go there.
#[inline(always)]
fn looks_partial(ctx: &XdpContext, p: &Parsed) -> bool {
    let off = if p.key.proto == IPPROTO_TCP { TCP_CHECK_OFF } else { UDP_CHECK_OFF };
    let Some(check) = read::<u16>(ctx.data(), ctx.data_end(), off) else { return false };
    checksum::looks_partial(check, p.key.src_addr_be, p.key.dst_addr_be, p.key.proto, p.l4_len)
}

// A call of its own: with its next-hop and rewrite locals inlined, the entry point's frame
// plus a new flow's call chain would pass the verifier's 512-byte stack budget.
#[inline(never)]
fn translate(ctx: &XdpContext, p: &Parsed, t: &Verdict, cfg: &Config) -> u32 {
    let hop = next_hop(ctx, p, t);
    // Without DF the packet goes on whole: the stack fragments it in netfilter mode; fast
    // mode does not fragment (README: known limits).
    if hop.frag_needed != 0 && p.df {
        if t.counter == counters::NEW_FLOW {
            ct::withdraw(&p.key);
        }
        // Answered before the rewrite, so the quote is the packet as the client sent it.
        return answer_unreachable(ctx, p, Unreachable::frag_needed(hop.frag_needed));
    }
    count(t.counter, p.frame_len);
    count_traffic(t.svc_id, t.backend_id, p.frame_len, t.counter == counters::NEW_FLOW);
    let fast = cfg.fast();
    if rewrite(ctx, p, &t.rw, fast).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    if p.fragment == Fragment::First {
        frag::remember(p, frag_hook::INGRESS, t.rw.src_addr_be, t.rw.dst_addr_be, t.egress);
    }
    forward(ctx, p.frame_len, &hop, t.egress, fast)
}

/// Where a translated packet goes next, and whether it fits.
struct Hop {
    /// Resolved and back out of the receiving interface: XDP_TX can send it.
    transmit: bool,
    macs: Macs,
    /// The packet needs fragmenting (DF set): answer with this MTU instead (0: it fits).
    frag_needed: u16,
}

/// The next hop of a translated packet: from its half's cache while that is fresh (the
/// cache is revalidated when the half is refreshed, about once a second), else from the
/// FIB, then cached in the half.
#[inline(always)]
fn next_hop(ctx: &XdpContext, p: &Parsed, t: &Verdict) -> Hop {
    if t.has_hop != 0 && p.l4_len + 20 <= t.hop_mtu {
        let transmit = t.hop_ifindex == ctx.ingress_ifindex() as u32;
        return Hop { transmit, macs: t.hop_macs, frag_needed: 0 };
    }
    lookup_hop(ctx, p, t)
}

#[inline(always)]
fn lookup_hop(ctx: &XdpContext, p: &Parsed, t: &Verdict) -> Hop {
    let tot_len = p.l4_len + 20;
    let (hop, ifindex) = fib_hop(ctx, p.key.proto, &t.rw, tot_len);
    // A new flow's first packet caches nothing (its nonce is 0): its half is looked up by
    // its next packet.
    if ifindex != 0 {
        ct::cache_hop(&p.key, t.nonce, ifindex, hop.macs.dst, hop.macs.src, tot_len);
    }
    hop
}

/// The FIB's next hop for a packet with this rewrite, and the egress ifindex (0 when the
/// lookup failed or the packet does not fit).
// A call of its own: the 64-byte bpf_fib_lookup stays off its callers' frames.
#[inline(never)]
fn fib_hop(ctx: &XdpContext, proto: u8, rw: &Rewrite, tot_len: u16) -> (Hop, u32) {
    let Some(fib) = fib_scratch() else {
        return (Hop { transmit: false, macs: Macs::NONE, frag_needed: 0 }, 0);
    };
    fib.family = AF_INET;
    fib.l4_protocol = proto;
    fib.sport = rw.src_port_be;
    fib.dport = rw.dst_port_be;
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_3.ipv4_src = rw.src_addr_be;
    fib.__bindgen_anon_4.ipv4_dst = rw.dst_addr_be;
    // SAFETY: fib is a valid, sized bpf_fib_lookup (in a map value).
    let rc = unsafe { fib_lookup(ctx.as_ptr(), fib, size_of::<bpf_fib_lookup>() as i32, 0) };
    let mut hop = Hop { transmit: false, macs: Macs { dst: fib.dmac, src: fib.smac }, frag_needed: 0 };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: the kernel filled the union's mtu_result.
        hop.frag_needed = unsafe { fib.__bindgen_anon_1.mtu_result };
        return (hop, 0);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return (hop, 0);
    }
    hop.transmit = fib.ifindex == ctx.ingress_ifindex() as u32;
    (hop, fib.ifindex)
}

#[inline(always)]
fn write<T>(ctx: &XdpContext, off: usize, v: T) -> Result<(), ()> {
    let ptr = ptr_at::<T>(ctx.data(), ctx.data_end(), off).ok_or(())?;
    // SAFETY: bounds checked; packet data has no alignment guarantee.
    unsafe { ptr.write_unaligned(v) };
    Ok(())
}

/// Rewrites addresses and ports: all of them in fast mode, the destination side only in
/// netfilter mode (tc egress does the source side after the forward hook).
#[inline(always)]
fn rewrite(ctx: &XdpContext, p: &Parsed, rw: &Rewrite, fast: bool) -> Result<(), ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let k = &p.key;
    let (src, sport) = if fast { (rw.src_addr_be, rw.src_port_be) } else { (k.src_addr_be, k.src_port_be) };
    let mut ip_check: u16 = read(start, end, IP_CHECK_OFF).ok_or(())?;
    ip_check = checksum::replace_u32(ip_check, k.src_addr_be, src);
    ip_check = checksum::replace_u32(ip_check, k.dst_addr_be, rw.dst_addr_be);
    write(ctx, IP_CHECK_OFF, ip_check)?;
    write(ctx, IP_SRC_OFF, src)?;
    write(ctx, IP_DST_OFF, rw.dst_addr_be)?;
    if k.proto == IPPROTO_TCP {
        let mut c: u16 = read(start, end, TCP_CHECK_OFF).ok_or(())?;
        c = checksum::replace_u32(c, k.src_addr_be, src);
        c = checksum::replace_u32(c, k.dst_addr_be, rw.dst_addr_be);
        c = checksum::replace_u16(c, k.src_port_be, sport);
        c = checksum::replace_u16(c, k.dst_port_be, rw.dst_port_be);
        write(ctx, TCP_CHECK_OFF, c)?;
    } else {
        let mut c: u16 = read(start, end, UDP_CHECK_OFF).ok_or(())?;
        c = checksum::udp_replace_u32(c, k.src_addr_be, src);
        c = checksum::udp_replace_u32(c, k.dst_addr_be, rw.dst_addr_be);
        c = checksum::udp_replace_u16(c, k.src_port_be, sport);
        c = checksum::udp_replace_u16(c, k.dst_port_be, rw.dst_port_be);
        write(ctx, UDP_CHECK_OFF, c)?;
    }
    write(ctx, L4_OFF, sport)?;
    write(ctx, L4_OFF + 2, rw.dst_port_be)
}

/// Sends a translated packet on. Fast mode: XDP_TX when the next hop is back out of the
/// uplink (TTL decremented as a router does), else to tc for bpf_redirect_neigh. Netfilter
/// mode: up the stack, with the egress hand-over when the source side is still to rewrite.
#[inline(always)]
fn forward(ctx: &XdpContext, frame_len: u64, hop: &Hop, egress: u16, fast: bool) -> u32 {
    if !fast {
        return if egress == 0 { xdp_action::XDP_PASS } else { hand_over(ctx, XDP_META_MARK, egress as u32) };
    }
    if hop.transmit && transmit(ctx, hop).is_some() {
        count(counters::XDP_TX, frame_len);
        return xdp_action::XDP_TX;
    }
    hand_over(ctx, XDP_META_REDIRECT, 0)
}

/// XDP_PASS with metadata telling the uplink's tc program what to do with the packet.
#[inline(always)]
fn hand_over(ctx: &XdpContext, tag: u32, mark: u32) -> u32 {
    // SAFETY: the helper checks the room in front of the packet itself.
    if unsafe { bpf_xdp_adjust_meta(ctx.as_ptr() as *mut _, -(size_of::<XdpMeta>() as i32)) } == 0 {
        let meta = ctx.metadata();
        if meta + size_of::<XdpMeta>() <= ctx.data() {
            // SAFETY: the bytes were just made and bounds checked against data.
            unsafe { (meta as *mut XdpMeta).write_unaligned(XdpMeta { mark, tag }) };
        }
    }
    xdp_action::XDP_PASS
}

/// Sets TTL and MACs for XDP_TX. Let the stack answer "time exceeded" for TTL 1.
#[inline(always)]
fn transmit(ctx: &XdpContext, hop: &Hop) -> Option<()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ttl_word: u16 = read(start, end, IP_OFF + 8)?;
    let mut word = ttl_word.to_ne_bytes();
    if word[0] <= 1 {
        return None;
    }
    word[0] -= 1;
    let new_word = u16::from_ne_bytes(word);
    let check: u16 = read(start, end, IP_CHECK_OFF)?;
    write(ctx, IP_OFF + 8, new_word).ok()?;
    write(ctx, IP_CHECK_OFF, checksum::replace_u16(check, ttl_word, new_word)).ok()?;
    write(ctx, 0, [hop.macs.dst, hop.macs.src]).ok()
}

/// A later fragment: the addresses its first fragment got, or untouched when that one was
/// not seen (or was not ours).
#[inline(never)]
fn later_fragment(ctx: &XdpContext, p: &Parsed, cfg: &Config) -> u32 {
    let Some(first) = frag::first_of(p, frag_hook::INGRESS) else {
        count(counters::PASS_FRAGMENT_UNMATCHED, p.frame_len);
        return xdp_action::XDP_PASS;
    };
    let fast = cfg.fast();
    let src = if fast { first.src_addr_be } else { p.key.src_addr_be };
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(mut ip_check) = read::<u16>(start, end, IP_CHECK_OFF) else { return xdp_action::XDP_DROP };
    ip_check = checksum::replace_u32(ip_check, p.key.src_addr_be, src);
    ip_check = checksum::replace_u32(ip_check, p.key.dst_addr_be, first.dst_addr_be);
    if write(ctx, IP_CHECK_OFF, ip_check)
        .and(write(ctx, IP_SRC_OFF, src))
        .and(write(ctx, IP_DST_OFF, first.dst_addr_be))
        .is_err()
    {
        return xdp_action::XDP_DROP;
    }
    count(counters::FRAGMENT_TRANSLATED, p.frame_len);
    if !fast {
        return if first.egress == 0 {
            xdp_action::XDP_PASS
        } else {
            hand_over(ctx, XDP_META_MARK, first.egress as u32)
        };
    }
    hand_over(ctx, XDP_META_REDIRECT, 0)
}

/// An ICMP error about a tracked flow, translated in place for the other end of the flow
/// and forwarded as fast mode forwards (XDP_TX, or tc's bpf_redirect_neigh) in either mode:
/// its new source may be the node's own address, which the stack's input routing drops as
/// a martian.
// A call of its own, so its locals do not add to the hot path's frame.
#[inline(never)]
fn translate_icmp_error(ctx: &XdpContext) -> Option<u32> {
    let w = ptr_at::<[u8; icmp::ERROR_WINDOW]>(ctx.data(), ctx.data_end(), IP_OFF)?;
    // SAFETY: bounds checked by ptr_at; a byte array has no alignment needs.
    let w = unsafe { &mut *w };
    let (rw, _) = tracked_rewrite(&icmp::error_flow(w)?)?;
    icmp::translate_error(w, rw.src_addr_be, rw.src_port_be, rw.dst_addr_be, rw.dst_port_be);
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    count(counters::ICMP_ERROR_TRANSLATED, frame_len);
    let outer = Rewrite {
        src_addr_be: u32::from_ne_bytes([w[12], w[13], w[14], w[15]]),
        dst_addr_be: rw.dst_addr_be,
        src_port_be: 0,
        dst_port_be: 0,
    };
    let (hop, _) = fib_hop(ctx, IPPROTO_ICMP, &outer, 0);
    Some(forward(ctx, frame_len, &hop, 0, true))
}

/// Turns the packet into an ICMP destination unreachable answer, in place, and sends it
/// back (rate-limited like the kernel's own).
// A call of its own, so its locals do not add to the hot path's frame.
#[inline(never)]
fn answer_unreachable(ctx: &XdpContext, p: &Parsed, u: Unreachable) -> u32 {
    if !ratelimit::answer_allowed(p.key.src_addr_be) {
        count(counters::DROP_ANSWER_RATE_LIMITED, p.frame_len);
        return xdp_action::XDP_DROP;
    }
    count(u.counter(), p.frame_len);
    let Some(macs) = read::<[u8; 12]>(ctx.data(), ctx.data_end(), 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: the helper checks the headroom itself.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(icmp::GROW as i32)) } != 0 {
        return xdp_action::XDP_DROP;
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    let excess = len - icmp::ANSWER_LEN as i32;
    // SAFETY: shrinking only, by at most the packet's own length past the answer.
    if excess > 0 && unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, -excess) } != 0 {
        return xdp_action::XDP_DROP;
    }
    // The offending packet's IPv4 header + 8 bytes now sit where the answer quotes them.
    let Some(frame) = ptr_at::<[u8; icmp::ANSWER_LEN]>(ctx.data(), ctx.data_end(), 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at; a byte array has no alignment needs.
    icmp::write_unreachable(unsafe { &mut *frame }, macs, u.code(), u.mtu());
    xdp_action::XDP_TX
}

/// Turns a TCP packet into the reset answering it, in place, and sends it back
/// (rate-limited like the ICMP answers).
#[inline(never)]
fn answer_reset(ctx: &XdpContext, p: &Parsed, counter: u32) -> u32 {
    if !ratelimit::answer_allowed(p.key.src_addr_be) {
        count(counters::DROP_ANSWER_RATE_LIMITED, p.frame_len);
        return xdp_action::XDP_DROP;
    }
    count(counter, p.frame_len);
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(doff) = read::<u8>(start, end, L4_OFF + 12) else {
        return xdp_action::XDP_DROP;
    };
    let segment_len = p.l4_len.saturating_sub(((doff >> 4) as u16) * 4);
    let excess = (end - start) as i32 - reset::RESET_LEN as i32;
    // SAFETY: shrinking only, by at most the packet's own length past the reset.
    if excess > 0 && unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, -excess) } != 0 {
        return xdp_action::XDP_DROP;
    }
    let Some(frame) = ptr_at::<[u8; reset::RESET_LEN]>(ctx.data(), ctx.data_end(), 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at; a byte array has no alignment needs.
    reset::write_reset(unsafe { &mut *frame }, segment_len);
    xdp_action::XDP_TX
}
