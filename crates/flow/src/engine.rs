//! [`Enricher`] over the policy engine.

use std::fmt::Write as _;
use std::net::IpAddr;

use palisade_identity::{reserved_labels, Source};
use palisade_policy::engine::{IpOwner, ALLOW_LOCALHOST_RULE};
use palisade_policy::model::RuleOrigin;
use palisade_policy::Engine;

use crate::decode::{EndpointInfo, Enricher};

/// Enriches flows from the engine's state, for the datapath of node `node_name`.
///
/// Build one per batch of events while holding whatever guards the engine:
/// `decode(&ev, &clock, &EngineEnricher::new(&engine, &node))`.
#[derive(Debug, Clone, Copy)]
pub struct EngineEnricher<'a> {
    engine: &'a Engine,
    node_name: &'a str,
}

impl<'a> EngineEnricher<'a> {
    pub fn new(engine: &'a Engine, node_name: &'a str) -> Self {
        EngineEnricher { engine, node_name }
    }
}

/// A rule's name for flows: `<Kind> <namespace>/<name> <section>[<index>]`, e.g.
/// `CiliumNetworkPolicy default/rule1 ingress[0]`, `NetworkPolicy prod/db policyTypes`,
/// `CiliumNetworkPolicy default/multi specs[1].egressDeny[0]`.
pub fn rule_origin_name(origin: &RuleOrigin) -> String {
    let p = &origin.policy;
    let mut s = match &p.namespace {
        Some(ns) => format!("{} {ns}/{}", p.kind.kind(), p.name),
        None => format!("{} {}", p.kind.kind(), p.name),
    };
    s.push(' ');
    if let Some(i) = origin.spec_index {
        let _ = write!(s, "specs[{i}].");
    }
    s.push_str(origin.section);
    if origin.index != usize::MAX
        && origin.section != "policyTypes"
        && origin.section != "enableDefaultDeny"
    {
        let _ = write!(s, "[{}]", origin.index);
    }
    s
}

impl Enricher for EngineEnricher<'_> {
    fn endpoint_by_ip(&self, ip: IpAddr) -> Option<EndpointInfo> {
        match self.engine.ip_owner(ip)? {
            IpOwner::Pod(ns, name) => Some(EndpointInfo {
                namespace: ns.to_string(),
                pod_name: name.to_string(),
                node_name: self
                    .engine
                    .pod_location(ns, name)
                    .map(|(_, node, _)| node.to_owned())
                    .unwrap_or_default(),
            }),
            IpOwner::Node(n) => Some(EndpointInfo {
                node_name: n.clone(),
                ..EndpointInfo::default()
            }),
        }
    }

    /// The identity's labels; of a CIDR identity's `cidr:` labels (one per enclosing prefix)
    /// only the longest prefix, as Cilium shows them.
    fn identity_labels(&self, identity: u32) -> Vec<String> {
        let set = match self.engine.identity_labels(identity) {
            Some(set) => (**set).clone(),
            None => match reserved_labels(identity) {
                Some(set) => set,
                None => return Vec::new(),
            },
        };
        let longest_cidr = set
            .iter()
            .filter(|l| l.source == Source::Cidr)
            .filter_map(|l| l.key.parse::<ipnet::IpNet>().ok())
            .max_by_key(ipnet::IpNet::prefix_len);
        set.iter()
            .filter(|l| {
                l.source != Source::Cidr
                    || longest_cidr.is_some_and(|c| l.key.parse::<ipnet::IpNet>() == Ok(c))
            })
            .map(ToString::to_string)
            .collect()
    }

    /// `None` for rule 0: the datapath writes 0 both for "no rule" and for the synthetic
    /// allow-localhost rule, so it names nothing for sure.
    fn rule_name(&self, rule_id: u32) -> Option<String> {
        if rule_id == ALLOW_LOCALHOST_RULE {
            return None;
        }
        self.engine.rule_origin(rule_id).map(rule_origin_name)
    }

    fn node_name(&self) -> Option<String> {
        Some(self.node_name.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use palisade_policy::cluster;
    use palisade_policy::{Config, Direction};

    use super::*;

    const YAML: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.5}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [world]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - fromCIDR: [192.0.2.0/24]
"#;

    #[test]
    fn enriches_from_the_engine() {
        let bundle = palisade_policy_api::load_str("t.yaml", YAML).unwrap();
        let engine = cluster::load(&bundle, Config::default()).unwrap().engine;
        let e = EngineEnricher::new(&engine, "node-a");
        let info = e.endpoint_by_ip("10.0.0.5".parse().unwrap()).unwrap();
        assert_eq!(info.namespace, "default");
        assert_eq!(info.pod_name, "web");
        assert_eq!(info.node_name, cluster::DEFAULT_NODE);
        assert_eq!(e.endpoint_by_ip("198.51.100.1".parse().unwrap()), None);
        let id = engine.pod_identity("default", "web").unwrap();
        let labels = e.identity_labels(id);
        assert!(labels.contains(&"k8s:app=web".to_owned()), "{labels:?}");
        assert!(labels.contains(&"k8s:io.kubernetes.pod.namespace=default".to_owned()));
        assert_eq!(
            e.identity_labels(palisade_identity::reserved::WORLD_IPV4),
            vec![
                "cidr:0.0.0.0/0".to_owned(),
                "reserved:world".to_owned(),
                "reserved:world-ipv4".to_owned()
            ]
        );
        // A CIDR identity keeps only its own prefix of the enclosing-prefix labels.
        let cidr_id = engine.world_identity("192.0.2.7".parse().unwrap());
        let cidr = e.identity_labels(cidr_id);
        assert!(cidr.contains(&"cidr:192.0.2.0/24".to_owned()), "{cidr:?}");
        assert!(!cidr.iter().any(|l| l == "cidr:192.0.0.0/16"), "{cidr:?}");

        let table = engine
            .pod_table("default", "web", Direction::Ingress)
            .unwrap();
        let mut names: Vec<String> = table
            .entries
            .values()
            .flatten()
            .flat_map(|en| en.contribs.iter().map(|c| c.rule))
            .filter_map(|r| e.rule_name(r))
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(
            names,
            vec![
                "CiliumNetworkPolicy default/rule1 ingress[0]".to_owned(),
                "CiliumNetworkPolicy default/rule1 ingress[1]".to_owned()
            ]
        );
        assert_eq!(e.rule_name(0), None);
        assert_eq!(e.rule_name(12345), None);
        assert_eq!(e.node_name().as_deref(), Some("node-a"));
    }
}
