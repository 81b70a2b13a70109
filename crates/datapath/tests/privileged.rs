//! Packet tests of the eBPF programs through BPF_PROG_TEST_RUN (maps set up through the
//! `Datapath` API in a private pin directory), plus TCX attach/detach/reopen and enforcement
//! of real traffic on a veth pair in private network namespaces. They need root: without it
//! they fail, unless PALISADE_SKIP_PRIVILEGED=1 is set (see `common::privileged`).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
use std::time::Duration;

use common::*;
use palisade_datapath::abi::*;
use palisade_datapath::{endpoint_value, Datapath, Direction, Hook, TableEntry, Verdict};

/// Pod A sits behind ifindex 1 (the loopback device BPF_PROG_TEST_RUN uses).
const IFINDEX: u32 = 1;
const EP_A: u32 = 11;
const ID_A: u32 = 1001;
const ID_B: u32 = 1002;
const A4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const WORLD4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

const ENFORCE_BOTH: u32 = PAL_EP_F_ENFORCE_INGRESS | PAL_EP_F_ENFORCE_EGRESS;

fn row(identity: u32, proto: u8, lo: u16, hi: u16, verdict: Verdict, rule_id: u32) -> TableEntry {
    TableEntry {
        identity,
        proto,
        port_lo: lo,
        port_hi: hi,
        verdict,
        audit: false,
        rule_id,
    }
}

/// A datapath in a private pin directory with pod A (flags as given) and B in the ipcache.
fn setup(test: &str, flags: u32) -> Option<(PinDir, Datapath)> {
    if !privileged() {
        return None;
    }
    let pin = PinDir::new(test);
    let mut dp = open(&pin);
    dp.set_endpoint(
        IFINDEX,
        &endpoint_value(EP_A, ID_A, flags, Some(A4), Some(A6)),
    )
    .unwrap();
    for (net, id, f) in [
        ("10.0.0.1/32", ID_A, PAL_IPCACHE_F_ENDPOINT),
        ("10.0.0.2/32", ID_B, PAL_IPCACHE_F_ENDPOINT),
        ("fd00::1/128", ID_A, PAL_IPCACHE_F_ENDPOINT),
        ("fd00::2/128", ID_B, PAL_IPCACHE_F_ENDPOINT),
    ] {
        dp.set_ipcache(net.parse().unwrap(), id, f).unwrap();
    }
    Some((pin, dp))
}

fn run(dp: &Datapath, hook: Hook, frame: &[u8]) -> i32 {
    dp.test_run(hook, IFINDEX, frame)
        .expect("BPF_PROG_TEST_RUN")
}

fn last_event(dp: &mut Datapath) -> FlowEvent {
    *dp.take_events().last().expect("a flow event")
}

fn v4(a: Ipv4Addr) -> [u8; 16] {
    let mut x = [0u8; 16];
    x[..4].copy_from_slice(&a.octets());
    x
}

#[test]
fn privileged_allowed_tcp_syn() {
    let Some((_pin, mut dp)) = setup("allowed", PAL_EP_F_ENFORCE_EGRESS) else {
        return;
    };
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[row(ID_B, TCP, 80, 80, Verdict::Allow, 5)],
    )
    .unwrap();
    let frame = tcp4(A4, B4, 40000, 80, SYN);
    assert_eq!(run(&dp, Hook::FromContainer, &frame), TC_ACT_OK);

    let e = last_event(&mut dp);
    assert_eq!(e.r#type, PAL_EVENT_POLICY_VERDICT);
    assert_eq!(e.outcome, PAL_OUTCOME_FORWARDED);
    assert_eq!(e.reason, PAL_REASON_NONE);
    assert_eq!(u32::from(e.direction), PAL_DIR_EGRESS);
    assert_eq!(
        (e.endpoint_id, e.src_identity, e.dst_identity, e.rule_id),
        (EP_A, ID_A, ID_B, 5)
    );
    assert_eq!(
        (e.protocol, u32::from(e.family), e.tcp_flags),
        (TCP, PAL_FAMILY_IPV4, SYN)
    );
    assert_eq!((e.saddr, e.daddr), (v4(A4), v4(B4)));
    assert_eq!(
        (e.sport_host(), e.dport_host(), e.ifindex),
        (40000, 80, IFINDEX)
    );

    let m = dp.metrics().unwrap();
    let fwd = m.get(PAL_REASON_NONE, Direction::Egress);
    assert_eq!(fwd.packets, 1);
    assert_eq!(fwd.bytes, frame.len() as u64);

    let ct = dp.conntrack_entries().unwrap();
    assert_eq!(ct.len(), 1);
    let (k, v) = ct[0];
    assert_eq!(
        (k.saddr, k.daddr, u16::from_be(k.dport)),
        (v4(A4), v4(B4), 80)
    );
    assert_eq!(v.flags, PAL_CT_F_EGRESS_OK);
    assert_eq!(v.rule_id, 5);

    // The next packet of the connection rides conntrack; another port is default-denied.
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 80, ACK)),
        TC_ACT_OK
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 81, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(
        dp.metrics()
            .unwrap()
            .get(PAL_REASON_NONE, Direction::Egress)
            .packets,
        2
    );
}

