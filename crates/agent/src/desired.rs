//! Manifests → the engine, for the agent: a batch is parsed and validated exactly as
//! `palisade simulate` does (the manifest loader, then the same compile step and the same
//! cluster checks as `palisade_policy::cluster::load`, here against the stored state merged
//! with the batch), and applied to a live engine incrementally.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use palisade_identity::{keys, Source};
use palisade_policy::compile::DEFAULT_NAMESPACE;
use palisade_policy::model::{
    CompiledPolicy, DefaultDeny, Direction, PolicyKey, PolicyKind, RuleOrigin, Subject,
};
use palisade_policy::selector::{Requirement, Selector};
use palisade_policy::{cluster, Engine, EngineError, NodeInfo, PodInfo};
use palisade_policy_api::load::{Bundle, Diagnostic, Manifest, Object};
use palisade_policy_api::validate::Severity;

use crate::store::{ObjectKey, ObjectKind};

/// What an object means to the engine.
#[derive(Debug, Clone)]
pub enum Item {
    Namespace(BTreeMap<String, String>),
    Node(NodeInfo),
    Pod(PodInfo),
    Policy(CompiledPolicy),
}

impl Item {
    /// Order of application within a batch (as `cluster::load`): nodes, namespaces, pods,
    /// policies.
    fn rank(&self) -> u8 {
        match self {
            Item::Node(_) => 0,
            Item::Namespace(_) => 1,
            Item::Pod(_) => 2,
            Item::Policy(_) => 3,
        }
    }
}

/// One object of a batch, ready to store and apply.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub key: ObjectKey,
    pub item: Item,
    /// The document, as JSON.
    pub document: serde_json::Value,
    /// `file:line`.
    pub source: String,
    /// Its manifest in the bundle.
    pub manifest: usize,
}

fn warning(m: &Manifest, path: &str, message: String) -> Diagnostic {
    let mut d = m.diagnostic(path, message, None);
    d.severity = Severity::Warning;
    d
}

/// The key of a manifest's object; `Ok(None)` for kinds the agent does not keep.
fn object_key(m: &Manifest) -> Result<Option<ObjectKey>, Diagnostic> {
    let (kind, meta) = match &m.object {
        Object::Namespace(o) => (ObjectKind::Namespace, &o.metadata),
        Object::Node(o) => (ObjectKind::Node, &o.metadata),
        Object::Pod(o) => (ObjectKind::Pod, &o.metadata),
        Object::NetworkPolicy(o) => (ObjectKind::NetworkPolicy, &o.metadata),
        Object::CiliumNetworkPolicy(o) => (ObjectKind::CiliumNetworkPolicy, &o.metadata),
        Object::CiliumClusterwideNetworkPolicy(o) => {
            (ObjectKind::CiliumClusterwideNetworkPolicy, &o.metadata)
        }
        Object::ConnectivityTest(_) => return Ok(None),
    };
    let name = meta
        .name
        .clone()
        .ok_or_else(|| m.diagnostic("metadata.name", "missing", None))?;
    let namespace = kind.is_namespaced().then(|| {
        meta.namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
    });
    Ok(Some(ObjectKey {
        kind,
        namespace,
        name,
    }))
}

