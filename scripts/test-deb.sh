#!/usr/bin/env bash
# Tests the .deb on a Debian system: this machine (no arguments) or the Debian root given with
# --root DIR (scripts/test-deb-trixie.sh prepares one and mounts /proc and /dev in it). It:
#  - checks the package cannot enable itself: nothing under /etc, no maintainer scripts;
#  - installs it with apt, so its Depends must resolve there, and checks each dependency is met
#    by a package of that very name (not by accident through another package's Provides);
#  - points the system mosquitto (its own /etc/mosquitto/mosquitto.conf, which reads conf.d) at
#    the plugin with a conf.d snippet and sees a signed message accepted and a forged one refused;
#  - removes the snippet and the package, checks /etc/mosquitto is as the install left it, and
#    sees the system mosquitto start again from its own configuration and take a message.
# Needs root (it installs a package); skipped otherwise.
# shellcheck disable=SC2016 # dpkg-query formats are meant literally
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=test-deb ROOT='' DEB=''
while [ $# -gt 0 ]; do
	case $1 in
	--root) ROOT=$(realpath "$2"); shift 2 ;;
	--name) NAME=$2; shift 2 ;;
	--deb) DEB=$2; shift 2 ;;
	*) echo "usage: $0 [--root DIR] [--name NAME] [--deb FILE]" >&2; exit 2 ;;
	esac
done
if [ "$(id -u)" != 0 ]; then echo "$NAME: skipped (needs root to install the package)"; exit 0; fi
# Every command that acts on the system under test runs through in_root; files are reached from
# here as $ROOT/path.
IN=()
[ -n "$ROOT" ] && IN=(chroot "$ROOT" env PATH=/usr/sbin:/usr/bin:/sbin:/bin)
in_root() { "${IN[@]}" "$@"; }
export DEBIAN_FRONTEND=noninteractive
TRIPLET=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
SO=/usr/lib/$TRIPLET/secure_iot_gateway.so
SNIPPET=/etc/mosquitto/conf.d/zz-iotgw-debtest.conf

WORK_IN='' pid='' log='' ok=''
fail() {
	echo "$NAME: $*" >&2
	if [ -n "$log" ] && [ -f "$log" ]; then echo "--- broker log ($log):" >&2; cat "$log" >&2; fi
	exit 1
}
cleanup() {
	if [ -n "$pid" ]; then kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; fi
	rm -f "$ROOT$SNIPPET"
	[ -n "$WORK_IN" ] && rm -rf "$ROOT$WORK_IN"
	in_root dpkg -r secure-iot-gateway >/dev/null 2>&1 || true
	[ -n "$ok" ] || echo "$NAME: 0 passed, 1 failed"
}
trap cleanup EXIT

if [ -z "$DEB" ]; then DEB=$(./scripts/build-deb.sh | sed -n 's/^built //p'); fi
[ -f "$DEB" ] || fail "no package file '$DEB'"

# The package itself: no conffiles, nothing under /etc, no maintainer scripts. Installing it
# can then change nothing but its own files.
if dpkg-deb -c "$DEB" | awk '{print $6}' | grep -q '^\./etc/'; then fail "the package ships files under /etc"; fi
extra=$(dpkg-deb --ctrl-tarfile "$DEB" | tar -t | sed 's,^\./,,' | grep -vx -e '' -e control -e md5sums || true)
[ -z "$extra" ] || fail "the package has maintainer scripts or conffiles: $extra"

# The broker's configuration directory as seen by its owner: names, types, modes, owners, contents.
etc_state() {
	[ -d "$ROOT/etc/mosquitto" ] || return 0
	(cd "$ROOT/etc/mosquitto" && find . -printf '%p %y %m %U:%G\n' | sort && find . -type f -exec sha256sum {} + | sort)
}

WORK_IN=$(in_root mktemp -d /tmp/iotgw-debtest.XXXXXX)
WORK=$ROOT$WORK_IN
chmod 755 "$WORK"
cp "$DEB" "$WORK/"
etc_before=$(etc_state)
# apt, not dpkg -i: the Depends must resolve from this system's own archive (on a fresh Debian
# 13 root this pulls in its mosquitto). mosquitto-clients, for the test's mosquitto_pub, is named
# only where missing, so an installed one is never upgraded. The lock timeout rides out a
# concurrent apt.
clients=()
in_root dpkg-query -W -f='${db:Status-Status}' mosquitto-clients 2>/dev/null | grep -qx installed || clients=(mosquitto-clients)
in_root apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
	"$WORK_IN/$(basename "$DEB")" "${clients[@]}" > "$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; fail "apt could not install $DEB"; }
if [ ! -f "$ROOT$SO" ] || [ ! -x "$ROOT/usr/bin/iotgw" ]; then fail "plugin or iotgw not installed"; fi

# Each dependency (a group of alternatives) must be met by an installed package of one of the
# names it lists: libssl3 on Debian 12, libssl3t64 on Debian 13.
met=()
IFS=',' read -ra groups <<< "$(dpkg-deb -f "$DEB" Depends)"
for group in "${groups[@]}"; do
	found=
	IFS='|' read -ra alts <<< "$group"
	for alt in "${alts[@]}"; do
		pkg=$(echo "$alt" | sed 's/(.*//; s/[[:space:]]//g')
		st=$(in_root dpkg-query -W -f='${db:Status-Status} ${Version}\n' "$pkg" 2>/dev/null | head -1 || true)
		case $st in "installed "*) found="$pkg ${st#installed }"; break ;; esac
	done
	[ -n "$found" ] || fail "dependency '$group' is met by no installed package of that name"
	met+=("$found")
