//! The incremental policy engine: cluster state and policies in, per-endpoint tables out.
//!
//! Flow of data:
//! 1. Pods get identities from their labels (plus namespace, namespace labels, service account
//!    and cluster). CIDR prefixes that policies mention get node-local CIDR identities.
//! 2. Every selector (subjects and peers) is interned once in the selector cache, which keeps
//!    the set of identities it matches, indexed by the namespace it is pinned to so a new
//!    identity is only tested against selectors that can match it.
//! 3. Tables are computed per (identity, direction, own named ports) and shared by every pod
//!    with the same key. Each table records the selectors it read; when a selector's match set
//!    changes, or the rules selecting the table's identity change, only those tables are
//!    marked dirty and rebuilt by [`Engine::commit`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use palisade_identity::{
    cidr_labels, keys, pod_labels, reserved, Allocator, Identity, LabelSet, Scope,
};

use crate::model::{
    Action, CompiledPolicy, Direction, NamedPorts, Peer, PolicyKey, PortMatch, PortSpec, Rule,
    RuleOrigin, Subject,
};
use crate::selector::{Requirement, Selector};
use crate::table::{Contribution, RuleId, Table, ANY_IDENTITY};

/// Engine settings, named as the Cilium agent names them.
#[derive(Debug, Clone)]
pub struct Config {
    /// `io.cilium.k8s.policy.cluster` of every pod.
    pub cluster: String,
    /// Cilium's `allow-localhost=always` (its default in Kubernetes): the local host may always
    /// reach its pods (kubelet probes); an explicit deny still wins.
    pub allow_localhost: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster: "default".to_owned(),
            allow_localhost: true,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("identity space exhausted")]
    IdentitiesExhausted,
}

/// A container port: what named ports resolve against.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub proto: u8,
    pub port: u16,
}

/// A pod as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub node: String,
    pub host_network: bool,
    pub ip: IpAddr,
    pub ports: Vec<NamedPort>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
}

/// What owns a table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TableKey {
    /// Pods of one identity; ingress tables also depend on the pods' own named ports.
    Pod {
        identity: Identity,
        direction: Direction,
        ports: Arc<[NamedPort]>,
    },
    /// A node's host endpoint.
    Node { name: String, direction: Direction },
}

type SelId = u32;

#[derive(Debug)]
struct SelEntry {
    selector: Selector,
    matches: HashSet<Identity>,
    refs: u32,
    pinned_ns: Option<String>,
}

/// Interned selectors with their match sets.
#[derive(Debug, Default)]
struct SelectorCache {
    entries: Vec<Option<SelEntry>>,
    free: Vec<SelId>,
    by_selector: HashMap<Selector, SelId>,
    by_namespace: HashMap<String, HashSet<SelId>>,
    unpinned: HashSet<SelId>,
}

impl SelectorCache {
    fn get(&self, id: SelId) -> Option<&SelEntry> {
        self.entries.get(id as usize).and_then(Option::as_ref)
    }

    /// Interns a selector (taking a reference). Returns its id and whether it is new.
    fn intern(
        &mut self,
        selector: &Selector,
        identities: &Allocator,
        by_namespace: &HashMap<String, HashSet<Identity>>,
    ) -> (SelId, bool) {
        if let Some(&id) = self.by_selector.get(selector) {
            if let Some(Some(e)) = self.entries.get_mut(id as usize) {
                e.refs += 1;
            }
            return (id, false);
        }
        let pinned_ns = selector.pinned_value(keys::NAMESPACE).map(str::to_owned);
        // A selector pinned to one namespace can only match that namespace's identities.
        let matches: HashSet<Identity> = match &pinned_ns {
            Some(ns) => by_namespace
                .get(ns)
                .into_iter()
                .flatten()
                .copied()
                .filter(|id| identities.labels(*id).is_some_and(|l| selector.matches(l)))
                .collect(),
            None => identities
                .iter()
                .filter(|(_, labels)| selector.matches(labels))
                .map(|(id, _)| id)
                .collect(),
        };
        let entry = SelEntry {
            selector: selector.clone(),
            matches,
            refs: 1,
            pinned_ns: pinned_ns.clone(),
        };
        let id = if let Some(id) = self.free.pop() {
            if let Some(slot) = self.entries.get_mut(id as usize) {
                *slot = Some(entry);
            }
            id
        } else {
            self.entries.push(Some(entry));
            (self.entries.len() - 1) as SelId
        };
        self.by_selector.insert(selector.clone(), id);
        match pinned_ns {
            Some(ns) => {
                self.by_namespace.entry(ns).or_default().insert(id);
            }
            None => {
                self.unpinned.insert(id);
            }
        }
        (id, true)
    }

    fn release(&mut self, id: SelId) {
        let Some(Some(e)) = self.entries.get_mut(id as usize) else {
            return;
        };
        e.refs = e.refs.saturating_sub(1);
        if e.refs > 0 {
            return;
        }
        if let Some(e) = self.entries.get_mut(id as usize).and_then(Option::take) {
            self.by_selector.remove(&e.selector);
            match &e.pinned_ns {
                Some(ns) => {
                    if let Some(set) = self.by_namespace.get_mut(ns) {
                        set.remove(&id);
                        if set.is_empty() {
                            self.by_namespace.remove(ns);
                        }
                    }
                }
                None => {
                    self.unpinned.remove(&id);
                }
            }
        }
        self.free.push(id);
    }

    /// Selectors that could match an identity with these labels.
    fn candidates(&self, labels: &LabelSet) -> Vec<SelId> {
        let mut out: Vec<SelId> = self.unpinned.iter().copied().collect();
        if let Some(ns) = labels.get(keys::NAMESPACE) {
            if let Some(set) = self.by_namespace.get(&*ns.value) {
                out.extend(set.iter().copied());
            }
        }
        out
    }
}