#[test]
fn privileged_denied() {
    let Some((_pin, mut dp)) = setup("denied", PAL_EP_F_ENFORCE_EGRESS) else {
        return;
    };
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[
            row(0, 0, 0, 0, Verdict::Allow, 1),
            row(ID_B, TCP, 22, 22, Verdict::Deny, 7),
        ],
    )
    .unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 22, SYN)),
        TC_ACT_SHOT
    );
    let e = last_event(&mut dp);
    assert_eq!(
        (e.r#type, e.outcome, e.reason),
        (PAL_EVENT_DROP, PAL_OUTCOME_DROPPED, PAL_REASON_POLICY_DENY)
    );
    assert_eq!((e.src_identity, e.dst_identity, e.rule_id), (ID_A, ID_B, 7));
    assert_eq!(
        dp.metrics()
            .unwrap()
            .get(PAL_REASON_POLICY_DENY, Direction::Egress)
            .packets,
        1
    );
    assert!(dp.conntrack_entries().unwrap().is_empty());
    // Everything else is allowed by the identity-0 rule.
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 23, SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &udp4(A4, WORLD4, 40000, 22)),
        TC_ACT_OK
    );
}

#[test]
fn privileged_deny_beats_allow() {
    let Some((_pin, mut dp)) = setup("denybeatsallow", PAL_EP_F_ENFORCE_EGRESS) else {
        return;
    };
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[
            // A specific allow under a broad deny of the same identity.
            row(ID_B, TCP, 80, 80, Verdict::Allow, 1),
            row(ID_B, 0, 0, 0, Verdict::Deny, 2),
            // A specific allow of one identity under a deny for every peer.
            row(ID_A, TCP, 443, 443, Verdict::Allow, 3),
            row(0, TCP, 1, 1024, Verdict::Deny, 4),
            // An allow for every peer above.
            row(0, TCP, 1025, 65535, Verdict::Allow, 5),
        ],
    )
    .unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 80, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(last_event(&mut dp).rule_id, 2);
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 8080, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, A4, 40000, 443, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(last_event(&mut dp).rule_id, 4);
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, A4, 40000, 8443, SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        run(
            &dp,
            Hook::FromContainer,
            &tcp4(A4, WORLD4, 40000, 8443, SYN)
        ),
        TC_ACT_OK
    );
    assert_eq!(
        dp.metrics()
            .unwrap()
            .get(PAL_REASON_POLICY_DENY, Direction::Egress)
            .packets,
        3
    );
}

#[test]
fn privileged_default_deny() {
    let Some((_pin, mut dp)) = setup("defaultdeny", ENFORCE_BOTH) else {
        return;
    };
    dp.write_table(EP_A, Direction::Egress, &[]).unwrap();
    dp.write_table(EP_A, Direction::Ingress, &[]).unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 80, SYN)),
        TC_ACT_SHOT
    );
    let e = last_event(&mut dp);
    assert_eq!(
        (e.r#type, e.reason, e.rule_id),
        (PAL_EVENT_DROP, PAL_REASON_POLICY_DEFAULT, 0)
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &udp4(A4, WORLD4, 40000, 53)),
        TC_ACT_SHOT
    );
    let e = last_event(&mut dp);
    assert_eq!(
        e.dst_identity, 9,
        "an address outside the ipcache is world-ipv4"
    );
    assert_eq!(
        run(&dp, Hook::ToContainer, &tcp4(B4, A4, 40000, 80, SYN)),
        TC_ACT_SHOT
    );
    let e = last_event(&mut dp);
    assert_eq!(
        (u32::from(e.direction), e.src_identity, e.dst_identity),
        (PAL_DIR_INGRESS, ID_B, ID_A)
    );
    let m = dp.metrics().unwrap();
    assert_eq!(
        m.get(PAL_REASON_POLICY_DEFAULT, Direction::Egress).packets,
        2
    );
    assert_eq!(
        m.get(PAL_REASON_POLICY_DEFAULT, Direction::Ingress).packets,
        1
    );
    // Non-IP frames are never judged.
    assert_eq!(run(&dp, Hook::FromContainer, &arp()), TC_ACT_OK);
}

#[test]
fn privileged_not_enforced() {
    let Some((_pin, mut dp)) = setup("notenforced", 0) else {
        return;
    };
    // No table at all: nothing selects the endpoint in either direction.
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 80, SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        run(&dp, Hook::ToContainer, &tcp4(WORLD4, A4, 40000, 22, SYN)),
        TC_ACT_OK
    );
    let e = last_event(&mut dp);
    assert_eq!(
        (e.outcome, e.reason),
        (PAL_OUTCOME_FORWARDED, PAL_REASON_NONE)
    );
    // Enforcing one direction leaves the other open.
    dp.set_endpoint(
        IFINDEX,
        &endpoint_value(EP_A, ID_A, PAL_EP_F_ENFORCE_INGRESS, Some(A4), Some(A6)),
    )
    .unwrap();
    dp.write_table(EP_A, Direction::Ingress, &[]).unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40001, 80, SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        run(&dp, Hook::ToContainer, &tcp4(WORLD4, A4, 40001, 22, SYN)),
        TC_ACT_SHOT
    );
}

