//! The sync both sources share: changes go into the incremental model as they arrive; a
//! sync computes again only the Services they touched and writes only the frontends whose
//! desired state moved. Nothing is written (so nothing adopted is deleted) until the source
//! has listed every kind completely once; the first sync then settles everything (a full
//! apply, which removes only what the maps hold and the source no longer has); every later
//! one only what changed.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use lb_common::Config;
use tokio::time::Instant as TokioInstant;
use tracing::{info, warn};

use crate::{
    datapath::maps::MapStore,
    model::{
        flow_cleanups, Desired, EndpointNodes, FlowCleanup, HealthCheck, Incremental, LocalDetect, NoLocalEndpoints,
        NodeFlags, NodeInfo, Options, ServiceRef,
    },
    reconcile::Reconciler,
    source::{
        cluster::{self, ApiServer, ClusterSource},
        manifests::ManifestCache,
        watch::ManifestWatch,
        Change, Object, ObjectKind,
    },
    telemetry::health::HealthState,
};

/// How soon a sync that failed is tried again.
pub const RETRY: Duration = Duration::from_secs(1);

/// A burst of changes is one sync: it starts once no change has come for this long...
pub const QUIET: Duration = Duration::from_millis(1);
/// ...or this long after the burst's first change, if they keep coming.
pub const MAX_DELAY: Duration = Duration::from_millis(5);

/// When the changes seen so far should be synced.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// The burst's first and latest change.
    burst: Option<(TokioInstant, TokioInstant)>,
}

impl Coalescer {
    pub fn note(&mut self, at: TokioInstant) {
        self.burst = Some((self.burst.map_or(at, |(first, _)| first), at));
    }

    /// When to sync; None: nothing waits.
    pub fn deadline(&self) -> Option<TokioInstant> {
        self.burst.map(|(first, last)| (last + QUIET).min(first + MAX_DELAY))
    }

    /// The burst is being synced.
    pub fn clear(&mut self) {
        self.burst = None;
    }
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct Step {
    /// The maps were written.
    pub wrote: bool,
    /// Something failed and must be tried again.
    pub failed: bool,
    /// For each object change this sync wrote: from its arrival to the end of the writes.
    pub latencies: Vec<Duration>,
    /// The healthCheckNodePorts to serve, when they changed.
    pub health_checks: Option<Vec<HealthCheck>>,
    /// UDP flows the change leaves without their endpoint (or newly served), to remove.
    pub flow_cleanups: Vec<FlowCleanup>,
    /// The endpoint nodes of the Services computed again.
    pub endpoint_nodes: Vec<(ServiceRef, EndpointNodes)>,
    /// When a change last arrived (wall clock), as of this sync.
    pub last_queued: Option<SystemTime>,
    /// The Service ports whose Local policy finds no endpoint here, once the maps were written.
    pub no_local_endpoints: Option<NoLocalEndpoints>,
}

/// A source feeding the sync.
pub enum Feed {
    Manifests { path: PathBuf, watch: ManifestWatch, cache: ManifestCache },
    Cluster { source: ClusterSource, coalescer: Coalescer, retry_at: Option<tokio::time::Instant> },
}

impl Feed {
    /// Manifest files, watched for changes.
    pub fn manifests(path: &Path) -> Feed {
        Feed::Manifests { path: path.to_path_buf(), watch: ManifestWatch::new(path), cache: ManifestCache::default() }
    }

    /// The API server's watchers, for the node `node_name`.
    pub async fn cluster(api: &ApiServer, node_name: &str) -> Result<Feed, cluster::Error> {
        let client = api.client().await?;
        info!(url = %api, "watching the API server");
        Ok(Feed::Cluster {
            source: ClusterSource::new(client, node_name),
            coalescer: Coalescer::default(),
            retry_at: None,
        })
    }

