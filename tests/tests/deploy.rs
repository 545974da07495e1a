//! The manifests in deploy/ (issue 9): every object parses as its Kubernetes type with no
//! field the type does not know (a typo in a field name is caught here, not by a cluster
//! that silently ignores it), and what the DaemonSet promises holds: the agent's flags
//! exist, the variables they use are defined, the RBAC rules are read-only, and the agent
//! runs, attaches, serves and answers /metrics with only the capabilities the DaemonSet
//! grants (needs root).
use std::{collections::BTreeSet, net::SocketAddrV4};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    serde::{de::DeserializeOwned, Deserialize, Serialize},
};
use lb_tests::{
    agent::{lb_user_bin, Agent},
    cluster::{pod_name, service, Endpoint, Manifests},
    lab::{Lab, Spec},
    traffic::{parse_answer, tcp_ask, udp_ask, Echo},
};
use serde_json::Value;

const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kube-xdp-lb.yaml");

#[derive(Default)]
struct Deployed {
    daemonset: Option<DaemonSet>,
    config: Option<ConfigMap>,
    role: Option<ClusterRole>,
    binding: Option<ClusterRoleBinding>,
    account: Option<ServiceAccount>,
}

/// Parses `doc` as `T`, failing on any field `T` does not have: the object serialised back
/// must hold every field of the original.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", doc["kind"], doc["metadata"]["name"]));
    let round = serde_json::to_value(&typed).unwrap();
    let mut unknown = Vec::new();
    missing_fields(doc, &round, "", &mut unknown);
    assert!(unknown.is_empty(), "{} {}: unknown fields {unknown:?}", doc["kind"], doc["metadata"]["name"]);
    typed
}

fn missing_fields(original: &Value, round: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => missing_fields(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                missing_fields(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn deployed() -> Deployed {
    let text = std::fs::read_to_string(MANIFESTS).unwrap();
    let mut out = Deployed::default();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
        match doc["kind"].as_str().unwrap() {
            "DaemonSet" => out.daemonset = Some(strict(&doc)),
            "ConfigMap" => out.config = Some(strict(&doc)),
            "ClusterRole" => out.role = Some(strict(&doc)),
            "ClusterRoleBinding" => out.binding = Some(strict(&doc)),
            "ServiceAccount" => out.account = Some(strict(&doc)),
            other => panic!("deploy/kube-xdp-lb.yaml: unexpected kind {other}"),
        }
    }
    out
}

#[test]
fn a_misspelt_field_is_caught() {
    let doc: Value = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespce": "kube-system"}
    });
    let caught = std::panic::catch_unwind(|| strict::<ConfigMap>(&doc)).unwrap_err();
    let text = caught.downcast_ref::<String>().unwrap();
    assert!(text.contains(".metadata.namespce"), "{text}");
}

#[test]
fn every_object_parses_strictly_and_the_daemonset_keeps_its_promises() {
    let d = deployed();
    let (ds, config) = (d.daemonset.unwrap(), d.config.unwrap());
    let account = d.account.unwrap();
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name, account.metadata.name);
    assert_eq!(pod.host_network, Some(true), "the agent attaches to the node's devices");
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert!(tolerations.iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()), "every node");
    let agent = &pod.containers[0];
    let security = agent.security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true));
    let caps = security.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]));

    // NODE_NAME from the downward API; every other variable from the ConfigMap's keys.
    let env = agent.env.as_ref().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node_name.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    let data = config.data.unwrap();
    for e in env {
        if let Some(key) = e.value_from.as_ref().and_then(|v| v.config_map_key_ref.as_ref()) {
            assert_eq!(key.name, config.metadata.name.clone().unwrap());
            assert!(data.contains_key(&key.key), "env {}: ConfigMap has no key {}", e.name, key.key);
        }
    }
    let defined: BTreeSet<&str> = env.iter().map(|e| e.name.as_str()).collect();

    // Every flag is one `lb-user agent` takes, every $(VAR) is defined.
    let help = std::process::Command::new(lb_user_bin().unwrap()).args(["agent", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let args = agent.args.as_ref().unwrap();
    assert_eq!(args[0], "agent");
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag} <")),
            "lb-user agent has no {flag}:\n{help}"
        );
        for var in arg.split("$(").skip(1).map(|rest| rest.split(')').next().unwrap()) {
            assert!(defined.contains(var), "{arg}: {var} is not defined in env");
        }
    }

    // Read-only, and only what the agent watches.
    let rules = d.role.unwrap().rules.unwrap();
    let mut resources = BTreeSet::new();
    for rule in &rules {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]));
        resources.extend(rule.resources.iter().flatten().cloned());
    }
    assert_eq!(resources, BTreeSet::from(["endpointslices", "nodes", "services"].map(String::from)));
    let binding = d.binding.unwrap();
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (Some(&subject.name), subject.namespace.as_ref()),
        (account.metadata.name.as_ref(), account.metadata.namespace.as_ref())
    );
}

