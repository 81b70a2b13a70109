//! Semantic validation of typed manifests: what the API server's validators (Kubernetes) and
//! `sanitize()` (Cilium) reject, plus warnings for mistakes that are valid but never what the
//! author meant. Every finding carries the field path, so the loader can point at the line.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::cilium::{
    CidrRule, CiliumNetworkPolicy, FqdnSelector, IcmpRule, L7Rules, PortProtocol, Rule,
};
use crate::k8s::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, Pod};
use crate::meta::{IntOrString, LabelSelector, SelectorOperator};
use crate::names;
use crate::scenario::ConnectivityTest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// One finding, located by its field path inside the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    pub path: String,
    pub message: String,
    pub hint: Option<String>,
}

#[derive(Default)]
pub(crate) struct Issues(pub Vec<Issue>);

impl Issues {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Issue {
            severity: Severity::Error,
            path: path.into(),
            message: message.into(),
            hint: None,
        });
    }
    fn error_hint(&mut self, path: impl Into<String>, message: impl Into<String>, hint: &str) {
        self.0.push(Issue {
            severity: Severity::Error,
            path: path.into(),
            message: message.into(),
            hint: Some(hint.to_owned()),
        });
    }
    fn warning(&mut self, path: impl Into<String>, message: impl Into<String>, hint: &str) {
        self.0.push(Issue {
            severity: Severity::Warning,
            path: path.into(),
            message: message.into(),
            hint: Some(hint.to_owned()),
        });
    }
}

/// Protocols a port may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4Proto {
    Tcp,
    Udp,
    Sctp,
    /// Cilium's `ANY`: TCP, UDP and SCTP on the port; with no port, every protocol.
    Any,
}

impl L4Proto {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            "ANY" => Some(Self::Any),
            _ => None,
        }
    }
}

/// Parses a CIDR as Kubernetes and Cilium accept it (host bits are masked off).
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    if !s.contains('/') {
        return None;
    }
    s.parse::<IpNet>().ok().map(|n| n.trunc())
}

/// A parsed Cilium `port` string: a number (0 = every port) or a port name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

pub fn parse_cilium_port(s: &str) -> Option<PortRef> {
    if s.is_empty() {
        return Some(PortRef::Number(0));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u16>().ok().map(PortRef::Number);
    }
    // Cilium's IANA service-name check accepts upper case and compares names case-insensitively.
    let lower = s.to_ascii_lowercase();
    names::is_port_name(&lower).then_some(PortRef::Name(lower))
}

/// ICMP type names Cilium accepts in `icmps[].fields[].type` (IPv4, IPv6).
pub fn icmp_type_by_name(name: &str, v6: bool) -> Option<u8> {
    let v4: &[(&str, u8)] = &[
        ("EchoReply", 0),
        ("DestinationUnreachable", 3),
        ("Redirect", 5),
        ("Echo", 8),
        ("EchoRequest", 8),
        ("RouterAdvertisement", 9),
        ("RouterSelection", 10),
        ("TimeExceeded", 11),
        ("ParameterProblem", 12),
        ("Timestamp", 13),
        ("TimestampReply", 14),
        ("Photuris", 40),
        ("ExtendedEchoRequest", 42),
        ("ExtendedEchoReply", 43),
    ];
    let v6t: &[(&str, u8)] = &[
        ("DestinationUnreachable", 1),
        ("PacketTooBig", 2),
        ("TimeExceeded", 3),
        ("ParameterProblem", 4),
        ("EchoRequest", 128),
        ("EchoReply", 129),
        ("MulticastListenerQuery", 130),
        ("MulticastListenerReport", 131),
        ("MulticastListenerDone", 132),
        ("RouterSolicitation", 133),
        ("RouterAdvertisement", 134),
        ("NeighborSolicitation", 135),
        ("NeighborAdvertisement", 136),
        ("RedirectMessage", 137),
        ("RouterRenumbering", 138),
        ("ICMPNodeInformationQuery", 139),
        ("ICMPNodeInformationResponse", 140),
        ("InverseNeighborDiscoverySolicitation", 141),
        ("InverseNeighborDiscoveryAdvertisement", 142),
        ("HomeAgentAddressDiscoveryRequest", 144),
        ("HomeAgentAddressDiscoveryReply", 145),
        ("MobilePrefixSolicitation", 146),
        ("MobilePrefixAdvertisement", 147),
        ("DuplicateAddressRequestCodeSuffix", 157),
        ("DuplicateAddressConfirmationCodeSuffix", 158),
        ("ExtendedEchoRequest", 160),
        ("ExtendedEchoReply", 161),
    ];
    let table = if v6 { v6t } else { v4 };
    table.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The entities Cilium knows (`fromEntities` / `toEntities`).
pub const ENTITIES: &[&str] = &[
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "health",
    "init",
    "unmanaged",
    "ingress",
    "none",
];

const SA_LABEL_HINT: &str = "nothing sets `io.kubernetes.serviceaccount.name`; Cilium exposes a \
pod's service account as `io.cilium.k8s.policy.serviceaccount`";

fn check_labels(issues: &mut Issues, path: &str, labels: &BTreeMap<String, String>) {
    for (k, v) in labels {
        if !names::is_qualified_name(k) {
            issues.error(
                format!("{path}.{k}"),
                format!("invalid label key {k:?}: must be a qualified name (optional DNS prefix, '/', up to 63 alphanumerics, '-', '_' or '.')"),
            );
        }
        if !names::is_label_value(v) {
            issues.error(
                format!("{path}.{k}"),
                format!("invalid label value {v:?}: up to 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"),
            );
        }
    }
}

/// Validates a label selector. `cilium` allows `source:` prefixes on keys.
fn check_selector(issues: &mut Issues, path: &str, sel: &LabelSelector, cilium: bool) {
    let key_ok = |k: &str| {
        let key = if cilium {
            names::split_label_source(k).1
        } else {
            k
        };
        // Cilium's reserved and cidr labels are not Kubernetes qualified names.
        names::is_qualified_name(key)
            || (cilium && (k.starts_with("reserved:") || k.starts_with("cidr:")))
    };
    for (k, v) in &sel.match_labels {
        let p = format!("{path}.matchLabels.{k}");
        if !key_ok(k) {
            issues.error(p.clone(), format!("invalid label key {k:?}"));
        }
        if !names::is_label_value(v) {
            issues.error(p.clone(), format!("invalid label value {v:?}"));
        }
        if names::split_label_source(k).1 == "io.kubernetes.serviceaccount.name" {
            issues.warning(p, "label key that no endpoint carries", SA_LABEL_HINT);
        }
    }
    for (i, req) in sel.match_expressions.iter().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        if !key_ok(&req.key) {
            issues.error(
                format!("{p}.key"),
                format!("invalid label key {:?}", req.key),
            );
        }
        if names::split_label_source(&req.key).1 == "io.kubernetes.serviceaccount.name" {
            issues.warning(
                format!("{p}.key"),
                "label key that no endpoint carries",
                SA_LABEL_HINT,
            );
        }
        match req.operator {
            SelectorOperator::In | SelectorOperator::NotIn => {
                if req.values.is_empty() {
                    issues.error(
                        format!("{p}.values"),
                        "values must be non-empty when operator is In or NotIn",
                    );
                }
                for (j, v) in req.values.iter().enumerate() {
                    if !names::is_label_value(v) {
                        issues.error(
                            format!("{p}.values[{j}]"),
                            format!("invalid label value {v:?}"),
                        );
                    }
                }
            }
            SelectorOperator::Exists | SelectorOperator::DoesNotExist => {
                if !req.values.is_empty() {
                    issues.error(
                        format!("{p}.values"),
                        "values must be empty when operator is Exists or DoesNotExist",
                    );
                }
            }
        }
    }
}

