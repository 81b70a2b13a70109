//! Validation against the article fixtures (`testdata/article-policies/`), whose README says,
//! for each manifest, whether the real system accepts it (✅ valid, ⚠️ accepted but broken)
//! or rejects it (❌). `palisade policy validate` must agree for the kinds it supports, reject
//! the other kinds as not supported yet, and locate every error by file, line, column and
//! field. The last tests feed it small broken manifests of each sort.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

fn dir_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn fixtures_dir() -> PathBuf {
    workspace_root().join("testdata/article-policies")
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn context(&self) -> String {
        format!(
            "exit status {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn palisade(args: &[&str], files: &[&Path]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade"));
    cmd.args(args);
    for f in files {
        cmd.arg("-f").arg(f);
    }
    let output = cmd
        .current_dir(workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run palisade: {e}"));
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn validate(files: &[&Path]) -> Outcome {
    palisade(&["policy", "validate"], files)
}

/// A diagnostic line `FILE:LINE:COL: SEVERITY: PATH: MESSAGE`, parsed.
#[derive(Debug)]
struct Diagnostic {
    line: usize,
    column: usize,
    severity: String,
    /// The rest: `PATH: MESSAGE`.
    text: String,
}

/// Diagnostics about `file` on stderr (the file is named as it was passed).
fn diagnostics(stderr: &str, file: &Path) -> Vec<Diagnostic> {
    let prefix = format!("{}:", file.display());
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let mut parts = rest.splitn(4, ':');
            let line = parts.next()?.trim().parse().ok()?;
            let column = parts.next()?.trim().parse().ok()?;
            let severity = parts.next()?.trim().to_owned();
            let text = parts.next()?.trim().to_owned();
            Some(Diagnostic {
                line,
                column,
                severity,
                text,
            })
        })
        .collect()
}

/// The text of `file` at 1-based (line, column).
fn text_at(file: &Path, line: usize, column: usize) -> String {
    let content = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    content
        .lines()
        .nth(line.saturating_sub(1))
        .map(|l| l.chars().skip(column.saturating_sub(1)).collect())
        .unwrap_or_default()
}

/// Asserts a rejection (exit 2) with an error on `file` whose field path starts with `path`,
/// whose text holds every `words`, and whose line:column points at `token` in the file.
fn assert_error(out: &Outcome, file: &Path, path: &str, token: &str, words: &[&str]) {
    assert_eq!(
        out.code,
        Some(2),
        "{} must be rejected with exit 2\n{}",
        file.display(),
        out.context()
    );
    let diags = diagnostics(&out.stderr, file);
    let Some(d) = diags
        .iter()
        .find(|d| d.severity == "error" && d.text.starts_with(path))
    else {
        panic!(
            "no `{}:LINE:COL: error: {path}…` line\n{}",
            file.display(),
            out.context()
        );
    };
    assert!(d.line > 0 && d.column > 0, "{d:?}");
    for w in words {
        assert!(
            out.stderr.contains(w),
            "the error should mention {w:?}\n{}",
            out.context()
        );
    }
    let at = text_at(file, d.line, d.column);
    assert!(
        at.starts_with(token),
        "{}:{}:{} should point at {token:?}, points at {at:?}\n{}",
        file.display(),
        d.line,
        d.column,
        out.context()
    );
}

/// What the README says about one fixture.
#[derive(Debug)]
struct Row {
    file: String,
    kind: String,
    valid: Validity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Validity {
    Valid,
    Broken,
    Invalid,
}

/// The README's file table: `| `file` | kind | source | intent | valid? |`.
fn readme_rows() -> Vec<Row> {
    let readme = fixtures_dir().join("README.md");
    let text = std::fs::read_to_string(&readme)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", readme.display()));
    text.lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let file = cells.get(1).map_or("", |c| c.trim_matches('`')).to_owned();
            let kind = cells.get(2).copied().unwrap_or_default().to_owned();
            let last = cells
                .iter()
                .rev()
                .find(|c| !c.is_empty())
                .copied()
                .unwrap_or_default();
            let valid = if last.starts_with('✅') {
                Validity::Valid
            } else if last.starts_with("⚠️") {
                Validity::Broken
            } else if last.starts_with('❌') {
                Validity::Invalid
            } else {
                panic!("README row for {file} has no ✅/⚠️/❌ verdict: {l}")
            };
            Row { file, kind, valid }
        })
        .collect()
}

