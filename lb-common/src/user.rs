//! Userspace conveniences: aya::Pod impls and conversions. bytemuck's derive (enabled with
//! this feature) proves at compile time that the map types have no hidden padding.
use core::net::Ipv4Addr;

use crate::*;

macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: bytemuck::Pod is derived for the type, which proves the same property.
        unsafe impl aya::Pod for $t {}
    )*};
}
pod!(
    BenchFrame,
    ServiceKey,
    ServiceValue,
    SlotKey,
    Backend,
    CtKey,
    CtValue,
    CtState,
    SourceRange,
    Config,
    FragKey,
    FragValue,
    Bucket,
    XdpMeta,
    BackendStats,
    AffinityKey,
    AffinityValue,
    SockConfig,
    SockConn,
    SockUdpKey,
    SockUdpValue,
    counters::Counter
);

/// An address in the maps' network byte order.
pub fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn ip_from_be(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_be.to_ne_bytes())
}

impl ServiceKey {
    pub fn new(ip: Ipv4Addr, port: u16, proto: u8) -> Self {
        ServiceKey { addr_be: addr_be(ip), port_be: port.to_be(), proto, _pad: 0 }
    }
}

impl Backend {
    pub fn new(ip: Ipv4Addr, port: u16, local: bool, owner: u64) -> Self {
        let flags = if local { backend_flags::LOCAL } else { 0 };
        Backend { addr_be: addr_be(ip), port_be: port.to_be(), flags, owner, ..Backend::default() }
    }
    pub fn ip(&self) -> Ipv4Addr {
        ip_from_be(self.addr_be)
    }
    pub fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
}

impl core::fmt::Display for CtKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{}:{} -> {}:{} proto {}",
            ip_from_be(self.src_addr_be),
            u16::from_be(self.src_port_be),
            ip_from_be(self.dst_addr_be),
            u16::from_be(self.dst_port_be),
            self.proto
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn bytemuck_sees_no_padding() {
        let v = CtValue { stamp: 1, nat_src_addr_be: 2, hop_smac: [9; 6], ..Default::default() };
        assert_eq!(bytemuck::bytes_of(&v).len(), core::mem::size_of::<CtValue>());
        let k = ServiceKey::new(Ipv4Addr::new(10, 96, 0, 1), 80, IPPROTO_TCP);
        assert_eq!(bytemuck::bytes_of(&k), &[10, 96, 0, 1, 0, 80, 6, 0]);
    }
}
