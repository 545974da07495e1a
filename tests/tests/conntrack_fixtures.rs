//! Needs root and BPF. Connection tracking, defect by defect (issue 7): each test drives the
//! loaded programs with BPF_PROG_TEST_RUN against the scripted fixture and fails on the
//! datapath this redesign replaced. Time is simulated by moving flows' stamps back (what
//! a refresh-less interval would leave), never by sleeping.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    checksum::checksum,
    conntrack::{phase, Phase},
    ct_flags, IPPROTO_TCP, IPPROTO_UDP, XDP_META_MARK,
};
use lb_tests::{
    fixture::*,
    packet::{checksums_ok, endpoints, Frame, ACK, FIN, RST, SYN},
};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn np(port: u16) -> SocketAddrV4 {
    sa(NODE, port)
}

/// The SNAT source a flow's packets leave with, from the fixture's output.
fn snat_of(fx: &mut Fixture, frame: &Frame) -> SocketAddrV4 {
    let (action, out, _) = fx.xdp(&frame.bytes());
    assert_eq!(action, XDP_TX, "{frame:?}");
    endpoints(&out).0
}

fn delta(fx: &Fixture, before: &std::collections::BTreeMap<&'static str, u64>, name: &str) -> u64 {
    fx.counters()[name] - before[name]
}

/// Defect 1: a client streaming UDP one way for longer than the UDP timeout keeps its NAT
/// port; the reply half is refreshed with the forward half, so the backend's late answers
/// still reach this client and no other flow can take the port.
#[test]
fn a_one_way_udp_stream_keeps_its_nat_port_past_the_udp_timeout() {
    with_fixture(Setup::fast((40000, 40003)), |fx| {
        let client = sa(CLIENT, 6000);
        let nat = snat_of(fx, &Frame::udp(client, np(30080)));
        // 90 s of one-way traffic, a datagram every second: thrice the 30 s unanswered timeout.
        for _ in 0..90 {
            fx.age(client, np(30080), IPPROTO_UDP, 1);
            assert_eq!(snat_of(fx, &Frame::udp(client, np(30080))), nat, "the flow keeps its port");
        }
        let reply = fx.conntrack(sa(REMOTE_POD, 8080), nat, IPPROTO_UDP).expect("the reply half lives");
        let now = lb_common::conntrack::units(lb_user::datapath::conntrack::coarse_now_ns());
        assert!(
            lb_common::conntrack::age(reply.stamp, now) < lb_common::conntrack::secs(2),
            "refreshed with the stream"
        );
        // Another client cannot get this port toward the same backend: it gets another.
        let other = snat_of(fx, &Frame::udp(sa(CLIENT2, 6000), np(30080)));
        assert_ne!(other, nat);
        // The backend's late answer goes to the streaming client.
        let (_, out, _) = fx.xdp(&Frame::udp(sa(REMOTE_POD, 8080), nat).bytes());
        assert_eq!(endpoints(&out), (np(30080), client));
    });
}

/// Defect 2: one client port reaching two frontends that share a backend. The second flow
/// must not overwrite the first one's reply half: it takes a NAT port, and each flow's
/// replies leave with its own frontend as source.
#[test]
fn a_second_flow_never_overwrites_another_flows_reply_half() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let client = sa(CLIENT, 5555);
        let before = fx.counters();
        // np-local (30081) and etp-local (30082) both have LOCAL_POD:8080 as their backend.
        let (_, out, _) = fx.xdp(&Frame::tcp(client, np(30081), SYN).bytes());
        assert_eq!(endpoints(&out), (client, sa(LOCAL_POD, 8080)), "first flow: DNAT only");
        let (_, out, _) = fx.xdp(&Frame::tcp(client, np(30082), SYN).bytes());
        let (second_src, second_dst) = endpoints(&out);
        assert_eq!((*second_src.ip(), second_dst), (NODE, sa(LOCAL_POD, 8080)), "second flow: SNAT on collision");
        assert_eq!(delta(fx, &before, "snat_on_collision"), 1);
        // The backend answers each: each answer goes out as its own frontend.
        let (_, out) = fx.tc_pod(&Frame::tcp(sa(LOCAL_POD, 8080), client, SYN | ACK).bytes());
        assert_eq!(endpoints(&out).0, np(30081), "the first flow's replies keep their source");
        let (_, out) = fx.tc_pod(&Frame::tcp(sa(LOCAL_POD, 8080), second_src, SYN | ACK).bytes());
        assert_eq!(endpoints(&out), (np(30082), client));
    });
}

/// A NodePort flow without SNAT (client -> pod on this node), opened and closed by FINs
/// both ways: (client, frontend, backend).
fn closed_local_flow(fx: &mut Fixture) -> (SocketAddrV4, SocketAddrV4, SocketAddrV4) {
    let (client, front, backend) = (sa(CLIENT, 5555), np(30081), sa(LOCAL_POD, 8080));
    fx.xdp(&Frame::tcp(client, front, SYN).bytes());
    fx.tc_pod(&Frame::tcp(backend, client, SYN | ACK).bytes());
    fx.xdp(&Frame::tcp(client, front, FIN | ACK).bytes());
    fx.tc_pod(&Frame::tcp(backend, client, FIN | ACK).bytes());
    assert_eq!(phase(fx.conntrack(client, front, IPPROTO_TCP).unwrap().state), Phase::Closed);
    (client, front, backend)
}

/// Defect 2, continued: after a flow without SNAT closes and its close timeout passes, its
/// reply half rewrites nothing any more: the backend's packets to that client port (of a
/// direct connection) leave as the backend sent them, not disguised as the Service's.
#[test]
fn a_closed_flows_reply_half_stops_rewriting_after_the_close_timeout() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let (client, front, backend) = closed_local_flow(fx);
        fx.age(client, front, IPPROTO_TCP, 11);
        let direct = Frame { payload: vec![7; 10], ..Frame::tcp(backend, client, ACK) }.bytes();
        let (action, out) = fx.tc_pod(&direct);
        assert_eq!((action, out), (TC_ACT_OK, direct), "passes as it is");
        assert!(fx.conntrack(backend, client, IPPROTO_TCP).is_none(), "and the dead flow is gone");
        assert!(fx.conntrack(client, front, IPPROTO_TCP).is_none());
    });
}

/// Defect 2, continued: within the close timeout too, for a new connection. A SYN-ACK from
/// the backend to the client port of a closed flow answers another connection (made to the
/// backend directly, or through the socket hooks); it passes as it is, and the closed flow
/// goes, while the closed flow's own late packets are still translated.
#[test]
fn a_closed_flows_reply_half_never_disguises_another_connections_syn_ack() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let (client, front, backend) = closed_local_flow(fx);
        let (_, last_ack) = fx.tc_pod(&Frame::tcp(backend, client, ACK).bytes());
        assert_eq!(endpoints(&last_ack).0, front, "the closed flow's own packets are still translated");
        let direct = Frame::tcp(backend, client, SYN | ACK).bytes();
        let (action, out) = fx.tc_pod(&direct);
        assert_eq!((action, out), (TC_ACT_OK, direct), "passes as it is, at once");
        assert!(fx.conntrack(backend, client, IPPROTO_TCP).is_none(), "and the closed flow is gone");
        assert!(fx.conntrack(client, front, IPPROTO_TCP).is_none());
    });
}

