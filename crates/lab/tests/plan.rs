//! Lab planning without root: what the lab builds for an input, and which probes it refuses
//! (as located input errors, before anything is created).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::IpAddr;

use palisade_lab::{probe, LabSpec, ServerPort, Transport};
use palisade_policy::cluster;
use palisade_policy::Config;
use palisade_policy_api::Bundle;

const CLUSTER: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  containers:
  - name: main
    ports: [{containerPort: 80, name: http}, {containerPort: 53, protocol: UDP}, {containerPort: 9, protocol: SCTP}]
status: {podIP: 10.0.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
status: {podIP: 10.0.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: agent, namespace: kube-system}
spec:
  hostNetwork: true
  containers:
  - name: main
    ports: [{containerPort: 9090}]
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
";

fn bundle(test: &str) -> Bundle {
    palisade_policy_api::load_str("input.yaml", &format!("{CLUSTER}---\n{test}"))
        .unwrap_or_else(|d| panic!("{d:?}"))
}

/// The plan's error messages with their field paths.
fn plan_errors(test: &str) -> Vec<String> {
    let b = bundle(test);
    let loaded = cluster::load(&b, Config::default()).unwrap_or_else(|d| panic!("{d:?}"));
    let spec = LabSpec::new(&b, &loaded.engine, &loaded.tests).expect("spec");
    match probe::plan(&loaded.engine, &loaded.tests, &spec) {
        Ok(_) => Vec::new(),
        Err(diags) => diags
            .iter()
            .map(|d| format!("{}: {}", d.path, d.message))
            .collect(),
    }
}

fn test_doc(probes: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: ConnectivityTest\nmetadata: {{name: t}}\n\
         spec:\n  externalHosts: [{{name: api, ip: 192.0.2.10, ports: [{{port: 443}}]}}]\n  \
         probes:\n{probes}"
    )
}

fn tcp(port: u16) -> ServerPort {
    ServerPort {
        transport: Transport::Tcp,
        port,
    }
}

#[test]
fn spec_serves_declared_and_probed_ports() {
    let b = bundle(&test_doc(
        "  - {from: default/client, to: default/web, port: 8080}\n  \
         - {from: default/client, to: node/n1, port: 22}\n  \
         - {from: default/client, to: external/api, port: 80}\n  \
         - {from: default/web, toIP: 10.0.1.11, port: 7, protocol: UDP}\n",
    ));
    let loaded = cluster::load(&b, Config::default()).expect("load");
    let spec = LabSpec::new(&b, &loaded.engine, &loaded.tests).expect("spec");
    assert_eq!(spec.pods.len(), 2, "the host-network pod lives in the node");
    let web = spec.pods.iter().find(|p| p.name == "web").expect("web");
    assert_eq!(
        web.ports,
        vec![
            tcp(80),
            tcp(8080),
            ServerPort {
                transport: Transport::Udp,
                port: 53
            }
        ],
        "SCTP is not served"
    );
    let client = spec
        .pods
        .iter()
        .find(|p| p.name == "client")
        .expect("client");
    assert_eq!(
        client.ports,
        vec![ServerPort {
            transport: Transport::Udp,
            port: 7
        }]
    );
    assert_eq!(spec.node.ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
    assert!(spec.node.generated.is_empty());
    assert_eq!(spec.node.ports, vec![tcp(22), tcp(9090)]);
    assert_eq!(spec.host_pods.len(), 1);
    assert_eq!(spec.externals[0].ports, vec![tcp(80), tcp(443)]);
}

#[test]
fn node_without_address_gets_a_generated_one() {
    let b = palisade_policy_api::load_str(
        "x.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 192.168.255.254}\n",
    )
    .expect("load");
    let loaded = cluster::load(&b, Config::default()).expect("load");
    let spec = LabSpec::new(&b, &loaded.engine, &loaded.tests).expect("spec");
    assert_eq!(spec.node.name, "node-1");
    assert_eq!(spec.node.generated.len(), 1);
    assert_ne!(
        spec.node.ips[0],
        "192.168.255.254".parse::<IpAddr>().unwrap(),
        "a generated address never takes a pod's"
    );
}

#[test]
fn supported_probes_plan_cleanly() {
    let errors = plan_errors(&test_doc(
        "  - {from: default/client, to: default/web, port: http, http: {path: /}}\n  \
         - {from: default/client, to: default/web, port: 53, protocol: UDP}\n  \
         - {from: default/client, to: default/web, protocol: ICMP, icmp: {type: 8}}\n  \
         - {from: external/api, to: kube-system/agent, port: 9090}\n  \
         - {from: default/client, toIP: 192.0.2.10, port: 443}\n",
    ));
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn unsupported_probes_are_input_errors() {
    let errors = plan_errors(&test_doc(
        "  - {from: default/client, to: default/web, port: 53, protocol: UDP, dns: {name: x.example}}\n  \
         - {from: default/client, to: default/web, port: 9092, kafka: {role: produce, topic: t}}\n  \
         - {from: default/client, toFQDN: api.example.com, port: 443}\n  \
         - {from: default/client, to: default/web, protocol: ICMP, icmp: {type: 13}}\n  \
         - {from: default/client, toIP: 203.0.113.9, port: 443}\n ",
    ));
    // The toFQDN probe fails the simulator's own planning first (no cluster DNS): the same
    // error `simulate` gives.
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("spec.probes[2].toFQDN"), "{errors:?}");

    let errors = plan_errors(&test_doc(
        "  - {from: default/client, to: default/web, port: 53, protocol: UDP, dns: {name: x.example}}\n  \
         - {from: default/client, to: default/web, port: 9092, kafka: {role: produce, topic: t}}\n  \
         - {from: default/client, to: default/web, protocol: ICMP, icmp: {type: 13}}\n  \
         - {from: default/client, toIP: 203.0.113.9, port: 443}\n ",
    ));
    let paths: Vec<&str> = errors
        .iter()
        .map(|e| e.split(':').next().unwrap_or(""))
        .collect();
    assert_eq!(
        paths,
        [
            "spec.probes[0].dns",
            "spec.probes[1].kafka",
            "spec.probes[2].icmp",
            "spec.probes[3].toIP",
        ],
        "{errors:?}"
    );
    assert!(errors[0].contains("not supported in the lab"), "{errors:?}");
}

#[test]
fn several_nodes_are_refused() {
    let b = palisade_policy_api::load_str(
        "x.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {name: b}\n",
    )
    .expect("load");
    let loaded = cluster::load(&b, Config::default()).expect("load");
    let err = LabSpec::new(&b, &loaded.engine, &loaded.tests).expect_err("two nodes");
    assert!(err.to_string().contains("single node"), "{err}");
}
