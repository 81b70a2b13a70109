//! Manifest source handling: YAML/JSON text → position-aware node tree → typed values.
//!
//! [`parse_documents`] turns one file (multi-document YAML, or JSON, which is parsed by the same
//! YAML 1.2 parser) into one [`Node`] per non-empty document. Every node remembers where it
//! started. [`from_node`] then deserializes any node into a serde type; every error it reports
//! carries the line, column and field path (e.g. `spec.ingress[0].toPorts[0].ports[1].port`) of
//! the most specific node involved.
//!
//! Paths are rendered as `a.b[3].c`; a key that is empty or contains `.`, `[`, `]`, `"` or
//! whitespace is rendered quoted, e.g. `metadata.labels["app.kubernetes.io/name"]`.

mod de;
mod tree;

#[cfg(test)]
mod tests;

use std::fmt::{self, Write as _};

pub use de::from_node;
pub use tree::{parse_documents, Node, Value, MAX_ALIAS_NODES, MAX_DEPTH};

/// 1-based line and column (columns count characters, not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// An error located in a manifest source: syntax error, duplicate key, or deserialization error.
///
/// Displays as `line L, column C: PATH: MESSAGE` (or `line L, column C: MESSAGE` when the path is
/// empty).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {}, column {}: {}{}", .pos.line, .pos.column, PathPrefix(.path), .message)]
pub struct SourceError {
    /// Where the problem is.
    pub pos: Position,
    /// Field path of the offending node (may be empty for the document root).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Displays `path: ` or nothing for an empty path.
struct PathPrefix<'a>(&'a str);

impl fmt::Display for PathPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", self.0)
        }
    }
}

/// Appends a mapping key segment to a field path.
pub(crate) fn push_key(out: &mut String, key: &str) {
    let needs_quotes = key.is_empty()
        || key
            .chars()
            .any(|c| matches!(c, '.' | '[' | ']' | '"') || c.is_whitespace() || c.is_control());
    if needs_quotes {
        out.push('[');
        let _ = write!(out, "{key:?}");
        out.push(']');
    } else {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(key);
    }
}

/// Appends a sequence index segment to a field path.
pub(crate) fn push_index(out: &mut String, index: usize) {
    let _ = write!(out, "[{index}]");
}

/// Quotes `s` for an error message, truncating very long strings.
pub(crate) fn quote_truncated(s: &str) -> String {
    const MAX_CHARS: usize = 60;
    if s.chars().count() <= MAX_CHARS {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX_CHARS).collect();
        format!("{head:?}...")
    }
}
