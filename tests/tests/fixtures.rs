//! Needs root and BPF. Katran-style BPF_PROG_TEST_RUN fixtures: ordered {input packet,
//! expected action, expected output bytes} against one scripted map state, then counter
//! checks. The map state is written the way the agent writes it (manifests -> model ->
//! reconciler -> pinned maps). Runs inside a namespace made here, whose uplink has a fixed
//! MAC and static neighbours, so that FIB lookups (and so XDP_TX versus handing over to tc)
//! are deterministic.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    conntrack::{phase, Phase},
    ct_flags, IPPROTO_TCP, IPPROTO_UDP, XDP_META_REDIRECT,
};
use lb_tests::{
    fixture::*,
    packet::{checksums_ok, endpoints, Frame, ACK, CLIENT_MAC, FIN, NODE_MAC, RST, SYN},
};

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// `frame` with new endpoints, TTL and MACs: what a correct translation must produce,
/// built from scratch (all checksums recomputed, not updated).
fn expected(frame: &Frame, src: SocketAddrV4, dst: SocketAddrV4, ttl: u8, macs: Option<([u8; 6], [u8; 6])>) -> Vec<u8> {
    let mut f = Frame { src, dst, ttl, ..frame.clone() }.bytes();
    if let Some((dmac, smac)) = macs {
        f[0..6].copy_from_slice(&dmac);
        f[6..12].copy_from_slice(&smac);
    }
    f
}

/// The ICMP port unreachable answer to `frame`, built independently of the datapath.
fn port_unreachable(frame: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&frame[6..12]);
    a.extend_from_slice(&frame[0..6]);
    a.extend_from_slice(&[0x08, 0x00, 0x45, 0xc0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0]);
    a.extend_from_slice(&frame[30..34]);
    a.extend_from_slice(&frame[26..30]);
    let c = lb_common::checksum::checksum(&a[14..34], 0);
    a[24..26].copy_from_slice(&c.to_be_bytes());
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&frame[14..42]);
    let c = lb_common::checksum::checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    a.extend_from_slice(&icmp);
    a
}

/// An ICMP error frame from `from` to `to` quoting `quoted_src -> quoted_dst`, built from
/// scratch with every checksum computed (the quoted transport checksum is not quoted).
fn icmp_error(
    kind: (u8, u8),
    from: Ipv4Addr,
    to: Ipv4Addr,
    quoted_src: SocketAddrV4,
    quoted_dst: SocketAddrV4,
    proto: u8,
    ttl: u8,
) -> Vec<u8> {
    use lb_common::checksum::checksum;
    let mut inner = vec![0x45, 0, 0, 48, 0x12, 0x34, 0x40, 0, 63, proto, 0, 0];
    inner.extend_from_slice(&quoted_src.ip().octets());
    inner.extend_from_slice(&quoted_dst.ip().octets());
    let c = checksum(&inner, 0);
    inner[10..12].copy_from_slice(&c.to_be_bytes());
    inner.extend_from_slice(&quoted_src.port().to_be_bytes());
    inner.extend_from_slice(&quoted_dst.port().to_be_bytes());
    inner.extend_from_slice(&[0, 0, 0, 0]);
    let mut icmp =
        vec![kind.0, kind.1, 0, 0, 0, 0, if kind == (3, 4) { 5 } else { 0 }, if kind == (3, 4) { 0xdc } else { 0 }];
    icmp.extend_from_slice(&inner);
    let c = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, (20 + icmp.len()) as u8, 0, 1, 0, 0, ttl, 1, 0, 0];
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = [NODE_MAC, CLIENT_MAC].concat();
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn xdp_and_tc_rewrites_byte_for_byte() {
    with_fixture(Setup::fast((40000, 40999)), run_fixtures);
}

