use std::path::Path;

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
    Options { cluster_cidr: "10.244.0.0/16".parse().unwrap(), nodeport_addresses: vec![] }
}

fn run(yaml: &str) -> Desired {
    desired_state(&objects(yaml), &node(), &opts())
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
    assert_eq!(lb.source_ranges, vec!["192.168.50.0/24".parse::<Cidr>().unwrap()]);
    assert!(lb.external_local);
    assert_eq!(backends(&d, tcp("192.168.60.1", 443)), ["10.244.1.7:8443 local"]);
    assert!(d.frontends[&tcp("192.168.50.10", 30443)].source_ranges.is_empty(), "ranges apply to LB IPs only");
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
    let o = Options { nodeport_addresses: vec!["192.168.50.0/24".parse().unwrap()], ..opts() };
    let d = desired_state(&objects(LB), &node(), &o);
    assert!(d.frontends.contains_key(&tcp("192.168.50.10", 30443)));
    assert!(!d.frontends.contains_key(&tcp("172.16.0.10", 30443)));
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
    assert_eq!(d.frontends[&tcp("172.16.9.9", 80)].service.name, "aaa");
    assert_eq!(
        d.errors[0].to_string(),
        "Service default/zz: spec.externalIPs: frontend 172.16.9.9:80/TCP already belongs to Service default/aaa"
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
fn bad_slice_addresses_are_reported_and_skipped() {
    let d = run(&WEB.replace("[10.244.2.10]", "[10.244.2.10, bogus]"));
    assert_eq!(
        d.errors[0].to_string(),
        "EndpointSlice shop/web-1: endpoints[1].addresses[1]: \"bogus\" is not an IPv4 address"
    );
    assert_eq!(backends(&d, tcp("10.96.0.10", 80)).len(), 2);
}

#[test]
fn the_same_objects_in_any_order_give_the_same_state() {
    let mut o = objects(&format!("{WEB}---\n{LB}"));
    let a = desired_state(&o, &node(), &opts());
    o.services.reverse();
    o.slices.reverse();
    assert_eq!(a, desired_state(&o, &node(), &opts()));
}
