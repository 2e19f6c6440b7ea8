# secure-iot-gateway — see README.md.
PREFIX     ?= /usr
DESTDIR    ?=
TRIPLET    := $(shell dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
PLUGIN_DIR ?= $(PREFIX)/lib/$(TRIPLET)
DOC_DIR    ?= $(PREFIX)/share/doc/secure-iot-gateway
CARGO      ?= cargo
# Debian packages the build, the tests and the demo need.
APT_PKGS   := mosquitto mosquitto-clients mosquitto-dev libmosquitto-dev libclang-dev clang \
              libssl-dev libsqlite3-dev pkg-config ca-certificates dpkg-dev python3 debootstrap \
              cmake libcjson-dev curl redis-server haproxy postgresql
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps build test lint demo install uninstall deb deb-test bench bench-cluster fuzz clean brokers test-brokers

all: build

# Idempotent: installs only what is missing (apt-get update only then).
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "deps: all present"; fi
	@# Debian starts a system mosquitto on 1883 after install; the project never needs it.
	@# (It may start redis-server on 6379 and an empty haproxy too: the tests start their own on
	@# reserved loopback ports and never touch those.)
	@if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then $(SUDO) systemctl stop mosquitto || true; fi

build: deps
	$(CARGO) build --release

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Unit tests (pure core, test kit, CLI), integration tests (real mosquitto + mutual TLS), then
# the .deb installed into the system mosquitto and into a Debian 13 root's (root only; it
# removes itself afterwards).
test: deps lint
	$(CARGO) build --workspace --all-targets
	@# Everything once against the system broker (the version tests run alone, below; criterion
	@# benches take no --skip, so they run in test mode on their own).
	$(CARGO) test --workspace --lib --bins --tests --examples -- --skip versions::
	$(CARGO) test --workspace --benches
	$(MAKE) --no-print-directory test-brokers SUITE_ON_SYSTEM=no
	./scripts/test-deb.sh
	./scripts/test-deb-trixie.sh

# Mosquitto 2.0.18, 2.1.2 and 2.1.2 without websockets under target/brokers/ (built once, then
# cached; skipped with one line when neither ../shared/vendor nor the download is available).
brokers:
	@./scripts/brokers.sh --list

# The real-broker integration suite against the system mosquitto and each broker from
# `make brokers`. The version tests (response latency, the plugin's clock) run on their own, one
# at a time, so the rest of the suite cannot steal their CPU; the build without websockets
# (whose idle loop sleeps up to 24 h) runs only those.
SYSTEM_MOSQUITTO ?= /usr/sbin/mosquitto
# `make test` has already run the suite against the system broker: SUITE_ON_SYSTEM=no.
SUITE_ON_SYSTEM ?= yes
test-brokers:
	@{ echo "system $(SYSTEM_MOSQUITTO)"; ./scripts/brokers.sh --list; } | while read -r name bin; do \
		s=$$(date +%s); \
		case $$name in *-nows) ;; system) [ "$(SUITE_ON_SYSTEM)" = no ] || MOSQUITTO_BIN=$$bin $(CARGO) test --test it -- --skip versions:: || exit 1;; \
		*) MOSQUITTO_BIN=$$bin $(CARGO) test --test it -- --skip versions:: || exit 1;; esac; \
		MOSQUITTO_BIN=$$bin $(CARGO) test --test it versions:: -- --test-threads=1 || exit 1; \
		echo "== integration tests against mosquitto $$name ($$bin): $$(( $$(date +%s) - s )) s"; \
	done

demo: deps
	$(CARGO) build --release
	./scripts/demo.sh

install: build
	install -d $(DESTDIR)$(PLUGIN_DIR) $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(DOC_DIR)
	install -m 0644 target/release/libsecure_iot_gateway.so $(DESTDIR)$(PLUGIN_DIR)/secure_iot_gateway.so
	install -m 0755 target/release/iotgw $(DESTDIR)$(PREFIX)/bin/iotgw
	install -m 0644 mosquitto.conf.example README.md docs/envelope.md $(DESTDIR)$(DOC_DIR)/
	install -m 0644 docs/acl.example $(DESTDIR)$(DOC_DIR)/acl.example

uninstall:
	rm -f $(DESTDIR)$(PLUGIN_DIR)/secure_iot_gateway.so $(DESTDIR)$(PREFIX)/bin/iotgw
	rm -rf $(DESTDIR)$(DOC_DIR)

deb: deps
	./scripts/build-deb.sh

deb-test: deps
	./scripts/test-deb.sh
	./scripts/test-deb-trixie.sh

# Side by side: plain Mosquitto vs validating vs forwarding (ROUNDS=5 MESSAGES=60000 settable).
bench: deps
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends nginx-light; }
	./scripts/bench.py
	$(CARGO) bench --bench validate
	$(CARGO) run --release --example registry_scale
	./scripts/bench-e2e.sh 16 2500

# Cluster mode: plain Mosquitto, one node without cluster mode, and 1, 2, 3 nodes behind HAProxy
# sharing PostgreSQL and Redis, forwarding at QoS 1 to nginx (ROUNDS=3 DEVICES=6 MESSAGES=10000,
# MESSAGES per device; NODES=1,2,3 settable).
bench-cluster: deps
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends nginx-light; }
	./scripts/bench-cluster.py

# Coverage-guided fuzzing with cargo-fuzz (libFuzzer) on a nightly toolchain; on stable only, run
# with FUZZ_TOOLCHAIN= RUSTC_BOOTSTRAP=1. FUZZ_SECONDS per target. Findings land in
# fuzz/artifacts/<target>/; copy them to fuzz/regressions/<target>/ (replayed by `cargo test`).
FUZZ_SECONDS   ?= 600
FUZZ_TARGETS   ?= envelope canonical http_response store_recovery config
FUZZ_TOOLCHAIN ?= +nightly
fuzz:
	cd fuzz && $(CARGO) $(FUZZ_TOOLCHAIN) fuzz build -s none -a
	for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t; \
		dict=""; [ -f fuzz/dicts/$$t.dict ] && dict="-dict=fuzz/dicts/$$t.dict"; \
		nice -n 15 $(CARGO) $(FUZZ_TOOLCHAIN) fuzz run -s none -a $$t fuzz/corpus/$$t fuzz/regressions/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 $$dict || exit 1; \
	done

clean:
	$(CARGO) clean
