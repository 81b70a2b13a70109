//! What a lab is made of, worked out from the input: the node, its pods with their declared
//! ports, and the ConnectivityTests' external hosts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use palisade_policy::compile::DEFAULT_NAMESPACE;
use palisade_policy::eval::Party;
use palisade_policy::model::proto;
use palisade_policy::simulate;
use palisade_policy::Engine;
use palisade_policy_api::load::{Bundle, Manifest, Object};
use palisade_policy_api::scenario::ConnectivityTest;

use crate::LabError;

/// The transport of a server port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        }
    }
}

/// A port a built-in server answers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServerPort {
    pub transport: Transport,
    pub port: u16,
}

/// A pod with its own namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub ip: IpAddr,
    pub ports: Vec<ServerPort>,
}

/// A host-network pod: it lives in the node namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPodSpec {
    pub namespace: String,
    pub name: String,
    pub ip: IpAddr,
}

/// An external host, outside the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalSpec {
    pub name: String,
    pub ip: IpAddr,
    pub ports: Vec<ServerPort>,
}

/// The node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    /// Its InternalIPs and the addresses of its host-network pods.
    pub ips: Vec<IpAddr>,
    /// The addresses among `ips` the lab made up, because the Node declares none of that
    /// family (the engine does not know them).
    pub generated: Vec<IpAddr>,
    /// Ports of its host-network pods.
    pub ports: Vec<ServerPort>,
}

/// Everything a lab builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSpec {
    pub node: NodeSpec,
    pub pods: Vec<PodSpec>,
    pub host_pods: Vec<HostPodSpec>,
    pub externals: Vec<ExternalSpec>,
}

/// Addresses tried, in order, for a node that declares none.
const GENERATED_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(192, 168, 255, 254),
    Ipv4Addr::new(172, 31, 255, 254),
    Ipv4Addr::new(10, 255, 255, 254),
    Ipv4Addr::new(100, 64, 255, 254),
];
const GENERATED_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0xffff, 0xfffe),
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0xfffe, 0xfffe),
];

fn declared_ports(bundle: &Bundle) -> BTreeMap<(String, String), Vec<ServerPort>> {
    let mut out: BTreeMap<(String, String), Vec<ServerPort>> = BTreeMap::new();
    for m in &bundle.manifests {
        let Object::Pod(p) = &m.object else { continue };
        let Some(name) = p.metadata.name.clone() else {
            continue;
        };
        let ns = p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let ports = out.entry((ns, name)).or_default();
        for c in &p.spec.containers {
            for port in &c.ports {
                let Ok(number) = u16::try_from(port.container_port) else {
                    continue;
                };
                // SCTP has no built-in server (yet): such a port is simply not served.
                let transport = match port.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => Transport::Tcp,
                    "UDP" => Transport::Udp,
                    _ => continue,
                };
                ports.push(ServerPort {
                    transport,
                    port: number,
                });
            }
        }
        ports.sort();
        ports.dedup();
    }
    out
}

