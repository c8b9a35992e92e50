#!/usr/bin/env bash
# Runs the tests that boot guests under cinder ("under_cinder" in their names) in the nested
# KVM lane (scripts/nested-kvm.sh), for hosts without KVM:
#
#   scripts/nested-tests.sh LIST
#
# LIST: one line per test executable, "<package directory> <executable>" (see scripts/test.sh).
# Each executable that has such tests runs in a fresh L1 VM of its own, so a guest that wedges
# the emulated machine cannot take the next executable's tests with it. An executable whose
# run fails is run once more in a fresh L1 and both results are printed: on this lane every
# instruction of L1, cinder and the guest is emulated (QEMU TCG's SVM), and it has shown rare
# stalls that are not cinder's (a vCPU that stops making progress inside L1's KVM). A test
# that fails three times fails the run; one that failed before passing is named in a FLAKY
# banner at the end. Tests listed in scripts/nested-quarantine.txt are left out of those runs,
# run on their own afterwards, and reported in a QUARANTINED banner without failing the run.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
list=${1:?usage: nested-tests.sh LIST}
# Per executable: enough for the slowest (probe_cinder, whose 4-vCPU guests share two
# single-threaded-TCG CPUs, took 289, 388 and 588 s in three runs).
PER_BIN_TIMEOUT=${CINDER_NESTED_TIMEOUT:-1200}
# Per Linux-guest executable (each takes 30-40 s). On one L1 CPU the lane's fault can freeze
# L1 whole, and then only this timeout ends the run.
LINUX_BIN_TIMEOUT=${CINDER_NESTED_LINUX_TIMEOUT:-300}
# A quarantined test is only reported: it gets less time.
QUARANTINE_TIMEOUT=${CINDER_NESTED_QUARANTINE_TIMEOUT:-420}
# No retries once the lane has run this long (keeps CI inside its budget).
RETRY_BUDGET=${CINDER_NESTED_RETRY_BUDGET:-2700}

# QEMU's nested SVM has a different fault under each TCG threading mode (see nested-kvm.sh):
# - thread=multi with 2 L1 CPUs now and then corrupts the L2 guest's state, mostly around port
#   I/O: the polling probe "triple faults" or stalls mid serial line (vsock 100-connection
#   test: 5 of 6 runs failed); linux_net failed 3 of 7 runs, mid serial echo or stalled with
#   the guest's RIP in the module area, where it has no code. With 1 L1 CPU (one TCG thread,
#   so no race between L1's vCPUs) linux_net passed 9 of 10 and the whole Linux set passed
#   twice; the one failure froze L1 whole (no output, not even the test's own 300 s timeout),
#   so Linux executables get LINUX_BIN_TIMEOUT.
# - thread=single now and then leaves an interrupt-driven Linux guest spinning forever in the
#   kernel's spinlock slow path before init (linux_blk: 4 hangs in 10 runs; QEMU microvm in
#   cinder's place hung booting the same guest in 2 of 8 runs).
# So the Linux-guest executables (linux_*) run on multi-threaded TCG with 1 L1 CPU; the
# probe-guest ones run on single-threaded TCG with 2 L1 CPUs (their 4-vCPU guests crawl on one
# L1 CPU). The reruns absorb what is left. CINDER_L1_TCG / CINDER_L1_CPUS override all.
#
# lane_opts NAME [TIMEOUT]: nested-kvm.sh's options for executable NAME, as above; TIMEOUT,
# when given, replaces the executable's timeout.
lane_opts() {
	local tcg=single cpus=2 timeout=$PER_BIN_TIMEOUT
	if [[ $1 == linux_* ]]; then
		tcg=multi cpus=1 timeout=$LINUX_BIN_TIMEOUT
	fi
	echo --timeout "${2:-$timeout}" --tcg "${CINDER_L1_TCG:-$tcg}" --cpus "${CINDER_L1_CPUS:-$cpus}"
}

# Quarantined test names (first word of each non-comment line).
quarantine=()
while read -r t _; do
	[[ -z $t || $t == \#* ]] && continue
	quarantine+=("$t")
done <"$HERE/nested-quarantine.txt"

failed=()
flaky=()
qresults=()
n=0
one=$(mktemp /tmp/cinder-one.XXXXXX)
trap 'rm -f "$one"' EXIT
while read -r dir exe; do
	[[ -n $exe ]] || continue
	names=$("$exe" --list under_cinder 2>/dev/null | sed -n 's/: test$//p')
	skip=()
	held=()
	for q in "${quarantine[@]}"; do
		if grep -qx "$q" <<<"$names"; then
			skip+=(--skip "$q")
			held+=("$q")
		fi
	done
	count=$(($(grep -c . <<<"$names") - ${#held[@]}))
	((count > 0 || ${#held[@]} > 0)) || continue
	n=$((n + 1))
	name=$(basename "$exe")
	echo "$dir $exe" >"$one"
	ok=0
	((count > 0)) || ok=1
	for attempt in 1 2 3; do
		((count > 0)) || break
		echo "[nested] $name: $count test(s), attempt $attempt" >&2
		start=$(date +%s)
		# shellcheck disable=SC2046 # lane_opts prints words without spaces, to be split
		bash "$HERE/nested-kvm.sh" $(lane_opts "$name") -- \
			bash "$HERE/run-test-bins.sh" "$one" under_cinder "${skip[@]}" --test-threads=1
		rc=$?
		echo "[nested] $name: attempt $attempt exited $rc after $(($(date +%s) - start)) s" >&2
		if ((rc == 0)); then
			ok=1
			((attempt > 1)) && flaky+=("$name")
			break
		fi
		if ((SECONDS > RETRY_BUDGET)); then
			echo "[nested] $name: no retry, the lane has run ${SECONDS} s" >&2
			break
		fi
	done
	((ok)) || failed+=("$name")
	for q in "${held[@]}"; do
		echo "[nested] $name: quarantined test $q (report only)" >&2
		# shellcheck disable=SC2046 # as above
		if bash "$HERE/nested-kvm.sh" $(lane_opts "$name" "$QUARANTINE_TIMEOUT") -- \
			bash "$HERE/run-test-bins.sh" "$one" "$q" --exact --test-threads=1; then
			qresults+=("$q: passed")
		else
			qresults+=("$q: FAILED")
		fi
	done
done <"$list"

echo "[nested] $n executables with under_cinder tests" >&2
if ((${#flaky[@]})); then
	printf '\n*** FLAKY in the nested KVM lane (failed, then passed on a fresh L1): %s ***\n\n' \
		"${flaky[*]}" >&2
fi
if ((${#qresults[@]})); then
	printf '\n*** QUARANTINED in the nested KVM lane (see scripts/nested-quarantine.txt): %s ***\n\n' \
		"$(IFS=';'; echo "${qresults[*]}")" >&2
fi
if ((${#failed[@]})); then
	echo "[nested] FAILED: ${failed[*]}" >&2
	exit 1
fi
((n > 0)) || { echo "[nested] error: no under_cinder tests found" >&2; exit 1; }
echo "[nested] all passed" >&2
