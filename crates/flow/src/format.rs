//! Output of flows: `compact` (one line each, as `hubble observe` prints them), `json` (one
//! object per line) and `table` (aligned columns). Colour is the caller's choice: on only for
//! a terminal.

use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::net::IpAddr;
use std::str::FromStr;

use crate::flow::{Endpoint, EventType, Flow, Verdict};
use crate::time::format_stamp_milli;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Format {
    /// One line per flow, as `hubble observe` prints them.
    #[default]
    Compact,
    /// One JSON object per line.
    Json,
    /// Aligned columns.
    Table,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "compact" => Ok(Format::Compact),
            "json" | "jsonpb" => Ok(Format::Json),
            "table" => Ok(Format::Table),
            _ => Err(format!(
                "unknown output format {s:?} (expected compact, json or table)"
            )),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Compact => "compact",
            Format::Json => "json",
            Format::Table => "table",
        })
    }
}

fn paint(color: bool, code: &str, s: &str) -> String {
    if color {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_owned()
    }
}

fn verdict_color(v: Verdict) -> &'static str {
    match v {
        Verdict::Forwarded => "32",
        Verdict::Dropped => "31",
        Verdict::Audit => "33",
        Verdict::Unknown => "0",
    }
}

/// `default/tiefighter:41234 (ID:256)`, `192.0.2.1:443 (world)`, `[2001:db8::1]:53 (ID:16777217)`.
pub fn endpoint(ep: &Endpoint, ip: IpAddr, port: Option<u16>) -> String {
    let mut s = if ep.pod_name.is_empty() {
        match (ip, port) {
            (IpAddr::V6(v6), Some(_)) => format!("[{v6}]"),
            _ => ip.to_string(),
        }
    } else {
        format!("{}/{}", ep.namespace, ep.pod_name)
    };
    if let Some(p) = port {
        let _ = write!(s, ":{p}");
    }
    if let Some(name) = palisade_identity::reserved::name(ep.identity) {
        let _ = write!(s, " ({name})");
    } else if ep.identity != 0 {
        let _ = write!(s, " (ID:{})", ep.identity);
    }
    s
}

/// The event part, as Hubble words it: `policy-verdict:L3-L4 INGRESS` for a judged
/// connection (`L3-L4` when a rule decided, `all` when nothing restricted it, `none` for an
/// audited default deny), the drop reason and direction for a drop.
pub fn event_desc(flow: &Flow) -> String {
    let dir = flow.traffic_direction.as_str();
    match flow.event_type {
        EventType::PolicyVerdict => {
            let match_type = match (flow.policy.is_some(), flow.verdict) {
                (true, _) => "L3-L4",
                (false, Verdict::Forwarded) => "all",
                (false, _) => "none",
            };
            format!("policy-verdict:{match_type} {dir}")
        }
        EventType::Drop => {
            let reason = flow.drop_reason_desc.map_or("Dropped", |r| r.describe());
            format!("{reason} {dir}")
        }
        EventType::Trace => format!("trace {dir}"),
        EventType::Unknown => format!("unknown {dir}"),
    }
}

/// The verdict word of the compact line: ALLOWED/AUDITED/DENIED for policy verdicts, the
/// verdict itself otherwise.
fn verdict_word(flow: &Flow) -> &'static str {
    match (flow.event_type, flow.verdict) {
        (EventType::PolicyVerdict, Verdict::Forwarded) => "ALLOWED",
        (EventType::PolicyVerdict, Verdict::Audit) => "AUDITED",
        (EventType::PolicyVerdict, Verdict::Dropped) => "DENIED",
        (_, v) => v.as_str(),
    }
}

/// One line:
/// `Nov 22 01:02:03.456: default/tiefighter:41234 (ID:256) -> default/deathstar-1:80 (ID:257)
/// policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN) by CiliumNetworkPolicy default/rule1 ingress[0]`.
pub fn compact(flow: &Flow, color: bool) -> String {
    let mut s = format!(
        "{}: {} -> {} {} {}",
        format_stamp_milli(flow.time),
        endpoint(&flow.source, flow.ip.source, flow.source_port()),
        endpoint(
            &flow.destination,
            flow.ip.destination,
            flow.destination_port()
        ),
        event_desc(flow),
        paint(color, verdict_color(flow.verdict), verdict_word(flow)),
    );
    if !flow.summary.is_empty() {
        let _ = write!(s, " ({})", flow.summary);
    }
    if let Some(p) = &flow.policy {
        let _ = write!(s, " by {p}");
    }
    s
}

