//! Needs root and BPF. Property-based tests of the datapath: generated packets, and
//! sequences that open, use and close flows, run through the loaded programs (XDP uplink,
//! tc pod) with BPF_PROG_TEST_RUN against the fixture's scripted map state. After every
//! packet, whatever the sequence, these must hold:
//! 1. A packet neither for a frontend nor part of a tracked flow leaves unchanged (pass,
//!    same bytes, no XDP metadata).
//! 2. A rewritten packet has valid IPv4 and L4 checksums when it came with valid ones (UDP
//!    without a checksum keeps 0); answers the datapath builds (resets, ICMP) always do.
//! 3. Every packet increments exactly one counter, but for those counted in addition
//!    (`EXTRA`), each under its own rule; a drop's counter is a drop reason (drop_*).
//! 4. A dropped packet leaves no new conntrack entry.
//! 5. Conntrack halves come in pairs (each peer present, with the same nonce, state and
//!    stamp), and LB_CT_STATE counts exactly the entries there are.
//!
//! And, where a case shows them: fragments of a translated datagram are translated like
//! its first (the datagram put together again has a valid L4 checksum); "fragmentation
//! needed" answers only packets with DF set.
//!
//! Replies and ICMP errors are built from what the datapath actually sent (its output fed
//! back), so they meet the tuples it chose. Every case starts from empty conntrack,
//! fragment and rate-limit maps, so a failure shrinks to a sequence that fails on its own.
//!
//! Cases: `LB_PROPERTY_CASES` (default 100 000) split over the tests below by fixed
//! shares, e.g. `LB_PROPERTY_CASES=1000000 cargo test -p lb-tests --test properties`.
//! `PROPTEST_RNG_SEED` fixes the seed. A failure prints the minimal sequence and, for each
//! of its packets, the frames in and out in hex with the counters they moved.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{
    checksum::checksum,
    conntrack::{bits, nonce},
    counters::{self, Counter},
    ct_flags, map_names,
    user::{addr_be, ip_from_be},
    CtKey, CtValue, FragKey, FragValue, ServiceKey, ServiceValue, XdpMeta, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    XDP_META_MARK, XDP_META_PARTIAL, XDP_META_REDIRECT,
};
use lb_tests::{
    fixture::*,
    packet::{l4_checksum, CLIENT_MAC, NODE_MAC},
};
use lb_user::datapath::{self, conntrack::Conntrack};
use proptest::{
    prelude::*,
    sample::{select, Index},
    test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRunner},
};

const ACK: u8 = 0x10;
const SYN: u8 = 0x02;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;

const XDP_ABORTED: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// The fixture's SNAT port range for the sequence tests: narrow, so that exhaustion and
/// port reuse happen within a case.
const SNAT_PORTS: (u16, u16) = (40000, 40001);
/// Small: reading every entry after every packet walks all of the hash table's buckets.
const CONNTRACK_ENTRIES: u32 = 1024;
/// An address outside every prefix the fixture knows (no route: the FIB lookup fails).
const STRANGER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// Routers that send ICMP errors about flows: on the client side, and on node2's side.
const CLIENT_ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const POD_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
const LOCAL_PODS: (Ipv4Addr, u32) = (Ipv4Addr::new(10, 244, 1, 0), 24);

/// Counted in addition to the packet's one counter.
const EXTRA: [&str; 5] = ["xdp_tx", "snat_on_collision", "backend_gone_rechosen", "flow_orphaned", "entry_reused"];
/// What a translated packet is counted as.
const TRANSLATED: [&str; 5] = ["new_flow", "established", "reply", "icmp_error_translated", "fragment_translated"];
/// What an answer the datapath sends (ICMP destination unreachable, TCP reset) is counted as.
const ANSWERED: [&str; 5] =
    ["refused_no_backend", "reset_no_flow", "reset_backend_gone", "icmp_error_translated", "frag_needed_answered"];

// ---------------------------------------------------------------------------------------
// Frames

/// An IPv4 packet as generated: TCP, UDP or ICMP echo, with everything a test varies.
#[derive(Clone, Debug)]
struct Pkt {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: u8,
    tcp_flags: u8,
    /// UDP: computed checksum (true) or none (0).
    udp_checksum: bool,
    payload: usize,
    ttl: u8,
    ip_id: u16,
    df: bool,
    /// IPv4 option words (IHL = 5 + this), NOPs ending with EOL.
    ip_options: u8,
    /// TCP option words (data offset = 5 + this).
    tcp_options: u8,
}

impl Pkt {
    /// The L4 segment, checksum complete.
    fn segment(&self) -> Vec<u8> {
        let payload: Vec<u8> = (0..self.payload).map(|i| (i * 7 + 3) as u8).collect();
        let mut l4 = match self.proto {
            IPPROTO_TCP => {
                let opts = self.tcp_options as usize * 4;
                let mut t = vec![0u8; 20 + opts];
                t[4..8].copy_from_slice(&1000u32.to_be_bytes());
                if self.tcp_flags & ACK != 0 {
                    t[8..12].copy_from_slice(&2000u32.to_be_bytes());
                }
                t[12] = (5 + self.tcp_options) << 4;
                t[13] = self.tcp_flags;
                t[14..16].copy_from_slice(&64240u16.to_be_bytes());
                t[20..].fill(1);
                t
            }
            IPPROTO_UDP => {
                let mut u = vec![0u8; 8];
                u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                u
            }
            _ => vec![8, 0, 0, 0, 0x12, 0x34, 0, 1],
        };
        if self.proto != IPPROTO_ICMP {
            l4[0..2].copy_from_slice(&self.src.port().to_be_bytes());
            l4[2..4].copy_from_slice(&self.dst.port().to_be_bytes());
        }
        l4.extend_from_slice(&payload);
        let check_off = match self.proto {
            IPPROTO_TCP => 16,
            IPPROTO_UDP => 6,
            _ => 2,
        };
        let c = match self.proto {
            IPPROTO_ICMP => checksum(&l4, 0),
            IPPROTO_UDP if !self.udp_checksum => 0,
            IPPROTO_UDP => match l4_checksum(self.src.ip(), self.dst.ip(), IPPROTO_UDP, &l4) {
                0 => 0xffff,
                c => c,
            },
            p => l4_checksum(self.src.ip(), self.dst.ip(), p, &l4),
        };
        l4[check_off..check_off + 2].copy_from_slice(&c.to_be_bytes());
        l4
    }

    fn header(&self) -> Ipv4 {
        Ipv4 {
            src: *self.src.ip(),
            dst: *self.dst.ip(),
            proto: self.proto,
            ttl: self.ttl,
            id: self.ip_id,
            df: self.df,
            more: false,
            offset8: 0,
            options: self.ip_options,
        }
    }

    fn frame(&self) -> Vec<u8> {
        self.header().frame(&self.segment())
    }
}

/// An IPv4 header to build.
#[derive(Clone, Debug)]
struct Ipv4 {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    ttl: u8,
    id: u16,
    df: bool,
    more: bool,
    offset8: u16,
    options: u8,
}

impl Ipv4 {
    /// Ethernet + this header (checksum complete) + `payload`.
    fn frame(&self, payload: &[u8]) -> Vec<u8> {
        let hlen = 20 + self.options as usize * 4;
        let mut ip = vec![0u8; hlen];
        ip[0] = 0x40 | (hlen / 4) as u8;
        ip[2..4].copy_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&self.id.to_be_bytes());
        let flags = (self.df as u16) << 14 | (self.more as u16) << 13 | (self.offset8 & 0x1fff);
        ip[6..8].copy_from_slice(&flags.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        // NOPs, then End of Options List.
        ip[20..].fill(1);
        if hlen > 20 {
            ip[hlen - 1] = 0;
        }
        let c = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = [NODE_MAC, CLIENT_MAC].concat();
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(payload);
        f
    }
}

