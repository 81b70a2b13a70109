//! What the agent shows of the datapath's work: flows (decoded from the datapath's events,
//! kept in a [`FlowRing`] that `palisade observe` reads through the socket) and Prometheus
//! metrics (`--prometheus-serve-addr`).
//!
//! The agent thread owns the datapath, so it is the one that reads it: every
//! [`EVENT_POLL`] between requests it drains the events ring buffer, decodes each event
//! against the engine as it is then, counts the verdicts and pushes the flows; every
//! [`METRICS_POLL`] it reads the datapath's counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_datapath::abi::FlowEvent;
use palisade_flow::{decode, BootClock, EngineEnricher, FlowRing, RingStats};
use palisade_metrics::{Metrics, TableSizes};
use palisade_policy::Engine;
use serde::{Deserialize, Serialize};

/// How many flows the agent keeps unless told otherwise (`--flow-buffer`; Hubble's default).
pub const DEFAULT_FLOW_BUFFER: usize = palisade_flow::ring::DEFAULT_CAPACITY;
/// Flow events per second and per CPU the datapath may send unless told otherwise
/// (`--events-rate-limit`); the burst is twice that unless told otherwise.
pub const DEFAULT_EVENTS_RATE_LIMIT: u64 = 10_000;
/// How often the agent thread drains the datapath's events between requests.
pub const EVENT_POLL: Duration = Duration::from_millis(100);
/// How often the agent thread reads the datapath's counters.
pub const METRICS_POLL: Duration = Duration::from_secs(1);

/// The event rate limit: a token bucket per CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Events per second and per CPU; 0: no limit.
    pub rate: u64,
    /// Events a CPU may send at once after a quiet time.
    pub burst: u64,
}

impl RateLimit {
    /// `rate` per second, `burst` (default: twice the rate) at once; rate 0 is no limit.
    pub fn new(rate: u64, burst: Option<u64>) -> RateLimit {
        if rate == 0 {
            return RateLimit { rate: 0, burst: 0 };
        }
        RateLimit {
            rate,
            burst: burst.unwrap_or(rate.saturating_mul(2)).max(1),
        }
    }
}

/// The flow buffer, the metrics and the clock that dates events, shared by the agent thread
/// (which fills them) and the socket and HTTP threads (which read them).
#[derive(Debug, Clone)]
pub struct Telemetry {
    pub clock: BootClock,
    pub ring: Arc<FlowRing>,
    pub metrics: Arc<Metrics>,
}

impl Telemetry {
    /// A buffer of the last `flow_buffer` flows, fresh metrics, the clock captured now.
    pub fn new(flow_buffer: usize) -> Result<Telemetry, nix::Error> {
        Ok(Telemetry::with_clock(BootClock::capture()?, flow_buffer))
    }