/// One JSON object (no newline).
pub fn json(flow: &Flow) -> Result<String, serde_json::Error> {
    serde_json::to_string(flow)
}

pub const TABLE_HEADER: [&str; 7] = [
    "TIMESTAMP",
    "SOURCE",
    "DESTINATION",
    "TYPE",
    "VERDICT",
    "SUMMARY",
    "POLICY",
];

pub fn table_row(flow: &Flow, color: bool) -> Vec<String> {
    vec![
        format_stamp_milli(flow.time),
        endpoint(&flow.source, flow.ip.source, flow.source_port()),
        endpoint(
            &flow.destination,
            flow.ip.destination,
            flow.destination_port(),
        ),
        event_desc(flow),
        paint(color, verdict_color(flow.verdict), flow.verdict.as_str()),
        flow.summary.clone(),
        flow.policy.clone().unwrap_or_default(),
    ]
}

/// Width on screen: characters, not counting colour escapes.
fn visible_width(s: &str) -> usize {
    let mut n = 0;
    let mut esc = false;
    for c in s.chars() {
        if esc {
            if c == 'm' {
                esc = false;
            }
        } else if c == '\x1b' {
            esc = true;
        } else {
            n += 1;
        }
    }
    n
}

/// Rows as aligned columns, two spaces apart, each line trimmed, ending with a newline.
pub fn render_table(rows: &[Vec<String>]) -> String {
    render_rows(rows, &mut Vec::new())
}

