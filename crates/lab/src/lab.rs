//! Building and tearing down a lab.
//!
//! Topology (one node for now), every piece inside namespaces the lab creates:
//!
//! ```text
//!  pal-<id>-1 (pod)            pal-<id>-node (node)                 pal-<id>-x1 (external)
//!  eth0 podIP/32  <--veth-->   lxc<hash>  route podIP/32            ext1  <--veth-->  eth0 IP/32
//!  default via 169.254.1.1     lo: InternalIP(s)/32                 default via 169.254.1.1
//!  (fe80::1 for IPv6),         ip_forward=1 (this namespace only)
//!  static neighbour = lxc MAC  static neighbour podIP = eth0 MAC
//! ```
//!
//! Host-network pods live in the node namespace. Neighbours are static on both sides, so no
//! ARP/ND is needed and nothing depends on proxy-ARP. The machine's own namespace is never
//! changed: veth pairs are created inside the node namespace with their peer moved straight
//! into the pod's.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Read as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use palisade_policy::eval::Party;
use palisade_policy::Engine;

use crate::enforcer::Enforcer;
use crate::server::ServerSet;
use crate::spec::{LabSpec, ServerPort};
use crate::state::{self, LabKind, LabState};
use crate::{cmd, netns, LabError};

/// The gateway pods and external hosts route through (a static neighbour: the node-side MAC).
pub const GATEWAY_V4: &str = "169.254.1.1";
pub const GATEWAY_V6: &str = "fe80::1";
/// The interface carrying the node's addresses inside the node namespace: its loopback (the
/// `dummy` link type is not available on every kernel; addresses on `lo` are local all the
/// same and are picked as source addresses for traffic towards the pods).
pub const NODE_IFNAME: &str = "lo";

/// A pod wired into the lab: what the datapath needs to enforce policy on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodAttachment {
    pub namespace: String,
    pub name: String,
    pub ip: IpAddr,
    /// The pod's own namespace (its `eth0`).
    pub netns: String,
    /// The host-side veth, inside `node_netns`: where TCX ingress/egress programs attach.
    pub host_ifname: String,
    /// Its ifindex inside `node_netns`.
    pub host_ifindex: u32,
    pub host_mac: String,
    /// The MAC of the pod's `eth0`.
    pub pod_mac: String,
    pub node_netns: String,
    /// Ports the built-in servers answer on.
    pub ports: Vec<ServerPort>,
}

/// A host-network pod (it lives in the node namespace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostPodAttachment {
    pub namespace: String,
    pub name: String,
    pub ip: IpAddr,
}

/// The node namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeAttachment {
    pub name: String,
    pub netns: String,
    /// Addresses on the node namespace's `lo` (InternalIPs, host-network pods' addresses,
    /// generated ones).
    pub ips: Vec<IpAddr>,
    /// Those the lab made up (the Node declares none of that family).
    pub generated: Vec<IpAddr>,
    pub ports: Vec<ServerPort>,
}

/// An external host: its own namespace behind the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalAttachment {
    pub name: String,
    pub ip: IpAddr,
    pub netns: String,
    /// The node-side veth, inside the node namespace.
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: String,
    /// The MAC of the host's `eth0`.
    pub peer_mac: String,
    pub ports: Vec<ServerPort>,
}

/// How a lab is made.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub kind: LabKind,
    /// The input files, recorded in the state file.
    pub files: Vec<String>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            kind: LabKind::Run,
            files: Vec::new(),
        }
    }
}

/// A running lab. Dropping it (also while unwinding) stops its servers and deletes every
/// namespace it created, and its state file.
pub struct Lab {
    state: LabState,
    state_path: PathBuf,
    servers: ServerSet,
    removed: bool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_ok() {
        u16::from_le_bytes(b)
    } else {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        (nanos ^ (nanos >> 16)) as u16
    }
}

/// `lxc` + 11 hex digits of a hash of `namespace/name` (14 characters, within IFNAMSIZ).
fn host_ifname(namespace: &str, name: &str, taken: &BTreeSet<String>) -> String {
    let mut salt = 0u32;
    loop {
        // FNV-1a, 64 bits.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in format!("{namespace}/{name}/{salt}").bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let candidate = format!("lxc{:011x}", h & 0x0fff_ffff_ffff);
        if !taken.contains(&candidate) {
            return candidate;
        }
        salt += 1;
    }
}

fn mac(prefix: u8, index: usize) -> String {
    let i = u32::try_from(index).unwrap_or(u32::MAX).to_be_bytes();
    format!(
        "02:{prefix:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        i[0], i[1], i[2], i[3]
    )
}

fn host_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

