//! Connection tracking, pure: the flow's state bits and their transitions, timeouts, and
//! the stamp that binds a flow's two halves. Shared by the kernel programs and the agent.
//!
//! # One flow, two halves
//! A translated flow has two LB_CONNTRACK entries, one per direction, each keyed by the
//! packets as they arrive. Both carry the same `stamp`: a random nonce (high 32 bits) and
//! the coarse time of the flow's last refresh (low 32 bits). The rules:
//! - Entries are inserted only with BPF_NOEXIST: a new flow never overwrites another's.
//! - A refresh moves both halves' stamps forward by compare-and-swap, own half first; a
//!   half whose peer no longer carries its nonce is gone, and so is its flow.
//! - An entry is removed only by whoever wins a compare-and-swap of its stamp to
//!   [`DEAD`] (the datapath, or the reaper program the agent runs), and the winner also
//!   removes the peer the same way. So each half, and the NAT port a reply half's key
//!   holds, is freed exactly once, and never while the other half lives.
//! - Both halves expire together: same state bits, same stamp time.
//! - The kernel reuses a removed element for another entry at once, while a program on
//!   another CPU may still read it. A half is inserted with nonce 0 and gets its nonce by a
//!   swap once whole; it holds its own key (`CtValue::key`); a reader checks the key, reads,
//!   and checks the nonce again, and takes a mismatch for no entry.
//!
//! Time is `bpf_ktime_get_coarse_ns() >> UNIT_SHIFT` (CLOCK_MONOTONIC_COARSE) in 32 bits,
//! compared with wrapping arithmetic: it wraps after 52 days, far beyond any timeout, and
//! the agent sweeps expired entries within seconds.

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// One time unit is 2^20 ns (about 1.05 ms).
pub const UNIT_SHIFT: u32 = 20;

/// Coarse nanoseconds to time units.
#[inline(always)]
pub const fn units(ns: u64) -> u32 {
    (ns >> UNIT_SHIFT) as u32
}

/// Seconds to time units.
pub const fn secs(s: u64) -> u32 {
    ((s * 1_000_000_000) >> UNIT_SHIFT) as u32
}

/// A stamp whose nonce is 0: the half is being removed.
pub const DEAD: u64 = 0;

/// How old a stamp may grow before a packet refreshes it (and its peer's): the only
/// routine conntrack writes, so that busy flows do not write on every packet. Timeouts are
/// therefore exact to about this much.
pub const REFRESH: u32 = secs(1);

#[inline(always)]
pub const fn stamp(nonce: u32, time: u32) -> u64 {
    (nonce as u64) << 32 | time as u64
}

#[inline(always)]
pub const fn nonce(stamp: u64) -> u32 {
    (stamp >> 32) as u32
}

#[inline(always)]
pub const fn time(stamp: u64) -> u32 {
    stamp as u32
}

/// Units since the stamp's time; a stamp from a CPU whose coarse clock ran ahead counts as 0.
#[inline(always)]
pub const fn age(stamp: u64, now: u32) -> u32 {
    let d = now.wrapping_sub(time(stamp));
    if (d as i32) < 0 {
        0
    } else {
        d
    }
}

/// `CtValue::state`: what the flow has seen, the same in both halves.
pub mod bits {
    /// The reply direction answered (TCP: an ACK, the SYN-ACK included; UDP: any datagram).
    pub const ESTABLISHED: u32 = 1 << 0;
    pub const FIN_ORIG: u32 = 1 << 1;
    pub const FIN_REPLY: u32 = 1 << 2;
    /// A reset was seen and the flow has not shown since that it lives on.
    pub const RST: u32 = 1 << 3;
    /// Since the reset, a packet other than a reset went this way: a flow whose both
    /// directions carry on after an unvalidated reset is alive, and RST is cleared.
    pub const SEEN_ORIG: u32 = 1 << 4;
    pub const SEEN_REPLY: u32 = 1 << 5;
    /// Forward half only: the flow counts in its backend's live flows. Whoever clears it
    /// (atomically: at the flow's close, or at its removal) takes the flow off the count,
    /// so it is counted down exactly once.
    pub const LIVE: u32 = 1 << 6;
}

