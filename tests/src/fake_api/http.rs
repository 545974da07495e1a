//! The HTTP protocol: discovery, the REST verbs on resource paths, list and watch
//! parameters, `kind: Status` errors, and the `/fake/...` control endpoints.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::selector::{FieldSelector, LabelSelector};
use super::store::{
    resource_id, ApiError, ChangeKind, ListQuery, Part, Preconditions, ReadAt, ResourceId, Result, RESOURCES,
};
use super::Shared;

/// The version `/version` reports (what k8s-openapi's `v1_33` types describe).
const MINOR_VERSION: &str = "33";

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn ok(body: &Value) -> Response {
    json_response(200, body)
}

fn error(err: &ApiError) -> Response {
    let mut response = json_response(err.code, &err.to_status());
    // As the real server, a Status that says when to retry says it in the header too.
    if let Some(seconds) = err.details.get("retryAfterSeconds").and_then(Value::as_u64) {
        response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
    }
    response
}

/// One handler for every path: the Kubernetes URL space is regular enough to route here.
pub(super) async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    if segments.first() == Some(&"fake") {
        return control(&shared, &method, &segments[1..], &query);
    }
    shared.record(method.as_str(), &uri);
    let delay = shared.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let result = match (method.clone(), segments.as_slice()) {
        (Method::GET, ["version"]) => Ok(ok(&json!({
            "major": "1", "minor": MINOR_VERSION, "gitVersion": format!("v1.{MINOR_VERSION}.0-fake"),
            "gitCommit": "fake", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "none", "compiler": "rustc", "platform": "linux/amd64",
        }))),
        (Method::GET, ["healthz" | "livez" | "readyz"]) => Ok((StatusCode::OK, "ok").into_response()),
        (Method::GET, ["api"]) => Ok(ok(&json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.address_text()}],
        }))),
        (Method::GET, ["apis"]) => Ok(ok(&api_group_list())),
        (Method::GET, ["api", "v1"]) => Ok(ok(&resource_list("", "v1"))),
        (Method::GET, ["apis", group]) => match api_group(group) {
            Some(g) => Ok(ok(&g)),
            None => Err(ApiError::new(404, "NotFound", "the server could not find the requested resource")),
        },
        (Method::GET, ["apis", group, version])
            if RESOURCES.iter().any(|r| r.group == *group && r.version == *version) =>
        {
            Ok(ok(&resource_list(group, version)))
        }
        (_, ["api", "v1", rest @ ..]) => {
            resource_request(&shared, &method, "", "v1", rest, &headers, &query, &body).await
        }
        (_, ["apis", group, version, rest @ ..]) => {
            resource_request(&shared, &method, group, version, rest, &headers, &query, &body).await
        }
        // `/openapi/v2` and `/openapi/v3` land here: kubectl's client-side validation needs
        // them, so the tests run kubectl with `--validate=false`.
        _ => Err(ApiError::new(404, "NotFound", "the server could not find the requested resource")),
    };
    result.unwrap_or_else(|e| error(&e))
}

fn api_group_list() -> Value {
    let names: std::collections::BTreeSet<&str> = RESOURCES.iter().map(|r| r.group).filter(|g| !g.is_empty()).collect();
    let groups: Vec<Value> = names.into_iter().filter_map(api_group).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn api_group(group: &str) -> Option<Value> {
    let version = RESOURCES.iter().find(|r| r.group == group && !group.is_empty())?.version;
    let group_version = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    Some(json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": group,
        "versions": [group_version], "preferredVersion": group_version,
    }))
}

fn resource_list(group: &str, version: &str) -> Value {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| {
            json!({
                "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                "shortNames": r.short_names,
            })
        })
        .collect();
    let group_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

