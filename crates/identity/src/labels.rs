//! Labels with their source, and sorted label sets.

use std::fmt;
use std::sync::Arc;

/// Where a label comes from. Selectors may name a source (`k8s:app`) or accept any (`app`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    K8s,
    Reserved,
    Cidr,
    Container,
    Unspec,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::K8s => "k8s",
            Source::Reserved => "reserved",
            Source::Cidr => "cidr",
            Source::Container => "container",
            Source::Unspec => "unspec",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "k8s" => Some(Source::K8s),
            "reserved" => Some(Source::Reserved),
            "cidr" => Some(Source::Cidr),
            "container" => Some(Source::Container),
            "unspec" => Some(Source::Unspec),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label {
    pub key: Arc<str>,
    pub source: Source,
    pub value: Arc<str>,
}

impl Label {
    pub fn new(source: Source, key: &str, value: &str) -> Self {
        Label {
            key: Arc::from(key),
            source,
            value: Arc::from(value),
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.source.as_str(), self.key)
        } else {
            write!(f, "{}:{}={}", self.source.as_str(), self.key, self.value)
        }
    }
}

/// A set of labels sorted by key (then source); at most one label per (key, source).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSet {
    labels: Vec<Label>,
}

impl LabelSet {
    pub fn new(mut labels: Vec<Label>) -> Self {
        labels.sort_by(|a, b| a.key.cmp(&b.key).then(a.source.cmp(&b.source)));
        labels.dedup_by(|a, b| a.key == b.key && a.source == b.source);
        LabelSet { labels }
    }

    /// The first label with this key, from any source.
    pub fn get(&self, key: &str) -> Option<&Label> {
        let i = self.labels.partition_point(|l| &*l.key < key);
        self.labels.get(i).filter(|l| &*l.key == key)
    }

    /// The label with this key from exactly this source.
    pub fn get_from(&self, source: Source, key: &str) -> Option<&Label> {
        let i = self.labels.partition_point(|l| &*l.key < key);
        self.labels[i..]
            .iter()
            .take_while(|l| &*l.key == key)
            .find(|l| l.source == source)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.labels.iter()
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.labels.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{l}")?;
        }
        Ok(())
    }
}
