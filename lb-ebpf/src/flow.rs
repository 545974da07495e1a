//! The decision about one packet, the same for XDP and tc: follow a tracked flow, or start
//! one (frontend lookup, source ranges, backend choice, SNAT port), or let it pass.
use aya_ebpf::{
    bindings::{bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, BPF_ANY, BPF_F_CURRENT_NETNS, BPF_NOEXIST},
    helpers::{
        bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_sk_lookup_udp, bpf_sk_release,
        bpf_skc_lookup_tcp,
    },
    EbpfContext,
};
// Rare events only (a stale service entry, NAT exhaustion, a full map): never per packet.
use aya_log_ebpf::{error, warn};
use lb_common::{
    conntrack::{expired, next_state, State, TCP_ACK, TCP_SYN},
    counters, ct_flags, in_prefix, needs_snat, service_flags, CtKey, CtValue, ServiceKey, ServiceValue, SlotKey,
    IPPROTO_TCP,
};

use crate::{
    maps::{source_allowed, LB_BACKENDS, LB_CONFIG, LB_CONNTRACK, LB_SERVICES, LB_SLOTS, LB_SNAT_CURSOR},
    packet::Parsed,
};

/// The new addresses and ports of a translated packet.
#[derive(Clone, Copy)]
pub struct Rewrite {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
}

impl Rewrite {
    #[inline(always)]
    fn of(v: &CtValue) -> Self {
        Rewrite {
            src_addr_be: v.nat_src_addr_be,
            dst_addr_be: v.nat_dst_addr_be,
            src_port_be: v.nat_src_port_be,
            dst_port_be: v.nat_dst_port_be,
        }
    }

    /// The conntrack key of the packets answering the rewritten one.
    #[inline(always)]
    fn answer_key(&self, proto: u8) -> CtKey {
        CtKey {
            src_addr_be: self.dst_addr_be,
            dst_addr_be: self.src_addr_be,
            src_port_be: self.dst_port_be,
            dst_port_be: self.src_port_be,
            proto,
            _pad: [0; 3],
        }
    }
}

pub enum Verdict {
    /// Not ours: hand to the stack untouched, counted under this index.
    Pass(u32),
    Drop(u32),
    /// A frontend without backends: answer ICMP port unreachable.
    Refuse,
    /// Rewrite and forward, counted under this index.
    Translate(Rewrite, u32),
}

/// How often a flow busy in one direction refreshes the entry of the other direction, so
/// that a one-way stream does not let its reply entry (and NAT port) expire under it.
const PEER_REFRESH_NS: u64 = 1_000_000_000;
/// SNAT ports tried before giving up on a new flow.
const SNAT_TRIES: u32 = 16;

/// Where a packet that is not for a frontend may still belong to a translated flow.
#[derive(Clone, Copy)]
pub enum Replies {
    /// Anywhere: tc on pod devices sees backends answer clients at any address.
    Anywhere,
    /// Only toward the node's SNAT address and port range, or into the cluster CIDR: the
    /// uplink, where everything else can pass without a conntrack lookup.
    ToNatOrPods,
}

