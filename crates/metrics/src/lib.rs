//! The agent's Prometheus metrics and a minimal `/metrics` endpoint.
//!
//! [`Metrics`] holds every family; the agent feeds it:
//! - [`Metrics::update_from_datapath`] with the datapath's cumulative per-reason/direction
//!   packet and byte counters and its lost-event count (monotonic since the maps were made;
//!   this turns them into counter increments, so a datapath reload is not a negative step);
//! - [`Metrics::observe_flow`] with each decoded flow (policy verdicts by direction and verdict);
//! - [`Metrics::set_tables`], [`Metrics::set_policy_revision`], [`Metrics::set_endpoints`] and
//!   [`Metrics::observe_apply_to_enforced`] as state changes.
//!
//! [`serve`] answers `GET /metrics` on a TCP listener with one thread
//! (`--prometheus-serve-addr`).

#![forbid(unsafe_code)]

mod server;

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use palisade_abi::MetricsValue;
use palisade_flow::{DropReason, EventType, Flow, TrafficDirection, Verdict};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

pub use server::{bind_addr, serve, MetricsServer, CONTENT_TYPE, MAX_REQUEST_BYTES};

/// Buckets of `palisade_policy_apply_to_enforced_seconds`: 1 ms to 5 s.
pub const APPLY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    direction: &'static str,
    verdict: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// Sizes of the policy tables, for [`Metrics::set_tables`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableSizes {
    /// Tables written (endpoints × directions).
    pub tables: u64,
    /// Entries over all tables.
    pub total_entries: u64,
    /// Entries of the largest table.
    pub max_entries: u64,
    /// The configured soft limit of one table's entries; pressure is `max_entries / soft_limit`
    /// (0 when no limit is configured).
    pub soft_limit: u64,
}

/// What the datapath reported last, to turn its cumulative counters into increments.
#[derive(Debug, Default)]
struct Previous {
    counters: Vec<[MetricsValue; 2]>,
    lost_events: u64,
}

/// Every metric of the agent, in one registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    verdicts: Family<VerdictLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    drop_bytes: Family<DropLabels, Counter>,
    forwarded: Family<DirectionLabels, Counter>,
    forwarded_bytes: Family<DirectionLabels, Counter>,
    tables: Gauge,
    table_entries: Gauge,
    table_max_entries: Gauge,
    table_pressure: Gauge<f64, AtomicU64>,
    revision: Gauge,
    apply_to_enforced: Histogram,
    flows_lost: Counter,
    endpoints: Gauge,
    previous: Mutex<Previous>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn direction_label(dir: TrafficDirection) -> &'static str {
    dir.as_str()
}

/// `[ingress, egress]`, the order of the datapath's counters (`PAL_DIR_*`).
const DIRECTIONS: [TrafficDirection; 2] = [TrafficDirection::Ingress, TrafficDirection::Egress];