#[test]
fn privileged_spoofed_source_dropped() {
    let Some((_pin, mut dp)) = setup("spoofed", 0) else {
        return;
    };
    let other = Ipv4Addr::new(10, 0, 0, 99);
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(other, B4, 40000, 80, SYN)),
        TC_ACT_SHOT
    );
    let e = last_event(&mut dp);
    assert_eq!(
        (e.r#type, e.reason, e.src_identity),
        (PAL_EVENT_DROP, PAL_REASON_SPOOFED, ID_A)
    );
    let other6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 99);
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp6(other6, B6, 40000, 80, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(
        dp.metrics()
            .unwrap()
            .get(PAL_REASON_SPOOFED, Direction::Egress)
            .packets,
        2
    );
    // Packets to the pod are not checked for spoofing.
    assert_eq!(
        run(&dp, Hook::ToContainer, &tcp4(other, A4, 40000, 80, SYN)),
        TC_ACT_OK
    );
    // A pod without an IPv6 address may not send IPv6.
    dp.set_endpoint(IFINDEX, &endpoint_value(EP_A, ID_A, 0, Some(A4), None))
        .unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp6(A6, B6, 40000, 80, SYN)),
        TC_ACT_SHOT
    );
}

#[test]
fn privileged_reply_allowed_through_conntrack() {
    let Some((_pin, mut dp)) = setup("reply", ENFORCE_BOTH) else {
        return;
    };
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[row(ID_B, TCP, 80, 80, Verdict::Allow, 1)],
    )
    .unwrap();
    dp.write_table(EP_A, Direction::Ingress, &[]).unwrap();
    // Before the SYN the "reply" is a new connection to the pod: default deny.
    assert_eq!(
        run(&dp, Hook::ToContainer, &tcp4(B4, A4, 80, 40000, SYN | ACK)),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 80, SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        run(&dp, Hook::ToContainer, &tcp4(B4, A4, 80, 40000, SYN | ACK)),
        TC_ACT_OK
    );
    assert_eq!(
        run(&dp, Hook::ToContainer, &tcp4(B4, A4, 80, 40000, ACK)),
        TC_ACT_OK
    );
    // Not a reply: another port, or the peer opening its own connection.
    assert_eq!(
        run(&dp, Hook::ToContainer, &tcp4(B4, A4, 80, 40001, ACK)),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(&dp, Hook::ToContainer, &tcp4(B4, A4, 40000, 80, SYN)),
        TC_ACT_SHOT
    );
    let ct = dp.conntrack_entries().unwrap();
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].1.packets, 3, "the SYN and two replies");
}

#[test]
fn privileged_icmp_echo_and_reply() {
    let Some((_pin, mut dp)) = setup("icmp", ENFORCE_BOTH) else {
        return;
    };
    // ICMP: the "port" is the type (echo request = 8).
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[row(ID_B, ICMP, 8, 8, Verdict::Allow, 3)],
    )
    .unwrap();
    dp.write_table(EP_A, Direction::Ingress, &[]).unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &icmp4(A4, B4, 8, 77)),
        TC_ACT_OK
    );
    let e = last_event(&mut dp);
    assert_eq!((e.protocol, e.dport_host(), e.rule_id), (ICMP, 8, 3));
    assert_eq!(
        run(&dp, Hook::ToContainer, &icmp4(B4, A4, 0, 77)),
        TC_ACT_OK,
        "echo reply"
    );
    assert_eq!(
        run(&dp, Hook::ToContainer, &icmp4(B4, A4, 0, 78)),
        TC_ACT_SHOT,
        "another id"
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &icmp4(A4, B4, 13, 79)),
        TC_ACT_SHOT,
        "timestamp"
    );
    assert_eq!(
        run(&dp, Hook::ToContainer, &icmp4(B4, A4, 8, 80)),
        TC_ACT_SHOT,
        "echo to the pod"
    );
}

#[test]
fn privileged_ipv6_tcp() {
    let Some((_pin, mut dp)) = setup("ipv6", ENFORCE_BOTH) else {
        return;
    };
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[row(ID_B, TCP, 443, 443, Verdict::Allow, 4)],
    )
    .unwrap();
    dp.write_table(EP_A, Direction::Ingress, &[]).unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp6(A6, B6, 40000, 443, SYN)),
        TC_ACT_OK
    );
    let e = last_event(&mut dp);
    assert_eq!(
        (u32::from(e.family), e.dst_identity, e.rule_id),
        (PAL_FAMILY_IPV6, ID_B, 4)
    );
    assert_eq!((e.saddr, e.daddr), (A6.octets(), B6.octets()));
    assert_eq!(
        run(&dp, Hook::ToContainer, &tcp6(B6, A6, 443, 40000, SYN | ACK)),
        TC_ACT_OK
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp6(A6, B6, 40000, 444, SYN)),
        TC_ACT_SHOT
    );
    // An IPv6 peer outside the ipcache is world-ipv6 (10).
    let world6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp6(A6, world6, 40000, 443, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(last_event(&mut dp).dst_identity, 10);
}

