//! `palisade policy validate | explain | get`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail};
use serde::Serialize;

use palisade_identity::Identity;
use palisade_policy::cluster;
use palisade_policy::eval::{self, describe, identity_name, rule_name, Party};
use palisade_policy::model::{proto, Action, Direction};
use palisade_policy::table::{Decision, L7Decision, Table, ANY_IDENTITY};
use palisade_policy::{Config, Engine};

use crate::output::{print_diagnostics, print_table, to_yaml, Format, Style};
use crate::simulate_cmd::load;

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Check manifests as each project's validator would; print errors and warnings.
    Validate {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Explain the verdict for one connection: every rule that contributed, both directions.
    Explain(ExplainArgs),
    /// Show an endpoint's resolved table.
    Get(GetArgs),
}

#[derive(clap::Args)]
pub struct ExplainArgs {
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Source: NAMESPACE/POD, node/NAME or an IP address.
    #[arg(long)]
    from: String,
    /// Destination: NAMESPACE/POD, node/NAME or an IP address.
    #[arg(long)]
    to: String,
    /// PORT[/PROTOCOL] (TCP default; UDP, SCTP), or TYPE/ICMP.
    #[arg(long)]
    port: String,
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Format,
}

#[derive(clap::Args)]
pub struct GetArgs {
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// NAMESPACE/POD or node/NAME.
    #[arg(long)]
    endpoint: String,
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Format,
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Validate { files } => Ok(validate(&files)),
        PolicyCommand::Explain(a) => explain(&a),
        PolicyCommand::Get(a) => get(&a),
    }
}

fn load_engine(files: &[PathBuf]) -> Option<Engine> {
    let bundle = load(files)?;
    match cluster::load(&bundle, Config::default()) {
        Ok(l) => Some(l.engine),
        Err(d) => {
            print_diagnostics(&d);
            None
        }
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let Some(bundle) = load(files) else {
        return ExitCode::from(2);
    };
    if let Err(d) = cluster::compile_policies(&bundle) {
        print_diagnostics(&d);
        return ExitCode::from(2);
    }
    println!(
        "{} object(s) valid{}",
        bundle.manifests.len(),
        if bundle.warnings.is_empty() {
            String::new()
        } else {
            format!(", {} warning(s)", bundle.warnings.len())
        }
    );
    ExitCode::SUCCESS
}

fn parse_party(s: &str) -> anyhow::Result<Party> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Party::Ip(ip));
    }
    match s.split_once('/') {
        Some(("node", n)) => Ok(Party::Node(n.to_owned())),
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() => Ok(Party::Pod {
            namespace: ns.to_owned(),
            name: pod.to_owned(),
        }),
        _ => bail!("{s:?}: expected NAMESPACE/POD, node/NAME or an IP address"),
    }
}

fn parse_port(s: &str, v6: bool) -> anyhow::Result<(u8, u16)> {
    let (num, pr) = s.split_once('/').unwrap_or((s, "TCP"));
    let pr = match pr.to_ascii_uppercase().as_str() {
        "TCP" => proto::TCP,
        "UDP" => proto::UDP,
        "SCTP" => proto::SCTP,
        "ICMP" => {
            if v6 {
                proto::ICMPV6
            } else {
                proto::ICMP
            }
        }
        "ICMPV6" => proto::ICMPV6,
        other => bail!("unsupported protocol {other:?}"),
    };
    let n: u16 = num.parse().map_err(|_| anyhow!("invalid port {num:?}"))?;
    Ok((pr, n))
}

#[derive(Serialize)]
struct ExplainDirection {
    direction: Direction,
    endpoint: String,
    peer_identity: Identity,
    peer: String,
    decision: &'static str,
    reason: String,
    /// Every rule of the table that matches this connection, allow and deny.
    rules: Vec<ExplainRule>,
    default_deny_by: Vec<String>,
}

#[derive(Serialize)]
struct ExplainRule {
    rule: String,
    action: Action,
    l7: Option<String>,
}

#[derive(Serialize)]
struct Explanation {
    from: String,
    to: String,
    protocol: &'static str,
    port: u16,
    verdict: &'static str,
    directions: Vec<ExplainDirection>,
}

fn decision_word(d: &Decision) -> &'static str {
    match d {
        Decision::Allowed {
            l7: L7Decision::Restricted(_),
            ..
        } => "allowed (L7 rules apply)",
        Decision::Allowed { .. } | Decision::NotEnforced => "allowed",
        Decision::Denied { .. } => "denied",
        Decision::DefaultDenied { .. } => "dropped (default deny)",
    }
}

