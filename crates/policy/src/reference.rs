//! A reference evaluator: the verdict of one connection computed directly from the compiled
//! rules, one rule at a time, with none of the engine's machinery (no selector cache, no
//! identity allocator, no tables, nothing incremental).
//!
//! It exists to check the engine: property tests build random clusters and policies and assert
//! that the engine's resolved tables give the same verdicts as this file. Everything here is
//! written to be obviously correct rather than fast; every step is a plain loop over the
//! cluster and the rules, following the semantics the engine documents:
//!
//! - An endpoint is a pod (not host-network) or a node's host endpoint. `Subject::Endpoints`
//!   selects pods by their identity labels; `Subject::Nodes` selects host endpoints by the
//!   node's labels plus `reserved:host`.
//! - The other side of a connection is seen as a label set: a pod's identity labels; the local
//!   host or a remote node (reserved labels) for a node or host-network pod; for an address
//!   outside the cluster the CIDR labels of the longest prefix any policy names, else the
//!   reserved world label of its family.
//! - A rule matches if it selects the endpoint, one of its peers matches the other side and one
//!   of its port specs covers the protocol and port. `fromRequires`/`toRequires` of every rule
//!   of the same action and direction that selects the endpoint narrow its endpoint peers.
//! - Named ports resolve by name and protocol. On ingress, against the endpoint's own
//!   container ports (a host endpoint has none). On egress, for Kubernetes rules against the
//!   pods of the destination's identity (any number they give the name); for Cilium rules
//!   against every pod the peer selects (every pod for a peer that selects everything), and
//!   only if the name means one single number there.
//! - A deny wins; then any allow; then default deny if a marker selects the endpoint; else the
//!   direction is not enforced. With `allow-localhost`, an enforced pod's ingress allows the
//!   local host.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use palisade_identity::{
    cidr_labels, pod_labels, reserved, reserved_labels, Label, LabelSet, Source,
};

use crate::engine::{Config, NamedPort, NodeInfo, PodInfo};
use crate::eval::Party;
use crate::model::{Action, CompiledPolicy, Direction, NamedPorts, Peer, PortMatch, Rule, Subject};
use crate::selector::{Requirement, Selector};

/// The cluster as the reference sees it: plain lists.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// Namespace name → its labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
}

/// The verdict of one direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Some allow rule matches and no deny does. `l7_restricted`: the direction is enforced and
    /// every matching allow carries L7 rules, so the proxy filters requests.
    Allow { l7_restricted: bool },
    /// A deny rule matches.
    Deny,
    /// No rule matches and a policy puts the endpoint into default deny.
    DefaultDeny,
    /// No rule matches and nothing puts the endpoint into default deny.
    NotEnforced,
}

impl Verdict {
    pub fn is_allowed(self) -> bool {
        matches!(self, Verdict::Allow { .. } | Verdict::NotEnforced)
    }
}

/// Both halves of a connection's verdict, as [`crate::eval::FlowVerdict`] has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowVerdict {
    /// The source's egress (`None` when the source has no policy endpoint: outside the cluster,
    /// or a host-network pod on an undeclared node).
    pub egress: Option<Verdict>,
    /// The destination's ingress (`None` likewise).
    pub ingress: Option<Verdict>,
    /// Source and destination are the same pod.
    pub same_endpoint: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("no pod {0}")]
    NoPod(String),
    #[error("no node {0}")]
    NoNode(String),
}

/// One side of a connection, resolved.
#[derive(Debug, Clone, Copy)]
enum Side<'a> {
    /// A pod with its own network namespace.
    Pod(&'a PodInfo),
    /// The host endpoint of a node (a node, or a host-network pod, by node name).
    Host(&'a str),
    /// An address outside the cluster.
    World(IpAddr),
}

impl<'a> Side<'a> {
    fn node(&self) -> Option<&'a str> {
        match *self {
            Side::Pod(p) => Some(&p.node),
            Side::Host(n) => Some(n),
            Side::World(_) => None,
        }
    }
}

/// What a rule needs to know about the other side of the connection.
struct PeerView<'a> {
    labels: LabelSet,
    /// The pods carrying exactly these identity labels (for egress named ports).
    pods: Vec<&'a PodInfo>,
}