/// The capabilities the DaemonSet grants, as setpriv names them.
fn granted_capabilities() -> Vec<String> {
    let ds = deployed().daemonset.unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let caps = pod.containers[0].security_context.clone().unwrap().capabilities.unwrap();
    caps.add.unwrap().iter().map(|c| c.to_lowercase()).collect()
}

#[test]
fn the_agent_runs_with_only_the_daemonsets_capabilities() {
    lb_tests::require_root();
    let caps = granted_capabilities();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    let spec = Spec { pods_per_node: vec![1, 1], clients: 1, ..Spec::default() };
    let lab = Lab::build("lbcap", &spec).unwrap();
    let mut backends = Vec::new();
    for (i, pod) in lab.nodes.iter().flat_map(|n| n.pods.iter()).enumerate() {
        backends.push(Echo::start(&pod.ns.name, &pod_name(i), pod.addr, lb_tests::cluster::BACKEND_PORT).unwrap());
    }
    let (pod_a, pod_b) = (lab.nodes[0].pods[0].addr, lab.nodes[1].pods[0].addr);
    let yaml = service(
        "web",
        "",
        "type: NodePort, clusterIP: 10.96.9.1",
        80,
        30900,
        &[Endpoint::ready(pod_a, "node1"), Endpoint::ready(pod_b, "node2")],
        None,
    );
    let manifests = Manifests::inline(&yaml).unwrap();
    // A cgroup of the test's own for each node's socket hooks.
    let cgroups: Vec<_> = lab.nodes.iter().map(|n| lb_tests::cgroup::Cgroup::new("lbcap", &n.name).unwrap()).collect();
    let agents: Vec<Agent> = lab
        .nodes
        .iter()
        .zip(&cgroups)
        .map(|(node, cgroup)| {
            let sockets = ["--socket-lb", "all", "--cgroup-root", cgroup.path.to_str().unwrap()];
            Agent::start_confined(node, &manifests.path, &caps, &sockets).unwrap()
        })
        .collect();
    let status = std::fs::read_to_string(format!("/proc/{}/status", agents[0].pid())).unwrap();
    let bounding = status.lines().find(|l| l.starts_with("CapBnd:")).unwrap();
    // CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(bounding.split_whitespace().nth(1), Some("000000c000001000"), "{bounding}");

    // NodePort from outside through XDP, to both backends; UDP too; ClusterIP from a pod (tc).
    let client = &lab.clients[0].ns.name;
    let node_port = SocketAddrV4::new(lab.nodes[0].addr, 30900);
    let mut seen = BTreeSet::new();
    for _ in 0..24 {
        seen.insert(parse_answer(&tcp_ask(client, node_port).unwrap()).unwrap().0);
    }
    assert_eq!(seen, BTreeSet::from(["pod-a".to_string(), "pod-b".to_string()]));
    assert!(udp_ask(client, "0.0.0.0:0".parse().unwrap(), node_port).is_ok());
    let pod_ns = &lab.nodes[0].pods[0].ns.name;
    assert!(tcp_ask(pod_ns, "10.96.9.1:80".parse().unwrap()).is_ok(), "ClusterIP from a pod");
    // The socket hooks attached to the cgroup with these capabilities too.
    let hooks = lb_tests::lab::run("bpftool", &["cgroup", "show", cgroups[0].path.to_str().unwrap()]).unwrap();
    assert_eq!(
        hooks.lines().filter(|l| l.contains("lb_sock")).count(),
        lb_common::program_names::SOCKET_HOOKS.len(),
        "{hooks}"
    );
    // /metrics reads the maps with these capabilities too: the 24 connections and the datagram.
    let metrics = lb_tests::metrics::scrape(&lab.nodes[0].ns.name);
    let flows = |protocol| {
        let labels = [("service", "web"), ("protocol", protocol), ("frontend", "nodePort")];
        metrics.get("kube_xdp_lb_service_new_flows_total", &labels)
    };
    assert_eq!((flows("TCP"), flows("UDP")), (24.0, 1.0), "{}", metrics.text);
    assert!(!agents[0].log_text().contains("ERROR"), "{}", agents[0].log_text());
}
