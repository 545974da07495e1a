//! tc programs. Packets here are skbs that may carry CHECKSUM_PARTIAL (from a pod's stack,
//! or a veth uplink's peer), so checksums are updated with the kernel's helpers, which
//! handle every skb checksum state.
//! - ingress on pod-facing and tunnel devices (east-west): the full datapath;
//! - ingress on uplinks: what XDP handed over (forward it, or set the egress mark), and the
//!   full datapath for packets XDP could not rewrite;
//! - egress everywhere (netfilter mode): the source side of flows whose destination side
//!   was rewritten on the way in, after the stack's forward hook saw them.
//!
//! In fast mode translated packets leave with bpf_redirect_neigh rather than through the
//! stack's input routing, which would drop them as martians whenever the new source is the
//! node's own address (SNAT, hairpin, NodePort replies).
use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_tail, bpf_skb_load_bytes,
    },
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    counters, frag_hook, icmp, reset, Config, CtKey, XdpMeta, IPPROTO_TCP, XDP_META_MARK, XDP_META_PARTIAL,
    XDP_META_REDIRECT,
};

use crate::{
    ct,
    flow::{action, decide, screen, tracked, tracked_rewrite, Replies, Rewrite, Verdict, EGRESS_OWN_TUPLE},
    frag,
    maps::{config, count, count_traffic, fib_scratch},
    packet::{
        parse, Fragment, Parsed, IP_CHECK_OFF, IP_DST_OFF, IP_OFF, IP_SRC_OFF, L4_OFF, TCP_CHECK_OFF, UDP_CHECK_OFF,
    },
    ratelimit,
};

const AF_INET: u8 = 2;

/// What must be linear for the parse: Ethernet + IPv4 + TCP header, or the ICMP error
/// window (the longer).
const PULL_LEN: u32 = (IP_OFF + icmp::ERROR_WINDOW) as u32;

#[classifier]
pub fn lb_tc_uplink(ctx: TcContext) -> i32 {
    let Some(meta) = xdp_meta(&ctx) else {
        return TC_ACT_OK;
    };
    match meta.tag {
        XDP_META_REDIRECT => forward(&ctx),
        XDP_META_MARK => {
            if let Some(cfg) = config() {
                set_mark(&ctx, cfg, meta.mark as u16);
            }
            TC_ACT_OK
        }
        XDP_META_PARTIAL => datapath(&ctx, Replies::ToNatOrPods).unwrap_or(TC_ACT_SHOT),
        _ => TC_ACT_OK,
    }
}

#[classifier]
pub fn lb_tc_pod(ctx: TcContext) -> i32 {
    datapath(&ctx, Replies::Anywhere).unwrap_or(TC_ACT_SHOT)
}

/// What XDP left in front of the packet, if anything.
#[inline(always)]
fn xdp_meta(ctx: &TcContext) -> Option<XdpMeta> {
    // SAFETY: reading a field of the valid context.
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    if meta + size_of::<XdpMeta>() > ctx.data() {
        return None;
    }
    // SAFETY: bounds checked against data just above.
    Some(unsafe { (meta as *const XdpMeta).read_unaligned() })
}

/// The egress hand-over: `payload` in the mark bits the config names.
#[inline(always)]
fn set_mark(ctx: &TcContext, cfg: &Config, payload: u16) {
    let shift = cfg.mark_shift & 15;
    // SAFETY: writing a field tc programs may write.
    unsafe {
        let skb = ctx.skb.skb;
        (*skb).mark = ((*skb).mark & !(0xffff << shift)) | (payload as u32) << shift;
    }
}