fn check_name(issues: &mut Issues, name: Option<&String>, namespace: Option<&String>) {
    match name {
        None => issues.error("metadata.name", "missing field \"name\""),
        Some(n) if !names::is_dns1123_subdomain(n) => issues.error(
            "metadata.name",
            format!("invalid name {n:?}: must be a lowercase RFC 1123 subdomain"),
        ),
        Some(_) => {}
    }
    if let Some(ns) = namespace {
        if !names::is_dns1123_label(ns) {
            issues.error_hint(
                "metadata.namespace",
                format!("invalid namespace {ns:?}: must be a lowercase RFC 1123 label"),
                if ns.contains('$') {
                    "this looks like an unexpanded shell variable: substitute it before applying"
                } else {
                    "namespace names use lowercase letters, digits and '-'"
                },
            );
        }
    }
}

/// Validates a `v1 Namespace`.
pub(crate) fn namespace(meta: &crate::meta::ObjectMeta) -> Issues {
    let mut issues = Issues::default();
    match &meta.name {
        Some(n) if names::is_dns1123_label(n) => {}
        Some(n) => issues.error(
            "metadata.name",
            format!("invalid namespace name {n:?}: must be a lowercase RFC 1123 label"),
        ),
        None => issues.error("metadata.name", "missing field \"name\""),
    }
    check_labels(&mut issues, "metadata.labels", &meta.labels);
    issues
}

pub(crate) fn node(n: &crate::k8s::Node) -> Issues {
    let mut issues = Issues::default();
    check_name(&mut issues, n.metadata.name.as_ref(), None);
    check_labels(&mut issues, "metadata.labels", &n.metadata.labels);
    for (i, a) in n.status.addresses.iter().enumerate() {
        if a.kind == "InternalIP" && a.address.parse::<std::net::IpAddr>().is_err() {
            issues.error(
                format!("status.addresses[{i}].address"),
                format!("invalid IP address {:?}", a.address),
            );
        }
    }
    issues
}

pub(crate) fn pod(p: &Pod) -> Issues {
    let mut issues = Issues::default();
    check_name(
        &mut issues,
        p.metadata.name.as_ref(),
        p.metadata.namespace.as_ref(),
    );
    check_labels(&mut issues, "metadata.labels", &p.metadata.labels);
    match &p.status.pod_ip {
        None => issues.error_hint(
            "status.podIP",
            "missing field \"podIP\"",
            "every pod needs status.podIP (its address) to take part in policy",
        ),
        Some(ip) if ip.parse::<std::net::IpAddr>().is_err() => {
            issues.error("status.podIP", format!("invalid IP address {ip:?}"));
        }
        Some(_) => {}
    }
    for (ci, c) in p.spec.containers.iter().enumerate() {
        for (pi, port) in c.ports.iter().enumerate() {
            let path = format!("spec.containers[{ci}].ports[{pi}]");
            if !(1..=65535).contains(&port.container_port) {
                issues.error(
                    format!("{path}.containerPort"),
                    format!(
                        "invalid port {}: must be between 1 and 65535",
                        port.container_port
                    ),
                );
            }
            if let Some(proto) = &port.protocol {
                if !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP") {
                    issues.error(
                        format!("{path}.protocol"),
                        format!("unsupported protocol {proto:?}: must be TCP, UDP or SCTP"),
                    );
                }
            }
            if let Some(name) = &port.name {
                if !names::is_port_name(name) {
                    issues.error(
                        format!("{path}.name"),
                        format!("invalid port name {name:?}: must be an IANA service name (at most 15 lowercase letters, digits and '-', with a letter)"),
                    );
                }
            }
        }
    }
    issues
}