fn explain(a: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let Some(engine) = load_engine(&a.files) else {
        return Ok(ExitCode::from(2));
    };
    let from = parse_party(&a.from)?;
    let to = parse_party(&a.to)?;
    let v6 = matches!(to, Party::Ip(IpAddr::V6(_)));
    let (pr, port) = parse_port(&a.port, v6)?;
    let v = eval::evaluate(&engine, &from, &to, pr, port, None)?;
    let mut directions = Vec::new();
    for (dir, part, peer) in [
        (Direction::Egress, &v.egress, v.dst_identity),
        (Direction::Ingress, &v.ingress, v.src_identity),
    ] {
        let Some((who, d)) = part else { continue };
        let table = table_for(&engine, who, dir);
        let rules = table
            .as_deref()
            .map(|t| matching_rules(&engine, t, peer, pr, port))
            .unwrap_or_default();
        directions.push(ExplainDirection {
            direction: dir,
            endpoint: who.clone(),
            peer_identity: peer,
            peer: identity_name(&engine, peer),
            decision: decision_word(d),
            reason: describe(&engine, who, dir, d),
            rules,
            default_deny_by: table
                .map(|t| {
                    t.default_deny_by
                        .iter()
                        .map(|r| rule_name(&engine, *r))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    let verdict = if v.same_endpoint {
        "allowed (same endpoint)"
    } else if v.allowed() {
        "allowed"
    } else {
        "dropped"
    };
    let ex = Explanation {
        from: a.from.clone(),
        to: a.to.clone(),
        protocol: proto::name(pr),
        port,
        verdict,
        directions,
    };
    match a.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&ex)?),
        Format::Yaml => print!("{}", to_yaml(&serde_json::to_value(&ex)?)),
        Format::Table => {
            let style = Style::stdout();
            let verdict = if v.allowed() {
                style.green(ex.verdict)
            } else {
                style.red(ex.verdict)
            };
            println!(
                "{} → {} {}/{}: {verdict}",
                ex.from, ex.to, ex.port, ex.protocol
            );
            for d in &ex.directions {
                println!();
                println!(
                    "{} of {} (peer identity {}): {}",
                    style.bold(d.direction.as_str()),
                    d.endpoint,
                    d.peer,
                    d.decision
                );
                println!("  {}", d.reason);
                for r in &d.rules {
                    let l7 = r.l7.as_ref().map(|l| format!(" [{l}]")).unwrap_or_default();
                    let action = match r.action {
                        Action::Allow => "allow",
                        Action::Deny => "deny ",
                    };
                    println!("  {action} {}{l7}", r.rule);
                }
                for r in &d.default_deny_by {
                    println!("  default-deny {r}");
                }
            }
        }
    }
    Ok(if v.allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn table_for(engine: &Engine, who: &str, dir: Direction) -> Option<std::sync::Arc<Table>> {
    match who.split_once('/') {
        Some(("node", n)) => engine.node_table(n, dir),
        Some((ns, pod)) => engine.pod_table(ns, pod, dir),
        None => None,
    }
}

fn matching_rules(
    engine: &Engine,
    t: &Table,
    peer: Identity,
    pr: u8,
    port: u16,
) -> Vec<ExplainRule> {
    let mut out: Vec<ExplainRule> = Vec::new();
    for id in [peer, ANY_IDENTITY] {
        for e in t.entries.get(&id).into_iter().flatten() {
            let covers = e.proto == 0 || (e.proto == pr && e.lo <= port && port <= e.hi);
            if !covers {
                continue;
            }
            for c in &e.contribs {
                let rule = rule_name(engine, c.rule);
                if out.iter().any(|r| r.rule == rule && r.action == c.action) {
                    continue;
                }
                out.push(ExplainRule {
                    rule,
                    action: c.action,
                    l7: c.l7.as_ref().map(ToString::to_string),
                });
            }
        }
    }
    out
}

#[derive(Serialize)]
struct TableDump {
    endpoint: String,
    identity: Option<Identity>,
    labels: Option<String>,
    ingress_enforced: bool,
    egress_enforced: bool,
    entries: Vec<EntryRow>,
}

#[derive(Serialize)]
struct EntryRow {
    direction: Direction,
    identity: Identity,
    peer: String,
    protocol: &'static str,
    ports: String,
    verdict: &'static str,
    l7: Option<String>,
    rules: Vec<String>,
}

fn get(a: &GetArgs) -> anyhow::Result<ExitCode> {
    let Some(engine) = load_engine(&a.files) else {
        return Ok(ExitCode::from(2));
    };
    let party = parse_party(&a.endpoint)?;
    let (who, identity, tables) = match &party {
        Party::Pod { namespace, name } => {
            let pod = engine
                .pod(namespace, name)
                .ok_or_else(|| anyhow!("no pod {namespace}/{name}"))?;
            if pod.host_network {
                bail!(
                    "{namespace}/{name} uses the host network: see node/{}",
                    pod.node
                );
            }
            let t = Direction::BOTH.map(|d| engine.pod_table(namespace, name, d));
            (
                format!("{namespace}/{name}"),
                engine.pod_identity(namespace, name),
                t,
            )
        }
        Party::Node(n) => {
            engine.node(n).ok_or_else(|| anyhow!("no node {n}"))?;
            (
                format!("node/{n}"),
                Some(palisade_identity::reserved::HOST),
                Direction::BOTH.map(|d| engine.node_table(n, d)),
            )
        }
        Party::Ip(_) => bail!("--endpoint takes NAMESPACE/POD or node/NAME"),
    };
    let mut entries = Vec::new();
    for (dir, table) in Direction::BOTH.iter().zip(tables.iter()) {
        let Some(t) = table else { continue };
        let mut ids: Vec<&Identity> = t.entries.keys().collect();
        ids.sort();
        for id in ids {
            for e in &t.entries[id] {
                entries.push(entry_row(
                    &engine,
                    *dir,
                    *id,
                    identity_name(&engine, *id),
                    e,
                ));
            }
        }
        for (pattern, es) in &t.fqdn {
            for e in es {
                entries.push(entry_row(&engine, *dir, 0, format!("fqdn:{pattern}"), e));
            }
        }
    }
    let dump = TableDump {
        endpoint: who,
        identity,
        labels: identity
            .and_then(|i| engine.identity_labels(i))
            .map(ToString::to_string),
        ingress_enforced: tables[0].as_ref().is_some_and(|t| t.enforcing),
        egress_enforced: tables[1].as_ref().is_some_and(|t| t.enforcing),
        entries,
    };
    match a.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&dump)?),
        Format::Yaml => print!("{}", to_yaml(&serde_json::to_value(&dump)?)),
        Format::Table => {
            println!(
                "endpoint {}  identity {}",
                dump.endpoint,
                dump.identity
                    .map_or_else(|| "-".to_owned(), |i| i.to_string())
            );
            if let Some(l) = &dump.labels {
                println!("labels   {l}");
            }
            let mode = |on: bool| {
                if on {
                    "default-deny"
                } else {
                    "allow-all (no policy)"
                }
            };
            println!(
                "ingress  {}\negress   {}\n",
                mode(dump.ingress_enforced),
                mode(dump.egress_enforced)
            );
            let mut rows = vec![[
                "DIRECTION",
                "PEER",
                "PROTO",
                "PORTS",
                "VERDICT",
                "L7",
                "RULES",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>()];
            for e in &dump.entries {
                rows.push(vec![
                    e.direction.as_str().to_owned(),
                    e.peer.clone(),
                    e.protocol.to_owned(),
                    e.ports.clone(),
                    e.verdict.to_owned(),
                    e.l7.clone().unwrap_or_else(|| "-".to_owned()),
                    e.rules.join("; "),
                ]);
            }
            print_table(&rows);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn entry_row(
    engine: &Engine,
    direction: Direction,
    identity: Identity,
    peer: String,
    e: &palisade_policy::table::Entry,
) -> EntryRow {
    let ports = if e.proto == 0 || (e.lo == 0 && e.hi == u16::MAX) {
        "any".to_owned()
    } else if e.lo == e.hi {
        e.lo.to_string()
    } else {
        format!("{}-{}", e.lo, e.hi)
    };
    let l7: Vec<String> = e
        .contribs
        .iter()
        .filter_map(|c| c.l7.as_ref().map(ToString::to_string))
        .collect();
    EntryRow {
        direction,
        identity,
        peer: if identity == ANY_IDENTITY && !peer.starts_with("fqdn:") {
            "any".to_owned()
        } else {
            peer
        },
        protocol: proto::name(e.proto),
        ports,
        verdict: match e.verdict() {
            Action::Allow => {
                if l7.is_empty() {
                    "allow"
                } else {
                    "redirect"
                }
            }
            Action::Deny => "deny",
        },
        l7: (!l7.is_empty()).then(|| l7.join("; ")),
        rules: e
            .contribs
            .iter()
            .map(|c| rule_name(engine, c.rule))
            .collect(),
    }
}