#[inline(always)]
fn datapath(ctx: &TcContext, replies: Replies) -> Result<i32, ()> {
    if ctx.data_end() - ctx.data() < PULL_LEN as usize {
        // Best effort: short packets (e.g. ARP) legitimately stay short.
        let _ = ctx.pull_data(PULL_LEN.min(ctx.len()));
    }
    let p = match parse(ctx.data(), ctx.data_end(), ctx.len() as u64) {
        Ok(p) => p,
        Err(not) => {
            if not.icmp && translate_icmp_error(ctx) {
                return Ok(forward(ctx));
            }
            count(not.counter, ctx.len() as u64);
            return Ok(if not.drop { TC_ACT_SHOT } else { TC_ACT_OK });
        }
    };
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK);
    };
    if p.fragment == Fragment::Later {
        return Ok(later_fragment(ctx, &p, cfg));
    }
    let Some(maybe_front) = screen(&p.key, cfg, replies) else {
        count(counters::PASS_NOT_SERVICE, p.frame_len);
        return Ok(TC_ACT_OK);
    };
    let v = decide(ctx, &p, maybe_front, tracked(&p));
    match v.action {
        // Checked before the rewrite, so the answer quotes the packet as its sender sent it.
        action::TRANSLATE => match if p.df { frag_needed(ctx, &p, &v) } else { 0 } {
            0 => Ok(translate(ctx, &p, &v, cfg)),
            mtu => {
                if v.counter == counters::NEW_FLOW {
                    ct::withdraw(&p.key);
                }
                Ok(answer_unreachable(ctx, &p, Unreachable::frag_needed(mtu)))
            }
        },
        action::REFUSE => Ok(answer_unreachable(ctx, &p, Unreachable::port())),
        action::RESET => Ok(answer_reset(ctx, &p, v.counter)),
        action::DROP => {
            count(v.counter, p.frame_len);
            Ok(TC_ACT_SHOT)
        }
        _ => {
            count(v.counter, p.frame_len);
            Ok(TC_ACT_OK)
        }
    }
}

// A call of its own, keeping its locals off the entry point's frame (the verifier's
// 512-byte budget covers the deepest call chain).
#[inline(never)]
fn translate(ctx: &TcContext, p: &Parsed, t: &Verdict, cfg: &Config) -> i32 {
    count(t.counter, p.frame_len);
    count_traffic(t.svc_id, t.backend_id, p.frame_len, t.counter == counters::NEW_FLOW);
    let fast = cfg.fast();
    let src = if fast { (t.rw.src_addr_be, t.rw.src_port_be) } else { (p.key.src_addr_be, p.key.src_port_be) };
    if rewrite(ctx, &p.key, src, (t.rw.dst_addr_be, t.rw.dst_port_be)).is_err() {
        return TC_ACT_SHOT;
    }
    if p.fragment == Fragment::First {
        frag::remember(p, frag_hook::INGRESS, t.rw.src_addr_be, t.rw.dst_addr_be, t.egress);
    }
    if fast {
        return forward(ctx);
    }
    if t.egress != 0 {
        set_mark(ctx, cfg, t.egress);
    }
    TC_ACT_OK
}

/// Would the translated packet need fragmenting on its way (DF set)? The MTU it meets, or
/// 0. Checked against the path the half's cache says fits (packets up to the largest that
/// passed), else with a FIB lookup.
/// The largest IPv4 packet this skb becomes on the wire: its own length, or for a GSO
/// super-packet (a pod's TCP hands over up to 64 KB at once) the headers plus one segment,
/// as the kernel's forwarding path checks it.
#[inline(always)]
fn wire_len(ctx: &TcContext, p: &Parsed) -> u16 {
    // SAFETY: reading a field of the valid context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return p.l4_len + 20;
    }
    let l4_header = if p.key.proto == IPPROTO_TCP {
        ctx.load::<u8>(L4_OFF + 12).map_or(20, |doff| (doff >> 4) as u16 * 4)
    } else {
        8
    };
    (20 + l4_header + gso_size as u16).min(p.l4_len + 20)
}

// A call of its own: the FIB lookup's result would otherwise sit in the entry's frame.
#[inline(never)]
fn frag_needed(ctx: &TcContext, p: &Parsed, t: &Verdict) -> u16 {
    let tot_len = wire_len(ctx, p);
    if t.has_hop != 0 && tot_len <= t.hop_mtu {
        return 0;
    }
    let (rc, fib) = fib_of(ctx, p.key.proto, &t.rw, tot_len);
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: the kernel filled the union's mtu_result.
        return unsafe { fib.__bindgen_anon_1.mtu_result };
    }
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        // The whole hop, Ethernet addresses included: XDP may transmit from the cache a
        // half that tc filled.
        ct::cache_hop(&p.key, t.nonce, fib.ifindex, fib.dmac, fib.smac, tot_len);
    }
    0
}

