#!/usr/bin/env bash
# Runs already-built test executables, as `cargo test` would, without cargo:
#
#   scripts/run-test-bins.sh LIST [LIBTEST-ARGS...]
#
# LIST has one line per executable: "<package directory> <executable>" (scripts/test.sh writes
# it from `cargo test --no-run --message-format=json`). Each executable runs in its package
# directory with LIBTEST-ARGS (a name filter, --test-threads, ...). Every executable runs even
# after a failure; the exit status is 1 when any failed, and the failing ones are listed.
set -uo pipefail
list=${1:?usage: run-test-bins.sh LIST [LIBTEST-ARGS...]}
shift
failed=()
n=0
while read -r dir exe; do
	[[ -n $exe ]] || continue
	n=$((n + 1))
	echo "[tests] $(basename "$exe") $*"
	if ! (cd "$dir" && "$exe" "$@"); then
		failed+=("$(basename "$exe")")
	fi
done <"$list"
if ((${#failed[@]})); then
	echo "[tests] FAILED in ${#failed[@]} of $n executables: ${failed[*]}"
	exit 1
fi
echo "[tests] all $n executables passed"
