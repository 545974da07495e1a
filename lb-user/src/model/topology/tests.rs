//! kube-proxy's TestCategorizeEndpoints (pkg/proxy/topology_test.go), case by case, under
//! kube-proxy's names: the 26 cases of its table and the PreferSameNode cases its newest
//! version adds. Inputs are kube-proxy's: the service port's policies and external
//! accessibility (a nodePort in kube-proxy's table), the node's zone label and name, and
//! endpoints with their conditions, hints and locality. Unset conditions are false there,
//! as in kube-proxy's BaseEndpointInfo.
use std::{collections::BTreeSet, net::SocketAddrV4, sync::Arc};

use super::*;
use crate::model::endpoints::Hints;

fn ep(addr: &str) -> Endpoint {
    let a: SocketAddrV4 = addr.parse().unwrap();
    Endpoint {
        addr: *a.ip(),
        port: a.port(),
        ready: false,
        serving: false,
        terminating: false,
        local: false,
        hints: None,
    }
}

impl Endpoint {
    fn ready(mut self) -> Self {
        self.ready = true;
        self
    }
    fn serving(mut self) -> Self {
        self.serving = true;
        self
    }
    fn terminating(mut self) -> Self {
        self.terminating = true;
        self
    }
    fn local(mut self) -> Self {
        self.local = true;
        self
    }
    fn zones(mut self, zones: &[&str]) -> Self {
        let nodes = self.node_hints().to_vec();
        self.hints = Some(Arc::new(Hints { zones: Hints::of(zones.iter().map(|z| z.to_string())), nodes }));
        self
    }
    fn nodes(mut self, nodes: &[&str]) -> Self {
        let zones = self.zone_hints().to_vec();
        self.hints = Some(Arc::new(Hints { zones, nodes: Hints::of(nodes.iter().map(|n| n.to_string())) }));
        self
    }
}

/// kube-proxy's BaseServicePortInfo{internalPolicyLocal, externalPolicyLocal, nodePort}.
fn svc(internal_policy_local: bool, external_policy_local: bool, node_port: bool) -> ServicePortInfo {
    ServicePortInfo { internal_policy_local, external_policy_local, externally_accessible: node_port }
}

const CLUSTER: ServicePortInfo =
    ServicePortInfo { internal_policy_local: false, external_policy_local: false, externally_accessible: false };

struct Case {
    name: &'static str,
    node_name: &'static str,
    /// None: no zone label at all.
    zone: Option<&'static str>,
    svc: ServicePortInfo,
    endpoints: Vec<Endpoint>,
    /// None: the Service does not use this kind of endpoints.
    cluster: Option<&'static [&'static str]>,
    local: Option<&'static [&'static str]>,
    /// Needed only when both sets are used; otherwise "all" is the one that is.
    all: &'static [&'static str],
    /// Endpoints exist elsewhere although none is reachable from this node.
    only_remote: bool,
}

const DEFAULTS: Case = Case {
    name: "",
    node_name: "",
    zone: Some("zone-a"),
    svc: CLUSTER,
    endpoints: Vec::new(),
    cluster: None,
    local: None,
    all: &[],
    only_remote: false,
};

/// The four endpoints the zone-hint cases share, hinted zone-a, b, c and a.
fn four_zonal() -> Vec<Endpoint> {
    vec![
        ep("10.1.2.3:80").zones(&["zone-a"]).ready(),
        ep("10.1.2.4:80").zones(&["zone-b"]).ready(),
        ep("10.1.2.5:80").zones(&["zone-c"]).ready(),
        ep("10.1.2.6:80").zones(&["zone-a"]).ready(),
    ]
}

/// The same, local ones first, as the policy cases use them.
fn four_zonal_two_local() -> Vec<Endpoint> {
    let mut e = four_zonal();
    e[0] = e[0].clone().local();
    e[1] = e[1].clone().local();
    e
}