    pub fn with_clock(clock: BootClock, flow_buffer: usize) -> Telemetry {
        Telemetry {
            clock,
            ring: Arc::new(FlowRing::new(flow_buffer)),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Decodes events against the engine (names of pods, labels of identities, rules), counts
    /// their verdicts and pushes them into the buffer; returns how many.
    pub fn record_events(&self, events: &[FlowEvent], engine: &Engine, node: &str) -> usize {
        if events.is_empty() {
            return 0;
        }
        let enricher = EngineEnricher::new(engine, node);
        let flows: Vec<_> = events
            .iter()
            .map(|ev| {
                let f = decode(ev, &self.clock, &enricher);
                self.metrics.observe_flow(&f);
                f
            })
            .collect();
        let n = flows.len();
        self.ring.extend(flows);
        n
    }

    /// Takes the datapath's cumulative counters: packets and bytes per reason, events lost.
    pub fn record_datapath(&self, m: &palisade_datapath::Metrics) {
        self.metrics.update_from_datapath(m);
        self.ring.set_lost_in_kernel(m.lost_events);
    }

    /// After a sync: the revision enforced, the tables written, the endpoints enforced.
    pub fn record_sync(&self, revision: u64, tables: (usize, usize, usize), endpoints: usize) {
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        self.metrics.set_policy_revision(revision);
        self.metrics.set_tables(TableSizes {
            tables: n(tables.0),
            total_entries: n(tables.1),
            max_entries: n(tables.2),
            soft_limit: 0,
        });
        self.metrics.set_endpoints(n(endpoints));
    }

    pub fn ring_stats(&self) -> RingStats {
        self.ring.stats()
    }
}

/// When the agent thread next reads the datapath.
#[derive(Debug, Clone, Copy)]
pub struct PollSchedule {
    pub next_events: Instant,
    pub next_metrics: Instant,
}

impl PollSchedule {
    pub fn now() -> PollSchedule {
        let now = Instant::now();
        PollSchedule {
            next_events: now,
            next_metrics: now,
        }
    }

    /// How long the agent thread may wait for a request before it reads the datapath.
    pub fn wait(&self) -> Duration {
        self.next_events.saturating_duration_since(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_datapath::abi::{
        PAL_DIR_INGRESS, PAL_EVENT_DROP, PAL_FAMILY_IPV4, PAL_OUTCOME_DROPPED,
        PAL_REASON_POLICY_DEFAULT,
    };
    use palisade_flow::{DropReason, Verdict};
    use palisade_policy::cluster;

    const YAML: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: xwing, namespace: default, labels: {org: alliance}}
spec: {nodeName: node-1}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: deathstar, namespace: default, labels: {org: empire}}
spec: {nodeName: node-1}
status: {podIP: 10.0.1.2}
";

    fn event(engine: &Engine) -> FlowEvent {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[10, 0, 1, 1]);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[10, 0, 1, 2]);
        FlowEvent {
            timestamp_ns: 1_000,
            r#type: PAL_EVENT_DROP,
            outcome: PAL_OUTCOME_DROPPED,
            reason: PAL_REASON_POLICY_DEFAULT,
            direction: PAL_DIR_INGRESS as u8,
            protocol: 6,
            family: PAL_FAMILY_IPV4 as u8,
            tcp_flags: 0x02,
            pad: 0,
            endpoint_id: 2,
            src_identity: engine.pod_identity("default", "xwing").unwrap_or(0),
            dst_identity: engine.pod_identity("default", "deathstar").unwrap_or(0),
            rule_id: 0,
            saddr,
            daddr,
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            ifindex: 7,
        }
    }

    #[test]
    fn events_become_flows_and_metrics() {
        let bundle = palisade_policy_api::load_str("t.yaml", YAML).expect("yaml");
        let engine = cluster::load(&bundle, palisade_policy::Config::default())
            .expect("engine")
            .engine;
        let t = Telemetry::with_clock(BootClock::with_offset_ns(0), 2);
        let ev = event(&engine);
        assert_eq!(t.record_events(&[ev, ev, ev], &engine, "node-1"), 3);
        let stats = t.ring_stats();
        assert_eq!((stats.received, stats.len, stats.evicted), (3, 2, 1));
        let f = &t.ring.last(1)[0];
        assert_eq!(f.verdict, Verdict::Dropped);
        assert_eq!(f.drop_reason_desc, Some(DropReason::PolicyDenied));
        assert_eq!(f.source.pod_name, "xwing");
        assert_eq!(f.destination.pod_name, "deathstar");
        assert_eq!(f.node_name, "node-1");

        t.record_datapath(&palisade_datapath::Metrics {
            counters: Vec::new(),
            lost_events: 5,
        });
        t.record_sync(3, (2, 10, 7), 4);
        assert_eq!(t.ring_stats().lost_in_kernel, 5);
        let text = t.metrics.encode();
        for line in [
            "palisade_policy_verdicts_total{direction=\"INGRESS\",verdict=\"DROPPED\"} 3",
            "palisade_flows_lost_total 5",
            "palisade_policy_revision 3",
            "palisade_policy_tables 2",
            "palisade_policy_table_entries 10",
            "palisade_policy_table_max_entries 7",
            "palisade_endpoints 4",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn rate_limits() {
        assert_eq!(
            RateLimit::new(10_000, None),
            RateLimit {
                rate: 10_000,
                burst: 20_000
            }
        );
        assert_eq!(
            RateLimit::new(10, Some(3)),
            RateLimit { rate: 10, burst: 3 }
        );
        assert_eq!(RateLimit::new(10, Some(0)).burst, 1);
        assert_eq!(RateLimit::new(0, Some(5)), RateLimit::default());
    }
}
