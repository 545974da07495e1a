//! Needs root and BPF: the agent's conntrack sweep on the real, pinned map.
use aya::maps::HashMap;
use lb_common::{
    conntrack::{timeout_ns, State},
    map_names, CtKey, CtValue, IPPROTO_TCP, IPPROTO_UDP,
};
use lb_user::datapath::{
    self,
    conntrack::{monotonic_now_ns, sweep},
    Datapath,
};

fn key(port: u16, proto: u8) -> CtKey {
    CtKey { src_addr_be: 1, dst_addr_be: 2, src_port_be: port.to_be(), dst_port_be: 80u16.to_be(), proto, _pad: [0; 3] }
}

fn value(state: State, last_seen_ns: u64) -> CtValue {
    CtValue {
        last_seen_ns,
        nat_src_addr_be: 0,
        nat_dst_addr_be: 0,
        nat_src_port_be: 0,
        nat_dst_port_be: 0,
        backend_id: 1,
        state: state as u8,
        flags: 0,
        _pad: [0; 6],
    }
}

#[test]
fn sweep_removes_expired_entries_and_keeps_live_ones() {
    lb_tests::require_root();
    let pins = lb_tests::Pins::new(&format!("lbt-{}-conntrack", std::process::id()));
    let _dp = Datapath::load(&pins.0).unwrap();
    let mut ct: HashMap<_, CtKey, CtValue> =
        datapath::open_map(&pins.0, map_names::CONNTRACK).unwrap().try_into().unwrap();
    let now = monotonic_now_ns();
    let ago = |state, proto| now - timeout_ns(proto, state) - 1_000_000_000;
    ct.insert(key(1, IPPROTO_TCP), value(State::Reset, ago(State::Reset, IPPROTO_TCP)), 0).unwrap();
    ct.insert(key(2, IPPROTO_TCP), value(State::Established, ago(State::Reset, IPPROTO_TCP)), 0).unwrap();
    ct.insert(key(3, IPPROTO_UDP), value(State::New, ago(State::New, IPPROTO_UDP)), 0).unwrap();
    ct.insert(key(4, IPPROTO_UDP), value(State::Established, now), 0).unwrap();
    assert_eq!(sweep(&mut ct, monotonic_now_ns()).unwrap(), 2);
    let mut left: Vec<u16> = ct.keys().map(|k| u16::from_be(k.unwrap().src_port_be)).collect();
    left.sort();
    assert_eq!(left, [2, 4], "a reset TCP flow and an unanswered UDP flow past their timeouts are gone");
}