/// A rule as stored: the compiled rule plus its interned selectors.
#[derive(Debug)]
pub struct StoredRule {
    pub rule: Rule,
    /// A default-deny marker rather than a rule with peers.
    pub marks_default_deny: bool,
    subject_sel: Option<SelId>,
    peer_sels: Vec<Option<SelId>>,
}

#[derive(Debug)]
struct StoredPolicy {
    rules: Vec<RuleId>,
    prefixes: Vec<IpNet>,
}

#[derive(Debug)]
struct TableState {
    table: Arc<Table>,
    /// (selector, rule, peer index) for every selector this table read, sorted.
    uses: Vec<(SelId, RuleId, u16)>,
    /// Derived selectors (with fromRequires) this table holds references on.
    owned: Vec<SelId>,
    refs: u32,
}

/// What the engine keeps of a pod: no label copy (the identity holds the labels), shared
/// strings and port lists, so per-pod memory stays small.
#[derive(Debug)]
struct PodState {
    service_account: Arc<str>,
    node: Arc<str>,
    host_network: bool,
    ip: IpAddr,
    /// Sorted and deduplicated; one allocation shared by every pod with the same ports.
    ports: Arc<[NamedPort]>,
    identity: Option<Identity>,
    /// The labels of a host-network pod, which has no identity to hold them.
    host_labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default)]
struct IdentityInfo {
    /// Named ports of the pods of this identity, counted.
    named_ports: BTreeMap<NamedPort, u32>,
    pods: u32,
}

/// The policy engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    identities: Allocator,
    identity_info: HashMap<Identity, IdentityInfo>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    nodes: BTreeMap<String, NodeInfo>,
    /// Namespace → pod name → pod.
    pods: BTreeMap<Arc<str>, BTreeMap<Arc<str>, PodState>>,
    /// Interned strings (service accounts, node names).
    strings: HashSet<Arc<str>>,
    /// Interned port lists, shared by pods and table keys.
    port_sets: HashSet<Arc<[NamedPort]>>,
    no_ports: Arc<[NamedPort]>,
    ip_owner: HashMap<IpAddr, IpOwner>,
    cidr_ids: BTreeMap<IpNet, (Identity, u32)>,
    selectors: SelectorCache,
    /// Subject selectors → rules using them.
    subject_users: HashMap<SelId, Vec<RuleId>>,
    /// Identity → rules selecting it.
    selected_by: HashMap<Identity, BTreeSet<RuleId>>,
    node_rules: BTreeSet<RuleId>,
    rules: HashMap<RuleId, StoredRule>,
    next_rule: RuleId,
    policies: BTreeMap<Arc<PolicyKey>, StoredPolicy>,
    tables: HashMap<TableKey, TableState>,
    dependents: HashMap<SelId, HashSet<TableKey>>,
    dirty: HashSet<TableKey>,
    /// Tables that resolve egress named ports, rebuilt when any identity's ports change.
    named_egress: HashSet<TableKey>,
    /// Tables whose entries depend on whole peer sets (named ports that must agree across
    /// all peers): rebuilt rather than patched when a peer set changes.
    rebuild_on_change: HashSet<TableKey>,
    /// Selector match changes to apply to tables at the next commit.
    patches: Vec<(TableKey, SelId, Identity, bool)>,
    /// Source of [`Table::version`].
    next_table_version: u64,
    /// Identities by the namespace label they carry (pods only).
    identities_by_namespace: HashMap<String, HashSet<Identity>>,
    /// Pod tables by (identity, direction).
    tables_by_identity: HashMap<(Identity, Direction), HashSet<TableKey>>,
    revision: u64,
}

/// Who owns an address in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpOwner {
    Pod(Arc<str>, Arc<str>),
    Node(String),
}

/// The synthetic rule id for `allow-localhost`.
pub const ALLOW_LOCALHOST_RULE: RuleId = 0;

