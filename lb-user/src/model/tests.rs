use std::{net::Ipv4Addr, path::Path};

use super::*;
use crate::source::manifests::{parse_into, Report};

fn objects(yaml: &str) -> Objects {
    let mut o = Objects::default();
    let mut r = Report::default();
    parse_into(Path::new("t.yaml"), yaml, &mut o, &mut r);
    assert!(r.errors.is_empty(), "fixture must parse: {r}");
    o
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node1".into(),
        addresses: vec!["192.168.50.10".parse().unwrap(), "172.16.0.10".parse().unwrap()],
        zone: Some("zone-a".into()),
    }
}

fn opts() -> Options {
    Options::default()
}

fn run(yaml: &str) -> Desired {
    desired_state(&objects(yaml), &node(), &opts())
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn key(addr: &str, port: u16, protocol: Protocol) -> FrontendKey {
    FrontendKey { addr: addr.parse().unwrap(), port, protocol }
}

fn tcp(addr: &str, port: u16) -> FrontendKey {
    key(addr, port, Protocol::Tcp)
}

fn backends(d: &Desired, k: FrontendKey) -> Vec<String> {
    let f = d
        .frontends
        .get(&k)
        .unwrap_or_else(|| panic!("no frontend {k}; have {:?}", d.frontends.keys().collect::<Vec<_>>()));
    f.backends.iter().map(|b| format!("{}:{}{}", b.addr, b.port, if b.local { " local" } else { "" })).collect()
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: web}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.10], nodeName: node1}
- {addresses: [10.244.2.10], nodeName: node2}
"#;

#[test]
fn cluster_ip_with_named_target_port_resolved_through_the_slice() {
    let d = run(WEB);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.frontends.len(), 1);
    assert_eq!(backends(&d, tcp("10.96.0.10", 80)), ["10.244.1.10:8080 local", "10.244.2.10:8080"]);
    let f = &d.frontends[&tcp("10.96.0.10", 80)];
    assert_eq!((f.kind, f.external_local, f.affinity_timeout_s), (FrontendKind::ClusterIp, false, None));
    assert!(f.serving.is_empty(), "only UDP frontends keep their serving endpoints: {:?}", f.serving);
    assert_eq!(f.service.to_string(), "shop/web");
}

#[test]
fn ignored_service_kinds_and_labels() {
    let d = run(r#"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: v1
kind: Service
metadata: {name: other-proxy, labels: {service.kubernetes.io/service-proxy-name: someone-else}}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless-label, labels: {service.kubernetes.io/headless: ""}}
spec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}
"#);
    assert!(d.frontends.is_empty(), "{:?}", d.frontends.keys().collect::<Vec<_>>());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
}

#[test]
fn ports_match_by_name_and_protocol() {
    let d = run(r#"
apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  clusterIP: 10.96.0.53
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: dns-tcp}
  - {name: metrics, port: 9153, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports:
- {name: dns, port: 5353, protocol: UDP}
- {name: dns-tcp, port: 5354, protocol: TCP}
- {name: dns, port: 9999, protocol: TCP}
endpoints: [{addresses: [10.244.1.53]}]
"#);
    assert_eq!(backends(&d, key("10.96.0.53", 53, Protocol::Udp)), ["10.244.1.53:5353"]);
    assert_eq!(backends(&d, tcp("10.96.0.53", 53)), ["10.244.1.53:5354"]);
    // No slice port named "metrics": the frontend exists and refuses.
    assert!(backends(&d, tcp("10.96.0.53", 9153)).is_empty());
}

fn readiness_fixture(policy: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: app}}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  externalTrafficPolicy: {policy}
  ports: [{{port: 80, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: app-1, labels: {{kubernetes.io/service-name: app}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- {{addresses: [10.244.1.1], nodeName: node1, conditions: {{ready: false, serving: true, terminating: true}}}}
- {{addresses: [10.244.1.2], nodeName: node1, conditions: {{ready: false, serving: false, terminating: true}}}}
- {{addresses: [10.244.2.1], nodeName: node2, conditions: {{ready: true}}}}
- {{addresses: [10.244.2.2], nodeName: node2, conditions: {{ready: false}}}}
"#
    )
}

#[test]
fn ready_endpoints_win_over_terminating_ones() {
    let d = run(&readiness_fixture("Cluster"));
    assert_eq!(backends(&d, tcp("10.96.0.20", 80)), ["10.244.2.1:8080"]);
    assert_eq!(backends(&d, tcp("192.168.50.10", 30080)), ["10.244.2.1:8080"]);
}

#[test]
fn local_and_cluster_scopes_fall_back_to_terminating_independently() {
    let d = run(&readiness_fixture("Local"));
    // Cluster scope has a ready endpoint (on node2); local scope has only a serving,
    // terminating one, which it falls back to. The not-serving one is never used.
    assert_eq!(backends(&d, tcp("10.96.0.20", 80)), ["10.244.2.1:8080"]);
    let np = &d.frontends[&tcp("192.168.50.10", 30080)];
    assert_eq!(backends(&d, tcp("192.168.50.10", 30080)), ["10.244.1.1:8080 local"]);
    assert!(np.external_local);
    assert!(!d.frontends[&tcp("10.96.0.20", 80)].external_local, "ETP does not apply to the ClusterIP");
}

#[test]
fn no_ready_endpoints_at_all_falls_back_to_serving_terminating() {
    let yaml =
        readiness_fixture("Cluster").replace("conditions: {ready: true}", "conditions: {ready: false, serving: false}");
    let d = run(&yaml);
    assert_eq!(backends(&d, tcp("10.96.0.20", 80)), ["10.244.1.1:8080 local"]);
}

#[test]
fn internal_traffic_policy_local_limits_the_cluster_ip_only() {
    let yaml = WEB.replace(
        "clusterIP: 10.96.0.10",
        "clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n  externalIPs: [172.16.9.9]",
    );
    let d = run(&yaml);
    assert_eq!(backends(&d, tcp("10.96.0.10", 80)), ["10.244.1.10:8080 local"]);
    assert_eq!(backends(&d, tcp("172.16.9.9", 80)).len(), 2, "externalIPs follow ETP, not ITP");
}

fn hints_fixture(second_hint: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: zonal}}
spec: {{clusterIP: 10.96.0.30, ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: zonal-1, labels: {{kubernetes.io/service-name: zonal}}}}
addressType: IPv4
ports: [{{port: 80}}]
endpoints:
- {{addresses: [10.244.1.1], zone: zone-a, hints: {{forZones: [{{name: zone-a}}]}}}}
- {{addresses: [10.244.2.1], zone: zone-b{second_hint}}}
"#
    )
}

