//! Indices of LB_COUNTERS, a per-CPU array of [`Counter`]: what happened to packets.

#[repr(C)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident = $idx:literal, $label:literal;)*) => {
        $($(#[$doc])* pub const $name: u32 = $idx;)*
        /// Number of counter slots.
        pub const COUNT: u32 = [$($idx),*].len() as u32;
        /// (index, metric label) of every counter.
        pub const ALL: [(u32, &str); COUNT as usize] = [$(($idx, $label)),*];
    };
}

counters! {
    /// IPv4 packet not for a frontend and not part of a translated flow.
    PASS_NOT_SERVICE = 0, "pass_not_service";
    /// Not IPv4 TCP/UDP/ICMP (ARP, IPv6, other protocols).
    PASS_NOT_IPV4 = 1, "pass_not_ipv4";
    /// IPv4 header with options: passed untranslated (not supported).
    PASS_IP_OPTIONS = 2, "pass_ip_options";
    /// First packet of a flow to a frontend: backend chosen, translated.
    NEW_FLOW = 3, "new_flow";
    /// Packet of a known flow, original direction, translated.
    ESTABLISHED = 4, "established";
    /// Reply of a translated flow, reverse-translated.
    REPLY = 5, "reply";
    /// ICMP error about a translated flow, translated back for the other end.
    ICMP_ERROR_TRANSLATED = 6, "icmp_error_translated";
    /// Frontend with no backend anywhere: the client was refused (a TCP reset, or ICMP port
    /// unreachable for UDP).
    REFUSED_NO_BACKEND = 7, "refused_no_backend";
    /// Frontend with no backend here while a traffic policy is Local: dropped silently.
    DROP_NO_LOCAL_BACKEND = 8, "drop_no_local_backend";
    /// Source not in loadBalancerSourceRanges: dropped.
    DROP_SOURCE_RANGE = 9, "drop_source_range";
    /// Headers cut short: dropped.
    DROP_MALFORMED = 10, "drop_malformed";
    /// No free SNAT source port.
    DROP_NAT_EXHAUSTED = 11, "drop_nat_exhausted";
    /// Conntrack at its admission limit (or full): new flow refused, established ones kept.
    DROP_CT_FULL = 12, "drop_ct_full";
    /// Translated and sent back out of the receiving interface (XDP_TX).
    XDP_TX = 13, "xdp_tx";
    /// A frontend whose slot or backend entry is missing (the agent broke its write order).
    DROP_STALE_SERVICE = 14, "drop_stale_service";
    /// A TCP packet other than a SYN to a frontend, with no tracked flow: answered with a
    /// reset (as the node's stack answers a connection it does not know).
    RESET_NO_FLOW = 15, "reset_no_flow";
    /// A TCP reset to a frontend, with no tracked flow: dropped.
    DROP_NO_FLOW = 16, "drop_no_flow";
    /// TCP to a backend that was removed: answered with a reset, flow removed.
    RESET_BACKEND_GONE = 17, "reset_backend_gone";
    /// UDP to a backend that was removed: flow removed, a new backend chosen.
    BACKEND_GONE_RECHOSEN = 18, "backend_gone_rechosen";
    /// A reply from a backend that was removed, or a client's reset to it: dropped, flow
    /// removed.
    DROP_BACKEND_GONE = 19, "drop_backend_gone";
    /// A later fragment of a translated datagram, translated like its first.
    FRAGMENT_TRANSLATED = 20, "fragment_translated";
    /// A later fragment whose first fragment was not seen (or not translated): passed
    /// untranslated.
    PASS_FRAGMENT_UNMATCHED = 21, "pass_fragment_unmatched";
    /// A packet that would have been refused or reset, dropped without an answer: over
    /// the answer rate limit.
    DROP_ANSWER_RATE_LIMITED = 22, "drop_answer_rate_limited";
    /// A new flow whose reply tuple belonged to another flow took a NAT port instead.
    SNAT_ON_COLLISION = 23, "snat_on_collision";
    /// Two CPUs started the same flow at once; this packet was dropped (its retransmission
    /// follows the flow).
    DROP_CT_RACE = 24, "drop_ct_race";
    /// XDP could not rewrite (a partial checksum) and left the packet to tc.
    XDP_TO_TC = 25, "xdp_to_tc";
    /// The source side of a flow rewritten at tc egress (netfilter mode).
    EGRESS_REWRITTEN = 26, "egress_rewritten";
    /// A half whose peer was gone: removed, the packet treated as untracked.
    FLOW_ORPHANED = 27, "flow_orphaned";
    /// A packet of a translated flow too big for its path (DF set): answered with ICMP
    /// fragmentation needed, quoting it as its sender sent it.
    FRAG_NEEDED_ANSWERED = 28, "frag_needed_answered";
    /// TCP or UDP whose L4 header is cut short, for no frontend and no flow: left to the
    /// stack (one for a frontend or a flow is dropped as malformed).
    PASS_L4_TRUNCATED = 29, "pass_l4_truncated";
    /// A socket connecting to a frontend was connected to a backend (a new flow, translated
    /// once at connect: its packets meet no per-packet rewrite).
    SOCK_CONNECT = 30, "sock_connect";
    /// An unconnected UDP datagram to a frontend was sent to its socket's backend.
    SOCK_SENDMSG = 31, "sock_sendmsg";
    /// A connect or an unconnected send to a frontend without any endpoint failed at once
    /// with ECONNREFUSED.
    SOCK_REFUSED = 32, "sock_refused";
    /// A node socket to a frontend whose traffic policy leaves it no backend here
    /// (internalTrafficPolicy Local, source ranges): failed at once with EHOSTUNREACH.
    SOCK_UNREACHABLE = 33, "sock_unreachable";
    /// A socket to a frontend left untranslated for the packet path at tc (a pod's socket
    /// with --socket-lb host-only, or one whose source ranges or local policy tc must judge
    /// by the real source address).
    SOCK_PASSED = 34, "sock_passed";
    /// A backend's address shown to an application as its frontend's (getpeername, the
    /// source of a received datagram).
    SOCK_REVERSED = 35, "sock_reversed";
    /// A map entry read as another key's: the kernel reused the element for another entry
    /// (another flow, Service, socket or client) while this program was reading it. Treated
    /// as no entry (a conntrack miss: the packet is untracked), never followed.
    ENTRY_REUSED = 36, "entry_reused";
}

#[cfg(test)]
mod tests {
    #[test]
    fn labels_are_listed_in_index_order() {
        for (i, (index, _)) in super::ALL.iter().enumerate() {
            assert_eq!(*index as usize, i);
        }
    }
}