#[test]
fn privileged_icmpv6_neighbour_solicitation_passes() {
    // Enforcing both directions without any table: everything else fails closed.
    let Some((_pin, mut dp)) = setup("ndp", ENFORCE_BOTH) else {
        return;
    };
    let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    let solicited = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 2);
    assert_eq!(
        run(
            &dp,
            Hook::FromContainer,
            &icmp6(link_local, solicited, 135, 0)
        ),
        TC_ACT_OK
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &icmp6(A6, solicited, 135, 0)),
        TC_ACT_OK
    );
    // Duplicate address detection solicits from the unspecified address.
    assert_eq!(
        run(
            &dp,
            Hook::FromContainer,
            &icmp6(Ipv6Addr::UNSPECIFIED, solicited, 135, 0)
        ),
        TC_ACT_OK
    );
    assert_eq!(
        run(&dp, Hook::ToContainer, &icmp6(link_local, A6, 136, 0)),
        TC_ACT_OK
    );
    // An NDP packet from a foreign global address is spoofed; other ICMPv6 is judged.
    let other = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 99);
    assert_eq!(
        run(&dp, Hook::FromContainer, &icmp6(other, solicited, 135, 0)),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &icmp6(A6, B6, 128, 5)),
        TC_ACT_SHOT
    );
    assert_eq!(last_event(&mut dp).reason, PAL_REASON_FAIL_CLOSED);
}

#[test]
fn privileged_related_icmp_error_passes() {
    let Some((_pin, mut dp)) = setup("related", ENFORCE_BOTH) else {
        return;
    };
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[row(0, UDP, 53, 53, Verdict::Allow, 1)],
    )
    .unwrap();
    dp.write_table(EP_A, Direction::Ingress, &[]).unwrap();
    let query = ipv4(A4, WORLD4, UDP, &udp_header(40000, 53, b"q"));
    let router = Ipv4Addr::new(192, 0, 2, 254);
    // Before the query, the error relates to nothing.
    let unreachable = icmp4_error(router, A4, 3, 3, &query);
    assert_eq!(run(&dp, Hook::ToContainer, &unreachable), TC_ACT_SHOT);
    assert_eq!(
        run(&dp, Hook::FromContainer, &udp4(A4, WORLD4, 40000, 53)),
        TC_ACT_OK
    );
    assert_eq!(run(&dp, Hook::ToContainer, &unreachable), TC_ACT_OK);
    let exceeded = icmp4_error(router, A4, 11, 0, &query);
    assert_eq!(run(&dp, Hook::ToContainer, &exceeded), TC_ACT_OK);
    // An error quoting another flow is not related.
    let other = ipv4(A4, WORLD4, UDP, &udp_header(40001, 53, b"q"));
    assert_eq!(
        run(
            &dp,
            Hook::ToContainer,
            &icmp4_error(router, A4, 3, 3, &other)
        ),
        TC_ACT_SHOT
    );
}

#[test]
fn privileged_unknown_ifindex_fails_closed() {
    if !privileged() {
        return;
    }
    let pin = PinDir::new("unknownif");
    let mut dp = open(&pin);
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 80, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(&dp, Hook::ToContainer, &tcp4(B4, A4, 40000, 80, SYN)),
        TC_ACT_SHOT
    );
    let e = last_event(&mut dp);
    assert_eq!(
        (e.reason, e.endpoint_id, e.ifindex),
        (PAL_REASON_FAIL_CLOSED, 0, IFINDEX)
    );
    let m = dp.metrics().unwrap();
    assert_eq!(m.get(PAL_REASON_FAIL_CLOSED, Direction::Egress).packets, 1);
    assert_eq!(m.get(PAL_REASON_FAIL_CLOSED, Direction::Ingress).packets, 1);
    assert_eq!(
        run(&dp, Hook::FromContainer, &arp()),
        TC_ACT_OK,
        "non-IP passes"
    );
}

#[test]
fn privileged_fail_closed_flag() {
    let Some((_pin, mut dp)) = setup("failclosed", PAL_EP_F_ENFORCE_EGRESS | PAL_EP_F_FAIL_CLOSED)
    else {
        return;
    };
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[row(0, 0, 0, 0, Verdict::Allow, 1)],
    )
    .unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 80, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(last_event(&mut dp).reason, PAL_REASON_FAIL_CLOSED);
    // Enforcing without a table fails closed too.
    dp.set_endpoint(
        IFINDEX,
        &endpoint_value(EP_A, ID_A, ENFORCE_BOTH, Some(A4), Some(A6)),
    )
    .unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 80, SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        run(&dp, Hook::ToContainer, &tcp4(WORLD4, A4, 40000, 80, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(last_event(&mut dp).reason, PAL_REASON_FAIL_CLOSED);
    dp.remove_table(EP_A, Direction::Egress).unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40001, 80, SYN)),
        TC_ACT_SHOT
    );
}

#[test]
fn privileged_malformed_dropped() {
    let Some((_pin, mut dp)) = setup("malformed", 0) else {
        return;
    };
    let mut truncated = tcp4(A4, B4, 40000, 80, SYN);
    truncated.truncate(14 + 20 + 10);
    assert_eq!(run(&dp, Hook::FromContainer, &truncated), TC_ACT_SHOT);
    assert_eq!(last_event(&mut dp).reason, PAL_REASON_MALFORMED);
    // An IPv4 header length below 20 bytes.
    let mut bad_ihl = tcp4(B4, A4, 40000, 80, SYN);
    bad_ihl[14] = 0x44;
    assert_eq!(run(&dp, Hook::ToContainer, &bad_ihl), TC_ACT_SHOT);
    assert_eq!(
        dp.metrics()
            .unwrap()
            .get(PAL_REASON_MALFORMED, Direction::Ingress)
            .packets,
        1
    );
}