/// Recomputes the IPv4 header checksum of a frame (its header as IHL says, if it fits).
fn fix_ip_checksum(f: &mut [u8]) {
    let hlen = ((f[14] & 0xf) as usize * 4).max(20);
    if f.len() < 14 + hlen {
        return;
    }
    f[24..26].fill(0);
    let c = checksum(&f[14..14 + hlen], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

/// A fault put into a well-formed frame. Header faults keep the IPv4 checksum right, so
/// the fault is the only one.
#[derive(Clone, Debug)]
enum Mangle {
    None,
    /// Cut to a length in [14, len): BPF_PROG_TEST_RUN refuses frames shorter than an
    /// Ethernet header (and no device delivers them).
    Truncate(Index),
    /// Bytes after the IPv4 total length (Ethernet padding, or garbage).
    Pad(Vec<u8>),
    /// IPv4 version nibble.
    Version(u8),
    /// IHL nibble, without adding or removing header bytes.
    Ihl(u8),
    TotalLength(u16),
    /// A byte anywhere set to a value (checksums left as they were).
    Byte(Index, u8),
    /// The L4 checksum off by one.
    BadL4Checksum,
}

impl Mangle {
    fn apply(&self, mut f: Vec<u8>) -> Vec<u8> {
        match self {
            Mangle::None => {}
            Mangle::Truncate(at) => {
                let len = 14 + at.index(f.len() - 14);
                f.truncate(len);
            }
            Mangle::Pad(bytes) => f.extend_from_slice(bytes),
            Mangle::Version(v) => {
                f[14] = (v << 4) | (f[14] & 0xf);
                fix_ip_checksum(&mut f);
            }
            Mangle::Ihl(ihl) => {
                f[14] = (f[14] & 0xf0) | (ihl & 0xf);
                fix_ip_checksum(&mut f);
            }
            Mangle::TotalLength(len) => {
                f[16..18].copy_from_slice(&len.to_be_bytes());
                fix_ip_checksum(&mut f);
            }
            Mangle::Byte(at, v) => {
                let i = at.index(f.len());
                f[i] = *v;
            }
            Mangle::BadL4Checksum => {
                let l4 = 14 + (f[14] & 0xf) as usize * 4;
                let off = l4 + if f[23] == IPPROTO_TCP { 16 } else { 6 };
                if off + 1 < f.len() {
                    f[off + 1] ^= 1;
                }
            }
        }
        f
    }
}

/// How a datagram's fragments are sent.
#[derive(Clone, Debug)]
enum FragOrder {
    FirstThenLater,
    LaterThenFirst,
    /// The first fragment never arrives.
    LaterOnly,
}

/// A frame to send, as generated.
#[derive(Clone, Debug)]
enum Packet {
    Ip(Pkt, Mangle),
    /// `pkt`'s datagram in two fragments, split after `split` (a multiple of 8 bytes of
    /// L4 data); the later one carries `later_id` instead of the datagram's id if given.
    Fragments {
        pkt: Pkt,
        split: Index,
        later_id: Option<u16>,
        order: FragOrder,
    },
    Arp,
    Ipv6 {
        dst_port: u16,
        flags: u8,
    },
    /// An IPv4 frame behind an 802.1Q tag.
    Vlan(Pkt),
    /// Any bytes after an Ethernet header with this type.
    Raw {
        ethertype: u16,
        bytes: Vec<u8>,
    },
    /// An ICMP message of any type quoting any bytes.
    Icmp {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        kind: (u8, u8),
        quote: Vec<u8>,
    },
    /// An ICMP error quoting a generated packet's IPv4 header and first 8 bytes.
    IcmpQuoting {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        kind: (u8, u8),
        quoted: Pkt,
    },
}

/// An ICMP message from `src` to `dst` whose body (after type, code, checksum, rest of
/// header) is `body`, checksums complete.
fn icmp_frame(src: Ipv4Addr, dst: Ipv4Addr, kind: (u8, u8), body: &[u8]) -> Vec<u8> {
    let mut icmp = vec![kind.0, kind.1, 0, 0, 0, 0, 0, 0];
    if kind == (3, 4) {
        icmp[6..8].copy_from_slice(&1400u16.to_be_bytes());
    }
    icmp.extend_from_slice(body);
    let c = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let ip = Ipv4 { src, dst, proto: IPPROTO_ICMP, ttl: 64, id: 7, df: false, more: false, offset8: 0, options: 0 };
    ip.frame(&icmp)
}

fn ethernet(ethertype: u16, body: &[u8]) -> Vec<u8> {
    let mut f = [NODE_MAC, CLIENT_MAC].concat();
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(body);
    f
}

// ---------------------------------------------------------------------------------------
// Reading frames (whatever their shape: nothing here may panic on a malformed one)

/// IPv4 header facts of a frame, if it has a whole IPv4 header (as IHL says) after an
/// Ethernet header of type IPv4.
struct View<'a> {
    f: &'a [u8],
    hlen: usize,
    /// Bytes from the IPv4 header to the total length, or to the frame's end if shorter.
    tot: usize,
}

impl<'a> View<'a> {
    fn of(f: &'a [u8]) -> Option<View<'a>> {
        if f.len() < 34 || f[12..14] != [0x08, 0x00] {
            return None;
        }
        let hlen = (f[14] & 0xf) as usize * 4;
        let tot = u16::from_be_bytes([f[16], f[17]]) as usize;
        Some(View { f, hlen, tot })
    }
    /// The stack's ip_rcv_core would take it: version 4, IHL >= 5, header and total length
    /// within the frame.
    fn sound(&self) -> bool {
        self.f[14] >> 4 == 4 && self.hlen >= 20 && self.tot >= self.hlen && 14 + self.tot <= self.f.len()
    }
    fn proto(&self) -> u8 {
        self.f[23]
    }
    fn src(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.f[26], self.f[27], self.f[28], self.f[29])
    }
    fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.f[30], self.f[31], self.f[32], self.f[33])
    }
    fn id(&self) -> u16 {
        u16::from_be_bytes([self.f[18], self.f[19]])
    }
    fn offset8(&self) -> u16 {
        u16::from_be_bytes([self.f[20], self.f[21]]) & 0x1fff
    }
    fn more(&self) -> bool {
        self.f[20] & 0x20 != 0
    }
    fn fragment(&self) -> bool {
        self.more() || self.offset8() != 0
    }
    /// The L4 bytes the total length covers (only what the frame holds of them).
    fn l4(&self) -> &'a [u8] {
        let end = (14 + self.tot).min(self.f.len());
        self.f.get(14 + self.hlen..end).unwrap_or(&[])
    }
    fn ports(&self) -> Option<(u16, u16)> {
        let l4 = self.l4();
        (l4.len() >= 4).then(|| (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]])))
    }
    fn key(&self) -> Option<CtKey> {
        let (sport, dport) = self.ports()?;
        Some(key_of(self.src(), sport, self.dst(), dport, self.proto()))
    }
    fn tcp_flags(&self) -> u8 {
        if self.proto() == IPPROTO_TCP {
            self.l4().get(13).copied().unwrap_or(0)
        } else {
            0
        }
    }
}

