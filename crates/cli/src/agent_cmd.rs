//! `palisade agent`: runs the agent in the foreground (root).

use std::path::PathBuf;
use std::process::ExitCode;

use palisade_agent::protocol::{DEFAULT_BPF_PIN_DIR, DEFAULT_SOCKET, DEFAULT_STATE_DIR};
use palisade_agent::telemetry::{RateLimit, DEFAULT_EVENTS_RATE_LIMIT, DEFAULT_FLOW_BUFFER};
use palisade_agent::Options;

#[derive(clap::Args)]
pub struct Args {
    /// Where the desired state (applied objects, endpoints, settings) is kept.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The API socket (root only).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// bpffs directory of the datapath's pinned maps and links.
    #[arg(long, default_value = DEFAULT_BPF_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// Audit mode for every endpoint: policy denials pass and are reported as AUDIT.
    /// Stored: `--policy-audit-mode=false` turns it off again; without the flag the stored
    /// setting holds.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub policy_audit_mode: Option<bool>,
    /// This node's name (default: the host name). Pods without spec.nodeName run here.
    #[arg(long)]
    pub node_name: Option<String>,
    /// Cluster name carried by every pod (io.cilium.k8s.policy.cluster).
    #[arg(long, default_value = "default")]
    pub cluster_name: String,
    /// How many flows the agent keeps for `palisade observe` (the oldest go first).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_FLOW_BUFFER as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub flow_buffer: u32,
    /// Flow events per second each CPU's datapath may send (0: no limit); the events over it
    /// are counted as lost (`palisade status`, palisade_flows_lost_total). Counters of every
    /// packet are kept whatever the limit.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_EVENTS_RATE_LIMIT)]
    pub events_rate_limit: u64,
    /// Flow events each CPU may send at once after a quiet time (default: twice the rate).
    #[arg(long, value_name = "N")]
    pub events_burst: Option<u64>,
    /// Serve Prometheus metrics on http://ADDR/metrics: HOST:PORT, [IPV6]:PORT, or :PORT for
    /// every address (as Cilium's flag).
    #[arg(long, value_name = "ADDR")]
    pub prometheus_serve_addr: Option<String>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| palisade_policy::cluster::DEFAULT_NODE.to_owned())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let options = Options {
        state_dir: args.state_dir,
        socket: args.socket,
        bpf_pin_dir: args.bpf_pin_dir,
        policy_audit_mode: args.policy_audit_mode,
        node_name: args.node_name.unwrap_or_else(hostname),
        cluster_name: args.cluster_name,
        flow_buffer: usize::try_from(args.flow_buffer).unwrap_or(usize::MAX),
        events_rate_limit: RateLimit::new(args.events_rate_limit, args.events_burst),
        prometheus_serve_addr: args.prometheus_serve_addr,
    };
    palisade_agent::server::run(options)?;
    Ok(ExitCode::SUCCESS)
}