/// A resource path below `/api/v1` or `/apis/GROUP/VERSION`: `(id, namespace, name)`
/// and the part (`.../status`). A namespace of `None` is a path across all namespaces
/// (or a cluster-scoped one).
fn parse_resource_path(
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<(ResourceId, Option<String>, Option<String>, Part)> {
    let not_found = || ApiError::new(404, "NotFound", "the server could not find the requested resource");
    if let [object @ .., name, "status"] = rest {
        // `.../NAME/status`, unless the path names an object called "status".
        if let Ok((id, namespace, Some(name))) = parse_object_path(group, version, &[object, &[name]].concat()) {
            if !RESOURCES[id].status_subresource {
                return Err(not_found());
            }
            return Ok((id, namespace, Some(name), Part::Status));
        }
    }
    let (id, namespace, name) = parse_object_path(group, version, rest)?;
    Ok((id, namespace, name, Part::Object))
}

fn parse_object_path(
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<(ResourceId, Option<String>, Option<String>)> {
    let not_found = || ApiError::new(404, "NotFound", "the server could not find the requested resource");
    let lookup = |plural: &str| resource_id(group, version, plural).ok_or_else(not_found);
    match rest {
        [plural] => Ok((lookup(plural)?, None, None)),
        ["namespaces", namespace, plural] => {
            let id = lookup(plural)?;
            if !RESOURCES[id].namespaced {
                return Err(not_found());
            }
            Ok((id, Some(namespace.to_string()), None))
        }
        ["namespaces", namespace, plural, name] => {
            let id = lookup(plural)?;
            if !RESOURCES[id].namespaced {
                return Err(not_found());
            }
            Ok((id, Some(namespace.to_string()), Some(name.to_string())))
        }
        [plural, name] => {
            let id = lookup(plural)?;
            if RESOURCES[id].namespaced {
                return Err(not_found());
            }
            Ok((id, None, Some(name.to_string())))
        }
        _ => Err(not_found()),
    }
}

fn parse_json(body: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body of the {what} request is not valid JSON: {e}")))
}

#[allow(clippy::too_many_arguments)] // the parts of one request
async fn resource_request(
    shared: &Arc<Shared>,
    method: &Method,
    group: &str,
    version: &str,
    rest: &[&str],
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Result<Response> {
    let (id, namespace, name, part) = parse_resource_path(group, version, rest)?;
    let resource = &RESOURCES[id];
    let ns = namespace.as_deref().unwrap_or("");
    match (method, name) {
        (&Method::GET, None) if matches!(query.get("watch").map(String::as_str), Some("1" | "true")) => {
            super::stream::start(shared, id, namespace, query)
        }
        (&Method::GET, None) => list(shared, id, namespace, query),
        (&Method::POST, None) => {
            if resource.namespaced && namespace.is_none() {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                ));
            }
            let object = parse_json(body, "create")?;
            let created = shared.store.lock().unwrap().create(id, ns, object)?;
            shared.changed();
            Ok(json_response(201, &created))
        }
        (&Method::GET, Some(name)) => {
            let object = shared.store.lock().unwrap().get(id, ns, &name)?;
            Ok(ok(&object))
        }
        (&Method::PUT, Some(name)) => {
            let object = parse_json(body, "update")?;
            let updated = shared.store.lock().unwrap().update_part(id, ns, &name, object, part)?;
            shared.changed();
            Ok(ok(&updated))
        }
        (&Method::PATCH, Some(name)) => {
            let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let content_type = content_type.split(';').next().unwrap_or("").trim();
            match content_type {
                // Strategic merge patch is served as a JSON merge patch: they differ only for
                // lists with a patch merge key (a Service's ports, a Node's addresses), which
                // the strategic form merges by key and this server replaces whole.
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    let patch = parse_json(body, "patch")?;
                    let patched = shared.store.lock().unwrap().patch(id, ns, &name, &patch, part)?;
                    shared.changed();
                    Ok(ok(&patched))
                }
                other => Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the fake API server does not support the patch type {other:?}: use application/merge-patch+json \
                         (or application/strategic-merge-patch+json, served as a merge patch); \
                         JSON patch and server-side apply are not implemented"
                    ),
                )),
            }
        }
        (&Method::DELETE, Some(name)) if part == Part::Object => {
            let options = if body.is_empty() { Value::Null } else { parse_json(body, "delete")? };
            let text = |pointer: &str| options.pointer(pointer).and_then(Value::as_str).map(str::to_string);
            let preconditions = Preconditions {
                uid: text("/preconditions/uid"),
                resource_version: text("/preconditions/resourceVersion"),
            };
            let deleted = shared.store.lock().unwrap().delete(id, ns, &name, &preconditions)?;
            shared.changed();
            Ok(ok(&deleted))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    }
}

