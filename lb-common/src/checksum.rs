//! Internet checksum arithmetic (RFC 1071) and incremental update (RFC 1624, eqn. 3).
//!
//! Values are taken exactly as they sit in packet memory (read as native integers from
//! network-order bytes). One's complement sums do not depend on byte order as long as the
//! checksum field is read and written the same way, so no swapping is needed.

/// Folds a 32-bit one's complement accumulator into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// HC' = ~(~HC + ~m + m') for one 16-bit word.
#[inline(always)]
pub fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + (new as u32);
    !fold(sum)
}

/// The same for a 32-bit field (an IPv4 address): two 16-bit words.
#[inline(always)]
pub fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check as u32) + (!(old as u16) as u32) + (!((old >> 16) as u16) as u32) + (new & 0xffff) + (new >> 16);
    !fold(sum)
}

/// UDP over IPv4 may carry no checksum (0); an updated one that computes to 0 is sent as
/// 0xffff (RFC 768).
#[inline(always)]
pub fn udp_replace_u32(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace_u32(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

#[inline(always)]
pub fn udp_replace_u16(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace_u16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// Does an L4 checksum field hold only the pseudo-header sum, as a stack leaves it for
/// checksum offload (CHECKSUM_PARTIAL: the device, or whoever sends it on, adds the rest)?
/// Values as read from packet memory. A complete checksum matches by chance once in 65536:
/// callers may only use this to choose a slower path that is right either way.
#[inline(always)]
pub fn looks_partial(check: u16, src_addr: u32, dst_addr: u32, proto: u8, l4_len: u16) -> bool {
    let sum = (src_addr & 0xffff)
        + (src_addr >> 16)
        + (dst_addr & 0xffff)
        + (dst_addr >> 16)
        + u16::from_ne_bytes([0, proto]) as u32
        + l4_len.to_be() as u32;
    check != 0 && check == fold(sum)
}

/// Full checksum of `bytes` (big-endian words), starting from `initial`: the value to
/// store, in host order. Used to build fresh headers and in tests.
pub fn checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    // An IPv4 header from RFC 1071-style worked examples, checksum 0xb1e6.
    const IP: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
        0x00, 0xc7,
    ];

    #[test]
    fn full_checksum_of_known_header() {
        let mut h = IP;
        h[10] = 0;
        h[11] = 0;
        assert_eq!(checksum(&h, 0), 0xb861);
        assert_eq!(checksum(&IP, 0), 0, "a header including its checksum sums to zero");
    }

    /// Incremental update must equal recomputation, for fields read natively from memory.
    #[test]
    fn incremental_address_update_matches_recompute() {
        let mut h = IP;
        let old = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
        let new_bytes = [10, 96, 0, 10];
        let new = u32::from_ne_bytes(new_bytes);
        let check = u16::from_ne_bytes([h[10], h[11]]);
        let updated = replace_u32(check, old, new);
        h[16..20].copy_from_slice(&new_bytes);
        h[10..12].copy_from_slice(&updated.to_ne_bytes());
        let mut zeroed = h;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(u16::from_be_bytes([h[10], h[11]]), checksum(&zeroed, 0));
    }

    #[test]
    fn incremental_port_update_matches_recompute() {
        // words: a "header" of 4 words with checksum at word 2
        let mut w: [u8; 8] = [0x12, 0x34, 0x1f, 0x90, 0, 0, 0xab, 0xcd];
        let c = checksum(&w, 0);
        w[4..6].copy_from_slice(&c.to_be_bytes());
        let old = u16::from_ne_bytes([w[2], w[3]]);
        let new = u16::from_ne_bytes(30080u16.to_be_bytes());
        let updated = replace_u16(u16::from_ne_bytes([w[4], w[5]]), old, new);
        w[2..4].copy_from_slice(&30080u16.to_be_bytes());
        w[4..6].copy_from_slice(&updated.to_ne_bytes());
        assert_eq!(checksum(&w, 0), 0);
    }

    #[test]
    fn a_partial_checksum_is_recognised() {
        // 10.0.0.1 -> 10.0.0.2, TCP, 20 bytes: what Linux writes for CHECKSUM_PARTIAL.
        let (src, dst) = ([10u8, 0, 0, 1], [10u8, 0, 0, 2]);
        let pseudo = [src.as_slice(), &dst, &[0, 6], &20u16.to_be_bytes()].concat();
        let partial = !checksum(&pseudo, 0);
        let read = u16::from_ne_bytes(partial.to_be_bytes());
        assert!(looks_partial(read, u32::from_ne_bytes(src), u32::from_ne_bytes(dst), 6, 20));
        assert!(!looks_partial(read ^ 1, u32::from_ne_bytes(src), u32::from_ne_bytes(dst), 6, 20));
        assert!(!looks_partial(read, u32::from_ne_bytes(src), u32::from_ne_bytes(dst), 6, 21));
    }

    #[test]
    fn udp_zero_checksum_is_kept_and_zero_result_becomes_ffff() {
        assert_eq!(udp_replace_u32(0, 1, 2), 0);
        assert_eq!(udp_replace_u16(0, 1, 2), 0);
        // Choose values so the regular update yields 0: ~(~c + ~old + new) == 0
        let c = replace_u16(0xffff, 0x0000, 0x0000);
        assert_eq!(c, 0);
        assert_eq!(udp_replace_u16(0xffff, 0x0000, 0x0000), 0xffff);
    }
}
