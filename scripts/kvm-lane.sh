#!/usr/bin/env bash
# Decides whether this host can run the KVM lane (tests that boot guests under cinder).
# Prints "yes" when /dev/kvm opens; "none" when the host kernel has no KVM device at all
# (no "kvm" misc device registered: nothing on this host could ever run a KVM guest);
# "broken" otherwise (KVM exists but /dev/kvm cannot be opened: a setup error that must fail).
set -u
if [[ -r /dev/kvm && -w /dev/kvm ]] && exec 3<>/dev/kvm 2>/dev/null; then
	exec 3>&-
	echo yes
elif ! grep -qw kvm /proc/misc 2>/dev/null; then
	echo none
else
	echo broken
fi
