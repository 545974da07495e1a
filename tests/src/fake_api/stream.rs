//! Watch streams: newline-delimited `{type, object}` events from a resourceVersion,
//! bookmarks, selectors applied to events, 410 when the history is gone, and the
//! faults that end a stream.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::http::{change_type, event_line, selectors, streaming_response};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{ApiError, Change, ChangeKind, ListQuery, ReadAt, ResourceId, Result, Store, RESOURCES};
use super::Shared;

/// The real server ends a watch without `timeoutSeconds` after a random 30-60 min.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Which events one watch sees.
struct Scope {
    id: ResourceId,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Scope {
    fn selects(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// The event this watch sees for a change. An object that stops matching the
    /// selectors is DELETED for this watch, and one that starts matching is ADDED, as
    /// the real server reports them.
    fn event(&self, change: &Change) -> Option<&'static str> {
        if change.key.0 != self.id || self.namespace.as_ref().is_some_and(|ns| *ns != change.key.1) {
            return None;
        }
        let now = self.selects(&change.object);
        match change.kind {
            ChangeKind::Added | ChangeKind::Deleted => now.then(|| change_type(change.kind)),
            ChangeKind::Modified => {
                let before = change.previous.as_ref().is_some_and(|p| self.selects(p));
                match (before, now) {
                    (true, true) => Some("MODIFIED"),
                    (false, true) => Some("ADDED"),
                    (true, false) => Some("DELETED"),
                    (false, false) => None,
                }
            }
        }
    }
}

fn bookmark(id: ResourceId, rv: u64, initial_events_end: bool) -> Bytes {
    let resource = &RESOURCES[id];
    let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line("BOOKMARK", &json!({"kind": resource.kind, "apiVersion": resource.api_version(), "metadata": metadata}))
}

fn expired_event(err: &ApiError) -> Bytes {
    event_line("ERROR", &err.to_status())
}

/// The events after `cursor` this watch sees, moving the cursor to the store's
/// resourceVersion (every change up to it has been looked at); an ERROR when history
/// after the cursor was compacted away.
fn scan(store: &Store, scope: &Scope, cursor: &mut u64) -> Result<Vec<Bytes>, Bytes> {
    let changes = store.changes_after(*cursor).map_err(|e| expired_event(&e))?;
    let lines = changes.filter_map(|c| scope.event(c).map(|kind| event_line(kind, &c.object))).collect();
    *cursor = (*cursor).max(store.resource_version());
    Ok(lines)
}

fn flag(query: &HashMap<String, String>, name: &str) -> Option<bool> {
    query.get(name).map(|v| v == "true" || v == "1")
}

fn invalid(field: &str, message: &str) -> ApiError {
    let mut err = ApiError::new(
        422,
        "Invalid",
        format!("ListOptions.meta.k8s.io \"\" is invalid: {field}: Forbidden: {message}"),
    );
    err.details = json!({"kind": "ListOptions", "group": "meta.k8s.io",
        "causes": [{"reason": "FieldValueForbidden", "message": format!("Forbidden: {message}"), "field": field}]});
    err
}

/// Starts a watch: the answer is 200 with a body of events that runs until
/// `timeoutSeconds`, the client leaving, or a fault.
pub(super) fn start(
    shared: &Arc<Shared>,
    id: ResourceId,
    namespace: Option<String>,
    query: &HashMap<String, String>,
) -> Result<Response> {
    let (labels, fields) = selectors(query)?;
    let scope = Scope { id, namespace, labels, fields };
    let bookmarks = flag(query, "allowWatchBookmarks").unwrap_or(false);
    let send_initial_events = flag(query, "sendInitialEvents");
    let rv = query.get("resourceVersion").map(String::as_str).filter(|rv| !rv.is_empty());
    if send_initial_events == Some(true) {
        if !bookmarks {
            return Err(invalid(
                "allowWatchBookmarks",
                "sendInitialEvents requires setting allowWatchBookmarks to true",
            ));
        }
        if query.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan") {
            return Err(invalid(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
    }
    let timeout = match query.get("timeoutSeconds").filter(|t| !t.is_empty()) {
        Some(t) => {
            Duration::from_secs(t.parse().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?)
        }
        None => DEFAULT_WATCH_TIMEOUT,
    };
    // Without a resourceVersion (or at "0") a watch begins with the current objects as
    // ADDED events; sendInitialEvents asks for that explicitly and ends it with a bookmark.
    let initial_events = send_initial_events.unwrap_or(matches!(rv, None | Some("0")));
    let start_rv = match rv {
        Some(text) => {
            Some(text.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {text:?}")))?)
        }
        None => None,
    };

    // Subscribed before the store is read: a write or fault after that read wakes the task.
    let mut changes = shared.changes.subscribe();
    let mut drops = shared.drop_watches.subscribe();
    let mut expiries = shared.expire_watches.subscribe();
    let mut first = Vec::new();
    let mut cursor;
    let mut ended = false;
    {
        let store = shared.store.lock().unwrap();
        if initial_events {
            let list_query = ListQuery {
                namespace: scope.namespace.clone(),
                labels: scope.labels.clone(),
                fields: scope.fields.clone(),
                ..Default::default()
            };
            let page = store.list(id, ReadAt::Latest, &list_query)?;
            first.extend(page.items.iter().map(|o| event_line("ADDED", o)));
            cursor = page.resource_version;
            if send_initial_events == Some(true) {
                first.push(bookmark(id, cursor, true));
            }
        } else {
            cursor = start_rv.unwrap_or_else(|| store.resource_version());
            if let Err(event) = scan(&store, &scope, &mut cursor).map(|lines| first.extend(lines)) {
                first.push(event);
                ended = true;
            }
        }
    }

    let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(64);
    let shared = shared.clone();
    tokio::spawn(async move {
        shared.open_watches.fetch_add(1, Ordering::Relaxed);
        let _open = OpenWatch(&shared);
        for line in first {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        if ended {
            return;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticks =
            tokio::time::interval_at(tokio::time::Instant::now() + shared.bookmark_interval, shared.bookmark_interval);
        loop {
            let mut send_bookmark = false;
            tokio::select! {
                _ = changes.changed() => {}
                _ = ticks.tick(), if bookmarks => send_bookmark = true,
                () = &mut deadline => return,
                _ = drops.changed() => {
                    // An error in the body makes the server abort the connection mid-stream.
                    let _ = tx.send(Err(std::io::Error::other("the fake API server dropped this watch"))).await;
                    return;
                }
                _ = expiries.changed() => {
                    let compacted = shared.store.lock().unwrap().compacted();
                    let _ = tx.send(Ok(expired_event(&ApiError::expired(cursor, compacted.max(cursor + 1))))).await;
                    return;
                }
                () = tx.closed() => return,
            }
            let scanned = scan(&shared.store.lock().unwrap(), &scope, &mut cursor);
            match scanned {
                Ok(lines) => {
                    for line in lines {
                        if tx.send(Ok(line)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(event) => {
                    let _ = tx.send(Ok(event)).await;
                    return;
                }
            }
            if send_bookmark && tx.send(Ok(bookmark(id, cursor, false))).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Ok(streaming_response(Body::from_stream(stream)))
}

/// Counts a watch as open while its task runs.
struct OpenWatch<'a>(&'a Shared);

impl Drop for OpenWatch<'_> {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::Relaxed);
    }
}
