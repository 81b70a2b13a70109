//! Security identities: the numeric name of a set of identity-relevant labels.
//!
//! Every endpoint (pod) gets the identity of its label set, the same set always mapping to the
//! same number, so policy can be computed once per identity and looked up by number in the
//! datapath. Reserved identities (host, world, …) have fixed numbers, as in Cilium; CIDR
//! identities are local to the node and live in their own number range.

#![forbid(unsafe_code)]

mod allocator;
mod labels;

pub use allocator::{Allocator, Scope};
pub use labels::{Label, LabelSet, Source};

/// A numeric security identity. `0` never names an identity: in tables it means "any".
pub type Identity = u32;

/// Cilium's reserved identities.
pub mod reserved {
    use super::Identity;
    pub const HOST: Identity = 1;
    pub const WORLD: Identity = 2;
    pub const UNMANAGED: Identity = 3;
    pub const HEALTH: Identity = 4;
    pub const INIT: Identity = 5;
    pub const REMOTE_NODE: Identity = 6;
    pub const KUBE_APISERVER: Identity = 7;
    pub const INGRESS: Identity = 8;
    pub const WORLD_IPV4: Identity = 9;
    pub const WORLD_IPV6: Identity = 10;

    /// `(identity, label key under the reserved: source)`.
    pub const ALL: &[(Identity, &str)] = &[
        (HOST, "host"),
        (WORLD, "world"),
        (UNMANAGED, "unmanaged"),
        (HEALTH, "health"),
        (INIT, "init"),
        (REMOTE_NODE, "remote-node"),
        (KUBE_APISERVER, "kube-apiserver"),
        (INGRESS, "ingress"),
        (WORLD_IPV4, "world-ipv4"),
        (WORLD_IPV6, "world-ipv6"),
    ];

    /// The reserved name of an identity, if it is reserved.
    pub fn name(id: Identity) -> Option<&'static str> {
        ALL.iter().find(|(i, _)| *i == id).map(|(_, n)| *n)
    }
}

/// First identity allocated to cluster endpoints (Cilium's cluster-local range starts here).
pub const CLUSTER_MIN: Identity = 256;
/// Last identity of the cluster range.
pub const CLUSTER_MAX: Identity = 65_535;
/// First node-local identity (CIDR identities), Cilium's local scope bit.
pub const LOCAL_MIN: Identity = 1 << 24;
/// Last node-local identity.
pub const LOCAL_MAX: Identity = (1 << 24) + 0x00ff_ffff;

/// Label keys Palisade (like Cilium) derives for every pod.
pub mod keys {
    pub const NAMESPACE: &str = "io.kubernetes.pod.namespace";
    pub const SERVICE_ACCOUNT: &str = "io.cilium.k8s.policy.serviceaccount";
    pub const CLUSTER: &str = "io.cilium.k8s.policy.cluster";
    pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
}

/// The identity-relevant labels of a pod: its own labels, its namespace, the namespace's
/// labels, its service account and its cluster, all from the `k8s` source.
pub fn pod_labels<'a>(
    pod_labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    namespace: &str,
    namespace_labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    service_account: &str,
    cluster: &str,
) -> LabelSet {
    let mut labels: Vec<Label> = pod_labels
        .into_iter()
        .map(|(k, v)| Label::new(Source::K8s, k, v))
        .collect();
    labels.push(Label::new(Source::K8s, keys::NAMESPACE, namespace));
    labels.push(Label::new(
        Source::K8s,
        keys::SERVICE_ACCOUNT,
        service_account,
    ));
    labels.push(Label::new(Source::K8s, keys::CLUSTER, cluster));
    for (k, v) in namespace_labels {
        labels.push(Label::new(
            Source::K8s,
            &format!("{}{k}", keys::NAMESPACE_LABELS_PREFIX),
            v,
        ));
    }
    LabelSet::new(labels)
}

/// The labels of a reserved identity (`reserved:<name>`).
pub fn reserved_labels(id: Identity) -> Option<LabelSet> {
    let name = reserved::name(id)?;
    let mut labels = vec![Label::new(Source::Reserved, name, "")];
    // The address-family world identities are also the world, and the whole of their family's
    // address space, so `world` and `toCIDR: 0.0.0.0/0` select them.
    match id {
        reserved::WORLD_IPV4 => {
            labels.push(Label::new(Source::Reserved, "world", ""));
            labels.push(Label::new(Source::Cidr, "0.0.0.0/0", ""));
        }
        reserved::WORLD_IPV6 => {
            labels.push(Label::new(Source::Reserved, "world", ""));
            labels.push(Label::new(Source::Cidr, "::/0", ""));
        }
        _ => {}
    }
    Some(LabelSet::new(labels))
}

/// The labels of the identity of a CIDR prefix: `cidr:<p>` for the prefix and every prefix
/// that contains it, plus `reserved:world` and the family's world label. A CIDR selector
/// `cidr:Q` thus selects every prefix identity inside Q.
pub fn cidr_labels(prefix: ipnet::IpNet) -> LabelSet {
    let prefix = prefix.trunc();
    let mut labels = Vec::with_capacity(usize::from(prefix.prefix_len()) + 3);
    for len in 0..=prefix.prefix_len() {
        if let Ok(net) = ipnet::IpNet::new(prefix.addr(), len) {
            labels.push(Label::new(Source::Cidr, &net.trunc().to_string(), ""));
        }
    }
    labels.push(Label::new(Source::Reserved, "world", ""));
    let family = match prefix {
        ipnet::IpNet::V4(_) => "world-ipv4",
        ipnet::IpNet::V6(_) => "world-ipv6",
    };
    labels.push(Label::new(Source::Reserved, family, ""));
    LabelSet::new(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_labels_include_derived_keys() {
        let own = [("app".to_owned(), "web".to_owned())];
        let ns = [("team".to_owned(), "a".to_owned())];
        let set = pod_labels(
            own.iter().map(|(k, v)| (k, v)),
            "prod",
            ns.iter().map(|(k, v)| (k, v)),
            "sa1",
            "default",
        );
        assert_eq!(set.get("app").map(|l| &*l.value), Some("web"));
        assert_eq!(set.get(keys::NAMESPACE).map(|l| &*l.value), Some("prod"));
        assert_eq!(
            set.get("io.cilium.k8s.namespace.labels.team")
                .map(|l| &*l.value),
            Some("a")
        );
        assert_eq!(
            set.get(keys::SERVICE_ACCOUNT).map(|l| l.source),
            Some(Source::K8s)
        );
    }

    #[test]
    fn cidr_labels_cover_enclosing_prefixes() {
        let set = cidr_labels("10.1.2.0/24".parse().unwrap());
        assert!(set.get("10.0.0.0/8").is_some());
        assert!(set.get("0.0.0.0/0").is_some());
        assert!(set.get("10.1.2.0/24").is_some());
        assert!(set.get("10.1.3.0/24").is_none());
        assert!(set.get("world").is_some());
    }
}
