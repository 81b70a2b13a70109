//! Palisade's manifest layer: the user-facing types of every policy dialect, read from YAML or
//! JSON with source positions, and validated the way each project's own API server or agent
//! validates them.
//!
//! Entry point: [`load::load_paths`] (files and directories) or [`load::load_str`].

pub mod cilium;
pub mod k8s;
pub mod kafka;
pub mod load;
pub mod meta;
pub mod names;
pub mod scenario;
pub mod source;
pub mod validate;

pub use load::{load_paths, load_str, Bundle, Diagnostic, Manifest, Object, Origin};