fn parse_rv(text: &str) -> Result<u64> {
    text.parse().map_err(|_| {
        ApiError::bad_request(format!("invalid resourceVersion {text:?}: not a resource version this server issued"))
    })
}

/// Selectors of a list or watch; a bad one is a 400 naming it.
pub(super) fn selectors(query: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector)> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(format!("invalid labelSelector: {e}")))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(format!("invalid fieldSelector: {e}")))?;
    Ok((labels, fields))
}

/// The continue token: the snapshot's resourceVersion and the last key returned, hex-encoded
/// (opaque to clients, as the real server's).
fn encode_continue(rv: u64, (namespace, name): &(String, String)) -> String {
    format!("{rv}/{namespace}/{name}").bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Result<(u64, (String, String))> {
    let invalid =
        || ApiError::bad_request(format!("continue key is not valid: {token:?} was not issued by this server"));
    if !token.len().is_multiple_of(2) {
        return Err(invalid());
    }
    let bytes: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok()).collect();
    let text = String::from_utf8(bytes.ok_or_else(invalid)?).map_err(|_| invalid())?;
    let mut parts = text.splitn(3, '/');
    let (Some(rv), Some(namespace), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid());
    };
    Ok((rv.parse().map_err(|_| invalid())?, (namespace.to_string(), name.to_string())))
}

/// Where a list reads, by the API's rules for `resourceVersion`, `resourceVersionMatch`,
/// `limit` and `continue`.
fn read_at(query: &HashMap<String, String>, continue_from: Option<u64>) -> Result<ReadAt> {
    let rv = query.get("resourceVersion").map(String::as_str).filter(|rv| !rv.is_empty());
    let rv_match = query.get("resourceVersionMatch").map(String::as_str).filter(|m| !m.is_empty());
    if let Some(snapshot) = continue_from {
        if rv.is_some_and(|rv| rv != "0") || rv_match.is_some() {
            return Err(ApiError::bad_request("specifying resource version is not allowed when using continue"));
        }
        return Ok(ReadAt::Exact(snapshot));
    }
    let has_limit = query.get("limit").is_some_and(|l| l.parse::<u64>().is_ok_and(|l| l > 0));
    match (rv, rv_match) {
        (None, Some(_)) => {
            Err(ApiError::bad_request("resourceVersionMatch is forbidden unless resourceVersion is provided"))
        }
        (None, None) => Ok(ReadAt::Latest),
        (Some(rv), Some("Exact")) => match parse_rv(rv)? {
            0 => Err(ApiError::bad_request("resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"")),
            n => Ok(ReadAt::Exact(n)),
        },
        (Some(rv), Some("NotOlderThan")) => Ok(ReadAt::NotOlderThan(parse_rv(rv)?)),
        (Some(_), Some(other)) => Err(ApiError::bad_request(format!(
            "resourceVersionMatch {other:?} is not supported: use \"Exact\" or \"NotOlderThan\""
        ))),
        (Some("0"), None) => Ok(ReadAt::Latest),
        // Legacy semantics: a paginated list at a resourceVersion is an exact read.
        (Some(rv), None) if has_limit => Ok(ReadAt::Exact(parse_rv(rv)?)),
        (Some(rv), None) => Ok(ReadAt::NotOlderThan(parse_rv(rv)?)),
    }
}

fn list(
    shared: &Arc<Shared>,
    id: ResourceId,
    namespace: Option<String>,
    query: &HashMap<String, String>,
) -> Result<Response> {
    let resource = &RESOURCES[id];
    let (labels, fields) = selectors(query)?;
    let limit = match query.get("limit").filter(|l| !l.is_empty()) {
        Some(l) => Some(l.parse::<usize>().map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?),
        None => None,
    };
    let token = query.get("continue").filter(|c| !c.is_empty()).map(|c| decode_continue(c)).transpose()?;
    let at = read_at(query, token.as_ref().map(|(rv, _)| *rv))?;
    let list_query =
        ListQuery { namespace, labels, fields, limit, start_after: token.as_ref().map(|(_, key)| key.clone()) };
    let page = shared.store.lock().unwrap().list(id, at, &list_query).map_err(|e| {
        if e.code == 410 && token.is_some() {
            ApiError::new(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter.",
            )
        } else {
            e
        }
    })?;
    shared.lists_served.fetch_add(1, Ordering::Relaxed);
    let mut metadata = json!({"resourceVersion": page.resource_version.to_string()});
    if let Some(after) = &page.continue_after {
        metadata["continue"] = json!(encode_continue(page.resource_version, after));
    }
    if let Some(remaining) = page.remaining {
        metadata["remainingItemCount"] = json!(remaining);
    }
    let items: Vec<&Value> = page.items.iter().map(|o| o.as_ref()).collect();
    Ok(ok(&json!({
        "kind": format!("{}List", resource.kind), "apiVersion": resource.api_version(),
        "metadata": metadata, "items": items,
    })))
}

/// `/fake/...`: fault injection for a server in another process (the binary).
fn control(shared: &Arc<Shared>, method: &Method, path: &[&str], query: &HashMap<String, String>) -> Response {
    let number = |name: &str| query.get(name).and_then(|v| v.parse::<u64>().ok());
    let faults = super::Faults { shared: shared.clone() };
    match (method, path) {
        (&Method::GET, ["resourceVersion"]) => ok(&json!({"resourceVersion": faults.resource_version().to_string()})),
        (&Method::GET, ["watches"]) => ok(&json!({"open": faults.open_watches()})),
        (&Method::POST, ["compact"]) => {
            let to = number("resourceVersion").unwrap_or(u64::MAX);
            ok(&json!({"compactedTo": faults.compact_to(to).to_string()}))
        }
        (&Method::POST, ["drop-watches"]) => ok(&json!({"dropped": faults.drop_watches()})),
        (&Method::POST, ["expire-watches"]) => ok(&json!({"expired": faults.expire_watches()})),
        (&Method::POST, ["delay"]) => match number("ms") {
            Some(ms) => {
                faults.set_delay(Duration::from_millis(ms));
                ok(&json!({"delayMs": ms}))
            }
            None => error(&ApiError::bad_request("POST /fake/delay needs ?ms=N")),
        },
        (&Method::POST, ["outage"]) => match number("ms").or_else(|| number("seconds").map(|s| s * 1000)) {
            Some(ms) => {
                // Begin once this answer has left: the outage closes every connection.
                let faults = faults.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    faults.outage(Duration::from_millis(ms)).await;
                });
                ok(&json!({"outageMs": ms, "beginsInMs": 50}))
            }
            None => error(&ApiError::bad_request("POST /fake/outage needs ?seconds=N or ?ms=N")),
        },
        _ => error(&ApiError::new(
            404,
            "NotFound",
            "fake control endpoints: GET /fake/resourceVersion, /fake/watches; POST /fake/compact[?resourceVersion=N], \
             /fake/drop-watches, /fake/expire-watches, /fake/delay?ms=N, /fake/outage?seconds=N",
        )),
    }
}

