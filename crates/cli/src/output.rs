//! Output helpers: aligned tables, colour only on a terminal, diagnostics.

use std::io::IsTerminal;

use palisade_policy_api::load::Diagnostic;
use palisade_policy_api::validate::Severity;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// Colours for stdout, off unless stdout is a terminal and NO_COLOR is unset.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    on: bool,
}

impl Style {
    pub fn stdout() -> Self {
        Style {
            on: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }
    pub fn stderr() -> Self {
        Style {
            on: std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }
    fn paint(self, code: &str, s: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }
    pub fn green(self, s: &str) -> String {
        self.paint("32", s)
    }
    pub fn red(self, s: &str) -> String {
        self.paint("31", s)
    }
    pub fn yellow(self, s: &str) -> String {
        self.paint("33", s)
    }
    pub fn bold(self, s: &str) -> String {
        self.paint("1", s)
    }
}

/// Prints rows as aligned columns (the first row is the header). Colour codes in cells are
/// not counted in widths.
pub fn print_table(rows: &[Vec<String>]) {
    let visible = |s: &str| {
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
    };
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(visible(c));
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            line.push_str(c);
            if i + 1 < r.len() {
                line.push_str(&" ".repeat(widths[i] - visible(c) + 2));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// Prints diagnostics to stderr: errors and warnings, one per entry.
pub fn print_diagnostics(diags: &[Diagnostic]) {
    let style = Style::stderr();
    for d in diags {
        let text = d.to_string();
        let text = match d.severity {
            Severity::Error => text.replacen("error:", &style.red("error:"), 1),
            Severity::Warning => text.replacen("warning:", &style.yellow("warning:"), 1),
        };
        eprintln!("{text}");
    }
}

/// Renders a JSON value as block-style YAML.
pub fn to_yaml(v: &serde_json::Value) -> String {
    let mut out = String::new();
    yaml_value(v, 0, &mut out, false);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn yaml_scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null".to_owned(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => {
            let plain = !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
                && !matches!(
                    s.as_str(),
                    "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "~"
                )
                && s.parse::<f64>().is_err();
            if plain {
                s.clone()
            } else {
                serde_json::Value::String(s.clone()).to_string()
            }
        }
        _ => String::new(),
    }
}

fn yaml_value(v: &serde_json::Value, indent: usize, out: &mut String, in_seq: bool) {
    let pad = " ".repeat(indent);
    match v {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (i, (k, val)) in map.iter().enumerate() {
                if !(in_seq && i == 0) {
                    out.push_str(&pad);
                }
                out.push_str(&yaml_scalar(&serde_json::Value::String(k.clone())));
                out.push(':');
                match val {
                    serde_json::Value::Object(m) if !m.is_empty() => {
                        out.push('\n');
                        yaml_value(val, indent + 2, out, false);
                    }
                    serde_json::Value::Array(a) if !a.is_empty() => {
                        out.push('\n');
                        yaml_value(val, indent, out, false);
                    }
                    _ => {
                        out.push(' ');
                        yaml_value(val, indent + 2, out, false);
                    }
                }
            }
        }
        serde_json::Value::Array(items) if !items.is_empty() => {
            for item in items {
                out.push_str(&pad);
                out.push_str("- ");
                match item {
                    serde_json::Value::Object(m) if !m.is_empty() => {
                        yaml_value(item, indent + 2, out, true);
                    }
                    serde_json::Value::Array(a) if !a.is_empty() => {
                        out.push('\n');
                        yaml_value(item, indent + 2, out, false);
                    }
                    _ => yaml_value(item, indent + 2, out, false),
                }
            }
        }
        serde_json::Value::Object(_) => out.push_str("{}\n"),
        serde_json::Value::Array(_) => out.push_str("[]\n"),
        scalar => {
            out.push_str(&yaml_scalar(scalar));
            out.push('\n');
        }
    }
}
