//! `palisade`: the command-line interface.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agent_cmd;
mod api_cmd;
mod lab_cmd;
mod observe_cmd;
mod output;
mod policy_cmd;
mod simulate_cmd;

/// Zero-trust network policy for containers: Kubernetes, Cilium and more, in one engine.
#[derive(Parser)]
#[command(name = "palisade", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Judge a ConnectivityTest's probes offline against the policies.
    Simulate(simulate_cmd::Args),
    /// Inspect policies: validate, explain a verdict, show an endpoint's table.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Run a ConnectivityTest for real in network namespaces (root): run, up, exec, down.
    #[command(subcommand)]
    Lab(lab_cmd::LabCommand),
    /// Run the agent (root): desired state on disk, a root-only API socket, the eBPF datapath
    /// kept in step; enforcement continues when it stops.
    Agent(agent_cmd::Args),
    /// Apply manifests through the agent, as one batch: all or nothing.
    Apply(api_cmd::FilesArgs),
    /// Delete the objects the manifests name, through the agent.
    Delete(api_cmd::FilesArgs),
    /// List the agent's endpoints, identities or policies.
    Get(api_cmd::GetArgs),
    /// The agent's state: revision, datapath sync, apply→enforced times, startup reconcile.
    Status(api_cmd::StatusArgs),
    /// Attach, detach and configure endpoints (pods) through the agent.
    #[command(subcommand)]
    Endpoint(api_cmd::EndpointCommand),
    /// Show flows the datapath judged (from the agent, or a file): filters as in hubble.
    Observe(Box<observe_cmd::Args>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Simulate(args) => simulate_cmd::run(&args),
        Command::Policy(cmd) => policy_cmd::run(cmd),
        Command::Lab(cmd) => lab_cmd::run(cmd),
        Command::Observe(args) => observe_cmd::run(&args),
        Command::Agent(args) => agent_cmd::run(args),
        Command::Apply(args) => api_cmd::apply(&args),
        Command::Delete(args) => api_cmd::delete(&args),
        Command::Get(args) => api_cmd::get(&args),
        Command::Status(args) => api_cmd::status(&args),
        Command::Endpoint(cmd) => api_cmd::endpoint(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
