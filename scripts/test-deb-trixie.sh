#!/usr/bin/env bash
# The package test (scripts/test-deb.sh) inside a Debian 13 "trixie" root: the .deb built here on
# Debian 12 is installed there with apt, pulling in Debian 13's own mosquitto, and that broker
# runs under chroot (loopback is shared with this machine).
#
# The root is made once with `debootstrap --variant=minbase trixie`, with the .debs the test
# installs downloaded into its apt cache, and kept as target/debootstrap-trixie.tar; each run
# unpacks a fresh copy, so a second run needs no network. Delete the tar to refresh it.
# Without root, debootstrap, or (for the first run) the mirror, one line says why it is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=test-deb-trixie
skip() { echo "$NAME: skipped ($*)"; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root for debootstrap, chroot and mount"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=target/debootstrap-trixie.tar
mkdir -p target


ROOT='' TMP=''
# /proc and /dev are mounted only while a run needs them; never delete through a mount.
unmount_all() {
	local m
	for m in dev proc; do
		if mountpoint -q "$1/$m"; then umount "$1/$m" 2>/dev/null || umount -l "$1/$m"; fi
	done
}
remove_root() {
	unmount_all "$1"
	if mountpoint -q "$1/dev" || mountpoint -q "$1/proc"; then
		echo "$NAME: $1 still has mounts; left in place" >&2
	else
		rm -rf --one-file-system "$1"
	fi
}
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
	[ -n "$ROOT" ] && remove_root "$ROOT"
	[ -n "$TMP" ] && remove_root "$TMP/root" && rm -rf "$TMP"
	return 0
}
trap cleanup EXIT
mount_root() {
	mount -t proc proc "$1/proc" && mount --bind /dev "$1/dev"
}

if [ ! -s "$CACHE" ]; then
	command -v debootstrap >/dev/null || skip "debootstrap is not installed (make deps installs it)"
	wget -q --spider --timeout=20 --tries=1 "$MIRROR/dists/trixie/InRelease" ||
		skip "no cached Debian 13 root ($CACHE) and $MIRROR is unreachable"
fi
DEB=$(./scripts/build-deb.sh | sed -n 's/^built //p')
[ -f "$DEB" ] || { echo "$NAME: build-deb.sh made no package" >&2; exit 1; }

if [ ! -s "$CACHE" ]; then
	echo "$NAME: making the Debian 13 root (debootstrap, once; cached in $CACHE)"
	TMP=$(mktemp -d target/debootstrap-trixie.XXXXXX)
	nice -n 10 debootstrap --variant=minbase trixie "$TMP/root" "$MIRROR" > "$TMP/debootstrap.log" 2>&1 ||
		{ tail -20 "$TMP/debootstrap.log" >&2; echo "$NAME: debootstrap failed with the mirror reachable" >&2; exit 1; }
	R=$TMP/root
	# What an installed system has and minbase lacks: services never start inside the root
	# (policy-rc.d), and localhost resolves (the broker certificate is for localhost).
	printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod 755 "$R/usr/sbin/policy-rc.d"
	printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$R/etc/hosts"
	cp /etc/resolv.conf "$R/etc/resolv.conf"
	mount_root "$R" || skip "cannot mount /proc and /dev in a chroot here"
	cp "$DEB" "$R/tmp/"
	# Everything the test installs, downloaded only: the test itself resolves and installs it.
	chroot "$R" apt-get clean
	chroot "$R" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --download-only --no-install-recommends \
		"/tmp/$(basename "$DEB")" mosquitto-clients > "$TMP/download.log" 2>&1 ||
		{ cat "$TMP/download.log" >&2; echo "$NAME: downloading mosquitto for Debian 13 failed" >&2; exit 1; }
	rm -f "$R/tmp/$(basename "$DEB")"
	unmount_all "$R"
	tar -C "$R" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' -cf "$CACHE.tmp.$$" .
	mv "$CACHE.tmp.$$" "$CACHE"
	remove_root "$R"; rm -rf "$TMP"; TMP=''
fi

ROOT=$(mktemp -d "${TMPDIR:-/tmp}/iotgw-trixie.XXXXXX")
chmod 755 "$ROOT"
tar -C "$ROOT" --numeric-owner -xf "$CACHE"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mount_root "$ROOT" || skip "cannot mount /proc and /dev in a chroot here"
grep -q '^VERSION_ID="13"' "$ROOT/etc/os-release" || { echo "$NAME: $CACHE is not a Debian 13 root" >&2; exit 1; }
rc=0
./scripts/test-deb.sh --root "$ROOT" --name "$NAME" --deb "$DEB" || rc=$?
exit "$rc"
