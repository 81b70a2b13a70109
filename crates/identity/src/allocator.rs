//! Allocation of identities to label sets, reference counted so an identity is freed when its
//! last endpoint goes and the number can be reused.

use std::collections::HashMap;
use std::sync::Arc;

use crate::{reserved_labels, Identity, LabelSet, CLUSTER_MAX, CLUSTER_MIN, LOCAL_MAX, LOCAL_MIN};

/// Which range an identity is allocated from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Pods: shared by the whole cluster.
    Cluster,
    /// CIDR prefixes: local to the node.
    Local,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("identity range exhausted ({0:?} scope)")]
    Exhausted(Scope),
}

#[derive(Debug)]
struct Entry {
    labels: Arc<LabelSet>,
    refs: u32,
}

/// Maps label sets to identities and back. Deterministic: the same sequence of allocations gives
/// the same numbers, lowest free number first.
#[derive(Debug)]
pub struct Allocator {
    by_labels: HashMap<Arc<LabelSet>, Identity>,
    by_id: HashMap<Identity, Entry>,
    next_cluster: Identity,
    next_local: Identity,
    free_cluster: std::collections::BTreeSet<Identity>,
    free_local: std::collections::BTreeSet<Identity>,
    /// Label keys and values shared by every stored set (most repeat across identities).
    strings: std::collections::HashSet<Arc<str>>,
}

impl Default for Allocator {
    fn default() -> Self {
        Self::new()
    }
}

impl Allocator {
    /// An allocator that knows the reserved identities.
    pub fn new() -> Self {
        let mut a = Allocator {
            by_labels: HashMap::new(),
            by_id: HashMap::new(),
            next_cluster: CLUSTER_MIN,
            next_local: LOCAL_MIN,
            free_cluster: std::collections::BTreeSet::new(),
            free_local: std::collections::BTreeSet::new(),
            strings: std::collections::HashSet::new(),
        };
        for (id, _) in crate::reserved::ALL {
            if let Some(labels) = reserved_labels(*id) {
                let labels = Arc::new(labels);
                a.by_labels.insert(labels.clone(), *id);
                a.by_id.insert(
                    *id,
                    Entry {
                        labels,
                        refs: u32::MAX,
                    },
                );
            }
        }
        a
    }

    /// Takes a reference on the identity of `labels`, allocating one if needed.
    /// Returns the identity and whether it was newly allocated.
    pub fn acquire(
        &mut self,
        labels: &LabelSet,
        scope: Scope,
    ) -> Result<(Identity, bool), AllocError> {
        if let Some(&id) = self.by_labels.get(labels) {
            if let Some(e) = self.by_id.get_mut(&id) {
                e.refs = e.refs.saturating_add(1);
            }
            return Ok((id, false));
        }
        let id = match scope {
            Scope::Cluster => take(&mut self.free_cluster, &mut self.next_cluster, CLUSTER_MAX),
            Scope::Local => take(&mut self.free_local, &mut self.next_local, LOCAL_MAX),
        }
        .ok_or(AllocError::Exhausted(scope))?;
        let labels = Arc::new(self.interned(labels));
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(id, Entry { labels, refs: 1 });
        Ok((id, true))
    }

    /// Drops a reference; returns true when the identity was freed.
    pub fn release(&mut self, id: Identity) -> bool {
        let Some(e) = self.by_id.get_mut(&id) else {
            return false;
        };
        if e.refs == u32::MAX {
            return false; // reserved
        }
        e.refs -= 1;
        if e.refs > 0 {
            return false;
        }
        if let Some(e) = self.by_id.remove(&id) {
            self.by_labels.remove(&e.labels);
            let strings: Vec<Arc<str>> = e
                .labels
                .iter()
                .flat_map(|l| [l.key.clone(), l.value.clone()])
                .collect();
            drop(e);
            for s in strings {
                // Held only by the interner and this local copy: nobody uses it any more.
                if Arc::strong_count(&s) == 2 {
                    self.strings.remove(&s);
                }
            }
        }
        if id >= LOCAL_MIN {
            self.free_local.insert(id);
        } else {
            self.free_cluster.insert(id);
        }
        true
    }

    /// A copy of `labels` whose strings are the interner's.
    fn interned(&mut self, labels: &LabelSet) -> LabelSet {
        let mut out = Vec::with_capacity(labels.len());
        for l in labels.iter() {
            let key = self.intern(&l.key);
            let value = self.intern(&l.value);
            out.push(crate::Label {
                key,
                source: l.source,
                value,
            });
        }
        LabelSet::new(out)
    }

    fn intern(&mut self, s: &Arc<str>) -> Arc<str> {
        if let Some(x) = self.strings.get(s) {
            return x.clone();
        }
        self.strings.insert(s.clone());
        s.clone()
    }

    pub fn labels(&self, id: Identity) -> Option<&Arc<LabelSet>> {
        self.by_id.get(&id).map(|e| &e.labels)
    }

    pub fn lookup(&self, labels: &LabelSet) -> Option<Identity> {
        self.by_labels.get(labels).copied()
    }

    /// Every live identity, reserved ones included, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (Identity, &Arc<LabelSet>)> {
        self.by_id.iter().map(|(id, e)| (*id, &e.labels))
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

fn take(
    free: &mut std::collections::BTreeSet<Identity>,
    next: &mut Identity,
    max: Identity,
) -> Option<Identity> {
    if let Some(id) = free.pop_first() {
        return Some(id);
    }
    if *next > max {
        return None;
    }
    let id = *next;
    *next += 1;
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Label, Source};

    fn set(v: &str) -> LabelSet {
        LabelSet::new(vec![Label::new(Source::K8s, "app", v)])
    }

    #[test]
    fn same_set_same_number_and_reuse() {
        let mut a = Allocator::new();
        let (x, new) = a.acquire(&set("x"), Scope::Cluster).unwrap();
        assert!(new);
        assert_eq!(x, CLUSTER_MIN);
        let (x2, new2) = a.acquire(&set("x"), Scope::Cluster).unwrap();
        assert_eq!((x2, new2), (x, false));
        let (y, _) = a.acquire(&set("y"), Scope::Cluster).unwrap();
        assert_eq!(y, CLUSTER_MIN + 1);
        assert!(!a.release(x));
        assert!(a.release(x));
        assert!(a.labels(x).is_none());
        let (z, _) = a.acquire(&set("z"), Scope::Cluster).unwrap();
        assert_eq!(z, x, "freed numbers are reused");
        assert!(!a.release(crate::reserved::HOST));
        assert!(a.labels(crate::reserved::WORLD).is_some());
    }
}
