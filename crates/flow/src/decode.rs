//! Datapath events (`struct flow_event`) into flows, enriched with what the agent knows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use palisade_abi::{
    FlowEvent, PAL_DIR_EGRESS, PAL_DIR_INGRESS, PAL_EVENT_DROP, PAL_EVENT_POLICY_VERDICT,
    PAL_FAMILY_IPV6, PAL_OUTCOME_AUDIT, PAL_OUTCOME_DROPPED, PAL_OUTCOME_FORWARDED,
};

use crate::flow::{
    l4_summary, DropReason, Endpoint, EventType, Flow, Icmp, Ip, IpVersion, Ports, Tcp, TcpFlags,
    TrafficDirection, Verdict, L4,
};
use crate::time::BootClock;

/// Who an address belongs to, for a flow's endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Empty for addresses that are not pods.
    pub namespace: String,
    /// Empty for addresses that are not pods.
    pub pod_name: String,
    /// The pod's node, or the node that owns the address.
    pub node_name: String,
}

/// What decoding asks the agent: implemented over the policy engine by
/// [`crate::EngineEnricher`]; [`NoEnrichment`] leaves flows raw.
pub trait Enricher {
    /// The pod or node behind an address.
    fn endpoint_by_ip(&self, ip: IpAddr) -> Option<EndpointInfo>;
    /// An identity's labels as `source:key=value` strings (empty if unknown).
    fn identity_labels(&self, identity: u32) -> Vec<String>;
    /// The rule an event's `rule_id` names, for people.
    fn rule_name(&self, rule_id: u32) -> Option<String>;
    /// The name of the node whose datapath produced the events.
    fn node_name(&self) -> Option<String> {
        None
    }
}

/// An enricher that knows nothing: addresses and numbers only.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEnrichment;

impl Enricher for NoEnrichment {
    fn endpoint_by_ip(&self, _ip: IpAddr) -> Option<EndpointInfo> {
        None
    }
    fn identity_labels(&self, _identity: u32) -> Vec<String> {
        Vec::new()
    }
    fn rule_name(&self, _rule_id: u32) -> Option<String> {
        None
    }
}

