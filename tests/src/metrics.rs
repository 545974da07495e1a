//! The agent's /metrics as a scraper on the node sees it, and promtool's verdict on it.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use crate::lab::in_netns;

/// One scrape: every sample by name, with its labels.
pub struct Scrape {
    pub text: String,
    /// (name, labels, value) of every sample.
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    /// The value of the one series of `name` with these labels (and any others).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).is_some_and(|have| have == v)))
            .map(|(_, _, v)| *v)
            .collect();
        match found[..] {
            [v] => v,
            _ => panic!("{} series {name}{labels:?} in:\n{}", found.len(), self.text),
        }
    }
}

/// GET /metrics from the agent on its default address, inside the node's namespace.
pub fn scrape(node_ns: &str) -> Scrape {
    let raw = in_netns(node_ns, || {
        let mut s = TcpStream::connect("127.0.0.1:10249").expect("the agent serves /metrics on 127.0.0.1:10249");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    });
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP response: {raw}"));
    // The agent sends its text as it writes it: chunked.
    let body =
        if head.to_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    let body = body.as_str();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    assert!(head.to_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    let mut samples = Vec::new();
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        samples.push((name.to_string(), labels, value.parse().unwrap()));
    }
    Scrape { text: body.to_string(), samples }
}

/// An HTTP/1.1 chunked body, joined.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").expect("CRLF after a chunk");
    }
}

/// `promtool check metrics` accepts `text` (format and Prometheus's naming rules).
pub fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool not runnable ({e}): install Debian's `prometheus` package (`cargo xtask setup` does)")
        });
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let problems: Vec<&str> =
        said.lines().filter(|l| !l.trim().is_empty() && !KUBE_PROXYS_OWN_NAMES.contains(&l.trim())).collect();
    assert!(problems.is_empty(), "promtool check metrics: {said}\n{text}");
}

/// Lint findings on names kube-proxy serves as they are: kept, so its dashboards and alerts
/// work unchanged.
const KUBE_PROXYS_OWN_NAMES: &[&str] =
    &[r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total non-counter metrics should not have "_total" suffix"#];
