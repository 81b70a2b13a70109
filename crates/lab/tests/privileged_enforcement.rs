//! Enforcement with real packets while policy changes: continuous probing must see zero wrong
//! verdicts (traffic allowed before and after a change is never dropped in between, traffic
//! denied before and after never passes), including while a table grows past 16,384 entries.
//! Needs root (fails saying so, unless `PALISADE_SKIP_PRIVILEGED=1`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_agent::sync::AuditConfig;
use palisade_lab::{netns, DatapathEnforcer, Enforcer, Lab, LabOptions, LabSpec};
use palisade_policy::{cluster, compile, Config};
use palisade_policy_api::{load_str, Object};

fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("PALISADE_SKIP_PRIVILEGED").is_ok_and(|v| v == "1"),
        "privileged enforcement tests need root (network namespaces, eBPF); run them as root, \
         or set PALISADE_SKIP_PRIVILEGED=1 to skip them"
    );
    false
}

const CLUSTER: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: app}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: app, labels: {role: server}}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
status: {podIP: 10.77.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: good, namespace: app, labels: {role: good}}
status: {podIP: 10.77.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: bad, namespace: app, labels: {role: bad}}
status: {podIP: 10.77.0.12}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server, namespace: app}
spec:
  endpointSelector: {matchLabels: {role: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: good}}]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
";

/// A policy letting `bad` reach the server on 17,000 other ports: the server's ingress table
/// grows past 16,384 entries, port 80 stays closed to `bad`.
fn big_policy() -> String {
    let mut s = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: big, namespace: app}\n\
         spec:\n  endpointSelector: {matchLabels: {role: server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {role: bad}}]\n    toPorts:\n",
    );
    let mut port = 1000u32;
    for _ in 0..425 {
        s.push_str("    - ports:\n");
        for _ in 0..40 {
            writeln!(s, "      - {{port: '{port}', protocol: TCP}}").unwrap();
            port += 1;
        }
    }
    s
}

fn deny_policy() -> &'static str {
    r"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-bad, namespace: app}
spec:
  endpointSelector: {matchLabels: {role: server}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {role: bad}}]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
"
}

fn compiled(yaml: &str) -> palisade_policy::model::CompiledPolicy {
    let bundle = load_str("policy.yaml", yaml).unwrap_or_else(|d| panic!("{d:?}"));
    match &bundle.manifests[0].object {
        Object::CiliumNetworkPolicy(p) => compile::cilium_policy(p, false).expect("compile"),
        other => panic!("unexpected {other:?}"),
    }
}

fn connects(netns_name: &str, to: SocketAddr) -> bool {
    netns::run_in(netns_name, move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(300)).is_ok()
    })
    .unwrap_or(false)
}

#[test]
fn privileged_policy_changes_under_continuous_probing() {
    if !privileged() {
        return;
    }
    let bundle = load_str("cluster.yaml", CLUSTER).unwrap_or_else(|d| panic!("{d:?}"));
    let mut loaded = cluster::load(&bundle, Config::default()).unwrap_or_else(|d| panic!("{d:?}"));
    let spec = LabSpec::new(&bundle, &loaded.engine, &loaded.tests).expect("spec");
    let lab = Lab::create(&spec, &LabOptions::default()).expect("lab");
    let pin_dir = std::path::PathBuf::from(format!("/sys/fs/bpf/palisade-test-{}", lab.id()));
    let node = lab.node().clone();
    let mut enforcer = DatapathEnforcer::open(
        &pin_dir,
        &node.name,
        &node.netns,
        &node.generated,
        AuditConfig::default(),
    )
    .expect("datapath");
    lab.attach(&mut enforcer, &loaded.engine).expect("attach");

    let server: SocketAddr = "10.77.0.10:80".parse().unwrap();
    let good_ns = lab.pod("app", "good").expect("good").netns.clone();
    let bad_ns = lab.pod("app", "bad").expect("bad").netns.clone();
    assert!(
        connects(&good_ns, server),
        "good must reach the server before any change"
    );
    assert!(
        !connects(&bad_ns, server),
        "bad must not reach the server before any change"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicUsize::new(0));
    let wrong = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let prober = {
        let (stop, probes, wrong) = (stop.clone(), probes.clone(), wrong.clone());
        let (good_ns, bad_ns) = (good_ns.clone(), bad_ns.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let ok = connects(&good_ns, server);
                let leaked = connects(&bad_ns, server);
                probes.fetch_add(2, Ordering::Relaxed);
                let mut w = wrong.lock().unwrap();
                if !ok {
                    w.push(format!("{:?}: good was dropped", started.elapsed()));
                }
                if leaked {
                    w.push(format!("{:?}: bad got through", started.elapsed()));
                }
            }
        })
    };

    let big = compiled(&big_policy());
    let deny = compiled(deny_policy());
    let mut largest = 0usize;
    for round in 0..3 {
        for step in 0..4 {
            match step {
                0 => loaded.engine.upsert_policy(big.clone()).expect("big"),
                1 => loaded.engine.upsert_policy(deny.clone()).expect("deny"),
                2 => {
                    loaded.engine.remove_policy(&big.key);
                }
                _ => {
                    loaded.engine.remove_policy(&deny.key);
                }
            }
            loaded.engine.commit();
            enforcer.sync(&loaded.engine).expect("sync");
            if step == 0 {
                let id = enforcer
                    .endpoint_id("app", "server")
                    .expect("server endpoint");
                let dp = enforcer.datapath().expect("datapath");
                let rows = dp
                    .read_table(id, palisade_datapath::Direction::Ingress)
                    .ok()
                    .flatten()
                    .map_or(0, |t| t.len());
                largest = largest.max(rows);
            }
            eprintln!("round {round} step {step} applied");
            std::thread::sleep(Duration::from_millis(400));
        }
    }
    stop.store(true, Ordering::Relaxed);
    prober.join().unwrap();
    drop(enforcer);
    lab.destroy().expect("destroy");

    let wrong = wrong.lock().unwrap();
    let probes = probes.load(Ordering::Relaxed);
    eprintln!(
        "{probes} probes, {} wrong, largest table {largest} rows",
        wrong.len()
    );
    assert!(probes >= 20, "only {probes} probes ran");
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));
    assert!(
        largest > 16_384,
        "the server's table reached only {largest} rows"
    );
}

