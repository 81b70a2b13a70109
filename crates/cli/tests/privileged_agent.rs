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