/// The keys a batch names (for delete), in order; ConnectivityTests are skipped.
pub fn keys(bundle: &Bundle) -> Result<Vec<ObjectKey>, Vec<Diagnostic>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for m in &bundle.manifests {
        match object_key(m) {
            Ok(Some(k)) => out.push(k),
            Ok(None) => {}
            Err(d) => errors.push(d),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Turns a loaded batch into objects; errors name file, line and field. Warnings are added
/// to `warnings`. ConnectivityTests are skipped with a warning (they are for `simulate` and
/// `lab`, not cluster state). The same key twice in one batch is an error.
pub fn prepare(
    bundle: &Bundle,
    default_node: &str,
    warnings: &mut Vec<Diagnostic>,
) -> Result<Vec<Prepared>, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let compiled = match cluster::compile_policies(bundle) {
        Ok(c) => c,
        Err(e) => {
            errors.extend(e);
            Vec::new()
        }
    };
    // compile_policies keeps the manifests' order.
    let mut compiled = compiled.into_iter().peekable();
    let mut policies: Vec<Option<CompiledPolicy>> = Vec::new();
    for m in &bundle.manifests {
        if compiled.peek().is_some_and(|(cm, _)| std::ptr::eq(*cm, m)) {
            policies.push(compiled.next().map(|(_, c)| c));
        } else {
            policies.push(None);
        }
    }
    let mut out = Vec::new();
    let mut seen: HashMap<ObjectKey, String> = HashMap::new();
    for (index, (m, compiled)) in bundle.manifests.iter().zip(policies).enumerate() {
        let key = match object_key(m) {
            Ok(Some(k)) => k,
            Ok(None) => {
                warnings.push(warning(
                    m,
                    "kind",
                    "ConnectivityTest is not cluster state: the agent skips it (run it with \
                     `palisade simulate` or `palisade lab run`)"
                        .to_owned(),
                ));
                continue;
            }
            Err(d) => {
                errors.push(d);
                continue;
            }
        };
        let source = format!("{}:{}", m.origin.file, m.origin.pos.line);
        if let Some(first) = seen.get(&key) {
            errors.push(m.diagnostic(
                "metadata.name",
                format!("{key} is declared twice in this batch (first at {first})"),
                None,
            ));
            continue;
        }
        seen.insert(key.clone(), source.clone());
        let item = match &m.object {
            Object::Namespace(ns) => Item::Namespace(ns.metadata.labels.clone()),
            Object::Node(n) => Item::Node(NodeInfo {
                name: key.name.clone(),
                labels: n.metadata.labels.clone(),
                ips: n
                    .status
                    .addresses
                    .iter()
                    .filter(|a| a.kind == "InternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect(),
            }),
            Object::Pod(p) => match cluster::pod_info(m, p, default_node) {
                Ok(info) => Item::Pod(info),
                Err(d) => {
                    errors.push(d);
                    continue;
                }
            },
            Object::NetworkPolicy(_)
            | Object::CiliumNetworkPolicy(_)
            | Object::CiliumClusterwideNetworkPolicy(_) => match compiled {
                Some(c) => Item::Policy(c),
                // Its compile error is already reported.
                None => continue,
            },
            Object::ConnectivityTest(_) => continue,
        };
        out.push(Prepared {
            key,
            item,
            document: m.node.to_json(),
            source,
            manifest: index,
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The cluster checks `cluster::load` makes (a pod's node is declared; no address is used
/// twice, except a host-network pod on its node's address), made on the stored objects merged
/// with the batch; errors point at the batch's manifests. `existing` holds the stored items
/// by key; `own_node` always exists.
pub fn check<'a>(
    batch: &[(&Prepared, &Manifest)],
    existing: impl IntoIterator<Item = (&'a ObjectKey, &'a Item)>,
    own_node: &str,
) -> Vec<Diagnostic> {
    let replaced: HashSet<&ObjectKey> = batch.iter().map(|(p, _)| &p.key).collect();
    let kept: Vec<&Item> = existing
        .into_iter()
        .filter(|(k, _)| !replaced.contains(k))
        .map(|(_, i)| i)
        .collect();
    let mut nodes: HashSet<String> = HashSet::new();
    nodes.insert(own_node.to_owned());
    let mut node_ips: HashMap<IpAddr, String> = HashMap::new();
    // Address → (user, host network).
    let mut pod_ips: HashMap<IpAddr, (String, bool)> = HashMap::new();
    for item in &kept {
        match item {
            Item::Node(n) => {
                nodes.insert(n.name.clone());
                for ip in &n.ips {
                    node_ips.insert(*ip, format!("node {}", n.name));
                }
            }
            Item::Pod(p) => {
                pod_ips.insert(
                    p.ip,
                    (format!("pod {}/{}", p.namespace, p.name), p.host_network),
                );
            }
            _ => {}
        }
    }
    let mut errors = Vec::new();
    for (p, m) in batch {
        if let Item::Node(n) = &p.item {
            nodes.insert(n.name.clone());
            for (i, ip) in n.ips.iter().enumerate() {
                let other = node_ips.get(ip).cloned().or_else(|| {
                    pod_ips
                        .get(ip)
                        .filter(|(_, host_network)| !host_network)
                        .map(|(o, _)| o.clone())
                });
                if let Some(other) = other {
                    errors.push(m.diagnostic(
                        &node_address_path(m, i),
                        format!("address {ip} is already used by {other}"),
                        None,
                    ));
                } else {
                    node_ips.insert(*ip, format!("node {}", n.name));
                }
            }
        }
    }
    for (p, m) in batch {
        if let Item::Pod(info) = &p.item {
            if !nodes.contains(&info.node) {
                errors.push(m.diagnostic(
                    "spec.nodeName",
                    format!("no Node named {:?} is declared", info.node),
                    None,
                ));
            }
            let other = match (node_ips.get(&info.ip), pod_ips.get(&info.ip)) {
                // A host-network pod has its node's address.
                (Some(_), _) if info.host_network => None,
                (Some(node), _) => Some(node.clone()),
                (None, Some((pod, _))) => Some(pod.clone()),
                (None, None) => None,
            };
            if let Some(other) = other {
                errors.push(m.diagnostic(
                    "status.podIP",
                    format!("address {} is already used by {other}", info.ip),
                    None,
                ));
            } else if !node_ips.contains_key(&info.ip) {
                pod_ips.insert(
                    info.ip,
                    (
                        format!("pod {}/{}", info.namespace, info.name),
                        info.host_network,
                    ),
                );
            }
        }
    }
    errors
}

/// The field path of a Node's `i`-th InternalIP.
fn node_address_path(m: &Manifest, i: usize) -> String {
    let Object::Node(n) = &m.object else {
        return "status.addresses".to_owned();
    };
    n.status
        .addresses
        .iter()
        .enumerate()
        .filter(|(_, a)| a.kind == "InternalIP")
        .nth(i)
        .map_or_else(
            || "status.addresses".to_owned(),
            |(j, _)| format!("status.addresses[{j}].address"),
        )
}

/// The engine numbers rules 1, 2, 3… in the order policies are upserted, one id per rule and
/// per default-deny marker. Kernel tables carry rule ids (flow events report them), so a
/// restarted agent that numbered rules differently would have to rewrite every table. The
/// agent therefore mirrors the counter, stores each policy's first rule id, and on replay
/// skips ("burns") the ids that replaced or deleted policies had used, so every policy gets
/// its old numbers back. The mirror is checked against the engine after every upsert; if it
/// ever disagrees it gives up (`None`) and numbers are simply what the engine gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleIds {
    next: Option<u32>,
}

impl Default for RuleIds {
    fn default() -> Self {
        Self::new()
    }
}

impl RuleIds {
    /// The counter of a new engine.
    pub fn new() -> Self {
        RuleIds { next: Some(1) }
    }

    /// The id the next rule will get, if known.
    pub fn next(&self) -> Option<u32> {
        self.next
    }
}

/// Name of the policy used to burn rule ids: `:` is not valid in object names, so it never
/// replaces a user's policy.
const SPACER: &str = "palisade-agent:rule-id-spacer";
/// Rule ids burned per spacer upsert.
const SPACER_CHUNK: u32 = 4096;

/// Advances the engine's rule counter by `count` with a policy of default-deny markers that
/// select nothing (its subject is pinned to a namespace that cannot exist), upserted and
/// removed again.
fn burn_rule_ids(engine: &mut Engine, mut count: u32) -> Result<(), EngineError> {
    let key = Arc::new(PolicyKey {
        kind: PolicyKind::CiliumClusterwideNetworkPolicy,
        namespace: None,
        name: SPACER.to_owned(),
    });
    let subject = Subject::Endpoints(Selector::new(vec![Requirement::equals(
        Some(Source::K8s),
        keys::NAMESPACE,
        "palisade.dev/none",
    )]));
    while count > 0 {
        let n = count.min(SPACER_CHUNK);
        let default_deny = (0..n as usize)
            .map(|index| DefaultDeny {
                origin: RuleOrigin {
                    policy: key.clone(),
                    spec_index: None,
                    section: "spacer",
                    index,
                },
                subject: subject.clone(),
                direction: Direction::Ingress,
                audit: false,
            })
            .collect();
        engine.upsert_policy(CompiledPolicy {
            key: key.clone(),
            rules: Vec::new(),
            default_deny,
            prefixes: Vec::new(),
        })?;
        engine.remove_policy(&key);
        count -= n;
    }
    Ok(())
}

fn upsert_policy(
    engine: &mut Engine,
    c: &CompiledPolicy,
    want_first: Option<u32>,
    ids: &mut RuleIds,
) -> Result<Option<u32>, EngineError> {
    if let (Some(want), Some(next)) = (want_first, ids.next) {
        if want > next {
            burn_rule_ids(engine, want - next)?;
            ids.next = Some(want);
        }
    }
    let first = ids.next;
    engine.upsert_policy(c.clone())?;
    let n = u32::try_from(c.rules.len() + c.default_deny.len()).unwrap_or(u32::MAX);
    if n == 0 {
        return Ok(None);
    }
    let matches = |id: u32| {
        engine
            .rule_origin(id)
            .is_some_and(|o| o.policy.as_ref() == c.key.as_ref())
    };
    let confirmed = first
        .filter(|f| matches(*f) && f.checked_add(n - 1).is_some_and(matches) && !matches(f - 1));
    ids.next = confirmed.and_then(|f| f.checked_add(n));
    Ok(confirmed)
}

/// Applies items to the engine in `cluster::load`'s order (nodes, namespaces, pods, policies),
/// creating the namespaces and nodes they name that the engine does not know yet. Each item
/// may carry the first rule id it had before (policies: see [`RuleIds`]). Returns the first
/// rule id of every policy applied (when known). Does not commit.
pub fn apply_items<'a>(
    engine: &mut Engine,
    items: impl IntoIterator<Item = (&'a ObjectKey, &'a Item, Option<u32>)>,
    ids: &mut RuleIds,
) -> Result<Vec<(ObjectKey, Option<u32>)>, EngineError> {
    let mut items: Vec<(&ObjectKey, &Item, Option<u32>)> = items.into_iter().collect();
    items.sort_by_key(|(_, i, _)| i.rank());
    let mut first_rules = Vec::new();
    for (key, item, want_first) in &items {
        match item {
            Item::Node(n) => engine.upsert_node(n.clone()),
            Item::Namespace(labels) => engine.upsert_namespace(&key.name, labels.clone())?,
            Item::Pod(p) => {
                if engine.node(&p.node).is_none() {
                    engine.upsert_node(NodeInfo {
                        name: p.node.clone(),
                        labels: BTreeMap::new(),
                        ips: Vec::new(),
                    });
                }
                ensure_namespace(engine, &p.namespace)?;
                engine.upsert_pod(p.clone())?;
            }
            Item::Policy(c) => {
                if let Some(ns) = &c.key.namespace {
                    ensure_namespace(engine, ns)?;
                }
                let first = upsert_policy(engine, c, *want_first, ids)?;
                first_rules.push(((*key).clone(), first));
            }
        }
    }
    Ok(first_rules)
}

fn ensure_namespace(engine: &mut Engine, ns: &str) -> Result<(), EngineError> {
    if engine.namespace_labels(ns).is_none() {
        engine.upsert_namespace(ns, BTreeMap::new())?;
    }
    Ok(())
}

/// Removes an object from the engine. A deleted Namespace or Node stays known, without labels
/// or addresses (pods may still name it). Does not commit.
pub fn remove_item(engine: &mut Engine, key: &ObjectKey, item: &Item) -> Result<(), EngineError> {
    match item {
        Item::Namespace(_) => engine.upsert_namespace(&key.name, BTreeMap::new())?,
        Item::Node(n) => engine.upsert_node(NodeInfo {
            name: n.name.clone(),
            labels: BTreeMap::new(),
            ips: Vec::new(),
        }),
        Item::Pod(p) => engine.remove_pod(&p.namespace, &p.name),
        Item::Policy(c) => {
            engine.remove_policy(&c.key);
        }
    }
    Ok(())
}

/// Parses a stored document back into its item (validated again, as at apply time).
pub fn reload(
    key: &ObjectKey,
    document: &serde_json::Value,
    file: &str,
    default_node: &str,
) -> Result<Item, String> {
    let text = document.to_string();
    let bundle = palisade_policy_api::load_str(file, &text).map_err(|d| join(&d))?;
    let mut warnings = Vec::new();
    let prepared = prepare(&bundle, default_node, &mut warnings).map_err(|d| join(&d))?;
    match prepared.as_slice() {
        [p] if p.key == *key => Ok(p.item.clone()),
        [p] => Err(format!("the document is {}, not {key}", p.key)),
        _ => Err(format!(
            "the document holds {} objects instead of one",
            prepared.len()
        )),
    }
}

fn join(diags: &[Diagnostic]) -> String {
    diags
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: default, labels: {app: a}}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: other, labels: {app: b}}
spec: {nodeName: n2}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
";

    fn prepare_str(file: &str, text: &str) -> Result<Vec<Prepared>, Vec<Diagnostic>> {
        let bundle = palisade_policy_api::load_str(file, text)?;
        prepare(&bundle, "me", &mut Vec::new())
    }

    fn checked(file: &str, text: &str, existing: &BTreeMap<ObjectKey, Item>) -> Vec<String> {
        let bundle = palisade_policy_api::load_str(file, text).expect("load");
        let prepared = prepare(&bundle, "me", &mut Vec::new()).expect("prepare");
        let pairs: Vec<(&Prepared, &Manifest)> = prepared
            .iter()
            .map(|p| (p, &bundle.manifests[p.manifest]))
            .collect();
        check(&pairs, existing, "me")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_batch_becomes_items_with_defaults() {
        let p = prepare_str("c.yaml", CLUSTER).expect("prepare");
        assert_eq!(p.len(), 3);
        let Item::Pod(a) = &p[0].item else {
            panic!("pod")
        };
        assert_eq!(
            a.node, "me",
            "pods without nodeName run on the agent's node"
        );
        assert_eq!(p[0].source, "c.yaml:1");
        assert_eq!(p[1].key.namespace.as_deref(), Some("other"));
        assert_eq!(p[2].key.namespace, None);
        assert_eq!(p[0].document["status"]["podIP"], "10.0.0.1");
        assert!(checked("c.yaml", CLUSTER, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn cluster_checks_use_the_stored_state() {
        let stored: BTreeMap<ObjectKey, Item> = prepare_str("c.yaml", CLUSTER)
            .expect("prepare")
            .into_iter()
            .map(|p| (p.key, p.item))
            .collect();
        // Another pod on a's address; a pod on an undeclared node.
        let errs = checked(
            "new.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: c}\nstatus: {podIP: 10.0.0.1}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: d}\nspec: {nodeName: n9}\n\
             status: {podIP: 10.0.0.9}\n",
            &stored,
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("new.yaml:4:")
                && errs[0].contains("status.podIP")
                && errs[0].contains("pod default/a"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("new.yaml:9:")
                && errs[1].contains("spec.nodeName")
                && errs[1].contains("n9"),
            "{errs:?}"
        );
        // Re-applying a itself with the same address is fine (it replaces itself).
        let errs = checked(
            "again.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.1}\n",
            &stored,
        );
        assert!(errs.is_empty(), "{errs:?}");
        // A node on a pod's address.
        let errs = checked(
            "node.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n3}\n\
             status: {addresses: [{type: Hostname, address: x}, {type: InternalIP, address: 10.0.0.2}]}\n",
            &stored,
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("status.addresses[1].address"), "{errs:?}");
    }

    #[test]
    fn duplicates_tests_and_bad_policies() {
        let errs = prepare_str(
            "d.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        )
        .expect_err("duplicate");
        assert!(errs[0].to_string().contains("declared twice"), "{errs:?}");

        let mut warnings = Vec::new();
        let bundle = palisade_policy_api::load_str(
            "t.yaml",
            "apiVersion: palisade.dev/v1alpha1\nkind: ConnectivityTest\nmetadata: {name: t}\n\
             spec: {probes: []}\n",
        )
        .expect("load");
        let p = prepare(&bundle, "me", &mut warnings).expect("prepare");
        assert!(p.is_empty());
        assert_eq!(warnings.len(), 1);
    }

    fn policy(name: &str, port: u16) -> Prepared {
        let text = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\n\
             spec:\n  endpointSelector: {{matchLabels: {{app: a}}}}\n  ingress:\n  \
             - toPorts: [{{ports: [{{port: \"{port}\"}}]}}]\n"
        );
        prepare_str("p.yaml", &text).expect("policy").remove(0)
    }

    fn apply_one(
        engine: &mut Engine,
        ids: &mut RuleIds,
        p: &Prepared,
        want: Option<u32>,
    ) -> Option<u32> {
        let first = apply_items(engine, [(&p.key, &p.item, want)], ids).expect("apply");
        assert_eq!(first.len(), 1);
        first[0].1
    }

    #[test]
    fn replay_gives_policies_their_rule_ids_back() {
        let (a1, b, a2) = (policy("a", 80), policy("b", 81), policy("a", 82));
        let mut live = Engine::new(palisade_policy::Config::default());
        let mut ids = RuleIds::new();
        let first_a1 = apply_one(&mut live, &mut ids, &a1, None).expect("a1");
        let first_b = apply_one(&mut live, &mut ids, &b, None).expect("b");
        let first_a2 = apply_one(&mut live, &mut ids, &a2, None).expect("a2");
        assert!(
            first_a1 < first_b && first_b < first_a2,
            "{first_a1} {first_b} {first_a2}"
        );

        // A restart replays b, then a2: each gets its old ids back.
        let mut replay = Engine::new(palisade_policy::Config::default());
        let mut ids2 = RuleIds::new();
        assert_eq!(
            apply_one(&mut replay, &mut ids2, &b, Some(first_b)),
            Some(first_b)
        );
        assert_eq!(
            apply_one(&mut replay, &mut ids2, &a2, Some(first_a2)),
            Some(first_a2)
        );
        assert_eq!(ids2, ids);
        for id in first_b..ids.next().expect("known") {
            assert_eq!(
                replay.rule_origin(id).map(|o| o.policy.clone()),
                live.rule_origin(id).map(|o| o.policy.clone()),
                "rule {id}"
            );
        }
        assert!(
            replay.policies().all(|k| k.name != SPACER),
            "the spacer is gone"
        );
    }

    #[test]
    fn stored_documents_reload() {
        let p = prepare_str("c.yaml", CLUSTER).expect("prepare");
        for o in &p {
            let item = reload(&o.key, &o.document, "store", "me").expect("reload");
            assert_eq!(item.rank(), o.item.rank());
        }
        let err = reload(&p[1].key, &p[0].document, "store", "me").expect_err("mismatch");
        assert!(err.contains("not Pod/other/b"), "{err}");
    }
}
