//! North-south: XDP on node uplinks. Rewrites in place with incremental checksums, then
//! sends with XDP_TX when the FIB says the packet leaves where it came in; anything else
//! it translated goes up tagged, for the uplink's tc program to forward.
use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_xdp_adjust_head, bpf_xdp_adjust_meta, bpf_xdp_adjust_tail},
    macros::xdp,
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{checksum, counters, icmp, IPPROTO_ICMP, IPPROTO_TCP, XDP_META_FORWARD};

use crate::{
    flow::{decide, tracked_rewrite, Replies, Rewrite, Verdict},
    maps::count,
    packet::{
        parse, ptr_at, read, Parsed, IP_CHECK_OFF, IP_DST_OFF, IP_OFF, IP_SRC_OFF, L4_OFF, TCP_CHECK_OFF, UDP_CHECK_OFF,
    },
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
    let p = match parse(ctx.data(), ctx.data_end()) {
        Ok(p) => p,
        Err(not) => {
            if not.icmp {
                if let Some(action) = translate_icmp_error(ctx) {
                    return Ok(action);
                }
            }
            count(not.counter, (ctx.data_end() - ctx.data()) as u64);
            return Ok(if not.drop { xdp_action::XDP_DROP } else { xdp_action::XDP_PASS });
        }
    };
    match decide(ctx, &p, Replies::ToNatOrPods) {
        Verdict::Pass(c) => {
            count(c, p.frame_len);
            Ok(xdp_action::XDP_PASS)
        }
        Verdict::Drop(c) => {
            count(c, p.frame_len);
            Ok(xdp_action::XDP_DROP)
        }
        Verdict::Refuse => {
            count(counters::REFUSED_NO_BACKEND, p.frame_len);
            refuse(ctx)
        }
        Verdict::Translate(rw, c) => {
            count(c, p.frame_len);
            rewrite(ctx, &p, &rw)?;
            Ok(forward(ctx, p.key.proto, p.frame_len, &rw))
        }
    }
}

#[inline(always)]
fn write<T>(ctx: &XdpContext, off: usize, v: T) -> Result<(), ()> {
    let ptr = ptr_at::<T>(ctx.data(), ctx.data_end(), off).ok_or(())?;
    // SAFETY: bounds checked; packet data has no alignment guarantee.
    unsafe { ptr.write_unaligned(v) };
    Ok(())
}

#[inline(always)]
fn rewrite(ctx: &XdpContext, p: &Parsed, rw: &Rewrite) -> Result<(), ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let k = &p.key;
    let mut ip_check: u16 = read(start, end, IP_CHECK_OFF).ok_or(())?;
    ip_check = checksum::replace_u32(ip_check, k.src_addr_be, rw.src_addr_be);
    ip_check = checksum::replace_u32(ip_check, k.dst_addr_be, rw.dst_addr_be);
    write(ctx, IP_CHECK_OFF, ip_check)?;
    write(ctx, IP_SRC_OFF, rw.src_addr_be)?;
    write(ctx, IP_DST_OFF, rw.dst_addr_be)?;

    if k.proto == IPPROTO_TCP {
        let mut c: u16 = read(start, end, TCP_CHECK_OFF).ok_or(())?;
        c = checksum::replace_u32(c, k.src_addr_be, rw.src_addr_be);
        c = checksum::replace_u32(c, k.dst_addr_be, rw.dst_addr_be);
        c = checksum::replace_u16(c, k.src_port_be, rw.src_port_be);
        c = checksum::replace_u16(c, k.dst_port_be, rw.dst_port_be);
        write(ctx, TCP_CHECK_OFF, c)?;
    } else {
        let mut c: u16 = read(start, end, UDP_CHECK_OFF).ok_or(())?;
        c = checksum::udp_replace_u32(c, k.src_addr_be, rw.src_addr_be);
        c = checksum::udp_replace_u32(c, k.dst_addr_be, rw.dst_addr_be);
        c = checksum::udp_replace_u16(c, k.src_port_be, rw.src_port_be);
        c = checksum::udp_replace_u16(c, k.dst_port_be, rw.dst_port_be);
        write(ctx, UDP_CHECK_OFF, c)?;
    }
    write(ctx, L4_OFF, rw.src_port_be)?;
    write(ctx, L4_OFF + 2, rw.dst_port_be)
}

