//! Health, as kube-proxy reports it (pkg/proxy/healthcheck): one state the sync feeds,
//! served on the health server (`/healthz`, `/livez`, `/readyz`) and in every
//! healthCheckNodePort answer's `serviceProxyHealthy`.
//!
//! Healthy means no change has waited longer than [`HEALTH_TIMEOUT`] to be written.
//! `/healthz` also fails while this node is being deleted or carries the cluster
//! autoscaler's `ToBeDeletedByClusterAutoscaler` taint, so that load balancers drain it.
//! `/readyz` succeeds once the maps have been synced from a complete list with the
//! datapath attached. `/healthz` and `/livez` also report when the API server's watches last
//! delivered something and their last error (`sourceLastEvent`, `sourceLastError`): an
//! outage is shown, but fails no node, since the datapath keeps serving its last state.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    extract::State,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use k8s_openapi::api::core::v1::Node;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::warn;

use crate::model::{HealthCheck, ServiceRef};

/// How long a change may wait to be written before the agent counts as unhealthy. The sync
/// has no period (kube-proxy's limit is 2 x --sync-period, 60 s by default): a change is
/// written within milliseconds, or retried every second when a write fails, so ten seconds
/// of waiting means the maps are stuck, not busy.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Clone, Debug)]
struct Inner {
    last_updated: Option<SystemTime>,
    /// The oldest change not yet written.
    oldest_pending: Option<Instant>,
    node_eligible: bool,
    ready: bool,
    /// When the source last delivered something (an object or a list), and its last error
    /// with its time: facts for `/healthz` to report, not a judgement of health. While the
    /// API server is unreachable the datapath keeps serving its last state, so an outage
    /// fails no node (it would fail every node at once, and a load balancer would drop all).
    source_last_event: Option<SystemTime>,
    source_last_error: Option<(SystemTime, String)>,
}

/// The agent's health, shared by the sync (writer) and the HTTP servers (readers).
#[derive(Clone, Debug)]
pub struct HealthState {
    inner: Arc<Mutex<Inner>>,
    timeout: Duration,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState::new(HEALTH_TIMEOUT)
    }
}

impl HealthState {
    pub fn new(timeout: Duration) -> Self {
        // The node is eligible until its Node object says otherwise (as kube-proxy).
        let inner = Inner {
            last_updated: None,
            oldest_pending: None,
            node_eligible: true,
            ready: false,
            source_last_event: None,
            source_last_error: None,
        };
        HealthState { inner: Arc::new(Mutex::new(inner)), timeout }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("health state lock is never held across a panic")
    }

    /// A change arrived that the maps do not hold yet.
    pub fn queued(&self, at: Instant) {
        let mut s = self.lock();
        s.oldest_pending.get_or_insert(at);
    }

    /// Everything that arrived has been written.
    pub fn updated(&self) {
        let mut s = self.lock();
        s.oldest_pending = None;
        s.last_updated = Some(SystemTime::now());
    }

    /// The source (the API server's watches) delivered an object or a list.
    pub fn source_event(&self) {
        self.lock().source_last_event = Some(SystemTime::now());
    }

    /// The source failed (a watch or list error; it retries with backoff).
    pub fn source_error(&self, error: &str) {
        self.lock().source_last_error = Some((SystemTime::now(), error.to_string()));
    }

    /// The maps were synced from a complete list, with the datapath attached.
    pub fn set_ready(&self) {
        self.lock().ready = true;
    }

    /// This node's Node object (None: not known, which leaves it eligible).
    pub fn sync_node(&self, node: Option<&Node>) {
        self.lock().node_eligible = node.is_none_or(node_eligible);
    }

    /// No change has waited longer than the timeout.
    pub fn is_healthy(&self) -> bool {
        let s = self.lock();
        s.oldest_pending.is_none_or(|t| t.elapsed() < self.timeout)
    }

    fn snapshot(&self) -> Inner {
        self.lock().clone()
    }
}

/// Not being deleted and not marked for deletion by the cluster autoscaler.
pub fn node_eligible(node: &Node) -> bool {
    let tainted = node.spec.iter().flat_map(|s| s.taints.iter().flatten()).any(|t| t.key == TO_BE_DELETED_TAINT);
    node.metadata.deletion_timestamp.is_none() && !tainted
}

