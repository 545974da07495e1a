//! The decision about one packet, the same for XDP and tc: follow a tracked flow, or start
//! one (frontend lookup, source ranges, backend choice, SNAT port), or let it pass.
use aya_ebpf::EbpfContext;
// Rare events only (a stale service entry, NAT exhaustion): never per packet.
use aya_log_ebpf::{error, warn};
use lb_common::{
    affinity_scope,
    conntrack::{age, alive, next_state, nonce, refreshes, restarts, stamp, starts_flow, REFRESH, TCP_RST},
    counters, ct_flags, in_prefix, needs_snat, service_flags, Backend, Config, CtKey, CtValue, ServiceKey,
    ServiceValue, IPPROTO_TCP,
};

use crate::{
    ct,
    maps::{
        backend, config, count, ct_state, maybe_frontend, source_allowed, LB_CONNTRACK, LB_SCRATCH, LB_SERVICES,
        LB_SVC_SCRATCH,
    },
    packet::Parsed,
    ratelimit, select,
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
    /// The rewrite a half applies.
    #[inline(always)]
    pub fn of(v: *const CtValue) -> Self {
        // SAFETY: reading plain integers of a live map value.
        unsafe {
            Rewrite {
                src_addr_be: (*v).nat_src_addr_be,
                dst_addr_be: (*v).nat_dst_addr_be,
                src_port_be: (*v).nat_src_port_be,
                dst_port_be: (*v).nat_dst_port_be,
            }
        }
    }
}

/// What to do with a packet. A plain struct with every byte a named field, not an enum:
/// the programs copy verdicts between BPF functions, and LLVM copies an enum's unused bytes
/// from registers the verifier knows were never written (and then rejects the program);
/// a niche-packed enum also gets BTF the kernel refuses.
/// (Nor does it carry a pointer to the flow's entry: the verifier loses track of a map
/// pointer that crosses a BPF call inside a struct.)
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Verdict {
    /// Translate: the next hop's Ethernet addresses, when `has_hop` says the half had them.
    pub hop_macs: Macs,
    /// Translate: the new addresses and ports.
    pub rw: Rewrite,
    /// Counted under this index.
    pub counter: u32,
    /// Translate, netfilter mode: what tc egress needs to rewrite the source side (see
    /// `egress_payload`); 0 when the source stays.
    pub egress: u16,
    /// `action::*`
    pub action: u8,
    /// Translate: 1 when the flow's half has a next hop cached (and this packet did not
    /// refresh the half, which asks for a new lookup).
    pub has_hop: u8,
    pub hop_ifindex: u32,
    pub hop_mtu: u16,
    pub _pad: u16,
    /// Translate: the flow's frontend and backend, for their counters.
    pub svc_id: u32,
    pub backend_id: u32,
    /// Translate, a tracked flow: its nonce, which a next hop cached in its half is tagged
    /// with (0 for a new flow, which caches nothing).
    pub nonce: u32,
}

/// A next hop's Ethernet addresses. Aligned so that zeroing or copying them compiles to
/// word stores: byte arrays at odd stack offsets compile to calls of an out-of-line
/// byte-loop memset, which cost a quarter of the pass-through path.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Macs {
    pub dst: [u8; 6],
    pub src: [u8; 6],
}

impl Macs {
    pub const NONE: Macs = Macs { dst: [0; 6], src: [0; 6] };
}

/// `Verdict::action`
pub mod action {
    /// Not ours: hand to the stack untouched.
    pub const PASS: u8 = 0;
    pub const DROP: u8 = 1;
    /// A frontend without backends: answer ICMP port unreachable.
    pub const REFUSE: u8 = 2;
    /// Answer a TCP reset.
    pub const RESET: u8 = 3;
    pub const TRANSLATE: u8 = 4;
    /// The tracked flow is gone: treat the packet as untracked (internal to `decide`).
    pub const UNTRACKED: u8 = 5;
}

