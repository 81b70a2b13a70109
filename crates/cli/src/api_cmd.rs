//! Clients of the agent: `palisade apply | delete | get | status | endpoint`.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use serde::Serialize;

use palisade_agent::client;
use palisade_agent::protocol::{
    AgentStatus, ChangeReport, EndpointInfo, EndpointReport, IdentityInfo, PolicyInfo, Request,
    ResourceKind, Response, SourceFile, WireDiagnostic, DEFAULT_SOCKET, MAX_MESSAGE_BYTES,
};

use crate::output::{print_diagnostics, print_table, to_yaml, Format, Style};

#[derive(clap::Args)]
pub struct Connection {
    /// The agent's API socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[derive(clap::Args)]
pub struct FilesArgs {
    /// Manifest files or directories (recursive: *.yaml, *.yml, *.json); `-` reads stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Output format (default: one line per object).
    #[arg(short = 'o', long = "output", value_enum)]
    pub output: Option<Format>,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Resource {
    #[value(alias = "endpoint", alias = "ep")]
    Endpoints,
    #[value(alias = "identity", alias = "id")]
    Identities,
    #[value(alias = "policy", alias = "pol")]
    Policies,
}

#[derive(clap::Args)]
pub struct GetArgs {
    /// What to list.
    #[arg(value_enum)]
    pub resource: Resource,
    /// The namespace (default: `default`); cluster-scoped items are always listed.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Format,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Format,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(clap::Subcommand)]
pub enum EndpointCommand {
    /// Show an endpoint's configuration, or change it: `audit=true|false`.
    Config {
        /// NAMESPACE/POD.
        endpoint: String,
        /// KEY=VALUE settings (`audit=true`, `audit=false`).
        settings: Vec<String>,
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<Format>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Attach the datapath to a pod's host-side veth (what a CNI plugin does on ADD).
    Attach {
        /// NAMESPACE/POD.
        endpoint: String,
        /// The host-side veth.
        #[arg(long)]
        ifname: String,
        /// The network namespace holding the veth: a name under /run/netns or a path
        /// (default: the agent's).
        #[arg(long)]
        netns: Option<String>,
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<Format>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Detach the datapath from a pod's veth and forget the endpoint (CNI DEL).
    Detach {
        /// NAMESPACE/POD.
        endpoint: String,
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<Format>,
        #[command(flatten)]
        conn: Connection,
    },
}

fn call(conn: &Connection, request: &Request) -> anyhow::Result<Response> {
    Ok(client::request(&conn.socket, request)?)
}

fn print_value<T: Serialize>(value: &T, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Yaml => print!("{}", to_yaml(&serde_json::to_value(value)?)),
        Format::Json | Format::Table => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

/// The agent's refusal or failure, as an error; anything else unexpected too.
fn unexpected(response: Response) -> anyhow::Error {
    match response {
        Response::Error { message } => anyhow!("{message}"),
        Response::Rejected { diagnostics } => anyhow!(
            "{}",
            diagnostics
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ),
        other => anyhow!("unexpected answer from the agent: {other:?}"),
    }
}

fn collect(path: &Path, explicit: bool, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            collect(&e, false, out)?;
        }
    } else if explicit
        || path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
    {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Reads the files of `-f` (bounded: one request carries at most 16 MiB).
fn read_files(paths: &[PathBuf]) -> anyhow::Result<Vec<SourceFile>> {
    let limit = MAX_MESSAGE_BYTES as u64;
    let too_large = |total: u64| {
        anyhow!(
            "the manifests are {total} bytes; the agent takes at most {MAX_MESSAGE_BYTES} bytes \
             per request: apply them in several batches"
        )
    };
    let mut files = Vec::new();
    let mut total = 0u64;
    for p in paths {
        if p.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .take(limit + 1)
                .read_to_string(&mut text)
                .context("reading stdin")?;
            total += text.len() as u64;
            if total > limit {
                return Err(too_large(total));
            }
            files.push(SourceFile {
                name: "<stdin>".to_owned(),
                text,
            });
            continue;
        }
        let mut found = Vec::new();
        collect(p, true, &mut found)?;
        for f in found {
            let len = std::fs::metadata(&f)
                .with_context(|| format!("reading {}", f.display()))?
                .len();
            total += len;
            if total > limit {
                return Err(too_large(total));
            }
            let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
            let text =
                String::from_utf8(bytes).map_err(|_| anyhow!("{}: not UTF-8 text", f.display()))?;
            files.push(SourceFile {
                name: f.display().to_string(),
                text,
            });
        }
    }
    Ok(files)
}

fn print_wire_diagnostics(diags: &[WireDiagnostic]) {
    let diags: Vec<_> = diags.iter().map(WireDiagnostic::to_diagnostic).collect();
    print_diagnostics(&diags);
}

/// Prints an apply/delete report; the exit code says whether the datapath took it.
fn report_changes(
    report: &ChangeReport,
    output: Option<Format>,
    verb: &str,
) -> anyhow::Result<ExitCode> {
    print_wire_diagnostics(&report.warnings);
    match output {
        Some(f) => print_value(report, f)?,
        None => {
            for c in &report.changes {
                let ns = match &c.namespace {
                    Some(ns) if ns != "default" => format!(" (namespace {ns})"),
                    _ => String::new(),
                };
                println!("{}{ns} {}", c.resource, c.action.as_str());
            }
            if let (Some(ms), Some(sync)) = (report.enforced_ms, &report.sync) {
                eprintln!(
                    "revision {}: {verb} and enforced in {ms:.1} ms ({} map writes)",
                    report.revision, sync.map_writes
                );
            }
        }
    }
    if let Some(e) = &report.sync_error {
        eprintln!(
            "{} the change is stored, but the datapath could not be updated: {e}",
            Style::stderr().yellow("warning:")
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn apply(args: &FilesArgs) -> anyhow::Result<ExitCode> {
    let files = read_files(&args.files)?;
    match call(&args.conn, &Request::Apply { files })? {
        Response::Applied(report) => report_changes(&report, args.output, "applied"),
        Response::Rejected { diagnostics } => {
            print_wire_diagnostics(&diagnostics);
            let errors = diagnostics.iter().filter(|d| d.is_error()).count();
            eprintln!("{errors} error(s); nothing was applied");
            Ok(ExitCode::from(2))
        }
        other => Err(unexpected(other)),
    }
}

pub fn delete(args: &FilesArgs) -> anyhow::Result<ExitCode> {
    let files = read_files(&args.files)?;
    match call(&args.conn, &Request::Delete { files })? {
        Response::Deleted(report) => report_changes(&report, args.output, "deleted"),
        Response::Rejected { diagnostics } => {
            print_wire_diagnostics(&diagnostics);
            let errors = diagnostics.iter().filter(|d| d.is_error()).count();
            eprintln!("{errors} error(s); nothing was deleted");
            Ok(ExitCode::from(2))
        }
        other => Err(unexpected(other)),
    }
}

fn age(applied_at: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(applied_at);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "enabled"
    } else {
        "disabled"
    }
}

fn audit_text(e: &EndpointInfo) -> String {
    match (e.audit.endpoint, e.audit.global) {
        (true, true) => "endpoint,global".to_owned(),
        (true, false) => "endpoint".to_owned(),
        (false, true) => "global".to_owned(),
        (false, false) => "-".to_owned(),
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn print_endpoints(items: &[EndpointInfo], with_ns: bool) {
    let style = Style::stdout();
    let mut header = vec![];
    if with_ns {
        header.push("NAMESPACE");
    }
    header.extend([
        "POD",
        "ENDPOINT",
        "IDENTITY",
        "IP",
        "INTERFACE",
        "INGRESS",
        "EGRESS",
        "AUDIT",
        "STATE",
    ]);
    let mut rows = vec![header.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()];
    for e in items {
        let mut row = Vec::new();
        if with_ns {
            row.push(e.namespace.clone());
        }
        let state = if e.state == "ready" {
            style.green(&e.state)
        } else {
            style.yellow(&e.state)
        };
        row.extend([
            e.pod.clone(),
            opt(e.endpoint_id),
            opt(e.identity),
            opt(e.ip.as_ref()),
            e.host_ifname.clone(),
            on_off(e.policy_enforcement.ingress).to_owned(),
            on_off(e.policy_enforcement.egress).to_owned(),
            audit_text(e),
            state,
        ]);
        rows.push(row);
    }
    print_table(&rows);
}

fn print_identities(items: &[IdentityInfo]) {
    let mut rows = vec![["ID", "SCOPE", "NAMESPACE", "PODS", "ENDPOINTS", "LABELS"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect::<Vec<_>>()];
    for i in items {
        rows.push(vec![
            i.id.to_string(),
            i.scope.clone(),
            opt(i.namespace.as_ref()),
            i.pods.to_string(),
            i.endpoints.to_string(),
            i.labels.join(","),
        ]);
    }
    print_table(&rows);
}

fn print_policies(items: &[PolicyInfo], with_ns: bool) {
    let mut header = vec![];
    if with_ns {
        header.push("NAMESPACE");
    }
    header.extend(["KIND", "NAME", "AUDIT", "REVISION", "SOURCE", "AGE"]);
    let mut rows = vec![header.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()];
    for p in items {
        let mut row = Vec::new();
        if with_ns {
            row.push(opt(p.namespace.as_ref()));
        }
        row.extend([
            p.kind.clone(),
            p.name.clone(),
            if p.audit { "yes" } else { "no" }.to_owned(),
            p.revision.to_string(),
            p.source.clone(),
            age(p.applied_at),
        ]);
        rows.push(row);
    }
    print_table(&rows);
}

pub fn get(args: &GetArgs) -> anyhow::Result<ExitCode> {
    let namespace = if args.all_namespaces {
        None
    } else {
        Some(
            args.namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
        )
    };
    let kind = match args.resource {
        Resource::Endpoints => ResourceKind::Endpoints,
        Resource::Identities => ResourceKind::Identities,
        Resource::Policies => ResourceKind::Policies,
    };
    let response = call(&args.conn, &Request::Get { kind, namespace })?;
    let with_ns = args.all_namespaces;
    let empty = |n: usize| {
        if n == 0 && args.output == Format::Table {
            if args.all_namespaces {
                eprintln!("No resources found.");
            } else {
                let ns = args.namespace.as_deref().unwrap_or("default");
                eprintln!("No resources found in {ns} namespace.");
            }
            true
        } else {
            false
        }
    };
    match (response, args.output) {
        (Response::Endpoints { items }, Format::Table) => {
            if !empty(items.len()) {
                print_endpoints(&items, with_ns);
            }
        }
        (Response::Identities { items }, Format::Table) => {
            if !empty(items.len()) {
                print_identities(&items);
            }
        }
        (Response::Policies { items }, Format::Table) => {
            if !empty(items.len()) {
                print_policies(&items, with_ns);
            }
        }
        (Response::Endpoints { items }, f) => print_value(&items, f)?,
        (Response::Identities { items }, f) => print_value(&items, f)?,
        (Response::Policies { items }, f) => print_value(&items, f)?,
        (other, _) => return Err(unexpected(other)),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(s: &AgentStatus) {
    let style = Style::stdout();
    let d = &s.datapath;
    let sync = if d.in_sync {
        style.green("in sync")
    } else {
        style.red(&format!(
            "OUT OF SYNC: {}",
            d.last_sync_error.as_deref().unwrap_or("unknown error")
        ))
    };
    let mut lines: Vec<(&str, String)> = vec![
        (
            "Agent",
            format!(
                "running (pid {}, up {}s), palisade {}",
                s.pid, s.uptime_seconds, s.version
            ),
        ),
        ("Node", format!("{} (cluster {})", s.node, s.cluster)),
        (
            "State",
            format!("{} (revision {})", s.state_dir, s.revision),
        ),
        ("Socket", s.socket.clone()),
        (
            "Datapath",
            format!(
                "{}, {} interfaces attached, {sync} (last sync: {} map writes)",
                s.bpf_pin_dir, d.attached_interfaces, d.last_sync.map_writes
            ),
        ),
        (
            "Objects",
            format!(
                "{} namespaces, {} nodes, {} pods, {} policies",
                s.objects.namespaces, s.objects.nodes, s.objects.pods, s.objects.policies
            ),
        ),
        ("Endpoints", s.endpoints.to_string()),
        ("Identities", s.identities.to_string()),
        (
            "Audit mode",
            if s.policy_audit_mode {
                style.yellow("global (every endpoint)")
            } else {
                "off globally (per endpoint: see get endpoints)".to_owned()
            },
        ),
        (
            "Changes",
            match (s.apply.last_enforced_ms, s.apply.max_enforced_ms) {
                (Some(last), Some(max)) => format!(
                    "{} enforced; apply→enforced last {last:.1} ms, max {max:.1} ms",
                    s.apply.count
                ),
                _ => "none since start".to_owned(),
            },
        ),
        (
            "Startup",
            format!(
                "restored {} objects and {} endpoints in {:.1} ms; the kernel held {} endpoints, \
                 {} tables, {} ipcache entries; reconciling rewrote {} map entries",
                s.startup.restored_objects,
                s.startup.restored_endpoints,
                s.startup.duration_ms,
                s.startup.kernel.endpoints,
                s.startup.kernel.tables,
                s.startup.kernel.ipcache_entries,
                s.startup.reconcile.map_writes
            ),
        ),
    ];
    if let Some(m) = &d.metrics {
        lines.push((
            "Traffic",
            format!(
                "{} packets forwarded; dropped: {} by deny rules, {} by default deny, {} \
                 fail-closed, {} spoofed",
                m.forwarded_packets,
                m.policy_denied_packets,
                m.default_denied_packets,
                m.fail_closed_packets,
                m.spoofed_packets
            ),
        ));
    }
    let f = &s.flows;
    let limit = match f.rate_limit {
        0 => "no event rate limit".to_owned(),
        rate => format!("event rate limit {rate}/s per CPU, burst {}", f.rate_burst),
    };
    let lost = if f.lost_in_kernel > 0 {
        style.yellow(&format!("{} lost in the kernel", f.lost_in_kernel))
    } else {
        "0 lost in the kernel".to_owned()
    };
    lines.push((
        "Flows",
        format!(
            "{} received, {}/{} in the buffer, {} evicted, {lost} ({limit})",
            f.received, f.len, f.capacity, f.evicted
        ),
    ));
    if let Some(addr) = &f.metrics_addr {
        lines.push(("Metrics", format!("http://{addr}/metrics")));
    }
    for skipped in &s.startup.skipped_objects {
        lines.push(("Not loaded", style.red(skipped)));
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    for (k, v) in lines {
        println!("{:width$}{v}", format!("{k}:"));
    }
}

pub fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    match call(&args.conn, &Request::Status)? {
        Response::Status(s) => {
            match args.output {
                Format::Table => print_status(&s),
                f => print_value(&s, f)?,
            }
            Ok(if s.datapath.in_sync {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        other => Err(unexpected(other)),
    }
}

fn split_endpoint(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('/') {
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
            Ok((ns.to_owned(), pod.to_owned()))
        }
        _ => bail!("expected NAMESPACE/POD, got {s:?}"),
    }
}

fn parse_bool(key: &str, v: &str) -> anyhow::Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "enabled" | "on" => Ok(true),
        "false" | "disabled" | "off" => Ok(false),
        _ => bail!("{key}={v}: expected true or false"),
    }
}

fn report_endpoint(r: &EndpointReport, output: Option<Format>) -> anyhow::Result<ExitCode> {
    match output {
        Some(f) => print_value(r, f)?,
        None => {
            let e = &r.endpoint;
            println!("endpoint {}/{} {}", e.namespace, e.pod, r.action);
            println!("audit={}", e.audit.endpoint);
            if e.audit.global {
                println!("  (the agent runs with --policy-audit-mode: every endpoint audits)");
            }
            println!(
                "interface={} ifindex={}{} state={}",
                e.host_ifname,
                e.ifindex,
                e.netns
                    .as_deref()
                    .map(|n| format!(" netns={n}"))
                    .unwrap_or_default(),
                e.state
            );
            if let Some(ms) = r.enforced_ms {
                eprintln!("enforced in {ms:.1} ms");
            }
        }
    }
    if let Some(e) = &r.sync_error {
        eprintln!(
            "{} the change is stored, but the datapath could not be updated: {e}",
            Style::stderr().yellow("warning:")
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn endpoint(cmd: EndpointCommand) -> anyhow::Result<ExitCode> {
    let (conn, request, output) = match cmd {
        EndpointCommand::Config {
            endpoint,
            settings,
            output,
            conn,
        } => {
            let (namespace, pod) = split_endpoint(&endpoint)?;
            let mut audit = None;
            for s in &settings {
                let Some((k, v)) = s.split_once('=') else {
                    bail!("expected KEY=VALUE, got {s:?} (supported: audit=true|false)");
                };
                match k {
                    "audit" | "PolicyAuditMode" => audit = Some(parse_bool(k, v)?),
                    _ => bail!("unknown setting {k:?} (supported: audit=true|false)"),
                }
            }
            (
                conn,
                Request::EndpointConfig {
                    namespace,
                    pod,
                    audit,
                },
                output,
            )
        }
        EndpointCommand::Attach {
            endpoint,
            ifname,
            netns,
            output,
            conn,
        } => {
            let (namespace, pod) = split_endpoint(&endpoint)?;
            (
                conn,
                Request::Attach {
                    namespace,
                    pod,
                    host_ifname: ifname,
                    netns,
                },
                output,
            )
        }
        EndpointCommand::Detach {
            endpoint,
            output,
            conn,
        } => {
            let (namespace, pod) = split_endpoint(&endpoint)?;
            (conn, Request::Detach { namespace, pod }, output)
        }
    };
    match call(&conn, &request)? {
        Response::Endpoint(r) => report_endpoint(&r, output),
        other => Err(unexpected(other)),
    }
}
