//! Policy engine benchmark: `cargo bench -p palisade-policy --bench engine`.
//!
//! A deterministic, cluster-shaped workload (500 namespaces, 10,000 pods from 2,500
//! deployments, 100 nodes, 2,000 mixed NetworkPolicy / CiliumNetworkPolicy /
//! CiliumClusterwideNetworkPolicy objects) is generated from a seeded PRNG, written out as
//! manifest text and loaded through `palisade_policy_api::load_str` (timed apart from
//! resolution). Then, on one thread:
//!
//! - memory: peak and held heap bytes of a full build, counted by the global allocator below,
//!   and the heap bytes of the resolved tables alone (summed over every distinct table reachable
//!   through the engine's public API);
//! - full: `Engine::new` → every namespace, node, pod and policy → `commit`;
//! - one pod added to a built engine, with the labels of an existing deployment (existing
//!   identity) and with a new label set (new identity), each → `commit`;
//! - one policy changed (a NetworkPolicy, a CiliumNetworkPolicy: a different port) → `commit`.
//!
//! Without `--bench` (that is, under `cargo test --all-targets`) it runs a small smoke
//! configuration once. `PALISADE_BENCH_NAMESPACES` scales the workload (20 pods and 4 policies
//! per namespace; the targets are only judged at the default 500), `PALISADE_BENCH_REPS` the
//! number of full builds timed (5), `PALISADE_BENCH_ROUNDS` the number of pods added and
//! policies changed (60 each), and `PALISADE_BENCH_ONLY=full` skips the incremental rounds
//! (for profilers).

// Figures are printed as floating point; the counts involved are far below 2^52.
#![allow(clippy::cast_precision_loss)]

use std::alloc::System;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::error::Error;
use std::fmt::Write as _;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cap::Cap;
use palisade_policy::compile;
use palisade_policy::engine::TableKey;
use palisade_policy::model::{CompiledPolicy, FqdnPattern};
use palisade_policy::table::{Contribution, Entry, Table};
use palisade_policy::{Config, Direction, Engine, NamedPort, NodeInfo, PodInfo};
use palisade_policy_api::load::Object;
use serde_json::{json, Value};

/// Counting allocator: `System` plus the bytes currently in use, one atomic add per call. The
/// workspace forbids `unsafe`, hence the `cap` crate. Its `stats` feature would also track the
/// peak, at three more atomic operations per allocation (10–15% of the full build's time on
/// this engine), so the peak is sampled instead: see `measure_memory`.
#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

const TCP: u8 = 6;
const UDP: u8 = 17;

type Res<T> = Result<T, Box<dyn Error>>;

// ---------------------------------------------------------------------------------------------
// PRNG (SplitMix64): deterministic, no dependency.
// ---------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

const TEAMS: &[&str] = &[
    "payments",
    "search",
    "checkout",
    "identity",
    "catalog",
    "shipping",
    "analytics",
    "ads",
    "media",
    "messaging",
    "billing",
    "fraud",
    "ml",
    "growth",
    "inventory",
    "support",
    "notifications",
    "maps",
    "reviews",
];
const REPLICAS: [usize; 5] = [6, 5, 4, 3, 2];
const NODES: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Frontend,
    Backend,
    Db,
    Cache,
    Worker,
    System,
}

impl Tier {
    fn as_str(self) -> &'static str {
        match self {
            Tier::Frontend => "frontend",
            Tier::Backend => "backend",
            Tier::Db => "db",
            Tier::Cache => "cache",
            Tier::Worker => "worker",
            Tier::System => "system",
        }
    }
}

/// A deployment: its replicas share labels, service account and ports, hence one identity.
#[derive(Debug, Clone)]
struct App {
    name: String,
    tier: Tier,
    labels: BTreeMap<String, String>,
    service_account: String,
    ports: Vec<NamedPort>,
    replicas: usize,
}

