//! `palisade observe`: flows from the agent's buffer (or a file of JSON lines), filtered as
//! `hubble observe` filters them, printed compact, as JSON lines or as a table.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context};
use nix::sys::signal::{SigSet, Signal};
use palisade_flow::time::parse_since;
use palisade_flow::{
    stream_flows, FilterFlags, Flow, FlowsRequest, FlowsResponse, Format, Printer,
    DEFAULT_AGENT_SOCKET,
};

/// How many flows `observe` shows from the agent when neither --last, --since, --all nor
/// --follow says otherwise (Hubble's default).
const DEFAULT_LAST: usize = 20;

/// Longest line of a flows file.
const MAX_LINE_BYTES: usize = 1 << 20;

/// How often `--from-file --follow` looks for new lines.
const FILE_POLL: Duration = Duration::from_millis(200);

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub filter: FilterFlags,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "compact")]
    pub output: Format,
    /// Show the last N matching flows (from the agent: 20 unless --since, --all or --follow).
    #[arg(long, value_name = "N", conflicts_with = "all")]
    pub last: Option<usize>,
    /// Show every matching flow the agent still holds.
    #[arg(long)]
    pub all: bool,
    /// Only flows since then: a duration back from now (30s, 5m, 1h30m) or an RFC3339 time.
    #[arg(long, value_name = "DURATION|TIME")]
    pub since: Option<String>,
    /// Only flows before then: a duration back from now or an RFC3339 time.
    #[arg(long, value_name = "DURATION|TIME")]
    pub until: Option<String>,
    /// Keep printing new flows as they come (Ctrl-C stops). From the agent: only new ones
    /// unless --last, --since or --all asks for earlier ones too.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The agent's socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_AGENT_SOCKET)]
    pub socket: PathBuf,
    /// Read flows from a file of JSON lines instead of the agent (as `-o json` prints them,
    /// or Hubble's `{"flow": ...}` lines; `-` reads standard input). Every matching flow is
    /// shown unless --last says otherwise.
    #[arg(long, value_name = "PATH")]
    pub from_file: Option<PathBuf>,
}

fn time_arg(
    flag: &str,
    value: Option<&str>,
    now: SystemTime,
) -> anyhow::Result<Option<SystemTime>> {
    value
        .map(|v| {
            parse_since(v, now).ok_or_else(|| {
                anyhow!(
                    "--{flag}: expected a duration (30s, 5m, 1h30m) or an RFC3339 time, got {v:?}"
                )
            })
        })
        .transpose()
}

/// A closed stdout (`| head`) ends the command quietly.
fn quiet_pipe(r: io::Result<()>) -> anyhow::Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to standard output"),
    }
}

/// With --follow, Ctrl-C (SIGINT) or SIGTERM ends the command quietly with status 0: every
/// flow received is already printed (following flushes after each), and closing the
/// connection ends the agent's stream.
fn exit_quietly_on_signals() -> anyhow::Result<()> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    // Blocked here, before any other thread exists, so only the waiting thread gets them.
    signals
        .thread_block()
        .context("blocking SIGINT and SIGTERM")?;
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            if signals.wait().is_ok() {
                let _ = io::stdout().flush();
                std::process::exit(0);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if args.follow {
        exit_quietly_on_signals()?;
    }
    let filter = args.filter.build()?;
    let now = SystemTime::now();
    let mut request = FlowsRequest {
        filter,
        since: time_arg("since", args.since.as_deref(), now)?,
        until: time_arg("until", args.until.as_deref(), now)?,
        last: args.last,
        follow: args.follow,
    };
    let color = io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut printer = Printer::new(args.output, color, BufWriter::new(io::stdout()));
    if let Some(path) = &args.from_file {
        from_file(path, &request, &mut printer)?;
        return Ok(ExitCode::SUCCESS);
    }
    if request.last.is_none() && !args.all && request.since.is_none() {
        request.last = Some(if args.follow { 0 } else { DEFAULT_LAST });
    }
    from_agent(&args.socket, &request, &mut printer)?;
    Ok(ExitCode::SUCCESS)
}