fn key_of(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> CtKey {
    CtKey {
        src_addr_be: addr_be(src),
        dst_addr_be: addr_be(dst),
        src_port_be: sport.to_be(),
        dst_port_be: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

fn in_local_pods(ip: Ipv4Addr) -> bool {
    u32::from(ip) >> (32 - LOCAL_PODS.1) == u32::from(LOCAL_PODS.0) >> (32 - LOCAL_PODS.1)
}

/// The checksum of `l4` with the pseudo-header of `v`'s addresses and protocol.
fn l4_sum_ok(v: &View, l4: &[u8]) -> bool {
    match v.proto() {
        IPPROTO_UDP if l4.len() >= 8 && l4[6..8] == [0, 0] => true,
        IPPROTO_ICMP => checksum(l4, 0) == 0,
        p => l4_checksum(&v.src(), &v.dst(), p, l4) == 0,
    }
}

/// Are the frame's IPv4 header checksum and (for a whole datagram) its L4 checksum valid?
/// For an ICMP error, with `quote`, the quoted IPv4 header's too (an answer quotes the
/// offending header as it came). Err names the first that is not.
fn checksums(f: &[u8], quote: bool) -> Result<(), &'static str> {
    let v = View::of(f).filter(View::sound).ok_or("not a sound IPv4 frame")?;
    if checksum(&f[14..14 + v.hlen], 0) != 0 {
        return Err("IPv4 header checksum");
    }
    if v.fragment() {
        return Ok(());
    }
    let l4 = v.l4();
    let min = match v.proto() {
        IPPROTO_TCP => 20,
        IPPROTO_UDP | IPPROTO_ICMP => 8,
        _ => return Ok(()),
    };
    if l4.len() < min || !l4_sum_ok(&v, l4) {
        return Err("L4 checksum");
    }
    if quote && v.proto() == IPPROTO_ICMP && matches!(l4[0], 3 | 11 | 12) && l4.len() >= 28 && l4[8] >> 4 == 4 {
        let inner = (l4[8] & 0xf) as usize * 4;
        if inner >= 20 && l4.len() >= 8 + inner && checksum(&l4[8..8 + inner], 0) != 0 {
            return Err("quoted IPv4 header checksum");
        }
    }
    Ok(())
}

/// The frame in hex, its first 128 bytes (the headers and some) for a longer one.
fn hex(f: &[u8]) -> String {
    const SHOWN: usize = 128;
    let mut s = String::new();
    for (i, b) in f.iter().take(SHOWN).enumerate() {
        // Breaks after the Ethernet header and a 20-byte IPv4 header, for the eye.
        if i == 14 || i == 34 {
            s.push(' ');
        }
        let _ = write!(s, "{b:02x}");
    }
    if f.len() > SHOWN {
        let _ = write!(s, "... ({} bytes more)", f.len() - SHOWN);
    }
    s
}

/// One line about a frame, for failure reports.
fn describe(f: &[u8]) -> String {
    let Some(v) = View::of(f) else {
        return format!("{} bytes, ethertype {:02x?}", f.len(), f.get(12..14).unwrap_or(&[]));
    };
    let flags = |t: u8| {
        [(SYN, "S"), (ACK, "A"), (FIN, "F"), (RST, "R"), (PSH, "P")]
            .iter()
            .filter(|(b, _)| t & b != 0)
            .map(|(_, n)| *n)
            .collect::<String>()
    };
    let proto = match v.proto() {
        IPPROTO_TCP => format!("TCP[{}]", flags(v.tcp_flags())),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_ICMP => format!("ICMP{:?}", v.l4().get(..2).unwrap_or(&[])),
        p => format!("proto {p}"),
    };
    let (sport, dport) = v.ports().filter(|_| v.proto() != IPPROTO_ICMP).unwrap_or((0, 0));
    format!(
        "{proto} {}:{sport} -> {}:{dport}, {} bytes, ver/ihl {:#04x}, total length {}, id {}, frag {}{}, ttl {}",
        v.src(),
        v.dst(),
        f.len(),
        f[14],
        v.tot,
        v.id(),
        v.offset8(),
        if v.more() { "+MF" } else { "" },
        f[22],
    )
}

// ---------------------------------------------------------------------------------------
// Known datapath defects: each excludes the exact case it shows in, until fixed.

// ---------------------------------------------------------------------------------------
// The run: the fixture, what a case has seen, the checks after every packet

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    TcPod,
}

impl Hook {
    /// Where a packet from `src` comes in: local pods on their veth, everything else on
    /// the uplink.
    fn natural(src: Ipv4Addr) -> Hook {
        if in_local_pods(src) {
            Hook::TcPod
        } else {
            Hook::Xdp
        }
    }
}

/// What the datapath did with a packet, as its output shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Passed untouched, nothing attached.
    Passed,
    /// Left to the uplink's tc program untouched (XDP metadata PARTIAL).
    HandedOver,
    Translated,
    /// Answered with an ICMP destination unreachable or a TCP reset.
    Answered,
    Dropped,
}

/// Is `out` the datapath's own answer to `input` (a reset or an ICMP unreachable sent
/// back to its source)?
fn is_answer(input: &[u8], out: &[u8]) -> bool {
    let (Some(i), Some(o)) = (View::of(input), View::of(out)) else { return false };
    // A later fragment has no L4 header (its first bytes only look like ports and flags: a
    // hairpin flow's later fragment, sent back to its source address, looked like a reset),
    // and the datapath answers whole packets.
    if i.offset8() != 0 || o.offset8() != 0 {
        return false;
    }
    let back = o.src() == i.dst() && o.dst() == i.src();
    let unreachable = o.proto() == IPPROTO_ICMP && i.proto() != IPPROTO_ICMP && o.l4().first() == Some(&3);
    // Ports too: a hairpin flow's packets go back to their source address.
    let swapped = o.ports().zip(i.ports()).is_some_and(|((os, od), (is, id))| os == id && od == is);
    let reset = o.proto() == IPPROTO_TCP && o.tcp_flags() & RST != 0 && swapped;
    back && (unreachable || reset)
}

struct Sent {
    fate: Fate,
    out: Vec<u8>,
}

/// A datagram as fragments name it: (source, destination, protocol, IP id).
type DatagramId = (Ipv4Addr, Ipv4Addr, u8, u16);

struct Run<'a> {
    fx: &'a mut Fixture,
    ct: Conntrack,
    counter_map: aya::maps::PerCpuArray<aya::maps::MapData, Counter>,
    frontends: HashSet<(Ipv4Addr, u16, u8)>,
    // What the case has seen so far.
    counters: BTreeMap<&'static str, u64>,
    entries: HashMap<CtKey, CtValue>,
    /// Translated TCP/UDP frames the datapath sent: what their receivers answer.
    outputs: Vec<Vec<u8>>,
    /// TCP/UDP frames the datapath translated: flows their senders go on with.
    flows: Vec<Vec<u8>>,
    /// Datagrams whose first fragment the datapath translated.
    firsts: Vec<DatagramId>,
    /// The case's packets, written out only when it fails.
    trace: Vec<Traced>,
    /// The endpoints are at their other addresses (`Step::Endpoints`).
    endpoints_moved: bool,
}

/// A packet of a case and what became of it.
struct Traced {
    hook: Hook,
    frame: Vec<u8>,
    /// None: not run (BPF_PROG_TEST_RUN refuses the frame).
    result: Option<(u32, Option<XdpMeta>, Vec<u8>)>,
    moved: BTreeMap<&'static str, i128>,
    entries: usize,
}

impl std::fmt::Display for Traced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:?} {}
   in : {}",
            self.hook,
            describe(&self.frame),
            hex(&self.frame)
        )?;
        let Some((action, meta, out)) = &self.result else {
            return writeln!(f, "   not run at tc: BPF_PROG_TEST_RUN refuses it");
        };
        let meta = meta.map(|m| (m.tag, m.mark));
        writeln!(
            f,
            "   -> action {action}, metadata {meta:?}, counters {:?}, {} conntrack entries",
            self.moved, self.entries
        )?;
        if out == &self.frame {
            writeln!(f, "   out: (unchanged)")
        } else {
            writeln!(
                f,
                "   out: {}
        {}",
                describe(out),
                hex(out)
            )
        }
    }
}

macro_rules! ensure {
    ($run:expr, $cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($run.fail(format!($($fmt)+)));
        }
    };
}

