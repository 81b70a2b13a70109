//! The normalized policy model every dialect compiles into.
//!
//! A policy becomes a list of [`Rule`]s, each with one subject (whom it applies to), one
//! direction, one action, its peers and its ports, plus the [`DefaultDeny`] markers that put
//! its subjects into default-deny. The engine never looks at a dialect again.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::l7::L7Rules;
use crate::selector::Selector;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PolicyKind {
    NetworkPolicy,
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
}

impl PolicyKind {
    pub fn api(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "networking.k8s.io/v1 NetworkPolicy",
            PolicyKind::CiliumNetworkPolicy => "cilium.io/v2 CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => {
                "cilium.io/v2 CiliumClusterwideNetworkPolicy"
            }
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        }
    }
}

/// Identifies a policy object: applying another with the same key replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PolicyKey {
    pub kind: PolicyKind,
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind.api(), self.name),
            None => write!(f, "{} {}", self.kind.api(), self.name),
        }
    }
}

/// Where in its policy a rule was written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RuleOrigin {
    pub policy: Arc<PolicyKey>,
    /// `specs[i]` for Cilium policies with `specs`.
    pub spec_index: Option<usize>,
    /// `ingress`, `egress`, `ingressDeny`, `egressDeny`, or `policyTypes` for default deny.
    pub section: &'static str,
    pub index: usize,
}

impl fmt::Display for RuleOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.policy)?;
        if let Some(i) = self.spec_index {
            write!(f, "specs[{i}].")?;
        }
        if self.index == usize::MAX
            || self.section == "policyTypes"
            || self.section == "enableDefaultDeny"
        {
            write!(f, "{}", self.section)
        } else {
            write!(f, "{}[{}]", self.section, self.index)
        }
    }
}

/// Whom a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// Pods whose identity labels match.
    Endpoints(Selector),
    /// Nodes (host endpoints) whose node labels match (Cilium `nodeSelector`).
    Nodes(Selector),
}

/// The other side of a connection, as a rule names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Every identity, reserved ones included (Kubernetes' absent `from`, Cilium's `all`).
    Any,
    /// Identities matching a selector. `endpoints` is true for Cilium `fromEndpoints` /
    /// `toEndpoints`, the only peers that `fromRequires` / `toRequires` narrow.
    Select { selector: Selector, endpoints: bool },
    /// A `toFQDNs` name or pattern, resolved through DNS at run time.
    Fqdn(FqdnPattern),
}

/// A `matchName` or `matchPattern`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FqdnPattern {
    MatchName(String),
    MatchPattern(String),
}

impl FqdnPattern {
    /// Whether a DNS name matches. Names compare case-insensitively without the trailing dot;
    /// `*` stands for any run of DNS characters within one label, and a lone `*` matches every
    /// name.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match self {
            FqdnPattern::MatchName(n) => n.trim_end_matches('.').eq_ignore_ascii_case(&name),
            FqdnPattern::MatchPattern(p) => {
                let p = p.trim_end_matches('.').to_ascii_lowercase();
                if p == "*" {
                    return true;
                }
                glob_label_match(p.as_bytes(), name.as_bytes())
            }
        }
    }
}

/// `*` matches zero or more characters other than `.`.
fn glob_label_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some(st) = star {
            if s[mark] == b'.' {
                return false;
            }
            mark += 1;
            si = mark;
            pi = st + 1;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

impl fmt::Display for FqdnPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FqdnPattern::MatchName(n) => write!(f, "matchName={n}"),
            FqdnPattern::MatchPattern(p) => write!(f, "matchPattern={p}"),
        }
    }
}

/// IP protocol numbers.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;

    pub fn name(p: u8) -> &'static str {
        match p {
            0 => "ANY",
            ICMP => "ICMP",
            TCP => "TCP",
            UDP => "UDP",
            ICMPV6 => "ICMPv6",
            SCTP => "SCTP",
            _ => "other",
        }
    }
}

/// Which ports of a protocol a rule covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortMatch {
    /// Inclusive range; `0..=65535` is every port. For ICMP the "port" is the type.
    Range(u16, u16),
    /// A container port name, resolved against the pods on the receiving side.
    Named(String),
}

/// One protocol and port set, with the L7 rules that apply there.
#[derive(Debug, Clone, PartialEq)]
pub struct PortSpec {
    /// IP protocol number; 0 = every protocol (an L3-only rule).
    pub proto: u8,
    pub ports: PortMatch,
    pub l7: Option<Arc<L7Rules>>,
}

impl PortSpec {
    /// Every protocol, every port: what a rule without ports allows.
    pub fn any() -> Self {
        PortSpec {
            proto: 0,
            ports: PortMatch::Range(0, u16::MAX),
            l7: None,
        }
    }
}

/// How an egress rule's named ports resolve on the destination pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NamedPorts {
    /// Kubernetes: on each destination pod, whatever number it gives the name.
    PerDestination,
    /// Cilium: the name must mean a single number across all selected destinations.
    SingleNumber,
}

/// One normalized rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub origin: RuleOrigin,
    pub subject: Subject,
    pub direction: Direction,
    pub action: Action,
    pub peers: Vec<Peer>,
    /// Never empty: an L3-only rule has one [`PortSpec::any`].
    pub ports: Vec<PortSpec>,
    /// Cilium `fromRequires` / `toRequires` of this rule: requirements added to the endpoint
    /// peers of every rule of the same action that selects the same endpoint.
    pub requires: Vec<crate::selector::Requirement>,
    pub named_ports: NamedPorts,
    /// From a policy in audit mode (`palisade.dev/audit: "true"`): its denials pass as AUDIT.
    pub audit: bool,
}

/// A marker that puts the subject's direction into default-deny.
#[derive(Debug, Clone)]
pub struct DefaultDeny {
    pub origin: RuleOrigin,
    pub subject: Subject,
    pub direction: Direction,
    /// From a policy in audit mode: the default deny it causes passes as AUDIT.
    pub audit: bool,
}

/// The annotation that puts one policy, of any kind, into audit mode.
pub const AUDIT_ANNOTATION: &str = "palisade.dev/audit";

/// A policy compiled into the normalized model.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub key: Arc<PolicyKey>,
    pub rules: Vec<Rule>,
    pub default_deny: Vec<DefaultDeny>,
    /// CIDR prefixes the policy's selectors mention: each gets a CIDR identity.
    pub prefixes: Vec<ipnet::IpNet>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fqdn_patterns() {
        let p = FqdnPattern::MatchPattern("*.amazonaws.com".into());
        assert!(p.matches("s3.amazonaws.com"));
        assert!(p.matches("S3.AmazonAWS.com."));
        assert!(!p.matches("a.b.amazonaws.com"));
        assert!(!p.matches("amazonaws.com"));
        assert!(FqdnPattern::MatchPattern("*".into()).matches("x.y"));
        assert!(FqdnPattern::MatchPattern("api.*.com".into()).matches("api.stripe.com"));
        assert!(FqdnPattern::MatchName("api.stripe.com".into()).matches("api.stripe.com."));
    }
}