fn check_cidr(issues: &mut Issues, path: &str, cidr: &str) -> Option<IpNet> {
    let parsed = parse_cidr(cidr);
    if parsed.is_none() {
        issues.error(
            path,
            format!("invalid CIDR {cidr:?}: expected an address and a prefix length, such as 10.0.0.0/8 or 2001:db8::/32"),
        );
    }
    parsed
}

fn check_except(issues: &mut Issues, path: &str, base: Option<IpNet>, except: &[String]) {
    for (i, e) in except.iter().enumerate() {
        let p = format!("{path}.except[{i}]");
        if let (Some(net), Some(ex)) = (base, check_cidr(issues, &p, e)) {
            if !net.contains(&ex) || ex.prefix_len() <= net.prefix_len() {
                issues.error(
                    p,
                    format!("except {e:?} must be a strict subset of the CIDR {net}"),
                );
            }
        }
    }
}

/// `networking.k8s.io/v1 NetworkPolicy`, as the API server's `ValidateNetworkPolicy`.
pub(crate) fn network_policy(np: &NetworkPolicy) -> Issues {
    let mut issues = Issues::default();
    if np.api_version != "networking.k8s.io/v1" {
        issues.error(
            "apiVersion",
            format!(
                "unsupported apiVersion {:?} for NetworkPolicy: use networking.k8s.io/v1",
                np.api_version
            ),
        );
    }
    check_name(
        &mut issues,
        np.metadata.name.as_ref(),
        np.metadata.namespace.as_ref(),
    );
    let spec = &np.spec;
    check_selector(&mut issues, "spec.podSelector", &spec.pod_selector, false);
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        for (j, peer) in rule.from.iter().flatten().enumerate() {
            k8s_peer(&mut issues, &format!("{path}.from[{j}]"), peer);
        }
        for (j, port) in rule.ports.iter().flatten().enumerate() {
            k8s_port(&mut issues, &format!("{path}.ports[{j}]"), port);
        }
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        for (j, peer) in rule.to.iter().flatten().enumerate() {
            k8s_peer(&mut issues, &format!("{path}.to[{j}]"), peer);
        }
        for (j, port) in rule.ports.iter().flatten().enumerate() {
            k8s_port(&mut issues, &format!("{path}.ports[{j}]"), port);
        }
    }
    if let Some(types) = &spec.policy_types {
        if types.len() > 2 {
            issues.error("spec.policyTypes", "may not have more than 2 entries");
        }
        for (i, t) in types.iter().enumerate() {
            if t != "Ingress" && t != "Egress" {
                issues.error(
                    format!("spec.policyTypes[{i}]"),
                    format!("unsupported value {t:?}: must be \"Ingress\" or \"Egress\""),
                );
            }
            if types[..i].contains(t) {
                issues.error(
                    format!("spec.policyTypes[{i}]"),
                    format!("duplicate value {t:?}"),
                );
            }
        }
    }
    issues
}

fn k8s_peer(issues: &mut Issues, path: &str, peer: &NetworkPolicyPeer) {
    let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    match (&peer.ip_block, selectors) {
        (None, false) => issues.error_hint(
            path,
            "must specify a peer",
            "set podSelector, namespaceSelector or ipBlock; to allow every source leave out `from`/`to` instead",
        ),
        (Some(_), true) => issues.error(
            path,
            "may not specify more than 1 peer type: ipBlock cannot be combined with podSelector or namespaceSelector",
        ),
        _ => {}
    }
    if let Some(sel) = &peer.pod_selector {
        check_selector(issues, &format!("{path}.podSelector"), sel, false);
    }
    if let Some(sel) = &peer.namespace_selector {
        check_selector(issues, &format!("{path}.namespaceSelector"), sel, false);
    }
    if let Some(block) = &peer.ip_block {
        let net = check_cidr(issues, &format!("{path}.ipBlock.cidr"), &block.cidr);
        check_except(issues, &format!("{path}.ipBlock"), net, &block.except);
    }
}

