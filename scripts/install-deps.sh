#!/usr/bin/env bash
# Installs what building and testing Palisade needs on Debian 12. Idempotent: it only
# installs what is missing.
#
# Besides a C toolchain: clang, llvm and libbpf-dev (headers) compile the eBPF programs of
# bpf/ (crates/bpf/build.rs); iproute2 and bpftool are used by the privileged datapath tests
# and for inspecting the datapath (`bpftool map dump pinned /sys/fs/bpf/...`).
set -euo pipefail

installed() {
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
for pkg in clang llvm libbpf-dev linux-libc-dev iproute2 bpftool; do
	installed "${pkg}" || need_apt+=("${pkg}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "install-deps: need root to apt-get install ${need_apt[*]}" >&2
		exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
	echo "install-deps: cargo (Rust, via rustup) is required; see https://rustup.rs" >&2
	exit 1
fi
for component in rustfmt clippy; do
	if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
		rustup component add "${component}"
	fi
done
