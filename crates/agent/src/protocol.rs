//! The agent's API on its unix socket: one JSON document per message, each preceded by its
//! length (4 bytes, big endian). A client sends a [`Request`] and reads one [`Response`]; it may
//! send more requests on the same connection. Messages larger than [`MAX_MESSAGE_BYTES`] are
//! refused before they are read.

use std::fmt;
use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use palisade_policy_api::load::Diagnostic;
use palisade_policy_api::validate::Severity;

/// Largest message either side accepts (a request carrying manifests, or a response).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/palisade/agent.sock";
/// Where the agent keeps its desired state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/palisade";
/// Where the datapath's maps and links are pinned unless told otherwise.
pub const DEFAULT_BPF_PIN_DIR: &str = "/sys/fs/bpf/palisade";

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("message of {0} bytes is over the limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the connection was closed")]
    Closed,
}

/// Writes one message.
pub fn write_message<T: Serialize>(w: &mut impl Write, message: &T) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(message)?;
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| ProtocolError::TooLarge(body.len()))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(&body)?;
    w.flush()?;
    Ok(())
}

/// Reads one message; [`ProtocolError::Closed`] if the peer closed the connection before a
/// new message started.
pub fn read_message<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, ProtocolError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// One manifest file as the client read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// The name diagnostics use (the path the client read).
    pub name: String,
    pub text: String,
}

/// What `get` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ResourceKind {
    Endpoints,
    Identities,
    Policies,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "camelCase")]
pub enum Request {
    /// Applies every object of the files as one batch: all or nothing.
    Apply {
        files: Vec<SourceFile>,
    },
    /// Deletes the objects the files name (kind, namespace, name).
    Delete {
        files: Vec<SourceFile>,
    },
    /// Lists endpoints, identities or policies; `namespace: None` lists every namespace.
    /// Cluster-scoped items are always listed.
    #[serde(rename_all = "camelCase")]
    Get {
        kind: ResourceKind,
        namespace: Option<String>,
    },
    Status,
    /// Shows an endpoint's configuration, or changes it (`audit`).
    #[serde(rename_all = "camelCase")]
    EndpointConfig {
        namespace: String,
        pod: String,
        audit: Option<bool>,
    },
    /// Attaches the programs to a pod's host-side veth `host_ifname`, which lives in network
    /// namespace `netns` (a name under /run/netns, or a path such as /proc/PID/ns/net; none:
    /// the agent's own).
    #[serde(rename_all = "camelCase")]
    Attach {
        namespace: String,
        pod: String,
        host_ifname: String,
        netns: Option<String>,
    },
    /// Detaches the programs from a pod's veth and forgets its endpoint.
    #[serde(rename_all = "camelCase")]
    Detach {
        namespace: String,
        pod: String,
    },
    /// Flows from the agent's buffer (`palisade observe`): answered by the connection with a
    /// stream of [`palisade_flow::FlowsResponse`] messages, not with a [`Response`].
    Flows(Box<palisade_flow::FlowsRequest>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "camelCase")]
pub enum Response {
    Applied(ChangeReport),
    Deleted(ChangeReport),
    Endpoints {
        items: Vec<EndpointInfo>,
    },
    Identities {
        items: Vec<IdentityInfo>,
    },
    Policies {
        items: Vec<PolicyInfo>,
    },
    Status(Box<AgentStatus>),
    Endpoint(EndpointReport),
    /// The input is invalid; nothing changed.
    Rejected {
        diagnostics: Vec<WireDiagnostic>,
    },
    /// The request failed; nothing changed unless the message says otherwise.
    Error {
        message: String,
    },
}

/// A located diagnostic, as [`Diagnostic`] but serializable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireDiagnostic {
    /// `error` or `warning`.
    pub severity: String,
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub path: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl WireDiagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == "error"
    }

    /// Back to the manifest layer's type (for printing it the same way).
    pub fn to_diagnostic(&self) -> Diagnostic {
        Diagnostic {
            severity: if self.is_error() {
                Severity::Error
            } else {
                Severity::Warning
            },
            file: std::sync::Arc::from(self.file.as_str()),
            pos: palisade_policy_api::source::Position {
                line: self.line,
                column: self.column,
            },
            path: self.path.clone(),
            message: self.message.clone(),
            hint: self.hint.clone(),
        }
    }
}

impl From<&Diagnostic> for WireDiagnostic {
    fn from(d: &Diagnostic) -> Self {
        WireDiagnostic {
            severity: match d.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            }
            .to_owned(),
            file: d.file.to_string(),
            line: d.pos.line,
            column: d.pos.column,
            path: d.path.clone(),
            message: d.message.clone(),
            hint: d.hint.clone(),
        }
    }
}

