#!/usr/bin/env bash
# Tests the .deb on this machine: install it, point the system mosquitto (its own
# /etc/mosquitto/mosquitto.conf, which reads conf.d) at the plugin with a conf.d snippet, and see
# a signed message accepted and a forged one refused. Removes the snippet and the package after.
# Needs root (it installs a package); skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "test-deb: skipped (needs root to install the package)"; exit 0; fi
[ -f /etc/mosquitto/mosquitto.conf ] || { echo "test-deb: no system mosquitto configuration" >&2; exit 1; }
./scripts/build-deb.sh >/dev/null
DEB=$(ls -t secure-iot-gateway_*.deb | head -1)
TRIPLET=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
WORK=$(mktemp -d /tmp/iotgw-debtest.XXXXXX); chmod 755 "$WORK"
SNIPPET=/etc/mosquitto/conf.d/zz-iotgw-debtest.conf
pid=
cleanup() {
	[ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
	rm -f "$SNIPPET"; rm -rf "$WORK"
	dpkg -r secure-iot-gateway >/dev/null 2>&1 || true
}
trap cleanup EXIT
dpkg -i "$DEB" >/dev/null
test -f "/usr/lib/$TRIPLET/secure_iot_gateway.so" && command -v iotgw >/dev/null
test -f /usr/share/doc/secure-iot-gateway/mosquitto.conf.example
if ls /etc/mosquitto/conf.d/ | grep -qi iotgw; then echo "the package activated something" >&2; exit 1; fi
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
iotgw init "$WORK/gw" --port "$PORT" --bind 127.0.0.1 >/dev/null
grep -q "^plugin /usr/lib/$TRIPLET/secure_iot_gateway.so" "$WORK/gw/mosquitto.conf"
SECRET=$(iotgw device add sensor_001 --dir "$WORK/gw" | sed -n 's/^secret (shown once, store it in the device): //p')
# The conf.d snippet: the listener and plugin lines of the generated configuration.
{ echo "log_dest stderr"; echo "set_tcp_nodelay true"
  sed -n '/^listener/,$p' "$WORK/gw/mosquitto.conf" | sed 's/^plugin_opt_backend_url .*/plugin_opt_backend_url none/'; } > "$SNIPPET"
iotgw check-config "$SNIPPET"
# The system's own configuration (it reads conf.d); the snippet's listener replaces the default.
mkdir -p /run/mosquitto && chown mosquitto: /run/mosquitto 2>/dev/null || true
mosquitto -c /etc/mosquitto/mosquitto.conf > "$WORK/broker.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
pub() { mosquitto_pub -h localhost -p "$PORT" -V mqttv5 -q 1 -d --cafile "$WORK/gw/ca.pem" \
	--cert "$WORK/gw/devices/sensor_001.pem" --key "$WORK/gw/devices/sensor_001.key" -t device/sensor_001/data -m "$1" 2>&1; }
GOOD=$(iotgw sign --device sensor_001 --secret "$SECRET" --payload '{"temperature":22.5}')
BAD=$(iotgw sign --device sensor_001 --secret wrong-secret-000000 --payload '{"temperature":22.5}')
out_good=$(pub "$GOOD"); out_bad=$(pub "$BAD")
echo "$out_good" | grep -qi "received PUBACK (Mid: [0-9]*, RC:\(0\|16\))" || { echo "no PUBACK for the signed message"; echo "$out_good"; cat "$WORK/broker.log"; exit 1; }
echo "$out_good" | grep -q "Not authorized" && { echo "signed message refused"; cat "$WORK/broker.log"; exit 1; }
echo "$out_bad" | grep -qi "RC:135" || { echo "forged message not refused"; echo "$out_bad"; exit 1; }
grep -q "secure-iot-gateway .* loaded" "$WORK/broker.log"
grep -q "rejected reason=signature" "$WORK/broker.log"
echo "$DEB installed, system mosquitto loaded it via $SNIPPET, signed message accepted, forged one refused"
echo "test-deb: 1 passed, 0 failed"