/// [`render_table`] with columns at least `widths` wide; `widths` grows to what the rows
/// needed, so rows printed in batches (when following) stay aligned with earlier ones.
pub fn render_rows(rows: &[Vec<String>], widths: &mut Vec<usize>) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    if widths.len() < cols {
        widths.resize(cols, 0);
    }
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(visible_width(c));
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            line.push_str(c);
            if i + 1 < r.len() {
                line.push_str(&" ".repeat(widths[i] - visible_width(c) + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Prints flows in one format. Tables are buffered until [`Printer::flush`] (call it after
/// each batch when following: the header comes once, and columns only ever widen).
pub struct Printer<W: Write> {
    format: Format,
    color: bool,
    out: W,
    rows: Vec<Vec<String>>,
    header_done: bool,
    widths: Vec<usize>,
}

impl<W: Write> Printer<W> {
    pub fn new(format: Format, color: bool, out: W) -> Self {
        Printer {
            format,
            color,
            out,
            rows: Vec::new(),
            header_done: false,
            widths: Vec::new(),
        }
    }

    pub fn print(&mut self, flow: &Flow) -> io::Result<()> {
        match self.format {
            Format::Compact => writeln!(self.out, "{}", compact(flow, self.color)),
            Format::Json => {
                let line = json(flow).map_err(io::Error::other)?;
                writeln!(self.out, "{line}")
            }
            Format::Table => {
                self.rows.push(table_row(flow, self.color));
                Ok(())
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if self.format == Format::Table && !self.rows.is_empty() {
            let mut rows = Vec::with_capacity(self.rows.len() + 1);
            if !self.header_done {
                rows.push(TABLE_HEADER.iter().map(|s| (*s).to_owned()).collect());
                self.header_done = true;
            }
            rows.append(&mut self.rows);
            self.out
                .write_all(render_rows(&rows, &mut self.widths).as_bytes())?;
        }
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{DropReason, Icmp, TrafficDirection, L4};
    use crate::testutil::{ep, flow};
    use crate::time::parse_rfc3339;

    fn sample() -> Flow {
        let mut f = flow();
        f.time = parse_rfc3339("2026-11-22T01:02:03.456789Z").unwrap();
        f.destination.namespace = "default".to_owned();
        f.policy = Some("CiliumNetworkPolicy default/rule1 ingress[0]".to_owned());
        f
    }

    #[test]
    fn compact_policy_verdict() {
        assert_eq!(
            compact(&sample(), false),
            "Nov 22 01:02:03.456: default/tiefighter:41234 (ID:256) -> \
             default/deathstar-1:80 (ID:257) policy-verdict:L3-L4 INGRESS ALLOWED \
             (TCP Flags: SYN) by CiliumNetworkPolicy default/rule1 ingress[0]"
        );
        let mut audit = sample();
        audit.verdict = Verdict::Audit;
        audit.policy = None;
        audit.drop_reason_desc = Some(DropReason::PolicyDenied);
        assert!(
            compact(&audit, false)
                .ends_with("policy-verdict:none INGRESS AUDITED (TCP Flags: SYN)"),
            "{}",
            compact(&audit, false)
        );
        let mut open = sample();
        open.policy = None;
        assert!(compact(&open, false).contains("policy-verdict:all INGRESS ALLOWED"));
    }

    #[test]
    fn compact_drop_with_reason_and_world() {
        let mut f = sample();
        f.event_type = EventType::Drop;
        f.verdict = Verdict::Dropped;
        f.drop_reason_desc = Some(DropReason::PolicyDenied);
        f.traffic_direction = TrafficDirection::Egress;
        f.policy = None;
        f.destination = ep("", "", 9, &["reserved:world-ipv4"]);
        f.ip.destination = "192.0.2.1".parse().unwrap();
        assert_eq!(
            compact(&f, false),
            "Nov 22 01:02:03.456: default/tiefighter:41234 (ID:256) -> 192.0.2.1:80 \
             (world-ipv4) Policy denied EGRESS DROPPED (TCP Flags: SYN)"
        );
        let coloured = compact(&f, true);
        assert!(coloured.contains("\x1b[31mDROPPED\x1b[0m"), "{coloured}");
        assert!(!compact(&f, false).contains('\x1b'));
    }

    #[test]
    fn endpoints_render_like_hubble() {
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let e = ep("", "", 16_777_217, &[]);
        assert_eq!(endpoint(&e, v6, Some(53)), "[2001:db8::1]:53 (ID:16777217)");
        assert_eq!(endpoint(&e, v6, None), "2001:db8::1 (ID:16777217)");
        let host = ep("", "", 1, &[]);
        assert_eq!(
            endpoint(&host, "10.0.0.9".parse().unwrap(), None),
            "10.0.0.9 (host)"
        );
        let unknown = ep("", "", 0, &[]);
        assert_eq!(
            endpoint(&unknown, "10.0.0.9".parse().unwrap(), Some(1)),
            "10.0.0.9:1"
        );
        let mut f = sample();
        f.l4 = Some(L4::IcmpV4(Icmp { icmp_type: 8 }));
        f.summary = "ICMPv4 EchoRequest".to_owned();
        assert!(compact(&f, false).contains(
            "default/tiefighter (ID:256) -> default/deathstar-1 (ID:257) policy-verdict:L3-L4"
        ));
    }

    #[test]
    fn json_lines_and_table() {
        let mut p = Printer::new(Format::Json, false, Vec::new());
        p.print(&sample()).unwrap();
        p.print(&sample()).unwrap();
        p.flush().unwrap();
        let out = String::from_utf8(p.into_inner()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        let back: Flow = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(back, sample());

        let mut drop = sample();
        drop.verdict = Verdict::Dropped;
        drop.event_type = EventType::Drop;
        drop.drop_reason_desc = Some(DropReason::PolicyDeny);
        let mut p = Printer::new(Format::Table, true, Vec::new());
        p.print(&sample()).unwrap();
        p.print(&drop).unwrap();
        p.flush().unwrap();
        p.print(&sample()).unwrap();
        p.flush().unwrap();
        let out = String::from_utf8(p.into_inner()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert!(lines[0].starts_with("TIMESTAMP"));
        assert!(lines[0].contains("DESTINATION"));
        // Columns line up although the verdicts carry colour codes.
        let col = |l: &str| {
            let plain = l
                .replace("\x1b[32m", "")
                .replace("\x1b[31m", "")
                .replace("\x1b[0m", "");
            plain.find("FORWARDED").or_else(|| plain.find("DROPPED"))
        };
        assert_eq!(col(lines[1]), lines[0].find("VERDICT"));
        assert_eq!(col(lines[2]), lines[0].find("VERDICT"));
        assert!(lines[2].contains("Policy denied by denylist INGRESS"));
        assert!(!lines[3].starts_with("TIMESTAMP"), "the header comes once");
        assert_eq!(
            col(lines[3]),
            lines[0].find("VERDICT"),
            "later batches stay aligned"
        );
    }

    #[test]
    fn format_names() {
        assert_eq!("json".parse::<Format>(), Ok(Format::Json));
        assert_eq!("table".parse::<Format>(), Ok(Format::Table));
        assert_eq!("compact".parse::<Format>(), Ok(Format::Compact));
        assert!("yaml".parse::<Format>().is_err());
        assert_eq!(Format::default().to_string(), "compact");
    }
}
