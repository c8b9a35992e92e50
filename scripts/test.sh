#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds the guests (cached) and cinder, runs
# formatting and lint checks, then every test. Exits non-zero when anything fails.
#
# Tests that boot guests under cinder (names containing "under_cinder") need /dev/kvm and
# fail loudly without it. On a host whose kernel has no KVM device at all (see
# scripts/kvm-lane.sh) they run inside a nested VM that has KVM (scripts/nested-kvm.sh).
# Every test executable runs even when one fails (--no-fail-fast); the run ends with the
# failing executables and tests and a "summary: N passed, M failed" line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

lane=$(bash scripts/kvm-lane.sh)
echo "[test] host kind: $lane" >&2

bash scripts/setup.sh

echo "[test] building guest artifacts (cached in ${CINDER_CACHE:-$HOME/.cache/cinder})" >&2
CINDER_GUEST_DIR=$(bash resources/guest/build.sh default | tail -n 1)
# cinder's --cpu-template no-pv-hypercalls replaces the profile's kvm.c patch.
CINDER_TEST_GUEST_DIR=$(CINDER_TEST_KVM_PV_PATCH=0 bash resources/guest/build.sh test | tail -n 1)
CINDER_ROOTFS_DIR=$(bash resources/guest/build-rootfs.sh | tail -n 1)
# `cinder run`'s guest: the agent (resources/guest-agent) as /init of a tiny initramfs.
CINDER_AGENT_INITRD=$(bash resources/guest/build-agent-initrd.sh | tail -n 1)/initrd.cpio
export CINDER_GUEST_DIR CINDER_TEST_GUEST_DIR CINDER_ROOTFS_DIR CINDER_AGENT_INITRD

echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "[test] probe guest: fmt and clippy" >&2
(cd resources/probe && cargo fmt -- --check && cargo clippy --release --quiet -- -D warnings)
echo "[test] guest agent: fmt and clippy" >&2
(cd resources/guest-agent && cargo fmt -- --check &&
	cargo clippy --release --quiet --target-dir "${CINDER_CACHE:-$HOME/.cache/cinder}/guest-agent/target" -- -D warnings)
echo "[test] building cinder and cinder-jailer" >&2
cargo build -p vmm -p cinder-jailer

status=0
log=$(mktemp /tmp/cinder-test-log.XXXXXX)
list=$(mktemp /tmp/cinder-test-bins.XXXXXX)
trap 'rm -f "$log" "$list"' EXIT
case $lane in
none)
	# No KVM in this host's kernel: every test that needs no KVM runs here, and the tests that
	# boot guests under cinder run inside a nested VM that has KVM (scripts/nested-kvm.sh).
	echo "[test] this host's kernel has no KVM device: tests that boot guests under cinder run in the nested KVM lane" >&2
	cargo test --workspace --no-fail-fast -- --skip under_cinder 2>&1 | tee -a "$log" || status=$?
	# One line per test executable: "<package dir> <executable>".
	cargo test --workspace --no-run --message-format=json 2>/dev/null |
		sed -n 's/.*"manifest_path":"\([^"]*\)\/Cargo.toml".*"profile":{[^}]*"test":true[^}]*}.*"executable":"\([^"]*\)".*/\1 \2/p' >"$list"
	[[ -s $list ]] || { echo "[test] error: found no test executables" >&2; exit 1; }
	bash scripts/nested-tests.sh "$list" 2>&1 | tee -a "$log" || status=$?
	;;
*)
	[[ $lane == broken ]] &&
		echo "[test] /dev/kvm exists in the kernel but cannot be opened: the KVM tests will fail loudly" >&2
	[[ $lane == kvm-pvm ]] &&
		echo "[test] kvm-pvm: guest kernel mode is emulated here; Linux guests under cinder use the test profile, QEMU runs the clean default guest on TCG" >&2
	cargo test --workspace --no-fail-fast 2>&1 | tee -a "$log" || status=$?
	;;
esac
echo "[test] host kind: $lane" >&2
bash scripts/test-summary.sh "$log"
exit $status
