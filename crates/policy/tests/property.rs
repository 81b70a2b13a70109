//! Property tests of the policy engine.
//!
//! 1. Random namespaces, nodes, pods and policies (Kubernetes NetworkPolicy, CiliumNetworkPolicy,
//!    CiliumClusterwideNetworkPolicy, compiled from their API structs); the engine's resolved
//!    tables must give, on random probes, the verdict the rule-by-rule reference evaluator
//!    (`palisade_policy::reference`) computes, per direction.
//! 2. Incremental updates: an engine that went through a random sequence of changes (pods
//!    added, removed, relabelled, re-ported; namespaces and nodes relabelled; policies added,
//!    replaced, removed; a commit after each) must judge every probe exactly as an engine built
//!    from scratch with the final state, down to the rules it cites.
//!
//! `PROPTEST_CASES` overrides the number of cases (256 by default).

// Helpers outside `#[test]` functions: a panic is how they fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;

use palisade_policy::compile;
use palisade_policy::engine::{Config, Engine, NamedPort, NodeInfo, PodInfo};
use palisade_policy::eval::{self, Party};
use palisade_policy::model::{proto, CompiledPolicy, PolicyKey, PolicyKind};
use palisade_policy::reference::{self, Cluster, Verdict};
use palisade_policy::table::{Decision, L7Decision};
use palisade_policy_api::cilium;
use palisade_policy_api::k8s;
use palisade_policy_api::meta::{
    IntOrString, LabelSelector, LabelSelectorRequirement, ObjectMeta, SelectorOperator,
};

// ---------------------------------------------------------------------------------------------
// Vocabulary
// ---------------------------------------------------------------------------------------------

const NAMESPACES: &[&str] = &["ns0", "ns1", "ns2", "ns3"];
const NODES: &[&str] = &["node-1", "node-2"];

/// CIDRs policies name, with the excepts that lie inside each.
const CIDRS: &[(&str, &[&str])] = &[
    ("10.0.0.0/16", &["10.0.200.0/24", "10.0.0.0/24"]),
    ("10.0.200.0/24", &["10.0.200.0/28"]),
    ("192.0.2.0/24", &["192.0.2.128/25", "192.0.2.10/32"]),
    ("0.0.0.0/0", &["10.0.0.0/8", "192.0.2.0/24"]),
    ("8.8.8.8/32", &[]),
    ("2001:db8::/32", &["2001:db8::/64"]),
    ("::/0", &[]),
];

/// Addresses outside the cluster that probes use: inside and outside the CIDRs above.
const EXTERNAL_IPS: &[&str] = &[
    "192.0.2.10",
    "192.0.2.200",
    "8.8.8.8",
    "1.1.1.1",
    "10.0.200.7",
    "10.0.200.99",
    "2001:db8::1",
    "2001:db8:1::1",
];

/// (protocol, port) of probes; for ICMP the port is the type.
const PROBE_PORTS: &[(u8, u16)] = &[
    (proto::TCP, 80),
    (proto::TCP, 80),
    (proto::TCP, 80),
    (proto::TCP, 81),
    (proto::TCP, 81),
    (proto::UDP, 53),
    (proto::TCP, 9090),
    (proto::TCP, 53),
    (proto::UDP, 53),
    (proto::TCP, 9090),
    (proto::TCP, 443),
    (proto::UDP, 80),
    (proto::SCTP, 80),
    (proto::SCTP, 9090),
    (proto::ICMP, 8),
    (proto::ICMP, 0),
];

/// Container ports pods may declare; `http` on two numbers exercises ambiguous names.
const CONTAINER_PORTS: &[(&str, u8, u16)] = &[
    ("http", proto::TCP, 80),
    ("http", proto::TCP, 80),
    ("http", proto::TCP, 81),
    ("dns", proto::UDP, 53),
    ("dns", proto::TCP, 53),
    ("metrics", proto::TCP, 9090),
];

