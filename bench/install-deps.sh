#!/usr/bin/env bash
# Installs what bench/datapath.sh needs on Debian 12, beyond what building Palisade needs
# (scripts/install-deps.sh, run first): iperf3 (the traffic), nftables (the `nft` baselines, only
# ever used inside the lab's node namespace), bpftool (program ids and run-time statistics),
# iproute2 (`ip netns exec`), util-linux (`setpriv`) and coreutils (`timeout`). Idempotent.
# Kept apart from scripts/install-deps.sh so `make test` does not pull in iperf3 or nftables.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

installed() {
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

need_apt=()
for pkg in iperf3 nftables bpftool iproute2 util-linux coreutils; do
	installed "${pkg}" || need_apt+=("${pkg}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "bench/install-deps: need root to apt-get install ${need_apt[*]}" >&2
		exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
