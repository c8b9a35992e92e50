#!/usr/bin/env bash
# Build the guests' ext4 root filesystem image (busybox, the init, cinder-agent),
# cached by a hash of its inputs. Separate from build.sh so that it never changes
# the kernel builds' inputs.
#
#   resources/guest/build-rootfs.sh [--print-dir]
#
# Output: ${CINDER_CACHE:-$HOME/.cache/cinder}/guest/rootfs-<hash>/
#   rootfs.ext4    32 MiB ext4 image (made without mounting: mkfs.ext4 -d); /init
#                  is the initramfs's init, /sbin/init points to it
#   cinder-agent   the static vsock helper (resources/guest-agent), also /bin/cinder-agent
#   inputs, SHA256SUMS
# stdout carries only the output directory; progress goes to stderr.
# --print-dir: print the directory without building; exit 0 if built, 2 if not
# (the agent is still compiled: its binary is part of the hash).
#
# Environment: CINDER_CACHE (cache root), CINDER_ROOTFS_MIB (image size, default 32).
# Tests write to a copy of rootfs.ext4, never to the cached file.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE_ROOT=${CINDER_CACHE:-$HOME/.cache/cinder}
GUEST_CACHE=$CACHE_ROOT/guest
AGENT_SRC=$REPO/resources/guest-agent
AGENT_TARGET=$CACHE_ROOT/guest-agent/target
SIZE_MIB=${CINDER_ROOTFS_MIB:-32}
BUSYBOX=/bin/busybox
APT_PKGS=(busybox-static e2fsprogs)
export SOURCE_DATE_EPOCH=1767225600 LC_ALL=C

log() { printf '[rootfs] %s\n' "$*" >&2; }
die() { printf '[rootfs] error: %s\n' "$*" >&2; exit 1; }

ensure_packages() {
	local missing=() p
	for p in "${APT_PKGS[@]}"; do
		dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
	done
	((${#missing[@]} == 0)) && return 0
	local sudo=()
	if ((EUID != 0)); then
		sudo -n true 2>/dev/null || die "missing packages: ${missing[*]}; run as root or: apt-get install ${missing[*]}"
		sudo=(sudo -n)
	fi
	log "installing: ${missing[*]}"
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=1200 -qq update >&2
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=1200 \
		-y -qq --no-install-recommends install "${missing[@]}" >&2
}

# build_agent: compiles resources/guest-agent (static, its own .cargo/config.toml) and
# prints the binary's path. The outer cargo's variables must not leak in (a build script
# or test may call this script).
build_agent() {
	local v
	for v in $(env | sed -n 's/^\(CARGO_[A-Z0-9_]*\|RUSTFLAGS\|RUSTC_WRAPPER\|RUSTC_WORKSPACE_WRAPPER\)=.*/\1/p'); do
		[[ $v == CARGO_HOME ]] || unset "$v"
	done
	(cd "$AGENT_SRC" && cargo build --release --locked --quiet --target-dir "$AGENT_TARGET") >&2 ||
		die "building $AGENT_SRC failed"
	local bin=$AGENT_TARGET/x86_64-unknown-linux-gnu/release/cinder-agent
	[[ -x $bin ]] || die "$bin missing after the build"
	readelf -l "$bin" | grep -q INTERP && die "$bin is not static"
	echo "$bin"
}

inputs() {
	echo "rootfs size_mib=$SIZE_MIB"
	echo "busybox $(dpkg-query -W -f='${Version}' busybox-static)"
	echo "e2fsprogs $(dpkg-query -W -f='${Version}' e2fsprogs)"
	(cd "$HERE" && sha256sum build-rootfs.sh init/init init/fstab)
	echo "$(sha256sum <"$1" | cut -d' ' -f1)  cinder-agent"
}

# make_tree <dir> <agent>: the initramfs's layout, plus the agent and /sbin/init.
make_tree() {
	local t=$1 agent=$2 d applet
	readelf -l "$BUSYBOX" | grep -q INTERP && die "$BUSYBOX is not static (need busybox-static)"
	mkdir -p "$t"/{dev,proc,sys,run,mnt,etc,bin,usr}
	mkdir -m 1777 "$t/tmp"
	mkdir -m 0700 "$t/root"
	install -m 0644 "$HERE/init/fstab" "$t/etc/fstab"
	install -m 0755 "$BUSYBOX" "$t/bin/busybox"
	for applet in $("$BUSYBOX" --list); do
		[[ $applet == busybox ]] || ln -s busybox "$t/bin/$applet"
	done
	# The kernel runs /sbin/init on a disk root: make it our init, not busybox's.
	ln -sfn ../init "$t/bin/init"
	ln -s bin "$t/sbin"
	ln -s ../bin "$t/usr/bin"
	ln -s ../bin "$t/usr/sbin"
	install -m 0755 "$HERE/init/init" "$t/init"
	install -m 0755 "$agent" "$t/bin/cinder-agent"
	# No device nodes: the kernel mounts devtmpfs on /dev (DEVTMPFS_MOUNT) before init.
	find "$t" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}

build() {
	local out=$1 agent=$2 tree=$WORK/tree
	make_tree "$tree" "$agent"
	# Fixed UUID, hash seed and time: the same inputs give the same image. Inode tables and
	# journal are initialised here, not lazily by the (slow, emulated) guest kernel.
	E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -L cinder-root \
		-U 6c0f1e2d-3c4b-4a59-8d7e-000000c1d3e7 -m 0 \
		-E lazy_itable_init=0,lazy_journal_init=0,hash_seed=6c0f1e2d-3c4b-4a59-8d7e-000000c1d3e7,root_owner=0:0 \
		-d "$tree" "$out/rootfs.ext4" "${SIZE_MIB}M" >&2
	e2fsck -fn "$out/rootfs.ext4" >&2 || die "e2fsck found errors in the new image"
	install -m 0755 "$agent" "$out/cinder-agent"
}

main() {
	local print_only=0
	case ${1:-} in
	--print-dir) print_only=1 ;;
	'') ;;
	*) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
	esac
	ensure_packages
	local agent text dir
	agent=$(build_agent)
	text=$(inputs "$agent")
	dir=$GUEST_CACHE/rootfs-$(printf '%s\n' "$text" | sha256sum | cut -c1-16)
	if ((print_only)); then
		echo "$dir"
		[[ -d $dir ]] || exit 2
		exit 0
	fi
	[[ -d $dir ]] && { echo "$dir"; exit 0; }
	mkdir -p "$GUEST_CACHE"
	local lockfd
	exec {lockfd}>"$dir.lock"
	flock "$lockfd"
	[[ -d $dir ]] && { echo "$dir"; exit 0; }
	WORK=$(mktemp -d "$dir.tmp.XXXXXX")
	# shellcheck disable=SC2064
	trap "rm -rf '$WORK'" EXIT
	mkdir "$WORK/out"
	log "building $(basename "$dir")"
	build "$WORK/out" "$agent"
	printf '%s\n' "$text" >"$WORK/out/inputs"
	(cd "$WORK/out" && sha256sum -- * >SHA256SUMS)
	mv -T "$WORK/out" "$dir"
	log "built: $dir"
	echo "$dir"
}

main "$@"
