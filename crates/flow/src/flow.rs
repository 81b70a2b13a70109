//! The flow record, shaped like Hubble's flow JSON where that makes sense.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// One observed flow: a judged new connection or a dropped packet.
///
/// Serialized as Hubble names the fields (`IP`, `l4.TCP.flags.SYN`, `traffic_direction`,
/// `Summary`, …), so jq filters written for `hubble observe -o json` mostly carry over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// When the datapath saw the packet (RFC3339, UTC, nanoseconds).
    #[serde(with = "crate::time::rfc3339")]
    pub time: SystemTime,
    pub verdict: Verdict,
    /// Why it was dropped (or, with AUDIT, would have been).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<DropReason>,
    pub event_type: EventType,
    #[serde(rename = "IP")]
    pub ip: Ip,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l4: Option<L4>,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// The node whose datapath observed the flow.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
    pub traffic_direction: TrafficDirection,
    /// The rule that decided, e.g. `CiliumNetworkPolicy default/rule1 ingress[0]`; absent for a
    /// default deny, an endpoint without policy in that direction, or a drop before policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Always false: the datapath reports the first packet of a connection (replies of an
    /// allowed connection pass without events).
    #[serde(default)]
    pub is_reply: bool,
    /// `TCP Flags: SYN`, `UDP`, `ICMPv4 EchoRequest`, …
    #[serde(rename = "Summary", alias = "summary", default)]
    pub summary: String,
}

impl Flow {
    /// The source port for TCP, UDP and SCTP.
    pub fn source_port(&self) -> Option<u16> {
        self.l4.as_ref().and_then(L4::source_port)
    }

    /// The destination port for TCP, UDP and SCTP.
    pub fn destination_port(&self) -> Option<u16> {
        self.l4.as_ref().and_then(L4::destination_port)
    }

    /// The IP protocol number.
    pub fn protocol(&self) -> Option<u8> {
        self.l4.as_ref().map(L4::protocol)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    Forwarded,
    Dropped,
    /// A denial that passed because the policy (or endpoint) is in audit mode.
    Audit,
    #[serde(rename = "VERDICT_UNKNOWN", other)]
    Unknown,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Forwarded, Verdict::Dropped, Verdict::Audit];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Forwarded => "FORWARDED",
            Verdict::Dropped => "DROPPED",
            Verdict::Audit => "AUDIT",
            Verdict::Unknown => "VERDICT_UNKNOWN",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Verdict {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "FORWARDED" => Ok(Verdict::Forwarded),
            "DROPPED" => Ok(Verdict::Dropped),
            "AUDIT" => Ok(Verdict::Audit),
            _ => Err(format!(
                "unknown verdict {s:?} (expected FORWARDED, DROPPED or AUDIT)"
            )),
        }
    }
}

/// Why a packet was dropped, named as Hubble names the matching Cilium drop reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DropReason {
    /// No rule allows it and the endpoint is default-deny (`PAL_REASON_POLICY_DEFAULT`).
    PolicyDenied,
    /// An explicit deny rule matched (`PAL_REASON_POLICY_DENY`).
    PolicyDeny,
    /// The source address is not the pod's (`PAL_REASON_SPOOFED`).
    InvalidSourceIp,
    /// The endpoint's table is missing or could not be written (`PAL_REASON_FAIL_CLOSED`).
    FailClosed,
    /// Unparsable headers (`PAL_REASON_MALFORMED`).
    InvalidPacketDropped,
    #[serde(rename = "DROP_REASON_UNKNOWN", other)]
    Unknown,
}

impl DropReason {
    /// Every reason the datapath reports, in `PAL_REASON_*` order.
    pub const ALL: [DropReason; 5] = [
        DropReason::PolicyDeny,
        DropReason::PolicyDenied,
        DropReason::InvalidSourceIp,
        DropReason::FailClosed,
        DropReason::InvalidPacketDropped,
    ];

    /// From `PAL_REASON_*`; `None` for `PAL_REASON_NONE`.
    pub fn from_abi(reason: u8) -> Option<Self> {
        Some(match reason {
            palisade_abi::PAL_REASON_NONE => return None,
            palisade_abi::PAL_REASON_POLICY_DENY => DropReason::PolicyDeny,
            palisade_abi::PAL_REASON_POLICY_DEFAULT => DropReason::PolicyDenied,
            palisade_abi::PAL_REASON_SPOOFED => DropReason::InvalidSourceIp,
            palisade_abi::PAL_REASON_FAIL_CLOSED => DropReason::FailClosed,
            palisade_abi::PAL_REASON_MALFORMED => DropReason::InvalidPacketDropped,
            _ => DropReason::Unknown,
        })
    }