fn k8s_port(issues: &mut Issues, path: &str, port: &NetworkPolicyPort) {
    if let Some(proto) = &port.protocol {
        if !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP") {
            issues.error(
                format!("{path}.protocol"),
                format!("unsupported protocol {proto:?}: must be TCP, UDP or SCTP"),
            );
        }
    }
    let mut number = None;
    match &port.port {
        Some(IntOrString::Int(n)) => {
            if (1..=65535).contains(n) {
                number = Some(*n);
            } else {
                issues.error(
                    format!("{path}.port"),
                    format!("invalid port {n}: must be between 1 and 65535"),
                );
            }
        }
        Some(IntOrString::Str(s)) if !names::is_port_name(s) => {
            issues.error_hint(
                    format!("{path}.port"),
                    format!("invalid port name {s:?}"),
                    if s.bytes().all(|b| b.is_ascii_digit()) {
                        "a port number is written without quotes: port: 80"
                    } else {
                        "a named port is an IANA service name: at most 15 lowercase letters, digits and '-', with a letter"
                    },
                );
        }
        Some(IntOrString::Str(_)) | None => {}
    }
    if let Some(end) = port.end_port {
        match (&port.port, number) {
            (None, _) => issues.error(
                format!("{path}.endPort"),
                "may not be specified when port is not specified",
            ),
            (Some(IntOrString::Str(_)), _) => issues.error(
                format!("{path}.endPort"),
                "may not be specified when port is a named port",
            ),
            (_, Some(start)) if end < start => issues.error(
                format!("{path}.endPort"),
                format!("endPort {end} must be greater than or equal to port {start}"),
            ),
            _ => {}
        }
        if !(1..=65535).contains(&end) {
            issues.error(
                format!("{path}.endPort"),
                format!("invalid port {end}: must be between 1 and 65535"),
            );
        }
    }
}

/// `cilium.io/v2` CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy, as Cilium's
/// `Rule.Sanitize()` and the CRD schema.
pub(crate) fn cilium_policy(p: &CiliumNetworkPolicy, clusterwide: bool) -> Issues {
    let mut issues = Issues::default();
    if p.api_version != "cilium.io/v2" {
        issues.error(
            "apiVersion",
            format!(
                "unsupported apiVersion {:?} for {}: use cilium.io/v2",
                p.api_version, p.kind
            ),
        );
    }
    check_name(
        &mut issues,
        p.metadata.name.as_ref(),
        if clusterwide {
            None
        } else {
            p.metadata.namespace.as_ref()
        },
    );
    if clusterwide && p.metadata.namespace.is_some() {
        issues.error(
            "metadata.namespace",
            "a CiliumClusterwideNetworkPolicy is not namespaced",
        );
    }
    if p.spec.is_none() && p.specs.as_ref().is_none_or(Vec::is_empty) {
        issues.error("spec", "one of spec or specs must be set");
    }
    if let Some(rule) = &p.spec {
        cilium_rule(&mut issues, "spec", rule, clusterwide);
    }
    for (i, rule) in p.specs.iter().flatten().enumerate() {
        cilium_rule(&mut issues, &format!("specs[{i}]"), rule, clusterwide);
    }
    issues
}

