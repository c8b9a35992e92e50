#!/usr/bin/env bash
# Installs the Debian packages cinder's build, tests and benchmarks need (idempotent: does
# nothing when they are present). Run as root on a Debian 12 machine.
set -euo pipefail

PKGS=(
	qemu-system-x86        # QEMU microvm: the independent oracle for the probe and guests
	linux-source-6.1       # the default guest kernel's source
	busybox-static         # the guest's userland
	build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils  # kernel build
	e2fsprogs              # mkfs.ext4 -d / debugfs for root disk images
	util-linux             # setpriv, for the permission tests
	iproute2               # network namespaces and taps for network tests
)

missing=()
for p in "${PKGS[@]}"; do
	if ! dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii'; then
		missing+=("$p")
	fi
done
if ((${#missing[@]})); then
	echo "[setup] installing: ${missing[*]}" >&2
	if [[ $(id -u) -ne 0 ]]; then
		echo "[setup] error: packages missing and not root: ${missing[*]}" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
command -v cargo >/dev/null || { echo "[setup] error: cargo not found (install Rust with rustup)" >&2; exit 1; }
