//! `palisade lab run | up | exec | down | list`: ConnectivityTests with real packets, in
//! network namespaces on this machine (root needed).

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use palisade_flow::{BootClock, EngineEnricher, Flow, Printer};

use palisade_lab::state::{self, LabKind, LabState};
use palisade_lab::{
    probe, DatapathEnforcer, Enforcer, Lab, LabOptions, LabSpec, NoEnforcement, ProbeOptions,
};
use palisade_policy::cluster::{self, Loaded};
use palisade_policy::simulate::Report;
use palisade_policy::Config;
use palisade_policy_api::Bundle;

use crate::output::{print_diagnostics, print_table, Format, Style};
use crate::simulate_cmd::{load, print_report};

#[derive(clap::Subcommand)]
pub enum LabCommand {
    /// Run a ConnectivityTest for real: a network namespace per pod, built-in servers on every
    /// declared port, probes in parallel. Same report and exit codes as `simulate`.
    Run(RunArgs),
    /// Build the lab and keep it up (in the background) for `lab exec`; `lab down` removes it.
    Up(UpArgs),
    /// Run a command inside a pod's (node/NAME's, external/NAME's) network namespace.
    Exec(ExecArgs),
    /// Remove the lab started by `lab up` (or the one named), and every lab whose process is gone.
    Down(DownArgs),
    /// List the labs on this machine.
    List,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Manifest files or directories (recursive); repeat for more.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Format,
    /// Cluster name carried by every pod (io.cilium.k8s.policy.cluster).
    #[arg(long, default_value = "default")]
    pub cluster_name: String,
    /// How long a probe waits for an answer before it counts as dropped, in milliseconds.
    #[arg(long, default_value_t = 1500)]
    pub timeout_ms: u64,
    /// How many probes run at once.
    #[arg(long, default_value_t = 16)]
    pub parallel: usize,
    /// Audit mode for every endpoint: policy denials pass and are reported as AUDIT.
    #[arg(long)]
    pub policy_audit_mode: bool,
    /// Run without the eBPF datapath (every connection the network carries is allowed).
    #[arg(long)]
    pub no_enforce: bool,
    /// After the report, the flows the datapath saw during the probes (as `palisade observe`
    /// prints them): which rule let each connection in, why each drop happened.
    #[arg(long, conflicts_with = "no_enforce")]
    pub flows: bool,
}

#[derive(clap::Args)]
pub struct UpArgs {
    /// Manifest files or directories (recursive); repeat for more.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Cluster name carried by every pod (io.cilium.k8s.policy.cluster).
    #[arg(long, default_value = "default")]
    pub cluster_name: String,
    /// Stay in the foreground until Ctrl-C (or `lab down`) instead of detaching.
    #[arg(long)]
    pub foreground: bool,
    /// Internal: this process is the detached lab keeper.
    #[arg(long, hide = true)]
    pub detached: bool,
    /// Run without the eBPF datapath (every connection the network carries is allowed).
    #[arg(long)]
    pub no_enforce: bool,
}

#[derive(clap::Args)]
pub struct ExecArgs {
    /// The lab (its id, as `lab list` shows); needed only when several are up.
    #[arg(long)]
    pub lab: Option<String>,
    /// NAMESPACE/POD, node/NAME or external/NAME.
    pub target: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(clap::Args)]
pub struct DownArgs {
    /// The lab to remove, and only it (needed when several are up).
    pub lab: Option<String>,
    /// Remove every lab started by `lab up` (and every lab whose process is gone).
    #[arg(long, conflicts_with = "lab")]
    pub all: bool,
}

pub fn run(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LabCommand::Run(args) => lab_run(&args),
        LabCommand::Up(args) => lab_up(&args),
        LabCommand::Exec(args) => lab_exec(&args),
        LabCommand::Down(args) => Ok(lab_down(&args)),
        LabCommand::List => Ok(lab_list()),
    }
}

