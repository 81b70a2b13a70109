//! The eBPF datapath from user space: loading the programs of `palisade-bpf` with their maps
//! pinned on bpffs, attaching them to pods' host-side veths with TCX links that are pinned too
//! (so enforcement survives the agent), and reading and writing the maps of the ABI in
//! `palisade-abi`: endpoints, the ipcache, per-endpoint policy tables (swapped whole), metrics
//! and flow events.
//!
//! Tables come in as flat [`TableEntry`] rows; [`lpm_entries`] turns them into the LPM entries
//! the kernel's lookup needs to give the engine's answer (see [`table`]).

pub mod table;

mod bpffs;
mod datapath;
mod error;

pub use datapath::{endpoint_value, Datapath, Hook, Limits, Metrics};
pub use error::Error;
pub use table::{lookup_model, lpm_entries, Direction, TableEntry, Verdict};

pub use palisade_abi as abi;
