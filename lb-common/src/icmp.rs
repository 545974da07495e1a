//! ICMP "port unreachable" answers, built the same way by XDP and tc.
//!
//! The answer is laid out so the datapath only has to grow the packet's head by
//! [`GROW`] bytes and cut it to [`ANSWER_LEN`]: the offending packet's IPv4 header and
//! first 8 payload bytes then already sit where ICMP quotes them (RFC 792).

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
const ICMP_HDR_LEN: usize = 8;
/// The quoted part of the offending packet: its IPv4 header (no options) + 8 bytes.
pub const QUOTE_LEN: usize = IPV4_LEN + 8;
/// Bytes added in front of the offending packet: a new IPv4 header and an ICMP header.
pub const GROW: usize = IPV4_LEN + ICMP_HDR_LEN;
/// Length of the whole answer frame.
pub const ANSWER_LEN: usize = ETH_LEN + IPV4_LEN + ICMP_HDR_LEN + QUOTE_LEN;
/// The new headers written in front of the quote: Ethernet + IPv4 + ICMP.
pub const HEADERS_LEN: usize = ETH_LEN + IPV4_LEN + ICMP_HDR_LEN;

/// Builds the Ethernet, IPv4 and ICMP headers of a port-unreachable answer to the frame
/// whose Ethernet header is `orig_eth` and whose IPv4 header + 8 bytes is `quote`.
/// The answer goes back where the frame came from: MACs and addresses swapped, the
/// source being the address the client tried to reach (the frontend).
#[inline(always)]
pub fn port_unreachable_headers(
    orig_eth: &[u8; ETH_LEN],
    quote: &[u8; QUOTE_LEN],
) -> [u8; HEADERS_LEN] {
    let mut h = [0u8; HEADERS_LEN];
    // Ethernet: dst = original src, src = original dst, same ethertype (IPv4).
    h[0..6].copy_from_slice(&orig_eth[6..12]);
    h[6..12].copy_from_slice(&orig_eth[0..6]);
    h[12] = 0x08;
    h[13] = 0x00;
    let ip = ETH_LEN;
    h[ip] = 0x45;
    h[ip + 1] = 0xc0; // precedence "internetwork control", as Linux sends ICMP errors
    let total = (IPV4_LEN + ICMP_HDR_LEN + QUOTE_LEN) as u16;
    h[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    h[ip + 8] = 64; // TTL
    h[ip + 9] = crate::IPPROTO_ICMP;
    // src = the address the client sent to, dst = the client
    h[ip + 12..ip + 16].copy_from_slice(&quote[16..20]);
    h[ip + 16..ip + 20].copy_from_slice(&quote[12..16]);
    let ip_check = crate::checksum::checksum(&h[ip..ip + IPV4_LEN], 0);
    h[ip + 10..ip + 12].copy_from_slice(&ip_check.to_be_bytes());
    let icmp = ip + IPV4_LEN;
    h[icmp] = 3; // destination unreachable
    h[icmp + 1] = 3; // port unreachable
    let quote_sum = crate::checksum::checksum(quote, 0);
    // The ICMP checksum covers the ICMP header (type/code word, rest zero) and the quote:
    // start from the quote's sum (un-complemented) and add the type/code word.
    let icmp_check = crate::checksum::checksum(&[3, 3], !quote_sum as u32);
    h[icmp + 2..icmp + 4].copy_from_slice(&icmp_check.to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::checksum;

    #[test]
    fn answer_is_well_formed() {
        let eth: [u8; 14] = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0x08, 0x00];
        let mut quote = [0u8; QUOTE_LEN];
        quote[0] = 0x45;
        quote[9] = crate::IPPROTO_UDP;
        quote[12..16].copy_from_slice(&[192, 168, 1, 10]); // client
        quote[16..20].copy_from_slice(&[10, 96, 0, 20]); // frontend
        quote[20..28].copy_from_slice(&[0x9c, 0x40, 0x00, 0x35, 0, 8, 0, 0]);
        let h = port_unreachable_headers(&eth, &quote);
        assert_eq!(&h[0..6], &[2; 6]);
        assert_eq!(&h[6..12], &[1; 6]);
        assert_eq!(&h[14 + 12..14 + 16], &[10, 96, 0, 20]);
        assert_eq!(&h[14 + 16..14 + 20], &[192, 168, 1, 10]);
        assert_eq!(checksum(&h[14..34], 0), 0, "IPv4 header checksum verifies");
        let mut icmp = [0u8; 8 + QUOTE_LEN];
        icmp[..8].copy_from_slice(&h[34..42]);
        icmp[8..].copy_from_slice(&quote);
        assert_eq!(checksum(&icmp, 0), 0, "ICMP checksum verifies");
        assert_eq!((h[34], h[35]), (3, 3));
        assert_eq!(
            u16::from_be_bytes([h[16], h[17]]) as usize,
            ANSWER_LEN - ETH_LEN
        );
    }
}
