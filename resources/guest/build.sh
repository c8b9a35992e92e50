#!/usr/bin/env bash
# Build cinder's Linux guest artifacts, cached by a hash of every input.
#
#   resources/guest/build.sh [--print-dir] [default|test|all]
#
# Output: ${CINDER_CACHE:-$HOME/.cache/cinder}/guest/<profile>-<hash>/
# stdout carries only the output directory (one line per profile, `all` prints
# default then test); progress and build logs go to stderr.
# --print-dir: print the directory without building; exit 0 if it is built,
# 2 if not.
#
# Environment:
#   CINDER_CACHE              cache root (default $HOME/.cache/cinder)
#   CINDER_JOBS               make -j (default: nproc)
#   CINDER_TEST_KVM_PV_PATCH  1 (default) applies patches/kvm-no-pv-ipi-sched-yield.patch
#                             to the test profile; 0 leaves it out (once cinder
#                             hides the PV IPI / sched-yield CPUID bits itself)
#   CINDER_KEEP_BUILD         1 keeps the temporary build tree on failure
#
# See README.md next to this script.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${CINDER_CACHE:-$HOME/.cache/cinder}
GUEST_CACHE=$CACHE_ROOT/guest
JOBS=${CINDER_JOBS:-$(nproc)}
KVM_PV_PATCH=${CINDER_TEST_KVM_PV_PATCH:-1}
KEEP_BUILD=${CINDER_KEEP_BUILD:-0}

LINUX_PKG=linux-source-6.1
LINUX_TARBALL=/usr/src/linux-source-6.1.tar.xz
BUSYBOX_PKG=busybox-static
BUSYBOX=/bin/busybox
APT_PKGS=("$LINUX_PKG" "$BUSYBOX_PKG" build-essential flex bison bc libelf-dev libssl-dev
	cpio xz-utils gzip binutils)

# Reproducible kernel builds (banner, utsname).
export KBUILD_BUILD_TIMESTAMP='Thu Jan  1 00:00:00 UTC 2026'
export KBUILD_BUILD_USER=cinder
export KBUILD_BUILD_HOST=cinder
export KBUILD_BUILD_VERSION=1
export SOURCE_DATE_EPOCH=1767225600
export LC_ALL=C

log() { printf '[guest] %s\n' "$*" >&2; }
die() { printf '[guest] error: %s\n' "$*" >&2; exit 1; }

usage() {
	sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
	exit "${1:-2}"
}

# --- packages ---

