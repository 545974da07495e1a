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
    /// First packet of a flow to a frontend: backend chosen, translated.
    NEW_FLOW = 2, "new_flow";
    /// Packet of a known flow, original direction, translated.
    ESTABLISHED = 3, "established";
    /// Reply of a translated flow, reverse-translated.
    REPLY = 4, "reply";
    /// ICMP error about a translated flow, translated back for the client.
    ICMP_ERROR_TRANSLATED = 5, "icmp_error_translated";
    /// Frontend with no backends: the client was sent ICMP port unreachable.
    REFUSED_NO_BACKEND = 6, "refused_no_backend";
    /// externalTrafficPolicy=Local frontend with no local backend: dropped.
    DROP_NO_LOCAL_BACKEND = 7, "drop_no_local_backend";
    /// Source not in loadBalancerSourceRanges: dropped.
    DROP_SOURCE_RANGE = 8, "drop_source_range";
    /// Headers cut short: dropped.
    DROP_TRUNCATED = 9, "drop_truncated";
    /// IPv4 fragment or IPv4 header with options: passed untranslated (not supported yet).
    PASS_FRAGMENT_OR_OPTIONS = 10, "pass_fragment_or_options";
    /// No free SNAT source port after bounded tries.
    DROP_NAT_EXHAUSTED = 11, "drop_nat_exhausted";
    /// A map update failed (map full).
    DROP_MAP_FULL = 12, "drop_map_full";
    /// Translated and sent back out of the receiving interface (XDP_TX).
    XDP_TX = 13, "xdp_tx";
    /// A frontend whose slot or backend entry is missing (the agent broke its write order).
    DROP_STALE_SERVICE = 14, "drop_stale_service";
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