fn rfc3339(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t).map_or_else(|_| String::new(), |t| t.to_string())
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// kube-proxy's answer: when healthy, `lastUpdated` is the current time (its older
/// releases reported the last sync loop run, which ran even with nothing to do).
fn proxy_answer(state: &HealthState, with_node: bool) -> Response {
    let now = SystemTime::now();
    let s = state.snapshot();
    let healthy = state.is_healthy() && (!with_node || s.node_eligible);
    let last_updated = if healthy { Some(now) } else { s.last_updated };
    let mut body = serde_json::json!({
        "lastUpdated": last_updated.map(rfc3339).unwrap_or_default(),
        "currentTime": rfc3339(now),
        "healthy": healthy,
    });
    if with_node {
        body["nodeEligible"] = s.node_eligible.into();
    }
    // Not kube-proxy's: what the API server's watches last delivered and their last error,
    // so an outage shows here although it fails no node.
    if let Some(at) = s.source_last_event {
        body["sourceLastEvent"] = rfc3339(at).into();
    }
    if let Some((at, error)) = &s.source_last_error {
        body["sourceLastError"] = serde_json::json!({ "time": rfc3339(*at), "error": error });
    }
    json(if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
}

async fn healthz(State(state): State<HealthState>) -> Response {
    proxy_answer(&state, true)
}

async fn livez(State(state): State<HealthState>) -> Response {
    proxy_answer(&state, false)
}

async fn readyz(State(state): State<HealthState>) -> Response {
    let ready = state.snapshot().ready;
    json(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, serde_json::json!({ "ready": ready }))
}

/// The health server's routes.
pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves the health server on `listener` until the task is dropped or aborted.
pub fn serve(listener: TcpListener, state: HealthState) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(state)).await {
            warn!("health server stopped: {e}");
        }
    })
}

/// One healthCheckNodePort's Service and its count of local ready endpoints.
type Shared = Arc<Mutex<(ServiceRef, usize)>>;

/// healthCheckNodePort servers for externalTrafficPolicy=Local Services, answering as
/// kube-proxy does: any path, 200 with the local endpoint count when there are local
/// endpoints and the agent is healthy, else 503, so that a cloud load balancer skips the node.
pub struct HealthServers {
    servers: BTreeMap<u16, (Shared, JoinHandle<()>)>,
    health: HealthState,
    bind: std::net::IpAddr,
}

impl HealthServers {
    /// Servers listening on `bind` (all addresses in production), reporting `health`.
    pub fn new(health: HealthState, bind: std::net::IpAddr) -> Self {
        HealthServers { servers: BTreeMap::new(), health, bind }
    }

    /// Starts, updates and stops servers to match `checks`.
    pub async fn update(&mut self, checks: &[HealthCheck]) {
        let wanted: BTreeMap<u16, &HealthCheck> = checks.iter().map(|c| (c.node_port, c)).collect();
        self.servers.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, check) in wanted {
            let state = (check.service.clone(), check.local_endpoints);
            if let Some((shared, _)) = self.servers.get(&port) {
                *shared.lock().expect("not poisoned") = state;
                continue;
            }
            match TcpListener::bind(SocketAddr::new(self.bind, port)).await {
                Ok(listener) => {
                    let shared = Arc::new(Mutex::new(state));
                    let app = Router::new().fallback(service_answer).with_state((shared.clone(), self.health.clone()));
                    let task = tokio::spawn(async move {
                        let _ = axum::serve(listener, app).await;
                    });
                    self.servers.insert(port, (shared, task));
                }
                // Retried on the next sync.
                Err(e) => warn!("Service {}: healthCheckNodePort {port}: {e}", check.service),
            }
        }
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for (_, task) in self.servers.values() {
            task.abort();
        }
    }
}

async fn service_answer(State((shared, health)): State<(Shared, HealthState)>) -> Response {
    let (service, local) = shared.lock().expect("not poisoned").clone();
    let (status, body) = service_response(&service, local, health.is_healthy());
    json(status, body)
}

/// Status and JSON body of a healthCheckNodePort answer for a Service with `local` local
/// ready endpoints.
pub fn service_response(service: &ServiceRef, local: usize, proxy_healthy: bool) -> (StatusCode, serde_json::Value) {
    let body = serde_json::json!({
        "service": {"namespace": &*service.namespace, "name": &*service.name},
        "localEndpoints": local,
        "serviceProxyHealthy": proxy_healthy,
    });
    let status = if local > 0 && proxy_healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, body)
}

#[cfg(test)]
mod tests;
