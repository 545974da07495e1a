//! Text views for people: the desired state next to what the maps hold.
use std::fmt::Write;

use crate::model::{BackendAddr, Desired, SourceRanges, WhenEmpty};

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
