//! Scenario tests: every directory under `tests/scenarios/` holds a cluster, its policies and a
//! ConnectivityTest whose probes all carry `expect`. Each is judged by the built `palisade`
//! binary (`simulate -f <dir> -o json`), as a user would run it in CI. The Star Wars example
//! steps are judged the same way.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// Scenarios the test plan requires; the directory may hold more.
const REQUIRED: &[&str] = &[
    "k8s-e2e-deny-all-ingress",
    "k8s-e2e-allow-same-ns",
    "k8s-e2e-namespace-selector",
    "k8s-e2e-pod-and-ns-selector",
    "k8s-e2e-ns-or-pod",
    "k8s-e2e-named-port",
    "k8s-e2e-port-range-endport",
    "k8s-e2e-egress-deny-all",
    "k8s-e2e-policytypes-egress-only-ignores-ingress-rules",
    "k8s-e2e-udp",
    "k8s-e2e-multiple-policies-union",
    "k8s-e2e-matchexpressions",
    "cilium-same-namespace-default",
    "cilium-namespace-keys",
    "cilium-namespace-labels",
    "cilium-serviceaccount",
    "cilium-ccnp-empty-endpoints",
    "cilium-from-requires",
    "cilium-entities",
    "cilium-cidr",
    "cilium-toports",
    "cilium-icmp",
    "cilium-enable-default-deny",
    "cilium-deny-precedence",
    "cilium-specs",
    "cilium-host-policy",
    "cilium-http-l7",
    "cilium-kafka",
    "cilium-self-traffic",
    "cilium-empty-rules",
];

fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

/// One `palisade simulate -o json` run.
struct Run {
    /// What was run, for messages.
    label: String,
    code: Option<i32>,
    stderr: String,
    /// The parsed report, or why there is none.
    report: Result<Value, String>,
}

