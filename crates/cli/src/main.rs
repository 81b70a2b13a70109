//! `palisade`: the command-line interface.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod lab_cmd;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Simulate(args) => simulate_cmd::run(&args),
        Command::Policy(cmd) => policy_cmd::run(cmd),
        Command::Lab(cmd) => lab_cmd::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
