//! The fake API server's state: objects as JSON, one global resourceVersion counter as
//! etcd's revision, and the history of changes since the last compaction (what watches
//! replay and what reads at an older resourceVersion are answered from).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::selector::{FieldSelector, LabelSelector};

/// A resource type the server serves.
#[derive(Debug)]
pub struct Resource {
    /// `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Whether `status` is a subresource: written only through `.../status`, and left
    /// as it was by writes to the object itself.
    pub status_subresource: bool,
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name error messages use: `services`, `endpointslices.discovery.k8s.io`.
    pub fn qualified_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

pub const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        status_subresource: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        status_subresource: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        status_subresource: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "endpoints",
        singular: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        short_names: &["ep"],
        status_subresource: false,
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        status_subresource: false,
    },
];

/// Index into [`RESOURCES`].
pub type ResourceId = usize;

pub fn resource_id(group: &str, version: &str, plural: &str) -> Option<ResourceId> {
    RESOURCES.iter().position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Objects sort as etcd keys do: by resource, namespace (empty when cluster-scoped), name.
pub type Key = (ResourceId, String, String);

/// An answer that is not a success: becomes a `kind: Status` object with this code and reason.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into(), details: Value::Null }
    }

    fn about(mut self, resource: &Resource, name: &str) -> Self {
        let mut details = json!({"name": name, "kind": resource.plural});
        if !resource.group.is_empty() {
            details["group"] = json!(resource.group);
        }
        self.details = details;
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn not_found(resource: &Resource, name: &str) -> Self {
        ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", resource.qualified_name()))
            .about(resource, name)
    }

    fn already_exists(resource: &Resource, name: &str) -> Self {
        ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", resource.qualified_name()))
            .about(resource, name)
    }

    fn conflict(resource: &Resource, name: &str, why: &str) -> Self {
        ApiError::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {} \"{name}\": {why}", resource.qualified_name()),
        )
        .about(resource, name)
    }

    fn invalid(resource: &Resource, name: &str, field: &str, problem: &str) -> Self {
        let mut error =
            ApiError::new(422, "Invalid", format!("{} \"{name}\" is invalid: {field}: {problem}", resource.kind));
        error.details = json!({
            "name": name, "kind": resource.kind, "group": resource.group,
            "causes": [{"reason": "FieldValueInvalid", "message": problem, "field": field}],
        });
        error
    }

    /// 410 for a read at a resourceVersion older than the kept history.
    pub fn expired(requested: u64, oldest: u64) -> Self {
        ApiError::new(410, "Expired", format!("too old resource version: {requested} ({oldest})"))
    }

    /// 504 for a read at a resourceVersion the server has not reached.
    pub fn too_large(requested: u64, current: u64) -> Self {
        let mut error =
            ApiError::new(504, "Timeout", format!("Too large resource version: {requested}, current: {current}"));
        error.details = json!({
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
            "retryAfterSeconds": 1,
        });
        error
    }

    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        });
        if !self.details.is_null() {
            status["details"] = self.details.clone();
        }
        status
    }
}

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One write, as a watch replays it.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub key: Key,
    pub kind: ChangeKind,
    /// The object after the change; for a deletion its last state stamped with the
    /// deletion's resourceVersion, as the real DELETED event carries.
    pub object: Arc<Value>,
    /// The object before the change (a watch with a selector needs it to tell an object
    /// that stopped matching).
    pub previous: Option<Arc<Value>>,
}

/// Which part of an object a write changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The object (its status kept where status is a subresource).
    Object,
    /// Only its status (`.../status`).
    Status,
}

/// Where a list reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadAt {
    /// The current state (resourceVersion unset, `0`, or NotOlderThan one the server has).
    Latest,
    /// NotOlderThan a resourceVersion: the current state, once the server has reached it.
    NotOlderThan(u64),
    /// The state at exactly this resourceVersion, from the kept history.
    Exact(u64),
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// `Some` on a namespaced path (`/namespaces/NS/...`).
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    /// Continue after this (namespace, name) at the token's snapshot.
    pub start_after: Option<(String, String)>,
}

pub struct ListPage {
    pub resource_version: u64,
    pub items: Vec<Arc<Value>>,
    /// (namespace, name) of the last item when more remain.
    pub continue_after: Option<(String, String)>,
    /// Objects after this page (only without selectors, as the real server).
    pub remaining: Option<usize>,
}