#[test]
fn topology_hints_are_honoured_only_when_every_endpoint_has_them() {
    let d = run(&hints_fixture(", hints: {forZones: [{name: zone-b}]}"));
    assert_eq!(backends(&d, tcp("10.96.0.30", 80)), ["10.244.1.1:80"]);
    let d = run(&hints_fixture(""));
    assert_eq!(backends(&d, tcp("10.96.0.30", 80)).len(), 2);
    // Hints that name no zone of this node: keep everything.
    let d = run(&hints_fixture(", hints: {forZones: [{name: zone-b}]}").replace("name: zone-a}", "name: zone-c}"));
    assert_eq!(backends(&d, tcp("10.96.0.30", 80)).len(), 2);
}

#[test]
fn session_affinity_default_custom_and_invalid() {
    let with = |extra: &str| run(&WEB.replace("clusterIP: 10.96.0.10", &format!("clusterIP: 10.96.0.10\n  {extra}")));
    let d = with("sessionAffinity: ClientIP");
    assert_eq!(d.frontends[&tcp("10.96.0.10", 80)].affinity_timeout_s, Some(10_800));
    let d = with("sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}");
    assert_eq!(d.frontends[&tcp("10.96.0.10", 80)].affinity_timeout_s, Some(60));
    let d = with("sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}");
    assert_eq!(d.frontends[&tcp("10.96.0.10", 80)].affinity_timeout_s, Some(10_800));
    assert_eq!(
        d.errors[0].to_string(),
        "Service shop/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is out of range 1-86400; using 10800"
    );
}

#[test]
fn endpoints_in_several_slices_count_once_and_the_ready_copy_wins() {
    let yaml = format!(
        "{WEB}---\n{}",
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-2, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.2.10], nodeName: node2, conditions: {ready: false}}
- {addresses: [10.244.3.10], nodeName: node3}
"#
    );
    let d = run(&yaml);
    assert_eq!(backends(&d, tcp("10.96.0.10", 80)), ["10.244.1.10:8080 local", "10.244.2.10:8080", "10.244.3.10:8080"]);
}

#[test]
fn other_address_families_are_filtered() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: dual}
spec:
  clusterIP: fd00::10
  clusterIPs: [fd00::10, 10.96.0.40]
  ipFamilies: [IPv6, IPv4]
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-6, labels: {kubernetes.io/service-name: dual}}
addressType: IPv6
ports: [{port: 80}]
endpoints: [{addresses: ["fd00::1:5"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-4, labels: {kubernetes.io/service-name: dual}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.1.5]}]
"#;
    let d = run(yaml);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.frontends.keys().copied().collect::<Vec<_>>(), [tcp("10.96.0.40", 80)]);
    assert_eq!(backends(&d, tcp("10.96.0.40", 80)), ["10.244.1.5:80"]);
}

const LB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: shop-lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  externalIPs: [172.16.50.5]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [192.168.50.0/24, "2001:db8::/32"]
  ports: [{port: 443, nodePort: 30443, targetPort: 8443}]
