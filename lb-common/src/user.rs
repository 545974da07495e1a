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
    FrontendStats,
    FrontendMeta,
    AgentStatus,
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

/// `text` as NUL-padded bytes, cut at a character boundary if it does not fit.
pub fn fixed_text<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut end = text.len().min(N);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&text.as_bytes()[..end]);
    out
}

/// The text of NUL-padded bytes (invalid UTF-8 replaced).
pub fn text_of(bytes: &[u8]) -> alloc::string::String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    alloc::string::String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl FrontendMeta {
    pub fn new(namespace: &str, name: &str, port_name: &str, kind: u8) -> Self {
        FrontendMeta {
            namespace: fixed_text(namespace),
            name: fixed_text(name),
            port_name: fixed_text(port_name),
            kind,
            _pad: [0; 7],
        }
    }
}

/// The name Kubernetes gives a frontend kind (`frontend_kind::*`), if it is one.
pub fn frontend_kind_name(kind: u8) -> Option<&'static str> {
    match kind {
        frontend_kind::CLUSTER_IP => Some("ClusterIP"),
        frontend_kind::NODE_PORT => Some("NodePort"),
        frontend_kind::LOAD_BALANCER => Some("LoadBalancer"),
        frontend_kind::EXTERNAL_IP => Some("ExternalIP"),
        _ => None,
    }
}

/// A protocol number as people read it.
pub fn protocol_name(proto: u8) -> alloc::borrow::Cow<'static, str> {
    match proto {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_ICMP => "ICMP".into(),
        other => alloc::format!("proto-{other}").into(),
    }
}

impl core::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}:{}/{}", ip_from_be(self.addr_be), u16::from_be(self.port_be), protocol_name(self.proto))
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
    use alloc::string::ToString;
    #[test]
    fn bytemuck_sees_no_padding() {
        let v = CtValue { stamp: 1, nat_src_addr_be: 2, hop_smac: [9; 6], ..Default::default() };
        assert_eq!(bytemuck::bytes_of(&v).len(), core::mem::size_of::<CtValue>());
        let k = ServiceKey::new(Ipv4Addr::new(10, 96, 0, 1), 80, IPPROTO_TCP);
        assert_eq!(bytemuck::bytes_of(&k), &[10, 96, 0, 1, 0, 80, 6, 0]);
        assert_eq!(k.to_string(), "10.96.0.1:80/TCP");
    }

    #[test]
    fn text_fields_are_cut_at_a_character_boundary() {
        let m = FrontendMeta::new("default", "web", "http", frontend_kind::NODE_PORT);
        assert_eq!(
            (text_of(&m.namespace), text_of(&m.name), text_of(&m.port_name)),
            ("default".into(), "web".into(), "http".into())
        );
        // 15 ASCII bytes then a 2-byte character: it does not fit in 16 bytes, so it goes whole.
        let cut: [u8; 16] = fixed_text("abcdefghijklmnoé");
        assert_eq!(text_of(&cut), "abcdefghijklmno");
        let full: [u8; 16] = fixed_text("abcdefghijklmnop");
        assert_eq!(text_of(&full), "abcdefghijklmnop", "a field may be full, without a NUL");
    }
}