/// The phase a flow's bits put it in, which sets its timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// TCP: SYN sent, no answer. UDP: no reply yet.
    New,
    Established,
    /// TCP: one direction sent FIN (half-closed flows may still carry data).
    Closing,
    /// TCP: both directions sent FIN, or a reset was seen.
    Closed,
}

#[inline(always)]
pub const fn phase(state: u32) -> Phase {
    if state & bits::RST != 0 || state & (bits::FIN_ORIG | bits::FIN_REPLY) == bits::FIN_ORIG | bits::FIN_REPLY {
        Phase::Closed
    } else if state & (bits::FIN_ORIG | bits::FIN_REPLY) != 0 {
        Phase::Closing
    } else if state & bits::ESTABLISHED != 0 {
        Phase::Established
    } else {
        Phase::New
    }
}

/// How long a flow lives after its last refresh. Unanswered flows and closing ones go
/// fast (a flood of new flows frees its room quickly, and a closed flow's NAT port comes
/// back in seconds, as Cilium's close timeout); established TCP keeps kube-proxy's
/// netfilter setting (24 h), established UDP netfilter's stream timeout.
#[inline(always)]
pub const fn timeout(proto: u8, phase: Phase) -> u32 {
    let tcp = proto == crate::IPPROTO_TCP;
    match phase {
        Phase::New if tcp => secs(10),
        Phase::New => secs(30),
        Phase::Established if tcp => secs(86_400),
        Phase::Established => secs(120),
        Phase::Closing => secs(60),
        Phase::Closed => secs(10),
    }
}

/// Is a half with this stamp and state alive at `now`?
#[inline(always)]
pub const fn alive(proto: u8, state: u32, stamp: u64, now: u32) -> bool {
    nonce(stamp) != 0 && age(stamp, now) <= timeout(proto, phase(state))
}