status:
  loadBalancer: {ingress: [{ip: 192.168.60.1}, {hostname: lb.example.com}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: shop-lb-1, labels: {kubernetes.io/service-name: shop-lb}}
addressType: IPv4
ports: [{port: 8443}]
endpoints:
- {addresses: [10.244.1.7], nodeName: node1}
- {addresses: [10.244.1.8], nodeName: node1, conditions: {ready: false}}
- {addresses: [10.244.2.7], nodeName: node2}
"#;

#[test]
fn load_balancer_frontends_source_ranges_and_health_check() {
    let d = run(LB);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let keys: Vec<_> = d.frontends.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        keys,
        [
            "10.96.0.50:443/TCP",
            "172.16.0.10:30443/TCP",
            "172.16.50.5:443/TCP",
            "192.168.50.10:30443/TCP",
            "192.168.60.1:443/TCP"
        ]
    );
    let lb = &d.frontends[&tcp("192.168.60.1", 443)];
    assert_eq!(lb.kind, FrontendKind::LoadBalancer);
    // The range holds the node's primary address, so the LB IP itself is let in too (a
    // request from the node to its LB IP loops back with that source).
    assert_eq!(lb.source_ranges, SourceRanges::Only(vec![net("192.168.50.0/24"), net("192.168.60.1/32")]));
    assert!(lb.external_local);
    assert_eq!(backends(&d, tcp("192.168.60.1", 443)), ["10.244.1.7:8443 local"]);
    for other in [tcp("192.168.50.10", 30443), tcp("172.16.50.5", 443), tcp("10.96.0.50", 443)] {
        assert_eq!(d.frontends[&other].source_ranges, SourceRanges::Any, "ranges apply to LB IPs only: {other}");
    }
    assert_eq!(d.frontends[&tcp("172.16.50.5", 443)].kind, FrontendKind::ExternalIp);
    assert_eq!(
        d.health_checks,
        vec![HealthCheck {
            service: ServiceRef { namespace: "default".into(), name: "shop-lb".into() },
            node_port: 32000,
            local_endpoints: 1
        }]
    );
}

#[test]
fn nodeport_addresses_limit_where_node_ports_open() {
    let o = Options { nodeport_addresses: vec![net("192.168.50.0/24")], ..Options::default() };
    let d = desired_state(&objects(LB), &node(), &o);
    assert!(d.frontends.contains_key(&tcp("192.168.50.10", 30443)));
    assert!(!d.frontends.contains_key(&tcp("172.16.0.10", 30443)));
}

#[test]
fn node_ports_open_on_loopback_for_the_socket_hooks_where_kube_proxy_opens_them() {
    let on = Options { localhost_node_ports: true, ..Options::default() };
    let d = desired_state(&objects(LB), &node(), &on);
    let f = d.frontends.get(&tcp("127.0.0.1", 30443)).expect("a loopback NodePort");
    assert_eq!(
        (f.kind, f.backends.clone()),
        (FrontendKind::NodePort, d.frontends[&tcp("192.168.50.10", 30443)].backends.clone())
    );
    let covered = Options { nodeport_addresses: vec![net("127.0.0.0/8"), net("192.168.50.0/24")], ..on.clone() };
    assert!(desired_state(&objects(LB), &node(), &covered).frontends.contains_key(&tcp("127.0.0.1", 30443)));
    // Addresses listed without loopback, or the hooks off: none, as kube-proxy.
    let elsewhere = Options { nodeport_addresses: vec![net("192.168.50.0/24")], ..on };
    assert!(!desired_state(&objects(LB), &node(), &elsewhere).frontends.contains_key(&tcp("127.0.0.1", 30443)));
    assert!(!run(LB).frontends.contains_key(&tcp("127.0.0.1", 30443)));
}

#[test]
fn bad_fields_are_reported_and_other_services_still_served() {
    let yaml = format!(
        "{WEB}---\n{}",
        r#"
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.99
  externalIPs: [not-an-ip]
  ports:
  - {name: a, port: 70000}
  - {name: b, port: 81}
  - {name: c, port: 82, protocol: SCTP}
"#
    );
    let d = run(&yaml);
    let errors: Vec<String> = d.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors, [
        "Service shop/broken: spec.externalIPs[0]: \"not-an-ip\" is not an IP address",
        "Service shop/broken: spec.ports[0].port: 70000 is out of range 1-65535",
        "Service shop/broken: spec.ports[1].nodePort: missing (the API server allocates it; manifests must give it)",
        "Service shop/broken: spec.ports[2].protocol: SCTP is not supported by this datapath (the kernel lacks it); port skipped",
    ]);
    assert!(d.frontends.contains_key(&tcp("10.96.0.10", 80)), "the good Service is served");
    assert!(d.frontends.contains_key(&tcp("10.96.0.99", 81)), "the good port of the bad Service is served");
}

#[test]
fn a_frontend_claimed_twice_goes_to_the_first_service_by_name() {
    let svc = |name: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.1.{}, externalIPs: [172.16.9.9], ports: [{{port: 80}}]}}\n", name.len())
    };
    let d = run(&format!("{}---\n{}", svc("zz"), svc("aaa")));
    assert_eq!(d.frontends[&tcp("172.16.9.9", 80)].service.name.as_ref(), "aaa");
    assert_eq!(
        d.errors[0].to_string(),
        "Service default/zz: spec.externalIPs[0]: frontend 172.16.9.9:80/TCP already belongs to Service default/aaa"
    );
}

#[test]
fn legacy_endpoints_serve_selectorless_services_without_slices() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: 10.96.0.60, ports: [{name: pg, port: 5432}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: db}
subsets:
- addresses: [{ip: 192.168.50.77}]
  notReadyAddresses: [{ip: 192.168.50.78}]
  ports: [{name: pg, port: 15432}]
