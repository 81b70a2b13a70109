//! Palisade's policy engine: every dialect compiled into one model and resolved, per endpoint
//! and direction, into a table of (peer identity, protocol, port range) → verdict. Pure
//! computation with no I/O, so the offline simulator and the kernel datapath share it.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod compile;
pub mod engine;
pub mod eval;
pub mod l7;
pub mod model;
pub mod reference;
pub mod selector;
pub mod simulate;
pub mod table;

pub use engine::{Config, Engine, EngineError, NamedPort, NodeInfo, PodInfo};
pub use model::{Action, Direction, PolicyKey};
