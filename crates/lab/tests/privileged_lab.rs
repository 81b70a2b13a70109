//! Privileged tests: real network namespaces, veth pairs, servers and packets. They need root;
//! without it they fail with a message saying so, unless `PALISADE_SKIP_PRIVILEGED=1`.
//!
//! No policy is enforced in the lab yet (the datapath is not plugged in), so every scenario here
//! expects what the network carries: allowed where a server answers, dropped where none does.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use palisade_lab::{netns, probe, state, Lab, LabOptions, LabSpec, NoEnforcement, ProbeOptions};
use palisade_policy::cluster;
use palisade_policy::simulate::ProbeResult;
use palisade_policy::Config;
use palisade_policy_api::scenario::Expectation;
use palisade_policy_api::Bundle;

/// True when the test may run; panics (fails) without root unless skipping is asked for.
fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("PALISADE_SKIP_PRIVILEGED").is_ok_and(|v| v == "1"),
        "privileged lab tests need root (network namespaces, veth pairs); run them as root, \
         or set PALISADE_SKIP_PRIVILEGED=1 to skip them"
    );
    eprintln!("skipped: not root and PALISADE_SKIP_PRIVILEGED=1");
    false
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn starwars_bundle() -> Bundle {
    let root = workspace().join("examples/starwars");
    palisade_policy_api::load_paths(&[root.join("cluster.yaml"), root.join("1-no-policy")])
        .unwrap_or_else(|d| panic!("{d:?}"))
}

fn inline_bundle(yaml: &str) -> Bundle {
    palisade_policy_api::load_str("inline.yaml", yaml).unwrap_or_else(|d| panic!("{d:?}"))
}

/// Builds the lab for a bundle, runs its probes, and hands back the results and the lab id
/// (the lab is gone when this returns).
fn run_lab(bundle: &Bundle) -> (Vec<ProbeResult>, String) {
    let loaded = cluster::load(bundle, Config::default()).unwrap_or_else(|d| panic!("{d:?}"));
    let spec = LabSpec::new(bundle, &loaded.engine, &loaded.tests).expect("spec");
    let probes =
        probe::plan(&loaded.engine, &loaded.tests, &spec).unwrap_or_else(|d| panic!("{d:?}"));
    let lab = Lab::create(&spec, &LabOptions::default()).expect("lab");
    lab.attach(&mut NoEnforcement, &loaded.engine)
        .expect("enforcer");
    let results = probe::run(&lab, &probes, &ProbeOptions::default());
    let id = lab.id().to_owned();
    lab.destroy().expect("destroy");
    for r in &results {
        let to = r.to.as_deref().or(r.to_ip.as_deref()).unwrap_or("-");
        eprintln!(
            "{} -> {to} {}: {}: {}",
            r.from,
            r.protocol,
            r.verdict.as_str(),
            r.reason
        );
    }
    (results, id)
}

fn leftovers(id: &str) -> Vec<String> {
    let prefix = format!("pal-{id}-");
    netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

fn assert_all_pass(results: &[ProbeResult]) {
    let failed: Vec<_> = results.iter().filter(|r| r.pass != Some(true)).collect();
    assert!(failed.is_empty(), "failing probes: {failed:#?}");
}

#[test]
fn privileged_starwars_no_policy_all_allowed() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let (results, id) = run_lab(&starwars_bundle());
    eprintln!("starwars lab: {:?}", started.elapsed());
    assert_eq!(results.len(), 3);
    assert_all_pass(&results);
    for r in &results {
        assert_eq!(r.verdict, Expectation::Allow);
        assert!(r.reason.contains("200 OK"), "{}", r.reason);
    }
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));
}

const UDP_ICMP: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: kube-system, labels: {app: dns}}
spec:
  containers:
  - name: main
    ports:
    - {containerPort: 53, protocol: UDP, name: dns}
    - {containerPort: 53, protocol: TCP, name: dns-tcp}
status: {podIP: 10.0.2.53}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec:
  containers:
  - name: main
    ports:
    - {containerPort: 8080, protocol: TCP}
status: {podIP: 10.0.3.7}
---
apiVersion: v1
kind: Pod
metadata: {name: agent, namespace: kube-system}
spec:
  hostNetwork: true
  containers:
  - name: main
    ports: [{containerPort: 9090, protocol: TCP}]
status: {podIP: 192.168.77.1}
---
apiVersion: v1
kind: Node
metadata: {name: worker}
status:
  addresses: [{type: InternalIP, address: 192.168.77.1}]