/// One veth-wired endpoint (pod or external host), for the shared wiring code.
struct Wire<'a> {
    netns: &'a str,
    ip: IpAddr,
    host_ifname: &'a str,
    host_mac: &'a str,
    peer_mac: &'a str,
}

/// Node-side lines: the veth pair (peer straight into the endpoint's namespace), up.
fn node_link_lines(w: &Wire<'_>, out: &mut Vec<String>) {
    out.push(format!(
        "link add {} address {} type veth peer name eth0 address {} netns {}",
        w.host_ifname, w.host_mac, w.peer_mac, w.netns
    ));
    out.push(format!("link set {} up", w.host_ifname));
}

/// Node-side lines: the /32 (/128) route and the static neighbour.
fn node_route_lines(w: &Wire<'_>, out: &mut Vec<String>) {
    out.push(format!(
        "route add {} dev {}",
        host_prefix(w.ip),
        w.host_ifname
    ));
    out.push(format!(
        "neigh replace {} lladdr {} dev {} nud permanent",
        w.ip, w.peer_mac, w.host_ifname
    ));
}

/// Endpoint-side lines: lo and eth0 up, the address, the default route via the gateway.
fn endpoint_lines(w: &Wire<'_>) -> Vec<String> {
    let mut out = vec!["link set lo up".to_owned(), "link set eth0 up".to_owned()];
    match w.ip {
        IpAddr::V4(_) => {
            out.push(format!("addr add {} dev eth0", host_prefix(w.ip)));
            out.push(format!(
                "neigh replace {GATEWAY_V4} lladdr {} dev eth0 nud permanent",
                w.host_mac
            ));
            out.push(format!(
                "route add default via {GATEWAY_V4} dev eth0 onlink"
            ));
        }
        IpAddr::V6(_) => {
            out.push(format!("addr add {} dev eth0 nodad", host_prefix(w.ip)));
            out.push(format!(
                "neigh replace {GATEWAY_V6} lladdr {} dev eth0 nud permanent",
                w.host_mac
            ));
            out.push(format!("route add default via {GATEWAY_V6} dev eth0"));
        }
    }
    out
}

/// Lets root open ICMP ping sockets (`SOCK_DGRAM`/`IPPROTO_ICMP`) in `netns`.
fn allow_ping(netns: &str) -> Result<(), LabError> {
    netns::sysctl(netns, "net/ipv4/ping_group_range", "0 2147483647")
}