impl<'a> Run<'a> {
    fn new(fx: &'a mut Fixture) -> Run<'a> {
        let ct = Conntrack::open(&fx.pin_dir).unwrap();
        let services: aya::maps::HashMap<_, ServiceKey, ServiceValue> =
            datapath::open_map(&fx.pin_dir, map_names::SERVICES).unwrap().try_into().unwrap();
        let frontends = services
            .keys()
            .map(|k| k.unwrap())
            .map(|k| (ip_from_be(k.addr_be), u16::from_be(k.port_be), k.proto))
            .collect();
        let counter_map = datapath::open_map(&fx.pin_dir, map_names::COUNTERS).unwrap().try_into().unwrap();
        let mut run = Run {
            fx,
            ct,
            counter_map,
            frontends,
            counters: BTreeMap::new(),
            entries: HashMap::new(),
            outputs: vec![],
            flows: vec![],
            firsts: vec![],
            trace: vec![],
            endpoints_moved: false,
        };
        run.counters = run.read_counters();
        run
    }

    /// Packets counted so far, by label (`Fixture::counters` without opening the map).
    fn read_counters(&self) -> BTreeMap<&'static str, u64> {
        counters::ALL
            .iter()
            .map(|(index, label)| (*label, self.counter_map.get(index, 0).unwrap().iter().map(|c| c.packets).sum()))
            .collect()
    }

    /// The scripted frontends, sorted (what generators pick from).
    fn frontend_list(&self) -> Vec<(Ipv4Addr, u16, u8)> {
        let mut v: Vec<_> = self.frontends.iter().copied().collect();
        v.sort();
        v
    }

    fn fail(&self, what: String) -> TestCaseError {
        let mut report = format!("{what}\n--- packets of this case ---\n");
        for (i, t) in self.trace.iter().enumerate() {
            let _ = write!(report, "#{i} {t}");
        }
        TestCaseError::fail(report)
    }

    /// A new case: conntrack emptied through the kernel's reaper (so LB_CT_STATE keeps
    /// count), fragment and rate-limit memory forgotten.
    fn start_case(&mut self) -> Result<(), TestCaseError> {
        let keys: Vec<CtKey> = self.ct.entries().unwrap().into_iter().map(|(k, _)| k).collect();
        self.ct.remove(&keys).unwrap();
        clear::<FragKey, FragValue>(&self.fx.pin_dir, map_names::FRAGMENTS);
        clear::<u32, lb_common::Bucket>(&self.fx.pin_dir, map_names::RATE_LIMIT);
        self.outputs.clear();
        self.flows.clear();
        self.firsts.clear();
        self.trace.clear();
        self.move_endpoints(false);
        self.counters = self.read_counters();
        let left = self.ct.entries().unwrap();
        let counted = self.ct.counted_entries().unwrap();
        ensure!(self, left.is_empty() && counted == 0, "[5] the reaper left {left:?}, LB_CT_STATE counts {counted}");
        self.entries.clear();
        Ok(())
    }

    /// Is the frame for a frontend or part of a tracked flow (Some(true)), certainly neither
    /// (Some(false)), or is the question moot (None: an IPv4 packet the stack itself drops,
    /// which the datapath may drop first)?
    fn ours(&self, f: &[u8]) -> Option<bool> {
        let Some(v) = View::of(f) else {
            // Not IPv4, or an IPv4 header cut short.
            return (f[12..14] != [0x08, 0x00]).then_some(false);
        };
        if !v.sound() {
            return None;
        }
        let tracked = |k: &CtKey| self.entries.contains_key(k);
        match v.proto() {
            IPPROTO_ICMP => Some(!v.fragment() && v.hlen == 20 && error_key(v.l4()).is_some_and(|k| tracked(&k))),
            IPPROTO_TCP | IPPROTO_UDP if v.offset8() != 0 => {
                Some(self.firsts.contains(&(v.src(), v.dst(), v.proto(), v.id())))
            }
            IPPROTO_TCP | IPPROTO_UDP => match v.key() {
                Some(k) => {
                    Some(self.frontends.contains(&(v.dst(), u16::from_be(k.dst_port_be), v.proto())) || tracked(&k))
                }
                // No ports: ours if a frontend or a flow has its addresses.
                None => Some(
                    self.frontends.iter().any(|(a, _, p)| *a == v.dst() && *p == v.proto())
                        || self.entries.keys().any(|k| {
                            k.src_addr_be == addr_be(v.src())
                                && k.dst_addr_be == addr_be(v.dst())
                                && k.proto == v.proto()
                        }),
                ),
            },
            _ => Some(false),
        }
    }

    /// Runs one frame through `hook` and checks every property; the frame and what came
    /// out go into the case's trace.
    fn send(&mut self, hook: Hook, frame: Vec<u8>) -> Result<Sent, TestCaseError> {
        if hook == Hook::TcPod && tc_test_run_refuses(&frame) {
            self.trace.push(Traced { hook, frame, result: None, moved: BTreeMap::new(), entries: self.entries.len() });
            return Ok(Sent { fate: Fate::Dropped, out: vec![] });
        }
        let ours = self.ours(&frame);
        let (action, out, meta) = match hook {
            Hook::Xdp => self.fx.xdp(&frame),
            Hook::TcPod => {
                let (action, out) = self.fx.tc_pod(&frame);
                (action, out, None)
            }
        };
        let counters = self.read_counters();
        let moved: BTreeMap<&str, i128> = counters
            .iter()
            .map(|(l, n)| (*l, *n as i128 - self.counters[l] as i128))
            .filter(|(_, d)| *d != 0)
            .collect();
        let entries: HashMap<CtKey, CtValue> = self.ct.entries().unwrap().into_iter().collect();
        let counted = self.ct.counted_entries().unwrap();
        self.trace.push(Traced {
            hook,
            frame: frame.clone(),
            result: Some((action, meta, out.clone())),
            moved: moved.clone(),
            entries: entries.len(),
        });
        let changed = out != frame;
        let fate = match (hook, action) {
            (Hook::Xdp, XDP_DROP | XDP_ABORTED) | (Hook::TcPod, TC_ACT_SHOT) => Fate::Dropped,
            (Hook::Xdp, XDP_PASS) => match meta.map(|m| m.tag) {
                Some(XDP_META_PARTIAL) => Fate::HandedOver,
                Some(XDP_META_REDIRECT | XDP_META_MARK) => Fate::Translated,
                _ if changed => Fate::Translated,
                _ => Fate::Passed,
            },
            (Hook::TcPod, TC_ACT_OK) if !changed => Fate::Passed,
            (Hook::Xdp, XDP_TX) | (Hook::TcPod, TC_ACT_OK | TC_ACT_REDIRECT) if is_answer(&frame, &out) => {
                Fate::Answered
            }
            (Hook::Xdp, XDP_TX) | (Hook::TcPod, TC_ACT_OK | TC_ACT_REDIRECT) => Fate::Translated,
            _ => return Err(self.fail(format!("unexpected action {action} at {hook:?}"))),
        };
        self.check_counters(hook, action, fate, &frame, &moved)?;
        // 4. A drop leaves no new conntrack entry.
        if fate == Fate::Dropped {
            let new: Vec<_> = entries.keys().filter(|k| !self.entries.contains_key(k)).collect();
            ensure!(self, new.is_empty(), "[4] a dropped packet left conntrack entries {new:?}");
        }
        check_pairs(&entries, counted).map_err(|e| self.fail(format!("[5] {e}")))?;
        self.check_flow_starts(&frame, &entries, &moved)?;
        if fate == Fate::Translated {
            self.check_rewrite(&frame, &out, &entries)?;
        }
        // 1. Neither for a frontend nor tracked: untouched.
        if ours == Some(false) {
            ensure!(
                self,
                fate == Fate::Passed && !changed && meta.is_none(),
                "[1] neither for a frontend nor part of a tracked flow, yet {fate:?} (action {action}, metadata {meta:?})"
            );
        }
        // 2. Rewrites keep checksums valid.
        match fate {
            Fate::Answered => {
                let r = checksums(&out, false);
                ensure!(self, r.is_ok(), "[2] the datapath's answer has a bad {}", r.unwrap_err());
                // Never a reset for a reset (RFC 793), or resets could go back and forth.
                let reset_for_reset = View::of(&frame).is_some_and(|v| v.tcp_flags() & RST != 0)
                    && View::of(&out).is_some_and(|v| v.proto() == IPPROTO_TCP);
                ensure!(self, !reset_for_reset, "[answers] a reset answered with a reset");
                // A router answers "fragmentation needed" only when it may not fragment.
                let frag_needed = out.get(34..36) == Some(&[3, 4]);
                let df = frame[20] & 0x40 != 0;
                ensure!(self, !frag_needed || df, "[answers] fragmentation needed, for a packet without DF");
            }
            Fate::Translated if checksums(&frame, true).is_ok() => {
                let r = checksums(&out, true);
                ensure!(self, r.is_ok(), "[2] translated from valid checksums, out with a bad {}", r.unwrap_err());
                let udp_check = |f: &[u8]| {
                    View::of(f).filter(|v| v.proto() == IPPROTO_UDP && !v.fragment()).map(|v| v.l4()[6..8].to_vec())
                };
                if udp_check(&frame) == Some(vec![0, 0]) {
                    ensure!(self, udp_check(&out) == Some(vec![0, 0]), "[2] UDP without checksum got one");
                }
            }
            _ => {}
        }
        if fate == Fate::Translated {
            self.remember(&frame, &out);
        }
        self.counters = counters;
        self.entries = entries;
        Ok(Sent { fate, out })
    }