impl fmt::Display for WireDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_diagnostic().fmt(f)
    }
}

/// What happened to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ChangeAction {
    Created,
    Configured,
    Unchanged,
    Deleted,
    NotFound,
}

impl ChangeAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeAction::Created => "created",
            ChangeAction::Configured => "configured",
            ChangeAction::Unchanged => "unchanged",
            ChangeAction::Deleted => "deleted",
            ChangeAction::NotFound => "not found",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// `pod/xwing`, `ciliumnetworkpolicy.cilium.io/rule1` (kubectl's spelling).
    pub resource: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    pub action: ChangeAction,
}

/// Map writes of one sync (see `sync::SyncStats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncReport {
    /// Every map entry written or removed (a table swap counts once).
    pub map_writes: usize,
    pub tables_written: usize,
    pub table_entries: usize,
    pub tables_removed: usize,
    pub endpoints_written: usize,
    pub endpoints_removed: usize,
    pub ipcache_changes: usize,
}

impl From<crate::sync::SyncStats> for SyncReport {
    fn from(s: crate::sync::SyncStats) -> Self {
        SyncReport {
            map_writes: s.map_writes(),
            tables_written: s.tables_written,
            table_entries: s.table_entries,
            tables_removed: s.tables_removed,
            endpoints_written: s.endpoints_written,
            endpoints_removed: s.endpoints_removed,
            ipcache_changes: s.ipcache_changes,
        }
    }
}

/// The outcome of an apply or delete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeReport {
    pub changes: Vec<Change>,
    pub warnings: Vec<WireDiagnostic>,
    /// The desired state's revision after the change.
    pub revision: u64,
    /// What the datapath sync wrote (none when nothing changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncReport>,
    /// From the request's arrival to the kernel maps holding the result, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforced_ms: Option<f64>,
    /// The change is stored, but the datapath could not be brought in line (it is retried
    /// at the next change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Enforcement {
    pub ingress: bool,
    pub egress: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditState {
    /// `palisade endpoint config NS/POD audit=true`.
    pub endpoint: bool,
    /// `palisade agent --policy-audit-mode`.
    pub global: bool,
    /// Whether the endpoint is in audit mode (either of the above).
    pub effective: bool,
}

/// One attached pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointInfo {
    pub namespace: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    pub host_ifname: String,
    pub ifindex: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Whether policy is enforced in each direction (some policy selects the endpoint).
    pub policy_enforcement: Enforcement,
    pub audit: AuditState,
    /// `ready`; `waiting-for-pod` (no such Pod applied: its traffic is dropped);
    /// `interface-missing`; `other-node`; `host-network`; `not-synced`.
    pub state: String,
    pub labels: Vec<String>,
}