fn simulate(label: &str, inputs: &[PathBuf]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade"));
    cmd.arg("simulate");
    for input in inputs {
        cmd.arg("-f").arg(input);
    }
    cmd.args(["-o", "json"]).current_dir(workspace_root());
    let output = match cmd.output() {
        Ok(o) => o,
        Err(e) => {
            return Run {
                label: label.to_owned(),
                code: None,
                stderr: String::new(),
                report: Err(format!("cannot run palisade: {e}")),
            }
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    Run {
        label: label.to_owned(),
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        report: serde_json::from_str(&stdout)
            .map_err(|e| format!("stdout is not a JSON report ({e}): {stdout:?}")),
    }
}

fn scenario_dirs() -> Vec<PathBuf> {
    let root = workspace_root().join("tests/scenarios");
    let entries =
        std::fs::read_dir(&root).unwrap_or_else(|e| panic!("cannot read {}: {e}", root.display()));
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn dir_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Every scenario, run once and shared by the tests below.
fn scenario_runs() -> &'static [Run] {
    static RUNS: OnceLock<Vec<Run>> = OnceLock::new();
    RUNS.get_or_init(|| {
        scenario_dirs()
            .iter()
            .map(|d| simulate(&dir_name(d), std::slice::from_ref(d)))
            .collect()
    })
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// One line naming a probe: from, to, port/protocol and its L7 request.
fn describe_probe(r: &Value) -> String {
    let to = ["to", "toIP", "toFQDN"]
        .iter()
        .find_map(|k| r.get(*k).map(text))
        .unwrap_or_default();
    let mut s = format!("{} -> {to}", text(&r["from"]));
    match r.get("port") {
        Some(p) => {
            let _ = write!(s, " {}/{}", text(p), text(&r["protocol"]));
        }
        None => {
            let _ = write!(s, " {}", text(&r["protocol"]));
        }
    }
    for key in ["icmp", "http", "kafka", "dns"] {
        if let Some(v) = r.get(key) {
            let _ = write!(s, " {key} {v}");
        }
    }
    s
}

/// Everything wrong with one run, one problem a line; empty when it passed.
fn problems(run: &Run) -> Vec<String> {
    let mut out = Vec::new();
    if run.code != Some(0) {
        out.push(format!("exit status {:?} (want 0)", run.code));
        let stderr = run.stderr.trim();
        if !stderr.is_empty() {
            out.push(format!(
                "stderr:\n      {}",
                stderr.replace('\n', "\n      ")
            ));
        }
    }
    let report = match &run.report {
        Ok(r) => r,
        Err(e) => {
            out.push(e.clone());
            return out;
        }
    };
    let results = report["results"].as_array().map_or(&[][..], Vec::as_slice);
    if results.is_empty() {
        out.push("the report has no probe results".to_owned());
    }
    for (i, r) in results.iter().enumerate() {
        if r.get("expect").is_none() {
            out.push(format!(
                "probe #{i} {} has no `expect` (every probe must be checked)",
                describe_probe(r)
            ));
        } else if r["pass"] != Value::Bool(true) {
            out.push(format!(
                "probe #{i} {}: expected {}, got {} ({})",
                describe_probe(r),
                text(&r["expect"]),
                text(&r["verdict"]),
                text(&r["reason"])
            ));
        }
    }
    let summary = &report["summary"];
    if summary["failed"].as_u64() != Some(0) {
        out.push(format!("summary.failed is {} (want 0)", summary["failed"]));
    }
    if summary["passed"].as_u64() != Some(results.len() as u64) {
        out.push(format!(
            "summary.passed is {} but there are {} results",
            summary["passed"],
            results.len()
        ));
    }
    out
}

fn report_failures(runs: &[&Run]) {
    let mut message = String::new();
    let mut failed = 0;
    for run in runs {
        let p = problems(run);
        if p.is_empty() {
            continue;
        }
        failed += 1;
        let _ = writeln!(message, "\n{}:", run.label);
        for line in p {
            let _ = writeln!(message, "  - {line}");
        }
    }
    assert!(
        failed == 0,
        "{failed} of {} run(s) failed:{message}",
        runs.len()
    );
}

#[test]
fn the_required_scenarios_exist() {
    let names: Vec<String> = scenario_dirs().iter().map(|d| dir_name(d)).collect();
    let missing: Vec<&&str> = REQUIRED
        .iter()
        .filter(|r| !names.iter().any(|n| n == **r))
        .collect();
    assert!(
        missing.is_empty(),
        "missing scenario directories: {missing:?}"
    );
    for d in scenario_dirs() {
        let has_yaml = std::fs::read_dir(&d).is_ok_and(|entries| {
            entries.filter_map(Result::ok).any(|e| {
                e.path()
                    .extension()
                    .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
            })
        });
        assert!(has_yaml, "{} holds no manifest", d.display());
    }
}

#[test]
fn every_scenario_passes() {
    let runs: Vec<&Run> = scenario_runs().iter().collect();
    assert!(!runs.is_empty(), "no scenario under tests/scenarios");
    report_failures(&runs);
}

#[test]
fn every_scenario_has_probes() {
    for run in scenario_runs() {
        let count = match &run.report {
            Ok(r) => r["results"].as_array().map_or(0, Vec::len),
            Err(e) => panic!(
                "{}: no probe was judged: {e}\n{}",
                run.label,
                run.stderr.trim()
            ),
        };
        assert!(
            count > 0,
            "{}: the ConnectivityTest has no probe",
            run.label
        );
    }
}

#[test]
fn scenarios_expect_every_verdict() {
    // Tally what the scenarios expect, whatever the engine answered: a suite of scenarios
    // that never expects a drop (or an L7 denial) could not catch an engine that allows all.
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    let mut observed: BTreeMap<String, usize> = BTreeMap::new();
    for run in scenario_runs() {
        let Ok(report) = &run.report else { continue };
        for r in report["results"].as_array().into_iter().flatten() {
            *expected.entry(text(&r["expect"])).or_default() += 1;
            *observed.entry(text(&r["verdict"])).or_default() += 1;
        }
    }
    for verdict in ["allow", "drop", "l7-deny"] {
        assert!(
            expected.get(verdict).copied().unwrap_or(0) > 0,
            "no scenario expects `{verdict}`: {expected:?}"
        );
        assert!(
            observed.get(verdict).copied().unwrap_or(0) > 0,
            "no scenario produced `{verdict}`: {observed:?}"
        );
    }
}

#[test]
fn starwars_example_steps_pass() {
    let root = workspace_root().join("examples/starwars");
    let cluster = root.join("cluster.yaml");
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", root.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    steps.sort();
    let names: Vec<String> = steps.iter().map(|s| dir_name(s)).collect();
    for want in ["1-no-policy", "2-l3-l4", "3-l7"] {
        assert!(
            names.iter().any(|n| n == want),
            "examples/starwars/{want} is missing (found {names:?})"
        );
    }
    let runs: Vec<Run> = steps
        .iter()
        .map(|step| {
            simulate(
                &format!("examples/starwars/{}", dir_name(step)),
                &[cluster.clone(), step.clone()],
            )
        })
        .collect();
    report_failures(&runs.iter().collect::<Vec<_>>());
}
