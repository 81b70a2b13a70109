//! The Palisade lab: a ConnectivityTest executed for real on this machine (root needed).
//!
//! Every pod gets its own network namespace with its podIP on `eth0`, wired by a veth pair to a
//! node namespace (`lxc…` on the node side, where the datapath attaches); external hosts get
//! namespaces of their own behind the node; built-in servers answer on every declared port and
//! every probed one; probes (TCP handshake + echo, HTTP/1.1, UDP echo, ICMP echo) run in
//! parallel from the source's namespace. The machine's own network namespace is never
//! modified: the node is a namespace too. See `docs/lab.md`.
//!
//! [`Lab`] removes everything it created when dropped (also while unwinding from a panic);
//! [`install_signal_cleanup`] does the same on SIGINT, SIGTERM and SIGHUP; a state file per
//! lab under [`state::STATE_DIR`] lets `palisade lab down` remove labs whose process is gone.
//!
//! ```no_run
//! use palisade_lab::{probe, Lab, LabOptions, LabSpec, NoEnforcement, ProbeOptions};
//! use palisade_policy::{cluster, Config};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let files = ["examples/starwars/cluster.yaml", "examples/starwars/1-no-policy"];
//! let bundle = palisade_policy_api::load_paths(&files).map_err(|d| format!("{d:?}"))?;
//! let loaded = cluster::load(&bundle, Config::default()).map_err(|d| format!("{d:?}"))?;
//! let spec = LabSpec::new(&bundle, &loaded.engine, &loaded.tests)?;
//! let probes = probe::plan(&loaded.engine, &loaded.tests, &spec).map_err(|d| format!("{d:?}"))?;
//! let lab = Lab::create(&spec, &LabOptions::default())?;
//! lab.attach(&mut NoEnforcement, &loaded.engine)?;
//! for r in probe::run(&lab, &probes, &ProbeOptions::default()) {
//!     println!("{} -> {:?}: {}", r.from, r.to, r.verdict.as_str());
//! }
//! lab.destroy()?; // or just drop it
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod cmd;
pub mod datapath_enforcer;
pub mod enforcer;
mod lab;
pub mod netns;
pub mod probe;
mod server;
pub mod spec;
pub mod state;

pub use datapath_enforcer::DatapathEnforcer;
pub use enforcer::{Enforcer, EnforcerError, NoEnforcement};
pub use lab::{
    ExternalAttachment, HostPodAttachment, Lab, LabOptions, NodeAttachment, PodAttachment,
    GATEWAY_V4, GATEWAY_V6, NODE_IFNAME,
};
pub use netns::install_signal_cleanup;
pub use probe::{plan, LabProbe, ProbeKind, ProbeOptions};
pub use spec::{ExternalSpec, HostPodSpec, LabSpec, NodeSpec, PodSpec, ServerPort, Transport};

/// Why the lab could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(
        "the lab needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces; \
         run it as root"
    )]
    NotRoot,
    #[error("the lab needs iproute2's `ip` command: {0}")]
    NoIpCommand(std::io::Error),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {netns}: {source}")]
    Enter { netns: String, source: nix::Error },
    #[error("{0}")]
    Unsupported(String),
    #[error("servers in {netns}: {message}")]
    Server { netns: String, message: String },
    #[error("lab state: {0}")]
    State(String),
    #[error("enforcer: {0}")]
    Enforcer(EnforcerError),
}

impl LabError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Io {
            context: context.into(),
            source,
        }
    }
}