const SPOOF_CLUSTER: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: app}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: app, labels: {role: server}}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
status: {podIP: 10.79.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {role: client}}
status: {podIP: 10.79.0.11}
";

/// Connects from `netns_name` to `to`, binding the source address `from`.
fn connects_from(netns_name: &str, from: std::net::IpAddr, to: SocketAddr) -> bool {
    netns::run_in(netns_name, move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::new(from, 0).into())
            .expect("bind the extra address");
        socket
            .connect_timeout(&to.into(), Duration::from_millis(500))
            .is_ok()
    })
    .unwrap_or(false)
}

#[test]
fn privileged_spoofed_source_is_dropped() {
    if !privileged() {
        return;
    }
    let bundle = load_str("cluster.yaml", SPOOF_CLUSTER).unwrap_or_else(|d| panic!("{d:?}"));
    let loaded = cluster::load(&bundle, Config::default()).unwrap_or_else(|d| panic!("{d:?}"));
    let spec = LabSpec::new(&bundle, &loaded.engine, &loaded.tests).expect("spec");
    let lab = Lab::create(&spec, &LabOptions::default()).expect("lab");
    let pin_dir = std::path::PathBuf::from(format!("/sys/fs/bpf/palisade-test-{}", lab.id()));
    let node = lab.node().clone();
    let mut enforcer = DatapathEnforcer::open(
        &pin_dir,
        &node.name,
        &node.netns,
        &node.generated,
        AuditConfig::default(),
    )
    .expect("datapath");
    lab.attach(&mut enforcer, &loaded.engine).expect("attach");

    let server: SocketAddr = "10.79.0.10:80".parse().unwrap();
    let client_ns = lab.pod("app", "client").expect("client").netns.clone();
    // No policy: the pod's own address gets through.
    assert!(connects_from(
        &client_ns,
        "10.79.0.11".parse().unwrap(),
        server
    ));
    // An address the pod does not own (added to its interface by hand) is dropped at the veth,
    // even though no policy applies.
    let status = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &client_ns,
            "ip",
            "addr",
            "add",
            "10.79.0.99/32",
            "dev",
            "eth0",
        ])
        .status()
        .expect("ip");
    assert!(status.success());
    let spoofed_before = enforcer
        .datapath()
        .expect("datapath")
        .metrics()
        .expect("metrics")
        .get(
            palisade_datapath::abi::PAL_REASON_SPOOFED,
            palisade_datapath::Direction::Egress,
        )
        .packets;
    assert!(
        !connects_from(&client_ns, "10.79.0.99".parse().unwrap(), server),
        "a spoofed source got through"
    );
    let spoofed_after = enforcer
        .datapath()
        .expect("datapath")
        .metrics()
        .expect("metrics")
        .get(
            palisade_datapath::abi::PAL_REASON_SPOOFED,
            palisade_datapath::Direction::Egress,
        )
        .packets;
    assert!(
        spoofed_after > spoofed_before,
        "no SPOOFED drop was counted"
    );
    // The real address still works.
    assert!(connects_from(
        &client_ns,
        "10.79.0.11".parse().unwrap(),
        server
    ));
    drop(enforcer);
    lab.destroy().expect("destroy");
}