impl App {
    fn new(name: &str, tier: Tier, version: &str, ports: &[(&str, u8, u16)]) -> App {
        let labels = [("app", name), ("tier", tier.as_str()), ("version", version)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        App {
            name: name.to_owned(),
            tier,
            labels,
            service_account: name.to_owned(),
            ports: ports
                .iter()
                .map(|&(n, proto, port)| NamedPort {
                    name: n.to_owned(),
                    proto,
                    port,
                })
                .collect(),
            replicas: 0,
        }
    }

    fn first_port(&self) -> u16 {
        self.ports.first().map_or(8080, |p| p.port)
    }
}

#[derive(Debug, Clone)]
struct Ns {
    name: String,
    team: &'static str,
    env: &'static str,
    apps: Vec<App>,
}

impl Ns {
    fn labels(&self) -> BTreeMap<String, String> {
        [("team", self.team), ("env", self.env)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

fn system_namespaces() -> Vec<Ns> {
    let sys = |name: &str, apps: Vec<App>| Ns {
        name: name.to_owned(),
        team: "platform",
        env: "prod",
        apps,
    };
    let mut coredns = App::new(
        "coredns",
        Tier::System,
        "v1",
        &[
            ("dns", UDP, 53),
            ("dns-tcp", TCP, 53),
            ("metrics", TCP, 9153),
        ],
    );
    coredns
        .labels
        .insert("k8s-app".to_owned(), "kube-dns".to_owned());
    vec![
        sys(
            "kube-system",
            vec![
                coredns,
                App::new(
                    "metrics-server",
                    Tier::System,
                    "v1",
                    &[("https", TCP, 10250)],
                ),
                App::new("hubble-relay", Tier::System, "v1", &[("grpc", TCP, 4245)]),
                App::new(
                    "cilium-operator",
                    Tier::System,
                    "v1",
                    &[("metrics", TCP, 9963)],
                ),
                App::new("konnectivity", Tier::System, "v1", &[("agent", TCP, 8132)]),
            ],
        ),
        sys(
            "ingress-nginx",
            vec![
                App::new(
                    "ingress-nginx",
                    Tier::Frontend,
                    "v1",
                    &[("http", TCP, 80), ("https", TCP, 443)],
                ),
                App::new(
                    "default-backend",
                    Tier::Backend,
                    "v1",
                    &[("http", TCP, 8080)],
                ),
                App::new(
                    "cert-manager",
                    Tier::System,
                    "v1",
                    &[("metrics", TCP, 9402)],
                ),
                App::new(
                    "external-dns",
                    Tier::System,
                    "v1",
                    &[("metrics", TCP, 7979)],
                ),
                App::new("oauth2-proxy", Tier::Frontend, "v1", &[("http", TCP, 4180)]),
            ],
        ),
        sys(
            "monitoring",
            vec![
                App::new("prometheus", Tier::System, "v1", &[("web", TCP, 9090)]),
                App::new("grafana", Tier::Frontend, "v1", &[("http", TCP, 3000)]),
                App::new("alertmanager", Tier::System, "v1", &[("web", TCP, 9093)]),
                App::new(
                    "kube-state-metrics",
                    Tier::System,
                    "v1",
                    &[("http-metrics", TCP, 8080)],
                ),
                App::new("loki", Tier::Db, "v1", &[("http", TCP, 3100)]),
            ],
        ),
    ]
}

fn team_namespace(rng: &mut Rng, index: usize) -> Ns {
    let team = *rng.pick(TEAMS);
    let env = match rng.below(10) {
        0..=3 => "prod",
        4..=6 => "staging",
        _ => "dev",
    };
    let version = *rng.pick(&["v1", "v2", "v3"]);
    let http = if rng.percent(30) { 80 } else { 8080 };
    let frontend = *rng.pick(&["web", "ui", "gateway", "portal"]);
    let backends = [
        "api", "orders", "users", "catalog", "billing", "search", "auth", "cart",
    ];
    let b1 = rng.below(backends.len());
    let b2 = (b1 + 1 + rng.below(backends.len() - 1)) % backends.len();
    let worker = *rng.pick(&["worker", "consumer", "scheduler"]);
    let mut apps = vec![
        App::new(
            frontend,
            Tier::Frontend,
            version,
            &[("http", TCP, http), ("metrics", TCP, 9090)],
        ),
        App::new(
            backends[b1],
            Tier::Backend,
            version,
            &[("http", TCP, 8080), ("grpc", TCP, 50051)],
        ),
        App::new(backends[b2], Tier::Backend, version, &[("http", TCP, 8080)]),
        match rng.below(3) {
            0 => App::new(
                "postgres",
                Tier::Db,
                "v15",
                &[("postgres", TCP, 5432), ("metrics", TCP, 9187)],
            ),
            1 => App::new("mysql", Tier::Db, "v8", &[("mysql", TCP, 3306)]),
            _ => App::new("redis", Tier::Cache, "v7", &[("redis", TCP, 6379)]),
        },
        App::new(worker, Tier::Worker, version, &[("metrics", TCP, 9090)]),
    ];
    if rng.percent(20) {
        // Some deployments run under the namespace's default service account.
        let i = rng.below(apps.len());
        "default".clone_into(&mut apps[i].service_account);
    }
    Ns {
        name: format!("{team}-{env}-{index:03}"),
        team,
        env,
        apps,
    }
}

fn namespaces(rng: &mut Rng, count: usize) -> Vec<Ns> {
    let mut out = system_namespaces();
    out.truncate(count);
    while out.len() < count {
        let ns = team_namespace(rng, out.len());
        out.push(ns);
    }
    for ns in &mut out {
        for (app, replicas) in ns.apps.iter_mut().zip(REPLICAS) {
            app.replicas = replicas;
        }
    }
    out
}

fn pod_ip(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        0x0a01_0000_u32 + u32::try_from(n).unwrap_or(0),
    ))
}

fn pod(ns: &Ns, app: &App, name: String, ip: IpAddr, node: usize) -> PodInfo {
    PodInfo {
        namespace: ns.name.clone(),
        name,
        labels: app.labels.clone(),
        service_account: app.service_account.clone(),
        node: format!("node-{node:03}"),
        host_network: false,
        ip,
        ports: app.ports.clone(),
    }
}

fn pods(rng: &mut Rng, nss: &[Ns]) -> Vec<PodInfo> {
    let mut out = Vec::new();
    for ns in nss {
        for app in &ns.apps {
            let hash = rng.next() % 0xff_ffff;
            for _ in 0..app.replicas {
                let name = format!("{}-{hash:06x}-{:05x}", app.name, rng.next() % 0xf_ffff);
                let ip = pod_ip(out.len());
                out.push(pod(ns, app, name, ip, rng.below(NODES)));
            }
        }
    }
    out
}

fn nodes() -> Vec<NodeInfo> {
    (0..NODES)
        .map(|i| NodeInfo {
            name: format!("node-{i:03}"),
            labels: [
                (
                    "topology.kubernetes.io/zone".to_owned(),
                    format!("zone-{}", ["a", "b", "c"][i % 3]),
                ),
                ("node-role.kubernetes.io/worker".to_owned(), String::new()),
            ]
            .into_iter()
            .collect(),
            ips: vec![IpAddr::V4(Ipv4Addr::new(
                172,
                16,
                u8::try_from(i / 250).unwrap_or(0),
                u8::try_from(i % 250 + 1).unwrap_or(1),
            ))],
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Policies, as manifest text
// ---------------------------------------------------------------------------------------------

/// External prefixes policies name: /16s of a cloud provider, /24s inside some of them, a few
/// /32 hosts, and partner ranges. Nested on purpose: CIDR selectors match every prefix inside.
fn cidr_pool() -> Vec<String> {
    let mut out = Vec::new();
    for k in 0..40 {
        out.push(format!("52.{}.0.0/16", 10 + k));
    }
    for k in 0..60 {
        out.push(format!("52.{}.{}.0/24", 10 + k % 40, k));
    }
    for k in 0..20 {
        out.push(format!("52.{}.{}.{}/32", 10 + k % 40, k, 10 + k));
    }
    for p in ["203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/24"] {
        out.push(p.to_owned());
    }
    out
}

const PRIVATE: [&str; 3] = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"];

struct Gen<'a> {
    rng: Rng,
    nss: &'a [Ns],
    pool: Vec<String>,
}

fn np(ns: &str, name: &str, spec: Value) -> Value {
    let mut v = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
    });
    v["spec"] = spec;
    v
}

/// A CiliumNetworkPolicy in `ns`, or a CiliumClusterwideNetworkPolicy.
fn cnp(ns: Option<&str>, name: &str, spec: Value) -> Value {
    let mut v = match ns {
        Some(ns) => json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
        }),
        None => json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": name},
        }),
    };
    v["spec"] = spec;
    v
}

/// A Cilium `toPorts` entry for TCP ports.
fn tcp_ports(ports: &[u16]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"port": p.to_string(), "protocol": "TCP"}))
        .collect();
    json!([{ "ports": ports }])
}

fn ns_name_selector(ns: &str) -> Value {
    json!({"matchLabels": {"kubernetes.io/metadata.name": ns}})
}

