//! The enforcement hook: what puts policy on the lab's wires. The eBPF datapath implements
//! [`Enforcer`] (attach to each pod's host-side veth in the node namespace, load the tables);
//! until it is plugged in, [`NoEnforcement`] leaves every connection to the network alone.

use palisade_policy::Engine;

use crate::lab::PodAttachment;

/// Whatever an enforcer reports as going wrong.
pub type EnforcerError = Box<dyn std::error::Error + Send + Sync>;

/// Policy enforcement for a lab's endpoints.
///
/// The lab calls [`endpoint_added`](Enforcer::endpoint_added) once per pod (not for
/// host-network pods, which have no veth) after the pod's wiring exists and before any probe,
/// then [`sync`](Enforcer::sync) with the engine whose tables must be enforced. Calls that act
/// on interfaces by name must run inside the node namespace: use
/// [`crate::netns::run_in`] with [`PodAttachment::node_netns`].
pub trait Enforcer {
    /// A pod's endpoint is wired: attach to `pod.host_ifname` (ifindex `pod.host_ifindex`
    /// inside `pod.node_netns`).
    fn endpoint_added(&mut self, pod: &PodAttachment) -> Result<(), EnforcerError>;

    /// Brings the enforced state (ipcache, endpoint tables) in line with `engine`.
    fn sync(&mut self, engine: &Engine) -> Result<(), EnforcerError>;

    /// Whether policy is actually enforced (false: the lab warns that every connection the
    /// network can carry is allowed).
    fn enforcing(&self) -> bool {
        true
    }
}

/// No enforcement at all: every probe that the network can carry is allowed.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEnforcement;

impl Enforcer for NoEnforcement {
    fn endpoint_added(&mut self, _pod: &PodAttachment) -> Result<(), EnforcerError> {
        Ok(())
    }

    fn sync(&mut self, _engine: &Engine) -> Result<(), EnforcerError> {
        Ok(())
    }

    fn enforcing(&self) -> bool {
        false
    }
}