impl Cluster {
    fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut labels = self.namespaces.get(ns).cloned().unwrap_or_default();
        // The API server sets this label on every namespace.
        labels
            .entry("kubernetes.io/metadata.name".to_owned())
            .or_insert_with(|| ns.to_owned());
        labels
    }

    /// The identity labels of a pod.
    pub fn pod_labels(&self, pod: &PodInfo, config: &Config) -> LabelSet {
        pod_labels(
            &pod.labels,
            &pod.namespace,
            &self.namespace_labels(&pod.namespace),
            &pod.service_account,
            &config.cluster,
        )
    }

    fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The labels of a node's host endpoint: its labels (source `k8s`) and `reserved:host`.
    pub fn node_labels(node: &NodeInfo) -> LabelSet {
        let mut labels: Vec<Label> = node
            .labels
            .iter()
            .map(|(k, v)| Label::new(Source::K8s, k, v))
            .collect();
        labels.push(Label::new(Source::Reserved, "host", ""));
        LabelSet::new(labels)
    }

    fn resolve<'a>(&'a self, p: &Party) -> Result<Side<'a>, ReferenceError> {
        match p {
            Party::Pod { namespace, name } => {
                let pod = self
                    .pods
                    .iter()
                    .find(|x| x.namespace == *namespace && x.name == *name)
                    .ok_or_else(|| ReferenceError::NoPod(format!("{namespace}/{name}")))?;
                Ok(if pod.host_network {
                    Side::Host(&pod.node)
                } else {
                    Side::Pod(pod)
                })
            }
            Party::Node(n) => {
                let node = self
                    .node(n)
                    .ok_or_else(|| ReferenceError::NoNode(n.clone()))?;
                Ok(Side::Host(&node.name))
            }
            Party::Ip(ip) => {
                if let Some(pod) = self.pods.iter().find(|x| x.ip == *ip) {
                    return Ok(if pod.host_network {
                        Side::Host(&pod.node)
                    } else {
                        Side::Pod(pod)
                    });
                }
                if let Some(node) = self.nodes.iter().find(|n| n.ips.contains(ip)) {
                    return Ok(Side::Host(&node.name));
                }
                Ok(Side::World(*ip))
            }
        }
    }

    /// How `side` looks to a datapath on node `observer` (`None`: outside the cluster).
    fn peer_view<'a>(
        &'a self,
        side: Side<'a>,
        observer: Option<&str>,
        policies: &[CompiledPolicy],
        config: &Config,
    ) -> PeerView<'a> {
        match side {
            Side::Pod(pod) => {
                let labels = self.pod_labels(pod, config);
                let pods = self
                    .pods
                    .iter()
                    .filter(|p| !p.host_network && self.pod_labels(p, config) == labels)
                    .collect();
                PeerView { labels, pods }
            }
            Side::Host(node) => {
                let id = if Some(node) == observer {
                    reserved::HOST
                } else {
                    reserved::REMOTE_NODE
                };
                PeerView {
                    labels: reserved_labels(id).unwrap_or_default(),
                    pods: Vec::new(),
                }
            }
            Side::World(ip) => {
                let longest: Option<IpNet> = policies
                    .iter()
                    .flat_map(|p| p.prefixes.iter())
                    .map(IpNet::trunc)
                    .filter(|net| net.contains(&ip))
                    .max_by_key(IpNet::prefix_len);
                let labels = match longest {
                    Some(net) => cidr_labels(net),
                    None if ip.is_ipv4() => {
                        reserved_labels(reserved::WORLD_IPV4).unwrap_or_default()
                    }
                    None => reserved_labels(reserved::WORLD_IPV6).unwrap_or_default(),
                };
                PeerView {
                    labels,
                    pods: Vec::new(),
                }
            }
        }
    }
}

/// The endpoint whose policy is being judged.
enum Subjectee<'a> {
    Pod { pod: &'a PodInfo, labels: LabelSet },
    Host { labels: LabelSet },
}

impl Subjectee<'_> {
    fn selected_by(&self, subject: &Subject) -> bool {
        match (self, subject) {
            (Subjectee::Pod { labels, .. }, Subject::Endpoints(sel))
            | (Subjectee::Host { labels }, Subject::Nodes(sel)) => sel.matches(labels),
            _ => false,
        }
    }
}

/// The numbers some container ports give a port name on a protocol.
fn numbers<'a>(
    name: &str,
    proto: u8,
    ports: impl IntoIterator<Item = &'a NamedPort>,
) -> BTreeSet<u16> {
    ports
        .into_iter()
        .filter(|p| p.name == name && p.proto == proto)
        .map(|p| p.port)
        .collect()
}

