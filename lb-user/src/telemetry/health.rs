//! healthCheckNodePort servers for externalTrafficPolicy=Local Services, answering as
//! kube-proxy does: any path, 200 with the local endpoint count when there are local
//! endpoints, else 503, so that a cloud load balancer skips this node.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};
use tracing::warn;

use crate::model::{HealthCheck, ServiceRef};

type Shared = Arc<Mutex<(ServiceRef, usize)>>;

#[derive(Default)]
pub struct HealthServers {
    servers: BTreeMap<u16, (Shared, JoinHandle<()>)>,
}

impl HealthServers {
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
            match TcpListener::bind(("0.0.0.0", port)).await {
                Ok(listener) => {
                    let shared = Arc::new(Mutex::new(state));
                    let task = tokio::spawn(serve(listener, shared.clone()));
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

async fn serve(listener: TcpListener, shared: Shared) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let (status, body) = response(&shared.lock().expect("not poisoned"));
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            // The request itself does not matter (any path); read what came so the
            // client does not see a reset.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.read(&mut buf)).await;
            let head = format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// Status line and JSON body for a Service with `local` local endpoints.
pub fn response((service, local): &(ServiceRef, usize)) -> (&'static str, String) {
    let body = serde_json::json!({
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": local,
        "serviceProxyHealthy": true,
    })
    .to_string();
    (if *local > 0 { "200 OK" } else { "503 Service Unavailable" }, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_shaped_answers() {
        let svc = ServiceRef { namespace: "shop".into(), name: "web".into() };
        assert_eq!(
            response(&(svc.clone(), 2)),
            (
                "200 OK",
                r#"{"localEndpoints":2,"service":{"name":"web","namespace":"shop"},"serviceProxyHealthy":true}"#
                    .to_string()
            )
        );
        assert_eq!(response(&(svc, 0)).0, "503 Service Unavailable");
    }
}