/// Defect 3: only a SYN starts a TCP flow. A bare ACK (a scan, a flow whose entry is gone)
/// is answered with a reset as the node's stack would answer it; a stray reset is
/// dropped; neither takes an entry or a NAT port.
#[test]
fn packets_other_than_a_syn_start_nothing() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let client = sa(CLIENT, 5555);
        let before = fx.counters();
        let ack = Frame { payload: vec![7; 10], ..Frame::tcp(client, np(30080), ACK) }.bytes();
        let (action, out, _) = fx.xdp(&ack);
        assert_eq!(action, XDP_TX, "answered");
        assert_eq!(out.len(), 54);
        assert_eq!(endpoints(&out), (np(30080), client), "from the address the client reached");
        assert_eq!(out[47], RST, "a reset");
        assert_eq!(&out[38..42], &ack[42..46], "its sequence is the ACK's acknowledgement");
        assert!(checksums_ok(&out));
        for flags in [RST, RST | ACK] {
            assert_eq!(fx.xdp(&Frame::tcp(client, np(30080), flags).bytes()).0, XDP_DROP);
        }
        for flags in [FIN | ACK, SYN | ACK] {
            assert_eq!(fx.xdp(&Frame::tcp(client, np(30080), flags).bytes()).0, XDP_TX, "reset");
        }
        assert_eq!(delta(fx, &before, "reset_no_flow"), 3);
        assert_eq!(delta(fx, &before, "drop_no_flow"), 2);
        assert_eq!(delta(fx, &before, "new_flow"), 0);
        assert!(fx.ct_entries().is_empty(), "no entry, no NAT port");
        assert_eq!(fx.ct_counted(), 0);
    });
}

/// Defect 4: a reset closes a flow for a short time only, and cannot keep it: packets
/// after it do not refresh it unless both directions carry on (then the reset was not the
/// flow's, and it lives on); a new SYN on a closed flow chooses its backend again.
#[test]
fn resets_close_for_seconds_and_a_new_syn_after_close_chooses_again() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let client = sa(CLIENT, 5555);
        let front = np(30080);
        let nat = snat_of(fx, &Frame::tcp(client, front, SYN));
        let backend = sa(REMOTE_POD, 8080);
        fx.xdp(&Frame::tcp(backend, nat, SYN | ACK).bytes());
        fx.xdp(&Frame::tcp(client, front, RST).bytes());
        assert_eq!(phase(fx.conntrack(client, front, IPPROTO_TCP).unwrap().state), Phase::Closed);
        // An unvalidated reset: both sides carry on, so the flow was not reset.
        fx.xdp(&Frame::tcp(client, front, ACK).bytes());
        fx.xdp(&Frame::tcp(backend, nat, ACK).bytes());
        assert_eq!(phase(fx.conntrack(client, front, IPPROTO_TCP).unwrap().state), Phase::Established);
        // A reset that holds: 9 s later (inside the 10 s close timeout) a stray packet still
        // follows the flow but does not extend it; 2 s later the flow is gone.
        fx.xdp(&Frame::tcp(backend, nat, RST).bytes());
        fx.age(client, front, IPPROTO_TCP, 9);
        let stamp = fx.conntrack(client, front, IPPROTO_TCP).unwrap().stamp;
        assert_eq!(fx.xdp(&Frame::tcp(client, front, RST).bytes()).0, XDP_TX, "still translated");
        assert_eq!(fx.conntrack(client, front, IPPROTO_TCP).unwrap().stamp, stamp, "a reset does not refresh");
        fx.age(client, front, IPPROTO_TCP, 2);
        let before = fx.counters();
        assert_eq!(fx.xdp(&Frame::tcp(client, front, ACK).bytes()).0, XDP_TX, "answered with a reset");
        assert_eq!(delta(fx, &before, "reset_no_flow"), 1);
        // A new SYN on a closed (not yet expired) flow is a new connection.
        let nonce = |fx: &Fixture| lb_common::conntrack::nonce(fx.conntrack(client, front, IPPROTO_TCP).unwrap().stamp);
        snat_of(fx, &Frame::tcp(client, front, SYN));
        let first = nonce(fx);
        fx.xdp(&Frame::tcp(client, front, FIN | ACK).bytes());
        let before = fx.counters();
        snat_of(fx, &Frame::tcp(client, front, SYN));
        assert_eq!(delta(fx, &before, "new_flow"), 1, "a fresh SYN after FIN starts over");
        assert_ne!(nonce(fx), first, "another flow");
        assert_eq!(fx.ct_entries().len(), 2, "and the old one's halves are gone");
    });
}

/// Defect 5: a flow's halves cannot diverge. With one half lost, the other counts as gone
/// (at its next refresh the datapath removes it), and the sweep removes orphans and
/// expired flows whole, each exactly once.
#[test]
fn a_half_without_its_peer_is_gone_and_the_sweep_frees_each_entry_once() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let client = sa(CLIENT, 5555);
        let front = np(30080);
        let nat = snat_of(fx, &Frame::tcp(client, front, SYN));
        fx.xdp(&Frame::tcp(sa(REMOTE_POD, 8080), nat, SYN | ACK).bytes());
        assert_eq!((fx.ct_entries().len(), fx.ct_counted()), (2, 2));
        fx.lose_half(sa(REMOTE_POD, 8080), nat, IPPROTO_TCP);
        fx.age(client, front, IPPROTO_TCP, 2);
        let before = fx.counters();
        assert_eq!(fx.xdp(&Frame::tcp(client, front, ACK).bytes()).0, XDP_TX, "a reset, not the dead flow's rewrite");
        assert_eq!(delta(fx, &before, "flow_orphaned"), 1);
        assert_eq!(delta(fx, &before, "reset_no_flow"), 1);
        assert!(fx.ct_entries().is_empty());
        assert_eq!(fx.ct_counted(), 0, "counted down exactly once");

        // The sweep: an expired flow goes whole, an orphan goes, a live flow stays.
        let live = sa(CLIENT, 5600);
        snat_of(fx, &Frame::tcp(live, front, SYN));
        let expired = sa(CLIENT, 5601);
        snat_of(fx, &Frame::tcp(expired, front, SYN));
        fx.age(expired, front, IPPROTO_TCP, 11);
        let orphan = sa(CLIENT, 5602);
        let orphan_nat = snat_of(fx, &Frame::tcp(orphan, front, SYN));
        fx.lose_half(orphan, front, IPPROTO_TCP);
        assert_eq!(fx.ct_entries().len(), 5);
        let (removed, read) = fx.sweep();
        assert_eq!((removed, read), (2, 5), "the expired flow and the orphan");
        assert_eq!(fx.ct_entries().len(), 2);
        assert!(fx.conntrack(live, front, IPPROTO_TCP).is_some());
        assert!(fx.conntrack(sa(REMOTE_POD, 8080), orphan_nat, IPPROTO_TCP).is_none());
        assert_eq!(fx.ct_counted(), 2);
        assert_eq!(fx.sweep().0, 0, "nothing is freed twice");
    });
}

