//! The differential test: every probe of the L3/L4 scenarios gets the same verdict from real
//! packets through the eBPF datapath (`lab run`) as from the policy engine alone (`simulate`).
//! Needs root (it fails saying so, unless `PALISADE_SKIP_PRIVILEGED=1`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("PALISADE_SKIP_PRIVILEGED").is_ok_and(|v| v == "1"),
        "the differential test needs root (network namespaces, eBPF); run it as root, or set \
         PALISADE_SKIP_PRIVILEGED=1 to skip it"
    );
    eprintln!("skipped: not root and PALISADE_SKIP_PRIVILEGED=1");
    false
}

fn workspace() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

fn palisade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .current_dir(workspace())
        .stdin(Stdio::null())
        .output()
        .expect("run palisade")
}

/// Scenarios whose probes the lab can carry (one node, TCP/UDP/ICMP echo, no L7 proxy yet).
fn scenarios() -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let dir = workspace().join("tests/scenarios");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/scenarios")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let wanted = |n: &str| {
        n.starts_with("k8s-")
            || n.starts_with("lab-")
            || n.starts_with("palisade-audit")
            || [
                "cilium-deny-precedence",
                "cilium-empty-rules",
                "cilium-enable-default-deny",
                "cilium-from-requires",
                "cilium-named-port-uppercase",
                "cilium-namespace-keys",
                "cilium-namespace-labels",
                "cilium-same-namespace-default",
                "cilium-self-traffic",
                "cilium-serviceaccount",
                "cilium-specs",
                "cilium-toports",
                "cilium-toports-egress-named-port",
            ]
            .contains(&n)
    };
    for n in names.into_iter().filter(|n| wanted(n)) {
        out.push(vec!["-f".into(), format!("tests/scenarios/{n}")]);
    }
    for step in ["1-no-policy", "2-l3-l4"] {
        out.push(vec![
            "-f".into(),
            "examples/starwars/cluster.yaml".into(),
            "-f".into(),
            format!("examples/starwars/{step}"),
        ]);
    }
    out
}

fn report(args: &[&str]) -> (Option<i32>, Value, String) {
    let out = palisade(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), json, stderr)
}

#[test]
fn privileged_lab_and_simulate_agree_on_every_probe() {
    if !privileged() {
        return;
    }
    let mut probes = 0;
    let mut drops = 0;
    let mut mismatches = Vec::new();
    for files in scenarios() {
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        let mut sim_args = vec!["simulate", "-o", "json"];
        sim_args.extend(&files);
        let mut lab_args = vec!["lab", "run", "-o", "json"];
        lab_args.extend(&files);
        let (sim_code, sim, sim_err) = report(&sim_args);
        let (lab_code, lab, lab_err) = report(&lab_args);
        assert_eq!(sim_code, Some(0), "simulate {files:?}: {sim_err}");
        assert!(
            !lab_err.contains("NOT enforced"),
            "lab run {files:?} must enforce: {lab_err}"
        );
        let sim_results = sim["results"].as_array().expect("simulate results");
        let lab_results = lab["results"].as_array().unwrap_or_else(|| {
            panic!("lab run {files:?} gave no report (exit {lab_code:?}): {lab_err}")
        });
        assert_eq!(sim_results.len(), lab_results.len(), "{files:?}");
        for (s, l) in sim_results.iter().zip(lab_results) {
            probes += 1;
            if s["verdict"] == "drop" {
                drops += 1;
            }
            if s["verdict"] != l["verdict"] {
                mismatches.push(format!(
                    "{files:?}: {} -> {} {}/{}: simulate {} ({}), lab {} ({})",
                    s["from"],
                    s.get("to")
                        .or_else(|| s.get("toIP"))
                        .unwrap_or(&Value::Null),
                    s["port"],
                    s["protocol"],
                    s["verdict"],
                    s["reason"],
                    l["verdict"],
                    l["reason"]
                ));
            }
        }
        assert_eq!(lab_code, Some(0), "lab run {files:?}: {lab_err}");
    }
    assert!(
        mismatches.is_empty(),
        "{} of {probes} probes differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert!(probes > 2000, "only {probes} probes ran");
    assert!(
        drops > 300,
        "only {drops} drops: the scenarios must exercise denial"
    );
    eprintln!("{probes} probes agree ({drops} drops)");
}
