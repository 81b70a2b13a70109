/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Palisade datapath ABI: every map key, map value and event the kernel programs share with
 * user space. Each struct here has exactly one #[repr(C)] mirror in crates/abi, and a test
 * checks sizes and offsets against this header. Fields are fixed-width and explicitly padded.
 */
#ifndef PALISADE_ABI_H
#define PALISADE_ABI_H

#include <linux/types.h>

#define PAL_FAMILY_IPV4 4
#define PAL_FAMILY_IPV6 6

/* ipcache: LPM trie, address prefix -> security identity. prefixlen counts the 32 bits of
 * `family` plus the address bits, so IPv4 and IPv6 never share a prefix. Addresses are in
 * network byte order; an IPv4 address uses the first 4 bytes of addr. */
struct ipcache_key {
	__u32 prefixlen;
	__u32 family;
	__u8 addr[16];
};

struct ipcache_value {
	__u32 identity;
	__u32 flags; /* PAL_IPCACHE_F_* */
};

#define PAL_IPCACHE_F_ENDPOINT 1 /* a local endpoint (pod) address */

/* endpoints: hash, host-side veth ifindex -> the pod behind it. */
struct endpoint_key {
	__u32 ifindex;
};

struct endpoint_value {
	__u32 endpoint_id;
	__u32 identity;
	__u32 flags; /* PAL_EP_F_* */
	__u32 family_mask; /* bit 0: ipv4 set, bit 1: ipv6 set */
	__u8 ipv4[4];
	__u8 ipv6[16];
};

#define PAL_EP_F_ENFORCE_INGRESS 1
#define PAL_EP_F_ENFORCE_EGRESS 2
#define PAL_EP_F_AUDIT 4 /* policy denials pass and are reported as AUDIT */
#define PAL_EP_F_FAIL_CLOSED 8 /* the table could not be written: drop everything */
#define PAL_EP_F_AUDIT_DEFAULT_INGRESS 16 /* default deny at ingress comes only from audited policies */
#define PAL_EP_F_AUDIT_DEFAULT_EGRESS 32 /* likewise at egress */

#define PAL_DIR_INGRESS 0
#define PAL_DIR_EGRESS 1

/* policy: hash of maps, (endpoint, direction) -> that direction's table, an LPM trie of
 * policy_key -> policy_value. A table is replaced whole by swapping the inner map, so a
 * change is atomic per endpoint and direction. */
struct policy_outer_key {
	__u32 endpoint_id;
	__u32 direction;
};

/* LPM over identity (32 bits), protocol (8 bits) and destination port (16 bits, network
 * order): prefixlen 32 = the identity on every protocol and port; 40 = one protocol, every
 * port; 40 + n = a port prefix of n bits. Identity 0 is "any peer" and is looked up second. */
struct policy_key {
	__u32 prefixlen;
	__u32 identity;
	__u8 protocol;
	__u8 dport[2];
	__u8 pad;
};

#define PAL_VERDICT_ALLOW 1
#define PAL_VERDICT_DENY 2
#define PAL_VERDICT_REDIRECT 3 /* allowed through the L7 proxy */

struct policy_value {
	__u8 verdict; /* PAL_VERDICT_* */
	__u8 flags; /* PAL_POLICY_F_* */
	__u16 proxy_port; /* host order; for REDIRECT */
	__u32 rule_id; /* the engine's rule that decided, for flows */
};

#define PAL_POLICY_F_AUDIT 1 /* a denial from an audited policy: passes as AUDIT */

/* conntrack: LRU hash keyed by the 5-tuple in the direction of the first packet. */
struct ct_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport; /* network order; ICMP: echo id */
	__u16 dport; /* network order; ICMP: 0 */
	__u8 protocol;
	__u8 family;
	__u8 pad[2];
};

struct ct_value {
	__u64 created_ns;
	__u64 last_seen_ns;
	__u32 flags; /* PAL_CT_F_* */
	__u32 rule_id;
	__u64 packets;
	__u64 bytes;
};

#define PAL_CT_F_EGRESS_OK 1 /* the source's egress policy allowed it */
#define PAL_CT_F_INGRESS_OK 2 /* the destination's ingress policy allowed it */
#define PAL_CT_F_AUDIT 4
#define PAL_CT_F_REDIRECT 8

/* Why a packet was dropped (or would have been, under audit). */
#define PAL_REASON_NONE 0
#define PAL_REASON_POLICY_DENY 1 /* an explicit deny rule */
#define PAL_REASON_POLICY_DEFAULT 2 /* default deny: no rule allows it */
#define PAL_REASON_SPOOFED 3 /* source address not the pod's */
#define PAL_REASON_FAIL_CLOSED 4 /* the endpoint's table is missing */
#define PAL_REASON_MALFORMED 5 /* unparsable headers */
#define PAL_REASON_MAX 6

/* metrics: per-CPU array indexed by reason * 2 + direction (reason 0 = forwarded). */
struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

#define PAL_METRICS_ENTRIES (PAL_REASON_MAX * 2)

#define PAL_EVENT_POLICY_VERDICT 1 /* a new connection was judged */
#define PAL_EVENT_DROP 2 /* a packet was dropped */

#define PAL_OUTCOME_FORWARDED 1
#define PAL_OUTCOME_DROPPED 2
#define PAL_OUTCOME_AUDIT 3

/* ring buffer record. */
struct flow_event {
	__u64 timestamp_ns;
	__u8 type; /* PAL_EVENT_* */
	__u8 outcome; /* PAL_OUTCOME_* */
	__u8 reason; /* PAL_REASON_* */
	__u8 direction; /* PAL_DIR_* */
	__u8 protocol;
	__u8 family;
	__u8 tcp_flags;
	__u8 pad;
	__u32 endpoint_id;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 rule_id;
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u32 ifindex;
};

/* event rate limit: one per CPU. tokens refill at `rate` per second up to `burst`. */
struct ratelimit_state {
	__u64 last_ns;
	__u64 tokens;
	__u64 lost;
};

struct ratelimit_config {
	__u64 rate;
	__u64 burst;
};

#endif /* PALISADE_ABI_H */