/// Defect 6: above the admission mark new flows are refused and counted, and established
/// ones are never pushed out.
#[test]
fn admission_refuses_new_flows_and_keeps_established_ones() {
    let setup = Setup { conntrack_entries: 1024, admit_limit: 100, ..Setup::fast((20000, 60000)) };
    with_fixture(setup, |fx| {
        let first = sa(CLIENT, 1000);
        let nat = snat_of(fx, &Frame::tcp(first, np(30080), SYN));
        fx.xdp(&Frame::tcp(sa(REMOTE_POD, 8080), nat, SYN | ACK).bytes());
        let before = fx.counters();
        for port in 1001..1200 {
            fx.xdp(&Frame::tcp(sa(CLIENT2, port), np(30080), SYN).bytes());
        }
        assert_eq!(delta(fx, &before, "new_flow"), 49, "up to the mark: 100 entries, 2 a flow");
        assert_eq!(delta(fx, &before, "drop_ct_full"), 150);
        assert_eq!(fx.ct_counted(), 100);
        // The established flow carries on.
        let (action, out, _) = fx.xdp(&Frame::tcp(first, np(30080), ACK).bytes());
        assert_eq!((action, endpoints(&out)), (XDP_TX, (nat, sa(REMOTE_POD, 8080))));
        let (_, out, _) = fx.xdp(&Frame::tcp(sa(REMOTE_POD, 8080), nat, ACK).bytes());
        assert_eq!(endpoints(&out), (np(30080), first));
    });
}

/// Without an admission mark below it, the table's own capacity refuses new flows (the
/// insert fails), counted the same way, and nothing is overwritten.
#[test]
fn a_full_table_refuses_new_flows_as_admission_does() {
    let setup = Setup { conntrack_entries: 1024, admit_limit: u32::MAX, ..Setup::fast((20000, 60000)) };
    with_fixture(setup, |fx| {
        let before = fx.counters();
        for port in 1000..1600 {
            fx.xdp(&Frame::tcp(sa(CLIENT2, port), np(30081), SYN).bytes());
        }
        assert_eq!(delta(fx, &before, "new_flow"), 512, "1024 entries, 2 a flow");
        assert_eq!(delta(fx, &before, "drop_ct_full"), 88);
        assert_eq!((fx.ct_entries().len(), fx.ct_counted()), (1024, 1024), "nothing half-inserted is left");
    });
}

/// Defect 7: a free NAT port is found whenever there is one, without walking the range
/// from the bottom, and ports rotate through the range rather than the lowest free coming
/// back at once.
#[test]
fn nat_ports_are_found_when_few_are_free_and_rotate() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let backend = sa(REMOTE_POD, 8080);
        let mut ports = Vec::new();
        for p in 0..5u16 {
            ports.push(snat_of(fx, &Frame::tcp(sa(CLIENT, 2000 + p), np(30080), SYN)).port());
        }
        assert!(ports.windows(2).all(|w| w[1] == w[0] + 1), "new flows walk on from a shared cursor: {ports:?}");
        // 80 of the 100 ports taken at scattered places: new flows still find the free ones
        // (the benchmark measures the success rate with 90% of a large range taken).
        let taken: Vec<u16> =
            (0..100u16).map(|i| 40000 + (i * 37) % 100).filter(|p| !ports.contains(p)).take(75).collect();
        for p in &taken {
            fx.hold_nat_port(backend, *p, IPPROTO_TCP);
        }
        let before = fx.counters();
        let mut got = Vec::new();
        for p in 0..5u16 {
            let src = snat_of(fx, &Frame::tcp(sa(CLIENT2, 3000 + p), np(30080), SYN));
            assert!(!taken.contains(&src.port()) && !ports.contains(&src.port()), "{src} was free");
            got.push(src.port());
        }
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 5, "five flows, five ports");
        assert_eq!(delta(fx, &before, "drop_nat_exhausted"), 0);
        // With every port taken, a new flow is refused and counted.
        for p in 40000..40100u16 {
            if !taken.contains(&p) && !ports.contains(&p) && !got.contains(&p) {
                fx.hold_nat_port(backend, p, IPPROTO_TCP);
            }
        }
        assert_eq!(fx.xdp(&Frame::tcp(sa(CLIENT2, 4000), np(30080), SYN).bytes()).0, XDP_DROP, "none left");
        assert_eq!(delta(fx, &before, "drop_nat_exhausted"), 1);
    });
}

/// Defect 8: a removed backend (gone from the slices) loses its flows: UDP chooses again at
/// once, TCP gets a reset. A terminating one (still in the slices) keeps its flows.
#[test]
fn flows_of_a_removed_backend_choose_again_or_are_reset_and_terminating_ones_carry_on() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let udp_client = sa(CLIENT, 6000);
        let tcp_client = sa(CLIENT, 6001);
        snat_of(fx, &Frame::udp(udp_client, np(30080)));
        let nat = snat_of(fx, &Frame::tcp(tcp_client, np(30080), SYN));
        fx.xdp(&Frame::tcp(sa(REMOTE_POD, 8080), nat, SYN | ACK).bytes());
        let terminating = MANIFESTS.replace(
            "endpoints: [{addresses: [10.244.2.10], nodeName: node2}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: np-local}",
            "endpoints: [{addresses: [10.244.2.10], nodeName: node2, conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.244.2.11], nodeName: node2}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: np-local}",
        );
        assert_ne!(terminating, MANIFESTS);
        fx.apply(&(terminating + &local_slices()));
        let (_, out, _) = fx.xdp(&Frame::tcp(tcp_client, np(30080), ACK).bytes());
        assert_eq!(endpoints(&out).1, sa(REMOTE_POD, 8080), "a terminating backend keeps its flows");
        let replaced = MANIFESTS.replace(
            "endpoints: [{addresses: [10.244.2.10], nodeName: node2}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: np-local}",
            "endpoints: [{addresses: [10.244.2.11], nodeName: node2}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: np-local}",
        );
        fx.apply(&(replaced + &local_slices()));
        let before = fx.counters();
        let (_, out, _) = fx.xdp(&Frame::udp(udp_client, np(30080)).bytes());
        assert_eq!(endpoints(&out).1, sa(Ipv4Addr::new(10, 244, 2, 11), 8080), "UDP chose again at once");
        assert_eq!(delta(fx, &before, "backend_gone_rechosen"), 1);
        let (action, out, _) = fx.xdp(&Frame::tcp(tcp_client, np(30080), ACK).bytes());
        assert_eq!((action, out[47]), (XDP_TX, RST), "TCP: a reset, not silence");
        assert_eq!(delta(fx, &before, "reset_backend_gone"), 1);
        assert!(fx.conntrack(tcp_client, np(30080), IPPROTO_TCP).is_none());
        assert!(fx.conntrack(sa(REMOTE_POD, 8080), nat, IPPROTO_TCP).is_none(), "both halves, and the NAT port");
    });
}

