//! ICMP, built and translated the same way by XDP and tc: "port unreachable" answers for
//! frontends without backends, and translation of ICMP errors about translated flows.
//!
//! The answer is laid out so the datapath only has to grow the packet's head by [`GROW`]
//! bytes and cut it to [`ANSWER_LEN`]: the offending packet's IPv4 header and first 8
//! payload bytes then already sit where ICMP quotes them (RFC 792).

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
const ICMP_HDR_LEN: usize = 8;
/// The quoted part of the offending packet: its IPv4 header (no options) + 8 bytes.
pub const QUOTE_LEN: usize = IPV4_LEN + 8;
/// Bytes added in front of the offending packet: a new IPv4 header and an ICMP header.
pub const GROW: usize = IPV4_LEN + ICMP_HDR_LEN;
/// The new headers written in front of the quote: Ethernet + IPv4 + ICMP.
pub const HEADERS_LEN: usize = ETH_LEN + IPV4_LEN + ICMP_HDR_LEN;
/// Length of the whole answer frame.
pub const ANSWER_LEN: usize = HEADERS_LEN + QUOTE_LEN;

/// Destination unreachable codes the datapath answers with.
pub const PORT_UNREACHABLE: u8 = 3;
pub const FRAG_NEEDED: u8 = 4;

/// Writes the Ethernet, IPv4 and ICMP headers of a destination-unreachable answer (`code`;
/// `next_hop_mtu` for FRAG_NEEDED, else 0) into `frame[..HEADERS_LEN]`, whose
/// `frame[HEADERS_LEN..]` already holds the quote (the offending packet's IPv4 header + 8
/// bytes). `macs` is the offending frame's destination and source MAC. The answer goes back
/// where the frame came from: MACs and addresses swapped, its source the address the client
/// tried to reach (the frontend).
#[inline(always)]
pub fn write_unreachable(frame: &mut [u8; ANSWER_LEN], macs: [u8; 12], code: u8, next_hop_mtu: u16) {
    let q = HEADERS_LEN;
    frame[0..6].copy_from_slice(&macs[6..12]);
    frame[6..12].copy_from_slice(&macs[0..6]);
    frame[12] = 0x08;
    frame[13] = 0x00;
    let ip = ETH_LEN;
    let total = (IPV4_LEN + ICMP_HDR_LEN + QUOTE_LEN) as u16;
    // Version/IHL, TOS "internetwork control" (as Linux sends ICMP errors), length, id, flags.
    frame[ip..ip + 8].copy_from_slice(&[0x45, 0xc0, (total >> 8) as u8, total as u8, 0, 0, 0, 0]);
    frame[ip + 8] = 64;
    frame[ip + 9] = crate::IPPROTO_ICMP;
    frame[ip + 10] = 0;
    frame[ip + 11] = 0;
    for i in 0..4 {
        frame[ip + 12 + i] = frame[q + 16 + i];
        frame[ip + 16 + i] = frame[q + 12 + i];
    }
    let ip_check = crate::checksum::checksum(&frame[ip..ip + IPV4_LEN], 0);
    frame[ip + 10..ip + 12].copy_from_slice(&ip_check.to_be_bytes());
    let icmp = ip + IPV4_LEN;
    let mtu = next_hop_mtu.to_be_bytes();
    frame[icmp..icmp + ICMP_HDR_LEN].copy_from_slice(&[3, code, 0, 0, 0, 0, mtu[0], mtu[1]]);
    let icmp_check = crate::checksum::checksum(&frame[icmp..], 0);
    frame[icmp + 2..icmp + 4].copy_from_slice(&icmp_check.to_be_bytes());
}

/// The part of an ICMP error that translation reads and writes, from the outer IPv4
/// header on: outer IPv4 (20), ICMP header (8), quoted IPv4 header (20), quoted ports (4).
pub const ERROR_WINDOW: usize = IPV4_LEN + ICMP_HDR_LEN + IPV4_LEN + 4;
const ICMP_OFF: usize = IPV4_LEN;
const INNER_OFF: usize = ICMP_OFF + ICMP_HDR_LEN;
const INNER_PORTS: usize = INNER_OFF + IPV4_LEN;

