//! `palisade lab` as a user runs it: `lab run` against `simulate` on the same input, `lab up`
//! / `exec` / `down`, Ctrl-C, and a lab whose process was killed. Tests named `privileged_`
//! need root (they fail saying so, unless `PALISADE_SKIP_PRIVILEGED=1`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What a lab left behind: its namespaces, and its pinned datapath (maps outlive processes).
fn leftovers(id: &str) -> Vec<String> {
    let prefix = format!("pal-{id}-");
    let mut left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    let pins = format!("/sys/fs/bpf/palisade-lab-{id}");
    if Path::new(&pins).exists() {
        left.push(pins);
    }
    left
}

/// The id in a "lab ID is up: …" line.
fn lab_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| Some(l.strip_prefix("lab ")?.split_once(" is up")?.0.to_owned()))
        .unwrap_or_else(|| panic!("no 'lab ID is up' line in:\n{stdout}"))
}

const STARWARS_1: [&str; 4] = [
    "-f",
    "examples/starwars/cluster.yaml",
    "-f",
    "examples/starwars/1-no-policy",
];

/// A result without its reason (the lab's reasons say what the packets did).
fn strip_reasons(mut report: Value) -> Value {
    if let Some(results) = report.get_mut("results").and_then(Value::as_array_mut) {
        for r in results {
            if let Some(o) = r.as_object_mut() {
                o.remove("reason");
            }
        }
    }
    report
}

#[test]
fn privileged_lab_run_reports_like_simulate() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let mut args = vec!["lab", "run"];
    args.extend(STARWARS_1);
    args.extend(["-o", "json"]);
    let lab = palisade(&args);
    eprintln!("lab run (star wars 1): {:?}", started.elapsed());
    let mut args = vec!["simulate"];
    args.extend(STARWARS_1);
    args.extend(["-o", "json"]);
    let sim = palisade(&args);
    assert_eq!(lab.status.code(), Some(0), "{}", text(&lab.stderr));
    assert_eq!(sim.status.code(), Some(0));
    assert!(
        !text(&lab.stderr).contains("policy is NOT enforced"),
        "the lab enforces with the datapath by default: {}",
        text(&lab.stderr)
    );
    let lab_report: Value = serde_json::from_slice(&lab.stdout).expect("lab json");
    let sim_report: Value = serde_json::from_slice(&sim.stdout).expect("simulate json");
    assert_eq!(strip_reasons(lab_report), strip_reasons(sim_report));

    // The table has the same shape too.
    let mut args = vec!["lab", "run"];
    args.extend(STARWARS_1);
    let table = palisade(&args);
    assert_eq!(table.status.code(), Some(0));
    let out = text(&table.stdout);
    assert!(out.starts_with("FROM "), "{out}");
    assert!(out.contains("3 passed, 0 failed, 0 unchecked"), "{out}");
}