const NO_REWRITE: Rewrite = Rewrite { src_addr_be: 0, dst_addr_be: 0, src_port_be: 0, dst_port_be: 0 };

impl Verdict {
    #[inline(always)]
    const fn of(action: u8, counter: u32) -> Verdict {
        Verdict {
            hop_macs: Macs::NONE,
            rw: NO_REWRITE,
            counter,
            egress: 0,
            action,
            has_hop: 0,
            hop_ifindex: 0,
            hop_mtu: 0,
            _pad: 0,
            svc_id: 0,
            backend_id: 0,
            nonce: 0,
        }
    }
    pub const fn pass(counter: u32) -> Verdict {
        Verdict::of(action::PASS, counter)
    }
    pub const fn drop(counter: u32) -> Verdict {
        Verdict::of(action::DROP, counter)
    }
    pub const fn refuse() -> Verdict {
        Verdict::of(action::REFUSE, counters::REFUSED_NO_BACKEND)
    }
    pub const fn reset(counter: u32) -> Verdict {
        Verdict::of(action::RESET, counter)
    }
    const fn untracked() -> Verdict {
        Verdict::of(action::UNTRACKED, 0)
    }
    #[inline(always)]
    fn translate(rw: Rewrite, counter: u32, egress: u16, svc_id: u32, backend_id: u32) -> Verdict {
        Verdict { rw, counter, egress, svc_id, backend_id, ..Verdict::of(action::TRANSLATE, counter) }
    }

    /// With the next hop `half` caches for the flow of `nonce`, if it has one and `fresh`:
    /// read between two checks of its tag (see `ct::cache_hop`).
    #[inline(always)]
    fn with_hop(mut self, half: *const CtValue, nonce: u32, fresh: bool) -> Verdict {
        self.nonce = nonce;
        let tag = || {
            // SAFETY: reading a plain integer of a map value.
            unsafe { core::ptr::addr_of!((*half).hop_nonce).read_volatile() }
        };
        if !fresh || tag() != nonce {
            return self;
        }
        // Straight into the verdict: the call chain has no stack to spare for a copy.
        // SAFETY: reading plain integers of a map value.
        unsafe {
            self.hop_ifindex = (*half).hop_ifindex;
            self.hop_mtu = (*half).hop_mtu;
            self.hop_macs = Macs { dst: (*half).hop_dmac, src: (*half).hop_smac };
        }
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        self.has_hop = (tag() == nonce) as u8;
        self
    }
}

/// Where a packet that is not for a frontend may still belong to a translated flow.
#[derive(Clone, Copy)]
pub enum Replies {
    /// Anywhere: tc on pod devices sees backends answer clients at any address.
    Anywhere,
    /// Only toward the node's SNAT address and port range, or into the pod prefix: the
    /// uplink, where everything else can pass without a conntrack lookup.
    ToNatOrPods,
}

/// The mark payload tc egress needs for a half (netfilter mode): the NAT port of a flow
/// with SNAT (egress finds the reply half at (backend -> node:port) from it); for the reply
/// half of a flow without SNAT, [`EGRESS_OWN_TUPLE`] (egress looks its own tuple up); 0 for
/// a forward half without SNAT, whose source stays.
#[inline(always)]
fn egress_payload(key: &CtKey, v: *const CtValue) -> u16 {
    // SAFETY: reading plain integers of a live map value.
    let (flags, nat_src_port_be) = unsafe { ((*v).flags, (*v).nat_src_port_be) };
    match (flags & ct_flags::REPLY != 0, flags & ct_flags::SNAT != 0) {
        (false, true) => u16::from_be(nat_src_port_be),
        (false, false) => 0,
        (true, true) => u16::from_be(key.dst_port_be),
        (true, false) => EGRESS_OWN_TUPLE,
    }
}

/// Mark payload: "look up the packet's own tuple". SNAT ports are never this low.
pub const EGRESS_OWN_TUPLE: u16 = 1;

