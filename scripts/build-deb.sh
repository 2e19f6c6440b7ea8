#!/usr/bin/env bash
# make deb: builds secure-iot-gateway_<version>_<arch>.deb with dpkg-deb.
# Installs the plugin where Debian keeps Mosquitto plugins, the CLI, and examples; it activates
# nothing by itself (no conf.d snippet, no service changes).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ARCH=$(dpkg --print-architecture)
TRIPLET=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
cargo build --release
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
make --no-print-directory install DESTDIR="$ROOT" PREFIX=/usr TRIPLET="$TRIPLET" >/dev/null
DOC="$ROOT/usr/share/doc/secure-iot-gateway"
cat > "$DOC/copyright" <<EOC
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: secure-iot-gateway
License: MIT or Apache-2.0
EOC
printf 'secure-iot-gateway (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- secure-iot-gateway <maintainers@localhost>  %s\n' \
	"$VERSION" "$VERSION" "$(date -R)" | gzip -9n > "$DOC/changelog.Debian.gz"
strip --strip-unneeded "$ROOT/usr/lib/$TRIPLET/secure_iot_gateway.so" "$ROOT/usr/bin/iotgw"
mkdir -p "$ROOT/DEBIAN"
SIZE=$(du -sk "$ROOT/usr" | cut -f1)
cat > "$ROOT/DEBIAN/control" <<EOC
Package: secure-iot-gateway
Version: $VERSION
Architecture: $ARCH
Maintainer: secure-iot-gateway <maintainers@localhost>
Installed-Size: $SIZE
Depends: mosquitto (>= 2.0), libc6, libssl3, libsqlite3-0, libgcc-s1
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
dpkg-deb --contents "$OUT" | awk '{print "  " $6}'
