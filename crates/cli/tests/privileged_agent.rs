//! `palisade agent` end to end: the agent runs as a child process (temp state directory,
//! temp socket, its own bpffs pin directory), pods are built by the lab crate (a network
//! namespace each behind a node namespace) and attached through the API, and real TCP
//! connections check what the kernel enforces: policy applied over the API, a `kill -9` with
//! a connection open, restart reconciliation, the three audit modes, the root-only socket, and
//! a bad batch rejected whole. Tests named `privileged_` need root (they fail saying so,
//! unless `PALISADE_SKIP_PRIVILEGED=1`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use palisade_lab::{Lab, LabOptions, LabSpec};
use palisade_policy::{cluster, Config};

fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("PALISADE_SKIP_PRIVILEGED").is_ok_and(|v| v == "1"),
        "privileged agent tests need root (eBPF, network namespaces); run them as root, or set \
         PALISADE_SKIP_PRIVILEGED=1 to skip them"
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const CLUSTER: &str = "examples/starwars/cluster.yaml";
const POLICY: &str = "examples/starwars/2-l3-l4/sw_l3_l4_policy.yaml";
/// The lab's node when the input declares none.
const NODE: &str = "node-1";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The agent as a child process, with everything it creates in temporary places.
struct AgentProc {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pin_dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl AgentProc {
    fn new() -> AgentProc {
        let dir = tempfile::Builder::new()
            .prefix("palisade-agent-test-")
            .tempdir()
            .expect("tempdir");
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/palisade-agent-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let socket = dir.path().join("run").join("agent.sock");
        let log = dir.path().join("agent.log");
        AgentProc {
            child: None,
            dir,
            pin_dir,
            socket,
            log,
        }
    }

    fn started(args: &[&str]) -> AgentProc {
        let mut a = AgentProc::new();
        a.start(args);
        a
    }

    /// Starts the agent and waits until it answers `status`.
    fn start(&mut self, args: &[&str]) -> Duration {
        assert!(self.child.is_none(), "the agent is already running");
        let started = Instant::now();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_palisade"))
            .arg("agent")
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--bpf-pin-dir")
            .arg(&self.pin_dir)
            .args(["--node-name", NODE])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn the agent");
        self.child = Some(child);
        loop {
            let out = self.cli(&["status", "-o", "json"]);
            if out.status.success() {
                return started.elapsed();
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("the agent exited ({status}):\n{}", self.log_text());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the agent did not come up:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&mut self, signal: Signal) {
        let mut child = self.child.take().expect("running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        kill(pid, signal).expect("kill");
        child.wait().expect("wait");
    }

    fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
    }

    fn restart(&mut self, args: &[&str]) -> Duration {
        self.kill9();
        self.start(args)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .current_dir(workspace())
            .stdin(Stdio::null())
            .output()
            .expect("run palisade")
    }

    /// Runs a command that must succeed; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "palisade {args:?}: {}\n{}\nagent log:\n{}",
            out.status,
            text(&out.stderr),
            self.log_text()
        );
        text(&out.stdout)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&args)).expect("json")
    }

    fn status(&self) -> Value {
        self.json(&["status"])
    }

    /// Applies, returning the agent's apply→enforced time in ms.
    fn apply(&self, file: &str) -> f64 {
        let report = self.json(&["apply", "-f", file]);
        report["enforcedMs"].as_f64().unwrap_or(0.0)
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Removing the pins releases the maps and links (the programs detach).
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

/// The Star Wars pods in network namespaces (no enforcement of the lab's own).
fn starwars_lab() -> Lab {
    let bundle = palisade_policy_api::load_paths(&[workspace().join(CLUSTER)]).expect("cluster");
    let loaded = cluster::load(&bundle, Config::default()).expect("engine");
    let spec = LabSpec::new(&bundle, &loaded.engine, &[]).expect("spec");
    assert_eq!(spec.node.name, NODE);
    Lab::create(&spec, &LabOptions::default()).expect("lab")
}

/// Applies the cluster and attaches every pod of the lab.
fn attach_all(agent: &AgentProc, lab: &Lab) {
    agent.apply(CLUSTER);
    for p in lab.pods() {
        agent.ok(&[
            "endpoint",
            "attach",
            &format!("{}/{}", p.namespace, p.name),
            "--ifname",
            &p.host_ifname,
            "--netns",
            &p.node_netns,
        ]);
    }
    let eps = agent.json(&["get", "endpoints"]);
    let eps = eps.as_array().expect("endpoints");
    assert_eq!(eps.len(), 4, "{eps:?}");
    for e in eps {
        assert_eq!(e["state"], "ready", "{e}");
    }
}

/// A TCP connection from one pod to another's port 80, made in the source pod's namespace.
fn connect(lab: &Lab, from: &str, to: &str) -> io::Result<TcpStream> {
    let src = lab.pod("default", from).expect("from");
    let dst = lab.pod("default", to).expect("to");
    let addr = SocketAddr::new(dst.ip, 80);
    palisade_lab::netns::run_in(&src.netns, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(1500))
    })
    .expect("netns")
}

