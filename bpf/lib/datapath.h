/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The verdict path shared by both pod-facing hooks. */
#ifndef PALISADE_DATAPATH_H
#define PALISADE_DATAPATH_H

#include <linux/pkt_cls.h>

#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "policy.h"
#include "conntrack.h"
#include "events.h"

static __always_inline int same_addr(const __u8 *a, const __u8 *b, __u8 family)
{
	if (family == PAL_FAMILY_IPV4)
		return *(const __u32 *)a == *(const __u32 *)b;
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* IPv6 link control: neighbour discovery (router/neighbour solicitation and advertisement,
 * redirect, types 133-137) and multicast listener discovery (MLD query/report/done 130-132,
 * MLDv2 report 143). It keeps IPv6 working, is sent from link-local or unspecified addresses
 * before a pod's address is up, and is never subject to policy, as in Cilium. */
static __always_inline int is_ndp(const struct flow *f)
{
	if (f->family != PAL_FAMILY_IPV6 || f->protocol != IPPROTO_ICMPV6)
		return 0;
	__u8 type = bpf_ntohs(f->dport);
	return (type >= 130 && type <= 137) || type == 143;
}

/* The unspecified address ::, the source of duplicate address detection's neighbour
 * solicitations. */
static __always_inline int is_unspecified6(const __u8 *a)
{
	const __u32 *x = (const __u32 *)a;
	return (x[0] | x[1] | x[2] | x[3]) == 0;
}

static __always_inline int drop(const struct flow *f, __u8 reason, __u8 direction, __u32 ep_id,
				__u32 src, __u32 dst, __u32 rule, __u32 ifindex)
{
	count(reason, direction, f->len);
	emit(f, PAL_EVENT_DROP, PAL_OUTCOME_DROPPED, reason, direction, ep_id, src, dst, rule, ifindex);
	return TC_ACT_SHOT;
}

/* direction: PAL_DIR_EGRESS on packets leaving the pod (the pod's egress policy),
 * PAL_DIR_INGRESS on packets entering it. */
static __always_inline int pal_handle(struct __sk_buff *skb, __u8 direction)
{
	struct flow f;
	int parsed = parse_packet(skb, &f);
	if (parsed == 0)
		return TC_ACT_OK; /* ARP and other non-IP frames */

	struct endpoint_key ek = { .ifindex = skb->ifindex };
	struct endpoint_value *ep = bpf_map_lookup_elem(&pal_endpoints, &ek);
	if (!ep)
		return drop(&f, PAL_REASON_FAIL_CLOSED, direction, 0, 0, 0, 0, skb->ifindex);
	__u32 ep_id = ep->endpoint_id;
	if (parsed < 0)
		return drop(&f, PAL_REASON_MALFORMED, direction, ep_id, 0, 0, 0, skb->ifindex);

	if (direction == PAL_DIR_EGRESS) {
		/* Anti-spoofing: a pod sends only from its own addresses (NDP also from link-local,
		 * and from :: for duplicate address detection). */
		int ok = 0;
		if (f.family == PAL_FAMILY_IPV4 && (ep->family_mask & 1))
			ok = same_addr(f.saddr, ep->ipv4, PAL_FAMILY_IPV4);
		else if (f.family == PAL_FAMILY_IPV6 && (ep->family_mask & 2))
			ok = same_addr(f.saddr, ep->ipv6, PAL_FAMILY_IPV6) ||
			     (is_ndp(&f) && ((f.saddr[0] == 0xfe && (f.saddr[1] & 0xc0) == 0x80) ||
					     is_unspecified6(f.saddr)));
		if (!ok)
			return drop(&f, PAL_REASON_SPOOFED, direction, ep_id, ep->identity, 0, 0, skb->ifindex);
	}
	if (is_ndp(&f)) {
		count(PAL_REASON_NONE, direction, f.len);
		return TC_ACT_OK;
	}

	/* An ICMP error quoting a tracked connection is related to it. */
	if (f.is_icmp_error) {
		struct ct_value *rel = bpf_map_lookup_elem(&pal_conntrack, &f.inner);
		if (rel) {
			count(PAL_REASON_NONE, direction, f.len);
			return TC_ACT_OK;
		}
	}

	__u32 need = direction == PAL_DIR_EGRESS ? PAL_CT_F_EGRESS_OK : PAL_CT_F_INGRESS_OK;
	struct ct_key fk;
	ct_key_forward(&f, &fk);
	struct ct_value *cv = bpf_map_lookup_elem(&pal_conntrack, &fk);
	if (cv && (cv->flags & need)) {
		ct_touch(cv, f.len);
		count(PAL_REASON_NONE, direction, f.len);
		return TC_ACT_OK;
	}
	if (!cv) {
		struct ct_key rk;
		ct_key_reverse(&f, &rk);
		struct ct_value *rv = bpf_map_lookup_elem(&pal_conntrack, &rk);
		if (rv) {
			/* A reply of a connection that was allowed. */
			ct_touch(rv, f.len);
			count(PAL_REASON_NONE, direction, f.len);
			return TC_ACT_OK;
		}
	}

	/* A new connection (or one not judged in this direction yet). */
	__u32 self_id = ep->identity;
	__u32 peer_id = direction == PAL_DIR_EGRESS ? identity_of(f.family, f.daddr)
						    : identity_of(f.family, f.saddr);
	__u32 src_id = direction == PAL_DIR_EGRESS ? self_id : peer_id;
	__u32 dst_id = direction == PAL_DIR_EGRESS ? peer_id : self_id;
	__u32 enforce_flag = direction == PAL_DIR_EGRESS ? PAL_EP_F_ENFORCE_EGRESS : PAL_EP_F_ENFORCE_INGRESS;
	__u32 audit_default = direction == PAL_DIR_EGRESS ? PAL_EP_F_AUDIT_DEFAULT_EGRESS
							  : PAL_EP_F_AUDIT_DEFAULT_INGRESS;
	__u32 ep_flags = ep->flags;

	struct verdict v = { .verdict = PAL_VERDICT_ALLOW };
	if (ep_flags & PAL_EP_F_FAIL_CLOSED)
		return drop(&f, PAL_REASON_FAIL_CLOSED, direction, ep_id, src_id, dst_id, 0, skb->ifindex);
	if (ep_flags & enforce_flag) {
		struct policy_outer_key ok = { .endpoint_id = ep_id, .direction = direction };
		void *table = bpf_map_lookup_elem(&pal_policy, &ok);
		if (!table)
			return drop(&f, PAL_REASON_FAIL_CLOSED, direction, ep_id, src_id, dst_id, 0, skb->ifindex);
		policy_lookup(table, peer_id, f.protocol, f.dport, &v);
	}

	__u8 reason = PAL_REASON_NONE;
	int audited = 0;
	if (v.verdict == 0) {
		reason = PAL_REASON_POLICY_DEFAULT;
		audited = (ep_flags & PAL_EP_F_AUDIT) || (ep_flags & audit_default);
	} else if (v.verdict == PAL_VERDICT_DENY) {
		reason = PAL_REASON_POLICY_DENY;
		audited = (ep_flags & PAL_EP_F_AUDIT) || (v.flags & PAL_POLICY_F_AUDIT);
	}
	if (reason != PAL_REASON_NONE && !audited)
		return drop(&f, reason, direction, ep_id, src_id, dst_id, v.rule_id, skb->ifindex);

	/* Allowed (or audited): remember the connection so its replies pass. */
	__u32 add = need | (audited ? PAL_CT_F_AUDIT : 0) | (v.verdict == PAL_VERDICT_REDIRECT ? PAL_CT_F_REDIRECT : 0);
	if (cv) {
		__sync_fetch_and_or(&cv->flags, add);
		ct_touch(cv, f.len);
	} else {
		struct ct_value nv = {};
		nv.created_ns = bpf_ktime_get_ns();
		nv.last_seen_ns = nv.created_ns;
		nv.flags = add;
		nv.rule_id = v.rule_id;
		nv.packets = 1;
		nv.bytes = f.len;
		bpf_map_update_elem(&pal_conntrack, &fk, &nv, BPF_NOEXIST);
	}
	count(PAL_REASON_NONE, direction, f.len);
	emit(&f, PAL_EVENT_POLICY_VERDICT, audited ? PAL_OUTCOME_AUDIT : PAL_OUTCOME_FORWARDED, reason,
	     direction, ep_id, src_id, dst_id, v.rule_id, skb->ifindex);
	return TC_ACT_OK;
}

#endif
