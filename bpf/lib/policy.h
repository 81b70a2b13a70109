/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Identity of an address, and the policy verdict for (endpoint, direction, peer, port). */
#ifndef PALISADE_POLICY_H
#define PALISADE_POLICY_H

#include "maps.h"
#include "parse.h"

#define PAL_IDENTITY_WORLD_IPV4 9
#define PAL_IDENTITY_WORLD_IPV6 10

static __always_inline __u32 identity_of(__u8 family, const __u8 *addr)
{
	struct ipcache_key k = {};
	k.family = family;
	copy16(k.addr, addr);
	k.prefixlen = 32 + (family == PAL_FAMILY_IPV4 ? 32 : 128);
	struct ipcache_value *v = bpf_map_lookup_elem(&pal_ipcache, &k);
	if (v)
		return v->identity;
	return family == PAL_FAMILY_IPV4 ? PAL_IDENTITY_WORLD_IPV4 : PAL_IDENTITY_WORLD_IPV6;
}

struct verdict {
	__u8 verdict; /* PAL_VERDICT_*, or 0 for "no entry" */
	__u8 flags;
	__u16 proxy_port;
	__u32 rule_id;
};

/* Two LPM lookups, the peer's identity and "any peer" (0). A deny in either wins; then a
 * plain allow; then a redirect. The agent writes each table so that, for one identity, a
 * deny is never hidden behind a more specific allow (it pushes denies into them). */
static __always_inline void policy_lookup(void *table, __u32 identity, __u8 protocol, __u16 dport,
					  struct verdict *out)
{
	struct policy_key k = {};
	k.prefixlen = 32 + 8 + 16;
	k.identity = identity;
	k.protocol = protocol;
	__builtin_memcpy(k.dport, &dport, 2);
	struct policy_value *exact = bpf_map_lookup_elem(table, &k);
	k.identity = 0;
	struct policy_value *any = bpf_map_lookup_elem(table, &k);
	out->verdict = 0;
	out->flags = 0;
	out->proxy_port = 0;
	out->rule_id = 0;
	struct policy_value *pick = 0;
	if (exact && exact->verdict == PAL_VERDICT_DENY)
		pick = exact;
	else if (any && any->verdict == PAL_VERDICT_DENY)
		pick = any;
	else if (exact && exact->verdict == PAL_VERDICT_ALLOW)
		pick = exact;
	else if (any && any->verdict == PAL_VERDICT_ALLOW)
		pick = any;
	else if (exact)
		pick = exact;
	else if (any)
		pick = any;
	if (pick) {
		out->verdict = pick->verdict;
		out->flags = pick->flags;
		out->proxy_port = pick->proxy_port;
		out->rule_id = pick->rule_id;
	}
}

#endif
