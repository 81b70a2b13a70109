//! Hubble-style flow filters.
//!
//! Semantics, per flag:
//! - a flag given several times matches if any of its values does (OR);
//! - different flags must all match (AND);
//! - "either side" flags (`--namespace`, `--pod`, `--label`, `--ip`, `--identity`, `--port`)
//!   match if the source or the destination matches, each flag on its own;
//! - `--from-*` flags all apply to the source, `--to-*` flags to the destination;
//! - a pod given without a namespace (`--pod deathstar`) takes each `--namespace` given, else
//!   `default`; the name is a prefix, as in Hubble (`--pod default/deathstar` matches
//!   `deathstar-1`; `--pod kube-system/` every pod of the namespace).
//!
//! Time bounds (`--since`) are not part of the filter: see [`crate::FlowsRequest`].

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::flow::{Endpoint, EventType, Flow, TrafficDirection, Verdict, L4};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--{flag}: {message}")]
pub struct FilterError {
    pub flag: &'static str,
    pub message: String,
}

fn invalid(flag: &'static str, message: impl Into<String>) -> FilterError {
    FilterError {
        flag,
        message: message.into(),
    }
}

/// `--protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// ICMPv4 or ICMPv6.
    Icmp,
    Icmpv4,
    Icmpv6,
}

impl Protocol {
    pub fn matches(self, l4: Option<&L4>) -> bool {
        matches!(
            (self, l4),
            (Protocol::Tcp, Some(L4::Tcp(_)))
                | (Protocol::Udp, Some(L4::Udp(_)))
                | (Protocol::Sctp, Some(L4::Sctp(_)))
                | (Protocol::Icmp | Protocol::Icmpv4, Some(L4::IcmpV4(_)))
                | (Protocol::Icmp | Protocol::Icmpv6, Some(L4::IcmpV6(_)))
        )
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "sctp" => Ok(Protocol::Sctp),
            "icmp" => Ok(Protocol::Icmp),
            "icmpv4" => Ok(Protocol::Icmpv4),
            "icmpv6" => Ok(Protocol::Icmpv6),
            _ => Err(format!(
                "unknown protocol {s:?} (expected tcp, udp, sctp, icmp, icmpv4 or icmpv6)"
            )),
        }
    }
}

/// `--pod namespace/name-prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodPattern {
    pub namespace: String,
    /// Empty: every pod of the namespace.
    pub name_prefix: String,
}

impl PodPattern {
    pub fn matches(&self, ep: &Endpoint) -> bool {
        !ep.pod_name.is_empty()
            && ep.namespace == self.namespace
            && ep.pod_name.starts_with(&self.name_prefix)
    }
}

impl fmt::Display for PodPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name_prefix)
    }
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LabelOp {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LabelRequirement {
    /// `k8s`, `reserved`, `cidr`, …; `None` (or `any:` in the selector) matches every source.
    pub source: Option<String>,
    pub key: String,
    pub op: LabelOp,
}

/// A label selector as Kubernetes writes them: `app=web,tier!=db,env in (a,b),debug,!canary`.
/// A key may name the label's source (`k8s:app=web`, `reserved:world`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LabelSelector {
    pub requirements: Vec<LabelRequirement>,
}

/// Splits `source:key=value` (as in [`Endpoint::labels`]) into its parts. The source is what
/// stands before the first `:`, if anything does.
fn split_label(label: &str) -> (Option<&str>, &str, &str) {
    let (source, rest) = match label.split_once(':') {
        Some((s, rest)) if !s.is_empty() && !s.contains('=') => (Some(s), rest),
        _ => (None, label),
    };
    let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
    (source, key, value)
}

fn split_key(key: &str) -> (Option<String>, String) {
    match key.split_once(':') {
        Some(("any", k)) => (None, k.to_owned()),
        Some((s, k)) if !s.is_empty() => (Some(s.to_owned()), k.to_owned()),
        _ => (None, key.to_owned()),
    }
}

