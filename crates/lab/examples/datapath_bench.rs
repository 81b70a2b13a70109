//! Datapath benchmark driver, run by `bench/datapath.sh` (root, Linux ≥ 6.6, iperf3, nft,
//! bpftool, setpriv). Build with `cargo build --release -p palisade-lab --example datapath_bench`.
//!
//! 1. **Traffic.** A lab with two pods (`bench/client`, `bench/server`) behind its node
//!    namespace. iperf3 runs in the pods' namespaces: TCP throughput (`-t S`) and the receiver's
//!    rate of 64-byte UDP datagrams (`-u -l 64 -b 0 -t S`), under each configuration:
//!    - `none`: nothing on the path;
//!    - `palisade_N`: both programs on both pods' host veths (TCX), the server enforcing
//!      ingress with a table of N rows (N−2 filler allows for other identities and ports, then
//!      the client's identity on TCP and UDP 5201), ipcache holding every filler identity;
//!    - `nft_vmap_N`: in the node namespace only, a forward chain `ct state
//!      established,related accept`, then `ip saddr . meta l4proto . th dport vmap @allow`
//!      with the same N elements, policy drop;
//!    - `nft_linear_N`: the same N rules one after the other (the client's two last).
//!
//!    Configurations run interleaved (none, palisade…, nft…, none, …) `reps` times; each figure
//!    is the median. Every configuration is checked to enforce before it is measured: a TCP
//!    connect to an unlisted port must time out under a policy and be refused without one.
//!    iperf3 pins the client to CPU 0 and the server to CPU 1 (`-A 0,1`): the whole forwarding
//!    path runs in the sender's context, on CPU 0. A run whose sender got less than 85% of its
//!    CPU (iperf3's own figure) was disturbed by other work on the machine and is redone (at
//!    most twice; then the least disturbed of the three is kept); the count is reported.
//! 2. **Per-packet cost.** With BPF run-time statistics on (`kernel.bpf_stats_enabled`, restored
//!    afterwards), the programs' run_time_ns / run_cnt over one UDP and one TCP run per table
//!    size; then the new-connection path alone, through BPF_PROG_TEST_RUN of `to_container`
//!    (allowed SYNs of distinct connections, and denied ones from a filler identity).
//! 3. **Apply → enforced.** An engine with 1,000 pods (50 namespaces × 5 deployments) and 300
//!    NetworkPolicies, synced into a second datapath (own pin directory, programs loaded but not
//!    attached; endpoints on made-up ifindexes). Then `rounds` times: one NetworkPolicy's port
//!    changes; the clock runs from the manifest text through parse, compile, `upsert_policy`,
//!    `commit` and `DatapathSync::sync` until the sync returns (the new tables are swapped into
//!    the kernel's `pal_policy` by then); the kernel's table is then read back to check it.
//!    To explain the figure: the time of one table swap (`write_table`) and removal, of six
//!    swaps issued together from six threads against one after the other, and of recomputing
//!    every endpoint's rows and LPM entries (what each sync does) against once per distinct
//!    table.
//!
//! The last line of output is
//! `datapath: palisade_10k/none=R1 nft_vmap/none=R2 nft_linear/none=R3 apply_p99_ms=L`, the
//! ratios being of 64-byte UDP receive rates (the per-packet figure).

// Figures are printed as floating point; the counts involved are far below 2^52.
#![allow(clippy::cast_precision_loss)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use palisade_agent::sync::{Attachment, AuditConfig, DatapathSync};
use palisade_datapath::abi::{PAL_EP_F_ENFORCE_INGRESS, PAL_IPCACHE_F_ENDPOINT};
use palisade_datapath::{endpoint_value, Datapath, Direction, Hook, TableEntry, Verdict};
use palisade_lab::state::LabKind;
use palisade_lab::{netns, Lab, LabOptions, LabSpec, NodeSpec, PodSpec};
use palisade_policy::{cluster, compile, Config, Engine};
use palisade_policy_api::load::Object;
use serde_json::Value;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const TCP: u8 = 6;
const UDP: u8 = 17;
const PORT: u16 = 5201;
const CLOSED_PORT: u16 = 5202;
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 255, 254);
const CLIENT_IDENTITY: u32 = 1000;
const SERVER_IDENTITY: u32 = 1001;
const FILLER_IDENTITY: u32 = 20_000;
const CLIENT_ENDPOINT: u32 = 1;
const SERVER_ENDPOINT: u32 = 2;
const NFT_TABLE: &str = "palbench";
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

struct Options {
    reps: usize,
    seconds: u32,
    sizes: Vec<usize>,
    nft_size: usize,
    apply_namespaces: usize,
    apply_rounds: usize,
    test_runs: u32,
    /// The interleaved configurations, if not the default ones.
    setups: Option<Vec<Setup>>,
    /// iperf3 `-A client,server` CPUs, or none.
    affinity: Option<String>,
    pin_base: PathBuf,
    lab_id_file: Option<PathBuf>,
    traffic: bool,
    apply: bool,
}

fn usage() -> String {
    "usage: datapath_bench [--reps N] [--seconds S] [--sizes 10,1000,10000] [--nft-size N] \
     [--apply-namespaces N (20 pods each)] [--apply-rounds N] [--test-runs N] \
     [--affinity CLIENT_CPU,SERVER_CPU|none] [--setups none,palisade_1k,nft_vmap_10,…] \
     [--pin-base /sys/fs/bpf/NAME] [--lab-id-file PATH] [--only traffic|apply]"
        .to_owned()
}