---
apiVersion: palisade.dev/v1alpha1
kind: ConnectivityTest
metadata: {name: udp-icmp}
spec:
  externalHosts:
  - name: api
    ip: 10.66.0.5
    ports: [{port: 443, protocol: TCP}, {port: 5353, protocol: UDP}]
  probes:
  - {from: default/client, to: kube-system/dns, port: 53, protocol: UDP, expect: allow}
  - {from: default/client, to: kube-system/dns, port: dns, protocol: UDP, expect: allow}
  - {from: default/client, to: kube-system/dns, port: 54, protocol: UDP, expect: allow}
  - {from: default/client, to: kube-system/dns, protocol: ICMP, expect: allow}
  - {from: default/client, to: kube-system/dns, port: 53, expect: allow}
  - {from: default/client, to: kube-system/dns, port: 54, expect: allow}
  - {from: kube-system/dns, to: default/client, port: 8080, http: {method: GET, path: /x}, expect: allow}
  - {from: default/client, to: external/api, port: 443, expect: allow}
  - {from: default/client, to: external/api, port: 5353, protocol: UDP, expect: allow}
  - {from: default/client, toIP: 10.66.0.5, protocol: ICMP, icmp: {type: 8}, expect: allow}
  - {from: external/api, to: default/client, port: 8080, expect: allow}
  - {from: external/api, to: default/client, protocol: ICMP, expect: allow}
  - {from: node/worker, to: default/client, protocol: ICMP, expect: allow}
  - {from: default/client, to: node/worker, protocol: ICMP, expect: allow}
  - {from: default/client, to: default/client, port: 8080, expect: allow}
  - {from: default/client, to: kube-system/agent, port: 9090, expect: allow}
  - {from: kube-system/agent, to: default/client, port: 8080, http: {path: /}, expect: allow}
  - {from: external/api, to: node/worker, port: 9090, expect: allow}
";

#[test]
fn privileged_udp_and_icmp_probes() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let (results, id) = run_lab(&inline_bundle(UDP_ICMP));
    eprintln!("udp/icmp lab: {:?}", started.elapsed());
    assert_eq!(results.len(), 18);
    assert_all_pass(&results);
    // Port 54 is declared nowhere: the lab serves every probed port all the same.
    assert!(
        results[2].reason.contains("UDP echo"),
        "{}",
        results[2].reason
    );
    assert!(
        results[5].reason.contains("TCP handshake"),
        "{}",
        results[5].reason
    );
    assert!(
        results[3].reason.contains("echo reply"),
        "{}",
        results[3].reason
    );
    assert!(leftovers(&id).is_empty());
}

const IPV6: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: default}
spec:
  containers:
  - name: main
    ports: [{containerPort: 80, protocol: TCP}, {containerPort: 80, protocol: UDP}]
status: {podIP: 'fd00:10::a'}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: default}
status: {podIP: 'fd00:10::b'}
---
apiVersion: palisade.dev/v1alpha1
kind: ConnectivityTest
metadata: {name: v6}
spec:
  probes:
  - {from: default/b, to: default/a, port: 80, expect: allow}
  - {from: default/b, to: default/a, port: 80, http: {path: /}, expect: allow}
  - {from: default/b, to: default/a, port: 80, protocol: UDP, expect: allow}
  - {from: default/b, to: default/a, protocol: ICMP, expect: allow}
  - {from: default/a, to: node/node-1, protocol: ICMP, expect: allow}
";

#[test]
fn privileged_with_netns_returns_to_the_original_namespace() {
    if !privileged() {
        return;
    }
    let bundle = starwars_bundle();
    let loaded = cluster::load(&bundle, Config::default()).expect("load");
    let spec = LabSpec::new(&bundle, &loaded.engine, &loaded.tests).expect("spec");
    let lab = Lab::create(&spec, &LabOptions::default()).expect("lab");
    let ns_of_thread = || std::fs::read_link("/proc/thread-self/ns/net").expect("ns link");
    let before = ns_of_thread();
    let pod = lab.pod("default", "xwing").expect("xwing").clone();
    let inside = netns::with_netns(&pod.node_netns, || {
        let devices = std::fs::read_to_string("/proc/thread-self/net/dev").expect("net/dev");
        (ns_of_thread(), devices)
    })
    .expect("with_netns");
    assert!(inside.1.contains(&pod.host_ifname), "{}", inside.1);
    assert_ne!(inside.0, before);
    assert_eq!(ns_of_thread(), before);
    // run_in: a thread of its own, the caller never moves.
    let addrs = netns::run_in(&pod.netns, || {
        Command::new("ip")
            .args(["-o", "-4", "addr"])
            .output()
            .expect("ip")
    })
    .expect("run_in");
    assert!(String::from_utf8_lossy(&addrs.stdout).contains("10.0.1.21/32"));
    assert_eq!(ns_of_thread(), before);
}

#[test]
fn privileged_ipv6_pods() {
    if !privileged() {
        return;
    }
    let (results, id) = run_lab(&inline_bundle(IPV6));
    assert_all_pass(&results);
    assert!(
        results[3].reason.contains("ICMPv6"),
        "{}",
        results[3].reason
    );
    assert!(leftovers(&id).is_empty());
}

