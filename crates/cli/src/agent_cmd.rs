//! `palisade agent`: runs the agent in the foreground (root).

use std::path::PathBuf;
use std::process::ExitCode;

use palisade_agent::protocol::{DEFAULT_BPF_PIN_DIR, DEFAULT_SOCKET, DEFAULT_STATE_DIR};
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
    };
    palisade_agent::server::run(options)?;
    Ok(ExitCode::SUCCESS)
}
