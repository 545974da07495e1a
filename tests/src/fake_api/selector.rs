//! Label and field selectors with the API server's syntax and matching rules.

use std::collections::BTreeSet;

use serde_json::Value;

/// One requirement of a label selector. `!=` and `notin` also match objects without the
/// label, as on the real server.
#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed `labelSelector`: every requirement must hold (comma = AND).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<Requirement>);

/// A parsed `fieldSelector` over the fields every resource supports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(Field, bool, String)>);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Field {
    Name,
    Namespace,
}

/// Splits on commas outside parentheses (`a in (x,y),b` is two requirements).
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 316
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value.len() <= 63 && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_set(key: &str, rest: &str, requirement: &str) -> Result<BTreeSet<String>, String> {
    let inner = rest.trim().strip_prefix('(').and_then(|r| r.strip_suffix(')')).ok_or_else(|| {
        format!("unable to parse requirement {requirement:?}: expected a parenthesized set of values after {key:?}")
    })?;
    let values: BTreeSet<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    if let Some(bad) = values.iter().find(|v| !valid_value(v)) {
        return Err(format!("unable to parse requirement {requirement:?}: invalid label value {bad:?}"));
    }
    Ok(values)
}

impl LabelSelector {
    /// Parses the query parameter; the error text is what the 400 answer says.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if text.trim().is_empty() {
            return Ok(LabelSelector(requirements));
        }
        for part in split_top_level(text) {
            let term = part.trim();
            let requirement = if let Some(key) = term.strip_prefix('!') {
                Requirement::DoesNotExist(key.trim().to_string())
            } else if let Some((key, value)) = term.split_once("!=") {
                Requirement::NotEquals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement::Equals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, rest)) = term.split_once(" notin ").or_else(|| term.split_once(" notin(")) {
                let rest = if term.contains(" notin(") { format!("({rest}") } else { rest.to_string() };
                Requirement::NotIn(key.trim().to_string(), parse_set(key, &rest, term)?)
            } else if let Some((key, rest)) = term.split_once(" in ").or_else(|| term.split_once(" in(")) {
                let rest = if term.contains(" in(") { format!("({rest}") } else { rest.to_string() };
                Requirement::In(key.trim().to_string(), parse_set(key, &rest, term)?)
            } else {
                Requirement::Exists(term.to_string())
            };
            let (key, value) = match &requirement {
                Requirement::Equals(k, v) | Requirement::NotEquals(k, v) => (k, Some(v)),
                Requirement::In(k, _)
                | Requirement::NotIn(k, _)
                | Requirement::Exists(k)
                | Requirement::DoesNotExist(k) => (k, None),
            };
            if !valid_key(key) {
                return Err(format!("unable to parse requirement {term:?}: invalid label key {key:?}"));
            }
            if let Some(value) = value.filter(|v| !valid_value(v)) {
                return Err(format!("unable to parse requirement {term:?}: invalid label value {value:?}"));
            }
            requirements.push(requirement);
        }
        Ok(LabelSelector(requirements))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|requirement| match requirement {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, set) => label(k).is_some_and(|l| set.contains(l)),
            Requirement::NotIn(k, set) => !label(k).is_some_and(|l| set.contains(l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::DoesNotExist(k) => label(k).is_none(),
        })
    }
}

impl FieldSelector {
    /// Parses the query parameter; only `metadata.name` and `metadata.namespace` are
    /// supported (the fields every resource has), anything else is refused as the real
    /// server refuses a field it does not index.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        if text.trim().is_empty() {
            return Ok(FieldSelector(terms));
        }
        for part in text.split(',') {
            let term = part.trim();
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: '{text}'; can't understand '{term}'"));
            };
            let field = match field.trim() {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => return Err(format!("field label not supported: {other}")),
            };
            terms.push((field, equal, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let pointer = match field {
                Field::Name => "/metadata/name",
                Field::Namespace => "/metadata/namespace",
            };
            let actual = object.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "prod", "labels": labels}})
    }

    #[test]
    fn label_operators_match_as_the_api_server() {
        let obj = labelled(json!({"app": "web", "tier": "front"}));
        let cases = [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app in (db, web)", true),
            ("app in (db)", false),
            ("missing in (db)", false),
            ("app notin (db)", true),
            ("app notin (web,db)", false),
            ("missing notin (db)", true),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("app in (web,db),!missing", true),
            ("", true),
        ];
        for (selector, want) in cases {
            assert_eq!(LabelSelector::parse(selector).unwrap().matches(&obj), want, "{selector}");
        }
    }

    #[test]
    fn bad_label_selectors_are_refused_with_the_term() {
        let err = LabelSelector::parse("app in web").unwrap_err();
        assert!(err.contains("app in web"), "{err}");
        assert!(LabelSelector::parse("a b=c").unwrap_err().contains("invalid label key"));
    }

    #[test]
    fn field_selectors_on_name_and_namespace() {
        let obj = labelled(json!({}));
        assert!(FieldSelector::parse("metadata.name=web").unwrap().matches(&obj));
        assert!(FieldSelector::parse("metadata.name==web,metadata.namespace=prod").unwrap().matches(&obj));
        assert!(!FieldSelector::parse("metadata.namespace!=prod").unwrap().matches(&obj));
        assert_eq!(
            FieldSelector::parse("spec.clusterIP=1.2.3.4").unwrap_err(),
            "field label not supported: spec.clusterIP"
        );
    }
}
