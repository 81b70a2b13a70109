//! `palisade simulate`.

use std::path::PathBuf;
use std::process::ExitCode;

use palisade_policy::cluster;
use palisade_policy::simulate::{self, Report};
use palisade_policy::Config;
use palisade_policy_api::scenario::Expectation;

use crate::output::{print_diagnostics, print_table, Format, Style};

#[derive(clap::Args)]
pub struct Args {
    /// Manifest files or directories (recursive); repeat for more.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Format,
    /// Cluster name carried by every pod (io.cilium.k8s.policy.cluster).
    #[arg(long, default_value = "default")]
    pub cluster_name: String,
}

/// Loads manifests into an engine, printing diagnostics; `None` means exit 2.
pub fn load(files: &[PathBuf]) -> Option<palisade_policy_api::Bundle> {
    match palisade_policy_api::load_paths(files) {
        Ok(bundle) => {
            print_diagnostics(&bundle.warnings);
            Some(bundle)
        }
        Err(diags) => {
            print_diagnostics(&diags);
            eprintln!("{} error(s); nothing was run", diags.len());
            None
        }
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let Some(bundle) = load(&args.files) else {
        return Ok(ExitCode::from(2));
    };
    let config = Config {
        cluster: args.cluster_name.clone(),
        ..Config::default()
    };
    let loaded = match cluster::load(&bundle, config) {
        Ok(l) => l,
        Err(diags) => {
            print_diagnostics(&diags);
            return Ok(ExitCode::from(2));
        }
    };
    if loaded.tests.is_empty() {
        eprintln!("error: the input holds no palisade.dev/v1alpha1 ConnectivityTest");
        return Ok(ExitCode::from(2));
    }
    // Plan every probe first: a wrong reference anywhere runs nothing.
    let mut planned = Vec::new();
    let mut errors = Vec::new();
    for (m, t) in &loaded.tests {
        match simulate::plan(&loaded.engine, m, t) {
            Ok(p) => planned.push((*t, p)),
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        print_diagnostics(&errors);
        eprintln!("{} error(s); nothing was run", errors.len());
        return Ok(ExitCode::from(2));
    }
    let mut results = Vec::new();
    for (t, p) in &planned {
        results.extend(simulate::run(&loaded.engine, t, p));
    }
    let report = Report::for_tests(&loaded.tests, results);
    print_report(&report, args.output)?;
    Ok(if report.summary.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints a report in the chosen format (shared with `lab run`).
pub fn print_report(report: &Report, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(report)?),
        Format::Yaml => print!("{}", crate::output::to_yaml(&serde_json::to_value(report)?)),
        Format::Table => {
            let style = Style::stdout();
            let mut rows = vec![[
                "FROM", "TO", "PORT", "L7", "EXPECT", "VERDICT", "RESULT", "REASON",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>()];
            for r in &report.results {
                let to =
                    r.to.clone()
                        .or_else(|| r.to_ip.clone())
                        .or_else(|| r.to_fqdn.clone())
                        .unwrap_or_default();
                let port = match &r.port {
                    Some(p) => format!(
                        "{}/{}",
                        p.as_str().map_or_else(|| p.to_string(), str::to_owned),
                        r.protocol
                    ),
                    None => r.protocol.clone(),
                };
                let l7 = if let Some(h) = &r.http {
                    format!(
                        "{} {}",
                        h.method.as_deref().unwrap_or("GET"),
                        h.path.as_deref().unwrap_or("/")
                    )
                } else if let Some(k) = &r.kafka {
                    format!(
                        "kafka {} {}",
                        k.role.as_deref().or(k.api_key.as_deref()).unwrap_or(""),
                        k.topic.as_deref().unwrap_or("")
                    )
                } else if let Some(d) = &r.dns {
                    format!("dns {}", d.name)
                } else {
                    "-".to_owned()
                };
                let result = match r.pass {
                    Some(true) => style.green("pass"),
                    Some(false) => style.red("FAIL"),
                    None => "-".to_owned(),
                };
                rows.push(vec![
                    r.from.clone(),
                    to,
                    port,
                    l7,
                    r.expect.map_or("-", Expectation::as_str).to_owned(),
                    r.verdict.as_str().to_owned(),
                    result,
                    r.reason.clone(),
                ]);
            }
            print_table(&rows);
            println!();
            let s = &report.summary;
            println!(
                "{} passed, {} failed, {} unchecked",
                s.passed, s.failed, s.unchecked
            );
        }
    }
    Ok(())
}
