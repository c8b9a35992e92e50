#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds the guests (cached) and cinder, runs
# formatting and lint checks, then every test. Exits non-zero when anything fails.
#
# Tests that boot guests under cinder need /dev/kvm and fail loudly without it. The one
# exception: on a host whose kernel has no KVM device at all (see scripts/kvm-lane.sh), those
# tests cannot run anywhere on that machine; they are then not started, and a banner says so
# at the start and the end of the run. Set CINDER_REQUIRE_KVM=1 to make that a failure too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

echo "[test] building guest artifacts (cached in ${CINDER_CACHE:-$HOME/.cache/cinder})" >&2
CINDER_GUEST_DIR=$(bash resources/guest/build.sh default | tail -n 1)
# cinder's --cpu-template no-pv-hypercalls replaces the profile's kvm.c patch.
CINDER_TEST_GUEST_DIR=$(CINDER_TEST_KVM_PV_PATCH=0 bash resources/guest/build.sh test | tail -n 1)
CINDER_ROOTFS_DIR=$(bash resources/guest/build-rootfs.sh | tail -n 1)
export CINDER_GUEST_DIR CINDER_TEST_GUEST_DIR CINDER_ROOTFS_DIR

echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "[test] probe guest: fmt and clippy" >&2
(cd resources/probe && cargo fmt -- --check && cargo clippy --release --quiet -- -D warnings)
echo "[test] building cinder" >&2
cargo build -p vmm

lane=$(bash scripts/kvm-lane.sh)
skip=()
banner=""
case $lane in
yes) ;;
none)
	if [[ ${CINDER_REQUIRE_KVM:-0} == 1 ]]; then
		echo "[test] error: CINDER_REQUIRE_KVM=1 and this host has no KVM" >&2
		exit 1
	fi
	banner="KVM LANE NOT RUN: this host's kernel registers no KVM device (/dev/kvm absent, no 'kvm' in /proc/misc). Tests that boot guests under cinder (names containing 'under_cinder') were not started; every other test ran."
	skip=(--skip under_cinder)
	;;
*)
	echo "[test] /dev/kvm exists in the kernel but cannot be opened: the KVM tests will fail loudly" >&2
	;;
esac
[[ -n $banner ]] && printf '\n*** %s ***\n\n' "$banner" >&2

status=0
cargo test --workspace -- "${skip[@]}" || status=$?

[[ -n $banner ]] && printf '\n*** %s ***\n\n' "$banner" >&2
exit $status
