//! Flows: what the datapath saw, for people and tools.
//!
//! - [`decode`] turns a ring-buffer [`palisade_abi::FlowEvent`] into a [`Flow`], with wall time
//!   from a [`BootClock`] and names from an [`Enricher`] ([`EngineEnricher`] over the policy
//!   engine);
//! - [`FlowRing`] keeps the last N flows with counters of what was lost, and wakes followers;
//! - [`Filter`] (built from hubble-style [`FilterFlags`]) selects flows;
//! - [`format`] prints them `compact`, `json` or `table`;
//! - [`api`] is the observe protocol on the agent's unix socket: [`FlowsRequest`],
//!   [`FlowsResponse`], the agent's [`serve_flows`] and the client's [`fetch_flows`].

#![forbid(unsafe_code)]

pub mod api;
pub mod decode;
pub mod engine;
pub mod filter;
pub mod flow;
pub mod format;
pub mod ring;
pub mod time;

#[cfg(test)]
mod testutil;

pub use api::{
    fetch_flows, handle_connection, serve_flows, stream_flows, ClientError, FlowsRequest,
    FlowsResponse, ObserveRequest, DEFAULT_AGENT_SOCKET,
};
pub use decode::{decode, EndpointInfo, Enricher, NoEnrichment};
pub use engine::EngineEnricher;
pub use filter::{Filter, FilterError, FilterFlags};
pub use flow::{
    DropReason, Endpoint, EventType, Flow, Ip, IpVersion, TcpFlags, TrafficDirection, Verdict, L4,
};
pub use format::{Format, Printer};
pub use ring::{Batch, Cursor, FlowRing, RingStats};
pub use time::BootClock;