/// A FIB lookup from this packet's device; the result stays in this CPU's scratch until
/// the next lookup.
#[inline(always)]
fn fib_of(ctx: &TcContext, proto: u8, rw: &Rewrite, tot_len: u16) -> (i64, &'static bpf_fib_lookup) {
    let Some(fib) = fib_scratch() else {
        return (-1, &EMPTY_FIB);
    };
    fib.family = AF_INET;
    fib.l4_protocol = proto;
    fib.sport = rw.src_port_be;
    fib.dport = rw.dst_port_be;
    fib.__bindgen_anon_1.tot_len = tot_len;
    // SAFETY: reading a field of the valid context.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_3.ipv4_src = rw.src_addr_be;
    fib.__bindgen_anon_4.ipv4_dst = rw.dst_addr_be;
    // SAFETY: fib is a valid, sized bpf_fib_lookup (in a map value); the context is valid.
    let rc = unsafe { fib_lookup(ctx.skb.skb as *mut _, fib, size_of::<bpf_fib_lookup>() as i32, 0) };
    (rc, fib)
}

// SAFETY: an all-zero bpf_fib_lookup is valid.
static EMPTY_FIB: bpf_fib_lookup = unsafe { core::mem::zeroed() };

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
    let rw = Rewrite {
        src_addr_be: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        dst_addr_be: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        src_port_be: 0,
        dst_port_be: 0,
    };
    let (rc, fib) = fib_of(ctx, ip[9], &rw, 0);
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

/// Rewrites the packet's addresses and ports to `src` and `dst` (each as (address, port)).
#[inline(always)]
fn rewrite(ctx: &TcContext, k: &CtKey, src: (u32, u16), dst: (u32, u16)) -> Result<(), i64> {
    let (l4_check, mangled) = if k.proto == IPPROTO_TCP {
        (TCP_CHECK_OFF, 0)
    } else {
        // UDP: leave a zero ("no checksum") alone, send a computed zero as 0xffff.
        (UDP_CHECK_OFF, BPF_F_MARK_MANGLED_0 as u64)
    };
    // Field by field rather than over arrays: arrays of (offset, old, new) cost stack
    // the verifier's budget cannot spare.
    replace_addr(ctx, l4_check, mangled, IP_SRC_OFF, k.src_addr_be, src.0)?;
    replace_addr(ctx, l4_check, mangled, IP_DST_OFF, k.dst_addr_be, dst.0)?;
    replace_port(ctx, l4_check, mangled, L4_OFF, k.src_port_be, src.1)?;
    replace_port(ctx, l4_check, mangled, L4_OFF + 2, k.dst_port_be, dst.1)
}

#[inline(always)]
fn replace_addr(ctx: &TcContext, l4_check: usize, mangled: u64, off: usize, old: u32, new: u32) -> Result<(), i64> {
    if old != new {
        ctx.l4_csum_replace(l4_check, old as u64, new as u64, BPF_F_PSEUDO_HDR as u64 | 4 | mangled)?;
        ctx.l3_csum_replace(IP_CHECK_OFF, old as u64, new as u64, 4)?;
        ctx.store(off, &new, 0)?;
    }
    Ok(())
}

#[inline(always)]
fn replace_port(ctx: &TcContext, l4_check: usize, mangled: u64, off: usize, old: u16, new: u16) -> Result<(), i64> {
    if old != new {
        ctx.l4_csum_replace(l4_check, old as u64, new as u64, 2 | mangled)?;
        ctx.store(off, &new, 0)?;
    }
    Ok(())
}

/// Rewrites the IPv4 addresses only (a later fragment carries no L4 header).
#[inline(always)]
fn rewrite_addresses(ctx: &TcContext, k: &CtKey, src: u32, dst: u32) -> Result<(), i64> {
    if k.src_addr_be != src {
        ctx.l3_csum_replace(IP_CHECK_OFF, k.src_addr_be as u64, src as u64, 4)?;
        ctx.store(IP_SRC_OFF, &src, 0)?;
    }
    if k.dst_addr_be != dst {
        ctx.l3_csum_replace(IP_CHECK_OFF, k.dst_addr_be as u64, dst as u64, 4)?;
        ctx.store(IP_DST_OFF, &dst, 0)?;
    }
    Ok(())
}

#[inline(never)]
fn later_fragment(ctx: &TcContext, p: &Parsed, cfg: &Config) -> i32 {
    let Some(first) = frag::first_of(p, frag_hook::INGRESS) else {
        count(counters::PASS_FRAGMENT_UNMATCHED, p.frame_len);
        return TC_ACT_OK;
    };
    let fast = cfg.fast();
    let src = if fast { first.src_addr_be } else { p.key.src_addr_be };
    if rewrite_addresses(ctx, &p.key, src, first.dst_addr_be).is_err() {
        return TC_ACT_SHOT;
    }
    count(counters::FRAGMENT_TRANSLATED, p.frame_len);
    if fast {
        return forward(ctx);
    }
    if first.egress != 0 {
        set_mark(ctx, cfg, first.egress);
    }
    TC_ACT_OK
}

