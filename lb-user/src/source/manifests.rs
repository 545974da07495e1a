//! The standalone source: Service, EndpointSlice (discovery.k8s.io/v1), legacy Endpoints
//! (v1) and Node (v1) objects from manifest files, multi-document YAML as `kubectl apply -f` takes it.
//! An invalid object is reported (file, object, field) and skipped; the rest are used.
use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
};

use k8s_openapi::serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;

use super::Objects;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: document {doc}: not YAML: {source}", path.display())]
    Yaml {
        path: PathBuf,
        doc: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{}: document {doc}: {object}: field {field}: {source}", path.display())]
    Object {
        path: PathBuf,
        doc: usize,
        /// `Kind namespace/name`, as far as it could be read.
        object: String,
        /// Path of the offending field, e.g. `spec.ports[0].port`.
        field: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{}: document {doc}: {object}: field {field}: {problem}", path.display())]
    Field { path: PathBuf, doc: usize, object: String, field: &'static str, problem: String },
}

/// Problems found while reading; the objects that were valid are in [`Objects`].
#[derive(Debug, Default)]
pub struct Report {
    pub errors: Vec<Error>,
    /// The manifest path itself could not be read: the objects are only what was read
    /// before (nothing, at first), not the source's whole truth.
    pub incomplete: bool,
    /// Documents of kinds this source does not use (Deployments, ConfigMaps, ...).
    pub ignored: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.errors {
            writeln!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads a manifest file, or every `.yaml`/`.yml`/`.json` file of a directory (sorted,
/// recursively, hidden names skipped), into objects.
pub fn read_manifests(path: &Path) -> (Objects, Report) {
    ManifestCache::default().read(path)
}

/// Re-reads manifests, keeping the last good objects of a file that cannot be read or is
/// not valid YAML right now (say, half-written by an editor), so that a bad edit never
/// withdraws the Services the file held before.
#[derive(Debug, Default)]
pub struct ManifestCache {
    last_good: BTreeMap<PathBuf, Objects>,
}

/// How often a read is started again when a kubelet-written directory changed under it.
const READ_ATTEMPTS: usize = 5;

impl ManifestCache {
    pub fn read(&mut self, path: &Path) -> (Objects, Report) {
        let mut report = Report::default();
        let mut attempt = 0;
        let files = loop {
            attempt += 1;
            match read_all(path) {
                Ok(Snapshot { files, links }) => {
                    // A `..data` swapped while we read: start over, so that every file
                    // comes from one version.
                    let stable = links.iter().all(|(link, target)| fs::read_link(link).ok().as_ref() == Some(target));
                    if stable || attempt == READ_ATTEMPTS {
                        break files;
                    }
                }
                Err(e) => {
                    report.errors.push(e);
                    report.incomplete = true;
                    // The whole set is unreadable: serve what was read last.
                    return (self.merged(), report);
                }
            }
        };
        self.last_good.retain(|p, _| files.iter().any(|(f, _)| f == p));
        for (file, text) in files {
            let mut objects = Objects::default();
            let errors_before = report.errors.len();
            match text {
                Ok(text) => parse_into(&file, &text, &mut objects, &mut report),
                Err(source) => report.errors.push(Error::Read { path: file.clone(), source }),
            }
            let unreadable =
                report.errors[errors_before..].iter().any(|e| matches!(e, Error::Read { .. } | Error::Yaml { .. }));
            if !unreadable || !self.last_good.contains_key(&file) {
                self.last_good.insert(file, objects);
            }
        }
        (self.merged(), report)
    }

    fn merged(&self) -> Objects {
        let mut all = Objects::default();
        for o in self.last_good.values() {
            all.services.extend(o.services.iter().cloned());
            all.slices.extend(o.slices.iter().cloned());
            all.endpoints.extend(o.endpoints.iter().cloned());
            all.nodes.extend(o.nodes.iter().cloned());
        }
        all
    }
}

/// One read of the manifest path: each file's text (or why not) under the name it is
/// reported by, and the kubelet `..data` links followed, with their targets.
struct Snapshot {
    files: Vec<(PathBuf, std::io::Result<String>)>,
    links: Vec<(PathBuf, PathBuf)>,
}

/// Reads every manifest file under `path` once.
fn read_all(path: &Path) -> Result<Snapshot, Error> {
    let mut found = Vec::new();
    let mut links = Vec::new();
    let meta = fs::metadata(path).map_err(|source| Error::Read { path: path.into(), source })?;
    if meta.is_file() {
        found.push((path.to_path_buf(), path.to_path_buf()));
    } else {
        collect_dir(path, path, &mut found, &mut links, 0)?;
    }
    let files = found.into_iter().map(|(shown, real)| (shown, fs::read_to_string(real))).collect();
    Ok(Snapshot { files, links })
}

/// Deeper than this is a symlink loop, not a manifest tree.
const MAX_DEPTH: usize = 16;

/// Manifest files under the directory `real`, named as under `shown` (they differ inside a
/// kubelet snapshot).
///
/// A directory that holds `..data` is a ConfigMap, Secret or projected volume as the
/// kubelet writes it: the files are in a timestamped directory that `..data` links to,
/// and the visible names link into `..data`. The kubelet swaps `..data` atomically, but
/// creates and removes the visible links for added and removed keys only after the swap,
/// so the set of visible names can lag. Reading the snapshot `..data` points to, resolved
/// once, gives every file once and all from the same version; the visible links are not
/// read again.
fn collect_dir(
    shown: &Path,
    real: &Path,
    out: &mut Vec<(PathBuf, PathBuf)>,
    links: &mut Vec<(PathBuf, PathBuf)>,
    depth: usize,
) -> Result<(), Error> {
    let dir_err = |source| Error::Read { path: shown.into(), source };
    if depth > MAX_DEPTH {
        return Err(dir_err(std::io::Error::other("directories nested too deep (a symlink loop?)")));
    }
    let data = real.join("..data");
    if let Ok(target) = fs::read_link(&data) {
        links.push((data, target.clone()));
        return collect_dir(shown, &real.join(target), out, links, depth + 1);
    }
    let mut names: Vec<std::ffi::OsString> =
        fs::read_dir(real).map_err(dir_err)?.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
    names.sort();
    for name in names {
        // Hidden names are not manifests: editors' temporaries, the kubelet's `..` entries.
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let (shown, real) = (shown.join(&name), real.join(&name));
        if fs::metadata(&real).is_ok_and(|m| m.is_dir()) {
            collect_dir(&shown, &real, out, links, depth + 1)?;
        } else if matches!(real.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push((shown, real));
        }
    }
    Ok(())
}

/// Parses one file's text (multi-document YAML or JSON; `kind: List` is unpacked).
pub fn parse_into(path: &Path, text: &str, objects: &mut Objects, report: &mut Report) {
    for (doc, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = doc + 1;
        let value = match Value::deserialize(de) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(source) => {
                report.errors.push(Error::Yaml { path: path.into(), doc, source });
                // A syntax error leaves the rest of the stream unreadable.
                return;
            }
        };
        add_value(path, doc, value, objects, report);
    }
}

fn add_value(path: &Path, doc: usize, value: Value, objects: &mut Objects, report: &mut Report) {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
    // Nodes are cluster-scoped: no namespace.
    let namespaced = kind != "Node";
    let object = describe(&kind, namespaced, &value);
    let field_error =
        |field, problem: String| Error::Field { path: path.into(), doc, object: object.clone(), field, problem };
    match (api_version.as_str(), kind.as_str()) {
        (_, "List") => match value.get("items").and_then(Value::as_sequence) {
            Some(items) => {
                for item in items.clone() {
                    add_value(path, doc, item, objects, report);
                }
            }
            None => report.errors.push(field_error("items", "a List needs a sequence of items".into())),
        },
        ("v1", "Service") => typed(path, doc, &object, namespaced, value, &mut objects.services, report),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            typed(path, doc, &object, namespaced, value, &mut objects.slices, report)
        }
        ("v1", "Endpoints") => typed(path, doc, &object, namespaced, value, &mut objects.endpoints, report),
        ("v1", "Node") => typed(path, doc, &object, namespaced, value, &mut objects.nodes, report),
        (_, "Service" | "EndpointSlice" | "Endpoints" | "Node") => report.errors.push(field_error(
            "apiVersion",
            format!("{api_version:?} is not supported for {kind} (use v1, or discovery.k8s.io/v1 for EndpointSlice)"),
        )),
        (_, "") => report.errors.push(field_error("kind", "missing".into())),
        _ => report.ignored += 1,
    }
}

fn typed<T: DeserializeOwned + kube::ResourceExt>(
    path: &Path,
    doc: usize,
    object: &str,
    namespaced: bool,
    value: Value,
    into: &mut Vec<T>,
    report: &mut Report,
) {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(mut obj) => {
            if obj.meta().name.as_deref().unwrap_or("").is_empty() {
                report.errors.push(Error::Field {
                    path: path.into(),
                    doc,
                    object: object.into(),
                    field: "metadata.name",
                    problem: "missing".into(),
                });
                return;
            }
            // Like kubectl apply without -n: objects without a namespace go to "default".
            if namespaced && obj.meta().namespace.is_none() {
                obj.meta_mut().namespace = Some("default".into());
            }
            into.push(obj);
        }
        Err(e) => report.errors.push(Error::Object {
            path: path.into(),
            doc,
            object: object.into(),
            field: e.path().to_string(),
            source: e.into_inner(),
        }),
    }
}

fn describe(kind: &str, namespaced: bool, value: &Value) -> String {
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("<unnamed>");
    let kind = if kind.is_empty() { "object" } else { kind };
    if !namespaced {
        return format!("{kind} {name}");
    }
    let ns = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or("default");
    format!("{kind} {ns}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Objects, Report) {
        let mut o = Objects::default();
        let mut r = Report::default();
        parse_into(Path::new("test.yaml"), text, &mut o, &mut r);
        (o, r)
    }

    #[test]
    fn multi_document_with_all_kinds() {
        let (o, r) = parse(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.5]}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: legacy}
subsets: [{addresses: [{ip: 10.244.1.6}], ports: [{port: 8080}]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
"#,
        );
        assert!(r.errors.is_empty(), "{r}");
        assert_eq!((o.services.len(), o.slices.len(), o.endpoints.len(), r.ignored), (1, 1, 1, 1));
        assert_eq!(o.services[0].metadata.namespace.as_deref(), Some("default"));
        assert_eq!(o.slices[0].metadata.namespace.as_deref(), Some("shop"));
    }

    #[test]
    fn invalid_object_is_reported_with_file_object_and_field_and_others_kept() {
        let (o, r) = parse(
            r#"
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: shop}
spec:
  ports:
  - port: "eighty"
---
apiVersion: v1
kind: Service
metadata: {name: good}
spec: {ports: [{port: 80}]}
"#,
        );
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.services[0].metadata.name.as_deref(), Some("good"));
        let msg = r.errors[0].to_string();
        assert_eq!(msg, "test.yaml: document 1: Service shop/bad: field spec.ports[0].port: invalid type: string \"eighty\", expected i32");
    }

    #[test]
    fn missing_name_and_wrong_api_version_are_errors() {
        let (o, r) = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {}\n---\napiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: x}\n",
        );
        assert!(o.services.is_empty() && o.slices.is_empty());
        assert_eq!(r.errors.len(), 2);
        assert!(r.errors[0].to_string().contains("field metadata.name: missing"), "{}", r.errors[0]);
        assert!(r.errors[1].to_string().contains("EndpointSlice default/x: field apiVersion"), "{}", r.errors[1]);
    }

    #[test]
    fn list_kind_is_unpacked() {
        let (o, r) = parse(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: b}\n",
        );
        assert!(r.errors.is_empty(), "{r}");
        assert_eq!(o.services.len(), 2);
    }

    #[test]
    fn a_file_that_turns_bad_keeps_serving_its_last_good_objects() {
        let dir = std::env::temp_dir().join(format!("lb-source-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let svc = |name: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: 80}}]}}\n")
        };
        fs::write(dir.join("a.yaml"), svc("a")).unwrap();
        fs::write(dir.join("b.yaml"), svc("b")).unwrap();
        let mut cache = ManifestCache::default();
        let names = |o: &Objects| o.services.iter().map(|s| s.metadata.name.clone().unwrap()).collect::<Vec<_>>();
        assert_eq!(names(&cache.read(&dir).0), ["a", "b"]);
        fs::write(dir.join("a.yaml"), "kind: Service\nmetadata: [broken").unwrap();
        let (objects, report) = cache.read(&dir);
        assert_eq!(names(&objects), ["a", "b"], "a's last good Service is still served");
        assert!(report.errors[0].to_string().contains("a.yaml: document 1: not YAML"), "{report}");
        fs::remove_file(dir.join("b.yaml")).unwrap();
        assert_eq!(names(&cache.read(&dir).0), ["a"], "a deleted file withdraws its objects");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_configmap_volume_is_read_once_per_file_and_a_swap_is_never_seen_half_done() {
        use crate::source::watch::tests::ConfigMapDir;
        let svc = |name: &str, port: u16| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: {port}}}]}}\n")
        };
        let seen = |o: &Objects| {
            o.services
                .iter()
                .map(|s| {
                    format!(
                        "{}:{}",
                        s.metadata.name.clone().unwrap(),
                        s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port
                    )
                })
                .collect::<Vec<_>>()
        };
        let (a1, b1) = (svc("a", 1), svc("b", 1));
        let mut dir = ConfigMapDir::new("lb-configmap-test", &[("a.yaml", &a1), ("b.yaml", &b1)]);
        let mut cache = ManifestCache::default();
        let (objects, report) = cache.read(&dir.path);
        assert!(report.errors.is_empty(), "{report}");
        assert_eq!(seen(&objects), ["a:1", "b:1"], "each file once, though three paths lead to it");
        // Version 2 changes a, drops b and adds c; a read between any two of the kubelet's
        // steps sees version 1 or version 2 whole.
        let (a2, c2) = (svc("a", 2), svc("c", 2));
        let mut reads = Vec::new();
        let path = dir.path.clone();
        dir.update(&[("a.yaml", &a2), ("c.yaml", &c2)], |step| {
            let (objects, report) = cache.read(&path);
            assert!(report.errors.is_empty(), "{step}: {report}");
            reads.push((step.to_string(), seen(&objects)));
        });
        let v1 = vec!["a:1".to_string(), "b:1".to_string()];
        let v2 = vec!["a:2".to_string(), "c:2".to_string()];
        let want = [
            ("snapshot written", &v1),
            ("..data swapped", &v2),
            ("new keys linked", &v2),
            ("dropped keys unlinked", &v2),
        ];
        assert_eq!(reads, want.map(|(s, v)| (s.to_string(), v.clone())));
        let (objects, report) = cache.read(&dir.path);
        assert!(report.errors.is_empty(), "{report}");
        assert_eq!(seen(&objects), v2);
        // A bad version is reported under the name the pod sees, and a's last good
        // objects stay served.
        dir.update(&[("a.yaml", "kind: Service\nmetadata: [broken"), ("c.yaml", &c2)], |_| {});
        let (objects, report) = cache.read(&dir.path);
        assert_eq!(seen(&objects), v2);
        let shown = format!("{}: document 1: not YAML", dir.path.join("a.yaml").display());
        assert!(report.errors[0].to_string().starts_with(&shown), "{report}");
    }

    #[test]
    fn a_missing_manifest_path_is_an_incomplete_read() {
        let (objects, report) = ManifestCache::default().read(Path::new("/nonexistent/manifests"));
        assert!(report.incomplete && objects.services.is_empty());
        assert!(report.errors[0].to_string().starts_with("/nonexistent/manifests: "), "{report}");
    }

    #[test]
    fn yaml_syntax_error_names_file_and_document() {
        let (_, r) = parse("apiVersion: v1\nkind: Service\n---\nfoo: [unclosed\n");
        assert!(r.errors.iter().any(|e| e.to_string().starts_with("test.yaml: document 2: not YAML")), "{r}");
    }
}