fn host_ports(
    ports: &[palisade_policy_api::scenario::HostPort],
) -> Result<Vec<ServerPort>, String> {
    let mut out = Vec::new();
    for p in ports {
        let number = u16::try_from(p.port)
            .map_err(|_| format!("invalid port {} in externalHosts", p.port))?;
        let transport = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Transport::Tcp,
            "UDP" => Transport::Udp,
            other => {
                return Err(format!(
                    "externalHosts port {number}/{other}: the lab serves TCP and UDP only"
                ))
            }
        };
        out.push(ServerPort {
            transport,
            port: number,
        });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

impl LabSpec {
    /// Works out the lab for a loaded input. Errors are what the lab cannot build (several
    /// nodes, clashing external hosts).
    pub fn new(
        bundle: &Bundle,
        engine: &Engine,
        tests: &[(&Manifest, &ConnectivityTest)],
    ) -> Result<LabSpec, LabError> {
        let nodes: Vec<_> = engine.nodes().collect();
        let node = match nodes.as_slice() {
            [n] => *n,
            [] => {
                return Err(LabError::Unsupported(
                    "the input has no node to build the lab on".to_owned(),
                ))
            }
            many => {
                return Err(LabError::Unsupported(format!(
                    "the lab runs a single node for now; the input declares {}: {}",
                    many.len(),
                    many.iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        };
        let ports = declared_ports(bundle);
        let mut used: BTreeSet<IpAddr> = BTreeSet::new();
        let mut node_ips = node.ips.clone();
        let mut node_ports = Vec::new();
        let mut pods = Vec::new();
        let mut host_pods = Vec::new();
        let mut all_pods: Vec<_> = engine.pods().collect();
        all_pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for p in all_pods {
            let declared = ports
                .get(&(p.namespace.clone(), p.name.clone()))
                .cloned()
                .unwrap_or_default();
            if p.host_network {
                if !node_ips.contains(&p.ip) {
                    node_ips.push(p.ip);
                }
                node_ports.extend(declared);
                host_pods.push(HostPodSpec {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    ip: p.ip,
                });
            } else {
                used.insert(p.ip);
                pods.push(PodSpec {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    ip: p.ip,
                    ports: declared,
                });
            }
        }
        node_ports.sort();
        node_ports.dedup();

        let mut externals: Vec<ExternalSpec> = Vec::new();
        for (_, t) in tests {
            for h in &t.spec.external_hosts {
                let ip: IpAddr = h.ip.parse().map_err(|_| {
                    LabError::Unsupported(format!(
                        "external host {:?}: invalid IP address {:?}",
                        h.name, h.ip
                    ))
                })?;
                let ports = host_ports(&h.ports).map_err(LabError::Unsupported)?;
                if let Some(e) = externals.iter_mut().find(|e| e.name == h.name) {
                    if e.ip != ip {
                        return Err(LabError::Unsupported(format!(
                            "external host {:?} is declared with two addresses, {} and {ip}",
                            h.name, e.ip
                        )));
                    }
                    e.ports.extend(ports);
                    e.ports.sort();
                    e.ports.dedup();
                    continue;
                }
                if used.contains(&ip) || node_ips.contains(&ip) {
                    return Err(LabError::Unsupported(format!(
                        "external host {:?} has address {ip}, which a pod or the node already uses",
                        h.name
                    )));
                }
                used.insert(ip);
                externals.push(ExternalSpec {
                    name: h.name.clone(),
                    ip,
                    ports,
                });
            }
        }

        // The node needs an address of each family its peers use, to originate traffic.
        let mut generated = Vec::new();
        let families = pods
            .iter()
            .map(|p| p.ip)
            .chain(externals.iter().map(|e| e.ip));
        let (mut want_v4, mut want_v6) = (true, false);
        for ip in families {
            match ip {
                IpAddr::V4(_) => want_v4 = true,
                IpAddr::V6(_) => want_v6 = true,
            }
        }
        if want_v4 && !node_ips.iter().any(IpAddr::is_ipv4) {
            if let Some(ip) = GENERATED_V4
                .iter()
                .map(|a| IpAddr::V4(*a))
                .find(|a| !used.contains(a))
            {
                generated.push(ip);
                node_ips.push(ip);
            }
        }
        if want_v6 && !node_ips.iter().any(IpAddr::is_ipv6) {
            if let Some(ip) = GENERATED_V6
                .iter()
                .map(|a| IpAddr::V6(*a))
                .find(|a| !used.contains(a))
            {
                generated.push(ip);
                node_ips.push(ip);
            }
        }
        let mut spec = LabSpec {
            node: NodeSpec {
                name: node.name.clone(),
                ips: node_ips,
                generated,
                ports: node_ports,
            },
            pods,
            host_pods,
            externals,
        };
        // Servers also answer on every port a probe targets, declared or not: a verdict then
        // says what the network (and the datapath) did, never that nothing was listening.
        for (m, t) in tests {
            let Ok(planned) = simulate::plan(engine, m, t) else {
                continue;
            };
            for p in planned {
                let transport = match p.proto {
                    proto::TCP => Transport::Tcp,
                    proto::UDP => Transport::Udp,
                    _ => continue,
                };
                if let Some(dst) = &p.dst {
                    spec.serve(
                        dst,
                        ServerPort {
                            transport,
                            port: p.port,
                        },
                    );
                }
            }
        }
        Ok(spec)
    }

    /// Whether the lab has something at `ip`: a pod, the node (or a host-network pod), an
    /// external host.
    pub fn has_address(&self, ip: IpAddr) -> bool {
        self.pods.iter().any(|p| p.ip == ip)
            || self.node.ips.contains(&ip)
            || self.externals.iter().any(|e| e.ip == ip)
    }

    /// Adds a server port to whatever answers for `party`.
    fn serve(&mut self, party: &Party, port: ServerPort) {
        let ports = match party {
            Party::Pod { namespace, name } => {
                match self
                    .pods
                    .iter_mut()
                    .find(|p| &p.namespace == namespace && &p.name == name)
                {
                    Some(p) => &mut p.ports,
                    None => &mut self.node.ports,
                }
            }
            Party::Node(_) => &mut self.node.ports,
            Party::Ip(ip) => {
                if let Some(p) = self.pods.iter_mut().find(|p| p.ip == *ip) {
                    &mut p.ports
                } else if let Some(e) = self.externals.iter_mut().find(|e| e.ip == *ip) {
                    &mut e.ports
                } else if self.node.ips.contains(ip) {
                    &mut self.node.ports
                } else {
                    return;
                }
            }
        };
        if !ports.contains(&port) {
            ports.push(port);
            ports.sort();
        }
    }
}
