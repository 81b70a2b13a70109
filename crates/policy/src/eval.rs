//! Judging one connection between two parties: the source's egress policy and the
//! destination's ingress policy, each from its endpoint's table, with the reasons.

use std::net::IpAddr;

use palisade_identity::{reserved, Identity};

use crate::engine::{Engine, IpOwner, ALLOW_LOCALHOST_RULE};
use crate::l7::L7Request;
use crate::model::Direction;
use crate::table::{Decision, L7Decision, RuleId};

/// One side of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Party {
    Pod {
        namespace: String,
        name: String,
    },
    Node(String),
    /// An address outside the cluster (or, if it belongs to a pod or node, resolved to it).
    Ip(IpAddr),
}

impl std::fmt::Display for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Party::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Party::Node(n) => write!(f, "node/{n}"),
            Party::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Where a party's policy lives and how others see it.
#[derive(Debug, Clone)]
enum Resolved {
    Pod {
        namespace: String,
        name: String,
        identity: Identity,
        node: String,
    },
    Host {
        node: String,
    },
    World {
        ip: IpAddr,
    },
}

impl Resolved {
    fn node(&self) -> Option<&str> {
        match self {
            Resolved::Pod { node, .. } | Resolved::Host { node } => Some(node),
            Resolved::World { .. } => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EvalError {
    #[error("no pod {0}")]
    NoPod(String),
    #[error("no node {0}")]
    NoNode(String),
}

fn resolve(engine: &Engine, p: &Party) -> Result<Resolved, EvalError> {
    match p {
        Party::Pod { namespace, name } => {
            let pod = engine
                .pod(namespace, name)
                .ok_or_else(|| EvalError::NoPod(format!("{namespace}/{name}")))?;
            if pod.host_network {
                return Ok(Resolved::Host {
                    node: pod.node.clone(),
                });
            }
            let identity = engine
                .pod_identity(namespace, name)
                .ok_or_else(|| EvalError::NoPod(format!("{namespace}/{name}")))?;
            Ok(Resolved::Pod {
                namespace: namespace.clone(),
                name: name.clone(),
                identity,
                node: pod.node.clone(),
            })
        }
        Party::Node(n) => {
            engine.node(n).ok_or_else(|| EvalError::NoNode(n.clone()))?;
            Ok(Resolved::Host { node: n.clone() })
        }
        Party::Ip(ip) => match engine.ip_owner(*ip) {
            Some(IpOwner::Pod(ns, name)) => resolve(
                engine,
                &Party::Pod {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                },
            ),
            Some(IpOwner::Node(n)) => Ok(Resolved::Host { node: n.clone() }),
            None => Ok(Resolved::World { ip: *ip }),
        },
    }
}

/// The identity of `r` as seen by a datapath on `observer` (None: outside the cluster).
fn identity_seen_from(engine: &Engine, r: &Resolved, observer: Option<&str>) -> Identity {
    match r {
        Resolved::Pod { identity, .. } => *identity,
        Resolved::Host { node } => {
            if Some(node.as_str()) == observer {
                reserved::HOST
            } else {
                reserved::REMOTE_NODE
            }
        }
        Resolved::World { ip } => engine.world_identity(*ip),
    }
}

/// The two halves of a connection's verdict.
#[derive(Debug, Clone)]
pub struct FlowVerdict {
    /// Source identity as the destination sees it.
    pub src_identity: Identity,
    /// Destination identity as the source sees it.
    pub dst_identity: Identity,
    /// Egress policy at the source (`None` when the source is outside the cluster).
    pub egress: Option<(String, Decision)>,
    /// Ingress policy at the destination (`None` when it is outside the cluster).
    pub ingress: Option<(String, Decision)>,
    /// Source and destination are the same endpoint: the traffic never leaves it.
    pub same_endpoint: bool,
}

impl FlowVerdict {
    /// Passes at L3/L4 in both directions (allowed, or denied only by policies in audit
    /// mode).
    pub fn allowed(&self) -> bool {
        self.same_endpoint
            || (self.egress.as_ref().is_none_or(|(_, d)| d.passes())
                && self.ingress.as_ref().is_none_or(|(_, d)| d.passes()))
    }

    /// The L7 decisions that apply (egress proxy, then ingress proxy).
    pub fn l7(&self) -> Vec<&L7Decision> {
        let mut out = Vec::new();
        for (_, d) in self.egress.iter().chain(self.ingress.iter()) {
            if let Decision::Allowed { l7, .. } = d {
                if matches!(l7, L7Decision::Restricted(_)) {
                    out.push(l7);
                }
            }
        }
        out
    }

    /// Whether an L7 request passes every proxy on the path; `Err` carries the rejecting
    /// decision's rules.
    pub fn l7_allows(&self, req: &L7Request<'_>) -> Result<Vec<RuleId>, Vec<RuleId>> {
        if self.same_endpoint {
            return Ok(Vec::new());
        }
        let mut by = Vec::new();
        for d in self.l7() {
            if let L7Decision::Restricted(rules) = d {
                match d.allows(req) {
                    Some(r) => by.push(r),
                    None => return Err(rules.iter().map(|(id, _)| *id).collect()),
                }
            }
        }
        Ok(by)
    }
}

/// Evaluates a connection from `src` to `dst` on (proto, port) — for ICMP the port is the
/// type. `dns_name` is the name the destination was resolved from, if the source's DNS
/// proxy saw the lookup (for `toFQDNs`).
pub fn evaluate(
    engine: &Engine,
    src: &Party,
    dst: &Party,
    proto: u8,
    port: u16,
    dns_name: Option<&str>,
) -> Result<FlowVerdict, EvalError> {
    let s = resolve(engine, src)?;
    let d = resolve(engine, dst)?;
    let same_endpoint = match (&s, &d) {
        (
            Resolved::Pod {
                namespace: a,
                name: b,
                ..
            },
            Resolved::Pod {
                namespace: c,
                name: e,
                ..
            },
        ) => a == c && b == e,
        _ => false,
    };
    let src_identity = identity_seen_from(engine, &s, d.node());
    let dst_identity = identity_seen_from(engine, &d, s.node());
    let table_of =
        |r: &Resolved, dir: Direction| -> Option<(String, std::sync::Arc<crate::table::Table>)> {
            match r {
                Resolved::Pod {
                    namespace, name, ..
                } => engine
                    .pod_table(namespace, name, dir)
                    .map(|t| (format!("{namespace}/{name}"), t)),
                Resolved::Host { node } => engine
                    .node_table(node, dir)
                    .map(|t| (format!("node/{node}"), t)),
                Resolved::World { .. } => None,
            }
        };
    let egress = table_of(&s, Direction::Egress)
        .map(|(who, t)| (who, t.decide(dst_identity, proto, port, dns_name)));
    let ingress = table_of(&d, Direction::Ingress)
        .map(|(who, t)| (who, t.decide(src_identity, proto, port, None)));
    Ok(FlowVerdict {
        src_identity,
        dst_identity,
        egress,
        ingress,
        same_endpoint,
    })
}

/// Human-readable name of a rule: `<api> <ns>/<name> <section>[i]`.
pub fn rule_name(engine: &Engine, id: RuleId) -> String {
    if id == ALLOW_LOCALHOST_RULE {
        return "agent option allow-localhost (the local host may reach its pods)".to_owned();
    }
    engine
        .rule_origin(id)
        .map_or_else(|| format!("rule #{id}"), ToString::to_string)
}

/// One sentence for a direction's decision.
pub fn describe(engine: &Engine, who: &str, direction: Direction, d: &Decision) -> String {
    let names = |ids: &[RuleId]| {
        ids.iter()
            .map(|i| rule_name(engine, *i))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match d {
        Decision::Allowed { by, .. } => format!("allowed by {}", names(by)),
        Decision::Denied { by, audit: true } => {
            format!("audit: would be denied by {}", names(by))
        }
        Decision::Denied { by, audit: false } => format!("denied by {}", names(by)),
        Decision::DefaultDenied { by, audit: true } => format!(
            "audit: no rule allows it at {} of {who}, which would be default-deny by {}",
            direction.as_str(),
            names(by)
        ),
        Decision::DefaultDenied { by, audit: false } => format!(
            "no rule allows it at {} of {who}, which is default-deny by {}",
            direction.as_str(),
            names(by)
        ),
        Decision::NotEnforced => format!("no policy selects {who} for {}", direction.as_str()),
    }
}

/// Identity rendered for people: reserved name or number with a few labels.
pub fn identity_name(engine: &Engine, id: Identity) -> String {
    if let Some(n) = reserved::name(id) {
        return format!("reserved:{n}");
    }
    match engine.identity_labels(id) {
        Some(l) if id >= palisade_identity::LOCAL_MIN => {
            let cidr = l
                .iter()
                .filter(|x| x.source == palisade_identity::Source::Cidr)
                .filter_map(|x| x.key.parse::<ipnet::IpNet>().ok())
                .max_by_key(ipnet::IpNet::prefix_len)
                .map_or_else(String::new, |x| x.to_string());
            format!("{id} (cidr:{cidr})")
        }
        Some(l) => {
            let ns = l
                .get(palisade_identity::keys::NAMESPACE)
                .map_or("", |x| &*x.value);
            let own: Vec<String> = l
                .iter()
                .filter(|x| {
                    !x.key.starts_with("io.kubernetes.") && !x.key.starts_with("io.cilium.k8s.")
                })
                .map(|x| format!("{}={}", x.key, x.value))
                .collect();
            format!("{id} ({ns}: {})", own.join(","))
        }
        None => id.to_string(),
    }
}
