//! Frames for BPF_PROG_TEST_RUN fixtures, built with correct checksums, and readers for
//! what came out.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{checksum::checksum, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

/// An Ethernet + IPv4 + TCP/UDP frame.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    pub ttl: u8,
    /// For UDP: send without checksum (0).
    pub udp_no_checksum: bool,
}

impl Frame {
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Frame {
        Frame { src, dst, proto: IPPROTO_TCP, tcp_flags: flags, payload: vec![], ttl: 64, udp_no_checksum: false }
    }
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Frame {
        Frame { src, dst, proto: IPPROTO_UDP, tcp_flags: 0, payload: b"ping".to_vec(), ttl: 64, udp_no_checksum: false }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let l4_len = if self.proto == IPPROTO_TCP { 20 } else { 8 } + self.payload.len();
        let mut f = Vec::with_capacity(34 + l4_len);
        f.extend_from_slice(&NODE_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = self.ttl;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src.ip().octets());
        ip[16..20].copy_from_slice(&self.dst.ip().octets());
        let c = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut l4 = vec![0u8; l4_len];
        l4[0..2].copy_from_slice(&self.src.port().to_be_bytes());
        l4[2..4].copy_from_slice(&self.dst.port().to_be_bytes());
        let check_off = if self.proto == IPPROTO_TCP {
            l4[4..8].copy_from_slice(&1000u32.to_be_bytes());
            l4[12] = 5 << 4;
            l4[13] = self.tcp_flags;
            l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
            l4[20..].copy_from_slice(&self.payload);
            16
        } else {
            l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            l4[8..].copy_from_slice(&self.payload);
            6
        };
        if !(self.proto == IPPROTO_UDP && self.udp_no_checksum) {
            let c = l4_checksum(self.src.ip(), self.dst.ip(), self.proto, &l4);
            let c = if c == 0 && self.proto == IPPROTO_UDP { 0xffff } else { c };
            l4[check_off..check_off + 2].copy_from_slice(&c.to_be_bytes());
        }
        f.extend_from_slice(&l4);
        f
    }
}

/// The TCP/UDP checksum of `l4` (its checksum field included as it is).
pub fn l4_checksum(src: &Ipv4Addr, dst: &Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    let pseudo_sum = !checksum(&pseudo, 0) as u32;
    checksum(l4, pseudo_sum)
}

/// Are the IPv4 and L4 (TCP/UDP/ICMP) checksums of an Ethernet frame correct?
pub fn checksums_ok(frame: &[u8]) -> bool {
    let ip = &frame[14..34];
    if checksum(ip, 0) != 0 {
        return false;
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4 = &frame[34..14 + total];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    match ip[9] {
        IPPROTO_ICMP => checksum(l4, 0) == 0,
        IPPROTO_UDP if l4[6..8] == [0, 0] => true,
        p => l4_checksum(&src, &dst, p, l4) == 0,
    }
}

/// (src, dst) address:port of an Ethernet/IPv4/TCP-or-UDP frame.
pub fn endpoints(frame: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let ip = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    (SocketAddrV4::new(ip(26), port(34)), SocketAddrV4::new(ip(30), port(36)))
}