impl LabelRequirement {
    fn values<'a>(&'a self, labels: &'a [String]) -> impl Iterator<Item = &'a str> + 'a {
        labels.iter().filter_map(move |l| {
            let (source, key, value) = split_label(l);
            let source_ok = match (&self.source, source) {
                (None, _) => true,
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => false,
            };
            (source_ok && key == self.key).then_some(value)
        })
    }

    pub fn matches(&self, labels: &[String]) -> bool {
        let mut values = self.values(labels);
        match &self.op {
            LabelOp::Equals(v) => values.any(|x| x == v),
            LabelOp::NotEquals(v) => !values.any(|x| x == v),
            LabelOp::In(vs) => values.any(|x| vs.iter().any(|v| v == x)),
            LabelOp::NotIn(vs) => !values.any(|x| vs.iter().any(|v| v == x)),
            LabelOp::Exists => values.next().is_some(),
            LabelOp::DoesNotExist => values.next().is_none(),
        }
    }
}

impl LabelSelector {
    pub fn matches(&self, labels: &[String]) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl FromStr for LabelSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        // Split on commas outside parentheses.
        let mut parts = Vec::new();
        let mut depth = 0i32;
        let mut start = 0;
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
            if depth < 0 {
                return Err(format!("unbalanced parentheses in {s:?}"));
            }
        }
        if depth != 0 {
            return Err(format!("unbalanced parentheses in {s:?}"));
        }
        parts.push(&s[start..]);
        let mut requirements = Vec::new();
        for part in parts {
            requirements.push(parse_requirement(part.trim())?);
        }
        Ok(LabelSelector { requirements })
    }
}

fn valid_key(k: &str) -> bool {
    !k.is_empty() && !k.chars().any(|c| c.is_whitespace() || "=!(),".contains(c))
}

fn parse_requirement(p: &str) -> Result<LabelRequirement, String> {
    let bad = || format!("invalid label requirement {p:?}");
    if p.is_empty() {
        return Err("empty label requirement".to_owned());
    }
    let make = |key: &str, op: LabelOp| -> Result<LabelRequirement, String> {
        let key = key.trim();
        if !valid_key(key) {
            return Err(bad());
        }
        let (source, key) = split_key(key);
        Ok(LabelRequirement { source, key, op })
    };
    if let Some(k) = p.strip_prefix('!') {
        return make(k, LabelOp::DoesNotExist);
    }
    for (sep, negate) in [(" notin ", true), (" in ", false)] {
        if let Some((k, rest)) = p.split_once(sep) {
            let list = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(bad)?;
            let values: Vec<String> = list
                .split(',')
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect();
            if values.is_empty() {
                return Err(bad());
            }
            return make(
                k,
                if negate {
                    LabelOp::NotIn(values)
                } else {
                    LabelOp::In(values)
                },
            );
        }
    }
    if let Some((k, v)) = p.split_once("!=") {
        return make(k, LabelOp::NotEquals(v.trim().to_owned()));
    }
    if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
        return make(k, LabelOp::Equals(v.trim().to_owned()));
    }
    make(p, LabelOp::Exists)
}

/// Criteria on one endpoint (with its address and port).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointFilter {
    pub namespaces: Vec<String>,
    pub pods: Vec<PodPattern>,
    pub labels: Vec<LabelSelector>,
    pub ips: Vec<IpNet>,
    pub identities: Vec<u32>,
    pub ports: Vec<u16>,
}

/// One side of a flow, as the filters see it.
#[derive(Debug, Clone, Copy)]
struct Side<'a> {
    ep: &'a Endpoint,
    ip: IpAddr,
    port: Option<u16>,
}

