//! The conntrack protocol of `lb_common::conntrack`, kernel side: stamps change only by
//! compare-and-swap, entries are inserted only with BPF_NOEXIST and removed only by the
//! winner of a swap to DEAD, who removes the peer half the same way.
use core::ptr::addr_of_mut;

use aya_ebpf::{
    bindings::{bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, BPF_F_CURRENT_NETNS, BPF_NOEXIST},
    cty::c_void,
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_loop, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    EbpfContext,
};
use lb_common::{
    conntrack::{bits, nonce, phase, stamp, units, Phase, DEAD},
    counters, ct_flags, Config, CtKey, CtValue, IPPROTO_TCP,
};

use crate::{
    atomic,
    maps::{count, ct_state, LB_BE_LIVE, LB_CONNTRACK},
};

/// Coarse time in conntrack units.
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: plain helper call.
    units(unsafe { bpf_ktime_get_coarse_ns() })
}

/// A fresh nonce for a new flow: never 0, which marks a dying half.
#[inline(always)]
pub fn new_nonce() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { bpf_get_prandom_u32() }) | 1
}

#[inline(always)]
fn stamp_ptr(v: *mut CtValue) -> *mut u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of_mut!((*v).stamp) }
}

#[inline(always)]
fn state_ptr(v: *mut CtValue) -> *mut u32 {
    // SAFETY: only the address is taken.
    unsafe { addr_of_mut!((*v).state) }
}

/// Compare-and-swap of a half's stamp; Err carries the stamp found instead.
#[inline(always)]
fn swap_stamp(v: *mut CtValue, old: u64, new: u64) -> Result<(), u64> {
    // SAFETY: map values are 8-byte aligned and live for the program's run (RCU).
    match unsafe { atomic::cas(stamp_ptr(v), old, new) } {
        (_, true) => Ok(()),
        (found, false) => Err(found),
    }
}

#[inline(always)]
pub fn load_stamp(v: *mut CtValue) -> u64 {
    // SAFETY: as swap_stamp.
    unsafe { atomic::load(stamp_ptr(v)) }
}

#[inline(always)]
pub fn load_state(v: *mut CtValue) -> u32 {
    // SAFETY: as swap_stamp; a u32 load is single-copy atomic.
    unsafe { state_ptr(v).read_volatile() }
}

/// Does the half at `v` belong under `key`? A reader's first check: the element may have
/// been reused for another key since the lookup that found it (see lb_common::conntrack).
#[inline(always)]
pub fn holds(v: *const CtValue, key: &CtKey) -> bool {
    // SAFETY: reading plain integers of a map value (its memory stays valid for the run).
    let k = unsafe { core::ptr::addr_of!((*v).key).read_volatile() };
    k.src_addr_be == key.src_addr_be
        && k.dst_addr_be == key.dst_addr_be
        && k.src_port_be == key.src_port_be
        && k.dst_port_be == key.dst_port_be
        && k.proto == key.proto
}

/// Is the half still the incarnation whose stamp was `seen`? The last check of a reader,
/// after everything it uses has been read: a nonce is set only once its whole value is in
/// place and goes only when the half is removed, so the reads in between are that flow's.
#[inline(always)]
pub fn unchanged(v: *mut CtValue, seen: u64) -> bool {
    // Reads above stay above (the compiler may not sink them past this load).
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    nonce(load_stamp(v)) == nonce(seen)
}

/// What `read` takes from the half at `key`, if a flow's half is there: checked against
/// reuse (the key inside it, its nonce around the read); a reused element counts as none.
#[inline(always)]
pub fn read_half<T>(key: &CtKey, read: impl FnOnce(*const CtValue) -> T) -> Option<T> {
    let v = LB_CONNTRACK.get_ptr_mut(key)?;
    let seen = load_stamp(v);
    if nonce(seen) == 0 {
        return None;
    }
    if !holds(v, key) {
        count(counters::ENTRY_REUSED, 0);
        return None;
    }
    let found = read(v);
    unchanged(v, seen).then_some(found)
}