impl Gen<'_> {
    fn cidr(&mut self) -> String {
        self.rng.pick(&self.pool).clone()
    }

    /// A /16 of the pool and one of the pool's /24s inside it, for `except`.
    fn cidr_with_hole(&mut self) -> (String, String) {
        let k = self.rng.below(60);
        (
            format!("52.{}.0.0/16", 10 + k % 40),
            format!("52.{}.{k}.0/24", 10 + k % 40),
        )
    }

    fn other_ns(&mut self) -> &Ns {
        let i = self.rng.below(self.nss.len());
        &self.nss[i]
    }

    /// The namespace's baseline NetworkPolicy.
    fn np_baseline(&mut self, ns: &Ns, seq: usize) -> Value {
        let (name, spec) = match self.rng.below(10) {
            0..=3 => (
                "default-deny-ingress",
                json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
            ),
            4..=6 => (
                "allow-same-namespace",
                json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
            ),
            _ => (
                "allow-ingress-controller-and-monitoring",
                json!({
                    "podSelector": {},
                    "policyTypes": ["Ingress"],
                    "ingress": [
                        {
                            "from": [{"namespaceSelector": ns_name_selector("ingress-nginx")}],
                            "ports": [{"port": "http"}, {"port": 443}],
                        },
                        {
                            "from": [{
                                "namespaceSelector": ns_name_selector("monitoring"),
                                "podSelector": {"matchLabels": {"app": "prometheus"}},
                            }],
                            "ports": [{"port": "metrics"}],
                        },
                    ],
                }),
            ),
        };
        np(&ns.name, &format!("{name}.{seq}"), spec)
    }

    fn np_egress(&mut self, app: &App) -> Value {
        let (cidr, hole) = self.cidr_with_hole();
        let mut except: Vec<&str> = PRIVATE.to_vec();
        except.push("169.254.169.254/32");
        json!({
            "podSelector": {"matchLabels": {"app": app.name}},
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [{
                        "namespaceSelector": ns_name_selector("kube-system"),
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    }],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                },
                {
                    "to": [{"podSelector": {"matchLabels": {"tier": "backend"}}}],
                    "ports": [{"port": "http"}],
                },
                {
                    "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": except}}],
                    "ports": [{"port": 443}],
                },
                {
                    "to": [{"ipBlock": {"cidr": cidr, "except": [hole]}}],
                    "ports": [{"port": 30000, "endPort": 32767}],
                },
            ],
        })
    }

    /// A NetworkPolicy for one deployment of the namespace.
    fn np_app(&mut self, ns: &Ns, seq: usize) -> Value {
        let app = self.rng.pick(&ns.apps).clone();
        let (kind, spec) = match app.tier {
            Tier::Frontend if self.rng.percent(50) => {
                let partner = self.cidr();
                let spec = json!({
                    "podSelector": {"matchLabels": {"tier": "frontend"}},
                    "ingress": [{
                        "from": [
                            {"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}},
                            {"ipBlock": {"cidr": partner}},
                        ],
                        "ports": [{"port": 443}, {"port": 8443, "endPort": 8450}],
                    }],
                });
                ("ingress-from-partners", spec)
            }
            Tier::Frontend | Tier::Worker => ("egress", self.np_egress(&app)),
            Tier::Backend => {
                let mut ports = vec![json!({"port": "http"})];
                if app.ports.iter().any(|p| p.name == "grpc") {
                    ports.push(json!({"port": 50051, "protocol": "TCP"}));
                }
                let env = self.other_ns().env;
                let spec = json!({
                    "podSelector": {"matchLabels": {"app": app.name}},
                    "ingress": [
                        {"from": [{"podSelector": {"matchLabels": {"tier": "frontend"}}}], "ports": ports},
                        {
                            "from": [{
                                "namespaceSelector": {"matchLabels": {"team": ns.team}},
                                "podSelector": {"matchExpressions": [
                                    {"key": "tier", "operator": "In", "values": ["frontend", "backend"]},
                                ]},
                            }],
                            "ports": [{"port": 8080}],
                        },
                        {
                            "from": [{"namespaceSelector": {"matchLabels": {"env": env, "team": "platform"}}}],
                            "ports": [{"port": "http"}],
                        },
                    ],
                });
                ("backend-ingress", spec)
            }
            Tier::Db | Tier::Cache => {
                let port = if self.rng.percent(50) {
                    json!({"port": app.ports[0].name})
                } else {
                    json!({"port": app.first_port()})
                };
                let spec = json!({
                    "podSelector": {"matchLabels": {"tier": app.tier.as_str()}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{
                        "from": [
                            {"podSelector": {"matchLabels": {"tier": "backend"}}},
                            {"podSelector": {"matchLabels": {"tier": "worker"}}},
                        ],
                        "ports": [port],
                    }],
                });
                ("data-ingress", spec)
            }
            Tier::System => (
                "system-ingress",
                json!({
                "podSelector": {"matchLabels": {"app": app.name}},
                "ingress": [{
                    "from": [{"namespaceSelector": {}}],
                    "ports": [{"port": app.first_port(), "protocol": if app.name == "coredns" { "UDP" } else { "TCP" }}],
                }],
                }),
            ),
        };
        np(&ns.name, &format!("{kind}.{}.{seq}", app.name), spec)
    }

    fn cnp_namespaced(&mut self, seq: usize) -> Value {
        let ns = self.other_ns().clone();
        let app = self.rng.pick(&ns.apps).clone();
        let subject = json!({"matchLabels": {"app": app.name}});
        let port = app.first_port();
        let (kind, spec) = match self.rng.below(100) {
            0..=24 => {
                let peers: Vec<&str> = ns
                    .apps
                    .iter()
                    .filter(|a| a.name != app.name)
                    .map(|a| a.name.as_str())
                    .take(2)
                    .collect();
                (
                    "l4",
                    json!({
                        "endpointSelector": subject,
                        "ingress": [{
                            "fromEndpoints": [
                                {"matchLabels": {"tier": "frontend"}},
                                {"matchExpressions": [{"key": "app", "operator": "In", "values": peers}]},
                            ],
                            "toPorts": tcp_ports(&[port]),
                        }],
                    }),
                )
            }
            25..=34 => (
                "l7-http",
                json!({
                    "endpointSelector": subject,
                    "ingress": [{
                        "fromEndpoints": [{"matchLabels": {"tier": "frontend"}}],
                        "toPorts": [{
                            "ports": [{"port": port.to_string(), "protocol": "TCP"}],
                            "rules": {"http": [
                                {"method": "GET", "path": "/api/v1/.*"},
                                {"method": "POST", "path": "/api/v1/orders", "headers": ["X-Request-Id"]},
                            ]},
                        }],
                    }],
                }),
            ),
            35..=49 => {
                let entity = if self.rng.percent(12) {
                    "cluster"
                } else {
                    "world"
                };
                (
                    "entities",
                    json!({
                        "endpointSelector": subject,
                        "ingress": [
                            {"fromEntities": [entity], "toPorts": tcp_ports(&[443, port])},
                            {"fromEntities": ["host", "remote-node"]},
                        ],
                    }),
                )
            }
            50..=69 => {
                let (c1, c2, c3) = (self.cidr(), self.cidr(), self.cidr());
                (
                    "egress-cidr",
                    json!({
                        "endpointSelector": subject,
                        "egress": [
                            {"toEndpoints": [{"matchLabels": {"tier": "db"}}], "toPorts": tcp_ports(&[5432, 3306])},
                            {"toCIDR": [c1, c2]},
                            {
                                "toCIDRSet": [{"cidr": "0.0.0.0/0", "except": PRIVATE}],
                                "toPorts": tcp_ports(&[443]),
                            },
                            {
                                "toCIDR": [c3],
                                "toPorts": [{"ports": [{"port": "30000", "endPort": 32767, "protocol": "TCP"}]}],
                            },
                        ],
                    }),
                )
            }
            70..=84 => {
                let (cidr, hole) = self.cidr_with_hole();
                let mut spec = json!({
                    "endpointSelector": subject,
                    "ingressDeny": [
                        {"fromEntities": ["world"], "toPorts": tcp_ports(&[22])},
                        {"fromCIDRSet": [{"cidr": cidr, "except": [hole]}]},
                    ],
                    "egressDeny": [
                        {"toCIDRSet": [{"cidr": "169.254.0.0/16"}]},
                        {
                            "toEndpoints": [{
                                "matchLabels": {"tier": "db"},
                                "matchExpressions": [{"key": "app", "operator": "NotIn", "values": [app.name]}],
                            }],
                            "toPorts": tcp_ports(&[5432, 3306]),
                        },
                    ],
                });
                if self.rng.percent(50) {
                    spec["enableDefaultDeny"] = json!({"ingress": false, "egress": false});
                }
                ("deny", spec)
            }
            85..=94 => {
                let other = self.other_ns().clone();
                let other_app = &self.rng.pick(&other.apps).name;
                (
                    "cross-namespace",
                    json!({
                        "endpointSelector": subject,
                        "ingress": [{
                            "fromEndpoints": [
                                {"matchLabels": {"k8s:io.kubernetes.pod.namespace": other.name, "app": other_app}},
                                {"matchLabels": {"io.cilium.k8s.namespace.labels.team": ns.team, "tier": "frontend"}},
                            ],
                            "toPorts": [{"ports": [{"port": "8000", "endPort": 8100, "protocol": "TCP"}]}],
                        }],
                    }),
                )
            }
            _ => (
                "fqdn",
                json!({
                    "endpointSelector": subject,
                    "egress": [
                        {
                            "toEndpoints": [{"matchLabels": {
                                "k8s:io.kubernetes.pod.namespace": "kube-system",
                                "k8s:k8s-app": "kube-dns",
                            }}],
                            "toPorts": [{
                                "ports": [{"port": "53", "protocol": "ANY"}],
                                "rules": {"dns": [{"matchPattern": "*"}]},
                            }],
                        },
                        {
                            "toFQDNs": [{"matchName": "api.stripe.com"}, {"matchPattern": "*.s3.amazonaws.com"}],
                            "toPorts": tcp_ports(&[443]),
                        },
                    ],
                }),
            ),
        };
        cnp(Some(&ns.name), &format!("{kind}.{}.{seq}", app.name), spec)
    }

    /// One of three cluster-wide policies for a team's namespaces.
    fn ccnp_team(&mut self, team: &str, variant: usize) -> (&'static str, Value) {
        let subject = json!({"matchLabels": {"io.cilium.k8s.namespace.labels.team": team}});
        match variant {
            0 => (
                "team-internal",
                json!({
                    "endpointSelector": subject,
                    "ingress": [{"fromEndpoints": [
                        {"matchLabels": {"io.cilium.k8s.namespace.labels.team": team}},
                    ]}],
                    "enableDefaultDeny": {"ingress": false},
                }),
            ),
            1 => {
                let (cidr, hole) = self.cidr_with_hole();
                (
                    "team-egress-deny",
                    json!({
                        "endpointSelector": subject,
                        "egressDeny": [{"toCIDRSet": [{"cidr": cidr, "except": [hole]}]}],
                        "enableDefaultDeny": {"egress": false},
                    }),
                )
            }
            _ => (
                "team-apiserver",
                json!({
                    "endpointSelector": subject,
                    "egress": [{"toEntities": ["kube-apiserver"], "toPorts": tcp_ports(&[443, 6443])}],
                    "enableDefaultDeny": {"ingress": false, "egress": false},
                }),
            ),
        }
    }

    /// A cluster-wide policy for one deployment or one namespace.
    fn ccnp_narrow(&mut self) -> (&'static str, Value) {
        let ns = self.other_ns().clone();
        if self.rng.percent(30) {
            return (
                "namespace-isolation",
                json!({
                    "endpointSelector": {"matchLabels": {"k8s:io.kubernetes.pod.namespace": ns.name}},
                    "ingress": [
                        {"fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": ns.name}}]},
                        {"fromEntities": ["host"]},
                    ],
                }),
            );
        }
        let app = self.rng.pick(&ns.apps).clone();
        (
            "expose-via-ingress",
            json!({
                "endpointSelector": {"matchLabels": {
                    "k8s:io.kubernetes.pod.namespace": ns.name,
                    "app": app.name,
                }},
                "ingress": [{
                    "fromEndpoints": [{"matchLabels": {
                        "k8s:io.kubernetes.pod.namespace": "ingress-nginx",
                        "app": "ingress-nginx",
                    }}],
                    "toPorts": tcp_ports(&[app.first_port()]),
                }],
            }),
        )
    }

    fn ccnp(&mut self, seq: usize) -> Value {
        let no_default_deny = json!({"ingress": false, "egress": false});
        let (kind, spec) = match seq {
            0 => (
                "deny-cloud-metadata",
                json!({
                    "endpointSelector": {},
                    "egressDeny": [{"toCIDR": ["169.254.169.254/32"]}],
                    "enableDefaultDeny": no_default_deny,
                }),
            ),
            1 => (
                "allow-dns",
                json!({
                    "endpointSelector": {},
                    "egress": [{
                        "toEndpoints": [{"matchLabels": {
                            "k8s:io.kubernetes.pod.namespace": "kube-system",
                            "k8s:k8s-app": "kube-dns",
                        }}],
                        "toPorts": [{
                            "ports": [{"port": "53", "protocol": "UDP"}, {"port": "53", "protocol": "TCP"}],
                            "rules": {"dns": [{"matchPattern": "*"}]},
                        }],
                    }],
                    "enableDefaultDeny": no_default_deny,
                }),
            ),
            2 => (
                "allow-health",
                json!({
                    "endpointSelector": {},
                    "ingress": [{"fromEntities": ["host", "remote-node", "health"]}],
                    "enableDefaultDeny": no_default_deny,
                }),
            ),
            3 => (
                "allow-prometheus",
                json!({
                    "endpointSelector": {},
                    "ingress": [{
                        "fromEndpoints": [{"matchLabels": {
                            "k8s:io.kubernetes.pod.namespace": "monitoring",
                            "app": "prometheus",
                        }}],
                        "toPorts": [{"ports": [{"port": "metrics", "protocol": "TCP"}]}],
                    }],
                    "enableDefaultDeny": no_default_deny,
                }),
            ),
            4 => (
                "deny-ssh-from-world",
                json!({
                    "endpointSelector": {},
                    "ingressDeny": [{"fromEntities": ["world"], "toPorts": tcp_ports(&[22])}],
                    "enableDefaultDeny": no_default_deny,
                }),
            ),
            5 => (
                "prod-db-isolation",
                json!({
                    "endpointSelector": {"matchLabels": {
                        "io.cilium.k8s.namespace.labels.env": "prod",
                        "tier": "db",
                    }},
                    "ingressDeny": [{"fromEndpoints": [{"matchExpressions": [{
                        "key": "io.cilium.k8s.namespace.labels.env",
                        "operator": "NotIn",
                        "values": ["prod"],
                    }]}]}],
                    "enableDefaultDeny": no_default_deny,
                }),
            ),
            _ => {
                // Every broad policy once: three per team, one per (env, tier); then narrow
                // ones for single deployments and namespaces.
                let k = seq - 6;
                let per_team = TEAMS.len() * 3;
                if k < per_team {
                    self.ccnp_team(TEAMS[k / 3], k % 3)
                } else if k < per_team + 9 {
                    let k = k - per_team;
                    let env = ["prod", "staging", "dev"][k / 3];
                    let tier = [Tier::Frontend, Tier::Backend, Tier::Worker][k % 3];
                    (
                        "env-tier-deny",
                        json!({
                            "endpointSelector": {"matchLabels": {
                                "io.cilium.k8s.namespace.labels.env": env,
                                "tier": tier.as_str(),
                            }},
                            "ingressDeny": [{
                                "fromEntities": ["world"],
                                "toPorts": [{"ports": [{"port": "22"}, {"port": "3389"}]}],
                            }],
                            "enableDefaultDeny": no_default_deny,
                        }),
                    )
                } else {
                    self.ccnp_narrow()
                }
            }
        };
        cnp(None, &format!("{kind}.{seq}"), spec)
    }
}