/// None when the packet can be neither for a frontend nor part of a translated flow (the
/// cheap test most passing traffic stops at); else whether it may be for a frontend.
#[inline(always)]
pub fn screen(k: &CtKey, cfg: &Config, replies: Replies) -> Option<bool> {
    let maybe_front = maybe_frontend(k.dst_addr_be, k.dst_port_be);
    (maybe_front || may_be_reply(k, cfg, replies)).then_some(maybe_front)
}

#[inline(always)]
pub fn decide<C: EbpfContext>(ctx: &C, p: &Parsed, maybe_front: bool, half: Option<*mut CtValue>) -> Verdict {
    let k = &p.key;
    if p.truncated {
        // Not translatable: dropped if it is ours, else the stack's (it may be routed on).
        return if is_ours(p, maybe_front, half) {
            Verdict::drop(counters::DROP_MALFORMED)
        } else {
            Verdict::pass(counters::PASS_L4_TRUNCATED)
        };
    }
    if let Some(v) = half {
        let verdict = follow(p, v);
        if verdict.action != action::UNTRACKED {
            return verdict;
        }
    }
    if !maybe_front {
        return Verdict::pass(counters::PASS_NOT_SERVICE);
    }
    // SAFETY: entries are replaced whole by the agent and stay readable for the whole run
    // (RCU); a reference rather than a copy keeps the entry out of this frame.
    match unsafe { LB_SERVICES.get(&frontend_of(k)) } {
        // A loopback NodePort is the socket hooks' alone.
        Some(svc) if svc.flags & service_flags::LOOPBACK == 0 => start_flow(ctx, p, svc),
        _ => Verdict::pass(counters::PASS_NOT_SERVICE),
    }
}

/// The conntrack half a packet belongs to, if any: looked up once per packet, by the hook
/// (which may need to know before deciding) and handed to [`decide`].
#[inline(always)]
pub fn tracked(p: &Parsed) -> Option<*mut CtValue> {
    LB_CONNTRACK.get_ptr_mut(&p.key)
}

/// Whether a packet belongs to a flow or a frontend: asked of packets the hook cannot
/// translate as they are, which are someone else's business otherwise.
#[inline(always)]
pub fn is_ours(p: &Parsed, maybe_front: bool, half: Option<*mut CtValue>) -> bool {
    // SAFETY: only whether the entry exists is read.
    half.is_some() || (maybe_front && unsafe { LB_SERVICES.get(&frontend_of(&p.key)) }.is_some())
}

#[inline(always)]
fn frontend_of(k: &CtKey) -> ServiceKey {
    ServiceKey { addr_be: k.dst_addr_be, port_be: k.dst_port_be, proto: k.proto, _pad: 0 }
}

#[inline(always)]
fn may_be_reply(k: &CtKey, cfg: &Config, replies: Replies) -> bool {
    let Replies::ToNatOrPods = replies else { return true };
    let port = u16::from_be(k.dst_port_be);
    (k.dst_addr_be == cfg.node_addr_be && port >= cfg.snat_port_min && port <= cfg.snat_port_max)
        || in_prefix(k.dst_addr_be, cfg.pods_addr_be, cfg.pods_prefix_len)
}

/// The rewrite of a live tracked flow, leaving its state alone: for ICMP errors about it.
#[inline(always)]
pub fn tracked_rewrite(key: &CtKey) -> Option<(Rewrite, u16)> {
    let v = LB_CONNTRACK.get_ptr_mut(key)?;
    let seen = ct::load_stamp(v);
    if !ct::holds(v, key) {
        count(counters::ENTRY_REUSED, 0);
        return None;
    }
    if !alive(key.proto, ct::load_state(v), seen, ct::now()) {
        return None;
    }
    let found = (Rewrite::of(v), egress_payload(key, v));
    ct::unchanged(v, seen).then_some(found)
}