/// The key of the peer half: the packets answering what this half's rewrite produces.
#[inline(always)]
pub fn peer_key(v: *const CtValue, proto: u8) -> CtKey {
    // SAFETY: reading plain integers of a live map value.
    unsafe {
        CtKey {
            src_addr_be: (*v).nat_dst_addr_be,
            dst_addr_be: (*v).nat_src_addr_be,
            src_port_be: (*v).nat_dst_port_be,
            dst_port_be: (*v).nat_src_port_be,
            proto,
            _pad: [0; 3],
        }
    }
}

#[inline(always)]
fn count_entries(delta: i64) {
    if let Some(s) = ct_state() {
        // SAFETY: the single entry of an array map, changed only atomically.
        unsafe { atomic::fetch_add(addr_of_mut!((*s).entries), delta as u64) };
    }
}

/// Adds `delta` to a backend's open flows.
#[inline(always)]
pub fn count_live(backend_id: u32, delta: i64) {
    if let Some(n) = LB_BE_LIVE.get_ptr_mut(backend_id) {
        // SAFETY: an array value, changed only atomically.
        unsafe { atomic::fetch_add(n, delta as u64) };
    }
}

/// Takes a flow off its backend's open flows if no one did yet: clears the forward
/// half's LIVE bit, and whoever finds it set counts down.
#[inline(always)]
fn end_live(v: *mut CtValue) {
    // SAFETY: reading plain integers of a live map value; the state changes atomically.
    unsafe {
        if (*v).flags & ct_flags::REPLY == 0 && atomic::fetch_and(state_ptr(v), !bits::LIVE) & bits::LIVE != 0 {
            count_live((*v).backend_id, -1);
        }
    }
}

/// Caches the next hop of the half at `key` for the flow of `flow_nonce` (0: a new flow's
/// first packet, which caches nothing). Written only into that flow's half, untagged first
/// and tagged with its nonce last; readers check the tag before and after reading the hop
/// (`Verdict::with_hop`). So a writer stalled after its check while the element was
/// reused for another flow cannot hand that flow its hop: the fields it writes are read
/// between two tags that differ. A reader during a change of the same flow's hop finds none
/// and looks the route up.
#[inline(always)]
pub fn cache_hop(key: &CtKey, flow_nonce: u32, ifindex: u32, dmac: [u8; 6], smac: [u8; 6], tot_len: u16) {
    if flow_nonce == 0 {
        return;
    }
    let Some(v) = LB_CONNTRACK.get_ptr_mut(key) else { return };
    if !holds(v, key) || nonce(load_stamp(v)) != flow_nonce {
        return;
    }
    // SAFETY: plain integers of a map value, written only here (hop_nonce last).
    unsafe {
        let nonce_ptr = addr_of_mut!((*v).hop_nonce);
        let cached = nonce_ptr.read_volatile() == flow_nonce;
        nonce_ptr.write_volatile(0);
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        (*v).hop_ifindex = ifindex;
        (*v).hop_dmac = dmac;
        (*v).hop_smac = smac;
        // The cache says "packets up to this size fit": bigger ones look again.
        if !cached || tot_len > (*v).hop_mtu {
            (*v).hop_mtu = tot_len;
        }
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        nonce_ptr.write_volatile(flow_nonce);
    }
}

/// What inserting a half came to.
pub mod inserted {
    pub const OK: u8 = 0;
    /// An entry holds the key.
    pub const TAKEN: u8 = 1;
    /// The table is at its capacity, or has no memory for the entry right now.
    pub const FULL: u8 = 2;
}

const EEXIST: i32 = 17;

/// Inserts a half that no entry holds yet, in two steps: the value goes in with nonce 0
/// (any reader takes it for dead, and it cannot be removed), then its stamp is swapped to
/// `value.stamp`. The kernel copies a value in with a plain memcpy, in no set order, possibly
/// into an element a reader on another CPU still holds (a reused one): publishing the nonce
/// last, with an atomic, means a reader that sees the nonce sees the whole value.
#[inline(always)]
pub fn insert(key: &CtKey, value: &mut CtValue) -> u8 {
    let live = value.stamp;
    value.stamp = DEAD;
    value.key = *key;
    let result = LB_CONNTRACK.insert(key, &*value, BPF_NOEXIST as u64);
    value.stamp = live;
    match result {
        Ok(()) => {
            count_entries(1);
            // Found: a half with nonce 0 is removed by no one.
            if let Some(v) = LB_CONNTRACK.get_ptr_mut(key) {
                let _ = swap_stamp(v, DEAD, live);
            }
            inserted::OK
        }
        Err(e) if e == -EEXIST => inserted::TAKEN,
        Err(_) => inserted::FULL,
    }
}