    /// Property 3: one counter per packet, but for the extras, each under its rule.
    fn check_counters(
        &self,
        hook: Hook,
        action: u32,
        fate: Fate,
        frame: &[u8],
        moved: &BTreeMap<&str, i128>,
    ) -> Result<(), TestCaseError> {
        let primary: Vec<(&str, i128)> =
            moved.iter().filter(|(l, _)| !EXTRA.contains(l)).map(|(l, d)| (*l, *d)).collect();
        ensure!(self, matches!(primary[..], [(_, 1)]), "[3] counters moved {moved:?}: not exactly one counter, by one");
        let counter = primary[0].0;
        let extra = |l: &str| moved.get(l).copied().unwrap_or(0);
        for l in EXTRA {
            ensure!(self, (0..=1).contains(&extra(l)), "[3] {l} moved by {}", extra(l));
        }
        let fits = match fate {
            Fate::Passed => counter.starts_with("pass_"),
            Fate::HandedOver => counter == "xdp_to_tc",
            Fate::Translated => TRANSLATED.contains(&counter),
            Fate::Answered => ANSWERED.contains(&counter),
            Fate::Dropped => counter.starts_with("drop_"),
        };
        ensure!(self, fits, "[3] {fate:?}, counted as {counter}");
        // xdp_tx: with the translation counter, whenever XDP sends a translated packet back
        // out (never for its own answers).
        let is_icmp = View::of(frame).is_some_and(|v| v.proto() == IPPROTO_ICMP);
        let forwarded = hook == Hook::Xdp && action == XDP_TX && fate == Fate::Translated;
        ensure!(
            self,
            extra("xdp_tx") == forwarded as i128,
            "[3] xdp_tx moved by {} for a packet {fate:?} by action {action}",
            extra("xdp_tx")
        );
        if forwarded {
            let by = ["new_flow", "established", "reply", "fragment_translated"].contains(&counter)
                || (counter == "icmp_error_translated" && is_icmp);
            ensure!(self, by, "[3] XDP_TX of a packet counted as {counter}");
        }
        // snat_on_collision: a new flow that took a NAT port (or found none, or answered
        // "fragmentation needed" once set up).
        if extra("snat_on_collision") == 1 {
            let after = ["new_flow", "drop_nat_exhausted", "drop_ct_race", "frag_needed_answered"];
            ensure!(self, after.contains(&counter), "[3] snat_on_collision with {counter}");
        }
        // backend_gone_rechosen: a UDP flow whose backend went, then treated as a new one.
        if extra("backend_gone_rechosen") == 1 {
            let udp = View::of(frame).is_some_and(|v| v.proto() == IPPROTO_UDP);
            let then = ["new_flow", "refused_no_backend", "frag_needed_answered"].contains(&counter)
                || counter.starts_with("drop_");
            ensure!(self, udp && then, "[3] backend_gone_rechosen with {counter}");
        }
        // Halves are removed only in pairs here: none is ever found without its peer.
        ensure!(self, extra("flow_orphaned") == 0, "[3] flow_orphaned moved");
        Ok(())
    }

    /// Only a flow's first packet (a TCP SYN, a UDP datagram) makes entries, counted as a new
    /// flow (or answered "fragmentation needed" once set up); and a live flow's entries are
    /// replaced only by a new flow that restarts its tuple.
    fn check_flow_starts(
        &self,
        frame: &[u8],
        entries: &HashMap<CtKey, CtValue>,
        moved: &BTreeMap<&str, i128>,
    ) -> Result<(), TestCaseError> {
        let new: Vec<&CtKey> = entries
            .iter()
            .filter(|(k, v)| self.entries.get(k).is_none_or(|old| nonce(old.stamp) != nonce(v.stamp)))
            .map(|(k, _)| k)
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let v = View::of(frame);
        let starts = v.as_ref().is_some_and(|v| {
            v.proto() == IPPROTO_UDP || (v.proto() == IPPROTO_TCP && v.tcp_flags() & (SYN | ACK | RST | FIN) == SYN)
        });
        let counted = moved.contains_key("new_flow") || moved.contains_key("icmp_error_translated");
        ensure!(
            self,
            starts && counted,
            "[ct] entries {new:?} made by a packet that starts no flow (counted {moved:?})"
        );
        Ok(())
    }

    /// A translated TCP/UDP packet leaves as its conntrack half says: addresses and ports
    /// of the half at its tuple.
    fn check_rewrite(&self, frame: &[u8], out: &[u8], entries: &HashMap<CtKey, CtValue>) -> Result<(), TestCaseError> {
        let (Some(i), Some(o)) = (View::of(frame), View::of(out)) else { return Ok(()) };
        let Some(key) = i.key().filter(|_| i.proto() != IPPROTO_ICMP && i.offset8() == 0) else { return Ok(()) };
        let half = entries.get(&key);
        ensure!(self, half.is_some(), "[rewrite] translated, but no conntrack half at {key:?}");
        let h = half.unwrap();
        let want = (
            ip_from_be(h.nat_src_addr_be),
            u16::from_be(h.nat_src_port_be),
            ip_from_be(h.nat_dst_addr_be),
            u16::from_be(h.nat_dst_port_be),
        );
        let (sport, dport) = o.ports().unwrap_or_default();
        let got = (o.src(), sport, o.dst(), dport);
        ensure!(self, got == want, "[rewrite] left as {got:?}, its conntrack half says {want:?}");
        Ok(())
    }

    /// Notes a translation: its output is what a receiver answers; its input a flow its
    /// sender goes on with; a first fragment's addresses what its later fragments get.
    fn remember(&mut self, frame: &[u8], out: &[u8]) {
        let (Some(i), Some(o)) = (View::of(frame), View::of(out)) else { return };
        if i.proto() == IPPROTO_ICMP {
            return;
        }
        if i.more() && i.offset8() == 0 {
            self.firsts.push((i.src(), i.dst(), i.proto(), i.id()));
        }
        if i.offset8() == 0 && i.ports().is_some() && o.ports().is_some() {
            self.outputs.push(out.to_vec());
            self.flows.push(frame.to_vec());
        }
    }
}

/// BPF_PROG_TEST_RUN refuses skbs of IPv4 or IPv6 type shorter than that header (the
/// XDP test run takes anything from an Ethernet header on).
fn tc_test_run_refuses(f: &[u8]) -> bool {
    match f.get(12..14) {
        Some([0x08, 0x00]) => f.len() < 34,
        Some([0x86, 0xdd]) => f.len() < 54,
        _ => false,
    }
}