/// tc egress: the source side of a flow whose destination side was rewritten on the way in
/// (netfilter mode). The mark's payload says where the flow's reply half is: at (backend ->
/// node:port) for a flow with SNAT, at the packet's own tuple for the reply of one without.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else {
        return TC_ACT_OK;
    };
    let shift = cfg.mark_shift & 15;
    // SAFETY: reading a field of the valid context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let payload = ((mark >> shift) & 0xffff) as u16;
    if payload == 0 {
        return TC_ACT_OK;
    }
    // Consumed here: a tunnel's outer packet, or the next device, must not act on it again.
    // SAFETY: writing a field tc programs may write.
    unsafe { (*ctx.skb.skb).mark = mark & !(0xffff << shift) };
    egress(&ctx, cfg, payload).unwrap_or(TC_ACT_OK)
}

#[inline(always)]
fn egress(ctx: &TcContext, cfg: &Config, payload: u16) -> Option<i32> {
    if ctx.data_end() - ctx.data() < PULL_LEN as usize {
        let _ = ctx.pull_data(PULL_LEN.min(ctx.len()));
    }
    let p = parse(ctx.data(), ctx.data_end(), ctx.len() as u64).ok()?;
    let k = &p.key;
    if p.fragment == Fragment::Later {
        let first = frag::first_of(&p, frag_hook::EGRESS)?;
        rewrite_addresses(ctx, k, first.src_addr_be, k.dst_addr_be).ok()?;
        count(counters::EGRESS_REWRITTEN, p.frame_len);
        return Some(TC_ACT_OK);
    }
    let src = egress_source(k, cfg, payload)?;
    rewrite(ctx, k, src, (k.dst_addr_be, k.dst_port_be)).ok()?;
    if p.fragment == Fragment::First {
        frag::remember(&p, frag_hook::EGRESS, src.0, k.dst_addr_be, 0);
    }
    count(counters::EGRESS_REWRITTEN, p.frame_len);
    Some(TC_ACT_OK)
}

/// The new source of an egress packet: the node's address and NAT port for a flow's
/// packets toward its backend, the frontend for its replies.
#[inline(always)]
fn egress_source(k: &CtKey, cfg: &Config, payload: u16) -> Option<(u32, u16)> {
    // SAFETY (each read below): plain integers of a map value, checked by read_half.
    if payload == EGRESS_OWN_TUPLE {
        return ct::read_half(k, |r| unsafe { ((*r).nat_src_addr_be, (*r).nat_src_port_be) });
    }
    let nat_port_be = payload.to_be();
    let toward_backend = CtKey {
        src_addr_be: k.dst_addr_be,
        dst_addr_be: cfg.node_addr_be,
        src_port_be: k.dst_port_be,
        dst_port_be: nat_port_be,
        proto: k.proto,
        _pad: [0; 3],
    };
    let ours = ct::read_half(&toward_backend, |r| unsafe {
        (*r).nat_dst_addr_be == k.src_addr_be && (*r).nat_dst_port_be == k.src_port_be
    });
    if ours == Some(true) {
        return Some((cfg.node_addr_be, nat_port_be));
    }
    let from_backend = CtKey { dst_addr_be: cfg.node_addr_be, dst_port_be: nat_port_be, ..*k };
    ct::read_half(&from_backend, |r| unsafe {
        ((*r).nat_dst_addr_be == k.dst_addr_be && (*r).nat_dst_port_be == k.dst_port_be)
            .then_some(((*r).nat_src_addr_be, (*r).nat_src_port_be))
    })
    .flatten()
}

/// An ICMP error from a pod about a tracked flow, translated for the other end of the flow.
// A BPF-to-BPF call of its own: inlined, this cold path's buffers would share the
// entry point's 512-byte stack frame with the hot path's.
#[inline(never)]
fn translate_icmp_error(ctx: &TcContext) -> bool {
    let mut w = [0u8; icmp::ERROR_WINDOW];
    if load(ctx, IP_OFF, &mut w) != 0 {
        return false;
    }
    let Some((rw, _)) = icmp::error_flow(&w).and_then(|k| tracked_rewrite(&k)) else {
        return false;
    };
    icmp::translate_error(&mut w, rw.src_addr_be, rw.src_port_be, rw.dst_addr_be, rw.dst_port_be);
    // The window's own checksums are updated; the skb's checksum state follows the bytes.
    if ctx.store(IP_OFF, &w, BPF_F_RECOMPUTE_CSUM as u64).is_err() {
        return false;
    }
    count(counters::ICMP_ERROR_TRANSLATED, ctx.len() as u64);
    true
}

