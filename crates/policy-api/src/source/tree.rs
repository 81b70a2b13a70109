//! Position-aware YAML node tree and the event-driven builder that produces it.

use std::borrow::Cow;
use std::collections::HashMap;

use saphyr_parser::{Event, Marker, Parser, ScalarStyle, ScanError, Tag};

use super::{push_index, push_key, quote_truncated, Position, SourceError};

/// Maximum nesting depth of sequences/mappings in a document (also after alias expansion).
pub const MAX_DEPTH: usize = 128;

/// Maximum number of nodes that alias expansion may add to one document.
pub const MAX_ALIAS_NODES: usize = 100_000;

/// The value of a [`Node`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`, `~`, or an empty plain scalar.
    Null,
    /// `true` / `false` (also `True`, `TRUE`, `False`, `FALSE`).
    Bool(bool),
    /// Decimal, `0x` or `0o` integer.
    Int(i64),
    /// Floating point number, including `.inf` / `.nan`.
    Float(f64),
    /// Any quoted or block scalar, and plain scalars that are not null/bool/number.
    Str(String),
    /// Sequence.
    Seq(Vec<Node>),
    /// Mapping, in source order. Keys are unique (duplicates are rejected by the parser).
    Map(Vec<(Node, Node)>),
}

/// One node of a parsed document.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The value.
    pub value: Value,
    /// Where the node starts.
    pub pos: Position,
    /// True if the node is a scalar written plain (unquoted, not a block scalar).
    /// Always false for sequences and mappings.
    pub plain: bool,
    /// Original source text of a plain scalar that resolved to something other than a string
    /// (`Null`, `Bool`, `Int`, `Float`), e.g. `Some("0x50")` for `Value::Int(80)`; `None`
    /// otherwise. Used to turn such scalars back into text, e.g. for mapping keys.
    pub raw: Option<String>,
}

impl Node {
    /// A node with no raw text, not marked plain.
    pub fn new(value: Value, pos: Position) -> Self {
        Node {
            value,
            pos,
            plain: false,
            raw: None,
        }
    }

    /// Looks up `key` in a mapping (comparing against [`Node::key_text`]).
    /// Returns `None` for non-mappings and missing keys.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.is_scalar() && k.key_text() == key)
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string value, for `Value::Str` nodes only.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The entries of a mapping.
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The items of a sequence.
    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(items) => Some(items),
            _ => None,
        }
    }

    /// True for `Value::Null`.
    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }

    /// True for everything except sequences and mappings.
    pub fn is_scalar(&self) -> bool {
        !matches!(self.value, Value::Seq(_) | Value::Map(_))
    }

    /// Human-readable type name: `null`, `boolean`, `integer`, `float`, `string`, `sequence`,
    /// `mapping`.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Seq(_) => "sequence",
            Value::Map(_) => "mapping",
        }
    }

    /// The text of this node used as a mapping key: the string itself, or the original source
    /// text of other scalars (`80`, `true`, `~`, empty for an empty key). Sequences and mappings
    /// (rare as keys) give their compact JSON text.
    pub fn key_text(&self) -> Cow<'_, str> {
        if let Some(raw) = &self.raw {
            return Cow::Borrowed(raw);
        }
        match &self.value {
            Value::Str(s) => Cow::Borrowed(s),
            Value::Null => Cow::Borrowed(""),
            Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
            Value::Int(i) => Cow::Owned(i.to_string()),
            Value::Float(f) => Cow::Owned(f.to_string()),
            Value::Seq(_) | Value::Map(_) => Cow::Owned(self.to_json().to_string()),
        }
    }

    /// Converts to JSON. Mapping keys become their [`Node::key_text`]; non-finite floats
    /// (`.inf`, `.nan`), which JSON cannot represent, become their source text as a string.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(n) => J::Number(n),
                None => J::String(self.key_text().into_owned()),
            },
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.key_text().into_owned(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

/// Parses all documents of one file. Empty documents (only comments, or nothing between `---`
/// markers) are skipped.
///
/// Errors: YAML syntax errors, duplicate mapping keys, nesting deeper than [`MAX_DEPTH`], alias
/// expansion beyond [`MAX_ALIAS_NODES`] nodes, recursive aliases, and explicit core tags
/// (`!!int` etc.) whose scalar does not match.
pub fn parse_documents(text: &str) -> Result<Vec<Node>, SourceError> {
    let mut parser = Parser::new_from_str(text);
    let mut docs = Vec::new();
    let mut builder = DocBuilder::default();
    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|e| builder.scan_error(&e))?;
        let pos = position(span.start);
        match event {
            Event::StreamEnd => break,
            Event::StreamStart | Event::Nothing => {}
            Event::DocumentStart(_) => builder = DocBuilder::default(),
            Event::DocumentEnd => {
                let finished = std::mem::take(&mut builder);
                if let Some(root) = finished.finish()? {
                    docs.push(root);
                }
            }
            Event::Alias(id) => builder.alias(id, pos)?,
            Event::Scalar(value, style, anchor, tag) => {
                builder.scalar(value, style, anchor, tag.as_deref(), pos)?;
            }
            Event::SequenceStart(anchor, _) => builder.start(pos, anchor, true)?,
            Event::MappingStart(anchor, _) => builder.start(pos, anchor, false)?,
            Event::SequenceEnd | Event::MappingEnd => builder.end()?,
        }
    }
    Ok(docs)
}

