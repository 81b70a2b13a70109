//! The agent's desired state on disk: a state directory holding
//!
//! - `objects.json`: every applied object (Namespace, Node, Pod, NetworkPolicy,
//!   CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy) as its document, keyed by kind,
//!   namespace and name, with the revision of the batch that last changed it;
//! - `endpoints.json`: the attached pods (pod ↔ host-side ifname, ifindex, network namespace);
//! - `settings.json`: audit mode, global and per endpoint;
//! - `lock`: held (flock) by the running agent, so two agents never share a directory.
//!
//! Each file is replaced atomically (written to a temporary file, fsynced, renamed over the
//! old one, directory fsynced), so a crash leaves either the old or the new version. Files are
//! created mode 0600 in a 0700 directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest state file read back.
pub const MAX_STATE_FILE_BYTES: u64 = 1024 * 1024 * 1024;
/// Format version of the state files.
pub const STORE_VERSION: u32 = 1;

pub const OBJECTS_FILE: &str = "objects.json";
pub const ENDPOINTS_FILE: &str = "endpoints.json";
pub const SETTINGS_FILE: &str = "settings.json";
pub const LOCK_FILE: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "another agent is using the state directory {0} (its lock file is held); stop it first"
    )]
    Locked(PathBuf),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// The kinds of objects the agent keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ObjectKind {
    Namespace,
    Node,
    Pod,
    NetworkPolicy,
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Namespace => "Namespace",
            ObjectKind::Node => "Node",
            ObjectKind::Pod => "Pod",
            ObjectKind::NetworkPolicy => "NetworkPolicy",
            ObjectKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            ObjectKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        }
    }

    /// kubectl's resource name: `pod`, `ciliumnetworkpolicy.cilium.io`.
    pub fn resource(self) -> &'static str {
        match self {
            ObjectKind::Namespace => "namespace",
            ObjectKind::Node => "node",
            ObjectKind::Pod => "pod",
            ObjectKind::NetworkPolicy => "networkpolicy.networking.k8s.io",
            ObjectKind::CiliumNetworkPolicy => "ciliumnetworkpolicy.cilium.io",
            ObjectKind::CiliumClusterwideNetworkPolicy => {
                "ciliumclusterwidenetworkpolicy.cilium.io"
            }
        }
    }

    pub fn is_policy(self) -> bool {
        matches!(
            self,
            ObjectKind::NetworkPolicy
                | ObjectKind::CiliumNetworkPolicy
                | ObjectKind::CiliumClusterwideNetworkPolicy
        )
    }

    pub fn is_namespaced(self) -> bool {
        matches!(
            self,
            ObjectKind::Pod | ObjectKind::NetworkPolicy | ObjectKind::CiliumNetworkPolicy
        )
    }
}

/// Identifies an object: applying another with the same key replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectKey {
    pub kind: ObjectKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    /// `pod/xwing`.
    pub fn resource(&self) -> String {
        format!("{}/{}", self.kind.resource(), self.name)
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{}/{}", self.kind.as_str(), ns, self.name),
            None => write!(f, "{}/{}", self.kind.as_str(), self.name),
        }
    }
}

/// One applied object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredObject {
    #[serde(flatten)]
    pub key: ObjectKey,
    /// The revision (batch) that last changed the object.
    pub revision: u64,
    /// Its position in that batch.
    pub index: u32,
    /// `file:line` it was applied from.
    pub source: String,
    /// Unix seconds.
    pub applied_at: u64,
    /// A policy's first rule id in the engine (replayed on restart: see
    /// `desired::RuleIds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_rule: Option<u32>,
    /// The document as applied (YAML documents are kept as the equivalent JSON).
    pub document: serde_json::Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectsFile {
    pub version: u32,
    /// The revision of the last batch applied or deleted.
    pub revision: u64,
    pub objects: Vec<StoredObject>,
}

/// An attached pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEndpoint {
    pub namespace: String,
    pub pod: String,
    pub host_ifname: String,
    /// In `netns`, when last resolved.
    pub ifindex: u32,
    /// A name under /run/netns or a path; none: the agent's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Unix seconds.
    pub attached_at: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointsFile {
    pub version: u32,
    pub endpoints: Vec<StoredEndpoint>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub version: u32,
    /// `--policy-audit-mode` as last given.
    pub policy_audit_mode: bool,
    /// Endpoints in audit mode (`NAMESPACE/POD`).
    pub audit_endpoints: BTreeSet<String>,
}

/// Everything the state directory holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub revision: u64,
    pub objects: BTreeMap<ObjectKey, StoredObject>,
    pub endpoints: BTreeMap<(String, String), StoredEndpoint>,
    pub settings: Settings,
}

