#!/usr/bin/env bash
# Runs a command on this machine's own files inside a small Linux VM that has a working
# /dev/kvm, for hosts whose kernel registers no KVM device (see scripts/kvm-lane.sh).
#
#   scripts/nested-kvm.sh [--cpus N] [--mem MIB] [--timeout SECS] [--tcg single|multi] [--interactive] -- CMD [ARGS...]
#
# The VM ("L1") is QEMU with TCG, the software emulator, whose CPU model has AMD SVM; the
# L1 kernel is Debian's stock linux-image-amd64 with its kvm-amd module, so cinder inside
# talks to the real Linux KVM (nested paging included). Everything L1 and its guests execute
# is emulated, so it is slow (a probe guest boots in about a second), but the code path is
# the one a KVM host runs: cinder's ioctls, exits, ioeventfds, irqfds, taps, namespaces.
#
# L1 sees this machine's root filesystem read-only over virtio-9p with a tmpfs overlay on
# top, so every program, library, build output and cached guest image is where it is here;
# whatever L1 writes is thrown away when it powers off. CMD runs with the caller's
# environment and working directory, its output streams to stdout, and this script exits
# with CMD's exit status (or 125 when the VM itself fails, 124 on timeout). CMD's stdin is
# /dev/null, or with --interactive this terminal (through L1's serial console).
#
# --tcg single|multi (default single, or CINDER_L1_TCG): QEMU's TCG threading. Each mode has
# a nested-SVM fault of its own: multi with 2 or more L1 CPUs now and then corrupts the L2
# guest's state (worst for guests doing much port I/O), single now and then leaves a Linux
# guest spinning before init. --cpus N (default 2, or CINDER_L1_CPUS): L1's CPUs; multi with
# 1 CPU fails far less (once in 10 runs of linux_net, by freezing L1).
# scripts/nested-tests.sh picks both per test executable (README, "The nested KVM lane").
#
# Environment: CINDER_CACHE (default $HOME/.cache/cinder) holds the L1 kernel and initramfs,
# built once from Debian packages (apt-get download; nothing else is fetched).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${CINDER_CACHE:-$HOME/.cache/cinder}/l1
CPUS=${CINDER_L1_CPUS:-2}
MEM=8192
TIMEOUT=3600
INTERACTIVE=0
TCG=${CINDER_L1_TCG:-single}

log() { printf '[nested-kvm] %s\n' "$*" >&2; }
die() {
	printf '[nested-kvm] error: %s\n' "$*" >&2
	exit 125
}

while (($#)); do
	case $1 in
	--cpus) CPUS=$2; shift 2 ;;
	--mem) MEM=$2; shift 2 ;;
	--timeout) TIMEOUT=$2; shift 2 ;;
	--interactive) INTERACTIVE=1; shift ;;
	--tcg) TCG=$2; shift 2 ;;
	--) shift; break ;;
	-h | --help) sed -n '2,/^set /{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown option $1 (usage: nested-kvm.sh [--cpus N] [--mem MIB] [--timeout SECS] [--tcg single|multi] -- CMD...)" ;;
	esac