fn reason_label(reason: usize) -> &'static str {
    u8::try_from(reason)
        .ok()
        .and_then(DropReason::from_abi)
        .unwrap_or(DropReason::Unknown)
        .as_str()
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The increment of a cumulative counter; a counter that went down was reset (the datapath
/// was reloaded), and everything it counts since is new.
fn delta(new: u64, old: u64) -> u64 {
    if new >= old {
        new - old
    } else {
        new
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let verdicts = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "palisade_policy_verdicts",
            "Connections judged by policy, by direction of the local endpoint and verdict \
             (from flow events, so subject to the event rate limit: see palisade_flows_lost)",
            verdicts.clone(),
        );
        let drops = Family::<DropLabels, Counter>::default();
        registry.register(
            "palisade_drops",
            "Packets dropped by the datapath, by reason and direction",
            drops.clone(),
        );
        let drop_bytes = Family::<DropLabels, Counter>::default();
        registry.register_with_unit(
            "palisade_drop",
            "Bytes dropped by the datapath, by reason and direction",
            Unit::Bytes,
            drop_bytes.clone(),
        );
        let forwarded = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "palisade_forwarded_packets",
            "Packets the datapath let through, by direction",
            forwarded.clone(),
        );
        let forwarded_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register_with_unit(
            "palisade_forwarded",
            "Bytes the datapath let through, by direction",
            Unit::Bytes,
            forwarded_bytes.clone(),
        );
        let tables = Gauge::default();
        registry.register(
            "palisade_policy_tables",
            "Policy tables in the datapath (endpoints x directions)",
            tables.clone(),
        );
        let table_entries = Gauge::default();
        registry.register(
            "palisade_policy_table_entries",
            "Entries over all policy tables",
            table_entries.clone(),
        );
        let table_max_entries = Gauge::default();
        registry.register(
            "palisade_policy_table_max_entries",
            "Entries of the largest policy table",
            table_max_entries.clone(),
        );
        let table_pressure = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "palisade_policy_table_pressure",
            "Entries of the largest policy table over the configured soft limit (1 = at the limit)",
            table_pressure.clone(),
        );
        let revision = Gauge::default();
        registry.register(
            "palisade_policy_revision",
            "Policy revision the datapath enforces",
            revision.clone(),
        );
        let apply_to_enforced = Histogram::new(APPLY_BUCKETS);
        registry.register_with_unit(
            "palisade_policy_apply_to_enforced",
            "Time from a policy change being applied to the datapath enforcing it",
            Unit::Seconds,
            apply_to_enforced.clone(),
        );
        let flows_lost = Counter::default();
        registry.register(
            "palisade_flows_lost",
            "Flow events the kernel could not send (rate limit or full ring buffer)",
            flows_lost.clone(),
        );
        let endpoints = Gauge::default();
        registry.register(
            "palisade_endpoints",
            "Endpoints (pods) the datapath enforces",
            endpoints.clone(),
        );

        // Every label combination exists from the start, at zero.
        for dir in DIRECTIONS {
            let direction = direction_label(dir);
            for v in Verdict::ALL {
                let _ = verdicts.get_or_create(&VerdictLabels {
                    direction,
                    verdict: v.as_str(),
                });
            }
            for r in DropReason::ALL {
                let l = DropLabels {
                    reason: r.as_str(),
                    direction,
                };
                let _ = drops.get_or_create(&l);
                let _ = drop_bytes.get_or_create(&l);
            }
            let _ = forwarded.get_or_create(&DirectionLabels { direction });
            let _ = forwarded_bytes.get_or_create(&DirectionLabels { direction });
        }

        Metrics {
            registry,
            verdicts,
            drops,
            drop_bytes,
            forwarded,
            forwarded_bytes,
            tables,
            table_entries,
            table_max_entries,
            table_pressure,
            revision,
            apply_to_enforced,
            flows_lost,
            endpoints,
            previous: Mutex::new(Previous::default()),
        }
    }

    /// Takes the datapath's cumulative counters (`Datapath::metrics()`): reason 0 feeds the
    /// forwarded counters, the others the drop counters; `lost_events` feeds
    /// `palisade_flows_lost_total`. Only the increase since the previous call is added.
    pub fn update_from_datapath(&self, m: &palisade_datapath::Metrics) {
        let mut prev = self.previous.lock().unwrap_or_else(PoisonError::into_inner);
        for (reason, dirs) in m.counters.iter().enumerate() {
            for (d, dir) in DIRECTIONS.iter().enumerate() {
                let new = dirs[d];
                let old = prev.counters.get(reason).map(|c| c[d]).unwrap_or_default();
                let packets = delta(new.packets, old.packets);
                let bytes = delta(new.bytes, old.bytes);
                let direction = direction_label(*dir);
                if reason == usize::from(palisade_abi::PAL_REASON_NONE) {
                    let l = DirectionLabels { direction };
                    self.forwarded.get_or_create(&l).inc_by(packets);
                    self.forwarded_bytes.get_or_create(&l).inc_by(bytes);
                } else {
                    let l = DropLabels {
                        reason: reason_label(reason),
                        direction,
                    };
                    self.drops.get_or_create(&l).inc_by(packets);
                    self.drop_bytes.get_or_create(&l).inc_by(bytes);
                }
            }
        }
        self.flows_lost
            .inc_by(delta(m.lost_events, prev.lost_events));
        prev.counters.clone_from(&m.counters);
        prev.lost_events = m.lost_events;
    }

    /// Counts a flow's policy verdict: policy-verdict events (FORWARDED, AUDIT) and drops by
    /// policy (explicit or default deny: DROPPED). Other drops (spoofing, fail-closed,
    /// malformed) are not policy verdicts; they are in `palisade_drops_total`.
    pub fn observe_flow(&self, flow: &Flow) {
        let counted = match flow.event_type {
            EventType::PolicyVerdict => true,
            EventType::Drop => matches!(
                flow.drop_reason_desc,
                Some(DropReason::PolicyDeny | DropReason::PolicyDenied)
            ),
            EventType::Trace | EventType::Unknown => false,
        };
        if counted
            && flow.verdict != Verdict::Unknown
            && flow.traffic_direction != TrafficDirection::Unknown
        {
            self.verdicts
                .get_or_create(&VerdictLabels {
                    direction: direction_label(flow.traffic_direction),
                    verdict: flow.verdict.as_str(),
                })
                .inc();
        }
    }

    pub fn set_tables(&self, sizes: TableSizes) {
        self.tables.set(saturating_i64(sizes.tables));
        self.table_entries.set(saturating_i64(sizes.total_entries));
        self.table_max_entries
            .set(saturating_i64(sizes.max_entries));
        #[allow(clippy::cast_precision_loss)] // A ratio for people: f64 precision is plenty.
        let pressure = if sizes.soft_limit == 0 {
            0.0
        } else {
            sizes.max_entries as f64 / sizes.soft_limit as f64
        };
        self.table_pressure.set(pressure);
    }

    pub fn set_policy_revision(&self, revision: u64) {
        self.revision.set(saturating_i64(revision));
    }

    pub fn set_endpoints(&self, n: u64) {
        self.endpoints.set(saturating_i64(n));
    }

    /// Time from a policy change being applied (the engine committed it) to the datapath
    /// enforcing it (its tables written).
    pub fn observe_apply_to_enforced(&self, d: Duration) {
        self.apply_to_enforced.observe(d.as_secs_f64());
    }

    /// The OpenMetrics text exposition (what `/metrics` serves).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use palisade_abi::{PAL_REASON_MAX, PAL_REASON_POLICY_DEFAULT, PAL_REASON_SPOOFED};
    use palisade_flow::{Endpoint, Ip, IpVersion};

    use super::*;

    /// The value of the sample line `name{labels}` (labels exactly as encoded).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    fn counters(entries: &[(u8, usize, u64, u64)]) -> palisade_datapath::Metrics {
        let mut counters = vec![[MetricsValue::default(); 2]; usize::from(PAL_REASON_MAX)];
        for &(reason, dir, packets, bytes) in entries {
            counters[usize::from(reason)][dir] = MetricsValue { packets, bytes };
        }
        palisade_datapath::Metrics {
            counters,
            lost_events: 0,
        }
    }

    #[test]
    fn families_exist_at_zero() {
        let m = Metrics::new();
        let text = m.encode();
        for series in [
            r#"palisade_policy_verdicts_total{direction="INGRESS",verdict="FORWARDED"}"#,
            r#"palisade_policy_verdicts_total{direction="EGRESS",verdict="AUDIT"}"#,
            r#"palisade_drops_total{reason="POLICY_DENIED",direction="EGRESS"}"#,
            r#"palisade_drop_bytes_total{reason="INVALID_SOURCE_IP",direction="INGRESS"}"#,
            r#"palisade_forwarded_packets_total{direction="INGRESS"}"#,
            "palisade_policy_table_entries",
            "palisade_policy_table_pressure",
            "palisade_policy_revision",
            "palisade_flows_lost_total",
            "palisade_endpoints",
            "palisade_policy_apply_to_enforced_seconds_count",
        ] {
            assert_eq!(sample(&text, series), Some(0.0), "{series} in\n{text}");
        }
        assert!(text.contains("# TYPE palisade_policy_apply_to_enforced_seconds histogram"));
        assert!(text.contains("# UNIT palisade_policy_apply_to_enforced_seconds seconds"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn datapath_counters_become_increments() {
        let m = Metrics::new();
        m.update_from_datapath(&counters(&[
            (0, 0, 10, 1000),
            (PAL_REASON_POLICY_DEFAULT, 1, 3, 180),
        ]));
        let mut later = counters(&[
            (0, 0, 15, 1500),
            (PAL_REASON_POLICY_DEFAULT, 1, 4, 240),
            (PAL_REASON_SPOOFED, 1, 2, 120),
        ]);
        later.lost_events = 7;
        m.update_from_datapath(&later);
        m.update_from_datapath(&later);
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                r#"palisade_forwarded_packets_total{direction="INGRESS"}"#
            ),
            Some(15.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"palisade_forwarded_bytes_total{direction="INGRESS"}"#
            ),
            Some(1500.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"palisade_drops_total{reason="POLICY_DENIED",direction="EGRESS"}"#
            ),
            Some(4.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"palisade_drop_bytes_total{reason="POLICY_DENIED",direction="EGRESS"}"#
            ),
            Some(240.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"palisade_drops_total{reason="INVALID_SOURCE_IP",direction="EGRESS"}"#
            ),
            Some(2.0)
        );
        assert_eq!(sample(&text, "palisade_flows_lost_total"), Some(7.0));

        // The datapath was reloaded: its counters restart from zero; ours keep growing.
        let mut reloaded = counters(&[(0, 0, 2, 200)]);
        reloaded.lost_events = 1;
        m.update_from_datapath(&reloaded);
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                r#"palisade_forwarded_packets_total{direction="INGRESS"}"#
            ),
            Some(17.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"palisade_drops_total{reason="POLICY_DENIED",direction="EGRESS"}"#
            ),
            Some(4.0)
        );
        assert_eq!(sample(&text, "palisade_flows_lost_total"), Some(8.0));
    }

    fn flow(event_type: EventType, verdict: Verdict, reason: Option<DropReason>) -> Flow {
        Flow {
            time: UNIX_EPOCH,
            verdict,
            drop_reason_desc: reason,
            event_type,
            ip: Ip {
                source: "10.0.0.1".parse().unwrap(),
                destination: "10.0.0.2".parse().unwrap(),
                ip_version: IpVersion::IPv4,
            },
            l4: None,
            source: Endpoint::default(),
            destination: Endpoint::default(),
            node_name: String::new(),
            traffic_direction: TrafficDirection::Egress,
            policy: None,
            is_reply: false,
            summary: String::new(),
        }
    }

    #[test]
    fn flows_count_policy_verdicts() {
        let m = Metrics::new();
        m.observe_flow(&flow(EventType::PolicyVerdict, Verdict::Forwarded, None));
        m.observe_flow(&flow(EventType::PolicyVerdict, Verdict::Forwarded, None));
        m.observe_flow(&flow(
            EventType::PolicyVerdict,
            Verdict::Audit,
            Some(DropReason::PolicyDeny),
        ));
        m.observe_flow(&flow(
            EventType::Drop,
            Verdict::Dropped,
            Some(DropReason::PolicyDenied),
        ));
        m.observe_flow(&flow(
            EventType::Drop,
            Verdict::Dropped,
            Some(DropReason::InvalidSourceIp),
        ));
        let text = m.encode();
        let v = |verdict: &str| {
            sample(
                &text,
                &format!(
                    r#"palisade_policy_verdicts_total{{direction="EGRESS",verdict="{verdict}"}}"#
                ),
            )
        };
        assert_eq!(v("FORWARDED"), Some(2.0));
        assert_eq!(v("AUDIT"), Some(1.0));
        assert_eq!(v("DROPPED"), Some(1.0), "spoofing is not a policy verdict");
    }

    #[test]
    fn gauges_and_histogram() {
        let m = Metrics::new();
        m.set_tables(TableSizes {
            tables: 6,
            total_entries: 120,
            max_entries: 50,
            soft_limit: 200,
        });
        m.set_policy_revision(42);
        m.set_endpoints(3);
        m.observe_apply_to_enforced(Duration::from_millis(3));
        m.observe_apply_to_enforced(Duration::from_millis(700));
        let text = m.encode();
        assert_eq!(sample(&text, "palisade_policy_tables"), Some(6.0));
        assert_eq!(sample(&text, "palisade_policy_table_entries"), Some(120.0));
        assert_eq!(
            sample(&text, "palisade_policy_table_max_entries"),
            Some(50.0)
        );
        assert_eq!(sample(&text, "palisade_policy_table_pressure"), Some(0.25));
        assert_eq!(sample(&text, "palisade_policy_revision"), Some(42.0));
        assert_eq!(sample(&text, "palisade_endpoints"), Some(3.0));
        assert_eq!(
            sample(&text, "palisade_policy_apply_to_enforced_seconds_count"),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"palisade_policy_apply_to_enforced_seconds_bucket{le="0.005"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"palisade_policy_apply_to_enforced_seconds_bucket{le="1.0"}"#
            ),
            Some(2.0)
        );
        m.set_tables(TableSizes::default());
        assert_eq!(
            sample(&m.encode(), "palisade_policy_table_pressure"),
            Some(0.0)
        );
    }
}