fn run_fixtures(fx: &mut Fixture) {
    let client = sa(CLIENT, 5555);

    // 1. NodePort, backend on another node: DNAT + SNAT, out of eth0 again with XDP_TX.
    let syn = Frame::tcp(client, sa(NODE, 30080), SYN);
    let (action, out, _) = fx.xdp(&syn.bytes());
    assert_eq!(action, XDP_TX, "NodePort to a remote backend leaves by XDP_TX");
    let fwd = fx.conntrack(client, sa(NODE, 30080), IPPROTO_TCP).expect("forward conntrack entry");
    let snat_port = u16::from_be(fwd.nat_src_port_be);
    assert!((40000..=40999).contains(&snat_port), "SNAT port {snat_port} from the configured range");
    assert_eq!(fwd.flags & ct_flags::SNAT, ct_flags::SNAT);
    assert_eq!(
        out,
        expected(&syn, sa(NODE, snat_port), sa(REMOTE_POD, 8080), 63, Some((NODE2_MAC, NODE_MAC))),
        "DNAT+SNAT bytes"
    );
    assert!(checksums_ok(&out));
    let chosen = fx.backend(fwd.backend_id).expect("the flow's backend id is in LB_BACKENDS");
    assert_eq!(
        (chosen.ip(), chosen.port()),
        (REMOTE_POD, 8080),
        "userspace resolves the kernel's choice to the address it wrote"
    );

    // 2. The backend's answer: un-SNAT and un-DNAT, back to the client by XDP_TX.
    let synack = Frame::tcp(sa(REMOTE_POD, 8080), sa(NODE, snat_port), SYN | ACK);
    let (action, out, _) = fx.xdp(&synack.bytes());
    assert_eq!(action, XDP_TX);
    assert_eq!(out, expected(&synack, sa(NODE, 30080), client, 63, Some((CLIENT_MAC, NODE_MAC))), "reply bytes");
    let reply_entry = fx.conntrack(sa(REMOTE_POD, 8080), sa(NODE, snat_port), IPPROTO_TCP).unwrap();
    assert_eq!(phase(reply_entry.state), Phase::Established, "the handshake answer established the flow");

    // 3. The rest of the flow keeps its translation; FIN moves it to closing.
    let ack = Frame::tcp(client, sa(NODE, 30080), ACK);
    let (action, out, _) = fx.xdp(&ack.bytes());
    assert_eq!(
        (action, out),
        (XDP_TX, expected(&ack, sa(NODE, snat_port), sa(REMOTE_POD, 8080), 63, Some((NODE2_MAC, NODE_MAC))))
    );
    fx.xdp(&Frame::tcp(client, sa(NODE, 30080), FIN | ACK).bytes());
    assert_eq!(phase(fx.conntrack(client, sa(NODE, 30080), IPPROTO_TCP).unwrap().state), Phase::Closing);

    // 4. A second client gets another SNAT port (no collision).
    let other = sa(CLIENT, 5556);
    let (_, out, _) = fx.xdp(&Frame::tcp(other, sa(NODE, 30080), SYN).bytes());
    let (src, _) = endpoints(&out);
    assert_ne!(src.port(), snat_port);

    // 5. NodePort, local backend, cluster policy: DNAT only, handed to tc (route via veth0).
    let syn = Frame::tcp(client, sa(NODE, 30081), SYN);
    let (action, out, meta) = fx.xdp(&syn.bytes());
    assert_eq!(
        (action, meta.map(|m| m.tag)),
        (XDP_PASS, Some(XDP_META_REDIRECT)),
        "translated, handed over for forwarding"
    );
    assert_eq!(out, expected(&syn, client, sa(LOCAL_POD, 8080), 64, None), "DNAT only, client address kept");

    // 6. externalTrafficPolicy=Local: local backend, client address kept. (Another client
    // port: from 5555 the reply tuple would be step 5's, see conntrack_fixtures.)
    let etp_client = sa(CLIENT, 5560);
    let syn = Frame::tcp(etp_client, sa(NODE, 30082), SYN);
    let (action, out, meta) = fx.xdp(&syn.bytes());
    assert_eq!((action, meta.map(|m| m.tag)), (XDP_PASS, Some(XDP_META_REDIRECT)));
    assert_eq!(out, expected(&syn, etp_client, sa(LOCAL_POD, 8080), 64, None));

    // 7. externalTrafficPolicy=Local without a local backend: dropped.
    let syn = Frame::tcp(client, sa(NODE, 30083), SYN).bytes();
    assert_eq!(fx.xdp(&syn).0, XDP_DROP);

    // 8. No endpoints at all: refused and sent back by XDP_TX; UDP with ICMP port
    // unreachable, TCP with a reset.
    let frame = Frame::udp(client, sa(NODE, 30099)).bytes();
    let (action, out, _) = fx.xdp(&frame);
    assert_eq!(action, XDP_TX);
    assert_eq!(out, port_unreachable(&frame), "ICMP port unreachable bytes");
    assert!(checksums_ok(&out));
    let syn = Frame::tcp(client, sa(NODE, 30099), SYN);
    let (action, out, _) = fx.xdp(&syn.bytes());
    assert_eq!(action, XDP_TX);
    assert_eq!((out.len(), endpoints(&out)), (54, (sa(NODE, 30099), client)), "back from the frontend");
    assert_eq!(&out[0..12], &[CLIENT_MAC, NODE_MAC].concat()[..]);
    assert_eq!(out[47], RST | ACK);
    assert_eq!(&out[42..46], &1001u32.to_be_bytes(), "acknowledging the SYN (seq 1000)");
    assert!(checksums_ok(&out));

    // 9. loadBalancerSourceRanges: only 192.168.50.101 may use the LB IP.
    assert_eq!(fx.xdp(&Frame::tcp(client, sa(Ipv4Addr::new(192, 168, 60, 6), 80), SYN).bytes()).0, XDP_DROP);
    let allowed = Frame::tcp(sa(CLIENT2, 7000), sa(Ipv4Addr::new(192, 168, 60, 6), 80), SYN);
    let (action, out, _) = fx.xdp(&allowed.bytes());
    assert_eq!(action, XDP_PASS);
    assert_eq!(out, expected(&allowed, sa(CLIENT2, 7000), sa(LOCAL_POD, 8080), 64, None));

    // 10. UDP through the remote NodePort, once with a checksum and once without (0 stays 0).
    let udp = Frame::udp(sa(CLIENT, 6000), sa(NODE, 30080));
    let (action, out, _) = fx.xdp(&udp.bytes());
    let udp_port = u16::from_be(fx.conntrack(sa(CLIENT, 6000), sa(NODE, 30080), IPPROTO_UDP).unwrap().nat_src_port_be);
    assert_eq!(
        (action, out),
        (XDP_TX, expected(&udp, sa(NODE, udp_port), sa(REMOTE_POD, 8080), 63, Some((NODE2_MAC, NODE_MAC))))
    );
    let bare = Frame { udp_no_checksum: true, ..Frame::udp(sa(CLIENT, 6001), sa(NODE, 30080)) };
    let (_, out, _) = fx.xdp(&bare.bytes());
    assert_eq!(&out[40..42], &[0, 0], "a UDP datagram without checksum stays without");
    let port = u16::from_be(fx.conntrack(sa(CLIENT, 6001), sa(NODE, 30080), IPPROTO_UDP).unwrap().nat_src_port_be);
    assert_eq!(out, expected(&bare, sa(NODE, port), sa(REMOTE_POD, 8080), 63, Some((NODE2_MAC, NODE_MAC))));

    // 11. Negatives: pass unchanged (counted), or drop what is cut short.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let mut ipv6 = Frame::tcp(client, sa(NODE, 30080), SYN).bytes();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    let mut fragment = Frame::udp(client, sa(NODE, 30080)).bytes();
    fragment[21] = 0x10; // a later fragment (offset 16 x 8 bytes) whose first was never seen
    let mut options = Frame::tcp(client, sa(NODE, 30080), SYN).bytes();
    options[14] = 0x46;
    let mut icmp_echo = Frame::udp(client, sa(NODE, 30080)).bytes();
    icmp_echo[23] = 1;
    let passes: Vec<(&str, Vec<u8>, &str)> = vec![
        ("TCP to a non-frontend port", Frame::tcp(client, sa(NODE, 22), SYN).bytes(), "pass_not_service"),
        ("UDP to a non-frontend port", Frame::udp(client, sa(NODE, 53)).bytes(), "pass_not_service"),
        ("ICMP", icmp_echo, "pass_not_service"),
        ("ARP", arp, "pass_not_ipv4"),
        ("IPv6", ipv6, "pass_not_ipv4"),
        ("a stray later fragment", fragment, "pass_fragment_unmatched"),
        ("IPv4 options", options, "pass_ip_options"),
    ];
    for (what, frame, counter) in passes {
        let before = fx.counters()[counter];
        let (action, out, meta) = fx.xdp(&frame);
        assert_eq!((action, &out, meta), (XDP_PASS, &frame, None), "{what} passes unchanged");
        assert_eq!(fx.counters()[counter], before + 1, "{what} counted as {counter}");
    }
    let full = Frame::tcp(client, sa(NODE, 30080), SYN).bytes();
    let udp_full = Frame::udp(client, sa(NODE, 30080)).bytes();
    for (what, frame) in [("IPv4 header", &full[..30]), ("TCP header", &full[..44]), ("UDP header", &udp_full[..38])] {
        let before = fx.counters()["drop_malformed"];
        assert_eq!(fx.xdp(frame).0, XDP_DROP, "cut inside the {what}: dropped");
        assert_eq!(fx.counters()["drop_malformed"], before + 1);
    }

    // 12. East-west at tc: ClusterIP from a pod, DNAT only; the answer reverse-translated.
    let pod_client = sa(OTHER_LOCAL_POD, 33000);
    let syn = Frame::tcp(pod_client, sa(Ipv4Addr::new(10, 96, 0, 10), 80), SYN);
    let (action, out) = fx.tc_pod(&syn.bytes());
    assert_eq!(action, TC_ACT_REDIRECT, "forwarded with bpf_redirect_neigh");
    assert_eq!(out, expected(&syn, pod_client, sa(LOCAL_POD, 8080), 63, None), "ClusterIP DNAT bytes");
    let synack = Frame::tcp(sa(LOCAL_POD, 8080), pod_client, SYN | ACK);
    let (action, out) = fx.tc_pod(&synack.bytes());
    assert_eq!(
        (action, out),
        (TC_ACT_REDIRECT, expected(&synack, sa(Ipv4Addr::new(10, 96, 0, 10), 80), pod_client, 63, None))
    );

    // 13. Hairpin: the backend reaching itself through its Service is SNATed to the node.
    let me = sa(LOCAL_POD, 34000);
    let syn = Frame::tcp(me, sa(Ipv4Addr::new(10, 96, 0, 10), 80), SYN);
    let (action, out) = fx.tc_pod(&syn.bytes());
    let port =
        u16::from_be(fx.conntrack(me, sa(Ipv4Addr::new(10, 96, 0, 10), 80), IPPROTO_TCP).unwrap().nat_src_port_be);
    assert_eq!(
        (action, out),
        (TC_ACT_REDIRECT, expected(&syn, sa(NODE, port), sa(LOCAL_POD, 8080), 63, None)),
        "hairpin bytes"
    );
    let answer = Frame::tcp(sa(LOCAL_POD, 8080), sa(NODE, port), SYN | ACK);
    let (_, out) = fx.tc_pod(&answer.bytes());
    assert_eq!(out, expected(&answer, sa(Ipv4Addr::new(10, 96, 0, 10), 80), me, 63, None));

    // 14. tc refusal: ICMP answer redirected back to the pod; non-frontend traffic passes.
    let frame = Frame::udp(pod_client, sa(Ipv4Addr::new(10, 96, 0, 99), 53)).bytes();
    let (action, out) = fx.tc_pod(&frame);
    assert_eq!((action, out), (TC_ACT_REDIRECT, port_unreachable(&frame)));
    let frame = Frame::tcp(pod_client, sa(REMOTE_POD, 8080), SYN).bytes();
    assert_eq!(fx.tc_pod(&frame), (TC_ACT_OK, frame.clone()), "pod-to-pod traffic passes unchanged");

    // 15. A ClusterIP reached from outside the cluster CIDR (at XDP) is SNATed to the node.
    let outsider = sa(CLIENT, 7100);
    let syn = Frame::tcp(outsider, sa(Ipv4Addr::new(10, 96, 0, 10), 80), SYN);
    let (action, out, meta) = fx.xdp(&syn.bytes());
    let port = u16::from_be(
        fx.conntrack(outsider, sa(Ipv4Addr::new(10, 96, 0, 10), 80), IPPROTO_TCP).unwrap().nat_src_port_be,
    );
    assert_eq!((action, meta.map(|m| m.tag)), (XDP_PASS, Some(XDP_META_REDIRECT)));
    assert_eq!(out, expected(&syn, sa(NODE, port), sa(LOCAL_POD, 8080), 64, None), "ClusterIP from outside: DNAT+SNAT");

    // 16. ICMP errors about translated flows go back translated for the client's stack.
    // From the backend, about the UDP flow of step 10 (client 6000 -> SNAT port `udp_port`).
    let err = icmp_error((3, 3), REMOTE_POD, NODE, sa(NODE, udp_port), sa(REMOTE_POD, 8080), IPPROTO_UDP, 64);
    let (action, out, _) = fx.xdp(&err);
    let want = icmp_error((3, 3), NODE, CLIENT, sa(CLIENT, 6000), sa(NODE, 30080), IPPROTO_UDP, 63);
    assert_eq!((action, &out[12..]), (XDP_TX, &want[12..]), "port unreachable from the backend");
    assert_eq!(&out[..12], &[CLIENT_MAC, NODE_MAC].concat()[..]);
    // From a router on the way, about the TCP flow of step 1: the router stays the source.
    let router = Ipv4Addr::new(10, 244, 2, 1);
    let err = icmp_error((3, 4), router, NODE, sa(NODE, snat_port), sa(REMOTE_POD, 8080), IPPROTO_TCP, 64);
    let (_, out, _) = fx.xdp(&err);
    let want = icmp_error((3, 4), router, CLIENT, client, sa(NODE, 30080), IPPROTO_TCP, 63);
    assert_eq!(&out[12..], &want[12..], "fragmentation needed from a router");
    // About a flow nobody translated: untouched.
    let stray = icmp_error((3, 3), REMOTE_POD, NODE, sa(NODE, 1), sa(REMOTE_POD, 2), IPPROTO_UDP, 64);
    assert_eq!(fx.xdp(&stray), (XDP_PASS, stray.clone(), None));
    // At tc, from a local backend about the ClusterIP flow of step 12.
    let err = icmp_error((3, 3), LOCAL_POD, OTHER_LOCAL_POD, pod_client, sa(LOCAL_POD, 8080), IPPROTO_TCP, 64);
    let (action, out) = fx.tc_pod(&err);
    let want = icmp_error(
        (3, 3),
        Ipv4Addr::new(10, 96, 0, 10),
        OTHER_LOCAL_POD,
        pod_client,
        sa(Ipv4Addr::new(10, 96, 0, 10), 80),
        IPPROTO_TCP,
        63,
    );
    assert_eq!((action, out), (TC_ACT_REDIRECT, want), "the ClusterIP, not the pod, reports the error");

    // Counters: every translated and refused packet above, exactly.
    let c = fx.counters();
    assert_eq!(c["new_flow"], 10, "{c:?}");
    assert_eq!(c["established"], 2, "{c:?}");
    assert_eq!(c["reply"], 3, "{c:?}");
    assert_eq!(c["refused_no_backend"], 3, "{c:?}");
    assert_eq!(c["drop_no_local_backend"], 1, "{c:?}");
    assert_eq!(c["drop_source_range"], 1, "{c:?}");
    assert_eq!(c["xdp_tx"], 9, "{c:?}");
    assert_eq!(c["icmp_error_translated"], 3, "{c:?}");
}

