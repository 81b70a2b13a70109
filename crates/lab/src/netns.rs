//! Network namespaces: creating and deleting them (recorded in a process-wide registry so an
//! interrupted process still removes what it made), and running code inside one.
//!
//! Entering a namespace is done per thread (`setns(2)` on a thread moves only that thread), so
//! the process's main thread, and with it everything the lab does through `ip`, stays in the
//! machine's namespace while servers and probes run on threads that entered theirs. A socket
//! belongs to the namespace of the thread that created it, wherever it is used afterwards.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use nix::sched::{setns, CloneFlags};

use crate::cmd;
use crate::LabError;

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The file naming a namespace.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Whether a named namespace exists.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Every named namespace on the machine.
pub fn list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Moves the calling thread into `name`. Only for threads the lab owns: the move is permanent
/// for the thread.
pub fn enter(name: &str) -> Result<(), LabError> {
    let file =
        File::open(path(name)).map_err(|e| LabError::io(format!("network namespace {name}"), e))?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| LabError::Enter {
        netns: name.to_owned(),
        source,
    })
}

/// Runs `f` on a new thread inside `name` and returns its result (a panic in `f` is resumed
/// on the caller). Datapath calls that resolve interfaces by name (TCX attach) must run so,
/// inside the node namespace.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    let joined = std::thread::scope(|s| {
        s.spawn(|| {
            enter(name)?;
            Ok(f())
        })
        .join()
    });
    match joined {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs `f` on the calling thread inside `name`, then moves the thread back to the namespace
/// it was in (also when `f` panics). For work that cannot move to another thread (values that
/// are not `Send`).
pub fn with_netns<T>(name: &str, f: impl FnOnce() -> T) -> Result<T, LabError> {
    struct Restore(File);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Err(e) = setns(&self.0, CloneFlags::CLONE_NEWNET) {
                // The thread would stay in the lab's namespace: never carry on silently.
                if std::thread::panicking() {
                    eprintln!("palisade lab: cannot return to the original network namespace: {e}");
                } else {
                    panic!("palisade lab: cannot return to the original network namespace: {e}");
                }
            }
        }
    }
    let original = File::open("/proc/thread-self/ns/net")
        .map_err(|e| LabError::io("opening this thread's network namespace", e))?;
    let restore = Restore(original);
    enter(name)?;
    let out = f();
    drop(restore);
    Ok(out)
}

/// Writes a sysctl of `netns` (`path` under /proc/sys, e.g. `net/ipv4/ip_forward`). The
/// `/proc/sys/net` tree shows the namespace of the thread that opens it.
pub(crate) fn sysctl(netns: &str, key: &str, value: &str) -> Result<(), LabError> {
    let file = Path::new("/proc/sys").join(key);
    run_in(netns, || std::fs::write(&file, value))?
        .map_err(|e| LabError::io(format!("sysctl {key}={value} in {netns}"), e))
}

/// What one lab has created so far.
#[derive(Default)]
struct Created {
    netns: Vec<String>,
    state_file: Option<PathBuf>,
}

/// Labs of this process, by id.
static REGISTRY: Mutex<BTreeMap<String, Created>> = Mutex::new(BTreeMap::new());

fn registry() -> MutexGuard<'static, BTreeMap<String, Created>> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records a lab's state file, removed with its namespaces.
pub(crate) fn register_state_file(lab: &str, file: PathBuf) {
    registry().entry(lab.to_owned()).or_default().state_file = Some(file);
}

/// Creates `name` for `lab`; recorded only once it exists, so a namespace some other lab
/// holds is never deleted as ours.
pub(crate) fn create(lab: &str, name: &str) -> Result<(), LabError> {
    let mut reg = registry();
    cmd::ip(&["netns", "add", name])?;
    reg.entry(lab.to_owned())
        .or_default()
        .netns
        .push(name.to_owned());
    Ok(())
}

/// Where a lab's datapath pins its maps and links (removed with the lab).
pub fn bpf_pin_dir(lab: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/sys/fs/bpf/palisade-lab-{lab}"))
}

/// Removes a lab's pinned datapath objects, if any (pinned maps outlive every process).
pub fn remove_bpf_pins(lab: &str) {
    let _ = std::fs::remove_dir_all(bpf_pin_dir(lab));
}

/// Pin directories of labs that have no state file any more (left by a killed process).
pub fn orphan_bpf_pins(state_dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_prefix("palisade-lab-").map(str::to_owned))
        .filter(|id| {
            id.len() == 8
                && id.bytes().all(|b| b.is_ascii_hexdigit())
                && !crate::state::state_file(state_dir, id).exists()
        })
        .collect()
}

/// Deletes every namespace `lab` created, its state file and its pinned datapath objects.
pub(crate) fn remove_lab(lab: &str) -> Result<(), LabError> {
    let mut reg = registry();
    let Some(created) = reg.remove(lab) else {
        return Ok(());
    };
    remove_bpf_pins(lab);
    remove_created(&created)
}

/// Deletes named namespaces that exist, carrying on past errors (reported together).
pub fn delete_all(names: &[String]) -> Result<(), LabError> {
    let lines: Vec<String> = names
        .iter()
        .filter(|n| exists(n))
        .map(|n| format!("netns delete {n}"))
        .collect();
    cmd::ip_batch(None, &lines, true)
}

fn remove_created(created: &Created) -> Result<(), LabError> {
    // Pods and external hosts first: deleting their namespaces removes their veth pairs.
    let mut names = created.netns.clone();
    names.reverse();
    let result = delete_all(&names);
    if let Some(f) = &created.state_file {
        let _ = std::fs::remove_file(f);
    }
    result
}

static SIGNAL_HANDLER: OnceLock<Result<(), String>> = OnceLock::new();

/// Installs a SIGINT/SIGTERM/SIGHUP handler that removes every lab of this process and exits
/// with status 130. Idempotent; a process that has its own handler must call
/// [`cleanup_all`] from it instead.
pub fn install_signal_cleanup() -> Result<(), LabError> {
    SIGNAL_HANDLER
        .get_or_init(|| {
            ctrlc::set_handler(|| {
                // Hold the registry until exit: no lab can be half-created behind our back.
                let mut reg = registry();
                let labs = std::mem::take(&mut *reg);
                for (id, created) in &labs {
                    remove_bpf_pins(id);
                    if let Err(e) = remove_created(created) {
                        eprintln!("palisade lab {id}: cleanup: {e}");
                    }
                }
                if !labs.is_empty() {
                    eprintln!("interrupted: lab removed");
                }
                std::process::exit(130);
            })
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| LabError::State(format!("cannot install the Ctrl-C handler: {e}")))
}

/// Removes every lab of this process (for a caller's own signal handler).
pub fn cleanup_all() {
    let mut reg = registry();
    let labs = std::mem::take(&mut *reg);
    for (id, created) in &labs {
        remove_bpf_pins(id);
        let _ = remove_created(created);
    }
}