/// Judges one direction at one endpoint against one peer.
#[allow(clippy::too_many_arguments)]
fn judge(
    cluster: &Cluster,
    policies: &[CompiledPolicy],
    config: &Config,
    endpoint: &Subjectee<'_>,
    direction: Direction,
    peer: &PeerView<'_>,
    peer_is_local_host: bool,
    proto: u8,
    port: u16,
) -> Verdict {
    let rules: Vec<&Rule> = policies
        .iter()
        .flat_map(|p| p.rules.iter())
        .filter(|r| r.direction == direction && endpoint.selected_by(&r.subject))
        .collect();
    let enforcing = policies
        .iter()
        .flat_map(|p| p.default_deny.iter())
        .any(|d| d.direction == direction && endpoint.selected_by(&d.subject));

    let requires = |action: Action| -> Vec<Requirement> {
        rules
            .iter()
            .filter(|r| r.action == action)
            .flat_map(|r| r.requires.iter().cloned())
            .collect()
    };
    let allow_requires = requires(Action::Allow);
    let deny_requires = requires(Action::Deny);

    let mut denied = false;
    let mut allowed = false;
    let mut unrestricted = false;
    for rule in &rules {
        let reqs = match rule.action {
            Action::Allow => &allow_requires,
            Action::Deny => &deny_requires,
        };
        for p in &rule.peers {
            // Whether the peer matches the other side; and the pods it selects, on which a
            // Cilium egress named port must mean a single number.
            let selector: Option<Selector> = match p {
                Peer::Any => None,
                Peer::Select {
                    selector,
                    endpoints,
                } => Some(if *endpoints {
                    selector.and(reqs)
                } else {
                    selector.clone()
                }),
                // Only connections whose destination was learned from DNS match these.
                Peer::Fqdn(_) => continue,
            };
            if !selector.as_ref().is_none_or(|s| s.matches(&peer.labels)) {
                continue;
            }
            let selected_pods: Vec<&PodInfo> = cluster
                .pods
                .iter()
                .filter(|x| !x.host_network)
                .filter(|x| {
                    selector
                        .as_ref()
                        .is_none_or(|s| s.matches(&cluster.pod_labels(x, config)))
                })
                .collect();
            for spec in &rule.ports {
                let covered = if spec.proto == 0 {
                    true
                } else if spec.proto != proto {
                    false
                } else {
                    match &spec.ports {
                        PortMatch::Range(lo, hi) => *lo <= port && port <= *hi,
                        PortMatch::Named(name) => match (direction, endpoint) {
                            // Ingress: the endpoint's own container ports.
                            (Direction::Ingress, Subjectee::Pod { pod, .. }) => {
                                numbers(name, spec.proto, &pod.ports).contains(&port)
                            }
                            // A host endpoint has no container ports of its own.
                            (Direction::Ingress, Subjectee::Host { .. }) => false,
                            // Kubernetes egress: the destination's own pods.
                            (Direction::Egress, _)
                                if rule.named_ports == NamedPorts::PerDestination =>
                            {
                                numbers(name, spec.proto, peer.pods.iter().flat_map(|x| &x.ports))
                                    .contains(&port)
                            }
                            // Cilium egress: one number across every pod the peer selects.
                            (Direction::Egress, _) => {
                                numbers(
                                    name,
                                    spec.proto,
                                    selected_pods.iter().flat_map(|x| &x.ports),
                                ) == BTreeSet::from([port])
                            }
                        },
                    }
                };
                if !covered {
                    continue;
                }
                match rule.action {
                    Action::Deny => denied = true,
                    Action::Allow => {
                        allowed = true;
                        if spec.l7.is_none() {
                            unrestricted = true;
                        }
                    }
                }
            }
        }
    }
    if config.allow_localhost
        && enforcing
        && direction == Direction::Ingress
        && matches!(endpoint, Subjectee::Pod { .. })
        && peer_is_local_host
    {
        allowed = true;
        unrestricted = true;
    }
    if denied {
        Verdict::Deny
    } else if allowed {
        Verdict::Allow {
            l7_restricted: enforcing && !unrestricted,
        }
    } else if enforcing {
        Verdict::DefaultDeny
    } else {
        Verdict::NotEnforced
    }
}

/// The policy endpoint of a side, if it has one.
fn endpoint_of<'a>(cluster: &'a Cluster, config: &Config, side: Side<'a>) -> Option<Subjectee<'a>> {
    match side {
        Side::Pod(pod) => Some(Subjectee::Pod {
            pod,
            labels: cluster.pod_labels(pod, config),
        }),
        Side::Host(n) => cluster.node(n).map(|node| Subjectee::Host {
            labels: Cluster::node_labels(node),
        }),
        Side::World(_) => None,
    }
}

