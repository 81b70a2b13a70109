// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Attached at TCX ingress of a pod's host-side veth: packets the pod sends. Enforces the
 * pod's egress policy and anti-spoofing. */
#include "../lib/datapath.h"

SEC("classifier/from_container")
int from_container(struct __sk_buff *skb)
{
	return pal_handle(skb, PAL_DIR_EGRESS);
}

char _license[] SEC("license") = "Dual BSD/GPL";
