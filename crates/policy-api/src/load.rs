//! Reading manifests: files and directories → documents → typed, validated objects.
//!
//! A batch is all or nothing: [`load_paths`] returns every error it finds, across all files,
//! and no objects when there is one.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cilium::CiliumNetworkPolicy;
use crate::k8s::{Namespace, NetworkPolicy, Node, Pod};
use crate::scenario::ConnectivityTest;
use crate::source::{self, Position};
use crate::validate::{self, Issue, Severity};

/// Largest manifest file read, to bound memory on hostile input.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Where an object came from: the file and the position of its document (or `List` item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<str>,
    pub pos: Position,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.pos.line, self.pos.column)
    }
}

/// A located finding: error or warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: Arc<str>,
    pub pos: Position,
    /// Field path from the document root (`spec.ingress[0].toPorts[0].ports[0].port`).
    pub path: String,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {level}: ",
            self.file, self.pos.line, self.pos.column
        )?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

/// The policy kinds, with the exact API group each belongs to.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Namespace),
    Node(Node),
    Pod(Pod),
    NetworkPolicy(NetworkPolicy),
    CiliumNetworkPolicy(CiliumNetworkPolicy),
    CiliumClusterwideNetworkPolicy(CiliumNetworkPolicy),
    ConnectivityTest(ConnectivityTest),
}

#[derive(Debug, Clone)]
pub struct Manifest {
    pub origin: Origin,
    pub object: Object,
    /// The document (or `List` item) node, kept so later stages can locate fields.
    pub node: Arc<source::Node>,
}

impl Manifest {
    /// Position of a field path inside this manifest (falls back to the manifest itself).
    pub fn locate(&self, path: &str) -> Position {
        find_path(&self.node, path).map_or(self.origin.pos, |n| n.pos)
    }

    /// A located diagnostic for `path` in this manifest.
    pub fn diagnostic(
        &self,
        path: &str,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            file: self.origin.file.clone(),
            pos: self.locate(path),
            path: path.to_owned(),
            message: message.into(),
            hint,
        }
    }
}

/// Everything one batch of input holds.
#[derive(Debug, Clone, Default)]
pub struct Bundle {
    pub manifests: Vec<Manifest>,
    pub warnings: Vec<Diagnostic>,
}

/// Loads files and directories (recursively: `*.yaml`, `*.yml`, `*.json`, sorted by path).
pub fn load_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Bundle, Vec<Diagnostic>> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        collect_files(p.as_ref(), true, &mut files, &mut errors);
    }
    let mut bundle = Bundle::default();
    for file in files {
        let name: Arc<str> = Arc::from(file.display().to_string());
        let text = match read_bounded(&file) {
            Ok(t) => t,
            Err(message) => {
                errors.push(file_error(&name, message));
                continue;
            }
        };
        match load_str(&name, &text) {
            Ok(b) => {
                bundle.manifests.extend(b.manifests);
                bundle.warnings.extend(b.warnings);
            }
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(bundle)
    } else {
        Err(errors)
    }
}

fn file_error(file: &Arc<str>, message: String) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        file: file.clone(),
        pos: Position { line: 0, column: 0 },
        path: String::new(),
        message,
        hint: None,
    }
}

fn read_bounded(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "file is {} bytes; the limit is {MAX_FILE_BYTES}",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())
}

fn collect_files(
    path: &Path,
    explicit: bool,
    out: &mut Vec<PathBuf>,
    errors: &mut Vec<Diagnostic>,
) {
    let name: Arc<str> = Arc::from(path.display().to_string());
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            errors.push(file_error(&name, format!("cannot read: {e}")));
            return;
        }
    };
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => {
                errors.push(file_error(&name, format!("cannot list directory: {e}")));
                return;
            }
        };
        entries.sort();
        for e in entries {
            collect_files(&e, false, out, errors);
        }
    } else if explicit
        || path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
    {
        out.push(path.to_path_buf());
    }
}

/// Loads the documents of one file's text. `file` names it in diagnostics.
pub fn load_str(file: &str, text: &str) -> Result<Bundle, Vec<Diagnostic>> {
    let file: Arc<str> = Arc::from(file);
    let docs = source::parse_documents(text).map_err(|e| vec![source_diag(&file, e, "")])?;
    let mut bundle = Bundle::default();
    let mut errors = Vec::new();
    for doc in docs {
        let doc = Arc::new(doc);
        load_object(&file, &doc, "", &mut bundle, &mut errors);
    }
    if errors.is_empty() {
        Ok(bundle)
    } else {
        Err(errors)
    }
}