/// Splits a UDP frame with a payload into a first fragment (header + 24 bytes of payload)
/// and a later one (the rest), as a router fragmenting it would.
fn fragments(frame: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let cut = 34 + 32;
    let mut first = frame[..cut].to_vec();
    let mut later = frame[..34].to_vec();
    later.extend_from_slice(&frame[cut..]);
    for (f, offset, more) in [(&mut first, 0u16, true), (&mut later, 4u16, false)] {
        let len = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&len.to_be_bytes());
        f[20..22].copy_from_slice(&(offset | if more { 0x2000 } else { 0 }).to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = checksum(&f[14..34], 0);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    }
    (first, later)
}

/// Defect 9: every fragment of a translated datagram is translated like its first; a later
/// fragment whose first was never seen passes untouched, counted.
#[test]
fn later_fragments_follow_their_first() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let client = sa(CLIENT, 6000);
        let datagram = Frame { payload: (0..40).collect(), ..Frame::udp(client, np(30080)) }.bytes();
        let (first, later) = fragments(&datagram);
        let (action, out_first, _) = fx.xdp(&first);
        assert_eq!(action, XDP_TX);
        let (nat, backend) = endpoints(&out_first);
        assert_eq!((*nat.ip(), backend), (NODE, sa(REMOTE_POD, 8080)));
        let before = fx.counters();
        let (action, out_later, meta) = fx.xdp(&later);
        assert_eq!((action, meta.map(|m| m.tag)), (XDP_PASS, Some(lb_common::XDP_META_REDIRECT)), "forwarded like it");
        assert_eq!(&out_later[26..30], &NODE.octets(), "source: the node, as the first fragment's");
        assert_eq!(&out_later[30..34], &REMOTE_POD.octets(), "destination: the backend");
        assert_eq!(&out_later[34..], &later[34..], "the payload untouched");
        assert_eq!(checksum(&out_later[14..34], 0), 0);
        assert_eq!(delta(fx, &before, "fragment_translated"), 1);
        // Reassembled, the datagram's UDP checksum holds: the first fragment's was updated
        // for the whole datagram.
        let mut whole = out_first.clone();
        whole.extend_from_slice(&out_later[34..]);
        let len = (whole.len() - 14) as u16;
        whole[16..18].copy_from_slice(&len.to_be_bytes());
        whole[20..22].copy_from_slice(&[0, 0]);
        whole[24..26].copy_from_slice(&[0, 0]);
        let c = checksum(&whole[14..34], 0);
        whole[24..26].copy_from_slice(&c.to_be_bytes());
        assert!(checksums_ok(&whole), "reassembled datagram's checksums");
        let mut stray = later.clone();
        stray[18] ^= 0xff;
        let c = checksum(
            &{
                let mut h = stray[14..34].to_vec();
                h[10] = 0;
                h[11] = 0;
                h
            },
            0,
        );
        stray[24..26].copy_from_slice(&c.to_be_bytes());
        let (action, out, meta) = fx.xdp(&stray);
        assert_eq!((action, out, meta), (XDP_PASS, stray, None), "another datagram's: untouched");
        assert_eq!(delta(fx, &before, "pass_fragment_unmatched"), 1);
    });
}

/// Defect 10: a packet of a translated flow too big for the path (DF set) gets a
/// "fragmentation needed" answer quoting it as the client sent it, so the client's path
/// MTU discovery works through the translation; refusals are rate-limited like the
/// kernel's ICMP.
#[test]
fn path_mtu_discovery_works_through_the_translation_and_refusals_are_rate_limited() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        // A locked route MTU: forwarding uses it (an unlocked one only with ip_forward_use_pmtu).
        let route = ["route", "replace", "10.244.2.0/24", "via", "192.168.50.11", "mtu", "lock", "1400"];
        lb_tests::lab::run("ip", &route).unwrap();
        let client = sa(CLIENT, 6000);
        let nat = snat_of(fx, &Frame::tcp(client, np(30080), SYN));
        fx.xdp(&Frame::tcp(sa(REMOTE_POD, 8080), nat, SYN | ACK).bytes());
        let big = Frame { payload: vec![1; 1460], ..Frame::tcp(client, np(30080), ACK) }.bytes();
        let before = fx.counters();
        let (action, out, _) = fx.xdp(&big);
        assert_eq!(action, XDP_TX, "answered");
        assert_eq!((out[34], out[35]), (3, 4), "destination unreachable, fragmentation needed");
        assert_eq!(u16::from_be_bytes([out[40], out[41]]), 1400, "the path's MTU");
        assert_eq!(&out[26..30], &NODE.octets(), "from the address the client reached");
        assert_eq!(&out[42..62], &big[14..34], "quoting the packet as the client sent it");
        assert_eq!(&out[62..70], &big[34..42]);
        assert!(checksums_ok(&out));
        assert_eq!(delta(fx, &before, "established"), 0, "not forwarded");
        assert_eq!(delta(fx, &before, "frag_needed_answered"), 1);
        let fits = Frame { payload: vec![1; 1300], ..Frame::tcp(client, np(30080), ACK) }.bytes();
        assert_eq!(fx.xdp(&fits).0, XDP_TX);
        assert_eq!(delta(fx, &before, "established"), 1);

        // Refusals: a burst of 6 per client, then one a second; 50 node-wide.
        let before = fx.counters();
        for port in 0..20 {
            fx.xdp(&Frame::tcp(sa(CLIENT2, 7000 + port), np(30099), SYN).bytes());
        }
        assert_eq!(delta(fx, &before, "refused_no_backend"), 6);
        assert_eq!(delta(fx, &before, "drop_answer_rate_limited"), 14);
    });
}

