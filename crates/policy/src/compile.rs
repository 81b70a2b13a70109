//! Dialects → the normalized model. Each function here is the place where one project's
//! semantics are encoded; the comments cite them.

use std::sync::Arc;

use palisade_identity::{keys, Source};
use palisade_policy_api::cilium::{self, CiliumNetworkPolicy};
use palisade_policy_api::k8s::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use palisade_policy_api::meta::{IntOrString, LabelSelector};
use palisade_policy_api::validate::{
    icmp_type_by_name, parse_cidr, parse_cilium_port, L4Proto, PortRef,
};

use crate::l7::L7Rules;
use crate::model::{
    proto, Action, CompiledPolicy, DefaultDeny, Direction, FqdnPattern, NamedPorts, Peer,
    PolicyKey, PolicyKind, PortMatch, PortSpec, Rule, RuleOrigin, Subject,
};
use crate::selector::{Op, Requirement, Selector};

/// Namespace of objects that do not name one, as `kubectl` with the default context.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> CompileError {
    CompileError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

/// Whether a policy asks for audit mode (`palisade.dev/audit: "true"`).
fn audit_annotation(meta: &palisade_policy_api::meta::ObjectMeta) -> bool {
    meta.annotations
        .get(crate::model::AUDIT_ANNOTATION)
        .is_some_and(|v| v == "true")
}

fn ns_requirement(ns: &str) -> Requirement {
    Requirement::equals(Some(Source::K8s), keys::NAMESPACE, ns)
}

/// A CIDR peer: identities whose CIDR labels lie inside `cidr` and outside every `except`.
/// CIDR identities carry the labels of every enclosing prefix, so `cidr:<prefix>` exists
/// exactly for the identities inside it. Pods and nodes never carry CIDR labels, so CIDR
/// rules never match them (Cilium's documented behaviour, for ipBlock too).
fn cidr_selector(
    cidr: ipnet::IpNet,
    except: &[ipnet::IpNet],
    prefixes: &mut Vec<ipnet::IpNet>,
) -> Selector {
    prefixes.push(cidr);
    let mut reqs = vec![Requirement::exists(Some(Source::Cidr), &cidr.to_string())];
    for e in except {
        prefixes.push(*e);
        reqs.push(Requirement::new(
            Some(Source::Cidr),
            &e.to_string(),
            Op::DoesNotExist,
            &[],
        ));
    }
    Selector::new(reqs)
}

// ---------------------------------------------------------------------------------------------
// Kubernetes NetworkPolicy
// ---------------------------------------------------------------------------------------------