#[test]
fn privileged_lab_run_flows_after_the_report() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let out = palisade(&[
        "lab",
        "run",
        "--flows",
        "-f",
        "examples/starwars/cluster.yaml",
        "-f",
        "examples/starwars/2-l3-l4",
    ]);
    eprintln!("lab run --flows (star wars 2): {:?}", started.elapsed());
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let (report, flows) = stdout
        .split_once("\n\nFlows:\n")
        .unwrap_or_else(|| panic!("a blank line and `Flows:` after the report:\n{stdout}"));
    assert!(report.contains("8 passed, 0 failed"), "{report}");
    let lines: Vec<&str> = flows.lines().collect();
    let has = |from: &str, to: &str, what: &str| {
        lines
            .iter()
            .any(|l| l.contains(from) && l.contains(to) && l.contains(what))
    };
    assert!(
        has(
            "default/tiefighter:",
            "-> default/deathstar-1:80 ",
            "policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN) by CiliumNetworkPolicy \
             default/rule1 ingress[0]"
        ),
        "{flows}"
    );
    assert!(
        has(
            "default/xwing:",
            "-> default/deathstar-1:80 ",
            "Policy denied INGRESS DROPPED (TCP Flags: SYN)"
        ),
        "{flows}"
    );
    assert!(
        has(
            "default/tiefighter:",
            "-> default/deathstar-1:80 ",
            "Policy denied INGRESS DROPPED (UDP)"
        ),
        "{flows}"
    );
    // Flows come from the probes: the pods' own IPv6 chatter is only counted.
    assert!(
        lines
            .iter()
            .filter(|l| !l.starts_with('('))
            .all(|l| l.contains(": default/")),
        "{flows}"
    );
    // JSON reports stay JSON.
    let out = palisade(&[
        "lab",
        "run",
        "--flows",
        "-o",
        "json",
        "-f",
        "examples/starwars/cluster.yaml",
        "-f",
        "examples/starwars/2-l3-l4",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("-o table"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn privileged_lab_run_without_enforcement_fails_drop_expectations() {
    if !privileged() {
        return;
    }
    // Step 2 of the demo expects drops; with `--no-enforce` the lab lets them through, warns,
    // and says so with exit status 1.
    let out = palisade(&[
        "lab",
        "run",
        "--no-enforce",
        "-f",
        "examples/starwars/cluster.yaml",
        "-f",
        "examples/starwars/2-l3-l4",
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("policy is NOT enforced"));
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    for r in report["results"].as_array().expect("results") {
        assert_eq!(r["verdict"], "allow", "{r}");
        assert_eq!(r["pass"], r["expect"] == "allow", "{r}");
    }
}

#[test]
fn lab_run_input_errors_exit_2_before_anything_is_built() {
    // Needs no root: probes are planned before the lab is built.
    let dir = std::env::temp_dir().join(format!("palisade-lab-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let file = dir.join("dns.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: default}\n\
         status: {podIP: 10.0.1.1}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: kube-dns, namespace: kube-system}\n\
         status: {podIP: 10.0.1.53}\n---\n\
         apiVersion: palisade.dev/v1alpha1\nkind: ConnectivityTest\nmetadata: {name: t}\n\
         spec:\n  probes:\n  - {from: default/a, to: kube-system/kube-dns, port: 53, \
         protocol: UDP, dns: {name: example.com}, expect: allow}\n",
    )
    .expect("write");
    let out = palisade(&["lab", "run", "-f", file.to_str().expect("utf-8")]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("spec.probes[0].dns"), "{err}");
    assert!(err.contains("not supported in the lab"), "{err}");
    assert!(err.contains("nothing was run"), "{err}");
    assert!(out.stdout.is_empty());

    let out = palisade(&["lab", "run", "-f", "no/such/file.yaml"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn privileged_lab_up_exec_down() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let mut args = vec!["lab", "up"];
    args.extend(STARWARS_1);
    let up = palisade(&args);
    eprintln!("lab up: {:?}", started.elapsed());
    assert_eq!(up.status.code(), Some(0), "{}", text(&up.stderr));
    let stdout = text(&up.stdout);
    let id = lab_id(&stdout);
    assert!(stdout.contains("default/xwing"), "{stdout}");
    assert_eq!(leftovers(&id).len(), 6, "node + 4 pods + the datapath pins");

    let addr = palisade(&[
        "lab",
        "exec",
        "--lab",
        &id,
        "default/xwing",
        "--",
        "ip",
        "-o",
        "-4",
        "addr",
    ]);
    assert_eq!(addr.status.code(), Some(0), "{}", text(&addr.stderr));
    assert!(
        text(&addr.stdout).contains("10.0.1.21/32"),
        "{}",
        text(&addr.stdout)
    );

    // A real HTTP exchange from inside xwing to deathstar-1's built-in server.
    let http = palisade(&[
        "lab",
        "exec",
        "--lab",
        &id,
        "default/xwing",
        "--",
        "bash",
        "-c",
        "exec 3<>/dev/tcp/10.0.1.10/80; printf 'GET /ping HTTP/1.1\\r\\nHost: d\\r\\n\\r\\n' >&3; cat <&3",
    ]);
    assert!(
        text(&http.stdout).starts_with("HTTP/1.1 200 OK"),
        "{}{}",
        text(&http.stdout),
        text(&http.stderr)
    );

    let code = palisade(&[
        "lab",
        "exec",
        "--lab",
        &id,
        "node/node-1",
        "--",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(
        code.status.code(),
        Some(7),
        "the command's exit status passes through"
    );

    let missing = palisade(&["lab", "exec", "--lab", &id, "default/nope", "--", "true"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr).contains("default/xwing"));

    let down = palisade(&["lab", "down", &id]);
    assert_eq!(down.status.code(), Some(0), "{}", text(&down.stderr));
    assert!(text(&down.stdout).contains(&format!("lab {id} removed")));
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));
    assert!(!Path::new(&format!("/run/palisade/lab/{id}.json")).exists());
    assert!(!Path::new(&format!("/run/palisade/lab/{id}.log")).exists());
}

/// Starts `lab up --foreground` and waits for its "is up" line; returns the child and lab id.
fn foreground_lab() -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["lab", "up", "--foreground"])
        .args(STARWARS_1)
        .current_dir(workspace())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(" is up") {
            // Keep reading the rest in the background so the child never blocks on a pipe.
            std::thread::spawn(move || for _ in lines {});
            return (child, lab_id(&seen));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("lab up --foreground never came up:\n{seen}");
}

fn pid(child: &std::process::Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).expect("pid"))
}

#[test]
fn privileged_ctrl_c_removes_the_lab() {
    if !privileged() {
        return;
    }
    let (mut child, id) = foreground_lab();
    assert_eq!(leftovers(&id).len(), 6, "node + 4 pods + the datapath pins");
    kill(pid(&child), Signal::SIGINT).expect("SIGINT");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130));
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));
    assert!(!Path::new(&format!("/run/palisade/lab/{id}.json")).exists());
}

#[test]
fn privileged_lab_down_removes_a_killed_lab() {
    if !privileged() {
        return;
    }
    let (mut child, id) = foreground_lab();
    // SIGKILL: no handler runs, everything stays behind.
    kill(pid(&child), Signal::SIGKILL).expect("SIGKILL");
    let _ = child.wait();
    assert_eq!(leftovers(&id).len(), 6, "node + 4 pods + the datapath pins");
    let list = palisade(&["lab", "list"]);
    assert!(
        text(&list.stdout).contains("stale"),
        "{}",
        text(&list.stdout)
    );
    let down = palisade(&["lab", "down", &id]);
    assert_eq!(down.status.code(), Some(0), "{}", text(&down.stderr));
    assert!(
        text(&down.stdout).contains("its process was gone"),
        "{}",
        text(&down.stdout)
    );
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));
}