impl EndpointFilter {
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.pods.is_empty()
            && self.labels.is_empty()
            && self.ips.is_empty()
            && self.identities.is_empty()
            && self.ports.is_empty()
    }

    fn namespace(&self, s: Side<'_>) -> bool {
        self.namespaces.is_empty() || self.namespaces.contains(&s.ep.namespace)
    }
    fn pod(&self, s: Side<'_>) -> bool {
        self.pods.is_empty() || self.pods.iter().any(|p| p.matches(s.ep))
    }
    fn label(&self, s: Side<'_>) -> bool {
        self.labels.is_empty() || self.labels.iter().any(|l| l.matches(&s.ep.labels))
    }
    fn ip(&self, s: Side<'_>) -> bool {
        self.ips.is_empty() || self.ips.iter().any(|n| n.contains(&s.ip))
    }
    fn identity(&self, s: Side<'_>) -> bool {
        self.identities.is_empty() || self.identities.contains(&s.ep.identity)
    }
    fn port(&self, s: Side<'_>) -> bool {
        self.ports.is_empty() || s.port.is_some_and(|p| self.ports.contains(&p))
    }

    /// Every criterion on the same side.
    fn matches_side(&self, s: Side<'_>) -> bool {
        self.namespace(s)
            && self.pod(s)
            && self.label(s)
            && self.ip(s)
            && self.identity(s)
            && self.port(s)
    }

    /// Each criterion on either side.
    fn matches_either(&self, a: Side<'_>, b: Side<'_>) -> bool {
        (self.namespace(a) || self.namespace(b))
            && (self.pod(a) || self.pod(b))
            && (self.label(a) || self.label(b))
            && (self.ip(a) || self.ip(b))
            && (self.identity(a) || self.identity(b))
            && (self.port(a) || self.port(b))
    }
}

/// A parsed filter; see the module documentation for the semantics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Filter {
    pub verdicts: Vec<Verdict>,
    pub types: Vec<EventType>,
    pub protocols: Vec<Protocol>,
    pub traffic_directions: Vec<TrafficDirection>,
    /// Criteria either side may satisfy, each on its own.
    pub either: EndpointFilter,
    /// Criteria on the source.
    pub from: EndpointFilter,
    /// Criteria on the destination.
    pub to: EndpointFilter,
}

impl Filter {
    /// Matches every flow.
    pub fn all() -> Self {
        Filter::default()
    }

    pub fn is_empty(&self) -> bool {
        self == &Filter::default()
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        if !self.verdicts.is_empty() && !self.verdicts.contains(&flow.verdict) {
            return false;
        }
        if !self.types.is_empty() && !self.types.contains(&flow.event_type) {
            return false;
        }
        if !self.protocols.is_empty() && !self.protocols.iter().any(|p| p.matches(flow.l4.as_ref()))
        {
            return false;
        }
        if !self.traffic_directions.is_empty()
            && !self.traffic_directions.contains(&flow.traffic_direction)
        {
            return false;
        }
        let src = Side {
            ep: &flow.source,
            ip: flow.ip.source,
            port: flow.source_port(),
        };
        let dst = Side {
            ep: &flow.destination,
            ip: flow.ip.destination,
            port: flow.destination_port(),
        };
        self.from.matches_side(src)
            && self.to.matches_side(dst)
            && self.either.matches_either(src, dst)
    }
}