/// Compiles a `networking.k8s.io/v1` NetworkPolicy with upstream Kubernetes semantics:
/// - the subject is `podSelector` in the policy's namespace;
/// - `policyTypes` defaults to Ingress, plus Egress when `egress` has rules; a direction not in
///   `policyTypes` is ignored entirely, rules included;
/// - each listed direction is default-deny for the subject;
/// - an absent or empty `from`/`to` allows every source/destination; an absent or empty
///   `ports` allows every port and protocol;
/// - a peer's podSelector alone is confined to the policy's namespace; namespaceSelector alone
///   selects every pod of the matching namespaces; both together are ANDed;
/// - ipBlock selects addresses outside the cluster (as in Cilium: never pod or node IPs).
pub fn network_policy(np: &NetworkPolicy) -> Result<CompiledPolicy, CompileError> {
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    let name = np
        .metadata
        .name
        .clone()
        .ok_or_else(|| invalid("metadata.name", "missing"))?;
    let key = Arc::new(PolicyKey {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some(namespace.clone()),
        name,
    });
    let spec = &np.spec;
    let audit = audit_annotation(&np.metadata);
    let subject = Subject::Endpoints(
        Selector::from_k8s(&spec.pod_selector, Some(Source::K8s), "")
            .and(&[ns_requirement(&namespace)]),
    );
    let types: Vec<&str> = match &spec.policy_types {
        Some(t) => t.iter().map(String::as_str).collect(),
        None => {
            let mut t = vec!["Ingress"];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress");
            }
            t
        }
    };
    let mut out = CompiledPolicy {
        key: key.clone(),
        rules: Vec::new(),
        default_deny: Vec::new(),
        prefixes: Vec::new(),
    };
    let origin = |section: &'static str, index: usize| RuleOrigin {
        policy: key.clone(),
        spec_index: None,
        section,
        index,
    };
    for (direction, type_name, rules) in [
        (
            Direction::Ingress,
            "Ingress",
            spec.ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_deref(), r.ports.as_deref()))
                .collect::<Vec<_>>(),
        ),
        (
            Direction::Egress,
            "Egress",
            spec.egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_deref(), r.ports.as_deref()))
                .collect::<Vec<_>>(),
        ),
    ] {
        if !types.contains(&type_name) {
            continue;
        }
        out.default_deny.push(DefaultDeny {
            origin: origin("policyTypes", 0),
            subject: subject.clone(),
            direction,
            audit,
        });
        let section = direction.as_str();
        for (index, (peers, ports)) in rules.into_iter().enumerate() {
            let path = format!("spec.{section}[{index}]");
            let peers = match peers {
                None | Some([]) => vec![Peer::Any],
                Some(list) => list
                    .iter()
                    .map(|p| k8s_peer(p, &namespace, &mut out.prefixes))
                    .collect::<Result<_, _>>()
                    .map_err(|m| invalid(path.clone(), m))?,
            };
            let ports = match ports {
                None | Some([]) => vec![PortSpec::any()],
                Some(list) => list
                    .iter()
                    .map(k8s_port)
                    .collect::<Result<_, _>>()
                    .map_err(|m| invalid(path.clone(), m))?,
            };
            out.rules.push(Rule {
                origin: origin(section, index),
                subject: subject.clone(),
                direction,
                action: Action::Allow,
                peers,
                ports,
                requires: Vec::new(),
                named_ports: NamedPorts::PerDestination,
                audit,
            });
        }
    }
    Ok(out)
}

fn k8s_peer(
    p: &NetworkPolicyPeer,
    namespace: &str,
    prefixes: &mut Vec<ipnet::IpNet>,
) -> Result<Peer, String> {
    if let Some(block) = &p.ip_block {
        let cidr =
            parse_cidr(&block.cidr).ok_or_else(|| format!("invalid CIDR {:?}", block.cidr))?;
        let except: Vec<_> = block
            .except
            .iter()
            .map(|e| parse_cidr(e).ok_or_else(|| format!("invalid CIDR {e:?}")))
            .collect::<Result<_, _>>()?;
        return Ok(Peer::Select {
            selector: cidr_selector(cidr, &except, prefixes),
            endpoints: false,
        });
    }
    let mut reqs = Vec::new();
    match &p.namespace_selector {
        Some(ns_sel) => {
            let ns = Selector::from_k8s(ns_sel, Some(Source::K8s), keys::NAMESPACE_LABELS_PREFIX);
            reqs.extend_from_slice(ns.requirements());
            // Only pods carry a namespace: an empty namespaceSelector selects every pod, and no
            // reserved identity.
            reqs.push(Requirement::exists(Some(Source::K8s), keys::NAMESPACE));
        }
        None => reqs.push(ns_requirement(namespace)),
    }
    if let Some(pod_sel) = &p.pod_selector {
        reqs.extend_from_slice(Selector::from_k8s(pod_sel, Some(Source::K8s), "").requirements());
    }
    Ok(Peer::Select {
        selector: Selector::new(reqs),
        endpoints: false,
    })
}

fn k8s_port(p: &NetworkPolicyPort) -> Result<PortSpec, String> {
    let proto = match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => proto::TCP,
        "UDP" => proto::UDP,
        "SCTP" => proto::SCTP,
        other => return Err(format!("unsupported protocol {other:?}")),
    };
    let ports = match &p.port {
        None => PortMatch::Range(0, u16::MAX),
        Some(IntOrString::Int(n)) => {
            let start = u16::try_from(*n).map_err(|_| format!("invalid port {n}"))?;
            let end = match p.end_port {
                Some(e) => u16::try_from(e).map_err(|_| format!("invalid endPort {e}"))?,
                None => start,
            };
            PortMatch::Range(start, end.max(start))
        }
        Some(IntOrString::Str(name)) => PortMatch::Named(name.clone()),
    };
    Ok(PortSpec {
        proto,
        ports,
        l7: None,
    })
}