/// 50% NetworkPolicy (two per namespace while they last), 40% CNP, 10% CCNP.
fn policies(rng: Rng, nss: &[Ns], count: usize) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let mut g = Gen {
        rng,
        nss,
        pool: cidr_pool(),
    };
    let n_np = count / 2;
    let n_ccnp = count / 10;
    let n_cnp = count - n_np - n_ccnp;
    let mut nps = Vec::with_capacity(n_np);
    for i in 0..n_np {
        let ns = &nss[(i / 2) % nss.len()];
        let p = if i % 2 == 0 {
            g.np_baseline(ns, i)
        } else {
            g.np_app(ns, i)
        };
        nps.push(p);
    }
    let cnps = (0..n_cnp).map(|i| g.cnp_namespaced(i)).collect();
    let ccnps = (0..n_ccnp).map(|i| g.ccnp(i)).collect();
    (nps, cnps, ccnps)
}

/// Changes the first port a policy names: a number goes up by one, a name becomes another.
fn bump_first_port(v: &mut Value) -> bool {
    match v {
        Value::Object(map) => {
            if let Some(port) = map.get_mut("port") {
                match port {
                    Value::Number(n) => {
                        if let Some(n) = n.as_u64() {
                            *port = json!(n + 1);
                            return true;
                        }
                    }
                    Value::String(s) => {
                        *s = match s.parse::<u16>() {
                            Ok(n) => (n + 1).to_string(),
                            Err(_) if s == "http" => "metrics".to_owned(),
                            Err(_) => "http".to_owned(),
                        };
                        return true;
                    }
                    _ => {}
                }
            }
            map.values_mut().any(bump_first_port)
        }
        Value::Array(items) => items.iter_mut().any(bump_first_port),
        _ => false,
    }
}

