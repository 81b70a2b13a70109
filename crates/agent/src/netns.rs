//! Running datapath calls inside a pod's node-side network namespace.
//!
//! TCX attaches by interface name in the calling thread's network namespace. `setns(2)` moves
//! only the calling thread, so the work runs on a short-lived thread that enters the namespace
//! and ends there: no thread of the agent ever has to find its way back.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("invalid network namespace {0:?}: a name under /run/netns or an absolute path")]
    Invalid(String),
    #[error("network namespace {name}: {source}")]
    Open {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {name}: {source}")]
    Enter { name: String, source: nix::Error },
}

/// The file of a namespace given as a name (`/run/netns/NAME`) or an absolute path.
pub fn path(netns: &str) -> Result<PathBuf, NetnsError> {
    if netns.starts_with('/') {
        let p = Path::new(netns);
        if p.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(NetnsError::Invalid(netns.to_owned()));
        }
        return Ok(p.to_path_buf());
    }
    let ok = !netns.is_empty()
        && netns != "."
        && netns != ".."
        && !netns.contains(['/', '\0'])
        && netns.len() <= 255;
    if ok {
        Ok(Path::new(NETNS_DIR).join(netns))
    } else {
        Err(NetnsError::Invalid(netns.to_owned()))
    }
}

/// Runs `f` in `netns` (none: here), on a thread of its own.
pub fn run_in<T: Send>(netns: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let Some(name) = netns else {
        return Ok(f());
    };
    let file = File::open(path(name)?).map_err(|source| NetnsError::Open {
        name: name.to_owned(),
        source,
    })?;
    let joined = std::thread::scope(|s| {
        s.spawn(|| {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                name: name.to_owned(),
                source,
            })?;
            Ok(f())
        })
        .join()
    });
    match joined {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// The ifindex of `ifname` in `netns`; `None` if there is no such interface (or namespace).
pub fn ifindex(netns: Option<&str>, ifname: &str) -> Result<Option<u32>, NetnsError> {
    match run_in(netns, || nix::net::if_::if_nametoindex(ifname)) {
        Ok(Ok(i)) => Ok(Some(i)),
        Ok(Err(_)) => Ok(None),
        Err(NetnsError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(
            path("pal-1-node").expect("name"),
            PathBuf::from("/run/netns/pal-1-node")
        );
        assert_eq!(
            path("/proc/1/ns/net").expect("path"),
            PathBuf::from("/proc/1/ns/net")
        );
        for bad in ["", "..", "a/b", "/run/netns/../x"] {
            assert!(path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn here_needs_no_namespace() {
        assert_eq!(run_in(None, || 7).expect("run"), 7);
        assert_eq!(ifindex(None, "lo").expect("lo"), Some(1));
        assert_eq!(ifindex(None, "no-such-if0").expect("none"), None);
        assert_eq!(
            ifindex(Some("palisade-no-such-netns"), "lo").expect("none"),
            None
        );
    }
}
