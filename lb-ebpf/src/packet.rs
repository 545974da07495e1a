//! Bounds-checked access to packet bytes and the IPv4/L4 parse shared by every hook.
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

/// Where a packet stands in IPv4 fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    No,
    /// The first fragment: it carries the ports.
    First,
    /// A later fragment: addresses only, translated like its first.
    Later,
}

/// An IPv4 TCP or UDP packet, its flow as seen on the wire. For a later fragment the
/// key's ports are 0.
#[derive(Clone, Copy)]
pub struct Parsed {
    pub key: CtKey,
    pub tcp_flags: u8,
    pub fragment: Fragment,
    /// Don't Fragment: a packet too big for the path is answered, not fragmented.
    pub df: bool,
    pub ip_id_be: u16,
    /// IPv4 total length minus the header: the L4 length of an unfragmented packet.
    pub l4_len: u16,
    /// The ports are there but the rest of the L4 header is cut short: not translatable.
    pub truncated: bool,
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

const MALFORMED: NotAFlow = NotAFlow { counter: counters::DROP_MALFORMED, drop: true, icmp: false };

/// Parses the linear bytes [start, end) of a frame whose whole length is `frame_len` (tc
/// packets may carry more in fragments than their linear part).
#[inline(always)]
pub fn parse(start: usize, end: usize, frame_len: u64) -> Result<Parsed, NotAFlow> {
    let ethertype: u16 = read(start, end, 12).ok_or(pass(counters::PASS_NOT_IPV4))?;
    if ethertype != 0x0800u16.to_be() {
        return Err(pass(counters::PASS_NOT_IPV4));
    }
    let ip: [u8; 20] = read(start, end, IP_OFF).ok_or(MALFORMED)?;
    let proto = ip[9];
    let frag_field = u16::from_be_bytes([ip[6], ip[7]]);
    let offset = frag_field & 0x1fff;
    let more = frag_field & 0x2000 != 0;
    let df = frag_field & 0x4000 != 0;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        let icmp = proto == IPPROTO_ICMP && ip[0] == 0x45 && offset == 0 && !more;
        return Err(NotAFlow { counter: counters::PASS_NOT_SERVICE, drop: false, icmp });
    }
    if ip[0] != 0x45 {
        return Err(if ip[0] >> 4 == 4 && ip[0] & 0xf > 5 { pass(counters::PASS_IP_OPTIONS) } else { MALFORMED });
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]);
    if (tot_len as u64) < 20 || tot_len as u64 > frame_len - ETH_LEN as u64 {
        return Err(MALFORMED);
    }
    let mut key = CtKey {
        src_addr_be: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        dst_addr_be: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        src_port_be: 0,
        dst_port_be: 0,
        proto,
        _pad: [0; 3],
    };
    let ip_id_be = u16::from_ne_bytes([ip[4], ip[5]]);
    let l4_len = tot_len - 20;
    if offset != 0 {
        return Ok(Parsed {
            key,
            tcp_flags: 0,
            fragment: Fragment::Later,
            df,
            ip_id_be,
            l4_len,
            frame_len,
            truncated: false,
        });
    }
    // Without its ports a packet cannot be told to be ours; the stack has the final say.
    if l4_len < 4 {
        return Err(pass(counters::PASS_L4_TRUNCATED));
    }
    let ports: [u16; 2] = read(start, end, L4_OFF).ok_or(pass(counters::PASS_L4_TRUNCATED))?;
    let l4_min: u16 = if proto == IPPROTO_TCP { 20 } else { 8 };
    let truncated = l4_len < l4_min || start + L4_OFF + l4_min as usize > end;
    key.src_port_be = ports[0];
    key.dst_port_be = ports[1];
    let tcp_flags = if proto == IPPROTO_TCP { read::<u8>(start, end, L4_OFF + 13).unwrap_or(0) } else { 0 };
    let fragment = if more { Fragment::First } else { Fragment::No };
    Ok(Parsed { key, tcp_flags, fragment, df, ip_id_be, l4_len, frame_len, truncated })
}