/// Sends a line and reads it back (the lab's servers echo).
fn echo(s: &mut TcpStream, line: &str) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(line.as_bytes())?;
    let mut back = vec![0u8; line.len()];
    s.read_exact(&mut back)?;
    assert_eq!(back, line.as_bytes());
    Ok(())
}

/// Whether a new connection gets through (and echoes); a drop shows as a connect timeout.
fn reachable(lab: &Lab, from: &str, to: &str) -> bool {
    match connect(lab, from, to) {
        Ok(mut s) => {
            echo(&mut s, "ping\n").expect("an accepted connection echoes");
            true
        }
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ),
                "{from} -> {to}: a policy drop times out, got {e}"
            );
            false
        }
    }
}

fn reconcile(agent: &AgentProc) -> Value {
    agent.status()["startup"]["reconcile"].clone()
}

/// A copy of the L3/L4 policy with the audit annotation.
fn audited_policy(dir: &Path) -> String {
    let policy = fs::read_to_string(workspace().join(POLICY)).expect("policy");
    let audited = policy.replace(
        "  name: rule1\n",
        "  name: rule1\n  annotations:\n    palisade.dev/audit: \"true\"\n",
    );
    assert_ne!(audited, policy);
    let path = dir.join("rule1-audit.yaml");
    fs::write(&path, audited).expect("write");
    path.display().to_string()
}

#[test]
fn privileged_agent_enforces_policy_applied_over_the_api() {
    if !privileged() {
        return;
    }
    let t = Instant::now();
    let agent = AgentProc::started(&[]);
    let lab = starwars_lab();
    attach_all(&agent, &lab);
    eprintln!("agent + lab + 4 attachments: {:?}", t.elapsed());
    // No policy yet: everything flows.
    assert!(reachable(&lab, "xwing", "deathstar-1"));

    let t = Instant::now();
    let enforced_ms = agent.apply(POLICY);
    eprintln!(
        "apply rule1: agent apply→enforced {enforced_ms:.1} ms, CLI round trip {:?}",
        t.elapsed()
    );
    assert!(enforced_ms > 0.0);
    assert!(reachable(&lab, "tiefighter", "deathstar-1"));
    assert!(reachable(&lab, "tiefighter", "deathstar-2"));
    assert!(!reachable(&lab, "xwing", "deathstar-1"));
    assert!(!reachable(&lab, "xwing", "deathstar-2"));
    // The deathstars enforce ingress; the ships nothing.
    for e in agent.json(&["get", "endpoints"]).as_array().expect("eps") {
        let deathstar = e["pod"].as_str().expect("pod").starts_with("deathstar");
        assert_eq!(e["policyEnforcement"]["ingress"], deathstar, "{e}");
        assert_eq!(e["policyEnforcement"]["egress"], false, "{e}");
    }
    let policies = agent.json(&["get", "policies"]);
    assert_eq!(policies[0]["name"], "rule1");
    let out = agent.ok(&["get", "endpoints"]);
    assert!(out.starts_with("POD "), "{out}");
    assert!(out.contains("deathstar-1"), "{out}");

    // Deleting the policy opens the door again.
    let report = agent.json(&["delete", "-f", POLICY]);
    assert_eq!(report["changes"][0]["action"], "deleted");
    assert!(reachable(&lab, "xwing", "deathstar-1"));
    let status = agent.status();
    assert_eq!(status["apply"]["count"], 7, "{status}");
    eprintln!(
        "apply→enforced: last {} ms, max {} ms",
        status["apply"]["lastEnforcedMs"], status["apply"]["maxEnforcedMs"]
    );
}