/// What DeleteOptions.preconditions may require.
#[derive(Debug, Default)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// ClusterIP and NodePort allocation for Services, as the real server defaults them.
#[derive(Debug, Default)]
struct Allocations {
    cluster_ips: BTreeSet<String>,
    node_ports: BTreeSet<u64>,
    next_ip: u32,
    next_node_port: u64,
}

const SERVICE_CIDR_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const SERVICE_CIDR_SIZE: u32 = 1 << 20;
const NODE_PORT_RANGE: std::ops::RangeInclusive<u64> = 30000..=32767;

pub struct Store {
    rv: u64,
    /// History holds every change with `rv > compacted`.
    compacted: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Change>,
    allocations: Allocations,
    next_uid: u64,
    uid_seed: u64,
}

fn metadata_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_str)
}

fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"].as_object_mut().expect("metadata was made an object")
}

fn finalizers(object: &Value) -> &[Value] {
    object.pointer("/metadata/finalizers").and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn deleting(object: &Value) -> bool {
    object.pointer("/metadata/deletionTimestamp").is_some_and(|t| !t.is_null())
}

fn now() -> Value {
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()))
        .expect("a timestamp serializes")
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` deletes, anything else
/// (arrays included) replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Everything but metadata and status: a change here bumps `metadata.generation`.
fn spec_part(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    copy
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    /// A store holding the namespaces every cluster has.
    pub fn new() -> Self {
        let uid_seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let mut store = Store {
            rv: 0,
            compacted: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            allocations: Allocations::default(),
            next_uid: 0,
            uid_seed,
        };
        for namespace in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            store.create(0, "", json!({"metadata": {"name": namespace}})).expect("the built-in namespaces are valid");
        }
        store
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion reads and watches can still start from.
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Forgets history up to `rv` (at most the current one), as etcd's compaction does:
    /// watches and exact reads at an older resourceVersion then get 410 Gone.
    pub fn compact(&mut self, rv: u64) -> u64 {
        let rv = rv.min(self.rv);
        while self.history.front().is_some_and(|c| c.rv <= rv) {
            self.history.pop_front();
        }
        self.compacted = self.compacted.max(rv);
        self.compacted
    }

    /// The changes after `rv`, or 410 when some were compacted away.
    pub fn changes_after(&self, rv: u64) -> Result<impl Iterator<Item = &Change>> {
        if rv < self.compacted {
            return Err(ApiError::expired(rv, self.compacted));
        }
        let start = self.history.partition_point(|c| c.rv <= rv);
        Ok(self.history.range(start..))
    }

    fn new_uid(&mut self) -> String {
        self.next_uid += 1;
        let x = self.uid_seed ^ self.next_uid.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (x >> 32) as u32,
            (x >> 16) & 0xffff,
            x & 0xfff,
            self.next_uid & 0xfff,
            self.next_uid & 0xffff_ffff_ffff
        )
    }

    fn record(&mut self, key: Key, kind: ChangeKind, object: Arc<Value>, previous: Option<Arc<Value>>) {
        self.history.push_back(Change { rv: self.rv, key, kind, object, previous });
    }

    pub fn get(&self, id: ResourceId, namespace: &str, name: &str) -> Result<Arc<Value>> {
        self.objects
            .get(&(id, namespace.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&RESOURCES[id], name))
    }

    /// Checks kind, apiVersion and the namespace against the request path.
    fn check_identity(id: ResourceId, namespace: &str, object: &mut Value) -> Result<()> {
        let resource = &RESOURCES[id];
        if !object.is_object() {
            return Err(ApiError::bad_request(format!("the body of a {} must be a JSON object", resource.kind)));
        }
        match object.get("kind").and_then(Value::as_str) {
            Some(kind) if kind != resource.kind => {
                return Err(ApiError::bad_request(format!(
                    "the kind {kind:?} of the body does not match the resource {}",
                    resource.qualified_name()
                )))
            }
            _ => object["kind"] = json!(resource.kind),
        }
        match object.get("apiVersion").and_then(Value::as_str) {
            Some(version) if version != resource.api_version() => {
                return Err(ApiError::bad_request(format!(
                    "the apiVersion {version:?} of the body does not match {}",
                    resource.api_version()
                )))
            }
            _ => object["apiVersion"] = json!(resource.api_version()),
        }
        if resource.namespaced {
            match metadata_str(object, "namespace") {
                Some(ns) if !ns.is_empty() && ns != namespace => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ))
                }
                _ => {
                    metadata_mut(object).insert("namespace".into(), json!(namespace));
                }
            }
        } else {
            metadata_mut(object).remove("namespace");
        }
        Ok(())
    }

    pub fn create(&mut self, id: ResourceId, namespace: &str, mut object: Value) -> Result<Arc<Value>> {
        let resource = &RESOURCES[id];
        Self::check_identity(id, namespace, &mut object)?;
        let mut name = metadata_str(&object, "name").unwrap_or("").to_string();
        if name.is_empty() {
            match metadata_str(&object, "generateName").filter(|g| !g.is_empty()) {
                Some(prefix) => {
                    let prefix = prefix.to_string();
                    name = format!("{prefix}{}", &self.new_uid()[..5]);
                }
                None => {
                    return Err(ApiError::invalid(
                        resource,
                        "",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    ))
                }
            }
        }
        if let Some(rv) = metadata_str(&object, "resourceVersion").filter(|rv| !rv.is_empty()) {
            return Err(ApiError::bad_request(format!(
                "resourceVersion should not be set on objects to be created (got {rv:?} on {} \"{name}\")",
                resource.qualified_name()
            )));
        }
        let key = (id, namespace.to_string(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(resource, &name));
        }
        self.apply_defaults(id, &name, &mut object, None)?;
        self.rv += 1;
        let uid = self.new_uid();
        let metadata = metadata_mut(&mut object);
        metadata.insert("name".into(), json!(name));
        metadata.insert("uid".into(), json!(uid));
        metadata.insert("resourceVersion".into(), json!(self.rv.to_string()));
        metadata.insert("creationTimestamp".into(), now());
        metadata.insert("generation".into(), json!(1));
        let object = Arc::new(object);
        self.objects.insert(key.clone(), object.clone());
        self.record(key, ChangeKind::Added, object.clone(), None);
        Ok(object)
    }

    /// Replaces an object (PUT, and the result of a patch). A resourceVersion in the body
    /// must be the current one (409 Conflict otherwise); none means unconditional. An
    /// update that changes nothing writes nothing, as on the real server.
    pub fn update(&mut self, id: ResourceId, namespace: &str, name: &str, object: Value) -> Result<Arc<Value>> {
        self.update_part(id, namespace, name, object, Part::Object)
    }

    /// [`Store::update`] of one part of the object.
    pub fn update_part(
        &mut self,
        id: ResourceId,
        namespace: &str,
        name: &str,
        mut object: Value,
        part: Part,
    ) -> Result<Arc<Value>> {
        let resource = &RESOURCES[id];
        Self::check_identity(id, namespace, &mut object)?;
        match metadata_str(&object, "name") {
            Some(body_name) if !body_name.is_empty() && body_name != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )))
            }
            _ => {
                metadata_mut(&mut object).insert("name".into(), json!(name));
            }
        }
        let key = (id, namespace.to_string(), name.to_string());
        let existing = self.objects.get(&key).cloned().ok_or_else(|| ApiError::not_found(resource, name))?;
        let current_rv = metadata_str(&existing, "resourceVersion").unwrap_or("").to_string();
        match part {
            Part::Object if resource.status_subresource => match existing.get("status") {
                Some(status) => object["status"] = status.clone(),
                None => {
                    object.as_object_mut().expect("checked above").remove("status");
                }
            },
            Part::Object => {}
            Part::Status => {
                let mut whole = (*existing).clone();
                match object.get("status") {
                    Some(status) => whole["status"] = status.clone(),
                    None => {
                        whole.as_object_mut().expect("stored objects are objects").remove("status");
                    }
                }
                // The request's resourceVersion stays a precondition.
                let requested = metadata_str(&object, "resourceVersion").map(str::to_string);
                metadata_mut(&mut whole).remove("resourceVersion");
                if let Some(rv) = requested {
                    metadata_mut(&mut whole).insert("resourceVersion".into(), json!(rv));
                }
                object = whole;
            }
        }
        match metadata_str(&object, "resourceVersion") {
            Some(rv) if !rv.is_empty() && rv != current_rv => {
                return Err(ApiError::conflict(
                    resource,
                    name,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ))
            }
            _ => {}
        }
        if let Some(uid) = metadata_str(&object, "uid").filter(|u| !u.is_empty()) {
            if Some(uid) != metadata_str(&existing, "uid") {
                return Err(ApiError::conflict(
                    resource,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        metadata_str(&existing, "uid").unwrap_or("")
                    ),
                ));
            }
        }
        self.apply_defaults(id, name, &mut object, Some(&existing))?;
        let generation = existing.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
        let generation = if spec_part(&existing) == spec_part(&object) { generation } else { generation + 1 };
        let metadata = metadata_mut(&mut object);
        // A deletion under way cannot be undone or moved by an update.
        for kept in ["uid", "creationTimestamp", "deletionTimestamp"] {
            match existing["metadata"].get(kept) {
                Some(value) => metadata.insert(kept.into(), value.clone()),
                None => metadata.remove(kept),
            };
        }
        metadata.insert("generation".into(), json!(generation));
        metadata.insert("resourceVersion".into(), json!(current_rv));
        if object == *existing {
            return Ok(existing);
        }
        if deleting(&object) && finalizers(&object).is_empty() {
            // The last finalizer of an object being deleted is gone: so is the object.
            return self.remove(key, existing, Some(object));
        }
        self.rv += 1;
        metadata_mut(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        if id == service_id() {
            self.release_service_allocations(&existing);
            self.hold_service_allocations(&object);
        }
        let object = Arc::new(object);
        self.objects.insert(key.clone(), object.clone());
        self.record(key, ChangeKind::Modified, object.clone(), Some(existing));
        Ok(object)
    }

    /// A JSON merge patch (RFC 7386). A resourceVersion in the patch is a precondition.
    pub fn patch(
        &mut self,
        id: ResourceId,
        namespace: &str,
        name: &str,
        patch: &Value,
        part: Part,
    ) -> Result<Arc<Value>> {
        let existing = self.get(id, namespace, name)?;
        let mut object = (*existing).clone();
        merge_patch(&mut object, patch);
        if patch.pointer("/metadata/resourceVersion").is_none() {
            // The patched object carries the current resourceVersion: no precondition.
            metadata_mut(&mut object).remove("resourceVersion");
        }
        self.update_part(id, namespace, name, object, part)
    }

    pub fn delete(
        &mut self,
        id: ResourceId,
        namespace: &str,
        name: &str,
        preconditions: &Preconditions,
    ) -> Result<Arc<Value>> {
        let resource = &RESOURCES[id];
        let key = (id, namespace.to_string(), name.to_string());
        let existing = self.objects.get(&key).cloned().ok_or_else(|| ApiError::not_found(resource, name))?;
        for (field, wanted) in [("UID", &preconditions.uid), ("ResourceVersion", &preconditions.resource_version)] {
            let pointer = if field == "UID" { "uid" } else { "resourceVersion" };
            let actual = metadata_str(&existing, pointer).unwrap_or("");
            if let Some(wanted) = wanted.as_deref().filter(|w| *w != actual) {
                return Err(ApiError::conflict(
                    resource,
                    name,
                    &format!(
                        "Precondition failed: {field} in precondition: {wanted}, {field} in object meta: {actual}"
                    ),
                ));
            }
        }
        if !finalizers(&existing).is_empty() {
            // Finalizers hold it: marked for deletion (once), and gone when the last is removed.
            if deleting(&existing) {
                return Ok(existing);
            }
            let mut marked = (*existing).clone();
            metadata_mut(&mut marked).insert("deletionTimestamp".into(), now());
            metadata_mut(&mut marked).insert("deletionGracePeriodSeconds".into(), json!(0));
            self.rv += 1;
            metadata_mut(&mut marked).insert("resourceVersion".into(), json!(self.rv.to_string()));
            let marked = Arc::new(marked);
            self.objects.insert(key.clone(), marked.clone());
            self.record(key, ChangeKind::Modified, marked.clone(), Some(existing));
            return Ok(marked);
        }
        self.remove(key, existing, None)
    }

    /// Removes a stored object; the watchers' DELETED event carries `last` (its final
    /// state, default: as stored) at a new resourceVersion.
    fn remove(&mut self, key: Key, existing: Arc<Value>, last: Option<Value>) -> Result<Arc<Value>> {
        self.objects.remove(&key);
        if key.0 == service_id() {
            self.release_service_allocations(&existing);
        }
        self.rv += 1;
        let mut last = last.unwrap_or_else(|| (*existing).clone());
        metadata_mut(&mut last).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let last = Arc::new(last);
        self.record(key, ChangeKind::Deleted, last.clone(), Some(existing));
        Ok(last)
    }

    /// The objects of one resource (in one namespace when given) at `rv`, undoing the
    /// changes made after it.
    fn state_at(&self, id: ResourceId, namespace: Option<&str>, rv: u64) -> BTreeMap<(String, String), Arc<Value>> {
        let in_scope = |key: &Key| key.0 == id && namespace.is_none_or(|ns| key.1 == ns);
        let start = (id, namespace.unwrap_or("").to_string(), String::new());
        let mut state: BTreeMap<(String, String), Arc<Value>> = self
            .objects
            .range(start..)
            .take_while(|(key, _)| in_scope(key))
            .map(|((_, ns, name), object)| ((ns.clone(), name.clone()), object.clone()))
            .collect();
        let first_after = self.history.partition_point(|c| c.rv <= rv);
        let mut undone = BTreeSet::new();
        for change in self.history.range(first_after..).filter(|c| in_scope(&c.key)) {
            let key = (change.key.1.clone(), change.key.2.clone());
            // The first change after `rv` to a key holds its state at `rv`.
            if undone.insert(key.clone()) {
                match &change.previous {
                    Some(previous) => state.insert(key, previous.clone()),
                    None => state.remove(&key),
                };
            }
        }
        state
    }

    pub fn list(&self, id: ResourceId, at: ReadAt, query: &ListQuery) -> Result<ListPage> {
        let snapshot_rv = match at {
            ReadAt::Latest => self.rv,
            ReadAt::NotOlderThan(rv) if rv > self.rv => return Err(ApiError::too_large(rv, self.rv)),
            ReadAt::NotOlderThan(_) => self.rv,
            ReadAt::Exact(rv) if rv > self.rv => return Err(ApiError::too_large(rv, self.rv)),
            ReadAt::Exact(rv) if rv < self.compacted => return Err(ApiError::expired(rv, self.compacted)),
            ReadAt::Exact(rv) => rv,
        };
        let state = self.state_at(id, query.namespace.as_deref(), snapshot_rv);
        let after = match &query.start_after {
            Some(key) => {
                state.range::<(String, String), _>((std::ops::Bound::Excluded(key.clone()), std::ops::Bound::Unbounded))
            }
            None => state.range::<(String, String), _>(..),
        };
        let selected = after.filter(|(_, object)| query.labels.matches(object) && query.fields.matches(object));
        let mut items = Vec::new();
        let mut continue_after = None;
        let mut remaining = None;
        let limit = query.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut selected = selected.peekable();
        while let Some((key, object)) = selected.next() {
            items.push(object.clone());
            if items.len() == limit {
                if selected.peek().is_some() {
                    continue_after = Some(key.clone());
                    if query.labels.is_empty() && query.fields.is_empty() {
                        remaining = Some(selected.count());
                    }
                }
                break;
            }
        }
        Ok(ListPage { resource_version: snapshot_rv, items, continue_after, remaining })
    }

    /// Defaults the fields the real server fills in for the resources the agent reads:
    /// a Service's type, port protocols and targetPorts, its ClusterIP (from 10.96.0.0/12)
    /// and NodePorts (30000-32767); an EndpointSlice's port protocols; a Namespace's phase.
    /// On update a Service keeps its allocated ClusterIP and NodePorts when the new object
    /// leaves them empty, and may not change its ClusterIP.
    fn apply_defaults(
        &mut self,
        id: ResourceId,
        name: &str,
        object: &mut Value,
        existing: Option<&Value>,
    ) -> Result<()> {
        let resource = &RESOURCES[id];
        match resource.kind {
            "Namespace" => {
                object["status"] = json!({"phase": "Active"});
            }
            "EndpointSlice" => {
                for port in object.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
                    if port.get("protocol").is_none() {
                        port["protocol"] = json!("TCP");
                    }
                }
            }
            "Service" => self.default_service(resource, name, object, existing)?,
            _ => {}
        }
        Ok(())
    }

    fn default_service(
        &mut self,
        resource: &Resource,
        name: &str,
        object: &mut Value,
        existing: Option<&Value>,
    ) -> Result<()> {
        if !object.get("spec").is_some_and(Value::is_object) {
            object["spec"] = json!({});
        }
        let spec = object["spec"].as_object_mut().expect("made an object above");
        let service_type = spec.entry("type").or_insert(json!("ClusterIP")).as_str().unwrap_or("ClusterIP").to_string();
        spec.entry("sessionAffinity").or_insert(json!("None"));
        let old_spec = existing.and_then(|e| e.get("spec"));
        for port in spec.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
            if port.get("protocol").is_none() {
                port["protocol"] = json!("TCP");
            }
            if port.get("targetPort").is_none() {
                port["targetPort"] = port.get("port").cloned().unwrap_or(Value::Null);
            }
        }
        if service_type == "ExternalName" {
            return Ok(());
        }
        let old_ip = old_spec.and_then(|s| s.get("clusterIP")).and_then(Value::as_str).filter(|ip| !ip.is_empty());
        let new_ip = spec.get("clusterIP").and_then(Value::as_str).filter(|ip| !ip.is_empty()).map(str::to_string);
        let ip = match (old_ip, new_ip) {
            (Some(old), Some(new)) if old != new => {
                return Err(ApiError::invalid(
                    resource,
                    name,
                    "spec.clusterIPs[0]",
                    &format!("Invalid value: {new:?}: may not change once set"),
                ))
            }
            (Some(old), _) => old.to_string(),
            (None, Some(new)) if new == "None" => new,
            (None, Some(new)) => {
                if new.parse::<std::net::Ipv4Addr>().is_err() {
                    return Err(ApiError::invalid(
                        resource,
                        name,
                        "spec.clusterIP",
                        &format!("Invalid value: {new:?}: must be a valid IP address"),
                    ));
                }
                if self.allocations.cluster_ips.contains(&new) {
                    return Err(ApiError::invalid(
                        resource,
                        name,
                        "spec.clusterIPs",
                        &format!(
                            "Invalid value: [{new:?}]: failed to allocate IP {new}: provided IP is already allocated"
                        ),
                    ));
                }
                new
            }
            (None, None) => self.allocate_cluster_ip(),
        };
        spec.insert("clusterIP".into(), json!(ip));
        spec.insert("clusterIPs".into(), json!([ip]));
        if ip != "None" {
            spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
            spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
        }
        if service_type == "NodePort" || service_type == "LoadBalancer" {
            let old_ports: Vec<Value> =
                old_spec.and_then(|s| s.get("ports")).and_then(Value::as_array).cloned().unwrap_or_default();
            let mut taken: BTreeSet<u64> = BTreeSet::new();
            for port in spec.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
                if port.get("nodePort").and_then(Value::as_u64).is_none_or(|p| p == 0) {
                    let carried = old_ports
                        .iter()
                        .find(|old| old.get("port") == port.get("port") && old.get("protocol") == port.get("protocol"))
                        .and_then(|old| old.get("nodePort"))
                        .and_then(Value::as_u64);
                    let node_port = match carried {
                        Some(p) => p,
                        None => self.allocate_node_port(&taken),
                    };
                    port["nodePort"] = json!(node_port);
                }
                let node_port = port["nodePort"].as_u64().unwrap_or(0);
                if !NODE_PORT_RANGE.contains(&node_port) {
                    return Err(ApiError::invalid(resource, name, "spec.ports[].nodePort", &format!("Invalid value: {node_port}: provided port is not in the valid range. The range of valid ports is 30000-32767")));
                }
                let held_by_old =
                    old_ports.iter().any(|old| old.get("nodePort").and_then(Value::as_u64) == Some(node_port));
                if !held_by_old && self.allocations.node_ports.contains(&node_port) {
                    return Err(ApiError::invalid(
                        resource,
                        name,
                        "spec.ports[].nodePort",
                        &format!("Invalid value: {node_port}: provided port is already allocated"),
                    ));
                }
                taken.insert(node_port);
            }
        }
        if existing.is_none() {
            self.hold_service_allocations(object);
        }
        Ok(())
    }

    fn allocate_cluster_ip(&mut self) -> String {
        loop {
            // .0 is the network; the real allocator also skips it.
            self.allocations.next_ip = self.allocations.next_ip % (SERVICE_CIDR_SIZE - 2) + 1;
            let ip = std::net::Ipv4Addr::from(SERVICE_CIDR_BASE + self.allocations.next_ip).to_string();
            if !self.allocations.cluster_ips.contains(&ip) {
                return ip;
            }
        }
    }

    fn allocate_node_port(&mut self, taken: &BTreeSet<u64>) -> u64 {
        let span = NODE_PORT_RANGE.end() - NODE_PORT_RANGE.start() + 1;
        for _ in 0..span {
            let port = NODE_PORT_RANGE.start() + self.allocations.next_node_port % span;
            self.allocations.next_node_port += 1;
            if !self.allocations.node_ports.contains(&port) && !taken.contains(&port) {
                return port;
            }
        }
        // Every port is allocated: the validation that follows reports the conflict.
        *NODE_PORT_RANGE.start()
    }

    fn service_allocations(object: &Value) -> (Option<String>, Vec<u64>) {
        let ip = object.pointer("/spec/clusterIP").and_then(Value::as_str).filter(|ip| !ip.is_empty() && *ip != "None");
        let ports = object
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
            .collect();
        (ip.map(str::to_string), ports)
    }

    fn hold_service_allocations(&mut self, object: &Value) {
        let (ip, ports) = Self::service_allocations(object);
        self.allocations.cluster_ips.extend(ip);
        self.allocations.node_ports.extend(ports);
    }

    fn release_service_allocations(&mut self, object: &Value) {
        let (ip, ports) = Self::service_allocations(object);
        if let Some(ip) = ip {
            self.allocations.cluster_ips.remove(&ip);
        }
        for port in ports {
            self.allocations.node_ports.remove(&port);
        }
    }
}

fn service_id() -> ResourceId {
    resource_id("", "v1", "services").expect("services are served")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": name}}, "spec": {"ports": [{"port": 80}]}})
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut target, &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}}));
    }

    #[test]
    fn exact_reads_undo_later_changes_and_compaction_expires_them() {
        let mut store = Store::new();
        let sid = service_id();
        store.create(sid, "default", svc("a")).unwrap();
        let rv_one = store.resource_version();
        store.create(sid, "default", svc("b")).unwrap();
        store.patch(sid, "default", "a", &json!({"metadata": {"labels": {"app": "changed"}}}), Part::Object).unwrap();
        store.delete(sid, "default", "b", &Preconditions::default()).unwrap();
        let query = ListQuery::default();
        let then = store.list(sid, ReadAt::Exact(rv_one), &query).unwrap();
        assert_eq!(then.items.len(), 1);
        assert_eq!(then.items[0]["metadata"]["labels"]["app"], "a");
        let latest = store.list(sid, ReadAt::Latest, &query).unwrap();
        assert_eq!(latest.items[0]["metadata"]["labels"]["app"], "changed");
        store.compact(store.resource_version());
        let err = store.list(sid, ReadAt::Exact(rv_one), &query).err().unwrap();
        assert_eq!((err.code, err.reason), (410, "Expired"));
    }

    #[test]
    fn services_get_cluster_ips_and_keep_them() {
        let mut store = Store::new();
        let sid = service_id();
        let created = store.create(sid, "default", svc("a")).unwrap();
        let ip = created["spec"]["clusterIP"].as_str().unwrap().to_string();
        assert_eq!(ip, "10.96.0.1");
        assert_eq!(created["spec"]["ports"][0], json!({"port": 80, "protocol": "TCP", "targetPort": 80}));
        let replaced = store.update(sid, "default", "a", svc("a")).unwrap();
        assert_eq!(replaced["spec"]["clusterIP"], json!(ip));
        let mut moved = svc("a");
        moved["spec"]["clusterIP"] = json!("10.96.9.9");
        assert_eq!(store.update(sid, "default", "a", moved).unwrap_err().code, 422);
    }

    #[test]
    fn status_is_written_only_through_its_subresource() {
        let mut store = Store::new();
        let sid = service_id();
        store.create(sid, "default", svc("a")).unwrap();
        let lb = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.168.60.5"}]}}});
        let ignored = store.patch(sid, "default", "a", &lb, Part::Object).unwrap();
        assert_eq!(ignored.get("status"), None);
        let written = store.patch(sid, "default", "a", &lb, Part::Status).unwrap();
        assert_eq!(written["status"], lb["status"]);
        let kept =
            store.patch(sid, "default", "a", &json!({"metadata": {"labels": {"x": "y"}}}), Part::Object).unwrap();
        assert_eq!(kept["status"], lb["status"]);
    }
}