/// The filter flags of `palisade observe`, named as `hubble observe` names them; every one may
/// be repeated. [`FilterFlags::build`] parses them into a [`Filter`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct FilterFlags {
    /// Only flows with this verdict: FORWARDED, DROPPED or AUDIT.
    #[cfg_attr(feature = "clap", arg(long, value_name = "VERDICT"))]
    pub verdict: Vec<String>,
    /// Only flows from or to pods of this namespace; also the namespace of pod names given
    /// without one.
    #[cfg_attr(feature = "clap", arg(short = 'n', long, value_name = "NAMESPACE"))]
    pub namespace: Vec<String>,
    /// Only flows whose source is in this namespace.
    #[cfg_attr(feature = "clap", arg(long, value_name = "NAMESPACE"))]
    pub from_namespace: Vec<String>,
    /// Only flows whose destination is in this namespace.
    #[cfg_attr(feature = "clap", arg(long, value_name = "NAMESPACE"))]
    pub to_namespace: Vec<String>,
    /// Only flows from or to this pod: `[namespace/]name-prefix`.
    #[cfg_attr(feature = "clap", arg(long, value_name = "[NS/]POD"))]
    pub pod: Vec<String>,
    /// Only flows from this pod: `[namespace/]name-prefix`.
    #[cfg_attr(feature = "clap", arg(long, value_name = "[NS/]POD"))]
    pub from_pod: Vec<String>,
    /// Only flows to this pod: `[namespace/]name-prefix`.
    #[cfg_attr(feature = "clap", arg(long, value_name = "[NS/]POD"))]
    pub to_pod: Vec<String>,
    /// Only flows from or to endpoints with these labels (`app=web,tier!=db`, `k8s:app=web`,
    /// `reserved:world`).
    #[cfg_attr(feature = "clap", arg(short = 'l', long, value_name = "SELECTOR"))]
    pub label: Vec<String>,
    /// Only flows whose source has these labels.
    #[cfg_attr(feature = "clap", arg(long, value_name = "SELECTOR"))]
    pub from_label: Vec<String>,
    /// Only flows whose destination has these labels.
    #[cfg_attr(feature = "clap", arg(long, value_name = "SELECTOR"))]
    pub to_label: Vec<String>,
    /// Only flows from or to this address or CIDR.
    #[cfg_attr(feature = "clap", arg(long, value_name = "IP|CIDR"))]
    pub ip: Vec<String>,
    /// Only flows from this address or CIDR.
    #[cfg_attr(feature = "clap", arg(long, value_name = "IP|CIDR"))]
    pub from_ip: Vec<String>,
    /// Only flows to this address or CIDR.
    #[cfg_attr(feature = "clap", arg(long, value_name = "IP|CIDR"))]
    pub to_ip: Vec<String>,
    /// Only flows from or to this security identity (number or reserved name: world, host…).
    #[cfg_attr(feature = "clap", arg(long, value_name = "ID"))]
    pub identity: Vec<String>,
    /// Only flows from this security identity.
    #[cfg_attr(feature = "clap", arg(long, value_name = "ID"))]
    pub from_identity: Vec<String>,
    /// Only flows to this security identity.
    #[cfg_attr(feature = "clap", arg(long, value_name = "ID"))]
    pub to_identity: Vec<String>,
    /// Only flows of this protocol: tcp, udp, sctp, icmp, icmpv4, icmpv6.
    #[cfg_attr(feature = "clap", arg(long, value_name = "PROTO"))]
    pub protocol: Vec<String>,
    /// Only flows with this source or destination port.
    #[cfg_attr(feature = "clap", arg(long, value_name = "PORT"))]
    pub port: Vec<String>,
    /// Only flows with this source port.
    #[cfg_attr(feature = "clap", arg(long, value_name = "PORT"))]
    pub from_port: Vec<String>,
    /// Only flows with this destination port.
    #[cfg_attr(feature = "clap", arg(long, value_name = "PORT"))]
    pub to_port: Vec<String>,
    /// Only events of this type: policy-verdict, drop, trace.
    #[cfg_attr(feature = "clap", arg(short = 't', long = "type", value_name = "TYPE"))]
    pub event_type: Vec<String>,
    /// Only flows in this direction of the local endpoint: ingress or egress.
    #[cfg_attr(feature = "clap", arg(long, value_name = "DIR"))]
    pub traffic_direction: Vec<String>,
}

fn parse_all<T>(
    flag: &'static str,
    values: &[String],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, FilterError> {
    values
        .iter()
        .map(|v| parse(v.trim()).map_err(|m| invalid(flag, m)))
        .collect()
}

fn parse_from_str<T: FromStr<Err = String>>(s: &str) -> Result<T, String> {
    s.parse()
}

fn parse_ip(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("not an IP address or CIDR: {s:?}"))
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse()
        .map_err(|_| format!("not a port number (0-65535): {s:?}"))
}