#[test]
fn privileged_policy_audit_flag_passes_a_deny() {
    let Some((_pin, mut dp)) = setup("policyaudit", PAL_EP_F_ENFORCE_EGRESS) else {
        return;
    };
    let mut audited = row(ID_B, TCP, 22, 22, Verdict::Deny, 9);
    audited.audit = true;
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[
            audited,
            row(ID_B, TCP, 23, 23, Verdict::Deny, 10),
            row(0, 0, 0, 0, Verdict::Allow, 1),
        ],
    )
    .unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 22, SYN)),
        TC_ACT_OK
    );
    let e = last_event(&mut dp);
    assert_eq!(
        (e.r#type, e.outcome, e.reason, e.rule_id),
        (
            PAL_EVENT_POLICY_VERDICT,
            PAL_OUTCOME_AUDIT,
            PAL_REASON_POLICY_DENY,
            9
        )
    );
    let ct = dp.conntrack_entries().unwrap();
    assert_eq!(ct[0].1.flags, PAL_CT_F_EGRESS_OK | PAL_CT_F_AUDIT);
    // A deny that is not audited still drops.
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 23, SYN)),
        TC_ACT_SHOT
    );
}

#[test]
fn privileged_endpoint_audit_passes_default_deny() {
    let Some((_pin, mut dp)) = setup(
        "epaudit",
        PAL_EP_F_ENFORCE_EGRESS | PAL_EP_F_AUDIT_DEFAULT_EGRESS,
    ) else {
        return;
    };
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[row(ID_B, TCP, 22, 22, Verdict::Deny, 9)],
    )
    .unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 80, SYN)),
        TC_ACT_OK
    );
    let e = last_event(&mut dp);
    assert_eq!(
        (e.outcome, e.reason),
        (PAL_OUTCOME_AUDIT, PAL_REASON_POLICY_DEFAULT)
    );
    // Auditing the default does not audit explicit denies…
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 22, SYN)),
        TC_ACT_SHOT
    );
    // …the endpoint-wide audit flag does.
    dp.set_endpoint(
        IFINDEX,
        &endpoint_value(
            EP_A,
            ID_A,
            PAL_EP_F_ENFORCE_EGRESS | PAL_EP_F_AUDIT,
            Some(A4),
            Some(A6),
        ),
    )
    .unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40001, 22, SYN)),
        TC_ACT_OK
    );
    let e = last_event(&mut dp);
    assert_eq!(
        (e.outcome, e.reason),
        (PAL_OUTCOME_AUDIT, PAL_REASON_POLICY_DENY)
    );
}

#[test]
fn privileged_redirect_is_forwarded_and_tracked() {
    let Some((_pin, mut dp)) = setup("redirect", PAL_EP_F_ENFORCE_EGRESS) else {
        return;
    };
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[row(
            ID_B,
            TCP,
            80,
            80,
            Verdict::Redirect { proxy_port: 15001 },
            12,
        )],
    )
    .unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 80, SYN)),
        TC_ACT_OK
    );
    assert_eq!(last_event(&mut dp).rule_id, 12);
    let ct = dp.conntrack_entries().unwrap();
    assert_eq!(ct[0].1.flags, PAL_CT_F_EGRESS_OK | PAL_CT_F_REDIRECT);
    let table = dp.read_table(EP_A, Direction::Egress).unwrap().unwrap();
    assert_eq!(table[0].1.proxy_port, 15001);
}

#[test]
fn privileged_table_swap_and_readback() {
    let Some((_pin, mut dp)) = setup("swap", PAL_EP_F_ENFORCE_EGRESS) else {
        return;
    };
    let allow = [
        row(ID_B, TCP, 8000, 8080, Verdict::Allow, 1),
        row(0, UDP, 53, 53, Verdict::Allow, 2),
    ];
    let n = dp.write_table(EP_A, Direction::Egress, &allow).unwrap();
    let table = dp.read_table(EP_A, Direction::Egress).unwrap().unwrap();
    assert_eq!(table.len(), n);
    assert_eq!(table, palisade_datapath::lpm_entries(&allow));
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 8080, SYN)),
        TC_ACT_OK
    );
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[row(ID_B, TCP, 8080, 8080, Verdict::Deny, 3)],
    )
    .unwrap();
    // The established connection keeps riding conntrack; new ones see the new table.
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 8080, ACK)),
        TC_ACT_OK
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40001, 8080, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &udp4(A4, B4, 40001, 53)),
        TC_ACT_SHOT
    );
    assert_eq!(dp.read_table(EP_A, Direction::Ingress).unwrap(), None);
}