/// A packet of a tracked flow; UNTRACKED when its flow is gone (expired, closed and
/// restarted by a SYN, broken, or its UDP backend removed).
#[inline(always)]
fn follow(p: &Parsed, v: *mut CtValue) -> Verdict {
    let k = &p.key;
    let now = ct::now();
    let seen = ct::load_stamp(v);
    if !ct::holds(v, k) {
        // The element was reused for another flow since the lookup: that flow's, not ours
        // (and not ours to remove). As if nothing had been found.
        count(counters::ENTRY_REUSED, 0);
        return Verdict::untracked();
    }
    let state = ct::load_state(v);
    // SAFETY: reading plain integers of a live map value.
    let (flags, backend_id, backend_gen, svc_id) =
        unsafe { ((*v).flags, (*v).backend_id, (*v).backend_gen, (*v).svc_id) };
    let reply = flags & ct_flags::REPLY != 0;
    if !alive(k.proto, state, seen, now) || restarts(k.proto, state, p.tcp_flags, reply) {
        ct::reap(k, v, seen);
        return Verdict::untracked();
    }
    if !backend(backend_id).is_some_and(|b: &Backend| b.gen == backend_gen) {
        // Removed, not merely terminating: the flow goes. UDP chooses again at once
        // (kube-proxy deletes such flows); TCP gets a reset rather than silence; a late
        // reply from the removed backend is dropped, and so is a client's reset (a reset is
        // never answered).
        ct::reap(k, v, seen);
        return if reply || p.tcp_flags & TCP_RST != 0 {
            Verdict::drop(counters::DROP_BACKEND_GONE)
        } else if k.proto == IPPROTO_TCP {
            Verdict::reset(counters::RESET_BACKEND_GONE)
        } else {
            count(counters::BACKEND_GONE_RECHOSEN, 0);
            Verdict::untracked()
        };
    }
    let next = next_state(k.proto, state, p.tcp_flags, reply);
    let refresh = next != state || (refreshes(k.proto, state, reply) && age(seen, now) >= REFRESH);
    if refresh && !ct::refresh(k, v, seen, (state as u64) << 32 | next as u64, now) {
        count(counters::FLOW_ORPHANED, 0);
        return Verdict::untracked();
    }
    let rw = Rewrite::of(v);
    let egress = egress_payload(k, v);
    let counter = if reply { counters::REPLY } else { counters::ESTABLISHED };
    let verdict = Verdict::translate(rw, counter, egress, svc_id, backend_id).with_hop(v, nonce(seen), !refresh);
    // The half was removed (and its memory maybe reused) while we read it.
    if !ct::unchanged(v, seen) {
        return Verdict::untracked();
    }
    verdict
}