/// XDP_TX when the route leads back out of the receiving interface with a resolved
/// neighbour (a NodePort whose backend is on another node, replies to external clients);
/// otherwise the translated packet is tagged for the uplink's tc program to forward.
#[inline(always)]
fn forward(ctx: &XdpContext, proto: u8, frame_len: u64, rw: &Rewrite) -> u32 {
    if transmit(ctx, proto, rw).is_some() {
        count(counters::XDP_TX, frame_len);
        return xdp_action::XDP_TX;
    }
    // SAFETY: the helper checks the room in front of the packet itself.
    if unsafe { bpf_xdp_adjust_meta(ctx.as_ptr() as *mut _, -(size_of::<u32>() as i32)) } == 0 {
        let meta = ctx.metadata();
        if meta + size_of::<u32>() <= ctx.data() {
            // SAFETY: the 4 bytes were just made and bounds checked against data.
            unsafe { (meta as *mut u32).write_unaligned(XDP_META_FORWARD) };
        }
    }
    xdp_action::XDP_PASS
}

/// Sets TTL and MACs for XDP_TX, if the FIB sends the packet back out where it came in.
// A call of its own: the 64-byte bpf_fib_lookup would otherwise sit in every caller's
// frame, and the verifier caps a call chain's stack at 512 bytes.
#[inline(never)]
fn transmit(ctx: &XdpContext, proto: u8, rw: &Rewrite) -> Option<()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ttl_word: u16 = read(start, end, IP_OFF + 8)?;
    let ttl = ttl_word.to_ne_bytes()[0];
    // Let the stack answer "time exceeded".
    if ttl <= 1 {
        return None;
    }
    let tot_len: u16 = read(start, end, IP_OFF + 2)?;
    // SAFETY: an all-zero bpf_fib_lookup is a valid input.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = proto;
    fib.sport = rw.src_port_be;
    fib.dport = rw.dst_port_be;
    fib.__bindgen_anon_1.tot_len = u16::from_be(tot_len);
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_3.ipv4_src = rw.src_addr_be;
    fib.__bindgen_anon_4.ipv4_dst = rw.dst_addr_be;
    let size = size_of::<bpf_fib_lookup>() as i32;
    // SAFETY: fib is a valid, sized bpf_fib_lookup on our stack.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &mut fib, size, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || fib.ifindex != ctx.ingress_ifindex() as u32 {
        return None;
    }
    let mut word = ttl_word.to_ne_bytes();
    word[0] = ttl - 1;
    let new_word = u16::from_ne_bytes(word);
    let check: u16 = read(start, end, IP_CHECK_OFF)?;
    write(ctx, IP_OFF + 8, new_word).ok()?;
    write(ctx, IP_CHECK_OFF, checksum::replace_u16(check, ttl_word, new_word)).ok()?;
    write(ctx, 0, [fib.dmac, fib.smac]).ok()
}

/// An ICMP error about a tracked flow, translated in place for the other end of the flow
/// and forwarded like the flow's packets.
// A call of its own, so its locals do not add to the hot path's frame.
#[inline(never)]
fn translate_icmp_error(ctx: &XdpContext) -> Option<u32> {
    let w = ptr_at::<[u8; icmp::ERROR_WINDOW]>(ctx.data(), ctx.data_end(), IP_OFF)?;
    // SAFETY: bounds checked by ptr_at; a byte array has no alignment needs.
    let w = unsafe { &mut *w };
    let rw = tracked_rewrite(&icmp::error_flow(w)?)?;
    icmp::translate_error(w, rw.src_addr_be, rw.src_port_be, rw.dst_addr_be, rw.dst_port_be);
    let outer = Rewrite {
        src_addr_be: u32::from_ne_bytes([w[12], w[13], w[14], w[15]]),
        dst_addr_be: rw.dst_addr_be,
        src_port_be: 0,
        dst_port_be: 0,
    };
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    count(counters::ICMP_ERROR_TRANSLATED, frame_len);
    Some(forward(ctx, IPPROTO_ICMP, frame_len, &outer))
}

/// Turns the packet into an ICMP port unreachable answer, in place, and sends it back.
// A call of its own, so its locals do not add to the hot path's frame.
#[inline(never)]
fn refuse(ctx: &XdpContext) -> Result<u32, ()> {
    let macs: [u8; 12] = read(ctx.data(), ctx.data_end(), 0).ok_or(())?;
    // SAFETY: the helper checks the headroom itself.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(icmp::GROW as i32)) } != 0 {
        return Ok(xdp_action::XDP_DROP);
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    let excess = len - icmp::ANSWER_LEN as i32;
    // SAFETY: shrinking only, by at most the packet's own length past the answer.
    if excess > 0 && unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, -excess) } != 0 {
        return Ok(xdp_action::XDP_DROP);
    }
    // The offending packet's IPv4 header + 8 bytes now sit where the answer quotes them.
    let frame = ptr_at::<[u8; icmp::ANSWER_LEN]>(ctx.data(), ctx.data_end(), 0).ok_or(())?;
    // SAFETY: bounds checked by ptr_at; a byte array has no alignment needs.
    icmp::write_port_unreachable(unsafe { &mut *frame }, macs);
    Ok(xdp_action::XDP_TX)
}
