#!/usr/bin/env bash
# Benchmarks: builds cinder and the benchmark drivers (release) and prints reports.
#   boot:  exec -> first serial byte, exec -> probe exit, peak RSS; cinder vs QEMU microvm.
#   api:   exec -> API socket ready, request round trip, InstanceStart -> first serial byte.
#   io:    virtio-blk IOPS / MiB/s and virtio-net packets/s / Mbit/s measured by the probe,
#          cinder vs QEMU microvm; blk on cinder's sync and io_uring engines, with host CPU
#          time (non-vCPU threads) per request, plus Firecracker when FIRECRACKER_BIN is set
#          and an older cinder build when BASELINE_CINDER_BIN is set (same rounds).
#   vsock: virtio-vsock throughput each way and connection setup latency (cinder, and
#          Firecracker when FIRECRACKER_BIN is set; QEMU's vsock needs vhost-vsock).
#   seccomp: ns per system call without and with cinder's seccomp filters, per thread kind.
#   density: N idle probe microVMs at once (cold boot): VMs/s, time to all ready, PSS, RSS,
#          VMM overhead and private memory per VM, idle CPU, ping, teardown; Firecracker too
#          when FIRECRACKER_BIN is set (`density --counts 100,300,1000`; not part of `all`).
#   snapshot: create time and file sizes (Full, Diff), restore latency (load request, exec ->
#          first output) and clone fan-out (8, 100 at once) of an idle probe; Firecracker too
#          when FIRECRACKER_BIN is set (`snapshot [--clones 8,100] [--rounds 5]`; not in `all`).
#   run:   `cinder run IMAGE -- true` wall time (the busybox rootfs image), N runs each
#          (CINDER_BENCH_RUNS, default 3): cold boot (--no-snapshot) and restored from the run
#          template, plus the template's build time (in a cache of its own, so built fresh);
#          and what a throw-away copy of the image would add
#          (cinder run shares the read-only image under an overlay instead); then the image
#          step: build time (cold, cached) and ext4 size for an OCI layout of 10,000 files /
#          100 MiB (bench_image; no KVM). Not in `all`: on an emulated host each run is a full
#          Linux boot (`all` runs the image step only).
# Every cinder figure is measured with its seccomp filters (the default) and with
# --seccomp off, side by side.
# Usage: scripts/bench.sh [boot|api|io|vsock|seccomp|density|snapshot|run|all] [extra args for the driver]
#
# On a host whose kernel has no KVM device (scripts/kvm-lane.sh says "none") the drivers run
# inside the nested KVM lane (scripts/nested-kvm.sh), where cinder and QEMU both use the L1
# VM's KVM. Every instruction there is emulated: such figures compare cinder with QEMU on the
# same emulated machine, and one lane run with another, never with real hardware.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
what=${1:-all}
shift || true
case $what in
boot | api | io | vsock | seccomp | density | snapshot | run | all) ;;
*) echo "usage: scripts/bench.sh [boot|api|io|vsock|seccomp|density|snapshot|run|all] [args]" >&2; exit 2 ;;
esac
cargo build --release -p vmm -p cinder-tests -p cinder-image --bins >&2

lane=$(bash scripts/kvm-lane.sh)
run() {
	if [[ $lane == none ]]; then
		echo "[bench] no KVM in this host's kernel: running $1 in the nested KVM lane (emulated" \
			"hardware; compare only with other lane runs)"
		bash scripts/nested-kvm.sh -- "target/release/$1" "${@:2}"
	else
		"target/release/$1" "${@:2}"
	fi
}

# `cinder run IMAGE -- true`: the whole wall time (boot or restore, agent, exit, power-off),
# cold (--no-snapshot) and restored from the run template; and the template's build time.
median() {
	printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print "median " a[int((NR+1)/2)] " ms, min " a[1] " ms, max " a[NR] " ms"}'
}
bench_run() {
	local image n i t0 t1 ms rc cold=() restored=() cache line
	image=$(bash resources/guest/build-rootfs.sh | tail -n 1)/rootfs.ext4
	CINDER_AGENT_INITRD=$(bash resources/guest/build-agent-initrd.sh | tail -n 1)/initrd.cpio
	export CINDER_AGENT_INITRD
	n=${CINDER_BENCH_RUNS:-3}
	echo "[bench] cinder run: host kind $lane, image $image ($(du -h "$image" | cut -f1)), $n runs each"
	for ((i = 1; i <= n; i++)); do
		t0=$(date +%s%N)
		rc=0
		target/release/cinder run --no-snapshot "$@" "$image" -- true || rc=$?
		t1=$(date +%s%N)
		ms=$(((t1 - t0) / 1000000))
		cold+=("$ms")
		echo "cold run $i: ${ms} ms (exit $rc)"
	done
	# The template in a cache of its own: the first run builds it (its --verbose line says how
	# long), the next n restore from it.
	cache=$(mktemp -d "${TMPDIR:-/tmp}/cinder-bench-run-cache.XXXXXX")
	line=$(CINDER_CACHE=$cache target/release/cinder run --verbose "$@" "$image" -- true 2>&1 >/dev/null | grep 'built the run template' || true)
	echo "template: ${line:-not built (see cinder run --verbose)}"
	for ((i = 1; i <= n; i++)); do
		t0=$(date +%s%N)
		rc=0
		CINDER_CACHE=$cache target/release/cinder run "$@" "$image" -- true || rc=$?
		t1=$(date +%s%N)
		ms=$(((t1 - t0) / 1000000))
		restored+=("$ms")
		echo "restored run $i: ${ms} ms (exit $rc)"
	done
	rm -rf "$cache"
	echo "cinder run -- true, cold boot: $(median "${cold[@]}")"
	echo "cinder run -- true, restored:  $(median "${restored[@]}")"
	# The alternative to the overlay: a throw-away copy of the image per run.
	t0=$(date +%s%N)
	cp --reflink=never "$image" "${TMPDIR:-/tmp}/cinder-bench-run-copy.$$"
	sync -f "${TMPDIR:-/tmp}/cinder-bench-run-copy.$$"
	t1=$(date +%s%N)
	rm -f "${TMPDIR:-/tmp}/cinder-bench-run-copy.$$"
	echo "a throw-away copy of the image (cp + sync) would add $(((t1 - t0) / 1000000)) ms per run (the overlay adds none on the host)"
}

case $what in
boot) run bench_boot "$@" ;;
api) run bench_api "$@" ;;
io) run bench_io "$@" ;;
vsock) run bench_vsock "$@" ;;
seccomp) run bench_seccomp "$@" ;;
density) run bench_density "$@" ;;
snapshot) run bench_snapshot "$@" ;;
run)
	bench_run "$@"
	echo
	# No KVM in it: on the host even where the others go to the nested lane.
	target/release/bench_image
	;;
all)
	run bench_boot "$@"
	echo
	run bench_api
	echo
	run bench_io
	echo
	run bench_vsock
	echo
	run bench_seccomp
	echo
	target/release/bench_image
	;;
esac
