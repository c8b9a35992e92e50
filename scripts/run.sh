#!/usr/bin/env bash
# Builds cinder (release) and the default guest (cached), then boots the guest with a serial
# console on this terminal. Ctrl-A x quits; `reboot -f` in the guest ends cinder with 0.
# Extra arguments go to cinder (for example --vcpus 2 --memory 256).
# On a host whose kernel has no KVM device (scripts/kvm-lane.sh), cinder runs inside the
# nested KVM lane (scripts/nested-kvm.sh): same cinder, same guest, everything emulated, slow.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
guest=$(bash resources/guest/build.sh default | tail -n 1)
cargo build --release -p vmm >&2
cmd=(target/release/cinder --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz"
	--cmdline "console=ttyS0 reboot=k panic=1 quiet" "$@")
if [[ $(bash scripts/kvm-lane.sh) == none ]]; then
	echo "[run] this host's kernel has no KVM: booting inside the nested KVM lane (slow)" >&2
	exec bash scripts/nested-kvm.sh --interactive --tcg multi --cpus 1 -- "${cmd[@]}"
fi
exec "${cmd[@]}"
