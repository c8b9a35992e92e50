#!/usr/bin/env bash
# Summarises a test log (cargo test's output, and the nested lane's when it ran): the failing
# test executables and tests, then one closing line "summary: N passed, M failed" added up
# over every "test result:" line (in the nested lane, each attempt of a retried executable
# counts). Usage: scripts/test-summary.sh LOG
set -uo pipefail
log=${1:?usage: test-summary.sh LOG}
awk '
	# cargo: "     Running tests/api.rs (target/debug/deps/api-0123abcd)"
	/^ *Running / { exe = $0; sub(/^ *Running /, "", exe); sub(/ \(.*/, "", exe) }
	/^ *Doc-tests / { exe = "doc-tests of " $2 }
	# run-test-bins.sh (nested lane): "[tests] probe_cinder-0123abcd under_cinder ..."
	/^\[tests\] [^ ]+ / && $2 !~ /^(all|FAILED)$/ { exe = $2 }
	/^test .* \.\.\. FAILED$/ {
		t = $2; failed_tests[exe] = failed_tests[exe] " " t; bad[exe] = 1
	}
	/^test result: / {
		for (i = 1; i <= NF; i++) {
			if ($(i) ~ /^passed;?$/) p += $(i - 1)
			if ($(i) ~ /^failed;?$/) { f += $(i - 1); if ($(i - 1) > 0) bad[exe] = 1 }
		}
	}
	# an executable that died without a result line (signal, abort, timeout)
	/process didn.t exit successfully/ { bad[exe] = 1 }
	END {
		n = 0
		for (e in bad) n++
		if (n) {
			print "[test] failing test executables (" n "):"
			for (e in bad) print "  " e ":" (e in failed_tests ? failed_tests[e] : " (no test result line: it crashed or timed out)")
		}
		printf "summary: %d passed, %d failed\n", p, f
	}
' "$log"
