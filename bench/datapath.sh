#!/usr/bin/env bash
# The datapath benchmark, in one run (root, Debian 12, Linux >= 6.6; figures in
# docs/performance.md, "Datapath (bench/datapath.sh)"):
#
# - between two lab pods (network namespaces behind the lab's node namespace), 64-byte UDP
#   packet rate and TCP throughput (iperf3) with (a) nothing on the path, (b) Palisade's programs
#   with 10, 1,000 and 10,000 entries in the receiving endpoint's ingress table, (c) nftables in
#   the node namespace: conntrack plus a verdict map with the same 10,000 rules, (d) the same
#   rules as a linear chain; configurations interleaved, 3 runs each, medians;
# - the programs' per-packet cost from the kernel's BPF run-time statistics;
# - apply-to-enforced latency with 1,000 endpoints (p50, p99).
#
# The driver is crates/lab/examples/datapath_bench.rs; arguments are passed on to it
# (`bench/datapath.sh --help`). The last line of output is
#   datapath: palisade_10k/none=R1 nft_vmap/none=R2 nft_linear/none=R3 apply_p99_ms=L
# (ratios of 64-byte UDP receive rates). A copy of the report goes to target/bench/.
#
# Nothing outside the lab's namespaces and a private bpffs directory is changed, except
# kernel.bpf_stats_enabled during the cost pass (put back afterwards, also on interruption).
# Everything is removed on exit, Ctrl-C or TERM. Every step is bounded: iperf3 runs are 5 s
# (killed after 25 s), the whole driver is killed after PALISADE_BENCH_TIMEOUT seconds (1800).
#
# Environment: CARGO; PALISADE_BENCH_MAX_LOAD (1.5) and PALISADE_BENCH_LOAD_WAIT (600): before
# starting, wait up to LOAD_WAIT seconds for the 1-minute load average to drop below MAX_LOAD
# (the machine may be shared; the figures are only as quiet as it is), then run anyway.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
	echo "bench/datapath.sh: needs root (network namespaces, eBPF, nftables in the lab)" >&2
	exit 1
fi

CARGO=${CARGO:-cargo}
MAX_LOAD=${PALISADE_BENCH_MAX_LOAD:-1.5}
LOAD_WAIT=${PALISADE_BENCH_LOAD_WAIT:-600}
TIMEOUT=${PALISADE_BENCH_TIMEOUT:-1800}

./bench/install-deps.sh
"${CARGO}" build --release --locked -p palisade-lab --example datapath_bench
BIN=target/release/examples/datapath_bench

WORK=$(mktemp -d /tmp/palisade-bench.XXXXXX)
PIN_BASE=/sys/fs/bpf/palisade-bench-$$
STATS_BEFORE=$(cat /proc/sys/kernel/bpf_stats_enabled)
DRIVER_PID=

cleanup() {
	local status=$?
	trap - EXIT INT TERM
	if [ -n "${DRIVER_PID}" ] && kill -0 "${DRIVER_PID}" 2>/dev/null; then
		# The driver removes its lab on TERM (and its iperf3 processes die with it).
		kill -TERM "${DRIVER_PID}" 2>/dev/null || true
		for _ in $(seq 50); do
			kill -0 "${DRIVER_PID}" 2>/dev/null || break
			sleep 0.2
		done
		kill -KILL "${DRIVER_PID}" 2>/dev/null || true
		wait "${DRIVER_PID}" 2>/dev/null || true
	fi
	# Whatever a killed driver left: its lab's namespaces (only that lab's), its state file,
	# its pinned maps and links.
	if [ -s "${WORK}/lab-id" ]; then
		local id
		id=$(cat "${WORK}/lab-id")
		if [[ "${id}" =~ ^[0-9a-f]{8}$ ]]; then
			for ns in $(ip netns list | awk '{print $1}' | grep "^pal-${id}-" || true); do
				ip netns delete "${ns}" 2>/dev/null || true
			done
			rm -f "/run/palisade/lab/${id}.json"
		fi
	fi
	rm -rf "${PIN_BASE}"
	echo "${STATS_BEFORE}" >/proc/sys/kernel/bpf_stats_enabled 2>/dev/null || true
	rm -rf "${WORK}"
	exit "${status}"
}
trap cleanup EXIT INT TERM

load1() { cut -d' ' -f1 /proc/loadavg; }
waited=0
while awk -v l="$(load1)" -v m="${MAX_LOAD}" 'BEGIN { exit !(l > m) }'; do
	if [ "${waited}" -ge "${LOAD_WAIT}" ]; then
		echo "bench/datapath.sh: load average still $(load1) after ${waited} s; running anyway" >&2
		break
	fi
	[ "${waited}" -eq 0 ] && echo "bench/datapath.sh: load average $(load1) > ${MAX_LOAD}; waiting (up to ${LOAD_WAIT} s)" >&2
	sleep 10
	waited=$((waited + 10))
done
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)

timeout --kill-after=15 "${TIMEOUT}" "${BIN}" \
	--pin-base "${PIN_BASE}" --lab-id-file "${WORK}/lab-id" "$@" >"${WORK}/report" &
DRIVER_PID=$!
wait "${DRIVER_PID}"
DRIVER_PID=

mkdir -p target/bench
stamp=$(date -u +%Y%m%dT%H%M%SZ)
{
	echo "bench/datapath.sh ${stamp}: $(nproc) CPUs, $(uname -sr), load average at start ${LOAD_AT_START}, at end $(cut -d' ' -f1-3 /proc/loadavg)"
	cat "${WORK}/report"
} | tee "target/bench/datapath-${stamp}.txt"