done
(($#)) || die "no command given (usage: nested-kvm.sh [options] -- CMD...)"
[[ $TCG == single || $TCG == multi ]] || die "--tcg (or CINDER_L1_TCG) must be single or multi, not '$TCG'"

# --- packages ---
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[[ -x /bin/busybox ]] || need+=(busybox-static)
command -v modinfo >/dev/null || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
if ((${#need[@]})); then
	log "installing: ${need[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=1200 -qq update >&2
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=1200 -y -qq \
		--no-install-recommends install "${need[@]}" >&2
fi
qv=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
((${qv:-0} >= 8)) || die "QEMU ${qv:-?} is too old for nested SVM (7.2 corrupts the L1 kernel); run scripts/setup.sh"
file /bin/busybox 2>/dev/null | grep -q 'statically linked' ||
	ldd /bin/busybox 2>&1 | grep -q 'not a dynamic' || die "/bin/busybox is not static (install busybox-static)"

# --- L1 kernel and initramfs (cached by the Debian package version) ---
# The kernel package linux-image-amd64 points to today; a cache entry is never rebuilt.
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n 1)
[[ -n $pkg ]] || die "cannot resolve the Debian package behind linux-image-amd64 (apt-get update?)"
ver=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
[[ -n $ver && $ver != "(none)" ]] || die "no candidate version for $pkg"
# Bump the suffix when the initramfs recipe below changes.
L1=$CACHE/${pkg}_${ver}-r3
if [[ ! -s $L1/initrd.cpio.gz || ! -s $L1/vmlinuz ]]; then
	log "building the L1 kernel and initramfs from $pkg $ver into $L1"
	mkdir -p "$CACHE"
	tmp=$(mktemp -d "$CACHE/build.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && apt-get download "$pkg=$ver" >&2 2> >(grep -v '^W: Download is performed unsandboxed' >&2))
	dpkg-deb -x "$tmp"/*.deb "$tmp/pkg"
	kdir=$(ls -d "$tmp"/pkg/lib/modules/*)
	root=$tmp/initrd
	mkdir -p "$root"/{bin,dev,proc,sys,mods,host,rw,newroot,run}
	cp /bin/busybox "$root/bin/busybox"
	# Modules and their dependencies, in load order.
	declare -A seen=()
	order=()
	add_mod() {
		local m=$1 f d
		[[ -n ${seen[$m]:-} ]] && return 0
		seen[$m]=1
		f=$(find "$kdir/kernel" \( -name "$m.ko" -o -name "${m//_/-}.ko" \) | head -n 1)
		[[ -n $f ]] || die "module $m not found in $pkg"
		for d in $(modinfo -F depends "$f" | tr ',' ' '); do add_mod "$d"; done
		cp "$f" "$root/mods/"
		order+=("$(basename "$f")")
	}
	for m in virtio_pci 9pnet_virtio 9p overlay virtio_rng kvm_amd tun veth; do add_mod "$m"; done
	printf '%s\n' "${order[@]}" >"$root/mods/order"
	cp "$HERE/nested-kvm-init.sh" "$root/init"
	chmod +x "$root/init"
	(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >"$tmp/initrd.cpio.gz"
	mkdir -p "$L1"
	cp "$tmp"/pkg/boot/vmlinuz-* "$L1/vmlinuz"
	mv "$tmp/initrd.cpio.gz" "$L1/initrd.cpio.gz"
	rm -rf "$tmp"
	trap - EXIT
fi

# --- the run ---
run=$(mktemp -d /tmp/cinder-l1.XXXXXX)
cleanup() { rm -rf "$run"; }
trap cleanup EXIT
# The caller's environment, minus what describes this terminal or process.
export -p | grep -vE '^declare -x (OLDPWD|PWD|SHLVL|_|TERM|COLUMNS|LINES)(=|$)' >"$run/env.sh"
{
	printf 'source %q\n' "$run/env.sh"
	printf 'cd %q\n' "$PWD"
	printf 'exec'
	printf ' %q' "$@"
	printf '\n'
} >"$run/cmd.sh"
echo "$run" >"$run/path"
((INTERACTIVE)) && touch "$run/interactive"

log "starting L1 (TCG thread=$TCG, $CPUS CPUs, $MEM MiB) for: $*"
status=0
timeout --foreground -k 10 "$TIMEOUT" qemu-system-x86_64 \
	-machine q35 -accel tcg,thread="$TCG" -cpu qemu64,+svm,+npt,+sse4.1,+sse4.2,+ssse3,+popcnt \
	-smp "$CPUS" -m "$MEM" -nodefaults -no-user-config -nographic -no-reboot \
	-serial stdio -monitor none \
	-kernel "$L1/vmlinuz" -initrd "$L1/initrd.cpio.gz" \
	-append "console=ttyS0 quiet loglevel=3 panic=-1 cinder_run=$run" \
	-device virtio-rng-pci \
	-virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
	-virtfs "local,path=$run,mount_tag=run,security_model=none" <"$([[ $INTERACTIVE == 1 ]] && echo /dev/stdin || echo /dev/null)" || status=$?
if ((status == 124)); then
	log "timed out after ${TIMEOUT}s"
	exit 124
fi
((status == 0)) || die "qemu exited with status $status"
[[ -s $run/rc ]] || die "L1 did not report the command's exit status (see the console output above)"
rc=$(<"$run/rc")
log "command exited with status $rc"
exit "$rc"
