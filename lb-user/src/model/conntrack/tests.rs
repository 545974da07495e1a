//! kube-proxy's cleanup cases (pkg/proxy/conntrack/cleanup_test.go, and the stale-endpoint
//! rules of pkg/proxy/endpoints.go) on this model's states. kube-proxy's Service: ClusterIP
//! 172.30.1.1, externalIP 192.168.99.100, LoadBalancer IP 1.2.3.4, ports 53/TCP and 53/UDP
//! (nodePort 5353), endpoint 10.240.0.4:5300.
use std::path::Path;

use super::*;
use crate::{
    model::{desired_state, NodeInfo, Options},
    source::{
        manifests::{parse_into, Report},
        Objects,
    },
};

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: cleanup-test, namespace: test}
spec:
  type: LoadBalancer
  clusterIP: 172.30.1.1
  externalIPs: [192.168.99.100]
  ports:
  - {name: dns-tcp, port: 53, protocol: TCP, nodePort: 5353}
  - {name: dns-udp, port: 53, protocol: UDP, nodePort: 5353}
status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}
"#;

/// The Service with a slice of these endpoints (YAML flow maps, without the braces).
fn state(endpoints: &[&str]) -> Desired {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("- {{{e}}}")).collect();
    let slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: cleanup-test-1, namespace: test, labels: {{kubernetes.io/service-name: cleanup-test}}}}\naddressType: IPv4\nports: [{{name: dns-tcp, port: 5300, protocol: TCP}}, {{name: dns-udp, port: 5300, protocol: UDP}}]\nendpoints:{}\n",
        if endpoints.is_empty() { " []".to_string() } else { format!("\n{}", endpoints.join("\n")) }
    );
    run(&format!("{SERVICE}---\n{slice}"))
}

fn run(yaml: &str) -> Desired {
    let mut objects = Objects::default();
    let mut report = Report::default();
    parse_into(Path::new("t.yaml"), yaml, &mut objects, &mut report);
    assert!(report.errors.is_empty(), "{report}");
    let node = NodeInfo { name: "node1".into(), addresses: vec!["192.168.50.10".parse().unwrap()], zone: None };
    let d = desired_state(&objects, &node, &Options::default());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    d
}

fn show(cleanups: &[FlowCleanup]) -> Vec<String> {
    cleanups
        .iter()
        .map(|c| match c {
            FlowCleanup::ToBackend { frontend, backend } => format!("{frontend} -> {backend}"),
            FlowCleanup::ToFrontend { frontend } => format!("{frontend}"),
        })
        .collect()
}

const UDP_FRONTENDS: [&str; 4] =
    ["1.2.3.4:53/UDP", "172.30.1.1:53/UDP", "192.168.50.10:5353/UDP", "192.168.99.100:53/UDP"];

#[test]
fn a_deleted_endpoint_clears_its_flows_on_every_udp_frontend_only() {
    let old = state(&["addresses: [10.240.0.4]", "addresses: [10.240.0.5]"]);
    let new = state(&["addresses: [10.240.0.5]"]);
    let want: Vec<String> = UDP_FRONTENDS.iter().map(|f| format!("{f} -> 10.240.0.4:5300")).collect();
    assert_eq!(show(&flow_cleanups(&old, &new)), want);
}

#[test]
fn an_endpoint_that_stops_serving_counts_as_deleted() {
    let old = state(&["addresses: [10.240.0.4]"]);
    let new = state(&["addresses: [10.240.0.4], conditions: {ready: false, serving: false}"]);
    let want: Vec<String> = UDP_FRONTENDS.iter().map(|f| format!("{f} -> 10.240.0.4:5300")).collect();
    assert_eq!(show(&flow_cleanups(&old, &new)), want);
}

#[test]
fn a_terminating_endpoint_that_still_serves_keeps_its_flows() {
    let old = state(&["addresses: [10.240.0.4]", "addresses: [10.240.0.5]"]);
    let new = state(&[
        "addresses: [10.240.0.4], conditions: {ready: false, serving: true, terminating: true}",
        "addresses: [10.240.0.5]",
    ]);
    assert_eq!(flow_cleanups(&old, &new), []);
}

#[test]
fn removing_an_endpoint_that_was_not_serving_clears_nothing() {
    let old =
        state(&["addresses: [10.240.0.4], conditions: {ready: false, serving: false}", "addresses: [10.240.0.5]"]);
    let new = state(&["addresses: [10.240.0.5]"]);
    assert_eq!(flow_cleanups(&old, &new), []);
}

#[test]
fn a_newly_active_service_clears_every_flow_to_its_udp_frontends() {
    let old = state(&[]);
    let new = state(&["addresses: [10.240.0.4]"]);
    assert_eq!(show(&flow_cleanups(&old, &new)), UDP_FRONTENDS);
    // Endpoints that exist but do not serve do not make it active.
    let not_serving = state(&["addresses: [10.240.0.4], conditions: {ready: false, serving: false}"]);
    assert_eq!(flow_cleanups(&old, &not_serving), []);
    assert_eq!(show(&flow_cleanups(&not_serving, &new)), UDP_FRONTENDS);
}

#[test]
fn a_deleted_service_clears_its_udp_frontends() {
    let other = "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: test}\nspec: {clusterIP: 172.30.99.99, ports: [{port: 53, protocol: UDP}, {name: tcp, port: 53}]}\n";
    let old = run(&format!("{SERVICE}---\n{other}"));
    let new = run(SERVICE);
    assert_eq!(show(&flow_cleanups(&old, &new)), ["172.30.99.99:53/UDP"]);
}

#[test]
fn policy_and_topology_changes_move_no_flow() {
    let old = state(&["addresses: [10.240.0.4], nodeName: node2", "addresses: [10.240.0.5], nodeName: node1"]);
    // externalTrafficPolicy Local: the external frontends now use only the local endpoint,
    // but both still serve.
    let mut objects_yaml = SERVICE.replace(
        "type: LoadBalancer",
        "type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
    );
    objects_yaml.push_str("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: cleanup-test-1, namespace: test, labels: {kubernetes.io/service-name: cleanup-test}}\naddressType: IPv4\nports: [{name: dns-tcp, port: 5300, protocol: TCP}, {name: dns-udp, port: 5300, protocol: UDP}]\nendpoints:\n- {addresses: [10.240.0.4], nodeName: node2}\n- {addresses: [10.240.0.5], nodeName: node1}\n");
    let new = run(&objects_yaml);
    assert_ne!(old.frontends, new.frontends, "the backend sets did change");
    assert_eq!(flow_cleanups(&old, &new), []);
    assert_eq!(flow_cleanups(&new, &new), []);
}
