#!/usr/bin/env bash
# Build the initramfs of `cinder run` guests: the guest agent (resources/guest-agent) as
# /init and nothing else, cached by a hash of its inputs like the other guest builds.
#
#   resources/guest/build-agent-initrd.sh
#
# Output: ${CINDER_CACHE:-$HOME/.cache/cinder}/guest/agent-initrd-<hash>/
#   initrd.cpio    newc cpio: /init (the static agent, init role as PID 1), /dev, /proc,
#                  /sys, /mnt; the agent mounts the image (/dev/vda) itself
#   inputs, SHA256SUMS
# stdout carries only the output directory; progress goes to stderr. `cinder run` finds
# the newest one in the cache, or takes --agent-initrd FILE (or $CINDER_AGENT_INITRD).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE_ROOT=${CINDER_CACHE:-$HOME/.cache/cinder}
GUEST_CACHE=$CACHE_ROOT/guest
AGENT_SRC=$REPO/resources/guest-agent
# Its own target directory per source tree: build-rootfs.sh (and other checkouts) build the
# agent into the shared one, and whichever builds last would otherwise decide which agent
# binary lands here (seen: a checkout without the init role, a guest panic at boot).
AGENT_TARGET=$CACHE_ROOT/guest-agent/target-initrd-$(printf '%s' "$AGENT_SRC" | sha256sum | cut -c1-12)
export SOURCE_DATE_EPOCH=1767225600 LC_ALL=C

log() { printf '[agent-initrd] %s\n' "$*" >&2; }
die() { printf '[agent-initrd] error: %s\n' "$*" >&2; exit 1; }

command -v cpio >/dev/null || die "cpio missing: apt-get install cpio (scripts/setup.sh)"

# The outer cargo's variables must not leak in (a build script or test may call this).
for v in $(env | sed -n 's/^\(CARGO_[A-Z0-9_]*\|RUSTFLAGS\|RUSTC_WRAPPER\|RUSTC_WORKSPACE_WRAPPER\)=.*/\1/p'); do
	[[ $v == CARGO_HOME ]] || unset "$v"
done
(cd "$AGENT_SRC" && cargo build --release --locked --quiet --target-dir "$AGENT_TARGET") >&2 ||
	die "building $AGENT_SRC failed"
agent=$AGENT_TARGET/x86_64-unknown-linux-gnu/release/cinder-agent
[[ -x $agent ]] || die "$agent missing after the build"
readelf -l "$agent" | grep -q INTERP && die "$agent is not static"

text=$(
	echo "agent-initrd"
	(cd "$HERE" && sha256sum build-agent-initrd.sh)
	echo "$(sha256sum <"$agent" | cut -d' ' -f1)  cinder-agent"
)
dir=$GUEST_CACHE/agent-initrd-$(printf '%s\n' "$text" | sha256sum | cut -c1-16)
[[ -f $dir/initrd.cpio ]] && { echo "$dir"; exit 0; }
mkdir -p "$GUEST_CACHE"
exec {lockfd}>"$dir.lock"
flock "$lockfd"
[[ -f $dir/initrd.cpio ]] && { echo "$dir"; exit 0; }
WORK=$(mktemp -d "$dir.tmp.XXXXXX")
# shellcheck disable=SC2064
trap "rm -rf '$WORK'" EXIT
t=$WORK/tree
mkdir -p "$t"/{dev,proc,sys,mnt} "$WORK/out"
install -m 0755 "$agent" "$t/init"
find "$t" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$t" && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0 --reproducible) >"$WORK/out/initrd.cpio"
printf '%s\n' "$text" >"$WORK/out/inputs"
(cd "$WORK/out" && sha256sum -- * >SHA256SUMS)
mv -T "$WORK/out" "$dir"
log "built: $dir"
echo "$dir"
