/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Counters (always) and flow events (rate limited, losses counted). */
#ifndef PALISADE_EVENTS_H
#define PALISADE_EVENTS_H

#include "maps.h"
#include "parse.h"

static __always_inline void count(__u8 reason, __u8 direction, __u32 bytes)
{
	__u32 idx = (__u32)reason * 2 + direction;
	struct metrics_value *m = bpf_map_lookup_elem(&pal_metrics, &idx);
	if (m) {
		m->packets++;
		m->bytes += bytes;
	}
}

/* Token bucket per CPU; returns 1 if an event may be sent. */
static __always_inline int ratelimit_allow(void)
{
	__u32 zero = 0;
	struct ratelimit_state *st = bpf_map_lookup_elem(&pal_ratelimit, &zero);
	struct ratelimit_config *cfg = bpf_map_lookup_elem(&pal_ratelimit_config, &zero);
	if (!st)
		return 0;
	if (!cfg || cfg->rate == 0)
		return 1; /* not configured: unlimited */
	__u64 now = bpf_ktime_get_ns();
	__u64 elapsed = now - st->last_ns;
	__u64 refill = elapsed / 1000000000ULL * cfg->rate + (elapsed % 1000000000ULL) * cfg->rate / 1000000000ULL;
	if (refill > 0) {
		st->tokens += refill;
		st->last_ns = now;
	}
	if (st->tokens > cfg->burst)
		st->tokens = cfg->burst;
	if (st->tokens == 0) {
		st->lost++;
		return 0;
	}
	st->tokens--;
	return 1;
}

static __always_inline void emit(const struct flow *f, __u8 type, __u8 outcome, __u8 reason,
				 __u8 direction, __u32 endpoint_id, __u32 src_id, __u32 dst_id,
				 __u32 rule_id, __u32 ifindex)
{
	if (!ratelimit_allow())
		return;
	struct flow_event *e = bpf_ringbuf_reserve(&pal_events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		struct ratelimit_state *st = bpf_map_lookup_elem(&pal_ratelimit, &zero);
		if (st)
			st->lost++;
		return;
	}
	e->timestamp_ns = bpf_ktime_get_ns();
	e->type = type;
	e->outcome = outcome;
	e->reason = reason;
	e->direction = direction;
	e->protocol = f->protocol;
	e->family = f->family;
	e->tcp_flags = f->tcp_flags;
	e->pad = 0;
	e->endpoint_id = endpoint_id;
	e->src_identity = src_id;
	e->dst_identity = dst_id;
	e->rule_id = rule_id;
	copy16(e->saddr, f->saddr);
	copy16(e->daddr, f->daddr);
	e->sport = f->sport;
	e->dport = f->dport;
	e->ifindex = ifindex;
	bpf_ringbuf_submit(e, 0);
}

#endif
