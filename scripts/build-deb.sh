#!/usr/bin/env bash
# make deb: builds secure-iot-gateway_<version>_<arch>.deb with dpkg-deb.
# Installs the plugin where Debian keeps Mosquitto plugins, the CLI, and examples; it activates
# nothing by itself (no conf.d snippet, no maintainer scripts, no service changes).
# Prints "built <file>" first.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ARCH=$(dpkg --print-architecture)
TRIPLET=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
# Oldest Mosquitto this project tests against (Debian 12, Ubuntu 22.04); plugin API v5 needs 2.0.
MIN_MOSQUITTO=2.0.11
cargo build --release
# dpkg-shlibdeps wants a source tree: debian/control plus the package staged in debian/<name>.
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
ROOT="$SRC/debian/secure-iot-gateway"
# DEBIAN/ is also how dpkg-shlibdeps recognises the package's root.
mkdir -p "$ROOT/DEBIAN"
printf 'Source: secure-iot-gateway\n\nPackage: secure-iot-gateway\nArchitecture: any\n' > "$SRC/debian/control"
make --no-print-directory install DESTDIR="$ROOT" PREFIX=/usr TRIPLET="$TRIPLET" >/dev/null
DOC="$ROOT/usr/share/doc/secure-iot-gateway"
cat > "$DOC/copyright" <<EOC
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: secure-iot-gateway
License: MIT or Apache-2.0
EOC
printf 'secure-iot-gateway (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- secure-iot-gateway <maintainers@localhost>  %s\n' \
	"$VERSION" "$VERSION" "$(date -R)" | gzip -9n > "$DOC/changelog.Debian.gz"
SO="$ROOT/usr/lib/$TRIPLET/secure_iot_gateway.so"
strip --strip-unneeded "$SO" "$ROOT/usr/bin/iotgw"
# Library dependencies as the binaries really need them (names and minimum versions from the
# shlibs/symbols files of the build system), not a hand-kept list.
SHLIBS=$(cd "$SRC" && dpkg-shlibdeps -O -e"debian/secure-iot-gateway/usr/lib/$TRIPLET/secure_iot_gateway.so" \
	-edebian/secure-iot-gateway/usr/bin/iotgw | sed -n 's/^shlibs:Depends=//p')
# OpenSSL 3's runtime is libssl3 on Debian 12 and libssl3t64 on Debian 13 (the 64-bit time_t
# transition, same soname). Name both so neither system depends on the other's Provides.
case "$SHLIBS" in *libssl3*) ;; *) echo "build-deb: no libssl3 dependency found in: $SHLIBS" >&2; exit 1;; esac
SHLIBS=$(echo "$SHLIBS" | sed -E 's/libssl3(t64)? (\([^)]*\))/libssl3 \2 | libssl3t64 \2/')
SIZE=$(du -sk "$ROOT/usr" | cut -f1)
cat > "$ROOT/DEBIAN/control" <<EOC
Package: secure-iot-gateway
Version: $VERSION
Architecture: $ARCH
Maintainer: secure-iot-gateway <maintainers@localhost>
Installed-Size: $SIZE
Depends: mosquitto (>= $MIN_MOSQUITTO), $SHLIBS
Section: net
Priority: optional
Description: Mosquitto plugin that authenticates every IoT device message
 Devices connect with mutual TLS and publish HMAC-signed JSON envelopes. The plugin
 checks each message inside the broker (identity, freshness, replay, signature), drops
 what fails, durably queues what passes and forwards it to an HTTP backend, and sends
 the backend's answer back to the device, signed. Includes the iotgw tool for the PKI
 and the device registry. Nothing is enabled by installing the package: see
 /usr/share/doc/secure-iot-gateway/README.md.
EOC
OUT="secure-iot-gateway_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group --build "$ROOT" "$OUT" >/dev/null
echo "built $OUT"
echo "  Depends: $(dpkg-deb -f "$OUT" Depends)"
dpkg-deb --contents "$OUT" | awk '{print "  " $6}'