    /// Waits for what the source has next and hands it to `sync`. Returns true when a sync
    /// is due. Cancel-safe: what it has taken in stays in `sync` and `self`.
    pub async fn next(&mut self, sync: &mut Sync) -> bool {
        match self {
            Feed::Manifests { path, watch, cache } => {
                watch.changed().await;
                let (objects, report) = cache.read(path);
                let problems: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
                // New complaints are reported by a sync even when no object changed.
                let complaints = problems != sync.source_problems;
                sync.source_problems = problems;
                // From the first file-system event this read serves (a read that failed
                // serves none: its events count on until one succeeds).
                let waited = if report.incomplete { None } else { watch.caught_up() };
                let arrived = std::time::Instant::now() - waited.unwrap_or_default();
                if report.incomplete {
                    watch.rewatch();
                    if !sync.complete() {
                        // Nothing was ever read: the adopted state stays as it is (the sync
                        // says so).
                        watch.retry_in(RETRY);
                        return complaints;
                    }
                }
                let mut due =
                    sync.take_list(ObjectKind::Service, objects.services.into_iter().map(Object::Service), arrived);
                due |= sync.take_list(ObjectKind::Slice, objects.slices.into_iter().map(Object::Slice), arrived);
                due |= sync.take_list(
                    ObjectKind::Endpoints,
                    objects.endpoints.into_iter().map(Object::Endpoints),
                    arrived,
                );
                due |= sync.take_list(ObjectKind::Node, objects.nodes.into_iter().map(Object::Node), arrived);
                due || complaints || sync.needs_retry()
            }
            Feed::Cluster { source, coalescer, retry_at } => loop {
                let deadline = [coalescer.deadline(), *retry_at].into_iter().flatten().min();
                tokio::select! {
                    event = source.next() => match event {
                        cluster::Event::Change(change) => {
                            sync.health.source_event();
                            if sync.take(change, std::time::Instant::now()) {
                                coalescer.note(tokio::time::Instant::now());
                            }
                        }
                        cluster::Event::Error(e) => {
                            sync.health.source_error(&e.to_string());
                            warn!("{e}; retrying with backoff, the datapath keeps its state")
                        }
                    },
                    () = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                        coalescer.clear();
                        *retry_at = None;
                        return true;
                    }
                }
            },
        }
    }

    /// After a sync: a failed one is tried again in a moment.
    pub fn after_sync(&mut self, retry: bool) {
        if !retry {
            return;
        }
        match self {
            Feed::Manifests { watch, .. } => watch.retry_in(RETRY),
            Feed::Cluster { retry_at, .. } => *retry_at = Some(tokio::time::Instant::now() + RETRY),
        }
    }
}

/// The node-wide datapath config for this node's facts.
pub type ConfigOf = Box<dyn Fn(&NodeInfo, LocalDetect) -> Config + Send>;

pub struct Sync {
    model: Incremental,
    node: NodeFlags,
    config_of: ConfigOf,
    /// The kinds the source must list completely before anything adopted may be deleted.
    required: BTreeSet<ObjectKind>,
    listed: BTreeSet<ObjectKind>,
    /// Arrival times of the object changes not yet written, once the first sync is done:
    /// what the first sync writes is the state the agent started with, not a change (its
    /// time is the sync's duration), so it is no programming latency.
    arrivals: Vec<Instant>,
    synced_once: bool,
    retry: bool,
    /// The problems last logged; logged again only when they change.
    problems: Vec<String>,
    /// What the source could not read, reported with the next sync's problems.
    source_problems: Vec<String>,
    served_checks: Option<Vec<HealthCheck>>,
    health: HealthState,
    /// When a change last arrived.
    last_queued: Option<SystemTime>,
}

impl Sync {
    /// A sync for a source that lists `required` (its kinds).
    pub fn new(
        node: NodeFlags,
        options: Options,
        required: impl IntoIterator<Item = ObjectKind>,
        config_of: ConfigOf,
        health: HealthState,
    ) -> Self {
        Sync {
            model: Incremental::new(&node.name, options),
            node,
            config_of,
            required: required.into_iter().collect(),
            listed: BTreeSet::new(),
            arrivals: Vec::new(),
            synced_once: false,
            retry: false,
            problems: Vec::new(),
            source_problems: Vec::new(),
            served_checks: None,
            health,
            last_queued: None,
        }
    }

    /// Takes in a change that arrived at `at`. Returns whether a sync is due for it.
    pub fn take(&mut self, change: Change, at: Instant) -> bool {
        if let Change::ListDone(kind) = &change {
            self.listed.insert(*kind);
        }
        // kube-proxy judges a deleted Node by its last state: one deleted gracefully (its
        // deletionTimestamp set) stays ineligible once it is gone.
        let deleted_node = match &change {
            Change::Deleted(Object::Node(node)) if node.metadata.name.as_deref() == Some(self.node.name.as_str()) => {
                Some(node.clone())
            }
            _ => None,
        };
        let about_nodes = match &change {
            Change::Applied(o) | Change::Deleted(o) | Change::Listed(o) => o.kind() == ObjectKind::Node,
            Change::ListStarted(kind) | Change::ListDone(kind) => *kind == ObjectKind::Node,
        };
        let changed = self.model.change(change);
        if about_nodes && changed > 0 {
            self.health.sync_node(self.model.node(&self.node.name).or(deleted_node.as_ref()));
        }
        if self.synced_once {
            self.arrivals.extend(std::iter::repeat_n(at, changed));
        }
        if changed > 0 {
            self.health.queued(at);
            self.last_queued = Some(SystemTime::now());
        }
        changed > 0 || (!self.synced_once && self.complete())
    }

