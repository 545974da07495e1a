//! The standalone source: Service, EndpointSlice (discovery.k8s.io/v1) and legacy
//! Endpoints (v1) from manifest files, multi-document YAML as `kubectl apply -f` takes it.
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
/// recursively), into objects.
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

impl ManifestCache {
    pub fn read(&mut self, path: &Path) -> (Objects, Report) {
        let mut report = Report::default();
        let mut files = Vec::new();
        if let Err(e) = collect_files(path, &mut files) {
            report.errors.push(e);
            report.incomplete = true;
            // The whole set is unreadable: serve what was read last.
            return (self.merged(), report);
        }
        self.last_good.retain(|p, _| files.contains(p));
        for file in files {
            let mut objects = Objects::default();
            let errors_before = report.errors.len();
            match fs::read_to_string(&file) {
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
        }
        all
    }
}

/// Paths, sizes and modification times of the manifest files: changes when they do.
pub fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut files = Vec::new();
    let _ = collect_files(path, &mut files);
    files
        .into_iter()
        .map(|f| {
            let meta = fs::metadata(&f).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            (f, len, meta.and_then(|m| m.modified().ok()))
        })
        .collect()
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|source| Error::Read { path: path.into(), source })?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(path)
        .map_err(|source| Error::Read { path: path.into(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect_files(&entry, out)?;
        } else if matches!(entry.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(entry);
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
    let object = describe(&kind, &value);
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
        ("v1", "Service") => typed(path, doc, &object, value, &mut objects.services, report),
        ("discovery.k8s.io/v1", "EndpointSlice") => typed(path, doc, &object, value, &mut objects.slices, report),
        ("v1", "Endpoints") => typed(path, doc, &object, value, &mut objects.endpoints, report),
        (_, "Service" | "EndpointSlice" | "Endpoints") => report.errors.push(field_error(
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
            if obj.meta().namespace.is_none() {
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

fn describe(kind: &str, value: &Value) -> String {
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("<unnamed>");
    let ns = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or("default");
    let kind = if kind.is_empty() { "object" } else { kind };
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
