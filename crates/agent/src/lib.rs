//! The agent's core: keeping the kernel datapath in step with the policy engine.
//!
//! [`sync::DatapathSync`] turns the engine's resolved state into the datapath's maps: the
//! ipcache (address → identity), one endpoint record per attached pod, and one policy table per
//! endpoint and direction. It rewrites only what changed, in an order that never opens a gap.

#![forbid(unsafe_code)]

pub mod sync;