fn parse_options() -> Res<Options> {
    let mut o = Options {
        reps: 3,
        seconds: 5,
        sizes: vec![10, 1_000, 10_000],
        nft_size: 10_000,
        apply_namespaces: 50,
        apply_rounds: 100,
        test_runs: 20_000,
        affinity: Some("0,1".to_owned()),
        setups: None,
        pin_base: PathBuf::from(format!("/sys/fs/bpf/palisade-bench-{}", std::process::id())),
        lab_id_file: None,
        traffic: true,
        apply: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{}", usage());
            std::process::exit(0);
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{}", usage()))?;
        match flag.as_str() {
            "--reps" => o.reps = value.parse()?,
            "--seconds" => o.seconds = value.parse()?,
            "--sizes" if value == "none" => o.sizes = Vec::new(),
            "--sizes" => {
                o.sizes = value.split(',').map(str::parse).collect::<Result<_, _>>()?;
            }
            "--nft-size" => o.nft_size = value.parse()?,
            "--apply-namespaces" => o.apply_namespaces = value.parse()?,
            "--apply-rounds" => o.apply_rounds = value.parse()?,
            "--test-runs" => o.test_runs = value.parse()?,
            "--affinity" => o.affinity = (value != "none").then_some(value),
            "--setups" => {
                o.setups = Some(
                    value
                        .split(',')
                        .map(Setup::parse)
                        .collect::<Result<_, _>>()?,
                );
            }
            "--pin-base" => o.pin_base = PathBuf::from(value),
            "--lab-id-file" => o.lab_id_file = Some(PathBuf::from(value)),
            "--only" => match value.as_str() {
                "traffic" => o.apply = false,
                "apply" => o.traffic = false,
                other => return Err(format!("--only {other}: traffic or apply").into()),
            },
            other => return Err(format!("unknown option {other}\n{}", usage()).into()),
        }
    }
    if o.reps == 0 || o.seconds == 0 || o.apply_rounds == 0 || o.apply_namespaces == 0 {
        return Err("--reps, --seconds, --apply-rounds and --apply-namespaces must be > 0".into());
    }
    if o.sizes.iter().chain([&o.nft_size]).any(|n| *n < 2) {
        return Err("table sizes must be at least 2 (the client's two allows)".into());
    }
    let Some(base) = o.pin_base.to_str() else {
        return Err("--pin-base must be UTF-8".into());
    };
    if !base.starts_with("/sys/fs/bpf/") || base.len() <= "/sys/fs/bpf/".len() {
        return Err("--pin-base must be a new directory under /sys/fs/bpf/".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn progress(msg: &str) {
    eprintln!("[datapath-bench] {msg}");
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => f64::midpoint(s[n / 2 - 1], s[n / 2]),
    }
}

/// Nearest-rank percentile (`p` in 0..=100) of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // The smallest rank r with r / len >= p / 100 (ranks from 1).
    let len = sorted.len();
    let rank = (1..=len)
        .find(|r| *r as f64 * 100.0 >= p * len as f64)
        .unwrap_or(len);
    sorted[rank - 1]
}

fn short_size(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs a command to completion; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Res<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
}

// ---------------------------------------------------------------------------------------------
// The rules every configuration enforces
// ---------------------------------------------------------------------------------------------

/// One allow: traffic from `src` (identity `identity`) to the server on `proto`/`port`.
#[derive(Clone, Copy)]
struct Rule {
    src: Ipv4Addr,
    identity: u32,
    proto: u8,
    port: u16,
}

fn filler_ip(k: usize) -> Ipv4Addr {
    // 10.201.0.1, 10.201.0.2, … (k < 65535).
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 201, 0, 0)) + k as u32 + 1)
}

/// `n` rules: `n − 2` fillers (4 per filler identity: TCP and UDP on two ports), then the
/// client's identity on TCP and UDP 5201.
fn rules(n: usize) -> Vec<Rule> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n.saturating_sub(2) {
        let k = i / 4;
        let j = i % 4;
        out.push(Rule {
            src: filler_ip(k),
            identity: FILLER_IDENTITY + k as u32,
            proto: if j % 2 == 0 { TCP } else { UDP },
            port: 1000 + (k % 500) as u16 * 2 + (j / 2) as u16,
        });
    }
    for proto in [TCP, UDP] {
        out.push(Rule {
            src: CLIENT_IP,
            identity: CLIENT_IDENTITY,
            proto,
            port: PORT,
        });
    }
    out
}

fn table_rows(rules: &[Rule]) -> Vec<TableEntry> {
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| TableEntry {
            identity: r.identity,
            proto: r.proto,
            port_lo: r.port,
            port_hi: r.port,
            verdict: Verdict::Allow,
            audit: false,
            rule_id: i as u32 + 1,
        })
        .collect()
}

fn proto_name(p: u8) -> &'static str {
    if p == TCP {
        "tcp"
    } else {
        "udp"
    }
}

fn nft_script(rules: &[Rule], linear: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "table ip {NFT_TABLE} {{");
    if linear {
        s.push_str(
            "  chain forward {\n    type filter hook forward priority filter; policy drop;\n    \
             ct state established,related accept\n",
        );
        for r in rules {
            let _ = writeln!(
                s,
                "    ip saddr {} {} dport {} accept",
                r.src,
                proto_name(r.proto),
                r.port
            );
        }
        s.push_str("  }\n");
    } else {
        s.push_str(
            "  map allow {\n    type ipv4_addr . inet_proto . inet_service : verdict\n    \
             elements = {\n",
        );
        for (i, r) in rules.iter().enumerate() {
            let sep = if i + 1 == rules.len() { "" } else { "," };
            let _ = writeln!(
                s,
                "      {} . {} . {} : accept{sep}",
                r.src,
                proto_name(r.proto),
                r.port
            );
        }
        s.push_str(
            "    }\n  }\n  chain forward {\n    type filter hook forward priority filter; \
             policy drop;\n    ct state established,related accept\n    \
             ip saddr . meta l4proto . th dport vmap @allow\n  }\n",
        );
    }
    s.push_str("}\n");
    s
}

// ---------------------------------------------------------------------------------------------
// iperf3
// ---------------------------------------------------------------------------------------------

/// The iperf3 server in the server pod. `setpriv --pdeathsig KILL` ends it with this process
/// even when this process is killed outright.
struct IperfServer {
    netns: String,
    child: Option<Child>,
}

impl IperfServer {
    fn start(netns: &str) -> Res<Self> {
        let mut s = IperfServer {
            netns: netns.to_owned(),
            child: None,
        };
        s.restart()?;
        Ok(s)
    }

    fn restart(&mut self) -> Res<()> {
        self.stop();
        let port = PORT.to_string();
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "ip", "netns", "exec"])
            .args([self.netns.as_str(), "iperf3", "-s", "-p", &port])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting iperf3 -s: {e}"))?;
        self.child = Some(child);
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    Tcp,
    Udp64,
}

