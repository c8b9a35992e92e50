#!/usr/bin/env bash
# Benchmarks: builds cinder and the benchmark drivers (release) and prints reports.
#   boot: exec -> first serial byte, exec -> probe exit, peak RSS; cinder vs QEMU microvm.
#   api:  exec -> API socket ready, request round trip, InstanceStart -> first serial byte.
#   io:   virtio-blk IOPS / MiB/s and virtio-net packets/s / Gbit/s measured by the probe.
# Usage: scripts/bench.sh [boot|api|io|all] [extra args for the driver]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
what=${1:-all}
shift || true
cargo build --release -p vmm -p cinder-tests --bins >&2
case $what in
boot) target/release/bench_boot "$@" ;;
api) target/release/bench_api "$@" ;;
io) target/release/bench_io "$@" ;;
all)
	target/release/bench_boot "$@"
	echo
	target/release/bench_api
	echo
	target/release/bench_io
	;;
*) echo "usage: scripts/bench.sh [boot|api|io|all] [args]" >&2; exit 2 ;;
esac