impl Lab {
    /// Builds the lab for `spec`: namespaces, wiring, addresses, routes, servers. On any
    /// failure everything created so far is removed before the error is returned.
    pub fn create(spec: &LabSpec, options: &LabOptions) -> Result<Lab, LabError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(LabError::NotRoot);
        }
        cmd::ip(&["-V"])?;
        let state_dir = state::state_dir();
        std::fs::create_dir_all(&state_dir)
            .map_err(|e| LabError::io(format!("creating {}", state_dir.display()), e))?;

        // Claim an id: its state file is created exclusively, and no namespace uses it yet.
        let pid = std::process::id();
        let mut claimed = None;
        for _ in 0..32 {
            let id = format!("{:04x}{:04x}", pid & 0xffff, random_u16());
            let prefix = format!("pal-{id}-");
            if netns::list().iter().any(|n| n.starts_with(&prefix)) {
                continue;
            }
            let path = state::state_file(&state_dir, &id);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => {
                    claimed = Some((id, path));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(LabError::io(format!("creating {}", path.display()), e)),
            }
        }
        let Some((id, state_path)) = claimed else {
            return Err(LabError::State("no free lab id after 32 tries".to_owned()));
        };
        netns::register_state_file(&id, state_path.clone());

        let node_netns = format!("pal-{id}-node");
        let pod_netns: Vec<String> = (1..=spec.pods.len())
            .map(|n| format!("pal-{id}-{n}"))
            .collect();
        let ext_netns: Vec<String> = (1..=spec.externals.len())
            .map(|n| format!("pal-{id}-x{n}"))
            .collect();
        let mut taken = BTreeSet::new();
        let mut pods = Vec::new();
        for (i, (p, ns)) in spec.pods.iter().zip(&pod_netns).enumerate() {
            let ifname = host_ifname(&p.namespace, &p.name, &taken);
            taken.insert(ifname.clone());
            pods.push(PodAttachment {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                ip: p.ip,
                netns: ns.clone(),
                host_ifname: ifname,
                host_ifindex: 0,
                host_mac: mac(0x50, i + 1),
                pod_mac: mac(0x51, i + 1),
                node_netns: node_netns.clone(),
                ports: p.ports.clone(),
            });
        }
        let externals: Vec<ExternalAttachment> = spec
            .externals
            .iter()
            .zip(&ext_netns)
            .enumerate()
            .map(|(i, (e, ns))| ExternalAttachment {
                name: e.name.clone(),
                ip: e.ip,
                netns: ns.clone(),
                host_ifname: format!("ext{}", i + 1),
                host_ifindex: 0,
                host_mac: mac(0x52, i + 1),
                peer_mac: mac(0x53, i + 1),
                ports: e.ports.clone(),
            })
            .collect();
        let mut all_netns = vec![node_netns.clone()];
        all_netns.extend(pod_netns.iter().cloned());
        all_netns.extend(ext_netns.iter().cloned());

        let mut lab = Lab {
            state: LabState {
                id: id.clone(),
                kind: options.kind,
                pid,
                start_time: state::process_start_time(pid),
                ready: false,
                created: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                files: options.files.clone(),
                netns: all_netns,
                node: NodeAttachment {
                    name: spec.node.name.clone(),
                    netns: node_netns.clone(),
                    ips: spec.node.ips.clone(),
                    generated: spec.node.generated.clone(),
                    ports: spec.node.ports.clone(),
                },
                pods,
                host_pods: spec
                    .host_pods
                    .iter()
                    .map(|h| HostPodAttachment {
                        namespace: h.namespace.clone(),
                        name: h.name.clone(),
                        ip: h.ip,
                    })
                    .collect(),
                externals,
            },
            state_path,
            servers: ServerSet::default(),
            removed: false,
        };
        // From here on, an error drops `lab`, which removes whatever exists.
        state::write(&lab.state_path, &lab.state)?;
        lab.build()?;
        lab.state.ready = true;
        state::write(&lab.state_path, &lab.state)?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<(), LabError> {
        let id = self.state.id.clone();
        for ns in &self.state.netns {
            netns::create(&id, ns)?;
        }
        let node_ns = self.node().netns.clone();
        let has_v6 = self.node().ips.iter().any(IpAddr::is_ipv6);

        // The node: loopback carrying its addresses; forwarding (in this namespace only).
        let mut node_lines = vec!["link set lo up".to_owned()];
        for ip in &self.node().ips {
            let nodad = if ip.is_ipv6() { " nodad" } else { "" };
            node_lines.push(format!(
                "addr add {} dev {NODE_IFNAME}{nodad}",
                host_prefix(*ip)
            ));
        }
        let wires: Vec<Wire<'_>> = self
            .state
            .pods
            .iter()
            .map(|p| Wire {
                netns: &p.netns,
                ip: p.ip,
                host_ifname: &p.host_ifname,
                host_mac: &p.host_mac,
                peer_mac: &p.pod_mac,
            })
            .collect();
        let ext_wires: Vec<Wire<'_>> = self
            .state
            .externals
            .iter()
            .map(|e| Wire {
                netns: &e.netns,
                ip: e.ip,
                host_ifname: &e.host_ifname,
                host_mac: &e.host_mac,
                peer_mac: &e.peer_mac,
            })
            .collect();
        for w in wires.iter().chain(&ext_wires) {
            node_link_lines(w, &mut node_lines);
        }
        for w in wires.iter().chain(&ext_wires) {
            node_route_lines(w, &mut node_lines);
        }
        cmd::ip_batch(Some(&node_ns), &node_lines, false)?;
        for w in wires.iter().chain(&ext_wires) {
            cmd::ip_batch(Some(w.netns), &endpoint_lines(w), false)?;
        }

        netns::sysctl(&node_ns, "net/ipv4/ip_forward", "1")?;
        let v6_used = has_v6
            || self.state.pods.iter().any(|p| p.ip.is_ipv6())
            || self.state.externals.iter().any(|e| e.ip.is_ipv6());
        if v6_used {
            netns::sysctl(&node_ns, "net/ipv6/conf/all/forwarding", "1")?;
        }
        allow_ping(&node_ns)?;
        for w in wires.iter().chain(&ext_wires) {
            allow_ping(w.netns)?;
        }

        drop(wires);
        drop(ext_wires);

        // Interface indexes, as the datapath sees them inside the node namespace.
        let index = cmd::ifindexes(&node_ns)?;
        let lookup = |ifname: &str| {
            index.get(ifname).copied().ok_or_else(|| LabError::Command {
                command: format!("ip -n {node_ns} -j link show"),
                stderr: format!("no interface {ifname}"),
            })
        };
        for p in &mut self.state.pods {
            p.host_ifindex = lookup(&p.host_ifname)?;
        }
        for e in &mut self.state.externals {
            e.host_ifindex = lookup(&e.host_ifname)?;
        }

        // Servers.
        for p in &self.state.pods {
            self.servers.start(
                &p.netns,
                &format!("{}/{}", p.namespace, p.name),
                p.ip.is_ipv6(),
                &p.ports,
            )?;
        }
        let node = self.node().clone();
        self.servers.start(
            &node.netns,
            &format!("node/{}", node.name),
            has_v6,
            &node.ports,
        )?;
        for e in &self.state.externals {
            self.servers.start(
                &e.netns,
                &format!("external/{}", e.name),
                e.ip.is_ipv6(),
                &e.ports,
            )?;
        }
        Ok(())
    }

    /// Plugs in policy enforcement: every pod's endpoint, then the engine's tables.
    pub fn attach(&self, enforcer: &mut dyn Enforcer, engine: &Engine) -> Result<(), LabError> {
        for p in &self.state.pods {
            enforcer.endpoint_added(p).map_err(LabError::Enforcer)?;
        }
        enforcer.sync(engine).map_err(LabError::Enforcer)
    }

    /// The lab id (`pal-<id>-…` names its namespaces).
    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// Everything the state file records.
    pub fn state(&self) -> &LabState {
        &self.state
    }

    pub fn node(&self) -> &NodeAttachment {
        &self.state.node
    }

    pub fn pods(&self) -> &[PodAttachment] {
        &self.state.pods
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodAttachment> {
        self.state
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    pub fn host_pods(&self) -> &[HostPodAttachment] {
        &self.state.host_pods
    }

    pub fn externals(&self) -> &[ExternalAttachment] {
        &self.state.externals
    }

    /// Every namespace of the lab (node first).
    pub fn netns(&self) -> &[String] {
        &self.state.netns
    }

    /// The namespace a party's traffic starts from.
    pub fn netns_of(&self, party: &Party) -> Option<&str> {
        match party {
            Party::Pod { namespace, name } => self
                .pod(namespace, name)
                .map(|p| p.netns.as_str())
                .or_else(|| {
                    self.state
                        .host_pods
                        .iter()
                        .any(|h| &h.namespace == namespace && &h.name == name)
                        .then(|| self.node().netns.as_str())
                }),
            Party::Node(name) => (self.node().name == *name).then(|| self.node().netns.as_str()),
            Party::Ip(ip) => self
                .state
                .externals
                .iter()
                .find(|e| e.ip == *ip)
                .map(|e| e.netns.as_str())
                .or_else(|| {
                    self.state
                        .pods
                        .iter()
                        .find(|p| p.ip == *ip)
                        .map(|p| p.netns.as_str())
                })
                .or_else(|| {
                    self.node()
                        .ips
                        .contains(ip)
                        .then(|| self.node().netns.as_str())
                }),
        }
    }

    /// The address to reach a party at; for the node, one of the family `v6` when it has one.
    pub fn ip_of(&self, party: &Party, v6: Option<bool>) -> Option<IpAddr> {
        match party {
            Party::Pod { namespace, name } => {
                self.pod(namespace, name).map(|p| p.ip).or_else(|| {
                    self.state
                        .host_pods
                        .iter()
                        .find(|h| &h.namespace == namespace && &h.name == name)
                        .map(|h| h.ip)
                })
            }
            Party::Node(name) => {
                let node = self.node();
                if node.name != *name {
                    return None;
                }
                v6.and_then(|v6| node.ips.iter().find(|ip| ip.is_ipv6() == v6))
                    .or_else(|| node.ips.first())
                    .copied()
            }
            Party::Ip(ip) => Some(*ip),
        }
    }

    /// Removes the lab now, reporting errors (dropping does the same, silently).
    pub fn destroy(mut self) -> Result<(), LabError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), LabError> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        self.servers.stop();
        netns::remove_lab(&self.state.id)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("palisade lab {}: cleanup: {e}", self.state.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifnames_fit_ifnamsiz_and_differ() {
        let mut taken = BTreeSet::new();
        let a = host_ifname("default", "deathstar-1", &taken);
        assert!(a.len() <= 15 && a.starts_with("lxc"), "{a}");
        taken.insert(a.clone());
        let b = host_ifname("default", "deathstar-1", &taken);
        assert_ne!(a, b);
        assert!(b.len() <= 15);
        assert_eq!(a, host_ifname("default", "deathstar-1", &BTreeSet::new()));
    }

    #[test]
    fn macs_are_local_unicast() {
        assert_eq!(mac(0x50, 1), "02:50:00:00:00:01");
        assert_eq!(mac(0x51, 300), "02:51:00:00:01:2c");
    }
}
