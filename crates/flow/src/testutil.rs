//! Test fixtures shared by the unit tests.

use std::time::UNIX_EPOCH;

use crate::flow::{
    Endpoint, EventType, Flow, Ip, IpVersion, Tcp, TcpFlags, TrafficDirection, Verdict, L4,
};

pub(crate) fn ep(ns: &str, pod: &str, identity: u32, labels: &[&str]) -> Endpoint {
    Endpoint {
        id: 0,
        identity,
        namespace: ns.to_owned(),
        labels: labels.iter().map(|s| (*s).to_owned()).collect(),
        pod_name: pod.to_owned(),
        node_name: String::new(),
    }
}

/// default/tiefighter:41234 → empire/deathstar-1:80, TCP SYN, forwarded at ingress.
pub(crate) fn flow() -> Flow {
    Flow {
        time: UNIX_EPOCH,
        verdict: Verdict::Forwarded,
        drop_reason_desc: None,
        event_type: EventType::PolicyVerdict,
        ip: Ip {
            source: "10.0.0.1".parse().unwrap(),
            destination: "10.0.1.2".parse().unwrap(),
            ip_version: IpVersion::IPv4,
        },
        l4: Some(L4::Tcp(Tcp {
            source_port: 41234,
            destination_port: 80,
            flags: TcpFlags::from_bits(0x02),
        })),
        source: ep(
            "default",
            "tiefighter",
            256,
            &["k8s:class=tiefighter", "k8s:org=empire"],
        ),
        destination: ep(
            "empire",
            "deathstar-1",
            257,
            &["k8s:class=deathstar", "k8s:org=empire", "k8s:tier=api"],
        ),
        node_name: "node-a".to_owned(),
        traffic_direction: TrafficDirection::Ingress,
        policy: None,
        is_reply: false,
        summary: "TCP Flags: SYN".to_owned(),
    }
}