/// Does this packet start a flow where none is tracked? Only a TCP SYN (without ACK) or
/// any UDP datagram: a bare ACK, a FIN or a reset never take a NAT port or an entry.
#[inline(always)]
pub const fn starts_flow(proto: u8, tcp_flags: u8) -> bool {
    proto != crate::IPPROTO_TCP || tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// Is this packet a new connection reusing a closing or closed flow's tuple? In the original
/// direction, a fresh SYN: it chooses its backend again. In the reply direction, a SYN (a
/// SYN-ACK): the backend answers a connection made to it directly (or through the socket
/// hooks) from the same client port, which the old flow must not disguise as the Service's
/// answer; the old flow goes and the packet passes as it is.
#[inline(always)]
pub const fn restarts(proto: u8, state: u32, tcp_flags: u8, reply: bool) -> bool {
    let new_connection = if reply {
        tcp_flags & (TCP_SYN | TCP_RST) == TCP_SYN
    } else {
        tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    };
    proto == crate::IPPROTO_TCP && new_connection && matches!(phase(state), Phase::Closing | Phase::Closed)
}

/// Does a packet in this direction refresh the stamp once it has aged? Not a SYN of an
/// unanswered TCP flow (so a flow whose backend never answers expires, and the client's
/// next retransmission chooses again), and nothing in a closed flow (so an unvalidated
/// reset kills a flow only if the flow does not carry on both ways, see `bits::SEEN_*`).
#[inline(always)]
pub const fn refreshes(proto: u8, state: u32, reply: bool) -> bool {
    match phase(state) {
        Phase::New => reply || proto != crate::IPPROTO_TCP,
        Phase::Closed => false,
        _ => true,
    }
}

/// The state bits after a packet. `reply` is true for packets of the reply direction
/// (backend -> client); `tcp_flags` is 0 for UDP.
#[inline(always)]
pub const fn next_state(proto: u8, state: u32, tcp_flags: u8, reply: bool) -> u32 {
    if proto != crate::IPPROTO_TCP {
        return if reply { state | bits::ESTABLISHED } else { state };
    }
    let mut s = state;
    if tcp_flags & TCP_RST != 0 {
        return (s | bits::RST) & !(bits::SEEN_ORIG | bits::SEEN_REPLY);
    }
    if s & bits::RST != 0 {
        s |= if reply { bits::SEEN_REPLY } else { bits::SEEN_ORIG };
        if s & (bits::SEEN_ORIG | bits::SEEN_REPLY) == bits::SEEN_ORIG | bits::SEEN_REPLY {
            s &= !(bits::RST | bits::SEEN_ORIG | bits::SEEN_REPLY);
        }
    }
    if reply && tcp_flags & TCP_ACK != 0 {
        s |= bits::ESTABLISHED;
    }
    if tcp_flags & TCP_FIN != 0 {
        s |= if reply { bits::FIN_REPLY } else { bits::FIN_ORIG };
    }
    s
}

/// A flow's state as people read it (CLI, logs).
pub const fn phase_name(proto: u8, state: u32) -> &'static str {
    match phase(state) {
        Phase::New if proto == crate::IPPROTO_TCP => "syn-sent",
        Phase::New => "unreplied",
        Phase::Established => "established",
        Phase::Closing => "closing",
        Phase::Closed if state & bits::RST != 0 => "reset",
        Phase::Closed => "closed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IPPROTO_TCP as TCP, IPPROTO_UDP as UDP};

    fn run(start: u32, packets: &[(u8, bool)]) -> u32 {
        packets.iter().fold(start, |s, (flags, reply)| next_state(TCP, s, *flags, *reply))
    }

    #[test]
    fn tcp_handshake_then_close_from_both_sides() {
        let s = next_state(TCP, 0, TCP_SYN, false);
        assert_eq!(phase(s), Phase::New);
        let s = next_state(TCP, s, TCP_SYN | TCP_ACK, true);
        assert_eq!(phase(s), Phase::Established);
        let s = run(s, &[(TCP_ACK, false), (TCP_ACK, true)]);
        assert_eq!(phase(s), Phase::Established);
        let s = next_state(TCP, s, TCP_FIN | TCP_ACK, false);
        assert_eq!(phase(s), Phase::Closing, "half-closed");
        let s = next_state(TCP, s, TCP_ACK, true);
        assert_eq!(phase(s), Phase::Closing, "the other side may still send");
        let s = next_state(TCP, s, TCP_FIN | TCP_ACK, true);
        assert_eq!(phase(s), Phase::Closed);
    }

    #[test]
    fn only_a_syn_or_a_udp_datagram_starts_a_flow() {
        assert!(starts_flow(TCP, TCP_SYN));
        for flags in [TCP_ACK, TCP_SYN | TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST, TCP_SYN | TCP_RST, TCP_SYN | TCP_FIN, 0] {
            assert!(!starts_flow(TCP, flags), "flags {flags:#x}");
        }
        assert!(starts_flow(UDP, 0));
    }

    #[test]
    fn a_fresh_syn_restarts_only_a_closing_or_closed_flow() {
        let established = bits::ESTABLISHED;
        assert!(!restarts(TCP, established, TCP_SYN, false), "a retransmitted SYN keeps its flow");
        assert!(!restarts(TCP, 0, TCP_SYN, false));
        assert!(restarts(TCP, established | bits::FIN_ORIG, TCP_SYN, false));
        assert!(restarts(TCP, established | bits::RST, TCP_SYN, false));
        assert!(!restarts(TCP, established | bits::RST, TCP_SYN | TCP_ACK, false));
        assert!(!restarts(UDP, bits::RST, 0, false));
    }

    #[test]
    fn a_syn_ack_from_the_backend_ends_only_a_closing_or_closed_flow() {
        let established = bits::ESTABLISHED;
        let closed = established | bits::FIN_ORIG | bits::FIN_REPLY;
        assert!(!restarts(TCP, 0, TCP_SYN | TCP_ACK, true), "the flow's own SYN-ACK");
        assert!(!restarts(TCP, established, TCP_SYN | TCP_ACK, true), "a retransmitted SYN-ACK");
        assert!(restarts(TCP, closed, TCP_SYN | TCP_ACK, true), "another connection's SYN-ACK");
        assert!(restarts(TCP, established | bits::FIN_REPLY, TCP_SYN | TCP_ACK, true));
        assert!(restarts(TCP, established | bits::RST, TCP_SYN | TCP_ACK, true));
        assert!(!restarts(TCP, closed, TCP_ACK, true), "the old connection's last ACK");
        assert!(!restarts(TCP, closed, TCP_FIN | TCP_ACK, true), "a retransmitted FIN");
    }

    #[test]
    fn an_unvalidated_reset_closes_unless_both_directions_carry_on() {
        let s = next_state(TCP, bits::ESTABLISHED, TCP_RST, false);
        assert_eq!(phase(s), Phase::Closed);
        assert!(!refreshes(TCP, s, false) && !refreshes(TCP, s, true), "a reset cannot pin the flow");
        let one_way = next_state(TCP, s, TCP_ACK, false);
        assert_eq!(phase(one_way), Phase::Closed, "one side carrying on is not enough");
        let again = next_state(TCP, one_way, TCP_RST, true);
        assert_eq!(phase(again), Phase::Closed);
        assert_eq!(again & (bits::SEEN_ORIG | bits::SEEN_REPLY), 0, "another reset starts the count over");
        let revived = run(s, &[(TCP_ACK, false), (TCP_ACK, true)]);
        assert_eq!(phase(revived), Phase::Established, "both directions carried on: the reset was bogus");
        assert_eq!(revived, bits::ESTABLISHED);
    }

    #[test]
    fn unanswered_syns_do_not_keep_their_flow_alive() {
        assert!(!refreshes(TCP, 0, false), "a retransmitted SYN");
        assert!(refreshes(TCP, 0, true));
        assert!(refreshes(UDP, 0, false), "a one-way UDP stream keeps its flow");
        assert!(refreshes(TCP, bits::ESTABLISHED | bits::FIN_ORIG, false), "half-closed flows carry data");
    }

    #[test]
    fn udp_establishes_on_reply() {
        assert_eq!(next_state(UDP, 0, 0, false), 0);
        assert_eq!(phase(next_state(UDP, 0, 0, true)), Phase::Established);
    }

    #[test]
    fn timeouts_by_phase() {
        assert!(timeout(TCP, Phase::Closed) < timeout(TCP, Phase::Closing));
        assert!(timeout(TCP, Phase::Closing) < timeout(TCP, Phase::Established));
        assert!(timeout(TCP, Phase::New) < timeout(UDP, Phase::New));
        assert!(timeout(UDP, Phase::New) < timeout(UDP, Phase::Established));
        assert_eq!(secs(1), 953);
    }

    #[test]
    fn stamps_age_with_wrapping_time_and_die_with_nonce_zero() {
        let s = stamp(7, u32::MAX - 10);
        assert_eq!((nonce(s), time(s)), (7, u32::MAX - 10));
        assert_eq!(age(s, 5), 16, "wraps");
        assert_eq!(age(stamp(7, 100), 90), 0, "a stamp ahead of the clock is fresh");
        let t = timeout(TCP, Phase::Closed);
        assert!(alive(TCP, bits::RST, stamp(1, 100), 100 + t));
        assert!(!alive(TCP, bits::RST, stamp(1, 100), 101 + t));
        assert!(!alive(TCP, 0, stamp(0, 100), 100), "a DEAD stamp");
    }
}