// ---------------------------------------------------------------------------------------------
// Cilium
// ---------------------------------------------------------------------------------------------

/// Compiles a CiliumNetworkPolicy (`clusterwide == false`) or CiliumClusterwideNetworkPolicy.
pub fn cilium_policy(
    p: &CiliumNetworkPolicy,
    clusterwide: bool,
) -> Result<CompiledPolicy, CompileError> {
    let name = p
        .metadata
        .name
        .clone()
        .ok_or_else(|| invalid("metadata.name", "missing"))?;
    let namespace = if clusterwide {
        None
    } else {
        Some(
            p.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        )
    };
    let key = Arc::new(PolicyKey {
        kind: if clusterwide {
            PolicyKind::CiliumClusterwideNetworkPolicy
        } else {
            PolicyKind::CiliumNetworkPolicy
        },
        namespace: namespace.clone(),
        name,
    });
    let mut out = CompiledPolicy {
        key: key.clone(),
        rules: Vec::new(),
        default_deny: Vec::new(),
        prefixes: Vec::new(),
    };
    let mut specs: Vec<(Option<usize>, &cilium::Rule)> = Vec::new();
    if let Some(s) = &p.spec {
        specs.push((None, s));
    }
    for (i, s) in p.specs.iter().flatten().enumerate() {
        specs.push((Some(i), s));
    }
    for (spec_index, rule) in specs {
        let ctx = CiliumCtx {
            key: key.clone(),
            audit: audit_annotation(&p.metadata),
            spec_index,
            namespace: namespace.as_deref(),
            base: spec_index.map_or_else(|| "spec".to_owned(), |i| format!("specs[{i}]")),
        };
        ctx.compile(rule, &mut out)?;
    }
    Ok(out)
}

struct CiliumCtx<'a> {
    key: Arc<PolicyKey>,
    audit: bool,
    spec_index: Option<usize>,
    namespace: Option<&'a str>,
    base: String,
}

/// The peer fields of one Cilium rule, whatever its section.
struct PeerFields<'a> {
    endpoints: Option<&'a [LabelSelector]>,
    requires: Option<&'a [LabelSelector]>,
    cidrs: Option<&'a [String]>,
    cidr_sets: Option<&'a [cilium::CidrRule]>,
    entities: Option<&'a [String]>,
    fqdns: Option<&'a [cilium::FqdnSelector]>,
    /// Fields Palisade does not support yet, by name, if present.
    unsupported: Vec<&'static str>,
}