fn source_diag(file: &Arc<str>, e: source::SourceError, kind: &str) -> Diagnostic {
    let hint = hint_for(kind, &e.path, &e.message);
    Diagnostic {
        severity: Severity::Error,
        file: file.clone(),
        pos: e.pos,
        path: e.path,
        message: e.message,
        hint,
    }
}

/// Hints for mistakes people are known to make.
fn hint_for(kind: &str, path: &str, message: &str) -> Option<String> {
    let field = path.rsplit('.').next().unwrap_or(path);
    let field = field.split('[').next().unwrap_or(field);
    let unknown = message.contains("unknown field");
    let cilium = kind.starts_with("Cilium");
    match field {
        "bandwidth" if unknown && cilium => Some(
            "Cilium policy has no bandwidth field; its bandwidth manager reads the pod annotation \
             `kubernetes.io/egress-bandwidth: \"10M\"` (and `kubernetes.io/ingress-bandwidth`)"
                .to_owned(),
        ),
        "encryption" if unknown && cilium => Some(
            "encryption is agent configuration (`encryption.enabled: true`, \
             `encryption.type: wireguard`), not a policy field"
                .to_owned(),
        ),
        "port" if message.contains("expected a string") && cilium => {
            Some("Cilium ports are strings: write port: \"80\"".to_owned())
        }
        "ports" if unknown && kind == "NetworkPolicy" => None,
        "ingress" | "egress" if message.contains("duplicate") => Some(
            "merge the rules into one list; lenient parsers keep only the last key and drop the \
             others silently"
                .to_owned(),
        ),
        _ if unknown && (field == "fromPorts" || field == "ports") && cilium => Some(
            "ports are listed under toPorts[].ports in Cilium rules, for ingress too".to_owned(),
        ),
        _ => None,
    }
}

