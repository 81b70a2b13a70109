/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every map the datapath uses, pinned by name under the agent's bpffs directory so they
 * outlive the agent and keep enforcing. */
#ifndef PALISADE_MAPS_H
#define PALISADE_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"

#define PAL_IPCACHE_MAX 65536
#define PAL_ENDPOINTS_MAX 65536
#define PAL_POLICY_TABLES_MAX 131072
#define PAL_CT_MAX 262144
#define PAL_EVENTS_BYTES (4 * 1024 * 1024)

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, PAL_IPCACHE_MAX);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PAL_ENDPOINTS_MAX);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_endpoints SEC(".maps");

/* clang emits only forward declarations for types reached through an inner-map template;
 * this one-slot map carries the complete table key and value types in BTF, which the loader
 * needs to size the template. */
struct pal_policy_types {
	struct policy_key key;
	struct policy_value value;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pal_policy_types);
} pal_btf_anchor SEC(".maps");

/* The template of every per-endpoint table. Real tables are created by the agent with the
 * size they need and swapped into pal_policy whole. */
struct pal_policy_table {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, PAL_POLICY_TABLES_MAX);
	__type(key, struct policy_outer_key);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct pal_policy_table);
} pal_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PAL_CT_MAX);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PAL_METRICS_ENTRIES);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_metrics SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, PAL_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ratelimit_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_ratelimit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ratelimit_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pal_ratelimit_config SEC(".maps");

#endif