fn cilium_rule(issues: &mut Issues, path: &str, rule: &Rule, clusterwide: bool) {
    match (&rule.endpoint_selector, &rule.node_selector) {
        (None, None) => issues.error(path, "one of endpointSelector or nodeSelector must be set"),
        (Some(_), Some(_)) => issues.error(
            format!("{path}.nodeSelector"),
            "endpointSelector and nodeSelector are mutually exclusive",
        ),
        (Some(sel), None) => check_selector(issues, &format!("{path}.endpointSelector"), sel, true),
        (None, Some(sel)) => {
            if !clusterwide {
                issues.error(
                    format!("{path}.nodeSelector"),
                    "nodeSelector (host policy) is only allowed in a CiliumClusterwideNetworkPolicy",
                );
            }
            check_selector(issues, &format!("{path}.nodeSelector"), sel, true);
        }
    }
    if rule.node_selector.is_some() {
        let l7 = rule
            .ingress
            .iter()
            .flatten()
            .flat_map(|r| r.to_ports.iter().flatten())
            .any(|p| p.rules.is_some())
            || rule
                .egress
                .iter()
                .flatten()
                .flat_map(|r| r.to_ports.iter().flatten())
                .any(|p| p.rules.is_some());
        if l7 {
            issues.error(
                format!("{path}.nodeSelector"),
                "L7 rules are not supported in host policies (nodeSelector)",
            );
        }
    }
    for (i, r) in rule.ingress.iter().flatten().enumerate() {
        let p = format!("{path}.ingress[{i}]");
        exclusive_l3(
            issues,
            &p,
            &[
                ("fromEndpoints", len(r.from_endpoints.as_ref())),
                ("fromCIDR", len(r.from_cidr.as_ref())),
                ("fromCIDRSet", len(r.from_cidr_set.as_ref())),
                ("fromEntities", len(r.from_entities.as_ref())),
                ("fromNodes", len(r.from_nodes.as_ref())),
                ("fromGroups", len(r.from_groups.as_ref())),
            ],
        );
        peers(
            issues,
            &p,
            ("fromEndpoints", r.from_endpoints.as_deref()),
            ("fromRequires", r.from_requires.as_deref()),
            ("fromCIDR", r.from_cidr.as_deref()),
            ("fromCIDRSet", r.from_cidr_set.as_deref()),
            ("fromEntities", r.from_entities.as_deref()),
            ("fromNodes", r.from_nodes.as_deref()),
        );
        let ports: Vec<_> = r
            .to_ports
            .iter()
            .flatten()
            .map(|pr| (pr.ports.as_deref(), pr.rules.as_ref()))
            .collect();
        to_ports(issues, &p, &ports, true);
        icmps(issues, &p, r.icmps.as_deref(), !ports.is_empty());
    }
    for (i, r) in rule.ingress_deny.iter().flatten().enumerate() {
        let p = format!("{path}.ingressDeny[{i}]");
        exclusive_l3(
            issues,
            &p,
            &[
                ("fromEndpoints", len(r.from_endpoints.as_ref())),
                ("fromCIDR", len(r.from_cidr.as_ref())),
                ("fromCIDRSet", len(r.from_cidr_set.as_ref())),
                ("fromEntities", len(r.from_entities.as_ref())),
                ("fromNodes", len(r.from_nodes.as_ref())),
                ("fromGroups", len(r.from_groups.as_ref())),
            ],
        );
        peers(
            issues,
            &p,
            ("fromEndpoints", r.from_endpoints.as_deref()),
            ("fromRequires", r.from_requires.as_deref()),
            ("fromCIDR", r.from_cidr.as_deref()),
            ("fromCIDRSet", r.from_cidr_set.as_deref()),
            ("fromEntities", r.from_entities.as_deref()),
            ("fromNodes", r.from_nodes.as_deref()),
        );
        let ports: Vec<_> = r
            .to_ports
            .iter()
            .flatten()
            .map(|pr| (pr.ports.as_deref(), None))
            .collect();
        to_ports(issues, &p, &ports, true);
        icmps(issues, &p, r.icmps.as_deref(), !ports.is_empty());
    }
    for (i, r) in rule.egress.iter().flatten().enumerate() {
        let p = format!("{path}.egress[{i}]");
        exclusive_l3(
            issues,
            &p,
            &[
                ("toEndpoints", len(r.to_endpoints.as_ref())),
                ("toCIDR", len(r.to_cidr.as_ref())),
                ("toCIDRSet", len(r.to_cidr_set.as_ref())),
                ("toEntities", len(r.to_entities.as_ref())),
                ("toServices", len(r.to_services.as_ref())),
                ("toFQDNs", len(r.to_fqdns.as_ref())),
                ("toGroups", len(r.to_groups.as_ref())),
                ("toNodes", len(r.to_nodes.as_ref())),
            ],
        );
        peers(
            issues,
            &p,
            ("toEndpoints", r.to_endpoints.as_deref()),
            ("toRequires", r.to_requires.as_deref()),
            ("toCIDR", r.to_cidr.as_deref()),
            ("toCIDRSet", r.to_cidr_set.as_deref()),
            ("toEntities", r.to_entities.as_deref()),
            ("toNodes", r.to_nodes.as_deref()),
        );
        if let Some(fqdns) = &r.to_fqdns {
            for (j, f) in fqdns.iter().enumerate() {
                fqdn_selector(issues, &format!("{p}.toFQDNs[{j}]"), f);
            }
        }
        let ports: Vec<_> = r
            .to_ports
            .iter()
            .flatten()
            .map(|pr| (pr.ports.as_deref(), pr.rules.as_ref()))
            .collect();
        to_ports(issues, &p, &ports, false);
        icmps(issues, &p, r.icmps.as_deref(), !ports.is_empty());
    }
    for (i, r) in rule.egress_deny.iter().flatten().enumerate() {
        let p = format!("{path}.egressDeny[{i}]");
        exclusive_l3(
            issues,
            &p,
            &[
                ("toEndpoints", len(r.to_endpoints.as_ref())),
                ("toCIDR", len(r.to_cidr.as_ref())),
                ("toCIDRSet", len(r.to_cidr_set.as_ref())),
                ("toEntities", len(r.to_entities.as_ref())),
                ("toServices", len(r.to_services.as_ref())),
                ("toGroups", len(r.to_groups.as_ref())),
                ("toNodes", len(r.to_nodes.as_ref())),
            ],
        );
        peers(
            issues,
            &p,
            ("toEndpoints", r.to_endpoints.as_deref()),
            ("toRequires", r.to_requires.as_deref()),
            ("toCIDR", r.to_cidr.as_deref()),
            ("toCIDRSet", r.to_cidr_set.as_deref()),
            ("toEntities", r.to_entities.as_deref()),
            ("toNodes", r.to_nodes.as_deref()),
        );
        let ports: Vec<_> = r
            .to_ports
            .iter()
            .flatten()
            .map(|pr| (pr.ports.as_deref(), None))
            .collect();
        to_ports(issues, &p, &ports, false);
        icmps(issues, &p, r.icmps.as_deref(), !ports.is_empty());
    }
}

/// Cilium rejects rules that combine two kinds of L3 peer ("Combining fromEndpoints and
/// fromCIDR is not supported yet").
fn exclusive_l3(issues: &mut Issues, path: &str, members: &[(&str, usize)]) {
    let present: Vec<&str> = members
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(m, _)| *m)
        .collect();
    if present.len() > 1 {
        issues.error_hint(
            format!("{path}.{}", present[1]),
            format!(
                "combining {} and {} in one rule is not supported",
                present[0], present[1]
            ),
            "write them as two rules in the same section: rules are ORed",
        );
    }
}

fn len<T>(v: Option<&Vec<T>>) -> usize {
    v.map_or(0, Vec::len)
}

