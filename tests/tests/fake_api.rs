//! The fake API server (lb_tests::fake_api) against an unmodified kube-rs client and
//! kubectl: what each protocol feature looks like from the client's side. No root needed.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, VersionMatch, WatchEvent, WatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use lb_tests::fake_api::{kube_client, kubeconfig, Config, FakeApiServer};
use serde_json::json;

fn start() -> FakeApiServer {
    let config = Config { bookmark_interval: Duration::from_millis(200) };
    FakeApiServer::bind("127.0.0.1:0".parse().unwrap(), config).expect("the fake API server binds a loopback port")
}

fn service(name: &str, labels: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"ports": [{"name": "http", "port": 80}]},
    }))
    .unwrap()
}

fn api_error(err: kube::Error) -> (u16, String, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason, status.message),
        other => panic!("expected an API error (a Status), got {other:?}"),
    }
}

/// Polls `check` until it holds, failing after `limit`.
async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn names(services: &[Service]) -> Vec<String> {
    services.iter().map(|s| s.name_any()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_describes_the_served_resources() {
    let server = start();
    let client = kube_client(&server.url());
    assert_eq!(client.apiserver_version().await.unwrap().minor, "33");
    let discovery = kube::Discovery::new(client).run().await.unwrap();
    let gvk = |group: &str, kind: &str| kube::api::GroupVersionKind::gvk(group, "v1", kind);
    for (group, kind, plural, namespaced) in [
        ("", "Service", "services", true),
        ("", "Endpoints", "endpoints", true),
        ("", "Node", "nodes", false),
        ("", "Namespace", "namespaces", false),
        ("discovery.k8s.io", "EndpointSlice", "endpointslices", true),
    ] {
        let (resource, capabilities) =
            discovery.resolve_gvk(&gvk(group, kind)).unwrap_or_else(|| panic!("discovery has no {group}/v1 {kind}"));
        assert_eq!(resource.plural, plural);
        assert_eq!(capabilities.scope == kube::discovery::Scope::Namespaced, namespaced, "{kind}");
        for verb in ["list", "watch", "create", "update", "patch", "delete"] {
            assert!(capabilities.supports_operation(verb), "{kind} lacks {verb}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paginated_lists_read_one_snapshot_and_expire_with_compaction() {
    let server = start();
    let api: Api<Service> = Api::namespaced(kube_client(&server.url()), "default");
    for i in 0..25 {
        api.create(&PostParams::default(), &service(&format!("svc-{i:02}"), json!({}))).await.unwrap();
    }
    let first = api.list(&ListParams::default().limit(10)).await.unwrap();
    assert_eq!(names(&first.items), (0..10).map(|i| format!("svc-{i:02}")).collect::<Vec<_>>());
    assert_eq!(first.metadata.remaining_item_count, Some(15));
    let snapshot = first.metadata.resource_version.clone().unwrap();
    assert_eq!(snapshot, server.faults().resource_version().to_string());

    // Changes after the first page do not show in the next ones: they read the snapshot.
    api.delete("svc-15", &DeleteParams::default()).await.unwrap();
    api.create(&PostParams::default(), &service("svc-99", json!({}))).await.unwrap();
    let token = first.metadata.continue_.clone().expect("a continue token");
    let second = api.list(&ListParams::default().limit(10).continue_token(&token)).await.unwrap();
    assert_eq!(names(&second.items), (10..20).map(|i| format!("svc-{i:02}")).collect::<Vec<_>>());
    assert_eq!(second.metadata.resource_version.as_deref(), Some(snapshot.as_str()));
    let last_token = second.metadata.continue_.clone().unwrap();
    let third = api.list(&ListParams::default().limit(10).continue_token(&last_token)).await.unwrap();
    assert_eq!(names(&third.items), (20..25).map(|i| format!("svc-{i:02}")).collect::<Vec<_>>());
    assert_eq!(third.metadata.continue_, None);

    // An exact read at the snapshot still works; once compacted it is 410 Gone, and so is
    // the continue token.
    let exact = ListParams::default().at(&snapshot).matching(VersionMatch::Exact);
    let at_snapshot = api.list(&exact).await.unwrap();
    assert!(names(&at_snapshot.items).contains(&"svc-15".to_string()));
    assert!(!names(&at_snapshot.items).contains(&"svc-99".to_string()));
    server.faults().compact();
    let (code, reason, message) = api_error(api.list(&exact).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (410, "Expired"), "{message}");
    assert!(message.contains(&format!("too old resource version: {snapshot}")), "{message}");
    let (code, reason, _) =
        api_error(api.list(&ListParams::default().limit(10).continue_token(&token)).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (410, "Expired"));

    // A resourceVersion from the future is the real server's 504 ResourceVersionTooLarge
    // (which kube-rs retries for a long time by default: not here).
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.default_retry = false;
    let no_retries: Api<Service> = Api::namespaced(kube::Client::try_from(config).unwrap(), "default");
    let future = ListParams::default().at("999999").matching(VersionMatch::NotOlderThan);
    let (code, reason, _) = api_error(no_retries.list(&future).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (504, "Timeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_and_field_selectors_filter_lists() {
    let server = start();
    let client = kube_client(&server.url());
    let default: Api<Service> = Api::namespaced(client.clone(), "default");
    let other: Api<Service> = Api::namespaced(client.clone(), "other");
    default.create(&PostParams::default(), &service("web", json!({"app": "web", "tier": "front"}))).await.unwrap();
    default.create(&PostParams::default(), &service("db", json!({"app": "db", "tier": "back"}))).await.unwrap();
    default.create(&PostParams::default(), &service("bare", json!({}))).await.unwrap();
    other.create(&PostParams::default(), &service("web", json!({"app": "web"}))).await.unwrap();
    let all: Api<Service> = Api::all(client);
    let cases: &[(&str, &str, &[&str])] = &[
        ("app=web", "", &["default/web", "other/web"]),
        ("app==web", "", &["default/web", "other/web"]),
        ("app!=web", "", &["default/bare", "default/db"]),
        ("tier", "", &["default/db", "default/web"]),
        ("!tier", "", &["default/bare", "other/web"]),
        ("app in (web, db)", "", &["default/db", "default/web", "other/web"]),
        ("app notin (web)", "", &["default/bare", "default/db"]),
        ("app=web,tier=front", "", &["default/web"]),
        ("", "metadata.name=web", &["default/web", "other/web"]),
        ("", "metadata.namespace==other", &["other/web"]),
        ("", "metadata.name!=web,metadata.namespace=default", &["default/bare", "default/db"]),
        ("app=web", "metadata.namespace!=default", &["other/web"]),
    ];
    for (labels, fields, want) in cases {
        let mut params = ListParams::default();
        if !labels.is_empty() {
            params = params.labels(labels);
        }
        if !fields.is_empty() {
            params = params.fields(fields);
        }
        let got: BTreeSet<String> = all
            .list(&params)
            .await
            .unwrap()
            .items
            .iter()
            .map(|s| format!("{}/{}", s.namespace().unwrap(), s.name_any()))
            .collect();
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "labelSelector {labels:?} fieldSelector {fields:?}");
    }
    let (code, _, message) =
        api_error(all.list(&ListParams::default().fields("spec.clusterIP=1.2.3.4")).await.unwrap_err());
    assert_eq!(code, 400);
    assert!(message.contains("field label not supported: spec.clusterIP"), "{message}");
    let (code, _, message) = api_error(all.list(&ListParams::default().labels("app in web")).await.unwrap_err());
    assert_eq!(code, 400);
    assert!(message.contains("app in web"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_stream_changes_bookmarks_and_selector_exits() {
    let server = start();
    let api: Api<Service> = Api::namespaced(kube_client(&server.url()), "default");
    api.create(&PostParams::default(), &service("before", json!({"app": "web"}))).await.unwrap();
    let from = server.faults().resource_version().to_string();
    let params = WatchParams::default().labels("app=web").timeout(3);
    let mut events = api.watch(&params, &from).await.unwrap().boxed();

    api.create(&PostParams::default(), &service("web", json!({"app": "web"}))).await.unwrap();
    api.create(&PostParams::default(), &service("db", json!({"app": "db"}))).await.unwrap();
    let relabel = |app: &str| Patch::Merge(json!({"metadata": {"labels": {"app": app}}}));
    let left = api.patch("web", &PatchParams::default(), &relabel("web2")).await.unwrap(); // stops matching
    let left_rv = left.resource_version().unwrap();
    api.patch("db", &PatchParams::default(), &relabel("web")).await.unwrap(); // starts matching
    api.patch("db", &PatchParams::default(), &Patch::Merge(json!({"spec": {"sessionAffinity": "ClientIP"}})))
        .await
        .unwrap();
    api.delete("db", &DeleteParams::default()).await.unwrap();
    let deleted_rv = server.faults().resource_version().to_string();

    let mut seen = Vec::new();
    let mut bookmark = None;
    while let Some(event) = events.try_next().await.unwrap() {
        match event {
            WatchEvent::Added(s) => seen.push(format!("ADDED {}", s.name_any())),
            WatchEvent::Modified(s) => seen.push(format!("MODIFIED {}", s.name_any())),
            WatchEvent::Deleted(s) => seen.push(format!("DELETED {} {}", s.name_any(), s.resource_version().unwrap())),
            WatchEvent::Bookmark(b) => {
                bookmark = Some(b.metadata.resource_version);
                break;
            }
            WatchEvent::Error(e) => panic!("unexpected watch error {e:?}"),
        }
    }
    // "before" is not replayed (it is at the starting resourceVersion); "web" leaving the
    // selector is a DELETED, "db" entering it an ADDED.
    assert_eq!(
        seen,
        [
            "ADDED web".to_string(),
            format!("DELETED web {left_rv}"),
            "ADDED db".into(),
            "MODIFIED db".into(),
            format!("DELETED db {deleted_rv}"),
        ]
    );
    assert_eq!(
        bookmark.as_deref(),
        Some(deleted_rv.as_str()),
        "bookmarks carry the resourceVersion the watch has reached"
    );

    // Bookmarks were not asked for: none come, and the stream ends at timeoutSeconds.
    let started = Instant::now();
    let quiet = WatchParams::default().timeout(1).disable_bookmarks();
    let events: Vec<_> = api.watch(&quiet, &deleted_rv).await.unwrap().try_collect().await.unwrap();
    assert!(events.is_empty(), "{events:?}");
    assert!(started.elapsed() >= Duration::from_millis(900), "the watch ended after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_with_streaming_lists_gets_its_initial_events_end_bookmark() {
    let server = start();
    let api: Api<Service> = Api::namespaced(kube_client(&server.url()), "default");
    api.create(&PostParams::default(), &service("a", json!({"app": "web"}))).await.unwrap();
    api.create(&PostParams::default(), &service("b", json!({"app": "db"}))).await.unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let config = watcher::Config::default().streaming_lists().labels("app=web");
    let task = tokio::spawn(watcher(api.clone(), config).for_each(move |event| {
        let text = match event {
            Ok(watcher::Event::Init) => "Init".to_string(),
            Ok(watcher::Event::InitApply(s)) => format!("InitApply {}", s.name_any()),
            Ok(watcher::Event::InitDone) => "InitDone".to_string(),
            Ok(watcher::Event::Apply(s)) => format!("Apply {}", s.name_any()),
            Ok(watcher::Event::Delete(s)) => format!("Delete {}", s.name_any()),
            Err(e) => format!("error {e}"),
        };
        seen.lock().unwrap().push(text);
        futures::future::ready(())
    }));
    eventually("the initial events", Duration::from_secs(5), || events.lock().unwrap().len() >= 3).await;
    api.create(&PostParams::default(), &service("c", json!({"app": "web"}))).await.unwrap();
    eventually("the watch after the initial events", Duration::from_secs(5), || events.lock().unwrap().len() >= 4)
        .await;
    assert_eq!(*events.lock().unwrap(), ["Init", "InitApply a", "InitDone", "Apply c"]);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_version_gets_410_and_the_watcher_relists() {
    let server = start();
    let faults = server.faults();
    let api: Api<Service> = Api::namespaced(kube_client(&server.url()), "default");
    api.create(&PostParams::default(), &service("a", json!({}))).await.unwrap();
    let old = faults.resource_version().to_string();
    api.create(&PostParams::default(), &service("b", json!({}))).await.unwrap();
    faults.compact();
    let mut events = api.watch(&WatchParams::default(), &old).await.unwrap().boxed();
    match events.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired"), "{e:?}"),
        other => panic!("expected an ERROR event with 410, got {other:?}"),
    }
    assert!(events.try_next().await.unwrap().is_none(), "the stream ends after the 410");

    // The runtime watcher: a 410 in the middle of a watch makes it list again, and its
    // store converges on what changed meanwhile without losing what did not.
    let (store, writer) = reflector::store::<Service>();
    let inits = Arc::new(Mutex::new(0usize));
    let gone = Arc::new(Mutex::new(0usize));
    let stream = watcher(api.clone(), watcher::Config::default()).default_backoff().reflect(writer);
    let (inits_seen, gone_seen) = (inits.clone(), gone.clone());
    let task = tokio::spawn(stream.for_each(move |event| {
        match event {
            Ok(watcher::Event::Init) => *inits_seen.lock().unwrap() += 1,
            Err(watcher::Error::WatchError(status)) if status.code == 410 => *gone_seen.lock().unwrap() += 1,
            _ => {}
        }
        futures::future::ready(())
    }));
    let cached = |store: &Store<Service>| {
        let mut n: Vec<String> = store.state().iter().map(|s| s.name_any()).collect();
        n.sort();
        n
    };
    eventually("the first list", Duration::from_secs(5), || cached(&store) == ["a", "b"]).await;
    eventually("the watch to open", Duration::from_secs(5), || faults.open_watches() == 1).await;
    let lists_before = faults.lists_served();
    assert_eq!(faults.expire_watches(), 1);
    api.create(&PostParams::default(), &service("c", json!({}))).await.unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();
    eventually("the relist", Duration::from_secs(10), || cached(&store) == ["b", "c"]).await;
    assert_eq!(*gone.lock().unwrap(), 1, "the watcher saw the 410");
    assert_eq!(*inits.lock().unwrap(), 2, "the watcher listed again after the 410");
    assert_eq!(faults.lists_served(), lists_before + 1);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_resume_and_an_outage_is_survived() {
    let server = start();
    let faults = server.faults();
    let client = kube_client(&server.url());
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let slice = |name: &str, addr: &str| -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [addr]}],
            "ports": [{"port": 8080}],
        }))
        .unwrap()
    };
    api.create(&PostParams::default(), &slice("web-1", "10.0.0.1")).await.unwrap();
    let (store, writer) = reflector::store::<EndpointSlice>();
    let inits = Arc::new(Mutex::new(0usize));
    let inits_seen = inits.clone();
    let config = watcher::Config::default().labels("kubernetes.io/service-name=web");
    let task = tokio::spawn(watcher(api.clone(), config).default_backoff().reflect(writer).for_each(move |event| {
        if let Ok(watcher::Event::Init) = event {
            *inits_seen.lock().unwrap() += 1;
        }
        futures::future::ready(())
    }));
    let addresses = |store: &Store<EndpointSlice>| {
        let mut all: Vec<String> =
            store.state().iter().flat_map(|s| s.endpoints.iter().flat_map(|e| e.addresses.clone())).collect();
        all.sort();
        all
    };
    eventually("the first list", Duration::from_secs(5), || addresses(&store) == ["10.0.0.1"]).await;
    eventually("the watch to open", Duration::from_secs(5), || faults.open_watches() == 1).await;

    // A dropped connection: the watcher watches again from where it was, no relist.
    assert_eq!(faults.drop_watches(), 1);
    api.create(&PostParams::default(), &slice("web-2", "10.0.0.2")).await.unwrap();
    eventually("the resumed watch", Duration::from_secs(10), || addresses(&store) == ["10.0.0.1", "10.0.0.2"]).await;
    assert_eq!(*inits.lock().unwrap(), 1, "a dropped watch resumes from its resourceVersion without listing");
    assert_eq!(faults.lists_served(), 1);

    // An outage: connections are refused, the state is kept, and changes made once the
    // server is back reach the watcher.
    let outage = Duration::from_secs(2);
    let began = Instant::now();
    faults.outage(outage).await;
    let refused = tokio::net::TcpStream::connect(server.address()).await;
    assert!(refused.is_err(), "connecting during the outage is refused");
    assert!(api.list(&ListParams::default()).await.is_err(), "the API is unreachable during the outage");
    eventually("the end of the outage", Duration::from_secs(10), || {
        std::net::TcpStream::connect(server.address()).is_ok()
    })
    .await;
    assert!(began.elapsed() >= outage, "the server came back after {:?}", began.elapsed());
    api.patch("web-1", &PatchParams::default(), &Patch::Merge(json!({"endpoints": [{"addresses": ["10.0.0.3"]}]})))
        .await
        .unwrap();
    eventually("the change after the outage", Duration::from_secs(15), || {
        addresses(&store) == ["10.0.0.2", "10.0.0.3"]
    })
    .await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_conflict_and_fail_as_the_real_server() {
    let server = start();
    let api: Api<Service> = Api::namespaced(kube_client(&server.url()), "default");
    let created = api.create(&PostParams::default(), &service("web", json!({"app": "web"}))).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert_eq!(created.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("10.96.0.1"));

    let (code, reason, message) =
        api_error(api.create(&PostParams::default(), &service("web", json!({}))).await.unwrap_err());
    assert_eq!((code, reason.as_str(), message.as_str()), (409, "AlreadyExists", "services \"web\" already exists"));

    // Replace at the current resourceVersion works and bumps the generation; the same
    // resourceVersion again is stale: 409 Conflict.
    let mut changed = created.clone();
    changed.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
    let replaced = api.replace("web", &PostParams::default(), &changed).await.unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    assert_ne!(replaced.resource_version(), created.resource_version());
    let (code, reason, message) = api_error(api.replace("web", &PostParams::default(), &changed).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(message.contains("the object has been modified"), "{message}");

    // A merge patch that changes nothing writes nothing (no new resourceVersion).
    let same = api
        .patch("web", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})))
        .await
        .unwrap();
    assert_eq!(same.resource_version(), replaced.resource_version());
    let apply = Patch::Apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}));
    let (code, reason, message) = api_error(api.patch("web", &PatchParams::apply("test"), &apply).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (415, "UnsupportedMediaType"));
    assert!(message.contains("application/apply-patch+yaml"), "{message}");

    // Status is a subresource: a write to the Service leaves it, one to .../status sets it.
    let lb = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.168.60.5"}]}}});
    let ignored = api.patch("web", &PatchParams::default(), &Patch::Merge(lb.clone())).await.unwrap();
    assert_eq!(ignored.status.and_then(|s| s.load_balancer).and_then(|l| l.ingress), None);
    let written = api.patch_status("web", &PatchParams::default(), &Patch::Merge(lb)).await.unwrap();
    let ingress = written.status.and_then(|s| s.load_balancer).and_then(|l| l.ingress).unwrap();
    assert_eq!(ingress[0].ip.as_deref(), Some("192.168.60.5"));

    let stale = DeleteParams {
        preconditions: Some(kube::api::Preconditions { resource_version: created.resource_version(), uid: None }),
        ..DeleteParams::default()
    };
    let (code, reason, _) = api_error(api.delete("web", &stale).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    let deleted = api.delete("web", &DeleteParams::default()).await.unwrap();
    assert_eq!(deleted.left().map(|s| s.name_any()).as_deref(), Some("web"));
    let (code, reason, message) = api_error(api.get("web").await.unwrap_err());
    assert_eq!((code, reason.as_str(), message.as_str()), (404, "NotFound", "services \"web\" not found"));

    // Slow answers on demand.
    server.faults().set_delay(Duration::from_millis(300));
    let started = Instant::now();
    api.list(&ListParams::default()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300), "answered in {:?}", started.elapsed());
}

/// The binary, with kubectl pointed at it through a kubeconfig file.
struct Process {
    child: std::process::Child,
    url: String,
    kubeconfig: tempfile_path::Path,
}

mod tempfile_path {
    /// A file removed on drop.
    pub struct Path(pub std::path::PathBuf);
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_binary() -> Process {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-apiserver"))
        .args(["--listen", "127.0.0.1:0", "--bookmark-interval-ms", "200"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("fake-apiserver starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "first line: {line:?}");
    let path = std::env::temp_dir().join(format!("fake-api-kubeconfig-{}", child.id()));
    std::fs::write(&path, kubeconfig(&url)).unwrap();
    Process { child, url, kubeconfig: tempfile_path::Path(path) }
}

fn kubectl(process: &Process, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&process.kubeconfig.0)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is installed");
    child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "kubectl {args:?} failed: {stdout}{stderr}");
    stdout.into_owned()
}

const WEB_YAML: &str =
    "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n  labels: {app: web}\n\
                        spec:\n  clusterIP: 10.96.1.10\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_creates_lists_labels_watches_and_deletes() {
    let process = spawn_binary();
    // Client-side validation needs OpenAPI documents the fake does not serve.
    assert_eq!(
        kubectl(&process, &["create", "--validate=false", "-f", "-"], Some(WEB_YAML)).trim(),
        "service/web created"
    );

    let listed: serde_json::Value =
        serde_json::from_str(&kubectl(&process, &["get", "svc", "-A", "-o", "json"], None)).unwrap();
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["metadata"]["namespace"], "shop");
    assert_eq!(items[0]["spec"]["clusterIP"], "10.96.1.10");
    assert_eq!(
        items[0]["spec"]["ports"][0],
        json!({"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"})
    );

    // A bounded watch in the background sees the label change and the deletion.
    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&process.kubeconfig.0)
        .args(["get", "svc", "-n", "shop", "--watch", "--output-watch-events", "--request-timeout=20s"])
        .args(["-o", "jsonpath={.type} {.object.metadata.name} {.object.metadata.labels.tier}{\"\\n\"}"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let api: Api<Service> = Api::namespaced(kube_client(&process.url), "shop");
    // The ADDED line comes from kubectl's list; the changes below from its watch, once open.
    let control = kube_client(&process.url);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let watches = control
            .request_text(axum::http::Request::get(format!("{}/fake/watches", process.url)).body(Vec::new()).unwrap())
            .await
            .unwrap();
        if serde_json::from_str::<serde_json::Value>(&watches).unwrap()["open"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "kubectl's watch did not open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        kubectl(&process, &["label", "-n", "shop", "svc", "web", "tier=front"], None).trim(),
        "service/web labeled"
    );
    assert_eq!(api.get("web").await.unwrap().labels().get("tier").map(String::as_str), Some("front"));
    assert_eq!(kubectl(&process, &["delete", "-n", "shop", "svc", "web"], None).trim(), "service \"web\" deleted");
    assert_eq!(api_error(api.get("web").await.unwrap_err()).0, 404);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = watch.kill();
    let output = watch.wait_with_output().unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&output.stdout).lines().map(|l| l.trim().to_string()).collect();
    assert_eq!(
        lines,
        ["ADDED web", "MODIFIED web front", "DELETED web front"],
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The control endpoints of the binary.
    let client = kube_client(&process.url);
    let post = |path: &str| axum::http::Request::post(format!("{}{path}", process.url)).body(Vec::new()).unwrap();
    let rv: serde_json::Value = serde_json::from_str(
        &client
            .request_text(
                axum::http::Request::get(format!("{}/fake/resourceVersion", process.url)).body(Vec::new()).unwrap(),
            )
            .await
            .unwrap(),
    )
    .unwrap();
    let compacted: serde_json::Value =
        serde_json::from_str(&client.request_text(post("/fake/compact")).await.unwrap()).unwrap();
    assert_eq!(compacted["compactedTo"], rv["resourceVersion"]);
    let old = ListParams::default().at("5").matching(VersionMatch::Exact);
    assert_eq!(api_error(api.list(&old).await.unwrap_err()).0, 410);
    client.request_text(post("/fake/outage?ms=1500")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(api.list(&ListParams::default()).await.is_err(), "the binary refuses connections during the outage");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(api.list(&ListParams::default()).await.is_ok(), "the binary serves again after the outage");
}