/// Removes the half at `key`, last seen with `seen` as its stamp, and its peer, if this
/// caller wins the swap to DEAD (so each is removed exactly once). False if the half
/// changed meanwhile (refreshed, or someone else is removing it).
#[inline(never)]
pub fn reap(key: &CtKey, v: *mut CtValue, seen: u64) -> bool {
    // The key first: `seen` might be another flow's, read from an element reused for it.
    if nonce(seen) == 0 || !holds(v, key) || swap_stamp(v, seen, DEAD).is_err() {
        return false;
    }
    // From here the half is DEAD and ours alone to remove: its element cannot be reused
    // before we do, so what is read from it below is still this flow's.
    let peer = peer_key(v, key.proto);
    end_live(v);
    if LB_CONNTRACK.remove(key).is_ok() {
        count_entries(-1);
    }
    if let Some(p) = LB_CONNTRACK.get_ptr_mut(&peer) {
        let ps = load_stamp(p);
        if nonce(ps) == nonce(seen) && swap_stamp(p, ps, DEAD).is_ok() {
            end_live(p);
            if LB_CONNTRACK.remove(&peer).is_ok() {
                count_entries(-1);
            }
        }
    }
    true
}

/// Removes the flow whose first packet goes no further (answered instead of sent on), as
/// Linux discards a conntrack entry never confirmed: the sender's next try starts afresh.
#[inline(always)]
pub fn withdraw(key: &CtKey) {
    if let Some(v) = LB_CONNTRACK.get_ptr_mut(key) {
        reap(key, v, load_stamp(v));
    }
}

/// Removes a half this program inserted a moment ago and that its flow will not use.
#[inline(always)]
fn unclaim(key: &CtKey, fresh: u64) {
    if let Some(v) = LB_CONNTRACK.get_ptr_mut(key) {
        if swap_stamp(v, fresh, DEAD).is_ok() && LB_CONNTRACK.remove(key).is_ok() {
            count_entries(-1);
        }
    }
}

/// Moves a live half's stamp to `now` and its state from `old` to `new`, and its peer's the
/// same way. False when the peer no longer carries the flow's nonce: the flow is broken,
/// this half has been removed, and the packet is untracked.
#[inline(never)]
/// `states` packs the old state (high 32 bits) and the new (low): BPF calls take five
/// arguments at most.
pub fn refresh(key: &CtKey, v: *mut CtValue, seen: u64, states: u64, now: u32) -> bool {
    let (old, new) = ((states >> 32) as u32, states as u32);
    let fresh = stamp(nonce(seen), now);
    if let Err(current) = swap_stamp(v, seen, fresh) {
        // Another CPU refreshed the flow first (fine), or it is being removed.
        if nonce(current) != nonce(seen) {
            return false;
        }
    }
    apply_state(v, old, new);
    let peer = peer_key(v, key.proto);
    let Some(p) = LB_CONNTRACK.get_ptr_mut(&peer).filter(|p| nonce(load_stamp(*p)) == nonce(seen)) else {
        let own = load_stamp(v);
        if nonce(own) == nonce(seen) {
            reap(key, v, own);
        }
        return false;
    };
    let ps = load_stamp(p);
    if ps != fresh {
        // Losing this race means the peer was refreshed at the same moment: fine.
        let _ = swap_stamp(p, ps, fresh);
    }
    apply_state(p, old, new);
    // A flow that closes leaves its backend's open flows now, not when it is removed.
    if phase(new) == Phase::Closed && phase(old) != Phase::Closed {
        end_live(v);
        end_live(p);
    }
    true
}

