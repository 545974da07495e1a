//! The API server as a source (cluster mode): kube-rs watchers, each with the default
//! backoff, for the Services kube-proxy serves (its server-side label selector), every
//! EndpointSlice, and this node's Node (a field selector on its name). A watcher's
//! (re)list is handed on object by object between [`Change::ListStarted`] and
//! [`Change::ListDone`]: the model compares each with what it holds and removes what the
//! list left out only at its end, so a relist (after a 410 Gone or a lost connection)
//! changes only what truly changed. The watchers' events feed the model's own index rather
//! than reflector stores: the index is keyed by the Service each object belongs to, which is
//! what incremental recomputation needs, and it keeps slices as read, far smaller than the
//! API objects a store would hold beside it.
use std::{path::PathBuf, pin::Pin};

use futures::{stream::SelectAll, Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::Api,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt},
    Client, Config, Resource, ResourceExt,
};

use super::{Change, Object, ObjectKind};

/// kube-proxy's selector: Services another proxy serves, and headless ones, are not ours.
pub const SERVICE_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Annotations the model never reads that can be large; dropped to keep the agent small.
const DROPPED_ANNOTATIONS: &[&str] = &["kubectl.kubernetes.io/last-applied-configuration"];

/// How to reach the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiServer {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// This URL, with the pod's service account credentials when there are any (a
    /// kube-proxy replacement cannot reach the API through the `kubernetes` Service's
    /// ClusterIP before it has programmed it).
    Url(String),
    /// The pod's in-cluster configuration (KUBERNETES_SERVICE_HOST and the service account).
    InCluster,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("--api-server {url:?} is not a URL: {source}")]
    Url {
        url: String,
        #[source]
        source: axum::http::uri::InvalidUri,
    },
    #[error("in-cluster configuration (is the agent running in a pod?): {0}")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("creating the API client: {0}")]
    Client(#[source] kube::Error),
}

impl std::fmt::Display for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiServer::Kubeconfig(path) => write!(f, "kubeconfig {}", path.display()),
            ApiServer::Url(url) => f.write_str(url),
            ApiServer::InCluster => f.write_str("in-cluster configuration"),
        }
    }
}

impl ApiServer {
    pub async fn client(&self) -> Result<Client, Error> {
        let config = match self {
            ApiServer::Kubeconfig(path) => {
                let kubeconfig =
                    Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig { path: path.clone(), source })?;
                Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(|source| Error::Kubeconfig { path: path.clone(), source })?
            }
            ApiServer::Url(url) => {
                let uri: axum::http::Uri = url.parse().map_err(|source| Error::Url { url: url.clone(), source })?;
                match Config::incluster() {
                    // In a pod: its credentials, at the address given.
                    Ok(mut config) => {
                        config.cluster_url = uri;
                        config
                    }
                    Err(_) => Config::new(uri),
                }
            }
            ApiServer::InCluster => Config::incluster().map_err(Error::InCluster)?,
        };
        Client::try_from(config).map_err(Error::Client)
    }
}

/// What the watchers report.
// Unboxed: each change moves once, from the watcher into the model's index.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event {
    Change(Change),
    /// A watch failed; it is retried with backoff. The text names the kind and the cause.
    Error(String),
}

type Events = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// The three watchers, merged.
pub struct ClusterSource {
    events: SelectAll<Events>,
}

impl ClusterSource {
    pub fn new(client: Client, node_name: &str) -> Self {
        let services = watch::<Service>(
            Api::all(client.clone()),
            watcher::Config::default().labels(SERVICE_SELECTOR),
            ObjectKind::Service,
            Object::Service,
        );
        let slices = watch::<EndpointSlice>(
            Api::all(client.clone()),
            watcher::Config::default(),
            ObjectKind::Slice,
            Object::Slice,
        );
        let nodes = watch::<Node>(
            Api::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            ObjectKind::Node,
            Object::Node,
        );
        let mut events = SelectAll::new();
        events.push(services);
        events.push(slices);
        events.push(nodes);
        ClusterSource { events }
    }

    /// The next event. Cancel-safe.
    pub async fn next(&mut self) -> Event {
        match self.events.next().await {
            Some(e) => e,
            // The watchers retry forever and never end.
            None => std::future::pending().await,
        }
    }
}

/// One watcher as changes.
fn watch<K>(api: Api<K>, config: watcher::Config, kind: ObjectKind, wrap: fn(K) -> Object) -> Events
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let stream = watcher(api, config).default_backoff();
    Box::pin(stream.map(move |event| match event {
        Ok(event) => Event::Change(match event.modify(slim) {
            watcher::Event::Init => Change::ListStarted(kind),
            watcher::Event::InitApply(o) => Change::Listed(wrap(o)),
            watcher::Event::InitDone => Change::ListDone(kind),
            watcher::Event::Apply(o) => Change::Applied(wrap(o)),
            watcher::Event::Delete(o) => Change::Deleted(wrap(o)),
        }),
        Err(e) => Event::Error(format!("watching {}: {e}", kind_name(kind))),
    }))
}

/// Drops what the model never reads and can be large.
fn slim<K: Resource>(o: &mut K) {
    o.managed_fields_mut().clear();
    for a in DROPPED_ANNOTATIONS {
        o.annotations_mut().remove(*a);
    }
}

fn kind_name(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Service => "Services",
        ObjectKind::Slice => "EndpointSlices",
        ObjectKind::Endpoints => "Endpoints",
        ObjectKind::Node => "this node's Node",
    }
}
