#!/usr/bin/env bash
# Builds cinder (release) and a Linux guest (cached), then boots the guest with a serial
# console on this terminal. Ctrl-A x quits; `reboot -f` in the guest ends cinder with 0.
# Extra arguments go to cinder (for example --vcpus 2 --memory 256).
# Which guest depends on the host's kind (scripts/kvm-lane.sh):
#   hardware  the clean default guest, as users run it;
#   kvm-pvm   guest kernel mode runs in a slow emulator that cannot run a stock kernel: the
#             test-profile guest (resources/guest/README.md) with --cpu-template
#             no-pv-hypercalls, which reaches its shell in about 45 s;
#   none      no KVM in this host's kernel: the default guest inside the nested KVM lane
#             (scripts/nested-kvm.sh): same cinder, same guest, everything emulated, slow.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
kind=$(bash scripts/kvm-lane.sh)
cargo build --release -p vmm >&2
if [[ $kind == kvm-pvm ]]; then
	echo "[run] kvm-pvm host: its KVM emulates guest kernel mode and cannot run the clean default kernel; booting the test-profile guest (about 45 s to its shell)" >&2
	# Same build as scripts/test.sh: cinder hides the KVM PV features itself.
	guest=$(CINDER_TEST_KVM_PV_PATCH=0 bash resources/guest/build.sh test | tail -n 1)
	cmd=(target/release/cinder --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio"
		--cmdline "$(tr -d '\n' <"$guest/cmdline")" --cpu-template no-pv-hypercalls "$@")
else
	guest=$(bash resources/guest/build.sh default | tail -n 1)
	cmd=(target/release/cinder --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz"
		--cmdline "console=ttyS0 reboot=k panic=1 quiet" "$@")
fi
if [[ $kind == none ]]; then
	echo "[run] this host's kernel has no KVM: booting inside the nested KVM lane (slow)" >&2
	exec bash scripts/nested-kvm.sh --interactive --tcg multi --cpus 1 -- "${cmd[@]}"
fi
exec "${cmd[@]}"
