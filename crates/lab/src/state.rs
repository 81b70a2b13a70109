//! Lab state files: one JSON file per lab under [`STATE_DIR`], written before any namespace is
//! created and removed with the lab, so `palisade lab exec` finds a lab's namespaces and
//! `palisade lab down` can remove a lab whose process is gone. The directory is fixed, so that
//! a `pal-<id>-…` namespace without a state file there is known to have no owner.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::lab::{ExternalAttachment, HostPodAttachment, NodeAttachment, PodAttachment};
use crate::{netns, LabError};

/// Where state files live.
pub const STATE_DIR: &str = "/run/palisade/lab";

/// The state directory.
pub fn state_dir() -> PathBuf {
    PathBuf::from(STATE_DIR)
}

/// Which command made a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabKind {
    /// `lab run` (or a library user): removed when its process is done.
    Run,
    /// `lab up`: lives until `lab down`.
    Up,
}

/// What a state file records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabState {
    pub id: String,
    pub kind: LabKind,
    /// The process that owns the lab, and its start time (to tell a reused pid).
    pub pid: u32,
    pub start_time: Option<u64>,
    /// Whether everything is built and serving.
    pub ready: bool,
    /// Seconds since the epoch.
    pub created: u64,
    /// The input files.
    pub files: Vec<String>,
    /// Every namespace the lab creates (planned before creation).
    pub netns: Vec<String>,
    pub node: NodeAttachment,
    pub pods: Vec<PodAttachment>,
    pub host_pods: Vec<HostPodAttachment>,
    pub externals: Vec<ExternalAttachment>,
}

/// The start time of a process (field 22 of /proc/PID/stat), if it exists.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

impl LabState {
    /// Whether the owning process is still running.
    pub fn alive(&self) -> bool {
        match (process_start_time(self.pid), self.start_time) {
            (Some(now), Some(then)) => now == then,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// The namespace of `NS/POD`, `node/NAME` or `external/NAME`.
    pub fn netns_for(&self, target: &str) -> Option<String> {
        let (kind, name) = target.split_once('/')?;
        match kind {
            "node" => (self.node.name == name).then(|| self.node.netns.clone()),
            "external" => self
                .externals
                .iter()
                .find(|e| e.name == name)
                .map(|e| e.netns.clone()),
            ns => self
                .pods
                .iter()
                .find(|p| p.namespace == ns && p.name == name)
                .map(|p| p.netns.clone())
                .or_else(|| {
                    self.host_pods
                        .iter()
                        .find(|p| p.namespace == ns && p.name == name)
                        .map(|_| self.node.netns.clone())
                }),
        }
    }

    /// The namespaces it lists that really are this lab's (`pal-<id>-…`).
    fn own_netns(&self) -> Vec<String> {
        let prefix = format!("pal-{}-", self.id);
        self.netns
            .iter()
            .filter(|n| n.starts_with(&prefix) && !n.contains('/'))
            .cloned()
            .collect()
    }
}

/// The state file of lab `id`.
pub fn state_file(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// The log file of a detached `lab up`.
pub fn log_file(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.log"))
}

/// Reads one state file.
pub fn read(path: &Path) -> Result<LabState, LabError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LabError::io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text)
        .map_err(|e| LabError::State(format!("{}: unreadable: {e}", path.display())))
}

/// Writes a state file atomically (temporary file + rename).
pub(crate) fn write(path: &Path, state: &LabState) -> Result<(), LabError> {
    let text = serde_json::to_string_pretty(state)
        .map_err(|e| LabError::State(format!("cannot encode the state: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| LabError::io(format!("writing {}", path.display()), e))
}

/// Every lab with a state file in `dir`, by id.
pub fn list(dir: &Path) -> Vec<LabState> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<LabState> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| read(&p).ok())
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Removes a lab: asks its process to stop (SIGTERM, then SIGKILL after `grace`), deletes
/// whatever namespaces remain, and its state and log files.
pub fn remove(dir: &Path, state: &LabState, grace: Duration) -> Result<(), LabError> {
    if state.alive() && state.pid != std::process::id() {
        let pid = Pid::from_raw(
            i32::try_from(state.pid)
                .map_err(|_| LabError::State(format!("invalid pid {}", state.pid)))?,
        );
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while state.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if state.alive() {
            let _ = kill(pid, Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(2);
            while state.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let result = netns::delete_all(&state.own_netns());
    netns::remove_bpf_pins(&state.id);
    let _ = std::fs::remove_file(state_file(dir, &state.id));
    let _ = std::fs::remove_file(log_file(dir, &state.id));
    result
}
