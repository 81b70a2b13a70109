/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet parsing into a flow tuple, with every access bounds-checked. */
#ifndef PALISADE_PARSE_H
#define PALISADE_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif

/* The ICMP / ICMPv6 header prefix both families share (linux/icmp.h drags in libc). */
struct pal_icmphdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u16 id;
	__u16 sequence;
};

#define PAL_ICMP_DEST_UNREACH 3
#define PAL_ICMP_SOURCE_QUENCH 4
#define PAL_ICMP_TIME_EXCEEDED 11
#define PAL_ICMP_PARAMETERPROB 12

struct flow {
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 family;
	__u8 protocol;
	__u8 tcp_flags;
	__u8 is_icmp_error; /* an ICMP error: `inner` holds the tuple of the packet it quotes */
	__u16 sport; /* network order */
	__u16 dport; /* network order; ICMP: type in the low byte of host order */
	__u32 len;
	struct ct_key inner;
} __attribute__((aligned(8)));

#define PAL_TCP_SYN 0x02
#define PAL_TCP_ACK 0x10

static __always_inline void copy16(__u8 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, 16);
}

/* Parses the L4 header at `l4` for `proto`. Returns 0, or -1 if truncated. */
static __always_inline int parse_l4(void *l4, void *end, __u8 proto, struct flow *f)
{
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > end)
			return -1;
		f->sport = th->source;
		f->dport = th->dest;
		f->tcp_flags = ((__u8 *)th)[13];
	} else if (proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
		/* SCTP's first 4 bytes are the ports, like UDP's. */
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > end)
			return -1;
		f->sport = uh->source;
		f->dport = uh->dest;
	} else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		struct pal_icmphdr *ih = l4;
		if ((void *)(ih + 1) > end)
			return -1;
		__u8 type = ih->type;
		/* Echo carries an id that pairs request and reply. */
		f->sport = ih->id;
		f->dport = bpf_htons(type);
		if (proto == IPPROTO_ICMP)
			f->is_icmp_error = type == PAL_ICMP_DEST_UNREACH || type == PAL_ICMP_TIME_EXCEEDED ||
					   type == PAL_ICMP_PARAMETERPROB || type == PAL_ICMP_SOURCE_QUENCH;
		else
			f->is_icmp_error = type < 128;
	}
	return 0;
}

/* Fills f->inner from the header an ICMP error quotes (the original packet, which went the
 * other way). */
static __always_inline void parse_icmp_inner(void *l4, void *end, struct flow *f)
{
	void *inner = l4 + 8;
	if (f->family == PAL_FAMILY_IPV4) {
		struct iphdr *ip = inner;
		if ((void *)(ip + 1) > end)
			return;
		__u32 *s = (__u32 *)f->inner.saddr, *d = (__u32 *)f->inner.daddr;
		s[0] = ip->saddr;
		d[0] = ip->daddr;
		f->inner.protocol = ip->protocol;
		void *l4i = inner + (ip->ihl & 0xf) * 4;
		struct udphdr *uh = l4i;
		if ((void *)(uh + 1) > end)
			return;
		if (ip->protocol == IPPROTO_ICMP) {
			struct pal_icmphdr *ih = l4i;
			f->inner.sport = ih->id;
			f->inner.dport = 0;
		} else {
			f->inner.sport = uh->source;
			f->inner.dport = uh->dest;
		}
	} else {
		struct ipv6hdr *ip6 = inner;
		if ((void *)(ip6 + 1) > end)
			return;
		copy16(f->inner.saddr, (__u8 *)&ip6->saddr);
		copy16(f->inner.daddr, (__u8 *)&ip6->daddr);
		f->inner.protocol = ip6->nexthdr;
		struct udphdr *uh = (void *)(ip6 + 1);
		if ((void *)(uh + 1) > end)
			return;
		if (ip6->nexthdr == IPPROTO_ICMPV6) {
			struct pal_icmphdr *ih = (void *)(ip6 + 1);
			f->inner.sport = ih->id;
			f->inner.dport = 0;
		} else {
			f->inner.sport = uh->source;
			f->inner.dport = uh->dest;
		}
	}
	f->inner.family = f->family;
}

/* Returns 1 for an IP packet parsed into f, 0 for a non-IP frame (ARP, …), -1 if malformed. */
static __always_inline int parse_packet(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	__builtin_memset(f, 0, sizeof(*f));
	f->len = skb->len;
	void *l4;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return -1;
		__u32 ihl = (ip->ihl & 0xf) * 4;
		if (ihl < sizeof(*ip))
			return -1;
		f->family = PAL_FAMILY_IPV4;
		f->protocol = ip->protocol;
		__u32 *s = (__u32 *)f->saddr, *d = (__u32 *)f->daddr;
		s[0] = ip->saddr;
		d[0] = ip->daddr;
		/* Later fragments carry no L4 header: judged by addresses and protocol alone. */
		if (ip->frag_off & bpf_htons(0x1fff))
			return 1;
		l4 = (void *)ip + ihl;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return -1;
		f->family = PAL_FAMILY_IPV6;
		copy16(f->saddr, (__u8 *)&ip6->saddr);
		copy16(f->daddr, (__u8 *)&ip6->daddr);
		__u8 nh = ip6->nexthdr;
		l4 = (void *)(ip6 + 1);
		/* Skip up to four extension headers. */
#pragma unroll
		for (int i = 0; i < 4; i++) {
			if (nh != IPPROTO_HOPOPTS && nh != IPPROTO_ROUTING && nh != IPPROTO_DSTOPTS &&
			    nh != IPPROTO_FRAGMENT)
				break;
			__u8 *ext = l4;
			if ((void *)(ext + 8) > end)
				return -1;
			__u8 next = ext[0];
			__u32 hlen = nh == IPPROTO_FRAGMENT ? 8 : ((__u32)ext[1] + 1) * 8;
			nh = next;
			l4 += hlen;
		}
		f->protocol = nh;
	} else {
		return 0;
	}
	if (parse_l4(l4, end, f->protocol, f) < 0)
		return -1;
	if (f->is_icmp_error)
		parse_icmp_inner(l4, end, f);
	return 1;
}

#endif