"#;
    let d = run(yaml);
    assert_eq!(backends(&d, tcp("10.96.0.60", 5432)), ["192.168.50.77:15432"]);
    // When an EndpointSlice exists, it is the truth and Endpoints are ignored.
    let with_slice = format!("{yaml}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: db-x, labels: {{kubernetes.io/service-name: db}}}}\naddressType: IPv4\nports: [{{name: pg, port: 6432}}]\nendpoints: [{{addresses: [10.244.1.9]}}]\n");
    assert_eq!(backends(&run(&with_slice), tcp("10.96.0.60", 5432)), ["10.244.1.9:6432"]);
}

#[test]
fn only_the_first_address_of_an_endpoint_is_used_and_a_bad_one_is_reported() {
    let d = run(&WEB.replace("[10.244.2.10]", "[10.244.2.10, 10.244.2.99, bogus]"));
    assert!(d.errors.is_empty(), "later addresses are ignored, as kube-proxy does: {:?}", d.errors);
    assert_eq!(backends(&d, tcp("10.96.0.10", 80)), ["10.244.1.10:8080 local", "10.244.2.10:8080"]);
    let d = run(&WEB.replace("[10.244.2.10]", "[bogus, 10.244.2.10]"));
    assert_eq!(
        d.errors[0].to_string(),
        "EndpointSlice shop/web-1: endpoints[1].addresses[0]: \"bogus\" is not an IPv4 address"
    );
    assert_eq!(backends(&d, tcp("10.96.0.10", 80)), ["10.244.1.10:8080 local"]);
}

#[test]
fn the_same_objects_in_any_order_give_the_same_state() {
    // Errors too: two slices with no Service label, two with a bad address.
    let stray = |name: &str| {
        format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}}}\naddressType: IPv4\nendpoints: []\n")
    };
    let bad = |name: &str| {
        format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [bogus]}}]\n")
    };
    let mut o = objects(&[WEB, LB, &stray("x"), &stray("y"), &bad("web-2"), &bad("web-3")].join("---\n"));
    let a = desired_state(&o, &node(), &opts());
    assert_eq!(a.errors.len(), 4, "{:?}", a.errors);
    o.services.reverse();
    o.slices.reverse();
    assert_eq!(a, desired_state(&o, &node(), &opts()));
}

/// A Service `name` with `spec` (YAML lines, indented two spaces) and a slice of
/// `endpoints` (flow maps without braces), port 80 -> 8080.
fn svc_with(name: &str, spec: &str, endpoints: &[&str]) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("- {{{e}}}")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n{spec}\n  ports: [{{port: 80, nodePort: 30080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:{}\n",
        if endpoints.is_empty() { " []".to_string() } else { format!("\n{}", endpoints.join("\n")) }
    )
}

fn frontend(d: &Desired, k: FrontendKey) -> &Frontend {
    d.frontends.get(&k).unwrap_or_else(|| panic!("no frontend {k}; have {:?}", d.frontends.keys().collect::<Vec<_>>()))
}

fn list(b: &[BackendAddr]) -> Vec<String> {
    b.iter().map(|b| format!("{}:{}{}", b.addr, b.port, if b.local { " local" } else { "" })).collect()
}

#[test]
fn unset_conditions_mean_ready_and_serving_but_not_terminating() {
    // serving unset on a terminating endpoint means serving (kube-proxy), not "as ready".
    let d = run(&svc_with(
        "a",
        "  clusterIP: 10.96.2.1",
        &["addresses: [10.244.1.1], conditions: {ready: false, terminating: true}"],
    ));
    assert_eq!(backends(&d, tcp("10.96.2.1", 80)), ["10.244.1.1:8080"]);
    // terminating unset means not terminating: a not-ready endpoint is no fallback.
    let d = run(&svc_with(
        "a",
        "  clusterIP: 10.96.2.1",
        &["addresses: [10.244.1.1], conditions: {ready: false, serving: true}"],
    ));
    assert!(backends(&d, tcp("10.96.2.1", 80)).is_empty());
    // No conditions at all: ready.
    let d = run(&svc_with("a", "  clusterIP: 10.96.2.1", &["addresses: [10.244.1.1]"]));
    assert_eq!(backends(&d, tcp("10.96.2.1", 80)), ["10.244.1.1:8080"]);
}

#[test]
fn slices_of_another_family_or_without_the_service_label_are_not_the_services() {
    let yaml = format!(
        "{}---\n{}",
        svc_with("a", "  clusterIP: 10.96.2.1", &["addresses: [10.244.1.1]"]),
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-unlabelled}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.2]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-fqdn, labels: {kubernetes.io/service-name: a}}
addressType: FQDN
ports: [{port: 8080}]
endpoints: [{addresses: [db.example.com]}]
"#
    );
    let d = run(&yaml);
    assert_eq!(backends(&d, tcp("10.96.2.1", 80)), ["10.244.1.1:8080"]);
    let errors: Vec<String> = d.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors, ["EndpointSlice default/a-unlabelled: metadata.labels: no kubernetes.io/service-name label, so it belongs to no Service"]);
}