/// The conntrack key of the direction an ICMP error travels, as `lb_common::icmp` reads
/// it, from the ICMP message's bytes within the IPv4 total length.
fn error_key(icmp: &[u8]) -> Option<CtKey> {
    if icmp.len() < 8 + 20 + 4 || !matches!(icmp[0], 3 | 11 | 12) || icmp[8] != 0x45 {
        return None;
    }
    let q = &icmp[8..];
    if q[9] != IPPROTO_TCP && q[9] != IPPROTO_UDP {
        return None;
    }
    let ip = |o: usize| Ipv4Addr::new(q[o], q[o + 1], q[o + 2], q[o + 3]);
    let port = |o: usize| u16::from_be_bytes([q[o], q[o + 1]]);
    Some(key_of(ip(16), port(22), ip(12), port(20), q[9]))
}

/// Property 5: every half's peer is there with the same nonce, state and stamp, names it
/// back as its peer, and is of the other direction; LB_CT_STATE counts every entry.
fn check_pairs(entries: &HashMap<CtKey, CtValue>, counted: u64) -> Result<(), String> {
    if counted != entries.len() as u64 {
        return Err(format!("LB_CT_STATE counts {counted} entries, LB_CONNTRACK holds {}", entries.len()));
    }
    for (k, v) in entries {
        let peer_key = datapath::conntrack::peer_of(k, v);
        let Some(p) = entries.get(&peer_key) else {
            return Err(format!("half {k:?} ({v:?}) has no peer at {peer_key:?}"));
        };
        let fine = nonce(v.stamp) != 0
            && nonce(p.stamp) == nonce(v.stamp)
            && p.stamp == v.stamp
            && p.state & !bits::LIVE == v.state & !bits::LIVE
            // Only the forward half carries the flow's place in its backend's live count.
            && (v.state & bits::LIVE == 0 || v.flags & ct_flags::REPLY == 0)
            && datapath::conntrack::peer_of(&peer_key, p) == *k
            && (p.flags ^ v.flags) & ct_flags::REPLY != 0;
        if !fine {
            return Err(format!("halves do not pair:\n  {k:?} {v:?}\n  {peer_key:?} {p:?}"));
        }
    }
    Ok(())
}

/// Removes every entry of a pinned hash map the test owns the state of.
fn clear<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(pin_dir: &std::path::Path, name: &'static str) {
    let mut map: aya::maps::HashMap<_, K, V> = datapath::open_map(pin_dir, name).unwrap().try_into().unwrap();
    let keys: Vec<K> = map.keys().map(|k| k.unwrap()).collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

// ---------------------------------------------------------------------------------------
// Sequences

/// The next packet of a flow, in either direction: what varies.
#[derive(Clone, Debug)]
struct Next {
    tcp_flags: u8,
    payload: usize,
    udp_checksum: bool,
    ttl: u8,
    mangle: Mangle,
}

#[derive(Clone, Debug)]
enum Step {
    /// A generated frame, at the hook its source sends from (or, `other_hook`, the other).
    Send { packet: Packet, other_hook: bool },
    /// The receiver of an earlier translated packet answers it.
    Answer { pick: Index, next: Next },
    /// The sender of an earlier translated packet goes on with its flow.
    Continue { pick: Index, next: Next },
    /// An ICMP error about an earlier translated packet, from its receiver or a router on
    /// the way, quoting its IPv4 header and first 8 bytes; with `cut`, the IPv4 total
    /// length covers only that many of the 8, the rest following as trailing bytes.
    IcmpAbout { pick: Index, kind: (u8, u8), from_router: bool, cut: Option<usize> },
    /// A new flow's first packet (TCP SYN or UDP) from `src` to a frontend.
    Open { src: SocketAddrV4, frontend: (Ipv4Addr, u16, u8) },
    /// Every endpoint moves to another address (`moved`), or back: the backends of the
    /// flows so far are removed, and their flows must go (reset, dropped, chosen again).
    Endpoints { moved: bool },
}

impl Run<'_> {
    fn case(&mut self, steps: &[Step]) -> Result<(), TestCaseError> {
        self.start_case()?;
        for step in steps {
            self.step(step)?;
        }
        Ok(())
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match step {
            Step::Send { packet, other_hook } => self.send_packet(packet, *other_hook),
            Step::Answer { pick, next } => {
                let Some(out) = pick_from(&self.outputs, pick) else { return Ok(()) };
                let v = View::of(&out).expect("a translated frame");
                let (sport, dport) = v.ports().expect("a translated TCP/UDP frame");
                self.send_next(SocketAddrV4::new(v.dst(), dport), SocketAddrV4::new(v.src(), sport), v.proto(), next)
            }
            Step::Continue { pick, next } => {
                let Some(input) = pick_from(&self.flows, pick) else { return Ok(()) };
                let v = View::of(&input).expect("a translated frame");
                let (sport, dport) = v.ports().expect("a translated TCP/UDP frame");
                self.send_next(SocketAddrV4::new(v.src(), sport), SocketAddrV4::new(v.dst(), dport), v.proto(), next)
            }
            Step::IcmpAbout { pick, kind, from_router, cut } => {
                let Some(out) = pick_from(&self.outputs, pick) else { return Ok(()) };
                let v = View::of(&out).expect("a translated frame");
                let receiver = v.dst();
                let from = match (from_router, receiver.octets()) {
                    (false, _) => receiver,
                    (true, [10, 244, ..]) => POD_ROUTER,
                    (true, _) => CLIENT_ROUTER,
                };
                let quote = &out[14..14 + v.hlen + 8];
                let (within, trailer) = quote.split_at(v.hlen + cut.unwrap_or(8));
                let mut frame = icmp_frame(from, v.src(), *kind, within);
                frame.extend_from_slice(trailer);
                self.send(Hook::natural(from), frame).map(drop)
            }
            Step::Endpoints { moved } => {
                self.move_endpoints(*moved);
                Ok(())
            }
            Step::Open { src, frontend: (addr, port, proto) } => {
                let next = Next { tcp_flags: SYN, payload: 0, udp_checksum: true, ttl: 64, mangle: Mangle::None };
                self.send_next(*src, SocketAddrV4::new(*addr, *port), *proto, &next)
            }
        }
    }

    fn move_endpoints(&mut self, moved: bool) {
        if moved != self.endpoints_moved {
            let manifests = MANIFESTS.to_string() + &local_slices();
            let manifests = if moved { manifests.replace(".10]", ".11]") } else { manifests };
            self.fx.apply(&manifests);
            self.endpoints_moved = moved;
        }
    }

    fn send_next(&mut self, src: SocketAddrV4, dst: SocketAddrV4, proto: u8, n: &Next) -> Result<(), TestCaseError> {
        let pkt = Pkt {
            src,
            dst,
            proto,
            tcp_flags: n.tcp_flags,
            udp_checksum: n.udp_checksum,
            payload: n.payload,
            ttl: n.ttl,
            ip_id: 0x4242,
            df: true,
            ip_options: 0,
            tcp_options: 0,
        };
        self.send(Hook::natural(*src.ip()), n.mangle.apply(pkt.frame())).map(drop)
    }

    fn send_packet(&mut self, packet: &Packet, other_hook: bool) -> Result<(), TestCaseError> {
        let hook = |src: Ipv4Addr| match (Hook::natural(src), other_hook) {
            (h, false) => h,
            (Hook::Xdp, true) => Hook::TcPod,
            (Hook::TcPod, true) => Hook::Xdp,
        };
        let client = CLIENT;
        match packet {
            Packet::Ip(pkt, mangle) => self.send(hook(*pkt.src.ip()), mangle.apply(pkt.frame())).map(drop),
            Packet::Fragments { pkt, split, later_id, order } => {
                self.send_fragments(hook(*pkt.src.ip()), pkt, split, *later_id, order)
            }
            Packet::Arp => {
                let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
                arp.extend_from_slice(&CLIENT_MAC);
                arp.extend_from_slice(&client.octets());
                arp.extend_from_slice(&[0; 6]);
                arp.extend_from_slice(&NODE.octets());
                self.send(hook(client), ethernet(0x0806, &arp)).map(drop)
            }
            Packet::Ipv6 { dst_port, flags } => {
                let mut ip6 = vec![0x60, 0, 0, 0, 0, 20, IPPROTO_TCP, 64];
                ip6.extend_from_slice(&[0xfd; 32]);
                let mut tcp = vec![0u8; 20];
                tcp[0..2].copy_from_slice(&5555u16.to_be_bytes());
                tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
                tcp[12] = 5 << 4;
                tcp[13] = *flags;
                ip6.extend_from_slice(&tcp);
                self.send(hook(client), ethernet(0x86dd, &ip6)).map(drop)
            }
            Packet::Vlan(pkt) => {
                let inner = pkt.frame();
                let mut body = vec![0, 7];
                body.extend_from_slice(&inner[12..]);
                self.send(hook(*pkt.src.ip()), ethernet(0x8100, &body)).map(drop)
            }
            Packet::Raw { ethertype, bytes } => self.send(hook(client), ethernet(*ethertype, bytes)).map(drop),
            Packet::Icmp { src, dst, kind, quote } => {
                self.send(hook(*src), icmp_frame(*src, *dst, *kind, quote)).map(drop)
            }
            Packet::IcmpQuoting { src, dst, kind, quoted } => {
                let q = quoted.frame();
                let hlen = 20 + quoted.ip_options as usize * 4;
                let quote = &q[14..(14 + hlen + 8).min(q.len())];
                self.send(hook(*src), icmp_frame(*src, *dst, *kind, quote)).map(drop)
            }
        }
    }

    /// A datagram in two fragments. Fragments of a translated datagram must be translated
    /// like its first (same addresses), and the datagram put together again must carry a
    /// valid L4 checksum when it came with one.
    fn send_fragments(
        &mut self,
        hook: Hook,
        pkt: &Pkt,
        split: &Index,
        later_id: Option<u16>,
        order: &FragOrder,
    ) -> Result<(), TestCaseError> {
        let segment = pkt.segment();
        if segment.len() <= 8 {
            return self.send(hook, pkt.frame()).map(drop);
        }
        let at = 8 * (1 + split.index((segment.len() - 1) / 8));
        let header = Ipv4 { df: false, ..pkt.header() };
        let first = Ipv4 { more: true, ..header.clone() }.frame(&segment[..at]);
        let later =
            Ipv4 { id: later_id.unwrap_or(pkt.ip_id), offset8: (at / 8) as u16, ..header }.frame(&segment[at..]);
        let (f, l) = match order {
            FragOrder::FirstThenLater => (self.send(hook, first)?, self.send(hook, later)?),
            // The later fragment before its first, or alone: unmatched, which property 1
            // checks (it is part of no tracked flow).
            FragOrder::LaterThenFirst => {
                self.send(hook, later)?;
                return self.send(hook, first).map(drop);
            }
            FragOrder::LaterOnly => return self.send(hook, later).map(drop),
        };
        if f.fate != Fate::Translated || later_id.is_some_and(|id| id != pkt.ip_id) {
            return Ok(());
        }
        let (fv, lv) = (View::of(&f.out).expect("translated"), View::of(&l.out));
        let like_first =
            l.fate == Fate::Translated && lv.as_ref().is_some_and(|lv| (lv.src(), lv.dst()) == (fv.src(), fv.dst()));
        ensure!(self, like_first, "[fragments] the first fragment was translated, the later one {:?}", l.fate);
        if checksums(&pkt.frame(), true).is_ok() && pkt.ip_options == 0 {
            let mut whole = fv.l4().to_vec();
            whole.extend_from_slice(lv.expect("translated").l4());
            ensure!(
                self,
                l4_sum_ok(&fv, &whole),
                "[2] the translated datagram's L4 checksum is wrong once put together"
            );
        }
        Ok(())
    }
}