fn too_deep() -> String {
    format!("nesting too deep: more than {MAX_DEPTH} levels of sequences/mappings")
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// saphyr markers: 1-based line, 0-based column.
fn position(m: Marker) -> Position {
    Position {
        line: to_u32(m.line()),
        column: to_u32(m.col().saturating_add(1)),
    }
}

/// One step from a node to a child, used to find nodes again after the document is built.
#[derive(Debug, Clone, Copy)]
enum Step {
    Item(usize),
    Key(usize),
    Value(usize),
}

fn node_at<'n>(root: &'n Node, loc: &[Step]) -> Option<&'n Node> {
    let mut node = root;
    for step in loc {
        node = match (&node.value, *step) {
            (Value::Seq(items), Step::Item(i)) => items.get(i)?,
            (Value::Map(entries), Step::Key(i)) => &entries.get(i)?.0,
            (Value::Map(entries), Step::Value(i)) => &entries.get(i)?.1,
            _ => return None,
        };
    }
    Some(node)
}

fn node_at_mut<'n>(root: &'n mut Node, loc: &[Step]) -> Option<&'n mut Node> {
    let mut node = root;
    for step in loc {
        node = match (&mut node.value, *step) {
            (Value::Seq(items), Step::Item(i)) => items.get_mut(i)?,
            (Value::Map(entries), Step::Key(i)) => &mut entries.get_mut(i)?.0,
            (Value::Map(entries), Step::Value(i)) => &mut entries.get_mut(i)?.1,
            _ => return None,
        };
    }
    Some(node)
}

enum FrameKind {
    Seq(Vec<Node>),
    Map {
        entries: Vec<(Node, Node)>,
        /// Key waiting for its value; false if its text is unknown (alias of a collection).
        key: Option<(Node, bool)>,
        /// Key text → line of first occurrence; built once the mapping has
        /// [`SMALL_MAP`] entries (smaller mappings are scanned linearly).
        seen: Option<HashMap<String, u32>>,
        /// Indices of entries whose key text is unknown (excluded from duplicate checks).
        unknown: Vec<usize>,
    },
}

/// Mappings up to this size check for duplicate keys by a linear scan (no allocation).
const SMALL_MAP: usize = 16;

/// Returns the line of an earlier key with the same text as `key`, recording `key` otherwise.
fn check_duplicate(
    entries: &[(Node, Node)],
    unknown: &[usize],
    seen: &mut Option<HashMap<String, u32>>,
    key: &Node,
) -> Option<u32> {
    let text = key.key_text();
    if entries.len() < SMALL_MAP {
        return entries
            .iter()
            .enumerate()
            .find(|(i, (k, _))| !unknown.contains(i) && k.key_text() == text)
            .map(|(_, (k, _))| k.pos.line);
    }
    let seen = seen.get_or_insert_with(|| {
        let mut map = HashMap::with_capacity(entries.len() * 2);
        for (i, (k, _)) in entries.iter().enumerate() {
            if !unknown.contains(&i) {
                map.entry(k.key_text().into_owned()).or_insert(k.pos.line);
            }
        }
        map
    });
    match seen.entry(text.into_owned()) {
        std::collections::hash_map::Entry::Occupied(first) => Some(*first.get()),
        std::collections::hash_map::Entry::Vacant(slot) => {
            slot.insert(key.pos.line);
            None
        }
    }
}