fn load_object(
    file: &Arc<str>,
    node: &Arc<source::Node>,
    base: &str,
    bundle: &mut Bundle,
    errors: &mut Vec<Diagnostic>,
) {
    let api_version = node.get("apiVersion").and_then(source::Node::as_str);
    let kind = node.get("kind").and_then(source::Node::as_str);
    let origin = Origin {
        file: file.clone(),
        pos: node.pos,
    };
    let at = |field: &str| {
        if base.is_empty() {
            field.to_owned()
        } else {
            format!("{base}.{field}")
        }
    };
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        errors.push(Diagnostic {
            severity: Severity::Error,
            file: file.clone(),
            pos: node.pos,
            path: base.to_owned(),
            message: "not a Kubernetes object: apiVersion and kind (strings) are required".to_owned(),
            hint: Some(
                "a policy fragment must be wrapped in a whole manifest with apiVersion, kind, metadata and spec"
                    .to_owned(),
            ),
        });
        return;
    };
    let prefix = if base.is_empty() {
        String::new()
    } else {
        format!("{base}.")
    };
    macro_rules! typed {
        ($ty:ty) => {
            match source::from_node::<$ty>(node, base) {
                Ok(v) => Some(v),
                Err(e) => {
                    errors.push(source_diag(file, e, kind));
                    None
                }
            }
        };
    }
    let push_issues =
        |issues: validate::Issues, errors: &mut Vec<Diagnostic>, warnings: &mut Vec<Diagnostic>| {
            for Issue {
                severity,
                path,
                message,
                hint,
            } in issues.0
            {
                let diag = Diagnostic {
                    severity,
                    file: file.clone(),
                    pos: find_path(node, &path).map_or(node.pos, |n| n.pos),
                    path: format!("{prefix}{path}"),
                    message,
                    hint,
                };
                match severity {
                    Severity::Error => errors.push(diag),
                    Severity::Warning => warnings.push(diag),
                }
            }
        };
    let object = match (api_version, kind) {
        (_, "List") => {
            match node.get("items").map(|n| &n.value) {
                Some(source::Value::Seq(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        load_object(
                            file,
                            &Arc::new(item.clone()),
                            &at(&format!("items[{i}]")),
                            bundle,
                            errors,
                        );
                    }
                }
                Some(source::Value::Null) | None => {}
                Some(_) => errors.push(Diagnostic {
                    severity: Severity::Error,
                    file: file.clone(),
                    pos: node.pos,
                    path: at("items"),
                    message: "items must be a list".to_owned(),
                    hint: None,
                }),
            }
            return;
        }
        ("v1", "Namespace") => typed!(Namespace).map(|ns| {
            push_issues(
                validate::namespace(&ns.metadata),
                errors,
                &mut bundle.warnings,
            );
            Object::Namespace(ns)
        }),
        ("v1", "Node") => typed!(Node).map(|n| {
            push_issues(validate::node(&n), errors, &mut bundle.warnings);
            Object::Node(n)
        }),
        ("v1", "Pod") => typed!(Pod).map(|p| {
            push_issues(validate::pod(&p), errors, &mut bundle.warnings);
            Object::Pod(p)
        }),
        (_, "NetworkPolicy") if api_version.starts_with("networking.k8s.io/") => {
            typed!(NetworkPolicy).map(|p| {
                push_issues(validate::network_policy(&p), errors, &mut bundle.warnings);
                Object::NetworkPolicy(p)
            })
        }
        (_, "CiliumNetworkPolicy") if api_version.starts_with("cilium.io/") => {
            typed!(CiliumNetworkPolicy).map(|p| {
                push_issues(
                    validate::cilium_policy(&p, false),
                    errors,
                    &mut bundle.warnings,
                );
                Object::CiliumNetworkPolicy(p)
            })
        }
        (_, "CiliumClusterwideNetworkPolicy") if api_version.starts_with("cilium.io/") => {
            typed!(CiliumNetworkPolicy).map(|p| {
                push_issues(
                    validate::cilium_policy(&p, true),
                    errors,
                    &mut bundle.warnings,
                );
                Object::CiliumClusterwideNetworkPolicy(p)
            })
        }
        (_, "ConnectivityTest") if api_version.starts_with("palisade.dev/") => {
            typed!(ConnectivityTest).map(|t| {
                push_issues(
                    validate::connectivity_test(&t),
                    errors,
                    &mut bundle.warnings,
                );
                Object::ConnectivityTest(t)
            })
        }
        _ => {
            errors.push(Diagnostic {
                severity: Severity::Error,
                file: file.clone(),
                pos: node.get("kind").map_or(node.pos, |n| n.pos),
                path: at("kind"),
                message: format!("kind not supported yet: {api_version} {kind}"),
                hint: Some(
                    "supported: v1 Namespace, Node, Pod, List; networking.k8s.io/v1 NetworkPolicy; \
                     cilium.io/v2 CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy; \
                     palisade.dev/v1alpha1 ConnectivityTest"
                        .to_owned(),
                ),
            });
            None
        }
    };
    if let Some(object) = object {
        bundle.manifests.push(Manifest {
            origin,
            object,
            node: node.clone(),
        });
    }
}

/// Finds the node at a field path like `spec.ingress[0].fromCIDR[1]` (map keys may contain
/// dots; the longest key that matches wins).
pub fn find_path<'a>(root: &'a source::Node, path: &str) -> Option<&'a source::Node> {
    if path.is_empty() {
        return Some(root);
    }
    let mut node = root;
    let mut rest = path;
    while !rest.is_empty() {
        rest = rest.strip_prefix('.').unwrap_or(rest);
        if let Some(after) = rest.strip_prefix('[') {
            let (idx, tail) = after.split_once(']')?;
            let i: usize = idx.parse().ok()?;
            match &node.value {
                source::Value::Seq(items) => node = items.get(i)?,
                _ => return None,
            }
            rest = tail;
            continue;
        }
        let source::Value::Map(entries) = &node.value else {
            return None;
        };
        // Longest key that is a prefix of the rest, followed by a separator or the end.
        let mut best: Option<(&source::Node, usize)> = None;
        for (k, v) in entries {
            let Some(key) = k.as_str() else { continue };
            if let Some(tail) = rest.strip_prefix(key) {
                if (tail.is_empty() || tail.starts_with('.') || tail.starts_with('['))
                    && best.is_none_or(|(_, len)| key.len() > len)
                {
                    best = Some((v, key.len()));
                    if tail.is_empty() {
                        // The key itself is the most precise position for a whole field.
                        best = Some((k_or_v(k, v), key.len()));
                    }
                }
            }
        }
        let (next, len) = best?;
        node = next;
        rest = &rest[len..];
    }
    Some(node)
}

/// For a scalar value the value's position is most useful; for a collection the key's.
fn k_or_v<'a>(key: &'a source::Node, value: &'a source::Node) -> &'a source::Node {
    match value.value {
        source::Value::Map(_) | source::Value::Seq(_) => key,
        _ => value,
    }
}
