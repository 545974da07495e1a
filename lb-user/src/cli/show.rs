//! Text views for people: the desired state next to what the maps hold.
use std::fmt::Write;

use lb_common::{user::ip_from_be, SockConn, IPPROTO_TCP};

use crate::model::{BackendAddr, Desired, SourceRanges, WhenEmpty};

/// One line per connected socket the hooks translated: what the application connected to,
/// the backend it is connected to instead, and their ids (the counters' indices).
pub fn sockets(conns: &[(u64, SockConn)]) -> String {
    let mut out = String::new();
    for (cookie, c) in conns {
        let proto = if c.proto == IPPROTO_TCP { "TCP" } else { "UDP" };
        let _ = writeln!(
            out,
            "socket {cookie:<8} {proto} {}:{} -> {}:{}  frontend {} backend {}",
            ip_from_be(c.frontend_addr_be),
            u16::from_be(c.frontend_port_be),
            ip_from_be(c.backend_addr_be),
            u16::from_be(c.backend_port_be),
            c.svc_id,
            c.backend_id
        );
    }
    out
}

/// One line per frontend with its backends, then health checks.
pub fn desired(d: &Desired) -> String {
    let mut out = String::new();
    let list = |backends: &[BackendAddr]| {
        let shown: Vec<String> =
            backends.iter().map(|b| format!("{}:{}{}", b.addr, b.port, if b.local { "(local)" } else { "" })).collect();
        shown.join(" ")
    };
    for (key, f) in &d.frontends {
        let mut flags = Vec::new();
        if f.external_local {
            flags.push("etp=Local".to_string());
        }
        if let Some(t) = f.affinity_timeout_s {
            flags.push(format!("affinity={t}s"));
        }
        match &f.source_ranges {
            SourceRanges::Any => {}
            SourceRanges::Only(ranges) => {
                let ranges: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
                flags.push(format!("sources={}", ranges.join(",")));
            }
            SourceRanges::Closed => flags.push("sources=none".to_string()),
        }
        let backends = if f.backends.is_empty() {
            match f.when_empty {
                WhenEmpty::Refuse => "refuse".to_string(),
                WhenEmpty::Drop => "drop".to_string(),
            }
        } else {
            list(&f.backends)
        };
        let short_circuit = if f.short_circuit_backends.is_empty() {
            String::new()
        } else {
            format!(" (from this node: {})", list(&f.short_circuit_backends))
        };
        let _ = writeln!(
            out,
            "{key:<24} {:<12} {:<24} {:<28} -> {backends}{short_circuit}",
            format!("{:?}", f.kind),
            f.service.to_string(),
            flags.join(" ")
        );
    }
    for h in &d.health_checks {
        let _ = writeln!(
            out,
            "healthCheckNodePort {} for {}: {} local endpoints",
            h.node_port, h.service, h.local_endpoints
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::user::addr_be;

    #[test]
    fn a_socket_line_names_both_ends_in_host_order() {
        let c = lb_common::SockConn {
            cookie: 5,
            frontend_addr_be: addr_be(Ipv4Addr::new(10, 96, 0, 1)),
            backend_addr_be: addr_be(Ipv4Addr::new(10, 244, 2, 10)),
            frontend_port_be: 80u16.to_be(),
            backend_port_be: 8080u16.to_be(),
            backend_id: 7,
            backend_gen: 1,
            svc_id: 3,
            proto: lb_common::IPPROTO_TCP,
            _pad: [0; 3],
            _pad2: 0,
        };
        assert_eq!(
            super::sockets(&[(42, c)]),
            "socket 42       TCP 10.96.0.1:80 -> 10.244.2.10:8080  frontend 3 backend 7\n"
        );
    }
}