#[inline(always)]
pub fn decide<C: EbpfContext>(ctx: &C, p: &Parsed, replies: Replies) -> Verdict {
    let k = &p.key;
    let frontend = ServiceKey { addr_be: k.dst_addr_be, port_be: k.dst_port_be, proto: k.proto, _pad: 0 };
    // SAFETY: entries are replaced whole by the agent and stay readable for the whole run
    // (RCU); a reference rather than a copy keeps the entry out of this frame.
    let svc = unsafe { LB_SERVICES.get(&frontend) };
    if svc.is_none() && !may_be_reply(k, replies) {
        return Verdict::Pass(counters::PASS_NOT_SERVICE);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(v) = follow_tracked(p, now) {
        return v;
    }
    match svc {
        Some(svc) => start_flow(ctx, p, svc, now),
        None => Verdict::Pass(counters::PASS_NOT_SERVICE),
    }
}

#[inline(always)]
fn may_be_reply(k: &CtKey, replies: Replies) -> bool {
    let Replies::ToNatOrPods = replies else { return true };
    let Some(cfg) = LB_CONFIG.get(0) else { return true };
    let port = u16::from_be(k.dst_port_be);
    (k.dst_addr_be == cfg.node_addr_be && (cfg.snat_port_min..=cfg.snat_port_max).contains(&port))
        || in_prefix(k.dst_addr_be, cfg.cluster_cidr_addr_be, cfg.cluster_cidr_prefix_len)
}

/// The rewrite of a live tracked flow, leaving its state alone: for ICMP errors about it.
#[inline(always)]
pub fn tracked_rewrite(key: &CtKey) -> Option<Rewrite> {
    // SAFETY: read-only copy of plain integers.
    let v = unsafe { *LB_CONNTRACK.get_ptr(key)? };
    let now = unsafe { bpf_ktime_get_ns() };
    if expired(key.proto, State::from_u8(v.state), v.last_seen_ns, now) {
        return None;
    }
    Some(Rewrite::of(&v))
}

#[inline(always)]
fn follow_tracked(p: &Parsed, now: u64) -> Option<Verdict> {
    let entry = LB_CONNTRACK.get_ptr_mut(&p.key)?;
    // SAFETY: LRU entries may be recycled under us; we only read plain integers from it.
    let v = unsafe { &mut *entry };
    let proto = p.key.proto;
    let state = State::from_u8(v.state);
    let reply = v.flags & ct_flags::REPLY != 0;
    let fresh_syn = proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // A new SYN on a closed flow is a new connection that chooses its backend again.
    if !reply && fresh_syn && matches!(state, State::Closing | State::Reset) {
        return None;
    }
    if expired(proto, state, v.last_seen_ns, now) {
        return None;
    }
    let next = next_state(proto, state, p.tcp_flags, reply);
    let refresh_peer = next != state || now - v.last_seen_ns > PEER_REFRESH_NS;
    v.state = next as u8;
    v.last_seen_ns = now;
    let rewrite = Rewrite::of(v);
    if refresh_peer {
        if let Some(peer) = LB_CONNTRACK.get_ptr_mut(&rewrite.answer_key(proto)) {
            // SAFETY: as above.
            unsafe {
                (*peer).state = next as u8;
                (*peer).last_seen_ns = now;
            }
        }
    }
    let counter = if reply { counters::REPLY } else { counters::ESTABLISHED };
    Some(Verdict::Translate(rewrite, counter))
}

// New flows are the slow path: a call of its own keeps their locals (two conntrack
// values, service, backend and config copies) out of the per-packet frame.
#[inline(never)]
fn start_flow<C: EbpfContext>(ctx: &C, p: &Parsed, svc: &ServiceValue, now: u64) -> Verdict {
    let k = &p.key;
    if svc.flags & service_flags::SOURCE_RANGES != 0 && !source_allowed(svc.svc_id, k.src_addr_be) {
        return Verdict::Drop(counters::DROP_SOURCE_RANGE);
    }
    if svc.backend_count == 0 {
        return if svc.flags & service_flags::EXTERNAL_LOCAL != 0 {
            Verdict::Drop(counters::DROP_NO_LOCAL_BACKEND)
        } else {
            Verdict::Refuse
        };
    }
    let slot = unsafe { bpf_get_prandom_u32() } % svc.backend_count;
    let Some(backend_id) = (unsafe { LB_SLOTS.get(&SlotKey { svc_id: svc.svc_id, slot }) }).copied() else {
        error!(ctx, "frontend {} has {} backends but no slot {}", svc.svc_id, svc.backend_count, slot);
        return Verdict::Drop(counters::DROP_STALE_SERVICE);
    };
    let Some(backend) = (unsafe { LB_BACKENDS.get(&backend_id) }).copied() else {
        error!(ctx, "frontend {} slot {} names a missing backend {}", svc.svc_id, slot, backend_id);
        return Verdict::Drop(counters::DROP_STALE_SERVICE);
    };
    let Some(cfg) = LB_CONFIG.get(0).copied() else {
        return Verdict::Drop(counters::DROP_STALE_SERVICE);
    };
    let src_in_cluster = in_prefix(k.src_addr_be, cfg.cluster_cidr_addr_be, cfg.cluster_cidr_prefix_len);
    let hairpin = k.src_addr_be == backend.addr_be;
    let snat = needs_snat(svc.flags, backend.flags, src_in_cluster, hairpin);

    let state = next_state(k.proto, State::New, p.tcp_flags, false) as u8;
    let mut answer = CtValue {
        last_seen_ns: now,
        nat_src_addr_be: k.dst_addr_be,
        nat_dst_addr_be: k.src_addr_be,
        nat_src_port_be: k.dst_port_be,
        nat_dst_port_be: k.src_port_be,
        backend_id,
        state,
        flags: ct_flags::REPLY,
        _pad: [0; 6],
    };
    let mut forward = Rewrite {
        src_addr_be: k.src_addr_be,
        dst_addr_be: backend.addr_be,
        src_port_be: k.src_port_be,
        dst_port_be: backend.port_be,
    };
    if snat {
        answer.flags |= ct_flags::SNAT;
        forward.src_addr_be = cfg.node_addr_be;
        let Some(port_be) = claim_snat_port(ctx, &forward, &answer, &cfg, k.proto, now) else {
            warn!(
                ctx,
                "no free SNAT port toward {:i}:{} in {}-{}",
                u32::from_be(backend.addr_be),
                u16::from_be(backend.port_be),
                cfg.snat_port_min,
                cfg.snat_port_max
            );
            return Verdict::Drop(counters::DROP_NAT_EXHAUSTED);
        };
        forward.src_port_be = port_be;
    } else if LB_CONNTRACK.insert(&forward.answer_key(k.proto), &answer, BPF_ANY as u64).is_err() {
        error!(ctx, "conntrack insert failed");
        return Verdict::Drop(counters::DROP_MAP_FULL);
    }
    let entry = CtValue {
        nat_src_addr_be: forward.src_addr_be,
        nat_dst_addr_be: forward.dst_addr_be,
        nat_src_port_be: forward.src_port_be,
        nat_dst_port_be: forward.dst_port_be,
        flags: if snat { ct_flags::SNAT } else { 0 },
        ..answer
    };
    if LB_CONNTRACK.insert(&p.key, &entry, BPF_ANY as u64).is_err() {
        let _ = LB_CONNTRACK.remove(&forward.answer_key(k.proto));
        error!(ctx, "conntrack insert failed");
        return Verdict::Drop(counters::DROP_MAP_FULL);
    }
    Verdict::Translate(forward, counters::NEW_FLOW)
}

/// Claims a free source port for `forward` (whose source address is already the node's)
/// by inserting the answer entry that will hold it. Ports rotate through the whole range
/// from a per-CPU cursor (CPUs start spread apart), not lowest-free-first: a port comes back
/// only after the range has gone by, so it does not meet the backend's TIME_WAIT socket of
/// the flow that used it last.
#[inline(always)]
fn claim_snat_port<C: EbpfContext>(
    ctx: &C,
    forward: &Rewrite,
    answer: &CtValue,
    cfg: &lb_common::Config,
    proto: u8,
    now: u64,
) -> Option<u16> {
    let span = (cfg.snat_port_max as u32).saturating_sub(cfg.snat_port_min as u32) + 1;
    let cursor = LB_SNAT_CURSOR.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
    let mut next = unsafe { *cursor };
    if next == 0 {
        next = unsafe { bpf_get_smp_processor_id() }.wrapping_mul(span / 16 + 1);
    }
    let mut try_rewrite = *forward;
    for _ in 0..SNAT_TRIES {
        let port = cfg.snat_port_min as u32 + next % span;
        next = next.wrapping_add(1);
        try_rewrite.src_port_be = (port as u16).to_be();
        let key = try_rewrite.answer_key(proto);
        if node_has_socket(ctx, &key) {
            continue;
        }
        let claimed = LB_CONNTRACK.insert(&key, answer, BPF_NOEXIST as u64).is_ok()
            || LB_CONNTRACK.get_ptr(&key).is_some_and(|held| {
                // SAFETY: read-only copy of plain integers.
                let held = unsafe { *held };
                // Taken by a flow that is over: reclaim it.
                expired(proto, State::from_u8(held.state), held.last_seen_ns, now)
                    && LB_CONNTRACK.insert(&key, answer, BPF_ANY as u64).is_ok()
            });
        if claimed {
            unsafe { *cursor = next };
            return Some(try_rewrite.src_port_be);
        }
    }
    unsafe { *cursor = next };
    None
}

/// Would a packet with this tuple (backend -> node:port) reach a socket of the node itself?
/// Then the port is the node's own (a connection to that backend, or a listener) and SNAT
/// must not take it: the flow's replies would be taken from the socket.
#[inline(always)]
fn node_has_socket<C: EbpfContext>(ctx: &C, key: &CtKey) -> bool {
    // SAFETY: an all-zero tuple is valid; only its IPv4 part is filled and passed.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
        saddr: key.src_addr_be,
        daddr: key.dst_addr_be,
        sport: key.src_port_be,
        dport: key.dst_port_be,
    };
    let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: valid context and tuple; a socket found is released right away.
    unsafe {
        let sk = if key.proto == IPPROTO_TCP {
            bpf_skc_lookup_tcp(ctx.as_ptr(), &mut tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), &mut tuple, size, netns, 0)
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}
