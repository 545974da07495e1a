use std::time::{Duration, Instant};

use k8s_openapi::{
    api::core::v1::{NodeSpec, Taint},
    apimachinery::pkg::apis::meta::v1::Time,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// GETs `path` from a server on `addr`: the status code and the JSON body.
async fn get(addr: SocketAddr, path: &str) -> (u16, serde_json::Value, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}")), head.to_lowercase())
}

async fn health_server(state: HealthState) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, serve(listener, state))
}

fn node_with(deleting: bool, taint: Option<&str>) -> Node {
    let mut node = Node::default();
    node.metadata.name = Some("node1".into());
    if deleting {
        node.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    }
    node.spec = Some(NodeSpec {
        taints: taint.map(|k| vec![Taint { key: k.into(), effect: "NoSchedule".into(), ..Default::default() }]),
        ..Default::default()
    });
    node
}

#[tokio::test]
async fn healthz_and_livez_answer_as_kube_proxy_and_fail_on_a_change_left_waiting() {
    let state = HealthState::new(Duration::from_millis(200));
    let (addr, task) = health_server(state.clone()).await;
    let (status, body, head) = get(addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert_eq!((body["healthy"].as_bool(), body["nodeEligible"].as_bool()), (Some(true), Some(true)));
    // Healthy: lastUpdated is now, as kube-proxy reports it.
    assert_eq!(body["lastUpdated"], body["currentTime"]);
    assert!(body["currentTime"].as_str().unwrap().ends_with('Z'), "RFC 3339 in UTC: {body}");
    let (_, live, _) = get(addr, "/livez").await;
    assert!(live.get("nodeEligible").is_none(), "{live}");

    // A change waiting less than the timeout is not late yet.
    state.updated();
    state.queued(Instant::now());
    assert_eq!(get(addr, "/healthz").await.0, 200);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (status, body, _) = get(addr, "/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["healthy"], false);
    assert_ne!(body["lastUpdated"], body["currentTime"], "the last write, not now: {body}");
    assert_eq!(get(addr, "/livez").await.0, 503);
    // Written: healthy again.
    state.updated();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    task.abort();
}

#[tokio::test]
async fn healthz_fails_on_a_node_being_deleted_or_marked_by_the_autoscaler_livez_does_not() {
    let state = HealthState::default();
    let (addr, task) = health_server(state.clone()).await;
    for (node, eligible) in [
        (node_with(false, None), true),
        (node_with(true, None), false),
        (node_with(false, Some(TO_BE_DELETED_TAINT)), false),
        (node_with(false, Some("node.kubernetes.io/unschedulable")), true),
    ] {
        state.sync_node(Some(&node));
        let (status, body, _) = get(addr, "/healthz").await;
        assert_eq!((status, body["nodeEligible"].as_bool()), (if eligible { 200 } else { 503 }, Some(eligible)));
        assert_eq!(get(addr, "/livez").await.0, 200, "livez ignores the node");
    }
    task.abort();
}

#[tokio::test]
async fn readyz_after_the_first_complete_sync() {
    let state = HealthState::default();
    let (addr, task) = health_server(state.clone()).await;
    let (status, body, _) = get(addr, "/readyz").await;
    assert_eq!((status, body["ready"].as_bool()), (503, Some(false)));
    state.set_ready();
    assert_eq!(get(addr, "/readyz").await.0, 200);
    task.abort();
}

#[tokio::test]
async fn health_check_node_ports_answer_any_path_with_the_local_count_and_the_agent_health() {
    let health = HealthState::new(Duration::from_millis(100));
    let mut servers = HealthServers::new(health.clone(), "127.0.0.1".parse().unwrap());
    // A free port, found by binding and letting go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let service = ServiceRef { namespace: "shop".into(), name: "web".into() };
    servers.update(&[HealthCheck { service: service.clone(), node_port: port, local_endpoints: 2 }]).await;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (status, body, head) = get(addr, "/any/path").await;
    assert_eq!(status, 200);
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
    );
    servers.update(&[HealthCheck { service: service.clone(), node_port: port, local_endpoints: 0 }]).await;
    assert_eq!(get(addr, "/").await.0, 503, "no local endpoint");
    servers.update(&[HealthCheck { service, node_port: port, local_endpoints: 1 }]).await;
    health.queued(Instant::now());
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, body, _) = get(addr, "/").await;
    assert_eq!((status, body["serviceProxyHealthy"].as_bool()), (503, Some(false)), "an unhealthy agent fails it");
    servers.update(&[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "a Service no longer Local closes its port");
}

#[tokio::test]
async fn an_api_outage_is_reported_on_healthz_without_failing_the_node() {
    let state = HealthState::new(Duration::from_secs(10));
    let (addr, task) = health_server(state.clone()).await;
    let (_, body, _) = get(addr, "/healthz").await;
    assert!(body.get("sourceLastEvent").is_none() && body.get("sourceLastError").is_none(), "{body}");
    state.source_event();
    state.source_error("watching Services: connection refused");
    for path in ["/healthz", "/livez"] {
        let (status, body, _) = get(addr, path).await;
        assert_eq!(status, 200, "an outage fails no node: {body}");
        assert_eq!(body["sourceLastError"]["error"], "watching Services: connection refused", "{body}");
        assert!(body["sourceLastError"]["time"].as_str().unwrap().ends_with('Z'), "{body}");
        assert!(body["sourceLastEvent"].as_str().unwrap().ends_with('Z'), "{body}");
    }
    task.abort();
}
