#!/usr/bin/env bash
# Boot a built guest under QEMU microvm (an independent oracle for cinder).
#
#   resources/guest/qemu-boot.sh <output-dir> [kernel-file] [extra kernel args...]
#
# kernel-file: vmlinux (default), bzImage or bzImage-uncompressed.
# Uses KVM on a hardware KVM host, otherwise TCG (on a kvm-pvm host too: its
# emulated guest kernel mode cannot run a stock kernel and is not a faithful
# CPU for the test profile; see TESTING.md). Uses the dir's `cmdline`
# file if there is one, else the default console line. Serial output goes to
# stdout; the wall time from QEMU start to the CINDER-INIT marker and to QEMU's
# exit goes to stderr. QEMU_SMP (default 1), QEMU_MEM (default 256),
# QEMU_TIMEOUT (default 300 s), QEMU_INITRD (default initramfs.cpio) tune the
# run. QEMU_EXTRA adds QEMU arguments (e.g. virtio-*-device).
# `acpi=off`: as with cinder, the guest gets an MP table (from qboot) and QEMU
# puts its virtio-mmio devices on the kernel command line. `-device i8042`:
# microvm has none, and `reboot=k` needs it to reset (ending QEMU) reliably.
set -euo pipefail

dir=${1:?usage: qemu-boot.sh <output-dir> [kernel-file] [extra kernel args...]}
kernel=${2:-vmlinux}
shift $(($# >= 2 ? 2 : 1))

initrd=$dir/${QEMU_INITRD:-initramfs.cpio}
if [[ -f $dir/cmdline ]]; then
	cmdline=$(<"$dir/cmdline")
else
	cmdline='console=ttyS0 reboot=k panic=-1'
fi
cmdline="$cmdline $*"

accel=(-accel tcg -cpu max)
if [[ -r /dev/kvm && -w /dev/kvm && ! -e /sys/module/kvm_pvm ]]; then
	accel=(-accel kvm -cpu host,-arch-capabilities)
fi

start=$(date +%s.%N)
set +e
timeout "${QEMU_TIMEOUT:-300}" qemu-system-x86_64 \
	-M microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off -bios /usr/share/qemu/qboot.rom "${accel[@]}" \
	-smp "${QEMU_SMP:-1}" -m "${QEMU_MEM:-256}" -nodefaults -nographic -no-reboot \
	-device i8042 ${QEMU_EXTRA:-} -serial stdio -kernel "$dir/$kernel" -initrd "$initrd" -append "$cmdline" </dev/null |
	while IFS= read -r line; do
		printf '%s\n' "$line"
		if [[ $line == CINDER-INIT\ ok* ]]; then
			printf '[qemu-boot] marker after %.2f s\n' "$(echo "$(date +%s.%N) - $start" | bc)" >&2
		fi
	done
rc=${PIPESTATUS[0]}
set -e
printf '[qemu-boot] qemu exited with %d after %.2f s\n' "$rc" "$(echo "$(date +%s.%N) - $start" | bc)" >&2
exit "$rc"