/// Kinds Palisade supports, as the README's kind column spells them.
fn supported(kind: &str) -> bool {
    kind.starts_with("networking.k8s.io/v1 NetworkPolicy")
        || kind.starts_with("cilium.io/v2 CiliumNetworkPolicy")
        || kind.starts_with("cilium.io/v2 CiliumClusterwideNetworkPolicy")
}

#[test]
fn readme_lists_every_fixture() {
    let rows = readme_rows();
    assert_eq!(rows.len(), 41, "the README announces 41 files: {rows:#?}");
    let mut on_disk: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap_or_else(|e| panic!("cannot read fixtures: {e}"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| dir_name(&p))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = rows.iter().map(|r| r.file.clone()).collect();
    listed.sort();
    assert_eq!(listed, on_disk, "README table and directory disagree");
    let invalid: Vec<&str> = rows
        .iter()
        .filter(|r| r.valid == Validity::Invalid)
        .map(|r| r.file.as_str())
        .collect();
    assert_eq!(invalid.len(), 6, "the README announces six ❌: {invalid:?}");
}

/// 001-05 is a shell template (`namespace: $ns`): the README calls it ⚠️ (valid once
/// substituted); taken literally the namespace is invalid, and Palisade may say so.
const TEMPLATE: &str = "001-05-default-deny-all.yaml";

#[test]
fn valid_and_broken_fixtures_of_supported_kinds_are_accepted() {
    let mut checked = 0;
    for row in readme_rows() {
        if !supported(&row.kind) || row.valid == Validity::Invalid || row.file == TEMPLATE {
            continue;
        }
        let file = fixtures_dir().join(&row.file);
        let out = validate(&[&file]);
        assert_eq!(
            out.code,
            Some(0),
            "{} is {:?} in the README and must validate\n{}",
            row.file,
            row.valid,
            out.context()
        );
        assert!(
            diagnostics(&out.stderr, &file)
                .iter()
                .all(|d| d.severity != "error"),
            "{}: accepted, yet an error was printed\n{}",
            row.file,
            out.context()
        );
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} fixtures checked");
}

#[test]
fn starwars_fixtures_are_accepted() {
    for name in ["sw_l3_l4_policy.yaml", "sw_l3_l4_l7_policy.yaml"] {
        let file = fixtures_dir().join("starwars").join(name);
        let out = validate(&[&file]);
        assert_eq!(out.code, Some(0), "{name}\n{}", out.context());
    }
}

#[test]
fn shell_template_namespace_is_rejected_with_the_field_named() {
    let file = fixtures_dir().join(TEMPLATE);
    let out = validate(&[&file]);
    assert_error(&out, &file, "metadata.namespace", "$ns", &["$ns"]);
}

#[test]
fn invalid_fixtures_of_supported_kinds_are_rejected_with_the_field_named() {
    // (file, field path, token the position points at, words the message must hold)
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "001-18-allow-mtls-traffic.yaml",
            "spec",
            "ingress",
            &["duplicate", "\"ingress\""],
        ),
        (
            "003-01-encrypt-all.yaml",
            "spec.egress[0].encryption",
            "encryption",
            &["unknown field", "\"encryption\"", "agent configuration"],
        ),
        (
            "003-03-limit-bandwidth.yaml",
            "spec.egress[0].bandwidth",
            "bandwidth",
            &[
                "unknown field",
                "\"bandwidth\"",
                "kubernetes.io/egress-bandwidth",
            ],
        ),
    ];
    let rows = readme_rows();
    let expected: Vec<&str> = rows
        .iter()
        .filter(|r| supported(&r.kind) && r.valid == Validity::Invalid)
        .map(|r| r.file.as_str())
        .collect();
    let covered: Vec<&str> = cases.iter().map(|c| c.0).collect();
    assert_eq!(
        expected, covered,
        "every ❌ fixture of a supported kind needs a case"
    );
    for (name, path, token, words) in cases {
        let file = fixtures_dir().join(name);
        let out = validate(&[&file]);
        assert_error(&out, &file, path, token, words);
    }
}