fn pick_from(list: &[Vec<u8>], pick: &Index) -> Option<Vec<u8>> {
    (!list.is_empty()).then(|| list[pick.index(list.len())].clone())
}

// ---------------------------------------------------------------------------------------
// Generators

fn sources() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        4 => Just(CLIENT),
        2 => Just(CLIENT2),
        1 => Just(STRANGER),
        3 => Just(OTHER_LOCAL_POD),
        2 => Just(LOCAL_POD),
        1 => Just(REMOTE_POD),
        1 => Just(NODE),
        1 => any::<u32>().prop_map(Ipv4Addr::from),
    ]
}

/// Few ports, so that flows meet: the same client port toward two frontends, a client
/// port inside the SNAT range, a backend's port.
fn source_ports() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => Just(5555),
        2 => Just(5556),
        1 => Just(8080),
        1 => Just(80),
        1 => SNAT_PORTS.0..=SNAT_PORTS.1,
        1 => any::<u16>(),
    ]
}

/// Destinations that are not frontends (by address or by port), as (address, port,
/// protocol): frontend addresses on other ports, the node's SNAT ports, pods, anywhere.
fn elsewhere(frontends: &[(Ipv4Addr, u16, u8)]) -> BoxedStrategy<(Ipv4Addr, u16, u8)> {
    let addresses: Vec<Ipv4Addr> =
        frontends.iter().map(|f| f.0).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let known = frontends.to_vec();
    prop_oneof![
        2 => (select(addresses), any::<u16>(), l4_protocols()),
        1 => (Just(NODE), SNAT_PORTS.0..=SNAT_PORTS.1, l4_protocols()),
        2 => (select(vec![LOCAL_POD, OTHER_LOCAL_POD, REMOTE_POD]), prop_oneof![Just(8080u16), any::<u16>()], l4_protocols()),
        1 => (any::<u32>().prop_map(Ipv4Addr::from), any::<u16>(), l4_protocols()),
    ]
    .prop_filter("not a frontend", move |d| !known.contains(d))
    .boxed()
}

fn l4_protocols() -> impl Strategy<Value = u8> {
    prop_oneof![4 => Just(IPPROTO_TCP), 3 => Just(IPPROTO_UDP), 1 => Just(IPPROTO_ICMP)]
}

/// Any destination: mostly frontends (sometimes with the other protocol), else elsewhere.
fn destinations(frontends: &[(Ipv4Addr, u16, u8)]) -> BoxedStrategy<(Ipv4Addr, u16, u8)> {
    prop_oneof![
        6 => select(frontends.to_vec()),
        1 => (select(frontends.to_vec()), l4_protocols()).prop_map(|((a, p, _), proto)| (a, p, proto)),
        3 => elsewhere(frontends),
    ]
    .boxed()
}

fn tcp_flags() -> impl Strategy<Value = u8> {
    prop_oneof![
        12 => Just(SYN),
        3 => Just(SYN | ACK),
        5 => Just(ACK),
        3 => Just(PSH | ACK),
        3 => Just(FIN | ACK),
        2 => Just(RST),
        1 => Just(RST | ACK),
        1 => Just(FIN),
        1 => Just(0),
        1 => Just(SYN | FIN),
        1 => Just(SYN | RST),
        2 => any::<u8>(),
    ]
}

fn ttls() -> impl Strategy<Value = u8> {
    prop_oneof![12 => Just(64), 1 => Just(0), 1 => Just(1), 1 => any::<u8>()]
}

/// Payload lengths: most packets small; some past the path MTU (1500) with DF set.
fn payloads() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0), 4 => 0..64usize, 1 => 1400..1600usize]
}

fn mangles() -> BoxedStrategy<Mangle> {
    prop_oneof![
        40 => Just(Mangle::None),
        6 => any::<Index>().prop_map(Mangle::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mangle::Pad),
        1 => prop_oneof![Just(0u8), Just(6), Just(15), 0..16u8].prop_map(Mangle::Version),
        1 => (0..16u8).prop_map(Mangle::Ihl),
        1 => prop_oneof![0..64u16, any::<u16>()].prop_map(Mangle::TotalLength),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mangle::Byte(i, b)),
        1 => Just(Mangle::BadL4Checksum),
    ]
    .boxed()
}