done
printf -v met_list '%s, ' "${met[@]}"; echo "Depends met by: ${met_list%, }"

etc_installed=$(etc_state)
if [ -n "$etc_before" ] && [ "$etc_before" != "$etc_installed" ]; then fail "installing the package changed /etc/mosquitto"; fi
for f in "$ROOT"/etc/mosquitto/conf.d/*; do
	b=$(basename "$f")
	case ${b,,} in *iotgw* | *secure*) fail "the package activated something: $f" ;; esac
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Starts the system's mosquitto with its own configuration; returns once $1 accepts connections.
start_broker() {
	log=$WORK/broker-$2.log
	mkdir -p "$ROOT/run/mosquitto"
	in_root chown mosquitto: /run/mosquitto 2>/dev/null || true
	# Not through the in_root function: backgrounded, a function runs in a subshell, $! would be
	# that subshell, and killing it left the broker running. chroot and env exec, so $! is the
	# broker itself.
	"${IN[@]}" mosquitto -c /etc/mosquitto/mosquitto.conf > "$log" 2>&1 &
	pid=$!
	for _ in $(seq 1 200); do
		kill -0 "$pid" 2>/dev/null || { pid=; fail "mosquitto exited at start-up"; }
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
		sleep 0.05
	done
	fail "mosquitto not listening on $1 after 10 s"
}
stop_broker() {
	kill -0 "$pid" 2>/dev/null || { pid=; fail "mosquitto died while in use"; }
	kill "$pid"; wait "$pid" 2>/dev/null || true; pid='' log=''
}

PORT=$(free_port)
in_root /usr/bin/iotgw init "$WORK_IN/gw" --port "$PORT" --bind 127.0.0.1 >/dev/null
grep -q "^plugin $SO" "$WORK/gw/mosquitto.conf" || fail "generated configuration does not load $SO"
SECRET=$(in_root /usr/bin/iotgw device add sensor_001 --dir "$WORK_IN/gw" | sed -n 's/^secret (shown once, store it in the device): //p')
# The conf.d snippet: the listener and plugin lines of the generated configuration.
{ echo "log_dest stderr"; echo "set_tcp_nodelay true"
  sed -n '/^listener/,$p' "$WORK/gw/mosquitto.conf" | sed 's/^plugin_opt_backend_url .*/plugin_opt_backend_url none/'; } > "$ROOT$SNIPPET"
in_root /usr/bin/iotgw check-config "$SNIPPET" >/dev/null || fail "iotgw check-config refused the snippet"
# The system's own configuration (it reads conf.d); the snippet's listener replaces the default.
start_broker "$PORT" plugin
pub() { in_root mosquitto_pub -h localhost -p "$PORT" -V mqttv5 -q 1 -d --cafile "$WORK_IN/gw/ca.pem" \
	--cert "$WORK_IN/gw/devices/sensor_001.pem" --key "$WORK_IN/gw/devices/sensor_001.key" -t device/sensor_001/data -m "$1" 2>&1 || true; }
GOOD=$(in_root /usr/bin/iotgw sign --device sensor_001 --secret "$SECRET" --payload '{"temperature":22.5}')
BAD=$(in_root /usr/bin/iotgw sign --device sensor_001 --secret wrong-secret-000000 --payload '{"temperature":22.5}')
out_good=$(pub "$GOOD"); out_bad=$(pub "$BAD")
echo "$out_good" | grep -qi "received PUBACK (Mid: [0-9]*, RC:\(0\|16\))" || fail "no PUBACK for the signed message: $out_good"
echo "$out_bad" | grep -qi "received PUBACK (Mid: [0-9]*, RC:135)" || fail "forged message not refused: $out_bad"
grep -q "secure-iot-gateway .* loaded" "$log" || fail "the plugin did not announce itself"
grep -q "rejected reason=signature" "$log" || fail "the refusal was not the plugin's signature check"
stop_broker
echo "$(basename "$DEB") installed, mosquitto $(in_root dpkg-query -W -f='${Version}' mosquitto) loaded it via $SNIPPET, signed message accepted, forged one refused"

# Removal: the administrator drops the snippet, the package goes, and the broker's own
# configuration must still start. A plain loopback listener on a free port stands in for the
# default 1883, which may be taken on a shared machine.
rm -f "$ROOT$SNIPPET"
in_root dpkg -r secure-iot-gateway > "$WORK/remove.log" 2>&1 || { cat "$WORK/remove.log" >&2; fail "dpkg -r failed"; }
if [ -e "$ROOT$SO" ] || [ -e "$ROOT/usr/bin/iotgw" ]; then fail "files left after dpkg -r"; fi
[ "$(etc_state)" = "$etc_installed" ] || fail "removing the package changed /etc/mosquitto"
PORT2=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\nlog_dest stderr\n' "$PORT2" > "$ROOT$SNIPPET"
start_broker "$PORT2" removed
out=$(in_root mosquitto_pub -h 127.0.0.1 -p "$PORT2" -V mqttv5 -q 1 -d -t after/remove -m hello 2>&1 || true)
echo "$out" | grep -qi "received PUBACK (Mid: [0-9]*, RC:\(0\|16\))" || fail "the broker did not take a message after removal: $out"
stop_broker
rm -f "$ROOT$SNIPPET"
echo "after dpkg -r: /etc/mosquitto unchanged, mosquitto starts from its own configuration and takes a message"
ok=1
echo "$NAME: 1 passed, 0 failed"
