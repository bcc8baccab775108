# HolePunch developer entry points. Every target installs what it needs first (`deps`), so each
# works on a fresh Debian 12 machine as root.
SHELL := /bin/bash
SWIFT ?= swift
APT_PACKAGES := libngtcp2-dev libngtcp2-crypto-gnutls-dev libgnutls28-dev liblua5.4-dev pkg-config \
	gnutls-bin nftables iproute2 python3 python3-venv ngtcp2-server ngtcp2-client coturn stun-client procps \
	nats-server libnats-dev conntrack
VENV := .build/venv
# make install: PREFIX is where it goes, DESTDIR a staging root prepended to it (for packagers).
PREFIX ?= /usr/local
DESTDIR ?=
# The public library modules with a DocC catalog (Sources/<module>/Docs.docc).
DOC_TARGETS := HolePunch HolePunchNet HolePunchQUIC HolePunchSTUN HolePunchStrategy HolePunchRendezvous HolePunchCluster

.PHONY: deps build test docs install demo bench clean

## deps: apt-install the system libraries and test tools; a no-op when all are present.
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@if [ ! -x $(VENV)/bin/python ] || ! $(VENV)/bin/python -c 'import aioquic' 2>/dev/null; then \
		python3 -m venv $(VENV) && $(VENV)/bin/pip install -q 'aioquic==1.7.2' ; \
	fi

## build: debug build of every target.
build: deps
	$(SWIFT) build

## test: the whole test suite (tests that need root or namespaces skip with a reason elsewhere), in six phases, so
## that no phase puts the 2 cores under more load than its tests' deadlines allow (docs/design-notes.md):
##   1. the parallel suite;
##   2. the suites that run whole processes or many punches at once (examples, nodes, the NATS cluster);
##   3. the strategy checks (`strategy check` over 2160 contexts per file): pure CPU, no network deadlines;
##   4. the suites that check real timings (start skew, idle and keep-alive timers);
##   5. the separate-package build (HolePunch built again in its own scratch directory: minutes of both cores);
##   6. the real-NAT lab.
TIMING_SUITES := RendezvousLoopbackTests|ConnectionLifecycleTests|ClusterStartSkewTests
SOLO_SUITES := PathDependencyTests
HEAVY_SUITES := HolePunchClusterTests|ExamplesTests|HolePunchNodeTests|HostilePeerProcessTests
CPU_SUITES := HolePunchStrategyTests|StrategyAuthorCLITests|StrategyCheckCLITests
test: deps docs
	HOLEPUNCH_PYTHON=$(CURDIR)/$(VENV)/bin/python $(SWIFT) test --skip HolePunchLabTests --skip '$(TIMING_SUITES)' \
		--skip '$(SOLO_SUITES)' --skip '$(HEAVY_SUITES)' --skip '$(CPU_SUITES)'
	HOLEPUNCH_PYTHON=$(CURDIR)/$(VENV)/bin/python $(SWIFT) test --skip-build --filter '$(HEAVY_SUITES)' \
		--skip '$(TIMING_SUITES)' --skip '$(SOLO_SUITES)'
	HOLEPUNCH_PYTHON=$(CURDIR)/$(VENV)/bin/python $(SWIFT) test --skip-build --filter '$(CPU_SUITES)'
	HOLEPUNCH_PYTHON=$(CURDIR)/$(VENV)/bin/python $(SWIFT) test --skip-build --filter '$(TIMING_SUITES)'
	HOLEPUNCH_PYTHON=$(CURDIR)/$(VENV)/bin/python $(SWIFT) test --skip-build --filter '$(SOLO_SUITES)'
	HOLEPUNCH_PYTHON=$(CURDIR)/$(VENV)/bin/python $(SWIFT) test --skip-build --filter HolePunchLabTests

## docs: DocC for every public module (HTML under .build/plugins/Swift-DocC/outputs/). Any DocC warning (a broken
## symbol link, a doc comment naming a parameter that does not exist) fails the target, so the docs cannot rot.
docs: deps
	$(SWIFT) package generate-documentation --warnings-as-errors $(foreach t,$(DOC_TARGETS),--target $(t))

## install: a release holepunch in $(DESTDIR)$(PREFIX)/bin, the shipped strategies in
## $(DESTDIR)$(PREFIX)/share/holepunch/strategies.
install: deps
	$(SWIFT) build -c release --product holepunch
	install -d "$(DESTDIR)$(PREFIX)/bin" "$(DESTDIR)$(PREFIX)/share/holepunch/strategies"
	install -m 0755 "$$($(SWIFT) build -c release --show-bin-path)/holepunch" "$(DESTDIR)$(PREFIX)/bin/holepunch"
	install -m 0644 strategies/*.lua "$(DESTDIR)$(PREFIX)/share/holepunch/strategies/"

## demo: the current main demo.
demo: deps
	$(SWIFT) build -c release --product holepunch
	.build/release/holepunch demo

## bench: every benchmark (prints tables, writes JSON under bench-results/).
bench: deps
	$(SWIFT) build -c release --product holepunch
	mkdir -p bench-results
	.build/release/holepunch bench quic --json bench-results/quic.json

clean:
	rm -rf .build