fn pkts(dst: BoxedStrategy<(Ipv4Addr, u16, u8)>) -> BoxedStrategy<Pkt> {
    (
        (sources(), source_ports(), dst),
        (tcp_flags(), prop::bool::weighted(0.85), payloads(), ttls()),
        (
            any::<u16>(),
            prop::bool::ANY,
            prop_oneof![9 => Just(0u8), 1 => 1..=10u8],
            prop_oneof![9 => Just(0u8), 1 => 1..=10u8],
        ),
    )
        .prop_map(
            |(
                (src, sport, (dst, dport, proto)),
                (tcp_flags, udp_checksum, payload, ttl),
                (ip_id, df, ip_options, tcp_options),
            )| Pkt {
                src: SocketAddrV4::new(src, sport),
                dst: SocketAddrV4::new(dst, dport),
                proto,
                tcp_flags,
                udp_checksum,
                payload,
                ttl,
                ip_id,
                df,
                ip_options,
                tcp_options,
            },
        )
        .boxed()
}

fn icmp_kinds() -> impl Strategy<Value = (u8, u8)> {
    prop_oneof![
        4 => select(vec![(3u8, 3u8), (3, 1), (3, 4), (3, 13), (11, 0), (12, 0)]),
        1 => select(vec![(0u8, 0u8), (8, 0)]),
        1 => any::<(u8, u8)>(),
    ]
}

fn packets(dst: BoxedStrategy<(Ipv4Addr, u16, u8)>) -> BoxedStrategy<Packet> {
    prop_oneof![
        14 => (pkts(dst.clone()), mangles()).prop_map(|(p, m)| Packet::Ip(p, m)),
        4 => (
            pkts(dst.clone()),
            any::<Index>(),
            prop_oneof![3 => Just(None), 1 => any::<u16>().prop_map(Some)],
            prop_oneof![Just(FragOrder::FirstThenLater), Just(FragOrder::LaterThenFirst), Just(FragOrder::LaterOnly)],
        )
            .prop_map(|(pkt, split, later_id, order)| Packet::Fragments { pkt, split, later_id, order }),
        1 => Just(Packet::Arp),
        1 => (any::<u16>(), tcp_flags()).prop_map(|(dst_port, flags)| Packet::Ipv6 { dst_port, flags }),
        1 => pkts(dst.clone()).prop_map(Packet::Vlan),
        1 => (prop_oneof![Just(0x0800u16), Just(0x0806), Just(0x86dd), any::<u16>()], proptest::collection::vec(any::<u8>(), 0..80))
            .prop_map(|(ethertype, bytes)| Packet::Raw { ethertype, bytes }),
        1 => (sources(), sources(), icmp_kinds(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(src, dst, kind, quote)| Packet::Icmp { src, dst, kind, quote }),
        1 => (sources(), sources(), icmp_kinds(), pkts(dst))
            .prop_map(|(src, dst, kind, quoted)| Packet::IcmpQuoting { src, dst, kind, quoted }),
    ]
    .boxed()
}

fn nexts() -> BoxedStrategy<Next> {
    (tcp_flags(), payloads(), prop::bool::weighted(0.85), ttls(), mangles())
        .prop_map(|(tcp_flags, payload, udp_checksum, ttl, mangle)| Next {
            tcp_flags,
            payload,
            udp_checksum,
            ttl,
            mangle,
        })
        .boxed()
}

/// Sequences that open, use and close flows, with replies and ICMP errors about them.
fn flow_steps(frontends: &[(Ipv4Addr, u16, u8)]) -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        5 => (packets(destinations(frontends)), prop::bool::weighted(0.05))
            .prop_map(|(packet, other_hook)| Step::Send { packet, other_hook }),
        3 => (any::<Index>(), nexts()).prop_map(|(pick, next)| Step::Answer { pick, next }),
        3 => (any::<Index>(), nexts()).prop_map(|(pick, next)| Step::Continue { pick, next }),
        1 => (any::<Index>(), icmp_kinds(), prop::bool::ANY, prop_oneof![3 => Just(None), 1 => (0..8usize).prop_map(Some)])
            .prop_map(|(pick, kind, from_router, cut)| Step::IcmpAbout { pick, kind, from_router, cut }),
        4 => ((sources(), source_ports()), select(frontends.to_vec()))
            .prop_map(|((a, p), frontend)| Step::Open { src: SocketAddrV4::new(a, p), frontend }),
        1 => prop::bool::weighted(0.7).prop_map(|moved| Step::Endpoints { moved }),
    ];
    proptest::collection::vec(step, 1..=16)
}

/// Packets for no frontend, a few at a time.
fn unrelated_steps(frontends: &[(Ipv4Addr, u16, u8)]) -> impl Strategy<Value = Vec<Step>> {
    let step = (packets(elsewhere(frontends)), prop::bool::weighted(0.1))
        .prop_map(|(packet, other_hook)| Step::Send { packet, other_hook });
    proptest::collection::vec(step, 1..=4)
}

// ---------------------------------------------------------------------------------------
// Tests

/// The cases of a test: its share (percent) of `LB_PROPERTY_CASES` (default 100 000).
fn config(share: u32) -> Config {
    let total: u32 =
        std::env::var("LB_PROPERTY_CASES").ok().map_or(100_000, |v| v.parse().expect("LB_PROPERTY_CASES: a number"));
    Config {
        cases: (total / 100 * share).max(1),
        // Failures are reported, not saved into the source tree.
        failure_persistence: None,
        // Bounds the time a failure takes to report; sequences shrink well before this.
        max_shrink_iters: 1024,
        // Faster than the default ChaCha, which takes a good part of a debug build's time.
        rng_algorithm: RngAlgorithm::XorShift,
        ..Config::default()
    }
}

/// Runs `cases` of `strategy` against a fixture loaded as `setup` says, panicking with the
/// minimal failing sequence and its trace.
fn check<S>(setup: Setup, share: u32, strategy: impl FnOnce(&[(Ipv4Addr, u16, u8)]) -> S + Send + 'static)
where
    S: Strategy<Value = Vec<Step>>,
{
    with_fixture(setup, move |fx| {
        // Nested strategies take deep stacks to generate and shrink in a debug build: more
        // than a thread's default 2 MiB. The thread stays in the fixture's namespace.
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .stack_size(256 << 20)
                .spawn_scoped(scope, || run_cases(fx, share, strategy))
                .unwrap()
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    });
}

fn run_cases<S>(fx: &mut Fixture, share: u32, strategy: impl FnOnce(&[(Ipv4Addr, u16, u8)]) -> S)
where
    S: Strategy<Value = Vec<Step>>,
{
    let run = std::cell::RefCell::new(Run::new(fx));
    let strategy = strategy(&run.borrow().frontend_list());
    let config = config(share);
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let started = std::time::Instant::now();
    match runner.run(&strategy, |steps| run.borrow_mut().case(&steps)) {
        // What the cases exercised, for whoever tunes the generators.
        Ok(()) => eprintln!("{cases} cases in {:?}, counted {:?}", started.elapsed(), run.borrow().read_counters()),
        Err(TestError::Fail(why, steps)) => panic!("{why}\n--- minimal failing sequence ---\n{steps:#?}"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn traffic_for_no_frontend_and_no_flow_passes_unchanged() {
    check(Setup { conntrack_entries: CONNTRACK_ENTRIES, ..Setup::fast(SNAT_PORTS) }, 30, unrelated_steps);
}

#[test]
fn flows_keep_checksums_counters_and_conntrack_consistent() {
    // Room for 6 flows: a case can fill it (drop_ct_full).
    let setup = Setup { conntrack_entries: CONNTRACK_ENTRIES, admit_limit: 12, ..Setup::fast(SNAT_PORTS) };
    check(setup, 70, flow_steps);
}
