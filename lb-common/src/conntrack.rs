//! Connection tracking states, their transitions and timeouts: pure, shared by the kernel
//! programs and the agent (which shows and ages entries).

/// State of one conntrack entry, stored as u8 in `CtValue::state`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// TCP: SYN seen, no answer yet. UDP: no reply yet.
    New = 0,
    /// TCP: the other side answered. UDP: a reply was seen.
    Established = 1,
    /// TCP: a FIN was seen.
    Closing = 2,
    /// TCP: a RST was seen.
    Reset = 3,
}

impl State {
    #[inline(always)]
    pub fn from_u8(v: u8) -> State {
        match v {
            1 => State::Established,
            2 => State::Closing,
            3 => State::Reset,
            _ => State::New,
        }
    }
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const SEC: u64 = 1_000_000_000;

/// How long an entry lives after its last packet, by protocol and state. TCP values follow
/// what kube-proxy configures for netfilter (established 24h, close-wait 1h is shortened to
/// the FIN timeout here so that closed flows release their NAT ports quickly).
#[inline(always)]
pub fn timeout_ns(proto: u8, state: State) -> u64 {
    if proto == crate::IPPROTO_TCP {
        match state {
            State::New => 60 * SEC,
            State::Established => 86_400 * SEC,
            State::Closing => 120 * SEC,
            State::Reset => 10 * SEC,
        }
    } else {
        match state {
            State::New => 30 * SEC,
            _ => 120 * SEC,
        }
    }
}

/// The next state after a packet. `reply` is true when the packet travels backend -> client.
/// `tcp_flags` is the TCP flags byte (0 for UDP).
#[inline(always)]
pub fn next_state(proto: u8, state: State, tcp_flags: u8, reply: bool) -> State {
    if proto != crate::IPPROTO_TCP {
        return if reply { State::Established } else { state };
    }
    if tcp_flags & TCP_RST != 0 {
        return State::Reset;
    }
    if tcp_flags & TCP_FIN != 0 {
        return if state == State::Reset { State::Reset } else { State::Closing };
    }
    match state {
        State::New if reply && tcp_flags & TCP_ACK != 0 => State::Established,
        // A fresh SYN on a flow that was torn down starts it over (port reuse by the client).
        State::Reset | State::Closing if !reply && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN => State::New,
        s => s,
    }
}

/// Has an entry last seen at `last_seen_ns` expired at `now_ns`?
#[inline(always)]
pub fn expired(proto: u8, state: State, last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) > timeout_ns(proto, state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IPPROTO_TCP as TCP, IPPROTO_UDP as UDP};

    #[test]
    fn tcp_handshake_then_close() {
        let s = State::New;
        let s = next_state(TCP, s, TCP_SYN, false);
        assert_eq!(s, State::New);
        let s = next_state(TCP, s, TCP_SYN | TCP_ACK, true);
        assert_eq!(s, State::Established);
        let s = next_state(TCP, s, TCP_ACK, false);
        assert_eq!(s, State::Established);
        let s = next_state(TCP, s, TCP_FIN | TCP_ACK, false);
        assert_eq!(s, State::Closing);
        let s = next_state(TCP, s, TCP_ACK, true);
        assert_eq!(s, State::Closing);
        assert_eq!(next_state(TCP, s, TCP_RST, true), State::Reset);
    }

    #[test]
    fn syn_without_answer_does_not_establish() {
        assert_eq!(next_state(TCP, State::New, TCP_SYN, false), State::New);
        assert_eq!(next_state(TCP, State::New, TCP_ACK, false), State::New);
    }

    #[test]
    fn new_syn_restarts_a_closed_flow() {
        assert_eq!(next_state(TCP, State::Reset, TCP_SYN, false), State::New);
        assert_eq!(next_state(TCP, State::Closing, TCP_SYN, false), State::New);
        assert_eq!(next_state(TCP, State::Closing, TCP_SYN | TCP_ACK, true), State::Closing);
    }

    #[test]
    fn udp_establishes_on_reply() {
        assert_eq!(next_state(UDP, State::New, 0, false), State::New);
        assert_eq!(next_state(UDP, State::New, 0, true), State::Established);
    }

    #[test]
    fn timeouts_by_state() {
        assert!(timeout_ns(TCP, State::Reset) < timeout_ns(TCP, State::Closing));
        assert!(timeout_ns(TCP, State::Closing) < timeout_ns(TCP, State::Established));
        assert!(timeout_ns(UDP, State::New) < timeout_ns(UDP, State::Established));
        let t = timeout_ns(TCP, State::Reset);
        assert!(!expired(TCP, State::Reset, 100, 100 + t));
        assert!(expired(TCP, State::Reset, 100, 101 + t));
    }
}
