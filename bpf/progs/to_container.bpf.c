// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Attached at TCX egress of a pod's host-side veth: packets delivered to the pod. Enforces
 * the pod's ingress policy. */
#include "../lib/datapath.h"

SEC("classifier/to_container")
int to_container(struct __sk_buff *skb)
{
	return pal_handle(skb, PAL_DIR_INGRESS);
}

char _license[] SEC("license") = "Dual BSD/GPL";