fn addr(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if u32::from(family) == PAL_FAMILY_IPV6 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// Layer 4 of an event; ports are in network order in the event.
pub fn decode_l4(event: &FlowEvent) -> L4 {
    let sport = event.sport_host();
    let dport = event.dport_host();
    match event.protocol {
        6 => L4::Tcp(Tcp {
            source_port: sport,
            destination_port: dport,
            flags: TcpFlags::from_bits(event.tcp_flags),
        }),
        17 => L4::Udp(Ports {
            source_port: sport,
            destination_port: dport,
        }),
        132 => L4::Sctp(Ports {
            source_port: sport,
            destination_port: dport,
        }),
        // ICMP: `dport` is `htons(type)`.
        1 => L4::IcmpV4(Icmp {
            icmp_type: (dport & 0xff) as u8,
        }),
        58 => L4::IcmpV6(Icmp {
            icmp_type: (dport & 0xff) as u8,
        }),
        protocol => L4::Other { protocol },
    }
}

/// Decodes one ring-buffer record and enriches it: wall time through `clock`, addresses to
/// pods through `enricher`, identities to labels, `rule_id` to the rule's name.
///
/// The event's identities are kept as the datapath saw them. The local endpoint (the source
/// at egress, the destination at ingress) also gets the event's endpoint id.
pub fn decode(event: &FlowEvent, clock: &BootClock, enricher: &dyn Enricher) -> Flow {
    let src = addr(event.family, &event.saddr);
    let dst = addr(event.family, &event.daddr);
    let ip_version = if u32::from(event.family) == PAL_FAMILY_IPV6 {
        IpVersion::IPv6
    } else {
        IpVersion::IPv4
    };
    let traffic_direction = match u32::from(event.direction) {
        PAL_DIR_INGRESS => TrafficDirection::Ingress,
        PAL_DIR_EGRESS => TrafficDirection::Egress,
        _ => TrafficDirection::Unknown,
    };
    let verdict = match event.outcome {
        PAL_OUTCOME_FORWARDED => Verdict::Forwarded,
        PAL_OUTCOME_DROPPED => Verdict::Dropped,
        PAL_OUTCOME_AUDIT => Verdict::Audit,
        _ => Verdict::Unknown,
    };
    let event_type = match event.r#type {
        PAL_EVENT_POLICY_VERDICT => EventType::PolicyVerdict,
        PAL_EVENT_DROP => EventType::Drop,
        _ => EventType::Unknown,
    };
    let l4 = decode_l4(event);
    let endpoint = |ip: IpAddr, identity: u32, local: bool| {
        let info = enricher.endpoint_by_ip(ip).unwrap_or_default();
        Endpoint {
            id: if local { event.endpoint_id } else { 0 },
            identity,
            namespace: info.namespace,
            labels: if identity == 0 {
                Vec::new()
            } else {
                enricher.identity_labels(identity)
            },
            pod_name: info.pod_name,
            node_name: info.node_name,
        }
    };
    let source = endpoint(
        src,
        event.src_identity,
        traffic_direction == TrafficDirection::Egress,
    );
    let destination = endpoint(
        dst,
        event.dst_identity,
        traffic_direction == TrafficDirection::Ingress,
    );
    let policy = (event.rule_id != 0).then(|| {
        enricher
            .rule_name(event.rule_id)
            .unwrap_or_else(|| format!("rule #{}", event.rule_id))
    });
    Flow {
        time: clock.wall_time(event.timestamp_ns),
        verdict,
        drop_reason_desc: DropReason::from_abi(event.reason),
        event_type,
        ip: Ip {
            source: src,
            destination: dst,
            ip_version,
        },
        summary: l4_summary(Some(&l4)),
        l4: Some(l4),
        source,
        destination,
        node_name: enricher.node_name().unwrap_or_default(),
        traffic_direction,
        policy,
        is_reply: false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use palisade_abi::{
        PAL_FAMILY_IPV4, PAL_REASON_NONE, PAL_REASON_POLICY_DEFAULT, PAL_REASON_POLICY_DENY,
    };

    use super::*;
    use crate::time::{format_rfc3339, from_unix_nanos};

    /// A TCP SYN from 10.0.0.1:41234 to 10.0.0.2:80, judged at the destination's ingress.
    pub(crate) fn tcp_event() -> FlowEvent {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        FlowEvent {
            timestamp_ns: 5_000_000_123,
            r#type: PAL_EVENT_POLICY_VERDICT,
            outcome: PAL_OUTCOME_FORWARDED,
            reason: PAL_REASON_NONE,
            direction: PAL_DIR_INGRESS as u8,
            protocol: 6,
            family: PAL_FAMILY_IPV4 as u8,
            tcp_flags: 0x02,
            pad: 0,
            endpoint_id: 7,
            src_identity: 256,
            dst_identity: 257,
            rule_id: 3,
            saddr,
            daddr,
            sport: 41234u16.to_be(),
            dport: 80u16.to_be(),
            ifindex: 12,
        }
    }

    pub(crate) struct MapEnricher {
        pub pods: HashMap<IpAddr, (&'static str, &'static str, &'static str)>,
        pub labels: HashMap<u32, Vec<String>>,
        pub rules: HashMap<u32, String>,
    }

    impl Enricher for MapEnricher {
        fn endpoint_by_ip(&self, ip: IpAddr) -> Option<EndpointInfo> {
            self.pods.get(&ip).map(|(ns, pod, node)| EndpointInfo {
                namespace: (*ns).to_owned(),
                pod_name: (*pod).to_owned(),
                node_name: (*node).to_owned(),
            })
        }
        fn identity_labels(&self, identity: u32) -> Vec<String> {
            self.labels.get(&identity).cloned().unwrap_or_default()
        }
        fn rule_name(&self, rule_id: u32) -> Option<String> {
            self.rules.get(&rule_id).cloned()
        }
        fn node_name(&self) -> Option<String> {
            Some("node-a".to_owned())
        }
    }

    pub(crate) fn star_wars() -> MapEnricher {
        MapEnricher {
            pods: HashMap::from([
                (
                    "10.0.0.1".parse().unwrap(),
                    ("default", "tiefighter", "node-a"),
                ),
                (
                    "10.0.0.2".parse().unwrap(),
                    ("default", "deathstar-1", "node-a"),
                ),
            ]),
            labels: HashMap::from([
                (
                    256,
                    vec![
                        "k8s:class=tiefighter".to_owned(),
                        "k8s:io.kubernetes.pod.namespace=default".to_owned(),
                        "k8s:org=empire".to_owned(),
                    ],
                ),
                (
                    257,
                    vec![
                        "k8s:class=deathstar".to_owned(),
                        "k8s:io.kubernetes.pod.namespace=default".to_owned(),
                        "k8s:org=empire".to_owned(),
                    ],
                ),
                (9, vec!["reserved:world-ipv4".to_owned()]),
            ]),
            rules: HashMap::from([(3, "CiliumNetworkPolicy default/rule1 ingress[0]".to_owned())]),
        }
    }

    const OFFSET: i128 = 1_795_309_318_000_000_000; // 2026-11-22T01:01:58Z

    #[test]
    fn decodes_and_enriches_a_policy_verdict() {
        let clock = BootClock::with_offset_ns(OFFSET);
        let f = decode(&tcp_event(), &clock, &star_wars());
        assert_eq!(format_rfc3339(f.time), "2026-11-22T01:02:03.000000123Z");
        assert_eq!(f.verdict, Verdict::Forwarded);
        assert_eq!(f.event_type, EventType::PolicyVerdict);
        assert_eq!(f.drop_reason_desc, None);
        assert_eq!(f.traffic_direction, TrafficDirection::Ingress);
        assert_eq!(f.ip.source, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(f.ip.destination, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(f.ip.ip_version, IpVersion::IPv4);
        assert_eq!(
            f.l4,
            Some(L4::Tcp(Tcp {
                source_port: 41234,
                destination_port: 80,
                flags: TcpFlags {
                    syn: true,
                    ..TcpFlags::default()
                }
            }))
        );
        assert_eq!(f.summary, "TCP Flags: SYN");
        assert_eq!(f.source.pod_name, "tiefighter");
        assert_eq!(f.source.namespace, "default");
        assert_eq!(f.source.identity, 256);
        assert_eq!(f.source.id, 0, "the source is the remote side at ingress");
        assert_eq!(f.destination.pod_name, "deathstar-1");
        assert_eq!(f.destination.id, 7);
        assert_eq!(f.destination.node_name, "node-a");
        assert!(f
            .destination
            .labels
            .contains(&"k8s:class=deathstar".to_owned()));
        assert_eq!(
            f.policy.as_deref(),
            Some("CiliumNetworkPolicy default/rule1 ingress[0]")
        );
        assert_eq!(f.node_name, "node-a");
        assert!(!f.is_reply);
    }

    #[test]
    fn decodes_drops_with_reason() {
        let clock = BootClock::with_offset_ns(OFFSET);
        let mut e = tcp_event();
        e.r#type = PAL_EVENT_DROP;
        e.outcome = PAL_OUTCOME_DROPPED;
        e.reason = PAL_REASON_POLICY_DEFAULT;
        e.rule_id = 0;
        e.direction = PAL_DIR_EGRESS as u8;
        e.tcp_flags = 0x12;
        let f = decode(&e, &clock, &star_wars());
        assert_eq!(f.verdict, Verdict::Dropped);
        assert_eq!(f.event_type, EventType::Drop);
        assert_eq!(f.drop_reason_desc, Some(DropReason::PolicyDenied));
        assert_eq!(f.traffic_direction, TrafficDirection::Egress);
        assert_eq!(f.source.id, 7);
        assert_eq!(f.destination.id, 0);
        assert_eq!(f.policy, None, "default deny names no rule");
        assert_eq!(f.summary, "TCP Flags: SYN, ACK");

        e.reason = PAL_REASON_POLICY_DENY;
        e.rule_id = 99;
        let f = decode(&e, &clock, &star_wars());
        assert_eq!(f.drop_reason_desc, Some(DropReason::PolicyDeny));
        assert_eq!(
            f.policy.as_deref(),
            Some("rule #99"),
            "unknown rule ids stay numbers"
        );

        e.outcome = PAL_OUTCOME_AUDIT;
        e.r#type = PAL_EVENT_POLICY_VERDICT;
        let f = decode(&e, &clock, &star_wars());
        assert_eq!(f.verdict, Verdict::Audit);
        assert_eq!(f.drop_reason_desc, Some(DropReason::PolicyDeny));
    }

    #[test]
    fn decodes_ipv6_icmp_udp_and_unknowns() {
        let clock = BootClock::with_offset_ns(0);
        let mut e = tcp_event();
        e.family = PAL_FAMILY_IPV6 as u8;
        e.saddr = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        e.daddr = "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets();
        e.protocol = 58;
        e.sport = 0x1234u16.to_be();
        e.dport = 128u16.to_be();
        e.dst_identity = 10;
        let f = decode(&e, &clock, &NoEnrichment);
        assert_eq!(f.ip.ip_version, IpVersion::IPv6);
        assert_eq!(f.ip.source, "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(f.l4, Some(L4::IcmpV6(Icmp { icmp_type: 128 })));
        assert_eq!(f.summary, "ICMPv6 EchoRequest");
        assert_eq!(f.source_port(), None);
        assert!(f.source.pod_name.is_empty() && f.source.labels.is_empty());
        assert_eq!(f.policy.as_deref(), Some("rule #3"));
        assert_eq!(f.node_name, "");
        assert_eq!(f.time, from_unix_nanos(5_000_000_123));

        e.family = PAL_FAMILY_IPV4 as u8;
        e.protocol = 1;
        e.dport = 8u16.to_be();
        let f = decode(&e, &clock, &NoEnrichment);
        assert_eq!(f.l4, Some(L4::IcmpV4(Icmp { icmp_type: 8 })));
        assert_eq!(f.summary, "ICMPv4 EchoRequest");

        e.protocol = 17;
        e.dport = 53u16.to_be();
        let f = decode(&e, &clock, &NoEnrichment);
        assert_eq!(f.destination_port(), Some(53));
        assert_eq!(f.source_port(), Some(0x1234));
        assert_eq!(f.summary, "UDP");

        e.protocol = 47;
        e.outcome = 77;
        e.r#type = 77;
        e.direction = 9;
        e.reason = 42;
        let f = decode(&e, &clock, &NoEnrichment);
        assert_eq!(f.l4, Some(L4::Other { protocol: 47 }));
        assert_eq!(f.verdict, Verdict::Unknown);
        assert_eq!(f.event_type, EventType::Unknown);
        assert_eq!(f.traffic_direction, TrafficDirection::Unknown);
        assert_eq!(f.drop_reason_desc, Some(DropReason::Unknown));
    }

    #[test]
    fn json_is_hubble_shaped_and_round_trips() {
        let clock = BootClock::with_offset_ns(OFFSET);
        let f = decode(&tcp_event(), &clock, &star_wars());
        let v: serde_json::Value = serde_json::to_value(&f).unwrap();
        assert_eq!(v["time"], "2026-11-22T01:02:03.000000123Z");
        assert_eq!(v["verdict"], "FORWARDED");
        assert_eq!(v["event_type"], "policy-verdict");
        assert_eq!(v["IP"]["ipVersion"], "IPv4");
        assert_eq!(v["IP"]["source"], "10.0.0.1");
        assert_eq!(v["l4"]["TCP"]["destination_port"], 80);
        assert_eq!(v["l4"]["TCP"]["flags"]["SYN"], true);
        assert!(v["l4"]["TCP"]["flags"].get("ACK").is_none());
        assert_eq!(v["source"]["pod_name"], "tiefighter");
        assert_eq!(v["destination"]["ID"], 7);
        assert_eq!(v["traffic_direction"], "INGRESS");
        assert_eq!(v["is_reply"], false);
        assert_eq!(v["Summary"], "TCP Flags: SYN");
        assert!(v.get("drop_reason_desc").is_none());
        let back: Flow = serde_json::from_value(v).unwrap();
        assert_eq!(back, f);

        let mut e = tcp_event();
        e.r#type = PAL_EVENT_DROP;
        e.outcome = PAL_OUTCOME_DROPPED;
        e.reason = PAL_REASON_POLICY_DENY;
        let f = decode(&e, &clock, &NoEnrichment);
        let s = serde_json::to_string(&f).unwrap();
        assert!(s.contains(r#""drop_reason_desc":"POLICY_DENY""#), "{s}");
        assert_eq!(serde_json::from_str::<Flow>(&s).unwrap(), f);
    }
}