/// Every ordering of `items` (Heap's algorithm).
fn permutations<T: Clone>(items: Vec<T>) -> Vec<Vec<T>> {
    fn go<T: Clone>(k: usize, items: &mut Vec<T>, out: &mut Vec<Vec<T>>) {
        if k <= 1 {
            out.push(items.clone());
            return;
        }
        for i in 0..k {
            go(k - 1, items, out);
            let j = if k.is_multiple_of(2) { i } else { 0 };
            items.swap(j, k - 1);
        }
    }
    let mut items = items;
    let mut out = Vec::new();
    go(items.len(), &mut items, &mut out);
    out
}

#[test]
fn duplicate_endpoints_resolve_the_same_whatever_order_the_objects_arrive_in() {
    let slice = |name: &str, endpoints: &str| {
        format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: dup}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}")
    };
    let terminating = "conditions: {ready: false, serving: true, terminating: true}";
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dup}}\nspec: {{clusterIP: 10.96.2.2, ports: [{{port: 80}}]}}\n{}{}{}",
        // The same IP in two slices: the old pod terminating, a new pod running with it.
        slice("dup-a", &format!("- {{addresses: [10.244.1.1], {terminating}}}\n- {{addresses: [10.244.1.2]}}\n")),
        slice("dup-b", "- {addresses: [10.244.1.1], nodeName: node1}\n"),
        // And twice in one slice.
        slice("dup-c", &format!("- {{addresses: [10.244.1.3], {terminating}}}\n- {{addresses: [10.244.1.3], nodeName: node1}}\n")),
    );
    let objects = objects(&yaml);
    let want = desired_state(&objects, &node(), &opts());
    assert_eq!(
        backends(&want, tcp("10.96.2.2", 80)),
        ["10.244.1.1:8080 local", "10.244.1.2:8080", "10.244.1.3:8080 local"],
        "the running copies win over the terminating ones"
    );
    let mut seen = 0;
    for slices in permutations(objects.slices.clone()) {
        for reversed in [false, true] {
            let mut o = objects.clone();
            o.slices = slices.clone();
            if reversed {
                o.slices.iter_mut().for_each(|s| s.endpoints.reverse());
            }
            assert_eq!(desired_state(&o, &node(), &opts()), want);
            seen += 1;
        }
    }
    assert_eq!(seen, 12);
}

#[test]
fn external_traffic_policy_applies_only_to_externally_accessible_services() {
    // A ClusterIP Service without externalIPs has no external traffic to apply it to.
    let d =
        run(&readiness_fixture("Local").replace("type: NodePort", "type: ClusterIP").replace(", nodePort: 30080", ""));
    assert_eq!(backends(&d, tcp("10.96.0.20", 80)), ["10.244.2.1:8080"]);
    assert!(d.frontends.values().all(|f| !f.external_local && f.short_circuit_backends.is_empty()));
    // With an externalIP it has: that frontend is local, the ClusterIP is not.
    let d = run(&readiness_fixture("Local")
        .replace("type: NodePort", "type: ClusterIP\n  externalIPs: [172.16.9.1]")
        .replace(", nodePort: 30080", ""));
    assert_eq!(backends(&d, tcp("172.16.9.1", 80)), ["10.244.1.1:8080 local"]);
    assert!(frontend(&d, tcp("172.16.9.1", 80)).external_local);
    assert_eq!(backends(&d, tcp("10.96.0.20", 80)), ["10.244.2.1:8080"]);
}

#[test]
fn node_hints_win_over_zone_hints_and_never_narrow_the_local_set() {
    let hinted =
        |node: &str, zone: &str| format!("hints: {{forNodes: [{{name: {node}}}], forZones: [{{name: {zone}}}]}}");
    let yaml = svc_with(
        "near",
        "  type: NodePort\n  clusterIP: 10.96.2.3\n  internalTrafficPolicy: Local",
        &[
            &format!("addresses: [10.244.1.1], nodeName: node1, {}", hinted("node1", "zone-a")),
            &format!("addresses: [10.244.1.2], nodeName: node1, {}", hinted("node9", "zone-a")),
            &format!("addresses: [10.244.2.1], nodeName: node2, {}", hinted("node2", "zone-a")),
        ],
    );
    let d = run(&yaml);
    // External traffic uses the cluster set: the endpoint hinted for this node only.
    assert_eq!(backends(&d, tcp("192.168.50.10", 30080)), ["10.244.1.1:8080 local"]);
    // The ClusterIP (internalTrafficPolicy Local) uses every local ready endpoint.
    assert_eq!(backends(&d, tcp("10.96.2.3", 80)), ["10.244.1.1:8080 local", "10.244.1.2:8080 local"]);
}

#[test]
fn a_service_without_usable_endpoints_refuses_on_every_frontend() {
    let d = run(&svc_with(
        "none",
        "  type: NodePort\n  clusterIP: 10.96.2.4\n  externalIPs: [172.16.9.4]",
        &["addresses: [10.244.2.1], nodeName: node2, conditions: {ready: false, serving: false, terminating: true}"],
    ));
    assert_eq!(d.frontends.len(), 4);
    for (k, f) in &d.frontends {
        assert!(f.backends.is_empty(), "{k}");
        assert_eq!(f.when_empty, WhenEmpty::Refuse, "{k}");
    }
}

