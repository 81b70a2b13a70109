/* Layout probe for crates/abi/tests/layout.rs: prints the size of every struct of
 * bpf/lib/abi.h, the offset and size of every field, and every #define, one per line:
 *   size <struct> <bytes>
 *   field <struct> <field> <offset> <bytes>
 *   const <NAME> <value>
 * Compiled with the host cc at test time. */
#include <stddef.h>
#include <stdio.h>

#include "../../../bpf/lib/abi.h"

#define SIZE(s) printf("size %s %zu\n", #s, sizeof(struct s))
#define FIELD(s, f) \
	printf("field %s %s %zu %zu\n", #s, #f, offsetof(struct s, f), sizeof(((struct s *)0)->f))
#define CONST(c) printf("const %s %lld\n", #c, (long long)(c))

int main(void)
{
	SIZE(ipcache_key);
	FIELD(ipcache_key, prefixlen);
	FIELD(ipcache_key, family);
	FIELD(ipcache_key, addr);

	SIZE(ipcache_value);
	FIELD(ipcache_value, identity);
	FIELD(ipcache_value, flags);

	SIZE(endpoint_key);
	FIELD(endpoint_key, ifindex);

	SIZE(endpoint_value);
	FIELD(endpoint_value, endpoint_id);
	FIELD(endpoint_value, identity);
	FIELD(endpoint_value, flags);
	FIELD(endpoint_value, family_mask);
	FIELD(endpoint_value, ipv4);
	FIELD(endpoint_value, ipv6);

	SIZE(policy_outer_key);
	FIELD(policy_outer_key, endpoint_id);
	FIELD(policy_outer_key, direction);

	SIZE(policy_key);
	FIELD(policy_key, prefixlen);
	FIELD(policy_key, identity);
	FIELD(policy_key, protocol);
	FIELD(policy_key, dport);
	FIELD(policy_key, pad);

	SIZE(policy_value);
	FIELD(policy_value, verdict);
	FIELD(policy_value, flags);
	FIELD(policy_value, proxy_port);
	FIELD(policy_value, rule_id);

	SIZE(ct_key);
	FIELD(ct_key, saddr);
	FIELD(ct_key, daddr);
	FIELD(ct_key, sport);
	FIELD(ct_key, dport);
	FIELD(ct_key, protocol);
	FIELD(ct_key, family);
	FIELD(ct_key, pad);

	SIZE(ct_value);
	FIELD(ct_value, created_ns);
	FIELD(ct_value, last_seen_ns);
	FIELD(ct_value, flags);
	FIELD(ct_value, rule_id);
	FIELD(ct_value, packets);
	FIELD(ct_value, bytes);

	SIZE(metrics_value);
	FIELD(metrics_value, packets);
	FIELD(metrics_value, bytes);

	SIZE(flow_event);
	FIELD(flow_event, timestamp_ns);
	FIELD(flow_event, type);
	FIELD(flow_event, outcome);
	FIELD(flow_event, reason);
	FIELD(flow_event, direction);
	FIELD(flow_event, protocol);
	FIELD(flow_event, family);
	FIELD(flow_event, tcp_flags);
	FIELD(flow_event, pad);
	FIELD(flow_event, endpoint_id);
	FIELD(flow_event, src_identity);
	FIELD(flow_event, dst_identity);
	FIELD(flow_event, rule_id);
	FIELD(flow_event, saddr);
	FIELD(flow_event, daddr);
	FIELD(flow_event, sport);
	FIELD(flow_event, dport);
	FIELD(flow_event, ifindex);

	SIZE(ratelimit_state);
	FIELD(ratelimit_state, last_ns);
	FIELD(ratelimit_state, tokens);
	FIELD(ratelimit_state, lost);

	SIZE(ratelimit_config);
	FIELD(ratelimit_config, rate);
	FIELD(ratelimit_config, burst);

	CONST(PAL_FAMILY_IPV4);
	CONST(PAL_FAMILY_IPV6);
	CONST(PAL_IPCACHE_F_ENDPOINT);
	CONST(PAL_EP_F_ENFORCE_INGRESS);
	CONST(PAL_EP_F_ENFORCE_EGRESS);
	CONST(PAL_EP_F_AUDIT);
	CONST(PAL_EP_F_FAIL_CLOSED);
	CONST(PAL_EP_F_AUDIT_DEFAULT_INGRESS);
	CONST(PAL_EP_F_AUDIT_DEFAULT_EGRESS);
	CONST(PAL_DIR_INGRESS);
	CONST(PAL_DIR_EGRESS);
	CONST(PAL_VERDICT_ALLOW);
	CONST(PAL_VERDICT_DENY);
	CONST(PAL_VERDICT_REDIRECT);
	CONST(PAL_POLICY_F_AUDIT);
	CONST(PAL_CT_F_EGRESS_OK);
	CONST(PAL_CT_F_INGRESS_OK);
	CONST(PAL_CT_F_AUDIT);
	CONST(PAL_CT_F_REDIRECT);
	CONST(PAL_REASON_NONE);
	CONST(PAL_REASON_POLICY_DENY);
	CONST(PAL_REASON_POLICY_DEFAULT);
	CONST(PAL_REASON_SPOOFED);
	CONST(PAL_REASON_FAIL_CLOSED);
	CONST(PAL_REASON_MALFORMED);
	CONST(PAL_REASON_MAX);
	CONST(PAL_METRICS_ENTRIES);
	CONST(PAL_EVENT_POLICY_VERDICT);
	CONST(PAL_EVENT_DROP);
	CONST(PAL_OUTCOME_FORWARDED);
	CONST(PAL_OUTCOME_DROPPED);
	CONST(PAL_OUTCOME_AUDIT);
	return 0;
}
