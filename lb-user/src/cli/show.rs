//! Text views for people: the desired state next to what the maps hold.
use std::fmt::Write;

use crate::model::Desired;

/// One line per frontend with its backends, then health checks.
pub fn desired(d: &Desired) -> String {
    let mut out = String::new();
    for (key, f) in &d.frontends {
        let mut flags = Vec::new();
        if f.external_local {
            flags.push("etp=Local".to_string());
        }
        if let Some(t) = f.affinity_timeout_s {
            flags.push(format!("affinity={t}s"));
        }
        if !f.source_ranges.is_empty() {
            let ranges: Vec<String> = f.source_ranges.iter().map(|r| r.to_string()).collect();
            flags.push(format!("sources={}", ranges.join(",")));
        }
        let backends: Vec<String> = f
            .backends
            .iter()
            .map(|b| format!("{}:{}{}", b.addr, b.port, if b.local { "(local)" } else { "" }))
            .collect();
        let backends = if backends.is_empty() { "-".to_string() } else { backends.join(" ") };
        let _ = writeln!(
            out,
            "{key:<24} {:<12} {:<24} {:<28} -> {backends}",
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