/// Manifest text → loader (parse + validate) → compiled policies, in input order.
fn load_and_compile(docs: &[Value]) -> Res<(Vec<CompiledPolicy>, Duration, Duration)> {
    let mut text = String::new();
    for d in docs {
        text.push_str("---\n");
        text.push_str(&serde_json::to_string(d)?);
        text.push('\n');
    }
    let t = Instant::now();
    let bundle = palisade_policy_api::load_str("bench.yaml", &text).map_err(|errs| {
        let mut msg = String::new();
        for e in errs.iter().take(5) {
            let _ = writeln!(msg, "{e}");
        }
        msg
    })?;
    let parse = t.elapsed();
    let t = Instant::now();
    let mut out = Vec::with_capacity(bundle.manifests.len());
    for m in &bundle.manifests {
        let c = match &m.object {
            Object::NetworkPolicy(p) => compile::network_policy(p),
            Object::CiliumNetworkPolicy(p) => compile::cilium_policy(p, false),
            Object::CiliumClusterwideNetworkPolicy(p) => compile::cilium_policy(p, true),
            _ => continue,
        };
        out.push(c.map_err(|e| format!("{}: {e}", m.origin))?);
    }
    let compile = t.elapsed();
    if out.len() != docs.len() {
        return Err(format!(
            "{} documents compiled to {} policies",
            docs.len(),
            out.len()
        )
        .into());
    }
    Ok((out, parse, compile))
}

// ---------------------------------------------------------------------------------------------
// Measurement
// ---------------------------------------------------------------------------------------------

struct Workload {
    nss: Vec<Ns>,
    nodes: Vec<NodeInfo>,
    pods: Vec<PodInfo>,
    /// NetworkPolicies, CNPs, CCNPs, in that order, with their source documents.
    policies: Vec<CompiledPolicy>,
    docs: Vec<Value>,
    counts: [usize; 3],
}

/// Owned inputs of one full build (the engine takes them by value).
struct Inputs {
    namespaces: Vec<(String, BTreeMap<String, String>)>,
    nodes: Vec<NodeInfo>,
    pods: Vec<PodInfo>,
    policies: Vec<CompiledPolicy>,
}