#[test]
fn privileged_agent_crash_keeps_enforcing_and_restart_reconciles() {
    if !privileged() {
        return;
    }
    let mut agent = AgentProc::started(&[]);
    let lab = starwars_lab();
    attach_all(&agent, &lab);
    agent.apply(POLICY);
    let mut open = connect(&lab, "tiefighter", "deathstar-1").expect("tiefighter connects");
    echo(&mut open, "before the crash\n").expect("echo");

    agent.kill9();
    let t = Instant::now();
    // The established connection carries on, and the policy still judges new ones.
    echo(&mut open, "while the agent is dead\n").expect("the open connection keeps working");
    assert!(!reachable(&lab, "xwing", "deathstar-1"));
    assert!(reachable(&lab, "tiefighter", "deathstar-2"));
    eprintln!("checks with the agent dead: {:?}", t.elapsed());

    let took = agent.start(&[]);
    eprintln!("restart until serving: {took:?}");
    let status = agent.status();
    let startup = &status["startup"];
    assert_eq!(startup["restoredObjects"], 6, "{startup}");
    assert_eq!(startup["restoredEndpoints"], 4, "{startup}");
    assert_eq!(startup["kernel"]["endpoints"], 4, "{startup}");
    assert_eq!(startup["kernel"]["tables"], 2, "{startup}");
    assert_eq!(
        startup["reconcile"]["mapWrites"],
        0,
        "nothing changed, so nothing is rewritten: {startup}\n{}",
        agent.log_text()
    );
    eprintln!("startup after kill -9: {startup}");
    echo(&mut open, "after the restart\n").expect("still open");
    assert!(!reachable(&lab, "xwing", "deathstar-1"));
    assert!(reachable(&lab, "tiefighter", "deathstar-1"));

    // A graceful stop and start changes nothing either.
    agent.signal(Signal::SIGTERM);
    assert!(!agent.socket.exists(), "a clean stop removes the socket");
    echo(&mut open, "agent stopped\n").expect("still open");
    agent.start(&[]);
    assert_eq!(reconcile(&agent)["mapWrites"], 0);

    // A change is enforced after the restart, and only the difference is written: removing
    // the policy rewrites the two deathstar endpoints and their ingress tables.
    let report = agent.json(&["delete", "-f", POLICY]);
    let sync = &report["sync"];
    assert_eq!(sync["endpointsWritten"], 2, "{report}");
    assert_eq!(sync["tablesWritten"], 2, "{report}");
    assert_eq!(sync["ipcacheChanges"], 0, "{report}");
    assert!(reachable(&lab, "xwing", "deathstar-1"));
    echo(&mut open, "the end\n").expect("still open");
}

