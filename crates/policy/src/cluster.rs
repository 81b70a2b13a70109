//! Loading a batch of manifests into an engine: namespaces, nodes and pods become cluster
//! state, policies are compiled, and the batch is rejected whole if anything is wrong.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use palisade_policy_api::load::{Bundle, Diagnostic, Manifest, Object};
use palisade_policy_api::scenario::ConnectivityTest;

use crate::compile::{self, CompileError, DEFAULT_NAMESPACE};
use crate::engine::{Config, Engine, NamedPort, NodeInfo, PodInfo};
use crate::model::{proto, CompiledPolicy};

/// Name of the node every pod runs on when the input declares no Node.
pub const DEFAULT_NODE: &str = "node-1";

/// A loaded scenario: the engine with everything applied, and the ConnectivityTests found.
pub struct Loaded<'a> {
    pub engine: Engine,
    pub tests: Vec<(&'a Manifest, &'a ConnectivityTest)>,
    pub policies: Vec<(&'a Manifest, CompiledPolicy)>,
}

/// Compiles every policy of a bundle, locating errors in their manifests.
pub fn compile_policies(
    bundle: &Bundle,
) -> Result<Vec<(&Manifest, CompiledPolicy)>, Vec<Diagnostic>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for m in &bundle.manifests {
        let compiled = match &m.object {
            Object::NetworkPolicy(p) => compile::network_policy(p),
            Object::CiliumNetworkPolicy(p) => compile::cilium_policy(p, false),
            Object::CiliumClusterwideNetworkPolicy(p) => compile::cilium_policy(p, true),
            _ => continue,
        };
        match compiled {
            Ok(c) => out.push((m, c)),
            Err(CompileError::Invalid { path, message }) => {
                errors.push(m.diagnostic(&path, message, None));
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Pod facts the engine needs, from a `v1 Pod` (pods without `spec.nodeName` run on
/// `default_node`).
pub fn pod_info(
    m: &Manifest,
    p: &palisade_policy_api::k8s::Pod,
    default_node: &str,
) -> Result<PodInfo, Diagnostic> {
    let name = p
        .metadata
        .name
        .clone()
        .ok_or_else(|| m.diagnostic("metadata.name", "missing", None))?;
    let ip_text = p
        .status
        .pod_ip
        .as_deref()
        .ok_or_else(|| m.diagnostic("status.podIP", "missing field \"podIP\"", None))?;
    let ip: IpAddr = ip_text.parse().map_err(|_| {
        m.diagnostic(
            "status.podIP",
            format!("invalid IP address {ip_text:?}"),
            None,
        )
    })?;
    let mut ports = Vec::new();
    for c in &p.spec.containers {
        for port in &c.ports {
            let (Some(name), Ok(number)) = (&port.name, u16::try_from(port.container_port)) else {
                continue;
            };
            let pr = match port.protocol.as_deref().unwrap_or("TCP") {
                "UDP" => proto::UDP,
                "SCTP" => proto::SCTP,
                _ => proto::TCP,
            };
            ports.push(NamedPort {
                name: name.to_ascii_lowercase(),
                proto: pr,
                port: number,
            });
        }
    }
    Ok(PodInfo {
        namespace: p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        name,
        labels: p.metadata.labels.clone(),
        service_account: p
            .spec
            .service_account_name
            .clone()
            .or_else(|| p.spec.service_account.clone())
            .unwrap_or_else(|| "default".to_owned()),
        node: p
            .spec
            .node_name
            .clone()
            .unwrap_or_else(|| default_node.to_owned()),
        host_network: p.spec.host_network,
        ip,
        ports,
    })
}

/// Builds an engine from a bundle: every object applied, every table resolved.
pub fn load(bundle: &Bundle, config: Config) -> Result<Loaded<'_>, Vec<Diagnostic>> {
    let policies = compile_policies(bundle)?;
    let mut errors = Vec::new();
    let mut engine = Engine::new(config);

    let mut namespaces: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut nodes: Vec<(&Manifest, NodeInfo)> = Vec::new();
    let mut tests = Vec::new();
    for m in &bundle.manifests {
        match &m.object {
            Object::Namespace(ns) => {
                if let Some(name) = &ns.metadata.name {
                    namespaces.insert(name.clone(), ns.metadata.labels.clone());
                }
            }
            Object::Node(n) => {
                let Some(name) = n.metadata.name.clone() else {
                    continue;
                };
                let ips = n
                    .status
                    .addresses
                    .iter()
                    .filter(|a| a.kind == "InternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect();
                nodes.push((
                    m,
                    NodeInfo {
                        name,
                        labels: n.metadata.labels.clone(),
                        ips,
                    },
                ));
            }
            Object::ConnectivityTest(t) => tests.push((m, t)),
            _ => {}
        }
    }
    let default_node = nodes
        .first()
        .map_or(DEFAULT_NODE.to_owned(), |(_, n)| n.name.clone());
    if nodes.is_empty() {
        engine.upsert_node(NodeInfo {
            name: DEFAULT_NODE.to_owned(),
            labels: BTreeMap::new(),
            ips: Vec::new(),
        });
    }
    let mut ip_users: HashMap<IpAddr, String> = HashMap::new();
    for (m, n) in nodes {
        for ip in &n.ips {
            ip_users.insert(*ip, format!("node {}", n.name));
        }
        if engine.node(&n.name).is_some() {
            errors.push(m.diagnostic(
                "metadata.name",
                format!("node {:?} is declared twice", n.name),
                None,
            ));
        }
        engine.upsert_node(n);
    }
    let mut pods = Vec::new();
    for m in &bundle.manifests {
        if let Object::Pod(p) = &m.object {
            match pod_info(m, p, &default_node) {
                Ok(info) => {
                    // Namespaces that pods or policies name exist even when not declared.
                    namespaces.entry(info.namespace.clone()).or_default();
                    if engine.node(&info.node).is_none() {
                        errors.push(m.diagnostic(
                            "spec.nodeName",
                            format!("no Node named {:?} is declared", info.node),
                            None,
                        ));
                    }
                    let owner = format!("pod {}/{}", info.namespace, info.name);
                    if let Some(other) = ip_users.get(&info.ip) {
                        let shared_with_node = info.host_network && other.starts_with("node ");
                        if !shared_with_node {
                            errors.push(m.diagnostic(
                                "status.podIP",
                                format!("address {} is already used by {other}", info.ip),
                                None,
                            ));
                        }
                    } else {
                        ip_users.insert(info.ip, owner);
                    }
                    pods.push(info);
                }
                Err(d) => errors.push(d),
            }
        }
    }
    for (_, c) in &policies {
        if let Some(ns) = &c.key.namespace {
            namespaces.entry(ns.clone()).or_default();
        }
    }
    for (name, labels) in namespaces {
        if let Err(e) = engine.upsert_namespace(&name, labels) {
            errors.push(bundle_error(bundle, &e.to_string()));
        }
    }
    for p in pods {
        if let Err(e) = engine.upsert_pod(p) {
            errors.push(bundle_error(bundle, &e.to_string()));
        }
    }
    for (_, c) in &policies {
        if let Err(e) = engine.upsert_policy(c.clone()) {
            errors.push(bundle_error(bundle, &e.to_string()));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    engine.commit();
    Ok(Loaded {
        engine,
        tests,
        policies,
    })
}

fn bundle_error(bundle: &Bundle, message: &str) -> Diagnostic {
    match bundle.manifests.first() {
        Some(m) => m.diagnostic("", message, None),
        None => Diagnostic {
            severity: palisade_policy_api::validate::Severity::Error,
            file: std::sync::Arc::from("<input>"),
            pos: palisade_policy_api::source::Position::default(),
            path: String::new(),
            message: message.to_owned(),
            hint: None,
        },
    }
}