impl Workload {
    fn inputs(&self) -> Inputs {
        Inputs {
            namespaces: self
                .nss
                .iter()
                .map(|ns| (ns.name.clone(), ns.labels()))
                .collect(),
            nodes: self.nodes.clone(),
            pods: self.pods.clone(),
            policies: self.policies.clone(),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    cluster: Duration,
    pods: Duration,
    policies: Duration,
    commit: Duration,
}

impl Phases {
    fn total(&self) -> Duration {
        self.cluster + self.pods + self.policies + self.commit
    }
}

fn build(inputs: Inputs) -> Res<(Engine, Phases)> {
    let t0 = Instant::now();
    let mut engine = Engine::new(Config::default());
    for (name, labels) in inputs.namespaces {
        engine.upsert_namespace(&name, labels)?;
    }
    for n in inputs.nodes {
        engine.upsert_node(n);
    }
    let t1 = Instant::now();
    for p in inputs.pods {
        engine.upsert_pod(p)?;
    }
    let t2 = Instant::now();
    for p in inputs.policies {
        engine.upsert_policy(p)?;
    }
    let t3 = Instant::now();
    engine.commit();
    let t4 = Instant::now();
    Ok((
        engine,
        Phases {
            cluster: t1 - t0,
            pods: t2 - t1,
            policies: t3 - t2,
            commit: t4 - t3,
        },
    ))
}

/// Median and minimum.
#[derive(Debug, Clone, Copy)]
struct Stat {
    median: Duration,
    min: Duration,
    max: Duration,
    n: usize,
}

fn stat(mut v: Vec<Duration>) -> Stat {
    v.sort_unstable();
    Stat {
        median: v.get(v.len() / 2).copied().unwrap_or_default(),
        min: v.first().copied().unwrap_or_default(),
        max: v.last().copied().unwrap_or_default(),
        n: v.len(),
    }
}

fn median_usize(mut v: Vec<usize>) -> usize {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Heap bytes of a `HashMap` with this capacity and slot size (hashbrown: buckets of slots,
/// one control byte per bucket plus a 16-byte group tail).
fn hash_map_bytes(capacity: usize, slot: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 {
        (capacity + 1).next_power_of_two()
    } else {
        (capacity * 8 / 7).next_power_of_two()
    };
    (buckets * slot).next_multiple_of(16) + buckets + 16
}

fn entries_bytes(entries: &Vec<Entry>) -> usize {
    entries.capacity() * size_of::<Entry>()
        + entries
            .iter()
            .map(|e| e.contribs.capacity() * size_of::<Contribution>())
            .sum::<usize>()
}

/// Heap bytes of one table: its `Arc` allocation and everything it owns. L7 rule sets are
/// shared with the policies (`Arc`) and not counted.
fn table_bytes(t: &Table) -> usize {
    let arc = 2 * size_of::<usize>() + size_of::<Table>();
    let deny_by = t.default_deny_by.capacity() * size_of::<u32>();
    let map = hash_map_bytes(t.entries.capacity(), size_of::<(u32, Vec<Entry>)>());
    let entries: usize = t.entries.values().map(entries_bytes).sum();
    let fqdn = t.fqdn.capacity() * size_of::<(FqdnPattern, Vec<Entry>)>()
        + t.fqdn
            .iter()
            .map(|(p, e)| {
                let s = match p {
                    FqdnPattern::MatchName(s) | FqdnPattern::MatchPattern(s) => s.capacity(),
                };
                s + entries_bytes(e)
            })
            .sum::<usize>();
    arc + deny_by + map + entries + fqdn
}

/// Every distinct table (shared tables once), through the public API: (count, heap bytes).
fn all_tables_bytes(engine: &Engine) -> (usize, usize) {
    let mut seen: HashSet<*const Table> = HashSet::new();
    let mut bytes = 0;
    let mut visit = |t: Option<Arc<Table>>| {
        if let Some(t) = t {
            if seen.insert(Arc::as_ptr(&t)) {
                bytes += table_bytes(&t);
            }
        }
    };
    for p in engine.pods() {
        for d in Direction::BOTH {
            visit(engine.pod_table(&p.namespace, &p.name, d));
        }
    }
    for n in engine.nodes() {
        for d in Direction::BOTH {
            visit(engine.node_table(&n.name, d));
        }
    }
    (seen.len(), bytes)
}

/// Table contributions (rule, peer, port) per policy template — the first segment of the
/// generated policy names — and section, largest first, with the number of such policies.
fn breakdown(engine: &Engine) -> Vec<(String, usize, usize)> {
    let template =
        |kind: &str, name: &str| format!("{kind} {}", name.split('.').next().unwrap_or(name));
    let mut policies: BTreeMap<String, usize> = BTreeMap::new();
    for k in engine.policies() {
        *policies
            .entry(template(k.kind.kind(), &k.name))
            .or_default() += 1;
    }
    let mut seen: HashSet<*const Table> = HashSet::new();
    // Contributions per rule first: one lookup per rule, not per contribution.
    let mut per_rule: HashMap<u32, usize> = HashMap::new();
    for p in engine.pods() {
        for d in Direction::BOTH {
            let Some(t) = engine.pod_table(&p.namespace, &p.name, d) else {
                continue;
            };
            if !seen.insert(Arc::as_ptr(&t)) {
                continue;
            }
            let entries = t.entries.values().chain(t.fqdn.iter().map(|(_, e)| e));
            for c in entries.flatten().flat_map(|e| &e.contribs) {
                *per_rule.entry(c.rule).or_default() += 1;
            }
        }
    }
    let mut by: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
    for (rule, n) in per_rule {
        let key = match engine.rule_origin(rule) {
            Some(o) => (template(o.policy.kind.kind(), &o.policy.name), o.section),
            None => ("allow-localhost".to_owned(), ""),
        };
        *by.entry(key).or_default() += n;
    }
    let mut out: Vec<(String, usize, usize)> = by
        .into_iter()
        .map(|((t, section), n)| {
            let count = policies.get(&t).copied().unwrap_or(0);
            (format!("{t} {section}"), n, count)
        })
        .collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

struct Memory {
    /// Most heap held at any point of the build (sampled after every call into the engine).
    peak_build: usize,
    held: usize,
    /// Heap held after namespaces and nodes, pods, policies, commit.
    phases: [usize; 4],
    /// Heap bytes a `PodInfo` owns, on average.
    pod_info: usize,
    tables: usize,
    tables_counted: usize,
    /// The process's peak resident set (`VmHWM`), reset before the build when the kernel allows.
    peak_rss: Option<usize>,
}

/// `VmHWM` of this process, in bytes.
fn peak_rss() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A full build whose inputs are cloned one by one as they go in, so that the heap the engine
/// holds after each phase is exactly what it took. The peak is sampled after every call into
/// the engine: what a single call allocates and frees again (one table's scratch space inside
/// `commit`) is not seen, which is small next to the tables themselves.
fn measure_memory(w: &Workload) -> Res<Memory> {
    // "5" resets the peak resident set size (Linux ≥ 4.0).
    let rss_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let base = ALLOC.allocated();
    let mut peak = 0;
    let mut held = || {
        let h = ALLOC.allocated().saturating_sub(base);
        peak = peak.max(h);
        h
    };
    let mut engine = Engine::new(Config::default());
    for ns in &w.nss {
        engine.upsert_namespace(&ns.name, ns.labels())?;
        held();
    }
    for n in &w.nodes {
        engine.upsert_node(n.clone());
        held();
    }
    let cluster = held();
    // Heap data of the pod records themselves (labels, names, ports), as the engine receives
    // them; measured on a sample that is dropped again.
    let before = ALLOC.allocated();
    let sample: Vec<PodInfo> = w.pods.iter().take(1000).cloned().collect();
    let pod_info = (ALLOC.allocated() - before - sample.capacity() * size_of::<PodInfo>())
        / sample.len().max(1);
    drop(sample);
    for p in &w.pods {
        engine.upsert_pod(p.clone())?;
        held();
    }
    let pods = held();
    for p in &w.policies {
        engine.upsert_policy(p.clone())?;
        held();
    }
    let policies = held();
    engine.commit();
    let total = held();
    let (tables_counted, tables) = all_tables_bytes(&engine);
    drop(engine);
    Ok(Memory {
        peak_build: peak,
        held: total,
        phases: [cluster, pods, policies, total],
        pod_info,
        tables,
        tables_counted,
        peak_rss: if rss_reset { peak_rss() } else { None },
    })
}

struct PodAdd {
    time: Stat,
    rebuilt: usize,
    bytes: usize,
}

/// Adds one pod per round to the built engine (and takes it out again, untimed). `new_identity`
/// gives it a label set no other pod has.
fn pod_adds(engine: &mut Engine, w: &Workload, rounds: usize, new_identity: bool) -> Res<PodAdd> {
    let apps: Vec<(&Ns, &App)> = w
        .nss
        .iter()
        .flat_map(|ns| ns.apps.iter().map(move |a| (ns, a)))
        .collect();
    let step = (apps.len() / rounds.max(1)).max(1);
    let mut times = Vec::new();
    let mut rebuilt = Vec::new();
    let mut bytes = Vec::new();
    for k in 0..rounds {
        let (ns, app) = apps[(k * step + usize::from(new_identity)) % apps.len()];
        let mut app = app.clone();
        if new_identity {
            app.labels
                .insert("version".to_owned(), format!("canary-{k}"));
        }
        let name = format!("{}-bench-{k}", app.name);
        // The pod's own data counts: the engine keeps it.
        let before = ALLOC.allocated();
        let p = pod(ns, &app, name.clone(), pod_ip(1_000_000 + k), k % NODES);
        let t = Instant::now();
        engine.upsert_pod(p)?;
        let keys = engine.commit();
        times.push(t.elapsed());
        bytes.push(
            ALLOC
                .allocated()
                .saturating_sub(before + keys.capacity() * size_of::<TableKey>()),
        );
        rebuilt.push(keys.len());
        drop(keys);
        engine.remove_pod(&ns.name, &name);
        engine.commit();
    }
    Ok(PodAdd {
        time: stat(times),
        rebuilt: median_usize(rebuilt),
        bytes: median_usize(bytes),
    })
}

struct PolicyChange {
    time: Stat,
    rebuilt: usize,
}

/// Replaces policies `indices` (of `w.policies`) by a version with a different port, then
/// puts the original back (untimed).
fn policy_changes(engine: &mut Engine, w: &Workload, indices: &[usize]) -> Res<PolicyChange> {
    let modified: Vec<Value> = indices
        .iter()
        .map(|&i| {
            let mut d = w.docs[i].clone();
            bump_first_port(&mut d);
            d
        })
        .collect();
    let (modified, _, _) = load_and_compile(&modified)?;
    let mut times = Vec::new();
    let mut rebuilt = Vec::new();
    for (&i, m) in indices.iter().zip(modified) {
        let original = w.policies[i].clone();
        let t = Instant::now();
        engine.upsert_policy(m)?;
        let keys = engine.commit();
        times.push(t.elapsed());
        rebuilt.push(keys.len());
        drop(keys);
        engine.upsert_policy(original)?;
        engine.commit();
    }
    Ok(PolicyChange {
        time: stat(times),
        rebuilt: median_usize(rebuilt),
    })
}

/// `rounds` indices in `range` spread evenly, among policies that name a port.
fn spread(w: &Workload, range: std::ops::Range<usize>, rounds: usize) -> Vec<usize> {
    let candidates: Vec<usize> = range
        .filter(|&i| {
            let mut d = w.docs[i].clone();
            bump_first_port(&mut d)
        })
        .collect();
    let step = (candidates.len() / rounds.max(1)).max(1);
    candidates.into_iter().step_by(step).take(rounds).collect()
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Whether a target is met; the targets only apply to the full-size `cargo bench` workload.
fn verdict(ok: bool) -> &'static str {
    let full_size = std::env::args().any(|a| a == "--bench")
        && std::env::var_os("PALISADE_BENCH_NAMESPACES").is_none();
    match (full_size, ok) {
        (false, _) => "n/a (not the benchmark workload)",
        (true, true) => "met",
        (true, false) => "MISSED",
    }
}

fn main() -> Res<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let n_ns = env_usize("PALISADE_BENCH_NAMESPACES").unwrap_or(if bench { 500 } else { 10 });
    let rounds = env_usize("PALISADE_BENCH_ROUNDS").unwrap_or(if bench { 60 } else { 3 });
    let only_full = std::env::var("PALISADE_BENCH_ONLY").is_ok_and(|v| v == "full");
    let n_policies = n_ns * 4;

    // Workload.
    let t = Instant::now();
    let mut rng = Rng(0x5041_4c49_5341_4445); // "PALISADE"
    let nss = namespaces(&mut rng, n_ns);
    let pods = pods(&mut rng, &nss);
    let (nps, cnps, ccnps) = policies(Rng(rng.next()), &nss, n_policies);
    let counts = [nps.len(), cnps.len(), ccnps.len()];
    let docs: Vec<Value> = nps.into_iter().chain(cnps).chain(ccnps).collect();
    let generate = t.elapsed();
    let (policies, parse, compile_time) = load_and_compile(&docs)?;
    let w = Workload {
        nss,
        nodes: nodes(),
        pods,
        policies,
        docs,
        counts,
    };
    println!(
        "workload: {} namespaces, {} pods from {} deployments, {} nodes, {} policies \
         ({} NetworkPolicy, {} CNP, {} CCNP), {} rules",
        w.nss.len(),
        w.pods.len(),
        w.nss.iter().map(|n| n.apps.len()).sum::<usize>(),
        w.nodes.len(),
        w.policies.len(),
        w.counts[0],
        w.counts[1],
        w.counts[2],
        w.policies.iter().map(|p| p.rules.len()).sum::<usize>(),
    );
    println!(
        "setup (not part of resolution): generate {:.1} ms, load_str parse+validate {:.1} ms, \
         compile {:.1} ms",
        ms(generate),
        ms(parse),
        ms(compile_time)
    );

    // Memory first: the allocator's peak only grows.
    let mem = measure_memory(&w)?;

    // Full resolution.
    let reps = env_usize("PALISADE_BENCH_REPS").unwrap_or(if bench { 5 } else { 1 });
    let mut full_times = Vec::new();
    let mut phases = Vec::new();
    let mut engine = None;
    for _ in 0..reps {
        drop(engine.take());
        let inputs = w.inputs();
        let (e, ph) = build(inputs)?;
        full_times.push(ph.total());
        phases.push(ph);
        engine = Some(e);
    }
    let Some(mut engine) = engine else {
        return Err("no repetitions".into());
    };
    let full = stat(full_times);
    let mid = |f: fn(&Phases) -> Duration| stat(phases.iter().map(f).collect()).median;
    let identities = engine.identities().count();
    let (n_tables, n_entries) = engine.table_stats();
    println!(
        "full: median {:.1} ms, min {:.1} ms, max {:.1} ms over {} runs \
         [phases (median): namespaces+nodes {:.1} ms, pods {:.1} ms, policies {:.1} ms, \
         commit {:.1} ms]",
        ms(full.median),
        ms(full.min),
        ms(full.max),
        full.n,
        ms(mid(|p| p.cluster)),
        ms(mid(|p| p.pods)),
        ms(mid(|p| p.policies)),
        ms(mid(|p| p.commit)),
    );
    println!("resolved: {identities} identities, {n_tables} tables, {n_entries} table entries");
    let sources = breakdown(&engine);
    println!(
        "largest sources of table entries ({} contributions by policy template and section):",
        sources.iter().map(|s| s.1).sum::<usize>()
    );
    for (what, n, policies) in sources.iter().take(12) {
        println!("  {n:>9}  {what} (policies: {policies})");
    }
    if mem.tables_counted != n_tables {
        println!(
            "warning: {} tables reachable through the API, engine reports {n_tables}",
            mem.tables_counted
        );
    }

    let (existing, new, np_change, cnp_change) = if only_full {
        (None, None, None, None)
    } else {
        let existing = pod_adds(&mut engine, &w, rounds, false)?;
        let new = pod_adds(&mut engine, &w, rounds, true)?;
        let np_idx = spread(&w, 0..w.counts[0], rounds);
        let cnp_idx = spread(&w, w.counts[0]..w.counts[0] + w.counts[1], rounds);
        let np_change = policy_changes(&mut engine, &w, &np_idx)?;
        let cnp_change = policy_changes(&mut engine, &w, &cnp_idx)?;
        (Some(existing), Some(new), Some(np_change), Some(cnp_change))
    };
    drop(engine);

    let pods_n = w.pods.len();
    let beyond = mem.held.saturating_sub(mem.tables);
    let per_pod = beyond / pods_n.max(1);
    let line = |label: &str, s: &Stat, extra: &str| {
        println!(
            "{label:<34} median {:>9.1} µs   min {:>9.1} µs   max {:>9.1} µs   n={}{extra}",
            us(s.median),
            us(s.min),
            us(s.max),
            s.n
        );
    };

    println!();
    println!("== Policy engine summary ==");
    println!(
        "{:<34} median {:>9.1} ms   min {:>9.1} ms   ({} runs; target ≤ 1000 ms: {})",
        "full resolution",
        ms(full.median),
        ms(full.min),
        full.n,
        verdict(full.median <= Duration::from_secs(1))
    );
    println!(
        "{:<34} {identities} identities, {n_tables} tables, {n_entries} entries",
        "  resolved"
    );
    if let (Some(e), Some(n)) = (&existing, &new) {
        line(
            "pod add, existing identity",
            &e.time,
            &format!(
                "   tables rebuilt {}, +{} B held; target ≤ 1000 µs: {}",
                e.rebuilt,
                e.bytes,
                verdict(e.time.median <= Duration::from_millis(1))
            ),
        );
        line(
            "pod add, new identity",
            &n.time,
            &format!(
                "   tables rebuilt {}, +{} B held; target ≤ 1000 µs: {}",
                n.rebuilt,
                n.bytes,
                verdict(n.time.median <= Duration::from_millis(1))
            ),
        );
    }
    if let (Some(a), Some(b)) = (&np_change, &cnp_change) {
        line(
            "policy change, NetworkPolicy",
            &a.time,
            &format!("   tables rebuilt {}", a.rebuilt),
        );
        line(
            "policy change, CiliumNetworkPolicy",
            &b.time,
            &format!("   tables rebuilt {}", b.rebuilt),
        );
    }
    println!(
        "{:<34} {:.1} MiB heap; process peak RSS {} (workload and allocator slack included)",
        "peak during full build",
        mib(mem.peak_build),
        mem.peak_rss
            .map_or("n/a".to_owned(), |b| format!("{:.1} MiB", mib(b))),
    );
    println!(
        "{:<34} {:.1} MiB held by the engine, {:.1} MiB of it tables ({} B per entry)",
        "engine heap after build",
        mib(mem.held),
        mib(mem.tables),
        mem.tables / n_entries.max(1)
    );
    println!(
        "{:<34} {:.1} MiB = {per_pod} B per pod (target ≤ 2048 B: {})",
        "engine heap beyond the tables",
        mib(beyond),
        verdict(per_pod <= 2048)
    );
    let [cluster, pods_held, policies_held, total] = mem.phases;
    let commit_held = total.saturating_sub(policies_held);
    println!(
        "{:<34} namespaces+nodes {:.1} MiB, pods +{:.1} MiB ({} B per pod, {} B of it the \
         PodInfo's own heap data), policies +{:.1} MiB, commit +{:.1} MiB (tables {:.1} MiB, \
         bookkeeping {:.1} MiB)",
        "  held by phase",
        mib(cluster),
        mib(pods_held.saturating_sub(cluster)),
        pods_held.saturating_sub(cluster) / pods_n.max(1),
        mem.pod_info,
        mib(policies_held.saturating_sub(pods_held)),
        mib(commit_held),
        mib(mem.tables),
        mib(commit_held.saturating_sub(mem.tables)),
    );
    println!(
        "{:<34} {} logical CPUs available, measured on 1 thread",
        "machine",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    let fmt_us = |s: Option<&Stat>| s.map_or("n/a".to_owned(), |s| format!("{:.1}", us(s.median)));
    let policy_worst = match (&np_change, &cnp_change) {
        (Some(a), Some(b)) => Some(if a.time.median >= b.time.median {
            a.time
        } else {
            b.time
        }),
        _ => None,
    };
    println!(
        "engine: full_ms={:.1} pod_add_existing_us={} pod_add_new_us={} policy_change_us={} \
         bytes_per_pod_beyond_tables={per_pod} peak_mb={:.1}",
        ms(full.median),
        fmt_us(existing.as_ref().map(|e| &e.time)),
        fmt_us(new.as_ref().map(|e| &e.time)),
        fmt_us(policy_worst.as_ref()),
        mib(mem.peak_build),
    );
    Ok(())
}