#[test]
fn internal_traffic_policy_local_without_local_endpoints_drops_on_the_cluster_ip() {
    let d = run(&svc_with(
        "itp",
        "  type: NodePort\n  clusterIP: 10.96.2.5\n  internalTrafficPolicy: Local",
        &["addresses: [10.244.2.1], nodeName: node2"],
    ));
    let cip = frontend(&d, tcp("10.96.2.5", 80));
    assert!(cip.backends.is_empty());
    assert_eq!(cip.when_empty, WhenEmpty::Drop, "endpoints exist elsewhere: drop, not refuse");
    assert_eq!(backends(&d, tcp("192.168.50.10", 30080)), ["10.244.2.1:8080"], "external traffic is not ITP's");
}

#[test]
fn external_traffic_policy_local_drops_outside_traffic_and_short_circuits_this_nodes() {
    let spec = "  type: LoadBalancer\n  clusterIP: 10.96.2.6\n  externalIPs: [172.16.9.6]\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32006";
    let endpoints = ["addresses: [10.244.2.1], nodeName: node2", "addresses: [10.244.2.2], nodeName: node2"];
    // The ingress IP goes in the Service's status, before its slice.
    let yaml = svc_with("etp", spec, &endpoints).replacen(
        "---\n",
        "status: {loadBalancer: {ingress: [{ip: 192.168.60.6}]}}\n---\n",
        1,
    );
    let d = run(&yaml);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let cluster = ["10.244.2.1:8080", "10.244.2.2:8080"];
    for k in [tcp("192.168.50.10", 30080), tcp("172.16.0.10", 30080), tcp("172.16.9.6", 80), tcp("192.168.60.6", 80)] {
        let f = frontend(&d, k);
        assert!(f.backends.is_empty(), "{k}: no local endpoint for outside traffic");
        assert_eq!(f.when_empty, WhenEmpty::Drop, "{k}");
        assert_eq!(
            list(&f.short_circuit_backends),
            cluster,
            "{k}: this node's pods and the node go to the cluster set"
        );
    }
    let cip = frontend(&d, tcp("10.96.2.6", 80));
    assert_eq!(
        (list(&cip.backends), cip.short_circuit_backends.is_empty()),
        (cluster.map(String::from).to_vec(), true)
    );
    assert_eq!(d.health_checks[0].local_endpoints, 0);
}

#[test]
fn external_traffic_policy_local_with_local_endpoints_keeps_both_sets() {
    let d = run(&readiness_fixture("Local"));
    let np = frontend(&d, tcp("192.168.50.10", 30080));
    assert_eq!(list(&np.backends), ["10.244.1.1:8080 local"], "the local set, terminating fallback included");
    assert_eq!(list(&np.short_circuit_backends), ["10.244.2.1:8080"], "the cluster set");
    assert!(frontend(&d, tcp("10.96.0.20", 80)).short_circuit_backends.is_empty(), "ClusterIP: no short circuit");
}

#[test]
fn skipped_services_get_no_frontend_at_all() {
    let d = run(r#"
apiVersion: v1
kind: Service
metadata: {name: v6-only}
spec:
  type: NodePort
  clusterIP: fd00::20
  clusterIPs: [fd00::20]
  ipFamilies: [IPv6]
  ports: [{port: 80, nodePort: 30090}]
---
apiVersion: v1
kind: Service
metadata: {name: headless-ips}
spec: {clusterIPs: [None], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: unallocated}
spec: {type: NodePort, clusterIP: "", ports: [{port: 80, nodePort: 30091}]}
"#);
    assert!(d.frontends.is_empty(), "{:?}", d.frontends.keys().collect::<Vec<_>>());
    let errors: Vec<String> = d.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        errors,
        ["Service default/unallocated: spec.clusterIP: missing (the API server allocates it; manifests must give it)"]
    );
}

fn ranged(ranges: &str) -> Desired {
    run(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: ranged}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.2.7\n  externalIPs: [172.16.9.7]\n  loadBalancerSourceRanges: {ranges}\n  ports: [{{port: 80, nodePort: 30087}}]\nstatus: {{loadBalancer: {{ingress: [{{ip: 192.168.60.7}}, {{ip: 192.168.60.8}}]}}}}\n"
    ))
}

#[test]
fn source_ranges_filter_lb_ips_only_and_admit_the_lb_ips_when_they_hold_the_node() {
    let d = ranged("[10.1.0.0/16, \" 10.2.3.4/8 \"]");
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(
        frontend(&d, tcp("192.168.60.7", 80)).source_ranges,
        SourceRanges::Only(vec![net("10.0.0.0/8"), net("10.1.0.0/16")])
    );
    for k in [tcp("10.96.2.7", 80), tcp("172.16.9.7", 80), tcp("192.168.50.10", 30087)] {
        assert_eq!(frontend(&d, k).source_ranges, SourceRanges::Any, "{k}");
    }
    // The node's primary address (192.168.50.10) is in a range: the LB IPs are let in.
    let d = ranged("[192.168.0.0/16]");
    let want = SourceRanges::Only(vec![net("192.168.0.0/16"), net("192.168.60.7/32"), net("192.168.60.8/32")]);
    assert_eq!(frontend(&d, tcp("192.168.60.8", 80)).source_ranges, want);
}