/// A sequence or mapping under construction.
struct Frame {
    pos: Position,
    anchor: usize,
    /// Number of nodes in the (alias-expanded) subtree so far, including this one.
    size: usize,
    /// Maximum height of the children added so far.
    child_height: usize,
    kind: FrameKind,
}

/// What is known about an anchored node once it is complete.
struct AnchorInfo {
    loc: Vec<Step>,
    size: usize,
    height: usize,
    /// Key text, for scalars.
    text: Option<String>,
}

struct PendingAlias {
    loc: Vec<Step>,
    anchor: usize,
    pos: Position,
}

/// Builds one document from parser events, iteratively (no recursion), so arbitrarily deep
/// input cannot overflow the stack.
#[derive(Default)]
struct DocBuilder {
    stack: Vec<Frame>,
    root: Option<Node>,
    /// The root is an empty plain scalar: the document is empty.
    root_is_empty: bool,
    anchors: HashMap<usize, AnchorInfo>,
    aliases: Vec<PendingAlias>,
    /// Nodes that alias expansion will add.
    alias_nodes: usize,
}

impl DocBuilder {
    /// Path of the position currently being built, through the first `frames` frames.
    fn path_through(&self, frames: usize) -> String {
        let mut out = String::new();
        for frame in self.stack.iter().take(frames) {
            match &frame.kind {
                FrameKind::Seq(items) => push_index(&mut out, items.len()),
                FrameKind::Map { key, .. } => match key {
                    Some((k, true)) => push_key(&mut out, &k.key_text()),
                    Some((_, false)) => push_key(&mut out, "?"),
                    // Inside a complex key: stop at the mapping.
                    None => break,
                },
            }
        }
        out
    }

    fn error(&self, pos: Position, message: String) -> SourceError {
        SourceError {
            pos,
            path: self.path_through(self.stack.len()),
            message,
        }
    }

    fn scan_error(&self, e: &ScanError) -> SourceError {
        let message = if e.info() == "recursion limit exceeded" {
            // The scanner's own flow-nesting limit, which it can hit before we see the events.
            too_deep()
        } else {
            format!("YAML syntax error: {}", e.info())
        };
        self.error(position(*e.marker()), message)
    }

    /// Location (from the root) of the node about to be added.
    fn location(&self) -> Vec<Step> {
        self.stack
            .iter()
            .map(|frame| match &frame.kind {
                FrameKind::Seq(items) => Step::Item(items.len()),
                FrameKind::Map { entries, key, .. } => {
                    if key.is_some() {
                        Step::Value(entries.len())
                    } else {
                        Step::Key(entries.len())
                    }
                }
            })
            .collect()
    }

