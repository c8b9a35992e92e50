#!/usr/bin/env bash
# Prints this host's kind, decided in one place for the scripts (tests/src/host.rs is the
# tests' twin and answers the same way):
#   hardware  /dev/kvm opens and guest kernel mode runs on the CPU (what users have);
#   kvm-pvm   /dev/kvm opens but is kvm-pvm's (/sys/module/kvm_pvm exists): guest user mode
#             runs natively, guest kernel mode in a slow emulator that cannot run a stock
#             Linux kernel (the test profile and the probe run there);
#   none      the host kernel has no KVM device at all (no "kvm" in /proc/misc): the tests
#             that boot guests under cinder run in the nested KVM lane (nested-kvm.sh);
#   broken    KVM exists but /dev/kvm cannot be opened: a setup error that must fail.
set -u
if [[ -r /dev/kvm && -w /dev/kvm ]] && exec 3<>/dev/kvm 2>/dev/null; then
	exec 3>&-
	if [[ -e /sys/module/kvm_pvm ]]; then
		echo kvm-pvm
	else
		echo hardware
	fi
elif ! grep -qw kvm /proc/misc 2>/dev/null; then
	echo none
else
	echo broken
fi