impl CiliumCtx<'_> {
    fn origin(&self, section: &'static str, index: usize) -> RuleOrigin {
        RuleOrigin {
            policy: self.key.clone(),
            spec_index: self.spec_index,
            section,
            index,
        }
    }

    /// Subject: a CNP's endpointSelector always gets the policy's namespace (Cilium overwrites
    /// any namespace the user wrote); a CCNP's is used as written. `nodeSelector` selects
    /// nodes (host policy).
    fn subject(&self, rule: &cilium::Rule) -> Result<Subject, CompileError> {
        if let Some(sel) = &rule.node_selector {
            return Ok(Subject::Nodes(Selector::from_cilium(sel)));
        }
        let sel = rule.endpoint_selector.as_ref().ok_or_else(|| {
            invalid(
                &self.base,
                "one of endpointSelector or nodeSelector must be set",
            )
        })?;
        let mut s = Selector::from_cilium(sel);
        if let Some(ns) = self.namespace {
            let reqs: Vec<Requirement> = s
                .requirements()
                .iter()
                .filter(|r| {
                    !(&*r.key == keys::NAMESPACE
                        && r.op == Op::In
                        && r.source != Some(Source::Reserved))
                })
                .cloned()
                .collect();
            s = Selector::new(reqs).and(&[ns_requirement(ns)]);
        }
        Ok(Subject::Endpoints(s))
    }

    /// `fromEndpoints` / `toEndpoints` (and requires) selectors, with Cilium's scoping:
    /// - a selector naming a `reserved:` label is used as written;
    /// - one that names the namespace label is used as written;
    /// - in a CNP, one naming namespace labels (`io.cilium.k8s.namespace.labels.*`) may reach
    ///   other namespaces (Cilium 1.18); otherwise the policy's namespace is added;
    /// - in a CCNP, "is a pod" (namespace label exists) is added, so `{}` selects every pod and
    ///   no reserved identity.
    fn endpoint_selector(&self, sel: &LabelSelector, is_requirement: bool) -> Selector {
        let s = Selector::from_cilium(sel);
        if !is_requirement
            && s.requirements()
                .iter()
                .any(|r| r.source == Some(Source::Reserved))
        {
            return s;
        }
        let names_ns = s
            .requirements()
            .iter()
            .any(|r| &*r.key == keys::NAMESPACE && matches!(r.source, None | Some(Source::K8s)));
        if names_ns {
            return s;
        }
        match self.namespace {
            Some(ns) => {
                let names_ns_labels = s.requirements().iter().any(|r| {
                    r.key.starts_with(keys::NAMESPACE_LABELS_PREFIX)
                        && matches!(r.source, None | Some(Source::K8s))
                });
                if names_ns_labels {
                    s
                } else {
                    s.and(&[ns_requirement(ns)])
                }
            }
            None => s.and(&[Requirement::exists(Some(Source::K8s), keys::NAMESPACE)]),
        }
    }

    /// The peers and requirements of a rule, and whether it named any peer field at all.
    #[allow(clippy::type_complexity)]
    fn peers(
        &self,
        f: &PeerFields<'_>,
        path: &str,
        out: &mut CompiledPolicy,
    ) -> Result<(Vec<Peer>, Vec<Requirement>, bool), CompileError> {
        if let Some(field) = f.unsupported.first() {
            return Err(invalid(
                format!("{path}.{field}"),
                format!("{field} is not supported yet"),
            ));
        }
        let mut peers = Vec::new();
        for sel in f.endpoints.into_iter().flatten() {
            peers.push(Peer::Select {
                selector: self.endpoint_selector(sel, false),
                endpoints: true,
            });
        }
        for c in f.cidrs.into_iter().flatten() {
            let net = parse_cidr(c).ok_or_else(|| invalid(path, format!("invalid CIDR {c:?}")))?;
            peers.push(Peer::Select {
                selector: cidr_selector(net, &[], &mut out.prefixes),
                endpoints: false,
            });
        }
        for set in f.cidr_sets.into_iter().flatten() {
            let Some(c) = &set.cidr else {
                return Err(invalid(path, "cidrGroupRef is not supported yet"));
            };
            let net = parse_cidr(c).ok_or_else(|| invalid(path, format!("invalid CIDR {c:?}")))?;
            let except: Vec<_> = set
                .except
                .iter()
                .map(|e| parse_cidr(e).ok_or_else(|| invalid(path, format!("invalid CIDR {e:?}"))))
                .collect::<Result<_, _>>()?;
            peers.push(Peer::Select {
                selector: cidr_selector(net, &except, &mut out.prefixes),
                endpoints: false,
            });
        }
        for e in f.entities.into_iter().flatten() {
            peers.extend(
                entity_peers(e).ok_or_else(|| invalid(path, format!("unknown entity {e:?}")))?,
            );
        }
        for q in f.fqdns.into_iter().flatten() {
            match (&q.match_name, &q.match_pattern) {
                (Some(n), _) => {
                    peers.push(Peer::Fqdn(FqdnPattern::MatchName(n.to_ascii_lowercase())));
                }
                (None, Some(p)) => peers.push(Peer::Fqdn(FqdnPattern::MatchPattern(
                    p.to_ascii_lowercase(),
                ))),
                (None, None) => {}
            }
        }
        let mut requires = Vec::new();
        for sel in f.requires.into_iter().flatten() {
            requires.extend_from_slice(self.endpoint_selector(sel, true).requirements());
        }
        // Wildcarding: a rule with no peer field at all allows every peer on its ports (only
        // when it has ports; an empty rule `{}` grants nothing). fromRequires / toFQDNs disable it.
        // An explicitly empty list selects nothing (Cilium ≥ 1.15).
        let no_peer_fields = f.endpoints.is_none()
            && f.cidrs.is_none()
            && f.cidr_sets.is_none()
            && f.entities.is_none()
            && f.fqdns.is_none()
            && f.requires.is_none();
        if no_peer_fields {
            peers.push(Peer::Any);
        }
        Ok((peers, requires, !no_peer_fields))
    }

    fn ports(
        to_ports: &[(Option<&[cilium::PortProtocol]>, Option<&cilium::L7Rules>)],
        icmps: Option<&[cilium::IcmpRule]>,
        path: &str,
    ) -> Result<Option<Vec<PortSpec>>, CompileError> {
        let mut specs = Vec::new();
        let mut any = false;
        for (i, (ports, rules)) in to_ports.iter().enumerate() {
            any = true;
            let l7 = rules.and_then(L7Rules::from_cilium).map(Arc::new);
            let ports = ports.unwrap_or(&[]);
            let whole: [cilium::PortProtocol; 1] = [cilium::PortProtocol::default()];
            let ports: &[cilium::PortProtocol] = if ports.is_empty() { &whole } else { ports };
            for (j, p) in ports.iter().enumerate() {
                let pp = format!("{path}.toPorts[{i}].ports[{j}]");
                let l4 = match p.protocol.as_deref() {
                    None | Some("") => L4Proto::Any,
                    Some(s) => L4Proto::parse(s)
                        .ok_or_else(|| invalid(&pp, format!("unsupported protocol {s:?}")))?,
                };
                let port = match p.port.as_deref() {
                    None => PortRef::Number(0),
                    Some(s) => parse_cilium_port(s)
                        .ok_or_else(|| invalid(&pp, format!("invalid port {s:?}")))?,
                };
                let matcher = match port {
                    PortRef::Number(0) => match p.end_port {
                        Some(e) if e > 0 && e < 65535 => {
                            PortMatch::Range(0, u16::try_from(e).unwrap_or(u16::MAX))
                        }
                        _ => PortMatch::Range(0, u16::MAX),
                    },
                    PortRef::Number(n) => {
                        let end = p.end_port.and_then(|e| u16::try_from(e).ok()).unwrap_or(n);
                        PortMatch::Range(n, end.max(n))
                    }
                    PortRef::Name(name) => PortMatch::Named(name.to_ascii_lowercase()),
                };
                // ANY (or no protocol) is TCP, UDP and SCTP; never ICMP.
                let protos: &[u8] = match l4 {
                    L4Proto::Tcp => &[proto::TCP],
                    L4Proto::Udp => &[proto::UDP],
                    L4Proto::Sctp => &[proto::SCTP],
                    L4Proto::Any => &[proto::TCP, proto::UDP, proto::SCTP],
                };
                for &pr in protos {
                    specs.push(PortSpec {
                        proto: pr,
                        ports: matcher.clone(),
                        l7: l7.clone(),
                    });
                }
            }
        }
        for (i, rule) in icmps.into_iter().flatten().enumerate() {
            any = true;
            for (j, field) in rule.fields.iter().enumerate() {
                let v6 = field.family.as_deref() == Some("IPv6");
                let t = match &field.icmp_type {
                    IntOrString::Int(t) => u8::try_from(*t).ok(),
                    IntOrString::Str(s) => icmp_type_by_name(s, v6),
                }
                .ok_or_else(|| {
                    invalid(
                        format!("{path}.icmps[{i}].fields[{j}].type"),
                        "invalid ICMP type",
                    )
                })?;
                specs.push(PortSpec {
                    proto: if v6 { proto::ICMPV6 } else { proto::ICMP },
                    ports: PortMatch::Range(u16::from(t), u16::from(t)),
                    l7: None,
                });
            }
        }
        Ok(any.then_some(specs))
    }

    #[allow(clippy::too_many_arguments)]
    fn push_rule(
        &self,
        out: &mut CompiledPolicy,
        subject: &Subject,
        direction: Direction,
        action: Action,
        section: &'static str,
        index: usize,
        fields: &PeerFields<'_>,
        to_ports: &[(Option<&[cilium::PortProtocol]>, Option<&cilium::L7Rules>)],
        icmps: Option<&[cilium::IcmpRule]>,
    ) -> Result<(), CompileError> {
        let path = format!("{}.{section}[{index}]", self.base);
        let (mut peers, requires, named_peers) = self.peers(fields, &path, out)?;
        let ports = Self::ports(to_ports, icmps, &path)?;
        let ports = match ports {
            Some(p) => p,
            None => {
                // L3-only rule. An empty rule `{}` has no peers and no ports: it only enables
                // default deny.
                if !named_peers {
                    peers.clear();
                }
                vec![PortSpec::any()]
            }
        };
        out.rules.push(Rule {
            origin: self.origin(section, index),
            subject: subject.clone(),
            direction,
            action,
            peers,
            ports,
            requires,
            named_ports: NamedPorts::SingleNumber,
            audit: self.audit,
        });
        Ok(())
    }

    fn compile(&self, rule: &cilium::Rule, out: &mut CompiledPolicy) -> Result<(), CompileError> {
        let subject = self.subject(rule)?;
        for (i, r) in rule.ingress.iter().flatten().enumerate() {
            let mut unsupported = Vec::new();
            if r.from_groups.is_some() {
                unsupported.push("fromGroups");
            }
            if r.from_nodes.is_some() {
                unsupported.push("fromNodes");
            }
            let fields = PeerFields {
                endpoints: r.from_endpoints.as_deref(),
                requires: r.from_requires.as_deref(),
                cidrs: r.from_cidr.as_deref(),
                cidr_sets: r.from_cidr_set.as_deref(),
                entities: r.from_entities.as_deref(),
                fqdns: None,
                unsupported,
            };
            let ports: Vec<_> = r
                .to_ports
                .iter()
                .flatten()
                .map(|p| (p.ports.as_deref(), p.rules.as_ref()))
                .collect();
            self.push_rule(
                out,
                &subject,
                Direction::Ingress,
                Action::Allow,
                "ingress",
                i,
                &fields,
                &ports,
                r.icmps.as_deref(),
            )?;
        }
        for (i, r) in rule.ingress_deny.iter().flatten().enumerate() {
            let mut unsupported = Vec::new();
            if r.from_groups.is_some() {
                unsupported.push("fromGroups");
            }
            if r.from_nodes.is_some() {
                unsupported.push("fromNodes");
            }
            let fields = PeerFields {
                endpoints: r.from_endpoints.as_deref(),
                requires: r.from_requires.as_deref(),
                cidrs: r.from_cidr.as_deref(),
                cidr_sets: r.from_cidr_set.as_deref(),
                entities: r.from_entities.as_deref(),
                fqdns: None,
                unsupported,
            };
            let ports: Vec<_> = r
                .to_ports
                .iter()
                .flatten()
                .map(|p| (p.ports.as_deref(), None))
                .collect();
            self.push_rule(
                out,
                &subject,
                Direction::Ingress,
                Action::Deny,
                "ingressDeny",
                i,
                &fields,
                &ports,
                r.icmps.as_deref(),
            )?;
        }
        for (i, r) in rule.egress.iter().flatten().enumerate() {
            let mut unsupported = Vec::new();
            if r.to_groups.is_some() {
                unsupported.push("toGroups");
            }
            if r.to_nodes.is_some() {
                unsupported.push("toNodes");
            }
            if r.to_services.is_some() {
                unsupported.push("toServices");
            }
            let fields = PeerFields {
                endpoints: r.to_endpoints.as_deref(),
                requires: r.to_requires.as_deref(),
                cidrs: r.to_cidr.as_deref(),
                cidr_sets: r.to_cidr_set.as_deref(),
                entities: r.to_entities.as_deref(),
                fqdns: r.to_fqdns.as_deref(),
                unsupported,
            };
            let ports: Vec<_> = r
                .to_ports
                .iter()
                .flatten()
                .map(|p| (p.ports.as_deref(), p.rules.as_ref()))
                .collect();
            self.push_rule(
                out,
                &subject,
                Direction::Egress,
                Action::Allow,
                "egress",
                i,
                &fields,
                &ports,
                r.icmps.as_deref(),
            )?;
        }
        for (i, r) in rule.egress_deny.iter().flatten().enumerate() {
            let mut unsupported = Vec::new();
            if r.to_groups.is_some() {
                unsupported.push("toGroups");
            }
            if r.to_nodes.is_some() {
                unsupported.push("toNodes");
            }
            if r.to_services.is_some() {
                unsupported.push("toServices");
            }
            let fields = PeerFields {
                endpoints: r.to_endpoints.as_deref(),
                requires: r.to_requires.as_deref(),
                cidrs: r.to_cidr.as_deref(),
                cidr_sets: r.to_cidr_set.as_deref(),
                entities: r.to_entities.as_deref(),
                fqdns: None,
                unsupported,
            };
            let ports: Vec<_> = r
                .to_ports
                .iter()
                .flatten()
                .map(|p| (p.ports.as_deref(), None))
                .collect();
            self.push_rule(
                out,
                &subject,
                Direction::Egress,
                Action::Deny,
                "egressDeny",
                i,
                &fields,
                &ports,
                r.icmps.as_deref(),
            )?;
        }
        // Default deny: a direction with rules (allow or deny) is default-deny unless
        // enableDefaultDeny says false for it.
        let dd = rule.enable_default_deny.as_ref();
        for (direction, has_rules, flag) in [
            (
                Direction::Ingress,
                rule.ingress.as_ref().is_some_and(|r| !r.is_empty())
                    || rule.ingress_deny.as_ref().is_some_and(|r| !r.is_empty()),
                dd.and_then(|d| d.ingress),
            ),
            (
                Direction::Egress,
                rule.egress.as_ref().is_some_and(|r| !r.is_empty())
                    || rule.egress_deny.as_ref().is_some_and(|r| !r.is_empty()),
                dd.and_then(|d| d.egress),
            ),
        ] {
            if has_rules && flag != Some(false) {
                out.default_deny.push(DefaultDeny {
                    origin: self.origin(
                        if flag.is_some() {
                            "enableDefaultDeny"
                        } else {
                            direction_section(direction)
                        },
                        usize::MAX,
                    ),
                    subject: subject.clone(),
                    direction,
                    audit: self.audit,
                });
            }
        }
        Ok(())
    }
}