    /// Takes in a complete list of one kind (a fresh read of the manifests). Returns
    /// whether a sync is due for it.
    pub fn take_list(&mut self, kind: ObjectKind, objects: impl IntoIterator<Item = Object>, at: Instant) -> bool {
        let mut due = self.take(Change::ListStarted(kind), at);
        for o in objects {
            due |= self.take(Change::Listed(o), at);
        }
        due | self.take(Change::ListDone(kind), at)
    }

    /// Every kind has been listed once.
    pub fn complete(&self) -> bool {
        self.required.is_subset(&self.listed)
    }

    /// A failed sync waits to be tried again.
    pub fn needs_retry(&self) -> bool {
        self.retry
    }

    /// The model's current desired state.
    pub fn desired(&self) -> &Desired {
        self.model.desired()
    }

    /// What the maps were last made to hold, when that was written in full (synced, no
    /// write waiting to be retried).
    pub fn applied(&self) -> Option<&Desired> {
        (self.synced_once && !self.retry).then(|| self.model.desired())
    }

    /// Makes the maps hold the model of everything taken in so far.
    pub fn step<S: MapStore>(&mut self, reconciler: &mut Reconciler, store: &mut S) -> Step {
        let mut step = Step { last_queued: self.last_queued, ..Step::default() };
        let mut problems = self.source_problems.clone();
        if !self.complete() {
            // Adopted state stays whole until the source has been listed once.
            problems.push("keeping the datapath as adopted until the source has listed every object once".into());
            self.log(problems);
            return step;
        }
        let own = self.model.node(&self.node.name);
        let node = self.node.node_info_from(own).and_then(|n| Ok((self.node.local_detect_from(own)?, n)));
        let (local, node) = match node {
            Ok(found) => found,
            Err(e) => {
                problems.push(format!("{e}; the datapath is left as it is"));
                problems.extend(self.model.desired().errors.iter().map(ToString::to_string));
                self.retry = true;
                step.failed = true;
                self.log(problems);
                return step;
            }
        };
        let update = self.model.update(&node);
        let changed = update.keys();
        let desired = self.model.desired();
        problems.extend(desired.errors.iter().map(ToString::to_string));
        step.endpoint_nodes = update.endpoint_nodes;
        if self.synced_once {
            // Compared with what the datapath serves: before the first sync that is adopted
            // state, with no model to compare.
            let mut old = Desired::default();
            let mut new = Desired::default();
            for (key, before) in update.changed {
                old.frontends.extend(before.map(|f| (key, f)));
                new.frontends.extend(desired.frontends.get(&key).map(|f| (key, f.clone())));
            }
            step.flow_cleanups = flow_cleanups(&old, &new);
        }
        let only = self.synced_once.then_some(&changed);
        match reconciler.apply_changes(desired, only, (self.config_of)(&node, local), store) {
            Ok(c) => {
                let written = Instant::now();
                // A change is programmed once every frontend is written: after a failure its
                // time runs on to the retry that writes them.
                if c.failures.is_empty() {
                    step.latencies = self.arrivals.drain(..).map(|t| written.saturating_duration_since(t)).collect();
                }
                step.no_local_endpoints = Some(desired.no_local_endpoints());
                if c != Default::default() || !self.synced_once {
                    info!(
                        frontends = desired.frontends.len(),
                        written = c.services_written,
                        removed = c.services_removed,
                        backends_added = c.backends_added,
                        backends_removed = c.backends_removed,
                        failed = c.failures.len(),
                        "maps synced"
                    );
                }
                step.wrote = true;
                // Frontends that failed are retried.
                self.retry = !c.failures.is_empty();
                step.failed = self.retry;
                problems.extend(c.failures);
                if !self.retry {
                    self.health.updated();
                }
                if !self.synced_once {
                    self.synced_once = true;
                    self.health.set_ready();
                }
                if self.served_checks.as_ref() != Some(&desired.health_checks) {
                    self.served_checks = Some(desired.health_checks.clone());
                    step.health_checks = self.served_checks.clone();
                }
            }
            Err(e) => {
                problems.push(format!("writing the datapath config: {e}"));
                self.retry = true;
                step.failed = true;
            }
        }
        self.log(problems);
        step
    }

    /// The problems of the last sync.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    fn log(&mut self, problems: Vec<String>) {
        if problems != self.problems {
            for p in &problems {
                warn!("{p}");
            }
            self.problems = problems;
        }
    }
}

#[cfg(test)]
mod tests;
