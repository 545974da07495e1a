//! Needs root and BPF. NodePorts on 127.0.0.1 exist for the socket hooks alone: a packet
//! addressed to loopback that arrives on a device is a martian, and the packet path must
//! not hand it to a backend (CVE-2020-8558 was kube-proxy letting neighbours reach
//! localhost this way). BPF_PROG_TEST_RUN through XDP and tc with the loopback frontend in
//! the maps as the reconciler writes it, beside the same entry without the flag.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{service_flags, user::addr_be, ServiceKey, IPPROTO_TCP};
use lb_tests::{
    fixture::*,
    packet::{Frame, SYN},
};
use lb_user::datapath::maps::{MapStore, PinnedMaps};

/// Puts NODE:30081's entry (a local backend) at 127.0.0.1:`port` with `flags` added, and
/// sets its bit in the frontend filter, so the lookup finds it.
fn loopback_frontend(fx: &Fixture, port: u16, flags: u32) {
    let mut maps = PinnedMaps::open(&fx.pin_dir).unwrap();
    let services = maps.services().unwrap();
    let node_port = ServiceKey::new(NODE, 30081, IPPROTO_TCP);
    let (_, value) = services.iter().find(|(k, _)| *k == node_port).expect("np-local's NodePort");
    let loopback = ServiceKey::new(Ipv4Addr::LOCALHOST, port, IPPROTO_TCP);
    maps.put_service(loopback, lb_common::ServiceValue { flags: value.flags | flags, key: loopback, ..*value })
        .unwrap();
    let bit = lb_common::front_filter_bit(addr_be(Ipv4Addr::LOCALHOST), port.to_be());
    let word = maps.filter_words().unwrap().into_iter().find(|(i, _)| *i == bit / 64).map_or(0, |(_, w)| w);
    maps.put_filter_word(bit / 64, word | 1 << (bit % 64)).unwrap();
}

#[test]
fn packets_to_a_loopback_node_port_pass_untranslated_through_xdp_and_tc() {
    with_fixture(Setup::fast((40000, 40999)), |fx| {
        loopback_frontend(fx, 30081, service_flags::LOOPBACK);
        let syn = Frame::tcp(SocketAddrV4::new(CLIENT, 41000), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 30081), SYN);
        let before = fx.counters();
        let (action, out, meta) = fx.xdp(&syn.bytes());
        assert_eq!((action, out, meta), (XDP_PASS, syn.bytes(), None), "XDP leaves it to the stack, untouched");
        let (action, out) = fx.tc_pod(&syn.bytes());
        assert_eq!((action, out), (TC_ACT_OK, syn.bytes()), "tc leaves it to the stack, untouched");
        let after = fx.counters();
        assert_eq!(after["pass_not_service"] - before["pass_not_service"], 2);
        assert_eq!(after["new_flow"], before["new_flow"]);
        assert!(fx.ct_entries().is_empty(), "no flow was started");

        // The same entry without the flag would be translated: the flag alone decides.
        loopback_frontend(fx, 30081, 0);
        let (action, out, _) = fx.xdp(&syn.bytes());
        assert!(action != XDP_PASS || out != syn.bytes(), "an unflagged entry is a frontend like any other");
        assert_eq!(fx.counters()["new_flow"], before["new_flow"] + 1);
    })
}
