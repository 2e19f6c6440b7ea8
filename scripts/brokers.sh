#!/bin/sh
# Builds the Mosquitto brokers the integration suite runs against, besides the system one:
#
#   target/brokers/2.0.18/mosquitto      2.0.18 (Ubuntu 24.04), websockets off (2.0 needs an
#                                        external libwebsockets for them)
#   target/brokers/2.1.2/mosquitto       2.1.2 with upstream's default WITH_WEBSOCKETS=ON: the
#                                        main loop then waits a fixed 100 ms per pass
#   target/brokers/2.1.2-nows/mosquitto  2.1.2 without websockets: an idle loop sleeps up to 24 h
#
# Sources, in order: $MOSQUITTO_VENDOR_DIR, <repo>/../shared/vendor, target/brokers/dl/ (an
# earlier download), then the GitHub archive of the release tag. Every archive is checked
# against scripts/mosquitto-releases.sha256. A finished build is kept (with a stamp of the
# archive checksum and the cmake flags) and not rebuilt.
#
# Usage: scripts/brokers.sh [--list]
#   --list  also print "<name> <path to mosquitto>" for each broker available, on stdout.
# Whatever cannot be had (no archive, no network, no cmake, a failed build) is skipped with one
# line on stderr; the script then still exits 0, so `make test` never fails for lack of them.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${BROKERS_DIR:-$ROOT/target/brokers}
SUMS=$ROOT/scripts/mosquitto-releases.sha256
LIST=0
[ "${1:-}" = "--list" ] && LIST=1

COMMON="-DCMAKE_BUILD_TYPE=Release -DWITH_CLIENTS=OFF -DWITH_APPS=OFF -DWITH_PLUGINS=OFF \
-DWITH_TESTS=OFF -DWITH_STATIC_LIBRARIES=OFF"
# name version extra-cmake-flags
VARIANTS="2.0.18|2.0.18|-DDOCUMENTATION=OFF -DWITH_CJSON=OFF -DWITH_WEBSOCKETS=OFF
2.1.2|2.1.2|-DWITH_DOCS=OFF
2.1.2-nows|2.1.2|-DWITH_DOCS=OFF -DWITH_WEBSOCKETS=OFF"

skipped=""
skip() { skipped="$skipped $1"; reason="$2"; }

expected_sum() { awk -v f="mosquitto-$1.tar.gz" '$2 == f { print $1 }' "$SUMS"; }

sum_ok() { # file version
	[ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$(expected_sum "$2")" ]
}

# Prints the path of a checksum-verified archive for the version, or nothing.
archive() {
	v=$1
	f=mosquitto-$v.tar.gz
	for d in ${MOSQUITTO_VENDOR_DIR:-} "$ROOT/../shared/vendor" "$OUT/dl"; do
		if [ -f "$d/$f" ]; then
			if sum_ok "$d/$f" "$v"; then echo "$d/$f"; return; fi
			echo "brokers: $d/$f does not match its sha256 in scripts/mosquitto-releases.sha256; not used" >&2
		fi
	done
	command -v curl >/dev/null 2>&1 || return
	mkdir -p "$OUT/dl"
	if curl -fsSL --connect-timeout 10 --max-time 120 -o "$OUT/dl/$f.part" \
		"https://github.com/eclipse/mosquitto/archive/refs/tags/v$v.tar.gz" 2>/dev/null; then
		if sum_ok "$OUT/dl/$f.part" "$v"; then
			mv "$OUT/dl/$f.part" "$OUT/dl/$f" && echo "$OUT/dl/$f"
			return
		fi
		echo "brokers: downloaded $f does not match its recorded sha256; not used" >&2
	fi
	rm -f "$OUT/dl/$f.part"
}

build() { # name version flags
	name=$1 v=$2 flags="$COMMON $3"
	dest=$OUT/$name
	stamp="$(expected_sum "$v") $flags"
	if [ -x "$dest/mosquitto" ] && [ "$(cat "$dest/stamp" 2>/dev/null)" = "$stamp" ]; then
		return 0
	fi
	if ! command -v cmake >/dev/null 2>&1; then skip "$name" "cmake is not installed (make deps)"; return 1; fi
	a=$(archive "$v")
	if [ -z "$a" ]; then skip "$name" "no release archive (no ../shared/vendor, download failed or checksum mismatch)"; return 1; fi
	work=$OUT/build/$name
	rm -rf "$work" "$dest"
	mkdir -p "$work" "$dest"
	echo "brokers: building mosquitto $name from $a" >&2
	# shellcheck disable=SC2086 # flags are word lists on purpose
	if tar xzf "$a" -C "$work" &&
		cmake -S "$work/mosquitto-$v" -B "$work/b" $flags >"$work/build.log" 2>&1 &&
		make -C "$work/b" -j"$(nproc)" mosquitto >>"$work/build.log" 2>&1; then
		cp "$work/b/src/mosquitto" "$dest/mosquitto"
		echo "$stamp" >"$dest/stamp"
		rm -rf "$work"
		return 0
	fi
	skip "$name" "build failed, see $work/build.log"
	return 1
}

echo "$VARIANTS" | {
	while IFS='|' read -r name v flags; do
		if build "$name" "$v" "$flags" && [ $LIST = 1 ]; then
			echo "$name $OUT/$name/mosquitto"
		fi
	done
	if [ -n "$skipped" ]; then
		echo "brokers: mosquitto$skipped skipped ($reason); tests run against the system mosquitto only" >&2
	fi
}
exit 0