fn from_agent<W: Write>(
    socket: &Path,
    request: &FlowsRequest,
    printer: &mut Printer<W>,
) -> anyhow::Result<()> {
    let mut failed: Option<io::Error> = None;
    let follow = request.follow;
    stream_flows(socket, request, |msg| {
        let r = match msg {
            FlowsResponse::Flow(f) => {
                printer
                    .print(&f)
                    .and_then(|()| if follow { printer.flush() } else { Ok(()) })
            }
            FlowsResponse::Lost { count } => {
                eprintln!(
                    "warning: {count} flow(s) lost: this client fell behind the agent's flow buffer"
                );
                Ok(())
            }
            FlowsResponse::Stats(_) | FlowsResponse::End(_) | FlowsResponse::Error { .. } => Ok(()),
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = failed {
        quiet_pipe(Err(e))?;
        return Ok(());
    }
    quiet_pipe(printer.flush())?;
    Ok(())
}

/// One line of a flows file: a flow as `-o json` prints it, or Hubble's `{"flow": {...}}`.
fn parse_line(line: &str) -> Result<Flow, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_str(line)?;
    match v {
        serde_json::Value::Object(mut m)
            if !m.contains_key("verdict")
                && m.get("flow").is_some_and(serde_json::Value::is_object) =>
        {
            serde_json::from_value(m.remove("flow").unwrap_or_default())
        }
        other => serde_json::from_value(other),
    }
}

/// Where matching flows of a file go: printed at once, or (with --last) kept until the end.
struct FileSink<'a, W: Write> {
    request: &'a FlowsRequest,
    printer: &'a mut Printer<W>,
    /// With --last: the newest matching flows seen so far.
    tail: Option<VecDeque<Flow>>,
}

impl<W: Write> FileSink<'_, W> {
    /// Handles one line; false once stdout is closed.
    fn line(&mut self, name: &str, lineno: usize, bytes: &[u8]) -> anyhow::Result<bool> {
        let line = std::str::from_utf8(bytes)
            .map_err(|_| anyhow!("{name}:{lineno}: not UTF-8"))?
            .trim();
        if line.is_empty() {
            return Ok(true);
        }
        let flow = parse_line(line).map_err(|e| anyhow!("{name}:{lineno}: not a flow: {e}"))?;
        if !self.request.matches(&flow) {
            return Ok(true);
        }
        match (&mut self.tail, self.request.last) {
            (Some(t), Some(keep)) => {
                if keep > 0 {
                    if t.len() == keep {
                        t.pop_front();
                    }
                    t.push_back(flow);
                }
                Ok(true)
            }
            _ => {
                if !quiet_pipe(self.printer.print(&flow))? {
                    return Ok(false);
                }
                if self.request.follow {
                    return quiet_pipe(self.printer.flush());
                }
                Ok(true)
            }
        }
    }

    /// At the end of what the file holds now: the kept flows, then everything flushed.
    fn caught_up(&mut self) -> anyhow::Result<bool> {
        if let Some(t) = self.tail.take() {
            for f in &t {
                if !quiet_pipe(self.printer.print(f))? {
                    return Ok(false);
                }
            }
        }
        quiet_pipe(self.printer.flush())
    }
}

/// Prints the flows of a file that `request` selects; with `follow`, then waits for lines
/// appended to it (as `tail -f`; standard input is read to its end).
fn from_file<W: Write>(
    path: &Path,
    request: &FlowsRequest,
    printer: &mut Printer<W>,
) -> anyhow::Result<()> {
    let stdin = path == Path::new("-");
    let name = path.display().to_string();
    let mut reader: Box<dyn BufRead> = if stdin {
        Box::new(io::stdin().lock())
    } else {
        Box::new(BufReader::new(
            File::open(path).with_context(|| format!("reading {name}"))?,
        ))
    };
    let follow = request.follow && !stdin;
    let mut sink = FileSink {
        request,
        printer,
        tail: request.last.map(|_| VecDeque::new()),
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut lineno = 0usize;
    loop {
        let room = (MAX_LINE_BYTES + 1).saturating_sub(pending.len()) as u64;
        let n = reader
            .by_ref()
            .take(room)
            .read_until(b'\n', &mut pending)
            .with_context(|| format!("reading {name}"))?;
        if pending.last() == Some(&b'\n') {
            lineno += 1;
            let line = std::mem::take(&mut pending);
            if !sink.line(&name, lineno, &line)? {
                return Ok(());
            }
            continue;
        }
        if pending.len() > MAX_LINE_BYTES {
            anyhow::bail!(
                "{name}:{}: line longer than {MAX_LINE_BYTES} bytes",
                lineno + 1
            );
        }
        if n > 0 {
            continue;
        }
        // End of what the file holds now. A last line without a newline counts, unless more
        // of it may still come.
        if !follow && !pending.is_empty() {
            lineno += 1;
            let line = std::mem::take(&mut pending);
            if !sink.line(&name, lineno, &line)? {
                return Ok(());
            }
        }
        if !sink.caught_up()? || !follow {
            return Ok(());
        }
        std::thread::sleep(FILE_POLL);
    }
}