/// The eBPF datapath for a lab (maps pinned under the lab's own bpffs directory), or none.
fn make_enforcer(
    lab: &Lab,
    disabled: bool,
    audit_all: bool,
) -> anyhow::Result<Option<DatapathEnforcer>> {
    if disabled {
        return Ok(None);
    }
    let pin_dir = palisade_lab::netns::bpf_pin_dir(lab.id());
    let audit = palisade_agent::sync::AuditConfig {
        global: audit_all,
        ..Default::default()
    };
    let node = lab.node();
    let enforcer =
        DatapathEnforcer::open(&pin_dir, &node.name, &node.netns, &node.generated, audit)
            .map_err(|e| anyhow::anyhow!("loading the datapath: {e}"))?;
    Ok(Some(enforcer))
}

/// What the pods' kernels send on their own, not the probes: IPv6 duplicate address detection,
/// router solicitations and multicast listener reports (from `::` or a link-local address, to
/// a multicast group).
fn housekeeping(f: &Flow) -> bool {
    let src = f.ip.source;
    let link_local = matches!(src, IpAddr::V6(a) if a.is_unicast_link_local());
    src.is_unspecified() || link_local || f.ip.destination.is_multicast()
}

/// The datapath's flow events so far, decoded with the lab's engine (pods, identities, rules)
/// for its node, oldest first, without the pods' own IPv6 housekeeping (returned as a count).
fn lab_flows(
    datapath: &mut DatapathEnforcer,
    engine: &palisade_policy::Engine,
    node: &str,
    clock: &BootClock,
) -> (Vec<Flow>, usize) {
    let enricher = EngineEnricher::new(engine, node);
    let (mut flows, other): (Vec<Flow>, Vec<Flow>) = datapath
        .take_events()
        .iter()
        .map(|ev| palisade_flow::decode(ev, clock, &enricher))
        .partition(|f| !housekeeping(f));
    flows.sort_by_key(|f| f.time);
    (flows, other.len())
}

/// `Flows:` and one compact line per flow, after a blank line.
fn print_flows(flows: &[Flow], hidden: usize, lost: u64) -> anyhow::Result<()> {
    let color = io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    println!();
    println!("Flows:");
    if flows.is_empty() {
        println!("(none)");
    }
    let mut printer = Printer::new(
        palisade_flow::Format::Compact,
        color,
        BufWriter::new(io::stdout()),
    );
    for f in flows {
        printer.print(f)?;
    }
    printer.flush()?;
    if hidden > 0 {
        println!("({hidden} more: the pods' own IPv6 neighbour discovery and multicast reports)");
    }
    if lost > 0 {
        warn(&format!(
            "{lost} flow event(s) were lost: the datapath's ring buffer was full"
        ));
    }
    Ok(())
}

const NOT_ENFORCED: &str = "policy is NOT enforced in the lab yet (no datapath plugged in): \
     every connection the network can carry is allowed, whatever the policies say";

fn warn(message: &str) {
    eprintln!("{} {message}", Style::stderr().yellow("warning:"));
}

/// Loads the input into an engine; `Err(code)` when diagnostics were printed.
fn load_engine<'a>(bundle: &'a Bundle, cluster_name: &str) -> Result<Loaded<'a>, ExitCode> {
    let config = Config {
        cluster: cluster_name.to_owned(),
        ..Config::default()
    };
    cluster::load(bundle, config).map_err(|diags| {
        print_diagnostics(&diags);
        ExitCode::from(2)
    })
}