ensure_packages() {
	local missing=() pkg status
	declare -A ok=()
	while read -r pkg status; do
		[[ $status == ii* ]] && ok[$pkg]=1
	done < <(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${APT_PKGS[@]}" 2>/dev/null || true)
	for pkg in "${APT_PKGS[@]}"; do
		[[ -n ${ok[$pkg]:-} ]] || missing+=("$pkg")
	done
	((${#missing[@]} == 0)) && return 0
	local sudo=()
	if ((EUID != 0)); then
		command -v sudo >/dev/null && sudo -n true 2>/dev/null ||
			die "missing packages: ${missing[*]}; run as root or: apt-get install ${missing[*]}"
		sudo=(sudo -n)
	fi
	log "installing: ${missing[*]}"
	# DPkg::Lock::Timeout: wait for another apt/dpkg run instead of failing.
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=1200 \
		-qq update >&2
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=1200 \
		-y -qq --no-install-recommends install "${missing[@]}" >&2
}

# --- inputs and hash ---

# Build-only patch (both profiles): x86 KERNEL_UNCOMPRESSED for bzImage-uncompressed.
UNCOMPRESSED_PATCH=patches/x86-boot-uncompressed-bzimage.patch

# Patch files of the test profile, in application order (relative to $HERE).
test_patches() {
	local p
	echo "$UNCOMPRESSED_PATCH"
	for p in patches/0*.patch; do echo "$p"; done
	if [[ $KVM_PV_PATCH == 1 ]]; then
		echo patches/kvm-no-pv-ipi-sched-yield.patch
	fi
}

# Files (relative to $HERE) whose content goes into a profile's hash.
profile_files() {
	echo build.sh
	echo default.config
	echo init/init
	echo init/fstab
	if [[ $1 == default ]]; then
		echo "$UNCOMPRESSED_PATCH"
	fi
	if [[ $1 == test ]]; then
		echo test-profile.config
		echo test-profile.cmdline
		test_patches
	fi
}

# Everything that determines the output, as text; its sha256 names the directory.
# Paths are relative so that any clone of the repository shares the cache.
inputs() {
	local profile=$1
	echo "profile $profile"
	echo "linux-source $(dpkg-query -W -f='${Version}' "$LINUX_PKG")"
	echo "busybox $(dpkg-query -W -f='${Version}' "$BUSYBOX_PKG")"
	echo "gcc $(gcc -dumpfullversion)"
	echo "ld $(ld --version | head -n1)"
	(cd "$HERE" && profile_files "$profile" | xargs sha256sum)
}

# profile_dir <profile> [<inputs text>]
profile_dir() {
	local text hash
	text=${2:-$(inputs "$1")}
	hash=$(printf '%s\n' "$text" | sha256sum | cut -c1-16)
	echo "$GUEST_CACHE/$1-$hash"
}

# --- pristine kernel source, extracted once per package version ---

ensure_source() {
	local ver src tmp
	ver=$(dpkg-query -W -f='${Version}' "$LINUX_PKG")
	src=$GUEST_CACHE/src/linux-$ver
	if [[ ! -d $src ]]; then
		mkdir -p "$GUEST_CACHE/src"
		exec {srclock}>"$GUEST_CACHE/src/.lock-$ver"
		flock "$srclock"
		if [[ ! -d $src ]]; then
			log "extracting $LINUX_TARBALL"
			tmp=$(mktemp -d "$GUEST_CACHE/src/.tmp-$ver.XXXXXX")
			tar -C "$tmp" -xf "$LINUX_TARBALL"
			mv -T "$tmp/linux-source-6.1" "$src"
			rm -rf "$tmp"
		fi
		exec {srclock}>&-
	fi
	echo "$src"
}

# private_tree <dest>: a hard-linked copy of the pristine source (seconds, no
# extra space); apply_patches breaks the links of the files it touches.
private_tree() {
	local pristine
	pristine=$(ensure_source)
	cp -al "$pristine" "$1"
}

# apply_patches <srctree> <patch files relative to $HERE...>
apply_patches() {
	local src=$1 p f
	shift
	for p in "$@"; do
		for f in $(sed -n 's|^+++ b/||p' "$HERE/$p"); do
			cp "$src/$f" "$src/$f.cinder-tmp" && mv -f "$src/$f.cinder-tmp" "$src/$f"
		done
		log "  apply $p"
		patch -d "$src" -p1 --batch --forward --no-backup-if-mismatch -s -i "$HERE/$p" >&2 ||
			die "patch $p does not apply"
	done
}

# --- kernel helpers ---

# kmake <srctree> <objtree> <targets...>; output goes to $WORK/build.log.
kmake() {
	local src=$1 obj=$2
	shift 2
	make -C "$src" O="$obj" ARCH=x86_64 -j"$JOBS" "$@" >>"$WORK/build.log" 2>&1 ||
		{
			tail -n 40 "$WORK/build.log" >&2
			die "make $* failed (log above)"
		}
}

# configure <srctree> <objtree> <fragments...>: tinyconfig + fragments, then
# check the values of the LAST fragment in the final .config (a later fragment
# may switch off what an earlier one depends on, e.g. INPUT=n drops ATKBD).
configure() {
	local src=$1 obj=$2
	shift 2
	kmake "$src" "$obj" tinyconfig
	sh "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$@" >>"$WORK/build.log" 2>&1
	kmake "$src" "$obj" olddefconfig
	check_config "$obj/.config" "${@: -1}"
}

check_config() {
	local config=$1
	shift
	local bad
	bad=$(awk -v final="$config" '
		FILENAME != final {
			if (match($0, /^CONFIG_[A-Za-z0-9_]+=/)) {
				sym = substr($0, 1, RLENGTH - 1); want[sym] = substr($0, RLENGTH + 1)
			} else if ($0 ~ /^# CONFIG_[A-Za-z0-9_]+ is not set/) {
				want[$2] = "n"
			}
			next
		}
		match($0, /^CONFIG_[A-Za-z0-9_]+=/) { have[substr($0, 1, RLENGTH - 1)] = substr($0, RLENGTH + 1) }
		END {
			for (s in want) {
				h = (s in have) ? have[s] : "n"
				if (want[s] != h) printf "  %s: want %s, got %s\n", s, want[s], h
			}
		}' "$@" "$config")
	[[ -z $bad ]] || die "config values lost in $config:"$'\n'"$bad"
}

check_pvh_note() {
	# XEN_ELFNOTE_PHYS32_ENTRY (type 0x12) in the "Xen" note: the PVH entry.
	readelf -n "$1" | grep -A1 -E '^ +Xen ' | grep -qE '0x00000012|PHYS32_ENTRY' ||
		die "$1 has no PVH entry note"
}

# --- initramfs ---

# build_initramfs <srctree> <out.cpio>: busybox-static + our /init, uncompressed.
build_initramfs() {
	local src=$1 out=$2 list=$WORK/initramfs.list gen=$WORK/gen_init_cpio applet
	readelf -l "$BUSYBOX" | grep -q INTERP && die "$BUSYBOX is not static (need busybox-static)"
	gcc -O2 -o "$gen" "$src/usr/gen_init_cpio.c"
	{
		echo "dir /dev 0755 0 0"
		echo "nod /dev/console 0600 0 0 c 5 1"
		local d
		for d in proc sys run mnt; do echo "dir /$d 0755 0 0"; done
		echo "dir /tmp 1777 0 0"
		echo "dir /root 0700 0 0"
		echo "dir /etc 0755 0 0"
		echo "file /etc/fstab $HERE/init/fstab 0644 0 0"
		echo "dir /bin 0755 0 0"
		echo "file /bin/busybox $BUSYBOX 0755 0 0"
		for applet in $("$BUSYBOX" --list | sort); do
			[[ $applet == busybox ]] || echo "slink /bin/$applet busybox 0777 0 0"
		done
		echo "slink /sbin bin 0777 0 0"
		echo "dir /usr 0755 0 0"
		echo "slink /usr/bin ../bin 0777 0 0"
		echo "slink /usr/sbin ../bin 0777 0 0"
		echo "file /init $HERE/init/init 0755 0 0"
	} >"$list"
	"$gen" -t "$SOURCE_DATE_EPOCH" "$list" >"$out"
}

# --- profiles ---

build_default() {
	local out=$1 src=$WORK/src obj=$WORK/obj
	private_tree "$src"
	log "default: configure (tinyconfig + default.config)"
	configure "$src" "$obj" "$HERE/default.config"
	log "default: make bzImage (-j$JOBS, log: $WORK/build.log)"
	kmake "$src" "$obj" bzImage
	check_pvh_note "$obj/vmlinux"
	cp "$obj/vmlinux" "$out/vmlinux"
	cp "$obj/arch/x86/boot/bzImage" "$out/bzImage"
	cp "$obj/.config" "$out/config"

	# Same tree, compression flipped: only arch/x86/boot/compressed relinks.
	log "default: bzImage-uncompressed (same tree, KERNEL_UNCOMPRESSED)"
	apply_patches "$src" "$UNCOMPRESSED_PATCH"
	"$src/scripts/config" --file "$obj/.config" -d KERNEL_GZIP -e KERNEL_UNCOMPRESSED
	kmake "$src" "$obj" olddefconfig
	check_config "$obj/.config" <(echo CONFIG_KERNEL_UNCOMPRESSED=y)
	kmake "$src" "$obj" bzImage
	cmp -s "$obj/vmlinux" "$out/vmlinux" || log "warning: vmlinux changed with the compression flip"
	cp "$obj/arch/x86/boot/bzImage" "$out/bzImage-uncompressed"
	cp "$obj/.config" "$out/config-uncompressed"

	log "default: initramfs"
	build_initramfs "$src" "$out/initramfs.cpio"
	gzip -9 -n <"$out/initramfs.cpio" >"$out/initramfs.cpio.gz"
}

build_test() {
	local out=$1 src=$WORK/src obj=$WORK/obj
	local patches
	mapfile -t patches < <(cd "$HERE" && test_patches)
	log "test: patched source tree"
	private_tree "$src"
	apply_patches "$src" "${patches[@]}"
	log "test: configure (tinyconfig + default.config + test-profile.config)"
	configure "$src" "$obj" "$HERE/default.config" "$HERE/test-profile.config"
	log "test: make bzImage (-j$JOBS, log: $WORK/build.log)"
	kmake "$src" "$obj" bzImage
	check_pvh_note "$obj/vmlinux"
	cp "$obj/vmlinux" "$out/vmlinux"
	cp "$obj/arch/x86/boot/bzImage" "$out/bzImage-uncompressed"
	cp "$obj/.config" "$out/config"
	tr -s ' \n' ' ' <"$HERE/test-profile.cmdline" | sed 's/ $//' >"$out/cmdline"
	echo >>"$out/cmdline"
	log "test: initramfs"
	build_initramfs "$src" "$out/initramfs.cpio"
	printf '%s\n' "${patches[@]}" >"$out/patches"
}

# build_profile <profile>: prints the output directory; builds it if needed.
build_profile() {
	local profile=$1 dir start text
	# Inputs are read once, before building: the output records what it was built from.
	text=$(inputs "$profile")
	dir=$(profile_dir "$profile" "$text")
	if [[ -d $dir ]]; then
		echo "$dir"
		return 0
	fi
	mkdir -p "$GUEST_CACHE"
	local lockfd
	exec {lockfd}>"$dir.lock"
	if ! flock -n "$lockfd"; then
		log "$profile: another build of $(basename "$dir") is running; waiting"
		flock "$lockfd"
	fi
	if [[ -d $dir ]]; then
		exec {lockfd}>&-
		echo "$dir"
		return 0
	fi
	start=$SECONDS
	WORK=$(mktemp -d "$dir.tmp.XXXXXX")
	# shellcheck disable=SC2064
	trap "on_exit '$WORK'" EXIT
	mkdir "$WORK/out"
	"build_$profile" "$WORK/out"
	printf '%s\n' "$text" >"$WORK/out/inputs"
	(cd "$WORK/out" && sha256sum -- * >SHA256SUMS)
	mv -T "$WORK/out" "$dir"
	rm -rf "$WORK"
	trap - EXIT
	exec {lockfd}>&-
	log "$profile: built in $((SECONDS - start)) s: $dir"
	echo "$dir"
}

on_exit() {
	local rc=$? work=$1
	((rc == 0)) && return
	if [[ $KEEP_BUILD == 1 ]]; then
		log "build failed; tree kept in $work"
	else
		[[ -f $work/build.log ]] && cp "$work/build.log" "${work%.tmp.*}.failed.log" &&
			log "build failed; log: ${work%.tmp.*}.failed.log"
		rm -rf "$work"
	fi
}

# --- main ---

main() {
	local print_only=0 target=default
	while (($#)); do
		case $1 in
		--print-dir) print_only=1 ;;
		-h | --help) usage 0 ;;
		default | test | all) target=$1 ;;
		*) usage ;;
		esac
		shift
	done
	local profiles=("$target")
	[[ $target == all ]] && profiles=(default test)

	[[ $KVM_PV_PATCH == [01] ]] || die "CINDER_TEST_KVM_PV_PATCH must be 0 or 1, not '$KVM_PV_PATCH'"
	ensure_packages
	local p dir rc=0
	for p in "${profiles[@]}"; do
		if ((print_only)); then
			dir=$(profile_dir "$p")
			echo "$dir"
			[[ -d $dir ]] || rc=2
		else
			build_profile "$p"
		fi
	done
	return "$rc"
}

main "$@"; exit