#[test]
fn fixtures_of_other_kinds_are_not_supported_yet() {
    let mut checked = 0;
    for row in readme_rows() {
        if supported(&row.kind) {
            continue;
        }
        let file = fixtures_dir().join(&row.file);
        let out = validate(&[&file]);
        let fragment = row.kind.starts_with("fragment");
        let want = if fragment {
            "not a Kubernetes object"
        } else {
            "kind not supported yet"
        };
        assert_eq!(out.code, Some(2), "{}\n{}", row.file, out.context());
        let diags = diagnostics(&out.stderr, &file);
        assert!(
            diags
                .iter()
                .any(|d| d.severity == "error" && d.text.contains(want)),
            "{} ({}) should be rejected with {want:?}\n{}",
            row.file,
            row.kind,
            out.context()
        );
        checked += 1;
    }
    // Calico ×4, Istio ×3, audit, Tetragon, and the 002-03 fragment.
    assert_eq!(checked, 10);
}

#[test]
fn serviceaccount_label_typo_is_a_warning_with_a_hint() {
    let file = fixtures_dir().join("003-02-allow-database-access.yaml");
    let out = validate(&[&file]);
    assert_eq!(out.code, Some(0), "{}", out.context());
    let diags = diagnostics(&out.stderr, &file);
    assert!(
        diags.iter().any(
            |d| d.severity == "warning" && d.text.contains("io.kubernetes.serviceaccount.name")
        ),
        "no warning about io.kubernetes.serviceaccount.name\n{}",
        out.context()
    );
    assert!(
        out.stderr
            .lines()
            .any(|l| l.trim_start().starts_with("hint:")
                && l.contains("io.cilium.k8s.policy.serviceaccount")),
        "the hint should name io.cilium.k8s.policy.serviceaccount\n{}",
        out.context()
    );
}

// ---------------------------------------------------------------------------------------------
// Small broken manifests
// ---------------------------------------------------------------------------------------------

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fixtures-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

const GOOD_POLICY: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: good
  namespace: default
spec:
  podSelector: {}
";

const BAD_CIDR: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: bad-cidr
  namespace: default
spec:
  podSelector: {}
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.300/8
";

#[test]
fn a_batch_with_one_bad_file_is_rejected_whole() {
    let dir = scratch("batch");
    write(&dir, "a-good.yaml", GOOD_POLICY);
    let bad = write(&dir, "b-bad.yaml", BAD_CIDR);
    write(
        &dir,
        "c-cluster.yaml",
        "\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
status: {podIP: 10.0.0.10}
---
apiVersion: palisade.dev/v1alpha1
kind: ConnectivityTest
metadata: {name: batch}
spec:
  probes:
  - {from: default/web, to: default/web, port: 80, expect: allow}
",
    );
    let out = validate(&[&dir]);
    assert_error(
        &out,
        &bad,
        "spec.egress[0].to[0].ipBlock.cidr",
        "10.0.0.300/8",
        &["invalid CIDR"],
    );
    assert!(
        !out.stdout.contains("valid"),
        "nothing may be reported valid\n{}",
        out.context()
    );
    // simulate refuses the batch too, and runs nothing.
    let out = palisade(&["simulate", "-o", "json"], &[&dir]);
    assert_eq!(out.code, Some(2), "{}", out.context());
    assert!(
        out.stdout.trim().is_empty(),
        "no report may be printed\n{}",
        out.context()
    );
    assert!(
        !diagnostics(&out.stderr, &bad).is_empty(),
        "{}",
        out.context()
    );
    // Without the bad file the same batch is fine.
    std::fs::remove_file(&bad).unwrap_or_else(|e| panic!("{e}"));
    let out = validate(&[&dir]);
    assert_eq!(out.code, Some(0), "{}", out.context());
    let out = palisade(&["simulate", "-o", "json"], &[&dir]);
    assert_eq!(out.code, Some(0), "{}", out.context());
}