#[allow(clippy::too_many_arguments)]
fn peers(
    issues: &mut Issues,
    path: &str,
    endpoints: (&str, Option<&[LabelSelector]>),
    requires: (&str, Option<&[LabelSelector]>),
    cidrs: (&str, Option<&[String]>),
    cidr_sets: (&str, Option<&[CidrRule]>),
    entities: (&str, Option<&[String]>),
    nodes: (&str, Option<&[LabelSelector]>),
) {
    for (name, sels) in [endpoints, requires, nodes] {
        for (i, s) in sels.into_iter().flatten().enumerate() {
            check_selector(issues, &format!("{path}.{name}[{i}]"), s, true);
        }
    }
    for (i, c) in cidrs.1.into_iter().flatten().enumerate() {
        check_cidr(issues, &format!("{path}.{}[{i}]", cidrs.0), c);
    }
    for (i, set) in cidr_sets.1.into_iter().flatten().enumerate() {
        let p = format!("{path}.{}[{i}]", cidr_sets.0);
        match (&set.cidr, &set.cidr_group_ref, &set.cidr_group_selector) {
            (Some(c), None, None) => {
                let net = check_cidr(issues, &format!("{p}.cidr"), c);
                check_except(issues, &p, net, &set.except);
            }
            (None, None, None) => issues.error(p, "one of cidr, cidrGroupRef or cidrGroupSelector must be set"),
            (None, _, _) => issues.error_hint(
                p,
                "cidrGroupRef / cidrGroupSelector refer to CiliumCIDRGroup objects, which are not supported yet",
                "write the CIDRs in the rule with `cidr:` for now",
            ),
            (Some(_), _, _) => issues.error(p, "cidr, cidrGroupRef and cidrGroupSelector are mutually exclusive"),
        }
    }
    for (i, e) in entities.1.into_iter().flatten().enumerate() {
        if !ENTITIES.contains(&e.as_str()) {
            issues.error(
                format!("{path}.{}[{i}]", entities.0),
                format!("unknown entity {e:?}: one of {}", ENTITIES.join(", ")),
            );
        }
    }
    if requires.1.is_some_and(|r| !r.is_empty())
        && endpoints.1.is_none()
        && cidrs.1.is_none()
        && cidr_sets.1.is_none()
        && entities.1.is_none()
        && nodes.1.is_none()
    {
        issues.warning(
            format!("{path}.{}", requires.0),
            format!("a rule whose only peer field is {} grants nothing", requires.0),
            "requirements only narrow the fromEndpoints/toEndpoints of the rules that select this endpoint; add the peers themselves",
        );
    }
}

fn to_ports(
    issues: &mut Issues,
    path: &str,
    port_rules: &[(Option<&[PortProtocol]>, Option<&L7Rules>)],
    ingress: bool,
) {
    for (i, (ports, rules)) in port_rules.iter().enumerate() {
        let p = format!("{path}.toPorts[{i}]");
        let ports = ports.unwrap_or(&[]);
        if ports.len() > 40 {
            issues.error(
                format!("{p}.ports"),
                "too many ports: at most 40 per toPorts entry",
            );
        }
        let mut protos = Vec::new();
        let mut wildcard_port = false;
        for (j, port) in ports.iter().enumerate() {
            let pp = format!("{p}.ports[{j}]");
            let proto = match port.protocol.as_deref() {
                None | Some("") => L4Proto::Any,
                Some(s) => {
                    if let Some(proto) = L4Proto::parse(s) {
                        proto
                    } else {
                        issues.error(
                            format!("{pp}.protocol"),
                            format!("unsupported protocol {s:?}: must be TCP, UDP, SCTP or ANY"),
                        );
                        L4Proto::Any
                    }
                }
            };
            protos.push(proto);
            let parsed = match port.port.as_deref() {
                None => Some(PortRef::Number(0)),
                Some(s) => {
                    let r = parse_cilium_port(s);
                    if r.is_none() {
                        issues.error(
                            format!("{pp}.port"),
                            format!("invalid port {s:?}: a number from 0 to 65535 or a port name"),
                        );
                    }
                    r
                }
            };
            if let Some(end) = port.end_port {
                if !(0..=65535).contains(&end) {
                    issues.error(format!("{pp}.endPort"), format!("invalid endPort {end}"));
                }
                match parsed {
                    // Cilium takes endPort < port as the single port; almost always a typo.
                    Some(PortRef::Number(start))
                        if start != 0 && end != 0 && end < i64::from(start) =>
                    {
                        issues.warning(
                            format!("{pp}.endPort"),
                            format!(
                                "endPort {end} is below port {start}: only port {start} is covered"
                            ),
                            "endPort is the last port of the range",
                        );
                    }
                    Some(PortRef::Name(_)) => issues.warning(
                        format!("{pp}.endPort"),
                        "endPort is ignored with a named port",
                        "use numeric ports for a range",
                    ),
                    _ => {}
                }
            }
            if matches!(parsed, Some(PortRef::Number(0))) {
                wildcard_port = true;
            }
        }
        if ports.is_empty() {
            wildcard_port = true;
        }
        if let Some(rules) = rules {
            if wildcard_port
                && (rules.http.is_some() || rules.kafka.is_some() || rules.dns.is_some())
            {
                issues.error(
                    format!("{p}.rules"),
                    "L7 rules can not be used when a port is 0 (every port): name the port",
                );
            }
            l7_rules(issues, &format!("{p}.rules"), rules, &protos, ingress);
        }
    }
}