#[test]
fn privileged_two_labs_at_once_do_not_collide() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_lab(&starwars_bundle()));
        let b = s.spawn(|| run_lab(&starwars_bundle()));
        (a.join(), b.join())
    });
    let ((ra, ida), (rb, idb)) = (a.expect("lab a"), b.expect("lab b"));
    eprintln!("two labs: {:?}", started.elapsed());
    assert_ne!(ida, idb);
    assert_all_pass(&ra);
    assert_all_pass(&rb);
    assert!(leftovers(&ida).is_empty() && leftovers(&idb).is_empty());
}

#[test]
fn privileged_two_labs_alive_side_by_side() {
    if !privileged() {
        return;
    }
    // Same pods, same addresses, same interface names: each in its own namespaces.
    let bundle = starwars_bundle();
    let loaded = cluster::load(&bundle, Config::default()).expect("load");
    let spec = LabSpec::new(&bundle, &loaded.engine, &loaded.tests).expect("spec");
    let one = Lab::create(&spec, &LabOptions::default()).expect("lab one");
    let two = Lab::create(&spec, &LabOptions::default()).expect("lab two");
    assert_ne!(one.id(), two.id());
    let names_one: BTreeSet<_> = one.netns().iter().collect();
    assert!(two.netns().iter().all(|n| !names_one.contains(n)));
    assert_eq!(one.pods()[0].host_ifname, two.pods()[0].host_ifname);
    for lab in [&one, &two] {
        for p in lab.pods() {
            assert!(p.host_ifname.len() <= 15);
            assert!(p.host_ifindex > 0);
            assert_eq!(p.node_netns, lab.node().netns);
            assert!(netns::exists(&p.netns));
        }
        let state_file = state::state_file(&state::state_dir(), lab.id());
        let st = state::read(&state_file).expect("state file");
        assert!(st.ready && st.alive());
        assert_eq!(
            st.netns_for("default/xwing").as_deref(),
            lab.pod("default", "xwing").map(|p| p.netns.as_str())
        );
    }
    let (id1, id2) = (one.id().to_owned(), two.id().to_owned());
    drop(one);
    assert!(leftovers(&id1).is_empty());
    assert!(
        !leftovers(&id2).is_empty(),
        "dropping one lab must not touch the other"
    );
    drop(two);
    assert!(leftovers(&id2).is_empty());
    assert!(!state::state_file(&state::state_dir(), &id2).exists());
}

#[test]
fn privileged_nothing_remains_after_drop_or_panic() {
    if !privileged() {
        return;
    }
    let bundle = starwars_bundle();
    let loaded = cluster::load(&bundle, Config::default()).expect("load");
    let spec = LabSpec::new(&bundle, &loaded.engine, &loaded.tests).expect("spec");

    // Plain drop.
    let lab = Lab::create(&spec, &LabOptions::default()).expect("lab");
    let id = lab.id().to_owned();
    assert_eq!(leftovers(&id).len(), 5, "node + 4 pods");
    drop(lab);
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));

    // A panic inside the lab's scope.
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::create(&spec, &LabOptions::default()).expect("lab");
        tx.send(lab.id().to_owned()).expect("send");
        panic!("boom inside the lab");
    }));
    assert!(outcome.is_err());
    let id = rx.recv().expect("id");
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));
    assert!(!state::state_file(&state::state_dir(), &id).exists());
}

fn root_snapshot() -> String {
    let mut out = String::new();
    for args in [
        &["-o", "link"][..],
        &["-o", "addr"],
        &["route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
        &["rule"],
    ] {
        let o = Command::new("ip").args(args).output().expect("ip");
        let _ = write!(
            out,
            "$ ip {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout)
        );
    }
    for key in [
        "net/ipv4/ip_forward",
        "net/ipv6/conf/all/forwarding",
        "net/ipv4/ping_group_range",
    ] {
        let v = std::fs::read_to_string(Path::new("/proc/sys").join(key)).unwrap_or_default();
        let _ = write!(out, "{key} = {v}");
    }
    if let Ok(o) = Command::new("nft").args(["list", "ruleset"]).output() {
        out.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    out
}

#[test]
fn privileged_root_namespace_untouched() {
    if !privileged() {
        return;
    }
    let before = root_snapshot();
    let (results, _) = run_lab(&inline_bundle(UDP_ICMP));
    assert_all_pass(&results);
    let (results, _) = run_lab(&starwars_bundle());
    assert_all_pass(&results);
    let after = root_snapshot();
    // Address lifetimes count down on their own; compare without them.
    let strip = |s: &str| -> String {
        s.lines()
            .map(|l| {
                let mut words = Vec::new();
                let mut it = l.split_whitespace();
                while let Some(w) = it.next() {
                    if w == "valid_lft" || w == "preferred_lft" {
                        it.next();
                    } else {
                        words.push(w);
                    }
                }
                words.join(" ")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&before), strip(&after));
}