#[test]
fn unknown_field_is_located() {
    let dir = scratch("unknown-field");
    let file = write(
        &dir,
        "p.yaml",
        "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: p
  namespace: default
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: a}
    toPortz:
    - ports:
      - port: \"80\"
",
    );
    let out = validate(&[&file]);
    assert_error(
        &out,
        &file,
        "spec.ingress[0].toPortz",
        "toPortz",
        &["unknown field", "\"toPortz\"", "toPorts"],
    );
}

#[test]
fn unquoted_cilium_port_is_a_type_error_with_a_hint_to_quote() {
    let dir = scratch("wrong-type");
    let file = write(
        &dir,
        "p.yaml",
        "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: p
  namespace: default
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports:
      - port: 80
        protocol: TCP
",
    );
    let out = validate(&[&file]);
    assert_error(
        &out,
        &file,
        "spec.ingress[0].toPorts[0].ports[0].port",
        "80",
        &["expected a string", "port: \"80\""],
    );
    assert!(
        out.stderr
            .lines()
            .any(|l| l.trim_start().starts_with("hint:") && l.contains("\"80\"")),
        "the hint should show the quoted port\n{}",
        out.context()
    );
}

#[test]
fn bad_cidr_is_located() {
    let dir = scratch("bad-cidr");
    let file = write(&dir, "p.yaml", BAD_CIDR);
    let out = validate(&[&file]);
    assert_error(
        &out,
        &file,
        "spec.egress[0].to[0].ipBlock.cidr",
        "10.0.0.300/8",
        &["invalid CIDR", "10.0.0.300/8"],
    );
}

#[test]
fn bad_port_is_located() {
    let dir = scratch("bad-port");
    let file = write(
        &dir,
        "p.yaml",
        "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: p
  namespace: default
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports:
      - port: \"70000\"
        protocol: TCP
",
    );
    let out = validate(&[&file]);
    assert_error(
        &out,
        &file,
        "spec.ingress[0].toPorts[0].ports[0].port",
        "\"70000\"",
        &["invalid port", "70000"],
    );
}

#[test]
fn bad_operator_is_located() {
    let dir = scratch("bad-operator");
    let file = write(
        &dir,
        "p.yaml",
        "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: p
  namespace: default
spec:
  podSelector:
    matchExpressions:
    - key: app
      operator: Equals
      values: [a]
",
    );
    let out = validate(&[&file]);
    assert_error(
        &out,
        &file,
        "spec.podSelector.matchExpressions[0].operator",
        "Equals",
        &["Equals", "In", "NotIn", "Exists", "DoesNotExist"],
    );
}

#[test]
fn duplicate_key_is_located() {
    let dir = scratch("duplicate-key");
    let file = write(
        &dir,
        "p.yaml",
        "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: p
  namespace: default
spec:
  podSelector: {}
  policyTypes: [Ingress]
  podSelector:
    matchLabels: {app: a}
",
    );
    let out = validate(&[&file]);
    assert_error(
        &out,
        &file,
        "spec",
        "podSelector",
        &["duplicate", "\"podSelector\"", "line 7"],
    );
    let diags = diagnostics(&out.stderr, &file);
    assert!(
        diags.iter().any(|d| d.line == 9 && d.column == 3),
        "the duplicate (line 9, column 3) should be the one located: {diags:?}"
    );
}
