# secure-iot-gateway — see README.md.
PREFIX     ?= /usr
DESTDIR    ?=
TRIPLET    := $(shell dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
PLUGIN_DIR ?= $(PREFIX)/lib/$(TRIPLET)
DOC_DIR    ?= $(PREFIX)/share/doc/secure-iot-gateway
CARGO      ?= cargo
# Debian packages the build, the tests and the demo need.
APT_PKGS   := mosquitto mosquitto-clients mosquitto-dev libmosquitto-dev libclang-dev clang \
              libssl-dev libsqlite3-dev pkg-config ca-certificates dpkg-dev python3 debootstrap
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps build test lint demo install uninstall deb deb-test bench clean

all: build

# Idempotent: installs only what is missing (apt-get update only then).
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "deps: all present"; fi
	@# Debian starts a system mosquitto on 1883 after install; the project never needs it.
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
	$(CARGO) test --workspace --all-targets
	./scripts/test-deb.sh
	./scripts/test-deb-trixie.sh

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

clean:
	$(CARGO) clean