/// One iperf3 run from the client pod: TCP bits/s received, or 64-byte datagrams/s received.
fn iperf_once(
    client_netns: &str,
    traffic: Traffic,
    seconds: u32,
    affinity: Option<&str>,
) -> Res<(f64, f64)> {
    let secs = seconds.to_string();
    let limit = (seconds + 20).to_string();
    let server = SERVER_IP.to_string();
    let port = PORT.to_string();
    let mut args = vec![
        "--kill-after=5",
        limit.as_str(),
        "ip",
        "netns",
        "exec",
        client_netns,
        "iperf3",
        "-c",
        server.as_str(),
        "-p",
        port.as_str(),
        "-t",
        secs.as_str(),
        "-J",
    ];
    if traffic == Traffic::Udp64 {
        args.extend(["-u", "-l", "64", "-b", "0"]);
    }
    if let Some(cpus) = affinity {
        args.extend(["-A", cpus]);
    }
    let out = Command::new("timeout")
        .args(&args)
        .stdin(Stdio::null())
        .output()?;
    let json: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("iperf3 output is not JSON ({e}): {}", out.status))?;
    if let Some(err) = json.get("error").and_then(Value::as_str) {
        return Err(format!("iperf3: {err}").into());
    }
    let recv = &json["end"]["sum_received"];
    if traffic == Traffic::Tcp && std::env::var_os("PALISADE_BENCH_VERBOSE").is_some() {
        progress(&format!(
            "tcp: {:.2} Gbit/s, cpu {}",
            recv["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
            json["end"]["cpu_utilization_percent"]
        ));
    }
    let value = match traffic {
        Traffic::Tcp => recv["bits_per_second"].as_f64(),
        Traffic::Udp64 => {
            let packets = recv["packets"].as_f64().unwrap_or(f64::NAN);
            let lost = recv["lost_packets"].as_f64().unwrap_or(f64::NAN);
            let seconds = recv["seconds"].as_f64().unwrap_or(f64::NAN);
            if std::env::var_os("PALISADE_BENCH_VERBOSE").is_some() {
                let cpu = &json["end"]["cpu_utilization_percent"];
                progress(&format!(
                    "udp: sent {:.0} kpps, received {:.0} kpps, lost {:.1}%, cpu {cpu}",
                    packets / seconds / 1e3,
                    (packets - lost) / seconds / 1e3,
                    lost / packets * 100.0
                ));
            }
            Some((packets - lost) / seconds)
        }
    };
    let sender_cpu = json["end"]["cpu_utilization_percent"]["host_total"]
        .as_f64()
        .unwrap_or(f64::NAN);
    match value {
        Some(v) if v.is_finite() && v > 0.0 => Ok((v, sender_cpu)),
        _ => Err(format!("iperf3: no receiver figure in {recv}").into()),
    }
}

/// [`iperf_once`] with up to two retries (restarting the server before the last).
/// A run in which the sender had less of its CPU than this was disturbed by other work on the
/// machine: the whole path (the sender's syscall, forwarding in softirq, the programs or
/// nftables) runs on the sender's CPU, so an undisturbed run keeps it busy whatever the
/// configuration.
const MIN_SENDER_CPU: f64 = 85.0;

