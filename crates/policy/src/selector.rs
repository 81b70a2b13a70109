//! Compiled label selectors over identity labels.
//!
//! A selector is a conjunction of requirements on `(source, key)`; a requirement's source is
//! `None` for Cilium's `any:` (a label of that key from any source matches). Kubernetes
//! semantics: `NotIn` and `DoesNotExist` match when the key is absent.

use std::fmt;
use std::sync::Arc;

use palisade_identity::{LabelSet, Source};
use palisade_policy_api::meta::{LabelSelector, SelectorOperator};
use palisade_policy_api::names::split_label_source;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub source: Option<Source>,
    pub key: Arc<str>,
    pub op: Op,
    /// Sorted, deduplicated.
    pub values: Vec<Arc<str>>,
}

impl Requirement {
    pub fn new(source: Option<Source>, key: &str, op: Op, values: &[&str]) -> Self {
        let mut values: Vec<Arc<str>> = values.iter().map(|v| Arc::from(*v)).collect();
        values.sort();
        values.dedup();
        Requirement {
            source,
            key: Arc::from(key),
            op,
            values,
        }
    }

    pub fn equals(source: Option<Source>, key: &str, value: &str) -> Self {
        Self::new(source, key, Op::In, &[value])
    }

    pub fn exists(source: Option<Source>, key: &str) -> Self {
        Self::new(source, key, Op::Exists, &[])
    }

    pub fn matches(&self, labels: &LabelSet) -> bool {
        let label = match self.source {
            Some(s) => labels.get_from(s, &self.key),
            None => labels.get(&self.key),
        };
        match (self.op, label) {
            (Op::In, Some(l)) => self.values.iter().any(|v| **v == *l.value),
            (Op::In, None) => false,
            (Op::NotIn, Some(l)) => !self.values.iter().any(|v| **v == *l.value),
            (Op::NotIn, None) => true,
            (Op::Exists, l) => l.is_some(),
            (Op::DoesNotExist, l) => l.is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let src = self.source.map_or("any", Source::as_str);
        let vals = || {
            self.values
                .iter()
                .map(|v| &**v)
                .collect::<Vec<_>>()
                .join(",")
        };
        match self.op {
            Op::In if self.values.len() == 1 => write!(f, "{src}:{}={}", self.key, vals()),
            Op::In => write!(f, "{src}:{} in ({})", self.key, vals()),
            Op::NotIn => write!(f, "{src}:{} notin ({})", self.key, vals()),
            Op::Exists => write!(f, "{src}:{}", self.key),
            Op::DoesNotExist => write!(f, "!{src}:{}", self.key),
        }
    }
}

/// A conjunction of requirements; empty selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    reqs: Vec<Requirement>,
}

impl Selector {
    pub fn new(mut reqs: Vec<Requirement>) -> Self {
        reqs.sort();
        reqs.dedup();
        Selector { reqs }
    }

    /// Selects every identity.
    pub fn all() -> Self {
        Selector::default()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.reqs
    }

    pub fn is_wildcard(&self) -> bool {
        self.reqs.is_empty()
    }

    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.reqs.iter().all(|r| r.matches(labels))
    }

    /// This selector with more requirements.
    pub fn and(&self, more: &[Requirement]) -> Self {
        let mut reqs = self.reqs.clone();
        reqs.extend_from_slice(more);
        Selector::new(reqs)
    }

    /// Whether some requirement names this key (from the given source, or `any`).
    pub fn has_key(&self, key: &str) -> bool {
        self.reqs.iter().any(|r| &*r.key == key)
    }

    /// The single namespace this selector is confined to, if an `In` requirement with one value
    /// on the namespace label pins it. Used to index selectors by namespace.
    pub fn pinned_value(&self, key: &str) -> Option<&str> {
        self.reqs
            .iter()
            .find(|r| &*r.key == key && r.op == Op::In && r.values.len() == 1)
            .and_then(|r| r.values.first())
            .map(|v| &**v)
    }

    /// From a Kubernetes selector whose keys are plain Kubernetes label keys, all read from
    /// `source` (NetworkPolicy: `k8s`), with `key_prefix` prepended (namespace selectors become
    /// `io.cilium.k8s.namespace.labels.*`).
    pub fn from_k8s(sel: &LabelSelector, source: Option<Source>, key_prefix: &str) -> Self {
        let mut reqs = Vec::new();
        for (k, v) in &sel.match_labels {
            reqs.push(Requirement::equals(source, &format!("{key_prefix}{k}"), v));
        }
        for e in &sel.match_expressions {
            let values: Vec<&str> = e.values.iter().map(String::as_str).collect();
            reqs.push(Requirement::new(
                source,
                &format!("{key_prefix}{}", e.key),
                op(e.operator),
                &values,
            ));
        }
        Selector::new(reqs)
    }

    /// From a Cilium selector: keys may carry a source prefix (`k8s:`, `reserved:`); without one
    /// they match a label from any source.
    pub fn from_cilium(sel: &LabelSelector) -> Self {
        let mut reqs = Vec::new();
        let split = |k: &str| {
            let (src, key) = split_label_source(k);
            (Source::parse(src), key.to_owned())
        };
        for (k, v) in &sel.match_labels {
            let (src, key) = split(k);
            reqs.push(Requirement::equals(src, &key, v));
        }
        for e in &sel.match_expressions {
            let (src, key) = split(&e.key);
            let values: Vec<&str> = e.values.iter().map(String::as_str).collect();
            reqs.push(Requirement::new(src, &key, op(e.operator), &values));
        }
        Selector::new(reqs)
    }
}

fn op(o: SelectorOperator) -> Op {
    match o {
        SelectorOperator::In => Op::In,
        SelectorOperator::NotIn => Op::NotIn,
        SelectorOperator::Exists => Op::Exists,
        SelectorOperator::DoesNotExist => Op::DoesNotExist,
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reqs.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.reqs.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_identity::Label;

    fn labels(pairs: &[(Source, &str, &str)]) -> LabelSet {
        LabelSet::new(pairs.iter().map(|(s, k, v)| Label::new(*s, k, v)).collect())
    }

    #[test]
    fn operators_follow_kubernetes() {
        let l = labels(&[(Source::K8s, "app", "web"), (Source::K8s, "tier", "fe")]);
        assert!(Requirement::new(None, "app", Op::In, &["web", "db"]).matches(&l));
        assert!(!Requirement::new(None, "app", Op::NotIn, &["web"]).matches(&l));
        assert!(Requirement::new(None, "missing", Op::NotIn, &["x"]).matches(&l));
        assert!(Requirement::new(None, "missing", Op::DoesNotExist, &[]).matches(&l));
        assert!(!Requirement::new(None, "missing", Op::Exists, &[]).matches(&l));
        assert!(Requirement::equals(Some(Source::K8s), "app", "web").matches(&l));
        assert!(!Requirement::equals(Some(Source::Reserved), "app", "web").matches(&l));
    }

    #[test]
    fn cilium_prefixes() {
        let sel = LabelSelector {
            match_labels: [
                ("k8s:app".to_owned(), "web".to_owned()),
                ("reserved:host".to_owned(), String::new()),
            ]
            .into_iter()
            .collect(),
            match_expressions: vec![],
        };
        let s = Selector::from_cilium(&sel);
        assert_eq!(s.requirements().len(), 2);
        assert!(s
            .requirements()
            .iter()
            .any(|r| r.source == Some(Source::Reserved) && &*r.key == "host"));
        assert!(s
            .requirements()
            .iter()
            .any(|r| r.source == Some(Source::K8s) && &*r.key == "app"));
    }
}
