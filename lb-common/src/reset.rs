//! TCP resets the datapath answers with, built in place over the offending frame's first
//! [`RESET_LEN`] bytes, as RFC 793 says a closed port answers: to a segment with ACK,
//! <SEQ=SEG.ACK><CTL=RST>; to one without, <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>.

use crate::{checksum::checksum, conntrack, icmp::ETH_LEN as ETH, IPPROTO_TCP};

/// Ethernet + IPv4 + TCP headers, no options.
pub const RESET_LEN: usize = ETH + 20 + 20;

/// Rewrites `frame` (the offending frame's Ethernet, IPv4 and first 20 TCP bytes) into the
/// reset answering it: MACs, addresses and ports swapped. `segment_len` is the offending
/// segment's TCP payload length.
#[inline(always)]
pub fn write_reset(frame: &mut [u8; RESET_LEN], segment_len: u16) {
    let ip = ETH;
    let tcp = ETH + 20;
    for i in 0..6 {
        frame.swap(i, 6 + i);
    }
    for i in 0..4 {
        frame.swap(ip + 12 + i, ip + 16 + i);
    }
    for i in 0..2 {
        frame.swap(tcp + i, tcp + 2 + i);
    }
    let flags = frame[tcp + 13];
    let seq = u32::from_be_bytes([frame[tcp + 4], frame[tcp + 5], frame[tcp + 6], frame[tcp + 7]]);
    let ack = u32::from_be_bytes([frame[tcp + 8], frame[tcp + 9], frame[tcp + 10], frame[tcp + 11]]);
    let (new_seq, new_ack, new_flags) = if flags & conntrack::TCP_ACK != 0 {
        (ack, 0, conntrack::TCP_RST)
    } else {
        let syn_fin = (flags & conntrack::TCP_SYN != 0) as u32 + (flags & conntrack::TCP_FIN != 0) as u32;
        (0, seq.wrapping_add(segment_len as u32).wrapping_add(syn_fin), conntrack::TCP_RST | conntrack::TCP_ACK)
    };
    frame[tcp + 4..tcp + 8].copy_from_slice(&new_seq.to_be_bytes());
    frame[tcp + 8..tcp + 12].copy_from_slice(&new_ack.to_be_bytes());
    frame[tcp + 12] = 5 << 4;
    frame[tcp + 13] = new_flags;
    frame[tcp + 14..tcp + 20].copy_from_slice(&[0; 6]);
    // IPv4: no options, 40 bytes, a fresh TTL, id 0, DF.
    frame[ip] = 0x45;
    frame[ip + 1] = 0;
    frame[ip + 2..ip + 8].copy_from_slice(&[0, 40, 0, 0, 0x40, 0]);
    frame[ip + 8] = 64;
    frame[ip + 9] = IPPROTO_TCP;
    frame[ip + 10] = 0;
    frame[ip + 11] = 0;
    let c = checksum(&frame[ip..ip + 20], 0);
    frame[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    // Pseudo-header: addresses, protocol, TCP length.
    let mut pseudo = IPPROTO_TCP as u32 + 20;
    for i in (ip + 12..ip + 20).step_by(2) {
        pseudo += u16::from_be_bytes([frame[i], frame[i + 1]]) as u32;
    }
    let c = checksum(&frame[tcp..tcp + 20], pseudo);
    frame[tcp + 16..tcp + 18].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(flags: u8, seq: u32, ack: u32) -> [u8; RESET_LEN] {
        let mut f = [0u8; RESET_LEN];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12] = 0x08;
        f[14] = 0x45;
        f[14 + 9] = IPPROTO_TCP;
        f[26..30].copy_from_slice(&[192, 168, 50, 100]);
        f[30..34].copy_from_slice(&[192, 168, 50, 10]);
        f[34..36].copy_from_slice(&5555u16.to_be_bytes());
        f[36..38].copy_from_slice(&30080u16.to_be_bytes());
        f[38..42].copy_from_slice(&seq.to_be_bytes());
        f[42..46].copy_from_slice(&ack.to_be_bytes());
        f[46] = 8 << 4;
        f[47] = flags;
        f
    }

    fn verify(f: &[u8; RESET_LEN]) {
        assert_eq!(checksum(&f[14..34], 0), 0, "IPv4 checksum");
        let mut pseudo = IPPROTO_TCP as u32 + 20;
        for i in (26..34).step_by(2) {
            pseudo += u16::from_be_bytes([f[i], f[i + 1]]) as u32;
        }
        assert_eq!(checksum(&f[34..54], pseudo), 0, "TCP checksum");
    }

    #[test]
    fn an_ack_is_answered_with_its_ack_number_as_sequence() {
        let mut f = segment(conntrack::TCP_ACK, 1000, 7777);
        write_reset(&mut f, 100);
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 1], "back to the sender's MAC");
        assert_eq!(&f[26..30], &[192, 168, 50, 10], "from the address it reached");
        assert_eq!(&f[30..34], &[192, 168, 50, 100]);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 30080);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 5555);
        assert_eq!(u32::from_be_bytes([f[38], f[39], f[40], f[41]]), 7777);
        assert_eq!((f[46], f[47]), (5 << 4, conntrack::TCP_RST));
        verify(&f);
    }

    #[test]
    fn a_segment_without_ack_is_acknowledged_with_its_length() {
        let mut f = segment(conntrack::TCP_FIN, u32::MAX - 1, 0);
        write_reset(&mut f, 10);
        assert_eq!(u32::from_be_bytes([f[38], f[39], f[40], f[41]]), 0);
        assert_eq!(u32::from_be_bytes([f[42], f[43], f[44], f[45]]), 9, "seq + 10 + FIN, wrapped");
        assert_eq!(f[47], conntrack::TCP_RST | conntrack::TCP_ACK);
        verify(&f);
    }
}
