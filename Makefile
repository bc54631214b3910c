# heist — one entry point for building, running and checking the cluster.
# `make demo` and `make test` are the two commands the README promises work on a fresh machine.

CARGO       ?= cargo
BINS        := coordinator worker heist-sandbox heistctl
RELEASE_DIR := target/release

.PHONY: all build demo dev test test-unit lint fmt bench clean

all: build

## build: release binaries into bin/
build:
	$(CARGO) build --release --locked --bins
	@mkdir -p bin
	@for b in $(BINS); do install -m 0755 $(RELEASE_DIR)/$$b bin/$$b; done
	@echo "built: $(addprefix bin/,$(BINS))" >&2

## demo: a local cluster (coordinator + 2 workers), sessions spread over both, tools routed, then stop
demo: build
	bin/heistctl dev demo --workers 2

## dev: a local cluster that runs until Ctrl-C
dev: build
	bin/heistctl dev up --workers 2

## test: the whole test suite (what CI runs)
test:
	$(CARGO) build --locked --workspace --bins
	$(CARGO) nextest run --locked --workspace --no-fail-fast

## lint: formatting and clippy, warnings denied
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

## fmt: format the tree
fmt:
	$(CARGO) fmt --all

## bench: routed calls and sessions against same-run baselines (see docs/BENCHMARKS.md)
bench: build
	bin/heistctl bench --json target/bench.json

clean:
	$(CARGO) clean
	rm -f $(addprefix bin/,$(BINS))
