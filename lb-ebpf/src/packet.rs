//! Bounds-checked access to packet bytes and the IPv4/L4 parse shared by both hooks.
use core::mem::size_of;

use lb_common::{counters, CtKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_LEN: usize = 14;
pub const IP_OFF: usize = ETH_LEN;
pub const IP_CHECK_OFF: usize = IP_OFF + 10;
pub const IP_SRC_OFF: usize = IP_OFF + 12;
pub const IP_DST_OFF: usize = IP_OFF + 16;
/// IPv4 headers with options are not translated, so L4 always starts here.
pub const L4_OFF: usize = IP_OFF + 20;
pub const TCP_CHECK_OFF: usize = L4_OFF + 16;
pub const UDP_CHECK_OFF: usize = L4_OFF + 6;

/// A pointer to a `T` at `off`, if the whole `T` lies inside [start, end).
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, off: usize) -> Option<*mut T> {
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn read<T: Copy>(start: usize, end: usize, off: usize) -> Option<T> {
    // SAFETY: bounds checked by ptr_at; packet data has no alignment guarantee.
    ptr_at::<T>(start, end, off).map(|p| unsafe { p.read_unaligned() })
}

/// An IPv4 TCP or UDP packet, its flow as seen on the wire.
#[derive(Clone, Copy)]
pub struct Parsed {
    pub key: CtKey,
    pub tcp_flags: u8,
    pub frame_len: u64,
}

/// Why a packet is not a translatable flow: a counter index, and whether to drop it.
pub struct NotAFlow {
    pub counter: u32,
    pub drop: bool,
    /// An unfragmented ICMP packet: maybe an error about a translated flow.
    pub icmp: bool,
}

const fn pass(counter: u32) -> NotAFlow {
    NotAFlow { counter, drop: false, icmp: false }
}

#[inline(always)]
pub fn parse(start: usize, end: usize) -> Result<Parsed, NotAFlow> {
    let frame_len = (end - start) as u64;
    let ethertype: u16 = read(start, end, 12).ok_or(pass(counters::PASS_NOT_IPV4))?;
    if ethertype != 0x0800u16.to_be() {
        return Err(pass(counters::PASS_NOT_IPV4));
    }
    let truncated = NotAFlow { counter: counters::DROP_TRUNCATED, drop: true, icmp: false };
    let ip: [u8; 20] = read(start, end, IP_OFF).ok_or(truncated)?;
    let proto = ip[9];
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        let icmp = proto == IPPROTO_ICMP && ip[0] == 0x45 && !fragment;
        return Err(NotAFlow { counter: counters::PASS_NOT_SERVICE, drop: false, icmp });
    }
    if ip[0] != 0x45 || fragment {
        return Err(pass(counters::PASS_FRAGMENT_OR_OPTIONS));
    }
    let l4_len = if proto == IPPROTO_TCP { 20 } else { 8 };
    if start + L4_OFF + l4_len > end {
        return Err(NotAFlow { counter: counters::DROP_TRUNCATED, drop: true, icmp: false });
    }
    let ports: [u16; 2] = read(start, end, L4_OFF).ok_or(pass(counters::DROP_TRUNCATED))?;
    let tcp_flags = if proto == IPPROTO_TCP { read::<u8>(start, end, L4_OFF + 13).unwrap_or(0) } else { 0 };
    Ok(Parsed {
        key: CtKey {
            src_addr_be: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
            dst_addr_be: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
            src_port_be: ports[0],
            dst_port_be: ports[1],
            proto,
            _pad: [0; 3],
        },
        tcp_flags,
        frame_len,
    })
}