#[inline(always)]
fn rd32(w: &[u8; ERROR_WINDOW], o: usize) -> u32 {
    u32::from_ne_bytes([w[o], w[o + 1], w[o + 2], w[o + 3]])
}

#[inline(always)]
fn rd16(w: &[u8; ERROR_WINDOW], o: usize) -> u16 {
    u16::from_ne_bytes([w[o], w[o + 1]])
}

#[inline(always)]
fn wr32(w: &mut [u8; ERROR_WINDOW], o: usize, v: u32) {
    w[o..o + 4].copy_from_slice(&v.to_ne_bytes());
}

#[inline(always)]
fn wr16(w: &mut [u8; ERROR_WINDOW], o: usize, v: u16) {
    w[o..o + 2].copy_from_slice(&v.to_ne_bytes());
}

/// If the window holds an ICMP error (destination unreachable, time exceeded, parameter
/// problem) quoting a TCP or UDP packet, the conntrack key of the direction the error
/// travels: the quoted packet's flow reversed.
#[inline(always)]
pub fn error_flow(w: &[u8; ERROR_WINDOW]) -> Option<crate::CtKey> {
    let is_error = matches!(w[ICMP_OFF], 3 | 11 | 12);
    let inner_proto = w[INNER_OFF + 9];
    // The window must lie inside the datagram: past its total length come padding or
    // garbage, neither quoted nor covered by the ICMP checksum.
    let whole = u16::from_be_bytes([w[2], w[3]]) as usize >= ERROR_WINDOW;
    if w[0] != 0x45 || w[9] != crate::IPPROTO_ICMP || !is_error || w[INNER_OFF] != 0x45 || !whole {
        return None;
    }
    if inner_proto != crate::IPPROTO_TCP && inner_proto != crate::IPPROTO_UDP {
        return None;
    }
    Some(crate::CtKey {
        src_addr_be: rd32(w, INNER_OFF + 16),
        dst_addr_be: rd32(w, INNER_OFF + 12),
        src_port_be: rd16(w, INNER_PORTS + 2),
        dst_port_be: rd16(w, INNER_PORTS),
        proto: inner_proto,
        _pad: [0; 3],
    })
}