/// The four endpoints the PreferSameNode cases share: zone-a/node-1, zone-b/node-2,
/// zone-c/node-3, zone-a/node-4.
fn four_hinted() -> Vec<Endpoint> {
    let z = four_zonal();
    ["node-1", "node-2", "node-3", "node-4"].iter().zip(z).map(|(n, e)| e.nodes(&[n])).collect()
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "should use topology since all endpoints have hints, node has a zone label and and there are endpoints for the node's zone",
            endpoints: four_zonal(),
            cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
            ..DEFAULTS
        },
        Case {
            name: "externalTrafficPolicy: Local, topology ignored for Local endpoints",
            svc: svc(false, true, true),
            endpoints: four_zonal_two_local(),
            cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
            local: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
            all: &["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"],
            ..DEFAULTS
        },
        Case {
            name: "internalTrafficPolicy: Local, topology ignored for Local endpoints",
            svc: svc(true, false, true),
            endpoints: four_zonal_two_local(),
            cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
            local: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
            all: &["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"],
            ..DEFAULTS
        },
        Case {
            name: "empty node labels",
            zone: None,
            endpoints: vec![ep("10.1.2.3:80").zones(&["zone-a"]).ready()],
            cluster: Some(&["10.1.2.3:80"]),
            ..DEFAULTS
        },
        Case {
            name: "empty zone label",
            zone: Some(""),
            endpoints: vec![ep("10.1.2.3:80").zones(&["zone-a"]).ready()],
            cluster: Some(&["10.1.2.3:80"]),
            ..DEFAULTS
        },
        Case {
            name: "node in different zone, no endpoint filtering",
            zone: Some("zone-b"),
            endpoints: vec![ep("10.1.2.3:80").zones(&["zone-a"]).ready()],
            cluster: Some(&["10.1.2.3:80"]),
            ..DEFAULTS
        },
        Case {
            name: "unready endpoint",
            endpoints: {
                let mut e = four_zonal();
                e[3].ready = false;
                e
            },
            cluster: Some(&["10.1.2.3:80"]),
            ..DEFAULTS
        },
        Case {
            name: "only unready endpoints in same zone (should not filter)",
            endpoints: {
                let mut e = four_zonal();
                e[0].ready = false;
                e[3].ready = false;
                e
            },
            cluster: Some(&["10.1.2.4:80", "10.1.2.5:80"]),
            ..DEFAULTS
        },
        Case {
            name: "missing hints, no filtering applied",
            endpoints: {
                let mut e = four_zonal();
                e[2].hints = None;
                e
            },
            cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"]),
            ..DEFAULTS
        },
        Case {
            name: "multiple hints per endpoint, filtering includes any endpoint with zone included",
            zone: Some("zone-c"),
            endpoints: vec![
                ep("10.1.2.3:80").zones(&["zone-a", "zone-b", "zone-c"]).ready(),
                ep("10.1.2.4:80").zones(&["zone-b", "zone-c"]).ready(),
                ep("10.1.2.5:80").zones(&["zone-b", "zone-d"]).ready(),
                ep("10.1.2.6:80").zones(&["zone-c"]).ready(),
            ],
            cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
            ..DEFAULTS
        },
        Case {
            name: "conflicting topology and localness require merging allEndpoints",
            svc: svc(false, true, true),
            endpoints: vec![
                ep("10.0.0.0:80").zones(&["zone-a"]).ready().local(),
                ep("10.0.0.1:80").zones(&["zone-b"]).ready().local(),
                ep("10.0.0.2:80").zones(&["zone-a"]).ready(),
                ep("10.0.0.3:80").zones(&["zone-b"]).ready(),
            ],
            cluster: Some(&["10.0.0.0:80", "10.0.0.2:80"]),
            local: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            all: &["10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"],
            ..DEFAULTS
        },
        Case {
            name: "internalTrafficPolicy: Local, with empty endpoints",
            zone: None,
            svc: svc(true, false, false),
            local: Some(&[]),
            ..DEFAULTS
        },
        Case {
            name: "internalTrafficPolicy: Local, but all endpoints are remote",
            zone: None,
            svc: svc(true, false, false),
            endpoints: vec![ep("10.0.0.0:80").ready(), ep("10.0.0.1:80").ready()],
            local: Some(&[]),
            only_remote: true,
            ..DEFAULTS
        },
        Case {
            name: "internalTrafficPolicy: Local, all endpoints are local",
            zone: None,
            svc: svc(true, false, false),
            endpoints: vec![ep("10.0.0.0:80").ready().local(), ep("10.0.0.1:80").ready().local()],
            local: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            ..DEFAULTS
        },
        Case {
            name: "internalTrafficPolicy: Local, some endpoints are local",
            zone: None,
            svc: svc(true, false, false),
            endpoints: vec![ep("10.0.0.0:80").ready().local(), ep("10.0.0.1:80").ready()],
            local: Some(&["10.0.0.0:80"]),
            ..DEFAULTS
        },
        Case {
            name: "Cluster traffic policy, endpoints not Ready",
            zone: None,
            endpoints: vec![ep("10.0.0.0:80"), ep("10.0.0.1:80")],
            cluster: Some(&[]),
            ..DEFAULTS
        },
        Case {
            name: "Cluster traffic policy, some endpoints are Ready",
            zone: None,
            endpoints: vec![ep("10.0.0.0:80"), ep("10.0.0.1:80").ready()],
            cluster: Some(&["10.0.0.1:80"]),
            ..DEFAULTS
        },
        Case {
            name: "Cluster traffic policy, all endpoints are terminating",
            zone: None,
            endpoints: vec![ep("10.0.0.0:80").serving().terminating().local(), ep("10.0.0.1:80").serving().terminating()],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            ..DEFAULTS
        },
        Case {
            name: "iTP: Local, eTP: Cluster, some endpoints local",
            zone: None,
            svc: svc(true, false, true),
            endpoints: vec![ep("10.0.0.0:80").ready().local(), ep("10.0.0.1:80").ready()],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            local: Some(&["10.0.0.0:80"]),
            all: &["10.0.0.0:80", "10.0.0.1:80"],
            ..DEFAULTS
        },
        Case {
            name: "iTP: Cluster, eTP: Local, some endpoints local",
            zone: None,
            svc: svc(false, true, true),
            endpoints: vec![ep("10.0.0.0:80").ready().local(), ep("10.0.0.1:80").ready()],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            local: Some(&["10.0.0.0:80"]),
            all: &["10.0.0.0:80", "10.0.0.1:80"],
            ..DEFAULTS
        },
        Case {
            name: "iTP: Local, eTP: Local, some endpoints local",
            zone: None,
            svc: svc(true, true, true),
            endpoints: vec![ep("10.0.0.0:80").ready().local(), ep("10.0.0.1:80").ready()],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            local: Some(&["10.0.0.0:80"]),
            all: &["10.0.0.0:80", "10.0.0.1:80"],
            ..DEFAULTS
        },
        Case {
            name: "iTP: Local, eTP: Local, all endpoints remote",
            zone: None,
            svc: svc(true, true, true),
            endpoints: vec![ep("10.0.0.0:80").ready(), ep("10.0.0.1:80").ready()],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            local: Some(&[]),
            all: &["10.0.0.0:80", "10.0.0.1:80"],
            ..DEFAULTS
        },
        Case {
            name: "iTP: Local, eTP: Local, all endpoints remote and terminating",
            zone: None,
            svc: svc(true, true, true),
            endpoints: vec![ep("10.0.0.0:80").serving().terminating(), ep("10.0.0.1:80").serving().terminating()],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            local: Some(&[]),
            all: &["10.0.0.0:80", "10.0.0.1:80"],
            only_remote: true,
            ..DEFAULTS
        },
        Case {
            name: "iTP: Cluster, eTP: Local, with terminating endpoints",
            zone: None,
            svc: svc(false, true, true),
            endpoints: vec![
                ep("10.0.0.0:80").ready(),
                ep("10.0.0.1:80").local(),
                ep("10.0.0.2:80").serving().terminating().local(),
                ep("10.0.0.3:80").serving().terminating(),
            ],
            cluster: Some(&["10.0.0.0:80"]),
            local: Some(&["10.0.0.2:80"]),
            all: &["10.0.0.0:80", "10.0.0.2:80"],
            ..DEFAULTS
        },
        Case {
            name: "externalTrafficPolicy ignored if not externally accessible",
            zone: None,
            svc: svc(false, true, false),
            endpoints: vec![ep("10.0.0.0:80").ready(), ep("10.0.0.1:80").ready().local()],
            cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            ..DEFAULTS
        },
        Case {
            name: "no cluster endpoints for iTP:Local internal-only service",
            zone: None,
            svc: svc(true, false, false),
            endpoints: vec![ep("10.0.0.0:80").ready(), ep("10.0.0.1:80").ready().local()],
            local: Some(&["10.0.0.1:80"]),
            ..DEFAULTS
        },
        // The PreferSameNode cases. With the PreferSameTrafficDistribution gate off,
        // kube-proxy never reads forNodes (endpointslicecache.go), so its endpoints carry
        // zone hints only; this model always reads them, as kube-proxy does with the gate
        // on (its default since Kubernetes 1.34).
        Case {
            name: "PreferSameNode falls back to same-zone when feature gate disabled",
            node_name: "node-1",
            endpoints: four_hinted().into_iter().map(|e| e.nodes(&[])).collect(),
            cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
            ..DEFAULTS
        },
        Case {
            name: "PreferSameNode available",
            node_name: "node-1",
            endpoints: four_hinted(),
            cluster: Some(&["10.1.2.3:80"]),
            ..DEFAULTS
        },
        Case {
            name: "PreferSameNode ignored if some endpoints unhinted",
            node_name: "node-1",
            endpoints: {
                let mut e = four_hinted();
                e[1] = ep("10.1.2.4:80").ready();
                e
            },
            cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"]),
            ..DEFAULTS
        },
        Case {
            name: "PreferSameNode falls back to PreferSameZone if no endpoint for node",
            node_name: "node-0",
            endpoints: four_hinted(),
            cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
            ..DEFAULTS
        },
    ]
}