#[test]
fn privileged_agent_audit_modes() {
    if !privileged() {
        return;
    }
    let mut agent = AgentProc::started(&[]);
    let lab = starwars_lab();
    attach_all(&agent, &lab);

    // Per policy: the annotation lets what the policy would drop through.
    let audited = audited_policy(agent.dir.path());
    agent.apply(&audited);
    assert_eq!(agent.json(&["get", "policies"])[0]["audit"], true);
    assert!(reachable(&lab, "xwing", "deathstar-1"));
    agent.apply(POLICY);
    assert_eq!(agent.json(&["get", "policies"])[0]["audit"], false);
    assert!(!reachable(&lab, "xwing", "deathstar-1"));

    // Per endpoint, persisted across a restart.
    let out = agent.ok(&["endpoint", "config", "default/deathstar-1", "audit=true"]);
    assert!(
        out.contains("configured") && out.contains("audit=true"),
        "{out}"
    );
    assert!(reachable(&lab, "xwing", "deathstar-1"));
    assert!(!reachable(&lab, "xwing", "deathstar-2"));
    agent.restart(&[]);
    assert_eq!(reconcile(&agent)["mapWrites"], 0);
    let out = agent.ok(&["endpoint", "config", "default/deathstar-1"]);
    assert!(out.contains("audit=true"), "{out}");
    let eps = agent.json(&["get", "endpoints"]);
    let ds1 = eps
        .as_array()
        .expect("eps")
        .iter()
        .find(|e| e["pod"] == "deathstar-1")
        .expect("deathstar-1");
    assert_eq!(ds1["audit"]["endpoint"], true, "{ds1}");
    assert_eq!(ds1["audit"]["effective"], true, "{ds1}");
    assert!(reachable(&lab, "xwing", "deathstar-1"));
    assert!(!reachable(&lab, "xwing", "deathstar-2"));
    agent.ok(&["endpoint", "config", "default/deathstar-1", "audit=false"]);
    assert!(!reachable(&lab, "xwing", "deathstar-1"));

    // Global: every endpoint record gets the audit flag (and only the records are rewritten).
    agent.restart(&["--policy-audit-mode"]);
    let r = reconcile(&agent);
    assert_eq!(r["endpointsWritten"], 4, "{r}");
    assert_eq!(r["tablesWritten"], 0, "{r}");
    assert_eq!(r["ipcacheChanges"], 0, "{r}");
    assert_eq!(agent.status()["policyAuditMode"], true);
    assert!(reachable(&lab, "xwing", "deathstar-2"));
    // Stored: a restart without the flag keeps it.
    agent.restart(&[]);
    assert_eq!(agent.status()["policyAuditMode"], true);
    assert_eq!(reconcile(&agent)["mapWrites"], 0);
    assert!(reachable(&lab, "xwing", "deathstar-1"));
    agent.restart(&["--policy-audit-mode=false"]);
    assert_eq!(agent.status()["policyAuditMode"], false);
    assert!(!reachable(&lab, "xwing", "deathstar-2"));
    assert!(reachable(&lab, "tiefighter", "deathstar-2"));
}

#[test]
fn privileged_agent_socket_is_root_only() {
    if !privileged() {
        return;
    }
    let agent = AgentProc::started(&[]);
    let meta = fs::metadata(&agent.socket).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);
    let dir = agent.socket.parent().expect("parent");
    assert_eq!(
        fs::metadata(dir).expect("dir").permissions().mode() & 0o777,
        0o700
    );
    let state = agent.dir.path().join("state");
    assert_eq!(
        fs::metadata(&state).expect("state").permissions().mode() & 0o777,
        0o700
    );

    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_palisade"))
            .args(args)
            .arg("--socket")
            .arg(&agent.socket)
            .stdin(Stdio::null())
            .output()
            .expect("setpriv")
    };
    let out = as_nobody(&["status"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("permission denied") && err.contains("root-only"),
        "a clear error: {err}"
    );
    // Even with the file modes opened up, the agent checks the peer's uid.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::set_permissions(&agent.socket, fs::Permissions::from_mode(0o666)).expect("chmod");
    // The temp directory above must be traversable too.
    fs::set_permissions(agent.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = as_nobody(&["apply", "-f", "/dev/null"]);
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("root-only") && err.contains("uid 65534"),
        "refused by the agent: {err}"
    );
    assert!(agent.log_text().contains("refused a client with uid 65534"));
    // Root still gets in.
    assert_eq!(agent.status()["revision"], 0);
}

