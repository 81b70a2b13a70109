//! `palisade observe` end to end: flows from a file (`--from-file`, the fixture
//! `crates/flow/testdata/flows.jsonl`) through every filter and format, following a growing
//! file, and flows from a stand-in agent serving a `FlowRing` on a unix socket.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use palisade_flow::{Flow, FlowRing};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../flow/testdata/flows.jsonl")
}

fn fixture_flows() -> Vec<Flow> {
    std::fs::read_to_string(fixture())
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let v = if v.get("verdict").is_none() {
                v["flow"].clone()
            } else {
                v
            };
            serde_json::from_value(v).unwrap()
        })
        .collect()
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn observe(args: &[&str]) -> Out {
    observe_stdin(args, None)
}

fn observe_stdin(args: &[&str], stdin: Option<&str>) -> Out {
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .arg("observe")
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn from_file(args: &[&str]) -> Out {
    let f = fixture();
    let mut all = vec!["--from-file", f.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = observe(&all);
    assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
    out
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-observe-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Lines of a child's stdout, through a channel, so reads can time out.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(rx: &mpsc::Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(20))
        .expect("a line within 20 s")
}

#[test]
fn compact_is_hubble_like() {
    let out = from_file(&[]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{}", out.stdout);
    assert_eq!(
        lines[0],
        "Nov 22 01:02:03.456: default/tiefighter:41234 (ID:256) -> default/deathstar-1:80 \
         (ID:257) policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN) by CiliumNetworkPolicy \
         default/rule1 ingress[0]"
    );
    assert_eq!(
        lines[1],
        "Nov 22 01:02:04.000: default/xwing:51000 (ID:258) -> default/deathstar-1:80 (ID:257) \
         Policy denied INGRESS DROPPED (TCP Flags: SYN)"
    );
    assert_eq!(
        lines[2],
        "Nov 22 01:02:05.000: default/tiefighter:41300 (ID:256) -> 192.0.2.10:443 (world-ipv4) \
         Policy denied by denylist EGRESS DROPPED (TCP Flags: SYN) by CiliumNetworkPolicy \
         default/no-world egressDeny[0]"
    );
    assert!(lines[4].ends_with("policy-verdict:none INGRESS AUDITED (ICMPv4 EchoRequest)"));
    assert!(!out.stdout.contains('\x1b'), "no colour off a terminal");
}

#[test]
fn json_lines_round_trip() {
    let out = from_file(&["-o", "json"]);
    let flows: Vec<Flow> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(flows, fixture_flows());
    // What -o json prints, --from-file reads back.
    let dir = temp_dir("json");
    let copy = dir.join("out.jsonl");
    std::fs::write(&copy, &out.stdout).unwrap();
    let again = observe(&["--from-file", copy.to_str().unwrap(), "-o", "json"]);
    assert_eq!(again.stdout, out.stdout);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn table_has_aligned_columns() {
    let out = from_file(&["-o", "table"]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{}", out.stdout);
    assert!(lines[0].starts_with("TIMESTAMP"));
    let col = lines[0].find("VERDICT").unwrap();
    for l in &lines[1..] {
        let v = &l[col..];
        assert!(
            ["FORWARDED", "DROPPED", "AUDIT"]
                .iter()
                .any(|w| v.starts_with(w)),
            "{l}"
        );
    }
}

#[test]
fn every_filter() {
    // (flags, how many of the six fixture flows match)
    let cases: &[(&[&str], usize)] = &[
        (&[], 6),
        (&["--verdict", "DROPPED"], 2),
        (&["--verdict", "dropped", "--verdict", "AUDIT"], 3),
        (&["--verdict", "FORWARDED"], 3),
        (&["-n", "kube-system"], 1),
        (&["--namespace", "default"], 6),
        (
            &[
                "--from-namespace",
                "default",
                "--to-namespace",
                "kube-system",
            ],
            1,
        ),
        (&["--pod", "deathstar"], 4),
        (&["--pod", "kube-system/coredns"], 1),
        (&["--pod", "coredns"], 0),
        (&["--pod", "coredns", "-n", "kube-system"], 1),
        (&["--from-pod", "xwing"], 2),
        (&["--to-pod", "default/deathstar-1"], 4),
        (&["--from-pod", "tiefighter", "--to-pod", "deathstar"], 2),
        (&["--label", "org=alliance"], 2),
        (&["-l", "k8s:class=tiefighter,org=empire"], 4),
        (
            &[
                "--from-label",
                "class=tiefighter",
                "--to-label",
                "reserved:world",
            ],
            1,
        ),
        (&["--to-label", "k8s-app=kube-dns"], 1),
        (&["--to-label", "org notin (empire)"], 2),
        (&["--protocol", "tcp"], 4),
        (&["--protocol", "udp"], 1),
        (&["--protocol", "icmp"], 1),
        (&["--port", "53"], 1),
        (&["--port", "80"], 2),
        (&["--port", "41234"], 1),
        (&["--to-port", "8080"], 1),
        (&["--from-port", "80"], 0),
        (&["--type", "drop"], 2),
        (&["-t", "policy-verdict"], 4),
        (&["--type", "trace"], 0),
        (&["--ip", "192.0.2.0/24"], 1),
        (&["--from-ip", "10.0.0.3"], 2),
        (&["--ip", "fd00::2"], 1),
        (&["--to-identity", "world-ipv4"], 1),
        (&["--identity", "300"], 1),
        (&["--traffic-direction", "egress"], 3),
        (&["--since", "2026-11-22T01:02:06Z"], 3),
        (&["--until", "2026-11-22T01:02:04Z"], 1),
        (
            &[
                "--since",
                "2026-11-22T02:02:05+01:00",
                "--until",
                "2026-11-22T01:02:07Z",
            ],
            2,
        ),
        (&["--since", "100000d"], 6),
        (&["--until", "100000d"], 0),
        (&["--last", "2"], 2),
        (&["--last", "0"], 0),
        (
            &["--verdict", "DROPPED", "--protocol", "tcp", "--port", "443"],
            1,
        ),
    ];
    for (flags, want) in cases {
        let out = from_file(&[&["-o", "json"], *flags].concat());
        let got = out.stdout.lines().count();
        assert_eq!(got, *want, "{flags:?}:\n{}", out.stdout);
    }
    // --last keeps the newest.
    let out = from_file(&["--last", "2", "-o", "json"]);
    let flows: Vec<Flow> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(flows, fixture_flows()[4..].to_vec());
}

#[test]
fn bad_arguments_and_input_are_errors() {
    let f = fixture();
    let f = f.to_str().unwrap();
    for (args, message) in [
        (
            vec!["--from-file", f, "--verdict", "ALLOWED"],
            "--verdict: unknown verdict",
        ),
        (
            vec!["--from-file", f, "--since", "yesterday"],
            "--since: expected a duration",
        ),
        (
            vec!["--from-file", f, "--label", "a in b"],
            "--label: invalid label requirement",
        ),
        (
            vec!["--from-file", f, "--port", "http"],
            "--port: not a port number",
        ),
        (
            vec!["--from-file", "/nonexistent/flows.jsonl"],
            "reading /nonexistent/flows.jsonl",
        ),
    ] {
        let out = observe(&args);
        assert_eq!(out.code, Some(2), "{args:?}");
        assert!(out.stderr.contains(message), "{args:?}: {}", out.stderr);
    }
    let dir = temp_dir("bad");
    let bad = dir.join("bad.jsonl");
    let good = std::fs::read_to_string(fixture()).unwrap();
    std::fs::write(&bad, format!("{good}{{\"verdict\": 3}}\n")).unwrap();
    let out = observe(&["--from-file", bad.to_str().unwrap()]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("bad.jsonl:8: not a flow"),
        "{}",
        out.stderr
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn reads_standard_input() {
    let text = std::fs::read_to_string(fixture()).unwrap();
    let out = observe_stdin(&["--from-file", "-", "--verdict", "AUDIT"], Some(&text));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 1);
    // A last line without a newline still counts.
    let out = observe_stdin(&["--from-file", "-"], Some(text.trim_end()));
    assert_eq!(out.stdout.lines().count(), 6, "{}", out.stderr);
}

#[test]
fn follows_a_growing_file() {
    let dir = temp_dir("follow");
    let path = dir.join("flows.jsonl");
    std::fs::copy(fixture(), &path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["observe", "--from-file", path.to_str().unwrap(), "--follow"])
        .args(["--verdict", "DROPPED", "--last", "1", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut child);
    let first: Flow = serde_json::from_str(&next_line(&rx)).unwrap();
    assert_eq!(
        first,
        fixture_flows()[2],
        "--last 1 of the matching flows first"
    );

    let mut dropped = fixture_flows()[1].clone();
    dropped.source.pod_name = "xwing-2".to_owned();
    let mut forwarded = fixture_flows()[0].clone();
    forwarded.source.pod_name = "not-shown".to_owned();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    // A line written in two parts is read whole.
    let line = serde_json::to_string(&dropped).unwrap();
    let (a, b) = line.split_at(40);
    writeln!(f, "{}", serde_json::to_string(&forwarded).unwrap()).unwrap();
    f.write_all(a.as_bytes()).unwrap();
    f.flush().unwrap();
    thread::sleep(Duration::from_millis(500));
    writeln!(f, "{b}").unwrap();
    f.flush().unwrap();
    let next: Flow = serde_json::from_str(&next_line(&rx)).unwrap();
    assert_eq!(next.source.pod_name, "xwing-2");
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A stand-in for the agent: a `FlowRing` served on a unix socket.
struct FakeAgent {
    ring: Arc<FlowRing>,
    socket: PathBuf,
    dir: PathBuf,
}

impl FakeAgent {
    fn start(name: &str) -> FakeAgent {
        let dir = temp_dir(name);
        let socket = dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let ring = Arc::new(FlowRing::new(100));
        ring.extend(fixture_flows());
        let served = ring.clone();
        thread::spawn(move || {
            let stop = Arc::new(AtomicBool::new(false));
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let ring = served.clone();
                let stop = stop.clone();
                thread::spawn(move || {
                    let _ = palisade_flow::handle_connection(&ring, &conn, &stop);
                });
            }
        });
        FakeAgent { ring, socket, dir }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.ring.close();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn flows_from_the_agent() {
    let agent = FakeAgent::start("agent");
    let sock = agent.socket.to_str().unwrap();
    let out = observe(&["--socket", sock, "--verdict", "DROPPED", "-o", "json"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let flows: Vec<Flow> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        flows,
        vec![fixture_flows()[1].clone(), fixture_flows()[2].clone()]
    );

    let out = observe(&["--socket", sock, "--last", "1"]);
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stderr);
    let out = observe(&[
        "--socket",
        sock,
        "--since",
        "2026-11-22T01:02:06Z",
        "-o",
        "table",
    ]);
    assert_eq!(out.stdout.lines().count(), 4, "{}", out.stdout);
    let out = observe(&["--socket", sock]);
    assert_eq!(
        out.stdout.lines().count(),
        6,
        "the default --last 20 shows all six"
    );

    // Following: new matching flows as the agent gets them.
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args([
            "observe",
            "--socket",
            sock,
            "--follow",
            "--to-pod",
            "default/deathstar",
        ])
        .args(["-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut child);
    // Only flows pushed after the client's request was served show: push until one does.
    let mut other = fixture_flows()[3].clone();
    other.source.pod_name = "ignored".to_owned();
    let mut wanted = fixture_flows()[0].clone();
    wanted.source.pod_name = "followed".to_owned();
    let mut line = None;
    for _ in 0..100 {
        agent.ring.extend([other.clone(), wanted.clone()]);
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            line = Some(l);
            break;
        }
    }
    let line = line.expect("a followed flow");
    let got: Flow = serde_json::from_str(&line).unwrap();
    assert_eq!(got.source.pod_name, "followed");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn no_agent_is_a_clear_error() {
    let out = observe(&["--socket", "/nonexistent/agent.sock"]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr
            .contains("no agent socket at /nonexistent/agent.sock: is `palisade agent` running?"),
        "{}",
        out.stderr
    );
}