fn direction_section(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

/// Cilium's entities as peers (`pkg/policy/api/entity.go`).
fn entity_peers(entity: &str) -> Option<Vec<Peer>> {
    let reserved = |name: &str| Peer::Select {
        selector: Selector::new(vec![Requirement::exists(Some(Source::Reserved), name)]),
        endpoints: false,
    };
    Some(match entity {
        "all" => vec![Peer::Any],
        "none" => vec![],
        "world" => vec![
            reserved("world"),
            reserved("world-ipv4"),
            reserved("world-ipv6"),
        ],
        "cluster" => {
            let mut v: Vec<Peer> = [
                "host",
                "remote-node",
                "init",
                "ingress",
                "health",
                "unmanaged",
                "kube-apiserver",
            ]
            .into_iter()
            .map(reserved)
            .collect();
            // Every pod of the local cluster carries the cluster label.
            v.push(Peer::Select {
                selector: Selector::new(vec![Requirement::exists(
                    Some(Source::K8s),
                    keys::CLUSTER,
                )]),
                endpoints: false,
            });
            v
        }
        "world-ipv4" | "world-ipv6" | "host" | "remote-node" | "kube-apiserver" | "health"
        | "init" | "unmanaged" | "ingress" => vec![reserved(entity)],
        _ => return None,
    })
}