/// The verdict of a connection from `src` to `dst` on (proto, port) — for ICMP the port is the
/// type — computed rule by rule.
pub fn evaluate(
    cluster: &Cluster,
    policies: &[CompiledPolicy],
    config: &Config,
    src: &Party,
    dst: &Party,
    proto: u8,
    port: u16,
) -> Result<FlowVerdict, ReferenceError> {
    let s = cluster.resolve(src)?;
    let d = cluster.resolve(dst)?;
    let same_endpoint = match (s, d) {
        (Side::Pod(a), Side::Pod(b)) => a.namespace == b.namespace && a.name == b.name,
        _ => false,
    };
    // Each side as the other side's datapath sees it.
    let src_seen = cluster.peer_view(s, d.node(), policies, config);
    let dst_seen = cluster.peer_view(d, s.node(), policies, config);

    // A host peer is the local host when both sides are on the same node.
    let is_local_host = |peer: Side<'_>, endpoint: Side<'_>| matches!(peer, Side::Host(n) if endpoint.node() == Some(n));
    let egress = endpoint_of(cluster, config, s).map(|e| {
        judge(
            cluster,
            policies,
            config,
            &e,
            Direction::Egress,
            &dst_seen,
            is_local_host(d, s),
            proto,
            port,
        )
    });
    let ingress = endpoint_of(cluster, config, d).map(|e| {
        judge(
            cluster,
            policies,
            config,
            &e,
            Direction::Ingress,
            &src_seen,
            is_local_host(s, d),
            proto,
            port,
        )
    });
    Ok(FlowVerdict {
        egress,
        ingress,
        same_endpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DefaultDeny, PolicyKey, PolicyKind, PortSpec, RuleOrigin};
    use std::sync::Arc;

    fn pod(ns: &str, name: &str, app: &str, ip: &str) -> PodInfo {
        PodInfo {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            labels: [("app".to_owned(), app.to_owned())].into_iter().collect(),
            service_account: "default".to_owned(),
            node: "n1".to_owned(),
            host_network: false,
            ip: ip.parse().unwrap(),
            ports: Vec::new(),
        }
    }

    #[test]
    fn allow_deny_and_default_deny() {
        let cluster = Cluster {
            namespaces: BTreeMap::new(),
            nodes: vec![NodeInfo {
                name: "n1".to_owned(),
                labels: BTreeMap::new(),
                ips: vec!["10.0.255.1".parse().unwrap()],
            }],
            pods: vec![
                pod("ns", "a", "a", "10.0.0.1"),
                pod("ns", "b", "b", "10.0.0.2"),
            ],
        };
        let key = Arc::new(PolicyKey {
            kind: PolicyKind::NetworkPolicy,
            namespace: Some("ns".into()),
            name: "p".into(),
        });
        let origin = RuleOrigin {
            policy: key.clone(),
            spec_index: None,
            section: "ingress",
            index: 0,
        };
        let subject = Subject::Endpoints(Selector::new(vec![Requirement::equals(
            Some(Source::K8s),
            "app",
            "b",
        )]));
        let policy = CompiledPolicy {
            key,
            rules: vec![Rule {
                origin: origin.clone(),
                subject: subject.clone(),
                direction: Direction::Ingress,
                action: Action::Allow,
                peers: vec![Peer::Any],
                ports: vec![PortSpec {
                    proto: 6,
                    ports: PortMatch::Range(80, 80),
                    l7: None,
                }],
                requires: Vec::new(),
                named_ports: NamedPorts::PerDestination,
                audit: false,
            }],
            default_deny: vec![DefaultDeny {
                origin,
                subject,
                direction: Direction::Ingress,
                audit: false,
            }],
            prefixes: Vec::new(),
        };
        let a = Party::Pod {
            namespace: "ns".into(),
            name: "a".into(),
        };
        let b = Party::Pod {
            namespace: "ns".into(),
            name: "b".into(),
        };
        let cfg = Config::default();
        let v = evaluate(&cluster, std::slice::from_ref(&policy), &cfg, &a, &b, 6, 80).unwrap();
        assert_eq!(
            v.ingress,
            Some(Verdict::Allow {
                l7_restricted: false
            })
        );
        assert_eq!(v.egress, Some(Verdict::NotEnforced));
        let v = evaluate(&cluster, std::slice::from_ref(&policy), &cfg, &a, &b, 6, 81).unwrap();
        assert_eq!(v.ingress, Some(Verdict::DefaultDeny));
        // allow-localhost: the local node reaches the enforced pod.
        let v = evaluate(
            &cluster,
            &[policy],
            &cfg,
            &Party::Node("n1".into()),
            &b,
            6,
            81,
        )
        .unwrap();
        assert_eq!(
            v.ingress,
            Some(Verdict::Allow {
                l7_restricted: false
            })
        );
    }
}