/// Netfilter mode: the destination side is rewritten on the way in and the packet handed
/// to the stack (so its forward hook sees it) with the mark that tells tc egress to
/// rewrite the source side; the reply is handled the same way round.
#[test]
fn netfilter_mode_splits_the_rewrite_between_ingress_and_egress() {
    with_fixture(Setup::netfilter((40000, 40099)), |fx| {
        let client = sa(CLIENT, 5555);
        let syn = Frame::tcp(client, np(30080), SYN);
        let (action, out, meta) = fx.xdp(&syn.bytes());
        let meta = meta.expect("handed over with a mark");
        assert_eq!((action, meta.tag), (XDP_PASS, XDP_META_MARK));
        assert_eq!(endpoints(&out), (client, sa(REMOTE_POD, 8080)), "DNAT only: the forward hook sees the client");
        assert!(checksums_ok(&out));
        let nat_port = meta.mark as u16;
        let entry = fx.conntrack(client, np(30080), IPPROTO_TCP).unwrap();
        assert_eq!(u16::from_be(entry.nat_src_port_be), nat_port, "the mark carries the flow's NAT port");
        assert_ne!(entry.flags & ct_flags::SNAT, 0);
        // tc egress: SNAT, mark consumed.
        let (action, out, mark) = fx.tc_egress(&out, meta.mark | 0xab00_0000);
        assert_eq!((action, mark), (TC_ACT_OK, 0xab00_0000), "our bits cleared, others kept");
        assert_eq!(endpoints(&out), (np(nat_port), sa(REMOTE_POD, 8080)));
        assert!(checksums_ok(&out));
        // The reply: un-SNAT on the way in, un-DNAT on the way out.
        let synack = Frame::tcp(sa(REMOTE_POD, 8080), np(nat_port), SYN | ACK);
        let (action, out, meta) = fx.xdp(&synack.bytes());
        let meta = meta.expect("handed over");
        assert_eq!((action, meta.tag, meta.mark), (XDP_PASS, XDP_META_MARK, nat_port as u32));
        assert_eq!(endpoints(&out), (sa(REMOTE_POD, 8080), client));
        let (_, out, _) = fx.tc_egress(&out, meta.mark);
        assert_eq!(endpoints(&out), (np(30080), client));
        assert!(checksums_ok(&out));
        // Without SNAT (a local backend): ingress DNAT, nothing for egress; the reply's
        // egress finds the flow by its own tuple.
        let syn = Frame::tcp(client, np(30081), SYN);
        let (action, out, meta) = fx.xdp(&syn.bytes());
        assert_eq!((action, meta), (XDP_PASS, None), "the stack routes it, the source stays");
        assert_eq!(endpoints(&out), (client, sa(LOCAL_POD, 8080)));
        let (action, out) = fx.tc_pod(&Frame::tcp(sa(LOCAL_POD, 8080), client, SYN | ACK).bytes());
        assert_eq!(action, TC_ACT_OK, "to the stack");
        assert_eq!(endpoints(&out), (sa(LOCAL_POD, 8080), client), "source side left for egress");
        let (_, out, _) = fx.tc_egress(&out, 1);
        assert_eq!(endpoints(&out), (np(30081), client));
        // A packet without our mark is untouched at egress.
        let other = Frame::tcp(client, sa(REMOTE_POD, 8080), ACK).bytes();
        assert_eq!(fx.tc_egress(&other, 0xab00_0000), (TC_ACT_OK, other, 0xab00_0000));
    });
}

/// Per-frontend and per-backend counters count every translated packet, and a backend's
/// open flows rise when a flow starts and fall exactly once: when it closes, or when it is
/// removed without having closed.
#[test]
fn traffic_is_counted_per_frontend_and_backend_and_open_flows_fall_once() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let client = sa(CLIENT, 5555);
        let front = np(30080);
        let nat = snat_of(fx, &Frame::tcp(client, front, SYN));
        let entry = fx.conntrack(client, front, IPPROTO_TCP).unwrap();
        let (backend, svc) = (entry.backend_id, entry.svc_id);
        assert_eq!(fx.backend_live(backend), 1, "a flow started");
        fx.xdp(&Frame::tcp(sa(REMOTE_POD, 8080), nat, SYN | ACK).bytes());
        fx.xdp(&Frame::tcp(client, front, ACK).bytes());
        let stats = fx.backend_stats(backend);
        assert_eq!((stats.packets, stats.new_flows), (3, 1), "both directions counted, one new flow");
        assert_eq!(stats.bytes, 3 * 54);
        assert_eq!(fx.frontend_stats(svc), (3, 3 * 54));
        fx.xdp(&Frame::tcp(client, front, FIN | ACK).bytes());
        assert_eq!(fx.backend_live(backend), 1, "half-closed is still open");
        fx.xdp(&Frame::tcp(sa(REMOTE_POD, 8080), nat, FIN | ACK).bytes());
        assert_eq!(fx.backend_live(backend), 0, "closed");
        fx.age(client, front, IPPROTO_TCP, 11);
        assert_eq!(fx.sweep().0, 1);
        assert_eq!(fx.backend_live(backend), 0, "removing a closed flow does not count it down again");
        // A flow removed without closing (expired) is counted down by its removal.
        snat_of(fx, &Frame::udp(sa(CLIENT, 6000), front));
        let udp_backend = fx.conntrack(sa(CLIENT, 6000), front, IPPROTO_UDP).unwrap().backend_id;
        assert_eq!(fx.backend_live(udp_backend), 1);
        fx.age(sa(CLIENT, 6000), front, IPPROTO_UDP, 31);
        assert_eq!(fx.sweep().0, 1);
        assert_eq!(fx.backend_live(udp_backend), 0);
    });
}

// Defects the property harness (tests/properties.rs) found, one fixture each.

/// `frame` with its L4 header cut to `l4_bytes`, the IPv4 total length and checksum to match.
fn cut_l4(frame: &[u8], l4_bytes: usize) -> Vec<u8> {
    let mut f = frame[..34 + l4_bytes].to_vec();
    f[16..18].copy_from_slice(&((20 + l4_bytes) as u16).to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// A TCP or UDP header cut short cannot be translated: dropped when it is for a frontend or
/// a flow, otherwise left to the stack untouched (it may be routed on), not dropped.
#[test]
fn a_cut_short_l4_header_is_dropped_only_when_it_is_ours() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let before = fx.counters();
        let to_frontend = cut_l4(&Frame::tcp(sa(CLIENT, 5555), np(30080), SYN).bytes(), 8);
        assert_eq!(fx.xdp(&to_frontend).0, XDP_DROP);
        assert_eq!(delta(fx, &before, "drop_malformed"), 1);
        assert!(fx.conntrack(sa(CLIENT, 5555), np(30080), IPPROTO_TCP).is_none());
        // A ClusterIP's address, but no frontend's port; a pod; the ports themselves cut.
        let elsewhere = [
            cut_l4(&Frame::tcp(sa(CLIENT, 5555), sa(Ipv4Addr::new(10, 96, 0, 1), 81), SYN).bytes(), 8),
            cut_l4(&Frame::udp(sa(CLIENT, 5555), sa(REMOTE_POD, 8080)).bytes(), 6),
            cut_l4(&Frame::udp(sa(CLIENT, 5555), np(30080)).bytes(), 3),
        ];
        for frame in elsewhere {
            let (action, out, meta) = fx.xdp(&frame);
            assert_eq!((action, &out, meta), (XDP_PASS, &frame, None), "untouched: {frame:02x?}");
        }
        // Counted as truncated, or as not for a Service when the frontend filter already
        // ruled it out by its ports.
        assert_eq!(delta(fx, &before, "pass_l4_truncated") + delta(fx, &before, "pass_not_service"), 3);
        assert_eq!(delta(fx, &before, "drop_malformed"), 1);
        assert_eq!(fx.ct_entries().len(), 0);
    });
}

