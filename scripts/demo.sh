#!/usr/bin/env bash
# make demo: a whole secured gateway on this machine, end to end.
#   - `iotgw init` into ./demo (CA, broker cert, registry, mosquitto.conf), three devices
#   - mosquitto with the plugin, the demo backend, three simulated devices
#   - then the four attacks of the original README, each refused by the gateway
# Ctrl-C stops everything this script started. DEMO_ROUNDS=N (default 0 = until Ctrl-C)
# makes it stop by itself after N rounds of readings.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/iotgw
PLUGIN=$PWD/target/release/libsecure_iot_gateway.so
DIR=${DEMO_DIR:-$PWD/demo}
MQTT_PORT=${DEMO_MQTT_PORT:-18883}
HTTP_PORT=${DEMO_HTTP_PORT:-5000}
ROUNDS=${DEMO_ROUNDS:-0}
DEVICES=(sensor_001 sensor_002 sensor_003)
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then B=$'\e[1m'; G=$'\e[32m'; R=$'\e[31m'; Y=$'\e[33m'; C=$'\e[36m'; N=$'\e[0m'; else B=; G=; R=; Y=; C=; N=; fi
say() { printf '%s==> %s%s\n' "$B" "$*" "$N"; }

pids=()
# Every process this script started, children first (pipelines, process substitutions).
descendants() { local c; for c in $(pgrep -P "$1"); do descendants "$c"; echo "$c"; done; }
cleanup() {
	trap - EXIT INT TERM
	local all; all=$(descendants $$)
	[ -n "$all" ] && kill $all 2>/dev/null || true
	sleep 0.3
	all=$(descendants $$)
	[ -n "$all" ] && kill -9 $all 2>/dev/null || true
	wait 2>/dev/null || true
	say "stopped everything the demo started (logs kept in $DIR)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Long steps run in the background and are waited for: a trapped Ctrl-C interrupts `wait` at
# once, while bash would hold it until a foreground command finished.
run() { "$@" & wait $!; }

for port in "$MQTT_PORT" "$HTTP_PORT"; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
		echo "port $port is busy; set DEMO_MQTT_PORT / DEMO_HTTP_PORT" >&2; exit 1
	fi
done

say "1/5 iotgw init $DIR (CA, broker certificate, registry, ACL, mosquitto.conf)"
rm -rf "$DIR"
"$BIN" init "$DIR" --port "$MQTT_PORT" --bind 127.0.0.1 --plugin "$PLUGIN" \
	--backend-url "http://127.0.0.1:$HTTP_PORT/device/{device_id}/data" | sed -u 's/^/    /'
for d in "${DEVICES[@]}"; do "$BIN" device add "$d" --dir "$DIR" | sed -u 's/^/    /'; done
"$BIN" check-config "$DIR/mosquitto.conf" | sed -u 's/^/    /'

say "2/5 demo backend on 127.0.0.1:$HTTP_PORT"
"$BIN" backend --listen "127.0.0.1:$HTTP_PORT" > >(sed -u "s/^/    ${Y}/;s/\$/${N}/") 2>&1 &
pids+=($!)

say "3/5 mosquitto with the plugin on 127.0.0.1:$MQTT_PORT (log: $DIR/broker.log)"
mosquitto -c "$DIR/mosquitto.conf" > "$DIR/broker.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
	if (exec 3<>"/dev/tcp/127.0.0.1/$MQTT_PORT") 2>/dev/null; then break; fi
	kill -0 "${pids[-1]}" 2>/dev/null || { cat "$DIR/broker.log"; exit 1; }
	sleep 0.05
done
# The gateway's own verdicts, one line per check, as the broker logs them.
tail -n +1 -F "$DIR/broker.log" 2>/dev/null | grep --line-buffered 'secure-iot-gateway' \
	| sed -u "s/.*secure-iot-gateway/    ${C}[gateway]${N}/;s/rejected reason=\([a-z_]*\)/${R}rejected reason=\1${N}/" &
pids+=($!)
sleep 0.3

say "4/5 three devices send signed readings; the backend answers; signed responses come back"
run bash -c '"$@" | sed -u "s/^/    /"' _ "$BIN" simulate --dir "$DIR" --port "$MQTT_PORT" --interval 1 --count 3 \
	--device sensor_001 --device sensor_002 --device sensor_003

say "5/5 the four attacks: tampered payload, replay, old timestamp, wrong identity"
run bash -c '"$@" 2>&1 | sed -u "s/^/    /"' _ "$BIN" simulate --dir "$DIR" --port "$MQTT_PORT" --count 0 --interval 0 \
	--device sensor_001 --device sensor_002 --attack tamper --attack replay --attack old-timestamp --attack wrong-identity || true
sleep 0.5
printf '%s\n' "${G}demo: every reading accepted and answered, every attack refused.${N}"

if [ "$ROUNDS" = 0 ]; then
	say "devices keep reporting every 5 s; Ctrl-C stops everything"
	run bash -c '"$@" | sed -u "s/^/    /"' _ "$BIN" simulate --dir "$DIR" --port "$MQTT_PORT" --interval 5 --forever \
		--device sensor_001 --device sensor_002 --device sensor_003
else
	run bash -c '"$@" | sed -u "s/^/    /"' _ "$BIN" simulate --dir "$DIR" --port "$MQTT_PORT" --interval 1 --count "$ROUNDS" \
		--device sensor_001 --device sensor_002 --device sensor_003
fi