    fn start(&mut self, pos: Position, anchor: usize, seq: bool) -> Result<(), SourceError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.error(pos, too_deep()));
        }
        let kind = if seq {
            FrameKind::Seq(Vec::new())
        } else {
            FrameKind::Map {
                entries: Vec::new(),
                key: None,
                seen: None,
                unknown: Vec::new(),
            }
        };
        self.stack.push(Frame {
            pos,
            anchor,
            size: 1,
            child_height: 0,
            kind,
        });
        Ok(())
    }

    fn end(&mut self) -> Result<(), SourceError> {
        let Some(frame) = self.stack.pop() else {
            return Err(self.error(Position::default(), "unbalanced collection end".into()));
        };
        let value = match frame.kind {
            FrameKind::Seq(items) => Value::Seq(items),
            FrameKind::Map { entries, key, .. } => {
                if let Some((k, _)) = key {
                    return Err(self.error(k.pos, "mapping key without a value".into()));
                }
                Value::Map(entries)
            }
        };
        let node = Node::new(value, frame.pos);
        self.add(
            node,
            frame.size,
            frame.child_height.saturating_add(1),
            frame.anchor,
            true,
        )
    }

    fn scalar(
        &mut self,
        text: Cow<'_, str>,
        style: ScalarStyle,
        anchor: usize,
        tag: Option<&Tag>,
        pos: Position,
    ) -> Result<(), SourceError> {
        if self.stack.is_empty() && self.root.is_none() {
            self.root_is_empty =
                text.is_empty() && style == ScalarStyle::Plain && tag.is_none() && anchor == 0;
        }
        let node = resolve_scalar(text, style, tag, pos).map_err(|m| self.error(pos, m))?;
        self.add(node, 1, 1, anchor, true)
    }

    fn alias(&mut self, id: usize, pos: Position) -> Result<(), SourceError> {
        let Some(info) = self.anchors.get(&id) else {
            return Err(self.error(
                pos,
                "alias refers to an anchor not defined earlier in this document, or to an enclosing node"
                    .into(),
            ));
        };
        let (size, height, text) = (info.size, info.height, info.text.clone());
        self.alias_nodes = self.alias_nodes.saturating_add(size);
        if self.alias_nodes > MAX_ALIAS_NODES {
            return Err(self.error(
                pos,
                format!("alias expansion exceeds {MAX_ALIAS_NODES} nodes in one document"),
            ));
        }
        if self.stack.len().saturating_add(height) > MAX_DEPTH + 1 {
            return Err(self.error(
                pos,
                format!("alias expansion exceeds the maximum nesting depth of {MAX_DEPTH}"),
            ));
        }
        let loc = self.location();
        self.aliases.push(PendingAlias {
            loc,
            anchor: id,
            pos,
        });
        // Placeholder, replaced by a copy of the anchored node in `finish`. Its `raw` holds the
        // anchored scalar's key text, for duplicate key checks.
        let known = text.is_some();
        let mut placeholder = Node::new(Value::Null, pos);
        placeholder.raw = text;
        self.add(placeholder, size, height, 0, known)
    }

    /// Adds a complete node at the current position. `known` is false for an alias placeholder
    /// whose key text is unknown.
    fn add(
        &mut self,
        node: Node,
        size: usize,
        height: usize,
        anchor: usize,
        known: bool,
    ) -> Result<(), SourceError> {
        if anchor != 0 {
            let text = node.is_scalar().then(|| node.key_text().into_owned());
            let loc = self.location();
            self.anchors.insert(
                anchor,
                AnchorInfo {
                    loc,
                    size,
                    height,
                    text,
                },
            );
        }
        let depth = self.stack.len();
        let Some(frame) = self.stack.last_mut() else {
            if self.root.is_some() {
                return Err(self.error(node.pos, "unexpected second document root".into()));
            }
            self.root = Some(node);
            return Ok(());
        };
        frame.size = frame.size.saturating_add(size);
        frame.child_height = frame.child_height.max(height);
        let mut duplicate = None;
        match &mut frame.kind {
            FrameKind::Seq(items) => items.push(node),
            FrameKind::Map {
                entries,
                key,
                seen,
                unknown,
            } => {
                if let Some((k, k_known)) = key.take() {
                    if !k_known {
                        unknown.push(entries.len());
                    }
                    entries.push((k, node));
                } else if !known {
                    *key = Some((node, false));
                } else if let Some(first) = check_duplicate(entries, unknown, seen, &node) {
                    duplicate = Some((
                        node.pos,
                        format!(
                            "duplicate mapping key {} (first at line {first})",
                            quote_truncated(&node.key_text())
                        ),
                    ));
                } else {
                    *key = Some((node, true));
                }
            }
        }
        if let Some((pos, message)) = duplicate {
            // The path of the mapping holding the duplicate.
            return Err(SourceError {
                pos,
                path: self.path_through(depth.saturating_sub(1)),
                message,
            });
        }
        Ok(())
    }

    /// Completes the document: expands aliases. Returns `None` for an empty document.
    fn finish(self) -> Result<Option<Node>, SourceError> {
        if !self.stack.is_empty() {
            return Err(self.error(Position::default(), "unterminated collection".into()));
        }
        let Some(mut root) = self.root else {
            return Ok(None);
        };
        if self.root_is_empty {
            return Ok(None);
        }
        for alias in &self.aliases {
            let internal = || SourceError {
                pos: alias.pos,
                path: String::new(),
                message: "internal error: cannot resolve alias".into(),
            };
            let source = self.anchors.get(&alias.anchor).ok_or_else(internal)?;
            let mut copy = node_at(&root, &source.loc).ok_or_else(internal)?.clone();
            copy.pos = alias.pos;
            *node_at_mut(&mut root, &alias.loc).ok_or_else(internal)? = copy;
        }
        Ok(Some(root))
    }
}