fn l7_rules(issues: &mut Issues, path: &str, rules: &L7Rules, protos: &[L4Proto], ingress: bool) {
    let kinds = usize::from(rules.http.is_some())
        + usize::from(rules.kafka.is_some())
        + usize::from(rules.dns.is_some())
        + usize::from(rules.l7proto.is_some() || rules.l7.is_some());
    if kinds > 1 {
        issues.error(
            path,
            "only one of http, kafka, dns and l7 rules may be set per port rule",
        );
    }
    if (rules.http.is_some() || rules.kafka.is_some() || rules.l7proto.is_some())
        && protos.iter().any(|p| *p != L4Proto::Tcp)
    {
        issues.error_hint(
            path,
            "L7 rules can only apply to TCP",
            "set protocol: TCP on every port of this toPorts entry (no protocol means ANY)",
        );
    }
    if rules.dns.is_some() && ingress {
        issues.error(
            format!("{path}.dns"),
            "DNS rules are only allowed in egress rules",
        );
    }
    for (i, h) in rules.http.iter().flatten().enumerate() {
        let p = format!("{path}.http[{i}]");
        for (field, value) in [("method", &h.method), ("path", &h.path), ("host", &h.host)] {
            if let Some(v) = value {
                if let Err(e) = regex::Regex::new(&format!("^(?:{v})$")) {
                    issues.error(
                        format!("{p}.{field}"),
                        format!("invalid regular expression {v:?}: {e}"),
                    );
                }
            }
        }
        if let Some(path_re) = &h.path {
            if path_re.ends_with("/*") {
                issues.warning(
                    format!("{p}.path"),
                    format!("{path_re:?} is a regular expression: `/*` means \"any number of slashes\", not \"anything below\""),
                    "write `/api/v1/.*` to match every path under /api/v1/",
                );
            }
        }
        for (j, header) in h.headers.iter().enumerate() {
            if let Some((_, value)) = header.split_once(':') {
                let value = value.trim();
                if value.contains(".*") || value == "*" {
                    issues.warning(
                        format!("{p}.headers[{j}]"),
                        format!("header value {value:?} is matched literally, not as a pattern"),
                        "list the header name alone to require its presence, or use headerMatches",
                    );
                }
            }
        }
        for (j, hm) in h.header_matches.iter().enumerate() {
            if let Some(m) = &hm.mismatch {
                if !matches!(m.as_str(), "LOG" | "ADD" | "DELETE" | "REPLACE") {
                    issues.error(
                        format!("{p}.headerMatches[{j}].mismatch"),
                        format!("unsupported mismatch action {m:?}: LOG, ADD, DELETE or REPLACE"),
                    );
                }
            }
        }
    }
    for (i, k) in rules.kafka.iter().flatten().enumerate() {
        let p = format!("{path}.kafka[{i}]");
        if let Some(role) = &k.role {
            if !matches!(role.as_str(), "produce" | "consume") {
                issues.error(
                    format!("{p}.role"),
                    format!("invalid role {role:?}: produce or consume"),
                );
            }
            if k.api_key.is_some() {
                issues.error(
                    format!("{p}.role"),
                    "role and apiKey are mutually exclusive",
                );
            }
        }
        if let Some(key) = &k.api_key {
            if crate::kafka::api_key_by_name(key).is_none() {
                issues.error(
                    format!("{p}.apiKey"),
                    format!("unknown Kafka apiKey {key:?}"),
                );
            }
        }
        if let Some(v) = &k.api_version {
            if v.parse::<i16>().map_or(true, |v| v < 0) {
                issues.error(
                    format!("{p}.apiVersion"),
                    format!("invalid apiVersion {v:?}: a non-negative number"),
                );
            }
        }
        if let Some(topic) = &k.topic {
            let ok = !topic.is_empty()
                && topic.len() <= 255
                && topic
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                issues.error(
                    format!("{p}.topic"),
                    format!("invalid Kafka topic {topic:?}: up to 255 of [a-zA-Z0-9._-]"),
                );
            }
        }
    }
    for (i, d) in rules.dns.iter().flatten().enumerate() {
        fqdn_selector(issues, &format!("{path}.dns[{i}]"), d);
    }
}

fn fqdn_selector(issues: &mut Issues, path: &str, f: &FqdnSelector) {
    match (&f.match_name, &f.match_pattern) {
        (None, None) => issues.error(path, "one of matchName or matchPattern must be set"),
        (Some(_), Some(_)) => {
            issues.error(path, "matchName and matchPattern are mutually exclusive");
        }
        (Some(n), None) => {
            let ok = !n.is_empty()
                && n.len() <= 255
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if !ok {
                issues.error(
                    format!("{path}.matchName"),
                    format!("invalid DNS name {n:?}"),
                );
            }
        }
        (None, Some(p)) => {
            let ok = !p.is_empty()
                && p.len() <= 255
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'*'));
            if !ok {
                issues.error(
                    format!("{path}.matchPattern"),
                    format!("invalid DNS pattern {p:?}: letters, digits, '.', '-', '_' and '*'"),
                );
            }
        }
    }
}