#[test]
fn source_ranges_that_are_all_invalid_close_the_lb_ips() {
    let d = ranged("[bogus, 10.0.0.0/33]");
    for k in [tcp("192.168.60.7", 80), tcp("192.168.60.8", 80)] {
        assert_eq!(frontend(&d, k).source_ranges, SourceRanges::Closed, "{k}: fail closed, not open");
    }
    assert_eq!(frontend(&d, tcp("192.168.50.10", 30087)).source_ranges, SourceRanges::Any);
    let errors: Vec<String> = d.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors, [
        "Service default/ranged: spec.loadBalancerSourceRanges[0]: \"bogus\" is not a CIDR; no valid IPv4 range is left, so the LoadBalancer IPs admit no one",
        "Service default/ranged: spec.loadBalancerSourceRanges[1]: \"10.0.0.0/33\" is not a CIDR; no valid IPv4 range is left, so the LoadBalancer IPs admit no one",
    ]);
    // One bad range among good ones only narrows who is let in.
    let d = ranged("[bogus, 10.1.0.0/16]");
    assert_eq!(frontend(&d, tcp("192.168.60.7", 80)).source_ranges, SourceRanges::Only(vec![net("10.1.0.0/16")]));
    assert_eq!(d.errors[0].to_string(), "Service default/ranged: spec.loadBalancerSourceRanges[0]: \"bogus\" is not a CIDR; left out, which only narrows who is let in");
    // Ranges of the other family only: no IPv4 source is in a listed range.
    let d = ranged("[\"2001:db8::/32\"]");
    assert_eq!(frontend(&d, tcp("192.168.60.7", 80)).source_ranges, SourceRanges::Closed);
}

fn node_port_service(name: &str, created: Option<&str>) -> String {
    let created = created.map(|t| format!(", creationTimestamp: \"{t}\"")).unwrap_or_default();
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}{created}}}\nspec: {{type: NodePort, clusterIP: 10.96.3.{}, ports: [{{port: 80, nodePort: 30100}}]}}\n", name.len())
}

#[test]
fn a_node_port_claimed_twice_stays_with_the_service_created_first() {
    for (older, newer) in [("zz", "aaa"), ("aaa", "zz")] {
        let yaml = format!(
            "{}---\n{}",
            node_port_service(newer, Some("2026-01-02T00:00:00Z")),
            node_port_service(older, Some("2026-01-01T00:00:00Z"))
        );
        let d = run(&yaml);
        assert_eq!(frontend(&d, tcp("192.168.50.10", 30100)).service.name.as_ref(), older);
        assert_eq!(frontend(&d, tcp("172.16.0.10", 30100)).service.name.as_ref(), older);
        let errors: Vec<String> = d.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors, [
            format!("Service default/{newer}: spec.ports[0].nodePort: frontend 172.16.0.10:30100/TCP already belongs to Service default/{older}"),
            format!("Service default/{newer}: spec.ports[0].nodePort: frontend 192.168.50.10:30100/TCP already belongs to Service default/{older}"),
        ]);
        assert!(
            d.frontends.contains_key(&tcp(&format!("10.96.3.{}", newer.len()), 80)),
            "the loser keeps its other frontends"
        );
    }
}

#[test]
fn a_newcomer_never_takes_a_node_port_that_is_serving() {
    // No timestamps (as in most manifests): by name "aaa" would come first...
    let first = run(&node_port_service("zz", None));
    assert_eq!(frontend(&first, tcp("192.168.50.10", 30100)).service.name.as_ref(), "zz");
    let both = objects(&format!("{}---\n{}", node_port_service("zz", None), node_port_service("aaa", None)));
    // ...but zz serves the port already, so it keeps it.
    let d = desired_state_after(&first, &both, &node(), &opts());
    assert_eq!(frontend(&d, tcp("192.168.50.10", 30100)).service.name.as_ref(), "zz");
    assert!(d.errors.iter().all(|e| e.object == "Service default/aaa"), "{:?}", d.errors);
    // The incumbent keeps it from then on, and once it is gone the newcomer gets it.
    assert_eq!(desired_state_after(&d, &both, &node(), &opts()).frontends, d.frontends);
    let alone = desired_state_after(&d, &objects(&node_port_service("aaa", None)), &node(), &opts());
    assert_eq!(frontend(&alone, tcp("192.168.50.10", 30100)).service.name.as_ref(), "aaa");
}

#[test]
fn health_check_counts_distinct_local_ready_ips_over_all_ports() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: hc}
spec:
  type: LoadBalancer
  clusterIP: 10.96.2.9
  externalTrafficPolicy: Local
  healthCheckNodePort: 32009
  ports: [{name: a, port: 80, nodePort: 30109}, {name: b, port: 81, nodePort: 30110}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hc-1, labels: {kubernetes.io/service-name: hc}}
addressType: IPv4
ports: [{name: a, port: 8080}, {name: b, port: 8081}]
endpoints:
- {addresses: [10.244.1.1], nodeName: node1}
- {addresses: [10.244.1.2], nodeName: node1}
- {addresses: [10.244.1.3], nodeName: node1, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.1], nodeName: node2}
"#;
    let d = run(yaml);
    assert_eq!(
        d.health_checks,
        vec![HealthCheck {
            service: ServiceRef { namespace: "default".into(), name: "hc".into() },
            node_port: 32009,
            local_endpoints: 2
        }]
    );
    // A NodePort Service with externalTrafficPolicy Local gets no health check (kube-proxy's NeedsHealthCheck).
    let d = run(&yaml.replace("type: LoadBalancer", "type: NodePort"));
    assert!(d.health_checks.is_empty());
}