    /// The name in JSON and metrics: `POLICY_DENIED`, …
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::PolicyDenied => "POLICY_DENIED",
            DropReason::PolicyDeny => "POLICY_DENY",
            DropReason::InvalidSourceIp => "INVALID_SOURCE_IP",
            DropReason::FailClosed => "FAIL_CLOSED",
            DropReason::InvalidPacketDropped => "INVALID_PACKET_DROPPED",
            DropReason::Unknown => "DROP_REASON_UNKNOWN",
        }
    }

    /// For people, as Hubble's compact output says it.
    pub fn describe(self) -> &'static str {
        match self {
            DropReason::PolicyDenied => "Policy denied",
            DropReason::PolicyDeny => "Policy denied by denylist",
            DropReason::InvalidSourceIp => "Invalid source ip",
            DropReason::FailClosed => "Policy table missing (fail closed)",
            DropReason::InvalidPacketDropped => "Invalid packet",
            DropReason::Unknown => "Unknown drop reason",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of event produced the flow; the names are those of `--type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventType {
    /// A new connection was judged and let through (FORWARDED or AUDIT).
    PolicyVerdict,
    /// A packet was dropped.
    Drop,
    /// A packet was traced (not produced by the datapath yet).
    Trace,
    #[serde(other)]
    Unknown,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::PolicyVerdict => "policy-verdict",
            EventType::Drop => "drop",
            EventType::Trace => "trace",
            EventType::Unknown => "unknown",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "policy-verdict" | "policy_verdict" | "policyverdict" => Ok(EventType::PolicyVerdict),
            "drop" => Ok(EventType::Drop),
            "trace" => Ok(EventType::Trace),
            _ => Err(format!(
                "unknown event type {s:?} (expected policy-verdict, drop or trace)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TrafficDirection {
    /// Into the local endpoint: its ingress policy decided.
    Ingress,
    /// Out of the local endpoint: its egress policy decided.
    Egress,
    #[serde(rename = "TRAFFIC_DIRECTION_UNKNOWN", other)]
    Unknown,
}

impl TrafficDirection {
    pub const BOTH: [TrafficDirection; 2] = [TrafficDirection::Ingress, TrafficDirection::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            TrafficDirection::Ingress => "INGRESS",
            TrafficDirection::Egress => "EGRESS",
            TrafficDirection::Unknown => "TRAFFIC_DIRECTION_UNKNOWN",
        }
    }
}

impl fmt::Display for TrafficDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TrafficDirection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "ingress" => Ok(TrafficDirection::Ingress),
            "egress" => Ok(TrafficDirection::Egress),
            _ => Err(format!(
                "unknown traffic direction {s:?} (expected ingress or egress)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IpVersion {
    IPv4,
    IPv6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ip {
    pub source: IpAddr,
    pub destination: IpAddr,
    #[serde(rename = "ipVersion")]
    pub ip_version: IpVersion,
}

/// Layer 4, as Hubble's `l4` object: `{"TCP": {...}}`, `{"UDP": {...}}`, `{"ICMPv4": {...}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum L4 {
    #[serde(rename = "TCP")]
    Tcp(Tcp),
    #[serde(rename = "UDP")]
    Udp(Ports),
    #[serde(rename = "SCTP")]
    Sctp(Ports),
    #[serde(rename = "ICMPv4")]
    IcmpV4(Icmp),
    #[serde(rename = "ICMPv6")]
    IcmpV6(Icmp),
    /// Any other IP protocol (no ports).
    #[serde(rename = "other")]
    Other { protocol: u8 },
}

impl L4 {
    pub fn source_port(&self) -> Option<u16> {
        match self {
            L4::Tcp(t) => Some(t.source_port),
            L4::Udp(p) | L4::Sctp(p) => Some(p.source_port),
            _ => None,
        }
    }

    pub fn destination_port(&self) -> Option<u16> {
        match self {
            L4::Tcp(t) => Some(t.destination_port),
            L4::Udp(p) | L4::Sctp(p) => Some(p.destination_port),
            _ => None,
        }
    }

    /// The IP protocol number.
    pub fn protocol(&self) -> u8 {
        match self {
            L4::Tcp(_) => 6,
            L4::Udp(_) => 17,
            L4::Sctp(_) => 132,
            L4::IcmpV4(_) => 1,
            L4::IcmpV6(_) => 58,
            L4::Other { protocol } => *protocol,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tcp {
    pub source_port: u16,
    pub destination_port: u16,
    #[serde(default)]
    pub flags: TcpFlags,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ports {
    pub source_port: u16,
    pub destination_port: u16,
}

/// ICMP type (the datapath does not report the code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Icmp {
    #[serde(rename = "type")]
    pub icmp_type: u8,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference.
fn is_false(b: &bool) -> bool {
    !*b
}

/// TCP flags; only the set ones are serialized (`{"SYN": true}`), as in Hubble.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[allow(clippy::struct_excessive_bools)] // One bool per header bit, as Hubble has them.
pub struct TcpFlags {
    #[serde(default, skip_serializing_if = "is_false")]
    pub fin: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub syn: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub rst: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub psh: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ack: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub urg: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ece: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub cwr: bool,
}

impl TcpFlags {
    /// From byte 13 of the TCP header.
    pub fn from_bits(bits: u8) -> Self {
        TcpFlags {
            fin: bits & 0x01 != 0,
            syn: bits & 0x02 != 0,
            rst: bits & 0x04 != 0,
            psh: bits & 0x08 != 0,
            ack: bits & 0x10 != 0,
            urg: bits & 0x20 != 0,
            ece: bits & 0x40 != 0,
            cwr: bits & 0x80 != 0,
        }
    }

    /// The set flags in Hubble's order: `SYN, ACK, RST, FIN, PSH, URG, ECE, CWR`.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.syn, "SYN"),
            (self.ack, "ACK"),
            (self.rst, "RST"),
            (self.fin, "FIN"),
            (self.psh, "PSH"),
            (self.urg, "URG"),
            (self.ece, "ECE"),
            (self.cwr, "CWR"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// One side of a flow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The datapath's endpoint id, on the local side only.
    #[serde(rename = "ID", default, skip_serializing_if = "is_zero")]
    pub id: u32,
    /// Security identity as the observing datapath saw it (0: not resolved).
    #[serde(default)]
    pub identity: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// The identity's labels, `source:key=value` (`k8s:app=web`, `reserved:world`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    /// The node the pod runs on, or the node that owns the address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference.
fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Name of an ICMPv4 type, as Hubble's summary says it.
pub fn icmpv4_type_name(t: u8) -> Option<&'static str> {
    Some(match t {
        0 => "EchoReply",
        3 => "DestinationUnreachable",
        4 => "SourceQuench",
        5 => "Redirect",
        8 => "EchoRequest",
        9 => "RouterAdvertisement",
        10 => "RouterSolicitation",
        11 => "TimeExceeded",
        12 => "ParameterProblem",
        13 => "TimestampRequest",
        14 => "TimestampReply",
        _ => return None,
    })
}

/// Name of an ICMPv6 type, as Hubble's summary says it.
pub fn icmpv6_type_name(t: u8) -> Option<&'static str> {
    Some(match t {
        1 => "DestinationUnreachable",
        2 => "PacketTooBig",
        3 => "TimeExceeded",
        4 => "ParameterProblem",
        128 => "EchoRequest",
        129 => "EchoReply",
        130 => "MulticastListenerQuery",
        131 => "MulticastListenerReport",
        132 => "MulticastListenerDone",
        133 => "RouterSolicitation",
        134 => "RouterAdvertisement",
        135 => "NeighborSolicitation",
        136 => "NeighborAdvertisement",
        137 => "Redirect",
        _ => return None,
    })
}

/// The summary line of a flow's layer 4: `TCP Flags: SYN`, `UDP`, `ICMPv4 EchoRequest`.
pub fn l4_summary(l4: Option<&L4>) -> String {
    match l4 {
        Some(L4::Tcp(t)) => {
            let names = t.flags.names();
            if names.is_empty() {
                "TCP".to_owned()
            } else {
                format!("TCP Flags: {}", names.join(", "))
            }
        }
        Some(L4::Udp(_)) => "UDP".to_owned(),
        Some(L4::Sctp(_)) => "SCTP".to_owned(),
        Some(L4::IcmpV4(i)) => match icmpv4_type_name(i.icmp_type) {
            Some(n) => format!("ICMPv4 {n}"),
            None => format!("ICMPv4 type {}", i.icmp_type),
        },
        Some(L4::IcmpV6(i)) => match icmpv6_type_name(i.icmp_type) {
            Some(n) => format!("ICMPv6 {n}"),
            None => format!("ICMPv6 type {}", i.icmp_type),
        },
        Some(L4::Other { protocol }) => format!("IP protocol {protocol}"),
        None => String::new(),
    }
}
