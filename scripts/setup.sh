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
	umoci                  # builds OCI image layouts offline for the image tests (image/tests)
	util-linux             # setpriv, for the permission tests
	iproute2               # network namespaces and taps for network tests
	kmod                   # modinfo, for the nested KVM lane's L1 initramfs
)

# QEMU 8 or newer. The nested KVM lane (scripts/nested-kvm.sh) runs KVM inside QEMU's
# emulated SVM, and Debian 12's QEMU 7.2 corrupts the L1 kernel there under load ("corrupted
# stack end detected inside scheduler" in a vCPU thread, seen here); bookworm-backports has
# QEMU 10.
qemu_ok() {
	local v
	v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
	[[ -n $v ]] && ((v >= 8))
}
if ! qemu_ok; then
	if [[ $(id -u) -ne 0 ]]; then
		echo "[setup] error: QEMU >= 8 needed and not root" >&2
		exit 1
	fi
	. /etc/os-release
	if [[ ${VERSION_CODENAME:-} == bookworm ]]; then
		echo "[setup] installing QEMU from bookworm-backports" >&2
		echo "deb http://deb.debian.org/debian bookworm-backports main" \
			>/etc/apt/sources.list.d/cinder-bookworm-backports.list
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq
		apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >&2
	else
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2
	fi
	qemu_ok || { echo "[setup] error: could not install QEMU >= 8" >&2; exit 1; }
fi

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
