#!/usr/bin/env bash
# End-to-end throughput on loopback: mosquitto + plugin + mutual TLS + HTTP sink.
#   scripts/bench-e2e.sh [DEVICES] [MESSAGES_PER_DEVICE]
# Bounded (DEVICES x MESSAGES messages), loopback only, stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-4}
PER=${2:-25000}
cargo build -q --release
cargo build -q --release -p iotgw --example loadgen
DIR=$(mktemp -d /tmp/iotgw-bench.XXXXXX)
chmod 755 "$DIR"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MQTT=$(free_port); SINK=$(free_port)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
target/release/iotgw init "$DIR/gw" --port "$MQTT" --bind 127.0.0.1 --plugin "$PWD/target/release/libsecure_iot_gateway.so" \
	--backend-url "http://127.0.0.1:$SINK/device/{device_id}/data" >/dev/null
for i in $(seq 0 $((DEVICES - 1))); do target/release/iotgw device add "$(printf 'bench_%03d' "$i")" --dir "$DIR/gw" >/dev/null; done
# Plenty of replay room: the burst is far above the default 3.3 msg/s per device.
sed -i "s/^plugin_opt_service_identities .*/&\nplugin_opt_replay_cache_size 10000000\nplugin_opt_spool_max_bytes 8589934592/" "$DIR/gw/mosquitto.conf"
[ -n "${WORKERS:-}" ] && echo "plugin_opt_workers $WORKERS" >> "$DIR/gw/mosquitto.conf"
# NOFWD=1: the plugin validates and records, but forwarding is off (backend_url none).
if [ -n "${NOFWD:-}" ]; then
	sed -i "s|^plugin_opt_backend_url .*|plugin_opt_backend_url none|" "$DIR/gw/mosquitto.conf"
	SINK=0
fi
# BASELINE=1: the same broker, TLS and load without the plugin (the ceiling to compare with).
if [ -n "${BASELINE:-}" ]; then
	sed -i '/^plugin/d' "$DIR/gw/mosquitto.conf"
	echo "user root" >> "$DIR/gw/mosquitto.conf"
	printf 'user bench_000\ntopic readwrite #\n' > "$DIR/gw/acl"
	for i in $(seq 1 $((DEVICES - 1))); do printf 'user %s\ntopic readwrite #\n' "$(printf 'bench_%03d' "$i")" >> "$DIR/gw/acl"; done
	SINK=0
fi
# PIN=1: broker (and its workers) on CPU 0, load generator and sink on CPU 1, so the gateway's
# own capacity on one dedicated core is measured.
BROKER_PIN=; LOAD_PIN=
if [ -n "${PIN:-}" ]; then BROKER_PIN="taskset -c 0"; LOAD_PIN="taskset -c 1"; fi
${MOSQUITTO_ENV:-} $BROKER_PIN ${MOSQUITTO:-mosquitto} -c "$DIR/gw/mosquitto.conf" > "$DIR/broker.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$MQTT") 2>/dev/null && break; sleep 0.05; done
cpu0=$(awk '{print $14+$15}' /proc/$pid/stat)
# PERF=1: sample the broker thread while the load runs (report in $PERF_OUT).
if [ -n "${PERF:-}" ]; then perf record -F 2000 -g -t "$pid" -o "${PERF_OUT:-/tmp/iotgw-perf.data}" >/dev/null 2>&1 & perfpid=$!; fi
$LOAD_PIN target/release/examples/loadgen "$DIR/gw" "$MQTT" "$SINK" "$DEVICES" "$PER"
cpu1=$(awk '{print $14+$15}' /proc/$pid/stat)
if [ -n "${PERF:-}" ]; then kill -INT "$perfpid"; wait "$perfpid" 2>/dev/null || true; fi
for t in /proc/$pid/task/*; do
	printf '  thread %-18s %6d ms\n' "$(cat "$t/comm")" $(( $(awk '{print $14+$15}' "$t/stat") * 1000 / $(getconf CLK_TCK) ))
done | sort -k3 -n -r | head -8
echo "broker process CPU: $(( (cpu1 - cpu0) * 1000 / $(getconf CLK_TCK) )) ms (all threads), $(grep VmHWM /proc/$pid/status)"