// New flows are the slow path: a call of its own keeps their locals (two conntrack values,
// service, backend and config copies) out of the per-packet frame.
#[inline(never)]
fn start_flow<C: EbpfContext>(ctx: &C, p: &Parsed, svc: &ServiceValue) -> Verdict {
    let k = &p.key;
    // A copy, checked against its key: the agent replaces entries whole, and the element
    // of a replaced one may be reused for another frontend while this program reads it.
    // Copied into per-CPU scratch: the call chain's 512-byte stack has no room for it.
    let Some(copy) = LB_SVC_SCRATCH.get_ptr_mut(0) else {
        return Verdict::drop(counters::DROP_STALE_SERVICE);
    };
    // SAFETY: a map value's memory stays valid for the run; one copy of plain integers
    // into this CPU's scratch, which nothing else on this CPU uses while this runs.
    let svc: &ServiceValue = unsafe {
        core::ptr::copy_nonoverlapping(svc, copy, 1);
        &*copy
    };
    // Its own entry, copied whole (not mixed with the one the kernel reused it for).
    if svc.key != frontend_of(k) || !svc.intact() {
        count(counters::ENTRY_REUSED, 0);
        return Verdict::pass(counters::PASS_NOT_SERVICE);
    }
    if !starts_flow(k.proto, p.tcp_flags) {
        return if p.tcp_flags & TCP_RST != 0 {
            Verdict::drop(counters::DROP_NO_FLOW)
        } else {
            Verdict::reset(counters::RESET_NO_FLOW)
        };
    }
    if svc.flags & service_flags::SOURCE_RANGES != 0 && !source_allowed(svc.svc_id, k.src_addr_be) {
        return Verdict::drop(counters::DROP_SOURCE_RANGE);
    }
    let Some(cfg) = config() else {
        return Verdict::drop(counters::DROP_STALE_SERVICE);
    };
    let src_local = in_prefix(k.src_addr_be, cfg.local_addr_be, cfg.local_prefix_len);
    let short_circuit = svc.flags & service_flags::EXTERNAL_LOCAL != 0 && src_local;
    let set = short_circuit as usize;
    let slots = svc.count[set] as u32;
    if slots == 0 {
        // Refused: TCP with a reset, UDP with ICMP port unreachable. A reset reaches a
        // connecting socket whatever the timing; an ICMP error arriving while connect()
        // still holds the socket (an answer from the same node comes back that fast) is
        // only a soft error, and the client waits for its retransmission.
        return if svc.flags & service_flags::DROP_WHEN_EMPTY != 0 && !short_circuit {
            Verdict::drop(counters::DROP_NO_LOCAL_BACKEND)
        } else if k.proto == IPPROTO_TCP {
            Verdict::reset(counters::REFUSED_NO_BACKEND)
        } else {
            Verdict::refuse()
        };
    }
    if ct_state().is_some_and(|s| unsafe { (*s).entries } >= cfg.ct_admit_limit as u64) {
        return Verdict::drop(counters::DROP_CT_FULL);
    }
    let backend_id = select::choose(&p.key, svc, set as u32);
    if backend_id == 0 {
        if ratelimit::log_allowed() {
            error!(ctx, "frontend {} has {} backends but a slot is missing", svc.svc_id, slots);
        }
        return Verdict::drop(counters::DROP_STALE_SERVICE);
    }
    let Some(b) = backend(backend_id).copied().filter(|b| b.addr_be != 0) else {
        if ratelimit::log_allowed() {
            error!(ctx, "frontend {} names a missing backend {}", svc.svc_id, backend_id);
        }
        return Verdict::drop(counters::DROP_STALE_SERVICE);
    };
    if affinity_scope(b.owner) != svc.scope {
        // Another Service port's backend: a slot or affinity entry read from a reused
        // element, or an id the agent gave away meanwhile. Never sent there.
        count(counters::ENTRY_REUSED, 0);
        return Verdict::drop(counters::DROP_STALE_SERVICE);
    }
    // The effective policy: short-circuited traffic is served like ETP=Cluster's, but keeps
    // its source (a pod's replies route back to this node).
    let hairpin = k.src_addr_be == b.addr_be;
    let flags = if short_circuit { svc.flags & !service_flags::EXTERNAL } else { svc.flags };
    let mut snat = needs_snat(flags, b.flags, src_local, hairpin);
    let now = ct::now();
    let fresh = stamp(ct::new_nonce(), now);
    let state = next_state(k.proto, 0, p.tcp_flags, false);
    // Built in a per-CPU scratch entry rather than on this frame: the verifier's 512-byte
    // stack budget covers the whole call chain, and a new flow's is the deepest.
    let Some(scratch) = LB_SCRATCH.get_ptr_mut(0) else {
        return Verdict::drop(counters::DROP_STALE_SERVICE);
    };
    // SAFETY: per-CPU, and nothing else on this CPU runs while this program does.
    let reply: &mut CtValue = unsafe { &mut *scratch };
    *reply = CtValue {
        stamp: fresh,
        nat_src_addr_be: k.dst_addr_be,
        nat_dst_addr_be: k.src_addr_be,
        nat_src_port_be: k.dst_port_be,
        nat_dst_port_be: k.src_port_be,
        backend_id,
        backend_gen: b.gen,
        svc_id: svc.svc_id,
        state,
        flags: ct_flags::REPLY | if short_circuit { ct_flags::SHORT_CIRCUIT } else { 0 },
        ..CtValue::default()
    };
    let mut reply_key = CtKey {
        src_addr_be: b.addr_be,
        dst_addr_be: k.src_addr_be,
        src_port_be: b.port_be,
        dst_port_be: k.src_port_be,
        proto: k.proto,
        _pad: [0; 3],
    };
    if !snat {
        match insert_or_reclaim(&reply_key, reply) {
            ct::inserted::FULL => return Verdict::drop(counters::DROP_CT_FULL),
            ct::inserted::TAKEN => {
                // The reply tuple belongs to another live flow (the same client port reaching
                // two frontends that share a backend): never overwrite it; take a NAT port.
                count(counters::SNAT_ON_COLLISION, 0);
                snat = true;
            }
            _ => {}
        }
    }
    if snat {
        if cfg.node_addr_be == 0 {
            return Verdict::drop(counters::DROP_NAT_EXHAUSTED);
        }
        reply.flags |= ct_flags::SNAT;
        reply_key.dst_addr_be = cfg.node_addr_be;
        let claimed = ct::claim_snat_port(ctx, &mut reply_key, reply, cfg);
        if claimed == ct::TABLE_FULL {
            return Verdict::drop(counters::DROP_CT_FULL);
        }
        if claimed == ct::NO_PORT {
            if ratelimit::log_allowed() {
                warn!(
                    ctx,
                    "no free SNAT port toward {:i}:{} in {}-{}",
                    u32::from_be(b.addr_be),
                    u16::from_be(b.port_be),
                    cfg.snat_port_min,
                    cfg.snat_port_max
                );
            }
            return Verdict::drop(counters::DROP_NAT_EXHAUSTED);
        }
    }
    // The forward half is the reply half rewritten in place.
    let forward = reply;
    forward.nat_src_addr_be = reply_key.dst_addr_be;
    forward.nat_dst_addr_be = b.addr_be;
    forward.nat_src_port_be = reply_key.dst_port_be;
    forward.nat_dst_port_be = b.port_be;
    forward.flags &= !ct_flags::REPLY;
    forward.state |= lb_common::conntrack::bits::LIVE;
    let done = insert_or_reclaim(k, forward);
    if done != ct::inserted::OK {
        // No room, or another CPU started this very flow a moment ago (it keeps it): the
        // reply half just inserted goes again.
        if let Some(v) = LB_CONNTRACK.get_ptr_mut(&reply_key) {
            ct::reap(&reply_key, v, fresh);
        }
        return Verdict::drop(if done == ct::inserted::FULL { counters::DROP_CT_FULL } else { counters::DROP_CT_RACE });
    }
    ct::count_live(backend_id, 1);
    Verdict::translate(Rewrite::of(forward), counters::NEW_FLOW, egress_payload(k, forward), svc.svc_id, backend_id)
}

/// Inserts a half at `key`; a dead entry there (expired, or being removed) is removed
/// first, a live one never touched (`inserted::TAKEN`).
// A call of its own, keeping its locals off start_flow's frame (the stack budget).
#[inline(never)]
fn insert_or_reclaim(key: &CtKey, value: &mut CtValue) -> u8 {
    let first = ct::insert(key, value);
    if first != ct::inserted::TAKEN {
        return first;
    }
    let Some(held) = LB_CONNTRACK.get_ptr_mut(key) else {
        // Removed in the meantime.
        return ct::insert(key, value);
    };
    let seen = ct::load_stamp(held);
    if alive(key.proto, ct::load_state(held), seen, ct::now()) {
        return ct::inserted::TAKEN;
    }
    ct::reap(key, held, seen);
    ct::insert(key, value)
}