/// Translates an ICMP error like a packet of the flow it travels in, whose rewrite is
/// (new source, new destination): the quoted packet, going the other way, gets them
/// swapped; the outer destination becomes the new destination, and the outer source the
/// new source when the error came from the flow's endpoint itself (a router's address is
/// kept). The outer, quoted-IPv4 and ICMP checksums are updated; the quoted transport
/// checksum is left as it is (stacks do not verify it, and it is often not quoted).
#[inline(always)]
pub fn translate_error(
    w: &mut [u8; ERROR_WINDOW],
    new_src_addr_be: u32,
    new_src_port_be: u16,
    new_dst_addr_be: u32,
    new_dst_port_be: u16,
) {
    use crate::checksum::{replace_u16, replace_u32};
    let (in_src, in_dst) = (rd32(w, INNER_OFF + 12), rd32(w, INNER_OFF + 16));
    let (in_sport, in_dport) = (rd16(w, INNER_PORTS), rd16(w, INNER_PORTS + 2));
    let old_inner_check = rd16(w, INNER_OFF + 10);
    let mut inner_check = replace_u32(old_inner_check, in_src, new_dst_addr_be);
    inner_check = replace_u32(inner_check, in_dst, new_src_addr_be);
    let mut icmp_check = rd16(w, ICMP_OFF + 2);
    icmp_check = replace_u32(icmp_check, in_src, new_dst_addr_be);
    icmp_check = replace_u32(icmp_check, in_dst, new_src_addr_be);
    icmp_check = replace_u16(icmp_check, in_sport, new_dst_port_be);
    icmp_check = replace_u16(icmp_check, in_dport, new_src_port_be);
    icmp_check = replace_u16(icmp_check, old_inner_check, inner_check);
    wr32(w, INNER_OFF + 12, new_dst_addr_be);
    wr32(w, INNER_OFF + 16, new_src_addr_be);
    wr16(w, INNER_PORTS, new_dst_port_be);
    wr16(w, INNER_PORTS + 2, new_src_port_be);
    wr16(w, INNER_OFF + 10, inner_check);
    wr16(w, ICMP_OFF + 2, icmp_check);

    let (out_src, out_dst) = (rd32(w, 12), rd32(w, 16));
    let new_out_src = if out_src == in_dst { new_src_addr_be } else { out_src };
    let mut outer_check = replace_u32(rd16(w, 10), out_src, new_out_src);
    outer_check = replace_u32(outer_check, out_dst, new_dst_addr_be);
    wr32(w, 12, new_out_src);
    wr32(w, 16, new_dst_addr_be);
    wr16(w, 10, outer_check);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::checksum;

    #[test]
    fn port_unreachable_answer_is_well_formed() {
        let macs = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2];
        let mut frame = [0xeeu8; ANSWER_LEN];
        let quote = &mut frame[HEADERS_LEN..];
        quote.fill(0);
        quote[0] = 0x45;
        quote[9] = crate::IPPROTO_UDP;
        quote[12..16].copy_from_slice(&[192, 168, 1, 10]); // client
        quote[16..20].copy_from_slice(&[10, 96, 0, 20]); // frontend
        quote[20..28].copy_from_slice(&[0x9c, 0x40, 0x00, 0x35, 0, 8, 0, 0]);
        let original_quote: [u8; QUOTE_LEN] = frame[HEADERS_LEN..].try_into().unwrap();
        write_unreachable(&mut frame, macs, PORT_UNREACHABLE, 0);
        assert_eq!(&frame[0..6], &[2; 6]);
        assert_eq!(&frame[6..12], &[1; 6]);
        assert_eq!(&frame[14 + 12..14 + 16], &[10, 96, 0, 20]);
        assert_eq!(&frame[14 + 16..14 + 20], &[192, 168, 1, 10]);
        assert_eq!(checksum(&frame[14..34], 0), 0, "IPv4 header checksum verifies");
        assert_eq!(checksum(&frame[34..], 0), 0, "ICMP checksum verifies");
        assert_eq!((frame[34], frame[35]), (3, 3));
        assert_eq!(&frame[HEADERS_LEN..], &original_quote, "the quote is untouched");
        assert_eq!(u16::from_be_bytes([frame[16], frame[17]]) as usize, ANSWER_LEN - ETH_LEN);
        write_unreachable(&mut frame, macs, FRAG_NEEDED, 1400);
        assert_eq!(&frame[34..36], &[3, 4]);
        assert_eq!(u16::from_be_bytes([frame[40], frame[41]]), 1400, "next-hop MTU");
        assert_eq!(checksum(&frame[34..], 0), 0, "ICMP checksum verifies");
    }

    /// An ICMP error from `from` to `to` quoting a UDP packet src -> dst.
    fn error(
        kind: (u8, u8),
        from: [u8; 4],
        to: [u8; 4],
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
    ) -> [u8; ERROR_WINDOW] {
        let mut w = [0u8; ERROR_WINDOW];
        w[0] = 0x45;
        w[2..4].copy_from_slice(&(ERROR_WINDOW as u16).to_be_bytes());
        w[8] = 64;
        w[9] = crate::IPPROTO_ICMP;
        w[12..16].copy_from_slice(&from);
        w[16..20].copy_from_slice(&to);
        let c = checksum(&w[..20], 0);
        w[10..12].copy_from_slice(&c.to_be_bytes());
        w[20] = kind.0;
        w[21] = kind.1;
        let inner = INNER_OFF;
        w[inner] = 0x45;
        w[inner + 2..inner + 4].copy_from_slice(&40u16.to_be_bytes());
        w[inner + 8] = 63;
        w[inner + 9] = crate::IPPROTO_UDP;
        w[inner + 12..inner + 16].copy_from_slice(&src.0);
        w[inner + 16..inner + 20].copy_from_slice(&dst.0);
        let c = checksum(&w[inner..inner + 20], 0);
        w[inner + 10..inner + 12].copy_from_slice(&c.to_be_bytes());
        w[INNER_PORTS..INNER_PORTS + 2].copy_from_slice(&src.1.to_be_bytes());
        w[INNER_PORTS + 2..INNER_PORTS + 4].copy_from_slice(&dst.1.to_be_bytes());
        let c = checksum(&w[ICMP_OFF..], 0);
        w[ICMP_OFF + 2..ICMP_OFF + 4].copy_from_slice(&c.to_be_bytes());
        w
    }

    const NODE: [u8; 4] = [192, 168, 50, 10];
    const CLIENT: [u8; 4] = [192, 168, 50, 100];
    const POD: [u8; 4] = [10, 244, 2, 10];

    fn be(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[test]
    fn port_unreachable_from_a_snated_backend_goes_back_to_the_client() {
        // We sent NODE:40000 -> POD:8080 (the client's CLIENT:5555 -> NODE:30080, SNATed).
        let mut w = error((3, 3), POD, NODE, (NODE, 40000), (POD, 8080));
        let key = error_flow(&w).expect("an error about a UDP flow");
        assert_eq!((key.src_addr_be, key.dst_addr_be), (be(POD), be(NODE)));
        assert_eq!((u16::from_be(key.src_port_be), u16::from_be(key.dst_port_be)), (8080, 40000));
        // The reply direction's rewrite: source -> NODE:30080, destination -> CLIENT:5555.
        translate_error(&mut w, be(NODE), 30080u16.to_be(), be(CLIENT), 5555u16.to_be());
        let expected = error((3, 3), NODE, CLIENT, (CLIENT, 5555), (NODE, 30080));
        assert_eq!(w, expected, "bytes equal an error built from scratch");
    }

    #[test]
    fn an_error_from_a_router_keeps_the_router_as_source() {
        let router = [10, 244, 2, 1];
        let mut w = error((3, 4), router, NODE, (NODE, 40000), (POD, 8080));
        translate_error(&mut w, be(NODE), 30080u16.to_be(), be(CLIENT), 5555u16.to_be());
        assert_eq!(&w[12..16], &router);
        assert_eq!(&w[16..20], &CLIENT);
        assert_eq!(checksum(&w[..20], 0), 0);
        assert_eq!(checksum(&w[ICMP_OFF..], 0), 0);
        assert_eq!(checksum(&w[INNER_OFF..INNER_PORTS], 0), 0);
    }

    #[test]
    fn non_errors_and_errors_about_other_protocols_are_not_translated() {
        let mut echo = error((8, 0), POD, NODE, (NODE, 1), (POD, 2));
        assert!(error_flow(&echo).is_none(), "echo request");
        echo[ICMP_OFF] = 3;
        echo[INNER_OFF + 9] = crate::IPPROTO_ICMP;
        assert!(error_flow(&echo).is_none(), "error about ICMP");
    }

    #[test]
    fn an_error_shorter_than_the_window_is_not_read_past_its_end() {
        let mut w = error((3, 3), POD, NODE, (NODE, 1), (POD, 2));
        assert!(error_flow(&w).is_some());
        // Ends after the quoted IPv4 header: the ports would be read from what follows.
        w[2..4].copy_from_slice(&((ERROR_WINDOW - 4) as u16).to_be_bytes());
        assert!(error_flow(&w).is_none());
    }
}