#[test]
fn snat_never_takes_a_port_the_node_itself_uses() {
    with_fixture(Setup::fast((45000, 45001)), |fx| {
        let node_port = |p| sa(NODE, p);
        // The node's own sockets on both SNAT ports: a listener and a bound UDP socket each.
        let tcp_45000 = std::net::TcpListener::bind(node_port(45000)).unwrap();
        let tcp_45001 = std::net::TcpListener::bind(node_port(45001)).unwrap();
        let udp_45000 = std::net::UdpSocket::bind(node_port(45000)).unwrap();
        let udp_45001 = std::net::UdpSocket::bind(node_port(45001)).unwrap();
        let tcp = Frame::tcp(sa(CLIENT, 5555), node_port(30080), SYN).bytes();
        let udp = Frame::udp(sa(CLIENT, 5555), node_port(30080)).bytes();
        assert_eq!(fx.xdp(&tcp).0, XDP_DROP, "no port the node uses is taken");
        assert_eq!(fx.xdp(&udp).0, XDP_DROP);
        assert_eq!(fx.counters()["drop_nat_exhausted"], 2);
        drop((tcp_45001, udp_45000));
        let (action, out, _) = fx.xdp(&tcp);
        assert_eq!((action, endpoints(&out).0), (XDP_TX, node_port(45001)), "TCP takes the port no TCP socket holds");
        let (action, out, _) = fx.xdp(&udp);
        assert_eq!((action, endpoints(&out).0), (XDP_TX, node_port(45000)), "UDP takes the port no UDP socket holds");
        drop((tcp_45000, udp_45001));
    });
}