#[test]
fn privileged_write_failure_fails_closed() {
    let Some((_pin, mut dp)) = setup("writefail", PAL_EP_F_ENFORCE_EGRESS) else {
        return;
    };
    let allow_all = [row(0, 0, 0, 0, Verdict::Allow, 1)];
    // Fill pal_policy (64 slots in the tests) with other endpoints' tables.
    let slots = LIMITS.policy_tables.unwrap();
    for ep in 0..slots {
        dp.write_table(1000 + ep, Direction::Ingress, &allow_all)
            .unwrap();
    }
    let err = dp
        .write_table(EP_A, Direction::Egress, &allow_all)
        .unwrap_err();
    assert!(err.to_string().contains("fails closed"), "{err}");
    assert_ne!(
        dp.endpoint(IFINDEX).unwrap().unwrap().flags & PAL_EP_F_FAIL_CLOSED,
        0
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 80, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(last_event(&mut dp).reason, PAL_REASON_FAIL_CLOSED);
    // Re-setting the endpoint keeps it fail-closed while its table is missing.
    dp.set_endpoint(
        IFINDEX,
        &endpoint_value(EP_A, ID_A, PAL_EP_F_ENFORCE_EGRESS, Some(A4), Some(A6)),
    )
    .unwrap();
    assert_ne!(
        dp.endpoint(IFINDEX).unwrap().unwrap().flags & PAL_EP_F_FAIL_CLOSED,
        0
    );
    // Once the table is written the endpoint opens again.
    dp.remove_table(1000, Direction::Ingress).unwrap();
    dp.write_table(EP_A, Direction::Egress, &allow_all).unwrap();
    assert_eq!(
        dp.endpoint(IFINDEX).unwrap().unwrap().flags,
        PAL_EP_F_ENFORCE_EGRESS
    );
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 80, SYN)),
        TC_ACT_OK
    );
}

#[test]
fn privileged_ratelimit_counts_lost_events() {
    let Some((_pin, mut dp)) = setup("ratelimit", PAL_EP_F_ENFORCE_EGRESS) else {
        return;
    };
    dp.write_table(EP_A, Direction::Egress, &[]).unwrap();
    dp.set_ratelimit(1, 1).unwrap();
    for port in 0..6 {
        assert_eq!(
            run(
                &dp,
                Hook::FromContainer,
                &tcp4(A4, B4, 40000, 80 + port, SYN)
            ),
            TC_ACT_SHOT
        );
    }
    let events = dp.take_events();
    let m = dp.metrics().unwrap();
    // One token per CPU the runs landed on.
    assert!(
        !events.is_empty() && events.len() <= aya::util::nr_cpus().unwrap(),
        "{} events",
        events.len()
    );
    assert_eq!(events.len() as u64 + m.lost_events, 6);
    // Counters are never rate limited.
    assert_eq!(
        m.get(PAL_REASON_POLICY_DEFAULT, Direction::Egress).packets,
        6
    );
    dp.set_ratelimit(0, 0).unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, B4, 40000, 90, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(dp.wait_events(Duration::from_secs(1)).unwrap().len(), 1);
}