/// A client's reset to a backend that was removed is dropped with its flow: a reset is
/// never answered with one.
#[test]
fn a_reset_to_a_removed_backend_is_not_answered() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let client = sa(CLIENT, 6001);
        snat_of(fx, &Frame::tcp(client, np(30080), SYN));
        let replaced = MANIFESTS.replace(
            "endpoints: [{addresses: [10.244.2.10], nodeName: node2}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: np-local}",
            "endpoints: [{addresses: [10.244.2.11], nodeName: node2}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: np-local}",
        );
        fx.apply(&(replaced + &local_slices()));
        let before = fx.counters();
        assert_eq!(fx.xdp(&Frame::tcp(client, np(30080), RST).bytes()).0, XDP_DROP);
        assert_eq!(delta(fx, &before, "drop_backend_gone"), 1);
        assert_eq!(delta(fx, &before, "reset_backend_gone"), 0);
        assert!(fx.conntrack(client, np(30080), IPPROTO_TCP).is_none(), "the flow went");
    });
}

/// An ICMP error is read only up to its IPv4 total length: one that ends inside the quoted
/// header, whatever bytes follow it in the frame, is not translated.
#[test]
fn an_icmp_error_is_not_read_past_its_total_length() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let client = sa(CLIENT, 5555);
        let nat = snat_of(fx, &Frame::tcp(client, np(30080), SYN));
        // The backend says "port unreachable", quoting the SYN it got: IPv4 header only
        // within the datagram, its ports after the end as trailing bytes.
        let quoted = Frame::tcp(nat, sa(REMOTE_POD, 8080), SYN).bytes();
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&quoted[14..34]);
        let c = checksum(&icmp, 0);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut frame = Frame::udp(sa(REMOTE_POD, 0), sa(*nat.ip(), 0)).bytes()[..34].to_vec();
        frame[23] = lb_common::IPPROTO_ICMP;
        frame.extend_from_slice(&icmp);
        let frame = cut_l4(&frame, icmp.len());
        let mut with_trailer = frame.clone();
        with_trailer.extend_from_slice(&quoted[34..42]);
        let before = fx.counters();
        let (action, out, meta) = fx.xdp(&with_trailer);
        assert_eq!((action, out, meta), (XDP_PASS, with_trailer, None));
        assert_eq!(delta(fx, &before, "icmp_error_translated"), 0);
        // Whole, the same error is translated.
        let mut whole = frame[..34].to_vec();
        let mut icmp = icmp.clone();
        icmp.extend_from_slice(&quoted[34..42]);
        icmp[2..4].copy_from_slice(&[0, 0]);
        let c = checksum(&icmp, 0);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        whole.extend_from_slice(&icmp);
        let whole = cut_l4(&whole, icmp.len());
        let (action, out, _) = fx.xdp(&whole);
        assert_eq!(action, XDP_TX);
        assert_eq!(&out[30..34], &CLIENT.octets(), "to the client");
        assert_eq!(delta(fx, &before, "icmp_error_translated"), 1);
    });
}

/// A flow's first packet answered with "fragmentation needed" leaves no flow (as Linux
/// drops an unconfirmed conntrack entry): no entries, no NAT port, no open flow counted.
#[test]
fn a_first_packet_too_big_for_the_path_leaves_no_flow() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let route = ["route", "replace", "10.244.2.0/24", "via", "192.168.50.11", "mtu", "lock", "1400"];
        lb_tests::lab::run("ip", &route).unwrap();
        let client = sa(CLIENT, 6000);
        let big = Frame { payload: vec![1; 1460], ..Frame::udp(client, np(30080)) }.bytes();
        let before = fx.counters();
        let (action, out, _) = fx.xdp(&big);
        assert_eq!((action, out[34], out[35]), (XDP_TX, 3, 4), "fragmentation needed");
        assert_eq!(delta(fx, &before, "frag_needed_answered"), 1);
        assert_eq!(fx.ct_entries().len(), 0);
        assert_eq!(fx.ct_counted(), 0);
        assert!((0..16).all(|id| fx.backend_live(id) == 0), "no open flow counted");
    });
}

/// An endpoint that stops serving but stays in the slices keeps its UDP flows in the
/// datapath (as a terminating one keeps its TCP connections); the agent's cleanup removes
/// them, as kube-proxy's does, and the client's next datagram chooses again.
#[test]
fn udp_flows_to_an_endpoint_that_stopped_serving_are_forgotten_on_request() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let two = MANIFESTS.replace(
            "endpoints: [{addresses: [10.244.2.10], nodeName: node2}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: np-local}",
            "endpoints: [{addresses: [10.244.2.10], nodeName: node2}, {addresses: [10.244.2.11], nodeName: node2, conditions: {ready: false}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: np-local}",
        );
        assert_ne!(two, MANIFESTS);
        fx.apply(&(two.clone() + &local_slices()));
        let client = sa(CLIENT, 6000);
        let (_, out, _) = fx.xdp(&Frame::udp(client, np(30080)).bytes());
        assert_eq!(endpoints(&out).1, sa(REMOTE_POD, 8080));
        // 10.244.2.10 stops serving, 10.244.2.11 is ready: the flow stays where it is.
        let swapped = two
            .replace("{addresses: [10.244.2.10], nodeName: node2}", "{addresses: [10.244.2.10], nodeName: node2, conditions: {ready: false, serving: false, terminating: true}}")
            .replace("{addresses: [10.244.2.11], nodeName: node2, conditions: {ready: false}}", "{addresses: [10.244.2.11], nodeName: node2}");
        fx.apply(&(swapped + &local_slices()));
        let (_, out, _) = fx.xdp(&Frame::udp(client, np(30080)).bytes());
        assert_eq!(endpoints(&out).1, sa(REMOTE_POD, 8080), "kept until the cleanup");
        let mut ct = lb_user::datapath::conntrack::Conntrack::open(&fx.pin_dir).unwrap();
        let frontend = lb_common::ServiceKey {
            addr_be: lb_common::user::addr_be(NODE),
            port_be: 30080u16.to_be(),
            proto: IPPROTO_UDP,
            _pad: 0,
        };
        // Another backend's, another frontend's: untouched.
        let elsewhere = [(frontend, sa(Ipv4Addr::new(10, 244, 2, 11), 8080))];
        assert_eq!(ct.forget_udp_flows(&elsewhere).unwrap(), 0);
        assert_eq!(ct.forget_udp_flows(&[(frontend, sa(REMOTE_POD, 8080))]).unwrap(), 1);
        assert!(fx.conntrack(client, np(30080), IPPROTO_UDP).is_none());
        let (_, out, _) = fx.xdp(&Frame::udp(client, np(30080)).bytes());
        assert_eq!(endpoints(&out).1, sa(Ipv4Addr::new(10, 244, 2, 11), 8080), "the next datagram chose again");
    });
}