#[inline(always)]
fn apply_state(v: *mut CtValue, old: u32, new: u32) {
    let set = new & !old;
    let clear = old & !new;
    // SAFETY: map values are aligned and live for the program's run.
    unsafe {
        if set != 0 {
            atomic::fetch_or(state_ptr(v), set);
        }
        if clear != 0 {
            atomic::fetch_and(state_ptr(v), !clear);
        }
    }
}

/// Inserts `reply` (the reply half, whose key holds the NAT port) at the first free SNAT
/// port toward its backend, returning the port (network order), [`NO_PORT`] when none is
/// free, or [`TABLE_FULL`] when the table has no room.
/// The search starts where a cursor shared by all CPUs points, so ports rotate through the
/// whole range (a port comes back only after the range has gone by, long after the
/// backend's TIME_WAIT for its last flow) and no two new flows walk the same ports; runs of
/// taken ports are left by jumping to random places (with 90% of the range taken, 12 runs
/// of 8 miss a free port about once in 25 000 flows). Ports the node's own sockets use
/// toward the backend are skipped.
#[inline(never)]
pub fn claim_snat_port<C: EbpfContext>(ctx: &C, key: &mut CtKey, reply: &mut CtValue, cfg: &Config) -> i32 {
    let Some(s) = ct_state() else { return NO_PORT };
    let mut search = PortSearch {
        ctx: ctx.as_ptr(),
        key: key as *mut CtKey,
        reply: reply as *mut CtValue,
        min: cfg.snat_port_min as u32,
        span: (cfg.snat_port_max as u32).saturating_sub(cfg.snat_port_min as u32) + 1,
        // SAFETY: the single entry of an array map, changed only atomically.
        base: unsafe { atomic::fetch_add(addr_of_mut!((*s).snat_cursor), 1) } as u32,
        found: NO_PORT,
    };
    // bpf_loop, not a Rust loop: the verifier checks the body once instead of 96 unrolled
    // copies (loading stays fast and the program small).
    // SAFETY: the callback has the signature bpf_loop calls; `search` outlives the call.
    unsafe {
        bpf_loop(PORT_RUN * PORT_JUMPS, try_port as *mut c_void, &mut search as *mut PortSearch as *mut c_void, 0)
    };
    search.found
}

const PORT_RUN: u32 = 8;
const PORT_JUMPS: u32 = 12;
pub const NO_PORT: i32 = -1;
pub const TABLE_FULL: i32 = -2;

struct PortSearch {
    ctx: *mut c_void,
    key: *mut CtKey,
    reply: *mut CtValue,
    min: u32,
    span: u32,
    base: u32,
    /// The port claimed (network order), or NO_PORT / TABLE_FULL.
    found: i32,
}

extern "C" fn try_port(i: u32, search: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer claim_snat_port passed; its pointers are valid
    // for the call.
    let (s, key, reply) = unsafe {
        let s = &mut *(search as *mut PortSearch);
        (&mut *(search as *mut PortSearch), &mut *s.key, &mut *s.reply)
    };
    if i > 0 && i % PORT_RUN == 0 {
        // SAFETY: plain helper call.
        s.base = unsafe { bpf_get_prandom_u32() };
    }
    // max(1): no division by zero, whose panic path the verifier would refuse.
    let port = (s.min + s.base.wrapping_add(i % PORT_RUN) % s.span.max(1)) as u16;
    key.dst_port_be = port.to_be();
    match insert(key, reply) {
        inserted::TAKEN => return 0,
        inserted::FULL => {
            s.found = TABLE_FULL;
            return 1;
        }
        _ => {}
    }
    if node_has_socket(s.ctx, key) {
        unclaim(key, reply.stamp);
        return 0;
    }
    s.found = key.dst_port_be as i32;
    1
}

/// Would a packet with this tuple (backend -> node:port) reach a socket of the node itself?
/// Then the port is the node's own (a connection to that backend, or a listener) and SNAT
/// must not take it: the flow's replies would be taken from the socket.
#[inline(always)]
fn node_has_socket(ctx: *mut c_void, key: &CtKey) -> bool {
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
            bpf_skc_lookup_tcp(ctx, &mut tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx, &mut tuple, size, netns, 0)
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}