/// An ICMP destination unreachable answer: its code, next-hop MTU, and what it counts as.
pub struct Unreachable {
    counter: u32,
    code: u8,
    mtu: u16,
}

impl Unreachable {
    pub const fn counter(&self) -> u32 {
        self.counter
    }
    pub const fn code(&self) -> u8 {
        self.code
    }
    pub const fn mtu(&self) -> u16 {
        self.mtu
    }
    pub const fn port() -> Self {
        Unreachable { counter: counters::REFUSED_NO_BACKEND, code: icmp::PORT_UNREACHABLE, mtu: 0 }
    }
    pub const fn frag_needed(mtu: u16) -> Self {
        Unreachable { counter: counters::FRAG_NEEDED_ANSWERED, code: icmp::FRAG_NEEDED, mtu }
    }
}

/// Answers ICMP destination unreachable to the sender: the answer (new headers, then the
/// offending packet's IPv4 header + 8 bytes as the quote) is built in a buffer and written
/// over the packet, cut or grown to its length. (Making room in front with adjust_room
/// fails on a packet whose checksum is partial, as a pod's are.)
// A call of its own, so its locals do not add to the hot path's frame.
#[inline(never)]
fn answer_unreachable(ctx: &TcContext, p: &Parsed, u: Unreachable) -> i32 {
    if !ratelimit::answer_allowed(p.key.src_addr_be) {
        count(counters::DROP_ANSWER_RATE_LIMITED, p.frame_len);
        return TC_ACT_SHOT;
    }
    let mut macs = [0u8; 12];
    let mut frame = [0u8; icmp::ANSWER_LEN];
    let mut quote = [0u8; icmp::QUOTE_LEN];
    if load(ctx, 0, &mut macs) != 0 || load(ctx, IP_OFF, &mut quote) != 0 {
        return TC_ACT_SHOT;
    }
    frame[icmp::HEADERS_LEN..].copy_from_slice(&quote);
    icmp::write_unreachable(&mut frame, macs, u.code, u.mtu);
    // SAFETY: plain helper call on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, icmp::ANSWER_LEN as u32, 0) } != 0 || ctx.store(0, &frame, 0).is_err()
    {
        return TC_ACT_SHOT;
    }
    count(u.counter, p.frame_len);
    back_where_it_came_from(ctx)
}

/// Answers a TCP reset to the sender.
#[inline(never)]
fn answer_reset(ctx: &TcContext, p: &Parsed, counter: u32) -> i32 {
    if !ratelimit::answer_allowed(p.key.src_addr_be) {
        count(counters::DROP_ANSWER_RATE_LIMITED, p.frame_len);
        return TC_ACT_SHOT;
    }
    let Ok(doff) = ctx.load::<u8>(L4_OFF + 12) else { return TC_ACT_SHOT };
    let segment_len = p.l4_len.saturating_sub(((doff >> 4) as u16) * 4);
    // SAFETY: plain helper call on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, reset::RESET_LEN as u32, 0) } != 0 {
        return TC_ACT_SHOT;
    }
    let mut frame = [0u8; reset::RESET_LEN];
    if load(ctx, 0, &mut frame) != 0 {
        return TC_ACT_SHOT;
    }
    reset::write_reset(&mut frame, segment_len);
    if ctx.store(0, &frame, BPF_F_RECOMPUTE_CSUM as u64).is_err() {
        return TC_ACT_SHOT;
    }
    count(counter, p.frame_len);
    back_where_it_came_from(ctx)
}

/// Reads `N` packet bytes at `off` into `buf`: one fixed-size helper call (aya's
/// `load_bytes` may ask for 0 bytes, which the verifier refuses; its `load` returns copies).
#[inline(always)]
fn load<const N: usize>(ctx: &TcContext, off: usize, buf: &mut [u8; N]) -> i64 {
    // SAFETY: N bytes into our own buffer.
    unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, off as u32, buf.as_mut_ptr().cast(), N as u32) }
}

/// Out of the device the packet came in on: back toward its sender.
#[inline(always)]
fn back_where_it_came_from(ctx: &TcContext) -> i32 {
    // SAFETY: reading the skb's ifindex field; the context pointer is valid.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
