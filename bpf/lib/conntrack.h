/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Connection tracking: replies and related ICMP errors ride a connection that policy
 * allowed; only new connections are judged. */
#ifndef PALISADE_CONNTRACK_H
#define PALISADE_CONNTRACK_H

#include "maps.h"
#include "parse.h"

static __always_inline void ct_key_forward(const struct flow *f, struct ct_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	copy16(k->saddr, f->saddr);
	copy16(k->daddr, f->daddr);
	k->protocol = f->protocol;
	k->family = f->family;
	if (f->protocol == IPPROTO_ICMP || f->protocol == IPPROTO_ICMPV6) {
		k->sport = f->sport; /* echo id */
		k->dport = 0;
	} else {
		k->sport = f->sport;
		k->dport = f->dport;
	}
}

static __always_inline void ct_key_reverse(const struct flow *f, struct ct_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	copy16(k->saddr, f->daddr);
	copy16(k->daddr, f->saddr);
	k->protocol = f->protocol;
	k->family = f->family;
	if (f->protocol == IPPROTO_ICMP || f->protocol == IPPROTO_ICMPV6) {
		k->sport = f->sport;
		k->dport = 0;
	} else {
		k->sport = f->dport;
		k->dport = f->sport;
	}
}

static __always_inline void ct_touch(struct ct_value *v, __u32 len)
{
	v->last_seen_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, len);
}

#endif