/// The open state directory (locked for this process).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl Store {
    /// Creates the directory (0700) if needed, takes its lock, and reads what it holds.
    pub fn open(dir: &Path) -> Result<(Store, State), StoreError> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(format!("opening {}", lock_path.display())))?;
        let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock)
            .map_err(|_| StoreError::Locked(dir.to_path_buf()))?;
        let store = Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        };
        let state = store.load()?;
        Ok((store, state))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn load(&self) -> Result<State, StoreError> {
        let objects: ObjectsFile = self.read(OBJECTS_FILE)?.unwrap_or_default();
        let endpoints: EndpointsFile = self.read(ENDPOINTS_FILE)?.unwrap_or_default();
        let settings: Settings = self.read(SETTINGS_FILE)?.unwrap_or_default();
        let mut state = State {
            revision: objects.revision,
            settings,
            ..State::default()
        };
        for o in objects.objects {
            state.revision = state.revision.max(o.revision);
            state.objects.insert(o.key.clone(), o);
        }
        for e in endpoints.endpoints {
            state
                .endpoints
                .insert((e.namespace.clone(), e.pod.clone()), e);
        }
        Ok(state)
    }

    fn read<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let path = self.dir.join(name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        let mut text = Vec::new();
        file.take(MAX_STATE_FILE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(io_err(format!("reading {}", path.display())))?;
        if text.len() as u64 > MAX_STATE_FILE_BYTES {
            return Err(StoreError::Corrupt {
                path,
                message: format!("larger than {MAX_STATE_FILE_BYTES} bytes"),
            });
        }
        let value: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let version = value
            .get("version")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if version != u64::from(STORE_VERSION) {
            return Err(StoreError::Corrupt {
                path,
                message: format!(
                    "format version {version}; this agent reads version {STORE_VERSION}"
                ),
            });
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path,
                message: e.to_string(),
            })
    }

    /// Replaces `objects.json`.
    pub fn save_objects<'a>(
        &self,
        revision: u64,
        objects: impl IntoIterator<Item = &'a StoredObject>,
    ) -> Result<(), StoreError> {
        #[derive(Serialize)]
        struct ObjectsRef<'a> {
            version: u32,
            revision: u64,
            objects: Vec<&'a StoredObject>,
        }
        let file = ObjectsRef {
            version: STORE_VERSION,
            revision,
            objects: objects.into_iter().collect(),
        };
        self.write(OBJECTS_FILE, &file)
    }

    /// Replaces `endpoints.json`.
    pub fn save_endpoints(
        &self,
        endpoints: &BTreeMap<(String, String), StoredEndpoint>,
    ) -> Result<(), StoreError> {
        let file = EndpointsFile {
            version: STORE_VERSION,
            endpoints: endpoints.values().cloned().collect(),
        };
        self.write(ENDPOINTS_FILE, &file)
    }

    /// Replaces `settings.json`.
    pub fn save_settings(&self, settings: &Settings) -> Result<(), StoreError> {
        let mut s = settings.clone();
        s.version = STORE_VERSION;
        self.write(SETTINGS_FILE, &s)
    }

    fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let context = || format!("writing {}", path.display());
        let body = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Io {
            context: context(),
            source: io::Error::other(e),
        })?;
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(context()))?;
        f.write_all(&body).map_err(io_err(context()))?;
        f.write_all(b"\n").map_err(io_err(context()))?;
        f.sync_all().map_err(io_err(context()))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err(context()))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(context()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn object(kind: ObjectKind, ns: Option<&str>, name: &str, revision: u64) -> StoredObject {
        StoredObject {
            key: ObjectKey {
                kind,
                namespace: ns.map(str::to_owned),
                name: name.to_owned(),
            },
            revision,
            index: 0,
            source: "a.yaml:1".into(),
            applied_at: 1,
            first_rule: None,
            document: serde_json::json!({"kind": kind.as_str(), "metadata": {"name": name}}),
        }
    }

    #[test]
    fn state_round_trips_and_is_private() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("state");
        let (store, state) = Store::open(&dir).expect("open");
        assert_eq!(state, State::default());
        let mode = fs::metadata(&dir).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);

        let mut objects = BTreeMap::new();
        for o in [
            object(ObjectKind::Pod, Some("default"), "xwing", 1),
            object(ObjectKind::CiliumNetworkPolicy, Some("default"), "rule1", 2),
            object(ObjectKind::Namespace, None, "default", 1),
        ] {
            objects.insert(o.key.clone(), o);
        }
        store.save_objects(2, objects.values()).expect("save");
        let mut endpoints = BTreeMap::new();
        endpoints.insert(
            ("default".to_owned(), "xwing".to_owned()),
            StoredEndpoint {
                namespace: "default".into(),
                pod: "xwing".into(),
                host_ifname: "lxc1".into(),
                ifindex: 7,
                netns: Some("node".into()),
                attached_at: 3,
            },
        );
        store.save_endpoints(&endpoints).expect("save");
        let settings = Settings {
            version: 0,
            policy_audit_mode: true,
            audit_endpoints: ["default/xwing".to_owned()].into(),
        };
        store.save_settings(&settings).expect("save");
        let mode = fs::metadata(dir.join(OBJECTS_FILE))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.join(".objects.json.tmp").exists());

        // A second agent on the same directory is refused while the first holds it.
        assert!(matches!(Store::open(&dir), Err(StoreError::Locked(_))));
        drop(store);
        let (_store, back) = Store::open(&dir).expect("reopen");
        assert_eq!(back.revision, 2);
        assert_eq!(back.objects, objects);
        assert_eq!(back.endpoints, endpoints);
        assert!(back.settings.policy_audit_mode);
        assert!(back.settings.audit_endpoints.contains("default/xwing"));
    }

    #[test]
    fn corrupt_or_foreign_files_are_reported() {
        let tmp = tempfile::tempdir().expect("tmp");
        fs::write(tmp.path().join(OBJECTS_FILE), "{not json").expect("write");
        let err = Store::open(tmp.path()).expect_err("corrupt");
        assert!(err.to_string().contains(OBJECTS_FILE), "{err}");
        fs::write(
            tmp.path().join(OBJECTS_FILE),
            r#"{"version": 99, "revision": 0, "objects": []}"#,
        )
        .expect("write");
        let err = Store::open(tmp.path()).expect_err("version");
        assert!(err.to_string().contains("version 99"), "{err}");
    }
}