/// A watch event line.
pub(super) fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

pub(super) fn change_type(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Added => "ADDED",
        ChangeKind::Modified => "MODIFIED",
        ChangeKind::Deleted => "DELETED",
    }
}

pub(super) fn streaming_response(body: Body) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_garbage_is_refused() {
        let key = ("default".to_string(), "web".to_string());
        assert_eq!(decode_continue(&encode_continue(42, &key)).unwrap(), (42, key));
        assert_eq!(decode_continue("zz").unwrap_err().code, 400);
    }

    #[test]
    fn list_resource_version_rules() {
        let q = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>()
        };
        assert_eq!(read_at(&q(&[]), None).unwrap(), ReadAt::Latest);
        assert_eq!(read_at(&q(&[("resourceVersion", "0")]), None).unwrap(), ReadAt::Latest);
        assert_eq!(read_at(&q(&[("resourceVersion", "7")]), None).unwrap(), ReadAt::NotOlderThan(7));
        assert_eq!(read_at(&q(&[("resourceVersion", "7"), ("limit", "5")]), None).unwrap(), ReadAt::Exact(7));
        assert_eq!(
            read_at(&q(&[("resourceVersion", "7"), ("resourceVersionMatch", "Exact")]), None).unwrap(),
            ReadAt::Exact(7)
        );
        assert_eq!(read_at(&q(&[("resourceVersionMatch", "Exact")]), None).unwrap_err().code, 400);
        assert_eq!(read_at(&q(&[]), Some(9)).unwrap(), ReadAt::Exact(9));
    }
}
