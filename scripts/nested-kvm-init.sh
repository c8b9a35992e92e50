#!/bin/busybox sh
# /init of the L1 VM built by scripts/nested-kvm.sh: loads KVM and the 9p modules, mounts the
# host's root read-only with a throw-away tmpfs overlay, runs the command the host left in
# the run directory inside that root, writes its exit status back and powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
stty -F /dev/console -onlcr 2>/dev/null

fail() {
	echo "[l1] error: $*"
	poweroff -f
}

run=$(sed -n 's/.*cinder_run=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$run" ] || fail "no cinder_run= on the kernel command line"
while read -r m; do
	insmod "/mods/$m" || fail "insmod $m failed"
done </mods/order
[ -c /dev/kvm ] || fail "/dev/kvm did not appear (no SVM in the emulated CPU?)"

mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose hostroot /host ||
	fail "cannot mount the host root over 9p"
mount -t tmpfs -o size=75% rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot ||
	fail "cannot mount the overlay root"
R=/newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 run "$R$run" ||
	fail "cannot mount the run directory"
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
ln -sf pts/ptmx $R/dev/ptmx 2>/dev/null
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs tmpfs $R/run
# Cgroups for the jailer's tests (tests/tests/jail.rs): a v1 hierarchy per controller the
# tests use, and the v2 one at unified/, as on the hosts. A kernel without one of them leaves
# it unmounted (the jail tests that need it then fail loudly; nothing else depends on it).
mount -t tmpfs -o mode=0755 cgroup $R/sys/fs/cgroup 2>/dev/null &&
	for c in memory cpu pids cpuset; do
		mkdir -p $R/sys/fs/cgroup/$c
		mount -t cgroup -o $c cgroup $R/sys/fs/cgroup/$c 2>/dev/null || rmdir $R/sys/fs/cgroup/$c
	done &&
	mkdir -p $R/sys/fs/cgroup/unified &&
	{ mount -t cgroup2 cgroup2 $R/sys/fs/cgroup/unified 2>/dev/null || true; }
ip link set lo up
hostname cinder-l1

if [ -e "$R$run/interactive" ]; then
	stty -F /dev/console onlcr sane 2>/dev/null
	chroot $R /bin/bash "$run/cmd.sh" </dev/console
else
	chroot $R /bin/bash "$run/cmd.sh" </dev/null
fi
echo $? >"$R$run/rc"
sync
poweroff -f