fn icmps(issues: &mut Issues, path: &str, rules: Option<&[IcmpRule]>, has_ports: bool) {
    let Some(rules) = rules else { return };
    if has_ports && !rules.is_empty() {
        issues.error(
            format!("{path}.icmps"),
            "toPorts and icmps cannot both be set in one rule",
        );
    }
    for (i, r) in rules.iter().enumerate() {
        if r.fields.len() > 40 {
            issues.error(
                format!("{path}.icmps[{i}].fields"),
                "too many ICMP fields: at most 40",
            );
        }
        for (j, f) in r.fields.iter().enumerate() {
            let p = format!("{path}.icmps[{i}].fields[{j}]");
            let v6 = match f.family.as_deref() {
                None | Some("IPv4") => false,
                Some("IPv6") => true,
                Some(other) => {
                    issues.error(
                        format!("{p}.family"),
                        format!("invalid family {other:?}: IPv4 or IPv6"),
                    );
                    false
                }
            };
            match &f.icmp_type {
                IntOrString::Int(t) if !(0..=255).contains(t) => {
                    issues.error(
                        format!("{p}.type"),
                        format!("invalid ICMP type {t}: 0 to 255"),
                    );
                }
                IntOrString::Str(s) if icmp_type_by_name(s, v6).is_none() => {
                    issues.error(format!("{p}.type"), format!("unknown ICMP type name {s:?}"));
                }
                _ => {}
            }
        }
    }
}

/// `palisade.dev/v1alpha1 ConnectivityTest`: field-level checks; references to pods and hosts
/// are resolved by the runner, which knows the cluster.
pub(crate) fn connectivity_test(t: &ConnectivityTest) -> Issues {
    let mut issues = Issues::default();
    if t.api_version != "palisade.dev/v1alpha1" {
        issues.error(
            "apiVersion",
            format!(
                "unsupported apiVersion {:?} for ConnectivityTest: use palisade.dev/v1alpha1",
                t.api_version
            ),
        );
    }
    for (i, h) in t.spec.external_hosts.iter().enumerate() {
        let p = format!("spec.externalHosts[{i}]");
        if h.ip.parse::<std::net::IpAddr>().is_err() {
            issues.error(format!("{p}.ip"), format!("invalid IP address {:?}", h.ip));
        }
        for (j, port) in h.ports.iter().enumerate() {
            if !(1..=65535).contains(&port.port) {
                issues.error(
                    format!("{p}.ports[{j}].port"),
                    format!("invalid port {}", port.port),
                );
            }
            if let Some(proto) = &port.protocol {
                if proto != "TCP" && proto != "UDP" {
                    issues.error(
                        format!("{p}.ports[{j}].protocol"),
                        format!("unsupported protocol {proto:?}: TCP or UDP"),
                    );
                }
            }
        }
    }
    if let Some(dns) = &t.spec.dns {
        for (name, ips) in &dns.records {
            for (j, ip) in ips.iter().enumerate() {
                if ip.parse::<std::net::IpAddr>().is_err() {
                    issues.error(
                        format!("spec.dns.records.{name}[{j}]"),
                        format!("invalid IP address {ip:?}"),
                    );
                }
            }
        }
    }
    for (i, probe) in t.spec.probes.iter().enumerate() {
        let p = format!("spec.probes[{i}]");
        let targets = usize::from(probe.to.is_some())
            + usize::from(probe.to_ip.is_some())
            + usize::from(probe.to_fqdn.is_some());
        if targets != 1 {
            issues.error(p.clone(), "exactly one of to, toIP and toFQDN must be set");
        }
        if let Some(ip) = &probe.to_ip {
            if ip.parse::<std::net::IpAddr>().is_err() {
                issues.error(format!("{p}.toIP"), format!("invalid IP address {ip:?}"));
            }
        }
        let proto = probe.protocol.as_deref().unwrap_or("TCP");
        if !matches!(proto, "TCP" | "UDP" | "ICMP") {
            issues.error(
                format!("{p}.protocol"),
                format!("unsupported protocol {proto:?}: TCP, UDP or ICMP"),
            );
        }
        match (&probe.port, proto) {
            (Some(_), "ICMP") => issues.error(format!("{p}.port"), "an ICMP probe has no port"),
            (None, "TCP" | "UDP") => issues.error(p.clone(), "missing field \"port\""),
            (Some(IntOrString::Int(n)), _) if !(1..=65535).contains(n) => {
                issues.error(format!("{p}.port"), format!("invalid port {n}: 1 to 65535"));
            }
            (Some(IntOrString::Str(s)), _) if !names::is_port_name(s) => {
                issues.error(format!("{p}.port"), format!("invalid port name {s:?}"));
            }
            _ => {}
        }
        if probe.icmp.is_some() && proto != "ICMP" {
            issues.error(format!("{p}.icmp"), "icmp is only for protocol: ICMP");
        }
        let l7 = usize::from(probe.http.is_some())
            + usize::from(probe.dns.is_some())
            + usize::from(probe.kafka.is_some());
        if l7 > 1 {
            issues.error(p.clone(), "at most one of http, dns and kafka");
        }
        if (probe.http.is_some() || probe.kafka.is_some()) && proto != "TCP" {
            issues.error(p.clone(), "http and kafka probes run over TCP");
        }
        if let Some(k) = &probe.kafka {
            if k.role.is_none() && k.api_key.is_none() {
                issues.error(format!("{p}.kafka"), "one of role or apiKey must be set");
            }
            if let Some(role) = &k.role {
                if role != "produce" && role != "consume" {
                    issues.error(
                        format!("{p}.kafka.role"),
                        format!("invalid role {role:?}: produce or consume"),
                    );
                }
            }
            if let Some(key) = &k.api_key {
                if crate::kafka::api_key_by_name(key).is_none() {
                    issues.error(
                        format!("{p}.kafka.apiKey"),
                        format!("unknown Kafka apiKey {key:?}"),
                    );
                }
            }
        }
    }
    issues
}