/// One piece of a label selector.
#[derive(Debug, Clone, Copy)]
enum Atom {
    L(&'static str, &'static str),
    E(&'static str, SelectorOperator, &'static [&'static str]),
}

use SelectorOperator::{DoesNotExist, Exists, In, NotIn};

/// Kubernetes pod selectors (plain keys, read from `k8s`).
const POD_ATOMS: &[Atom] = &[
    Atom::L("app", "a"),
    Atom::L("app", "b"),
    Atom::L("app", "c"),
    Atom::L("tier", "x"),
    Atom::L("tier", "y"),
    Atom::E("app", In, &["a", "b"]),
    Atom::E("app", NotIn, &["a"]),
    Atom::E("app", NotIn, &["b", "c"]),
    Atom::E("app", Exists, &[]),
    Atom::E("tier", In, &["y"]),
    Atom::E("tier", Exists, &[]),
    Atom::E("tier", DoesNotExist, &[]),
    Atom::E("role", Exists, &[]),
    Atom::E("role", DoesNotExist, &[]),
];

/// Kubernetes namespace selectors.
const NS_ATOMS: &[Atom] = &[
    Atom::L("team", "red"),
    Atom::L("team", "blue"),
    Atom::L("env", "prod"),
    Atom::L("env", "dev"),
    Atom::L("kubernetes.io/metadata.name", "ns1"),
    Atom::E("team", In, &["red", "blue"]),
    Atom::E("env", NotIn, &["prod"]),
    Atom::E("team", Exists, &[]),
    Atom::E("env", DoesNotExist, &[]),
    Atom::E("kubernetes.io/metadata.name", In, &["ns0", "ns2"]),
];

/// Cilium endpoint selectors (subjects and fromEndpoints/toEndpoints).
const CILIUM_ATOMS: &[Atom] = &[
    Atom::L("app", "a"),
    Atom::L("k8s:app", "b"),
    Atom::L("any:app", "c"),
    Atom::L("tier", "x"),
    Atom::E("app", In, &["a", "c"]),
    Atom::E("app", NotIn, &["a"]),
    Atom::E("k8s:tier", Exists, &[]),
    Atom::E("tier", DoesNotExist, &[]),
    Atom::L("io.kubernetes.pod.namespace", "ns1"),
    Atom::L("k8s:io.kubernetes.pod.namespace", "ns0"),
    Atom::E("io.kubernetes.pod.namespace", NotIn, &["ns2"]),
    Atom::L("k8s:io.cilium.k8s.namespace.labels.team", "red"),
    Atom::L("io.cilium.k8s.namespace.labels.env", "prod"),
    Atom::E("io.cilium.k8s.namespace.labels.team", Exists, &[]),
    Atom::L("io.cilium.k8s.policy.serviceaccount", "sa1"),
    Atom::L("reserved:host", ""),
    Atom::E("reserved:world", Exists, &[]),
];

/// fromRequires / toRequires.
const REQUIRE_ATOMS: &[Atom] = &[
    Atom::L("app", "a"),
    Atom::L("tier", "x"),
    Atom::E("app", NotIn, &["c"]),
    Atom::E("tier", Exists, &[]),
    Atom::L("io.cilium.k8s.namespace.labels.env", "prod"),
    Atom::L("io.kubernetes.pod.namespace", "ns0"),
];

/// Host policy node selectors.
const NODE_ATOMS: &[Atom] = &[
    Atom::L("role", "worker"),
    Atom::L("k8s:role", "edge"),
    Atom::E("role", Exists, &[]),
    Atom::E("role", DoesNotExist, &[]),
    Atom::L("reserved:host", ""),
];

const ENTITIES: &[&str] = &[
    "world",
    "cluster",
    "host",
    "all",
    "remote-node",
    "world-ipv4",
    "world-ipv6",
    "none",
];

fn selector(atoms: &[Atom]) -> LabelSelector {
    let mut s = LabelSelector::default();
    for a in atoms {
        match *a {
            Atom::L(k, v) => {
                s.match_labels.insert(k.to_owned(), v.to_owned());
            }
            Atom::E(k, op, values) => s.match_expressions.push(LabelSelectorRequirement {
                key: k.to_owned(),
                operator: op,
                values: values.iter().map(|v| (*v).to_owned()).collect(),
            }),
        }
    }
    s
}

fn selector_of(atoms: &'static [Atom], max: usize) -> impl Strategy<Value = LabelSelector> {
    vec(select(atoms), 0..=max).prop_map(|a| selector(&a))
}

fn meta(name: String, namespace: Option<String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace,
        ..ObjectMeta::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------------

type Labels = BTreeMap<String, String>;

fn ns_labels() -> impl Strategy<Value = Labels> {
    (
        option::of(select(&["red", "blue"][..])),
        option::of(select(&["prod", "dev"][..])),
    )
        .prop_map(|(team, env)| {
            let mut l = Labels::new();
            if let Some(t) = team {
                l.insert("team".to_owned(), t.to_owned());
            }
            if let Some(e) = env {
                l.insert("env".to_owned(), e.to_owned());
            }
            l
        })
}

fn node_labels() -> impl Strategy<Value = Labels> {
    option::of(select(&["worker", "edge"][..])).prop_map(|role| {
        role.into_iter()
            .map(|r| ("role".to_owned(), r.to_owned()))
            .collect()
    })
}

fn pod_labels() -> impl Strategy<Value = Labels> {
    (
        option::of(select(&["a", "b", "c"][..])),
        option::of(select(&["x", "y"][..])),
    )
        .prop_map(|(app, tier)| {
            let mut l = Labels::new();
            if let Some(a) = app {
                l.insert("app".to_owned(), a.to_owned());
            }
            if let Some(t) = tier {
                l.insert("tier".to_owned(), t.to_owned());
            }
            l
        })
}

fn container_ports() -> impl Strategy<Value = Vec<NamedPort>> {
    vec(select(CONTAINER_PORTS), 0..=4).prop_map(|ps| {
        let mut out: Vec<NamedPort> = ps
            .into_iter()
            .map(|(name, proto, port)| NamedPort {
                name: name.to_owned(),
                proto,
                port,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    })
}

/// A pod before it gets its name, address and place.
#[derive(Debug, Clone)]
struct RawPod {
    ns: usize,
    node: usize,
    labels: Labels,
    service_account: &'static str,
    host_network: bool,
    ports: Vec<NamedPort>,
}

fn raw_pod() -> impl Strategy<Value = RawPod> {
    (
        0..NAMESPACES.len(),
        0..NODES.len(),
        pod_labels(),
        select(&["default", "sa1"][..]),
        prop::bool::weighted(0.1),
        container_ports(),
    )
        .prop_map(
            |(ns, node, labels, service_account, host_network, ports)| RawPod {
                ns,
                node,
                labels,
                service_account,
                host_network,
                ports,
            },
        )
}

// ---------------------------------------------------------------------------------------------
// Kubernetes NetworkPolicy
// ---------------------------------------------------------------------------------------------

fn ip_block() -> impl Strategy<Value = k8s::IpBlock> {
    (0..CIDRS.len(), vec(any::<prop::sample::Index>(), 0..=2)).prop_map(|(i, ex)| {
        let (cidr, excepts) = CIDRS[i];
        let mut except: Vec<String> = if excepts.is_empty() {
            Vec::new()
        } else {
            ex.iter()
                .map(|x| (*x.get(excepts)).to_owned())
                .collect::<Vec<_>>()
        };
        except.sort();
        except.dedup();
        k8s::IpBlock {
            cidr: cidr.to_owned(),
            except,
        }
    })
}

fn knp_peer() -> impl Strategy<Value = k8s::NetworkPolicyPeer> {
    prop_oneof![
        selector_of(POD_ATOMS, 2).prop_map(|p| k8s::NetworkPolicyPeer {
            pod_selector: Some(p),
            ..Default::default()
        }),
        selector_of(NS_ATOMS, 2).prop_map(|n| k8s::NetworkPolicyPeer {
            namespace_selector: Some(n),
            ..Default::default()
        }),
        (selector_of(NS_ATOMS, 1), selector_of(POD_ATOMS, 2)).prop_map(|(n, p)| {
            k8s::NetworkPolicyPeer {
                pod_selector: Some(p),
                namespace_selector: Some(n),
                ip_block: None,
            }
        }),
        ip_block().prop_map(|b| k8s::NetworkPolicyPeer {
            ip_block: Some(b),
            ..Default::default()
        }),
    ]
}

fn knp_port() -> impl Strategy<Value = k8s::NetworkPolicyPort> {
    let port = prop_oneof![
        1 => select(&[80i64, 81, 53, 9090, 443][..]).prop_map(IntOrString::Int),
        1 => select(&["http", "dns", "metrics"][..]).prop_map(|s| IntOrString::Str(s.to_owned())),
    ];
    (
        option::of(select(&["TCP", "UDP", "SCTP"][..])),
        option::of(port),
        option::weighted(0.3, select(&[81i64, 443, 9090][..])),
    )
        .prop_map(|(protocol, port, end)| k8s::NetworkPolicyPort {
            protocol: protocol.map(str::to_owned),
            end_port: if matches!(port, Some(IntOrString::Int(_))) {
                end
            } else {
                None
            },
            port,
        })
}

type KnpRule = (
    Option<Vec<k8s::NetworkPolicyPeer>>,
    Option<Vec<k8s::NetworkPolicyPort>>,
);

fn knp_rule() -> impl Strategy<Value = KnpRule> {
    (
        option::weighted(0.8, vec(knp_peer(), 0..=2)),
        option::weighted(0.7, vec(knp_port(), 0..=2)),
    )
}

fn knp_spec() -> impl Strategy<Value = k8s::NetworkPolicySpec> {
    let types = option::of(select(vec![
        vec!["Ingress"],
        vec!["Egress"],
        vec!["Ingress", "Egress"],
    ]));
    (
        selector_of(POD_ATOMS, 2),
        types,
        option::weighted(0.8, vec(knp_rule(), 0..=2)),
        option::weighted(0.6, vec(knp_rule(), 0..=2)),
    )
        .prop_map(
            |(pod_selector, types, ingress, egress)| k8s::NetworkPolicySpec {
                pod_selector,
                policy_types: types.map(|t| t.into_iter().map(str::to_owned).collect()),
                ingress: ingress.map(|rs| {
                    rs.into_iter()
                        .map(|(from, ports)| k8s::NetworkPolicyIngressRule { from, ports })
                        .collect()
                }),
                egress: egress.map(|rs| {
                    rs.into_iter()
                        .map(|(to, ports)| k8s::NetworkPolicyEgressRule { to, ports })
                        .collect()
                }),
            },
        )
}

// ---------------------------------------------------------------------------------------------
// Cilium
// ---------------------------------------------------------------------------------------------

/// The L3 part of a Cilium rule (at most one kind, as Cilium's validation demands).
#[derive(Debug, Clone)]
enum L3 {
    None,
    Endpoints(Vec<LabelSelector>),
    Cidr(Vec<String>),
    CidrSet(Vec<cilium::CidrRule>),
    Entities(Vec<String>),
}

/// The L4 part: toPorts or icmps (not both, as Cilium's validation demands).
#[derive(Debug, Clone)]
enum L4 {
    None,
    Ports(Vec<cilium::PortRule>),
    Icmps(Vec<cilium::IcmpRule>),
}

#[derive(Debug, Clone)]
struct CRule {
    l3: L3,
    requires: Option<Vec<LabelSelector>>,
    l4: L4,
}

fn l3() -> impl Strategy<Value = L3> {
    prop_oneof![
        2 => Just(L3::None),
        4 => vec(selector_of(CILIUM_ATOMS, 2), 0..=2).prop_map(L3::Endpoints),
        1 => vec(select(CIDRS).prop_map(|(c, _)| c.to_owned()), 1..=2).prop_map(L3::Cidr),
        1 => vec(ip_block(), 1..=2).prop_map(|bs| L3::CidrSet(
            bs.into_iter()
                .map(|b| cilium::CidrRule {
                    cidr: Some(b.cidr),
                    except: b.except,
                    ..Default::default()
                })
                .collect()
        )),
        2 => vec(select(ENTITIES).prop_map(str::to_owned), 0..=2).prop_map(L3::Entities),
    ]
}

fn port_protocol() -> impl Strategy<Value = cilium::PortProtocol> {
    (
        option::weighted(
            0.9,
            select(
                &[
                    "80", "81", "53", "9090", "443", "0", "http", "http", "dns", "metrics",
                ][..],
            ),
        ),
        option::of(select(&["TCP", "UDP", "SCTP", "ANY"][..])),
        option::weighted(0.2, select(&[0i64, 81, 443, 9090, 65535][..])),
    )
        .prop_map(|(port, protocol, end_port)| cilium::PortProtocol {
            port: port.map(str::to_owned),
            end_port,
            protocol: protocol.map(str::to_owned),
        })
}

fn http_rules() -> impl Strategy<Value = cilium::L7Rules> {
    vec(
        (
            option::of(select(&["GET", "POST"][..])),
            option::of(select(&["/public", "/v1/.*"][..])),
        ),
        0..=2,
    )
    .prop_map(|rs| cilium::L7Rules {
        http: Some(
            rs.into_iter()
                .map(|(method, path)| cilium::HttpRule {
                    method: method.map(str::to_owned),
                    path: path.map(str::to_owned),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    })
}

fn l4() -> impl Strategy<Value = L4> {
    let port_rule = (
        option::weighted(0.95, vec(port_protocol(), 0..=2)),
        option::weighted(0.3, http_rules()),
    )
        .prop_map(|(ports, rules)| cilium::PortRule {
            ports,
            rules,
            ..Default::default()
        });
    let icmp = vec(
        prop_oneof![
            Just(IntOrString::Int(8)),
            Just(IntOrString::Str("EchoRequest".to_owned())),
            Just(IntOrString::Int(0)),
            Just(IntOrString::Int(3)),
        ],
        1..=2,
    )
    .prop_map(|types| cilium::IcmpRule {
        fields: types
            .into_iter()
            .map(|t| cilium::IcmpField {
                family: None,
                icmp_type: t,
            })
            .collect(),
    });
    prop_oneof![
        2 => Just(L4::None),
        4 => vec(port_rule, 1..=2).prop_map(L4::Ports),
        1 => vec(icmp, 1..=1).prop_map(L4::Icmps),
    ]
}

fn crule() -> impl Strategy<Value = CRule> {
    (
        l3(),
        option::weighted(0.3, vec(selector_of(REQUIRE_ATOMS, 2), 1..=1)),
        l4(),
    )
        .prop_map(|(l3, requires, l4)| CRule { l3, requires, l4 })
}

/// `fromEndpoints`, `fromCIDR`, `fromCIDRSet`, `fromEntities` (or the `to` forms).
type L3Fields = (
    Option<Vec<LabelSelector>>,
    Option<Vec<String>>,
    Option<Vec<cilium::CidrRule>>,
    Option<Vec<String>>,
);

impl CRule {
    fn split(&self) -> L3Fields {
        match &self.l3 {
            L3::None => (None, None, None, None),
            L3::Endpoints(e) => (Some(e.clone()), None, None, None),
            L3::Cidr(c) => (None, Some(c.clone()), None, None),
            L3::CidrSet(c) => (None, None, Some(c.clone()), None),
            L3::Entities(e) => (None, None, None, Some(e.clone())),
        }
    }

    fn ports(&self) -> Option<Vec<cilium::PortRule>> {
        match &self.l4 {
            L4::Ports(p) => Some(p.clone()),
            _ => None,
        }
    }

    fn deny_ports(&self) -> Option<Vec<cilium::PortDenyRule>> {
        self.ports().map(|ps| {
            ps.into_iter()
                .map(|p| cilium::PortDenyRule { ports: p.ports })
                .collect()
        })
    }

    fn icmps(&self) -> Option<Vec<cilium::IcmpRule>> {
        match &self.l4 {
            L4::Icmps(i) => Some(i.clone()),
            _ => None,
        }
    }

    fn ingress(&self) -> cilium::IngressRule {
        let (from_endpoints, from_cidr, from_cidr_set, from_entities) = self.split();
        cilium::IngressRule {
            from_endpoints,
            from_requires: self.requires.clone(),
            from_cidr,
            from_cidr_set,
            from_entities,
            to_ports: self.ports(),
            icmps: self.icmps(),
            ..Default::default()
        }
    }

    fn ingress_deny(&self) -> cilium::IngressDenyRule {
        let (from_endpoints, from_cidr, from_cidr_set, from_entities) = self.split();
        cilium::IngressDenyRule {
            from_endpoints,
            from_requires: self.requires.clone(),
            from_cidr,
            from_cidr_set,
            from_entities,
            to_ports: self.deny_ports(),
            icmps: self.icmps(),
            ..Default::default()
        }
    }

    fn egress(&self) -> cilium::EgressRule {
        let (to_endpoints, to_cidr, to_cidr_set, to_entities) = self.split();
        cilium::EgressRule {
            to_endpoints,
            to_requires: self.requires.clone(),
            to_cidr,
            to_cidr_set,
            to_entities,
            to_ports: self.ports(),
            icmps: self.icmps(),
            ..Default::default()
        }
    }

    fn egress_deny(&self) -> cilium::EgressDenyRule {
        let (to_endpoints, to_cidr, to_cidr_set, to_entities) = self.split();
        cilium::EgressDenyRule {
            to_endpoints,
            to_requires: self.requires.clone(),
            to_cidr,
            to_cidr_set,
            to_entities,
            to_ports: self.deny_ports(),
            icmps: self.icmps(),
            ..Default::default()
        }
    }
}

/// One Cilium rule (`spec` or an element of `specs`). `node` selects nodes instead of
/// endpoints; it only takes effect in a clusterwide policy.
#[derive(Debug, Clone)]
struct CSpec {
    subject: LabelSelector,
    node: Option<LabelSelector>,
    ingress: Option<Vec<CRule>>,
    ingress_deny: Option<Vec<CRule>>,
    egress: Option<Vec<CRule>>,
    egress_deny: Option<Vec<CRule>>,
    default_deny: Option<(Option<bool>, Option<bool>)>,
}

fn cspec() -> impl Strategy<Value = CSpec> {
    let dd = option::weighted(0.25, (option::of(any::<bool>()), option::of(any::<bool>())));
    (
        selector_of(CILIUM_ATOMS, 2),
        option::weighted(0.15, selector_of(NODE_ATOMS, 1)),
        option::weighted(0.75, vec(crule(), 0..=2)),
        option::weighted(0.3, vec(crule(), 0..=1)),
        option::weighted(0.6, vec(crule(), 0..=2)),
        option::weighted(0.25, vec(crule(), 0..=1)),
        dd,
    )
        .prop_map(
            |(subject, node, ingress, ingress_deny, egress, egress_deny, default_deny)| CSpec {
                subject,
                node,
                ingress,
                ingress_deny,
                egress,
                egress_deny,
                default_deny,
            },
        )
}

impl CSpec {
    fn rule(&self, clusterwide: bool) -> cilium::Rule {
        let node = self.node.clone().filter(|_| clusterwide);
        let map = |rs: &Option<Vec<CRule>>| rs.clone();
        cilium::Rule {
            endpoint_selector: if node.is_some() {
                None
            } else {
                Some(self.subject.clone())
            },
            node_selector: node,
            ingress: map(&self.ingress).map(|rs| rs.iter().map(CRule::ingress).collect()),
            ingress_deny: map(&self.ingress_deny)
                .map(|rs| rs.iter().map(CRule::ingress_deny).collect()),
            egress: map(&self.egress).map(|rs| rs.iter().map(CRule::egress).collect()),
            egress_deny: map(&self.egress_deny)
                .map(|rs| rs.iter().map(CRule::egress_deny).collect()),
            enable_default_deny: self.default_deny.map(|(i, e)| cilium::DefaultDenyConfig {
                ingress: i,
                egress: e,
            }),
            ..Default::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------------

/// A policy before it gets its name: kind, namespace index and contents.
#[derive(Debug, Clone)]
enum RawPolicy {
    Knp {
        ns: usize,
        spec: k8s::NetworkPolicySpec,
    },
    Cilium {
        clusterwide: bool,
        ns: usize,
        /// One: `spec`; two: `specs`.
        specs: Vec<CSpec>,
    },
}

fn raw_policy() -> impl Strategy<Value = RawPolicy> {
    prop_oneof![
        (0..NAMESPACES.len(), knp_spec()).prop_map(|(ns, spec)| RawPolicy::Knp { ns, spec }),
        (any::<bool>(), 0..NAMESPACES.len(), vec(cspec(), 1..=2)).prop_map(
            |(clusterwide, ns, specs)| RawPolicy::Cilium {
                clusterwide,
                ns,
                specs,
            }
        ),
    ]
}

/// A named policy object, as applied to the engine.
#[derive(Debug, Clone)]
enum PolicyObject {
    Knp(k8s::NetworkPolicy),
    Cnp(cilium::CiliumNetworkPolicy),
    Ccnp(cilium::CiliumNetworkPolicy),
}

impl PolicyObject {
    fn new(raw: &RawPolicy, name: String, namespaces: &[&str]) -> Self {
        match raw {
            RawPolicy::Knp { ns, spec } => PolicyObject::Knp(k8s::NetworkPolicy {
                api_version: "networking.k8s.io/v1".to_owned(),
                kind: "NetworkPolicy".to_owned(),
                metadata: meta(name, Some(namespaces[ns % namespaces.len()].to_owned())),
                spec: spec.clone(),
                status: None,
            }),
            RawPolicy::Cilium {
                clusterwide,
                ns,
                specs,
            } => {
                let rules: Vec<cilium::Rule> = specs.iter().map(|s| s.rule(*clusterwide)).collect();
                let (spec, specs) = if rules.len() == 1 {
                    (rules.into_iter().next(), None)
                } else {
                    (None, Some(rules))
                };
                let p = cilium::CiliumNetworkPolicy {
                    api_version: "cilium.io/v2".to_owned(),
                    kind: if *clusterwide {
                        "CiliumClusterwideNetworkPolicy"
                    } else {
                        "CiliumNetworkPolicy"
                    }
                    .to_owned(),
                    metadata: meta(
                        name,
                        (!clusterwide).then(|| namespaces[ns % namespaces.len()].to_owned()),
                    ),
                    spec,
                    specs,
                    status: None,
                };
                if *clusterwide {
                    PolicyObject::Ccnp(p)
                } else {
                    PolicyObject::Cnp(p)
                }
            }
        }
    }

    /// The same object (same key) with other contents.
    fn replaced(&self, knp: &k8s::NetworkPolicySpec, cspecs: &[CSpec]) -> Self {
        match self {
            PolicyObject::Knp(p) => PolicyObject::Knp(k8s::NetworkPolicy {
                spec: knp.clone(),
                ..p.clone()
            }),
            PolicyObject::Cnp(p) | PolicyObject::Ccnp(p) => {
                let clusterwide = matches!(self, PolicyObject::Ccnp(_));
                let mut rules: Vec<cilium::Rule> =
                    cspecs.iter().map(|s| s.rule(clusterwide)).collect();
                let (spec, specs) = if rules.len() == 1 {
                    (rules.pop(), None)
                } else {
                    (None, Some(rules))
                };
                let q = cilium::CiliumNetworkPolicy {
                    spec,
                    specs,
                    ..p.clone()
                };
                if clusterwide {
                    PolicyObject::Ccnp(q)
                } else {
                    PolicyObject::Cnp(q)
                }
            }
        }
    }

    fn compile(&self) -> CompiledPolicy {
        match self {
            PolicyObject::Knp(p) => compile::network_policy(p),
            PolicyObject::Cnp(p) => compile::cilium_policy(p, false),
            PolicyObject::Ccnp(p) => compile::cilium_policy(p, true),
        }
        .expect("generated policies compile")
    }

    fn key(&self) -> PolicyKey {
        let (kind, m) = match self {
            PolicyObject::Knp(p) => (PolicyKind::NetworkPolicy, &p.metadata),
            PolicyObject::Cnp(p) => (PolicyKind::CiliumNetworkPolicy, &p.metadata),
            PolicyObject::Ccnp(p) => (PolicyKind::CiliumClusterwideNetworkPolicy, &p.metadata),
        };
        PolicyKey {
            kind,
            namespace: m.namespace.clone(),
            name: m.name.clone().unwrap_or_default(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario
// ---------------------------------------------------------------------------------------------

/// Cluster state and policies.
#[derive(Debug, Clone)]
struct State {
    config: Config,
    namespaces: BTreeMap<String, Labels>,
    nodes: Vec<NodeInfo>,
    pods: Vec<PodInfo>,
    policies: Vec<PolicyObject>,
    /// Pods and policies live in the first `ns_count` names of [`NAMESPACES`] (which may have
    /// been removed since).
    ns_count: usize,
    /// Counters for fresh names.
    next_pod: usize,
    next_policy: usize,
}

fn node_ip(i: usize) -> IpAddr {
    IpAddr::from([10, 0, 255, u8::try_from(i + 1).unwrap_or(u8::MAX)])
}

impl State {
    fn namespace_names(&self) -> &'static [&'static str] {
        &NAMESPACES[..self.ns_count]
    }

    /// A pod's address: its node's for a host-network pod, else its own.
    fn pod_ip(&self, k: usize, node_idx: usize, host_network: bool) -> IpAddr {
        if host_network {
            self.nodes[node_idx].ips[0]
        } else {
            IpAddr::from([
                10,
                0,
                u8::try_from(k % 4).unwrap_or(0),
                u8::try_from(10 + k).unwrap_or(u8::MAX),
            ])
        }
    }

    fn pod_from(&self, raw: &RawPod) -> PodInfo {
        let k = self.next_pod;
        let ns = self.namespace_names();
        let node_idx = raw.node % self.nodes.len();
        PodInfo {
            namespace: ns[raw.ns % ns.len()].to_owned(),
            name: format!("p{k}"),
            labels: raw.labels.clone(),
            service_account: raw.service_account.to_owned(),
            node: self.nodes[node_idx].name.clone(),
            host_network: raw.host_network,
            ip: self.pod_ip(k, node_idx, raw.host_network),
            ports: raw.ports.clone(),
        }
    }

    fn add_pod(&mut self, raw: &RawPod) -> PodInfo {
        let p = self.pod_from(raw);
        self.next_pod += 1;
        self.pods.push(p.clone());
        p
    }

    fn add_policy(&mut self, raw: &RawPolicy) -> PolicyObject {
        let p = PolicyObject::new(
            raw,
            format!("pol{}", self.next_policy),
            self.namespace_names(),
        );
        self.next_policy += 1;
        self.policies.push(p.clone());
        p
    }

    fn cluster(&self) -> Cluster {
        Cluster {
            namespaces: self.namespaces.clone(),
            nodes: self.nodes.clone(),
            pods: self.pods.clone(),
        }
    }

    fn compiled(&self) -> Vec<CompiledPolicy> {
        self.policies.iter().map(PolicyObject::compile).collect()
    }

    /// An engine built from scratch, in the order the cluster loader applies things.
    fn engine(&self) -> Engine {
        let mut e = Engine::new(self.config.clone());
        for (name, labels) in &self.namespaces {
            e.upsert_namespace(name, labels.clone()).unwrap();
        }
        for n in &self.nodes {
            e.upsert_node(n.clone());
        }
        for p in &self.pods {
            e.upsert_pod(p.clone()).unwrap();
        }
        for c in self.compiled() {
            e.upsert_policy(c).unwrap();
        }
        e.commit();
        e
    }

    fn pod_parties(&self) -> Vec<Party> {
        self.pods
            .iter()
            .map(|p| Party::Pod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
            })
            .collect()
    }

    /// Every party probes may name: pods, nodes, the nodes' and a pod's address, and
    /// addresses outside the cluster.
    fn parties(&self) -> Vec<Party> {
        let mut out = self.pod_parties();
        out.extend(self.nodes.iter().map(|n| Party::Node(n.name.clone())));
        out.extend(
            self.nodes
                .iter()
                .flat_map(|n| n.ips.iter().map(|ip| Party::Ip(*ip))),
        );
        if let Some(p) = self.pods.first() {
            out.push(Party::Ip(p.ip));
        }
        out.extend(EXTERNAL_IPS.iter().map(|s| Party::Ip(s.parse().unwrap())));
        out
    }
}

#[derive(Debug, Clone)]
struct RawState {
    allow_localhost: bool,
    namespaces: Vec<Labels>,
    nodes: Vec<Labels>,
    pods: Vec<RawPod>,
    policies: Vec<RawPolicy>,
}

fn raw_state(max_policies: usize) -> impl Strategy<Value = RawState> {
    (
        prop::bool::weighted(0.8),
        vec(ns_labels(), 1..=NAMESPACES.len()),
        vec(node_labels(), 1..=NODES.len()),
        vec(raw_pod(), 2..=12),
        vec(raw_policy(), 1..=max_policies),
    )
        .prop_map(
            |(allow_localhost, namespaces, nodes, pods, policies)| RawState {
                allow_localhost,
                namespaces,
                nodes,
                pods,
                policies,
            },
        )
}

impl RawState {
    fn build(&self) -> State {
        let mut s = State {
            config: Config {
                allow_localhost: self.allow_localhost,
                ..Config::default()
            },
            namespaces: self
                .namespaces
                .iter()
                .enumerate()
                .map(|(i, l)| (NAMESPACES[i].to_owned(), l.clone()))
                .collect(),
            nodes: self
                .nodes
                .iter()
                .enumerate()
                .map(|(i, l)| NodeInfo {
                    name: NODES[i].to_owned(),
                    labels: l.clone(),
                    ips: vec![node_ip(i)],
                })
                .collect(),
            pods: Vec::new(),
            policies: Vec::new(),
            ns_count: self.namespaces.len(),
            next_pod: 0,
            next_policy: 0,
        };
        for p in &self.pods {
            s.add_pod(p);
        }
        for p in &self.policies {
            s.add_policy(p);
        }
        s
    }
}

/// A probe: indices (taken modulo) into the parties and [`PROBE_PORTS`].
type Probe = (
    prop::sample::Index,
    prop::sample::Index,
    prop::sample::Index,
);

fn probes(n: usize) -> impl Strategy<Value = Vec<Probe>> {
    vec(any::<Probe>(), n)
}

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

fn verdict_of(d: &Decision) -> Verdict {
    match d {
        Decision::Allowed { l7, .. } => Verdict::Allow {
            l7_restricted: matches!(l7, L7Decision::Restricted(_)),
        },
        Decision::Denied { .. } => Verdict::Deny,
        Decision::DefaultDenied { .. } => Verdict::DefaultDeny,
        Decision::NotEnforced => Verdict::NotEnforced,
    }
}

/// A decision with the rules it cites, by origin (rule ids differ between engines).
fn signature(engine: &Engine, d: &Decision) -> String {
    let names = |ids: &[u32]| {
        let mut v: Vec<String> = ids.iter().map(|i| eval::rule_name(engine, *i)).collect();
        v.sort();
        v.dedup();
        v.join(" | ")
    };
    match d {
        Decision::Allowed { by, l7 } => match l7 {
            L7Decision::Unrestricted => format!("allowed by [{}]", names(by)),
            L7Decision::Restricted(rules) => {
                let ids: Vec<u32> = rules.iter().map(|(id, _)| *id).collect();
                format!("allowed by [{}], L7 [{}]", names(by), names(&ids))
            }
        },
        Decision::Denied { by, audit } => format!("denied by [{}] audit={audit}", names(by)),
        Decision::DefaultDenied { by, audit } => {
            format!("default-denied by [{}] audit={audit}", names(by))
        }
        Decision::NotEnforced => "not enforced".to_owned(),
    }
}

/// Engine vs reference on one probe.
fn check_reference(
    state: &State,
    engine: &Engine,
    cluster: &Cluster,
    compiled: &[CompiledPolicy],
    src: &Party,
    dst: &Party,
    (proto, port): (u8, u16),
) -> Result<(), TestCaseError> {
    let got = eval::evaluate(engine, src, dst, proto, port, None).unwrap();
    let want =
        reference::evaluate(cluster, compiled, &state.config, src, dst, proto, port).unwrap();
    let got_egress = got.egress.as_ref().map(|(_, d)| verdict_of(d));
    let got_ingress = got.ingress.as_ref().map(|(_, d)| verdict_of(d));
    prop_assert_eq!(
        (got_egress, got_ingress, got.same_endpoint),
        (want.egress, want.ingress, want.same_endpoint),
        "{} -> {} {}/{}: engine (egress, ingress, same endpoint) vs reference\n\
         engine egress: {:?}\nengine ingress: {:?}",
        src,
        dst,
        proto::name(proto),
        port,
        got.egress,
        got.ingress,
    );
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        // Minimal failing cases are kept as the regression tests at the end of this file.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Resolved tables agree with a direct rule-by-rule evaluation on random probes.
    #[test]
    fn engine_agrees_with_reference(raw in raw_state(6), probes in probes(64)) {
        let state = raw.build();
        let engine = state.engine();
        let cluster = state.cluster();
        let compiled = state.compiled();
        // Pods twice: most probes are between pods.
        let mut parties = state.parties();
        parties.extend(state.pod_parties());
        for (s, d, pp) in &probes {
            check_reference(
                &state,
                &engine,
                &cluster,
                &compiled,
                s.get(&parties),
                d.get(&parties),
                *pp.get(PROBE_PORTS),
            )?;
        }
    }

    /// An engine updated step by step (commit after each) judges like one built from scratch:
    /// every pair of parties on a few ports, down to the rules each decision cites; and like
    /// the reference on random probes.
    #[test]
    fn incremental_agrees_with_scratch(
        raw in raw_state(4),
        changes in vec(change(), 1..=8),
        probes in probes(32),
    ) {
        let mut state = raw.build();
        let mut engine = state.engine();
        for c in &changes {
            apply(&mut state, &mut engine, c);
            engine.commit();
        }
        let scratch = state.engine();
        let parties = state.parties();
        for s in &parties {
            for d in &parties {
                for (proto, port) in [(proto::TCP, 80), (proto::UDP, 53), (proto::ICMP, 8)] {
                    let a = eval::evaluate(&scratch, s, d, proto, port, None).unwrap();
                    let b = eval::evaluate(&engine, s, d, proto, port, None).unwrap();
                    let sig = |e: &Engine, x: &Option<(String, Decision)>| {
                        x.as_ref().map(|(who, d)| format!("{who}: {}", signature(e, d)))
                    };
                    prop_assert_eq!(
                        (sig(&engine, &b.egress), sig(&engine, &b.ingress), b.same_endpoint),
                        (sig(&scratch, &a.egress), sig(&scratch, &a.ingress), a.same_endpoint),
                        "{} -> {} {}/{}: incremental (left) vs scratch (right)",
                        s,
                        d,
                        proto::name(proto),
                        port
                    );
                }
            }
        }
        let cluster = state.cluster();
        let compiled = state.compiled();
        for (s, d, pp) in &probes {
            check_reference(
                &state,
                &engine,
                &cluster,
                &compiled,
                s.get(&parties),
                d.get(&parties),
                *pp.get(PROBE_PORTS),
            )?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Incremental changes
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Change {
    AddPod(RawPod),
    RemovePod(prop::sample::Index),
    RelabelPod(prop::sample::Index, Labels),
    SetPodPorts(prop::sample::Index, Vec<NamedPort>),
    /// Moves a pod to another node (index into the nodes).
    MovePod(prop::sample::Index, prop::sample::Index),
    SetHostNetwork(prop::sample::Index, bool),
    /// Creates or relabels one of the scenario's namespaces.
    UpsertNamespace(prop::sample::Index, Labels),
    RemoveNamespace(prop::sample::Index),
    RelabelNode(prop::sample::Index, Labels),
    AddPolicy(RawPolicy),
    ReplacePolicy(prop::sample::Index, k8s::NetworkPolicySpec, Vec<CSpec>),
    RemovePolicy(prop::sample::Index),
}

fn change() -> impl Strategy<Value = Change> {
    use prop::sample::Index;
    prop_oneof![
        2 => raw_pod().prop_map(Change::AddPod),
        2 => any::<Index>().prop_map(Change::RemovePod),
        3 => (any::<Index>(), pod_labels()).prop_map(|(i, l)| Change::RelabelPod(i, l)),
        1 => (any::<Index>(), container_ports()).prop_map(|(i, p)| Change::SetPodPorts(i, p)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(i, n)| Change::MovePod(i, n)),
        1 => (any::<Index>(), any::<bool>()).prop_map(|(i, h)| Change::SetHostNetwork(i, h)),
        2 => (any::<Index>(), ns_labels()).prop_map(|(i, l)| Change::UpsertNamespace(i, l)),
        1 => any::<Index>().prop_map(Change::RemoveNamespace),
        1 => (any::<Index>(), node_labels()).prop_map(|(i, l)| Change::RelabelNode(i, l)),
        2 => raw_policy().prop_map(Change::AddPolicy),
        2 => (any::<Index>(), knp_spec(), vec(cspec(), 1..=2))
            .prop_map(|(i, k, c)| Change::ReplacePolicy(i, k, c)),
        2 => any::<Index>().prop_map(Change::RemovePolicy),
    ]
}

/// Applies a change to the state and the engine alike.
fn apply(state: &mut State, engine: &mut Engine, change: &Change) {
    // The pod a change names, if there is any pod.
    let pick = |state: &State, i: &prop::sample::Index| {
        (!state.pods.is_empty()).then(|| i.index(state.pods.len()))
    };
    match change {
        Change::AddPod(raw) => {
            let p = state.add_pod(raw);
            engine.upsert_pod(p).unwrap();
        }
        Change::RemovePod(i) => {
            if let Some(k) = pick(state, i) {
                let p = state.pods.remove(k);
                engine.remove_pod(&p.namespace, &p.name);
            }
        }
        Change::RelabelPod(i, labels) => {
            if let Some(k) = pick(state, i) {
                state.pods[k].labels.clone_from(labels);
                engine.upsert_pod(state.pods[k].clone()).unwrap();
            }
        }
        Change::SetPodPorts(i, ports) => {
            if let Some(k) = pick(state, i) {
                state.pods[k].ports.clone_from(ports);
                engine.upsert_pod(state.pods[k].clone()).unwrap();
            }
        }
        Change::MovePod(i, n) => {
            if let Some(k) = pick(state, i) {
                let node = n.index(state.nodes.len());
                let index = pod_index(&state.pods[k]);
                let ip = state.pod_ip(index, node, state.pods[k].host_network);
                state.pods[k].node.clone_from(&state.nodes[node].name);
                state.pods[k].ip = ip;
                engine.upsert_pod(state.pods[k].clone()).unwrap();
            }
        }
        Change::SetHostNetwork(i, host_network) => {
            if let Some(k) = pick(state, i) {
                let node = state
                    .nodes
                    .iter()
                    .position(|n| n.name == state.pods[k].node)
                    .unwrap();
                let ip = state.pod_ip(pod_index(&state.pods[k]), node, *host_network);
                state.pods[k].host_network = *host_network;
                state.pods[k].ip = ip;
                engine.upsert_pod(state.pods[k].clone()).unwrap();
            }
        }
        Change::UpsertNamespace(i, labels) => {
            let name = *i.get(state.namespace_names());
            state.namespaces.insert(name.to_owned(), labels.clone());
            engine.upsert_namespace(name, labels.clone()).unwrap();
        }
        Change::RemoveNamespace(i) => {
            let name = *i.get(state.namespace_names());
            state.namespaces.remove(name);
            engine.remove_namespace(name).unwrap();
        }
        Change::RelabelNode(i, labels) => {
            let k = i.index(state.nodes.len());
            state.nodes[k].labels.clone_from(labels);
            engine.upsert_node(state.nodes[k].clone());
        }
        Change::AddPolicy(raw) => {
            let p = state.add_policy(raw);
            engine.upsert_policy(p.compile()).unwrap();
        }
        Change::ReplacePolicy(i, knp, cspecs) => {
            if state.policies.is_empty() {
                return;
            }
            let k = i.index(state.policies.len());
            let p = state.policies[k].replaced(knp, cspecs);
            state.policies[k] = p.clone();
            engine.upsert_policy(p.compile()).unwrap();
        }
        Change::RemovePolicy(i) => {
            if state.policies.is_empty() {
                return;
            }
            let p = state.policies.remove(i.index(state.policies.len()));
            assert!(engine.remove_policy(&p.key()));
        }
    }
}

/// The `k` of a pod named `p<k>`.
fn pod_index(p: &PodInfo) -> usize {
    p.name.trim_start_matches('p').parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Regressions: minimal cases the properties found
// ---------------------------------------------------------------------------------------------

/// Found by `incremental_agrees_with_scratch`: a host-network pod shares its node's address;
/// once the pod goes, the node's address must still be the node's (host on its own node), as
/// in an engine built without the pod.
#[test]
fn removing_a_host_network_pod_keeps_its_nodes_address() {
    let node_address = node_ip(0);
    let node = NodeInfo {
        name: "node-1".to_owned(),
        labels: Labels::new(),
        ips: vec![node_address],
    };
    let pod = |name: &str, host_network: bool, ip: IpAddr| PodInfo {
        namespace: "ns0".to_owned(),
        name: name.to_owned(),
        labels: Labels::new(),
        service_account: "default".to_owned(),
        node: "node-1".to_owned(),
        host_network,
        ip,
        ports: Vec::new(),
    };
    let client = pod("p1", false, "10.0.1.11".parse().unwrap());
    let mut engine = Engine::new(Config::default());
    engine.upsert_namespace("ns0", Labels::new()).unwrap();
    engine.upsert_node(node);
    engine.upsert_pod(pod("p0", true, node_address)).unwrap();
    engine.upsert_pod(client).unwrap();
    engine.commit();
    engine.remove_pod("ns0", "p0");
    engine.commit();

    let v = eval::evaluate(
        &engine,
        &Party::Pod {
            namespace: "ns0".to_owned(),
            name: "p1".to_owned(),
        },
        &Party::Ip(node_address),
        proto::TCP,
        80,
        None,
    )
    .unwrap();
    assert_eq!(
        engine.ip_owner(node_address),
        Some(&palisade_policy::engine::IpOwner::Node("node-1".to_owned()))
    );
    assert_eq!(v.dst_identity, palisade_identity::reserved::HOST);
    assert_eq!(
        v.ingress.map(|(who, _)| who),
        Some("node/node-1".to_owned())
    );
}
