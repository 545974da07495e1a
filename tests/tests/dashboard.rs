//! Needs promtool (Debian's `prometheus` package, which `cargo xtask setup` installs). The
//! Grafana dashboard (deploy/grafana/kube-xdp-lb.json) asks Prometheus valid PromQL: promtool
//! parses every panel query as a recording rule. (lb-user's unit tests check that every
//! metric the queries name is one /metrics serves.)
use std::{path::Path, process::Command};

use serde_json::Value;

/// Every panel query of the dashboard, with Grafana's interval variable as a real range.
fn panel_queries() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/kube-xdp-lb.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().unwrap().replace("$__rate_interval", "5m"));
        }
    }
    out
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let queries = panel_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, expr)| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": expr}))
        .collect();
    let file = std::env::temp_dir().join(format!("lb-dashboard-rules-{}.yaml", std::process::id()));
    let yaml = serde_yaml::to_string(&serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]})).unwrap();
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new("promtool").args(["check", "rules"]).arg(&file).output();
    let _ = std::fs::remove_file(&file);
    let out = out.unwrap_or_else(|e| {
        panic!("promtool not runnable ({e}): install Debian's `prometheus` package (`cargo xtask setup` does)")
    });
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