fn parse_identity(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    let name = s.strip_prefix("reserved:").unwrap_or(s);
    palisade_identity::reserved::ALL
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(id, _)| *id)
        .ok_or_else(|| format!("not an identity number or reserved name: {s:?}"))
}

fn parse_pods(
    flag: &'static str,
    values: &[String],
    namespaces: &[String],
) -> Result<Vec<PodPattern>, FilterError> {
    let mut out = Vec::new();
    for v in values {
        let v = v.trim();
        if v.is_empty() {
            return Err(invalid(flag, "empty pod name"));
        }
        match v.split_once('/') {
            Some((ns, prefix)) => {
                if ns.is_empty() || prefix.contains('/') {
                    return Err(invalid(
                        flag,
                        format!("expected [namespace/]pod, got {v:?}"),
                    ));
                }
                out.push(PodPattern {
                    namespace: ns.to_owned(),
                    name_prefix: prefix.to_owned(),
                });
            }
            None if namespaces.is_empty() => out.push(PodPattern {
                namespace: "default".to_owned(),
                name_prefix: v.to_owned(),
            }),
            None => out.extend(namespaces.iter().map(|ns| PodPattern {
                namespace: ns.clone(),
                name_prefix: v.to_owned(),
            })),
        }
    }
    Ok(out)
}

