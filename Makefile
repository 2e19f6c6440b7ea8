# secure-iot-gateway — see README.md.
PREFIX     ?= /usr
DESTDIR    ?=
TRIPLET    := $(shell dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
PLUGIN_DIR ?= $(PREFIX)/lib/$(TRIPLET)
DOC_DIR    ?= $(PREFIX)/share/doc/secure-iot-gateway
CARGO      ?= cargo
# Debian packages the build, the tests and the demo need.
APT_PKGS   := mosquitto mosquitto-clients mosquitto-dev libmosquitto-dev libclang-dev clang \
              libssl-dev libsqlite3-dev pkg-config ca-certificates dpkg-dev python3
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps build test lint demo install uninstall deb deb-test bench fuzz clean

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
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# Unit tests (pure core), integration tests (real mosquitto + mutual TLS), then the .deb
# installed into the system mosquitto (root only; it removes itself afterwards).
test: deps lint
	$(CARGO) build --all-targets
	$(CARGO) test --all-targets
	./scripts/test-deb.sh

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

bench: deps
	$(CARGO) bench --bench validate
	$(CARGO) run --release --example registry_scale
	./scripts/bench-e2e.sh 16 2500

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