#[test]
fn privileged_ipcache_and_endpoints_read_back() {
    let Some((_pin, mut dp)) = setup("readback", 0) else {
        return;
    };
    dp.set_ipcache("192.0.2.0/24".parse().unwrap(), 16_777_217, 0)
        .unwrap();
    let entries = dp.ipcache_entries().unwrap();
    assert_eq!(entries.len(), 5);
    let net: ipnet::IpNet = "192.0.2.0/24".parse().unwrap();
    assert!(entries.contains(&(
        net,
        IpcacheValue {
            identity: 16_777_217,
            flags: 0
        }
    )));
    // The prefix gives its identity to the addresses in it.
    dp.set_endpoint(
        IFINDEX,
        &endpoint_value(EP_A, ID_A, PAL_EP_F_ENFORCE_EGRESS, Some(A4), Some(A6)),
    )
    .unwrap();
    dp.write_table(
        EP_A,
        Direction::Egress,
        &[row(16_777_217, TCP, 443, 443, Verdict::Allow, 1)],
    )
    .unwrap();
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, WORLD4, 40000, 443, SYN)),
        TC_ACT_OK
    );
    assert_eq!(last_event(&mut dp).dst_identity, 16_777_217);
    dp.remove_ipcache(net).unwrap();
    dp.remove_ipcache(net).unwrap();
    assert_eq!(dp.ipcache_entries().unwrap().len(), 4);
    assert_eq!(
        run(&dp, Hook::FromContainer, &tcp4(A4, WORLD4, 40001, 443, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(dp.endpoints().unwrap().len(), 1);
    dp.remove_endpoint(IFINDEX).unwrap();
    assert_eq!(dp.endpoint(IFINDEX).unwrap(), None);
}

#[test]
fn privileged_objects_share_pinned_maps() {
    if !privileged() {
        return;
    }
    let pin = PinDir::new("shared");
    let mut dp = open(&pin);
    let pinned = dp.pinned_map_ids().unwrap();
    let policy_id = pinned.iter().find(|(n, _)| *n == "pal_policy").unwrap().1;
    for hook in Hook::BOTH {
        let used = dp.program_map_ids(hook).unwrap();
        assert!(
            used.contains(&policy_id),
            "{hook:?} uses the pinned pal_policy"
        );
        for id in &used {
            assert!(
                pinned.iter().any(|(_, p)| p == id),
                "{hook:?} uses unpinned map {id}"
            );
        }
    }
    // A second open (a restarted agent) reuses the same maps and sees the same state.
    dp.set_endpoint(7, &endpoint_value(70, 700, 0, Some(A4), None))
        .unwrap();
    let dp2 = open(&pin);
    assert_eq!(dp2.pinned_map_ids().unwrap(), pinned);
    assert_eq!(dp2.endpoint(7).unwrap().unwrap().endpoint_id, 70);
    // A table written through one is enforced by the other's programs.
    dp.set_endpoint(
        IFINDEX,
        &endpoint_value(EP_A, ID_A, ENFORCE_BOTH, Some(A4), None),
    )
    .unwrap();
    dp.write_table(
        EP_A,
        Direction::Ingress,
        &[row(0, TCP, 80, 80, Verdict::Allow, 1)],
    )
    .unwrap();
    assert_eq!(
        dp2.test_run(Hook::ToContainer, IFINDEX, &tcp4(B4, A4, 1, 80, SYN))
            .unwrap(),
        TC_ACT_OK
    );
    assert_eq!(
        dp2.test_run(Hook::ToContainer, IFINDEX, &tcp4(B4, A4, 1, 81, SYN))
            .unwrap(),
        TC_ACT_SHOT
    );
}

/// TCX programs attached to each hook of an interface, by program id.
fn tcx_programs(ifname: &str) -> (Vec<u32>, Vec<u32>) {
    use aya::programs::{SchedClassifier, TcAttachType};
    let ids = |t| {
        SchedClassifier::query_tcx(ifname, t)
            .map(|(_, progs)| progs.iter().map(aya::programs::ProgramInfo::id).collect())
            .unwrap_or_default()
    };
    (ids(TcAttachType::Ingress), ids(TcAttachType::Egress))
}

/// The kernel releases a link whose last reference went away asynchronously.
fn wait_detached(ifname: &str) {
    for _ in 0..200 {
        if tcx_programs(ifname) == (vec![], vec![]) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("programs still attached to {ifname} after detach");
}

#[test]
fn privileged_attach_detach_and_reopen() {
    if !privileged() {
        return;
    }
    in_netns(|| {
        ip("link add palh0 type veth peer name palp0");
        ip("link set palh0 up");
        let pin = PinDir::new("attach");
        let mut dp = open(&pin);
        dp.attach("palh0").unwrap();
        assert_eq!(dp.attached().unwrap(), vec!["palh0".to_string()]);
        assert!(pin.path().join("links/palh0/from_container").exists());
        assert!(pin.path().join("links/palh0/to_container").exists());
        let (ingress, egress) = tcx_programs("palh0");
        assert_eq!((ingress.len(), egress.len()), (1, 1));
        // Attaching again is idempotent.
        dp.attach("palh0").unwrap();
        assert_eq!(tcx_programs("palh0"), (ingress.clone(), egress.clone()));

        // The agent exits: the links stay.
        drop(dp);
        assert_eq!(tcx_programs("palh0"), (ingress.clone(), egress.clone()));

        // A restarted agent moves the links onto its own programs.
        let mut dp = open(&pin);
        let (ingress2, egress2) = tcx_programs("palh0");
        assert_eq!((ingress2.len(), egress2.len()), (1, 1));
        assert_ne!(
            ingress2, ingress,
            "the pinned link now runs the new program"
        );

        dp.detach("palh0").unwrap();
        assert!(dp.attached().unwrap().is_empty());
        wait_detached("palh0");
        assert!(dp.attach("nosuchif0").is_err());

        // An interface that goes away leaves a defunct link, dropped on the next open.
        dp.attach("palh0").unwrap();
        ip("link del palh0");
        drop(dp);
        let dp = open(&pin);
        assert!(dp.attached().unwrap().is_empty());
    });
}

/// Real packets through TCX: a pod namespace behind a veth sends UDP to the host side.
#[test]
fn privileged_tcx_enforces_real_traffic() {
    if !privileged() {
        return;
    }
    in_netns(|| {
        // The pod's namespace lives on a second thread; `ip` run from it configures it.
        let (to_pod, from_host) = std::sync::mpsc::channel::<Option<u16>>();
        let (to_host, from_pod) = std::sync::mpsc::channel::<i32>();
        let pod = std::thread::spawn(move || {
            unshare_net();
            to_host.send(gettid()).unwrap();
            while let Ok(Some(port)) = from_host.recv() {
                if port == 0 {
                    ip("addr add 10.99.0.2/24 dev palp1");
                    ip("link set palp1 up");
                    ip("link set lo up");
                    to_host.send(0).unwrap();
                    continue;
                }
                let s = UdpSocket::bind("10.99.0.2:0").unwrap();
                s.send_to(b"hello", ("10.99.0.1", port)).unwrap();
                to_host.send(0).unwrap();
            }
        });
        let pod_tid = from_pod.recv().unwrap();
        ip("link add palh1 type veth peer name palp1");
        ip(&format!("link set palp1 netns {pod_tid}"));
        ip("addr add 10.99.0.1/24 dev palh1");
        ip("link set palh1 up");
        to_pod.send(Some(0)).unwrap();
        from_pod.recv().unwrap();

        let pin = PinDir::new("traffic");
        let mut dp = open(&pin);
        let host_if = ifindex_of("palh1");
        let pod_ip = Ipv4Addr::new(10, 99, 0, 2);
        dp.set_endpoint(
            host_if,
            &endpoint_value(21, ID_A, PAL_EP_F_ENFORCE_EGRESS, Some(pod_ip), None),
        )
        .unwrap();
        dp.set_ipcache("10.99.0.1/32".parse().unwrap(), 1, 0)
            .unwrap();
        dp.write_table(
            21,
            Direction::Egress,
            &[row(1, UDP, 9001, 9001, Verdict::Allow, 5)],
        )
        .unwrap();
        dp.attach("palh1").unwrap();

        // Arrival is waited for generously (ARP first, a busy machine); a drop for 500 ms.
        let recv = |port: u16, wait_ms: u64| -> bool {
            let s = UdpSocket::bind(("10.99.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(wait_ms)))
                .unwrap();
            to_pod.send(Some(port)).unwrap();
            from_pod.recv().unwrap();
            let mut buf = [0u8; 16];
            s.recv_from(&mut buf).is_ok()
        };
        assert!(recv(9001, 5000), "the allowed datagram arrives");
        assert!(!recv(9002, 500), "the default-denied datagram is dropped");
        let events = dp.take_events();
        assert!(events.iter().any(|e| e.reason == PAL_REASON_POLICY_DEFAULT
            && e.dport_host() == 9002
            && e.ifindex == host_if
            && e.endpoint_id == 21));
        assert!(events
            .iter()
            .any(|e| e.outcome == PAL_OUTCOME_FORWARDED && e.dport_host() == 9001));
        dp.detach("palh1").unwrap();
        wait_detached("palh1");
        assert!(recv(9002, 5000), "nothing is enforced once detached");
        to_pod.send(None).unwrap();
        pod.join().unwrap();
    });
}

fn ifindex_of(name: &str) -> u32 {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':').next().unwrap().trim().parse().unwrap()
}

/// The kernel's LPM lookups over tables written by `write_table` agree with `lookup_model`
/// (and so, by the property test of `lpm_entries`, with the engine), on pseudo-random tables.
#[test]
fn privileged_kernel_lookup_matches_the_model() {
    let Some((_pin, mut dp)) = setup("model", PAL_EP_F_ENFORCE_EGRESS) else {
        return;
    };
    let peers = [
        (7u32, Ipv4Addr::new(10, 1, 0, 7)),
        (8, Ipv4Addr::new(10, 1, 0, 8)),
        (9, WORLD4),
    ];
    for (id, addr) in &peers[..2] {
        dp.set_ipcache(ipnet::IpNet::from(std::net::IpAddr::V4(*addr)), *id, 0)
            .unwrap();
    }
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut sport = 1024u16;
    for _ in 0..25 {
        let mut entries = Vec::new();
        for _ in 0..rand(10) {
            let identity = [0, 7, 8, 9][rand(4) as usize];
            let proto = [0, TCP, TCP, UDP][rand(4) as usize];
            let lo = rand(70) as u16;
            let hi = if rand(5) == 0 {
                65535
            } else {
                lo + rand(40) as u16
            };
            let verdict = match rand(4) {
                0 | 1 => Verdict::Allow,
                2 => Verdict::Deny,
                _ => Verdict::Redirect { proxy_port: 15000 },
            };
            entries.push(TableEntry {
                identity,
                proto,
                port_lo: lo,
                port_hi: hi,
                verdict,
                audit: rand(4) == 0,
                rule_id: 1 + rand(20) as u32,
            });
        }
        dp.write_table(EP_A, Direction::Egress, &entries).unwrap();
        let lpm = palisade_datapath::lpm_entries(&entries);
        for _ in 0..30 {
            let (identity, addr) = peers[rand(3) as usize];
            let proto = [TCP, UDP][rand(2) as usize];
            let port = rand(120) as u16;
            sport += 1;
            let frame = if proto == TCP {
                tcp4(A4, addr, sport, port, SYN)
            } else {
                udp4(A4, addr, sport, port)
            };
            let verdict = run(&dp, Hook::FromContainer, &frame);
            let e = last_event(&mut dp);
            let want = palisade_datapath::lookup_model(&lpm, identity, proto, port);
            let ctx = format!("{entries:?}: probe {identity} {proto}/{port}: {want:?}");
            match want {
                None => {
                    assert_eq!(
                        (verdict, e.reason),
                        (TC_ACT_SHOT, PAL_REASON_POLICY_DEFAULT),
                        "{ctx}"
                    );
                }
                Some(v) if v.verdict == PAL_VERDICT_DENY && v.flags & PAL_POLICY_F_AUDIT == 0 => {
                    assert_eq!(
                        (verdict, e.reason, e.rule_id),
                        (TC_ACT_SHOT, PAL_REASON_POLICY_DENY, v.rule_id),
                        "{ctx}"
                    );
                }
                Some(v) if v.verdict == PAL_VERDICT_DENY => {
                    assert_eq!(
                        (verdict, e.outcome, e.rule_id),
                        (TC_ACT_OK, PAL_OUTCOME_AUDIT, v.rule_id),
                        "{ctx}"
                    );
                }
                Some(v) => {
                    assert_eq!(
                        (verdict, e.outcome, e.rule_id),
                        (TC_ACT_OK, PAL_OUTCOME_FORWARDED, v.rule_id),
                        "{ctx}"
                    );
                }
            }
        }
    }
}