impl FilterFlags {
    pub fn build(&self) -> Result<Filter, FilterError> {
        let ns = parse_all("namespace", &self.namespace, |s| {
            if s.is_empty() {
                Err("empty namespace".to_owned())
            } else {
                Ok(s.to_owned())
            }
        })?;
        let names = |flag, v: &[String]| parse_all(flag, v, |s| Ok(s.to_owned()));
        let selectors = |flag, v: &[String]| parse_all(flag, v, parse_from_str::<LabelSelector>);
        Ok(Filter {
            verdicts: parse_all("verdict", &self.verdict, parse_from_str::<Verdict>)?,
            types: parse_all("type", &self.event_type, parse_from_str::<EventType>)?,
            protocols: parse_all("protocol", &self.protocol, parse_from_str::<Protocol>)?,
            traffic_directions: parse_all(
                "traffic-direction",
                &self.traffic_direction,
                parse_from_str::<TrafficDirection>,
            )?,
            either: EndpointFilter {
                pods: parse_pods("pod", &self.pod, &ns)?,
                namespaces: ns.clone(),
                labels: selectors("label", &self.label)?,
                ips: parse_all("ip", &self.ip, parse_ip)?,
                identities: parse_all("identity", &self.identity, parse_identity)?,
                ports: parse_all("port", &self.port, parse_port)?,
            },
            from: EndpointFilter {
                namespaces: names("from-namespace", &self.from_namespace)?,
                pods: parse_pods("from-pod", &self.from_pod, &ns)?,
                labels: selectors("from-label", &self.from_label)?,
                ips: parse_all("from-ip", &self.from_ip, parse_ip)?,
                identities: parse_all("from-identity", &self.from_identity, parse_identity)?,
                ports: parse_all("from-port", &self.from_port, parse_port)?,
            },
            to: EndpointFilter {
                namespaces: names("to-namespace", &self.to_namespace)?,
                pods: parse_pods("to-pod", &self.to_pod, &ns)?,
                labels: selectors("to-label", &self.to_label)?,
                ips: parse_all("to-ip", &self.to_ip, parse_ip)?,
                identities: parse_all("to-identity", &self.to_identity, parse_identity)?,
                ports: parse_all("to-port", &self.to_port, parse_port)?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Icmp, Ports};
    use crate::testutil::{ep, flow};

    fn flags(f: impl FnOnce(&mut FilterFlags)) -> Filter {
        let mut fl = FilterFlags::default();
        f(&mut fl);
        fl.build().unwrap()
    }

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn empty_filter_matches_everything() {
        let f = Filter::all();
        assert!(f.is_empty());
        assert!(f.matches(&flow()));
        assert_eq!(FilterFlags::default().build().unwrap(), Filter::all());
    }

    #[test]
    fn verdict_is_or_of_values() {
        assert!(flags(|f| f.verdict = v(&["forwarded"])).matches(&flow()));
        assert!(!flags(|f| f.verdict = v(&["DROPPED"])).matches(&flow()));
        assert!(flags(|f| f.verdict = v(&["DROPPED", "FORWARDED"])).matches(&flow()));
        let mut audit = flow();
        audit.verdict = Verdict::Audit;
        assert!(flags(|f| f.verdict = v(&["AUDIT"])).matches(&audit));
        let err = FilterFlags {
            verdict: v(&["ALLOWED"]),
            ..FilterFlags::default()
        }
        .build()
        .unwrap_err();
        assert_eq!(err.flag, "verdict");
        assert!(
            err.to_string().starts_with("--verdict: unknown verdict"),
            "{err}"
        );
    }

    #[test]
    fn namespace_matches_either_side() {
        assert!(flags(|f| f.namespace = v(&["default"])).matches(&flow()));
        assert!(flags(|f| f.namespace = v(&["empire"])).matches(&flow()));
        assert!(!flags(|f| f.namespace = v(&["kube-system"])).matches(&flow()));
        assert!(flags(|f| f.namespace = v(&["kube-system", "empire"])).matches(&flow()));
        assert!(flags(|f| f.from_namespace = v(&["default"])).matches(&flow()));
        assert!(!flags(|f| f.from_namespace = v(&["empire"])).matches(&flow()));
        assert!(flags(|f| f.to_namespace = v(&["empire"])).matches(&flow()));
        assert!(!flags(|f| f.to_namespace = v(&["default"])).matches(&flow()));
    }

    #[test]
    fn pod_matches_either_side_by_prefix() {
        assert!(flags(|f| f.pod = v(&["default/tiefighter"])).matches(&flow()));
        assert!(flags(|f| f.pod = v(&["empire/deathstar"])).matches(&flow()));
        assert!(flags(|f| f.pod = v(&["empire/"])).matches(&flow()));
        assert!(!flags(|f| f.pod = v(&["default/deathstar"])).matches(&flow()));
        // A bare name is in the default namespace...
        assert!(flags(|f| f.pod = v(&["tiefighter"])).matches(&flow()));
        assert!(!flags(|f| f.pod = v(&["deathstar"])).matches(&flow()));
        // ...or in each namespace given with -n.
        let f = flags(|f| {
            f.pod = v(&["deathstar"]);
            f.namespace = v(&["empire"]);
        });
        assert_eq!(
            f.either.pods,
            vec![PodPattern {
                namespace: "empire".to_owned(),
                name_prefix: "deathstar".to_owned()
            }]
        );
        assert!(f.matches(&flow()));
        // -n still filters on its own: flows between kube-system and the pod.
        assert!(!flags(|f| {
            f.pod = v(&["empire/deathstar"]);
            f.namespace = v(&["kube-system"]);
        })
        .matches(&flow()));
        // A flow to an address without a pod matches no pod pattern.
        let mut world = flow();
        world.destination = ep("", "", 2, &["reserved:world"]);
        assert!(!flags(|f| f.pod = v(&["default/x"])).matches(&world));
        assert!(FilterFlags {
            pod: v(&["a/b/c"]),
            ..FilterFlags::default()
        }
        .build()
        .is_err());
    }

    #[test]
    fn from_pod_and_to_pod_are_one_sided() {
        assert!(flags(|f| f.from_pod = v(&["default/tiefighter"])).matches(&flow()));
        assert!(!flags(|f| f.from_pod = v(&["empire/deathstar-1"])).matches(&flow()));
        assert!(flags(|f| f.to_pod = v(&["empire/deathstar-1"])).matches(&flow()));
        assert!(!flags(|f| f.to_pod = v(&["default/tiefighter"])).matches(&flow()));
        assert!(flags(|f| {
            f.from_pod = v(&["tiefighter"]);
            f.to_pod = v(&["empire/deathstar"]);
        })
        .matches(&flow()));
        assert!(flags(|f| {
            f.to_pod = v(&["deathstar"]);
            f.namespace = v(&["empire"]);
        })
        .matches(&flow()));
    }

    #[test]
    fn labels_either_side_and_one_sided() {
        assert!(flags(|f| f.label = v(&["class=deathstar"])).matches(&flow()));
        assert!(flags(|f| f.label = v(&["k8s:class=tiefighter"])).matches(&flow()));
        assert!(!flags(|f| f.label = v(&["reserved:class=tiefighter"])).matches(&flow()));
        assert!(flags(|f| f.label = v(&["any:class=tiefighter"])).matches(&flow()));
        assert!(!flags(|f| f.label = v(&["class=xwing"])).matches(&flow()));
        // Requirements of one selector hold on the same side.
        assert!(flags(|f| f.label = v(&["class=deathstar,tier=api"])).matches(&flow()));
        assert!(!flags(|f| f.label = v(&["class=tiefighter,tier=api"])).matches(&flow()));
        // Repeated selectors are alternatives.
        assert!(flags(|f| f.label = v(&["class=xwing", "tier"])).matches(&flow()));
        assert!(flags(|f| f.from_label = v(&["class=tiefighter"])).matches(&flow()));
        assert!(!flags(|f| f.from_label = v(&["class=deathstar"])).matches(&flow()));
        assert!(flags(|f| f.to_label = v(&["org in (empire, rebels),!debug"])).matches(&flow()));
        assert!(!flags(|f| f.to_label = v(&["org notin (empire)"])).matches(&flow()));
        assert!(flags(|f| f.to_label = v(&["tier!=db"])).matches(&flow()));
        assert!(!flags(|f| f.to_label = v(&["tier!=api"])).matches(&flow()));
        assert!(flags(|f| f.from_label = v(&["!tier"])).matches(&flow()));
        let mut world = flow();
        world.destination = ep("", "", 2, &["reserved:world"]);
        assert!(flags(|f| f.to_label = v(&["reserved:world"])).matches(&world));
        for bad in ["", "a=b,", "(x", "x in a", "x in ()", "=v"] {
            assert!(
                FilterFlags {
                    label: v(&[bad]),
                    ..FilterFlags::default()
                }
                .build()
                .is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ip_cidr_and_identity() {
        assert!(flags(|f| f.ip = v(&["10.0.1.2"])).matches(&flow()));
        assert!(flags(|f| f.ip = v(&["10.0.0.0/24"])).matches(&flow()));
        assert!(!flags(|f| f.ip = v(&["192.168.0.0/16"])).matches(&flow()));
        assert!(flags(|f| f.from_ip = v(&["10.0.0.1"])).matches(&flow()));
        assert!(!flags(|f| f.to_ip = v(&["10.0.0.1"])).matches(&flow()));
        assert!(flags(|f| f.identity = v(&["257"])).matches(&flow()));
        assert!(!flags(|f| f.from_identity = v(&["257"])).matches(&flow()));
        let mut world = flow();
        world.destination = ep("", "", 2, &["reserved:world"]);
        assert!(flags(|f| f.to_identity = v(&["world"])).matches(&world));
        assert!(flags(|f| f.to_identity = v(&["reserved:world"])).matches(&world));
        assert!(FilterFlags {
            ip: v(&["10.0.0.300"]),
            ..FilterFlags::default()
        }
        .build()
        .is_err());
        assert!(FilterFlags {
            identity: v(&["galaxy"]),
            ..FilterFlags::default()
        }
        .build()
        .is_err());
    }

    #[test]
    fn protocol() {
        assert!(flags(|f| f.protocol = v(&["tcp"])).matches(&flow()));
        assert!(flags(|f| f.protocol = v(&["UDP", "TCP"])).matches(&flow()));
        assert!(!flags(|f| f.protocol = v(&["udp"])).matches(&flow()));
        let mut icmp = flow();
        icmp.l4 = Some(L4::IcmpV6(Icmp { icmp_type: 128 }));
        assert!(flags(|f| f.protocol = v(&["icmp"])).matches(&icmp));
        assert!(flags(|f| f.protocol = v(&["icmpv6"])).matches(&icmp));
        assert!(!flags(|f| f.protocol = v(&["icmpv4"])).matches(&icmp));
        assert!(FilterFlags {
            protocol: v(&["gre"]),
            ..FilterFlags::default()
        }
        .build()
        .is_err());
    }

    #[test]
    fn ports_either_side_and_one_sided() {
        assert!(flags(|f| f.port = v(&["80"])).matches(&flow()));
        assert!(flags(|f| f.port = v(&["41234"])).matches(&flow()));
        assert!(!flags(|f| f.port = v(&["443"])).matches(&flow()));
        assert!(flags(|f| f.to_port = v(&["80"])).matches(&flow()));
        assert!(!flags(|f| f.from_port = v(&["80"])).matches(&flow()));
        let mut udp = flow();
        udp.l4 = Some(L4::Udp(Ports {
            source_port: 5353,
            destination_port: 53,
        }));
        assert!(flags(|f| f.port = v(&["53"])).matches(&udp));
        let mut icmp = flow();
        icmp.l4 = Some(L4::IcmpV4(Icmp { icmp_type: 8 }));
        assert!(
            !flags(|f| f.port = v(&["8"])).matches(&icmp),
            "ICMP has no ports"
        );
        assert!(FilterFlags {
            port: v(&["70000"]),
            ..FilterFlags::default()
        }
        .build()
        .is_err());
    }

    #[test]
    fn event_type_and_direction() {
        assert!(flags(|f| f.event_type = v(&["policy-verdict"])).matches(&flow()));
        assert!(!flags(|f| f.event_type = v(&["drop"])).matches(&flow()));
        assert!(flags(|f| f.event_type = v(&["drop", "policy-verdict"])).matches(&flow()));
        assert!(!flags(|f| f.event_type = v(&["trace"])).matches(&flow()));
        let mut drop = flow();
        drop.event_type = EventType::Drop;
        assert!(flags(|f| f.event_type = v(&["drop"])).matches(&drop));
        assert!(FilterFlags {
            event_type: v(&["l7"]),
            ..FilterFlags::default()
        }
        .build()
        .is_err());
        assert!(flags(|f| f.traffic_direction = v(&["ingress"])).matches(&flow()));
        assert!(!flags(|f| f.traffic_direction = v(&["egress"])).matches(&flow()));
    }

    #[test]
    fn different_flags_combine_with_and() {
        let f = flags(|f| {
            f.verdict = v(&["FORWARDED"]);
            f.namespace = v(&["empire"]);
            f.port = v(&["80"]);
            f.protocol = v(&["tcp"]);
        });
        assert!(f.matches(&flow()));
        let f = flags(|f| {
            f.verdict = v(&["FORWARDED"]);
            f.port = v(&["443"]);
        });
        assert!(!f.matches(&flow()));
    }

    #[test]
    fn filter_serializes_for_the_wire() {
        let f = flags(|f| {
            f.verdict = v(&["DROPPED"]);
            f.pod = v(&["default/x"]);
            f.to_label = v(&["app in (a,b)"]);
            f.ip = v(&["10.0.0.0/8"]);
        });
        let s = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<Filter>(&s).unwrap(), f);
        assert_eq!(serde_json::from_str::<Filter>("{}").unwrap(), Filter::all());
    }
}