/// Writes `value` under `key` in LB_CONNTRACK from userspace (over whatever is there).
fn plant(fx: &Fixture, key: lb_common::CtKey, value: lb_common::CtValue) {
    let map = lb_user::datapath::open_map(&fx.pin_dir, lb_common::map_names::CONNTRACK).unwrap();
    let mut ct: aya::maps::HashMap<_, lb_common::CtKey, lb_common::CtValue> = map.try_into().unwrap();
    ct.insert(key, value, 0).unwrap();
}

/// The kernel reuses a removed conntrack element for another flow at once, while a packet
/// on another CPU may still read it. Such an element, under the key of flow A, holds flow
/// B's key, nonce and rewrite: a packet of A that meets it must be treated as having no
/// flow (never rewritten with B's addresses to B's client), must not remove it (it is B's),
/// and is counted as `entry_reused`. A's own flow, unplanted, is unaffected.
#[test]
fn a_conntrack_element_reused_for_another_flow_is_never_followed() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let (a, b) = (sa(CLIENT, 7001), sa(CLIENT2, 7002));
        let (front, backend) = (np(30081), sa(LOCAL_POD, 8080));
        let before = fx.counters();
        // Two flows without SNAT to the same backend, each established.
        for client in [a, b] {
            fx.xdp(&Frame::tcp(client, front, SYN).bytes());
            fx.tc_pod(&Frame::tcp(backend, client, SYN | ACK).bytes());
            let (_, out, _) = fx.xdp(&Frame::tcp(client, front, ACK).bytes());
            assert_eq!(endpoints(&out), (client, backend), "{client} is translated");
        }
        assert_eq!(delta(fx, &before, "entry_reused"), 0, "normal flows never look reused");

        // A's reply half now looks like an element reused for B's reply half.
        let (a_reply, b_reply) = (ct_key(backend, a, IPPROTO_TCP), ct_key(backend, b, IPPROTO_TCP));
        let b_half = fx.half(&b_reply).unwrap();
        assert_eq!(b_half.key, b_reply, "each half names its own key");
        plant(fx, a_reply, b_half);
        let before = fx.counters();
        let answer = Frame::tcp(backend, a, ACK).bytes();
        let (action, out) = fx.tc_pod(&answer);
        assert_eq!((action, out), (TC_ACT_OK, answer), "passed untouched, not rewritten toward B's flow");
        assert_eq!(delta(fx, &before, "entry_reused"), 1);
        assert_eq!(delta(fx, &before, "pass_not_service"), 1, "as a packet of no flow");
        assert_eq!(delta(fx, &before, "reply"), 0);
        assert_eq!(fx.half(&a_reply), Some(b_half), "another flow's element is not removed");

        // A's forward half likewise: its packet is one of no flow (a non-SYN gets a reset).
        let (a_fwd, b_fwd) = (ct_key(a, front, IPPROTO_TCP), ct_key(b, front, IPPROTO_TCP));
        plant(fx, a_fwd, fx.half(&b_fwd).unwrap());
        let before = fx.counters();
        let (action, out, _) = fx.xdp(&Frame::tcp(a, front, ACK).bytes());
        assert_eq!(action, XDP_TX);
        assert_eq!(endpoints(&out), (front, a), "a reset back to A, nothing sent to the backend");
        assert_eq!(delta(fx, &before, "entry_reused"), 1);
        assert_eq!(delta(fx, &before, "reset_no_flow"), 1);
        assert_eq!(delta(fx, &before, "established"), 0);

        // B, whose halves are whole, carries on both ways.
        let before = fx.counters();
        let (_, out, _) = fx.xdp(&Frame::tcp(b, front, ACK).bytes());
        assert_eq!(endpoints(&out), (b, backend));
        let (_, out) = fx.tc_pod(&Frame::tcp(backend, b, ACK).bytes());
        assert_eq!(endpoints(&out), (front, b));
        assert_eq!((delta(fx, &before, "established"), delta(fx, &before, "reply")), (1, 1));
        assert_eq!(delta(fx, &before, "entry_reused"), 0);
    });
}

/// The reaper, handed a key whose element was reused for another flow, leaves it alone.
#[test]
fn the_reaper_never_removes_an_element_reused_for_another_flow() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let (a, b) = (sa(CLIENT, 7101), sa(CLIENT2, 7102));
        let front = np(30081);
        for client in [a, b] {
            fx.xdp(&Frame::tcp(client, front, SYN).bytes());
        }
        let (a_fwd, b_fwd) = (ct_key(a, front, IPPROTO_TCP), ct_key(b, front, IPPROTO_TCP));
        let b_reply = ct_key(sa(LOCAL_POD, 8080), b, IPPROTO_TCP);
        // B expired (its SYN timeout passed), and A's forward half looks reused for B's:
        // the sweep finds it expired too and hands its key to the reaper.
        fx.age(b, front, IPPROTO_TCP, 11);
        let b_half = fx.half(&b_fwd).unwrap();
        plant(fx, a_fwd, b_half);
        fx.sweep();
        assert!(fx.half(&b_fwd).is_none() && fx.half(&b_reply).is_none(), "B's flow is removed by its own keys");
        assert_eq!(fx.half(&a_fwd), Some(b_half), "the element under A's key is not the reaper's to remove");
    });
}

/// A next hop cached in a half counts only for the flow that cached it (its nonce): one
/// written through an element reused meanwhile is never used for XDP_TX.
#[test]
fn a_next_hop_cached_by_another_flow_is_not_used() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let client = sa(CLIENT, 7201);
        let front = np(30080);
        let (_, first, _) = fx.xdp(&Frame::udp(client, front).bytes());
        let (_, cached, _) = fx.xdp(&Frame::udp(client, front).bytes());
        let key = ct_key(client, front, IPPROTO_UDP);
        let half = fx.half(&key).unwrap();
        assert_eq!(half.hop_nonce, lb_common::conntrack::nonce(half.stamp), "the flow cached its hop");
        assert_eq!(cached[..12], first[..12]);
        let bogus = [0x02, 0xba, 0xd0, 0, 0, 1];
        plant(fx, key, lb_common::CtValue { hop_dmac: bogus, hop_nonce: half.hop_nonce ^ 1, ..half });
        let (action, out, _) = fx.xdp(&Frame::udp(client, front).bytes());
        assert_eq!(action, XDP_TX);
        assert_eq!(out[..12], first[..12], "the FIB's next hop, not the foreign cache's");
        let recached = fx.half(&key).unwrap();
        assert_eq!((recached.hop_nonce, recached.hop_dmac), (half.hop_nonce, half.hop_dmac), "cached again");
    });
}

