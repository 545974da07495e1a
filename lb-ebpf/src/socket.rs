//! Socket-level load balancing: cgroup hooks that translate once, at the socket, what the
//! packet path translates per packet. A socket connecting to a frontend (or an unconnected
//! UDP socket sending to one) gets a backend from the packet path's own selection
//! (`select::choose` over LB_SERVICES, LB_SLOTS, LB_BACKENDS, affinity, open flows) and is
//! addressed to it directly: its packets never carry the frontend's address, so tc finds
//! nothing to translate and no flow is translated twice. Wherever the kernel would show the
//! application the backend (getpeername, the source of a datagram), it is shown the frontend.
//!
//! Sockets outside the cgroup, and pods' sockets with `sock_mode::HOST_ONLY`, are left to
//! the packet path. IPv6 sockets are served where they talk IPv4 (IPv4-mapped addresses,
//! `::ffff:a.b.c.d`): connect6, recvmsg6 and getpeername6 see the mapped address; their
//! unconnected sends reach sendmsg4, the kernel handing them to IPv4's UDP.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use lb_common::{
    affinity_scope, counters, netns_client, service_flags, sock_dir, sock_mode, CtKey, ServiceKey, ServiceValue,
    SockConn, SockUdpKey, SockUdpValue, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    ct::count_live,
    maps::{
        backend, config, count, count_traffic, maybe_frontend, source_allowed, LB_SERVICES, LB_SOCK_CONFIG,
        LB_SOCK_CONN, LB_SOCK_UDP,
    },
    select,
};

/// What a cgroup program returns: let the syscall go on, or fail it (with the error
/// bpf_set_retval set; EPERM without one).
const PROCEED: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V4, true)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V4_MAPPED, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V4, false)
}

/// The source of a received UDP datagram (recvfrom, recvmsg).
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4, true);
    // The kernel accepts nothing else from this hook.
    PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4_MAPPED, true);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4, false);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4_MAPPED, false);
    PROCEED
}

/// A socket closing: a connected one leaves its backend's open flows, exactly once (only
/// the release that removes its entry counts down).
#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: reading fields of the valid context.
    let (family, protocol) =
        unsafe { (read_volatile(addr_of!((*ctx.sock).family)), read_volatile(addr_of!((*ctx.sock).protocol))) };
    if (family != AF_INET && family != AF_INET6) || (protocol != IPPROTO_TCP as u32 && protocol != IPPROTO_UDP as u32) {
        return PROCEED;
    }
    // SAFETY: plain helper call on the valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(conn) = held_conn(cookie) else { return PROCEED };
    if LB_SOCK_CONN.remove(cookie).is_ok() {
        count_live(conn.backend_id, -1);
    }
    PROCEED
}

/// A copy of the socket's LB_SOCK_CONN entry, if it has one: checked against the cookie it
/// was looked up by (an element replaced or removed may be reused for another socket at
/// once, while it is read here).
#[inline(always)]
fn held_conn(cookie: u64) -> Option<SockConn> {
    let p = LB_SOCK_CONN.get_ptr(cookie)?;
    // SAFETY: one copy of plain integers from a map value's memory (valid for the run).
    let c = unsafe { read_volatile(p) };
    if c.cookie != cookie {
        count(counters::ENTRY_REUSED, 0);
        return None;
    }
    Some(c)
}

/// A copy of an LB_SOCK_UDP entry, checked against its key like [`held_conn`].
#[inline(always)]
fn held_udp(key: SockUdpKey) -> Option<SockUdpValue> {
    let p = LB_SOCK_UDP.get_ptr(key)?;
    // SAFETY: as held_conn.
    let v = unsafe { read_volatile(p) };
    if v.key != key {
        count(counters::ENTRY_REUSED, 0);
        return None;
    }
    Some(v)
}

/// Where a hook's IPv4 address is: `user_ip4`, or the last word of an IPv6 socket's
/// IPv4-mapped `user_ip6`. Constant in each program, so the compiler keeps one branch.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Family(bool);

impl Family {
    const V4: Family = Family(false);
    const V4_MAPPED: Family = Family(true);
}

