//! The Palisade agent.
//!
//! - [`sync`]: keeping the kernel datapath in step with the policy engine. [`sync::DatapathSync`]
//!   turns the engine's resolved state into the datapath's maps: the ipcache (address →
//!   identity), one endpoint record per attached pod, and one policy table per endpoint and
//!   direction. It rewrites only what changed, in an order that never opens a gap, and can
//!   start from what the kernel holds ([`sync::DatapathSync::from_kernel`]) so a restarted
//!   agent rewrites only the differences.
//! - [`store`]: the desired state on disk (applied objects, endpoint attachments, audit
//!   settings), replaced atomically.
//! - [`desired`]: manifests → engine, validated as `palisade simulate` validates them.
//! - [`daemon`]: the agent itself: requests → store → engine → datapath.
//! - [`server`] and [`client`]: the root-only unix-socket API, with its messages in
//!   [`protocol`]; the socket also serves flows to `palisade observe`.
//! - [`telemetry`]: the datapath's events decoded into flows (kept in a buffer for
//!   `palisade observe`) and the Prometheus metrics (`--prometheus-serve-addr`).

#![forbid(unsafe_code)]

pub mod client;
pub mod daemon;
pub mod desired;
pub mod netns;
pub mod protocol;
pub mod server;
pub mod store;
pub mod sync;
pub mod telemetry;

pub use daemon::{Agent, AgentError, Options};