fn lab_spec(bundle: &Bundle, loaded: &Loaded<'_>) -> Result<LabSpec, ExitCode> {
    LabSpec::new(bundle, &loaded.engine, &loaded.tests).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn file_names(files: &[PathBuf]) -> Vec<String> {
    files.iter().map(|f| f.display().to_string()).collect()
}

fn lab_run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let Some(bundle) = load(&args.files) else {
        return Ok(ExitCode::from(2));
    };
    let loaded = match load_engine(&bundle, &args.cluster_name) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    if loaded.tests.is_empty() {
        eprintln!("error: the input holds no palisade.dev/v1alpha1 ConnectivityTest");
        return Ok(ExitCode::from(2));
    }
    if args.flows && args.output != Format::Table {
        eprintln!("error: --flows prints the flows after the report's table: use -o table");
        return Ok(ExitCode::from(2));
    }
    let spec = match lab_spec(&bundle, &loaded) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    // Plan every probe first: a wrong reference, or a probe the lab cannot run, runs nothing.
    let probes = match probe::plan(&loaded.engine, &loaded.tests, &spec) {
        Ok(p) => p,
        Err(errors) => {
            print_diagnostics(&errors);
            eprintln!("{} error(s); nothing was run", errors.len());
            return Ok(ExitCode::from(2));
        }
    };
    palisade_lab::install_signal_cleanup()?;
    let options = LabOptions {
        kind: LabKind::Run,
        files: file_names(&args.files),
    };
    let clock = BootClock::capture().context("reading the clocks")?;
    let lab = Lab::create(&spec, &options).context("building the lab")?;
    let mut datapath = make_enforcer(&lab, args.no_enforce, args.policy_audit_mode)?;
    let mut no_enforcement = NoEnforcement;
    let enforcer: &mut dyn Enforcer = match datapath.as_mut() {
        Some(dp) => dp,
        None => &mut no_enforcement,
    };
    if !enforcer.enforcing() {
        warn(NOT_ENFORCED);
    }
    lab.attach(enforcer, &loaded.engine)?;
    let probe_options = ProbeOptions {
        timeout: Duration::from_millis(args.timeout_ms.max(1)),
        parallelism: args.parallel.max(1),
    };
    let results = probe::run(&lab, &probes, &probe_options);
    // The events go with the datapath: taken before it is closed.
    let flows = match datapath.as_mut() {
        Some(dp) if args.flows => Some((
            lab_flows(dp, &loaded.engine, &lab.node().name, &clock),
            dp.lost_events(),
        )),
        _ => None,
    };
    drop(datapath);
    if let Err(e) = lab.destroy() {
        warn(&format!("removing the lab: {e}"));
    }
    let report = Report::for_tests(&loaded.tests, results);
    print_report(&report, args.output)?;
    if let Some(((flows, hidden), lost)) = flows {
        print_flows(&flows, hidden, lost)?;
    }
    Ok(if report.summary.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn lab_up(args: &UpArgs) -> anyhow::Result<ExitCode> {
    if !args.foreground {
        return up_detached(args);
    }
    if args.detached {
        // Out of the terminal's session: its Ctrl-C is not ours; `lab down` stops us.
        let _ = nix::unistd::setsid();
    }
    let Some(bundle) = load(&args.files) else {
        return Ok(ExitCode::from(2));
    };
    let loaded = match load_engine(&bundle, &args.cluster_name) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let spec = match lab_spec(&bundle, &loaded) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    palisade_lab::install_signal_cleanup()?;
    let options = LabOptions {
        kind: LabKind::Up,
        files: file_names(&args.files),
    };
    let lab = Lab::create(&spec, &options).context("building the lab")?;
    let mut datapath = make_enforcer(&lab, args.no_enforce, false)?;
    let mut no_enforcement = NoEnforcement;
    let enforcer: &mut dyn Enforcer = match datapath.as_mut() {
        Some(dp) => dp,
        None => &mut no_enforcement,
    };
    if !enforcer.enforcing() {
        warn(NOT_ENFORCED);
    }
    lab.attach(enforcer, &loaded.engine)?;
    // Programs and maps live as long as this process (the signal handler removes the lab).
    std::mem::forget(datapath);
    print_summary(lab.state());
    if !args.detached {
        println!("Ctrl-C removes the lab.");
    }
    // Servers run on their own threads; the signal handler removes the lab and exits.
    loop {
        std::thread::park();
    }
}

/// Starts `lab up --foreground` as a detached process and waits until its lab is ready.
fn up_detached(args: &UpArgs) -> anyhow::Result<ExitCode> {
    let dir = state::state_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join(format!("up-{}.log", std::process::id()));
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(std::env::current_exe().context("finding the palisade binary")?);
    cmd.args(["lab", "up", "--foreground", "--detached", "--cluster-name"])
        .arg(&args.cluster_name);
    for f in &args.files {
        cmd.arg("-f").arg(f);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the lab process")?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait()? {
            let output = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_file(&log_path);
            eprint!("{output}");
            let code = status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(2);
            return Ok(ExitCode::from(if code == 0 { 2 } else { code }));
        }
        if let Some(st) = state::list(&dir)
            .into_iter()
            .find(|s| s.pid == pid && s.ready)
        {
            let kept = state::log_file(&dir, &st.id);
            let _ = std::fs::rename(&log_path, &kept);
            // Warnings the lab process printed (input warnings, no enforcement).
            let output = std::fs::read_to_string(&kept).unwrap_or_default();
            for line in output.lines().filter(|l| l.contains("warning:")) {
                eprintln!("{line}");
            }
            print_summary(&st);
            println!("log: {}", kept.display());
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the lab was not ready after 120 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ports_text(ports: &[palisade_lab::ServerPort]) -> String {
    if ports.is_empty() {
        "-".to_owned()
    } else {
        ports
            .iter()
            .map(|p| format!("{}/{}", p.port, p.transport.as_str()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn print_summary(st: &LabState) {
    let node_ips = st
        .node
        .ips
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "lab {} is up: node {} in {} ({node_ips})",
        st.id, st.node.name, st.node.netns
    );
    let mut rows = vec![[
        "ENDPOINT",
        "IP",
        "NETNS",
        "NODE-SIDE IF",
        "IFINDEX",
        "PORTS",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect::<Vec<_>>()];
    for p in &st.pods {
        rows.push(vec![
            format!("{}/{}", p.namespace, p.name),
            p.ip.to_string(),
            p.netns.clone(),
            p.host_ifname.clone(),
            p.host_ifindex.to_string(),
            ports_text(&p.ports),
        ]);
    }
    for h in &st.host_pods {
        rows.push(vec![
            format!("{}/{}", h.namespace, h.name),
            h.ip.to_string(),
            st.node.netns.clone(),
            "(host network)".to_owned(),
            "-".to_owned(),
            ports_text(&st.node.ports),
        ]);
    }
    for e in &st.externals {
        rows.push(vec![
            format!("external/{}", e.name),
            e.ip.to_string(),
            e.netns.clone(),
            e.host_ifname.clone(),
            e.host_ifindex.to_string(),
            ports_text(&e.ports),
        ]);
    }
    print_table(&rows);
    let server = st.pods.iter().find_map(|p| {
        p.ports
            .iter()
            .find(|x| x.transport == palisade_lab::Transport::Tcp)
            .map(|x| (p, x.port))
    });
    match (server, st.pods.first()) {
        (Some((target, port)), _) => {
            // A client: preferably a pod that serves nothing itself.
            let from = st
                .pods
                .iter()
                .filter(|p| p.netns != target.netns)
                .min_by_key(|p| p.ports.len())
                .unwrap_or(target);
            println!(
                "try:  palisade lab exec {}/{} -- curl -s http://{}/",
                from.namespace,
                from.name,
                std::net::SocketAddr::new(target.ip, port)
            );
        }
        (None, Some(p)) => println!(
            "try:  palisade lab exec {}/{} -- ip addr",
            p.namespace, p.name
        ),
        (None, None) => {}
    }
    println!("stop: palisade lab down {}", st.id);
}

/// Labs whose process runs, with `lab up` ones first.
fn live_labs(dir: &Path) -> Vec<LabState> {
    let mut labs: Vec<LabState> = state::list(dir)
        .into_iter()
        .filter(|s| s.ready && s.alive())
        .collect();
    labs.sort_by_key(|s| (s.kind != LabKind::Up, s.id.clone()));
    labs
}

fn lab_exec(args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let dir = state::state_dir();
    let labs = live_labs(&dir);
    let lab = match &args.lab {
        Some(id) => labs
            .into_iter()
            .find(|s| &s.id == id)
            .ok_or_else(|| anyhow!("no running lab {id} (see `palisade lab list`)"))?,
        None => {
            let mut up: Vec<LabState> =
                labs.into_iter().filter(|s| s.kind == LabKind::Up).collect();
            match up.len() {
                0 => bail!("no lab is up; start one with `palisade lab up -f …`"),
                1 => up.remove(0),
                _ => bail!(
                    "several labs are up ({}); choose one with --lab ID",
                    up.iter()
                        .map(|s| s.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    let Some(netns) = lab.netns_for(&args.target) else {
        let mut known: Vec<String> = lab
            .pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .chain(
                lab.host_pods
                    .iter()
                    .map(|h| format!("{}/{}", h.namespace, h.name)),
            )
            .chain(std::iter::once(format!("node/{}", lab.node.name)))
            .chain(lab.externals.iter().map(|e| format!("external/{}", e.name)))
            .collect();
        known.sort();
        bail!(
            "lab {} has no {:?}; it has: {}",
            lab.id,
            args.target,
            known.join(", ")
        );
    };
    let status = Command::new("ip")
        .args(["netns", "exec", &netns])
        .args(&args.command)
        .status()
        .context("running ip netns exec")?;
    let code = status
        .code()
        .or_else(|| {
            use std::os::unix::process::ExitStatusExt as _;
            status.signal().map(|s| 128 + s)
        })
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(1);
    Ok(ExitCode::from(code))
}

/// `pal-<id>-…` namespaces whose lab has no state file at all: left by a killed process.
fn orphan_netns(dir: &Path) -> Vec<String> {
    palisade_lab::netns::list()
        .into_iter()
        .filter(|n| {
            let Some(rest) = n.strip_prefix("pal-") else {
                return false;
            };
            let Some((id, _)) = rest.split_once('-') else {
                return false;
            };
            id.len() == 8
                && id.bytes().all(|b| b.is_ascii_hexdigit())
                && !state::state_file(dir, id).exists()
        })
        .collect()
}

fn lab_down(args: &DownArgs) -> ExitCode {
    let dir = state::state_dir();
    let all = state::list(&dir);
    let mut refusal = None;
    let mut targets: Vec<LabState> = Vec::new();
    let sweep = args.lab.is_none();
    if let Some(id) = &args.lab {
        // Just the lab named, whatever its state.
        match all.into_iter().find(|s| &s.id == id) {
            Some(s) => targets.push(s),
            None => refusal = Some(format!("no lab {id} (see `palisade lab list`)")),
        }
    } else {
        // The `lab up` lab (every one with --all), and every lab whose process is gone.
        let (live, stale): (Vec<LabState>, Vec<LabState>) =
            all.into_iter().partition(LabState::alive);
        targets = stale;
        let up: Vec<LabState> = live.into_iter().filter(|s| s.kind == LabKind::Up).collect();
        if args.all || up.len() <= 1 {
            targets.extend(up);
        } else {
            refusal = Some(format!(
                "several labs are up ({}); name one, or use --all",
                up.iter()
                    .map(|s| s.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let mut failed = false;
    for st in &targets {
        let gone = if st.alive() {
            ""
        } else {
            " (its process was gone)"
        };
        match state::remove(&dir, st, Duration::from_secs(10)) {
            Ok(()) => println!("lab {} removed{gone}", st.id),
            Err(e) => {
                failed = true;
                eprintln!("error: lab {}: {e}", st.id);
            }
        }
    }
    let orphans = if sweep {
        orphan_netns(&dir)
    } else {
        Vec::new()
    };
    if !orphans.is_empty() {
        // Every lab writes its state file before its first namespace: these have no owner.
        match palisade_lab::netns::delete_all(&orphans) {
            Ok(()) => println!("removed leftover namespaces: {}", orphans.join(", ")),
            Err(e) => {
                failed = true;
                eprintln!("error: leftover namespaces: {e}");
            }
        }
    }
    if sweep {
        for id in palisade_lab::netns::orphan_bpf_pins(&dir) {
            palisade_lab::netns::remove_bpf_pins(&id);
            println!("removed leftover datapath pins of lab {id}");
        }
    }
    if targets.is_empty() && orphans.is_empty() && refusal.is_none() {
        println!("no lab is up");
    }
    if let Some(r) = refusal {
        eprintln!("error: {r}");
        failed = true;
    }
    if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn lab_list() -> ExitCode {
    let labs = state::list(&state::state_dir());
    if labs.is_empty() {
        println!("no lab");
        return ExitCode::SUCCESS;
    }
    let mut rows = vec![["ID", "KIND", "PID", "STATUS", "PODS", "FILES"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect::<Vec<_>>()];
    for s in labs {
        let status = match (s.alive(), s.ready) {
            (true, true) => "running",
            (true, false) => "starting",
            (false, _) => "stale (lab down removes it)",
        };
        rows.push(vec![
            s.id.clone(),
            match s.kind {
                LabKind::Run => "run",
                LabKind::Up => "up",
            }
            .to_owned(),
            s.pid.to_string(),
            status.to_owned(),
            (s.pods.len() + s.host_pods.len()).to_string(),
            s.files.join(" "),
        ]);
    }
    print_table(&rows);
    ExitCode::SUCCESS
}