/// The address a hook sees and may replace.
#[derive(Clone, Copy)]
struct Address {
    sa: *mut bpf_sock_addr,
    family: Family,
}

impl Address {
    /// (protocol, address, port), network order; None for an IPv6 address that is not
    /// IPv4-mapped (no frontend has one).
    #[inline(always)]
    fn read(&self) -> Option<(u32, u32, u16)> {
        let sa = self.sa;
        // SAFETY: reading fields of the valid context. Volatile: the verifier takes only
        // 4-byte loads of `protocol`, which the compiler may otherwise narrow.
        unsafe {
            let addr_be = if self.family == Family::V4_MAPPED {
                let ip6 = addr_of!((*sa).user_ip6) as *const u32;
                let mapped = read_volatile(ip6) == 0
                    && read_volatile(ip6.add(1)) == 0
                    && u32::from_be(read_volatile(ip6.add(2))) == 0xffff;
                if !mapped {
                    return None;
                }
                read_volatile(ip6.add(3))
            } else {
                read_volatile(addr_of!((*sa).user_ip4))
            };
            Some((read_volatile(addr_of!((*sa).protocol)), addr_be, read_volatile(addr_of!((*sa).user_port)) as u16))
        }
    }

    /// Replaces it for this syscall (4-byte stores, the only ones allowed).
    #[inline(always)]
    fn set(&self, addr_be: u32, port_be: u16) {
        let sa = self.sa;
        // SAFETY: writing fields these hooks may write.
        unsafe {
            if self.family == Family::V4_MAPPED {
                write_volatile((addr_of_mut!((*sa).user_ip6) as *mut u32).add(3), addr_be);
            } else {
                write_volatile(addr_of_mut!((*sa).user_ip4), addr_be);
            }
            write_volatile(addr_of_mut!((*sa).user_port), port_be as u32);
        }
    }
}