const NODE1: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {topology.kubernetes.io/zone: zone-b}}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: ["fd00:1::/64", 10.244.1.0/24]}
status:
  addresses:
  - {type: Hostname, address: node1}
  - {type: ExternalIP, address: 203.0.113.10}
  - {type: InternalIP, address: "fd00::10"}
  - {type: InternalIP, address: 192.168.50.10}
"#;

fn flags() -> NodeFlags {
    NodeFlags { name: "node1".into(), addresses: vec![], zone: None, local_detect: None }
}

#[test]
fn node_facts_not_given_come_from_the_node_object() {
    let nodes = objects(NODE1).nodes;
    let info = flags().node_info(&nodes).unwrap();
    let addresses: Vec<Ipv4Addr> = vec!["192.168.50.10".parse().unwrap(), "203.0.113.10".parse().unwrap()];
    assert_eq!(info, NodeInfo { name: "node1".into(), addresses, zone: Some("zone-b".into()) });
    assert_eq!(flags().local_detect(&nodes).unwrap(), LocalDetect::NodeCidr(net("10.244.1.0/24")));
    // What the command line gives wins.
    let given = NodeFlags {
        addresses: vec!["10.0.0.1".parse().unwrap()],
        zone: Some("zone-z".into()),
        local_detect: Some(LocalDetect::ClusterCidr(net("10.244.0.0/16"))),
        ..flags()
    };
    assert_eq!(given.node_info(&nodes).unwrap().addresses, ["10.0.0.1".parse::<Ipv4Addr>().unwrap()]);
    assert_eq!(given.node_info(&nodes).unwrap().zone.as_deref(), Some("zone-z"));
    assert_eq!(given.local_detect(&nodes).unwrap(), LocalDetect::ClusterCidr(net("10.244.0.0/16")));
}

#[test]
fn node_facts_that_nothing_gives_are_errors_not_defaults() {
    let e = flags().node_info(&[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Node node1: status.addresses: no Node object of this name to read it from; give --node-address"
    );
    let e = flags().local_detect(&[]).unwrap_err();
    assert_eq!(e.to_string(), "Node node1: spec.podCIDRs: no Node object of this name to read it from; give --cluster-cidr or --node-pod-cidr");
    let bare = objects("apiVersion: v1\nkind: Node\nmetadata: {name: node1}\nspec: {podCIDRs: [bogus]}\n").nodes;
    assert_eq!(
        flags().local_detect(&bare).unwrap_err().to_string(),
        "Node node1: spec.podCIDRs: [0] \"bogus\" is not a CIDR, and no other entry is an IPv4 one; give --cluster-cidr or --node-pod-cidr"
    );
    assert_eq!(
        flags().node_info(&bare).unwrap_err().to_string(),
        "Node node1: status.addresses: no IPv4 InternalIP or ExternalIP; give --node-address"
    );
    // Another node's object is not this node's.
    let other = objects(&NODE1.replace("name: node1,", "name: node2,")).nodes;
    assert!(flags().node_info(&other).is_err());
}

#[test]
fn service_ports_whose_local_policy_finds_no_endpoint_here_are_counted_once_each() {
    let service = |name: &str, ip: &str, spec: &str, node: &str| {
        format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  clusterIP: {ip}
{spec}
  ports: [{{name: http, port: 80, nodePort: 30{last}, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.244.2.{last}], nodeName: {node}}}]
---
"#,
            last = &ip[ip.len() - 2..],
        )
    };
    let yaml = [
        // internalTrafficPolicy Local, its one endpoint elsewhere: the ClusterIP drops.
        service("int", "10.96.0.11", "  internalTrafficPolicy: Local", "node2"),
        // externalTrafficPolicy Local elsewhere: two NodePort frontends (one per node
        // address), one Service port.
        service("ext", "10.96.0.12", "  type: NodePort\n  externalTrafficPolicy: Local", "node2"),
        // Both Local, the endpoint here: nothing dropped.
        service(
            "here",
            "10.96.0.13",
            "  type: NodePort\n  internalTrafficPolicy: Local\n  externalTrafficPolicy: Local",
            "node1",
        ),
        // Cluster policies: nothing to count.
        service("plain", "10.96.0.14", "  type: NodePort", "node2"),
    ]
    .concat();
    let d = run(&yaml);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.frontends.len(), 4 + 3 * 2, "a ClusterIP each and two NodePorts for three");
    assert_eq!(d.no_local_endpoints(), NoLocalEndpoints { internal: 1, external: 1 });
    // A Service with no endpoint at all is refused, not counted.
    let none = yaml.replace("endpoints: [{addresses: [10.244.2.11], nodeName: node2}]", "endpoints: []");
    assert_eq!(run(&none).no_local_endpoints(), NoLocalEndpoints { internal: 0, external: 1 });
}