#[test]
fn privileged_agent_rejects_a_bad_batch_whole() {
    if !privileged() {
        return;
    }
    let agent = AgentProc::started(&[]);
    agent.apply(CLUSTER);
    let objects = agent.dir.path().join("state/objects.json");
    let before = fs::read(&objects).expect("objects.json");
    let revision = agent.status()["revision"].clone();

    // One good policy and one with an out-of-range port: nothing is applied.
    let bad = agent.dir.path().join("bad.yaml");
    fs::write(
        &bad,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: good\nspec:\n  \
         endpointSelector: {matchLabels: {org: empire}}\n  ingress:\n  - toPorts:\n    - ports:\n      \
         - {port: \"80\", protocol: TCP}\n---\n\
         apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: bad\nspec:\n  \
         endpointSelector: {matchLabels: {org: empire}}\n  ingress:\n  - toPorts:\n    - ports:\n      \
         - {port: \"99999\", protocol: TCP}\n",
    )
    .expect("write");
    let bad = bad.display().to_string();
    let out = agent.cli(&["apply", "-f", &bad]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{bad}:21:")),
        "file and line of the bad port: {err}"
    );
    assert!(
        err.contains("spec.ingress[0].toPorts[0].ports[0].port"),
        "field path: {err}"
    );
    assert!(err.contains("nothing was applied"), "{err}");
    assert!(agent
        .json(&["get", "policies", "-A"])
        .as_array()
        .expect("policies")
        .is_empty());

    // A cluster-level conflict with the stored state (an address already in use).
    let clash = agent.dir.path().join("clash.yaml");
    fs::write(
        &clash,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: ywing, labels: {org: alliance}}\n\
         status: {podIP: 10.0.1.99}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: awing, labels: {org: alliance}}\n\
         status: {podIP: 10.0.1.21}\n",
    )
    .expect("write");
    let clash = clash.display().to_string();
    let out = agent.cli(&["apply", "-f", &clash]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{clash}:9:"))
            && err.contains("status.podIP")
            && err.contains("pod default/xwing"),
        "{err}"
    );
    // Nothing changed: not the store, not the revision, not the engine.
    assert_eq!(fs::read(&objects).expect("objects.json"), before);
    let status = agent.status();
    assert_eq!(status["revision"], revision);
    assert_eq!(status["objects"]["pods"], 4);
    assert_eq!(status["objects"]["policies"], 0);
}