/// Fails the syscall with `errno`, counted under `counter`.
#[inline(always)]
fn reject(errno: i32, counter: u32) -> i32 {
    count(counter, 0);
    // SAFETY: plain helper call; connect4 and sendmsg4 may set the return value.
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

/// connect4 and connect6 (`connect`) or sendmsg4 (an unconnected UDP send).
#[inline(always)]
fn forward(ctx: &SockAddrContext, family: Family, connect: bool) -> i32 {
    let sa = Address { sa: ctx.sock_addr, family };
    let Some((proto, addr_be, port_be)) = sa.read() else { return PROCEED };
    if proto != IPPROTO_TCP as u32 && proto != IPPROTO_UDP as u32 {
        return PROCEED;
    }
    let Some(cfg) = LB_SOCK_CONFIG.get(0) else { return PROCEED };
    // The filter first: most connections are not to a frontend.
    if cfg.mode == sock_mode::OFF || !maybe_frontend(addr_be, port_be) {
        return PROCEED;
    }
    let frontend = ServiceKey { addr_be, port_be, proto: proto as u8, _pad: 0 };
    let Some(svc) = LB_SERVICES.get_ptr(&frontend) else { return PROCEED };
    // A copy, checked against its key and its checksum: the element of an entry the agent
    // replaced may be reused for another frontend while it is read.
    // SAFETY: one copy of plain integers from a map value's memory (valid for the run).
    let svc = &unsafe { read_volatile(svc) };
    if svc.key != frontend || !svc.intact() {
        count(counters::ENTRY_REUSED, 0);
        return PROCEED;
    }
    // SAFETY: plain helper call on the valid context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let host = netns == cfg.host_netns_cookie;
    if !host {
        if svc.flags & service_flags::LOOPBACK != 0 {
            // A pod's own loopback, not the node's.
            return PROCEED;
        }
        if cfg.mode == sock_mode::HOST_ONLY {
            count(counters::SOCK_PASSED, 0);
            return PROCEED;
        }
    }
    // SAFETY: plain helper call on the valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let client = Client { cookie, netns, host };
    if connect {
        connect_to(sa, &client, svc, &frontend)
    } else if proto == IPPROTO_UDP as u32 {
        send_to(sa, &client, svc, &frontend)
    } else {
        PROCEED
    }
}

struct Client {
    cookie: u64,
    netns: u64,
    /// The socket is in the node's own network namespace.
    host: bool,
}

/// A backend chosen for a socket, or (`id` 0) what its syscall gets instead.
struct Pick {
    id: u32,
    gen: u32,
    addr_be: u32,
    port_be: u16,
    /// With `id` 0: PROCEED (left untranslated) or REJECT.
    verdict: i32,
}

impl Pick {
    const fn not(verdict: i32) -> Pick {
        Pick { id: 0, gen: 0, addr_be: 0, port_be: 0, verdict }
    }
}

/// A new choice for a socket, as the packet path makes it for a new flow from this node.
#[inline(always)]
fn pick(client: &Client, svc: &ServiceValue, frontend: &ServiceKey) -> Pick {
    // Every socket here is on this node (itself or one of its pods): an
    // externalTrafficPolicy=Local frontend gives it the cluster set, as kube-proxy
    // short-circuits such traffic.
    let set = (svc.flags & service_flags::EXTERNAL_LOCAL != 0) as usize;
    let slots = svc.count[set];
    // Policies judged by the source address: a node socket's is the node's; a pod's is
    // known only on the wire, so tc judges it.
    let ranges_deny = svc.flags & service_flags::SOURCE_RANGES != 0
        && !(client.host && config().is_some_and(|c| source_allowed(svc.svc_id, c.node_addr_be)));
    let local_drop = slots == 0 && set == 0 && svc.flags & service_flags::DROP_WHEN_EMPTY != 0;
    if ranges_deny || local_drop {
        if client.host {
            return Pick::not(reject(EHOSTUNREACH, counters::SOCK_UNREACHABLE));
        }
        count(counters::SOCK_PASSED, 0);
        return Pick::not(PROCEED);
    }
    if slots == 0 {
        return Pick::not(reject(ECONNREFUSED, counters::SOCK_REFUSED));
    }
    // The socket's namespace is its client (it has no source address yet), its cookie
    // what the flow hash spreads sockets by.
    let flow = CtKey {
        src_addr_be: netns_client(client.netns),
        dst_addr_be: frontend.addr_be,
        src_port_be: client.cookie as u16,
        dst_port_be: frontend.port_be,
        proto: frontend.proto,
        _pad: [0; 3],
    };
    let id = select::choose(&flow, svc, set as u32);
    // Only this Service port's backends (a slot read from a reused element names another's).
    match backend(id).copied().filter(|b| id != 0 && b.addr_be != 0 && affinity_scope(b.owner) == svc.scope) {
        Some(b) => Pick { id, gen: b.gen, addr_be: b.addr_be, port_be: b.port_be, verdict: PROCEED },
        // The agent broke its write order: fail rather than connect to the frontend.
        None => Pick::not(reject(EHOSTUNREACH, counters::DROP_STALE_SERVICE)),
    }
}

/// Is this backend id still the endpoint it was at generation `gen` (not removed), at this
/// address, and one of this Service port's (`scope`)? What a socket keeps is checked against
/// the backend table, so an entry torn by reuse never sends it elsewhere.
#[inline(always)]
fn still(id: u32, gen: u32, addr_be: u32, port_be: u16, scope: u32) -> bool {
    backend(id).is_some_and(|b| {
        b.gen == gen
            && b.addr_be != 0
            && b.addr_be == addr_be
            && b.port_be == port_be
            && affinity_scope(b.owner) == scope
    })
}

#[inline(always)]
fn connect_to(sa: Address, client: &Client, svc: &ServiceValue, frontend: &ServiceKey) -> i32 {
    let held = held_conn(client.cookie);
    if let Some(c) = held {
        // Connecting again to the same frontend (a retry, a non-blocking connect asked
        // again) keeps the backend while it exists: one socket, one flow.
        let same = c.frontend_addr_be == frontend.addr_be
            && c.frontend_port_be == frontend.port_be
            && c.proto == frontend.proto;
        if same && still(c.backend_id, c.backend_gen, c.backend_addr_be, c.backend_port_be, svc.scope) {
            sa.set(c.backend_addr_be, c.backend_port_be);
            return PROCEED;
        }
    }
    let b = pick(client, svc, frontend);
    if b.id == 0 {
        return b.verdict;
    }
    sa.set(b.addr_be, b.port_be);
    let conn = SockConn {
        cookie: client.cookie,
        frontend_addr_be: frontend.addr_be,
        backend_addr_be: b.addr_be,
        frontend_port_be: frontend.port_be,
        backend_port_be: b.port_be,
        backend_id: b.id,
        backend_gen: b.gen,
        svc_id: svc.svc_id,
        proto: frontend.proto,
        _pad: [0; 3],
        _pad2: 0,
    };
    // Full: translated all the same, but neither tracked nor counted open (getpeername
    // then shows the backend).
    if LB_SOCK_CONN.insert(client.cookie, conn, BPF_ANY as u64).is_ok() {
        if let Some(old) = held {
            count_live(old.backend_id, -1);
        }
        count_live(b.id, 1);
    }
    count(counters::SOCK_CONNECT, 0);
    count_traffic(svc.svc_id, b.id, 0, true);
    PROCEED
}

/// An unconnected datagram: the socket keeps one backend per frontend (an LRU entry), so a
/// request and its follow-ups reach the same backend, and the backend's answers are shown
/// from the frontend.
#[inline(always)]
fn send_to(sa: Address, client: &Client, svc: &ServiceValue, frontend: &ServiceKey) -> i32 {
    let forward = SockUdpKey {
        cookie: client.cookie,
        addr_be: frontend.addr_be,
        port_be: frontend.port_be,
        dir: sock_dir::FORWARD,
        _pad: 0,
    };
    let held = held_udp(forward);
    let kept = held.filter(|v| still(v.backend_id, v.backend_gen, v.addr_be, v.port_be, svc.scope));
    if held.is_some() && kept.is_none() {
        // Its backend was removed: the socket chooses again, as the packet path's UDP flows.
        count(counters::BACKEND_GONE_RECHOSEN, 0);
    }
    let (to, new_flow) = match kept {
        Some(v) => (v, false),
        None => {
            let b = pick(client, svc, frontend);
            if b.id == 0 {
                return b.verdict;
            }
            let to = SockUdpValue {
                addr_be: b.addr_be,
                port_be: b.port_be,
                _pad: 0,
                backend_id: b.id,
                backend_gen: b.gen,
                key: forward,
            };
            // Best effort: an LRU insert only fails without memory; the next datagram
            // chooses again.
            let _ = LB_SOCK_UDP.insert(forward, to, BPF_ANY as u64);
            (to, true)
        }
    };
    sa.set(to.addr_be, to.port_be);
    let reverse =
        SockUdpKey { cookie: client.cookie, addr_be: to.addr_be, port_be: to.port_be, dir: sock_dir::REVERSE, _pad: 0 };
    let shown = SockUdpValue { addr_be: frontend.addr_be, port_be: frontend.port_be, key: reverse, ..to };
    // Written when missing or naming another frontend: the LRU may have evicted it apart
    // from its forward entry; most datagrams only read it.
    let current = held_udp(reverse);
    if current.is_none_or(|v| v.addr_be != shown.addr_be || v.port_be != shown.port_be) {
        let _ = LB_SOCK_UDP.insert(reverse, shown, BPF_ANY as u64);
    }
    count(counters::SOCK_SENDMSG, 0);
    count_traffic(svc.svc_id, to.backend_id, 0, new_flow);
    PROCEED
}

/// recvmsg (`datagram`) or getpeername: a backend's address becomes its frontend's.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: Family, datagram: bool) {
    let sa = Address { sa: ctx.sock_addr, family };
    let Some((_, addr_be, port_be)) = sa.read() else { return };
    // SAFETY: plain helper call on the valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(c) = held_conn(cookie) {
        if (c.backend_addr_be, c.backend_port_be) == (addr_be, port_be) {
            sa.set(c.frontend_addr_be, c.frontend_port_be);
            count(counters::SOCK_REVERSED, 0);
            return;
        }
    }
    if !datagram {
        return;
    }
    let key = SockUdpKey { cookie, addr_be, port_be, dir: sock_dir::REVERSE, _pad: 0 };
    if let Some(v) = held_udp(key) {
        sa.set(v.addr_be, v.port_be);
        count(counters::SOCK_REVERSED, 0);
    }
}