/// Resolves a scalar per the YAML 1.2 core schema (plain scalars) or its explicit core tag.
fn resolve_scalar(
    text: Cow<'_, str>,
    style: ScalarStyle,
    tag: Option<&Tag>,
    pos: Position,
) -> Result<Node, String> {
    let plain = style == ScalarStyle::Plain;
    let core_tag = tag
        .filter(|t| t.is_yaml_core_schema())
        .map(|t| t.suffix.as_str());
    let resolved = match core_tag {
        Some("str") => None,
        Some(expected @ ("null" | "bool" | "int" | "float")) => {
            match (expected, resolve_plain(&text)) {
                ("null", Some(v @ Value::Null))
                | ("bool", Some(v @ Value::Bool(_)))
                | ("float", Some(v @ Value::Float(_)))
                | ("int", Some(v @ Value::Int(_))) => Some(v),
                #[allow(clippy::cast_precision_loss)]
                ("float", Some(Value::Int(i))) => Some(Value::Float(i as f64)),
                _ => {
                    return Err(format!(
                        "scalar {} does not match its tag !!{expected}",
                        quote_truncated(&text)
                    ))
                }
            }
        }
        _ if plain => resolve_plain(&text),
        _ => None,
    };
    let (value, raw) = match resolved {
        Some(value) => (value, Some(text.into_owned())),
        None => (Value::Str(text.into_owned()), None),
    };
    Ok(Node {
        value,
        pos,
        plain,
        raw,
    })
}

/// YAML 1.2 core schema resolution of a plain scalar; `None` means it is a string.
fn resolve_plain(text: &str) -> Option<Value> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Some(Value::Null),
        "true" | "True" | "TRUE" => return Some(Value::Bool(true)),
        "false" | "False" | "FALSE" => return Some(Value::Bool(false)),
        ".nan" | ".NaN" | ".NAN" => return Some(Value::Float(f64::NAN)),
        _ => {}
    }
    let first = text.as_bytes().first()?;
    if !(first.is_ascii_digit() || matches!(first, b'-' | b'+' | b'.')) {
        return None;
    }
    let (negative, unsigned) = if let Some(rest) = text.strip_prefix('-') {
        (true, rest)
    } else {
        (false, text.strip_prefix('+').unwrap_or(text))
    };
    if matches!(unsigned, ".inf" | ".Inf" | ".INF") {
        return Some(Value::Float(if negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        }));
    }
    if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        // Decimal integer; too large for i64 → float.
        return match text.parse::<i64>() {
            Ok(i) => Some(Value::Int(i)),
            Err(_) => text.parse::<f64>().ok().map(Value::Float),
        };
    }
    for (prefix, radix) in [("0x", 16), ("0o", 8)] {
        if let Some(digits) = text.strip_prefix(prefix) {
            if !digits.is_empty() && digits.chars().all(|c| c.is_digit(radix)) {
                return i64::from_str_radix(digits, radix).ok().map(Value::Int);
            }
        }
    }
    if is_core_float(unsigned) {
        return text.parse::<f64>().ok().map(Value::Float);
    }
    None
}

/// `(\.[0-9]+ | [0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?` (sign already stripped).
fn is_core_float(s: &str) -> bool {
    fn digits(b: &[u8], mut i: usize) -> usize {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    }
    let b = s.as_bytes();
    let int_end = digits(b, 0);
    let mut i = int_end;
    let mut frac_digits = 0;
    if b.get(i) == Some(&b'.') {
        let frac_end = digits(b, i + 1);
        frac_digits = frac_end - (i + 1);
        i = frac_end;
    }
    if int_end == 0 && frac_digits == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp_end = digits(b, i);
        if exp_end == i {
            return false;
        }
        i = exp_end;
    }
    i == b.len()
}