/// A Service entry read from an element the kernel reused for another frontend (its key
/// inside names that frontend) starts no flow: the packet passes as not a Service's.
#[test]
fn a_service_entry_reused_for_another_frontend_starts_nothing() {
    use lb_user::datapath::maps::{MapStore, PinnedMaps};
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let mut maps = PinnedMaps::open(&fx.pin_dir).unwrap();
        let services = maps.services().unwrap();
        let local = lb_common::ServiceKey::new(NODE, 30081, IPPROTO_TCP);
        let remote = lb_common::ServiceKey::new(NODE, 30080, IPPROTO_TCP);
        let (_, remote_entry) = services.iter().find(|(k, _)| *k == remote).unwrap();
        assert_eq!(remote_entry.key, remote, "entries name their own frontend");
        maps.put_service(local, *remote_entry).unwrap();
        let before = fx.counters();
        let syn = Frame::tcp(sa(CLIENT, 7301), np(30081), SYN).bytes();
        let (action, out, _) = fx.xdp(&syn);
        assert_eq!((action, out), (XDP_PASS, syn), "not sent to the other Service's backend");
        assert_eq!(delta(fx, &before, "entry_reused"), 1);
        assert_eq!(delta(fx, &before, "new_flow"), 0);
        assert!(fx.ct_entries().is_empty());
    });
}

/// A service entry copied while the kernel rewrote its element for another entry (this
/// frontend's key, another entry's counts, the first one's checksum): the checksum fails and
/// nothing is started. An entry written without a checksum (by an agent before them) is
/// still served.
#[test]
fn a_torn_service_entry_starts_nothing() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let map = lb_user::datapath::open_map(&fx.pin_dir, lb_common::map_names::SERVICES).unwrap();
        let mut services: aya::maps::HashMap<_, lb_common::ServiceKey, lb_common::ServiceValue> =
            map.try_into().unwrap();
        let frontend = lb_common::ServiceKey::new(NODE, 30080, IPPROTO_TCP);
        let whole = services.get(&frontend, 0).unwrap();
        assert!(whole.check != 0 && whole.intact(), "the agent seals what it writes");
        let torn = lb_common::ServiceValue { count: [whole.count[0] + 1, whole.count[1]], ..whole };
        services.insert(frontend, torn, 0).unwrap();
        let before = fx.counters();
        let syn = Frame::tcp(sa(CLIENT, 7311), np(30080), SYN).bytes();
        let (action, out, _) = fx.xdp(&syn);
        assert_eq!((action, out), (XDP_PASS, syn), "a torn entry starts nothing");
        assert_eq!(delta(fx, &before, "entry_reused"), 1);
        assert_eq!(delta(fx, &before, "new_flow"), 0);
        assert!(fx.ct_entries().is_empty());
        services.insert(frontend, lb_common::ServiceValue { check: 0, ..whole }, 0).unwrap();
        snat_of(fx, &Frame::tcp(sa(CLIENT, 7312), np(30080), SYN));
        assert_eq!(delta(fx, &before, "new_flow"), 1, "an entry without a checksum is served");
    });
}

/// `--conntrack-memory preallocated`: the table is created preallocated (flags without
/// BPF_F_NO_PREALLOC) at the configured size, serves flows like the on-demand one, and a
/// load asking for the other kind over it is refused with an error naming the option.
#[test]
fn a_preallocated_table_serves_flows_and_keeps_its_kind() {
    use lb_user::datapath::{Capacity, ConntrackMemory, Datapath};
    let setup = Setup { conntrack_memory: ConntrackMemory::Preallocated, ..Setup::fast((40000, 40099)) };
    with_fixture(setup, |fx| {
        let pin = fx.pin_dir.join("maps").join(lb_common::map_names::CONNTRACK);
        let info = aya::maps::MapData::from_pin(pin).unwrap().info().unwrap();
        assert_eq!(info.map_flags() & 1, 0, "preallocated: no BPF_F_NO_PREALLOC");
        assert_eq!(info.max_entries(), fx.setup.conntrack_entries);
        let client = sa(CLIENT, 7401);
        let nat = snat_of(fx, &Frame::udp(client, np(30080)));
        let (_, out, _) = fx.xdp(&Frame::udp(sa(REMOTE_POD, 8080), nat).bytes());
        assert_eq!(endpoints(&out), (np(30080), client), "the reply reaches its client");
        assert_eq!(fx.ct_counted(), 2);

        let on_demand = Capacity { conntrack_entries: fx.setup.conntrack_entries, ..Capacity::default() };
        let refused = Datapath::load(&fx.pin_dir, on_demand).err().expect("the other kind is refused");
        let text = refused.to_string();
        assert!(
            text.contains("the pinned conntrack table is preallocated")
                && text.contains("--conntrack-memory asks for on-demand")
                && text.contains("start with --conntrack-memory preallocated"),
            "{text}"
        );
        assert_eq!(fx.ct_counted(), 2, "and nothing was touched");
    });
}

/// LB_FRAGMENTS is an LRU: an element reused for another datagram while a later fragment
/// reads it holds that datagram's key, and the fragment is not given its addresses.
#[test]
fn a_fragment_entry_reused_for_another_datagram_is_not_followed() {
    with_fixture(Setup::fast((40000, 40099)), |fx| {
        let datagram = Frame { payload: (0..40).collect(), ..Frame::udp(sa(CLIENT, 6100), np(30080)) }.bytes();
        let (first, later) = fragments(&datagram);
        fx.xdp(&first);
        let map = lb_user::datapath::open_map(&fx.pin_dir, lb_common::map_names::FRAGMENTS).unwrap();
        let mut frags: aya::maps::HashMap<_, lb_common::FragKey, lb_common::FragValue> = map.try_into().unwrap();
        let (key, value) = frags.iter().map(Result::unwrap).next().expect("the first fragment is remembered");
        assert_eq!(value.key, key, "an entry names its key");
        let other = lb_common::FragKey { id_be: key.id_be ^ 0x0101, ..key };
        frags.insert(key, lb_common::FragValue { key: other, ..value }, 0).unwrap();
        let before = fx.counters();
        let (action, out, _) = fx.xdp(&later);
        assert_eq!((action, out), (XDP_PASS, later), "passed untouched");
        assert_eq!(delta(fx, &before, "pass_fragment_unmatched"), 1);
        assert_eq!(delta(fx, &before, "entry_reused"), 1);
    });
}