/// [`iperf_once`] until a run is undisturbed (at most 3 runs; if none is, the one whose sender
/// had the most CPU), retrying failures up to twice (restarting the server before the last).
fn iperf(server: &mut IperfServer, b: &Bench<'_>, traffic: Traffic) -> Res<f64> {
    let mut failures = 0;
    let mut disturbed: Vec<(f64, f64)> = Vec::new();
    loop {
        match iperf_once(&b.client_netns, traffic, b.seconds, b.affinity.as_deref()) {
            Ok((v, cpu)) if cpu >= MIN_SENDER_CPU => return Ok(v),
            Ok((v, cpu)) => {
                progress(&format!(
                    "disturbed run (sender CPU {cpu:.0}% < {MIN_SENDER_CPU}%): {v:.0}, again"
                ));
                b.disturbed.set(b.disturbed.get() + 1);
                disturbed.push((v, cpu));
                if disturbed.len() == 3 {
                    disturbed.sort_by(|x, y| x.1.total_cmp(&y.1));
                    return Ok(disturbed[2].0);
                }
            }
            Err(e) => {
                failures += 1;
                progress(&format!("iperf3 attempt failed: {e}"));
                if failures == 3 {
                    return Err(e);
                }
                if failures == 2 {
                    server.restart()?;
                } else {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configurations
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    None,
    Palisade(usize),
    NftVmap(usize),
    NftLinear(usize),
}

impl Setup {
    fn parse(text: &str) -> Res<Self> {
        let size = |n: &str| -> Res<usize> {
            let v = match n.strip_suffix('k') {
                Some(k) => k.parse::<usize>()? * 1000,
                None => n.parse()?,
            };
            if v < 2 {
                return Err("table sizes must be at least 2".into());
            }
            Ok(v)
        };
        if text == "none" {
            Ok(Setup::None)
        } else if let Some(n) = text.strip_prefix("palisade_") {
            Ok(Setup::Palisade(size(n)?))
        } else if let Some(n) = text.strip_prefix("nft_vmap_") {
            Ok(Setup::NftVmap(size(n)?))
        } else if let Some(n) = text.strip_prefix("nft_linear_") {
            Ok(Setup::NftLinear(size(n)?))
        } else {
            Err(format!("unknown configuration {text}").into())
        }
    }

    fn size(self) -> usize {
        match self {
            Setup::None => 0,
            Setup::Palisade(n) | Setup::NftVmap(n) | Setup::NftLinear(n) => n,
        }
    }

    fn name(self) -> String {
        match self {
            Setup::None => "none".to_owned(),
            Setup::Palisade(n) => format!("palisade_{}", short_size(n)),
            Setup::NftVmap(n) => format!("nft_vmap_{}", short_size(n)),
            Setup::NftLinear(n) => format!("nft_linear_{}", short_size(n)),
        }
    }
}

struct Bench<'a> {
    lab: &'a Lab,
    dp: Datapath,
    client_netns: String,
    node_netns: String,
    ifnames: [String; 2],
    server_ifindex: u32,
    attached: bool,
    seconds: u32,
    affinity: Option<String>,
    /// This datapath's two programs (kernel ids).
    prog_ids: Vec<(Hook, u32)>,
    /// iperf3 runs discarded as disturbed.
    disturbed: std::cell::Cell<usize>,
}

impl Bench<'_> {
    fn attach(&mut self) -> Res<()> {
        let dp = &mut self.dp;
        let names = &self.ifnames;
        netns::with_netns(&self.node_netns, || -> Res<()> {
            for n in names {
                dp.attach(n)?;
            }
            Ok(())
        })??;
        self.attached = true;
        Ok(())
    }

    /// Removes the pinned links, then waits (up to 5 s) until the kernel has released them:
    /// a link goes when its last reference does, which for a bpffs pin happens after an RCU
    /// grace period, not when `unlink` returns.
    fn detach(&mut self) -> Res<()> {
        if self.attached {
            for n in &self.ifnames {
                self.dp.detach(n)?;
            }
            self.attached = false;
            let ids: Vec<u64> = self.prog_ids.iter().map(|(_, id)| u64::from(*id)).collect();
            let start = Instant::now();
            loop {
                let out = run("bpftool", &["-j", "link", "show"], None)?;
                let links: Value = serde_json::from_str(&out)?;
                let ours = links
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|l| {
                        l.get("prog_id")
                            .and_then(Value::as_u64)
                            .is_some_and(|p| ids.contains(&p))
                    })
                    .count();
                if ours == 0 {
                    break;
                }
                if start.elapsed() > Duration::from_secs(5) {
                    return Err(format!("{ours} links still attached 5 s after detach").into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Res<String> {
        let mut all = vec!["netns", "exec", self.node_netns.as_str(), "nft"];
        all.extend_from_slice(args);
        run("ip", &all, stdin)
    }

    fn apply(&mut self, setup: Setup) -> Res<()> {
        match setup {
            Setup::None => {}
            Setup::Palisade(n) => {
                let rows = table_rows(&rules(n));
                let written = self
                    .dp
                    .write_table(SERVER_ENDPOINT, Direction::Ingress, &rows)?;
                if written != n {
                    return Err(format!("table of {n} rows became {written} LPM entries").into());
                }
                self.attach()?;
            }
            Setup::NftVmap(n) => {
                self.nft(&["-f", "-"], Some(&nft_script(&rules(n), false)))?;
            }
            Setup::NftLinear(n) => {
                self.nft(&["-f", "-"], Some(&nft_script(&rules(n), true)))?;
            }
        }
        Ok(())
    }

    fn clear(&mut self, setup: Setup) -> Res<()> {
        match setup {
            Setup::None => Ok(()),
            Setup::Palisade(_) => self.detach(),
            Setup::NftVmap(_) | Setup::NftLinear(_) => self
                .nft(&["delete", "table", "ip", NFT_TABLE], None)
                .map(|_| ()),
        }
    }

    /// Whether a TCP connect from the client to the server's closed port is dropped (time-out)
    /// rather than refused (RST): the configuration is enforcing.
    fn closed_port_dropped(&self) -> Res<bool> {
        let addr = SocketAddr::from((SERVER_IP, CLOSED_PORT));
        let r = netns::run_in(&self.client_netns, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(700))
        })?;
        match r {
            Ok(_) => Err("something listens on the closed port".into()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(true),
            Err(e) => Err(format!("probe of the closed port: {e}").into()),
        }
    }

    fn check(&self, setup: Setup) -> Res<()> {
        let dropped = self.closed_port_dropped()?;
        let want = setup != Setup::None;
        if dropped == want {
            Ok(())
        } else {
            Err(format!(
                "{}: a connection to an unlisted port was {} (expected {})",
                setup.name(),
                if dropped { "dropped" } else { "refused" },
                if want { "dropped" } else { "refused" }
            )
            .into())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// BPF run-time statistics
// ---------------------------------------------------------------------------------------------

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled=1` while alive; the previous value is put back on drop.
struct StatsOn {
    previous: String,
}

impl StatsOn {
    fn enable() -> Res<Self> {
        let previous = std::fs::read_to_string(BPF_STATS_SYSCTL)?.trim().to_owned();
        std::fs::write(BPF_STATS_SYSCTL, "1")?;
        Ok(StatsOn { previous })
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS_SYSCTL, &self.previous) {
            eprintln!(
                "cannot restore kernel.bpf_stats_enabled={}: {e}",
                self.previous
            );
        }
    }
}

/// The kernel ids of this datapath's two programs: those of their names that use its pinned
/// `pal_policy` map (other datapaths on the machine load programs of the same names).
fn our_programs(dp: &Datapath) -> Res<Vec<(Hook, u32)>> {
    let policy_map = dp
        .pinned_map_ids()?
        .into_iter()
        .find(|(name, _)| *name == "pal_policy")
        .map(|(_, id)| u64::from(id))
        .ok_or("no pinned pal_policy map")?;
    let out = run("bpftool", &["-j", "prog", "show"], None)?;
    let json: Value = serde_json::from_str(&out)?;
    let mut found = Vec::new();
    for prog in json.as_array().into_iter().flatten() {
        let name = prog.get("name").and_then(Value::as_str).unwrap_or("");
        let Some(hook) = Hook::BOTH.into_iter().find(|h| h.program() == name) else {
            continue;
        };
        let uses_ours = prog
            .get("map_ids")
            .and_then(Value::as_array)
            .is_some_and(|ids| ids.iter().any(|i| i.as_u64() == Some(policy_map)));
        let id = prog.get("id").and_then(Value::as_u64).unwrap_or(0);
        if let (true, Ok(id)) = (uses_ours, u32::try_from(id)) {
            found.push((hook, id));
        }
    }
    for hook in Hook::BOTH {
        if found.iter().filter(|(h, _)| *h == hook).count() != 1 {
            return Err(
                format!("expected one {} program of ours: {found:?}", hook.program()).into(),
            );
        }
    }
    Ok(found)
}

/// (run_time_ns, run_cnt) of a program.
fn prog_stats(id: u32) -> Res<(u64, u64)> {
    let out = run(
        "bpftool",
        &["-j", "prog", "show", "id", &id.to_string()],
        None,
    )?;
    let json: Value = serde_json::from_str(&out)?;
    Ok((
        json.get("run_time_ns").and_then(Value::as_u64).unwrap_or(0),
        json.get("run_cnt").and_then(Value::as_u64).unwrap_or(0),
    ))
}

#[derive(Default, Clone, Copy)]
struct Cost {
    ns: u64,
    runs: u64,
}

impl Cost {
    fn per_run(self) -> f64 {
        if self.runs == 0 {
            f64::NAN
        } else {
            self.ns as f64 / self.runs as f64
        }
    }
}

fn snapshot(ids: &[(Hook, u32)]) -> Res<BTreeMap<u32, (u64, u64)>> {
    ids.iter()
        .map(|(_, id)| Ok((*id, prog_stats(*id)?)))
        .collect()
}

fn delta(
    ids: &[(Hook, u32)],
    hook: Hook,
    before: &BTreeMap<u32, (u64, u64)>,
    after: &BTreeMap<u32, (u64, u64)>,
) -> Cost {
    let mut c = Cost::default();
    for (h, id) in ids {
        if *h != hook {
            continue;
        }
        let (b, a) = (before.get(id), after.get(id));
        if let (Some(b), Some(a)) = (b, a) {
            c.ns += a.0.saturating_sub(b.0);
            c.runs += a.1.saturating_sub(b.1);
        }
    }
    c
}

fn ethernet_ipv4_tcp_syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, TCP, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

struct CostRow {
    size: usize,
    udp_to: Cost,
    udp_from: Cost,
    tcp_to: Cost,
    tcp_from: Cost,
    new_allowed: Cost,
    new_denied: Cost,
}

/// BPF_PROG_TEST_RUN of `to_container` on the server's veth, `runs` times: allowed SYNs of
/// distinct connections (each a conntrack miss, a policy lookup and an insert), then denied
/// SYNs from a filler identity to a port it has no entry for.
fn test_run_costs(
    b: &Bench<'_>,
    ids: &[(Hook, u32)],
    size_index: usize,
    runs: u32,
) -> Res<(Cost, Cost)> {
    let mut out = [Cost::default(); 2];
    for (slot, allowed) in out.iter_mut().zip([true, false]) {
        let before = snapshot(ids)?;
        let dp = &b.dp;
        let ifindex = b.server_ifindex;
        netns::with_netns(&b.node_netns, || -> Res<()> {
            for j in 0..runs {
                let (src, dst) = if allowed {
                    // A destination per run and size: every SYN is a new connection.
                    let base = u32::from(Ipv4Addr::new(10, 77, 0, 0)) + (size_index as u32) * 65536;
                    (CLIENT_IP, Ipv4Addr::from(base + j % 65536))
                } else {
                    (filler_ip(0), SERVER_IP)
                };
                let sport = 20_000 + (j / 65536) as u16;
                let frame = ethernet_ipv4_tcp_syn(src, dst, sport, PORT);
                let verdict = dp.test_run(Hook::ToContainer, ifindex, &frame)?;
                let want = if allowed { TC_ACT_OK } else { TC_ACT_SHOT };
                if verdict != want {
                    return Err(format!(
                        "test run: verdict {verdict}, expected {want} (allowed={allowed})"
                    )
                    .into());
                }
            }
            Ok(())
        })??;
        let after = snapshot(ids)?;
        *slot = delta(ids, Hook::ToContainer, &before, &after);
    }
    Ok((out[0], out[1]))
}

// ---------------------------------------------------------------------------------------------
// Traffic part
// ---------------------------------------------------------------------------------------------

struct TrafficResults {
    setups: Vec<Setup>,
    tcp: BTreeMap<String, Vec<f64>>,
    udp: BTreeMap<String, Vec<f64>>,
    costs: Vec<CostRow>,
    ipcache_entries: usize,
    disturbed: usize,
}

fn traffic(o: &Options) -> Res<TrafficResults> {
    let spec = LabSpec {
        node: NodeSpec {
            name: "bench-node".to_owned(),
            ips: vec![IpAddr::V4(NODE_IP)],
            generated: vec![IpAddr::V4(NODE_IP)],
            ports: Vec::new(),
        },
        pods: ["client", "server"]
            .into_iter()
            .zip([CLIENT_IP, SERVER_IP])
            .map(|(name, ip)| PodSpec {
                namespace: "bench".to_owned(),
                name: name.to_owned(),
                ip: IpAddr::V4(ip),
                ports: Vec::new(),
            })
            .collect(),
        host_pods: Vec::new(),
        externals: Vec::new(),
    };
    let lab = Lab::create(
        &spec,
        &LabOptions {
            kind: LabKind::Run,
            files: Vec::new(),
        },
    )?;
    if let Some(f) = &o.lab_id_file {
        std::fs::write(f, lab.id())?;
    }
    progress(&format!(
        "lab {} up: namespaces {}",
        lab.id(),
        lab.netns().join(" ")
    ));
    let result = traffic_in(o, &lab);
    lab.destroy()?;
    result
}

fn traffic_in(o: &Options, lab: &Lab) -> Res<TrafficResults> {
    let node_netns = lab.node().netns.clone();
    let pods = lab.pods();
    let (Some(client), Some(server)) = (pods.first(), pods.get(1)) else {
        return Err("the lab has no pods".into());
    };
    let pin_dir = o.pin_base.join("traffic");
    let dp = Datapath::open(&pin_dir)?;
    let prog_ids = our_programs(&dp)?;
    let mut b = Bench {
        lab,
        dp,
        client_netns: client.netns.clone(),
        node_netns: node_netns.clone(),
        ifnames: [client.host_ifname.clone(), server.host_ifname.clone()],
        server_ifindex: server.host_ifindex,
        attached: false,
        seconds: o.seconds,
        affinity: o.affinity.clone(),
        prog_ids,
        disturbed: std::cell::Cell::new(0),
    };
    let result = traffic_bench(o, &mut b, client.host_ifindex);
    let _ = b.detach();
    let _ = b.nft(&["delete", "table", "ip", NFT_TABLE], None);
    drop(b);
    let _ = std::fs::remove_dir_all(&pin_dir);
    result
}

fn traffic_bench(o: &Options, b: &mut Bench<'_>, client_ifindex: u32) -> Res<TrafficResults> {
    // Endpoints, and the ipcache: both pods, the node, one address per filler identity.
    b.dp.set_endpoint(
        client_ifindex,
        &endpoint_value(CLIENT_ENDPOINT, CLIENT_IDENTITY, 0, Some(CLIENT_IP), None),
    )?;
    b.dp.set_endpoint(
        b.server_ifindex,
        &endpoint_value(
            SERVER_ENDPOINT,
            SERVER_IDENTITY,
            PAL_EP_F_ENFORCE_INGRESS,
            Some(SERVER_IP),
            None,
        ),
    )?;
    let flag = PAL_IPCACHE_F_ENDPOINT;
    b.dp.set_ipcache(IpNet::from(IpAddr::V4(CLIENT_IP)), CLIENT_IDENTITY, flag)?;
    b.dp.set_ipcache(IpNet::from(IpAddr::V4(SERVER_IP)), SERVER_IDENTITY, flag)?;
    b.dp.set_ipcache(
        IpNet::from(IpAddr::V4(NODE_IP)),
        palisade_identity::reserved::HOST,
        0,
    )?;
    let mut setups = vec![Setup::None];
    setups.extend(o.sizes.iter().map(|n| Setup::Palisade(*n)));
    setups.push(Setup::NftVmap(o.nft_size));
    setups.push(Setup::NftLinear(o.nft_size));
    if let Some(chosen) = &o.setups {
        setups.clone_from(chosen);
    }
    let largest = setups
        .iter()
        .map(|s| s.size())
        .chain(o.sizes.iter().copied())
        .max()
        .unwrap_or(2);
    let mut seen = std::collections::BTreeSet::new();
    for r in rules(largest) {
        if r.identity != CLIENT_IDENTITY && seen.insert(r.identity) {
            b.dp.set_ipcache(IpNet::from(IpAddr::V4(r.src)), r.identity, flag)?;
        }
    }
    let ipcache_entries = b.dp.ipcache_entries()?.len();

    let mut server = IperfServer::start(&b.lab.pods()[1].netns)?;
    let mut tcp: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut udp: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for rep in 0..o.reps {
        for setup in &setups {
            let name = setup.name();
            b.apply(*setup)?;
            let measured = (|| -> Res<(f64, f64)> {
                b.check(*setup)?;
                let t = iperf(&mut server, b, Traffic::Tcp)?;
                let u = iperf(&mut server, b, Traffic::Udp64)?;
                Ok((t, u))
            })();
            b.clear(*setup)?;
            let (t, u) = measured?;
            progress(&format!(
                "rep {}/{} {name:<15} tcp {:>7.2} Gbit/s   udp64 {:>7.1} kpps",
                rep + 1,
                o.reps,
                t / 1e9,
                u / 1e3
            ));
            tcp.entry(name.clone()).or_default().push(t);
            udp.entry(name).or_default().push(u);
        }
    }

    // Per-packet cost, with BPF run-time statistics on.
    let mut costs = Vec::new();
    for (size_index, n) in o.sizes.iter().enumerate() {
        b.apply(Setup::Palisade(*n))?;
        let measured = (|| -> Res<CostRow> {
            let ids = b.prog_ids.clone();
            let _stats = StatsOn::enable()?;
            let s0 = snapshot(&ids)?;
            iperf(&mut server, b, Traffic::Udp64)?;
            let s1 = snapshot(&ids)?;
            iperf(&mut server, b, Traffic::Tcp)?;
            let s2 = snapshot(&ids)?;
            let (new_allowed, new_denied) = test_run_costs(b, &ids, size_index, o.test_runs)?;
            Ok(CostRow {
                size: *n,
                udp_to: delta(&ids, Hook::ToContainer, &s0, &s1),
                udp_from: delta(&ids, Hook::FromContainer, &s0, &s1),
                tcp_to: delta(&ids, Hook::ToContainer, &s1, &s2),
                tcp_from: delta(&ids, Hook::FromContainer, &s1, &s2),
                new_allowed,
                new_denied,
            })
        })();
        b.clear(Setup::Palisade(*n))?;
        let row = measured?;
        progress(&format!(
            "cost {:>6} entries: to_container {:.0} ns/run (udp), new connection {:.0} ns",
            n,
            row.udp_to.per_run(),
            row.new_allowed.per_run()
        ));
        costs.push(row);
    }
    server.stop();
    Ok(TrafficResults {
        setups,
        tcp,
        udp,
        costs,
        ipcache_entries,
        disturbed: b.disturbed.get(),
    })
}

// ---------------------------------------------------------------------------------------------
// Apply → enforced
// ---------------------------------------------------------------------------------------------

const DEPLOYMENTS: [(&str, &str, usize); 5] = [
    ("web", "frontend", 6),
    ("api", "backend", 5),
    ("db", "data", 4),
    ("cache", "data", 3),
    ("worker", "backend", 2),
];

/// The policies of one namespace, the one at `changed` (if any) with its port set to `port`.
/// Index 0 is the default deny; 1–5 are the allows that can change.
fn namespace_policies(ns: &str, changed: Option<(usize, u16)>) -> Vec<String> {
    let port = |idx: usize, default: u16| match changed {
        Some((i, p)) if i == idx => p,
        _ => default,
    };
    let np = |name: &str, app: &str, from: &str, ports: &[u16]| {
        let ports: Vec<String> = ports
            .iter()
            .map(|p| format!("{{protocol: TCP, port: {p}}}"))
            .collect();
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, \
             namespace: {ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  \
             policyTypes: [Ingress]\n  ingress:\n  - from: [{from}]\n    ports: [{}]\n",
            ports.join(", ")
        )
    };
    vec![
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: \
             default-deny, namespace: {ns}}}\nspec:\n  podSelector: {{}}\n  policyTypes: \
             [Ingress]\n"
        ),
        np(
            "allow-web",
            "web",
            "{namespaceSelector: {}}",
            &[port(1, 80), 443],
        ),
        np(
            "allow-api",
            "api",
            "{podSelector: {matchExpressions: [{key: app, operator: In, values: [web, worker]}]}}",
            &[port(2, 8080), 9090],
        ),
        np(
            "allow-db",
            "db",
            "{podSelector: {matchLabels: {app: api}}}",
            &[port(3, 5432)],
        ),
        np(
            "allow-cache",
            "cache",
            "{podSelector: {matchExpressions: [{key: app, operator: In, values: [api, worker]}]}}, \
             {namespaceSelector: {matchLabels: {team: ops}}, podSelector: {matchLabels: {app: worker}}}",
            &[port(4, 6379)],
        ),
        np(
            "allow-metrics",
            "worker",
            "{namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: api}}}",
            &[port(5, 9100)],
        ),
    ]
}

/// The selected deployment of each changeable policy index.
fn policy_app(idx: usize) -> &'static str {
    ["", "web", "api", "db", "cache", "worker"][idx]
}

fn apply_cluster(namespaces: usize) -> String {
    let mut docs = vec![
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\nstatus: \
                         {addresses: [{type: InternalIP, address: 192.168.1.1}]}\n"
            .to_owned(),
    ];
    let mut ip = u32::from(Ipv4Addr::new(10, 100, 0, 1));
    for n in 0..namespaces {
        let ns = format!("team-{n}");
        let team = ["ops", "shop", "pay", "search", "ads"][n % 5];
        let env = if n % 3 == 0 { "dev" } else { "prod" };
        docs.push(format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{team: {team}, \
             env: {env}}}}}\n"
        ));
        for (app, tier, replicas) in DEPLOYMENTS {
            for r in 0..replicas {
                docs.push(format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: {app}-{r}, namespace: {ns}, \
                     labels: {{app: {app}, tier: {tier}}}}}\nspec: {{nodeName: node-1, \
                     containers: [{{name: c}}]}}\nstatus: {{podIP: {}}}\n",
                    Ipv4Addr::from(ip)
                ));
                ip += 1;
            }
        }
        docs.extend(namespace_policies(&ns, None));
    }
    docs.join("---\n")
}

struct ApplyResults {
    pods: usize,
    policies: usize,
    table_entries: usize,
    initial_sync: Duration,
    samples: Vec<f64>,
    parse: Vec<f64>,
    engine: Vec<f64>,
    sync: Vec<f64>,
    tables_per_change: Vec<f64>,
    /// Median ms of one `write_table` of 2 rows, of 1,000 rows, and of one `remove_table`.
    swap_small: f64,
    swap_large: f64,
    remove: f64,
    recompute: Recompute,
    /// 6 swaps from 6 threads at once, and one after the other (medians, ms).
    parallel6: (f64, f64),
}

/// What the sync recomputes on every call: each attached pod's two tables → rows → LPM
/// entries (sorted), for every pod, and the same work done once per distinct table.
struct Recompute {
    all_ms: f64,
    distinct_ms: f64,
    tables: usize,
    distinct: usize,
}

fn recompute_cost(engine: &Engine, pods: &[(String, String)]) -> Recompute {
    let one = |table: &palisade_policy::table::Table| {
        let mut lpm = palisade_datapath::lpm_entries(&palisade_agent::sync::table_entries(table));
        lpm.sort_unstable();
        lpm.len()
    };
    let mut all = Vec::new();
    let mut distinct_times = Vec::new();
    let (mut tables, mut distinct) = (0, 0);
    for _ in 0..5 {
        let t = Instant::now();
        tables = 0;
        for (ns, name) in pods {
            for dir in palisade_policy::Direction::BOTH {
                let table = engine.pod_table(ns, name, dir).unwrap_or_default();
                std::hint::black_box(one(&table));
                tables += 1;
            }
        }
        all.push(ms(t.elapsed()));
        let t = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for (ns, name) in pods {
            for dir in palisade_policy::Direction::BOTH {
                if let Some(table) = engine.pod_table(ns, name, dir) {
                    if seen.insert(std::sync::Arc::as_ptr(&table)) {
                        std::hint::black_box(one(&table));
                    }
                }
            }
        }
        distinct = seen.len();
        distinct_times.push(ms(t.elapsed()));
    }
    Recompute {
        all_ms: median(&all),
        distinct_ms: median(&distinct_times),
        tables,
        distinct,
    }
}

/// Times `write_table` (create an LPM map, fill it, swap it into `pal_policy`) and
/// `remove_table` on an endpoint id no sync uses.
fn swap_costs(dp: &mut Datapath) -> Res<(f64, f64, f64)> {
    const SPARE: u32 = 999_999;
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut remove = Vec::new();
    for _ in 0..15 {
        for (rows, out) in [(2, &mut small), (1000, &mut large)] {
            let rows = table_rows(&rules(rows));
            let t = Instant::now();
            dp.write_table(SPARE, Direction::Egress, &rows)?;
            out.push(ms(t.elapsed()));
        }
        let t = Instant::now();
        dp.remove_table(SPARE, Direction::Egress)?;
        remove.push(ms(t.elapsed()));
    }
    Ok((median(&small), median(&large), median(&remove)))
}

/// `k` table swaps issued at once from `k` threads (each with its own handle on the same pinned
/// maps), against the same `k` one after the other: whether a swap's cost is work or waiting
/// (each update of a map of maps waits for an RCU grace period before it returns).
fn parallel_swaps(pin_dir: &std::path::Path, k: usize) -> Res<(f64, f64)> {
    const SPARE: u32 = 900_000;
    let mut handles = (0..k)
        .map(|_| Datapath::open(pin_dir))
        .collect::<Result<Vec<_>, _>>()?;
    let rows = table_rows(&rules(2));
    let mut parallel = Vec::new();
    let mut sequential = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let results: Vec<Res<usize>> = std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .iter_mut()
                .enumerate()
                .map(|(i, dp)| {
                    let rows = &rows;
                    s.spawn(move || dp.write_table(SPARE + i as u32, Direction::Egress, rows))
                })
                .collect();
            joins
                .into_iter()
                .map(|j| match j.join() {
                    Ok(r) => r.map_err(Into::into),
                    Err(_) => Err("a swap thread panicked".into()),
                })
                .collect()
        });
        parallel.push(ms(t.elapsed()));
        for r in results {
            r?;
        }
        let t = Instant::now();
        for (i, dp) in handles.iter_mut().enumerate() {
            dp.write_table(SPARE + i as u32, Direction::Egress, &rows)?;
        }
        sequential.push(ms(t.elapsed()));
    }
    if let Some(dp) = handles.first_mut() {
        for i in 0..k {
            dp.remove_table(SPARE + i as u32, Direction::Egress)?;
        }
    }
    Ok((median(&parallel), median(&sequential)))
}

fn apply_bench(o: &Options) -> Res<ApplyResults> {
    let text = apply_cluster(o.apply_namespaces);
    let bundle = palisade_policy_api::load_str("apply-bench.yaml", &text)
        .map_err(|d| format!("workload: {d:?}"))?;
    let loaded =
        cluster::load(&bundle, Config::default()).map_err(|d| format!("workload: {d:?}"))?;
    let mut engine: Engine = loaded.engine;
    let policies = loaded.policies.len();
    let mut pods: Vec<(String, String)> = engine
        .pods()
        .map(|p| (p.namespace.clone(), p.name.clone()))
        .collect();
    pods.sort();
    let attachments: Vec<Attachment> = pods
        .iter()
        .enumerate()
        .map(|(i, (ns, name))| Attachment {
            namespace: ns.clone(),
            name: name.clone(),
            // Made-up interfaces: the programs are attached nowhere.
            ifindex: 1_000_000 + i as u32,
        })
        .collect();

    let pin_dir = o.pin_base.join("apply");
    let result = (|| -> Res<ApplyResults> {
        let mut dp = Datapath::open(&pin_dir)?;
        let mut sync = DatapathSync::new();
        let audit = AuditConfig::default();
        let t = Instant::now();
        let first = sync.sync(&mut dp, &engine, "node-1", &attachments, &audit)?;
        let initial_sync = t.elapsed();
        progress(&format!(
            "apply: {} pods, {policies} policies, initial sync {:.0} ms ({} tables, {} LPM \
             entries)",
            pods.len(),
            ms(initial_sync),
            first.tables_written,
            first.table_entries
        ));

        let (swap_small, swap_large, remove) = swap_costs(&mut dp)?;
        let recompute = recompute_cost(&engine, &pods);
        let parallel6 = parallel_swaps(&pin_dir, 6)?;
        let mut r = ApplyResults {
            pods: pods.len(),
            policies,
            table_entries: first.table_entries,
            initial_sync,
            samples: Vec::new(),
            parse: Vec::new(),
            engine: Vec::new(),
            sync: Vec::new(),
            tables_per_change: Vec::new(),
            swap_small,
            swap_large,
            remove,
            recompute,
            parallel6,
        };
        for round in 0..o.apply_rounds {
            let ns = format!("team-{}", round % o.apply_namespaces);
            let idx = 1 + (round / o.apply_namespaces + round) % 5;
            let new_port = 20_000 + round as u16;
            let doc = namespace_policies(&ns, Some((idx, new_port))).swap_remove(idx);

            let t0 = Instant::now();
            let bundle = palisade_policy_api::load_str("change.yaml", &doc)
                .map_err(|d| format!("change: {d:?}"))?;
            let mut compiled = Vec::new();
            for m in &bundle.manifests {
                if let Object::NetworkPolicy(p) = &m.object {
                    compiled.push(compile::network_policy(p).map_err(|e| format!("{e:?}"))?);
                }
            }
            let t1 = Instant::now();
            for c in compiled {
                engine.upsert_policy(c)?;
            }
            engine.commit();
            let t2 = Instant::now();
            let stats = sync.sync(&mut dp, &engine, "node-1", &attachments, &audit)?;
            let t3 = Instant::now();

            // Check that the kernel holds the new port for a selected pod.
            let pod = format!("{}-0", policy_app(idx));
            let id = sync
                .endpoint_id(&ns, &pod)
                .ok_or_else(|| format!("no endpoint id for {ns}/{pod}"))?;
            let table = dp.read_table(id, Direction::Ingress)?.unwrap_or_default();
            if !table
                .iter()
                .any(|(k, _)| k.protocol == TCP && k.dport == new_port.to_be_bytes())
            {
                return Err(
                    format!("round {round}: {ns}/{pod} has no entry for {new_port}").into(),
                );
            }
            r.samples.push(ms(t3 - t0));
            r.parse.push(ms(t1 - t0));
            r.engine.push(ms(t2 - t1));
            r.sync.push(ms(t3 - t2));
            r.tables_per_change.push(stats.tables_written as f64);
        }
        Ok(r)
    })();
    let _ = std::fs::remove_dir_all(&pin_dir);
    result
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn report(o: &Options, t: Option<&TrafficResults>, a: Option<&ApplyResults>) {
    let mut ratios = BTreeMap::new();
    if let Some(t) = t {
        let none_tcp = median(t.tcp.get("none").map_or(&[][..], |v| &v[..]));
        let none_udp = median(t.udp.get("none").map_or(&[][..], |v| &v[..]));
        println!();
        println!(
            "Traffic between two lab pods, {} s per run, median of {} interleaved runs \
             ({} runs redone: sender CPU < {MIN_SENDER_CPU}%)",
            o.seconds, o.reps, t.disturbed
        );
        println!(
            "{:<16} {:>12} {:>9} {:>14} {:>9}   runs (kpps)",
            "configuration", "TCP Gbit/s", "vs none", "UDP-64 kpps", "vs none"
        );
        let mut printed = std::collections::HashSet::new();
        for s in &t.setups {
            let name = s.name();
            if !printed.insert(name.clone()) {
                continue;
            }
            let tv = t.tcp.get(&name).map_or(&[][..], |v| &v[..]);
            let uv = t.udp.get(&name).map_or(&[][..], |v| &v[..]);
            let (tm, um) = (median(tv), median(uv));
            let runs: Vec<String> = uv.iter().map(|v| format!("{:.0}", v / 1e3)).collect();
            println!(
                "{name:<16} {:>12.2} {:>9.3} {:>14.1} {:>9.3}   {}",
                tm / 1e9,
                tm / none_tcp,
                um / 1e3,
                um / none_udp,
                runs.join(" ")
            );
            ratios.insert(name, um / none_udp);
        }
        println!();
        println!(
            "Program cost (BPF run-time stats; ns per program run; ipcache {} entries)",
            t.ipcache_entries
        );
        println!(
            "{:>8} {:>12} {:>12} {:>12} {:>12} {:>14} {:>14}",
            "entries",
            "to_c udp",
            "from_c udp",
            "to_c tcp",
            "from_c tcp",
            "new conn allow",
            "new conn deny"
        );
        for c in &t.costs {
            println!(
                "{:>8} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>14.1} {:>14.1}",
                c.size,
                c.udp_to.per_run(),
                c.udp_from.per_run(),
                c.tcp_to.per_run(),
                c.tcp_from.per_run(),
                c.new_allowed.per_run(),
                c.new_denied.per_run()
            );
            println!(
                "{:>8} {:>12} {:>12} {:>12} {:>12} {:>14} {:>14}",
                "(runs)",
                c.udp_to.runs,
                c.udp_from.runs,
                c.tcp_to.runs,
                c.tcp_from.runs,
                c.new_allowed.runs,
                c.new_denied.runs
            );
        }
    }
    let mut p99 = f64::NAN;
    if let Some(a) = a {
        let mut s = a.samples.clone();
        s.sort_by(f64::total_cmp);
        p99 = percentile(&s, 99.0);
        println!();
        println!(
            "Apply → enforced: {} pods (endpoints), {} policies, {} LPM entries in the kernel; \
             initial sync {:.0} ms",
            a.pods,
            a.policies,
            a.table_entries,
            ms(a.initial_sync)
        );
        println!(
            "{} changes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; medians: parse+compile \
             {:.3} ms, engine upsert+commit {:.3} ms, sync {:.2} ms; tables written per change: \
             median {:.0}",
            s.len(),
            percentile(&s, 50.0),
            p99,
            s.last().copied().unwrap_or(f64::NAN),
            median(&a.parse),
            median(&a.engine),
            median(&a.sync),
            median(&a.tables_per_change)
        );
        println!(
            "one table swap (write_table): {:.2} ms for 2 rows, {:.2} ms for 1,000 rows; \
             remove_table {:.2} ms (medians of 15)",
            a.swap_small, a.swap_large, a.remove
        );
        println!(
            "6 swaps issued together from 6 threads: {:.1} ms; the same 6 one after the \
             other: {:.1} ms",
            a.parallel6.0, a.parallel6.1
        );
        println!(
            "recomputing every endpoint's rows and LPM entries (as each sync does): {:.1} ms \
             for {} tables; once per distinct table ({}): {:.1} ms",
            a.recompute.all_ms, a.recompute.tables, a.recompute.distinct, a.recompute.distinct_ms
        );
    }
    let r = |key: &str| ratios.get(key).copied().unwrap_or(f64::NAN);
    let pal = format!(
        "palisade_{}",
        short_size(o.sizes.iter().copied().max().unwrap_or(0))
    );
    let vmap = format!("nft_vmap_{}", short_size(o.nft_size));
    let linear = format!("nft_linear_{}", short_size(o.nft_size));
    println!();
    println!(
        "datapath: palisade_10k/none={:.2} nft_vmap/none={:.2} nft_linear/none={:.2} \
         apply_p99_ms={:.1}",
        r(&pal),
        r(&vmap),
        r(&linear),
        p99
    );
}

fn main() -> ExitCode {
    let o = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("datapath_bench: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = palisade_lab::install_signal_cleanup() {
        eprintln!("datapath_bench: {e}");
        return ExitCode::FAILURE;
    }
    let t = if o.traffic {
        match traffic(&o) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("datapath_bench: traffic: {e}");
                let _ = std::fs::remove_dir_all(&o.pin_base);
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let a = if o.apply {
        match apply_bench(&o) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("datapath_bench: apply: {e}");
                let _ = std::fs::remove_dir_all(&o.pin_base);
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&o.pin_base);
    report(&o, t.as_ref(), a.as_ref());
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_sets_have_the_asked_size_and_end_with_the_client() {
        for n in [2, 10, 1000] {
            let r = rules(n);
            assert_eq!(r.len(), n);
            assert_eq!(r[n - 1].identity, CLIENT_IDENTITY);
            assert_eq!(
                palisade_datapath::lpm_entries(&table_rows(&r)).len(),
                n,
                "one LPM entry per row"
            );
        }
        let s = nft_script(&rules(10), false);
        assert!(s.contains("10.0.1.1 . udp . 5201 : accept\n"));
        assert!(nft_script(&rules(10), true).contains("ip saddr 10.0.1.1 tcp dport 5201 accept"));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&v, 50.0) - 50.0).abs() < f64::EPSILON);
        assert!((percentile(&v, 99.0) - 99.0).abs() < f64::EPSILON);
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < f64::EPSILON);
    }
}