/// `palisade observe -o json` with `args`: one flow per line.
fn observe(agent: &AgentProc, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["observe", "-o", "json"];
    all.extend_from_slice(args);
    agent
        .ok(&all)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn pod(flow: &Value, side: &str) -> String {
    format!(
        "{}/{}",
        flow[side]["namespace"].as_str().unwrap_or_default(),
        flow[side]["pod_name"].as_str().unwrap_or_default()
    )
}

fn ports(flow: &Value) -> Vec<u64> {
    let l4 = &flow["l4"];
    ["TCP", "UDP", "SCTP"]
        .iter()
        .flat_map(|p| {
            [
                l4[p]["source_port"].as_u64(),
                l4[p]["destination_port"].as_u64(),
            ]
        })
        .flatten()
        .collect()
}

/// Polls `observe --last 200 -o json` until `want` holds (flows reach the buffer within the
/// agent's event poll).
fn wait_for_flows(agent: &AgentProc, what: &str, want: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let flows = observe(agent, &["--last", "200"]);
        if want(&flows) {
            return flows;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in the agent's flows:\n{}",
            flows
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET /metrics` of the agent's Prometheus endpoint.
fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    out.split_once("\r\n\r\n").expect("body").1.to_owned()
}

/// The value of the sample `series` (name and labels exactly as exposed), as written.
fn raw_sample<'a>(metrics: &'a str, series: &str) -> &'a str {
    metrics
        .lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then_some(value)
        })
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

/// The value of the sample `series`.
fn sample(metrics: &str, series: &str) -> f64 {
    let raw = raw_sample(metrics, series);
    raw.parse()
        .unwrap_or_else(|e| panic!("{series} {raw}: {e}"))
}

/// Scrapes until `want` holds for `series` (the agent reads the datapath's counters every
/// second).
fn wait_for_sample(addr: &str, series: &str, want: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(addr);
        if want(sample(&text, series)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} = {} for too long",
            sample(&text, series)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends `n` UDP datagrams from a pod to another's port 80.
fn udp_burst(lab: &Lab, from: &str, to: &str, n: usize) {
    let src = lab.pod("default", from).expect("from");
    let dst = lab.pod("default", to).expect("to");
    let addr = SocketAddr::new(dst.ip, 80);
    palisade_lab::netns::run_in(&src.netns, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
        for i in 0..n {
            s.send_to(format!("datagram {i}").as_bytes(), addr)
                .expect("send");
        }
    })
    .expect("netns");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

const RULE1: &str = "CiliumNetworkPolicy default/rule1 ingress[0]";

/// What every flow a filter selects must satisfy.
type Check = fn(&Value) -> bool;

fn is_xwing_drop(f: &Value) -> bool {
    f["verdict"] == "DROPPED" && pod(f, "source") == "default/xwing"
}

#[test]
fn privileged_agent_flows_observe_and_metrics() {
    if !privileged() {
        return;
    }
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut agent = AgentProc::started(&["--prometheus-serve-addr", &metrics_addr]);
    let lab = starwars_lab();
    attach_all(&agent, &lab);
    agent.apply(POLICY);
    assert!(reachable(&lab, "tiefighter", "deathstar-1"));
    assert!(!reachable(&lab, "xwing", "deathstar-1"));

    // Both verdicts reach the flow buffer, decoded and named.
    let t = Instant::now();
    let is_allowed = |f: &Value| {
        f["verdict"] == "FORWARDED"
            && f["event_type"] == "policy-verdict"
            && f["traffic_direction"] == "INGRESS"
            && pod(f, "source") == "default/tiefighter"
            && pod(f, "destination") == "default/deathstar-1"
    };
    let is_dropped = |f: &Value| {
        f["verdict"] == "DROPPED"
            && pod(f, "source") == "default/xwing"
            && pod(f, "destination") == "default/deathstar-1"
    };
    let all = wait_for_flows(&agent, "allowed and dropped flow", |flows| {
        flows.iter().any(is_allowed) && flows.iter().any(is_dropped)
    });
    eprintln!(
        "flows in the agent's buffer {:?} after the probes",
        t.elapsed()
    );
    let allowed = all.iter().find(|f| is_allowed(f)).expect("allowed");
    assert_eq!(allowed["policy"], RULE1, "{allowed}");
    assert_eq!(allowed["l4"]["TCP"]["destination_port"], 80, "{allowed}");
    assert_eq!(allowed["l4"]["TCP"]["flags"]["SYN"], true, "{allowed}");
    assert_eq!(allowed["node_name"], NODE, "{allowed}");
    assert!(
        allowed["destination"]["labels"]
            .as_array()
            .expect("labels")
            .contains(&Value::from("k8s:class=deathstar")),
        "{allowed}"
    );
    let dropped = all.iter().find(|f| is_dropped(f)).expect("dropped");
    assert_eq!(dropped["event_type"], "drop", "{dropped}");
    assert_eq!(dropped["drop_reason_desc"], "POLICY_DENIED", "{dropped}");
    assert_eq!(dropped["traffic_direction"], "INGRESS", "{dropped}");
    assert_eq!(dropped["l4"]["TCP"]["flags"]["SYN"], true, "{dropped}");
    assert_eq!(dropped["l4"]["TCP"]["destination_port"], 80, "{dropped}");
    assert!(dropped.get("policy").is_none(), "default deny: {dropped}");
    // (The pods' own IPv6 chatter may add flows meanwhile.)
    let last = observe(&agent, &["--last", "50"]).len();
    assert!(last <= 50 && last >= all.len().min(50), "{last}");

    // Filters, each on its own and together.
    let cases: [(&[&str], Check); 8] = [
        (&["--verdict", "DROPPED"], |f| f["verdict"] == "DROPPED"),
        (&["--from-pod", "default/xwing"], |f| {
            pod(f, "source") == "default/xwing"
        }),
        (&["--to-pod", "default/deathstar-1"], |f| {
            pod(f, "destination") == "default/deathstar-1"
        }),
        (&["--protocol", "tcp"], |f| f["l4"].get("TCP").is_some()),
        (&["--port", "80"], |f| ports(f).contains(&80)),
        (&["-n", "default"], |f| {
            f["source"]["namespace"] == "default" || f["destination"]["namespace"] == "default"
        }),
        (
            &["--from-pod", "default/xwing", "--verdict", "DROPPED"],
            |f| is_xwing_drop(f),
        ),
        (
            &[
                "--from-pod",
                "tiefighter",
                "--to-pod",
                "default/deathstar",
                "--protocol",
                "tcp",
                "--port",
                "80",
                "-n",
                "default",
                "--verdict",
                "FORWARDED",
            ],
            |f| {
                f["verdict"] == "FORWARDED"
                    && pod(f, "source") == "default/tiefighter"
                    && pod(f, "destination").starts_with("default/deathstar")
            },
        ),
    ];
    for (args, check) in cases {
        let mut a = vec!["--last", "50"];
        a.extend_from_slice(args);
        let got = observe(&agent, &a);
        assert!(!got.is_empty(), "{args:?} selects the flows above");
        for f in &got {
            assert!(check(f), "{args:?} let through {f}");
        }
        let expected = all.iter().filter(|f| check(f)).count().min(50);
        assert!(
            got.len() >= expected,
            "{args:?}: {} < {expected}",
            got.len()
        );
    }
    assert!(
        observe(&agent, &["--to-pod", "default/deathstar-2"]).is_empty(),
        "nothing went to deathstar-2"
    );
    // Compact output names the rule, as hubble does.
    let compact = agent.ok(&[
        "observe",
        "--from-pod",
        "default/tiefighter",
        "--to-pod",
        "default/deathstar-1",
    ]);
    assert!(
        compact.lines().any(|l| l.contains("default/tiefighter:")
            && l.contains("-> default/deathstar-1:80 (ID:")
            && l.contains("policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)")
            && l.ends_with(&format!("by {RULE1}"))),
        "{compact}"
    );
    let compact = agent.ok(&[
        "observe",
        "--from-pod",
        "default/xwing",
        "--verdict",
        "DROPPED",
    ]);
    assert!(
        compact
            .lines()
            .any(|l| l.contains("Policy denied INGRESS DROPPED (TCP Flags: SYN)")),
        "{compact}"
    );

    // Following: a new flow arrives within a couple of seconds; Ctrl-C ends it quietly.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args([
            "observe",
            "--follow",
            "-o",
            "json",
            "--from-pod",
            "default/xwing",
        ])
        .args(["--protocol", "udp", "--verdict", "DROPPED", "--socket"])
        .arg(&agent.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("observe --follow");
    let stdout = follow.stdout.take().expect("stdout");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in io::BufRead::lines(io::BufReader::new(stdout)).map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // Until the stream is up, a datagram may come before it: send until one is seen.
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let line = loop {
        udp_burst(&lab, "xwing", "deathstar-1", 1);
        let sent = Instant::now();
        if let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) {
            eprintln!(
                "observe --follow: a new flow printed {:?} after its packet",
                sent.elapsed()
            );
            break line;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "no flow followed in 3 s"
        );
    };
    let f: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(pod(&f, "source"), "default/xwing", "{f}");
    assert_eq!(f["verdict"], "DROPPED", "{f}");
    assert!(f["l4"].get("UDP").is_some(), "{f}");
    let pid = Pid::from_raw(i32::try_from(follow.id()).expect("pid"));
    kill(pid, Signal::SIGINT).expect("SIGINT");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = follow.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "observe --follow ignored SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    follow
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(status.success(), "{status}: {err}");
    assert!(err.is_empty(), "{err}");
    eprintln!("observe --follow stopped {:?} after SIGINT", t.elapsed());
    // A following stream with --until ends by itself.
    let until =
        palisade_flow::time::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(2));
    let t = Instant::now();
    let out = agent.cli(&[
        "observe",
        "--follow",
        "--until",
        &until,
        "--verdict",
        "AUDIT",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "--until ends the stream: {:?}",
        t.elapsed()
    );

    // Status counts the flows.
    let status = agent.status();
    let flows = &status["flows"];
    assert!(
        flows["received"].as_u64().expect("received") >= 5,
        "{flows}"
    );
    assert_eq!(flows["capacity"], 4095, "{flows}");
    assert_eq!(flows["evicted"], 0, "{flows}");
    assert_eq!(flows["lostInKernel"], 0, "{flows}");
    assert_eq!(flows["rateLimit"], 10_000, "{flows}");
    assert_eq!(flows["rateBurst"], 20_000, "{flows}");
    assert_eq!(flows["metricsAddr"], metrics_addr.as_str(), "{flows}");
    let table = agent.ok(&["status"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("Flows:") && l.contains("0 lost in the kernel")),
        "{table}"
    );

    // Prometheus: the kernel's drop counters and the verdicts of the flows.
    let denied = r#"palisade_drops_total{reason="POLICY_DENIED",direction="INGRESS"}"#;
    let text = wait_for_sample(&metrics_addr, denied, |v| v > 0.0);
    let verdicts = |v: &str| {
        sample(
            &text,
            &format!(r#"palisade_policy_verdicts_total{{direction="INGRESS",verdict="{v}"}}"#),
        )
    };
    assert!(verdicts("FORWARDED") > 0.0, "{text}");
    assert!(verdicts("DROPPED") > 0.0, "{text}");
    assert_eq!(
        raw_sample(&text, "palisade_policy_revision"),
        status["revision"].to_string()
    );
    assert_eq!(raw_sample(&text, "palisade_endpoints"), "4");
    assert_eq!(
        raw_sample(&text, "palisade_policy_tables"),
        "2",
        "the deathstars' ingress"
    );
    assert!(sample(&text, "palisade_policy_apply_to_enforced_seconds_count") >= 6.0);
    assert!(
        sample(
            &text,
            r#"palisade_forwarded_packets_total{direction="INGRESS"}"#
        ) > 0.0
    );

    // An event storm over the rate limit: the kernel counts every drop, sends what the limit
    // lets through, and counts the rest as lost.
    // A stopping agent ends the streams it serves: the follower gets its `end` and exits 0.
    let mut follower = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["observe", "--follow", "--socket"])
        .arg(&agent.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("observe --follow");
    std::thread::sleep(Duration::from_millis(300));
    agent.signal(Signal::SIGTERM);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = follower.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the follower outlived the agent"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    follower
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(status.success() && err.is_empty(), "{status}: {err}");
    eprintln!(
        "the follower had ended {:?} after the agent exited on SIGTERM",
        t.elapsed()
    );
    agent.start(&[
        "--events-rate-limit",
        "10",
        "--prometheus-serve-addr",
        &metrics_addr,
    ]);
    let before = agent.status()["flows"]["lostInKernel"]
        .as_u64()
        .expect("lost");
    let dropped_before = sample(&scrape(&metrics_addr), denied);
    udp_burst(&lab, "xwing", "deathstar-1", 200);
    let lost = agent.status()["flows"]["lostInKernel"]
        .as_u64()
        .expect("lost");
    assert!(
        lost >= before + 100,
        "200 drops at 10 events/s (burst 20 per CPU): lost {before} -> {lost}"
    );
    let text = wait_for_sample(&metrics_addr, denied, |v| v >= dropped_before + 200.0);
    assert!(
        sample(&text, "palisade_flows_lost_total") >= 100.0,
        "{text}"
    );
    let received = agent.status()["flows"]["received"]
        .as_u64()
        .expect("received");
    assert!(
        received < 100,
        "the limit let at most a burst through: {received} flows"
    );
    eprintln!("storm: lost {before} -> {lost}, {received} flows received");
}