impl Engine {
    pub fn new(config: Config) -> Self {
        Engine {
            config,
            identities: Allocator::new(),
            identity_info: HashMap::new(),
            namespaces: BTreeMap::new(),
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            strings: HashSet::new(),
            port_sets: HashSet::new(),
            no_ports: Arc::from(Vec::new()),
            ip_owner: HashMap::new(),
            cidr_ids: BTreeMap::new(),
            selectors: SelectorCache::default(),
            subject_users: HashMap::new(),
            selected_by: HashMap::new(),
            node_rules: BTreeSet::new(),
            rules: HashMap::new(),
            next_rule: 1,
            policies: BTreeMap::new(),
            tables: HashMap::new(),
            dependents: HashMap::new(),
            dirty: HashSet::new(),
            named_egress: HashSet::new(),
            rebuild_on_change: HashSet::new(),
            patches: Vec::new(),
            next_table_version: 1,
            identities_by_namespace: HashMap::new(),
            tables_by_identity: HashMap::new(),
            revision: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Policy revision: bumped by every commit that changed something.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    // -----------------------------------------------------------------------------------------
    // Identities
    // -----------------------------------------------------------------------------------------

    /// Allocates (or references) the identity of a label set and, if new, adds it to every
    /// selector that matches it.
    fn acquire_identity(
        &mut self,
        labels: &LabelSet,
        scope: Scope,
    ) -> Result<Identity, EngineError> {
        let (id, new) = self
            .identities
            .acquire(labels, scope)
            .map_err(|_| EngineError::IdentitiesExhausted)?;
        if new {
            self.identity_changed(id, labels, true);
        }
        Ok(id)
    }

    fn release_identity(&mut self, id: Identity) {
        let labels = self.identities.labels(id).cloned();
        if self.identities.release(id) {
            if let Some(labels) = labels {
                self.identity_changed(id, &labels, false);
            }
            self.identity_info.remove(&id);
            self.selected_by.remove(&id);
        }
    }

    /// An identity appeared or disappeared: update match sets and mark dependents dirty.
    fn identity_changed(&mut self, id: Identity, labels: &LabelSet, added: bool) {
        if let Some(ns) = labels.get(keys::NAMESPACE) {
            if added {
                self.identities_by_namespace
                    .entry(ns.value.to_string())
                    .or_default()
                    .insert(id);
            } else if let Some(set) = self.identities_by_namespace.get_mut(&*ns.value) {
                set.remove(&id);
                if set.is_empty() {
                    self.identities_by_namespace.remove(&*ns.value);
                }
            }
        }
        for sel_id in self.selectors.candidates(labels) {
            let Some(Some(entry)) = self.selectors.entries.get_mut(sel_id as usize) else {
                continue;
            };
            let changed = if added {
                entry.selector.matches(labels) && entry.matches.insert(id)
            } else {
                entry.matches.remove(&id)
            };
            if !changed {
                continue;
            }
            if let Some(tables) = self.dependents.get(&sel_id) {
                for t in tables {
                    if self.rebuild_on_change.contains(t) {
                        self.dirty.insert(t.clone());
                    } else {
                        self.patches.push((t.clone(), sel_id, id, added));
                    }
                }
            }
            if let Some(rules) = self.subject_users.get(&sel_id) {
                let set = self.selected_by.entry(id).or_default();
                for r in rules {
                    if added {
                        set.insert(*r);
                    } else {
                        set.remove(r);
                    }
                }
            }
        }
    }

    fn identity_labels_for(&self, info: &PodInfo) -> LabelSet {
        let empty = BTreeMap::new();
        let ns_labels = self.namespaces.get(&info.namespace).unwrap_or(&empty);
        let mut ns_labels = ns_labels.clone();
        ns_labels
            .entry("kubernetes.io/metadata.name".to_owned())
            .or_insert_with(|| info.namespace.clone());
        pod_labels(
            &info.labels,
            &info.namespace,
            &ns_labels,
            &info.service_account,
            &self.config.cluster,
        )
    }

    // -----------------------------------------------------------------------------------------
    // Cluster state
    // -----------------------------------------------------------------------------------------

    /// Adds or relabels a namespace; its pods move to their new identities.
    pub fn upsert_namespace(
        &mut self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        if self.namespaces.get(name) == Some(&labels) {
            return Ok(());
        }
        self.namespaces.insert(name.to_owned(), labels);
        self.refresh_namespace_pods(name)
    }

    pub fn remove_namespace(&mut self, name: &str) -> Result<(), EngineError> {
        if self.namespaces.remove(name).is_some() {
            self.refresh_namespace_pods(name)?;
        }
        Ok(())
    }

    fn refresh_namespace_pods(&mut self, ns: &str) -> Result<(), EngineError> {
        let pods: Vec<PodInfo> = self
            .pods
            .get(ns)
            .into_iter()
            .flat_map(|m| m.iter().map(|(name, st)| self.pod_info(ns, name, st)))
            .collect();
        for p in pods {
            self.remove_pod(&p.namespace, &p.name);
            self.upsert_pod(p)?;
        }
        Ok(())
    }

    fn node_owning(&self, ip: IpAddr) -> Option<String> {
        self.nodes
            .values()
            .find(|n| n.ips.contains(&ip))
            .map(|n| n.name.clone())
    }

    fn intern_str(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.strings.insert(a.clone());
        a
    }

    fn intern_ports(&mut self, ports: &[NamedPort]) -> Arc<[NamedPort]> {
        let mut sorted = ports.to_vec();
        sorted.sort();
        sorted.dedup();
        if sorted.is_empty() {
            return self.no_ports.clone();
        }
        if let Some(a) = self.port_sets.get(sorted.as_slice()) {
            return a.clone();
        }
        let a: Arc<[NamedPort]> = Arc::from(sorted);
        self.port_sets.insert(a.clone());
        a
    }

    /// The own labels of a pod, from its identity (or kept aside for host-network pods).
    fn pod_own_labels(&self, st: &PodState) -> BTreeMap<String, String> {
        if let Some(l) = &st.host_labels {
            return l.clone();
        }
        let Some(set) = st.identity.and_then(|id| self.identities.labels(id)) else {
            return BTreeMap::new();
        };
        set.iter()
            .filter(|l| {
                l.source == palisade_identity::Source::K8s
                    && *l.key != *keys::NAMESPACE
                    && *l.key != *keys::SERVICE_ACCOUNT
                    && *l.key != *keys::CLUSTER
                    && !l.key.starts_with(keys::NAMESPACE_LABELS_PREFIX)
            })
            .map(|l| (l.key.to_string(), l.value.to_string()))
            .collect()
    }

    fn pod_info(&self, ns: &str, name: &str, st: &PodState) -> PodInfo {
        PodInfo {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            labels: self.pod_own_labels(st),
            service_account: st.service_account.to_string(),
            node: st.node.to_string(),
            host_network: st.host_network,
            ip: st.ip,
            ports: st.ports.to_vec(),
        }
    }

    fn pod_keys(&self, st: &PodState) -> Option<[TableKey; 2]> {
        let identity = st.identity?;
        Some([
            TableKey::Pod {
                identity,
                direction: Direction::Ingress,
                ports: st.ports.clone(),
            },
            TableKey::Pod {
                identity,
                direction: Direction::Egress,
                ports: self.no_ports.clone(),
            },
        ])
    }

    pub fn upsert_node(&mut self, node: NodeInfo) {
        if let Some(old) = self.nodes.get(&node.name) {
            if *old == node {
                return;
            }
            for ip in &old.ips {
                self.ip_owner.remove(ip);
            }
        }
        for ip in &node.ips {
            self.ip_owner.insert(*ip, IpOwner::Node(node.name.clone()));
        }
        let name = node.name.clone();
        self.nodes.insert(name.clone(), node);
        self.ensure_node_tables(&name);
        for d in Direction::BOTH {
            self.dirty.insert(TableKey::Node {
                name: name.clone(),
                direction: d,
            });
        }
    }

    fn ensure_node_tables(&mut self, name: &str) {
        for direction in Direction::BOTH {
            let key = TableKey::Node {
                name: name.to_owned(),
                direction,
            };
            if !self.tables.contains_key(&key) {
                self.tables.insert(
                    key.clone(),
                    TableState {
                        table: Arc::new(Table::default()),
                        uses: Vec::new(),
                        owned: Vec::new(),
                        refs: 1,
                    },
                );
                self.dirty.insert(key);
            }
        }
    }

    /// Adds a pod, or replaces it (relabel, new ports, new address).
    pub fn upsert_pod(&mut self, info: PodInfo) -> Result<(), EngineError> {
        if let Some(old) = self.pod(&info.namespace, &info.name) {
            if old == info {
                return Ok(());
            }
            self.remove_pod(&info.namespace, &info.name);
        }
        let ns_key: Arc<str> = match self.pods.get_key_value(info.namespace.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(info.namespace.as_str()),
        };
        let name_key: Arc<str> = Arc::from(info.name.as_str());
        // A host-network pod normally has its node's address, which stays the node's.
        if !(info.host_network && self.node_owning(info.ip).is_some()) {
            self.ip_owner
                .insert(info.ip, IpOwner::Pod(ns_key.clone(), name_key.clone()));
        }
        let mut state = PodState {
            service_account: self.intern_str(&info.service_account),
            node: self.intern_str(&info.node),
            host_network: info.host_network,
            ip: info.ip,
            ports: self.intern_ports(&info.ports),
            identity: None,
            host_labels: None,
        };
        if info.host_network {
            // A host-network pod is its node's host endpoint.
            state.host_labels = Some(info.labels);
            self.pods.entry(ns_key).or_default().insert(name_key, state);
            return Ok(());
        }
        let labels = self.identity_labels_for(&info);
        let id = self.acquire_identity(&labels, Scope::Cluster)?;
        let new_identity = !self.identity_info.contains_key(&id);
        let ports_changed = {
            let ii = self.identity_info.entry(id).or_default();
            ii.pods += 1;
            let mut changed = false;
            for p in state.ports.iter() {
                let c = ii.named_ports.entry(p.clone()).or_insert(0);
                changed |= *c == 0;
                *c += 1;
            }
            changed
        };
        if ports_changed {
            // A new identity reaches per-destination named ports through selector patches;
            // only tables resolving across whole peer sets need a rebuild. An existing
            // identity's ports changing touches every table resolving named egress ports.
            let affected = if new_identity {
                &self.rebuild_on_change
            } else {
                &self.named_egress
            };
            self.dirty.extend(affected.iter().cloned());
        }
        state.identity = Some(id);
        if let Some(keys) = self.pod_keys(&state) {
            for k in &keys {
                self.reference_table(k);
            }
        }
        self.pods.entry(ns_key).or_default().insert(name_key, state);
        Ok(())
    }

    fn reference_table(&mut self, key: &TableKey) {
        if let Some(t) = self.tables.get_mut(key) {
            t.refs += 1;
        } else {
            if let TableKey::Pod {
                identity,
                direction,
                ..
            } = key
            {
                self.tables_by_identity
                    .entry((*identity, *direction))
                    .or_default()
                    .insert(key.clone());
            }
            self.tables.insert(
                key.clone(),
                TableState {
                    table: Arc::new(Table::default()),
                    uses: Vec::new(),
                    owned: Vec::new(),
                    refs: 1,
                },
            );
            self.dirty.insert(key.clone());
        }
    }

    fn unreference_table(&mut self, key: &TableKey) {
        let drop = match self.tables.get_mut(key) {
            Some(t) => {
                t.refs = t.refs.saturating_sub(1);
                t.refs == 0
            }
            None => false,
        };
        if drop {
            if let TableKey::Pod {
                identity,
                direction,
                ..
            } = key
            {
                if let Some(set) = self.tables_by_identity.get_mut(&(*identity, *direction)) {
                    set.remove(key);
                    if set.is_empty() {
                        self.tables_by_identity.remove(&(*identity, *direction));
                    }
                }
            }
            if let Some(t) = self.tables.remove(key) {
                self.forget_deps(key, &t);
            }
            self.dirty.remove(key);
            self.named_egress.remove(key);
        }
    }

    fn forget_deps(&mut self, key: &TableKey, t: &TableState) {
        for s in selectors_of(&t.uses) {
            if let Some(set) = self.dependents.get_mut(&s) {
                set.remove(key);
                if set.is_empty() {
                    self.dependents.remove(&s);
                }
            }
        }
        for s in &t.owned {
            self.selectors.release(*s);
        }
    }

    pub fn remove_pod(&mut self, namespace: &str, name: &str) {
        let Some(pods) = self.pods.get_mut(namespace) else {
            return;
        };
        let Some((name_key, state)) = pods.remove_entry(name) else {
            return;
        };
        if pods.is_empty() {
            self.pods.remove(namespace);
        }
        let owned_by_pod = matches!(
            self.ip_owner.get(&state.ip),
            Some(IpOwner::Pod(n, p)) if **n == *namespace && Arc::ptr_eq(p, &name_key)
        );
        if owned_by_pod {
            self.ip_owner.remove(&state.ip);
            // The address may still be a node's.
            if let Some(node) = self.node_owning(state.ip) {
                self.ip_owner.insert(state.ip, IpOwner::Node(node));
            }
        }
        if let Some(keys) = self.pod_keys(&state) {
            for k in &keys {
                self.unreference_table(k);
            }
        }
        if let Some(id) = state.identity {
            let mut ports_changed = false;
            let mut last_pod = false;
            if let Some(ii) = self.identity_info.get_mut(&id) {
                ii.pods = ii.pods.saturating_sub(1);
                last_pod = ii.pods == 0;
                for p in state.ports.iter() {
                    if let Some(c) = ii.named_ports.get_mut(p) {
                        *c -= 1;
                        if *c == 0 {
                            ii.named_ports.remove(p);
                            ports_changed = true;
                        }
                    }
                }
            }
            if ports_changed {
                let affected = if last_pod {
                    &self.rebuild_on_change
                } else {
                    &self.named_egress
                };
                self.dirty.extend(affected.iter().cloned());
            }
            self.release_identity(id);
        }
        // Drop an interned port list nobody uses any more (only the interner holds it).
        let ports = state.ports;
        if Arc::strong_count(&ports) == 2 {
            self.port_sets.remove(&ports);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Policies
    // -----------------------------------------------------------------------------------------

    /// Adds a policy, or replaces the one with the same key.
    pub fn upsert_policy(&mut self, policy: CompiledPolicy) -> Result<(), EngineError> {
        let key = policy.key.clone();
        // Allocate the new CIDR identities before dropping the old ones, so prefixes present in
        // both keep their numbers.
        for p in &policy.prefixes {
            self.acquire_cidr(*p)?;
        }
        self.remove_policy(&key);
        let mut ids = Vec::new();
        let markers = policy.default_deny.into_iter().map(|d| Rule {
            origin: d.origin,
            subject: d.subject,
            direction: d.direction,
            action: Action::Deny,
            peers: Vec::new(),
            ports: Vec::new(),
            requires: Vec::new(),
            named_ports: NamedPorts::PerDestination,
            audit: d.audit,
        });
        let all: Vec<(Rule, bool)> = policy
            .rules
            .into_iter()
            .map(|r| (r, false))
            .chain(markers.map(|m| (m, true)))
            .collect();
        for (rule, marker) in all {
            ids.push(self.add_rule(rule, marker));
        }
        self.policies.insert(
            key,
            StoredPolicy {
                rules: ids,
                prefixes: policy.prefixes,
            },
        );
        Ok(())
    }

    pub fn remove_policy(&mut self, key: &PolicyKey) -> bool {
        let Some(stored) = self.policies.remove(key) else {
            return false;
        };
        for id in stored.rules {
            self.remove_rule(id);
        }
        for p in stored.prefixes {
            self.release_cidr(p);
        }
        true
    }

    fn acquire_cidr(&mut self, prefix: IpNet) -> Result<(), EngineError> {
        let prefix = prefix.trunc();
        if let Some((_, refs)) = self.cidr_ids.get_mut(&prefix) {
            *refs += 1;
            return Ok(());
        }
        let id = self.acquire_identity(&cidr_labels(prefix), Scope::Local)?;
        self.cidr_ids.insert(prefix, (id, 1));
        Ok(())
    }

    fn release_cidr(&mut self, prefix: IpNet) {
        let prefix = prefix.trunc();
        let release = match self.cidr_ids.get_mut(&prefix) {
            Some((id, refs)) => {
                *refs -= 1;
                (*refs == 0).then_some(*id)
            }
            None => None,
        };
        if let Some(id) = release {
            self.cidr_ids.remove(&prefix);
            self.release_identity(id);
        }
    }

    fn add_rule(&mut self, rule: Rule, marker: bool) -> RuleId {
        let id = self.next_rule;
        self.next_rule += 1;
        let subject_sel = match &rule.subject {
            Subject::Endpoints(sel) => {
                let (sid, _) =
                    self.selectors
                        .intern(sel, &self.identities, &self.identities_by_namespace);
                self.subject_users.entry(sid).or_default().push(id);
                let matches: Vec<Identity> = self
                    .selectors
                    .get(sid)
                    .map(|e| e.matches.iter().copied().collect())
                    .unwrap_or_default();
                for ident in matches {
                    self.selected_by.entry(ident).or_default().insert(id);
                    self.mark_identity_tables(ident, rule.direction);
                }
                Some(sid)
            }
            Subject::Nodes(_) => {
                self.node_rules.insert(id);
                self.mark_node_tables(rule.direction);
                None
            }
        };
        let mut peer_sels = Vec::with_capacity(rule.peers.len());
        for p in &rule.peers {
            peer_sels.push(match p {
                Peer::Select { selector, .. } => Some(
                    self.selectors
                        .intern(selector, &self.identities, &self.identities_by_namespace)
                        .0,
                ),
                _ => None,
            });
        }
        self.rules.insert(
            id,
            StoredRule {
                rule,
                marks_default_deny: marker,
                subject_sel,
                peer_sels,
            },
        );
        id
    }

    fn remove_rule(&mut self, id: RuleId) {
        let Some(stored) = self.rules.remove(&id) else {
            return;
        };
        if let Some(sid) = stored.subject_sel {
            let matches: Vec<Identity> = self
                .selectors
                .get(sid)
                .map(|e| e.matches.iter().copied().collect())
                .unwrap_or_default();
            for ident in matches {
                if let Some(set) = self.selected_by.get_mut(&ident) {
                    set.remove(&id);
                }
                self.mark_identity_tables(ident, stored.rule.direction);
            }
            if let Some(users) = self.subject_users.get_mut(&sid) {
                users.retain(|r| *r != id);
                if users.is_empty() {
                    self.subject_users.remove(&sid);
                }
            }
            self.selectors.release(sid);
        } else {
            self.node_rules.remove(&id);
            self.mark_node_tables(stored.rule.direction);
        }
        for s in stored.peer_sels.into_iter().flatten() {
            self.selectors.release(s);
        }
    }

    fn mark_identity_tables(&mut self, identity: Identity, direction: Direction) {
        if let Some(keys) = self.tables_by_identity.get(&(identity, direction)) {
            self.dirty.extend(keys.iter().cloned());
        }
    }

    fn mark_node_tables(&mut self, direction: Direction) {
        for name in self.nodes.keys() {
            self.dirty.insert(TableKey::Node {
                name: name.clone(),
                direction,
            });
        }
    }

    // -----------------------------------------------------------------------------------------
    // Resolution
    // -----------------------------------------------------------------------------------------

    /// Rebuilds every table whose inputs changed. Returns the keys of the tables rebuilt.
    pub fn commit(&mut self) -> Vec<TableKey> {
        let dirty: HashSet<TableKey> = self
            .dirty
            .drain()
            .filter(|k| self.tables.contains_key(k))
            .collect();
        for key in &dirty {
            self.rebuild(key);
        }
        // A rebuilt table already reflects every change; the others are patched in place.
        let patches = std::mem::take(&mut self.patches);
        let mut patched: HashSet<TableKey> = HashSet::new();
        for (key, sel, identity, added) in patches {
            if !dirty.contains(&key) {
                self.patch(&key, sel, identity, added);
                patched.insert(key);
            }
        }
        let dirty: Vec<TableKey> = dirty.into_iter().chain(patched).collect();
        if !dirty.is_empty() {
            self.revision += 1;
        }
        dirty
    }

    fn rules_for(&self, key: &TableKey) -> Vec<RuleId> {
        match key {
            TableKey::Pod {
                identity,
                direction,
                ..
            } => self
                .selected_by
                .get(identity)
                .into_iter()
                .flatten()
                .copied()
                .filter(|r| {
                    self.rules
                        .get(r)
                        .is_some_and(|s| s.rule.direction == *direction)
                })
                .collect(),
            TableKey::Node { name, direction } => {
                let Some(node) = self.nodes.get(name) else {
                    return Vec::new();
                };
                let labels = node_labels(node);
                self.node_rules
                    .iter()
                    .copied()
                    .filter(|r| {
                        self.rules.get(r).is_some_and(|s| {
                            s.rule.direction == *direction
                                && matches!(&s.rule.subject, Subject::Nodes(sel) if sel.matches(&labels))
                        })
                    })
                    .collect()
            }
        }
    }

    /// Adds the entries one peer of one rule gives `identities` in a table.
    fn add_peer_entries(
        &self,
        key: &TableKey,
        id: RuleId,
        rule: &Rule,
        peer: u16,
        identities: &[Identity],
        table: &mut Table,
    ) {
        let direction = key_direction(key);
        for spec in &rule.ports {
            let c = contribution(id, peer, rule, spec);
            if matches!(spec.ports, PortMatch::Named(_)) && direction == Direction::Egress {
                for (peer_id, proto, lo, hi) in
                    self.egress_named_ports(spec, rule.named_ports, identities)
                {
                    table.add(peer_id, proto, lo, hi, c.clone());
                }
            } else {
                let ranges = Self::resolve_ports(spec, key);
                for &peer_id in identities {
                    for &(proto, lo, hi) in &ranges {
                        table.add(peer_id, proto, lo, hi, c.clone());
                    }
                }
            }
        }
    }

    fn rebuild(&mut self, key: &TableKey) {
        let rule_ids = self.rules_for(key);
        let direction = key_direction(key);
        let mut table = Table::default();
        let mut uses: Vec<(SelId, RuleId, u16)> = Vec::new();
        let mut owned: Vec<SelId> = Vec::new();
        let mut uses_named_egress = false;
        let mut rebuild_on_change = false;
        // fromRequires / toRequires of every selecting rule, per action.
        let mut requires: HashMap<Action, Vec<Requirement>> = HashMap::new();
        for id in &rule_ids {
            if let Some(s) = self.rules.get(id) {
                requires
                    .entry(s.rule.action)
                    .or_default()
                    .extend(s.rule.requires.iter().cloned());
            }
        }
        for id in &rule_ids {
            let Some(stored) = self.rules.get(id) else {
                continue;
            };
            if stored.marks_default_deny {
                table.default_deny_audited = if table.enforcing {
                    table.default_deny_audited && stored.rule.audit
                } else {
                    stored.rule.audit
                };
                table.enforcing = true;
                table.default_deny_by.push(*id);
                continue;
            }
            let rule = &stored.rule;
            let named_egress = direction == Direction::Egress
                && rule
                    .ports
                    .iter()
                    .any(|p| matches!(p.ports, PortMatch::Named(_)));
            uses_named_egress |= named_egress;
            // These resolve against the whole peer set: a change of it cannot be patched.
            if named_egress
                && (rule.named_ports == NamedPorts::SingleNumber || rule.peers.contains(&Peer::Any))
            {
                rebuild_on_change = true;
            }
            let reqs = requires.get(&rule.action).map_or(&[][..], Vec::as_slice);
            for (pi, peer) in rule.peers.iter().enumerate() {
                let pi = u16::try_from(pi).unwrap_or(u16::MAX);
                let identities: Vec<Identity> = match peer {
                    Peer::Any => vec![ANY_IDENTITY],
                    Peer::Fqdn(pattern) => {
                        for spec in &rule.ports {
                            for (proto, lo, hi) in Self::resolve_ports(spec, key) {
                                table.add_fqdn(
                                    pattern,
                                    proto,
                                    lo,
                                    hi,
                                    contribution(*id, pi, rule, spec),
                                );
                            }
                        }
                        continue;
                    }
                    Peer::Select {
                        selector,
                        endpoints,
                    } => {
                        let sid = if *endpoints && !reqs.is_empty() {
                            let (sid, _) = self.selectors.intern(
                                &selector.and(reqs),
                                &self.identities,
                                &self.identities_by_namespace,
                            );
                            owned.push(sid);
                            sid
                        } else {
                            match stored.peer_sels.get(usize::from(pi)).copied().flatten() {
                                Some(s) => s,
                                None => continue,
                            }
                        };
                        let Some(entry) = self.selectors.get(sid) else {
                            continue;
                        };
                        if entry.selector.is_wildcard() {
                            // "Any peer" covers identities yet to come: no dependency.
                            vec![ANY_IDENTITY]
                        } else {
                            uses.push((sid, *id, pi));
                            entry.matches.iter().copied().collect()
                        }
                    }
                };
                self.add_peer_entries(key, *id, rule, pi, &identities, &mut table);
            }
        }
        if self.config.allow_localhost
            && table.enforcing
            && matches!(
                key,
                TableKey::Pod {
                    direction: Direction::Ingress,
                    ..
                }
            )
        {
            table.add(
                reserved::HOST,
                0,
                0,
                u16::MAX,
                Contribution {
                    rule: ALLOW_LOCALHOST_RULE,
                    peer: 0,
                    action: Action::Allow,
                    l7: None,
                    audit: false,
                },
            );
        }
        if uses_named_egress {
            self.named_egress.insert(key.clone());
        } else {
            self.named_egress.remove(key);
        }
        if rebuild_on_change {
            self.rebuild_on_change.insert(key.clone());
        } else {
            self.rebuild_on_change.remove(key);
        }
        // Swap in the new table and its dependencies; release the old ones.
        uses.sort_unstable();
        uses.dedup();
        uses.shrink_to_fit();
        let new_deps: Vec<SelId> = selectors_of(&uses);
        table.version = self.next_table_version;
        self.next_table_version += 1;
        let old = self.tables.get_mut(key).map(|t| {
            let old_uses = std::mem::replace(&mut t.uses, uses);
            let old_owned = std::mem::replace(&mut t.owned, owned);
            t.table = Arc::new(table);
            (old_uses, old_owned)
        });
        let Some((old_uses, old_owned)) = old else {
            return;
        };
        for s in selectors_of(&old_uses) {
            if let Some(set) = self.dependents.get_mut(&s) {
                set.remove(key);
                if set.is_empty() {
                    self.dependents.remove(&s);
                }
            }
        }
        for s in old_owned {
            self.selectors.release(s);
        }
        for s in new_deps {
            self.dependents.entry(s).or_default().insert(key.clone());
        }
    }

    /// Applies one selector's gain or loss of an identity to a table in place, without
    /// rebuilding it: only that identity's entries from the rules that read the selector change.
    fn patch(&mut self, key: &TableKey, sel: SelId, identity: Identity, added: bool) {
        let Some(state) = self.tables.get(key) else {
            return;
        };
        let start = state.uses.partition_point(|(s, _, _)| *s < sel);
        let uses: Vec<(RuleId, u16)> = state.uses[start..]
            .iter()
            .take_while(|(s, _, _)| *s == sel)
            .map(|(_, r, p)| (*r, *p))
            .collect();
        if uses.is_empty() {
            return;
        }
        let mut additions = Table::default();
        if added {
            for (rid, pi) in &uses {
                if let Some(stored) = self.rules.get(rid) {
                    self.add_peer_entries(
                        key,
                        *rid,
                        &stored.rule,
                        *pi,
                        &[identity],
                        &mut additions,
                    );
                }
            }
        }
        let Some(state) = self.tables.get_mut(key) else {
            return;
        };
        let table = Arc::make_mut(&mut state.table);
        if added {
            table.merge(additions);
        } else {
            for (rid, pi) in &uses {
                table.remove_contributions(identity, *rid, *pi);
            }
        }
        table.version = self.next_table_version;
        self.next_table_version += 1;
    }

    /// Port ranges of a port spec for one table. A named port resolves, in an ingress table,
    /// against the endpoint's own container ports; elsewhere see [`Self::egress_named_ports`].
    fn resolve_ports(spec: &PortSpec, key: &TableKey) -> Vec<(u8, u16, u16)> {
        match (&spec.ports, key) {
            (PortMatch::Range(lo, hi), _) => vec![(spec.proto, *lo, *hi)],
            (
                PortMatch::Named(name),
                TableKey::Pod {
                    direction: Direction::Ingress,
                    ports,
                    ..
                },
            ) => {
                let numbers: BTreeSet<u16> = ports
                    .iter()
                    .filter(|p| p.name == *name && p.proto == spec.proto)
                    .map(|p| p.port)
                    .collect();
                numbers.into_iter().map(|n| (spec.proto, n, n)).collect()
            }
            (PortMatch::Named(_), _) => Vec::new(),
        }
    }

    /// The numbers a port name has on the pods of one identity.
    fn named_port_numbers(&self, id: Identity, name: &str, proto: u8) -> BTreeSet<u16> {
        self.identity_info
            .get(&id)
            .map(|info| {
                info.named_ports
                    .keys()
                    .filter(|p| p.name == name && p.proto == proto)
                    .map(|p| p.port)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Entries of an egress named port: resolved on the destination pods.
    /// - Kubernetes ([`NamedPorts::PerDestination`]): each destination identity gets the
    ///   numbers its own pods give the name; "any peer" means every pod that has the name.
    /// - Cilium ([`NamedPorts::SingleNumber`]): the name must mean one number across every
    ///   selected identity, else the rule allows nothing on it.
    fn egress_named_ports(
        &self,
        spec: &PortSpec,
        mode: NamedPorts,
        peers: &[Identity],
    ) -> Vec<(Identity, u8, u16, u16)> {
        let PortMatch::Named(name) = &spec.ports else {
            return Vec::new();
        };
        let expanded: Vec<Identity> = if peers.contains(&ANY_IDENTITY) {
            self.identity_info.keys().copied().collect()
        } else {
            peers.to_vec()
        };
        match mode {
            NamedPorts::PerDestination => expanded
                .into_iter()
                .flat_map(|id| {
                    self.named_port_numbers(id, name, spec.proto)
                        .into_iter()
                        .map(move |n| (id, spec.proto, n, n))
                })
                .collect(),
            NamedPorts::SingleNumber => {
                let numbers: BTreeSet<u16> = expanded
                    .iter()
                    .flat_map(|id| self.named_port_numbers(*id, name, spec.proto))
                    .collect();
                let [number] = numbers.into_iter().collect::<Vec<_>>()[..] else {
                    return Vec::new();
                };
                peers
                    .iter()
                    .map(|id| (*id, spec.proto, number, number))
                    .collect()
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Queries
    // -----------------------------------------------------------------------------------------

    /// A pod as given (its labels read back from its identity).
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        let st = self.pods.get(namespace)?.get(name)?;
        Some(self.pod_info(namespace, name, st))
    }

    /// Every pod, by namespace and name.
    pub fn pods(&self) -> impl Iterator<Item = PodInfo> + '_ {
        self.pods
            .iter()
            .flat_map(move |(ns, m)| m.iter().map(move |(name, st)| self.pod_info(ns, name, st)))
    }

    /// Address, node and host-network flag of a pod, without rebuilding its labels.
    pub fn pod_location(&self, namespace: &str, name: &str) -> Option<(IpAddr, &str, bool)> {
        let st = self.pods.get(namespace)?.get(name)?;
        Some((st.ip, &st.node, st.host_network))
    }

    /// Every pod's address, host-network flag and identity (none for host-network pods),
    /// without rebuilding labels: what the datapath's ipcache and identity counts need.
    pub fn pod_addresses(&self) -> impl Iterator<Item = (IpAddr, bool, Option<Identity>)> + '_ {
        self.pods
            .values()
            .flat_map(|m| m.values().map(|st| (st.ip, st.host_network, st.identity)))
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    pub fn namespace_labels(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(name)
    }

    pub fn pod_identity(&self, namespace: &str, name: &str) -> Option<Identity> {
        self.pods.get(namespace)?.get(name)?.identity
    }

    pub fn identity_labels(&self, id: Identity) -> Option<&Arc<LabelSet>> {
        self.identities.labels(id)
    }

    pub fn identities(&self) -> impl Iterator<Item = (Identity, &Arc<LabelSet>)> {
        self.identities.iter()
    }

    pub fn rule(&self, id: RuleId) -> Option<&StoredRule> {
        self.rules.get(&id)
    }

    /// Where a rule came from; `None` for the synthetic allow-localhost rule.
    pub fn rule_origin(&self, id: RuleId) -> Option<&RuleOrigin> {
        self.rules.get(&id).map(|s| &s.rule.origin)
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<PolicyKey>> {
        self.policies.keys()
    }

    pub fn ip_owner(&self, ip: IpAddr) -> Option<&IpOwner> {
        self.ip_owner.get(&ip)
    }

    /// The identity an address has as seen from a datapath on `observer_node`: a pod's
    /// identity, the local host, a remote node, or the longest CIDR prefix a policy names
    /// (else the world of its address family).
    pub fn identity_of_ip(&self, ip: IpAddr, observer_node: &str) -> Identity {
        match self.ip_owner.get(&ip) {
            Some(IpOwner::Pod(ns, name)) => {
                if let Some(p) = self.pods.get(&**ns).and_then(|m| m.get(&**name)) {
                    if let Some(id) = p.identity {
                        return id;
                    }
                    return if *p.node == *observer_node {
                        reserved::HOST
                    } else {
                        reserved::REMOTE_NODE
                    };
                }
            }
            Some(IpOwner::Node(n)) => {
                return if n == observer_node {
                    reserved::HOST
                } else {
                    reserved::REMOTE_NODE
                };
            }
            None => {}
        }
        self.world_identity(ip)
    }

    /// The CIDR prefixes policies name, with their identities (for the datapath's ipcache).
    pub fn cidr_identities(&self) -> impl Iterator<Item = (IpNet, Identity)> + '_ {
        self.cidr_ids.iter().map(|(net, (id, _))| (*net, *id))
    }

    /// The identity of an address outside the cluster.
    pub fn world_identity(&self, ip: IpAddr) -> Identity {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        for len in (0..=max).rev() {
            if let Ok(net) = IpNet::new(ip, len) {
                if let Some((id, _)) = self.cidr_ids.get(&net.trunc()) {
                    return *id;
                }
            }
        }
        if ip.is_ipv4() {
            reserved::WORLD_IPV4
        } else {
            reserved::WORLD_IPV6
        }
    }

    /// The table of a pod in one direction (`None` for host-network pods: see the node's).
    pub fn pod_table(
        &self,
        namespace: &str,
        name: &str,
        direction: Direction,
    ) -> Option<Arc<Table>> {
        let p = self.pods.get(namespace)?.get(name)?;
        let keys = self.pod_keys(p)?;
        let key = keys
            .iter()
            .find(|k| matches!(k, TableKey::Pod { direction: d, .. } if *d == direction))?;
        self.tables.get(key).map(|t| t.table.clone())
    }

    pub fn node_table(&self, name: &str, direction: Direction) -> Option<Arc<Table>> {
        self.tables
            .get(&TableKey::Node {
                name: name.to_owned(),
                direction,
            })
            .map(|t| t.table.clone())
    }

    /// Number of distinct tables and their total entries.
    pub fn table_stats(&self) -> (usize, usize) {
        (
            self.tables.len(),
            self.tables.values().map(|t| t.table.len()).sum(),
        )
    }

    /// Pending changes not yet committed.
    pub fn has_pending(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The labels of a node as its host endpoint carries them (`reserved:host` plus the node's
    /// labels), for node selectors.
    pub fn node_labels(&self, name: &str) -> Option<LabelSet> {
        self.nodes.get(name).map(node_labels)
    }
}

/// The distinct selectors of a sorted `uses` list.
fn selectors_of(uses: &[(SelId, RuleId, u16)]) -> Vec<SelId> {
    let mut out: Vec<SelId> = uses.iter().map(|(s, _, _)| *s).collect();
    out.dedup();
    out
}

fn key_direction(key: &TableKey) -> Direction {
    match key {
        TableKey::Pod { direction, .. } | TableKey::Node { direction, .. } => *direction,
    }
}

fn contribution(rule: RuleId, peer: u16, r: &Rule, spec: &PortSpec) -> Contribution {
    Contribution {
        peer,
        audit: r.audit,
        rule,
        action: r.action,
        l7: if r.action == Action::Allow {
            spec.l7.clone()
        } else {
            None
        },
    }
}

fn node_labels(node: &NodeInfo) -> LabelSet {
    let mut labels: Vec<palisade_identity::Label> = node
        .labels
        .iter()
        .map(|(k, v)| palisade_identity::Label::new(palisade_identity::Source::K8s, k, v))
        .collect();
    labels.push(palisade_identity::Label::new(
        palisade_identity::Source::Reserved,
        "host",
        "",
    ));
    LabelSet::new(labels)
}
