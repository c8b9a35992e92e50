#!/usr/bin/env bash
# Builds cinder (release) and the default guest (cached), then boots the guest with a serial
# console on this terminal. Ctrl-A x quits; `reboot -f` in the guest ends cinder with 0.
# Extra arguments go to cinder (for example --vcpus 2 --memory 256).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
guest=$(bash resources/guest/build.sh default | tail -n 1)
cargo build --release -p vmm >&2
exec target/release/cinder --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz" \
	--cmdline "console=ttyS0 reboot=k panic=1 quiet" "$@"