/// The answer to attach, detach and endpoint config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointReport {
    pub endpoint: EndpointInfo,
    /// What changed (`attached`, `detached`, `configured`, `unchanged`).
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforced_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityInfo {
    pub id: u32,
    /// `reserved`, `cluster` or `cidr`.
    pub scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub labels: Vec<String>,
    /// Pods (applied) with this identity.
    pub pods: usize,
    /// Attached endpoints with this identity.
    pub endpoints: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyInfo {
    pub kind: String,
    pub api_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// Annotated `palisade.dev/audit: "true"`.
    pub audit: bool,
    /// The revision that last changed it.
    pub revision: u64,
    /// `file:line` it was applied from.
    pub source: String,
    /// Unix seconds.
    pub applied_at: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectCounts {
    pub namespaces: usize,
    pub nodes: usize,
    pub pods: usize,
    pub policies: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelReport {
    pub ipcache_entries: usize,
    pub endpoints: usize,
    pub unknown_endpoints: usize,
    pub tables: usize,
    pub table_entries: usize,
}

/// How the agent started: what it restored and what it had to rewrite.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartupReport {
    pub restored_objects: usize,
    /// Stored objects that no longer load (with why); they are not enforced.
    pub skipped_objects: Vec<String>,
    pub restored_endpoints: usize,
    /// What the pinned maps held when the agent started.
    pub kernel: KernelReport,
    /// What the first sync rewrote to bring the kernel in line (0 after a restart with
    /// nothing changed).
    pub reconcile: SyncReport,
    /// From start to serving, in milliseconds.
    pub duration_ms: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatapathMetrics {
    pub forwarded_packets: u64,
    pub policy_denied_packets: u64,
    pub default_denied_packets: u64,
    pub fail_closed_packets: u64,
    pub spoofed_packets: u64,
    pub lost_events: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatapathStatus {
    /// The last sync succeeded.
    pub in_sync: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_error: Option<String>,
    pub last_sync: SyncReport,
    pub attached_interfaces: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<DatapathMetrics>,
}

/// The flow buffer and the events that feed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowStatus {
    /// How many flows the buffer holds at most (`--flow-buffer`).
    pub capacity: usize,
    /// How many it holds now.
    pub len: usize,
    /// Flows received from the datapath since the agent started.
    pub received: u64,
    /// Flows pushed out of the buffer by newer ones.
    pub evicted: u64,
    /// Events the kernel could not send (over the rate limit, or the ring buffer was full),
    /// counted since the datapath's maps were made.
    pub lost_in_kernel: u64,
    /// The event rate limit, per CPU (`--events-rate-limit`, 0: none).
    pub rate_limit: u64,
    pub rate_burst: u64,
    /// Where Prometheus metrics are served (`--prometheus-serve-addr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyTiming {
    /// Changes (apply, delete, endpoint changes) that reached the datapath.
    pub count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_enforced_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_enforced_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub version: String,
    pub pid: u32,
    pub node: String,
    pub cluster: String,
    pub state_dir: String,
    pub socket: String,
    pub bpf_pin_dir: String,
    /// Unix seconds.
    pub started_at: u64,
    pub uptime_seconds: u64,
    pub revision: u64,
    pub policy_audit_mode: bool,
    pub objects: ObjectCounts,
    pub endpoints: usize,
    pub identities: usize,
    pub datapath: DatapathStatus,
    #[serde(default)]
    pub flows: FlowStatus,
    pub apply: ApplyTiming,
    pub startup: StartupReport,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let req = Request::Attach {
            namespace: "default".into(),
            pod: "xwing".into(),
            host_ifname: "lxc1".into(),
            netns: Some("node".into()),
        };
        let mut buf = Vec::new();
        write_message(&mut buf, &req).expect("write");
        assert_eq!(
            &buf[..4],
            &u32::try_from(buf.len() - 4).expect("len").to_be_bytes()
        );
        let back: Request = read_message(&mut buf.as_slice()).expect("read");
        assert_eq!(back, req);
        let text = String::from_utf8_lossy(&buf[4..]).into_owned();
        assert!(text.contains("\"request\":\"attach\""), "{text}");
        assert!(text.contains("\"hostIfname\""), "{text}");
    }

    #[test]
    fn flows_requests_are_the_flow_crates() {
        // `palisade observe` sends palisade_flow's ObserveRequest; the agent reads a Request.
        let req = palisade_flow::FlowsRequest {
            last: Some(5),
            follow: true,
            ..palisade_flow::FlowsRequest::default()
        };
        let mut buf = Vec::new();
        palisade_flow::api::write_message(
            &mut buf,
            &palisade_flow::ObserveRequest::Flows(req.clone()),
        )
        .expect("write");
        let back: Request = read_message(&mut buf.as_slice()).expect("read");
        assert_eq!(back, Request::Flows(Box::new(req)));
        let minimal: Request = serde_json::from_str(r#"{"request":"flows"}"#).expect("parse");
        assert_eq!(minimal, Request::Flows(Box::default()));
        // And the agent's errors read as the flow protocol's.
        let mut buf = Vec::new();
        write_message(
            &mut buf,
            &Response::Error {
                message: "no".into(),
            },
        )
        .expect("write");
        let err: Option<palisade_flow::FlowsResponse> =
            palisade_flow::api::read_message(&mut buf.as_slice()).expect("read");
        assert_eq!(
            err,
            Some(palisade_flow::FlowsResponse::Error {
                message: "no".into()
            })
        );
    }

    #[test]
    fn oversized_and_truncated_messages_are_refused() {
        let mut buf = u32::try_from(MAX_MESSAGE_BYTES + 1)
            .expect("len")
            .to_be_bytes()
            .to_vec();
        buf.extend_from_slice(b"{}");
        assert!(matches!(
            read_message::<Request>(&mut buf.as_slice()),
            Err(ProtocolError::TooLarge(_))
        ));
        assert!(matches!(
            read_message::<Request>(&mut [].as_slice()),
            Err(ProtocolError::Closed)
        ));
        assert!(matches!(
            read_message::<Request>(&mut [0u8, 0].as_slice()),
            Err(ProtocolError::Io(_))
        ));
        let mut bad = 3u32.to_be_bytes().to_vec();
        bad.extend_from_slice(b"{x}");
        assert!(matches!(
            read_message::<Request>(&mut bad.as_slice()),
            Err(ProtocolError::Json(_))
        ));
    }
}