fn names(set: &[&Endpoint]) -> BTreeSet<String> {
    set.iter().map(|e| format!("{}:{}", e.addr, e.port)).collect()
}

fn expected(set: &[&str]) -> BTreeSet<String> {
    set.iter().map(|s| s.to_string()).collect()
}

#[test]
fn kube_proxy_categorize_endpoints_table() {
    let cases = cases();
    assert_eq!(cases.len(), 30, "26 cases of kube-proxy's table and 4 PreferSameNode ones");
    let mut failures = Vec::new();
    for c in &cases {
        let node = NodeInfo { name: c.node_name.into(), addresses: vec![], zone: c.zone.map(String::from) };
        let got = categorize_endpoints(&c.endpoints, &c.svc, &node);
        let want_all = match (c.cluster, c.local) {
            (Some(cluster), None) => cluster,
            (None, Some(local)) => local,
            _ => c.all,
        };
        let checks = [
            ("cluster", got.cluster.as_deref().map(names), c.cluster.map(expected)),
            ("local", got.local.as_deref().map(names), c.local.map(expected)),
            ("all", Some(names(&got.all)), Some(expected(want_all))),
        ];
        for (what, got, want) in checks {
            if got != want {
                failures.push(format!("{}: {what}: got {got:?}, want {want:?}", c.name));
            }
        }
        let want_any = !want_all.is_empty() || c.only_remote;
        if got.has_any != want_any {
            failures.push(format!("{}: has_any: got {}, want {want_any}", c.name, got.has_any));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
